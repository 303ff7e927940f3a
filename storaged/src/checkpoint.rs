//! The per-partition offset this node has applied, kept with its data in
//! `<storage>/.dfos/applied-<topic>`, and the mutation it has begun, in
//! `<storage>/.dfos/begun-<topic>`.
//!
//! Why here and not in Kafka's consumer group: the offset must move
//! together with the data it describes. Each mutation's offset is written
//! as begun, then it is applied (a batch's requests each record their
//! outcome as they finish), then its offset is written as applied, and only
//! then is the reply sent. Every record is one `pwrite` into a fixed slot,
//! which a process crash cannot tear. So after a `kill -9` a mutation is in
//! doubt only if the process died between its begun and applied records,
//! and then exactly one per partition: the requests of its batch that
//! recorded an outcome are known to be done, the next one may be half done,
//! the rest were never started (see `service.rs`). A clean stop, or a crash
//! between mutations, leaves nothing in doubt. Read-only requests advance
//! the applied offset in memory only; replaying them is harmless.
//!
//! Not covered: a machine crash that loses the page cache. That needs
//! fsync per operation or per-object offsets (DESIGN.md, Replication).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use dfos_protocol::limits::MAX_BATCH_REQUESTS;
use dfos_protocol::ErrorCode;

/// Directory under the storage root for the node's own state. User names
/// cannot start with '.', so it never collides with a user's root.
pub const STATE_DIR: &str = ".dfos";

const SLOT: usize = 8;
const NONE: i64 = -1;

/// A begun slot: the offset, what the node noted of the mutation (8 bytes:
/// 0 for nothing, else the number + 1, so a slot of zeros notes nothing),
/// then one outcome byte per request of a batch. Slots never straddle a
/// page.
const BEGUN_SLOT: usize = 512;
const NOTED_AT: usize = 8;
const OUTCOMES_AT: usize = 16;
const MAX_OUTCOMES: usize = MAX_BATCH_REQUESTS;
const _: () = assert!(OUTCOMES_AT + MAX_OUTCOMES <= BEGUN_SLOT && 4096 % BEGUN_SLOT == 0);
/// Outcome bytes: none recorded, done, or failed with the code of index
/// `byte - FAILED`.
const NO_OUTCOME: u8 = 0;
const DONE: u8 = 1;
const FAILED: u8 = 2;

/// How a finished request of a batch ended; its payload is not kept.
pub type Outcome = Result<(), ErrorCode>;

/// The mutation a crash may have left half applied in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InDoubt {
    /// A storage root from before begun records: the first mutation after
    /// the start, every request of it.
    FirstMutation,
    /// The message at `offset`: the first `outcomes.len()` requests of its
    /// batch finished so, the next may be half done, the rest never began.
    /// `noted`: what the node noted of it before changing anything, for a
    /// mutation whose replay could not tell otherwise (see `service.rs`:
    /// the file offset an append was placed at, the inode an exchange's
    /// first name had).
    At { offset: i64, outcomes: Vec<Outcome>, noted: Option<u64> },
}

/// Where one request of a message stands against what a crash left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Never begun: apply it.
    Fresh,
    /// Maybe applied, maybe half: apply it and read a refusal that its own
    /// effect explains as done.
    InDoubt,
    /// Finished before the crash, with this outcome: do not apply again.
    Finished(Outcome),
}

impl InDoubt {
    /// The stage of the `index`th request of the doubted message (0 for a
    /// lone request).
    pub fn stage(&self, index: usize) -> Stage {
        match self {
            InDoubt::FirstMutation => Stage::InDoubt,
            InDoubt::At { outcomes, .. } => match outcomes.get(index) {
                Some(outcome) => Stage::Finished(*outcome),
                None if index == outcomes.len() => Stage::InDoubt,
                None => Stage::Fresh,
            },
        }
    }

    /// Whether this doubt is about the mutation at `offset`.
    pub fn concerns(&self, offset: i64) -> bool {
        match self {
            InDoubt::FirstMutation => true,
            InDoubt::At { offset: doubted, .. } => *doubted == offset,
        }
    }
}

pub struct Checkpoint {
    file: File,
    path: PathBuf,
    applied: Vec<i64>,
    /// Some in-memory offset is ahead of the file.
    dirty: bool,
    begun: File,
}

pub fn checkpoint_path(storage: &Path, topic: &str) -> PathBuf {
    storage.join(STATE_DIR).join(format!("applied-{topic}"))
}

fn begun_path(storage: &Path, topic: &str) -> PathBuf {
    storage.join(STATE_DIR).join(format!("begun-{topic}"))
}

fn outcome_byte(outcome: &Outcome) -> u8 {
    match outcome {
        Ok(()) => DONE,
        Err(code) => FAILED + code.index(),
    }
}

fn outcome_of(byte: u8) -> Option<Outcome> {
    match byte {
        NO_OUTCOME => None,
        DONE => Some(Ok(())),
        // An index this build does not know cannot have been written by
        // it; reading it as an I/O failure refuses rather than reapplies.
        failed => Some(Err(ErrorCode::from_index(failed - FAILED).unwrap_or(ErrorCode::Io))),
    }
}

/// What the begun file says for each partition, against the applied
/// offsets; `None` when there is no begun file.
fn read_in_doubt(
    storage: &Path,
    topic: &str,
    applied: &[i64],
    partitions: usize,
) -> io::Result<Option<Vec<Option<InDoubt>>>> {
    let bytes = match fs::read(begun_path(storage, topic)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let doubt = |(partition, slot): (usize, &[u8])| {
        let begun = i64::from_le_bytes(slot[..8].try_into().expect("slot size"));
        let applied = applied.get(partition).copied().unwrap_or(NONE);
        let noted = u64::from_le_bytes(slot[NOTED_AT..NOTED_AT + 8].try_into().expect("slot size"));
        (begun >= 0 && begun > applied).then(|| InDoubt::At {
            offset: begun,
            outcomes: slot[OUTCOMES_AT..].iter().map_while(|&b| outcome_of(b)).collect(),
            noted: noted.checked_sub(1),
        })
    };
    let mut found: Vec<Option<InDoubt>> = bytes.chunks_exact(BEGUN_SLOT).enumerate().map(doubt).collect();
    found.resize(partitions, None);
    Ok(Some(found))
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
    /// Opens (or makes) the checkpoint of `topic` under `storage`, and
    /// says what the last run left in doubt, per partition.
    pub fn open(storage: &Path, topic: &str, partitions: usize) -> io::Result<(Self, Vec<Option<InDoubt>>)> {
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
        let had_applied = applied.iter().any(|&o| o >= 0);
        let in_doubt = match read_in_doubt(storage, topic, &applied, partitions)? {
            Some(found) => found,
            // Nothing was ever applied here, or a root from before begun
            // records, where the first mutation may be half done.
            None if !had_applied => vec![None; partitions],
            None => vec![Some(InDoubt::FirstMutation); partitions],
        };
        let begun =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(begun_path(storage, topic))?;
        let mut checkpoint = Checkpoint { file, path, applied, dirty: false, begun };
        // A doubted slot keeps its outcomes, so that a crash during the
        // replay still knows what finished before the first crash.
        for (partition, doubt) in in_doubt.iter().enumerate() {
            if !matches!(doubt, Some(InDoubt::At { .. })) {
                checkpoint.write_begun(partition, NONE)?;
            }
        }
        Ok((checkpoint, in_doubt))
    }

    /// Records that the mutation at `offset` of `partition` is about to be
    /// applied, with no outcomes yet.
    pub fn begin(&mut self, partition: i32, offset: i64) -> io::Result<()> {
        self.write_begun(partition as usize, offset)
    }

    /// Records how the `index`th request of the begun batch ended.
    pub fn finish(&mut self, partition: i32, index: usize, outcome: &Outcome) -> io::Result<()> {
        // A longer batch is refused before any request of it is applied.
        if index >= MAX_OUTCOMES {
            return Ok(());
        }
        let at = partition as usize * BEGUN_SLOT + OUTCOMES_AT + index;
        self.begun.write_all_at(&[outcome_byte(outcome)], at as u64)
    }

    /// Records `number` about the begun mutation of `partition`, before
    /// it changes anything, for its replay after a crash.
    pub fn note(&mut self, partition: i32, number: u64) -> io::Result<()> {
        let at = partition as usize * BEGUN_SLOT + NOTED_AT;
        self.begun.write_all_at(&number.saturating_add(1).to_le_bytes(), at as u64)
    }

    fn write_begun(&mut self, partition: usize, offset: i64) -> io::Result<()> {
        let mut slot = [NO_OUTCOME; BEGUN_SLOT];
        slot[..8].copy_from_slice(&offset.to_le_bytes());
        self.begun.write_all_at(&slot, (partition * BEGUN_SLOT) as u64)
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
        let (mut c, _) = Checkpoint::open(dir.path(), "t", 3).unwrap();
        assert_eq!(c.applied(0), None);
        c.advance(1, 41, true).unwrap();
        c.advance(2, 7, false).unwrap();
        drop(c);
        let (mut c, _) = Checkpoint::open(dir.path(), "t", 3).unwrap();
        assert_eq!((c.applied(0), c.applied(1), c.applied(2)), (None, Some(41), None));
        c.advance(0, 3, false).unwrap();
        assert_eq!(read_applied(dir.path(), "t").unwrap(), vec![None, Some(41), None]);
        c.persist_all().unwrap();
        assert_eq!(read_applied(dir.path(), "t").unwrap(), vec![Some(3), Some(41), None]);
    }

    #[test]
    fn only_a_mutation_begun_and_not_applied_is_in_doubt_with_its_finished_outcomes_and_what_was_noted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, in_doubt) = Checkpoint::open(dir.path(), "t", 3).unwrap();
        assert_eq!(in_doubt, vec![None, None, None], "a new root has nothing in doubt");
        // Partition 0 applied 5 fully; partition 1 crashed in the third
        // request of the batch at 9; partition 2 crashed in a lone append
        // placed at file offset 4096.
        c.begin(0, 5).unwrap();
        c.advance(0, 5, true).unwrap();
        c.begin(1, 9).unwrap();
        c.finish(1, 0, &Ok(())).unwrap();
        c.finish(1, 1, &Err(ErrorCode::Exists)).unwrap();
        c.begin(2, 0).unwrap();
        c.note(2, 4096).unwrap();
        drop(c);
        let (c, in_doubt) = Checkpoint::open(dir.path(), "t", 3).unwrap();
        let partition_1 = InDoubt::At { offset: 9, outcomes: vec![Ok(()), Err(ErrorCode::Exists)], noted: None };
        let partition_2 = InDoubt::At { offset: 0, outcomes: vec![], noted: Some(4096) };
        let expected = vec![None, Some(partition_1.clone()), Some(partition_2)];
        assert_eq!(in_doubt, expected);
        assert_eq!(
            (0..4).map(|i| partition_1.stage(i)).collect::<Vec<_>>(),
            [Stage::Finished(Ok(())), Stage::Finished(Err(ErrorCode::Exists)), Stage::InDoubt, Stage::Fresh]
        );
        assert!(partition_1.concerns(9) && !partition_1.concerns(10));
        // A crash during the replay still finds what the first run finished.
        drop(c);
        let (mut c, in_doubt) = Checkpoint::open(dir.path(), "t", 3).unwrap();
        assert_eq!(in_doubt, expected);
        c.advance(1, 9, true).unwrap();
        c.advance(2, 0, true).unwrap();
        drop(c);
        let (mut c, in_doubt) = Checkpoint::open(dir.path(), "t", 3).unwrap();
        assert_eq!(in_doubt, vec![None, None, None]);
        // The next mutation begun there has nothing noted until it notes.
        c.begin(2, 1).unwrap();
        drop(c);
        let (_, in_doubt) = Checkpoint::open(dir.path(), "t", 3).unwrap();
        assert_eq!(in_doubt[2], Some(InDoubt::At { offset: 1, outcomes: vec![], noted: None }));
    }

    #[test]
    fn a_root_from_before_begun_records_doubts_the_first_mutation() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _) = Checkpoint::open(dir.path(), "t", 2).unwrap();
        c.advance(0, 3, true).unwrap();
        drop(c);
        std::fs::remove_file(begun_path(dir.path(), "t")).unwrap();
        let (c, in_doubt) = Checkpoint::open(dir.path(), "t", 2).unwrap();
        assert_eq!(in_doubt, vec![Some(InDoubt::FirstMutation); 2]);
        assert!(InDoubt::FirstMutation.concerns(4) && InDoubt::FirstMutation.stage(7) == Stage::InDoubt);
        drop(c);
        let (_, in_doubt) = Checkpoint::open(dir.path(), "t", 2).unwrap();
        assert_eq!(in_doubt, vec![None, None], "from then on, begun records say");
    }
}
