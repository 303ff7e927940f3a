//! Whole contents of small files this mount wrote, by path, kept after
//! close so that reading them back (`diff` after `cp`, `cat` after an
//! editor saved) costs no round trip; and of small files fetched ahead of
//! a read through their directory (`prefetch.rs`).
//!
//! Each entry is stamped with the file's attributes (size and mtime) as the
//! storage node reported them after the last write. A read uses the entry
//! only while the metadata cache holds exactly those attributes; any change
//! through this mount, and any change event from another mount, drops the
//! attributes or the entry, so a stale copy is never served past the
//! metadata cache's own guarantees (see `metacache.rs`).
//!
//! Bounded: files up to [`MAX_FILE_BYTES`], [`MAX_TOTAL_BYTES`] in all,
//! oldest dropped first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use dfos_protocol::{FileAttr, Timestamp};

pub const MAX_FILE_BYTES: usize = dfos_protocol::limits::MAX_SMALL_FILE_BYTES;
pub const MAX_TOTAL_BYTES: usize = 64 * 1024 * 1024;

struct Cached {
    size: u64,
    mtime: Timestamp,
    data: Arc<Vec<u8>>,
}

/// Whether content stamped with `size` and `mtime` is the file's content
/// as `current` describes it.
fn same_version(size: u64, mtime: Timestamp, current: &FileAttr) -> bool {
    size == current.size && mtime == current.mtime
}

#[derive(Default)]
struct Inner {
    files: HashMap<String, Cached>,
    order: VecDeque<String>,
    total: usize,
}

#[derive(Default)]
pub struct SmallFiles {
    inner: Mutex<Inner>,
}

impl SmallFiles {
    /// Keeps `data` as the whole content of `ino`, whose attributes after
    /// the write are `attr`. Ignored unless they agree and the file is small.
    pub fn put(&self, path: &str, attr: &FileAttr, data: Vec<u8>) {
        // A hard-linked file can change through a name this copy is not
        // kept under.
        if data.len() as u64 != attr.size || data.len() > MAX_FILE_BYTES || attr.has_other_names() {
            return;
        }
        let mut inner = self.inner.lock().unwrap();
        if let Some(old) = inner.files.remove(path) {
            inner.total -= old.data.len();
            inner.order.retain(|p| p != path);
        }
        inner.total += data.len();
        inner.order.push_back(path.to_owned());
        inner.files.insert(path.to_owned(), Cached { size: attr.size, mtime: attr.mtime, data: Arc::new(data) });
        while inner.total > MAX_TOTAL_BYTES {
            let Some(oldest) = inner.order.pop_front() else { break };
            if let Some(old) = inner.files.remove(&oldest) {
                inner.total -= old.data.len();
            }
        }
    }

    /// Keeps `data`, read with attributes `attr`, only if the mount knows
    /// the file by those same attributes now (`current`), as `get` will
    /// demand; a file fetched ahead of a read (`prefetch.rs`).
    pub fn put_if_current(&self, path: &str, attr: &FileAttr, data: Vec<u8>, current: Option<FileAttr>) {
        if current.is_some_and(|current| same_version(attr.size, attr.mtime, &current)) {
            self.put(path, attr, data);
        }
    }

    /// The content at `path`, if cached for exactly the attributes `current`.
    pub fn get(&self, path: &str, current: &FileAttr) -> Option<Arc<Vec<u8>>> {
        let inner = self.inner.lock().unwrap();
        let cached = inner.files.get(path)?;
        same_version(cached.size, cached.mtime, current).then(|| cached.data.clone())
    }

    pub fn forget(&self, path: &str) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(old) = inner.files.remove(path) {
            inner.total -= old.data.len();
            inner.order.retain(|p| p != path);
        }
    }

    /// Drops every entry at or below `path` (a renamed or removed directory).
    pub fn forget_tree(&self, path: &str) {
        let mut inner = self.inner.lock().unwrap();
        let prefix = format!("{path}/");
        let gone: Vec<String> =
            inner.files.keys().filter(|p| p.as_str() == path || p.starts_with(&prefix)).cloned().collect();
        for p in gone {
            if let Some(old) = inner.files.remove(&p) {
                inner.total -= old.data.len();
            }
        }
        inner.order.retain(|p| p != path && !p.starts_with(&prefix));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(size: u64, secs: i64) -> FileAttr {
        crate::test_file_attr(size, Timestamp { secs, nanos: 0 })
    }

    #[test]
    fn served_only_for_the_attributes_it_was_written_with() {
        let c = SmallFiles::default();
        c.put("a", &attr(3, 100), b"abc".to_vec());
        assert_eq!(c.get("a", &attr(3, 100)).unwrap().as_slice(), b"abc");
        assert!(c.get("a", &attr(3, 101)).is_none(), "mtime changed");
        assert!(c.get("a", &attr(4, 100)).is_none(), "size changed");
        c.put("b", &attr(5, 1), b"abc".to_vec());
        assert!(c.get("b", &attr(5, 1)).is_none(), "content and size disagree");
        c.forget_tree("a");
        assert!(c.get("a", &attr(3, 100)).is_none());
    }

    #[test]
    fn a_fetched_file_is_kept_only_if_the_mount_knows_it_by_the_same_attributes() {
        let c = SmallFiles::default();
        c.put_if_current("unknown", &attr(3, 100), b"abc".to_vec(), None);
        c.put_if_current("older", &attr(3, 100), b"abc".to_vec(), Some(attr(3, 101)));
        c.put_if_current("same", &attr(3, 100), b"abc".to_vec(), Some(attr(3, 100)));
        assert!(c.get("unknown", &attr(3, 100)).is_none());
        assert!(c.get("older", &attr(3, 100)).is_none());
        assert_eq!(c.get("same", &attr(3, 100)).unwrap().as_slice(), b"abc");
    }

    #[test]
    fn total_size_is_bounded_oldest_first() {
        let c = SmallFiles::default();
        let n = MAX_TOTAL_BYTES / MAX_FILE_BYTES + 2;
        for i in 0..n {
            c.put(&format!("f{i}"), &attr(MAX_FILE_BYTES as u64, 1), vec![0; MAX_FILE_BYTES]);
        }
        assert!(c.get("f0", &attr(MAX_FILE_BYTES as u64, 1)).is_none());
        assert!(c.get(&format!("f{}", n - 1), &attr(MAX_FILE_BYTES as u64, 1)).is_some());
        assert!(c.inner.lock().unwrap().total <= MAX_TOTAL_BYTES);
    }
}
