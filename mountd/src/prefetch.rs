//! Small files of a directory fetched together. A mount reading through a
//! directory of small files it did not write itself (`grep -r`, `tar c`,
//! `diff -r`, `cat *`, on a fresh mount or after another machine wrote
//! them) would otherwise wait one round trip per file.
//!
//! On a cold read of a small file in a directory whose whole listing the
//! metadata cache holds (it was listed: the tool is walking it), the file
//! and its other small files (neither cached nor already asked for) are
//! asked for in one `Request::ReadFiles`, within its bounds, and the read
//! is answered from it. Room left in the request goes to the small files of
//! the directories a depth-first walk visits next, as far as the metadata
//! cache holds their listings (`MetaCache::listings_after`), so a walk of a
//! tree of small files costs about one round trip per request's worth of
//! files rather than one per directory. The filesystem core puts each
//! answer into the small-file cache only while the metadata cache holds
//! exactly the attributes it came with, so it is served under the same
//! rules as a file this mount wrote (`smallfiles.rs`): a change through
//! this mount or another drops it.
//!
//! Bounded: at most `MAX_READ_FILES` files and `MAX_READ_FILES_BYTES` per
//! request; a path is asked for once until its answer arrives.

use dfos_protocol::sharing::split_shared;
use std::collections::HashSet;
use std::sync::Mutex;

use dfos_protocol::limits::{MAX_READ_FILES, MAX_READ_FILES_BYTES, MAX_SMALL_FILE_BYTES};
use dfos_protocol::{FileAttr, FileKind};

use crate::inodes;

/// How many entries of the directories a walk goes on to are looked
/// through for small files, at most, on a cold read: enough to fill a
/// request in a tree of small files, few enough to stay cheap.
pub const WALK_AHEAD_ENTRIES: usize = 16 * MAX_READ_FILES;

#[derive(Default)]
pub struct Prefetcher {
    /// Paths asked for whose answer has not arrived.
    asked: Mutex<HashSet<String>>,
}

/// Whether a file of these attributes is one `ReadFiles` answers whole.
pub fn is_small_file(attr: &FileAttr) -> bool {
    attr.kind == FileKind::File && attr.size <= MAX_SMALL_FILE_BYTES as u64
}

impl Prefetcher {
    /// A cold read of the small file at `path` begins; `listing` is its
    /// directory's listing (name order), and `cached` tells whether a file
    /// is in the small-file cache. Returns the paths to ask for in one
    /// request, counted as asked: `path` itself, then its small siblings
    /// after it in name order, then those before it, since tools walk a
    /// directory in the order it was listed, not always by name; then, with
    /// what the request has room for, the small files of the directories
    /// a walk goes on to (`further`, in walk order). None when
    /// no sibling is left to ask for, or `path` is asked for already: then
    /// the read goes alone.
    pub fn after_cold_read(
        &self,
        path: &str,
        listing: &[(String, FileAttr)],
        further: impl FnOnce() -> Vec<(String, Vec<(String, FileAttr)>)>,
        cached: impl Fn(&str, &FileAttr) -> bool,
    ) -> Vec<String> {
        let (dir, name) = dfos_protocol::path::split(path);
        let split = listing.partition_point(|(sibling, _)| sibling.as_str() <= name);
        let (before, after) = listing.split_at(split);
        let Some((_, own)) = before.last().filter(|(sibling, _)| sibling == name) else {
            return Vec::new();
        };
        let mut asked = self.asked.lock().unwrap();
        if asked.contains(path) {
            return Vec::new();
        }
        let (mut paths, mut bytes) = (vec![path.to_owned()], own.size as usize);
        // One request reaches one tree: a walk may go on from a shared
        // tree into another (see `dfos_protocol::sharing`).
        let tree = |path: &str| split_shared(path).map(|(owner, _)| owner.to_owned());
        let own_tree = tree(path);
        // Takes in one entry; false once the request is full.
        let mut room = |dir: &str, (name, attr): &(String, FileAttr)| {
            let path = inodes::join(dir, name);
            if !is_small_file(attr) || asked.contains(&path) || cached(&path, attr) || tree(&path) != own_tree {
                return true;
            }
            if bytes + attr.size as usize > MAX_READ_FILES_BYTES {
                return false;
            }
            bytes += attr.size as usize;
            paths.push(path);
            paths.len() < MAX_READ_FILES
        };
        let siblings = after.iter().chain(before).filter(|(sibling, _)| sibling != name);
        if siblings.into_iter().all(|entry| room(dir, entry)) {
            let further = further();
            let walk_on = further.iter().flat_map(|(dir, listing)| listing.iter().map(move |entry| (dir, entry)));
            walk_on.take_while(|(dir, entry)| room(dir, entry)).for_each(drop);
        }
        if paths.len() == 1 {
            return Vec::new();
        }
        asked.extend(paths.iter().cloned());
        paths
    }

    /// The answer for `paths` arrived, or never will.
    pub fn answered(&self, paths: &[String]) {
        let mut asked = self.asked.lock().unwrap();
        for path in paths {
            asked.remove(path);
        }
    }
}

/// Marks `paths` answered when dropped: when their answer was handled, or
/// the read waiting for it was given up.
pub struct Answered<'a> {
    pub prefetch: &'a Prefetcher,
    pub paths: &'a [String],
}

impl Drop for Answered<'_> {
    fn drop(&mut self) {
        self.prefetch.answered(self.paths);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfos_protocol::Timestamp;

    fn file(size: u64) -> FileAttr {
        crate::test_file_attr(size, Timestamp::default())
    }

    fn listing(names: &[(&str, FileAttr)]) -> Vec<(String, FileAttr)> {
        names.iter().map(|(name, attr)| (name.to_string(), attr.clone())).collect()
    }

    #[test]
    fn a_cold_read_asks_for_the_other_small_files_after_it_then_before_it() {
        let p = Prefetcher::default();
        let dir = FileAttr { kind: FileKind::Directory, ..file(4096) };
        let names = listing(&[
            ("a", file(1)),
            ("b", file(2)),
            ("c", file(MAX_SMALL_FILE_BYTES as u64 + 1)),
            ("d", file(4)),
            ("e", dir),
        ]);
        let none = |_: &str, _: &FileAttr| false;
        assert_eq!(
            p.after_cold_read("x/b", &names, Vec::new, none),
            ["x/b", "x/d", "x/a"],
            "the file itself, then the others; large files and directories are left"
        );
        assert!(
            p.after_cold_read("x/d", &names, Vec::new, none).is_empty(),
            "d is asked for already: its read waits for that"
        );
        p.answered(&["x/d".to_string(), "x/a".to_string(), "x/b".to_string()]);
        let cached = |path: &str, _: &FileAttr| path == "x/d";
        assert_eq!(p.after_cold_read("x/b", &names, Vec::new, cached), ["x/b", "x/a"], "d is cached");
        let all_but_b = |path: &str, _: &FileAttr| path != "x/b";
        assert!(
            p.after_cold_read("x/b", &names, Vec::new, all_but_b).is_empty(),
            "no sibling left: the read goes alone"
        );
        assert!(p.after_cold_read("x/gone", &names, Vec::new, none).is_empty(), "not in the listing");
    }

    #[test]
    fn room_left_goes_to_the_directories_the_walk_goes_on_to() {
        let p = Prefetcher::default();
        let here = listing(&[("a", file(1)), ("b", file(2))]);
        let further = vec![
            ("x/sub".to_string(), listing(&[("c", file(3)), ("large", file(MAX_READ_FILES_BYTES as u64 * 2))])),
            ("y".to_string(), listing(&[("d", file(4))])),
        ];
        let none = |_: &str, _: &FileAttr| false;
        assert_eq!(
            p.after_cold_read("x/a", &here, || further.clone(), none),
            ["x/a", "x/b", "x/sub/c", "y/d"],
            "a file too large to fetch does not end the request"
        );
        p.answered(&["x/a".into(), "x/b".into(), "x/sub/c".into(), "y/d".into()]);
        let full: Vec<(String, FileAttr)> = (0..MAX_READ_FILES).map(|i| (format!("f{i:03}"), file(1))).collect();
        let asked = p.after_cold_read("f000", &full, || panic!("the directory fills the request"), none);
        assert!(asked.len() == MAX_READ_FILES && asked.iter().all(|path| path.starts_with('f')), "the directory first");
    }

    #[test]
    fn one_request_stays_within_its_bounds() {
        let p = Prefetcher::default();
        let many: Vec<(String, FileAttr)> = (0..MAX_READ_FILES * 2).map(|i| (format!("f{i:04}"), file(10))).collect();
        let asked = p.after_cold_read("f0000", &many, Vec::new, |_, _| false);
        assert_eq!(asked.len(), MAX_READ_FILES);
        assert_eq!(asked[..2], ["f0000", "f0001"]);
        let full = file(MAX_SMALL_FILE_BYTES as u64);
        let big: Vec<(String, FileAttr)> = (0..40).map(|i| (format!("g{i:02}"), full.clone())).collect();
        let asked = p.after_cold_read("g00", &big, Vec::new, |_, _| false);
        assert_eq!(asked.len(), MAX_READ_FILES_BYTES / MAX_SMALL_FILE_BYTES);
    }
}
