//! File data fetched straight from the request log.
//!
//! A storage node may say where file bytes are ([`LogLocation`]s in its
//! answer to `LocateInLog`): in the data of a `Write` still in
//! `dfos.requests`. Fetching that message
//! moves the data through the broker once, the way any Kafka consumer reads,
//! instead of having the node produce it into a reply topic first.
//!
//! One thread owns one consumer. It serves the wanted messages in offset
//! order and streams forward through short gaps, so a file written in one go
//! is read back as one sequential fetch; it seeks only for a wanted message
//! behind it or far ahead.
//!
//! Guarantees:
//! - bytes are handed out only from a `Write` of this mount's user whose
//!   request id and file offset match the location;
//! - every fetch ends by its deadline; any failure (the message is gone by
//!   retention, Kafka refuses access, a mismatch) is an error the caller
//!   answers by asking for the bytes themselves;
//! - memory is bounded by the consumer's queue (`queued.max.messages.kbytes`),
//!   [`RECENTLY_PASSED`] held messages, and the messages whose blocks the
//!   read-ahead still holds. Blocks are ranges of the message as the Kafka
//!   client received it ([`HeldMessage`]): no byte is copied between the
//!   socket and the reply to the kernel.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use crate::file_bytes::FileBytes;
use dfos_protocol::{decode_write_view, LogLocation, APPEND_AT_END};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogReadError {
    #[error("not fetched within the deadline")]
    Timeout,
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("the message at the location is not the write it should be: {0}")]
    Mismatch(&'static str),
    #[error("the consumer has just passed that message")]
    Passed,
    #[error("the log reader has stopped")]
    Stopped,
}

/// A wanted message further ahead than this many offsets is sought, not
/// streamed to: streaming reads every message in between.
const MAX_GAP: i64 = 64;
/// Messages passed that are kept for a moment: the answers to a window of
/// read-aheads arrive slightly out of order, the later blocks of a chunk
/// are wanted after its first, and a want that comes just after its
/// message went by would otherwise cost a seek back (which also drops
/// everything prefetched). At most four chunks, 15 MiB.
const RECENTLY_PASSED: usize = 4;
/// An idle consumer lets go of its partition, so it stops fetching.
const IDLE_RELEASE: Duration = Duration::from_millis(500);

type Answer = oneshot::Sender<Result<FileBytes, LogReadError>>;

struct Want {
    location: LogLocation,
    deadline: Instant,
    answer: Answer,
}

pub struct LogReader {
    wants: Mutex<Sender<Want>>,
    deadline: Duration,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl LogReader {
    /// `consumer` must be unassigned; it reads `topic` for `user`.
    pub fn start(consumer: BaseConsumer, topic: String, user: String, deadline: Duration) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut fetcher = Fetcher {
            consumer: Arc::new(consumer),
            topic,
            user,
            receiver,
            wants: BTreeMap::new(),
            recently_passed: VecDeque::new(),
            next: None,
        };
        let thread_stop = stop.clone();
        let thread =
            std::thread::Builder::new().name("dfos-log-reader".into()).spawn(move || fetcher.run(&thread_stop))?;
        Ok(LogReader { wants: Mutex::new(sender), deadline, stop, thread: Mutex::new(Some(thread)) })
    }

    /// The `location.len` bytes the location describes.
    pub async fn fetch(&self, location: LogLocation) -> Result<FileBytes, LogReadError> {
        let (answer, answered) = oneshot::channel();
        let want = Want { location, deadline: Instant::now() + self.deadline, answer };
        self.wants.lock().unwrap().send(want).map_err(|_| LogReadError::Stopped)?;
        answered.await.map_err(|_| LogReadError::Stopped)?
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.lock().unwrap().take() {
            let _ = thread.join();
        }
    }
}

struct Fetcher {
    consumer: Arc<BaseConsumer>,
    topic: String,
    user: String,
    receiver: Receiver<Want>,
    wants: BTreeMap<(i32, i64), Vec<Want>>,
    recently_passed: VecDeque<((i32, i64), Decoded)>,
    /// Partition assigned and the offset the consumer delivers next.
    next: Option<(i32, i64)>,
}

impl Fetcher {
    fn run(&mut self, stop: &AtomicBool) {
        // A consumer's first fetch waits for metadata and connections; do
        // that now, not during the mount's first read.
        if let Err(e) = self.consumer.fetch_metadata(Some(&self.topic), Duration::from_secs(10)) {
            log::debug!("op=log-read user={} metadata error={e}", self.user);
        }
        let mut idle_since = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if self.wants.is_empty() {
                match self.receiver.recv_timeout(Duration::from_millis(100)) {
                    Ok(want) => self.add(want),
                    Err(RecvTimeoutError::Timeout) => {
                        if self.next.is_some() && idle_since.elapsed() > IDLE_RELEASE {
                            let _ = self.consumer.unassign();
                            self.next = None;
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            while let Ok(want) = self.receiver.try_recv() {
                self.add(want);
            }
            self.expire();
            if let Err(e) = self.position_for_first_want() {
                self.fail_all(&e);
                continue;
            }
            if !self.wants.is_empty() {
                self.poll_once();
            }
            idle_since = Instant::now();
        }
        self.fail_all(&LogReadError::Stopped);
        // Blocks still cached keep the consumer alive (they are its
        // messages); it must not stay assigned to the request topic then.
        let _ = self.consumer.unassign();
    }

    fn add(&mut self, want: Want) {
        let key = (want.location.partition, want.location.offset);
        if let Some((_, write)) = self.recently_passed.iter().find(|(passed, _)| *passed == key) {
            let _ = want.answer.send(extract(write, &want.location, &self.user));
            return;
        }
        self.wants.entry(key).or_default().push(want);
    }

    fn expire(&mut self) {
        let now = Instant::now();
        for wants in self.wants.values_mut() {
            let (expired, waiting): (Vec<Want>, Vec<Want>) =
                std::mem::take(wants).into_iter().partition(|want| want.deadline <= now);
            *wants = waiting;
            for want in expired {
                let _ = want.answer.send(Err(LogReadError::Timeout));
            }
        }
        self.wants.retain(|_, wants| !wants.is_empty());
    }

    fn fail_all(&mut self, error: &LogReadError) {
        for (_, wants) in std::mem::take(&mut self.wants) {
            for want in wants {
                let _ = want.answer.send(Err(error.clone()));
            }
        }
    }

    /// Streams on if the first wanted message lies a little ahead of the
    /// consumer. One just behind it (asked for again, or answered late) is
    /// refused, so the caller reads it plainly: seeking back would drop
    /// the prefetched stream and cost more than one chunk in a reply. Only
    /// a wanted message far from the consumer is sought.
    fn position_for_first_want(&mut self) -> Result<(), LogReadError> {
        let Some(&(partition, offset)) = self.wants.keys().next() else { return Ok(()) };
        if let Some((p, next)) = self.next {
            if p == partition && next <= offset && offset - next <= MAX_GAP {
                return Ok(());
            }
            if p == partition && offset < next && next - offset <= MAX_GAP {
                for want in self.wants.remove(&(partition, offset)).unwrap_or_default() {
                    let _ = want.answer.send(Err(LogReadError::Passed));
                }
                return Ok(());
            }
        }
        log::debug!("op=log-read user={} seek partition={partition} offset={offset} from={:?}", self.user, self.next);
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&self.topic, partition, Offset::Offset(offset))
            .and_then(|()| self.consumer.assign(&assignment))
            .map_err(|e| LogReadError::Kafka(e.to_string()))?;
        self.next = Some((partition, offset));
        Ok(())
    }

    fn poll_once(&mut self) {
        let message = match self.consumer.poll(Duration::from_millis(50)) {
            None => return,
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                // Out of range (deleted by retention), not authorized, ...:
                // the callers ask for the bytes themselves.
                log::debug!("op=log-read user={} error={e}", self.user);
                self.next = None;
                self.fail_all(&LogReadError::Kafka(e.to_string()));
                return;
            }
        };
        let key = (message.partition(), message.offset());
        self.next = Some((key.0, key.1 + 1));
        let message = HeldMessage::new(message, &self.consumer);
        // Offsets the log does not hold (a gap) were passed without a message.
        let passed: Vec<(i32, i64)> = self.wants.range((key.0, i64::MIN)..key).map(|(&passed, _)| passed).collect();
        for passed in passed {
            for want in self.wants.remove(&passed).unwrap_or_default() {
                let _ = want.answer.send(Err(LogReadError::Mismatch("no message at that offset")));
            }
        }
        // Decoded once: the blocks of one chunk are several wants, and
        // those of its blocks that enter the read-ahead window later find
        // it among the recently passed.
        let write = decode_write(FileBytes::shared(Arc::new(message), 0..usize::MAX));
        for want in self.wants.remove(&key).unwrap_or_default() {
            let _ = want.answer.send(extract(&write, &want.location, &self.user));
        }
        if self.recently_passed.len() == RECENTLY_PASSED {
            self.recently_passed.pop_front();
        }
        self.recently_passed.push_back((key, write));
    }
}

/// A consumed message kept after the poll that returned it, so file bytes
/// are served out of the Kafka client's buffer instead of a copy.
struct HeldMessage {
    // Declared first, so it is dropped before the consumer it borrows from.
    message: BorrowedMessage<'static>,
    _consumer: Arc<BaseConsumer>,
}

impl HeldMessage {
    fn new(message: BorrowedMessage<'_>, consumer: &Arc<BaseConsumer>) -> Self {
        // SAFETY: a polled message owns its memory (librdkafka's event,
        // freed when the message drops) and only needs its client alive,
        // which the Arc kept beside it guarantees for as long as it lives.
        let message = unsafe { std::mem::transmute::<BorrowedMessage<'_>, BorrowedMessage<'static>>(message) };
        HeldMessage { message, _consumer: consumer.clone() }
    }
}

impl AsRef<[u8]> for HeldMessage {
    fn as_ref(&self) -> &[u8] {
        self.message.payload().unwrap_or_default()
    }
}

/// A logged message decoded as far as a located read needs it.
type Decoded = Result<LoggedWrite, LogReadError>;

struct LoggedWrite {
    user: String,
    request_id: u64,
    offset: u64,
    /// The write's data, a range of the message: shared by every block
    /// handed out of it.
    data: FileBytes,
}

fn decode_write(message: FileBytes) -> Decoded {
    let view = decode_write_view(&message).map_err(|_| LogReadError::Mismatch("not a decodable write"))?;
    let start = view.data.as_ptr() as usize - message.as_ptr() as usize;
    let data = message.slice(start..start + view.data.len());
    Ok(LoggedWrite { user: view.user.to_owned(), request_id: view.request_id, offset: view.offset, data })
}

/// The located bytes out of a logged request, after checking it is the
/// write the location names.
fn extract(write: &Decoded, location: &LogLocation, user: &str) -> Result<FileBytes, LogReadError> {
    let write = write.as_ref().map_err(Clone::clone)?;
    if write.user != user {
        return Err(LogReadError::Mismatch("another user's request"));
    }
    if write.request_id != location.request_id {
        return Err(LogReadError::Mismatch("another request id"));
    }
    // An append's place is the node's to say (it placed it as it applied it).
    if write.offset != location.file_offset && write.offset != APPEND_AT_END {
        return Err(LogReadError::Mismatch("another file offset"));
    }
    let (skip, len) = (location.skip as usize, location.len as usize);
    if skip + len > write.data.len() {
        return Err(LogReadError::Mismatch("shorter than the location"));
    }
    let bytes = write.data.slice(skip..skip + len);
    // A small piece of a large chunk is copied, so a cached block never
    // keeps more than four times its own size alive.
    if len * 4 < write.data.len() {
        return Ok(bytes.to_vec().into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfos_protocol::{encode_envelope, Envelope, Request, Timestamp, PROTOCOL_VERSION};

    fn logged_write(user: &str, request_id: u64, offset: u64, data: Vec<u8>) -> Vec<u8> {
        encode_envelope(&Envelope {
            version: PROTOCOL_VERSION,
            request_id,
            reply_to: "r".into(),
            user: user.into(),
            token: "t".into(),
            client_time: Timestamp::default(),
            request: Request::Write { path: "f".into(), offset, data },
        })
        .unwrap()
    }

    fn location(skip: u32, len: u32) -> LogLocation {
        LogLocation { partition: 0, offset: 5, request_id: 7, file_offset: 100, skip, len }
    }

    #[test]
    fn the_located_bytes_come_out_of_the_right_write_only() {
        let decode = |bytes: Vec<u8>| decode_write(bytes.into());
        let write = decode(logged_write("u", 7, 100, (0..10).collect()));
        assert_eq!(extract(&write, &location(0, 10), "u").unwrap(), (0..10).collect::<Vec<u8>>());
        assert_eq!(extract(&write, &location(3, 4), "u").unwrap(), vec![3, 4, 5, 6]);
        assert!(extract(&write, &location(8, 4), "u").is_err(), "past the data");
        assert!(extract(&write, &location(0, 4), "v").is_err(), "another user");
        let other_id = decode(logged_write("u", 8, 100, vec![0; 10]));
        assert!(extract(&other_id, &location(0, 4), "u").is_err(), "another id");
        let other_offset = decode(logged_write("u", 7, 0, vec![0; 10]));
        assert!(extract(&other_offset, &location(0, 4), "u").is_err(), "another offset");
        let append = decode(logged_write("u", 7, APPEND_AT_END, vec![0; 10]));
        assert!(extract(&append, &location(0, 4), "u").is_ok(), "an append, wherever the node placed it");
        assert!(extract(&decode(b"garbage".to_vec()), &location(0, 4), "u").is_err());
    }
}
