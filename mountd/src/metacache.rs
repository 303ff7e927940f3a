//! What this mount knows about names and attributes, so that `stat`,
//! `lookup` of a missing name, and the checks `cp`, `diff` and `rm` make
//! before each file do not each cost a Kafka round trip.
//!
//! Entries come from server replies (lookup, getattr, readdir, create,
//! mkdir, setattr, acknowledged writes) and from this mount's own
//! successful mutations. A directory's listing is known when this mount
//! created it (empty) or read it whole; then a name missing from it is
//! answered ENOENT locally.
//!
//! Guarantees: nothing is served older than `ttl`; every change made
//! through this mount updates or drops the entries it touches; changes made
//! by other mounts drop them when their `dfos.events` message arrives (see
//! `events.rs`), normally within milliseconds. Keys are paths, so renames
//! drop whole subtrees.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use dfos_protocol::path::{split, TRASH_DIR};
use dfos_protocol::sharing::SHARED_DIR;
use dfos_protocol::{FileAttr, Timestamp};

use crate::inodes;

struct Stamped<T> {
    value: T,
    at: Instant,
}

pub struct MetaCache {
    ttl: Duration,
    /// Bumped by every change, so a reply that was in flight while the
    /// cache changed is not stored over the newer knowledge.
    generation: u64,
    attrs: HashMap<String, Stamped<FileAttr>>,
    listings: HashMap<String, Stamped<HashSet<String>>>,
}

use crate::inodes::inside;

impl MetaCache {
    pub fn new(ttl: Duration) -> Self {
        MetaCache { ttl, generation: 0, attrs: HashMap::new(), listings: HashMap::new() }
    }

    fn fresh<'a, T>(&self, entry: Option<&'a Stamped<T>>) -> Option<&'a T> {
        entry.filter(|e| e.at.elapsed() < self.ttl).map(|e| &e.value)
    }

    /// Read before asking a storage node; pass to the `*_if_unchanged` calls.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Stores a server reply unless the cache changed since `generation`.
    pub fn put_attr_if_unchanged(&mut self, generation: u64, path: &str, attr: FileAttr) {
        if generation == self.generation {
            self.put_attr(path, attr);
        }
    }

    /// Stores a listing unless the cache changed since `generation`.
    pub fn put_listing_if_unchanged(
        &mut self,
        generation: u64,
        dir: &str,
        entries: impl IntoIterator<Item = (String, FileAttr)>,
    ) {
        if generation == self.generation {
            self.put_listing(dir, entries);
        }
    }

    /// Never for a file with other names (hard links): a change through
    /// one of them is not heard of under this path, so it is asked again.
    pub fn attr(&self, path: &str) -> Option<FileAttr> {
        self.listed_attr(path).filter(|attr| !attr.has_other_names())
    }

    /// What was last heard of `path`, hard-linked files included.
    /// Whether `path` was last seen as a file with other names (stale or
    /// not: those names may have changed it since).
    pub fn has_other_names(&self, path: &str) -> bool {
        self.attrs.get(path).is_some_and(|entry| entry.value.has_other_names())
    }

    fn listed_attr(&self, path: &str) -> Option<FileAttr> {
        self.fresh(self.attrs.get(path)).cloned()
    }

    /// True when `path` is known not to exist: its parent's whole listing
    /// is fresh and does not hold the name.
    /// The trash is made by a storage node when it first keeps a file,
    /// unseen by this cache, so it is never known absent; `.shared` is in
    /// no listing of the root, but the storage node answers for it.
    pub fn known_absent(&self, path: &str) -> bool {
        if path.is_empty()
            || path == TRASH_DIR
            || path == SHARED_DIR
            || self.attrs.get(path).is_some_and(|e| e.at.elapsed() < self.ttl)
        {
            return false;
        }
        let (parent, name) = split(path);
        self.fresh(self.listings.get(parent)).is_some_and(|names| !names.contains(name))
    }

    /// Whether this mount holds `dir`'s whole listing (its names) now.
    pub fn listed(&self, dir: &str) -> bool {
        self.fresh(self.listings.get(dir)).is_some()
    }

    /// A directory's whole listing with attributes, in name order, when
    /// every part of it is fresh. Not when it holds a file with several
    /// names: the attributes the kernel gets with a listing must be the
    /// node's of now.
    pub fn listing(&self, dir: &str) -> Option<Vec<(String, FileAttr)>> {
        let names = self.fresh(self.listings.get(dir))?;
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            entries.push((name.clone(), self.attr(&inodes::join(dir, name))?));
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Some(entries)
    }

    /// The listings a depth-first walk in name order visits after `dir`'s
    /// own entries, as far as this cache holds them whole: the directories
    /// below `dir`, then those after it in its parent, then after its
    /// parent in theirs, and so on up to the root. A directory whose
    /// listing is not held is passed over with everything below it. Stops
    /// once the listings returned hold `max_entries` entries.
    pub fn listings_after(&self, dir: &str, max_entries: usize) -> Vec<(String, Vec<(String, FileAttr)>)> {
        fn push_subdirectories(pending: &mut Vec<String>, dir: &str, listing: &[(String, FileAttr)], after: &str) {
            let later = listing.iter().rev().take_while(|(name, _)| name.as_str() > after);
            let subdirectories = later.filter(|(_, attr)| attr.kind == dfos_protocol::FileKind::Directory);
            pending.extend(subdirectories.map(|(name, _)| inodes::join(dir, name)));
        }
        let (mut walked, mut entries, mut pending) = (Vec::new(), 0, Vec::new());
        if let Some(listing) = self.listing(dir) {
            push_subdirectories(&mut pending, dir, &listing, "");
        }
        let mut level = dir;
        loop {
            while let Some(next) = pending.pop() {
                if entries >= max_entries {
                    return walked;
                }
                if let Some(listing) = self.listing(&next) {
                    push_subdirectories(&mut pending, &next, &listing, "");
                    entries += listing.len();
                    walked.push((next, listing));
                }
            }
            if level.is_empty() {
                return walked;
            }
            let (parent, name) = split(level);
            let Some(listing) = self.listing(parent) else { return walked };
            push_subdirectories(&mut pending, parent, &listing, name);
            level = parent;
        }
    }

    /// Stores attributes a storage node answered with, or this mount
    /// foresaw. One that differs from the fresh entry only in its ctime
    /// leaves the entry as it is: that ctime was foreseen by this mount
    /// (its own clock, for a change that went behind) or came from another
    /// replica (each node stamps ctime with its own clock), and a ctime
    /// that moves while nothing else did makes `tar` report "file changed
    /// as we read it". The entry keeps its age, so the node's ctime is
    /// read when it expires.
    pub fn put_attr(&mut self, path: &str, attr: FileAttr) {
        let ttl = self.ttl;
        let only_ctime_moved =
            |entry: &Stamped<FileAttr>| FileAttr { ctime: entry.value.ctime, ..attr.clone() } == entry.value;
        if self.attrs.get(path).is_some_and(|entry| entry.at.elapsed() < ttl && only_ctime_moved(entry)) {
            return;
        }
        self.replace_attr(path, attr);
    }

    /// Stores attributes as they are, ctime included: the node's answer to
    /// this mount's own change of them.
    pub fn replace_attr(&mut self, path: &str, attr: FileAttr) {
        self.attrs.insert(path.to_owned(), Stamped { value: attr, at: Instant::now() });
    }

    pub fn drop_attr(&mut self, path: &str) {
        self.generation += 1;
        self.attrs.remove(path);
    }

    /// Records a directory's complete listing (with attributes). Never
    /// `.shared`'s: the owners in it change when they edit their grants,
    /// which this mount hears of only for owners it already follows, so
    /// every listing of it asks a storage node.
    pub fn put_listing(&mut self, dir: &str, entries: impl IntoIterator<Item = (String, FileAttr)>) {
        let mut names = HashSet::new();
        for (name, attr) in entries {
            self.put_attr(&inodes::join(dir, &name), attr);
            names.insert(name);
        }
        if dir != SHARED_DIR {
            self.listings.insert(dir.to_owned(), Stamped { value: names, at: Instant::now() });
        }
    }

    /// A name this mount created under `path`'s parent, with its attributes.
    /// A new directory starts with a known, empty listing. The parent's
    /// mtime becomes the new entry's, as the storage node stamps both.
    pub fn created(&mut self, path: &str, attr: FileAttr) {
        self.generation += 1;
        let is_dir = attr.kind == dfos_protocol::FileKind::Directory;
        let (parent, name) = split(path);
        if let Some(listing) = self.listings.get_mut(parent) {
            listing.value.insert(name.to_owned());
        }
        self.entries_changed(parent, attr.mtime, if is_dir { 1 } else { 0 });
        self.put_attr(path, attr);
        if is_dir {
            self.listings.insert(path.to_owned(), Stamped { value: HashSet::new(), at: Instant::now() });
        }
    }

    /// A create that may have opened an existing name, or a hard link
    /// (whose attributes are its file's, older than the directory's new
    /// mtime): the name is known to exist now, and its parent's attributes
    /// are the storage node's to tell.
    pub fn created_or_opened(&mut self, path: &str, attr: FileAttr) {
        self.generation += 1;
        let (parent, name) = split(path);
        if let Some(listing) = self.listings.get_mut(parent) {
            listing.value.insert(name.to_owned());
        }
        self.attrs.remove(parent);
        self.put_attr(path, attr);
    }

    /// This mount removed `path` (a directory when `was_directory`), so
    /// it and everything below it are gone from this mount's view.
    pub fn removed(&mut self, path: &str, was_directory: bool) {
        self.forget_entry(path);
        self.trash_changed();
        self.entries_changed(split(path).0, crate::rpc::now(), if was_directory { -1 } else { 0 });
    }

    fn forget_entry(&mut self, path: &str) {
        self.generation += 1;
        let (parent, name) = split(path);
        if let Some(listing) = self.listings.get_mut(parent) {
            listing.value.remove(name);
        }
        self.attrs.retain(|p, _| !inside(p, path));
        self.listings.retain(|p, _| !inside(p, path));
    }

    /// A rename made by this mount: `from` disappears, `to` appears, and
    /// nothing cached below either is trusted any more. A file's move
    /// stamps both parents; after a directory's, or one of a name not
    /// cached here, the parents' link counts are the storage node's to
    /// tell.
    pub fn renamed(&mut self, from: &str, to: &str) {
        self.trash_changed();
        let attr = self.listed_attr(from);
        if attr.as_ref().is_some_and(FileAttr::has_other_names) {
            // `to` may be another name of the same file, which rename(2)
            // leaves as it is, `from` included: the node is asked.
            self.invalidate_tree(from);
            self.invalidate_tree(to);
            return;
        }
        self.forget_entry(from);
        self.forget_entry(to);
        let (from_parent, to_parent) = (split(from).0, split(to).0);
        if let Some(listing) = self.listings.get_mut(to_parent) {
            listing.value.insert(split(to).1.to_owned());
        }
        match attr {
            Some(attr) if attr.kind != dfos_protocol::FileKind::Directory => {
                let now = crate::rpc::now();
                self.entries_changed(from_parent, now, 0);
                self.entries_changed(to_parent, now, 0);
                self.put_attr(to, attr);
            }
            _ => {
                self.attrs.remove(from_parent);
                self.attrs.remove(to_parent);
            }
        }
    }

    /// This mount changed `dir`'s entries at `at`: its mtime and ctime move
    /// there, and a subdirectory made or removed moves its link count, as
    /// on the storage node. The entry keeps its age, so it still expires
    /// when it would have and is then read from the node again.
    fn entries_changed(&mut self, dir: &str, at: Timestamp, subdirectories: i32) {
        if let Some(entry) = self.attrs.get_mut(dir) {
            entry.value.mtime = at;
            entry.value.ctime = at;
            entry.value.nlink = entry.value.nlink.saturating_add_signed(subdirectories);
        }
    }

    /// Someone else changed `path`: forget it, and its parent's listing
    /// and attributes (its mtime moved).
    pub fn invalidate(&mut self, path: &str) {
        self.generation += 1;
        self.attrs.remove(path);
        self.forget_parent(path);
    }

    /// Someone else changed `path` and possibly everything below it.
    pub fn invalidate_tree(&mut self, path: &str) {
        self.generation += 1;
        self.forget_parent(path);
        self.attrs.retain(|p, _| !inside(p, path));
        self.listings.retain(|p, _| !inside(p, path));
    }

    /// A removal or a replacing rename, here or on another mount, may
    /// have put a version into the trash (`storaged --trash-hours`), so
    /// nothing cached inside it is trusted. Entries below the trash are
    /// only ever cached after the trash itself, hence the cheap check.
    /// Returns whether anything was dropped.
    pub fn trash_changed(&mut self) -> bool {
        let cached = self.attrs.contains_key(TRASH_DIR) || self.listings.contains_key(TRASH_DIR);
        if cached {
            self.generation += 1;
            self.attrs.retain(|p, _| !inside(p, TRASH_DIR));
            self.listings.retain(|p, _| !inside(p, TRASH_DIR));
        }
        cached
    }

    fn forget_parent(&mut self, path: &str) {
        let parent = split(path).0;
        self.listings.remove(parent);
        self.attrs.remove(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfos_protocol::{FileKind, Timestamp};

    fn attr(kind: FileKind) -> FileAttr {
        FileAttr {
            kind,
            size: 1,
            mode: 0o644,
            nlink: 1,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            blocks: 0,
            link: None,
        }
    }

    #[test]
    fn a_directory_made_here_answers_missing_names_until_it_changes() {
        let mut c = MetaCache::new(Duration::from_secs(10));
        assert!(!c.known_absent("d/x"), "nothing is known yet");
        c.created("d", attr(FileKind::Directory));
        assert!(c.known_absent("d/x"));
        c.created("d/x", attr(FileKind::File));
        assert!(!c.known_absent("d/x"));
        assert!(c.attr("d/x").is_some());
        c.renamed("d/x", "d/y");
        assert!(c.known_absent("d/x") && c.attr("d/y").is_some());
        c.invalidate("d/z");
        assert!(!c.known_absent("d/x"), "another mount changed d: the listing is no longer known");
    }

    #[test]
    fn removal_and_renames_drop_whole_subtrees_but_not_siblings() {
        let mut c = MetaCache::new(Duration::from_secs(10));
        c.put_listing("", [("a".to_string(), attr(FileKind::Directory)), ("ab".to_string(), attr(FileKind::File))]);
        c.put_attr("a/f", attr(FileKind::File));
        c.removed("a", true);
        assert!(c.attr("a/f").is_none() && c.attr("ab").is_some());
        assert!(c.known_absent("a"));
        c.invalidate_tree("ab");
        assert!(c.attr("ab").is_none());
    }

    #[test]
    fn a_reply_that_raced_a_change_is_not_stored() {
        let mut c = MetaCache::new(Duration::from_secs(10));
        let before = c.generation();
        c.removed("x", false);
        c.put_attr_if_unchanged(before, "x", attr(FileKind::File));
        assert!(c.attr("x").is_none());
        c.put_attr_if_unchanged(c.generation(), "x", attr(FileKind::File));
        assert!(c.attr("x").is_some());
    }

    #[test]
    fn a_listing_is_served_only_when_every_entry_is_known() {
        let mut c = MetaCache::new(Duration::from_secs(10));
        c.created("d", attr(FileKind::Directory));
        c.created("d/b", attr(FileKind::File));
        c.created("d/a", attr(FileKind::File));
        let names: Vec<String> = c.listing("d").unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "b"]);
        c.drop_attr("d/a");
        assert!(c.listing("d").is_none());
        assert!(c.listing("elsewhere").is_none());
    }

    #[test]
    fn a_walk_goes_on_below_then_after_each_ancestor_and_passes_over_unknown_directories() {
        let mut c = MetaCache::new(Duration::from_secs(10));
        let dir = || attr(FileKind::Directory);
        let file = || attr(FileKind::File);
        let listing =
            |names: &[(&str, FileAttr)]| names.iter().map(|(n, a)| (n.to_string(), a.clone())).collect::<Vec<_>>();
        c.put_listing("", listing(&[("a", dir()), ("b", dir()), ("c", dir()), ("z", file())]));
        c.put_listing("a", listing(&[("x", dir()), ("y", dir()), ("f", file())]));
        c.put_listing("a/x", listing(&[("g", file())]));
        c.put_listing("a/x/deep", listing(&[]));
        c.put_listing("a/y", listing(&[("in-y", dir())]));
        c.put_listing("a/y/in-y", listing(&[("h", file())]));
        c.put_listing("c", listing(&[("i", file())]));
        let walked = |c: &MetaCache, dir: &str, max| {
            c.listings_after(dir, max).into_iter().map(|(path, _)| path).collect::<Vec<_>>()
        };
        assert_eq!(walked(&c, "a/x", 100), ["a/y", "a/y/in-y", "c"], "b's listing is not held; x has no subdirectory");
        assert_eq!(walked(&c, "a", 100), ["a/x", "a/y", "a/y/in-y", "c"]);
        assert_eq!(walked(&c, "", 100), ["a", "a/x", "a/y", "a/y/in-y", "c"]);
        assert_eq!(walked(&c, "c", 100), Vec::<String>::new());
        assert_eq!(walked(&c, "a", 2), ["a/x", "a/y"], "stops once the entries reach the bound");
        c.invalidate("a/q");
        assert_eq!(walked(&c, "a/x", 100), Vec::<String>::new(), "a's listing is gone: the walk cannot go on from x");
    }

    #[test]
    fn an_answer_that_moves_only_the_ctime_keeps_the_ctime_known_until_it_expires() {
        let mut c = MetaCache::new(Duration::from_millis(200));
        let at = |nanos| Timestamp { secs: 1, nanos };
        let with = |mtime, ctime| FileAttr { mtime: at(mtime), ctime: at(ctime), ..attr(FileKind::Directory) };
        c.created("d", with(5, 5));
        c.put_attr("d", with(5, 9));
        assert_eq!(c.attr("d").unwrap().ctime, at(5), "foreseen here, another clock's answer");
        c.put_attr("d", with(6, 9));
        assert_eq!(c.attr("d").unwrap().ctime, at(9), "the mtime moved: the node's answer holds");
        c.replace_attr("d", with(6, 11));
        assert_eq!(c.attr("d").unwrap().ctime, at(11), "the node's answer to this mount's own change");
        std::thread::sleep(Duration::from_millis(250));
        c.put_attr("d", with(6, 12));
        assert_eq!(c.attr("d").unwrap().ctime, at(12), "once expired, the node's ctime is read");
    }

    #[test]
    fn a_directory_s_time_and_link_count_follow_the_entries_made_and_removed_here() {
        let mut c = MetaCache::new(Duration::from_secs(10));
        let at = |secs| Timestamp { secs, nanos: 0 };
        let with_mtime = |kind, secs| {
            let nlink = if kind == FileKind::Directory { 2 } else { 1 };
            FileAttr { mtime: at(secs), nlink, ..attr(kind) }
        };
        c.put_attr("d", with_mtime(FileKind::Directory, 1));
        c.put_attr("e", with_mtime(FileKind::Directory, 1));
        c.created("d/sub", with_mtime(FileKind::Directory, 5));
        let d = c.attr("d").unwrap();
        assert_eq!((d.mtime, d.ctime, d.nlink), (at(5), at(5), 3), "the node stamps d as it stamps d/sub");
        c.created("d/f", with_mtime(FileKind::File, 6));
        assert_eq!((c.attr("d").unwrap().mtime, c.attr("d").unwrap().nlink), (at(6), 3));
        c.renamed("d/f", "e/f");
        let (d, e) = (c.attr("d").unwrap(), c.attr("e").unwrap());
        assert!(d.mtime > at(6) && e.mtime == d.mtime, "a file's move stamps both parents now");
        c.removed("d/sub", true);
        assert_eq!(c.attr("d").unwrap().nlink, 2);
        c.created_or_opened("e/f", with_mtime(FileKind::File, 6));
        assert!(c.attr("e").is_none(), "whether e changed is the node's to tell");
        c.put_attr("e", with_mtime(FileKind::Directory, 1));
        c.created("d/g", with_mtime(FileKind::Directory, 7));
        c.renamed("d/g", "e/g");
        assert!(c.attr("d").is_none() && c.attr("e").is_none(), "after a directory's move, link counts are asked for");
        c.put_attr("d", with_mtime(FileKind::Directory, 1));
        c.invalidate("d/other");
        assert!(c.attr("d").is_none(), "another mount changed d's entries");
    }

    #[test]
    fn the_trash_is_never_known_absent_and_is_reread_after_any_removal() {
        let mut c = MetaCache::new(Duration::from_secs(10));
        c.put_listing("", [("f".to_string(), attr(FileKind::File)), ("g".to_string(), attr(FileKind::File))]);
        assert!(c.known_absent("other") && !c.known_absent(TRASH_DIR), "a node makes the trash unseen");
        c.put_listing(TRASH_DIR, [("2026-12-06T19".to_string(), attr(FileKind::Directory))]);
        c.put_listing(".trash/2026-12-06T19", []);
        c.put_attr(TRASH_DIR, attr(FileKind::Directory));
        c.removed("f", false);
        assert!(!c.listed(TRASH_DIR) && !c.listed(".trash/2026-12-06T19") && c.attr(TRASH_DIR).is_none());
        assert!(c.listed(""), "the root's listing stays");
        c.put_listing(TRASH_DIR, []);
        c.renamed("g", "h");
        assert!(!c.listed(TRASH_DIR), "a rename may replace a file, which the trash then keeps");
    }

    #[test]
    fn the_list_of_sharers_is_never_held_nor_known_absent() {
        let mut c = MetaCache::new(Duration::from_secs(10));
        c.put_listing("", [("f".to_string(), attr(FileKind::File))]);
        c.put_listing(SHARED_DIR, [("alice".to_string(), attr(FileKind::Directory))]);
        assert!(!c.known_absent(SHARED_DIR), "no listing of the root holds it");
        assert!(!c.listed(SHARED_DIR) && !c.known_absent(".shared/bob"), "bob may have granted something since");
        assert!(c.attr(".shared/alice").is_some(), "what was seen of an owner's tree is kept");
    }

    #[test]
    fn entries_expire() {
        let mut c = MetaCache::new(Duration::from_millis(1));
        c.created("d", attr(FileKind::Directory));
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.attr("d").is_none() && !c.known_absent("d/x"));
    }
}
