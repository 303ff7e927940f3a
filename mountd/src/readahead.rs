//! File data read from the storage nodes, in chunk-aligned blocks, with
//! read-ahead on sequential access.
//!
//! The kernel asks for at most 128 KiB at a time; one request per kernel
//! read would pay a Kafka round trip for every 128 KiB. Instead each read
//! fetches whole blocks of one chunk (960 KiB), and a run of sequential
//! reads fetches the next blocks ahead of time with a window that doubles up to
//! [`MAX_WINDOW_BLOCKS`]. Random access fetches only what it touches.
//! Blocks of a sequential run may come straight from the request log
//! (`logread`); a read whose blocks have all arrived is answered without
//! waiting ([`ReadCache::read_ready`]), and within one block it shares the
//! block's buffer ([`FileBytes`]).
//!
//! Guarantees: a block is fetched at most once while cached (concurrent
//! readers share one request); per inode at most `MAX_WINDOW_BLOCKS + 2`
//! blocks are held; [`ReadCache::forget`] drops an inode's blocks, which
//! the core does on open, write, truncate, forget and change events.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};

use dfos_protocol::limits::CHUNK_SIZE;
use dfos_protocol::{Payload, Request};

use crate::fs::{FsError, FsResult};
use crate::rpc::Transport;

/// Blocks fetched ahead of a sequential reader: 16 × 960 KiB = 15 MiB.
pub const MAX_WINDOW_BLOCKS: u64 = 16;
const CHUNK: u64 = CHUNK_SIZE as u64;

type Block = Shared<BoxFuture<'static, FsResult<Arc<Vec<u8>>>>>;

#[derive(Default)]
struct InodeBlocks {
    blocks: BTreeMap<u64, Block>,
    /// Where a sequential reader is expected to continue.
    next_offset: u64,
    window: u64,
}

/// Bytes a read returns: a range of a cached block or small file when the
/// read lies within one, so the reply to the kernel is the only copy.
#[derive(Clone)]
pub struct FileBytes {
    data: Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
}

impl FileBytes {
    /// `range` of `data`, clamped to its length.
    pub fn shared(data: Arc<Vec<u8>>, range: std::ops::Range<usize>) -> Self {
        let end = range.end.min(data.len());
        FileBytes { range: range.start.min(end)..end, data }
    }
}

impl From<Vec<u8>> for FileBytes {
    fn from(data: Vec<u8>) -> Self {
        FileBytes { range: 0..data.len(), data: Arc::new(data) }
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[self.range.clone()]
    }
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "FileBytes({} bytes)", self.len())
    }
}

impl<T: AsRef<[u8]>> PartialEq<T> for FileBytes {
    fn eq(&self, other: &T) -> bool {
        **self == *other.as_ref()
    }
}

/// One read of a file: `size` bytes at `offset` of inode `ino`, at `path`.
#[derive(Debug, Clone, Copy)]
pub struct FileRead<'a> {
    pub ino: u64,
    pub path: &'a str,
    pub offset: u64,
    pub size: u32,
}

#[derive(Default)]
pub struct ReadCache {
    inodes: Mutex<HashMap<u64, InodeBlocks>>,
}

/// A sequential reader's blocks may come straight from the request log
/// (see `logread`): that streams, but a lone read would pay a seek of the
/// log consumer, which costs more than having the bytes in the reply.
fn fetch<T: Transport>(transport: &T, path: &str, index: u64, sequential: bool) -> FsResult<Block> {
    let (path, offset, len) = (path.to_owned(), index * CHUNK, CHUNK_SIZE as u32);
    let request =
        if sequential { Request::ReadFromLog { path, offset, len } } else { Request::Read { path, offset, len } };
    let pending = transport.submit(request)?;
    Ok(async move {
        match pending.await {
            Ok(Payload::Data(data)) => Ok(Arc::new(data)),
            Ok(_) => Err(FsError::UnexpectedReply),
            Err(e) => Err(FsError::from(e)),
        }
    }
    .boxed()
    .shared())
}

impl ReadCache {
    pub fn forget(&self, ino: u64) {
        self.inodes.lock().unwrap().remove(&ino);
    }

    /// Reads up to `size` bytes at `offset`; shorter only at end of file.
    pub async fn read<T: Transport>(&self, transport: &T, wanted: FileRead<'_>) -> FsResult<FileBytes> {
        let Some(needed) = self.plan(transport, wanted, false)? else {
            return Ok(Vec::new().into());
        };
        let mut blocks = Vec::with_capacity(needed.len());
        for (index, block) in needed {
            match block.await {
                Ok(data) => blocks.push((index, data)),
                Err(e) => {
                    self.forget(wanted.ino);
                    return Err(e);
                }
            }
        }
        Ok(assemble(&blocks, wanted))
    }

    /// The read, if every block it needs has arrived already: then it costs
    /// no waiting and the FUSE thread can answer it itself. `None` leaves
    /// the cache as it was. Needs a tokio runtime context (read-ahead).
    pub fn read_ready<T: Transport>(&self, transport: &T, wanted: FileRead<'_>) -> Option<FsResult<FileBytes>> {
        let needed = match self.plan(transport, wanted, true) {
            Ok(needed) => needed?,
            Err(e) => return Some(Err(e)),
        };
        let blocks: Option<Vec<(u64, Arc<Vec<u8>>)>> =
            needed.into_iter().map(|(index, block)| Some((index, block.peek()?.clone().ok()?))).collect();
        blocks.map(|blocks| Ok(assemble(&blocks, wanted)))
    }

    /// Updates the sequential-access state, starts the blocks the read and
    /// its read-ahead need, and returns the read's blocks (`None`: nothing
    /// to read, or `only_if_ready` and a block has not arrived).
    fn plan<T: Transport>(
        &self,
        transport: &T,
        wanted: FileRead<'_>,
        only_if_ready: bool,
    ) -> FsResult<Option<Vec<(u64, Block)>>> {
        let FileRead { ino, path, offset, size } = wanted;
        if size == 0 {
            return Ok(None);
        }
        let first = offset / CHUNK;
        let last = (offset + size as u64 - 1) / CHUNK;
        let mut inodes = self.inodes.lock().unwrap();
        let state = inodes.entry(ino).or_default();
        let arrived = |index| state.blocks.get(&index).is_some_and(|block: &Block| matches!(block.peek(), Some(Ok(_))));
        if only_if_ready && !(first..=last).all(arrived) {
            return Ok(None);
        }
        // The kernel's own read-ahead sends reads slightly out of order.
        // A first read at offset 0 is not yet a run: most files are
        // small, and fetching past their end would cost a round trip.
        let sequential = offset > 0 && offset.abs_diff(state.next_offset) <= 2 * CHUNK;
        state.window = if sequential { (state.window * 2).clamp(1, MAX_WINDOW_BLOCKS) } else { 0 };
        let end = offset + size as u64;
        state.next_offset = if sequential { state.next_offset.max(end) } else { end };
        state.blocks.retain(|&index, _| index + 1 >= first && index <= last + MAX_WINDOW_BLOCKS);
        let mut needed = Vec::new();
        for index in first..=last {
            let block = match state.blocks.get(&index) {
                Some(block) => block.clone(),
                None => {
                    let block = fetch(transport, path, index, sequential)?;
                    state.blocks.insert(index, block.clone());
                    block
                }
            };
            needed.push((index, block));
        }
        for index in last + 1..=last + state.window {
            if let std::collections::btree_map::Entry::Vacant(slot) = state.blocks.entry(index) {
                let block = fetch(transport, path, index, true)?;
                slot.insert(block.clone());
                // Drive the fetch now; its result waits in the cache.
                tokio::spawn(async move {
                    let _ = block.await;
                });
            }
        }
        Ok(Some(needed))
    }
}

/// The bytes of `offset..offset + size` out of consecutive blocks; shorter
/// when a block ends the file. Within one block, that block's range.
fn assemble(blocks: &[(u64, Arc<Vec<u8>>)], FileRead { offset, size, .. }: FileRead) -> FileBytes {
    let end = offset + size as u64;
    let within_block = |(index, data): &(u64, Arc<Vec<u8>>)| {
        let block_start = index * CHUNK;
        let from = (offset.max(block_start) - block_start) as usize;
        (from, ((end - block_start) as usize).min(data.len()), data.len() < CHUNK_SIZE)
    };
    if let [block] = blocks {
        let (from, to, _) = within_block(block);
        return FileBytes::shared(block.1.clone(), from..to.max(from));
    }
    let mut out = Vec::with_capacity(size as usize);
    for block in blocks {
        let (from, to, ends_file) = within_block(block);
        if from < to {
            out.extend_from_slice(&block.1[from..to]);
        }
        if ends_file {
            break;
        }
    }
    out.into()
}
