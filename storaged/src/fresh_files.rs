//! Empty files and directories made ahead of time, so a create (every file
//! `cp` or an editor writes) or a mkdir does not allocate its inode while
//! a mount waits.
//!
//! Why: the node applies a partition's requests one after another, and on
//! an ext4 without a journal, allocating an inode steps over every inode
//! freed in the last minute or so (`find_inode_bit` → `recently_deleted`).
//! After an `rm -r` of a tree, recreating it paid that scan in each
//! create: about half of the node's CPU in a `cp -r`, 0.8 ms of each
//! create's system call, 1.2 ms of each mkdir's. A thread of its own pays
//! it here instead, between requests, on the other core, and mostly not
//! at all: its directory's block group is not where the tree was freed.
//!
//! Guarantees:
//! - what is handed out is an empty regular file with one link, or an
//!   empty directory, made by this daemon in `<storage>/.dfos/fresh/`,
//!   outside every user's tree, and handed out once;
//! - files left there by an earlier run are removed at start, never
//!   handed out: nothing of a crashed run reaches a user;
//! - taking never waits: with none ready, the caller creates as before;
//! - the thread ends when the pool is dropped.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::checkpoint::STATE_DIR;

/// What the pool makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
}

impl Kind {
    /// How many are kept ready: a `cp -r` of a source tree creates a few
    /// hundred files in a few dozen directories within a second or two, so
    /// the pool absorbs such a burst and refills after it.
    fn ready(self) -> usize {
        match self {
            Kind::File => 256,
            Kind::Directory => 64,
        }
    }

    /// Refilling starts when fewer than this are left.
    fn refill_below(self) -> usize {
        self.ready() * 3 / 4
    }

    fn index(self) -> usize {
        self as usize
    }
}

const KINDS: [Kind; 2] = [Kind::File, Kind::Directory];

pub struct FreshFiles {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    dir: PathBuf,
    /// Per [`Kind::index`].
    ready: Mutex<[Vec<PathBuf>; 2]>,
    wanted: Condvar,
    stop: AtomicBool,
    next_name: AtomicU64,
}

/// Where the pool of the daemon serving `storage` keeps what it made.
pub fn directory(storage: &Path) -> PathBuf {
    storage.join(STATE_DIR).join("fresh")
}

impl FreshFiles {
    /// Empties `<storage>/.dfos/fresh/` and starts filling it. Call it only
    /// while holding the storage lock: another daemon's pool is not ours
    /// to empty.
    pub fn start(storage: &Path) -> io::Result<Self> {
        let dir = directory(storage);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(&dir)?;
        let shared = Arc::new(Shared {
            dir,
            ready: Mutex::new(KINDS.map(|kind| Vec::with_capacity(kind.ready()))),
            wanted: Condvar::new(),
            stop: AtomicBool::new(false),
            next_name: AtomicU64::new(0),
        });
        let filler = shared.clone();
        let thread = std::thread::Builder::new().name("fresh-files".into()).spawn(move || filler.fill())?;
        Ok(FreshFiles { shared, thread: Some(thread) })
    }

    /// A fresh empty one, now the caller's to rename into place (or to
    /// hand back with [`FreshFiles::give_back`]), if one is ready.
    pub fn take(&self, kind: Kind) -> Option<PathBuf> {
        let mut ready = self.shared.ready.lock().unwrap();
        let taken = ready[kind.index()].pop();
        if ready[kind.index()].len() < kind.refill_below() {
            self.shared.wanted.notify_one();
        }
        taken
    }

    /// Returns what [`FreshFiles::take`] gave and was not used (its create
    /// found the name taken); its mode may have changed, which the next
    /// taker sets anew.
    pub fn give_back(&self, kind: Kind, fresh: PathBuf) {
        self.shared.ready.lock().unwrap()[kind.index()].push(fresh);
    }

    #[cfg(test)]
    pub(crate) fn wait_until_full(&self) {
        for kind in KINDS {
            self.wait_until_ready(kind, kind.ready());
        }
    }

    #[cfg(test)]
    fn wait_until_ready(&self, kind: Kind, count: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.shared.ready.lock().unwrap()[kind.index()].len() < count {
            assert!(std::time::Instant::now() < deadline, "the pool did not fill");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl Drop for FreshFiles {
    fn drop(&mut self) {
        {
            // Under the lock: the filler is then either before its check of
            // `stop` or already waiting for the notification below, never
            // between the two, where the notification would be lost.
            let _ready = self.shared.ready.lock().unwrap();
            self.shared.stop.store(true, Ordering::Relaxed);
        }
        self.shared.wanted.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn fill(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            let missing = {
                let ready = self.ready.lock().unwrap();
                let ready = self
                    .wanted
                    .wait_while(ready, |ready| {
                        KINDS.iter().all(|kind| ready[kind.index()].len() >= kind.refill_below())
                            && !self.stop.load(Ordering::Relaxed)
                    })
                    .unwrap();
                KINDS.map(|kind| kind.ready().saturating_sub(ready[kind.index()].len()))
            };
            for kind in KINDS {
                for _ in 0..missing[kind.index()] {
                    if self.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    match self.make_one(kind) {
                        Ok(fresh) => self.ready.lock().unwrap()[kind.index()].push(fresh),
                        Err(e) => {
                            // Out of inodes or space: creates go the slow
                            // way, and meet the same error there, with a
                            // request id.
                            log::warn!("op=fresh-files dir={} error={e}", self.dir.display());
                            std::thread::sleep(std::time::Duration::from_secs(1));
                            break;
                        }
                    }
                }
            }
        }
    }

    fn make_one(&self, kind: Kind) -> io::Result<PathBuf> {
        let name = self.dir.join(self.next_name.fetch_add(1, Ordering::Relaxed).to_string());
        match kind {
            Kind::File => {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&name)?;
            }
            Kind::Directory => fs::DirBuilder::new().mode(0o700).create(&name)?,
        }
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn hands_out_distinct_empty_files_and_directories_and_refills() {
        let storage = tempfile::tempdir().unwrap();
        let pool = FreshFiles::start(storage.path()).unwrap();
        let mut inodes = std::collections::HashSet::new();
        for kind in KINDS {
            pool.wait_until_ready(kind, kind.ready());
            let taken: Vec<PathBuf> = (0..kind.ready()).map(|_| pool.take(kind).expect("ready")).collect();
            for fresh in &taken {
                let meta = fs::symlink_metadata(fresh).unwrap();
                assert!(inodes.insert(meta.ino()), "{fresh:?} handed out twice");
                match kind {
                    Kind::File => assert!(meta.is_file() && meta.len() == 0 && meta.nlink() == 1),
                    Kind::Directory => assert!(meta.is_dir() && fs::read_dir(fresh).unwrap().next().is_none()),
                }
            }
            pool.wait_until_ready(kind, kind.refill_below());
            assert!(pool.take(kind).is_some_and(|fresh| !taken.contains(&fresh)), "refilled with new ones");
        }
    }

    #[test]
    fn what_an_earlier_run_left_is_removed_not_handed_out() {
        let storage = tempfile::tempdir().unwrap();
        let left = directory(storage.path());
        fs::create_dir_all(&left).unwrap();
        fs::write(left.join("0"), b"bytes of a crashed run").unwrap();
        let pool = FreshFiles::start(storage.path()).unwrap();
        pool.wait_until_ready(Kind::File, Kind::File.ready());
        for _ in 0..Kind::File.ready() {
            let file = pool.take(Kind::File).expect("ready");
            assert_eq!(fs::symlink_metadata(&file).unwrap().len(), 0, "{file:?}");
        }
    }

    #[test]
    fn dropping_the_pool_stops_its_thread() {
        let storage = tempfile::tempdir().unwrap();
        let pool = FreshFiles::start(storage.path()).unwrap();
        let shared = pool.shared.clone();
        drop(pool);
        assert_eq!(Arc::strong_count(&shared), 1, "the filler thread has let go");
    }
}
