//! The filesystem core: POSIX-shaped operations on inode numbers, carried
//! out as protocol requests through a [`Transport`]. No kernel types here,
//! so everything can be tested against an in-process store.
//!
//! Guarantees:
//! - `flush`, `release` and `fsync` return only after every byte written
//!   through the inode (and a create that went behind) has been applied
//!   by a storage node, and report any error;
//! - what this mount caches about names, attributes and small files is
//!   updated by its own changes and dropped by other mounts' change events
//!   (`remote_change`), within the TTL at the latest (docs/SEMANTICS.md);
//! - requests that go behind (exclusive create, mkdir, unlink, rmdir of
//!   names the cache knows) are queued before anything that follows, so
//!   every replica applies them first; they may wait a moment to travel
//!   with what follows ([`Transport::submit_behind`]);
//! - writes are buffered per inode into chunks of at most `CHUNK_SIZE` and
//!   up to `MAX_CHUNKS_IN_FLIGHT` full chunks travel at once on the whole
//!   mount, so memory is bounded whatever the file size;
//! - a write error is reported by the next write, flush, fsync or close of
//!   that inode (as NFS does), never lost;
//! - operations that read a file's size or bytes first flush its buffered
//!   writes, so a mount always sees its own writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dfos_protocol::limits::{CHUNK_SIZE, MAX_COPY_BYTES};
use dfos_protocol::{
    is_user_xattr, AllocateMode, Change, DirEntry, ErrorCode, FileAttr, FileContent, FsStats, Payload, RenameMode,
    Request, SetTime, Timestamp, XattrMode, APPEND_AT_END,
};
use tokio::sync::Semaphore;

use crate::batch::MAX_WRITE_WITH_CREATE_BYTES;
use crate::chunk::Chunk;
use crate::file_bytes::FileBytes;
use crate::inodes::{self, InodeTable};
use crate::metacache::MetaCache;
use crate::prefetch::{self, Prefetcher};
use crate::readahead::{FileRead, ReadCache};
use crate::rpc::{PendingReply, RpcError, Transport};
use crate::smallfiles::{SmallFiles, MAX_FILE_BYTES};

/// Requests of one inode's write stream in flight at once (chunks, and
/// requests queued behind them).
pub const MAX_WRITES_IN_FLIGHT: u32 = 8;

/// Full chunks in flight at once on the whole mount: 4 × 3.75 MiB = 15 MiB.
/// Below the 5 produce requests an idempotent librdkafka producer keeps
/// unacknowledged per partition: a message beyond those waits in its queue,
/// and while one waits its broker thread does not sleep (linger 0 sets the
/// next wake-up to now). With 8 chunks of one file in flight, that spinning
/// took 0.6-2.3 CPU-seconds per GiB written from mountd's two cores; at 4 a
/// GiB costs mountd ~0.65 CPU-s in all. The slot left over serves the
/// mount's other requests without queueing.
pub const MAX_CHUNKS_IN_FLIGHT: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The inode was forgotten, unlinked or replaced.
    #[error("stale inode {0}")]
    Stale(u64),
    #[error("file name is not valid UTF-8")]
    BadName,
    #[error("storage daemon sent an unexpected reply")]
    UnexpectedReply,
    #[error("unknown handle {0}")]
    BadHandle(u64),
}

impl From<ErrorCode> for FsError {
    fn from(code: ErrorCode) -> Self {
        FsError::Rpc(RpcError::Remote(code))
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// An open file's handle, and how the kernel may cache its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub handle: u64,
    /// The pages the kernel cached may stay: the file is at the version
    /// it had when last opened, by what this mount knows now (attributes
    /// follow the rules of the attribute cache: events from other mounts
    /// drop them).
    pub keep_cache: bool,
    /// Reads and writes bypass the kernel's page cache: the file has other
    /// names, each its own kernel inode here, and the kernel would cut a
    /// read at the size it last saw under this name, missing what was
    /// written through another one.
    pub uncached: bool,
}

/// Paths in another user's tree, reached through `.shared`: the owner's
/// grants may refuse any change there, so a change is never answered
/// before a storage node has accepted it (a refusal acknowledged early
/// would be lost: `rm` and `mkdir` have no later call to report it in).
fn grants_may_refuse(path: &str) -> bool {
    dfos_protocol::sharing::split_shared(path).is_some()
}

/// Something the kernel cached that a remote change made stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    Entry { parent: u64, name: String },
    Inode(u64),
}

/// A file or directory as the kernel sees it: number plus attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub ino: u64,
    pub attr: FileAttr,
}

/// Where a write's bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// At the offset given.
    AtOffset,
    /// At the end the file has when a storage node applies them (a handle
    /// opened with `O_APPEND`), so that appends from several mounts never
    /// overwrite each other. The offset given only keeps this mount's own
    /// appends in order.
    AtEnd,
}

/// Bytes written to one inode but not yet sent: at most one chunk's worth,
/// starting at `offset`, all placed alike.
struct WriteBuffer {
    offset: u64,
    data: Chunk,
    placement: Placement,
}

impl WriteBuffer {
    /// Appends the front of `data` that fits in the chunk being gathered.
    /// Returns the rest, and the chunk with its offset once it is full.
    fn fill<'a>(&mut self, data: &'a [u8]) -> (&'a [u8], Option<(u64, Chunk)>) {
        let (now, rest) = data.split_at(data.len().min(CHUNK_SIZE - self.data.len()));
        self.data.extend(now);
        if self.data.len() < CHUNK_SIZE {
            return (rest, None);
        }
        let chunk = std::mem::take(&mut self.data);
        let offset = self.wire_offset();
        self.offset += CHUNK_SIZE as u64;
        (rest, Some((offset, chunk)))
    }

    /// The offset the buffered bytes travel with.
    fn wire_offset(&self) -> u64 {
        match self.placement {
            Placement::AtOffset => self.offset,
            Placement::AtEnd => APPEND_AT_END,
        }
    }

    /// Whether a write of `len` bytes at `offset` placed so carries on
    /// from the buffered bytes. An append that would straddle the end of
    /// the chunk does not: a chunk is what lands whole, and another
    /// mount's appends may fall between two.
    fn continues(&self, offset: u64, placement: Placement, len: usize) -> bool {
        let splits_an_append = placement == Placement::AtEnd && self.data.len() + len > CHUNK_SIZE && len <= CHUNK_SIZE;
        self.offset + self.data.len() as u64 == offset && self.placement == placement && !splits_an_append
    }

    /// Starts gathering at `offset`, once the buffer is empty.
    fn start_if_empty(&mut self, offset: u64, placement: Placement) {
        if self.data.is_empty() {
            self.offset = offset;
            self.placement = placement;
        }
    }
}

/// Whether a chunk is sent at once, or may wait a moment for the request
/// that follows it (`Transport::submit_behind`).
#[derive(Clone, Copy)]
enum Travel {
    Now,
    Behind,
}

struct WriteStream {
    buffer: tokio::sync::Mutex<WriteBuffer>,
    in_flight: Arc<Semaphore>,
    /// The mount's budget of full chunks in flight, shared by every stream.
    chunks_in_flight: Arc<Semaphore>,
    error: Arc<Mutex<Option<FsError>>>,
    /// The exclusive create this mount answered before the node did, until
    /// the node's answer is read ([`WriteStream::confirm_create`]).
    create: Mutex<Option<UnconfirmedCreate>>,
    /// Sequence number of the last chunk sent, and the file's attributes
    /// as that chunk's reply reported them: the state after every write.
    sent: Arc<std::sync::atomic::AtomicU64>,
    last_attr: Arc<Mutex<Option<FileAttr>>>,
    /// The whole file as written, while it is known: from a create or a
    /// truncate to zero, through writes within the first 64 KiB.
    shadow: Mutex<Option<Vec<u8>>>,
    /// The end of the file for appends, as a storage node told it at the
    /// last `open(O_APPEND)` and this mount's writes moved it since.
    append_end: Mutex<Option<u64>>,
    /// What the node will report of the file once everything sent through
    /// this stream is applied, while this mount can tell: from the create
    /// of an empty file to the close after it.
    predicted: Mutex<Option<Predicted>>,
}

/// What a setattr asks to change; `None` leaves it as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttrChange {
    pub size: Option<u64>,
    pub mode: Option<u32>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

impl AttrChange {
    /// Nothing dfos keeps (a chown, say).
    fn is_empty(&self) -> bool {
        *self == AttrChange::default()
    }
}

/// A file's attributes as this mount foresees them.
struct Predicted {
    attr: FileAttr,
    /// The mtime was set explicitly after the last write, so it is the one
    /// the node will keep (a write takes the time of its batch's message).
    mtime_exact: bool,
}

/// An exclusive create that went behind. Until its answer comes, the
/// stream's requests travel only in the create's message (whose later
/// requests the node refuses if it refuses the create) or wait for that
/// answer: if another mount made the name first, nothing of this one's
/// lands in that mount's file.
struct UnconfirmedCreate {
    leader: crate::rpc::Leader,
    /// `None` until the answer: `Ok` made, `Err` refused.
    outcome: tokio::sync::watch::Receiver<Option<FsResult<()>>>,
}

/// Where a stream stands with its exclusive create.
enum CreateGate {
    /// Made, or none was pending: requests go as they come.
    Open,
    /// Not answered yet: requests join its message, or wait for the
    /// answer on this receiver.
    Held(crate::rpc::Leader, tokio::sync::watch::Receiver<Option<FsResult<()>>>),
    /// Refused: nothing more of this stream may be sent.
    Refused(FsError),
}

/// What [`WriteStream::join_create`] did with a stream's next requests.
enum Joining {
    /// No create to wait for: send them as usual (`then` given back).
    Free(Option<Request>),
    /// In the create's message: the replies of the buffered bytes and of
    /// `then`, for those there were.
    Joined { write: Option<PendingReply>, then: Option<PendingReply> },
    /// The create's answer must come first (`then` given back, the buffer
    /// as it was).
    Wait(Option<Request>),
}

/// Holds a place in a stream's in-flight requests (and, for a full chunk,
/// in the mount's chunk budget) until the request's reply.
struct Slot {
    _stream: tokio::sync::OwnedSemaphorePermit,
    _chunk: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl WriteStream {
    fn new(chunks_in_flight: Arc<Semaphore>) -> Self {
        WriteStream {
            buffer: tokio::sync::Mutex::new(WriteBuffer {
                offset: 0,
                data: Chunk::default(),
                placement: Placement::AtOffset,
            }),
            in_flight: Arc::new(Semaphore::new(MAX_WRITES_IN_FLIGHT as usize)),
            chunks_in_flight,
            error: Arc::new(Mutex::new(None)),
            create: Mutex::new(None),
            sent: Arc::new(AtomicU64::new(0)),
            last_attr: Arc::new(Mutex::new(None)),
            shadow: Mutex::new(None),
            append_end: Mutex::new(None),
            predicted: Mutex::new(None),
        }
    }

    fn take_error(&self) -> FsResult<()> {
        self.error.lock().unwrap().take().map_or(Ok(()), Err)
    }

    /// One of the in-flight slots, if free now.
    fn try_slot(&self) -> Option<Slot> {
        let stream = self.in_flight.clone().try_acquire_owned().ok()?;
        Some(Slot { _stream: stream, _chunk: None })
    }

    /// Slots for `count` full chunks, if the stream and the mount's chunk
    /// budget both have them free now (none taken otherwise).
    fn try_chunk_slots(&self, count: usize) -> Option<Vec<Slot>> {
        let mut slots = self.try_slots(count)?;
        for slot in &mut slots {
            slot._chunk = Some(self.chunks_in_flight.clone().try_acquire_owned().ok()?);
        }
        Some(slots)
    }

    /// `count` in-flight slots, if that many are free now (none taken
    /// otherwise).
    fn try_slots(&self, count: usize) -> Option<Vec<Slot>> {
        let slots: Vec<_> = (0..count).map_while(|_| self.try_slot()).collect();
        (slots.len() == count).then_some(slots)
    }

    /// Makes the next flush wait for `reply` (holding `slot` until it
    /// comes) and report its error.
    fn track(&self, slot: Slot, reply: crate::rpc::PendingReply) {
        let permit = slot;
        let error = self.error.clone();
        tokio::spawn(async move {
            if let Err(e) = reply.await {
                *error.lock().unwrap() = Some(e.into());
            }
            drop(permit);
        });
    }

    /// Like [`WriteStream::track`], for the exclusive create that went
    /// behind as `leader`: until its reply the stream's requests join its
    /// message or wait (see [`UnconfirmedCreate`]). `refused` runs once if
    /// the node refuses it.
    fn track_create(
        &self,
        slot: Slot,
        leader: crate::rpc::Leader,
        reply: PendingReply,
        refused: impl FnOnce() + Send + 'static,
    ) {
        let (outcome, watch) = tokio::sync::watch::channel(None);
        *self.create.lock().unwrap() = Some(UnconfirmedCreate { leader, outcome: watch });
        let error = self.error.clone();
        tokio::spawn(async move {
            let result = reply.await.map(|_| ()).map_err(FsError::from);
            if let Err(e) = &result {
                *error.lock().unwrap() = Some(e.clone());
            }
            let was_refused = result.is_err();
            // First the refusal, then the detaching: an operation between
            // the two hears of the refusal either way.
            outcome.send_replace(Some(result));
            if was_refused {
                refused();
            }
            drop(slot);
        });
    }

    fn create_gate(&self) -> CreateGate {
        let mut create = self.create.lock().unwrap();
        let Some(pending) = create.as_ref() else {
            return CreateGate::Open;
        };
        let outcome = pending.outcome.borrow().clone();
        match outcome {
            None => CreateGate::Held(pending.leader, pending.outcome.clone()),
            Some(Ok(())) => {
                *create = None;
                CreateGate::Open
            }
            Some(Err(e)) => CreateGate::Refused(e),
        }
    }

    /// Waits, if the stream's exclusive create is not answered yet, for
    /// that answer (sending it at once); its refusal is this stream's
    /// error from then on.
    async fn confirm_create<T: Transport>(&self, transport: &T) -> FsResult<()> {
        loop {
            let mut outcome = match self.create_gate() {
                CreateGate::Open => return Ok(()),
                CreateGate::Refused(e) => return Err(e),
                CreateGate::Held(_, outcome) => outcome,
            };
            transport.send_held();
            if outcome.wait_for(Option::is_some).await.is_err() {
                return Err(FsError::Rpc(RpcError::Timeout));
            }
        }
    }

    /// An in-flight slot, once one is free.
    async fn slot(&self) -> Slot {
        let stream = self.in_flight.clone().acquire_owned().await.expect("semaphore never closed");
        Slot { _stream: stream, _chunk: None }
    }

    /// A slot for a full chunk, once the stream and the mount's chunk
    /// budget both have one. (A stream's slots are only ever waited for
    /// before the mount's, and the mount's come back with replies, so no
    /// two streams wait for each other.)
    async fn chunk_slot(&self) -> Slot {
        let stream = self.in_flight.clone().acquire_owned().await.expect("semaphore never closed");
        let chunk = self.chunks_in_flight.clone().acquire_owned().await.expect("semaphore never closed");
        Slot { _stream: stream, _chunk: Some(chunk) }
    }

    /// Sends one chunk holding `slot` until its reply; `Travel::Behind`
    /// when a request the caller waits for follows it at once. The request
    /// is enqueued before this returns (while the caller holds the buffer
    /// lock), so chunks reach the log in order.
    fn send<T: Transport>(
        &self,
        slot: Slot,
        transport: &T,
        path: &str,
        offset: u64,
        data: Chunk,
        travel: Travel,
    ) -> FsResult<()> {
        let reply = match travel {
            Travel::Now => transport.submit_write(path, offset, data)?,
            Travel::Behind => transport.submit_write_behind(path, offset, data)?,
        };
        self.watch_write(slot, reply);
        Ok(())
    }

    /// Holds `slot` until the reply of a write this stream sent, and keeps
    /// what it reports.
    fn watch_write(&self, slot: Slot, reply: PendingReply) {
        let seq = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
        let (error, sent, last_attr) = (self.error.clone(), self.sent.clone(), self.last_attr.clone());
        tokio::spawn(async move {
            match reply.await {
                Ok(Payload::Written { attr }) => {
                    // Chunks are applied in order, so the newest chunk's
                    // reply describes the file after all of them.
                    let mut last = last_attr.lock().unwrap();
                    if sent.load(Ordering::SeqCst) == seq {
                        *last = Some(attr);
                    }
                }
                Ok(_) => *error.lock().unwrap() = Some(FsError::UnexpectedReply),
                Err(e) => *error.lock().unwrap() = Some(e.into()),
            }
            drop(slot);
        });
    }

    /// While the stream's exclusive create may be unanswered, enqueues the
    /// buffered bytes (when small) and `then` in the create's message,
    /// sent at once when `now`. The buffer is emptied only when they went.
    fn join_create<T: Transport>(
        &self,
        transport: &T,
        path: &str,
        buffer: &mut WriteBuffer,
        then: Option<Request>,
        now: bool,
    ) -> FsResult<Joining> {
        let leader = match self.create_gate() {
            CreateGate::Open => return Ok(Joining::Free(then)),
            CreateGate::Refused(e) => return Err(e),
            CreateGate::Held(leader, _) => leader,
        };
        if buffer.data.len() > MAX_WRITE_WITH_CREATE_BYTES {
            return Ok(Joining::Wait(then));
        }
        let write = (!buffer.data.is_empty()).then(|| Request::Write {
            path: path.to_owned(),
            offset: buffer.wire_offset(),
            data: std::mem::take(&mut buffer.data).into_data(),
        });
        // `then`, when given, is the last of the requests and of the replies.
        let with_then = then.is_some();
        let requests: Vec<Request> = write.into_iter().chain(then).collect();
        match transport.submit_with(leader, requests, now) {
            Ok(mut replies) => {
                let then = if with_then { replies.pop() } else { None };
                Ok(Joining::Joined { write: replies.pop(), then })
            }
            Err(mut requests) => {
                let then = if with_then { requests.pop() } else { None };
                if let Some(Request::Write { data, .. }) = requests.pop() {
                    buffer.data = Chunk::plain(data);
                }
                Ok(Joining::Wait(then))
            }
        }
    }

    /// Keeps the shadow and the prediction up to date with a write, or
    /// ends them when the node decides where the bytes go.
    fn shadow_write(&self, offset: u64, data: &[u8], placement: Placement) {
        if placement == Placement::AtEnd {
            *self.predicted.lock().unwrap() = None;
            *self.shadow.lock().unwrap() = None;
            return;
        }
        if let Some(predicted) = self.predicted.lock().unwrap().as_mut() {
            let attr = &mut predicted.attr;
            attr.size = attr.size.max(offset + data.len() as u64);
            attr.blocks = attr.size.div_ceil(4096) * 8;
            predicted.mtime_exact = false;
        }
        let mut shadow = self.shadow.lock().unwrap();
        let end = offset as usize + data.len();
        match shadow.as_mut() {
            Some(content) if end <= MAX_FILE_BYTES => {
                if content.len() < end {
                    content.resize(end, 0);
                }
                content[offset as usize..end].copy_from_slice(data);
            }
            _ => *shadow = None,
        }
    }

    /// Buffers `data` and sends the chunks it fills, when that needs no
    /// waiting: the buffer is free, the write continues it, and there is an
    /// in-flight slot for every chunk. `None` leaves it to `write`. Runs on
    /// the caller's thread inside a tokio runtime context, and copies `data`
    /// once, into the chunk that carries it.
    fn write_now<T: Transport>(
        &self,
        transport: &T,
        path: &str,
        (offset, placement): (u64, Placement),
        data: &[u8],
    ) -> Option<FsResult<()>> {
        let mut buffer = self.buffer.try_lock().ok()?;
        let contiguous = buffer.data.is_empty() || buffer.continues(offset, placement, data.len());
        if !contiguous {
            return None;
        }
        let chunks = (buffer.data.len() + data.len()) / CHUNK_SIZE;
        if chunks > 0 && !matches!(self.create_gate(), CreateGate::Open) {
            return None;
        }
        let slots = self.try_chunk_slots(chunks)?;
        if let Err(e) = self.take_error() {
            return Some(Err(e));
        }
        self.shadow_write(offset, data, placement);
        buffer.start_if_empty(offset, placement);
        let (mut rest, mut slots) = (data, slots.into_iter());
        while !rest.is_empty() {
            let full;
            (rest, full) = buffer.fill(rest);
            if let Some((chunk_offset, chunk)) = full {
                let slot = slots.next().expect("a slot was taken for every chunk");
                if let Err(e) = self.send(slot, transport, path, chunk_offset, chunk, Travel::Now) {
                    return Some(Err(e));
                }
            }
        }
        Some(Ok(()))
    }

    async fn write<T: Transport>(
        &self,
        transport: &T,
        path: &str,
        (offset, placement): (u64, Placement),
        data: &[u8],
    ) -> FsResult<()> {
        self.take_error()?;
        self.shadow_write(offset, data, placement);
        let mut buffer = self.buffer.lock().await;
        if !buffer.data.is_empty() && !buffer.continues(offset, placement, data.len()) {
            self.confirm_create(transport).await?;
            let pending = std::mem::take(&mut buffer.data);
            self.send(self.slot().await, transport, path, buffer.wire_offset(), pending, Travel::Now)?;
        }
        buffer.start_if_empty(offset, placement);
        let mut rest = data;
        while !rest.is_empty() {
            let full;
            (rest, full) = buffer.fill(rest);
            if let Some((chunk_offset, chunk)) = full {
                // A full chunk travels alone, never in the create's message.
                self.confirm_create(transport).await?;
                self.send(self.chunk_slot().await, transport, path, chunk_offset, chunk, Travel::Now)?;
            }
        }
        Ok(())
    }

    /// Sends what is buffered, then `then` (queued right behind the last
    /// chunk, so the node applies it after all of them, without waiting
    /// for their answers first), and waits until every chunk is
    /// acknowledged. Returns the file's attributes after the last write,
    /// when known, and the reply to `then`.
    async fn flush<T: Transport>(
        &self,
        transport: &T,
        path: &str,
        then: Option<Request>,
    ) -> FsResult<(Option<FileAttr>, Option<PendingReply>)> {
        let mut buffer = self.buffer.lock().await;
        let slot = if buffer.data.is_empty() { None } else { Some(self.slot().await) };
        let then = match self.join_create(transport, path, &mut buffer, then, true)? {
            Joining::Joined { write, then } => {
                if let (Some(slot), Some(write)) = (slot, write) {
                    self.watch_write(slot, write);
                }
                then
            }
            Joining::Free(then) | Joining::Wait(then) => {
                self.confirm_create(transport).await?;
                if let Some(slot) = slot {
                    let pending = std::mem::take(&mut buffer.data);
                    let travel = if then.is_some() { Travel::Behind } else { Travel::Now };
                    self.send(slot, transport, path, buffer.wire_offset(), pending, travel)?;
                }
                then.map(|request| transport.submit(request)).transpose()?
            }
        };
        if self.in_flight.available_permits() < MAX_WRITES_IN_FLIGHT as usize {
            // A create that went behind may still be held back for a batch.
            transport.send_held();
        }
        let all = self.in_flight.acquire_many(MAX_WRITES_IN_FLIGHT).await.expect("semaphore never closed");
        drop(all);
        self.take_error()?;
        Ok((self.last_attr.lock().unwrap().take(), then))
    }

    fn truncate_shadow(&self, size: u64) {
        if let Some(end) = self.append_end.lock().unwrap().as_mut() {
            *end = size;
        }
        let mut shadow = self.shadow.lock().unwrap();
        match shadow.as_mut() {
            _ if size == 0 => *shadow = Some(Vec::new()),
            Some(content) if size as usize <= MAX_FILE_BYTES => content.resize(size as usize, 0),
            _ => *shadow = None,
        }
    }

    /// Queues `request` behind this stream's buffered bytes, without
    /// waiting, when the stream has something its next flush must wait for
    /// (so that flush, at the latest the file's close, reports `request`'s
    /// error). `None`: nothing pending, a busy buffer, or no free slot.
    fn submit_behind_pending<T: Transport>(&self, transport: &T, path: &str, request: Request) -> Option<FsResult<()>> {
        if self.is_quiet() {
            return None;
        }
        let mut buffer = self.buffer.try_lock().ok()?;
        let needed = 1 + usize::from(!buffer.data.is_empty());
        let mut slots = self.try_slots(needed)?;
        if let Err(e) = self.take_error() {
            return Some(Err(e));
        }
        let request = match self.join_create(transport, path, &mut buffer, Some(request), false) {
            Err(e) => return Some(Err(e)),
            Ok(Joining::Wait(_)) => return None,
            Ok(Joining::Joined { write, then }) => {
                if let Some(write) = write {
                    self.watch_write(slots.pop().expect("a slot for the buffered bytes"), write);
                }
                self.after_chunks();
                self.track(slots.pop().expect("a slot for the request"), then.expect("the request joined"));
                return Some(Ok(()));
            }
            Ok(Joining::Free(request)) => request.expect("given back"),
        };
        if !buffer.data.is_empty() {
            let pending = std::mem::take(&mut buffer.data);
            let slot = slots.pop().expect("a slot for the buffered bytes");
            if let Err(e) = self.send(slot, transport, path, buffer.wire_offset(), pending, Travel::Behind) {
                return Some(Err(e));
            }
        }
        self.after_chunks();
        match transport.submit_behind(request) {
            Ok(reply) => {
                self.track(slots.pop().expect("a slot for the request"), reply);
                Some(Ok(()))
            }
            Err(e) => Some(Err(e.into())),
        }
    }

    /// A request that changes the file follows the chunks sent so far:
    /// none of their answers may stand for the file's attributes any more.
    fn after_chunks(&self) {
        let mut last = self.last_attr.lock().unwrap();
        self.sent.fetch_add(1, Ordering::SeqCst);
        *last = None;
    }

    /// Nothing buffered, in flight, failed or unreported: operations that
    /// would flush first can skip it. Never waits.
    fn is_quiet(&self) -> bool {
        self.in_flight.available_permits() == MAX_WRITES_IN_FLIGHT as usize
            && self.buffer.try_lock().is_ok_and(|b| b.data.is_empty())
            && self.error.lock().unwrap().is_none()
            && self.last_attr.lock().unwrap().is_none()
    }

    /// Ends shadowing: one create-or-truncate-to-close cycle at most, so a
    /// copy never outlives the writes it saw.
    fn take_shadow(&self) -> Option<Vec<u8>> {
        self.shadow.lock().unwrap().take()
    }
}

pub struct DfosFs<T: Transport> {
    transport: T,
    inodes: Arc<Mutex<InodeTable>>,
    writes: Mutex<HashMap<u64, Arc<WriteStream>>>,
    chunks_in_flight: Arc<Semaphore>,
    reads: ReadCache,
    small: Arc<SmallFiles>,
    prefetch: Prefetcher,
    meta: Arc<Mutex<MetaCache>>,
    /// Snapshot of a directory per open directory handle.
    dir_handles: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_handle: AtomicU64,
    /// Per file, its version when it was last opened. The kernel's cached
    /// pages of the file were read at that version (or written by this
    /// mount, which forgets the entry), so an open that finds the same
    /// version may keep them, as NFS does on close-to-open revalidation.
    opened_versions: Mutex<HashMap<u64, ContentVersion>>,
}

/// What changes whenever a file's contents do: size, mtime, and ctime
/// (which no client can set back).
pub type ContentVersion = (u64, Timestamp, Timestamp);

fn expect_attr(payload: Payload) -> FsResult<FileAttr> {
    match payload {
        Payload::Attr(attr) | Payload::Written { attr } => Ok(attr),
        _ => Err(FsError::UnexpectedReply),
    }
}

/// The attributes a storage node gives a file or directory it creates now
/// (up to the exact clock reading), for answers given before it does.
fn new_attr(kind: dfos_protocol::FileKind, mode: u32) -> FileAttr {
    let now = crate::rpc::now();
    let is_dir = kind == dfos_protocol::FileKind::Directory;
    FileAttr {
        kind,
        size: if is_dir { 4096 } else { 0 },
        mode: mode & 0o7777,
        nlink: if is_dir { 2 } else { 1 },
        atime: now,
        mtime: now,
        ctime: now,
        blocks: if is_dir { 8 } else { 0 },
        link: None,
    }
}

/// `name` as the protocol carries it (see `names.rs`).
fn wire_name(name: &std::ffi::OsStr) -> FsResult<std::borrow::Cow<'_, str>> {
    crate::names::to_wire(name).ok_or(FsError::BadName)
}

/// `name` if storage nodes keep such an extended attribute (`user.`);
/// `otherwise` if not: an attribute of another namespace is absent to
/// readers and unsupported to writers, as on a filesystem without it.
fn kept_xattr_name(name: &std::ffi::OsStr, otherwise: ErrorCode) -> FsResult<&str> {
    let name = name.to_str().ok_or(FsError::BadName)?;
    if is_user_xattr(name) {
        Ok(name)
    } else {
        Err(otherwise.into())
    }
}

/// How long this mount trusts what it cached about names and attributes
/// when no event says otherwise (see `metacache.rs`).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(10);

impl<T: Transport> DfosFs<T> {
    pub fn new(transport: T) -> Self {
        Self::with_cache_ttl(transport, DEFAULT_CACHE_TTL)
    }

    pub fn with_cache_ttl(transport: T, cache_ttl: Duration) -> Self {
        DfosFs {
            meta: Arc::new(Mutex::new(MetaCache::new(cache_ttl))),
            transport,
            inodes: Arc::default(),
            writes: Mutex::default(),
            chunks_in_flight: Arc::new(Semaphore::new(MAX_CHUNKS_IN_FLIGHT as usize)),
            reads: ReadCache::default(),
            small: Arc::default(),
            prefetch: Prefetcher::default(),
            dir_handles: Mutex::default(),
            next_handle: AtomicU64::new(1),
            opened_versions: Mutex::default(),
        }
    }

    async fn call(&self, request: Request) -> FsResult<Payload> {
        Ok(self.transport.submit(request)?.await?)
    }

    /// The current path of `ino`. A detached inode answers ENOENT, or
    /// the refusal of the exclusive create that made it.
    pub fn path_of(&self, ino: u64) -> FsResult<String> {
        let path = self.inodes.lock().unwrap().path(ino).map(str::to_owned);
        match path {
            Some(path) => Ok(path),
            None => match self.stream(ino).map(|stream| stream.create_gate()) {
                Some(CreateGate::Refused(e)) => Err(e),
                _ => Err(FsError::Stale(ino)),
            },
        }
    }

    fn child_path(&self, parent: u64, name: &std::ffi::OsStr) -> FsResult<String> {
        Ok(inodes::join(&self.path_of(parent)?, &wire_name(name)?))
    }

    fn remember(&self, path: &str, attr: FileAttr) -> Entry {
        Entry { ino: self.inodes.lock().unwrap().remember(path, attr.link), attr }
    }

    fn new_handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    /// What a refused exclusive create that went behind leaves undone:
    /// the name is someone else's file, so this mount's inode for it is
    /// detached (its operations fail from then on, a new lookup finds that
    /// file) and nothing cached of the path stands.
    fn forget_refused_create(&self, path: &str, ino: u64) -> impl FnOnce() + Send + 'static {
        let (inodes, meta, small, path) = (self.inodes.clone(), self.meta.clone(), self.small.clone(), path.to_owned());
        move || {
            log::info!("op=create path={path:?} ino={ino} refused after it was answered: the inode is detached");
            let mut inodes = inodes.lock().unwrap();
            if inodes.ino_of(&path) == Some(ino) {
                inodes.detach(&path);
            }
            drop(inodes);
            meta.lock().unwrap().invalidate(&path);
            small.forget(&path);
        }
    }

    fn stream_or_new(&self, ino: u64) -> Arc<WriteStream> {
        self.writes
            .lock()
            .unwrap()
            .entry(ino)
            .or_insert_with(|| Arc::new(WriteStream::new(self.chunks_in_flight.clone())))
            .clone()
    }

    fn stream(&self, ino: u64) -> Option<Arc<WriteStream>> {
        self.writes.lock().unwrap().get(&ino).cloned()
    }

    /// Forgets the file's blocks, and the version its kernel pages are of.
    fn drop_cached_data(&self, ino: u64) {
        self.reads.forget(ino);
        self.opened_versions.lock().unwrap().remove(&ino);
    }

    /// Makes buffered writes of `ino` visible on the server.
    pub async fn flush(&self, ino: u64) -> FsResult<()> {
        let Some(stream) = self.stream(ino) else {
            return Ok(());
        };
        let path = self.path_of(ino)?;
        self.flush_stream(&stream, &path, None).await.map(drop)
    }

    /// Flushes `stream`, with `then` queued behind its last chunk (see
    /// `WriteStream::flush`), and caches what the node reported.
    async fn flush_stream(
        &self,
        stream: &WriteStream,
        path: &str,
        then: Option<Request>,
    ) -> FsResult<Option<PendingReply>> {
        let (attr, then) = stream.flush(&self.transport, path, then).await?;
        // The open-write-close cycle the prediction and the shadow were for
        // ends here. After setattrs that went behind, no chunk's answer
        // speaks for the file, but an exact prediction does.
        let predicted = stream.predicted.lock().unwrap().take();
        let attr = attr.or_else(|| predicted.filter(|p| p.mtime_exact).map(|p| p.attr));
        let content = stream.take_shadow();
        if let Some(attr) = attr {
            if let Some(content) = content {
                self.small.put(path, &attr, content);
            }
            self.meta.lock().unwrap().put_attr(path, attr);
        }
        Ok(then)
    }

    /// Flushes the inode at `path`, if the kernel knows one.
    async fn flush_path(&self, path: &str) -> FsResult<()> {
        let ino = self.inodes.lock().unwrap().ino_of(path);
        match ino {
            Some(ino) => self.flush(ino).await,
            None => Ok(()),
        }
    }

    /// Flushes every inode at or below `path` (a renamed directory's files).
    async fn flush_tree(&self, path: &str) -> FsResult<()> {
        let inos: Vec<u64> = self.writes.lock().unwrap().keys().copied().collect();
        let prefix = format!("{path}/");
        for ino in inos {
            let inside = self.inodes.lock().unwrap().path(ino).is_some_and(|p| p == path || p.starts_with(&prefix));
            if inside {
                self.flush(ino).await?;
            }
        }
        Ok(())
    }

    /// True when `ino` has no writes to flush, known without waiting.
    fn quiet(&self, ino: u64) -> bool {
        self.stream(ino).is_none_or(|stream| stream.is_quiet())
    }

    fn quiet_path(&self, path: &str) -> bool {
        let ino = self.inodes.lock().unwrap().ino_of(path);
        ino.is_none_or(|ino| self.quiet(ino))
    }

    /// The whole content of `ino` as its last flush left it on the node,
    /// for the kernel's page cache, with the version it is: a small file
    /// this mount wrote from empty, quiet, with one name. `diff` or a
    /// compiler reading back what `cp` or an editor just closed then finds
    /// it in the kernel, without a FUSE read (write-only handles bypass the
    /// page cache, so nothing else would put it there).
    pub fn content_for_kernel(&self, ino: u64) -> Option<(Arc<Vec<u8>>, ContentVersion)> {
        if !self.quiet(ino) {
            return None;
        }
        let path = self.path_of(ino).ok()?;
        let attr = {
            let meta = self.meta.lock().unwrap();
            meta.attr(&path)
                .filter(|attr| attr.kind == dfos_protocol::FileKind::File && !meta.has_other_names(&path))?
        };
        let content = self.small.get(&path, &attr)?;
        Some((content, (attr.size, attr.mtime, attr.ctime)))
    }

    /// The kernel's pages of `ino` now hold `version` (given to it after
    /// [`DfosFs::content_for_kernel`]), so an open that finds the file at
    /// that version keeps them. False, and nothing recorded, if the file
    /// has changed since: the pages handed over are then older than it.
    #[must_use]
    pub fn kernel_holds(&self, ino: u64, version: ContentVersion) -> bool {
        let unchanged = self.content_for_kernel(ino).is_some_and(|(_, current)| current == version);
        if unchanged {
            self.opened_versions.lock().unwrap().insert(ino, version);
        }
        unchanged
    }

    // The `*_now` methods answer from the caches without waiting, so the
    // FUSE adapter can reply on its own thread; `None` means "take the
    // async path" (the answer needs a flush or a storage node).

    /// A flush (or release) with nothing buffered, in flight or to report:
    /// every close of a file only read, and the release after a close
    /// that flushed.
    pub fn flush_now(&self, ino: u64) -> Option<FsResult<()>> {
        if !self.quiet(ino) {
            return None;
        }
        if let Some(stream) = self.stream(ino) {
            // As in `flush_stream`: the cycle a prediction was for ends here.
            stream.predicted.lock().unwrap().take();
        }
        Some(Ok(()))
    }

    pub fn lookup_now(&self, parent: u64, name: &std::ffi::OsStr) -> Option<FsResult<Entry>> {
        let path = match self.child_path(parent, name) {
            Ok(path) => path,
            Err(e) => return Some(Err(e)),
        };
        if !self.quiet_path(&path) {
            return None;
        }
        let meta = self.meta.lock().unwrap();
        if let Some(attr) = meta.attr(&path) {
            drop(meta);
            return Some(Ok(self.remember(&path, attr)));
        }
        meta.known_absent(&path).then(|| Err(ErrorCode::NotFound.into()))
    }

    /// From the cache, or, while writes are pending, from the prediction
    /// when it is exact (after a `setattr_now`), as `tar` asks between
    /// setting a file's times and its mode.
    pub fn getattr_now(&self, ino: u64) -> Option<FsResult<FileAttr>> {
        if !self.quiet(ino) {
            let stream = self.stream(ino)?;
            let predicted = stream.predicted.lock().unwrap();
            return predicted.as_ref().filter(|p| p.mtime_exact).map(|p| Ok(p.attr.clone()));
        }
        match self.path_of(ino) {
            Ok(path) => self.meta.lock().unwrap().attr(&path).map(Ok),
            Err(e) => Some(Err(e)),
        }
    }

    pub fn read_now(&self, ino: u64, offset: u64, size: u32) -> Option<FsResult<FileBytes>> {
        if !self.quiet(ino) {
            return None;
        }
        let path = self.path_of(ino).ok()?;
        let current = self.meta.lock().unwrap().attr(&path);
        let Some(content) = current.and_then(|current| self.small.get(&path, &current)) else {
            return self.reads.read_ready(&self.transport, FileRead { ino, path: &path, offset, size });
        };
        let start = offset.min(content.len() as u64) as usize;
        Some(Ok(FileBytes::shared(content, start..start + size as usize)))
    }

    /// Unlinks a name the cache knows to be a regular file without waiting
    /// for a storage node (see `unlink`). Needs a tokio runtime context.
    pub fn unlink_now(&self, parent: u64, name: &std::ffi::OsStr) -> Option<FsResult<()>> {
        let path = match self.child_path(parent, name) {
            Ok(path) => path,
            Err(e) => return Some(Err(e)),
        };
        let known_file = self.meta.lock().unwrap().attr(&path).is_some_and(|a| a.kind == dfos_protocol::FileKind::File);
        if !known_file || !self.quiet_path(&path) || grants_may_refuse(&path) {
            return None;
        }
        // The name is known to be a file, so the unlink can only fail if
        // someone else removed it first (same end state) or the node's disk
        // fails. It is answered at once, like a local unlink that is not yet
        // in the journal, and applied in log order before anything this
        // mount does next.
        let reply = match self.transport.submit_behind(Request::Unlink { path: path.clone() }) {
            Ok(reply) => reply,
            Err(e) => return Some(Err(e.into())),
        };
        self.behind("unlink", &path, reply);
        self.unlinked(&path);
        Some(Ok(()))
    }

    fn unlinked(&self, path: &str) {
        self.meta.lock().unwrap().removed(path, false);
        self.small.forget(path);
        self.inodes.lock().unwrap().detach(path);
    }

    pub async fn lookup(&self, parent: u64, name: &std::ffi::OsStr) -> FsResult<Entry> {
        if let Some(done) = self.lookup_now(parent, name) {
            return done;
        }
        let path = self.child_path(parent, name)?;
        self.flush_path(&path).await?;
        let attr = self.attr_of_path(&path, true).await?;
        Ok(self.remember(&path, attr))
    }

    pub fn forget(&self, ino: u64, count: u64) {
        if self.inodes.lock().unwrap().forget(ino, count) {
            self.writes.lock().unwrap().remove(&ino);
            self.drop_cached_data(ino);
        }
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<FileAttr> {
        if let Some(done) = self.getattr_now(ino) {
            return done;
        }
        self.flush(ino).await?;
        let path = self.path_of(ino)?;
        self.attr_of_path(&path, false).await
    }

    /// Attributes from the cache when fresh, else from a storage node.
    async fn attr_of_path(&self, path: &str, lookup: bool) -> FsResult<FileAttr> {
        let generation = {
            let meta = self.meta.lock().unwrap();
            if let Some(attr) = meta.attr(path) {
                return Ok(attr);
            }
            if meta.known_absent(path) {
                return Err(ErrorCode::NotFound.into());
            }
            meta.generation()
        };
        let path = path.to_owned();
        let request =
            if lookup { Request::Lookup { path: path.clone() } } else { Request::GetAttr { path: path.clone() } };
        let attr = expect_attr(self.call(request).await?)?;
        self.meta.lock().unwrap().put_attr_if_unchanged(generation, &path, attr.clone());
        Ok(attr)
    }

    /// A chmod or a setting of explicit times on a file this mount is
    /// writing, as `tar` and `cp -a` do before closing each file
    /// they make, goes behind like an exclusive create: answered at once
    /// with the attributes the node will set, queued after the file's
    /// writes, its error reported by the file's flush, fsync or close.
    /// Only while those attributes are foreseeable (a file this mount
    /// created empty, until its close) and the mtime will be exact; a
    /// truncate, or times set to "now" (`touch`), ask the node. The
    /// ctime is this mount's clock until the node's is read. Needs a tokio
    /// runtime context.
    pub fn setattr_now(&self, ino: u64, change: AttrChange) -> Option<FsResult<FileAttr>> {
        let AttrChange { size, mode, atime, mtime } = change;
        if change.is_empty() {
            return self.getattr_now(ino);
        }
        let is_now = |t: &Option<SetTime>| matches!(t, Some(SetTime::Now));
        if size.is_some() || is_now(&atime) || is_now(&mtime) {
            return None;
        }
        let stream = self.stream(ino)?;
        // Held throughout, so a write on another thread lands before or after.
        let mut guard = stream.predicted.lock().unwrap();
        let predicted = guard.as_mut()?;
        let explicit_mtime = match mtime {
            Some(SetTime::At(t)) => Some(t),
            _ => None,
        };
        if explicit_mtime.is_none() && !predicted.mtime_exact {
            return None;
        }
        let path = self.path_of(ino).ok()?;
        let request = Request::SetAttr { path: path.clone(), size, mode, atime, mtime };
        if let Err(e) = stream.submit_behind_pending(&self.transport, &path, request)? {
            return Some(Err(e));
        }
        let attr = &mut predicted.attr;
        if let Some(mode) = mode {
            attr.mode = mode & 0o7777;
        }
        if let Some(SetTime::At(t)) = atime {
            attr.atime = t;
        }
        if let Some(t) = explicit_mtime {
            attr.mtime = t;
        }
        attr.ctime = crate::rpc::now();
        predicted.mtime_exact = true;
        let attr = predicted.attr.clone();
        drop(guard);
        self.drop_cached_data(ino);
        self.small.forget(&path);
        self.meta.lock().unwrap().put_attr(&path, attr.clone());
        Some(Ok(attr))
    }

    pub async fn setattr(&self, ino: u64, change: AttrChange) -> FsResult<FileAttr> {
        let AttrChange { size, mode, atime, mtime } = change;
        if change.is_empty() {
            return self.getattr(ino).await;
        }
        // A change that could not go behind only because the file's
        // exclusive create left without it goes behind once that create
        // is answered (`tar x` setting times and modes as it extracts).
        if let Some(stream) = self.stream(ino) {
            if matches!(stream.create_gate(), CreateGate::Held(..)) {
                stream.confirm_create(&self.transport).await?;
                if let Some(done) = self.setattr_now(ino, change) {
                    return done;
                }
            }
        }
        self.flush(ino).await?;
        self.drop_cached_data(ino);
        let path = self.path_of(ino)?;
        self.meta.lock().unwrap().drop_attr(&path);
        let attr = expect_attr(self.call(Request::SetAttr { path: path.clone(), size, mode, atime, mtime }).await?)?;
        self.small.forget(&path);
        if let Some(size) = size {
            self.stream_or_new(ino).truncate_shadow(size);
        }
        if size == Some(0) {
            // The node may have kept the old bytes in the trash.
            self.meta.lock().unwrap().trash_changed();
        }
        self.settled_attr(ino, &path, attr.clone());
        Ok(attr)
    }

    /// Reads the whole listing of a directory into a handle, so the kernel's
    /// paged readdir calls see one consistent snapshot.
    ///
    /// A directory opened inside one this mount holds the listing of is
    /// most likely a tool walking a tree (`find`, `du`, `cp -r`, `diff -r`),
    /// so it is asked for with the directories the walk goes on to (below
    /// it, then its later siblings), in one `Request::ReadTree`: they are
    /// then listed without a round trip each.
    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        let path = self.path_of(ino)?;
        let (known, generation, descending) = {
            let meta = self.meta.lock().unwrap();
            let descending = !path.is_empty() && meta.listed(inodes::parent_of(&path));
            (meta.listing(&path), meta.generation(), descending)
        };
        if let Some(known) = known {
            return Ok(self.dir_handle(known.into_iter().map(|(name, attr)| DirEntry { name, attr }).collect()));
        }
        let (mut entries, mut more) = (Vec::new(), true);
        if descending {
            let Payload::Tree(listings) = self.call(Request::ReadTree { path: path.clone() }).await? else {
                return Err(FsError::UnexpectedReply);
            };
            let mut listings = listings.into_iter();
            let first = listings.next().filter(|first| first.path == path).ok_or(FsError::UnexpectedReply)?;
            (entries, more) = (first.entries, first.more);
            let mut meta = self.meta.lock().unwrap();
            for below in listings {
                let named = below.entries.into_iter().map(|e| (e.name, e.attr));
                meta.put_listing_if_unchanged(generation, &below.path, named);
            }
        }
        while more {
            let after = entries.last().map(|e: &DirEntry| e.name.clone());
            let page = self.call(Request::ReadDir { path: path.clone(), after }).await?;
            let Payload::Entries { entries: page, more: page_more } = page else {
                return Err(FsError::UnexpectedReply);
            };
            more = page_more && !page.is_empty();
            entries.extend(page);
        }
        let named = entries.iter().map(|e| (e.name.clone(), e.attr.clone()));
        self.meta.lock().unwrap().put_listing_if_unchanged(generation, &path, named);
        Ok(self.dir_handle(entries))
    }

    fn dir_handle(&self, entries: Vec<DirEntry>) -> u64 {
        let handle = self.new_handle();
        self.dir_handles.lock().unwrap().insert(handle, Arc::new(entries));
        handle
    }

    pub fn listing(&self, handle: u64) -> FsResult<Arc<Vec<DirEntry>>> {
        self.dir_handles.lock().unwrap().get(&handle).cloned().ok_or(FsError::BadHandle(handle))
    }

    pub fn releasedir(&self, handle: u64) {
        self.dir_handles.lock().unwrap().remove(&handle);
    }

    /// Numbers for `.` and `..` of a directory, and each listed child
    /// counted as looked up (readdirplus hands them to the kernel).
    pub fn parent_ino(&self, ino: u64) -> u64 {
        let table = self.inodes.lock().unwrap();
        table
            .path(ino)
            .and_then(|p| if p.is_empty() { None } else { table.ino_of(inodes::parent_of(p)) })
            .unwrap_or(inodes::ROOT_INO)
    }

    pub fn remember_child(&self, parent: u64, name: &str, link: Option<u64>) -> FsResult<u64> {
        let path = inodes::join(&self.path_of(parent)?, name);
        Ok(self.inodes.lock().unwrap().remember(&path, link))
    }

    pub async fn create(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        mode: u32,
        exclusive: bool,
    ) -> FsResult<(Entry, u64)> {
        if let Some(done) = self.create_now(parent, name, mode, exclusive) {
            return done;
        }
        let path = self.child_path(parent, name)?;
        let surely_new = exclusive || self.meta.lock().unwrap().known_absent(&path);
        let attr = expect_attr(self.call(Request::Create { path: path.clone(), mode, exclusive }).await?)?;
        let mut meta = self.meta.lock().unwrap();
        if surely_new {
            meta.created(&path, attr.clone());
        } else {
            meta.created_or_opened(&path, attr.clone());
        }
        drop(meta);
        let entry = self.remember(&path, attr);
        Ok(self.opened_new(entry, &path))
    }

    /// A create of a name this mount knows to be free is answered at once,
    /// like a buffered write: the request is already queued ahead of
    /// everything that follows, and the file's next flush, fsync or close
    /// waits for the storage node's answer and reports its error if any.
    /// Its attributes are what the node will set: an empty file with the
    /// requested mode, stamped now. Only O_EXCL creates go behind: the
    /// tools that use them (cp, tar, mktemp) check close(), where a late
    /// error is reported, while a shell's `>` ignores it and must hear of a
    /// refusal at open. Needs a tokio runtime context.
    pub fn create_now(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        mode: u32,
        exclusive: bool,
    ) -> Option<FsResult<(Entry, u64)>> {
        let path = match self.child_path(parent, name) {
            Ok(path) => path,
            Err(e) => return Some(Err(e)),
        };
        if !exclusive || grants_may_refuse(&path) || !self.meta.lock().unwrap().known_absent(&path) {
            return None;
        }
        let attr = new_attr(dfos_protocol::FileKind::File, mode);
        let entry = self.remember(&path, attr.clone());
        let stream = self.stream_or_new(entry.ino);
        let Some(slot) = stream.try_slot() else {
            self.forget(entry.ino, 1);
            return None;
        };
        match self.transport.submit_behind_leading(Request::Create { path: path.clone(), mode, exclusive }) {
            Ok((leader, reply)) => {
                stream.track_create(slot, leader, reply, self.forget_refused_create(&path, entry.ino))
            }
            Err(e) => {
                self.forget(entry.ino, 1);
                return Some(Err(e.into()));
            }
        }
        self.meta.lock().unwrap().created(&path, attr);
        Some(Ok(self.opened_new(entry, &path)))
    }

    /// A file just created (empty) and opened: drop stale caches, start
    /// its small-file copy, and hand out a handle.
    fn opened_new(&self, entry: Entry, path: &str) -> (Entry, u64) {
        self.drop_cached_data(entry.ino);
        self.small.forget(path);
        if entry.attr.size == 0 {
            let stream = self.stream_or_new(entry.ino);
            stream.truncate_shadow(0);
            *stream.predicted.lock().unwrap() = Some(Predicted { attr: entry.attr.clone(), mtime_exact: false });
        }
        (entry, self.new_handle())
    }

    /// Whether `ino` lies in another user's tree, reached through `.shared`.
    pub fn is_shared(&self, ino: u64) -> bool {
        self.path_of(ino).is_ok_and(|path| grants_may_refuse(&path))
    }

    /// Refuses to open a shared file for writing when its owner granted it
    /// read-only. The storage node refuses the writes anyway, but they
    /// reach it only at close, whose error shells ignore (`echo x >> f`),
    /// and root passes the kernel's own check of the mode bits. Shares are
    /// root-squashed as on NFS: the write bits the storage node presents
    /// are the grant, for every local user.
    pub async fn refuse_read_only_share(&self, ino: u64) -> FsResult<()> {
        let attr = self.getattr(ino).await?;
        if attr.mode & 0o222 == 0 {
            return Err(ErrorCode::AccessDenied.into());
        }
        Ok(())
    }

    /// A handle, and how the kernel may cache the file's pages for it.
    pub fn open(&self, ino: u64) -> FsResult<Opened> {
        let path = self.path_of(ino)?;
        let quiet = self.quiet(ino);
        let (attr, uncached) = {
            let meta = self.meta.lock().unwrap();
            (meta.attr(&path), meta.has_other_names(&path))
        };
        let version = attr
            .filter(|attr| quiet && attr.kind == dfos_protocol::FileKind::File)
            .map(|attr| (attr.size, attr.mtime, attr.ctime));
        let previous = self.opened_versions.lock().unwrap().get(&ino).copied();
        self.drop_cached_data(ino);
        if let Some(version) = version {
            self.opened_versions.lock().unwrap().insert(ino, version);
        }
        let keep_cache = version.is_some() && version == previous;
        log::debug!("op=open ino={ino} path={path:?} keep_cache={keep_cache} uncached={uncached}");
        Ok(Opened { handle: self.new_handle(), keep_cache, uncached })
    }

    /// Opens `ino` with its attributes asked of a storage node, never taken
    /// from a cache (NFS's close-to-open): a change another mount closed
    /// just before is seen, whether or not its event has arrived, and pages
    /// the kernel kept of an older version are dropped. With `append`, this
    /// mount's appends land at the end the node reported and after
    /// ([`DfosFs::append_offset`]) even where the kernel saw an older end,
    /// so another mount's appends are not overwritten; the handle then
    /// bypasses the kernel's page cache, which would keep appended bytes
    /// where the kernel believed the end was. The caller must make the
    /// kernel drop its attributes of `ino` too.
    pub async fn open_fresh(&self, ino: u64, append: bool) -> FsResult<Opened> {
        self.flush(ino).await?;
        let path = self.path_of(ino)?;
        let attr = expect_attr(self.call(Request::GetAttr { path: path.clone() }).await?)?;
        self.meta.lock().unwrap().replace_attr(&path, attr.clone());
        if append {
            *self.stream_or_new(ino).append_end.lock().unwrap() = Some(attr.size);
        }
        let opened = self.open(ino)?;
        Ok(Opened { uncached: opened.uncached || append, ..opened })
    }

    /// Where an append of `len` bytes through a handle opened with
    /// [`DfosFs::open_fresh`] lands: at `kernel_offset` (the end the kernel
    /// knows), or at the end this mount knows when that is further.
    pub fn append_offset(&self, ino: u64, kernel_offset: u64, len: usize) -> u64 {
        let Some(stream) = self.stream(ino) else {
            return kernel_offset;
        };
        let mut end = stream.append_end.lock().unwrap();
        match end.as_mut() {
            Some(end) => {
                let offset = kernel_offset.max(*end);
                *end = offset + len as u64;
                offset
            }
            None => kernel_offset,
        }
    }

    /// Reads up to `size` bytes; shorter only at end of file.
    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> FsResult<FileBytes> {
        self.flush(ino).await?;
        if let Some(done) = self.read_now(ino, offset, size) {
            return done;
        }
        let path = self.path_of(ino)?;
        if offset == 0 && self.fetch_with_siblings(&path).await {
            if let Some(done) = self.read_now(ino, offset, size) {
                return done;
            }
        }
        self.reads.read(&self.transport, FileRead { ino, path: &path, offset, size }).await
    }

    /// A cold read of the file at `path` begins: if it is small, it and the
    /// other small files of its directory, and of those a walk goes on to,
    /// may be fetched with one request,
    /// into the small-file cache (`prefetch.rs`). Whether that was tried;
    /// the read is then answered from the cache if its copy is current.
    async fn fetch_with_siblings(&self, path: &str) -> bool {
        let dir = inodes::parent_of(path);
        let listing = {
            let meta = self.meta.lock().unwrap();
            // A large file's read skips building the directory's listing.
            if !meta.attr(path).is_some_and(|attr| prefetch::is_small_file(&attr)) {
                return false;
            }
            meta.listing(dir)
        };
        let Some(listing) = listing else {
            return false;
        };
        // Looked through only when the directory leaves the request room.
        let further = || self.meta.lock().unwrap().listings_after(dir, prefetch::WALK_AHEAD_ENTRIES);
        let cached = |path: &str, attr: &FileAttr| self.small.get(path, attr).is_some();
        let paths = self.prefetch.after_cold_read(path, &listing, further, cached);
        if paths.is_empty() {
            return false;
        }
        // Dropped with the read if the kernel gives up on it, as well.
        let _answered = prefetch::Answered { prefetch: &self.prefetch, paths: &paths };
        if let Ok(Payload::Files(files)) = self.call(Request::ReadFiles { paths: paths.clone() }).await {
            for (path, file) in paths.iter().zip(files) {
                let Ok(FileContent { attr, data }) = file else { continue };
                let current = self.meta.lock().unwrap().attr(path);
                self.small.put_if_current(path, &attr, data, current);
            }
        }
        true
    }

    pub async fn write(&self, ino: u64, at: (u64, Placement), data: &[u8]) -> FsResult<u32> {
        let path = self.path_of(ino)?;
        self.before_write(ino, &path);
        let stream = self.stream_or_new(ino);
        match stream.write_now(&self.transport, &path, at, data) {
            Some(done) => done?,
            None => stream.write(&self.transport, &path, at, data).await?,
        }
        Ok(data.len() as u32)
    }

    /// Takes a write on the caller's thread when that needs no waiting
    /// (see `WriteStream::write_now`). Needs a tokio runtime context.
    pub fn write_now(&self, ino: u64, at: (u64, Placement), data: &[u8]) -> Option<FsResult<u32>> {
        let path = self.path_of(ino).ok()?;
        self.before_write(ino, &path);
        let done = self.stream_or_new(ino).write_now(&self.transport, &path, at, data)?;
        Some(done.map(|()| data.len() as u32))
    }

    /// What a write makes stale: cached blocks, the small-file copy, and
    /// the attributes (the size and mtime come back with the acknowledgement).
    fn before_write(&self, ino: u64, path: &str) {
        self.drop_cached_data(ino);
        self.small.forget(path);
        self.meta.lock().unwrap().drop_attr(path);
    }

    /// Copies up to `len` bytes of `ino_in` from `offset_in` into `ino_out`
    /// at `offset_out` on the storage node (`copy_file_range`), so the bytes
    /// cross the broker neither way; what both files had buffered goes
    /// first. Returns how many bytes were copied: fewer than asked at the
    /// end of the source or past `MAX_COPY_BYTES` (the kernel asks again).
    pub async fn copy_range(
        &self,
        ino_in: u64,
        offset_in: u64,
        ino_out: u64,
        offset_out: u64,
        len: u64,
    ) -> FsResult<u32> {
        self.flush(ino_in).await?;
        self.flush(ino_out).await?;
        let (from, to) = (self.path_of(ino_in)?, self.path_of(ino_out)?);
        self.changed_on_the_node(ino_out, &to);
        let len = len.min(MAX_COPY_BYTES);
        let request = Request::CopyRange { from, from_offset: offset_in, to: to.clone(), to_offset: offset_out, len };
        let Payload::Copied { len, attr } = self.call(request).await? else {
            return Err(FsError::UnexpectedReply);
        };
        self.meta.lock().unwrap().put_attr(&to, attr);
        // At most MAX_COPY_BYTES, asked for above.
        Ok(len as u32)
    }

    /// fallocate(2), done by the node after the file's buffered writes.
    pub async fn allocate(&self, ino: u64, offset: u64, len: u64, mode: AllocateMode) -> FsResult<()> {
        self.flush(ino).await?;
        let path = self.path_of(ino)?;
        self.changed_on_the_node(ino, &path);
        let attr = expect_attr(self.call(Request::Allocate { path: path.clone(), offset, len, mode }).await?)?;
        self.meta.lock().unwrap().put_attr(&path, attr);
        Ok(())
    }

    /// The node is about to change `ino`'s bytes or size itself (a copy
    /// into it, a fallocate): nothing this mount knows of them holds, and
    /// its write stream's foresight neither.
    fn changed_on_the_node(&self, ino: u64, path: &str) {
        self.before_write(ino, path);
        if let Some(stream) = self.stream(ino) {
            stream.predicted.lock().unwrap().take();
            stream.take_shadow();
        }
    }

    /// One round trip, not two: the fsync travels right behind the file's
    /// last chunk, and the node applies it after them.
    pub async fn fsync(&self, ino: u64) -> FsResult<()> {
        let path = self.path_of(ino)?;
        let fsync = Request::Fsync { path: path.clone() };
        let synced = match self.stream(ino) {
            Some(stream) => self.flush_stream(&stream, &path, Some(fsync)).await?.expect("a reply to the fsync"),
            None => self.transport.submit(fsync)?,
        };
        synced.await?;
        Ok(())
    }

    pub async fn mkdir(&self, parent: u64, name: &std::ffi::OsStr, mode: u32) -> FsResult<Entry> {
        let path = self.child_path(parent, name)?;
        if self.meta.lock().unwrap().known_absent(&path) && !grants_may_refuse(&path) {
            // Like create_behind: what follows inside the new directory is
            // queued after it, and reports its errors if it failed.
            let attr = new_attr(dfos_protocol::FileKind::Directory, mode);
            let reply = self.transport.submit_behind(Request::Mkdir { path: path.clone(), mode })?;
            self.behind("mkdir", &path, reply);
            self.meta.lock().unwrap().created(&path, attr.clone());
            return Ok(self.remember(&path, attr));
        }
        self.make_entry(&path, Request::Mkdir { path: path.clone(), mode }).await
    }

    /// Waits for the storage node to make a new name, then knows it.
    async fn make_entry(&self, path: &str, request: Request) -> FsResult<Entry> {
        let attr = expect_attr(self.call(request).await?)?;
        self.meta.lock().unwrap().created(path, attr.clone());
        Ok(self.remember(path, attr))
    }

    pub async fn symlink(&self, parent: u64, name: &std::ffi::OsStr, target: &std::ffi::OsStr) -> FsResult<Entry> {
        let path = self.child_path(parent, name)?;
        let target = wire_name(target)?.into_owned();
        self.make_entry(&path, Request::Symlink { path: path.clone(), target }).await
    }

    /// mknod(2). A regular file, as `tar --xattrs` makes files (to set
    /// their attributes before their bytes), is an exclusive create whose
    /// handle is not kept (a handle is a number, nothing to release).
    pub async fn mknod(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        kind: dfos_protocol::FileKind,
        mode: u32,
    ) -> FsResult<Entry> {
        if kind == dfos_protocol::FileKind::File {
            return self.create(parent, name, mode, true).await.map(|(entry, _handle)| entry);
        }
        let path = self.child_path(parent, name)?;
        self.make_entry(&path, Request::MakeNode { path: path.clone(), kind, mode }).await
    }

    /// A hard link. The file's pending writes and its create land first,
    /// so the node links what this mount has written; what is cached of
    /// it by its old name no longer holds (its link count changed, and a
    /// file with several names is not cached by path: see `MetaCache::attr`).
    pub async fn link(&self, ino: u64, new_parent: u64, new_name: &std::ffi::OsStr) -> FsResult<Entry> {
        let from = self.path_of(ino)?;
        let to = self.child_path(new_parent, new_name)?;
        self.flush(ino).await?;
        let attr = expect_attr(self.call(Request::Link { from: from.clone(), to: to.clone() }).await?)?;
        {
            let mut meta = self.meta.lock().unwrap();
            meta.created_or_opened(&to, attr.clone());
            meta.drop_attr(&from);
        }
        self.small.forget(&from);
        self.drop_cached_data(ino);
        // The new name is this inode, as on a local disk.
        if let Some(link) = attr.link {
            self.inodes.lock().unwrap().adopt_link(ino, link);
        }
        Ok(self.remember(&to, attr))
    }

    /// A link's target is asked for every time: it is a few bytes, and the
    /// kernel keeps the resolved names in its own entry cache meanwhile.
    pub async fn readlink(&self, ino: u64) -> FsResult<String> {
        let path = self.path_of(ino)?;
        match self.call(Request::ReadLink { path }).await? {
            Payload::LinkTarget(target) => Ok(target),
            _ => Err(FsError::UnexpectedReply),
        }
    }

    /// The value of the extended attribute `name`. Names outside the
    /// `user.` namespace are answered here, as absent: storage nodes keep
    /// no others, and the kernel asks for some of them on every `ls -l`
    /// (`security.selinux`, `system.posix_acl_access`) and on writes
    /// (`security.capability`).
    pub async fn getxattr(&self, ino: u64, name: &std::ffi::OsStr) -> FsResult<Vec<u8>> {
        let name = kept_xattr_name(name, ErrorCode::NoAttribute)?;
        let path = self.path_of(ino)?;
        match self.call(Request::GetXattr { path, name: name.to_owned() }).await? {
            Payload::Xattr(value) => Ok(value),
            _ => Err(FsError::UnexpectedReply),
        }
    }

    /// The answer to a getxattr that needs no storage node.
    pub fn getxattr_now(&self, name: &std::ffi::OsStr) -> Option<FsResult<Vec<u8>>> {
        kept_xattr_name(name, ErrorCode::NoAttribute).err().map(Err)
    }

    /// The names of the file's extended attributes, each followed by a NUL,
    /// as listxattr(2) returns them.
    pub async fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let path = self.path_of(ino)?;
        match self.call(Request::ListXattrs { path }).await? {
            Payload::XattrNames(names) => Ok(names.iter().flat_map(|name| name.bytes().chain([0])).collect()),
            _ => Err(FsError::UnexpectedReply),
        }
    }

    /// Sets an extended attribute, answered once a storage node applied it
    /// (like every metadata change that can be refused: a full inode, a
    /// grant). Outside `user.`, EOPNOTSUPP, as for a namespace the
    /// filesystem lacks.
    pub async fn setxattr(&self, ino: u64, name: &std::ffi::OsStr, value: &[u8], mode: XattrMode) -> FsResult<()> {
        let name = kept_xattr_name(name, ErrorCode::NotSupported)?;
        let path = self.path_of(ino)?;
        let request = Request::SetXattr { path: path.clone(), name: name.to_owned(), value: value.to_vec(), mode };
        self.change_attributes(ino, &path, request).await
    }

    pub async fn removexattr(&self, ino: u64, name: &std::ffi::OsStr) -> FsResult<()> {
        let name = kept_xattr_name(name, ErrorCode::NoAttribute)?;
        let path = self.path_of(ino)?;
        let request = Request::RemoveXattr { path: path.clone(), name: name.to_owned() };
        self.change_attributes(ino, &path, request).await
    }

    /// Applies an attribute change after the file's buffered writes, and
    /// keeps the attributes the node answered with (the ctime moved): the
    /// cache, and with it the parent's listing, stays whole.
    async fn change_attributes(&self, ino: u64, path: &str, request: Request) -> FsResult<()> {
        self.flush(ino).await?;
        let attr = expect_attr(self.call(request).await?)?;
        self.settled_attr(ino, path, attr);
        Ok(())
    }

    /// What the node answered once every change of `ino` so far was
    /// applied: it replaces anything foreseen, its ctime too.
    fn settled_attr(&self, ino: u64, path: &str, attr: FileAttr) {
        if let Some(stream) = self.stream(ino) {
            stream.predicted.lock().unwrap().take();
        }
        self.meta.lock().unwrap().replace_attr(path, attr);
    }

    pub async fn unlink(&self, parent: u64, name: &std::ffi::OsStr) -> FsResult<()> {
        let path = self.child_path(parent, name)?;
        self.flush_path(&path).await?;
        if let Some(done) = self.unlink_now(parent, name) {
            return done;
        }
        self.call(Request::Unlink { path: path.clone() }).await?;
        self.unlinked(&path);
        Ok(())
    }

    /// Watches the answer to a request already acknowledged to the kernel:
    /// a failure is logged and the path's cached state dropped, so the next
    /// look at it asks a storage node.
    fn behind(&self, op: &'static str, path: &str, reply: crate::rpc::PendingReply) {
        let (meta, path) = (self.meta.clone(), path.to_owned());
        tokio::spawn(async move {
            if let Err(e) = reply.await {
                log::warn!("op={op} path={path:?} failed after it was acknowledged: {e}");
                meta.lock().unwrap().invalidate_tree(&path);
            }
        });
    }

    pub async fn rmdir(&self, parent: u64, name: &std::ffi::OsStr) -> FsResult<()> {
        let path = self.child_path(parent, name)?;
        let known_empty = self.meta.lock().unwrap().listing(&path).is_some_and(|entries| entries.is_empty());
        if known_empty && !path.is_empty() && !grants_may_refuse(&path) {
            // Like unlink: known empty here, so only an out-of-band change
            // or another mount's create in the last milliseconds can refuse.
            let reply = self.transport.submit_behind(Request::Rmdir { path: path.clone() })?;
            self.behind("rmdir", &path, reply);
        } else {
            self.call(Request::Rmdir { path: path.clone() }).await?;
        }
        self.meta.lock().unwrap().removed(&path, true);
        self.inodes.lock().unwrap().detach(&path);
        Ok(())
    }

    pub async fn rename(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        new_parent: u64,
        new_name: &std::ffi::OsStr,
        mode: RenameMode,
    ) -> FsResult<()> {
        let from = self.child_path(parent, name)?;
        let to = self.child_path(new_parent, new_name)?;
        // Buffered writes carry the old path; they must land before it changes.
        self.flush_tree(&from).await?;
        match mode {
            RenameMode::Exchange => self.flush_tree(&to).await?,
            RenameMode::Replace | RenameMode::NoReplace => self.flush_path(&to).await?,
        }
        self.call(Request::Rename { from: from.clone(), to: to.clone(), mode }).await?;
        self.small.forget_tree(&from);
        self.small.forget_tree(&to);
        match mode {
            RenameMode::Exchange => {
                let mut meta = self.meta.lock().unwrap();
                meta.invalidate_tree(&from);
                meta.invalidate_tree(&to);
                drop(meta);
                self.inodes.lock().unwrap().exchange(&from, &to);
            }
            RenameMode::Replace | RenameMode::NoReplace => {
                self.meta.lock().unwrap().renamed(&from, &to);
                self.inodes.lock().unwrap().rename(&from, &to);
            }
        }
        Ok(())
    }

    /// Another mount changed something: drop what this mount cached about
    /// it, and say what the kernel must drop.
    pub fn remote_change(&self, change: &Change) -> Vec<Invalidation> {
        let mut meta = self.meta.lock().unwrap();
        let mut inodes = self.inodes.lock().unwrap();
        let mut out = Vec::new();
        let entry = |path: &str, out: &mut Vec<Invalidation>| {
            let name = dfos_protocol::path::split(path).1;
            if let Some(parent) = inodes.ino_of(inodes::parent_of(path)) {
                out.push(Invalidation::Entry { parent, name: name.to_owned() });
            }
            self.small.forget_tree(path);
            if let Some(ino) = inodes.ino_of(path) {
                self.drop_cached_data(ino);
                if let Some(stream) = self.stream(ino) {
                    stream.predicted.lock().unwrap().take();
                }
                out.push(Invalidation::Inode(ino));
            }
        };
        // The file at `path` is the same name, with new bytes or attributes.
        let contents_changed = |meta: &mut MetaCache, path: &str, out: &mut Vec<Invalidation>| {
            meta.drop_attr(path);
            self.small.forget(path);
            if let Some(ino) = inodes.ino_of(path) {
                self.drop_cached_data(ino);
                out.push(Invalidation::Inode(ino));
            }
        };
        match change {
            Change::Modified { path } => {
                // A truncate to zero may have put a version in the trash.
                if meta.trash_changed() {
                    if let Some(ino) = inodes.ino_of(dfos_protocol::path::TRASH_DIR) {
                        out.push(Invalidation::Inode(ino));
                    }
                }
                contents_changed(&mut meta, path, &mut out);
            }
            Change::Created { path } => {
                meta.invalidate(path);
                entry(path, &mut out);
            }
            Change::Removed { path } => {
                meta.invalidate_tree(path);
                entry(path, &mut out);
            }
            Change::Renamed { from, to } | Change::Exchanged { a: from, b: to } => {
                meta.invalidate_tree(from);
                meta.invalidate_tree(to);
                entry(from, &mut out);
                entry(to, &mut out);
            }
            // The file at `from` is the same, with one more name.
            Change::Linked { from, to } => {
                meta.invalidate(to);
                entry(to, &mut out);
                contents_changed(&mut meta, from, &mut out);
            }
        }
        if matches!(change, Change::Removed { .. } | Change::Renamed { .. }) {
            meta.trash_changed();
            let trash = dfos_protocol::path::TRASH_DIR;
            match inodes.ino_of(trash) {
                Some(ino) => out.push(Invalidation::Inode(ino)),
                // The trash may have just been made: drop the kernel's
                // negative entry. A known one is left alone, so a shell
                // inside it keeps its working directory.
                None => out.push(Invalidation::Entry { parent: inodes::ROOT_INO, name: trash.to_owned() }),
            }
        }
        // Open files follow a rename made elsewhere, as on a local disk or
        // NFS: their later writes and reads name the new path. A file the
        // rename replaced is detached (its operations fail with ENOENT,
        // never touch the file now at its name).
        match change {
            Change::Renamed { from, to } => inodes.rename(from, to),
            Change::Exchanged { a, b } => inodes.exchange(a, b),
            Change::Created { path } | Change::Removed { path } | Change::Linked { to: path, .. } => {
                inodes.changed_elsewhere(path)
            }
            Change::Modified { .. } => {}
        }
        out
    }

    pub async fn statfs(&self) -> FsResult<FsStats> {
        match self.call(Request::StatFs).await? {
            Payload::StatFs(stats) => Ok(stats),
            _ => Err(FsError::UnexpectedReply),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The core against a real store on a temporary directory: no kernel,
    //! no Kafka. The transport applies requests in submission order, as
    //! one Kafka partition does.
    use super::*;
    use crate::rpc::{now, Joined, Leader, PendingReply};
    use dfos_protocol::limits::READ_BLOCK_SIZE;
    use proptest::prelude::*;
    use std::ffi::OsStr;

    #[test]
    fn an_append_never_straddles_the_end_of_a_chunk() {
        let almost_full = CHUNK_SIZE as u64 - 10;
        let mut buffer = WriteBuffer { offset: 0, data: Chunk::default(), placement: Placement::AtEnd };
        buffer.data.extend(&vec![0; almost_full as usize]);
        assert!(buffer.continues(almost_full, Placement::AtEnd, 10));
        assert!(!buffer.continues(almost_full, Placement::AtEnd, 11), "it would be split over two chunks");
        assert!(!buffer.continues(almost_full, Placement::AtOffset, 10), "placed otherwise");
        assert!(!buffer.continues(almost_full + 1, Placement::AtEnd, 1), "not where the buffer ends");
        buffer.placement = Placement::AtOffset;
        assert!(buffer.continues(almost_full, Placement::AtOffset, 11), "a write at an offset may straddle");
    }

    struct LocalTransport {
        store: storaged::store::Store,
        reads: std::sync::atomic::AtomicUsize,
        listings: std::sync::atomic::AtomicUsize,
    }

    impl Transport for Arc<LocalTransport> {
        fn submit(&self, request: Request) -> Result<PendingReply, RpcError> {
            if matches!(request, Request::Read { .. } | Request::LocateInLog { .. } | Request::ReadFiles { .. }) {
                self.reads.fetch_add(1, Ordering::SeqCst);
            }
            if matches!(request, Request::ReadDir { .. } | Request::ReadTree { .. }) {
                self.listings.fetch_add(1, Ordering::SeqCst);
            }
            let result = self.store.apply("u", now(), &request).map_err(|e| RpcError::Remote(e.code()));
            Ok(Box::pin(async move { result }))
        }
    }

    fn core() -> (tempfile::TempDir, DfosFs<Arc<LocalTransport>>) {
        let dir = tempfile::tempdir().unwrap();
        let store = storaged::store::Store::new(dir.path()).unwrap();
        (dir, DfosFs::new(Arc::new(LocalTransport { store, reads: Default::default(), listings: Default::default() })))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    type ReplySender = tokio::sync::oneshot::Sender<Result<Payload, RpcError>>;

    /// Like `LocalTransport`, with a mount's batching: requests submitted
    /// behind are held until `send_held` or the next `submit` carries them,
    /// and no reply is delivered while the gate is closed. It records the
    /// order in which requests reached the store.
    struct GatedTransport {
        store: storaged::store::Store,
        /// With the ids `submit_behind_leading` names them by.
        held: Mutex<Vec<(u64, Request, ReplySender)>>,
        next_id: AtomicU64,
        applied: Mutex<Vec<&'static str>>,
        gate: tokio::sync::watch::Sender<bool>,
    }

    impl GatedTransport {
        fn apply(&self, request: &Request) -> Result<Payload, RpcError> {
            self.applied.lock().unwrap().push(request.name());
            self.store.apply("u", now(), request).map_err(|e| RpcError::Remote(e.code()))
        }

        fn gated(&self, reply: tokio::sync::oneshot::Receiver<Result<Payload, RpcError>>) -> PendingReply {
            let mut gate = self.gate.subscribe();
            Box::pin(async move {
                let _ = gate.wait_for(|open| *open).await;
                reply.await.unwrap_or(Err(RpcError::Timeout))
            })
        }

        fn applied(&self) -> Vec<&'static str> {
            self.applied.lock().unwrap().clone()
        }
    }

    impl Transport for Arc<GatedTransport> {
        fn submit(&self, request: Request) -> Result<PendingReply, RpcError> {
            self.send_held();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = tx.send(self.apply(&request));
            Ok(self.gated(rx))
        }

        fn submit_behind(&self, request: Request) -> Result<PendingReply, RpcError> {
            Ok(self.submit_behind_leading(request)?.1)
        }

        fn submit_behind_leading(&self, request: Request) -> Result<(Leader, PendingReply), RpcError> {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            self.held.lock().unwrap().push((id, request, tx));
            Ok((Leader(id), self.gated(rx)))
        }

        fn submit_with(&self, leader: Leader, requests: Vec<Request>, now: bool) -> Joined {
            if !self.held.lock().unwrap().iter().any(|(id, ..)| *id == leader.0) {
                return Err(requests);
            }
            let replies = requests.into_iter().map(|request| self.submit_behind(request).unwrap()).collect();
            if now {
                self.send_held();
            }
            Ok(replies)
        }

        fn submit_write_behind(&self, path: &str, offset: u64, chunk: Chunk) -> Result<PendingReply, RpcError> {
            self.submit_behind(Request::Write { path: path.to_owned(), offset, data: chunk.into_data() })
        }

        /// As one batch: what follows a refused exclusive create of its
        /// path is refused too, as a storage node does.
        fn send_held(&self) {
            let mut refused = dfos_protocol::RefusedCreates::default();
            for (_, request, tx) in std::mem::take(&mut *self.held.lock().unwrap()) {
                let result = match refused.inherited(&request) {
                    Some((_, error)) => Err(error),
                    None => self.apply(&request),
                };
                refused.record(&request, &result);
                let _ = tx.send(result);
            }
        }
    }

    fn gated_core(gate_open: bool) -> (tempfile::TempDir, DfosFs<Arc<GatedTransport>>) {
        let dir = tempfile::tempdir().unwrap();
        let store = storaged::store::Store::new(dir.path()).unwrap();
        let (gate, _) = tokio::sync::watch::channel(gate_open);
        let transport = GatedTransport {
            store,
            held: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            applied: Mutex::new(Vec::new()),
            gate,
        };
        (dir, DfosFs::new(Arc::new(transport)))
    }

    /// An open gate, and a directory made through the mount, so creates in
    /// it can go behind.
    async fn gated_core_with_dir(name: &str) -> (tempfile::TempDir, DfosFs<Arc<GatedTransport>>, Entry) {
        let (dir, fs) = gated_core(true);
        fs.mkdir(1, OsStr::new(name), 0o755).await.unwrap();
        let entry = fs.lookup(1, OsStr::new(name)).await.unwrap();
        (dir, fs, entry)
    }

    /// Only a guard against a hang: the operations under test never wait
    /// for a timer.
    async fn within_a_minute<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(60), f).await.expect("hung")
    }

    #[test]
    fn full_chunks_in_flight_are_bounded_for_the_whole_mount() {
        rt().block_on(async {
            let (dir, fs, d) = gated_core_with_dir("d").await;
            let (a, _) = fs.create(d.ino, OsStr::new("a"), 0o644, true).await.unwrap();
            let (b, _) = fs.create(d.ino, OsStr::new("b"), 0o644, true).await.unwrap();
            within_a_minute(async { tokio::try_join!(fs.flush(a.ino), fs.flush(b.ino)) }).await.unwrap();
            let writes = || fs.transport.applied().iter().filter(|name| **name == "write").count();
            fs.transport.gate.send_replace(false);
            let three_chunks: Vec<u8> = (0..3 * CHUNK_SIZE).map(|i| (i % 251) as u8).collect();
            let both = async {
                let (wa, wb) = tokio::join!(
                    fs.write(a.ino, (0, Placement::AtOffset), &three_chunks),
                    fs.write(b.ino, (0, Placement::AtOffset), &three_chunks)
                );
                (wa.unwrap(), wb.unwrap())
            };
            tokio::pin!(both);
            let stalled = tokio::time::timeout(Duration::from_millis(200), &mut both).await;
            assert!(stalled.is_err(), "no chunk's reply can come while the gate is closed");
            assert_eq!(writes(), MAX_CHUNKS_IN_FLIGHT as usize, "two files share the mount's chunk budget");
            fs.transport.gate.send_replace(true);
            within_a_minute(&mut both).await;
            within_a_minute(async { tokio::try_join!(fs.flush(a.ino), fs.flush(b.ino)) }).await.unwrap();
            assert_eq!(writes(), 6);
            for name in ["a", "b"] {
                assert_eq!(std::fs::read(dir.path().join("u/d").join(name)).unwrap(), three_chunks);
            }
        });
    }

    /// Another mount made `d/x` after this one answered its exclusive
    /// create and before the node applied it: `between` runs in that
    /// window, then `write` of this mount's bytes and a close.
    fn lose_an_exclusive_create_race(between: impl FnOnce(&DfosFs<Arc<GatedTransport>>), write: &[u8]) {
        rt().block_on(async {
            let (dir, fs, d) = gated_core_with_dir("d").await;
            let (x, _) = fs.create(d.ino, OsStr::new("x"), 0o644, true).await.unwrap();
            std::fs::write(dir.path().join("u/d/x"), b"the other mount's").unwrap();
            between(&fs);
            let written = within_a_minute(fs.write(x.ino, (0, Placement::AtOffset), write)).await;
            let closed = within_a_minute(fs.flush(x.ino)).await;
            assert_eq!(written.and(closed), Err(ErrorCode::Exists.into()));
            assert_eq!(std::fs::read(dir.path().join("u/d/x")).unwrap(), b"the other mount's");
            assert!(!fs.transport.applied().contains(&"write"), "{:?}", fs.transport.applied());
            assert_eq!(fs.path_of(x.ino), Err(ErrorCode::Exists.into()), "detached, and its operations say why");
            assert!(fs.inodes.lock().unwrap().path(x.ino).is_none());
            let found = within_a_minute(fs.lookup(d.ino, OsStr::new("x"))).await.unwrap();
            assert_eq!(found.attr.size, 17, "a new lookup finds the other mount's file");
        });
    }

    #[test]
    fn a_small_write_behind_a_refused_exclusive_create_is_refused_with_it() {
        lose_an_exclusive_create_race(|_| {}, b"mine");
    }

    #[test]
    fn a_whole_file_of_100_kib_travels_with_its_exclusive_create_and_is_refused_with_it() {
        lose_an_exclusive_create_race(|_| {}, &vec![7; 100 * 1024]);
    }

    #[test]
    fn a_large_write_waits_for_the_exclusive_create_and_is_never_sent_when_it_is_refused() {
        lose_an_exclusive_create_race(|_| {}, &vec![7; CHUNK_SIZE + 100]);
    }

    #[test]
    fn a_write_after_its_exclusive_create_left_alone_waits_for_the_answer() {
        lose_an_exclusive_create_race(|fs| fs.transport.send_held(), b"mine");
    }

    #[test]
    fn closing_a_file_created_behind_sends_the_held_create_at_once() {
        rt().block_on(async {
            let (dir, fs, d) = gated_core_with_dir("d").await;
            let (f, _) = fs.create(d.ino, OsStr::new("empty"), 0o644, true).await.unwrap();
            assert!(!fs.transport.applied().contains(&"create"), "the create went behind and is held");
            within_a_minute(fs.flush(f.ino)).await.unwrap();
            assert!(dir.path().join("u/d/empty").is_file());
        });
    }

    #[test]
    fn extended_attributes_land_after_a_held_create_and_other_namespaces_never_leave_the_mount() {
        rt().block_on(async {
            let (dir, fs, d) = gated_core_with_dir("d").await;
            let (f, _) = fs.create(d.ino, OsStr::new("f"), 0o644, true).await.unwrap();
            let name = OsStr::new("user.tag");
            within_a_minute(fs.setxattr(f.ino, name, b"v", XattrMode::Create)).await.unwrap();
            assert!(dir.path().join("u/d/f").is_file(), "the held create went first");
            assert_eq!(within_a_minute(fs.getxattr(f.ino, name)).await.unwrap(), b"v");
            assert_eq!(within_a_minute(fs.listxattr(f.ino)).await.unwrap(), b"user.tag\0");
            let before = fs.transport.applied().len();
            let security = OsStr::new("security.selinux");
            assert_eq!(fs.getxattr_now(security), Some(Err(ErrorCode::NoAttribute.into())));
            let set_security = fs.setxattr(f.ino, security, b"x", XattrMode::Either).await;
            assert_eq!(set_security, Err(ErrorCode::NotSupported.into()));
            assert_eq!(fs.transport.applied().len(), before, "answered by the mount");
            assert_eq!(fs.getxattr_now(name), None, "user. names ask a storage node");
            within_a_minute(fs.removexattr(f.ino, name)).await.unwrap();
            assert_eq!(within_a_minute(fs.getxattr(f.ino, name)).await, Err(ErrorCode::NoAttribute.into()));
        });
    }

    #[test]
    fn a_hard_link_lands_after_the_files_held_writes_and_its_names_are_never_served_from_cache() {
        rt().block_on(async {
            let (dir, fs, d) = gated_core_with_dir("d").await;
            let (a, _) = fs.create(d.ino, OsStr::new("a"), 0o644, true).await.unwrap();
            fs.write(a.ino, (0, Placement::AtOffset), b"first").await.unwrap();
            let b = within_a_minute(fs.link(a.ino, d.ino, OsStr::new("b"))).await.unwrap();
            assert_eq!((b.attr.size, b.attr.nlink), (5, 2), "the create and the write went first");
            assert_eq!(&fs.transport.applied()[fs.transport.applied().len() - 3..], ["create", "write", "link"]);
            assert_eq!(a.ino, b.ino, "one kernel inode for both names, as the node gave the file an identity");
            fs.flush(a.ino).await.unwrap();

            // A change made under the other name, as another process or
            // mount might: neither name answers from what it cached.
            std::fs::write(dir.path().join("u/d/b"), b"second, longer").unwrap();
            assert!(fs.getattr_now(a.ino).is_none() && fs.getattr_now(b.ino).is_none());
            assert_eq!(fs.getattr(a.ino).await.unwrap().size, 14);
            assert!(fs.open(a.ino).unwrap().uncached, "the kernel would cut reads at the size it saw under this name");
            let keep_cache = fs.open(a.ino).unwrap().keep_cache;
            assert!(!keep_cache, "the kernel's pages of a hard-linked file are dropped at open");
            assert_eq!(fs.read(a.ino, 0, 4096).await.unwrap(), b"second, longer");
            fs.unlink(d.ino, OsStr::new("a")).await.unwrap();
            assert_eq!(fs.getattr(b.ino).await.unwrap().nlink, 1);
            assert!(fs.getattr_now(b.ino).is_some(), "one name again: cached as any file");
        });
    }

    #[test]
    fn pages_handed_to_the_kernel_count_only_while_the_file_is_still_what_they_hold() {
        rt().block_on(async {
            let (_dir, fs, d) = gated_core_with_dir("d").await;
            let (f, _) = fs.create(d.ino, OsStr::new("f"), 0o644, true).await.unwrap();
            fs.write(f.ino, (0, Placement::AtOffset), b"first").await.unwrap();
            within_a_minute(fs.flush(f.ino)).await.unwrap();
            let (content, version) = fs.content_for_kernel(f.ino).expect("a small file this mount wrote");
            assert_eq!(content.as_slice(), b"first");
            assert!(fs.kernel_holds(f.ino, version));
            assert!(fs.open(f.ino).unwrap().keep_cache, "an open of the version the kernel holds keeps its pages");

            let (_, version) = fs.content_for_kernel(f.ino).unwrap();
            // Another thread writes while the pages are being handed over.
            fs.write(f.ino, (0, Placement::AtOffset), b"second").await.unwrap();
            assert!(!fs.kernel_holds(f.ino, version), "the pages are older than the file");
            assert!(!fs.open(f.ino).unwrap().keep_cache);
            within_a_minute(fs.flush(f.ino)).await.unwrap();
            assert!(!fs.open(f.ino).unwrap().keep_cache, "nor after the write is flushed");
        });
    }

    #[test]
    fn times_and_mode_set_while_writing_go_behind_and_travel_with_the_close() {
        rt().block_on(async {
            let (dir, fs, x) = gated_core_with_dir("x").await;
            let sent_before = fs.transport.applied().len();
            // What tar does for each file it extracts.
            let (f, _) = fs.create(x.ino, OsStr::new("f"), 0o600, true).await.unwrap();
            fs.write(f.ino, (0, Placement::AtOffset), b"extracted").await.unwrap();
            let mtime = Timestamp { secs: 1_500_000_000, nanos: 0 };
            let attr = fs
                .setattr_now(f.ino, AttrChange { mtime: Some(SetTime::At(mtime)), ..Default::default() })
                .unwrap()
                .unwrap();
            assert_eq!((attr.size, attr.mtime), (9, mtime));
            assert_eq!(fs.getattr_now(f.ino).unwrap().unwrap(), attr, "answered from the prediction");
            assert!(fs.setattr_now(f.ino, AttrChange::default()).unwrap().is_ok(), "a chown changes nothing");
            let attr = fs.setattr_now(f.ino, AttrChange { mode: Some(0o640), ..Default::default() }).unwrap().unwrap();
            assert_eq!((attr.mode, attr.mtime), (0o640, mtime));
            assert_eq!(fs.transport.applied().len(), sent_before, "all held so far");
            within_a_minute(fs.flush(f.ino)).await.unwrap();
            assert_eq!(&fs.transport.applied()[sent_before..], ["create", "write", "setattr", "setattr"]);
            let on_disk = std::fs::metadata(dir.path().join("u/x/f")).unwrap();
            use std::os::unix::fs::MetadataExt;
            assert_eq!((on_disk.mode() & 0o7777, on_disk.mtime(), on_disk.len()), (0o640, 1_500_000_000, 9));
            // Its bytes are known here, for the size and mtime the node has.
            assert!(!fs.open(f.ino).unwrap().uncached, "a file with one name uses the page cache");
            assert_eq!(fs.read(f.ino, 0, 4096).await.unwrap(), b"extracted");
            assert!(!fs.transport.applied().contains(&"read"), "served from the small-file cache");
            // After the close nothing is foreseen: a touch asks the node.
            assert!(fs
                .setattr_now(f.ino, AttrChange { mtime: Some(SetTime::At(mtime)), ..Default::default() })
                .is_none());
            // Times set to "now" are the node's to report.
            let (g, _) = fs.create(x.ino, OsStr::new("g"), 0o600, true).await.unwrap();
            fs.write(g.ino, (0, Placement::AtOffset), b"g").await.unwrap();
            assert!(fs.setattr_now(g.ino, AttrChange { mtime: Some(SetTime::Now), ..Default::default() }).is_none());
            // A chmod alone keeps the mtime of the write, which only the node knows.
            assert!(fs.setattr_now(g.ino, AttrChange { mode: Some(0o644), ..Default::default() }).is_none());
        });
    }

    #[test]
    fn an_fsync_travels_right_behind_the_data_without_waiting_for_its_answer() {
        rt().block_on(async {
            let (dir, fs) = gated_core(false);
            let fs = Arc::new(fs);
            let (f, _) = {
                fs.transport.gate.send_replace(true);
                let created = fs.create(1, OsStr::new("f"), 0o644, false).await.unwrap();
                fs.transport.gate.send_replace(false);
                created
            };
            fs.write(f.ino, (0, Placement::AtOffset), b"data to keep").await.unwrap();
            let syncing = tokio::spawn({
                let fs = fs.clone();
                async move { fs.fsync(f.ino).await }
            });
            // No answer has come yet, and both have reached the store, in order.
            within_a_minute(async {
                while !fs.transport.applied().ends_with(&["write", "fsync"]) {
                    tokio::task::yield_now().await;
                }
            })
            .await;
            fs.transport.gate.send_replace(true);
            within_a_minute(syncing).await.unwrap().unwrap();
            assert_eq!(std::fs::read(dir.path().join("u/f")).unwrap(), b"data to keep");
        });
    }

    #[test]
    fn chunked_writes_flush_on_close_and_read_back() {
        rt().block_on(async {
            let (dir, fs) = core();
            let (entry, _) = fs.create(1, OsStr::new("f"), 0o644, true).await.unwrap();
            let data: Vec<u8> = (0..3 * CHUNK_SIZE + 17).map(|i| (i * 7 % 251) as u8).collect();
            for piece in data.chunks(128 * 1024 + 3).enumerate() {
                let offset = piece.0 * (128 * 1024 + 3);
                fs.write(entry.ino, (offset as u64, Placement::AtOffset), piece.1).await.unwrap();
            }
            fs.flush(entry.ino).await.unwrap();
            assert_eq!(std::fs::read(dir.path().join("u/f")).unwrap(), data);
            let back = fs.read(entry.ino, 5, (2 * CHUNK_SIZE) as u32).await.unwrap();
            assert_eq!(back, &data[5..5 + 2 * CHUNK_SIZE]);
            assert_eq!(fs.getattr(entry.ino).await.unwrap().size, data.len() as u64);
        });
    }

    #[test]
    fn a_close_is_answered_at_once_only_when_nothing_is_left_to_send_or_report() {
        rt().block_on(async {
            let (_dir, fs) = core();
            let (f, _) = fs.create(1, OsStr::new("f"), 0o644, true).await.unwrap();
            fs.write(f.ino, (0, Placement::AtOffset), b"buffered").await.unwrap();
            assert!(fs.flush_now(f.ino).is_none(), "buffered bytes must be sent and waited for");
            fs.flush(f.ino).await.unwrap();
            assert!(matches!(fs.flush_now(f.ino), Some(Ok(()))), "the release after the close");
            let (g, _) = fs.create(1, OsStr::new("g"), 0o644, true).await.unwrap();
            fs.flush(g.ino).await.unwrap();
            assert!(matches!(fs.flush_now(g.ino), Some(Ok(()))));
        });
    }

    #[test]
    fn a_small_file_written_here_reads_back_without_a_request_until_it_changes() {
        rt().block_on(async {
            let (_dir, fs) = core();
            let reads = || fs.transport.reads.load(Ordering::SeqCst);
            let (f, _) = fs.create(1, OsStr::new("small"), 0o644, true).await.unwrap();
            fs.write(f.ino, (0, Placement::AtOffset), b"hello").await.unwrap();
            fs.write(f.ino, (5, Placement::AtOffset), b" world").await.unwrap();
            fs.flush(f.ino).await.unwrap();
            fs.open(f.ino).unwrap();
            assert_eq!(fs.read(f.ino, 0, 4096).await.unwrap(), b"hello world");
            assert_eq!(reads(), 0, "served from the small-file cache");
            // A reopen and partial overwrite is not shadowed: the next read asks.
            fs.open(f.ino).unwrap();
            fs.write(f.ino, (0, Placement::AtOffset), b"J").await.unwrap();
            fs.flush(f.ino).await.unwrap();
            assert_eq!(fs.read(f.ino, 0, 4096).await.unwrap(), b"Jello world");
            assert_eq!(reads(), 1);
            // Truncating to zero starts a new copy.
            fs.setattr(f.ino, AttrChange { size: Some(0), ..Default::default() }).await.unwrap();
            fs.write(f.ino, (0, Placement::AtOffset), b"new").await.unwrap();
            fs.flush(f.ino).await.unwrap();
            assert_eq!(fs.read(f.ino, 0, 4096).await.unwrap(), b"new");
            assert_eq!(reads(), 1);
        });
    }

    #[test]
    fn small_files_of_a_listed_directory_come_in_one_request_and_drop_when_changed() {
        rt().block_on(async {
            let (dir, fs) = core();
            let reads = || fs.transport.reads.load(Ordering::SeqCst);
            // Written by another machine: this mount knows nothing of them.
            let on_disk = dir.path().join("u/d");
            std::fs::create_dir_all(&on_disk).unwrap();
            for i in 0..20 {
                std::fs::write(on_disk.join(format!("f{i:02}")), format!("file {i}")).unwrap();
            }
            std::fs::write(on_disk.join("big"), vec![7; MAX_FILE_BYTES + 1]).unwrap();
            let d = fs.lookup(1, OsStr::new("d")).await.unwrap();
            fs.releasedir(fs.opendir(d.ino).await.unwrap());
            let mut inos = Vec::new();
            for i in 0..20 {
                inos.push(fs.lookup(d.ino, OsStr::new(&format!("f{i:02}"))).await.unwrap().ino);
            }
            fs.open(inos[5]).unwrap();
            assert_eq!(fs.read(inos[5], 0, 4096).await.unwrap(), b"file 5");
            assert_eq!(reads(), 1, "one ReadFiles brings the file and the others, leaving out the large file");
            for (i, &ino) in inos.iter().enumerate().filter(|(i, _)| *i != 5) {
                fs.open(ino).unwrap();
                assert_eq!(fs.read(ino, 0, 4096).await.unwrap(), format!("file {i}").as_bytes());
            }
            assert_eq!(reads(), 1, "all nineteen others came with the ReadFiles");
            // Another machine changes one: its event drops the copy.
            std::fs::write(on_disk.join("f07"), "changed elsewhere").unwrap();
            fs.remote_change(&Change::Modified { path: "d/f07".into() });
            fs.getattr(inos[7]).await.unwrap();
            fs.open(inos[7]).unwrap();
            assert_eq!(fs.read(inos[7], 0, 4096).await.unwrap(), b"changed elsewhere");
        });
    }

    #[test]
    fn a_walk_into_a_listed_directory_lists_the_tree_below_in_one_request() {
        rt().block_on(async {
            let (dir, fs) = core();
            let listings = || fs.transport.listings.load(Ordering::SeqCst);
            // Written by another machine: this mount knows nothing of them.
            for sub in ["t/a/x", "t/a/y", "t/b"] {
                std::fs::create_dir_all(dir.path().join("u").join(sub)).unwrap();
                std::fs::write(dir.path().join("u").join(sub).join("f"), sub).unwrap();
            }
            let names = |handle: u64| -> Vec<String> {
                let names = fs.listing(handle).unwrap().iter().map(|e| e.name.clone()).collect();
                fs.releasedir(handle);
                names
            };
            let open = |parent: u64, name: &'static str| {
                let fs = &fs;
                async move {
                    let ino = fs.lookup(parent, OsStr::new(name)).await.unwrap().ino;
                    (ino, fs.opendir(ino).await.unwrap())
                }
            };
            let t = fs.lookup(1, OsStr::new("t")).await.unwrap().ino;
            assert_eq!(names(fs.opendir(t).await.unwrap()), ["a", "b"]);
            assert_eq!(listings(), 1, "a directory opened on its own is listed alone");
            let (a, handle) = open(t, "a").await;
            assert_eq!(names(handle), ["x", "y"]);
            assert_eq!(listings(), 2, "a walk into t/a asks for the tree below it");
            let (x, handle) = open(a, "x").await;
            assert_eq!(names(handle), ["f"]);
            assert_eq!(names(open(a, "y").await.1), ["f"]);
            assert_eq!(listings(), 2, "t/a/x and t/a/y came with t/a");
            assert_eq!(names(open(t, "b").await.1), ["f"]);
            assert_eq!(listings(), 2, "t/b, a later sibling of t/a, came with it too");
            // Another machine adds a file: its event drops the listing.
            std::fs::write(dir.path().join("u/t/a/x/g"), "new").unwrap();
            fs.remote_change(&Change::Created { path: "t/a/x/g".into() });
            assert_eq!(names(fs.opendir(x).await.unwrap()), ["f", "g"]);
            assert_eq!(listings(), 3);
        });
    }

    #[test]
    fn reads_within_blocks_that_arrived_are_answered_without_waiting() {
        rt().block_on(async {
            let (_dir, fs) = core();
            let reads = || fs.transport.reads.load(Ordering::SeqCst);
            let (f, _) = fs.create(1, OsStr::new("big"), 0o644, true).await.unwrap();
            let data: Vec<u8> = (0..3 * READ_BLOCK_SIZE).map(|i| (i * 13 % 251) as u8).collect();
            fs.write(f.ino, (0, Placement::AtOffset), &data).await.unwrap();
            fs.flush(f.ino).await.unwrap();
            fs.open(f.ino).unwrap();
            assert!(fs.read_now(f.ino, 0, 4096).is_none(), "nothing has arrived yet");
            assert_eq!(fs.read(f.ino, 0, 4096).await.unwrap(), &data[..4096]);
            let fetched = reads();
            let within = fs.read_now(f.ino, 4096, 4096).expect("block 0 has arrived").unwrap();
            assert_eq!(within, &data[4096..8192]);
            assert_eq!(reads(), fetched + 1, "block 0 is not asked again; block 1 is located ahead");
            // Sequential now: the next block is read ahead, and once it has
            // arrived a read across both blocks is answered at once.
            let across = READ_BLOCK_SIZE as u64 - 10;
            fs.read(f.ino, READ_BLOCK_SIZE as u64, 10).await.unwrap();
            let both = fs.read_now(f.ino, across, 20).expect("blocks 0 and 1 have arrived").unwrap();
            assert_eq!(both, &data[across as usize..across as usize + 20]);
        });
    }

    #[test]
    fn rename_of_a_directory_keeps_open_files_reachable() {
        rt().block_on(async {
            let (dir, fs) = core();
            let d = fs.mkdir(1, OsStr::new("d"), 0o755).await.unwrap();
            let (f, _) = fs.create(d.ino, OsStr::new("f"), 0o644, true).await.unwrap();
            fs.write(f.ino, (0, Placement::AtOffset), b"pending").await.unwrap();
            fs.rename(1, OsStr::new("d"), 1, OsStr::new("e"), RenameMode::Replace).await.unwrap();
            fs.write(f.ino, (7, Placement::AtOffset), b"!").await.unwrap();
            fs.flush(f.ino).await.unwrap();
            assert_eq!(fs.path_of(f.ino).unwrap(), "e/f");
            assert_eq!(std::fs::read(dir.path().join("u/e/f")).unwrap(), b"pending!");
        });
    }

    #[test]
    fn unlinked_inodes_go_stale_instead_of_touching_a_new_file() {
        rt().block_on(async {
            let (_dir, fs) = core();
            let (old, _) = fs.create(1, OsStr::new("a"), 0o644, true).await.unwrap();
            fs.unlink(1, OsStr::new("a")).await.unwrap();
            fs.create(1, OsStr::new("a"), 0o644, true).await.unwrap();
            assert_eq!(fs.getattr(old.ino).await, Err(FsError::Stale(old.ino)));
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Random writes and truncates through the core equal the same
        /// operations on a Vec, before and after flushing.
        #[test]
        fn random_writes_match_a_model(ops in proptest::collection::vec((0u64..3_000_000, 1usize..300_000, any::<u8>(), any::<bool>()), 1..12)) {
            rt().block_on(async {
                let (_dir, fs) = core();
                let (entry, _) = fs.create(1, OsStr::new("m"), 0o644, true).await.unwrap();
                let mut model: Vec<u8> = Vec::new();
                for (offset, len, byte, truncate) in ops {
                    if truncate {
                        fs.setattr(entry.ino, AttrChange { size: Some(offset), ..Default::default() }).await.unwrap();
                        model.resize(offset as usize, 0);
                    } else {
                        let data = vec![byte; len];
                        fs.write(entry.ino, (offset, Placement::AtOffset), &data).await.unwrap();
                        let end = offset as usize + len;
                        if model.len() < end { model.resize(end, 0); }
                        model[offset as usize..end].copy_from_slice(&data);
                    }
                }
                let back = fs.read(entry.ino, 0, model.len() as u32 + 10).await.unwrap();
                assert_eq!(back.len(), model.len());
                assert!(back == model);
            });
        }
    }
}
