//! Where the current bytes of a file are already in Kafka.
//!
//! Every byte a mount writes reaches this node inside a `Write` request,
//! and the request log keeps that message. Until something changes those
//! bytes, a read of them can be answered with the message's position
//! instead of the bytes: the mount fetches the message itself, and the data
//! crosses the broker once instead of being produced into it a second time
//! as a reply. This module remembers, per file, which ranges are exactly
//! the data of which logged write.
//!
//! Guarantees:
//! - a location is handed out only while the file is exactly as this index
//!   last saw it. Every change this node applies goes through
//!   [`LogIndex::record_write`] or [`LogIndex::record_setattr`], which
//!   first check the file's identity, size and mtime (its [`FileStamp`])
//!   against the stamp recorded after the previous change, or through
//!   [`LogIndex::forget_tree`] (names created, removed or renamed); and a
//!   read checks the stamp once more. Anything else that touched the file
//!   (another path to it, a process outside dfos, a change this index was
//!   not told of) makes the stamps differ, and the file's entry is dropped;
//! - a range overwritten later is no longer located; truncation trims;
//! - the index is memory only and bounded ([`MAX_EXTENTS`]): after a
//!   restart, or when it fills, reads simply carry their data again.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use dfos_protocol::LogLocation;

/// Smaller writes are not worth a second round trip to the broker.
pub const MIN_EXTENT_BYTES: usize = 64 * 1024;
/// About 16 MiB of index; at 3.75 MiB per write, 960 GiB of located data.
pub const MAX_EXTENTS: usize = 1 << 18;

/// What identifies a file's contents as this node last changed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    pub size: u64,
}

impl FileStamp {
    /// Regular files with one name only: nothing else has located data,
    /// and a write through another name of a hard-linked file would change
    /// bytes this index holds under a path it never hears of.
    pub fn of(meta: &std::fs::Metadata) -> Option<FileStamp> {
        (meta.is_file() && meta.nlink() == 1).then(|| FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            size: meta.size(),
        })
    }
}

/// The logged write a request came in: its place in `dfos.requests`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPosition {
    pub partition: i32,
    pub offset: i64,
    pub request_id: u64,
}

#[derive(Debug, Clone, Copy)]
struct Extent {
    len: u32,
    position: LogPosition,
    applied: Instant,
}

struct IndexedFile {
    stamp: FileStamp,
    /// By file offset; extents never overlap.
    extents: BTreeMap<u64, Extent>,
}

pub struct LogIndex {
    /// By user, then path: looked up by `&str`, with no allocation on the
    /// write and read paths.
    files: BTreeMap<String, BTreeMap<String, IndexedFile>>,
    extents: usize,
    /// A location older than this may point at a message the broker has
    /// deleted by retention; `None` when the log is kept forever.
    max_age: Option<Duration>,
}

impl LogIndex {
    /// `request_retention_ms` as configured for `dfos.requests` (-1: forever).
    pub fn new(request_retention_ms: i64) -> Self {
        // Half the retention leaves the mount ample time to fetch.
        let max_age = (request_retention_ms >= 0).then(|| Duration::from_millis(request_retention_ms as u64 / 2));
        LogIndex { files: BTreeMap::new(), extents: 0, max_age }
    }

    /// The file's entry if the file is still as the entry last saw it;
    /// otherwise the entry is dropped.
    fn unchanged(&mut self, user: &str, path: &str, now: Option<FileStamp>) -> Option<&mut IndexedFile> {
        let stale = self.files.get(user).and_then(|paths| paths.get(path)).is_some_and(|file| Some(file.stamp) != now);
        if stale {
            self.remove(user, path);
        }
        self.files.get_mut(user)?.get_mut(path)
    }

    fn remove(&mut self, user: &str, path: &str) {
        let Some(paths) = self.files.get_mut(user) else { return };
        if let Some(file) = paths.remove(path) {
            self.extents -= file.extents.len();
        }
        if paths.is_empty() {
            self.files.remove(user);
        }
    }

    /// A `Write` of the bytes `written` was applied; `before` and `after`
    /// are the file's stamps around it.
    pub fn record_write(
        &mut self,
        user: &str,
        path: &str,
        before: Option<FileStamp>,
        after: Option<FileStamp>,
        written: std::ops::Range<u64>,
        position: LogPosition,
    ) {
        let (file_offset, len) = (written.start, (written.end - written.start) as usize);
        let Some(after) = after else {
            self.remove(user, path);
            return;
        };
        if self.unchanged(user, path, before).is_none() {
            let fresh = IndexedFile { stamp: after, extents: BTreeMap::new() };
            self.files.entry(user.to_owned()).or_default().insert(path.to_owned(), fresh);
        }
        let file = self.files.get_mut(user).and_then(|paths| paths.get_mut(path)).expect("entry just ensured");
        file.stamp = after;
        let overlapping: Vec<u64> = file
            .extents
            .range(..written.end)
            .rev()
            .take_while(|(&start, extent)| start + extent.len as u64 > file_offset)
            .map(|(&start, _)| start)
            .collect();
        for start in &overlapping {
            file.extents.remove(start);
        }
        self.extents -= overlapping.len();
        if len >= MIN_EXTENT_BYTES {
            file.extents.insert(file_offset, Extent { len: len as u32, position, applied: Instant::now() });
            self.extents += 1;
        } else if file.extents.is_empty() {
            self.remove(user, path);
        }
        if self.extents > MAX_EXTENTS {
            // Rare enough that dropping everything beats tracking recency.
            log::info!("op=log-index extents={} over {MAX_EXTENTS}; forgetting all", self.extents);
            self.files.clear();
            self.extents = 0;
        }
    }

    /// A `SetAttr` was applied: a new size trims what lies beyond it, and
    /// a mode or time change leaves the bytes as they were.
    pub fn record_setattr(
        &mut self,
        user: &str,
        path: &str,
        before: Option<FileStamp>,
        after: Option<FileStamp>,
        size: Option<u64>,
    ) {
        let (Some(file), Some(after)) = (self.unchanged(user, path, before), after) else {
            self.remove(user, path);
            return;
        };
        file.stamp = after;
        let Some(size) = size else { return };
        let held = file.extents.len();
        file.extents.retain(|&start, _| start < size);
        // Extents do not overlap, so only the last can reach past the size.
        if let Some((&start, last)) = file.extents.iter_mut().next_back() {
            let room = size - start;
            if last.len as u64 > room {
                last.len = room as u32;
            }
        }
        let (dropped, now_empty) = (held - file.extents.len(), file.extents.is_empty());
        self.extents -= dropped;
        if now_empty {
            self.remove(user, path);
        }
    }

    /// `path` and everything under it were created, removed or renamed:
    /// whatever is there now is not what was indexed.
    pub fn forget_tree(&mut self, user: &str, path: &str) {
        let Some(paths) = self.files.get(user) else { return };
        let within: Vec<String> = paths
            .range::<str, _>((std::ops::Bound::Included(path), std::ops::Bound::Unbounded))
            .take_while(|(p, _)| p.starts_with(path))
            .filter(|(p, _)| is_within(p, path))
            .map(|(p, _)| p.clone())
            .collect();
        for p in within {
            self.remove(user, &p);
        }
    }

    /// Where `len` bytes at `offset` of the file are in the log, if one
    /// logged write holds all of them (up to the end of the file). `now`
    /// is the file's stamp at this moment.
    pub fn locate(
        &mut self,
        user: &str,
        path: &str,
        now: Option<FileStamp>,
        offset: u64,
        len: u32,
    ) -> Option<LogLocation> {
        let mut run = self.locate_run(user, path, now, offset, len as u64, 1);
        let end = (offset + len as u64).min(now?.size);
        run.pop().filter(|location| offset + location.len as u64 == end)
    }

    /// Where the bytes from `offset` on are in the log, write by write:
    /// consecutive locations covering as much of `offset..offset + len`
    /// (cut at the end of the file) as the log holds without a gap, at most
    /// `max_locations` of them. `now` is the file's stamp at this moment.
    pub fn locate_run(
        &mut self,
        user: &str,
        path: &str,
        now: Option<FileStamp>,
        offset: u64,
        len: u64,
        max_locations: usize,
    ) -> Vec<LogLocation> {
        let max_age = self.max_age;
        let Some(file) = self.unchanged(user, path, now) else { return Vec::new() };
        let end = offset.saturating_add(len).min(file.stamp.size);
        let mut run = Vec::new();
        let mut at = offset;
        while at < end && run.len() < max_locations {
            let Some((&start, extent)) = file.extents.range(..=at).next_back() else { break };
            let extent_end = start + extent.len as u64;
            if extent_end <= at || max_age.is_some_and(|age| extent.applied.elapsed() > age) {
                break;
            }
            let upto = extent_end.min(end);
            run.push(LogLocation {
                partition: extent.position.partition,
                offset: extent.position.offset,
                request_id: extent.position.request_id,
                file_offset: start,
                skip: (at - start) as u32,
                len: (upto - at) as u32,
            });
            at = upto;
        }
        run
    }

    /// Whether the index holds anything of this file.
    pub fn tracks(&self, user: &str, path: &str) -> bool {
        self.files.get(user).is_some_and(|paths| paths.contains_key(path))
    }

    /// Extents held, for tests and log lines.
    pub fn extents(&self) -> usize {
        self.extents
    }
}

/// Whether `path` is `dir` or lies under it ("" is the user's root).
fn is_within(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: usize = 960 * 1024;

    fn stamp(mtime: i64, size: u64) -> Option<FileStamp> {
        Some(FileStamp { dev: 1, ino: 2, mtime: (mtime, 0), size })
    }

    fn at(offset: i64) -> LogPosition {
        LogPosition { partition: 3, offset, request_id: offset as u64 + 100 }
    }

    /// Two whole chunks written by two logged writes, stamps 1 and 2.
    fn two_chunks() -> LogIndex {
        let mut index = LogIndex::new(-1);
        index.record_write("u", "f", None, stamp(1, CHUNK as u64), 0..CHUNK as u64, at(10));
        index.record_write(
            "u",
            "f",
            stamp(1, CHUNK as u64),
            stamp(2, 2 * CHUNK as u64),
            CHUNK as u64..2 * CHUNK as u64,
            at(11),
        );
        index
    }

    #[test]
    fn reads_inside_one_logged_write_are_located() {
        let mut index = two_chunks();
        let now = stamp(2, 2 * CHUNK as u64);
        let whole = index.locate("u", "f", now, CHUNK as u64, CHUNK as u32).unwrap();
        assert_eq!((whole.offset, whole.request_id, whole.file_offset, whole.skip), (11, 111, CHUNK as u64, 0));
        assert_eq!(whole.len, CHUNK as u32);
        let inner = index.locate("u", "f", now, 100, 50).unwrap();
        assert_eq!((inner.offset, inner.skip, inner.len), (10, 100, 50));
        // Across two writes, or past the end of the file: nothing.
        assert!(index.locate("u", "f", now, CHUNK as u64 - 1, 2).is_none());
        assert!(index.locate("u", "f", now, 2 * CHUNK as u64, 10).is_none());
        assert_eq!(index.extents(), 2);
    }

    #[test]
    fn a_run_is_located_write_by_write_up_to_the_first_gap_or_the_end() {
        let mut index = two_chunks();
        let now = stamp(2, 2 * CHUNK as u64);
        let run = index.locate_run("u", "f", now, 10, 10 * CHUNK as u64, 16);
        let parts: Vec<_> = run.iter().map(|l| (l.offset, l.file_offset, l.skip, l.len)).collect();
        assert_eq!(parts, [(10, 0, 10, CHUNK as u32 - 10), (11, CHUNK as u64, 0, CHUNK as u32)]);
        assert_eq!(index.locate_run("u", "f", now, 0, 10 * CHUNK as u64, 1).len(), 1);
        // A small overwrite unindexes the first write: a run from there
        // finds nothing, though the second write is still located.
        index.record_write("u", "f", now, stamp(3, 2 * CHUNK as u64), 100..200, at(12));
        let now = stamp(3, 2 * CHUNK as u64);
        assert!(index.locate_run("u", "f", now, 0, 2 * CHUNK as u64, 16).is_empty());
        let run = index.locate_run("u", "f", now, CHUNK as u64 + 5, 2 * CHUNK as u64, 16);
        assert_eq!(run.iter().map(|l| (l.offset, l.skip, l.len)).collect::<Vec<_>>(), [(11, 5, CHUNK as u32 - 5)]);
        assert!(index.locate_run("u", "f", stamp(4, 1), CHUNK as u64, 10, 16).is_empty());
    }

    #[test]
    fn an_overwrite_hides_what_it_covered_and_small_writes_are_not_indexed() {
        let mut index = two_chunks();
        index.record_write("u", "f", stamp(2, 2 * CHUNK as u64), stamp(3, 2 * CHUNK as u64), 5..15, at(12));
        let now = stamp(3, 2 * CHUNK as u64);
        assert!(index.locate("u", "f", now, 0, 4).is_none());
        assert_eq!(index.locate("u", "f", now, CHUNK as u64, 4).unwrap().offset, 11);
        assert_eq!(index.extents(), 1);
    }

    #[test]
    fn any_change_the_index_did_not_see_drops_the_file() {
        let mut index = two_chunks();
        assert!(index.locate("u", "f", stamp(9, 2 * CHUNK as u64), 0, 4).is_none());
        assert_eq!(index.extents(), 0);
        // Nor does a later write build on an entry whose stamp is stale.
        let mut index = two_chunks();
        index.record_write("u", "f", stamp(7, 0), stamp(8, CHUNK as u64), 0..CHUNK as u64, at(20));
        assert!(index.locate("u", "f", stamp(8, CHUNK as u64), CHUNK as u64, 4).is_none());
        assert_eq!(index.extents(), 1);
    }

    #[test]
    fn truncation_trims_and_other_setattrs_keep_the_data_located() {
        let mut index = two_chunks();
        index.record_setattr("u", "f", stamp(2, 2 * CHUNK as u64), stamp(3, 2 * CHUNK as u64), None);
        index.record_setattr("u", "f", stamp(3, 2 * CHUNK as u64), stamp(4, 1000), Some(1000));
        let now = stamp(4, 1000);
        let location = index.locate("u", "f", now, 0, CHUNK as u32).unwrap();
        assert_eq!((location.offset, location.len), (10, 1000));
        assert_eq!(index.extents(), 1);
        index.record_setattr("u", "f", now, stamp(5, CHUNK as u64), Some(CHUNK as u64));
        assert!(index.locate("u", "f", stamp(5, CHUNK as u64), 1000, 10).is_none(), "grown past the trimmed data");
    }

    #[test]
    fn forgetting_a_tree_spares_its_neighbours() {
        let mut index = LogIndex::new(-1);
        for path in ["d", "d/f", "d/e/g", "d-x", "dd"] {
            index.record_write("u", path, None, stamp(1, CHUNK as u64), 0..CHUNK as u64, at(1));
        }
        index.record_write("v", "d/f", None, stamp(1, CHUNK as u64), 0..CHUNK as u64, at(1));
        index.forget_tree("u", "d");
        let located = |index: &mut LogIndex, user: &str, path: &str| {
            index.locate(user, path, stamp(1, CHUNK as u64), 0, 1).is_some()
        };
        for (user, path, expected) in
            [("u", "d", false), ("u", "d/f", false), ("u", "d/e/g", false), ("u", "d-x", true), ("u", "dd", true)]
        {
            assert_eq!(located(&mut index, user, path), expected, "{user} {path}");
        }
        assert!(located(&mut index, "v", "d/f"));
        index.forget_tree("u", "");
        assert_eq!(index.extents(), 1);
    }

    #[test]
    fn locations_expire_well_before_the_log_retention() {
        let mut index = LogIndex::new(0);
        index.record_write("u", "f", None, stamp(1, CHUNK as u64), 0..CHUNK as u64, at(1));
        std::thread::sleep(Duration::from_millis(2));
        assert!(index.locate("u", "f", stamp(1, CHUNK as u64), 0, 1).is_none());
    }
}
