//! The storage daemon's Kafka loop: consume `dfos.requests`, authenticate,
//! apply, reply.
//!
//! Guarantees: a message that cannot be decoded, carries a bad token or
//! fails to apply costs one log line and never stops the loop. Requests of
//! one partition (one user) are applied in log order. The consumed offset
//! is stored only after the request was applied, so a restart resumes at
//! the first request not yet applied (at-least-once; replays are the
//! replication issue's concern).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode as Code;

use dfos_protocol::topics::DEFAULT_REQUEST_PARTITIONS;
use dfos_protocol::{
    decode_envelope, encode_reply, Envelope, ErrorCode, Payload, Reply, Request, Topics,
    PROTOCOL_VERSION,
};

use crate::credentials::Credentials;
use crate::session;
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

pub fn client_config(config: &Config) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers);
    for (key, value) in &config.kafka_options {
        cc.set(key, value);
    }
    cc
}

/// Creates the request and event topics unless they exist. Safe to run on
/// every node at every start.
pub async fn ensure_topics(config: &Config, topics: &Topics) -> Result<(), ServiceError> {
    let admin: AdminClient<DefaultClientContext> = client_config(config).create()?;
    let requests = topics.requests();
    let events = topics.events();
    let min_isr = config.replication_factor.min(2).to_string();
    let retention = config.request_retention_ms.to_string();
    let new_topics: Vec<NewTopic> = [&requests, &events]
        .into_iter()
        .map(|name| {
            NewTopic::new(
                name,
                DEFAULT_REQUEST_PARTITIONS,
                TopicReplication::Fixed(config.replication_factor),
            )
            .set("max.message.bytes", "1048588")
            .set("min.insync.replicas", &min_isr)
            .set("retention.ms", &retention)
        })
        .collect();
    let timeout = Duration::from_secs(config.timeout_secs);
    let options = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    let results = tokio::time::timeout(
        timeout + Duration::from_secs(1),
        admin.create_topics(&new_topics, &options),
    )
    .await
    .map_err(|_| ServiceError::BrokerTimeout(config.brokers.clone(), timeout))??;
    for result in results {
        match result {
            Ok(_) | Err((_, Code::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(ServiceError::Topic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

pub struct Service {
    config: Config,
    topics: Topics,
    store: Store,
    credentials: Credentials,
}

impl Service {
    pub fn new(config: Config, store: Store, credentials: Credentials) -> Self {
        let topics = Topics::new(&config.namespace);
        Service {
            config,
            topics,
            store,
            credentials,
        }
    }

    /// Runs until `stop` is set.
    pub fn run(&self, stop: Arc<AtomicBool>) -> Result<(), ServiceError> {
        let group = match self.config.namespace.as_str() {
            "" => format!("dfos-storaged-{}", self.config.node_id),
            ns => format!("dfos-storaged-{ns}-{}", self.config.node_id),
        };
        let consumer: BaseConsumer = client_config(&self.config)
            .set("group.id", &group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "5")
            .set("session.timeout.ms", "10000")
            .set("max.poll.interval.ms", "300000")
            .create()?;
        consumer.subscribe(&[&self.topics.requests()])?;
        let producer: ThreadedProducer<DefaultProducerContext> = client_config(&self.config)
            .set("linger.ms", "0")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                &(self.config.timeout_secs * 1000).to_string(),
            )
            .create()?;
        log::info!(
            "op=start node={} group={group} topic={} storage={}",
            self.config.node_id,
            self.topics.requests(),
            self.store.root().display()
        );
        while !stop.load(Ordering::Relaxed) {
            let Some(polled) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = match polled {
                Ok(m) => m,
                Err(e) => {
                    log::warn!("op=consume error={e}");
                    continue;
                }
            };
            let (partition, offset) = (message.partition(), message.offset());
            if let Some(reply) =
                self.handle(message.payload().unwrap_or_default(), partition, offset)
            {
                self.send_reply(&producer, reply);
            }
            if let Err(e) = consumer.store_offset(message.topic(), partition, offset) {
                log::warn!("op=store-offset partition={partition} offset={offset} error={e}");
            }
        }
        log::info!("op=stop node={}", self.config.node_id);
        let _ = producer.flush(Duration::from_secs(5));
        let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
        Ok(())
    }

    fn send_reply(
        &self,
        producer: &ThreadedProducer<DefaultProducerContext>,
        (topic, reply): (String, Reply),
    ) {
        let bytes = match encode_reply(&reply) {
            Ok(b) => b,
            Err(e) => {
                log::error!("op=reply req={} error={e}", reply.request_id);
                return;
            }
        };
        let mut record = BaseRecord::<(), [u8]>::to(&topic).payload(&bytes);
        loop {
            match producer.send(record) {
                Ok(()) => return,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    r,
                )) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    log::warn!("op=reply topic={topic} req={} error={e}", reply.request_id);
                    return;
                }
            }
        }
    }

    /// Decodes, authenticates and applies one message. Returns the reply and
    /// its topic, or `None` when the message is skipped.
    pub fn handle(&self, bytes: &[u8], partition: i32, offset: i64) -> Option<(String, Reply)> {
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
        let result = self.execute(&envelope);
        let level = if result.is_ok() {
            log::Level::Debug
        } else {
            log::Level::Info
        };
        log::log!(
            level,
            "op={} user={} path={:?} req={} partition={partition} offset={offset} result={}",
            envelope.request.name(),
            envelope.user,
            envelope.request.path(),
            envelope.request_id,
            match &result {
                Ok(_) => "ok".to_string(),
                Err(code) => format!("{code:?}"),
            }
        );
        let reply = Reply {
            request_id: envelope.request_id,
            node: self.config.node_id.clone(),
            result,
        };
        Some((envelope.reply_to, reply))
    }

    fn execute(&self, envelope: &Envelope) -> Result<Payload, ErrorCode> {
        if envelope.version != PROTOCOL_VERSION {
            return Err(ErrorCode::UnsupportedVersion);
        }
        if !crate::credentials::valid_user_name(&envelope.user) {
            return Err(ErrorCode::AccessDenied);
        }
        if let Request::Login { password } = &envelope.request {
            let hash = self
                .credentials
                .verify(&envelope.user, password)
                .ok_or(ErrorCode::AccessDenied)?;
            self.store
                .user_root(&envelope.user)
                .map_err(|e| crate::store::io_error_code(&e))?;
            let token = session::issue(&envelope.user, &hash, envelope.client_time);
            return Ok(Payload::LoggedIn { token });
        }
        let hash = self
            .credentials
            .hash_of(&envelope.user)
            .ok_or(ErrorCode::AccessDenied)?;
        if !session::verify(&envelope.token, &envelope.user, &hash, envelope.client_time) {
            return Err(ErrorCode::AccessDenied);
        }
        self.store
            .apply(&envelope.user, envelope.client_time, &envelope.request)
            .map_err(|e| {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfos_protocol::{encode_envelope, Timestamp};

    fn service(dir: &std::path::Path) -> Service {
        let creds = dir.join("id_passwd.txt");
        crate::credentials::set_password(&creds, "alice", "pw", false).unwrap();
        crate::credentials::set_password(&creds, "bob", "pw2", false).unwrap();
        let config = Config {
            namespace: "t".into(),
            ..Config::default()
        };
        Service::new(
            config,
            Store::new(&dir.join("storage")).unwrap(),
            Credentials::open(&creds).unwrap(),
        )
    }

    fn envelope(user: &str, token: &str, request: Request) -> Vec<u8> {
        encode_envelope(&Envelope {
            version: PROTOCOL_VERSION,
            request_id: 1,
            reply_to: "t.dfos.reply.m1".into(),
            user: user.into(),
            token: token.into(),
            client_time: Timestamp {
                secs: 1_800_000_000,
                nanos: 0,
            },
            request,
        })
        .unwrap()
    }

    fn result(s: &Service, bytes: &[u8]) -> Result<Payload, ErrorCode> {
        s.handle(bytes, 0, 0).unwrap().1.result
    }

    #[test]
    fn login_then_tokens_are_checked_per_user() {
        let dir = tempfile::tempdir().unwrap();
        let s = service(dir.path());
        assert_eq!(
            result(
                &s,
                &envelope(
                    "alice",
                    "",
                    Request::Login {
                        password: "bad".into()
                    }
                )
            ),
            Err(ErrorCode::AccessDenied)
        );
        let Ok(Payload::LoggedIn { token }) = result(
            &s,
            &envelope(
                "alice",
                "",
                Request::Login {
                    password: "pw".into(),
                },
            ),
        ) else {
            panic!()
        };
        let mkdir = Request::Mkdir {
            path: "d".into(),
            mode: 0o755,
        };
        assert!(result(&s, &envelope("alice", &token, mkdir.clone())).is_ok());
        // Alice's token does not open Bob's store, nor does a forged one.
        assert_eq!(
            result(&s, &envelope("bob", &token, mkdir.clone())),
            Err(ErrorCode::AccessDenied)
        );
        assert_eq!(
            result(&s, &envelope("alice", "1.00", mkdir)),
            Err(ErrorCode::AccessDenied)
        );
        assert!(!dir.path().join("storage/bob/d").exists());
    }

    #[test]
    fn garbage_and_foreign_reply_topics_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let s = service(dir.path());
        assert!(s.handle(b"\xff\xff\xff garbage", 0, 0).is_none());
        assert!(s.handle(&[], 0, 0).is_none());
        let mut foreign = decode_envelope(&envelope("alice", "", Request::StatFs)).unwrap();
        foreign.reply_to = "t.dfos.requests".into();
        assert!(s
            .handle(&encode_envelope(&foreign).unwrap(), 0, 0)
            .is_none());
    }
}
