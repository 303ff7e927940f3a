//! dfos storage daemon.
//!
//! `storaged` consumes `dfos.requests`, checks each request's session token,
//! applies it under `<storage>/<user>/` and answers on the request's reply
//! topic. The layers, bottom up:
//! - [`paths`]: client paths to locations that cannot leave a user's root;
//! - [`store`]: one request applied to the local directory tree, with
//!   [`writeback`] starting large writes on their way to the device, [`sys`] for the
//!   system calls `std` lacks, [`trash`] keeping deleted and replaced
//!   files for a while, and [`fresh_files`] making the empty files creates
//!   rename into place;
//! - [`credentials`] and [`session`]: passwords and session tokens;
//! - [`sharing`]: what an owner's grants let another user do in their tree;
//! - [`checkpoint`]: the applied offset per partition, kept with the data;
//! - [`lock`]: one daemon per storage directory;
//! - [`log_index`]: which file bytes are still exactly a logged write, so
//!   reads can point at the log instead of carrying them;
//! - [`service`]: the Kafka loop around them, one full replica per node.

pub mod checkpoint;
pub mod credentials;
pub mod fresh_files;
pub mod lock;
pub mod log_index;
pub mod paths;
pub mod service;
pub mod session;
pub mod sharing;
pub mod store;
pub mod sys;
pub mod trash;
pub mod writeback;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Everything a running daemon needs; built by `main.rs` from flags.
#[derive(Debug, Clone)]
pub struct Config {
    pub brokers: String,
    pub storage: PathBuf,
    pub credentials: PathBuf,
    pub node_id: String,
    /// Prefix for topic names, so deployments can share a cluster.
    pub namespace: String,
    pub replication_factor: i32,
    /// Retention of `dfos.requests`; -1 keeps the log forever, which is what
    /// lets a new replica catch up from nothing (docs/REPLICATION.md).
    pub request_retention_ms: i64,
    /// Deadline for broker operations at start-up and for reply delivery.
    pub timeout_secs: u64,
    /// librdkafka settings passed through (TLS, SASL, tuning).
    pub kafka_options: Vec<(String, String)>,
    /// Hours deleted and replaced files stay in `.trash/` (0: none).
    pub trash_hours: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            brokers: "localhost:9092".into(),
            storage: PathBuf::from("storage"),
            credentials: PathBuf::from("id_passwd.txt"),
            node_id: "node1".into(),
            namespace: String::new(),
            replication_factor: 1,
            // A new replica catches up by replaying the whole log.
            request_retention_ms: -1,
            timeout_secs: 30,
            kafka_options: Vec::new(),
            trash_hours: 0,
        }
    }
}

/// Starts the daemon and serves until SIGINT or SIGTERM.
pub fn run(config: Config) -> anyhow::Result<()> {
    use anyhow::Context;
    let _lock = lock::StorageLock::acquire(&config.storage)?;
    let store = store::Store::new(&config.storage)
        .and_then(|store| store.with_trash(config.trash_hours).with_fresh_files())
        .with_context(|| format!("cannot use storage directory {}", config.storage.display()))?;
    let credentials = credentials::Credentials::open(&config.credentials)?;
    let topics = dfos_protocol::Topics::new(&config.namespace);
    log::info!("op=init node={} brokers={} preparing topics", config.node_id, config.brokers);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let hint = dfos_protocol::topics::tls_unreachable_hint(&config.kafka_options).unwrap_or_default();
    runtime
        .block_on(service::ensure_topics(&config, &topics))
        .with_context(|| format!("cannot prepare Kafka topics at {}{hint}", config.brokers))?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    let partitions = service::request_partitions(&config)?;
    service::Service::new(config, store, credentials, partitions)?.run(stop)?;
    Ok(())
}
