//! File data read from the storage nodes, in aligned blocks of
//! `READ_BLOCK_SIZE`, with read-ahead on sequential access.
//!
//! The kernel asks for at most 128 KiB at a time; one request per kernel
//! read would pay a Kafka round trip for every 128 KiB. Instead each read
//! fetches whole blocks (960 KiB; a written chunk is four), and a run of sequential
//! reads fetches the next blocks ahead of time with a window that doubles up to
//! [`MAX_WINDOW_BLOCKS`]. Random access fetches only what it touches.
//! Blocks of a sequential run may come straight from the request log
//! (`logread`): one `LocateInLog` asks where a group of
//! [`LOCATE_GROUP_BLOCKS`] blocks is, so a streaming reader pays one small
//! request per group rather than per block, and blocks the log does not
//! hold are read plainly. A read whose blocks have all arrived is answered without
//! waiting ([`ReadCache::read_ready`]), and within one block it shares the
//! block's buffer ([`FileBytes`]), which for a block from the log is the
//! decoded chunk itself.
//!
//! Guarantees: a block is fetched at most once while cached (concurrent
//! readers share one request); per inode at most `MAX_WINDOW_BLOCKS + 2`
//! blocks are held; [`ReadCache::forget`] drops an inode's blocks and
//! their locations, which the core does on open, write, truncate, forget
//! and change events. A block from the log waits at most two deadlines:
//! its group's location, then the fetch with its fallback.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};

use dfos_protocol::limits::READ_BLOCK_SIZE;
use dfos_protocol::{LogLocation, Payload, Request};

use crate::file_bytes::FileBytes;
use crate::fs::{FsError, FsResult};
use crate::rpc::{Fetched, RpcError, Transport};

/// Blocks fetched ahead of a sequential reader: 16 × 960 KiB = 15 MiB.
pub const MAX_WINDOW_BLOCKS: u64 = 16;
const BLOCK: u64 = READ_BLOCK_SIZE as u64;

/// Blocks one `LocateInLog` covers: 8 × 960 KiB = 7.5 MiB.
pub const LOCATE_GROUP_BLOCKS: u64 = 8;

type Block = Shared<BoxFuture<'static, FsResult<FileBytes>>>;
/// Where a group's bytes are in the log; `None` when the node could not
/// say (its blocks are then read plainly, and those reads report any error).
type Located = Shared<BoxFuture<'static, Option<Arc<GroupLocations>>>>;

/// A node's answer to `LocateInLog` for one group of blocks.
struct GroupLocations {
    run: Vec<LogLocation>,
    /// The file's size when the node answered.
    size: u64,
}

#[derive(Default)]
struct InodeBlocks {
    blocks: BTreeMap<u64, Block>,
    /// By group index (block index / [`LOCATE_GROUP_BLOCKS`]).
    located: BTreeMap<u64, Located>,
    /// Where a sequential reader is expected to continue.
    next_offset: u64,
    window: u64,
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

/// A block read plainly: its bytes come in the reply. Submitted now.
fn fetch_plainly<T: Transport>(transport: &T, path: &str, index: u64) -> FsResult<Block> {
    let pending = transport.submit(plain_read(path, index))?;
    Ok(async move { block_data(pending.await.map(Fetched::Reply)) }.boxed().shared())
}

/// A sequential reader's block: from the request log where its group's
/// locations cover it, which streams; plainly otherwise. (A lone read
/// would pay a seek of the log consumer, which costs more than having the
/// bytes in the reply, so only sequential runs come here.)
fn fetch_sequential<T: Transport>(transport: &T, path: &str, index: u64, located: Located) -> Block {
    let (transport, path) = (transport.clone(), path.to_owned());
    async move {
        let plain = plain_read(&path, index);
        let fetched = match located.await.as_deref().and_then(|g| block_source(&g.run, g.size, index)) {
            Some(BlockSource::PastEnd) => return Ok(Vec::new().into()),
            Some(BlockSource::Log(location)) => transport.read_logged(location, plain)?.await,
            None => transport.submit(plain)?.await.map(Fetched::Reply),
        };
        block_data(fetched)
    }
    .boxed()
    .shared()
}

/// Asks where the blocks of group `group` are in the log. Submitted now.
fn locate<T: Transport>(transport: &T, path: &str, group: u64) -> Located {
    let request = Request::LocateInLog {
        path: path.to_owned(),
        offset: group * LOCATE_GROUP_BLOCKS * BLOCK,
        len: LOCATE_GROUP_BLOCKS * BLOCK,
    };
    let pending = transport.submit(request);
    async move {
        match pending.ok()?.await {
            Ok(Payload::Located { locations, size }) => Some(Arc::new(GroupLocations { run: locations, size })),
            _ => None,
        }
    }
    .boxed()
    .shared()
}

fn plain_read(path: &str, index: u64) -> Request {
    Request::Read { path: path.to_owned(), offset: index * BLOCK, len: READ_BLOCK_SIZE as u32 }
}

fn block_data(fetched: Result<Fetched, RpcError>) -> FsResult<FileBytes> {
    match fetched {
        Ok(Fetched::Logged(bytes)) => Ok(bytes),
        Ok(Fetched::Reply(Payload::Data(data))) => Ok(data.into()),
        Ok(Fetched::Reply(_)) => Err(FsError::UnexpectedReply),
        Err(e) => Err(FsError::from(e)),
    }
}

#[derive(Debug, PartialEq)]
enum BlockSource {
    /// The block starts at or past the end of the file: it is empty.
    PastEnd,
    Log(LogLocation),
}

/// Where block `index` is, given a group's `run` of locations and the
/// file's `size`: one location must hold the whole block (up to the end of
/// the file). `None`: the block is read plainly.
fn block_source(run: &[LogLocation], size: u64, index: u64) -> Option<BlockSource> {
    let start = index * BLOCK;
    if start >= size {
        return Some(BlockSource::PastEnd);
    }
    let end = (start + BLOCK).min(size);
    let location = run.iter().find(|l| {
        let from = l.file_offset + l.skip as u64;
        from <= start && start < from + l.len as u64
    })?;
    let from = location.file_offset + location.skip as u64;
    if from + (location.len as u64) < end {
        return None;
    }
    let skip = location.skip + (start - from) as u32;
    Some(BlockSource::Log(LogLocation { skip, len: (end - start) as u32, ..location.clone() }))
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
        let blocks: Option<Vec<(u64, FileBytes)>> =
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
        let first = offset / BLOCK;
        let last = (offset + size as u64 - 1) / BLOCK;
        let mut inodes = self.inodes.lock().unwrap();
        let state = inodes.entry(ino).or_default();
        let arrived = |index| state.blocks.get(&index).is_some_and(|block: &Block| matches!(block.peek(), Some(Ok(_))));
        if only_if_ready && !(first..=last).all(arrived) {
            return Ok(None);
        }
        // The kernel's own read-ahead sends reads slightly out of order.
        // A first read at offset 0 is not yet a run: most files are
        // small, and fetching past their end would cost a round trip.
        let sequential = offset > 0 && offset.abs_diff(state.next_offset) <= 2 * BLOCK;
        state.window = if sequential { (state.window * 2).clamp(1, MAX_WINDOW_BLOCKS) } else { 0 };
        let end = offset + size as u64;
        state.next_offset = if sequential { state.next_offset.max(end) } else { end };
        state.blocks.retain(|&index, _| index + 1 >= first && index <= last + MAX_WINDOW_BLOCKS);
        let groups =
            (first.saturating_sub(1) / LOCATE_GROUP_BLOCKS)..=((last + MAX_WINDOW_BLOCKS) / LOCATE_GROUP_BLOCKS);
        state.located.retain(|group, _| groups.contains(group));
        let fetch = |state: &mut InodeBlocks, index: u64, sequential: bool| -> FsResult<Block> {
            if !sequential {
                return fetch_plainly(transport, path, index);
            }
            let group = index / LOCATE_GROUP_BLOCKS;
            let located = state.located.entry(group).or_insert_with(|| locate(transport, path, group)).clone();
            Ok(fetch_sequential(transport, path, index, located))
        };
        let mut needed = Vec::new();
        for index in first..=last {
            let block = match state.blocks.get(&index) {
                Some(block) => block.clone(),
                None => {
                    let block = fetch(state, index, sequential)?;
                    state.blocks.insert(index, block.clone());
                    block
                }
            };
            needed.push((index, block));
        }
        for index in last + 1..=last + state.window {
            if !state.blocks.contains_key(&index) {
                let block = fetch(state, index, true)?;
                state.blocks.insert(index, block.clone());
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
fn assemble(blocks: &[(u64, FileBytes)], FileRead { offset, size, .. }: FileRead) -> FileBytes {
    let end = offset + size as u64;
    let within_block = |(index, data): &(u64, FileBytes)| {
        let block_start = index * BLOCK;
        let from = (offset.max(block_start) - block_start) as usize;
        (from, ((end - block_start) as usize).min(data.len()), data.len() < READ_BLOCK_SIZE)
    };
    if let [block] = blocks {
        let (from, to, _) = within_block(block);
        return block.1.slice(from..to.max(from));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(file_offset: u64, skip: u32, len: u32) -> LogLocation {
        LogLocation { partition: 0, offset: file_offset as i64, request_id: 1, file_offset, skip, len }
    }

    #[test]
    fn a_block_comes_from_the_log_only_when_one_location_holds_all_of_it() {
        let c = BLOCK as u32;
        // Two whole blocks, then half a block written last.
        let run = [at(0, 0, c), at(BLOCK, 0, c), at(2 * BLOCK, 0, c / 2)];
        let size = 2 * BLOCK + BLOCK / 2;
        assert_eq!(block_source(&run, size, 1), Some(BlockSource::Log(at(BLOCK, 0, c))));
        assert_eq!(block_source(&run, size, 2), Some(BlockSource::Log(at(2 * BLOCK, 0, c / 2))));
        assert_eq!(block_source(&run, size, 3), Some(BlockSource::PastEnd));
        // A write that straddles blocks serves the part in each block.
        let straddling = [at(100, 0, c)];
        assert_eq!(block_source(&straddling, 4 * BLOCK, 0), None);
        let tail = block_source(&[at(100, 0, c), at(BLOCK + 100, 0, c)], 4 * BLOCK, 1);
        assert_eq!(tail, None, "block 1 spans two writes");
        let inner = [at(0, 0, 2 * c)];
        assert_eq!(block_source(&inner, 2 * BLOCK, 1), Some(BlockSource::Log(at(0, c, c))));
        // A run that stops short, or does not reach the block: plainly.
        assert_eq!(block_source(&[at(0, 0, c - 1)], 2 * BLOCK, 0), None);
        assert_eq!(block_source(&[], 2 * BLOCK, 1), None);
    }
}
