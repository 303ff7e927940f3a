//! Listens on `dfos.events` for changes other mounts of the same user make,
//! so this mount's caches and the kernel's drop what they changed.
//!
//! Guarantees: every event of this user from another mount is handed to
//! the sink once (replicas each publish it; copies are dropped by origin
//! and request id), in log order. Events of this mount itself are skipped:
//! its own caches were updated when it made the change. The listener reads
//! from the end of the topic: only changes after the mount started matter.
//! An owner's change in a tree they share with this mount's user is handed
//! on at the path the mount sees it under (`.shared/<owner>/...`), and a
//! change of the owner's grants as the removal of that whole tree, so
//! nothing of what the grants showed stays cached.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use dashmap::DashSet;
use dfos_protocol::sharing::{shared_path, GRANTS_FILE};
use dfos_protocol::{decode_event, Change, Topics};

use crate::rpc::{KafkaSettings, RpcError};

/// How many recent (origin, request id) pairs are remembered for dedup.
const SEEN_CAPACITY: usize = 8192;

pub struct EventListener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Seen {
    order: VecDeque<(String, u64)>,
    set: HashSet<(String, u64)>,
}

impl Seen {
    /// True the first time a pair is offered.
    fn first(&mut self, key: (String, u64)) -> bool {
        if !self.set.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > SEEN_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

impl EventListener {
    /// `followed`: owners whose shared trees this mount reaches; their
    /// events are handed on at the paths this mount sees them under.
    pub fn start(
        settings: &KafkaSettings,
        user: &str,
        own_origin: &str,
        followed: Arc<DashSet<String>>,
        sink: impl Fn(&Change) + Send + 'static,
    ) -> Result<EventListener, RpcError> {
        let kafka = |e: rdkafka::error::KafkaError| RpcError::Kafka(e.to_string());
        let topic = Topics::new(&settings.namespace).events();
        let consumer: BaseConsumer = settings
            .client_config(&[
                ("group.id", "dfos-mountd-events-unused"),
                ("enable.auto.commit", "false"),
                // A long poll: the broker answers as soon as a message arrives, so this
                // only bounds idle fetches. 1 ms cost the idle broker ~20% of a core.
                ("fetch.wait.max.ms", "100"),
            ])
            .create()
            .map_err(kafka)?;
        let partitions = Self::partitions(&consumer, &topic, settings.deadline)?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment.add_partition_offset(&topic, partition, Offset::End).map_err(kafka)?;
        }
        consumer.assign(&assignment).map_err(kafka)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (user, own_origin, stopping) = (user.to_owned(), own_origin.to_owned(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("dfos-events".into())
            .spawn(move || {
                let mut seen = Seen { order: VecDeque::new(), set: HashSet::new() };
                while !stopping.load(Ordering::Relaxed) {
                    let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    let event = match decode_event(message.payload().unwrap_or_default()) {
                        Ok(event) => event,
                        Err(e) => {
                            log::warn!("op=event offset={} undecodable event skipped: {e}", message.offset());
                            continue;
                        }
                    };
                    if event.origin == own_origin {
                        continue;
                    }
                    let change = if event.user == user {
                        event.change
                    } else if followed.contains(&event.user) {
                        through_share(&event.user, &event.change)
                    } else {
                        continue;
                    };
                    if seen.first((event.origin.clone(), event.request_id)) {
                        log::debug!(
                            "op=event user={user} owner={} req={} change={change:?}",
                            event.user,
                            event.request_id
                        );
                        sink(&change);
                    }
                }
            })
            .map_err(|e| RpcError::Kafka(e.to_string()))?;
        Ok(EventListener { stop, thread: Some(thread) })
    }

    /// The topic's partition count; storaged creates it, and a new topic
    /// can take a moment to appear in the metadata.
    fn partitions(consumer: &BaseConsumer, topic: &str, deadline: Duration) -> Result<i32, RpcError> {
        let give_up = std::time::Instant::now() + deadline;
        loop {
            let metadata =
                consumer.fetch_metadata(Some(topic), deadline).map_err(|e| RpcError::Kafka(e.to_string()))?;
            match metadata.topics().first().map_or(0, |t| t.partitions().len()) {
                0 if std::time::Instant::now() < give_up => std::thread::sleep(Duration::from_millis(200)),
                0 => return Err(RpcError::Kafka(format!("{topic} has no partitions"))),
                n => return Ok(n as i32),
            }
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EventListener {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `change`, made in `owner`'s tree, as a mount reaching it through
/// `.shared/<owner>` sees it.
fn through_share(owner: &str, change: &Change) -> Change {
    let touches_grants = match change {
        Change::Modified { path } | Change::Created { path } | Change::Removed { path } => path == GRANTS_FILE,
        Change::Renamed { from, to } | Change::Linked { from, to } | Change::Exchanged { a: from, b: to } => {
            from == GRANTS_FILE || to == GRANTS_FILE
        }
    };
    if touches_grants {
        return Change::Removed { path: shared_path(owner, "") };
    }
    change.map_paths(&|path| shared_path(owner, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_origin_and_request_passes_once() {
        let mut seen = Seen { order: VecDeque::new(), set: HashSet::new() };
        assert!(seen.first(("m1".into(), 1)));
        assert!(!seen.first(("m1".into(), 1)));
        assert!(seen.first(("m2".into(), 1)));
        for id in 2..(SEEN_CAPACITY as u64 + 10) {
            seen.first(("m1".into(), id));
        }
        assert!(seen.order.len() <= SEEN_CAPACITY && seen.set.len() == seen.order.len());
    }
}
