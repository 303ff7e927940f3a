//! The storage daemon's Kafka loop: consume `dfos.requests`, authenticate,
//! apply, reply.
//!
//! Every node is a full replica: it reads every partition of the request
//! topic, in order, from the offset its own checkpoint records, and replies
//! to every request; mountd keeps the first reply.
//!
//! Guarantees:
//! - a message that cannot be decoded, carries a bad token or fails to
//!   apply costs one log line and never stops the loop;
//! - requests of one partition (so of one user) are applied in log order;
//! - each request takes effect once: offsets at or below the checkpoint are
//!   skipped; a batch's requests that finished before a crash are answered
//!   from their recorded outcome, not applied again; and the one request
//!   per partition that a crash can leave half done is settled by its own
//!   result (see [`Service::settle_in_doubt`]). After a clean stop, or a
//!   crash between mutations, nothing is in doubt;
//! - the reply is sent only after the effect and its offset are recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode as Code;
use rdkafka::{Offset, TopicPartitionList};

use dfos_protocol::limits::{KAFKA_MAX_MESSAGE_BYTES, MAX_BATCH_REQUESTS};
use dfos_protocol::sharing::partition_of;
use dfos_protocol::topics::DEFAULT_REQUEST_PARTITIONS;
use dfos_protocol::{
    decode_envelope, encode_event, encode_reply, Batched, Change, DirEntry, Envelope, ErrorCode, Event, FileKind,
    Listing, Payload, RefusedCreates, RenameMode, Reply, Request, Topics, XattrMode, APPEND_AT_END, PROTOCOL_VERSION,
};

use crate::checkpoint::{read_applied, Checkpoint, InDoubt, Stage};
use crate::credentials::Credentials;
use crate::log_index::{FileStamp, LogIndex, LogPosition, MIN_EXTENT_BYTES};
use crate::session;
use crate::sharing::{self, without_write_bits, Grants, Route};
use crate::store::Store;
use crate::Config;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("Kafka client error: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot create topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    #[error("Kafka broker {0} did not answer within {1:?}")]
    BrokerTimeout(String, Duration),
}

/// A client with `tuning` applied first and the admin's `-X` settings
/// last, so they can override any of dfos's choices.
pub fn client_config(config: &Config, tuning: &[(&str, &str)]) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers);
    for (key, value) in tuning {
        cc.set(*key, *value);
    }
    for (key, value) in &config.kafka_options {
        cc.set(key, value);
    }
    cc
}

/// Creates the request and event topics unless they exist. Safe to run on
/// every node at every start.
pub async fn ensure_topics(config: &Config, topics: &Topics) -> Result<(), ServiceError> {
    let admin: AdminClient<DefaultClientContext> = client_config(config, &[]).create()?;
    let requests = topics.requests();
    let events = topics.events();
    let request_settings = request_topic_settings(config);
    // Events are small and only matter to mounts that are up now.
    let event_settings = topic_settings(config, 1_048_588, 3_600_000);
    let new_topics: Vec<NewTopic> = [(&requests, &request_settings), (&events, &event_settings)]
        .into_iter()
        .map(|(name, settings)| {
            let topic =
                NewTopic::new(name, DEFAULT_REQUEST_PARTITIONS, TopicReplication::Fixed(config.replication_factor));
            settings.iter().fold(topic, |topic, (key, value)| topic.set(key, value))
        })
        .collect();
    let timeout = Duration::from_secs(config.timeout_secs);
    let options = AdminOptions::new().request_timeout(Some(timeout)).operation_timeout(Some(timeout));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let results =
            tokio::time::timeout(timeout + Duration::from_secs(1), admin.create_topics(&new_topics, &options))
                .await
                .map_err(|_| ServiceError::BrokerTimeout(config.brokers.clone(), timeout))??;
        match first_topic_failure(results) {
            None => break,
            // A cluster that is still starting registers its brokers one by
            // one; admins start storaged beside the brokers, so wait for them.
            Some((topic, Code::InvalidReplicationFactor)) if tokio::time::Instant::now() < deadline => {
                log::warn!(
                    "op=init node={} topic={topic} fewer than {} brokers are registered yet; retrying",
                    config.node_id,
                    config.replication_factor
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Some((topic, Code::InvalidReplicationFactor)) => {
                let reason = format!(
                    "replication factor {} needs that many live brokers, and fewer were registered within {timeout:?}",
                    config.replication_factor
                );
                return Err(ServiceError::Topic { topic, reason });
            }
            Some((topic, code)) => return Err(ServiceError::Topic { topic, reason: code.to_string() }),
        }
    }
    raise_request_message_limit(config, &admin, &requests, &options).await
}

/// How dfos creates its request topic: a whole chunk per message, kept as
/// long as configured.
fn request_topic_settings(config: &Config) -> [(&'static str, String); 4] {
    topic_settings(config, KAFKA_MAX_MESSAGE_BYTES, config.request_retention_ms)
}

fn topic_settings(config: &Config, max_message_bytes: usize, retention_ms: i64) -> [(&'static str, String); 4] {
    [
        ("max.message.bytes", max_message_bytes.to_string()),
        ("min.insync.replicas", config.replication_factor.min(2).to_string()),
        ("retention.ms", retention_ms.to_string()),
        ("retention.bytes", "-1".to_string()),
    ]
}

/// A request topic created by an earlier dfos takes messages of ~1 MiB;
/// today's chunks need more. Kafka's AlterConfigs replaces a topic's whole
/// configuration, so dfos's own settings are written again with it.
async fn raise_request_message_limit(
    config: &Config,
    admin: &AdminClient<DefaultClientContext>,
    requests: &str,
    options: &AdminOptions,
) -> Result<(), ServiceError> {
    let failed = |reason: String| ServiceError::Topic { topic: requests.to_owned(), reason };
    let described = admin.describe_configs([&ResourceSpecifier::Topic(requests)], options).await?;
    let current = described
        .into_iter()
        .next()
        .ok_or_else(|| failed("no configuration described".into()))?
        .map_err(|code| failed(code.to_string()))?
        .get("max.message.bytes")
        .and_then(|entry| entry.value.as_deref()?.parse::<usize>().ok())
        .unwrap_or(0);
    if current >= KAFKA_MAX_MESSAGE_BYTES {
        return Ok(());
    }
    log::info!(
        "op=init node={} topic={requests} max.message.bytes {current} -> {KAFKA_MAX_MESSAGE_BYTES}",
        config.node_id
    );
    let settings = request_topic_settings(config);
    let alter = settings
        .iter()
        .fold(AlterConfig::new(ResourceSpecifier::Topic(requests)), |alter, (key, value)| alter.set(key, value));
    for result in admin.alter_configs([&alter], options).await? {
        result.map_err(|(_, code)| failed(format!("cannot raise max.message.bytes: {code}")))?;
    }
    Ok(())
}

/// The first topic that could not be created; one that exists already is fine.
fn first_topic_failure(results: Vec<rdkafka::admin::TopicResult>) -> Option<(String, Code)> {
    results.into_iter().find_map(|result| match result {
        Ok(_) | Err((_, Code::TopicAlreadyExists)) => None,
        Err(failure) => Some(failure),
    })
}

/// What one applied request sends: its reply, and the change event other
/// mounts of the user use to drop their caches.
pub struct Handled {
    pub reply_topic: String,
    pub reply: Reply,
    /// One per change made: a batch makes several.
    pub events: Vec<Event>,
}

/// Locations one `LocateInLog` answers with at most: a mount's group of 8
/// blocks lies in 2 or 3 whole-chunk writes, or in up to 120 of the
/// smallest indexed (64 KiB); past this many it reads plainly.
const MAX_LOCATIONS: usize = 64;

/// How long change events wait to travel together. Replies go at once
/// (linger 0) because a caller waits for each; events only shorten other
/// mounts' cache lifetimes, and one produce request per change cost the
/// broker more CPU than the request itself (`cp -r`: ~0.2 ms per file).
const EVENT_LINGER_MS: &str = "5";

/// Requests older than this get no reply and read-only ones are not even
/// executed: no mount waits that long (deadlines are seconds), and a
/// replica catching up from the log would otherwise flood dead reply topics.
pub const REPLY_HORIZON_SECS: i64 = 300;

pub struct Service {
    config: Config,
    topics: Topics,
    store: Store,
    credentials: Credentials,
    checkpoint: Checkpoint,
    log_index: LogIndex,
    /// Per partition: the mutation a run that crashed while applying it
    /// left in doubt, until its replay.
    in_doubt: Vec<Option<InDoubt>>,
}

impl Service {
    pub fn new(config: Config, store: Store, credentials: Credentials, partitions: usize) -> std::io::Result<Self> {
        let topics = Topics::new(&config.namespace);
        let (checkpoint, in_doubt) = Checkpoint::open(store.root(), &topics.requests(), partitions)?;
        for (partition, doubt) in in_doubt.iter().enumerate() {
            if let Some(doubt) = doubt {
                log::warn!("op=start node={} partition={partition} in doubt after a crash: {doubt:?}", config.node_id);
            }
        }
        let log_index = LogIndex::new(config.request_retention_ms);
        Ok(Service { config, topics, store, credentials, checkpoint, log_index, in_doubt })
    }

    fn consumer(&self) -> Result<BaseConsumer, ServiceError> {
        // A group of its own per node, though offsets are assigned by hand
        // from the checkpoint: librdkafka needs a group id for assign().
        let group = match self.config.namespace.as_str() {
            "" => format!("dfos-storaged-{}", self.config.node_id),
            ns => format!("dfos-storaged-{ns}-{}", self.config.node_id),
        };
        Ok(client_config(
            &self.config,
            &[
                ("group.id", group.as_str()),
                ("enable.auto.commit", "false"),
                ("auto.offset.reset", "earliest"),
                // A long poll: the broker answers as soon as a message arrives, so this
                // only bounds idle fetches. 1 ms cost the idle broker ~20% of a core.
                ("fetch.wait.max.ms", "100"),
                ("fetch.error.backoff.ms", "50"),
            ],
        )
        .create()?)
    }

    /// A producer with the settings that keep no acknowledged message from
    /// being lost or duplicated; `linger_ms` is all that differs.
    fn producer(&self, linger_ms: &str) -> Result<ThreadedProducer<DefaultProducerContext>, ServiceError> {
        Ok(client_config(
            &self.config,
            &[
                ("linger.ms", linger_ms),
                ("acks", "all"),
                ("enable.idempotence", "true"),
                ("message.timeout.ms", &(self.config.timeout_secs * 1000).to_string()),
            ],
        )
        .create()?)
    }

    /// Runs until `stop` is set: every partition from the checkpoint on.
    pub fn run(&mut self, stop: Arc<AtomicBool>) -> Result<(), ServiceError> {
        let consumer = self.consumer()?;
        let requests = self.topics.requests();
        let mut assignment = TopicPartitionList::new();
        for partition in 0..self.in_doubt.len() as i32 {
            let start = match self.checkpoint.applied(partition) {
                Some(offset) => Offset::Offset(offset + 1),
                None => Offset::Beginning,
            };
            assignment.add_partition_offset(&requests, partition, start)?;
        }
        consumer.assign(&assignment)?;
        let producer = self.producer("0")?;
        let event_producer = self.producer(EVENT_LINGER_MS)?;
        log::info!(
            "op=start node={} topic={requests} partitions={} storage={} checkpoint={} trash_hours={}",
            self.config.node_id,
            self.in_doubt.len(),
            self.store.root().display(),
            self.checkpoint.path().display(),
            self.config.trash_hours
        );
        while !stop.load(Ordering::Relaxed) {
            let Some(polled) = consumer.poll(Duration::from_millis(200)) else {
                if let Err(e) = self.checkpoint.persist_all() {
                    log::warn!("op=checkpoint node={} error={e}", self.config.node_id);
                }
                continue;
            };
            let message = match polled {
                Ok(m) => m,
                Err(e) => {
                    log::warn!("op=consume node={} error={e}", self.config.node_id);
                    continue;
                }
            };
            let (partition, offset) = (message.partition(), message.offset());
            if let Some(handled) = self.handle(message.payload().unwrap_or_default(), partition, offset) {
                let request_id = handled.reply.request_id;
                // Events travel on their own producer, gathered for
                // EVENT_LINGER_MS; only the reply is waited for.
                for event in &handled.events {
                    let events = self.topics.events();
                    self.send(&event_producer, &events, Some(&event.user), encode_event(event), request_id);
                }
                self.send(&producer, &handled.reply_topic, None, encode_reply(&handled.reply), request_id);
            }
        }
        log::info!("op=stop node={}", self.config.node_id);
        if let Err(e) = self.checkpoint.persist_all() {
            log::error!("op=stop node={} cannot write checkpoint: {e}", self.config.node_id);
        }
        let _ = producer.flush(Duration::from_secs(5));
        let _ = event_producer.flush(Duration::from_secs(5));
        Ok(())
    }

    fn send(
        &self,
        producer: &ThreadedProducer<DefaultProducerContext>,
        topic: &str,
        key: Option<&str>,
        encoded: Result<Vec<u8>, dfos_protocol::CodecError>,
        request_id: u64,
    ) {
        let bytes = match encoded {
            Ok(b) => b,
            Err(e) => {
                log::error!("op=send topic={topic} req={request_id} error={e}");
                return;
            }
        };
        let mut record = BaseRecord::<str, [u8]>::to(topic).payload(&bytes);
        if let Some(key) = key {
            record = record.key(key);
        }
        loop {
            match producer.send(record) {
                Ok(()) => return,
                Err((rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    log::warn!("op=send topic={topic} req={request_id} error={e}");
                    return;
                }
            }
        }
    }

    /// Applies the message at `partition`/`offset` at most once, records the
    /// offset, and returns what to send (`None`: nothing, the request is
    /// garbage, already applied, or too old for anyone to wait for it).
    pub fn handle(&mut self, bytes: &[u8], partition: i32, offset: i64) -> Option<Handled> {
        if self.checkpoint.applied(partition).is_some_and(|applied| offset <= applied) {
            log::debug!("op=replay partition={partition} offset={offset} already applied, skipped");
            return None;
        }
        let outcome = self.decide(bytes, partition, offset);
        let mutated = outcome.as_ref().is_some_and(|(envelope, _)| envelope.request.mutates());
        if let Err(e) = self.checkpoint.advance(partition, offset, mutated) {
            // Without a durable offset a crash could re-apply this request
            // differently; stopping is safer than diverging silently.
            panic!("cannot record applied offset {offset} of partition {partition}: {e}");
        }
        let (envelope, result) = outcome?;
        if crate::session::age_secs(envelope.client_time) > REPLY_HORIZON_SECS {
            return None;
        }
        let event = |request_id: u64, request: &Request, result: &Result<Payload, ErrorCode>| {
            let change = request.change().filter(|_| result.is_ok())?;
            let (user, change) = sharing::in_owners_tree(&envelope.user, change);
            Some(Event { version: PROTOCOL_VERSION, user, origin: envelope.reply_to.clone(), request_id, change })
        };
        let events = match (&envelope.request, &result) {
            (Request::Batch { requests }, Ok(Payload::Batch(results))) => requests
                .iter()
                .zip(results)
                .filter_map(|(batched, result)| event(batched.request_id, &batched.request, result))
                .collect(),
            (request, result) => event(envelope.request_id, request, result).into_iter().collect(),
        };
        let reply = Reply { request_id: envelope.request_id, node: self.config.node_id.clone(), result };
        Some(Handled { reply_topic: envelope.reply_to, reply, events })
    }

    /// Decodes and executes; `None` for messages that are skipped.
    fn decide(&mut self, bytes: &[u8], partition: i32, offset: i64) -> Option<(Envelope, Result<Payload, ErrorCode>)> {
        let envelope = match decode_envelope(bytes) {
            Ok(e) => e,
            Err(e) => {
                log::warn!("op=decode partition={partition} offset={offset} skipping message: {e}");
                return None;
            }
        };
        if !self.topics.is_reply_topic(&envelope.reply_to) {
            log::warn!(
                "op={} user={} req={} skipping message with foreign reply topic {:?}",
                envelope.request.name(),
                envelope.user,
                envelope.request_id,
                envelope.reply_to
            );
            return None;
        }
        let stale = crate::session::age_secs(envelope.client_time) > REPLY_HORIZON_SECS;
        if stale && !envelope.request.mutates() {
            return None;
        }
        let mut envelope = envelope;
        let doubt = if envelope.request.mutates() { self.begin(partition, offset) } else { None };
        self.place_append(&mut envelope, doubt.as_ref(), partition);
        let result = match &envelope.request {
            Request::Batch { requests } => self.execute_batch(&envelope, requests, doubt.as_ref(), (partition, offset)),
            _ => {
                let position = LogPosition { partition, offset, request_id: envelope.request_id };
                let stage = doubt.as_ref().map_or(Stage::Fresh, |doubt| doubt.stage(0));
                let stage = self.exchange_stage(&envelope, stage, doubt.as_ref(), partition);
                self.apply_one(&envelope, Some(position), stage, (partition, offset))
            }
        };
        Some((envelope, result))
    }

    /// Before the mutation at `offset` is applied: what a crash left in
    /// doubt about it, and a begun record unless one from the crashed run
    /// (with its batch's finished outcomes) is still there.
    fn begin(&mut self, partition: i32, offset: i64) -> Option<InDoubt> {
        let doubt = self.in_doubt[partition as usize].take().filter(|doubt| {
            let concerned = doubt.concerns(offset);
            if !concerned {
                log::warn!(
                    "op=replay partition={partition} offset={offset} the mutation in doubt ({doubt:?}) is no longer in the log"
                );
            }
            concerned
        });
        if !matches!(doubt, Some(InDoubt::At { .. })) {
            if let Err(e) = self.checkpoint.begin(partition, offset) {
                // Without it a crash would go unnoticed and the half-done
                // mutation would not be settled on replay.
                panic!("cannot record begun offset {offset} of partition {partition}: {e}");
            }
        }
        doubt
    }

    /// Gives a lone append (a write at [`APPEND_AT_END`]) the offset of
    /// its file's end, recorded before any byte of it is written, so that
    /// the replay of an append a crash cut writes the same bytes in the
    /// same place again instead of appending them twice. Every replica
    /// applies the log in the same order, so each places it alike. An
    /// append with no regular file to place it in keeps its offset and is
    /// refused as a write there would be (after the checks of its token
    /// and grants, so nothing is told before them).
    fn place_append(&mut self, envelope: &mut Envelope, doubt: Option<&InDoubt>, partition: i32) {
        if !matches!(envelope.request, Request::Write { offset: APPEND_AT_END, .. }) {
            return;
        }
        let end = match doubt {
            Some(InDoubt::At { noted: Some(end), .. }) => *end,
            _ => {
                let Some(end) = self.end_of_file(envelope) else {
                    return;
                };
                // Without it, a crash would leave the append's place
                // unknown, and its replay might append it twice.
                self.note(partition, end);
                end
            }
        };
        if let Request::Write { offset, .. } = &mut envelope.request {
            *offset = end;
        }
    }

    /// Where a lone exchange (RENAME_EXCHANGE) stands: its replay would
    /// swap the names back, so before it is applied the node notes the
    /// inode its first name has. In doubt after a crash, another inode
    /// there means the exchange was applied (answered as done, not
    /// applied again); the same one, or nothing noted, means it was not.
    fn exchange_stage(&mut self, envelope: &Envelope, stage: Stage, doubt: Option<&InDoubt>, partition: i32) -> Stage {
        if !matches!(envelope.request, Request::Rename { mode: RenameMode::Exchange, .. }) {
            return stage;
        }
        let now = self.tree_path(envelope).and_then(|(owner, path)| self.store.inode_number(owner, &path));
        if let (Stage::InDoubt, Some(InDoubt::At { noted: Some(before), .. })) = (stage, doubt) {
            if now != Some(*before) {
                return Stage::Finished(Ok(()));
            }
        }
        if let Some(inode) = now {
            self.note(partition, inode);
        }
        Stage::Fresh
    }

    fn note(&mut self, partition: i32, number: u64) {
        if let Err(e) = self.checkpoint.note(partition, number) {
            panic!("cannot note what a replay of partition {partition}'s mutation needs: {e}");
        }
    }

    /// The owner and path, in the tree it leads to, of the file or
    /// directory `envelope`'s request names first.
    fn tree_path<'a>(&self, envelope: &'a Envelope) -> Option<(&'a str, String)> {
        match sharing::route(&envelope.request).ok()? {
            Route::Own => Some((envelope.user.as_str(), envelope.request.path().to_owned())),
            Route::Owner { owner, request } => Some((owner, request.path().to_owned())),
            Route::SharedList => None,
        }
    }

    /// The size of the regular file `envelope`'s request names, in the
    /// tree its path leads to.
    fn end_of_file(&self, envelope: &Envelope) -> Option<u64> {
        let (owner, path) = self.tree_path(envelope)?;
        self.store.regular_file_size(owner, &path)
    }

    /// Executes one request (alone, or one of a batch: then `position` is
    /// `None`) in the tree its paths lead to, settles it if it is a
    /// mutation in doubt, and logs it.
    fn apply_one(
        &mut self,
        envelope: &Envelope,
        position: Option<LogPosition>,
        stage: Stage,
        at: (i32, i64),
    ) -> Result<Payload, ErrorCode> {
        let result = match self.authenticate(envelope).and_then(|()| sharing::route(&envelope.request)) {
            Err(code) => Err(code),
            Ok(Route::Own) => self.apply_settled(envelope, position, stage),
            Ok(Route::SharedList) => self.list_sharers(envelope),
            Ok(Route::Owner { owner, request }) => self.apply_shared(envelope, owner, request, stage, at.0),
        };
        log_applied(envelope, &result, at, position.is_none());
        result
    }

    fn apply_settled(
        &mut self,
        envelope: &Envelope,
        position: Option<LogPosition>,
        stage: Stage,
    ) -> Result<Payload, ErrorCode> {
        let mutates = envelope.request.mutates();
        match stage {
            Stage::Fresh => self.execute(envelope, position),
            Stage::InDoubt if mutates => {
                let result = self.execute(envelope, position);
                self.settle_in_doubt(envelope, result)
            }
            Stage::Finished(outcome) if mutates => {
                log::info!(
                    "op=replay user={} path={:?} req={} finished before the crash ({outcome:?}), not applied again",
                    envelope.user,
                    envelope.request.path(),
                    envelope.request_id
                );
                outcome.and_then(|()| self.as_applied(envelope))
            }
            // Reading again is harmless.
            Stage::InDoubt | Stage::Finished(_) => self.execute(envelope, position),
        }
    }

    /// `request` (already in `owner`'s tree) for the grantee who sent
    /// `envelope`, if `owner`'s grants allow it. It is applied as the
    /// owner's own request would be, except that its data is never
    /// located in the log: a write is not indexed, a read is answered
    /// with its bytes.
    fn apply_shared(
        &mut self,
        envelope: &Envelope,
        owner: &str,
        request: Request,
        stage: Stage,
        partition: i32,
    ) -> Result<Payload, ErrorCode> {
        let owners_partition = partition_of(owner, self.in_doubt.len());
        if partition != owners_partition {
            // Replicas would order it differently against the owner's own
            // requests; mountd always keys such a request by its owner.
            log::warn!(
                "op={} user={} owner={owner} req={} came in partition {partition}, not the owner's {owners_partition}",
                envelope.request.name(),
                envelope.user,
                envelope.request_id
            );
            return Err(ErrorCode::Invalid);
        }
        let grants = self.grants_of(owner, &envelope.user)?;
        grants.allow(&request)?;
        let as_owner = Envelope {
            version: envelope.version,
            request_id: envelope.request_id,
            reply_to: envelope.reply_to.clone(),
            user: owner.to_owned(),
            token: String::new(),
            client_time: envelope.client_time,
            request,
        };
        let result = self.apply_settled(&as_owner, None, stage);
        grants.present(owner, &as_owner.request, result)
    }

    /// What `owner` grants `grantee`; `NotFound` when nothing (or no such
    /// owner), so a grantee cannot tell an owner who shares nothing with
    /// them from one who does not exist.
    fn grants_of(&self, owner: &str, grantee: &str) -> Result<Grants, ErrorCode> {
        if !crate::credentials::valid_user_name(owner) || self.credentials.hash_of(owner).is_none() {
            return Err(ErrorCode::NotFound);
        }
        let grants = Grants::parse(owner, &self.store.grants_text(owner), grantee);
        if grants.is_empty() {
            return Err(ErrorCode::NotFound);
        }
        Ok(grants)
    }

    /// `.shared` itself: a read-only directory holding one entry per owner
    /// who shares something with the caller.
    fn list_sharers(&self, envelope: &Envelope) -> Result<Payload, ErrorCode> {
        let user = envelope.user.as_str();
        let own_root = self.store.user_root(user).map_err(|e| crate::store::io_error_code(&e))?;
        let root_attr = |root: &std::path::Path| {
            std::fs::symlink_metadata(root).map(|m| without_write_bits(crate::store::attr_of(&m))).ok()
        };
        let listing = |after: Option<&str>| -> Vec<DirEntry> {
            let mut owners = self.credentials.users();
            owners.sort();
            owners
                .into_iter()
                .filter(|owner| owner != user && after.is_none_or(|after| owner.as_str() > after))
                .filter(|owner| self.grants_of(owner, user).is_ok())
                .filter_map(|owner| Some(DirEntry { attr: root_attr(&self.store.root().join(&owner))?, name: owner }))
                .collect()
        };
        match &envelope.request {
            Request::ReadDir { after, .. } => Ok(Payload::Entries { entries: listing(after.as_deref()), more: false }),
            Request::ReadTree { path } => {
                Ok(Payload::Tree(vec![Listing { path: path.clone(), entries: listing(None), more: false }]))
            }
            Request::ListXattrs { .. } => Ok(Payload::XattrNames(Vec::new())),
            Request::GetXattr { .. } => Err(ErrorCode::NoAttribute),
            _ => root_attr(&own_root).map(Payload::Attr).ok_or(ErrorCode::Io),
        }
    }

    /// Applies a batch's requests in order, each as if it had come alone,
    /// but for one rule: once an exclusive create is refused, the batch's
    /// later requests naming that path are refused with the same error,
    /// unapplied. A mount sends a file's first bytes (and modes and times)
    /// in the batch of the create it answered before the node did, so
    /// when another mount made the name first, the loser's bytes never
    /// land in the winner's file.
    /// Each request's outcome is recorded as it finishes, so a batch
    /// replayed after a crash applies only what had not finished: the
    /// finished requests are answered from their outcomes (a refused
    /// create still refuses what follows it), the next one is settled as
    /// in doubt, the rest are applied as new.
    /// Its writes are not locatable in the log (the message is no `Write`).
    fn execute_batch(
        &mut self,
        envelope: &Envelope,
        requests: &[Batched],
        doubt: Option<&InDoubt>,
        at: (i32, i64),
    ) -> Result<Payload, ErrorCode> {
        // A copy's result depends on another file: see Request::CopyRange.
        let refused_in_batch = |b: &Batched| {
            matches!(b.request, Request::Batch { .. } | Request::Login { .. } | Request::CopyRange { .. })
        };
        if requests.len() > MAX_BATCH_REQUESTS || requests.iter().any(refused_in_batch) {
            log_applied(envelope, &Err(ErrorCode::Invalid), at, false);
            return Err(ErrorCode::Invalid);
        }
        let mut one = Envelope {
            version: envelope.version,
            request_id: envelope.request_id,
            reply_to: envelope.reply_to.clone(),
            user: envelope.user.clone(),
            token: envelope.token.clone(),
            client_time: envelope.client_time,
            request: Request::StatFs,
        };
        let mut results = Vec::with_capacity(requests.len());
        let mut refused_creates = RefusedCreates::default();
        let mutating = envelope.request.mutates();
        for (index, batched) in requests.iter().enumerate() {
            let stage = doubt.map_or(Stage::Fresh, |doubt| doubt.stage(index));
            let result = if let Some((path, code)) = refused_creates.inherited(&batched.request) {
                log::info!(
                    "op={} user={} path={path:?} req={} refused: follows a refused exclusive create",
                    batched.request.name(),
                    envelope.user,
                    batched.request_id
                );
                Err(code)
            } else {
                (one.request_id, one.request) = (batched.request_id, batched.request.clone());
                self.apply_one(&one, None, stage, at)
            };
            refused_creates.record(&batched.request, &result);
            // Only a mutating batch has a begun record to hold outcomes.
            if mutating && !matches!(stage, Stage::Finished(_)) {
                let outcome = result.as_ref().map(|_| ()).map_err(|code| *code);
                if let Err(e) = self.checkpoint.finish(at.0, index, &outcome) {
                    panic!(
                        "cannot record the outcome of request {index} at offset {} of partition {}: {e}",
                        at.1, at.0
                    );
                }
            }
            results.push(result);
        }
        Ok(Payload::Batch(results))
    }

    /// A mutation a crash left in doubt may have been applied just before
    /// it. Its replay then finds its own effect: an exclusive create,
    /// mkdir, symlink or mknod finds the name taken, an unlink, rmdir or rename finds the
    /// source gone, an attribute's create or removal finds it there or gone.
    /// That outcome means "already done", so it is answered as the first
    /// application was. Writes and setattrs are idempotent anyway.
    /// An exclusive create is the exception that data depends on: the name
    /// may be another mount's file, made just before (a lost race), and the
    /// creator's bytes must not go into it. Its own file is a regular one
    /// stamped with its time, as nothing after it was applied; anything
    /// else keeps the refusal (a file the crash left before it was stamped
    /// then refuses its own creator, who loses nothing).
    fn settle_in_doubt(&self, envelope: &Envelope, result: Result<Payload, ErrorCode>) -> Result<Payload, ErrorCode> {
        let found_its_own_effect = match (&envelope.request, &result) {
            (Request::Create { path, exclusive: true, .. }, Err(ErrorCode::Exists)) => {
                let its_own = matches!(self.as_applied(envelope), Ok(Payload::Attr(attr))
                    if attr.kind == FileKind::File && attr.mtime == envelope.client_time);
                if !its_own {
                    log::warn!(
                        "op=replay user={} path={path:?} req={} the name is not this create's file: refused",
                        envelope.user,
                        envelope.request_id
                    );
                }
                its_own
            }
            (
                Request::Mkdir { .. }
                | Request::Symlink { .. }
                | Request::MakeNode { .. }
                | Request::Link { .. }
                | Request::SetXattr { mode: XattrMode::Create, .. },
                Err(ErrorCode::Exists),
            )
            | (Request::RemoveXattr { .. }, Err(ErrorCode::NoAttribute))
            | (Request::Unlink { .. } | Request::Rmdir { .. } | Request::Rename { .. }, Err(ErrorCode::NotFound)) => {
                true
            }
            _ => false,
        };
        if !found_its_own_effect {
            return result;
        }
        log::info!(
            "op=replay user={} path={:?} req={} settled as already applied",
            envelope.user,
            envelope.request.path(),
            envelope.request_id
        );
        self.as_applied(envelope)
    }

    /// The answer a mutation that was already applied gets, from the tree
    /// as it is now (the payload its first application sent is not kept).
    fn as_applied(&self, envelope: &Envelope) -> Result<Payload, ErrorCode> {
        let attr_of = |path: &str| {
            let getattr = Request::GetAttr { path: path.to_owned() };
            self.store.apply(&envelope.user, envelope.client_time, &getattr).map_err(|e| e.code())
        };
        match &envelope.request {
            Request::Create { path, .. }
            | Request::Mkdir { path, .. }
            | Request::Symlink { path, .. }
            | Request::MakeNode { path, .. }
            | Request::Link { to: path, .. }
            | Request::SetAttr { path, .. }
            | Request::Allocate { path, .. }
            | Request::SetXattr { path, .. }
            | Request::RemoveXattr { path, .. } => attr_of(path),
            Request::Write { path, .. } => match attr_of(path)? {
                Payload::Attr(attr) => Ok(Payload::Written { attr }),
                other => Ok(other),
            },
            Request::Unlink { .. } | Request::Rmdir { .. } | Request::Rename { .. } | Request::Fsync { .. } => {
                Ok(Payload::Done)
            }
            // Never settled this way: a copy or login is never in a batch,
            // the rest change nothing.
            Request::CopyRange { .. }
            | Request::Login { .. }
            | Request::Batch { .. }
            | Request::Lookup { .. }
            | Request::GetAttr { .. }
            | Request::ReadDir { .. }
            | Request::ReadTree { .. }
            | Request::Read { .. }
            | Request::ReadFromLog { .. }
            | Request::LocateInLog { .. }
            | Request::ReadFiles { .. }
            | Request::ReadLink { .. }
            | Request::GetXattr { .. }
            | Request::ListXattrs { .. }
            | Request::StatFs => Err(ErrorCode::Invalid),
        }
    }

    /// Whether `envelope` may be applied at all: a known protocol version,
    /// and a valid session token of its user (a login is checked when
    /// executed).
    fn authenticate(&self, envelope: &Envelope) -> Result<(), ErrorCode> {
        if envelope.version != PROTOCOL_VERSION {
            return Err(ErrorCode::UnsupportedVersion);
        }
        if !crate::credentials::valid_user_name(&envelope.user) {
            return Err(ErrorCode::AccessDenied);
        }
        if matches!(envelope.request, Request::Login { .. }) {
            return Ok(());
        }
        let hash = self.credentials.hash_of(&envelope.user).ok_or(ErrorCode::AccessDenied)?;
        if !session::verify(&envelope.token, &envelope.user, &hash, envelope.client_time) {
            return Err(ErrorCode::AccessDenied);
        }
        Ok(())
    }

    /// `position`: where the request is in the log, if a mount could
    /// fetch its data from there (`None` inside a batch).
    fn execute(&mut self, envelope: &Envelope, position: Option<LogPosition>) -> Result<Payload, ErrorCode> {
        if let Request::Login { password } = &envelope.request {
            let hash = self.credentials.verify(&envelope.user, password).ok_or(ErrorCode::AccessDenied)?;
            self.store.user_root(&envelope.user).map_err(|e| crate::store::io_error_code(&e))?;
            let token = session::issue(&envelope.user, &hash, envelope.client_time);
            return Ok(Payload::LoggedIn { token });
        }
        let user = envelope.user.as_str();
        if let Request::ReadFromLog { path, offset, len } = &envelope.request {
            let now = self.store.stamp(user, path);
            if let Some(location) = self.log_index.locate(user, path, now, *offset, *len) {
                log::debug!(
                    "op=read-from-log user={user} path={path:?} req={} located partition={} offset={}",
                    envelope.request_id,
                    location.partition,
                    location.offset
                );
                return Ok(Payload::InLog(location));
            }
        }
        // Most small writes concern no indexed file: no stamps for them.
        let indexed_file = match &envelope.request {
            Request::Write { path, data, .. } => data.len() >= MIN_EXTENT_BYTES || self.log_index.tracks(user, path),
            Request::SetAttr { path, .. } => self.log_index.tracks(user, path),
            _ => false,
        };
        let before = if indexed_file { self.store.stamp(user, envelope.request.path()) } else { None };
        let mut result = self.store.apply(user, envelope.client_time, &envelope.request);
        if result.is_ok() {
            self.track_in_log_index(envelope, indexed_file, before, position);
        }
        if let (Request::LocateInLog { path, offset, len }, Ok(Payload::Located { locations, .. })) =
            (&envelope.request, &mut result)
        {
            let now = self.store.stamp(user, path);
            *locations = self.log_index.locate_run(user, path, now, *offset, *len, MAX_LOCATIONS);
        }
        result.map_err(|e| {
            log::debug!(
                "op={} user={} path={:?} req={} detail={e}",
                envelope.request.name(),
                envelope.user,
                envelope.request.path(),
                envelope.request_id
            );
            e.code()
        })
    }

    /// Tells the log index what an applied request did to file contents:
    /// writes and setattrs in detail, every other mutation by its change.
    fn track_in_log_index(
        &mut self,
        envelope: &Envelope,
        indexed_file: bool,
        before: Option<FileStamp>,
        position: Option<LogPosition>,
    ) {
        let user = envelope.user.as_str();
        let index = &mut self.log_index;
        match (&envelope.request, position) {
            (Request::Write { .. } | Request::SetAttr { .. }, _) if !indexed_file => {}
            (Request::Write { path, offset, data }, Some(position)) => {
                let after = self.store.stamp(user, path);
                index.record_write(user, path, before, after, *offset..*offset + data.len() as u64, position);
            }
            // Its bytes cannot be fetched from the log: what the index
            // held of this file may now be stale.
            (Request::Write { path, .. }, None) => index.forget_tree(user, path),
            (Request::SetAttr { path, size, .. }, _) => {
                let after = self.store.stamp(user, path);
                index.record_setattr(user, path, before, after, *size);
            }
            // The copied, zeroed or freed bytes are in no logged write.
            (Request::CopyRange { to: path, .. } | Request::Allocate { path, .. }, _) => index.forget_tree(user, path),
            // Namespace changes: whatever is at those names now is not
            // what was indexed there.
            (request, _) => match request.change() {
                Some(Change::Created { path } | Change::Removed { path }) => index.forget_tree(user, &path),
                Some(
                    Change::Renamed { from, to } | Change::Linked { from, to } | Change::Exchanged { a: from, b: to },
                ) => {
                    index.forget_tree(user, &from);
                    index.forget_tree(user, &to);
                }
                Some(Change::Modified { .. }) | None => {}
            },
        }
    }
}

/// One applied request's log line (`batched`: it came in a batch).
fn log_applied(envelope: &Envelope, result: &Result<Payload, ErrorCode>, at: (i32, i64), batched: bool) {
    let level = if result.is_ok() { log::Level::Debug } else { log::Level::Info };
    let (partition, offset) = at;
    log::log!(
        level,
        "op={} user={} path={:?} req={}{} partition={partition} offset={offset} result={}",
        envelope.request.name(),
        envelope.user,
        envelope.request.path(),
        envelope.request_id,
        if batched { " batched" } else { "" },
        match result {
            Ok(_) => "ok".to_string(),
            Err(code) => format!("{code:?}"),
        }
    );
}

/// Number of partitions of the request topic, from the broker.
pub fn request_partitions(config: &Config) -> Result<usize, ServiceError> {
    let consumer: BaseConsumer = client_config(config, &[]).create()?;
    let topic = Topics::new(&config.namespace).requests();
    let deadline = std::time::Instant::now() + Duration::from_secs(config.timeout_secs);
    // A topic just created can take a moment to appear in the metadata.
    loop {
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(config.timeout_secs))?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
        if partitions > 0 {
            return Ok(partitions);
        }
        if std::time::Instant::now() > deadline {
            return Err(ServiceError::Topic { topic, reason: "no partitions in the metadata".into() });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The admin view: this node's applied offset and lag per partition.
pub fn status(config: &Config) -> Result<String, ServiceError> {
    use std::fmt::Write;
    let topic = Topics::new(&config.namespace).requests();
    let applied = read_applied(&config.storage, &topic)
        .map_err(|e| ServiceError::Topic { topic: topic.clone(), reason: e.to_string() })?;
    let partitions = request_partitions(config)?;
    let consumer: BaseConsumer = client_config(config, &[]).create()?;
    let mut out =
        format!("node storage {} topic {topic}\npartition  applied       end       lag\n", config.storage.display());
    let mut total = 0;
    for partition in 0..partitions {
        let (low, high) =
            consumer.fetch_watermarks(&topic, partition as i32, Duration::from_secs(config.timeout_secs))?;
        let applied = applied.get(partition).copied().flatten();
        // `high` is the next offset to be written; everything below it and
        // at or above `low` is a request this node must apply.
        let next = applied.map_or(low, |a| a + 1);
        let lag = (high - next).max(0);
        total += lag;
        let shown = applied.map_or("-".to_string(), |a| a.to_string());
        let _ = writeln!(out, "{partition:>9} {shown:>8} {high:>9} {lag:>9}");
    }
    let _ = writeln!(out, "total lag {total}");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfos_protocol::{encode_envelope, SetTime, Timestamp};
    use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

    /// A service plus a fake partition log: each message gets the next offset.
    struct Harness {
        dir: tempfile::TempDir,
        service: Service,
        log: Vec<Vec<u8>>,
    }

    fn open_service(dir: &std::path::Path) -> Service {
        let creds = dir.join("id_passwd.txt");
        let config = Config { namespace: "t".into(), ..Config::default() };
        Service::new(config, Store::new(&dir.join("storage")).unwrap(), Credentials::open(&creds).unwrap(), 12).unwrap()
    }

    impl Harness {
        fn new() -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let creds = dir.path().join("id_passwd.txt");
            crate::credentials::set_password(&creds, "alice", "pw", false).unwrap();
            crate::credentials::set_password(&creds, "bob", "pw2", false).unwrap();
            let service = open_service(dir.path());
            Harness { dir, service, log: Vec::new() }
        }

        /// Appends to partition 0 and applies; returns the reply's result.
        fn send(&mut self, bytes: Vec<u8>) -> Option<Result<Payload, ErrorCode>> {
            self.log.push(bytes);
            let offset = self.log.len() as i64 - 1;
            self.service.handle(&self.log[offset as usize], 0, offset).map(|h| h.reply.result)
        }

        fn call(&mut self, user: &str, token: &str, request: Request) -> Result<Payload, ErrorCode> {
            self.send(envelope(user, token, request)).expect("a reply")
        }

        /// Like `call`, in `partition` of the fake log; also returns the
        /// events the request made.
        fn call_in(
            &mut self,
            partition: i32,
            user: &str,
            token: &str,
            request: Request,
        ) -> (Result<Payload, ErrorCode>, Vec<Event>) {
            self.log.push(envelope(user, token, request));
            let offset = self.log.len() as i64 - 1;
            let handled = self.service.handle(&self.log[offset as usize], partition, offset).expect("a reply");
            (handled.reply.result, handled.events)
        }

        fn login(&mut self, user: &str, password: &str) -> String {
            match self.call(user, "", Request::Login { password: password.into() }) {
                Ok(Payload::LoggedIn { token }) => token,
                other => panic!("{other:?}"),
            }
        }

        /// Simulates kill -9 and restart: a new service on the same disk,
        /// to which Kafka redelivers the log from `from` on.
        fn crash_and_replay_from(&mut self, from: usize) -> Vec<Option<Result<Payload, ErrorCode>>> {
            self.service = open_service(self.dir.path());
            (from..self.log.len())
                .map(|offset| self.service.handle(&self.log[offset], 0, offset as i64).map(|h| h.reply.result))
                .collect()
        }

        /// Simulates kill -9 while the last logged message was being
        /// applied: its begun record is there, with the outcomes of the
        /// requests of its batch that had finished, its applied offset is
        /// not. A restart then replays it.
        fn crash_while_applying_last(
            &mut self,
            finished: &[crate::checkpoint::Outcome],
        ) -> Option<Result<Payload, ErrorCode>> {
            let offset = self.log.len() - 1;
            self.service.checkpoint.begin(0, offset as i64).unwrap();
            for (index, outcome) in finished.iter().enumerate() {
                self.service.checkpoint.finish(0, index, outcome).unwrap();
            }
            self.crash_and_replay_from(offset).remove(0)
        }

        fn user_file(&self, rel: &str) -> std::path::PathBuf {
            self.dir.path().join("storage/alice").join(rel)
        }
    }

    fn envelope(user: &str, token: &str, request: Request) -> Vec<u8> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        encode_envelope(&Envelope {
            version: PROTOCOL_VERSION,
            request_id: 1,
            reply_to: "t.dfos.reply.m1".into(),
            user: user.into(),
            token: token.into(),
            client_time: Timestamp { secs: now.as_secs() as i64, nanos: 0 },
            request,
        })
        .unwrap()
    }

    #[test]
    fn a_grantee_uses_what_is_granted_in_the_owners_partition_until_the_grant_is_revoked() {
        let mut h = Harness::new();
        let (alice, bob) = (h.login("alice", "pw"), h.login("bob", "pw2"));
        let (alices, bobs) = (partition_of("alice", 12), partition_of("bob", 12));
        assert_ne!(alices, bobs, "the test needs the two users in different partitions");
        let as_alice = |h: &mut Harness, request| h.call_in(alices, "alice", &alice, request).0;
        for dir in ["projects", "projects/report", "photos", "private"] {
            as_alice(&mut h, Request::Mkdir { path: dir.into(), mode: 0o755 }).unwrap();
        }
        let write = |path: &str, data: &[u8]| Request::Write { path: path.into(), offset: 0, data: data.to_vec() };
        let create = |path: &str| Request::Create { path: path.into(), mode: 0o644, exclusive: true };
        for (path, data) in
            [("projects/report/a", &b"draft"[..]), (".shares", b"projects/report bob rw\nphotos bob ro\n")]
        {
            as_alice(&mut h, create(path)).unwrap();
            as_alice(&mut h, write(path, data)).unwrap();
        }
        let names = |result: Result<Payload, ErrorCode>| match result {
            Ok(Payload::Entries { entries, .. }) => entries.into_iter().map(|e| e.name).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        let list = |path: &str| Request::ReadDir { path: path.into(), after: None };
        assert_eq!(names(h.call_in(bobs, "bob", &bob, list(".shared")).0), ["alice"]);
        assert_eq!(names(h.call_in(alices, "bob", &bob, list(".shared/alice")).0), ["photos", "projects"]);
        let read = |path: &str| Request::Read { path: path.into(), offset: 0, len: 100 };
        assert_eq!(
            h.call_in(alices, "bob", &bob, read(".shared/alice/projects/report/a")).0,
            Ok(Payload::Data(b"draft".to_vec()))
        );

        let (result, events) = h.call_in(alices, "bob", &bob, write(".shared/alice/projects/report/a", b"final"));
        assert!(matches!(result, Ok(Payload::Written { .. })), "{result:?}");
        let changed: Vec<(&str, &Change)> = events.iter().map(|e| (e.user.as_str(), &e.change)).collect();
        assert_eq!(changed, [("alice", &Change::Modified { path: "projects/report/a".into() })]);
        assert_eq!(std::fs::read(h.user_file("projects/report/a")).unwrap(), b"final");

        let refused = |h: &mut Harness, partition, request| h.call_in(partition, "bob", &bob, request).0;
        assert_eq!(
            refused(&mut h, bobs, read(".shared/alice/projects/report/a")),
            Err(ErrorCode::Invalid),
            "wrong partition"
        );
        assert_eq!(refused(&mut h, alices, read(".shared/alice/.shares")), Err(ErrorCode::NotFound));
        assert_eq!(refused(&mut h, alices, list(".shared/alice/private")), Err(ErrorCode::NotFound));
        assert_eq!(refused(&mut h, alices, create(".shared/alice/photos/new")), Err(ErrorCode::AccessDenied));
        assert_eq!(refused(&mut h, alices, create(".shared/alice/projects/new")), Err(ErrorCode::AccessDenied));
        assert_eq!(
            refused(&mut h, bobs, Request::Mkdir { path: ".shared".into(), mode: 0o755 }),
            Err(ErrorCode::NotPermitted)
        );
        assert!(!h.user_file("projects/new").exists() && !h.user_file("photos/new").exists());

        as_alice(
            &mut h,
            Request::SetAttr { path: ".shares".into(), size: Some(0), mode: None, atime: None, mtime: None },
        )
        .unwrap();
        assert_eq!(refused(&mut h, alices, read(".shared/alice/projects/report/a")), Err(ErrorCode::NotFound));
        assert_eq!(names(h.call_in(bobs, "bob", &bob, list(".shared")).0), Vec::<String>::new());
    }

    #[test]
    fn login_then_tokens_are_checked_per_user() {
        let mut h = Harness::new();
        let bad = Request::Login { password: "bad".into() };
        assert_eq!(h.call("alice", "", bad), Err(ErrorCode::AccessDenied));
        let token = h.login("alice", "pw");
        let mkdir = Request::Mkdir { path: "d".into(), mode: 0o755 };
        assert!(h.call("alice", &token, mkdir.clone()).is_ok());
        // Alice's token does not open Bob's store, nor does a forged one.
        assert_eq!(h.call("bob", &token, mkdir.clone()), Err(ErrorCode::AccessDenied));
        assert_eq!(h.call("alice", "1.00", mkdir), Err(ErrorCode::AccessDenied));
        assert!(!h.dir.path().join("storage/bob/d").exists());
    }

    #[test]
    fn a_batch_applies_in_order_answers_each_request_and_settles_on_replay() {
        let mut h = Harness::new();
        let token = h.login("alice", "pw");
        h.call("alice", &token, Request::Mkdir { path: "first".into(), mode: 0o755 }).unwrap();
        let requests = [
            Request::Mkdir { path: "d".into(), mode: 0o755 },
            Request::Create { path: "d/f".into(), mode: 0o644, exclusive: true },
            Request::Write { path: "d/f".into(), offset: 0, data: b"hello".to_vec() },
            Request::Unlink { path: "missing".into() },
        ];
        let requests = (10..).zip(requests).map(|(request_id, request)| Batched { request_id, request }).collect();
        let batch = Request::Batch { requests };
        h.log.push(envelope("alice", &token, batch));
        let handled = h.service.handle(&h.log[2], 0, 2).expect("a reply");
        let Ok(Payload::Batch(results)) = handled.reply.result else { panic!("{:?}", handled.reply.result) };
        assert!(matches!(results[..], [Ok(Payload::Attr(_)), Ok(Payload::Attr(_)), Ok(Payload::Written { .. }), _]));
        assert_eq!(results[3], Err(ErrorCode::NotFound));
        assert_eq!(std::fs::read(h.user_file("d/f")).unwrap(), b"hello");
        let changes: Vec<_> = handled.events.iter().map(|e| (e.request_id, e.change.clone())).collect();
        assert_eq!(
            changes,
            [
                (10, Change::Created { path: "d".into() }),
                (11, Change::Created { path: "d/f".into() }),
                (12, Change::Modified { path: "d/f".into() })
            ],
            "one event per change made, with its own request id; none for the failed unlink"
        );
        // Killed after the batch finished but before its offset was
        // recorded (the checkpoint still says 1): the replay applies
        // nothing again and answers from the recorded outcomes.
        let checkpoint =
            crate::checkpoint::checkpoint_path(&h.dir.path().join("storage"), &Topics::new("t").requests());
        let mut slots = std::fs::read(&checkpoint).unwrap();
        slots[..8].copy_from_slice(&1i64.to_le_bytes());
        std::fs::write(&checkpoint, slots).unwrap();
        let replayed = h.crash_and_replay_from(2);
        let Some(Ok(Payload::Batch(again))) = &replayed[0] else { panic!("{replayed:?}") };
        assert!(matches!(again[..], [Ok(Payload::Attr(_)), Ok(Payload::Attr(_)), Ok(Payload::Written { .. }), _]));
        assert_eq!(again[3], Err(ErrorCode::NotFound), "a failure stays one on replay");
        assert_eq!(std::fs::read(h.user_file("d/f")).unwrap(), b"hello");
    }

    /// The lost-race case: a crash after the batch's exclusive create was
    /// refused and before the writes behind it. The replay knows the
    /// create failed, so the loser's bytes still never land.
    #[test]
    fn a_batch_cut_by_a_crash_applies_only_what_had_not_finished() {
        let mut h = Harness::new();
        let token = h.login("alice", "pw");
        h.call("alice", &token, Request::Create { path: "x".into(), mode: 0o600, exclusive: true }).unwrap();
        h.call("alice", &token, Request::Write { path: "x".into(), offset: 0, data: b"winner".to_vec() }).unwrap();
        let requests = [
            Request::Create { path: "x".into(), mode: 0o644, exclusive: true },
            Request::Write { path: "x".into(), offset: 0, data: b"loser".to_vec() },
            Request::Create { path: "y".into(), mode: 0o644, exclusive: true },
            Request::Write { path: "y".into(), offset: 0, data: b"other file".to_vec() },
        ];
        let requests = (10..).zip(requests).map(|(request_id, request)| Batched { request_id, request }).collect();
        h.log.push(envelope("alice", &token, Request::Batch { requests }));
        // The crashed run had refused both requests on x and made y.
        std::fs::File::create(h.user_file("y")).unwrap();
        let finished = [Err(ErrorCode::Exists), Err(ErrorCode::Exists), Ok(())];
        let Some(Ok(Payload::Batch(results))) = h.crash_while_applying_last(&finished) else { panic!() };
        assert_eq!(results[..2], [Err(ErrorCode::Exists), Err(ErrorCode::Exists)]);
        assert!(matches!(results[2..], [Ok(Payload::Attr(_)), Ok(Payload::Written { .. })]), "{results:?}");
        assert_eq!(std::fs::read(h.user_file("x")).unwrap(), b"winner");
        assert_eq!(std::fs::read(h.user_file("y")).unwrap(), b"other file");
    }

    /// A stop, clean or not, between two mutations leaves nothing in
    /// doubt: the first mutation after the restart fails as it should
    /// instead of being taken for its own earlier effect.
    #[test]
    fn after_a_restart_between_mutations_nothing_is_in_doubt() {
        let mut h = Harness::new();
        let token = h.login("alice", "pw");
        h.call("alice", &token, Request::Mkdir { path: "d".into(), mode: 0o755 }).unwrap();
        h.crash_and_replay_from(h.log.len());
        assert_eq!(h.call("alice", &token, Request::Mkdir { path: "d".into(), mode: 0o755 }), Err(ErrorCode::Exists));
        h.crash_and_replay_from(h.log.len());
        assert_eq!(h.call("alice", &token, Request::Unlink { path: "gone".into() }), Err(ErrorCode::NotFound));
        // In every partition, not only the one used before.
        let (result, _) = h.call_in(5, "alice", &token, Request::Rmdir { path: "gone".into() });
        assert_eq!(result, Err(ErrorCode::NotFound));
    }

    #[test]
    fn requests_behind_a_refused_exclusive_create_in_its_batch_are_refused_unapplied() {
        let mut h = Harness::new();
        let token = h.login("alice", "pw");
        h.call("alice", &token, Request::Mkdir { path: "d".into(), mode: 0o755 }).unwrap();
        h.call("alice", &token, Request::Create { path: "d/x".into(), mode: 0o600, exclusive: true }).unwrap();
        h.call("alice", &token, Request::Write { path: "d/x".into(), offset: 0, data: b"winner".to_vec() }).unwrap();
        let at = Timestamp { secs: 1_000_000, nanos: 0 };
        let requests = [
            Request::Create { path: "d/x".into(), mode: 0o644, exclusive: true },
            Request::Write { path: "d/x".into(), offset: 0, data: b"loser".to_vec() },
            Request::SetAttr {
                path: "d/x".into(),
                size: None,
                mode: Some(0o644),
                atime: None,
                mtime: Some(SetTime::At(at)),
            },
            Request::Create { path: "d/y".into(), mode: 0o644, exclusive: true },
            Request::Write { path: "d/y".into(), offset: 0, data: b"other file".to_vec() },
        ];
        let requests = (10..).zip(requests).map(|(request_id, request)| Batched { request_id, request }).collect();
        let results = match h.call("alice", &token, Request::Batch { requests }) {
            Ok(Payload::Batch(results)) => results,
            other => panic!("{other:?}"),
        };
        assert_eq!(results[..3], [Err(ErrorCode::Exists), Err(ErrorCode::Exists), Err(ErrorCode::Exists)]);
        assert!(results[3..].iter().all(Result::is_ok), "{results:?}");
        assert_eq!(std::fs::read(h.user_file("d/x")).unwrap(), b"winner");
        let mode = std::fs::metadata(h.user_file("d/x")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the loser's chmod did not land either");
        assert_eq!(std::fs::read(h.user_file("d/y")).unwrap(), b"other file");
    }

    #[test]
    fn nested_batches_logins_and_copies_in_a_batch_are_refused_whole() {
        let mut h = Harness::new();
        let token = h.login("alice", "pw");
        let batched = |request| Batched { request_id: 5, request };
        let mkdir = batched(Request::Mkdir { path: "d".into(), mode: 0o755 });
        let nested = Request::Batch { requests: vec![mkdir.clone(), batched(Request::Batch { requests: vec![] })] };
        assert_eq!(h.call("alice", &token, nested), Err(ErrorCode::Invalid));
        let login = Request::Batch { requests: vec![mkdir.clone(), batched(Request::Login { password: "pw".into() })] };
        assert_eq!(h.call("alice", &token, login), Err(ErrorCode::Invalid));
        let copy = Request::CopyRange { from: "a".into(), from_offset: 0, to: "b".into(), to_offset: 0, len: 1 };
        let with_copy = Request::Batch { requests: vec![mkdir, batched(copy)] };
        assert_eq!(h.call("alice", &token, with_copy), Err(ErrorCode::Invalid));
        assert!(!h.user_file("d").exists(), "nothing of a refused batch is applied");
    }

    #[test]
    fn garbage_and_foreign_reply_topics_are_skipped() {
        let mut h = Harness::new();
        assert!(h.send(b"\xff\xff\xff garbage".to_vec()).is_none());
        assert!(h.send(Vec::new()).is_none());
        let mut foreign = decode_envelope(&envelope("alice", "", Request::StatFs)).unwrap();
        foreign.reply_to = "t.dfos.requests".into();
        assert!(h.send(encode_envelope(&foreign).unwrap()).is_none());
        assert!(h.call("alice", "", Request::Login { password: "pw".into() }).is_ok());
    }

    #[test]
    fn locating_a_range_answers_write_by_write_with_the_file_size() {
        let mut h = Harness::new();
        let token = h.login("alice", "pw");
        h.call("alice", &token, Request::Create { path: "f".into(), mode: 0o644, exclusive: true }).unwrap();
        let chunk = dfos_protocol::limits::CHUNK_SIZE as u64;
        for i in 0..3u8 {
            let data = vec![i; chunk as usize];
            h.call("alice", &token, Request::Write { path: "f".into(), offset: i as u64 * chunk, data }).unwrap();
        }
        let locate = |offset, len| Request::LocateInLog { path: "f".into(), offset, len };
        let Ok(Payload::Located { locations, size }) = h.call("alice", &token, locate(10, 8 * chunk)) else {
            panic!("not located")
        };
        assert_eq!(size, 3 * chunk);
        // The writes are log offsets 2, 3 and 4 (after login and create).
        let parts: Vec<_> = locations.iter().map(|l| (l.offset, l.file_offset, l.skip, l.len as u64)).collect();
        assert_eq!(parts, [(2, 0, 10, chunk - 10), (3, chunk, 0, chunk), (4, 2 * chunk, 0, chunk)]);
        // Missing files and hostile paths get the errors a read gets.
        let missing = Request::LocateInLog { path: "nope".into(), offset: 0, len: 1 };
        assert_eq!(h.call("alice", &token, missing), Err(ErrorCode::NotFound));
        let hostile = Request::LocateInLog { path: "../bob/f".into(), offset: 0, len: 1 };
        assert!(h.call("alice", &token, hostile).is_err());
    }

    /// DESIGN.md's hard case: rename a→b, create a, crash, replay. The
    /// replayed rename must not move the new a.
    #[test]
    fn a_replayed_log_window_never_reapplies() {
        let mut h = Harness::new();
        let token = h.login("alice", "pw");
        let create = |p: &str| Request::Create { path: p.into(), mode: 0o644, exclusive: true };
        let write_a = |data: &[u8]| Request::Write { path: "a".into(), offset: 0, data: data.to_vec() };
        h.call("alice", &token, create("a")).unwrap();
        h.call("alice", &token, write_a(b"old")).unwrap();
        h.call("alice", &token, Request::Rename { from: "a".into(), to: "b".into(), mode: RenameMode::Replace })
            .unwrap();
        h.call("alice", &token, create("a")).unwrap();
        h.call("alice", &token, write_a(b"new")).unwrap();
        let replies = h.crash_and_replay_from(0);
        assert!(replies.iter().all(Option::is_none), "already-applied offsets must be skipped: {replies:?}");
        assert_eq!(std::fs::read(h.user_file("a")).unwrap(), b"new");
        assert_eq!(std::fs::read(h.user_file("b")).unwrap(), b"old");
    }

    /// A crash between applying a mutation and recording its offset: the
    /// replay finds its own effect and answers as the first run did.
    #[test]
    fn the_mutation_in_doubt_after_a_crash_is_settled_as_applied() {
        let mut h = Harness::new();
        let token = h.login("alice", "pw");
        h.call("alice", &token, Request::Create { path: "x".into(), mode: 0o644, exclusive: true }).unwrap();
        let rename =
            envelope("alice", &token, Request::Rename { from: "x".into(), to: "y".into(), mode: RenameMode::Replace });
        h.log.push(rename);
        // Applied on disk, but the process died before the offset was written.
        std::fs::rename(h.user_file("x"), h.user_file("y")).unwrap();
        assert_eq!(h.crash_while_applying_last(&[]), Some(Ok(Payload::Done)));
        // Only the first mutation is in doubt: a later failing one fails.
        let again = Request::Rename { from: "x".into(), to: "y".into(), mode: RenameMode::Replace };
        assert_eq!(h.call("alice", &token, again), Err(ErrorCode::NotFound));
    }

    /// An append goes at the file's end as the node finds it, whatever
    /// the mount believed; one cut by a crash after its place was recorded
    /// is written there again on replay, not appended a second time. An
    /// append in a batch, or to no file, is refused and writes nothing.
    #[test]
    fn appends_go_at_the_end_and_a_replayed_one_lands_where_it_was_placed() {
        let mut h = Harness::new();
        let token = h.login("alice", "pw");
        let append = |data: &[u8]| Request::Write { path: "log".into(), offset: APPEND_AT_END, data: data.to_vec() };
        h.call("alice", &token, Request::Create { path: "log".into(), mode: 0o644, exclusive: true }).unwrap();
        h.call("alice", &token, append(b"one\n")).unwrap();
        let written = h.call("alice", &token, append(b"two\n")).unwrap();
        assert!(matches!(&written, Payload::Written { attr } if attr.size == 8), "{written:?}");
        assert_eq!(std::fs::read(h.user_file("log")).unwrap(), b"one\ntwo\n");

        // Placed at 8 and half written when the process died.
        h.log.push(envelope("alice", &token, append(b"three\n")));
        let offset = h.log.len() as i64 - 1;
        h.service.checkpoint.begin(0, offset).unwrap();
        h.service.checkpoint.note(0, 8).unwrap();
        std::fs::OpenOptions::new().append(true).open(h.user_file("log")).unwrap().write_all_at(b"thr", 8).unwrap();
        let replayed = h.crash_and_replay_from(offset as usize).remove(0);
        assert!(matches!(&replayed, Some(Ok(Payload::Written { attr })) if attr.size == 14), "{replayed:?}");
        assert_eq!(std::fs::read(h.user_file("log")).unwrap(), b"one\ntwo\nthree\n");

        let batch = Request::Batch { requests: vec![Batched { request_id: 5, request: append(b"no") }] };
        assert!(
            matches!(h.call("alice", &token, batch), Ok(Payload::Batch(results)) if results[0] == Err(ErrorCode::Invalid))
        );
        let nowhere = Request::Write { path: "missing".into(), offset: APPEND_AT_END, data: b"x".to_vec() };
        assert_eq!(h.call("alice", &token, nowhere), Err(ErrorCode::NotFound));
        assert_eq!(std::fs::read(h.user_file("log")).unwrap(), b"one\ntwo\nthree\n");
    }

    /// An exchange swaps two names. One cut by a crash is not swapped back
    /// by its replay when it had been applied, and is applied when it had
    /// not: the inode noted at its first name tells which.
    #[test]
    fn an_exchange_in_doubt_is_applied_exactly_once() {
        let mut h = Harness::new();
        let token = h.login("alice", "pw");
        std::fs::write(h.user_file("a"), "A").unwrap();
        std::fs::create_dir(h.user_file("d")).unwrap();
        std::fs::write(h.user_file("d/inner"), "in d").unwrap();
        let exchange = || Request::Rename { from: "a".into(), to: "d".into(), mode: RenameMode::Exchange };
        assert_eq!(h.call("alice", &token, exchange()), Ok(Payload::Done));
        assert_eq!(std::fs::read_to_string(h.user_file("d")).unwrap(), "A");
        assert_eq!(std::fs::read_to_string(h.user_file("a/inner")).unwrap(), "in d");

        for applied_before_the_crash in [true, false] {
            h.log.push(envelope("alice", &token, exchange()));
            let offset = h.log.len() as i64 - 1;
            h.service.checkpoint.begin(0, offset).unwrap();
            let inode_at_a = std::fs::symlink_metadata(h.user_file("a")).unwrap().ino();
            h.service.checkpoint.note(0, inode_at_a).unwrap();
            if applied_before_the_crash {
                crate::sys::rename_exchange(&h.user_file("a"), &h.user_file("d")).unwrap();
            }
            let replayed = h.crash_and_replay_from(offset as usize).remove(0);
            assert_eq!(replayed, Some(Ok(Payload::Done)), "applied before the crash: {applied_before_the_crash}");
            // Swapped once either way: back as they began.
            assert_eq!(std::fs::read_to_string(h.user_file("a")).unwrap(), "A");
            assert_eq!(std::fs::read_to_string(h.user_file("d/inner")).unwrap(), "in d");
            assert_eq!(h.call("alice", &token, exchange()), Ok(Payload::Done));
        }
        let missing = Request::Rename { from: "a".into(), to: "nothing".into(), mode: RenameMode::Exchange };
        assert_eq!(h.call("alice", &token, missing), Err(ErrorCode::NotFound));
    }

    /// An exclusive create cut by a crash finds the name taken. It is its
    /// own effect only if the file there carries its stamp; another
    /// mount's file (a lost race) keeps the refusal, so no bytes follow
    /// into it.
    #[test]
    fn an_exclusive_create_in_doubt_is_settled_as_done_only_on_its_own_file() {
        let mut h = Harness::new();
        let token = h.login("alice", "pw");
        let create = |p: &str| Request::Create { path: p.into(), mode: 0o640, exclusive: true };
        let set_mtime = |path: std::path::PathBuf, at: Timestamp| {
            let time = std::time::UNIX_EPOCH + Duration::new(at.secs as u64, at.nanos);
            std::fs::File::options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .unwrap()
                .set_modified(time)
                .unwrap();
        };
        h.log.push(envelope("alice", &token, create("theirs")));
        set_mtime(h.user_file("theirs"), Timestamp { secs: 1_000_000, nanos: 0 });
        assert_eq!(h.crash_while_applying_last(&[]), Some(Err(ErrorCode::Exists)));
        h.log.push(envelope("alice", &token, create("mine")));
        let stamp = decode_envelope(h.log.last().unwrap()).unwrap().client_time;
        set_mtime(h.user_file("mine"), stamp);
        let replayed = h.crash_while_applying_last(&[]);
        assert!(matches!(&replayed, Some(Ok(Payload::Attr(attr))) if attr.mtime == stamp), "{replayed:?}");
    }

    #[test]
    fn a_hard_link_in_doubt_is_settled_with_the_linked_file() {
        let mut h = Harness::new();
        let token = h.login("alice", "pw");
        h.call("alice", &token, Request::Create { path: "x".into(), mode: 0o640, exclusive: true }).unwrap();
        h.log.push(envelope("alice", &token, Request::Link { from: "x".into(), to: "y".into() }));
        std::fs::hard_link(h.user_file("x"), h.user_file("y")).unwrap();
        let replayed = h.crash_while_applying_last(&[]);
        let Some(Ok(Payload::Attr(attr))) = &replayed else { panic!("{replayed:?}") };
        assert_eq!((attr.nlink, attr.mode), (2, 0o640), "answered as the first application was");
        let again = Request::Link { from: "x".into(), to: "y".into() };
        assert_eq!(h.call("alice", &token, again), Err(ErrorCode::Exists), "a later link is not in doubt");
    }
}
