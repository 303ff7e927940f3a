//! One storage daemon per storage directory.
//!
//! Two daemons started on the same directory (a second `storaged` with the
//! same `--storage`, by mistake) would both apply every request of the log
//! to the same files: each create would fail for one of them, each append
//! would land twice, and the checkpoint would be written by both. So a
//! daemon holds an exclusive lock on `<storage>/.dfos/lock` while it runs,
//! and a second one refuses to start, naming the holder's pid.
//!
//! Guarantee: while one daemon holds the lock, no other can take it. The
//! lock is the kernel's (`flock`), held by the open file, so it ends with
//! the process, however that ends: a crashed daemon never leaves a stale
//! lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::checkpoint::STATE_DIR;

/// Held for as long as the daemon serves the directory.
#[derive(Debug)]
pub struct StorageLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("storage directory {storage} is in use by another storaged ({holder}); stop it first, or give this one its own --storage")]
    InUse { storage: PathBuf, holder: String },
    #[error("cannot lock storage directory {storage}: {source}")]
    Io { storage: PathBuf, source: std::io::Error },
}

impl StorageLock {
    /// Takes the lock of `storage`, without waiting.
    pub fn acquire(storage: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io { storage: storage.to_owned(), source };
        let dir = storage.join(STATE_DIR);
        std::fs::create_dir_all(&dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("lock"))
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let holder = match pid.trim() {
                    "" => "pid unknown".to_owned(),
                    pid => format!("pid {pid}"),
                };
                return Err(LockError::InUse { storage: storage.to_owned(), holder });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // The pid is only for the message a second daemon prints.
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(StorageLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_daemon_on_the_same_directory_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = StorageLock::acquire(dir.path()).unwrap();
        let refused = StorageLock::acquire(dir.path()).unwrap_err();
        let message = refused.to_string();
        assert!(matches!(refused, LockError::InUse { .. }), "{message}");
        assert!(message.contains(&format!("pid {}", std::process::id())), "{message}");
        drop(first);
        StorageLock::acquire(dir.path()).expect("free once the first is gone");
        let other = tempfile::tempdir().unwrap();
        let _ = StorageLock::acquire(other.path()).expect("another directory is another lock");
    }
}
