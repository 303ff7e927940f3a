//! Inode numbers for a path-based protocol.
//!
//! The server knows only paths (like sshfs), the kernel only inode numbers.
//! This table hands out a number per path, counts the kernel's lookups so a
//! number is dropped only when the kernel forgets it, and rewrites paths on
//! rename, including every descendant of a renamed directory.
//!
//! An inode whose name was unlinked or replaced is detached: it keeps its
//! number until forgotten, but has no path, so operations on it fail with
//! ENOENT instead of touching whatever now lives at its old name.
//!
//! The names of a hard-linked file share one number when the storage node
//! gave the file a link identity (`FileAttr::link`): a name looked up
//! while another name of the same file is known joins that inode, so
//! `stat`, `tar c`, `cp -a`, `rsync -H` and `du` see one file. The inode's
//! path is then any of its known names; it is detached only when the last
//! of them goes.
//!
//! A path keeps its number when the kernel forgets it (its inode cache
//! evicted, `drop_caches`) and looks it up again, as long as nothing this
//! mount hears of removed, replaced or renamed it in between: `st_ino` is
//! stable as on a local disk, which `tar` (its delayed symlinks are made
//! only if the placeholder's inode number is unchanged), `find -samefile`
//! and git's index rely on.

use std::collections::HashMap;

pub const ROOT_INO: u64 = 1;

struct Node {
    /// Every name this mount knows the inode by, the one used first; none
    /// when detached.
    paths: Vec<String>,
    lookups: u64,
    link: Option<u64>,
}

pub struct InodeTable {
    nodes: HashMap<u64, Node>,
    by_path: HashMap<String, u64>,
    /// The inode of each link identity this mount has seen.
    by_link: HashMap<u64, u64>,
    /// Numbers of paths the kernel forgot, handed out again when it looks
    /// them up.
    forgotten: HashMap<String, u64>,
    next: u64,
}

/// At most this many forgotten paths keep their numbers (~100 bytes each);
/// past it, all are dropped at once.
const MAX_FORGOTTEN: usize = 1 << 16;

impl Default for InodeTable {
    fn default() -> Self {
        let mut table = InodeTable {
            nodes: HashMap::new(),
            by_path: HashMap::new(),
            by_link: HashMap::new(),
            forgotten: HashMap::new(),
            next: ROOT_INO + 1,
        };
        table.nodes.insert(ROOT_INO, Node { paths: vec![String::new()], lookups: 1, link: None });
        table.by_path.insert(String::new(), ROOT_INO);
        table
    }
}

pub use dfos_protocol::path::join;

/// Whether `path` is `root` or below it (every path is below the root, "").
pub fn inside(path: &str, root: &str) -> bool {
    root.is_empty() || path == root || (path.starts_with(root) && path.as_bytes().get(root.len()) == Some(&b'/'))
}

/// The parent path of a non-root path.
pub fn parent_of(path: &str) -> &str {
    dfos_protocol::path::split(path).0
}

impl InodeTable {
    /// The current path of `ino`, or `None` if unknown or detached.
    pub fn path(&self, ino: u64) -> Option<&str> {
        self.nodes.get(&ino)?.paths.first().map(String::as_str)
    }

    pub fn ino_of(&self, path: &str) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    /// Records one kernel lookup of `path`, a file of link identity `link`
    /// if it has several names, and returns its number.
    pub fn remember(&mut self, path: &str, link: Option<u64>) -> u64 {
        if let Some(&ino) = self.by_path.get(path) {
            self.nodes.get_mut(&ino).expect("by_path and nodes agree").lookups += 1;
            if let Some(link) = link {
                self.adopt_link(ino, link);
            }
            return ino;
        }
        if let Some(&ino) = link.and_then(|link| self.by_link.get(&link)) {
            let node = self.nodes.get_mut(&ino).expect("by_link and nodes agree");
            node.paths.push(path.to_owned());
            node.lookups += 1;
            self.forgotten.remove(path);
            self.by_path.insert(path.to_owned(), ino);
            return ino;
        }
        let ino = self.forgotten.remove(path).unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        self.nodes.insert(ino, Node { paths: vec![path.to_owned()], lookups: 1, link });
        self.by_path.insert(path.to_owned(), ino);
        if let Some(link) = link {
            self.by_link.insert(link, ino);
        }
        ino
    }

    /// `ino` is the file of link identity `link` (it just got a second
    /// name): later names of it join `ino`, unless another inode already
    /// stands for it.
    pub fn adopt_link(&mut self, ino: u64, link: u64) {
        let taken = self.by_link.get(&link).is_some_and(|known| self.nodes.contains_key(known));
        let Some(node) = self.nodes.get_mut(&ino) else { return };
        if !taken {
            node.link = Some(link);
            self.by_link.insert(link, ino);
        }
    }

    /// The kernel dropped `count` lookups; returns true if `ino` is gone.
    pub fn forget(&mut self, ino: u64, count: u64) -> bool {
        if ino == ROOT_INO {
            return false;
        }
        let Some(node) = self.nodes.get_mut(&ino) else {
            return false;
        };
        node.lookups = node.lookups.saturating_sub(count);
        if node.lookups > 0 {
            return false;
        }
        let node = self.nodes.remove(&ino).expect("looked up above");
        if let Some(link) = node.link {
            if self.by_link.get(&link) == Some(&ino) {
                self.by_link.remove(&link);
            }
        }
        for path in node.paths {
            self.by_path.remove(&path);
            if self.forgotten.len() >= MAX_FORGOTTEN {
                self.forgotten.clear();
            }
            self.forgotten.insert(path, ino);
        }
        true
    }

    /// Something at `path` or below it changed elsewhere (another mount's
    /// removal, creation or rename): a number the kernel forgot there may
    /// stand for a file that is gone.
    pub fn changed_elsewhere(&mut self, path: &str) {
        self.forgotten.retain(|p, _| !inside(p, path));
    }

    /// `path` no longer names its inode (unlink, rmdir, replaced by rename).
    pub fn detach(&mut self, path: &str) {
        self.forgotten.remove(path);
        if let Some(ino) = self.by_path.remove(path) {
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.paths.retain(|p| p != path);
            }
        }
    }

    /// Applies a successful rename to `from` and everything below it.
    pub fn rename(&mut self, from: &str, to: &str) {
        self.detach(to);
        self.forgotten.retain(|p, _| !inside(p, from) && !inside(p, to));
        let prefix = format!("{from}/");
        let moved: Vec<(String, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| p.as_str() == from || p.starts_with(&prefix))
            .map(|(p, &ino)| (p.clone(), ino))
            .collect();
        for (old, ino) in moved {
            let new = format!("{to}{}", &old[from.len()..]);
            self.by_path.remove(&old);
            // A stale descendant of the old target is displaced by the move.
            self.detach(&new);
            self.by_path.insert(new.clone(), ino);
            if let Some(node) = self.nodes.get_mut(&ino) {
                for path in node.paths.iter_mut().filter(|p| **p == old) {
                    path.clone_from(&new);
                }
            }
        }
    }

    /// Applies a successful exchange (RENAME_EXCHANGE): what was at or
    /// below `a` is now at or below `b`, and the other way round; no
    /// number is detached, since both files live on.
    pub fn exchange(&mut self, a: &str, b: &str) {
        let swapped = |path: &str| {
            if inside(path, a) {
                Some(format!("{b}{}", &path[a.len()..]))
            } else if inside(path, b) {
                Some(format!("{a}{}", &path[b.len()..]))
            } else {
                None
            }
        };
        self.forgotten.retain(|path, _| swapped(path).is_none());
        let moved: Vec<(String, u64)> =
            self.by_path.iter().filter(|(path, _)| swapped(path).is_some()).map(|(p, &ino)| (p.clone(), ino)).collect();
        for (old, _) in &moved {
            self.by_path.remove(old);
        }
        let mut inos: Vec<u64> = Vec::with_capacity(moved.len());
        for (old, ino) in moved {
            self.by_path.insert(swapped(&old).expect("moved paths are inside"), ino);
            inos.push(ino);
        }
        inos.sort_unstable();
        inos.dedup();
        for ino in inos {
            if let Some(node) = self.nodes.get_mut(&ino) {
                for path in node.paths.iter_mut() {
                    if let Some(new) = swapped(path) {
                        *path = new;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_swaps_both_trees_and_keeps_every_number() {
        let mut t = InodeTable::default();
        let (a, a_child) = (t.remember("a", None), t.remember("a/f", None));
        let (b, b_child) = (t.remember("b", None), t.remember("b/g/h", None));
        let sibling = t.remember("ab", None);
        t.exchange("a", "b");
        assert_eq!((t.path(a), t.path(a_child)), (Some("b"), Some("b/f")));
        assert_eq!((t.path(b), t.path(b_child)), (Some("a"), Some("a/g/h")));
        assert_eq!((t.ino_of("a"), t.ino_of("b/f"), t.ino_of("a/f")), (Some(b), Some(a_child), None));
        assert_eq!(t.path(sibling), Some("ab"), "a name sharing a prefix is not inside");
        t.exchange("b", "a");
        assert_eq!((t.path(a), t.path(b_child)), (Some("a"), Some("b/g/h")));
    }

    #[test]
    fn rename_moves_descendants_and_detaches_the_target() {
        let mut t = InodeTable::default();
        let dir = t.remember("a", None);
        let file = t.remember("a/b/c", None);
        let victim = t.remember("x", None);
        t.rename("a", "x");
        assert_eq!(t.path(dir), Some("x"));
        assert_eq!(t.path(file), Some("x/b/c"));
        assert_eq!(t.path(victim), None);
        assert_eq!(t.ino_of("x"), Some(dir));
        assert_eq!(t.ino_of("a/b/c"), None);
        // A sibling sharing a name prefix is not a descendant.
        let sibling = t.remember("xy", None);
        t.rename("x", "z");
        assert_eq!(t.path(sibling), Some("xy"));
    }

    #[test]
    fn numbers_live_until_every_lookup_is_forgotten() {
        let mut t = InodeTable::default();
        let a = t.remember("a", None);
        assert_eq!(t.remember("a", None), a);
        assert!(!t.forget(a, 1));
        assert!(t.forget(a, 1));
        assert_eq!(t.remember("a", None), a, "a forgotten path gets its number back");
        assert!(t.forget(a, 1));
        t.detach("a");
        assert_ne!(t.remember("a", None), a, "a removed path gets a new number");
        let b = t.remember("d/b", None);
        assert!(t.forget(b, 1));
        t.changed_elsewhere("d");
        assert_ne!(t.remember("d/b", None), b, "nor one changed through another mount");
        let c = t.remember("e/c", None);
        assert!(t.forget(c, 1));
        t.rename("e", "f");
        assert_ne!(t.remember("e/c", None), c, "nor one renamed away");
        assert!(!t.forget(ROOT_INO, 100));
        assert_eq!(join("", "n"), "n");
        assert_eq!(parent_of("a/b/c"), "a/b");
        assert_eq!(parent_of("a"), "");
    }

    #[test]
    fn the_names_of_a_linked_file_share_its_number_until_the_last_goes() {
        let mut t = InodeTable::default();
        let a = t.remember("a", None);
        // `ln a b`: the node answers with the identity it gave the file.
        t.adopt_link(a, 7);
        assert_eq!(t.remember("d/b", Some(7)), a);
        assert_eq!(t.remember("c", Some(8)), t.remember("c", None), "another identity, another file");
        assert_ne!(t.remember("c", None), a);
        t.rename("d", "e");
        t.detach("a");
        assert_eq!(t.path(a), Some("e/b"), "the other name serves");
        t.detach("e/b");
        assert_eq!(t.path(a), None, "detached with its last name");
        assert_eq!(t.remember("f", Some(7)), a, "a name found later is the same file again");
        // Forgotten by the kernel: both names get the number back.
        assert_eq!(t.remember("g", Some(7)), a);
        assert!(t.forget(a, 4));
        assert_eq!(t.remember("g", Some(7)), a);
        assert_eq!(t.remember("f", Some(7)), a);
    }
}
