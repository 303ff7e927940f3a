//! Writes file data through the page cache and, for large writes, starts
//! writing it to the device at once.
//!
//! A sequential write arrives as chunks of a few MiB, and the `fsync` that
//! `dd conv=fsync`, editors and `cp` end with waits until every one is on
//! the device. Left to itself, the kernel starts writeback only after ~30 s
//! or once a tenth of memory is dirty, so that `fsync` found the whole file
//! still to write while nothing else went on. Starting each large chunk's
//! writeback as it lands (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which
//! queues the pages and does not wait for them) overlaps the device with
//! the chunks still crossing the broker. On the bench VM this wrote
//! 256 MiB with `conv=fsync` at 251–375 MB/s against 146–212 MB/s with
//! the `O_DIRECT` writes it replaced, which blocked the node for each
//! chunk in turn (see docs/PERFORMANCE.md).
//!
//! Guarantees: every byte of `data` is at `offset`, for every reader, when
//! [`write_at`] returns `Ok`; a large write is then queued for the device
//! (durable only after an `fsync`, as before). Small writes stay in the
//! page cache only: a file rewritten or removed soon after costs the
//! device nothing.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Writes smaller than this are left to the kernel's own writeback: small
/// files are the ones most often rewritten or removed within seconds.
const MIN_EARLY_WRITEBACK_BYTES: usize = 64 * 1024;

/// Whether a write of `len` bytes starts its writeback at once.
fn starts_writeback(len: usize) -> bool {
    len >= MIN_EARLY_WRITEBACK_BYTES
}

/// Writes `data` at `offset` into the existing regular file at `path` (never
/// through a symlink) and returns the file, open for writing.
pub fn write_at(path: &Path, data: &[u8], offset: u64) -> io::Result<File> {
    let file = OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    file.write_all_at(data, offset)?;
    if starts_writeback(data.len()) {
        start_writeback(&file, offset, data.len());
    }
    Ok(file)
}

/// Queues the range for the device. A refusal (a filesystem without it)
/// only leaves the pages to the kernel's writeback: the bytes are written.
fn start_writeback(file: &File, offset: u64, len: usize) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: the descriptor is open for the duration of the call, and the
    // call reads no memory of this process.
    let started = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    if started != 0 {
        log::debug!("op=start-writeback offset={offset} len={len} error={}", io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 253) as u8).collect()
    }

    #[test]
    fn only_large_writes_start_their_writeback() {
        assert!(starts_writeback(960 * 1024));
        assert!(starts_writeback(64 * 1024));
        assert!(!starts_writeback(4096), "small");
    }

    /// Whether ext4 still holds any of `path`'s bytes as delayed
    /// allocation: dirty pages whose writeback has not started (its
    /// writeback allocates their blocks). Asked with `FS_IOC_FIEMAP`, whose
    /// extents carry `FIEMAP_EXTENT_DELALLOC` until then.
    fn waits_for_writeback(path: &Path) -> bool {
        const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
        const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
        const EXTENTS: usize = 32;
        #[repr(C)]
        struct Extent {
            logical: u64,
            physical: u64,
            length: u64,
            reserved64: [u64; 2],
            flags: u32,
            reserved: [u32; 3],
        }
        #[repr(C)]
        struct Fiemap {
            start: u64,
            length: u64,
            flags: u32,
            mapped_extents: u32,
            extent_count: u32,
            reserved: u32,
            extents: [Extent; EXTENTS],
        }
        let file = File::open(path).unwrap();
        // SAFETY: all-zero bytes are a valid `Fiemap` (integers only).
        let mut map: Fiemap = unsafe { std::mem::zeroed() };
        map.length = u64::MAX;
        map.extent_count = EXTENTS as u32;
        // SAFETY: `map` is a `struct fiemap` with room for `extent_count`
        // extents, alive for the call.
        let asked = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut map) };
        assert_eq!(asked, 0, "FIEMAP: {}", io::Error::last_os_error());
        map.extents[..map.mapped_extents as usize].iter().any(|e| e.flags & FIEMAP_EXTENT_DELALLOC != 0)
    }

    /// In the repository's filesystem, where the default storage directory
    /// is: ext4 in CI and on the bench machine, which allocates blocks
    /// only at writeback (a `/tmp` in memory would have no device).
    #[test]
    fn a_large_write_is_queued_for_the_device_at_once_and_a_small_one_is_not() {
        let beside_the_storage = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&beside_the_storage).unwrap();
        let dir = tempfile::tempdir_in(beside_the_storage).unwrap();
        let (small, large) = (dir.path().join("small"), dir.path().join("large"));
        for path in [&small, &large] {
            std::fs::write(path, b"").unwrap();
        }
        write_at(&small, &pattern(4096), 0).unwrap();
        write_at(&large, &pattern(1 << 20), 0).unwrap();
        assert!(waits_for_writeback(&small), "a small write stays in the page cache (is this ext4?)");
        assert!(!waits_for_writeback(&large), "a large write's writeback has started");
    }

    #[test]
    fn large_and_small_writes_leave_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        let big = pattern(256 * 1024);
        // Large at 0, small (unaligned) in the middle, large again past the
        // end of the file, then a read sees them all.
        write_at(&path, &big, 0).unwrap();
        write_at(&path, b"hello", 4096 + 3).unwrap();
        write_at(&path, &big, 512 * 1024).unwrap();
        let mut expected = big.clone();
        expected[4099..4104].copy_from_slice(b"hello");
        expected.resize(512 * 1024, 0);
        expected.extend_from_slice(&big);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("target"), b"").unwrap();
        std::os::unix::fs::symlink(dir.path().join("target"), dir.path().join("link")).unwrap();
        let err = write_at(&dir.path().join("link"), &pattern(64 * 1024), 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
    }
}
