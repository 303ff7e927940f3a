//! The per-partition offset this node has applied, kept with its data in
//! `<storage>/.dfos/applied-<topic>`.
//!
//! Why here and not in Kafka's consumer group: the offset must move
//! together with the data it describes. Each mutation is applied, then its
//! offset is written (one 8-byte `pwrite` into a fixed slot, which a process
//! crash cannot tear), and only then is the reply sent. After a `kill -9`
//! at most one mutation per partition is in doubt, and the service treats
//! it as possibly applied (see `service.rs`). Read-only requests advance the
//! offset in memory only; replaying them is harmless.
//!
//! Not covered: a machine crash that loses the page cache. That needs
//! fsync per operation or per-object offsets (DESIGN.md, Replication).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Directory under the storage root for the node's own state. User names
/// cannot start with '.', so it never collides with a user's root.
pub const STATE_DIR: &str = ".dfos";

const SLOT: usize = 8;
const NONE: i64 = -1;

pub struct Checkpoint {
    file: File,
    path: PathBuf,
    applied: Vec<i64>,
    /// Some in-memory offset is ahead of the file.
    dirty: bool,
}

pub fn checkpoint_path(storage: &Path, topic: &str) -> PathBuf {
    storage.join(STATE_DIR).join(format!("applied-{topic}"))
}

/// Reads the applied offsets without opening for writing (for `status`).
pub fn read_applied(storage: &Path, topic: &str) -> io::Result<Vec<Option<i64>>> {
    let bytes = match fs::read(checkpoint_path(storage, topic)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    Ok(bytes
        .chunks_exact(SLOT)
        .map(|c| i64::from_le_bytes(c.try_into().expect("slot size")))
        .map(|o| (o >= 0).then_some(o))
        .collect())
}

impl Checkpoint {
    pub fn open(storage: &Path, topic: &str, partitions: usize) -> io::Result<Self> {
        fs::create_dir_all(storage.join(STATE_DIR))?;
        let path = checkpoint_path(storage, topic);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        let mut applied: Vec<i64> = read_applied(storage, topic)?.into_iter().map(|o| o.unwrap_or(NONE)).collect();
        if applied.len() < partitions {
            let old = applied.len();
            applied.resize(partitions, NONE);
            for partition in old..partitions {
                file.write_all_at(&NONE.to_le_bytes(), (partition * SLOT) as u64)?;
            }
        }
        Ok(Checkpoint { file, path, applied, dirty: false })
    }

    /// The last offset applied in `partition`, if any.
    pub fn applied(&self, partition: i32) -> Option<i64> {
        self.applied.get(partition as usize).copied().filter(|&o| o >= 0)
    }

    /// Remembers `offset` in memory; `durable` also writes it to the file.
    pub fn advance(&mut self, partition: i32, offset: i64, durable: bool) -> io::Result<()> {
        let index = partition as usize;
        if index >= self.applied.len() {
            self.applied.resize(index + 1, NONE);
        }
        self.applied[index] = offset;
        if durable {
            self.file.write_all_at(&offset.to_le_bytes(), (index * SLOT) as u64)?;
        } else {
            self.dirty = true;
        }
        Ok(())
    }

    /// Writes every in-memory offset: when idle, so `storaged status` counts
    /// read-only requests as applied too, and at a clean stop.
    pub fn persist_all(&mut self) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let bytes: Vec<u8> = self.applied.iter().flat_map(|o| o.to_le_bytes()).collect();
        self.file.write_all_at(&bytes, 0)?;
        self.dirty = false;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_survive_reopening_and_only_durable_ones_do() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Checkpoint::open(dir.path(), "t", 3).unwrap();
        assert_eq!(c.applied(0), None);
        c.advance(1, 41, true).unwrap();
        c.advance(2, 7, false).unwrap();
        drop(c);
        let mut c = Checkpoint::open(dir.path(), "t", 3).unwrap();
        assert_eq!((c.applied(0), c.applied(1), c.applied(2)), (None, Some(41), None));
        c.advance(0, 3, false).unwrap();
        assert_eq!(read_applied(dir.path(), "t").unwrap(), vec![None, Some(41), None]);
        c.persist_all().unwrap();
        assert_eq!(read_applied(dir.path(), "t").unwrap(), vec![Some(3), Some(41), None]);
    }
}
