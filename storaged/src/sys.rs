//! The few system calls the store needs that `std` does not offer. Those
//! acting on a path never follow a symlink at its last component.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::path::Path;

use dfos_protocol::{AllocateMode, Timestamp};

fn c_path(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `renameat2(RENAME_NOREPLACE)`: EEXIST instead of replacing `to`.
pub fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    rename_with(from, to, libc::RENAME_NOREPLACE)
}

/// `renameat2(RENAME_EXCHANGE)`: `from` and `to` swap what they name.
pub fn rename_exchange(from: &Path, to: &Path) -> io::Result<()> {
    rename_with(from, to, libc::RENAME_EXCHANGE)
}

fn rename_with(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: both arguments are NUL-terminated strings that outlive the call.
    check(unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) })
}

/// `mknod` of a node of type `type_bits` (`S_IFIFO`, `S_IFSOCK`).
pub fn make_node(path: &Path, type_bits: libc::mode_t, mode: u32) -> io::Result<()> {
    let path = c_path(path)?;
    // SAFETY: `path` is NUL-terminated and outlives the call.
    check(unsafe { libc::mknod(path.as_ptr(), type_bits | (mode & 0o7777), 0) })
}

/// `utimensat(AT_SYMLINK_NOFOLLOW)`: a link's own times, never its
/// target's; `None` leaves one as it is.
pub fn set_times_nofollow(path: &Path, atime: Option<Timestamp>, mtime: Option<Timestamp>) -> io::Result<()> {
    let spec = |t: Option<Timestamp>| match t {
        Some(t) => libc::timespec { tv_sec: t.secs as libc::time_t, tv_nsec: t.nanos.min(999_999_999) as libc::c_long },
        None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
    };
    let times = [spec(atime), spec(mtime)];
    let path = c_path(path)?;
    // SAFETY: `path` is NUL-terminated and `times` holds two timespecs; both outlive the call.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

/// `fallocate(2)` on an open regular file, with the flags `mode` names.
pub fn allocate(file: &File, mode: AllocateMode, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = match mode {
        AllocateMode::Extend => 0,
        AllocateMode::KeepSize => libc::FALLOC_FL_KEEP_SIZE,
        AllocateMode::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        AllocateMode::ZeroRange => libc::FALLOC_FL_ZERO_RANGE,
        AllocateMode::ZeroRangeKeepSize => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
    };
    let too_large = |_| io::Error::from_raw_os_error(libc::EFBIG);
    let (offset, len) = (i64::try_from(offset).map_err(too_large)?, i64::try_from(len).map_err(too_large)?);
    // SAFETY: the descriptor is open for the call's duration.
    check(unsafe { libc::fallocate(file.as_raw_fd(), flags, offset, len) })
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Calls `get` (a size-returning xattr call taking a buffer) with a buffer
/// large enough, asking again if the value grew between the two calls.
fn read_sized(get: impl Fn(*mut libc::c_void, usize) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    loop {
        let size = get(std::ptr::null_mut(), 0);
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buffer = vec![0u8; size as usize];
        let got = get(buffer.as_mut_ptr().cast(), buffer.len());
        if got >= 0 {
            buffer.truncate(got as usize);
            return Ok(buffer);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ERANGE) {
            return Err(error);
        }
    }
}

/// `lgetxattr(2)`: the value of `name`, ENODATA when there is none.
pub fn get_xattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (path, name) = (c_path(path)?, c_name(name)?);
    // SAFETY: both strings are NUL-terminated and outlive the call; the
    // buffer is valid for `len` bytes (or null with `len` 0).
    read_sized(|buffer, len| unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buffer, len) })
}

/// `llistxattr(2)`: every attribute name, in the filesystem's order.
pub fn list_xattrs(path: &Path) -> io::Result<Vec<String>> {
    let path = c_path(path)?;
    // SAFETY: as in get_xattr.
    let names = read_sized(|buffer, len| unsafe { libc::llistxattr(path.as_ptr(), buffer.cast(), len) })?;
    Ok(names
        .split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .filter_map(|name| std::str::from_utf8(name).ok().map(str::to_owned))
        .collect())
}

/// `lsetxattr(2)` with `flags` (0, `XATTR_CREATE` or `XATTR_REPLACE`).
pub fn set_xattr(path: &Path, name: &str, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let (path, name) = (c_path(path)?, c_name(name)?);
    // SAFETY: the strings are NUL-terminated and `value` is valid for its
    // length; all outlive the call.
    check(unsafe { libc::lsetxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags) })
}

/// `lremovexattr(2)`: ENODATA when there is no such attribute.
pub fn remove_xattr(path: &Path, name: &str) -> io::Result<()> {
    let (path, name) = (c_path(path)?, c_name(name)?);
    // SAFETY: both strings are NUL-terminated and outlive the call.
    check(unsafe { libc::lremovexattr(path.as_ptr(), name.as_ptr()) })
}
