//! A random workload applied to a dfos mount and to a local directory (the
//! model) side by side, and a digest of a directory tree to compare them.
//!
//! Each step performs one operation on both sides and checks that both give
//! the same outcome: the same data (or bytes copied), or the same errno.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

const DIRS: [&str; 4] = ["", "d0", "d1", "d0/e"];
const MAX_OFFSET: u64 = 3 << 20;
const MAX_WRITE: usize = 1_500_000;

pub struct Workload {
    rng: StdRng,
    /// Steps taken so far, for messages.
    pub steps: usize,
}

/// What one side of a step gave: bytes read (or nothing), or an errno.
type Outcome = Result<Vec<u8>, i32>;

fn outcome(r: io::Result<Vec<u8>>) -> Outcome {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

impl Workload {
    pub fn new(seed: u64) -> Workload {
        Workload { rng: StdRng::seed_from_u64(seed), steps: 0 }
    }

    fn path(&mut self) -> String {
        let dir = DIRS[self.rng.gen_range(0..DIRS.len())];
        let name = if self.rng.gen_bool(0.2) {
            format!("d{}", self.rng.gen_range(0..2))
        } else {
            format!("f{}", self.rng.gen_range(0..6))
        };
        if dir.is_empty() {
            name
        } else {
            format!("{dir}/{name}")
        }
    }

    /// One random operation on both trees; panics if their outcomes differ.
    /// Returns a description of the step.
    pub fn step(&mut self, mount: &Path, model: &Path) -> String {
        self.steps += 1;
        let path = self.path();
        let (m, l) = (mount.join(&path), model.join(&path));
        let choice = self.rng.gen_range(0..100);
        let (what, remote, local): (String, Outcome, Outcome) = match choice {
            0..=34 => {
                // Half the writes are small, near the start: small files
                // take the mount's small-file cache path.
                let small = self.rng.gen_bool(0.5);
                let offset = if small { self.rng.gen_range(0..8192) } else { self.rng.gen_range(0..MAX_OFFSET) };
                let len = if small { self.rng.gen_range(1..8192) } else { self.rng.gen_range(1..MAX_WRITE) };
                let mut data = vec![0u8; len];
                self.rng.fill(&mut data[..]);
                // Some writes append (O_APPEND), some make their file
                // (O_EXCL, refused where it exists), the rest write at an offset.
                let how = self.rng.gen_range(0..10);
                let write = |p: &Path| -> io::Result<Vec<u8>> {
                    let mut f = match how {
                        0 => OpenOptions::new().append(true).open(p)?,
                        1 => OpenOptions::new().write(true).create_new(true).open(p)?,
                        _ => OpenOptions::new().create(true).truncate(false).write(true).open(p)?,
                    };
                    match how {
                        0 | 1 => f.write_all(&data)?,
                        _ => f.write_all_at(&data, offset)?,
                    }
                    f.sync_all()?;
                    Ok(Vec::new())
                };
                let kind = ["append to", "create and write", "write"][how.min(2)];
                (format!("{kind} {path} @{offset} +{len}"), outcome(write(&m)), outcome(write(&l)))
            }
            35..=44 => {
                let size = self.rng.gen_range(0..MAX_OFFSET);
                let truncate = |p: &Path| -> io::Result<Vec<u8>> {
                    OpenOptions::new().write(true).open(p)?.set_len(size)?;
                    Ok(Vec::new())
                };
                (format!("truncate {path} {size}"), outcome(truncate(&m)), outcome(truncate(&l)))
            }
            45..=59 => (format!("read {path}"), outcome(fs::read(&m)), outcome(fs::read(&l))),
            60..=69 => {
                let to = self.path();
                // A quarter swap the two names (RENAME_EXCHANGE).
                let exchange = self.rng.gen_range(0..4) == 0;
                let rename = |from: &Path, to: &Path| match exchange {
                    false => fs::rename(from, to).map(|_| Vec::new()),
                    true => rename_exchange(from, to).map(|_| Vec::new()),
                };
                (
                    format!("{} {path} {to}", if exchange { "exchange" } else { "rename" }),
                    outcome(rename(&m, &mount.join(&to))),
                    outcome(rename(&l, &model.join(&to))),
                )
            }
            70..=77 => {
                let unlink = |p: &Path| fs::remove_file(p).map(|_| Vec::new());
                (format!("unlink {path}"), outcome(unlink(&m)), outcome(unlink(&l)))
            }
            78..=87 => {
                let mkdir = |p: &Path| fs::create_dir(p).map(|_| Vec::new());
                (format!("mkdir {path}"), outcome(mkdir(&m)), outcome(mkdir(&l)))
            }
            91..=92 => {
                let to = self.path();
                let link = |from: &Path, to: &Path| fs::hard_link(from, to).map(|_| Vec::new());
                (format!("link {path} {to}"), outcome(link(&m, &mount.join(&to))), outcome(link(&l, &model.join(&to))))
            }
            88..=90 => {
                let rmdir = |p: &Path| fs::remove_dir(p).map(|_| Vec::new());
                (format!("rmdir {path}"), outcome(rmdir(&m)), outcome(rmdir(&l)))
            }
            96..=97 => {
                let modes = [0, libc::FALLOC_FL_KEEP_SIZE, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE];
                let mode = modes[self.rng.gen_range(0..modes.len())];
                let offset = self.rng.gen_range(0..MAX_OFFSET);
                let len = self.rng.gen_range(1..MAX_WRITE as u64);
                let allocate = |p: &Path| -> io::Result<Vec<u8>> {
                    let f = OpenOptions::new().write(true).open(p)?;
                    fallocate(&f, mode, offset, len)?;
                    Ok(Vec::new())
                };
                (format!("fallocate {path} mode {mode} @{offset} +{len}"), outcome(allocate(&m)), outcome(allocate(&l)))
            }
            93..=95 => {
                let to = self.path();
                let from_offset = self.rng.gen_range(0..MAX_OFFSET);
                let to_offset = self.rng.gen_range(0..MAX_OFFSET);
                let len = self.rng.gen_range(1..MAX_WRITE);
                let copy = |from: &Path, to: &Path| -> io::Result<Vec<u8>> {
                    let source = fs::File::open(from)?;
                    let target = OpenOptions::new().create(true).truncate(false).write(true).open(to)?;
                    let copied = copy_file_range(&source, from_offset, &target, to_offset, len)?;
                    target.sync_all()?;
                    Ok(copied.to_string().into_bytes())
                };
                (
                    format!("copy {path} @{from_offset} +{len} to {to} @{to_offset}"),
                    outcome(copy(&m, &mount.join(&to))),
                    outcome(copy(&l, &model.join(&to))),
                )
            }
            98 => {
                let name = ["user.a", "user.b"][self.rng.gen_range(0..2)];
                let mut value = vec![0u8; self.rng.gen_range(0..64)];
                self.rng.fill(&mut value[..]);
                let call = self.rng.gen_range(0..6);
                let xattr = |p: &Path| xattr_call(p, call, name, &value);
                (format!("xattr call {call} {path} {name} +{}", value.len()), outcome(xattr(&m)), outcome(xattr(&l)))
            }
            _ => {
                let stat = |p: &Path| -> io::Result<Vec<u8>> {
                    let meta = fs::metadata(p)?;
                    let size = if meta.is_dir() { 0 } else { meta.len() };
                    Ok(format!("{} {size} {:o}", meta.is_dir(), meta.permissions().mode() & 0o7777).into_bytes())
                };
                (format!("stat {path}"), outcome(stat(&m)), outcome(stat(&l)))
            }
        };
        assert!(
            remote == local,
            "step {} `{what}` differs: mount {:?}, model {:?}",
            self.steps,
            remote.as_ref().map(|v| v.len()),
            local.as_ref().map(|v| v.len())
        );
        what
    }
}

/// One extended-attribute call on `path`: 0 sets `name` to `value`, 1
/// reads it, 2 removes it, 3 lists the names (sorted), 4 creates it
/// (`XATTR_CREATE`), 5 replaces it (`XATTR_REPLACE`).
fn xattr_call(path: &Path, call: u32, name: &str, value: &[u8]) -> io::Result<Vec<u8>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = CString::new(name).unwrap();
    let mut buffer = vec![0u8; 4096];
    // SAFETY: NUL-terminated strings and buffers valid for the lengths
    // given, all outliving the calls.
    let rc = unsafe {
        match call {
            0 | 4 | 5 => {
                let flags = match call {
                    4 => libc::XATTR_CREATE,
                    5 => libc::XATTR_REPLACE,
                    _ => 0,
                };
                libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags) as isize
            }
            1 => libc::getxattr(path.as_ptr(), name.as_ptr(), buffer.as_mut_ptr().cast(), buffer.len()),
            2 => libc::removexattr(path.as_ptr(), name.as_ptr()) as isize,
            3 => libc::listxattr(path.as_ptr(), buffer.as_mut_ptr().cast(), buffer.len()),
            _ => unreachable!("no such call {call}"),
        }
    };
    let len = usize::try_from(rc).map_err(|_| io::Error::last_os_error())?;
    buffer.truncate(if call == 1 || call == 3 { len } else { 0 });
    if call == 3 {
        let mut names: Vec<&[u8]> = buffer.split(|b| *b == 0).filter(|n| !n.is_empty()).collect();
        names.sort();
        return Ok(names.join(&0));
    }
    Ok(buffer)
}

/// The users' `user.` extended attributes of `path` as " name=hex..." in
/// name order (on a storage node, not its own `user.dfos.` ones); nothing
/// where they cannot be listed (a mount without them).
fn user_xattrs(path: &Path) -> String {
    let Ok(names) = xattr_call(path, 3, "", &[]) else { return String::new() };
    let mut out = String::new();
    let names = names.split(|b| *b == 0).map(String::from_utf8_lossy);
    for name in names.filter(|name| dfos_protocol::is_user_xattr(name)) {
        let value = xattr_call(path, 1, &name, &[]).unwrap_or_default();
        let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
        out.push_str(&format!(" {name}={hex}"));
    }
    out
}

/// One `fallocate(2)` call.
fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).expect("no NUL in test paths");
    let (a, b) = (c(a), c(b));
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn fallocate(file: &fs::File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: an open descriptor; offsets below MAX_OFFSET fit an i64.
    let done = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One `copy_file_range(2)` call; returns how many bytes it copied.
fn copy_file_range(source: &fs::File, from: u64, target: &fs::File, to: u64, len: usize) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let (mut from, mut to) = (from as i64, to as i64);
    // SAFETY: two open descriptors and two offsets the call may advance.
    let copied = unsafe { libc::copy_file_range(source.as_raw_fd(), &mut from, target.as_raw_fd(), &mut to, len, 0) };
    usize::try_from(copied).map_err(|_| io::Error::last_os_error())
}

/// Names, kinds, modes, sizes and files' link counts below `root`, without reading contents:
/// cheap enough to compare after every step.
pub fn tree_shape(root: &Path) -> Vec<String> {
    listing(root, false)
}

/// One line per entry below `root` (".dfos" excluded): path, kind, mode,
/// size, a file's link count, SHA-256 of the bytes and extended
/// attributes, sorted. Equal listings mean equal trees.
pub fn tree_listing(root: &Path) -> Vec<String> {
    listing(root, true)
}

fn listing(root: &Path, with_contents: bool) -> Vec<String> {
    fn walk(root: &Path, rel: &str, with_contents: bool, out: &mut Vec<String>) {
        let dir = if rel.is_empty() { root.to_path_buf() } else { root.join(rel) };
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            if rel.is_empty() && name == ".dfos" {
                continue;
            }
            let path = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let meta = fs::symlink_metadata(root.join(&path)).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let xattrs = if with_contents { user_xattrs(&root.join(&path)) } else { String::new() };
            if meta.is_dir() {
                out.push(format!("{path} dir {mode:o}{xattrs}"));
                walk(root, &path, with_contents, out);
            } else if !with_contents {
                out.push(format!("{path} file {mode:o} {} names {}{xattrs}", meta.len(), meta.nlink()));
            } else {
                let digest = Sha256::digest(fs::read(root.join(&path)).unwrap());
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                out.push(format!("{path} file {mode:o} {} names {} {hex}{xattrs}", meta.len(), meta.nlink()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, "", with_contents, &mut out);
    out.sort();
    out
}
