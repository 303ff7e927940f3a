//! Writes whole, page-aligned chunks of file data past the page cache.
//!
//! A sequential write arrives as full chunks at chunk-aligned offsets. On the
//! bench machine, copying those bytes into freshly allocated page-cache pages
//! was storaged's largest cost; `O_DIRECT` hands them to the device instead,
//! which cut storaged's CPU per GiB written by a third. The file's bytes are
//! the same either way, and the kernel keeps buffered readers of the same file
//! coherent with direct writers.
//!
//! Guarantees: every byte of `data` is at `offset` when [`write_at`] returns
//! `Ok`, by whichever path. Writes that are small or not aligned, and files on
//! filesystems that refuse `O_DIRECT`, take the ordinary buffered path.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Alignment of offset, length and memory that `O_DIRECT` asks for: the
/// page size, which covers devices with 512-byte and 4 KiB sectors.
const ALIGN: usize = 4096;
/// Smaller writes gain nothing from skipping the page cache, and a file that
/// is read back soon after is better served from it.
const MIN_DIRECT_BYTES: usize = 64 * 1024;

thread_local! {
    /// A reused buffer to align the data in; one per applying thread.
    static STAGING: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Whether a write of `len` bytes at `offset` can go past the page cache.
pub fn is_direct(offset: u64, len: usize) -> bool {
    len >= MIN_DIRECT_BYTES && len.is_multiple_of(ALIGN) && offset.is_multiple_of(ALIGN as u64)
}

/// Writes `data` at `offset` into the existing regular file at `path` (never
/// through a symlink) and returns the file, open for writing.
pub fn write_at(path: &Path, data: &[u8], offset: u64) -> io::Result<File> {
    if is_direct(offset, data.len()) {
        match write_direct(path, data, offset) {
            Ok(file) => return Ok(file),
            // The filesystem or device refuses O_DIRECT (or this alignment):
            // the buffered write below puts the same bytes in the same place.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    let file = open_for_write(path, 0)?;
    file.write_all_at(data, offset)?;
    Ok(file)
}

fn write_direct(path: &Path, data: &[u8], offset: u64) -> io::Result<File> {
    let file = open_for_write(path, libc::O_DIRECT)?;
    STAGING.with(|staging| {
        let mut staging = staging.borrow_mut();
        if staging.len() < data.len() + ALIGN {
            *staging = vec![0; data.len() + ALIGN];
        }
        let start = staging.as_ptr().align_offset(ALIGN);
        let aligned = &mut staging[start..start + data.len()];
        aligned.copy_from_slice(data);
        file.write_all_at(aligned, offset)
    })?;
    Ok(file)
}

fn open_for_write(path: &Path, extra_flags: i32) -> io::Result<File> {
    OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW | extra_flags).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 253) as u8).collect()
    }

    #[test]
    fn only_large_aligned_writes_go_direct() {
        assert!(is_direct(0, 960 * 1024));
        assert!(is_direct(960 * 1024, 64 * 1024));
        assert!(!is_direct(0, 4096), "small");
        assert!(!is_direct(100, 960 * 1024), "unaligned offset");
        assert!(!is_direct(0, 960 * 1024 + 1), "unaligned length");
    }

    #[test]
    fn direct_and_buffered_writes_leave_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        let big = pattern(256 * 1024);
        // Direct at 0, buffered (unaligned) in the middle, direct again past
        // the end of the file, then a buffered read sees them all.
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
    fn a_direct_write_replaces_what_the_page_cache_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 128 * 1024]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[0], 1, "now cached");
        write_at(&path, &vec![2u8; 128 * 1024], 0).unwrap();
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 2));
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
