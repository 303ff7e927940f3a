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
//! A path keeps its number when the kernel forgets it (its inode cache
//! evicted, `drop_caches`) and looks it up again, as long as nothing this
//! mount hears of removed, replaced or renamed it in between: `st_ino` is
//! stable as on a local disk, which `tar` (its delayed symlinks are made
//! only if the placeholder's inode number is unchanged), `find -samefile`
//! and git's index rely on.

use std::collections::HashMap;

pub const ROOT_INO: u64 = 1;

struct Node {
    path: Option<String>,
    lookups: u64,
}

pub struct InodeTable {
    nodes: HashMap<u64, Node>,
    by_path: HashMap<String, u64>,
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
            forgotten: HashMap::new(),
            next: ROOT_INO + 1,
        };
        table.nodes.insert(ROOT_INO, Node { path: Some(String::new()), lookups: 1 });
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
        self.nodes.get(&ino)?.path.as_deref()
    }

    pub fn ino_of(&self, path: &str) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    /// Records one kernel lookup of `path` and returns its number.
    pub fn remember(&mut self, path: &str) -> u64 {
        if let Some(&ino) = self.by_path.get(path) {
            self.nodes.get_mut(&ino).expect("by_path and nodes agree").lookups += 1;
            return ino;
        }
        let ino = self.forgotten.remove(path).unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        self.nodes.insert(ino, Node { path: Some(path.to_owned()), lookups: 1 });
        self.by_path.insert(path.to_owned(), ino);
        ino
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
        if let Some(path) = self.nodes.remove(&ino).and_then(|n| n.path) {
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
                node.path = None;
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
                node.path = Some(new);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_moves_descendants_and_detaches_the_target() {
        let mut t = InodeTable::default();
        let dir = t.remember("a");
        let file = t.remember("a/b/c");
        let victim = t.remember("x");
        t.rename("a", "x");
        assert_eq!(t.path(dir), Some("x"));
        assert_eq!(t.path(file), Some("x/b/c"));
        assert_eq!(t.path(victim), None);
        assert_eq!(t.ino_of("x"), Some(dir));
        assert_eq!(t.ino_of("a/b/c"), None);
        // A sibling sharing a name prefix is not a descendant.
        let sibling = t.remember("xy");
        t.rename("x", "z");
        assert_eq!(t.path(sibling), Some("xy"));
    }

    #[test]
    fn numbers_live_until_every_lookup_is_forgotten() {
        let mut t = InodeTable::default();
        let a = t.remember("a");
        assert_eq!(t.remember("a"), a);
        assert!(!t.forget(a, 1));
        assert!(t.forget(a, 1));
        assert_eq!(t.remember("a"), a, "a forgotten path gets its number back");
        assert!(t.forget(a, 1));
        t.detach("a");
        assert_ne!(t.remember("a"), a, "a removed path gets a new number");
        let b = t.remember("d/b");
        assert!(t.forget(b, 1));
        t.changed_elsewhere("d");
        assert_ne!(t.remember("d/b"), b, "nor one changed through another mount");
        let c = t.remember("e/c");
        assert!(t.forget(c, 1));
        t.rename("e", "f");
        assert_ne!(t.remember("e/c"), c, "nor one renamed away");
        assert!(!t.forget(ROOT_INO, 100));
        assert_eq!(join("", "n"), "n");
        assert_eq!(parent_of("a/b/c"), "a/b");
        assert_eq!(parent_of("a"), "");
    }
}
