//! The credentials file (`id_passwd.txt`): one `user:argon2id-PHC` line per
//! user. Passwords never appear in it; the admin commands hash them.
//!
//! The file is re-read when its modification time changes, so `storaged user
//! add` takes effect on running daemons without a restart. Edits are written
//! to a temporary file and renamed over the original, so a crash never
//! leaves a half-written file.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read or write credentials file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: expected `user:argon2-hash`")]
    Malformed { path: PathBuf, line: usize },
    #[error("invalid user name {0:?}: use 1-64 letters, digits, '_', '-' or '.', not starting with '.'")]
    BadUserName(String),
    #[error("user {0} already exists (use `storaged user passwd`)")]
    UserExists(String),
    #[error("no such user {0}")]
    NoSuchUser(String),
    #[error("password must not be empty")]
    EmptyPassword,
    #[error("cannot hash password: {0}")]
    Hash(String),
}

/// A user name is also a directory name under the storage root, so it is
/// restricted to characters that are safe there.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

pub fn hash_password(password: &str) -> Result<String, CredentialsError> {
    if password.is_empty() {
        return Err(CredentialsError::EmptyPassword);
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| CredentialsError::Hash(e.to_string()))
}

fn parse(path: &Path, text: &str) -> Result<HashMap<String, String>, CredentialsError> {
    let mut users = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let malformed = || CredentialsError::Malformed { path: path.to_owned(), line: index + 1 };
        let (user, hash) = line.split_once(':').ok_or_else(malformed)?;
        if !valid_user_name(user) || PasswordHash::new(hash).is_err() {
            return Err(malformed());
        }
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok(users)
}

fn read(path: &Path) -> Result<HashMap<String, String>, CredentialsError> {
    match fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(source) => Err(CredentialsError::Io { path: path.to_owned(), source }),
    }
}

/// Adds a user (`replace == false`) or changes a password (`replace == true`).
pub fn set_password(path: &Path, user: &str, password: &str, replace: bool) -> Result<(), CredentialsError> {
    if !valid_user_name(user) {
        return Err(CredentialsError::BadUserName(user.to_owned()));
    }
    let mut users = read(path)?;
    match (users.contains_key(user), replace) {
        (true, false) => return Err(CredentialsError::UserExists(user.to_owned())),
        (false, true) => return Err(CredentialsError::NoSuchUser(user.to_owned())),
        _ => {}
    }
    users.insert(user.to_owned(), hash_password(password)?);
    let mut names: Vec<_> = users.keys().cloned().collect();
    names.sort();
    let io_err = |source| CredentialsError::Io { path: path.to_owned(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir).map_err(io_err)?;
    for name in names {
        writeln!(tmp.1, "{name}:{}", users[&name]).map_err(io_err)?;
    }
    tmp.1.sync_all().map_err(io_err)?;
    fs::rename(&tmp.0, path).map_err(io_err)
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!(".id_passwd.{}.tmp", std::process::id()));
    let file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    Ok((path, file))
}

/// A new password for the admin commands: prompted twice on a terminal,
/// otherwise the first line of standard input (for scripts).
pub fn read_new_password() -> std::io::Result<String> {
    use std::io::{BufRead, IsTerminal};
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("New password: ")?;
        let second = rpassword::prompt_password("Repeat password: ")?;
        if first != second {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "passwords do not match"));
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// The users known to a running daemon, reloaded when the file changes.
pub struct Credentials {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, HashMap<String, String>)>,
}

impl Credentials {
    /// Fails if the file exists but cannot be parsed: a daemon should not
    /// start with a broken user list.
    pub fn open(path: &Path) -> Result<Self, CredentialsError> {
        let creds = Credentials { path: path.to_owned(), cache: Mutex::new((None, HashMap::new())) };
        creds.refresh()?;
        Ok(creds)
    }

    fn refresh(&self) -> Result<(), CredentialsError> {
        let mtime = fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut cache = self.cache.lock().unwrap();
        if cache.0.is_none() || cache.0 != mtime {
            cache.1 = read(&self.path)?;
            cache.0 = mtime;
        }
        Ok(())
    }

    /// The stored hash of `user`, after picking up any edit of the file.
    /// A file broken by a manual edit keeps the last good user list.
    pub fn hash_of(&self, user: &str) -> Option<String> {
        self.with_current(|users| users.get(user).cloned())
    }

    /// The user list after picking up any edit of the file.
    fn with_current<T>(&self, f: impl FnOnce(&HashMap<String, String>) -> T) -> T {
        if let Err(e) = self.refresh() {
            log::error!("op=credentials path={} error={e}; keeping the previous user list", self.path.display());
        }
        f(&self.cache.lock().unwrap().1)
    }

    /// Every user name the file holds, in no particular order.
    pub fn users(&self) -> Vec<String> {
        self.with_current(|users| users.keys().cloned().collect())
    }

    /// Checks a password; the hash is returned so it can key the session.
    pub fn verify(&self, user: &str, password: &str) -> Option<String> {
        let hash = self.hash_of(user)?;
        let parsed = PasswordHash::new(&hash).ok()?;
        Argon2::default().verify_password(password.as_bytes(), &parsed).ok().map(|_| hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_verify_and_change_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_passwd.txt");
        set_password(&path, "alice", "pw1", false).unwrap();
        assert!(matches!(set_password(&path, "alice", "x", false), Err(CredentialsError::UserExists(_))));
        let creds = Credentials::open(&path).unwrap();
        assert!(creds.verify("alice", "pw1").is_some());
        assert!(creds.verify("alice", "wrong").is_none());
        assert!(creds.verify("bob", "pw1").is_none());
        std::thread::sleep(std::time::Duration::from_millis(20));
        set_password(&path, "alice", "pw2", true).unwrap();
        assert!(creds.verify("alice", "pw2").is_some());
        assert!(!fs::read_to_string(&path).unwrap().contains("pw2"));
    }

    #[test]
    fn bad_names_and_lines_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        assert!(set_password(&path, "../x", "p", false).is_err());
        assert!(set_password(&path, "nobody", "p", true).is_err());
        fs::write(&path, "alice-no-colon\n").unwrap();
        assert!(matches!(Credentials::open(&path), Err(CredentialsError::Malformed { line: 1, .. })));
    }
}
