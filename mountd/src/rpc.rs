//! Request/reply over Kafka: every filesystem call becomes one envelope on
//! `dfos.requests` (keyed by the owner of the tree it reaches: the user, or
//! the owner of a shared tree, so each tree's requests stay in order) and
//! comes back on this mount's own reply topic.
//!
//! Guarantees:
//! - [`Transport::submit`] enqueues synchronously, so requests submitted one
//!   after another from one task reach the log in that order;
//! - requests submitted behind (no one waits for their reply yet) are held
//!   at most [`BATCH_DELAY`], and travel in one `Request::Batch` with those
//!   that follow, still in order: the broker then carries one message, one
//!   reply and one fetch for a file's create and data instead of two each;
//! - every reply future resolves within the deadline: past it, `Timeout`
//!   (a read from the request log and its fallback share one deadline);
//! - a reply that arrives twice (several storage replicas) is delivered once,
//!   later copies are dropped;
//! - a large write's bytes are copied once in mountd, into its chunk: the
//!   envelope is encoded in front of them and librdkafka borrows the buffer
//!   until the delivery report.

use std::ffi::CString;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::{DashMap, DashSet};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use crate::batch::{batchable, may_follow_create, Batch, BATCH_DELAY};
use crate::chunk::{Chunk, Gathered};
use crate::file_bytes::FileBytes;
use crate::logread::{LogReadError, LogReader};
use dfos_protocol::limits::KAFKA_MAX_MESSAGE_BYTES;
use dfos_protocol::sharing::routing_key;
use dfos_protocol::{
    decode_reply, encode_envelope, encode_write_in_place, Batched, Envelope, ErrorCode, LogLocation, Payload, Request,
    Timestamp, Topics, PROTOCOL_VERSION,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    #[error("no reply within the deadline")]
    Timeout,
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("cannot encode request: {0}")]
    Encode(String),
    #[error("storage daemon answered: {0}")]
    Remote(ErrorCode),
}

pub type PendingReply = Pin<Box<dyn Future<Output = Result<Payload, RpcError>> + Send>>;

/// The replies of requests that joined a leader's message, or the
/// requests given back ([`Transport::submit_with`]).
pub type Joined = Result<Vec<PendingReply>, Vec<Request>>;

/// A request submitted behind, as later requests name it to travel with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leader(pub u64);

/// File bytes as fetched: shared out of a logged write, or in a node's reply.
pub enum Fetched {
    Logged(FileBytes),
    Reply(Payload),
}

pub type PendingFetch = Pin<Box<dyn Future<Output = Result<Fetched, RpcError>> + Send>>;

/// The only thing the filesystem core needs from the network, so the core
/// can be tested against an in-process store.
pub trait Transport: Clone + Send + Sync + 'static {
    /// Enqueues `request` now (requests enqueued one after another reach
    /// the log in that order) and returns a future for its reply.
    fn submit(&self, request: Request) -> Result<PendingReply, RpcError>;

    /// Like `submit`, for a request whose reply nobody waits for yet: it
    /// may be held back a moment to travel with the next request (in one
    /// `Request::Batch`), still in order with everything submitted after.
    fn submit_behind(&self, request: Request) -> Result<PendingReply, RpcError> {
        self.submit(request)
    }

    /// Like `submit` of a `Write` of `chunk`'s data at `offset`.
    fn submit_write(&self, path: &str, offset: u64, chunk: Chunk) -> Result<PendingReply, RpcError> {
        self.submit(Request::Write { path: path.to_owned(), offset, data: chunk.into_data() })
    }

    /// Like `submit_write`, for a chunk that a request follows at once: it
    /// may travel with that request, as `submit_behind` allows.
    fn submit_write_behind(&self, path: &str, offset: u64, chunk: Chunk) -> Result<PendingReply, RpcError> {
        self.submit_write(path, offset, chunk)
    }

    /// Sends at once whatever `submit_behind` still holds back: someone now
    /// waits for one of those replies, and nothing else may follow to carry
    /// it along.
    fn send_held(&self) {}

    /// Like `submit_behind`, and names the request so that later ones can
    /// ask to travel in its message ([`Transport::submit_with`]).
    fn submit_behind_leading(&self, request: Request) -> Result<(Leader, PendingReply), RpcError> {
        Ok((Leader(0), self.submit_behind(request)?))
    }

    /// Enqueues `requests`, in order, in the same message as `leader`, all
    /// or none: only while `leader` is still held back and only if they
    /// all may join it. `now`: that message goes out at once. `Err` gives
    /// them back, none enqueued (the caller must wait for `leader`'s reply
    /// instead). A node applies a message's requests in order, and refuses
    /// those behind a refused exclusive create of their path.
    fn submit_with(&self, leader: Leader, requests: Vec<Request>, now: bool) -> Joined {
        let _ = (leader, now);
        Err(requests)
    }

    /// The bytes at `location` in the request log; when they cannot be
    /// fetched from there, the reply to `plain_read` (a read of the same
    /// bytes). Without a log reader, just that read.
    fn read_logged(&self, location: LogLocation, plain_read: Request) -> Result<PendingFetch, RpcError> {
        let _ = location;
        let reply = self.submit(plain_read)?;
        Ok(Box::pin(async move { reply.await.map(Fetched::Reply) }))
    }
}

pub fn now() -> Timestamp {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp { secs: d.as_secs() as i64, nanos: d.subsec_nanos() }
}

/// Settings for connecting to Kafka, shared by every client of a mount.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub namespace: String,
    pub deadline: Duration,
    pub options: Vec<(String, String)>,
}

impl KafkaSettings {
    /// What to check when the brokers do not answer over TLS.
    pub fn unreachable_hint(&self) -> Option<&'static str> {
        dfos_protocol::topics::tls_unreachable_hint(&self.options)
    }

    /// A client with `tuning` applied first and the user's `-X` settings
    /// last, so an admin can override any of dfos's choices.
    pub fn client_config(&self, tuning: &[(&str, &str)]) -> ClientConfig {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &self.brokers);
        for (k, v) in tuning {
            cc.set(*k, *v);
        }
        for (k, v) in &self.options {
            cc.set(k, v);
        }
        cc
    }
}

impl KafkaSettings {
    /// How a mount produces its requests; the bench's raw-Kafka baseline
    /// produces with exactly this.
    pub fn request_producer_config(&self) -> ClientConfig {
        self.client_config(&[
            ("linger.ms", "0"),
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("message.timeout.ms", &self.deadline.as_millis().to_string()),
            // A write carries a whole chunk, more than librdkafka's default.
            ("message.max.bytes", &KAFKA_MAX_MESSAGE_BYTES.to_string()),
        ])
    }

    /// How a mount's consumers (manually assigned) are tuned; `extra` adds
    /// to it (the user's `-X` settings still come last). The bench's
    /// baselines consume with this too.
    pub fn consumer_config(&self, extra: &[(&str, &str)]) -> ClientConfig {
        let mut tuning = vec![
            ("group.id", "dfos-mountd-unused"),
            ("enable.auto.commit", "false"),
            // A long poll: the broker answers as soon as a message arrives, so this
            // only bounds idle fetches. 1 ms cost the idle broker ~20% of a core.
            ("fetch.wait.max.ms", "100"),
            ("fetch.error.backoff.ms", "20"),
        ];
        tuning.extend_from_slice(extra);
        self.client_config(&tuning)
    }
}

type Waiter = oneshot::Sender<Result<Payload, RpcError>>;

/// Replies are read once, within moments, so the reply topic keeps them
/// briefly: a full 64 MiB segment is deleted 10 s after its last reply, at
/// once rather than a minute later. Without this the broker kept an hour of
/// everything the mount read on its disk. (The broker looks for expired
/// segments every `log.retention.check.interval.ms`: 5 s with
/// `scripts/kafka.sh`, 5 min by Kafka's default.) Smaller segments cost
/// more: the broker flushes each segment it rolls, and 8 MiB segments made
/// a cold 1 GiB read 40% slower; 64 MiB costs no more than the noise. A mount whose reply
/// listener fell 10 s behind loses those replies, and their requests end in
/// a timeout, as with any lost reply.
const REPLY_TOPIC_CONFIG: [(&str, &str); 3] =
    [("retention.ms", "10000"), ("segment.bytes", "67108864"), ("file.delete.delay.ms", "0")];

pub struct KafkaRpc {
    settings: KafkaSettings,
    user: String,
    token: RwLock<String>,
    requests_topic: String,
    /// The same, for producing through librdkafka's C API.
    requests_topic_c: CString,
    reply_topic: String,
    producer: ThreadedProducer<RequestDeliveries>,
    /// After the producer, so it outlives it: librdkafka may read these.
    held: Arc<Held>,
    waiting: Arc<Waiting>,
    batch: Mutex<Batch>,
    /// Owners whose shared trees this mount has reached: their events
    /// concern it too.
    followed: Arc<DashSet<String>>,
    next_id: AtomicU64,
    stop: Arc<AtomicBool>,
    listener: Mutex<Option<JoinHandle<()>>>,
    log_reader: LogReader,
}

impl KafkaRpc {
    /// Creates this mount's reply topic and starts listening on it. Fails
    /// with a clear error when the broker does not answer within the deadline.
    pub async fn connect(settings: KafkaSettings, user: &str) -> Result<Arc<Self>, RpcError> {
        let topics = Topics::new(&settings.namespace);
        let mount_id = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
        let reply_topic = topics.reply(&mount_id);
        let admin: AdminClient<DefaultClientContext> =
            settings.client_config(&[]).create().map_err(|e| RpcError::Kafka(e.to_string()))?;
        let options =
            AdminOptions::new().request_timeout(Some(settings.deadline)).operation_timeout(Some(settings.deadline));
        let mut topic = NewTopic::new(&reply_topic, 1, TopicReplication::Fixed(-1));
        for (key, value) in REPLY_TOPIC_CONFIG {
            topic = topic.set(key, value);
        }
        let created = tokio::time::timeout(settings.deadline, admin.create_topics([&topic], &options))
            .await
            .map_err(|_| RpcError::Timeout)?
            .map_err(|e| RpcError::Kafka(e.to_string()))?;
        for result in created {
            result.map_err(|(t, code)| RpcError::Kafka(format!("cannot create {t}: {code}")))?;
        }
        let (waiting, held) = (Arc::new(Waiting::default()), Arc::new(Held::default()));
        let producer = settings
            .request_producer_config()
            .create_with_context(RequestDeliveries { waiting: waiting.clone(), held: held.clone() })
            .map_err(|e| RpcError::Kafka(e.to_string()))?;
        let log_reader = LogReader::start(
            manual_consumer(
                &settings,
                // Prefetch about one read-ahead window (16 chunks), not 64 MiB,
                // and fetch again soon after the reader drains it: by default
                // librdkafka waits a whole second once that queue was full,
                // which stalled a streaming read for that second.
                // Everything this consumer wants is in the log already, so it
                // never needs a long poll; and a seek waits for the fetch in
                // flight, which at the end of the log is that long poll: with
                // the reply consumer's 100 ms, a quarter of cold 256 MiB
                // reads stalled 100 ms at their start.
                &[
                    ("auto.offset.reset", "error"),
                    ("queued.max.messages.kbytes", "16384"),
                    ("fetch.queue.backoff.ms", "5"),
                    ("fetch.wait.max.ms", "10"),
                ],
            )?,
            topics.requests(),
            user.to_owned(),
            // A third of the deadline, so a failed fetch leaves time to
            // read the bytes plainly.
            settings.deadline / 3,
        )
        .map_err(|e| RpcError::Kafka(e.to_string()))?;
        let rpc = Arc::new(KafkaRpc {
            log_reader,
            requests_topic: topics.requests(),
            requests_topic_c: CString::new(topics.requests()).map_err(|e| RpcError::Kafka(e.to_string()))?,
            reply_topic,
            user: user.to_owned(),
            token: RwLock::new(String::new()),
            producer,
            held,
            waiting,
            batch: Mutex::new(Batch::default()),
            followed: Arc::new(DashSet::new()),
            next_id: AtomicU64::new(1),
            stop: Arc::new(AtomicBool::new(false)),
            listener: Mutex::new(None),
            settings,
        });
        let consumer = rpc.reply_consumer()?;
        let (waiting, stop) = (rpc.waiting.clone(), rpc.stop.clone());
        let handle = std::thread::Builder::new()
            .name("dfos-replies".into())
            .spawn(move || listen(consumer, waiting, stop))
            .map_err(|e| RpcError::Kafka(e.to_string()))?;
        *rpc.listener.lock().unwrap() = Some(handle);
        Ok(rpc)
    }

    /// Manual assignment from the beginning: no consumer-group join delay,
    /// and no reply is missed even if it lands before the consumer starts.
    fn reply_consumer(&self) -> Result<BaseConsumer, RpcError> {
        let consumer = manual_consumer(&self.settings, &[])?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.reply_topic, 0, Offset::Beginning)
            .map_err(|e| RpcError::Kafka(e.to_string()))?;
        consumer.assign(&tpl).map_err(|e| RpcError::Kafka(e.to_string()))?;
        Ok(consumer)
    }

    /// This mount's identity in events: its reply topic.
    pub fn origin(&self) -> &str {
        &self.reply_topic
    }

    /// The owners of the shared trees this mount has sent requests into,
    /// growing as it reaches more.
    pub fn followed_owners(&self) -> Arc<DashSet<String>> {
        self.followed.clone()
    }

    /// The record key `request` travels under: its owner's name, so it is
    /// ordered with the owner's own requests (see `dfos_protocol::sharing`).
    fn key_of<'a>(&'a self, request: &'a Request) -> &'a str {
        let key = routing_key(&self.user, request);
        if key != self.user && !self.followed.contains(key) {
            self.followed.insert(key.to_owned());
        }
        key
    }

    /// Logs in and keeps the session token for every later request.
    pub async fn login(self: &Arc<Self>, password: &str) -> Result<(), RpcError> {
        let reply = self.submit(Request::Login { password: password.to_owned() })?.await?;
        match reply {
            Payload::LoggedIn { token } => {
                *self.token.write().unwrap() = token;
                Ok(())
            }
            _ => Err(RpcError::Remote(ErrorCode::Io)),
        }
    }

    /// Stops the listener, then deletes the reply topic. The order matters:
    /// deleting a topic under an assigned consumer crashes librdkafka.
    pub async fn shutdown(self: &Arc<Self>) {
        // Requests that went behind still go out, and before the listener
        // stops, so they are applied even though no one hears the answer.
        self.send_batch(&mut self.batch.lock().unwrap());
        let _ = self.producer.flush(Duration::from_secs(2));
        self.log_reader.stop();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.listener.lock().unwrap().take() {
            let _ = handle.join();
        }
        let admin: Result<AdminClient<DefaultClientContext>, _> = self.settings.client_config(&[]).create();
        if let Ok(admin) = admin {
            let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
            let deleted =
                tokio::time::timeout(Duration::from_secs(6), admin.delete_topics(&[&self.reply_topic], &options)).await;
            if !matches!(deleted, Ok(Ok(_))) {
                log::warn!("op=shutdown topic={} could not delete reply topic; retention removes it", self.reply_topic);
            }
        }
    }
}

/// A consumer for manual assignment, tuned for one mount's reads.
fn manual_consumer(settings: &KafkaSettings, extra: &[(&str, &str)]) -> Result<BaseConsumer, RpcError> {
    settings.consumer_config(extra).create().map_err(|e| RpcError::Kafka(e.to_string()))
}

fn listen(consumer: BaseConsumer, waiting: Arc<Waiting>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Some(polled) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = match polled {
            Ok(m) => m,
            Err(e) => {
                log::debug!("op=reply-poll error={e}");
                continue;
            }
        };
        match decode_reply(message.payload().unwrap_or_default()) {
            Ok(reply) => {
                if !waiting.resolve(reply.request_id, reply.result.map_err(RpcError::Remote)) {
                    log::trace!("op=reply req={} node={} duplicate or late reply dropped", reply.request_id, reply.node)
                }
            }
            Err(e) => log::warn!("op=reply offset={} undecodable reply skipped: {e}", message.offset()),
        }
    }
}

impl Transport for Arc<KafkaRpc> {
    fn submit(&self, request: Request) -> Result<PendingReply, RpcError> {
        self.enqueue(request, true)
    }

    fn submit_behind(&self, request: Request) -> Result<PendingReply, RpcError> {
        self.enqueue(request, false)
    }

    fn send_held(&self) {
        self.send_batch(&mut self.batch.lock().unwrap());
    }

    fn submit_write(&self, path: &str, offset: u64, chunk: Chunk) -> Result<PendingReply, RpcError> {
        self.enqueue_write(path, offset, chunk, true)
    }

    fn submit_write_behind(&self, path: &str, offset: u64, chunk: Chunk) -> Result<PendingReply, RpcError> {
        self.enqueue_write(path, offset, chunk, false)
    }

    fn submit_behind_leading(&self, request: Request) -> Result<(Leader, PendingReply), RpcError> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Ok((Leader(request_id), self.enqueue_as(request_id, request.into(), false)?))
    }

    fn submit_with(&self, leader: Leader, requests: Vec<Request>, now: bool) -> Joined {
        let mut batch = self.batch.lock().unwrap();
        let keys: Vec<String> = requests.iter().map(|request| routing_key(&self.user, request).to_owned()).collect();
        let joins = batch.holds(leader.0)
            && requests.iter().all(may_follow_create)
            && batch.fits_all(requests.iter().zip(keys.iter().map(String::as_str)));
        if !joins {
            return Err(requests);
        }
        let mut replies = Vec::with_capacity(requests.len());
        for (request, key) in requests.into_iter().zip(keys) {
            let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
            replies.push(self.awaiting(request_id, request.name(), request.path().to_owned()));
            log::debug!(
                "op={} user={} path={:?} req={request_id} submitted with req={}",
                request.name(),
                self.user,
                request.path(),
                leader.0
            );
            batch.push(request_id, request, &key);
        }
        if now {
            self.send_batch(&mut batch);
        }
        Ok(replies)
    }

    /// The fetch, and the plain read after a failed one, share one deadline.
    fn read_logged(&self, location: LogLocation, plain_read: Request) -> Result<PendingFetch, RpcError> {
        let rpc = self.clone();
        let exchange = async move {
            match rpc.log_reader.fetch(location).await {
                Ok(bytes) => Ok(Fetched::Logged(bytes)),
                Err(e) => {
                    let level = if e == LogReadError::Passed { log::Level::Debug } else { log::Level::Info };
                    log::log!(
                        level,
                        "op=read-from-log user={} path={:?} error={e}; reading it plainly",
                        rpc.user,
                        plain_read.path()
                    );
                    rpc.enqueue(plain_read, true)?.await.map(Fetched::Reply)
                }
            }
        };
        let deadline = self.settings.deadline;
        Ok(Box::pin(async move { tokio::time::timeout(deadline, exchange).await.unwrap_or(Err(RpcError::Timeout)) }))
    }
}

impl KafkaRpc {
    /// A small write joins the batch (sent at once when `now`); a large
    /// one is encoded around its data, in place, and always travels alone.
    fn enqueue_write(
        self: &Arc<Self>,
        path: &str,
        offset: u64,
        chunk: Chunk,
        now: bool,
    ) -> Result<PendingReply, RpcError> {
        let path = path.to_owned();
        match chunk.into_gathered() {
            Gathered::Data(data) => self.enqueue(Request::Write { path, offset, data }, now),
            Gathered::Framed(framed) => self.enqueue(Outgoing::Write { path, offset, framed }, true),
        }
    }

    /// Enqueues `request`, alone or with the requests queued behind, and
    /// returns the future of its reply. `now`: the batch goes out at once
    /// (someone waits for this reply); otherwise within [`BATCH_DELAY`].
    fn enqueue(self: &Arc<Self>, outgoing: impl Into<Outgoing>, now: bool) -> Result<PendingReply, RpcError> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.enqueue_as(request_id, outgoing.into(), now)
    }

    /// [`KafkaRpc::enqueue`] under a request id already taken.
    fn enqueue_as(self: &Arc<Self>, request_id: u64, outgoing: Outgoing, now: bool) -> Result<PendingReply, RpcError> {
        let (op, path) = match &outgoing {
            Outgoing::Request(request) => (request.name(), request.path().to_owned()),
            Outgoing::Write { path, .. } => ("write", path.clone()),
        };
        let reply = self.awaiting(request_id, op, path.clone());
        {
            let mut batch = self.batch.lock().unwrap();
            match outgoing {
                Outgoing::Request(request) if batchable(&request) => {
                    let key = routing_key(&self.user, &request).to_owned();
                    if !batch.fits(&request, &key) {
                        self.send_batch(&mut batch);
                    }
                    let first = batch.is_empty();
                    batch.push(request_id, request, &key);
                    if now {
                        self.send_batch(&mut batch);
                    } else if first {
                        let (rpc, generation) = (self.clone(), batch.generation());
                        tokio::spawn(async move {
                            tokio::time::sleep(BATCH_DELAY).await;
                            let mut batch = rpc.batch.lock().unwrap();
                            if batch.is_still(generation) {
                                rpc.send_batch(&mut batch);
                            }
                        });
                    }
                }
                alone => {
                    self.send_batch(&mut batch);
                    self.produce(request_id, alone);
                }
            }
        }
        log::debug!("op={op} user={} path={path:?} req={request_id} submitted", self.user);
        Ok(reply)
    }

    /// Registers a waiter for `request_id`'s reply and returns the future
    /// that gives it, within the deadline.
    fn awaiting(&self, request_id: u64, op: &'static str, path: String) -> PendingReply {
        let (tx, rx) = oneshot::channel();
        self.waiting.replies.insert(request_id, tx);
        let (waiting, deadline, user) = (self.waiting.clone(), self.settings.deadline, self.user.clone());
        Box::pin(async move {
            let outcome = match tokio::time::timeout(deadline, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(RpcError::Kafka("reply channel closed".into())),
                Err(_) => {
                    waiting.forget(request_id);
                    Err(RpcError::Timeout)
                }
            };
            match &outcome {
                Err(RpcError::Remote(_)) | Ok(_) => {}
                Err(e) => {
                    log::warn!("op={op} user={user} path={path:?} req={request_id} error={e}")
                }
            }
            outcome
        })
    }

    /// Sends what is queued: one request as itself, several as a batch.
    /// The caller holds the batch lock, so messages reach the log in the
    /// order their requests were enqueued.
    fn send_batch(self: &Arc<Self>, batch: &mut Batch) {
        let mut queued = batch.take();
        match queued.len() {
            0 => {}
            1 => {
                let (request_id, request) = queued.pop().expect("one request");
                self.produce(request_id, request.into());
            }
            _ => {
                let batch_id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let members: Vec<u64> = queued.iter().map(|(request_id, _)| *request_id).collect();
                let requests =
                    queued.into_iter().map(|(request_id, request)| Batched { request_id, request }).collect();
                log::debug!("op=batch user={} req={batch_id} requests={members:?}", self.user);
                self.waiting.batches.insert(batch_id, members);
                self.produce(batch_id, Request::Batch { requests }.into());
            }
        }
    }

    /// Produces one envelope; its failure (now, or in the delivery report)
    /// becomes the reply of whoever waits for `request_id`.
    fn produce(self: &Arc<Self>, request_id: u64, outgoing: Outgoing) {
        let (request, framed) = match outgoing {
            Outgoing::Request(request) => (request, None),
            Outgoing::Write { path, offset, framed } => {
                (Request::Write { path, offset, data: Vec::new() }, Some(framed))
            }
        };
        let envelope = Envelope {
            version: PROTOCOL_VERSION,
            request_id,
            reply_to: self.reply_topic.clone(),
            user: self.user.clone(),
            token: self.token.read().unwrap().clone(),
            client_time: now(),
            request,
        };
        let lent = framed.is_some();
        let encoded = match framed {
            None => encode_envelope(&envelope).map(|bytes| (bytes, 0)),
            Some(mut buffer) => encode_write_in_place(&envelope, &mut buffer).map(|start| (buffer, start)),
        };
        let (bytes, start) = match encoded {
            Ok(encoded) => encoded,
            Err(e) => {
                self.waiting.resolve(request_id, Err(RpcError::Encode(e.to_string())));
                return;
            }
        };
        // The delivery report only matters when it fails (RequestDeliveries):
        // the reply, which can come first, is what completes a request.
        let sent = if lent {
            self.produce_uncopied(request_id, bytes, start, self.key_of(&envelope.request))
        } else {
            let record = BaseRecord::with_opaque_to(&self.requests_topic, request_id as usize)
                .key(self.key_of(&envelope.request))
                .payload(&bytes);
            self.producer.send(record).map_err(|(e, _)| e.to_string())
        };
        if let Err(e) = sent {
            self.waiting.resolve(request_id, Err(RpcError::Kafka(e)));
        }
    }

    /// Produces `message[start..]` (a chunk encoded in place) without the
    /// copy rust-rdkafka always asks librdkafka for: the buffer is lent to
    /// librdkafka, kept in [`Held`] until its delivery report drops it.
    fn produce_uncopied(&self, request_id: u64, message: Vec<u8>, start: usize, key: &str) -> Result<(), String> {
        use rdkafka::bindings::{rd_kafka_producev, rd_kafka_resp_err_t, rd_kafka_vtype_t::*};
        let payload = &message[start..];
        let (payload_ptr, payload_len) = (payload.as_ptr(), payload.len());
        // Moving the Vec into the map leaves its heap buffer where it is.
        self.held.insert(request_id, message);
        let key = key.as_bytes();
        // SAFETY: the call mirrors rust-rdkafka's own BaseProducer::send,
        // with message flags 0 instead of RD_KAFKA_MSG_F_COPY: librdkafka
        // reads the payload until the message's delivery report, and the
        // buffer stays in `held` until RequestDeliveries removes it in that
        // report (or below, when librdkafka refuses the message). The
        // opaque is the request id, as RequestDeliveries expects.
        let error = unsafe {
            rd_kafka_producev(
                self.producer.client().native_ptr(),
                RD_KAFKA_VTYPE_TOPIC,
                self.requests_topic_c.as_ptr(),
                RD_KAFKA_VTYPE_PARTITION,
                -1i32,
                RD_KAFKA_VTYPE_MSGFLAGS,
                0i32,
                RD_KAFKA_VTYPE_VALUE,
                payload_ptr as *mut std::ffi::c_void,
                payload_len,
                RD_KAFKA_VTYPE_KEY,
                key.as_ptr() as *mut std::ffi::c_void,
                key.len(),
                RD_KAFKA_VTYPE_OPAQUE,
                request_id as usize as *mut std::ffi::c_void,
                RD_KAFKA_VTYPE_END,
            )
        };
        if error == rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Ok(());
        }
        self.held.remove(&request_id);
        Err(rdkafka::error::RDKafkaErrorCode::from(error).to_string())
    }
}

/// Messages lent to librdkafka uncopied, by request id, until delivered.
type Held = DashMap<u64, Vec<u8>>;

/// Delivery reports of the request producer, on its polling thread: a
/// failure becomes the answer of whoever waits for that request (or the
/// requests of that batch); a success costs no hand-off to anyone.
struct RequestDeliveries {
    waiting: Arc<Waiting>,
    held: Arc<Held>,
}

impl ClientContext for RequestDeliveries {}

impl ProducerContext for RequestDeliveries {
    /// The request id.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, request_id: usize) {
        self.held.remove(&(request_id as u64));
        if let Err((e, _)) = result {
            self.waiting.resolve(request_id as u64, Err(RpcError::Kafka(e.to_string())));
        }
    }
}

/// What one message carries: a request, or a write whose data already
/// sits in its message buffer, behind room for the envelope ([`Chunk`]).
enum Outgoing {
    Request(Request),
    Write { path: String, offset: u64, framed: Vec<u8> },
}

impl From<Request> for Outgoing {
    fn from(request: Request) -> Self {
        Outgoing::Request(request)
    }
}

/// Who waits for which reply: a request's own waiter by its id, and the
/// ids of a batch's requests by the batch's id.
#[derive(Default)]
struct Waiting {
    replies: DashMap<u64, Waiter>,
    batches: DashMap<u64, Vec<u64>>,
}

/// Never a request id (they start at 1): a batch member that gave up.
const GAVE_UP: u64 = 0;

impl Waiting {
    /// A request past its deadline: nobody waits for it any more, and a
    /// batch whose members all gave up is dropped (its reply, if it ever
    /// comes, finds no one).
    fn forget(&self, request_id: u64) {
        self.replies.remove(&request_id);
        self.batches.retain(|_, members| {
            for member in members.iter_mut().filter(|member| **member == request_id) {
                *member = GAVE_UP;
            }
            members.iter().any(|member| *member != GAVE_UP)
        });
    }

    /// Hands the answer to `request_id` to whoever waits for it; `false`
    /// when nobody does (a second replica's copy, or a reply too late).
    fn resolve(&self, request_id: u64, result: Result<Payload, RpcError>) -> bool {
        let Some((_, members)) = self.batches.remove(&request_id) else {
            return match self.replies.remove(&request_id) {
                Some((_, waiter)) => {
                    let _ = waiter.send(result);
                    true
                }
                None => false,
            };
        };
        let mut results: Vec<Result<Payload, RpcError>> = match result {
            Ok(Payload::Batch(results)) => results.into_iter().map(|r| r.map_err(RpcError::Remote)).collect(),
            Ok(_) => Vec::new(),
            Err(e) => vec![Err(e); members.len()],
        };
        results.resize(members.len(), Err(RpcError::Remote(ErrorCode::Io)));
        for (member, result) in members.into_iter().zip(results) {
            if let Some((_, waiter)) = self.replies.remove(&member) {
                let _ = waiter.send(result);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_answer_reaches_each_request_and_a_failure_all_of_them() {
        let waiting = Waiting::default();
        let wait = |id| {
            let (tx, rx) = oneshot::channel();
            waiting.replies.insert(id, tx);
            rx
        };
        let (mut one, mut two) = (wait(1), wait(2));
        waiting.batches.insert(10, vec![1, 2]);
        let answers = Payload::Batch(vec![Ok(Payload::Done), Err(ErrorCode::NotFound)]);
        assert!(waiting.resolve(10, Ok(answers)));
        assert_eq!(one.try_recv().unwrap(), Ok(Payload::Done));
        assert_eq!(two.try_recv().unwrap(), Err(RpcError::Remote(ErrorCode::NotFound)));
        assert!(!waiting.resolve(10, Ok(Payload::Done)), "a second replica's copy finds no one");
        let (mut three, mut four) = (wait(3), wait(4));
        waiting.batches.insert(11, vec![3, 4]);
        assert!(waiting.resolve(11, Err(RpcError::Timeout)));
        assert_eq!(three.try_recv().unwrap(), Err(RpcError::Timeout));
        assert_eq!(four.try_recv().unwrap(), Err(RpcError::Timeout));
        let mut five = wait(5);
        waiting.batches.insert(12, vec![5]);
        assert!(waiting.resolve(12, Ok(Payload::Batch(vec![]))));
        assert_eq!(five.try_recv().unwrap(), Err(RpcError::Remote(ErrorCode::Io)), "an answer short of requests");
    }

    #[test]
    fn a_batch_whose_requests_all_gave_up_is_forgotten_and_the_others_keep_their_places() {
        let waiting = Waiting::default();
        let mut rx = Vec::new();
        for id in [1, 2] {
            let (tx, r) = oneshot::channel();
            waiting.replies.insert(id, tx);
            rx.push(r);
        }
        waiting.batches.insert(10, vec![1, 2]);
        waiting.forget(1);
        assert!(waiting.batches.contains_key(&10), "request 2 still waits");
        let answers = Payload::Batch(vec![Ok(Payload::Done), Err(ErrorCode::Exists)]);
        assert!(waiting.resolve(10, Ok(answers)));
        assert_eq!(
            rx[1].try_recv().unwrap(),
            Err(RpcError::Remote(ErrorCode::Exists)),
            "its own answer, not the first"
        );
        waiting.batches.insert(11, vec![3, 4]);
        waiting.forget(3);
        waiting.forget(4);
        assert!(waiting.batches.is_empty());
    }
}
