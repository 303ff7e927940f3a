//! Helpers for `bench/run.sh` that need a Kafka client: the raw-Kafka
//! baseline (the same bytes, chunking and producer settings as mountd, with
//! no filesystem in between) and the latency of one request round trip.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use dfos_protocol::limits::{CHUNK_SIZE, KAFKA_MAX_MESSAGE_BYTES};
use dfos_protocol::Request;
use mountd::fs::MAX_CHUNKS_IN_FLIGHT;
use mountd::rpc::{KafkaRpc, KafkaSettings, Transport};

#[derive(Parser)]
struct Cli {
    #[arg(long, env = "DFOS_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Produce BYTES in mountd-sized chunks to a fresh topic, then consume
    /// them back with the page cache dropped and again warm, then produce
    /// them again to a topic a consumer tails, as a storage node tails the
    /// request log; prints "write_MBps cold_read_MBps warm_read_MBps
    /// tailed_write_MBps".
    KafkaBaseline {
        #[arg(long)]
        bytes: u64,
    },
    /// Time COUNT sequential getattr requests through Kafka and a storage
    /// daemon; prints "median_us p99_us".
    RpcLatency {
        #[arg(long, default_value = "")]
        namespace: String,
        #[arg(long)]
        user: String,
        #[arg(long)]
        password: String,
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// Time COUNT sequential round trips through raw Kafka: produce to a
    /// topic, an echo thread consumes it and produces it to a second topic,
    /// and the sender consumes it there, with mountd's and storaged's
    /// settings; prints "median_us p99_us". The floor under any request
    /// a mount waits for.
    KafkaPing {
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// Delete the topics of a namespace (after a benchmark run).
    DeleteNamespace {
        #[arg(long)]
        namespace: String,
    },
}

fn config(brokers: &str) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers);
    cc
}

async fn kafka_baseline(brokers: &str, bytes: u64) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = config(brokers).create()?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let producer: FutureProducer = mount_settings(brokers).request_producer_config().create()?;
    let chunk = vec![0x5a_u8; CHUNK_SIZE];
    let messages = bytes.div_ceil(CHUNK_SIZE as u64);

    let topic = chunk_topic(&admin, &options, "baseline").await?;
    warm_up(&producer, &topic, &chunk).await?;
    let write_secs = produce_chunks(&producer, &topic, &chunk, messages).await?;
    // Cold first, like dfos's read after drop_caches: the broker must read
    // its log from disk. Then warm, from the broker's page cache.
    drop_caches()?;
    let cold_secs = consume_all(brokers, &topic, messages + 1)?;
    let warm_secs = consume_all(brokers, &topic, messages + 1)?;
    let _ = admin.delete_topics(&[&topic], &options).await;

    // What a storage node adds: a consumer reading the topic while it is
    // produced. The clock stops when the tail has every message, as a
    // mount's fsync waits until the node has applied every chunk.
    let tailed = chunk_topic(&admin, &options, "tailed").await?;
    let tail = {
        let consumer = long_poll_consumer(brokers, &tailed)?;
        std::thread::spawn(move || consume_count(&consumer, messages + 1))
    };
    warm_up(&producer, &tailed, &chunk).await?;
    drop_caches()?;
    let tail_start = Instant::now();
    produce_chunks(&producer, &tailed, &chunk, messages).await?;
    tail.join().map_err(|_| anyhow::anyhow!("tail thread panicked"))??;
    let tailed_secs = tail_start.elapsed().as_secs_f64();
    let _ = admin.delete_topics(&[&tailed], &options).await;

    let (written_mb, read_mb) = (bytes as f64 / 1e6, (bytes + CHUNK_SIZE as u64) as f64 / 1e6);
    println!(
        "{:.1} {:.1} {:.1} {:.1}",
        written_mb / write_secs,
        read_mb / cold_secs,
        read_mb / warm_secs,
        written_mb / tailed_secs
    );
    Ok(())
}

/// A fresh one-partition topic that takes chunk-sized messages.
async fn chunk_topic(
    admin: &AdminClient<DefaultClientContext>,
    options: &AdminOptions,
    purpose: &str,
) -> anyhow::Result<String> {
    let topic = format!("dfos-bench-{purpose}-{:08x}", rand::random::<u32>());
    let max_message_bytes = KAFKA_MAX_MESSAGE_BYTES.to_string();
    let new_topic = NewTopic::new(&topic, 1, TopicReplication::Fixed(1)).set("max.message.bytes", &max_message_bytes);
    for result in admin.create_topics([&new_topic], options).await? {
        result.map_err(|(name, code)| anyhow::anyhow!("creating topic {name}: {code}"))?;
    }
    Ok(topic)
}

/// One message before the clock starts: connection, metadata and producer
/// id are set up, as they are for a mount that is already up.
async fn warm_up(producer: &FutureProducer, topic: &str, chunk: &[u8]) -> anyhow::Result<()> {
    let record = FutureRecord::<(), [u8]>::to(topic).payload(chunk);
    producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    Ok(())
}

/// Seconds to produce `messages` chunks to `topic` with as many in flight
/// as a mount allows.
async fn produce_chunks(producer: &FutureProducer, topic: &str, chunk: &[u8], messages: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut in_flight = std::collections::VecDeque::new();
    for _ in 0..messages {
        if in_flight.len() >= MAX_CHUNKS_IN_FLIGHT as usize {
            let delivery: rdkafka::producer::DeliveryFuture = in_flight.pop_front().unwrap();
            delivery.await?.map_err(|(e, _)| e)?;
        }
        let record = FutureRecord::<(), [u8]>::to(topic).payload(chunk);
        match producer.send_result(record) {
            Ok(delivery) => in_flight.push_back(delivery),
            Err((e, _)) => bail!("produce failed: {e}"),
        }
    }
    for delivery in in_flight {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Seconds to consume `count` messages of partition 0 from the beginning.
/// The clock starts once the connection is up and before the first fetch,
/// so nothing is prefetched outside the measured time.
fn consume_all(brokers: &str, topic: &str, count: u64) -> anyhow::Result<f64> {
    let consumer: BaseConsumer = mount_settings(brokers).consumer_config(&[]).create()?;
    consumer.fetch_watermarks(topic, 0, Duration::from_secs(30))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    let start = Instant::now();
    consumer.assign(&tpl)?;
    consume_count(&consumer, count)?;
    Ok(start.elapsed().as_secs_f64())
}

/// Polls until `count` messages have arrived, touching each payload.
fn consume_count(consumer: &BaseConsumer, count: u64) -> anyhow::Result<()> {
    let mut received = 0u64;
    while received < count {
        match consumer.poll(Duration::from_secs(30)) {
            Some(Ok(m)) => {
                std::hint::black_box(m.payload());
                received += 1;
            }
            Some(Err(e)) => bail!("consume failed: {e}"),
            None => bail!("consume stalled after {received} messages"),
        }
    }
    Ok(())
}

/// Writes dirty pages back and empties the page cache, as `bench/run.sh`
/// does before every cold measurement.
fn drop_caches() -> anyhow::Result<()> {
    std::process::Command::new("sync").status().context("sync")?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop caches (needs root)")?;
    Ok(())
}

/// What a mount connects with, so the baselines use its very settings.
fn mount_settings(brokers: &str) -> KafkaSettings {
    KafkaSettings {
        brokers: brokers.to_owned(),
        namespace: String::new(),
        deadline: Duration::from_secs(30),
        options: Vec::new(),
    }
}

/// A producer with the settings mountd produces requests with.
fn request_producer(brokers: &str) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
    Ok(mount_settings(brokers).request_producer_config().create()?)
}

/// A consumer of partition 0 of a fresh `topic`, from its start, with the
/// long poll of mountd's consumers.
fn long_poll_consumer(brokers: &str, topic: &str) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = mount_settings(brokers).consumer_config(&[]).create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    Ok(consumer)
}

async fn kafka_ping(brokers: &str, count: usize) -> anyhow::Result<()> {
    let tag = rand::random::<u32>();
    let (ping, pong) = (format!("dfos-bench-ping-{tag:08x}"), format!("dfos-bench-pong-{tag:08x}"));
    let admin: AdminClient<DefaultClientContext> = config(brokers).create()?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let topics =
        [NewTopic::new(&ping, 1, TopicReplication::Fixed(1)), NewTopic::new(&pong, 1, TopicReplication::Fixed(1))];
    admin.create_topics(&topics, &options).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let (brokers, ping, pong, stop) = (brokers.to_owned(), ping.clone(), pong.clone(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let (consumer, producer) = (long_poll_consumer(&brokers, &ping)?, request_producer(&brokers)?);
            while !stop.load(Ordering::Relaxed) {
                if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                    let payload = message?.payload().unwrap_or_default().to_vec();
                    producer.send(BaseRecord::<(), [u8]>::to(&pong).payload(&payload)).map_err(|(e, _)| e)?;
                }
            }
            Ok(())
        })
    };
    let (consumer, producer) = (long_poll_consumer(brokers, &pong)?, request_producer(brokers)?);
    let round_trip = |seq: u64| -> anyhow::Result<Duration> {
        let start = Instant::now();
        producer.send(BaseRecord::<(), [u8]>::to(&ping).payload(&seq.to_le_bytes())).map_err(|(e, _)| e)?;
        loop {
            match consumer.poll(Duration::from_secs(30)) {
                Some(Ok(m)) if m.payload() == Some(&seq.to_le_bytes()[..]) => return Ok(start.elapsed()),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("consume failed: {e}"),
                None => bail!("no echo within 30 s"),
            }
        }
    };
    // Connections, metadata and producer ids are set up before the clock
    // starts, as they are for a mount that is already up.
    for seq in 0..50 {
        round_trip(seq)?;
    }
    let mut samples = Vec::with_capacity(count);
    for seq in 50..50 + count as u64 {
        samples.push(round_trip(seq)?.as_micros() as u64);
    }
    stop.store(true, Ordering::Relaxed);
    echo.join().map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    let _ = admin.delete_topics(&[&ping, &pong], &options).await;
    let (median, p99) = median_and_p99(&mut samples);
    println!("{median} {p99}");
    Ok(())
}

fn median_and_p99(samples: &mut [u64]) -> (u64, u64) {
    samples.sort_unstable();
    (samples[samples.len() / 2], samples[(samples.len() * 99 / 100).min(samples.len() - 1)])
}

async fn rpc_latency(brokers: &str, namespace: &str, user: &str, password: &str, count: usize) -> anyhow::Result<()> {
    let settings = KafkaSettings { namespace: namespace.to_owned(), ..mount_settings(brokers) };
    let rpc = KafkaRpc::connect(settings, user).await.context("connect")?;
    rpc.login(password).await.context("login")?;
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        rpc.submit(Request::GetAttr { path: String::new() })?.await?;
        samples.push(start.elapsed().as_micros() as u64);
    }
    rpc.shutdown().await;
    let (median, p99) = median_and_p99(&mut samples);
    println!("{median} {p99}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::KafkaBaseline { bytes } => kafka_baseline(&cli.brokers, bytes).await,
            Command::DeleteNamespace { namespace } => {
                let topics = dfos_protocol::Topics::new(&namespace);
                let admin: AdminClient<DefaultClientContext> = config(&cli.brokers).create()?;
                let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
                admin.delete_topics(&[&topics.requests(), &topics.events()], &options).await?;
                Ok(())
            }
            Command::KafkaPing { count } => kafka_ping(&cli.brokers, count).await,
            Command::RpcLatency { namespace, user, password, count } => {
                rpc_latency(&cli.brokers, &namespace, &user, &password, count).await
            }
        }
    })
}
