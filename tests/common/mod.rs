//! Harness for end-to-end tests: real storaged and mountd processes, a real
//! Kafka broker (DFOS_BROKERS, default 127.0.0.1:9092; `scripts/test.sh`
//! starts one) and real FUSE mounts.
//!
//! Each [`Deployment`] has its own temporary directory, credentials, topic
//! namespace and storage daemon. Dropping a [`Mount`] unmounts it and
//! dropping a deployment stops its daemons and deletes its topics, also
//! when a test panics, so no mount or process is left behind.
#![allow(dead_code)]

pub mod model;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const USER1: (&str, &str) = ("User1", "1234");
pub const USER2: (&str, &str) = ("User2", "6789");

pub fn brokers() -> String {
    std::env::var("DFOS_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// target/<profile>/, where cargo put storaged and mountd.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(path.exists(), "{} missing: run `cargo build --release --workspace` first", path.display());
    path
}

/// Runs a shell command (bash -c) and returns its output.
pub fn sh(cmd: &str) -> Output {
    Command::new("bash").arg("-c").arg(cmd).output().expect("bash runs")
}

/// Runs a shell command that must succeed; returns its stdout.
pub fn ok(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "`{cmd}` failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a shell command that must fail; returns its stderr.
pub fn fails(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(!out.status.success(), "`{cmd}` should have failed but succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn drop_caches() {
    ok("sync; echo 3 > /proc/sys/vm/drop_caches");
}

pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let path = path.to_string_lossy();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(&path))
}

fn stop_child(child: &mut Child, grace: Duration) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < grace {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The brokers storaged and mountd are given, and librdkafka settings
/// (`-X key=value`) for both.
#[derive(Clone, Default)]
pub struct DaemonKafka {
    pub brokers: Option<String>,
    pub settings: Vec<String>,
}

/// One storage daemon of a deployment: a replica with its own directory.
struct Node {
    storage: PathBuf,
    process: Option<Child>,
    runs: u32,
}

pub struct Deployment {
    pub dir: tempfile::TempDir,
    pub namespace: String,
    /// Storage root of node 0.
    pub storage: PathBuf,
    pub credentials: PathBuf,
    /// What the harness's own Kafka clients use (topics, raw requests).
    pub brokers: String,
    /// How the daemons reach Kafka, when not as the harness does.
    daemon_kafka: DaemonKafka,
    replication_factor: u32,
    /// Given to every storaged of the deployment, after the harness's own.
    storaged_flags: Vec<String>,
    nodes: Vec<Node>,
}

impl Deployment {
    /// A fresh deployment with users User1 and User2 and one running storaged.
    pub fn start(name: &str) -> Deployment {
        Deployment::start_replicated(name, 1, &brokers(), 1)
    }

    /// Like [`Deployment::start`], with `flags` for storaged.
    pub fn start_with_storaged_flags(name: &str, flags: &[&str]) -> Deployment {
        Deployment::start_replicated_with(name, 1, &brokers(), 1, flags)
    }

    /// `replicas` running storage daemons on `brokers`, whose topics get
    /// `replication_factor`.
    pub fn start_replicated(name: &str, replicas: usize, brokers: &str, replication_factor: u32) -> Deployment {
        Deployment::start_replicated_with(name, replicas, brokers, replication_factor, &[])
    }

    /// Like [`Deployment::start`], with the daemons reaching Kafka through
    /// `daemon_kafka` (another listener, TLS settings) while the harness
    /// uses the default brokers.
    pub fn start_with_daemon_kafka(name: &str, daemon_kafka: DaemonKafka) -> Deployment {
        Deployment::start_configured(name, 1, &brokers(), 1, &[], daemon_kafka)
    }

    fn start_replicated_with(
        name: &str,
        replicas: usize,
        brokers: &str,
        replication_factor: u32,
        storaged_flags: &[&str],
    ) -> Deployment {
        Deployment::start_configured(
            name,
            replicas,
            brokers,
            replication_factor,
            storaged_flags,
            DaemonKafka::default(),
        )
    }

    fn start_configured(
        name: &str,
        replicas: usize,
        brokers: &str,
        replication_factor: u32,
        storaged_flags: &[&str],
        daemon_kafka: DaemonKafka,
    ) -> Deployment {
        let dir = tempfile::Builder::new().prefix(&format!("dfos-{name}-")).tempdir().unwrap();
        let namespace =
            format!("t{}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), name.replace('_', "-"));
        let mut d = Deployment {
            storage: dir.path().join("storage-0"),
            credentials: dir.path().join("id_passwd.txt"),
            dir,
            namespace,
            brokers: brokers.to_owned(),
            daemon_kafka,
            replication_factor,
            storaged_flags: storaged_flags.iter().map(|f| f.to_string()).collect(),
            nodes: Vec::new(),
        };
        for (user, password) in [USER1, USER2] {
            d.add_user(user, password);
        }
        for _ in 0..replicas {
            let node = d.add_node();
            d.start_node(node);
        }
        d
    }

    pub fn add_user(&self, user: &str, password: &str) {
        let mut child = Command::new(bin("storaged"))
            .args(["user", "add", user, "--credentials"])
            .arg(&self.credentials)
            .stdin(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
        assert!(child.wait().unwrap().success(), "storaged user add {user}");
    }

    /// A new local directory beside the deployment (a model, a source tree).
    pub fn local_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    /// How many messages the deployment's request topic holds, over all
    /// partitions.
    pub fn request_messages(&self) -> i64 {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer =
            rdkafka::config::ClientConfig::new().set("bootstrap.servers", &self.brokers).create().unwrap();
        let topic = dfos_protocol::Topics::new(&self.namespace).requests();
        (0..dfos_protocol::topics::DEFAULT_REQUEST_PARTITIONS)
            .map(|partition| consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10)).unwrap().1)
            .sum()
    }

    pub fn log_path(&self, what: &str) -> PathBuf {
        self.dir.path().join(format!("{what}.log"))
    }

    /// A new replica with an empty storage directory, not yet started.
    pub fn add_node(&mut self) -> usize {
        let index = self.nodes.len();
        self.nodes.push(Node { storage: self.dir.path().join(format!("storage-{index}")), process: None, runs: 0 });
        index
    }

    pub fn node_storage(&self, node: usize) -> &Path {
        &self.nodes[node].storage
    }

    fn storaged_args(&self, node: usize) -> Vec<String> {
        let mut args = vec![
            "--brokers".into(),
            self.daemon_brokers().to_owned(),
            "--namespace".into(),
            self.namespace.clone(),
            "--credentials".into(),
            self.credentials.display().to_string(),
            "--storage".into(),
            self.nodes[node].storage.display().to_string(),
            "--node-id".into(),
            format!("node{node}"),
            "--replication-factor".into(),
            self.replication_factor.to_string(),
        ];
        args.extend(self.daemon_settings());
        args.extend(self.storaged_flags.iter().cloned());
        args
    }

    /// The brokers the daemons are given.
    pub fn daemon_brokers(&self) -> &str {
        self.daemon_kafka.brokers.as_deref().unwrap_or(&self.brokers)
    }

    fn daemon_settings(&self) -> Vec<String> {
        self.daemon_kafka.settings.iter().flat_map(|setting| ["-X".to_owned(), setting.clone()]).collect()
    }

    /// A storaged with node `node`'s flags, logging at info to `log_name`.
    fn spawn_storaged(&self, node: usize, log_name: &str) -> Child {
        let log = std::fs::File::create(self.log_path(log_name)).unwrap();
        Command::new(bin("storaged"))
            .args(self.storaged_args(node))
            .env("RUST_LOG", test_log_level())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub fn start_node(&mut self, node: usize) {
        assert!(self.nodes[node].process.is_none(), "node {node} already running");
        self.nodes[node].runs += 1;
        let log_name = format!("storaged-{node}-run{}", self.nodes[node].runs);
        let child = self.spawn_storaged(node, &log_name);
        self.nodes[node].process = Some(child);
        self.wait_started(node, &log_name);
    }

    /// Waits until the node has created its topics and assigned its
    /// partitions (its "op=start" log line), so a mount's first request
    /// never races the topic creation on a busy fresh broker.
    fn wait_started(&mut self, node: usize, log_name: &str) {
        let log = self.log_path(log_name);
        let start = Instant::now();
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("op=start") {
            if let Some(status) = self.nodes[node].process.as_mut().unwrap().try_wait().unwrap() {
                panic!("storaged exited with {status}: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(start.elapsed() < Duration::from_secs(120), "storaged did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM: a clean stop.
    pub fn stop_node(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].process.take() {
            stop_child(&mut child, Duration::from_secs(10));
        }
    }

    /// SIGKILL: a crash at whatever point the daemon is.
    pub fn kill_node(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn node_pid(&self, node: usize) -> u32 {
        self.nodes[node].process.as_ref().expect("node running").id()
    }

    /// `storaged status` of a node: its applied offsets and lag.
    pub fn node_status(&self, node: usize) -> String {
        let out = Command::new(bin("storaged")).args(self.storaged_args(node)).arg("status").output().unwrap();
        assert!(out.status.success(), "storaged status: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts one more daemon with exactly node `node`'s flags (its storage
    /// directory too) and returns how it ended and what it printed; killed,
    /// and a panic, if it is still running after `limit`.
    pub fn second_daemon_of(&self, node: usize, limit: Duration) -> (std::process::ExitStatus, String) {
        let log_name = format!("storaged-{node}-second");
        let mut child = self.spawn_storaged(node, &log_name);
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > limit {
                stop_child(&mut child, Duration::from_secs(5));
                panic!("a second storaged on node {node}'s storage kept running");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status, std::fs::read_to_string(self.log_path(&log_name)).unwrap_or_default())
    }

    /// Waits until `node` has applied everything in the request log.
    pub fn wait_caught_up(&self, node: usize, limit: Duration) {
        let start = Instant::now();
        loop {
            let status = self.node_status(node);
            if status.lines().any(|l| l.trim() == "total lag 0") {
                return;
            }
            assert!(start.elapsed() < limit, "node {node} did not catch up:\n{status}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn mountd_command(&self, user: &str, mountpoint: &Path, timeout_secs: u64, brokers: &str) -> Command {
        let mut cmd = Command::new(bin("mountd"));
        cmd.args(["--brokers", brokers, "--namespace", &self.namespace, "--user", user])
            .args(["--timeout", &timeout_secs.to_string()])
            .args(self.daemon_settings())
            .arg(mountpoint)
            .env("RUST_LOG", test_log_level());
        cmd
    }

    /// Mounts `user`'s store and waits until the mount is live.
    pub fn mount(&self, (user, password): (&str, &str)) -> Mount {
        self.mount_with_timeout((user, password), 30)
    }

    /// A mount serving extended attributes (`--xattrs`), as the random
    /// workload of `model.rs` needs.
    pub fn mount_with_xattrs(&self, credentials: (&str, &str)) -> Mount {
        self.mount_with(credentials, 30, &["--xattrs"])
    }

    pub fn mount_with_timeout(&self, credentials: (&str, &str), timeout_secs: u64) -> Mount {
        self.mount_with(credentials, timeout_secs, &[])
    }

    /// Mounts with a request deadline and extra mountd arguments.
    pub fn mount_with(&self, (user, password): (&str, &str), timeout_secs: u64, args: &[&str]) -> Mount {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("mnt-{user}-{n}"));
        std::fs::create_dir_all(&path).unwrap();
        let log_path = self.log_path(&format!("mountd-{user}-{n}"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = self
            .mountd_command(user, &path, timeout_secs, self.daemon_brokers())
            .args(args)
            .env("DFOS_PASSWORD", password)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !is_mounted(&path) {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("mountd exited with {status}: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
            }
            if start.elapsed() > Duration::from_secs(60) {
                stop_child(&mut child, Duration::from_secs(5));
                panic!("mount did not appear: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Mount { path, child, log: log_path }
    }

    /// Runs mountd expecting it to fail; returns (exit status, stderr+log).
    pub fn mount_fails(
        &self,
        user: &str,
        password: &str,
        brokers_override: Option<&str>,
        timeout_secs: u64,
    ) -> (std::process::ExitStatus, String, PathBuf) {
        self.mount_fails_with(user, password, brokers_override, timeout_secs, &[])
    }

    /// Like [`Deployment::mount_fails`], with extra mountd arguments last
    /// (a later `-X` setting overrides the deployment's).
    pub fn mount_fails_with(
        &self,
        user: &str,
        password: &str,
        brokers_override: Option<&str>,
        timeout_secs: u64,
        args: &[&str],
    ) -> (std::process::ExitStatus, String, PathBuf) {
        let path = self.dir.path().join(format!("mnt-fail-{user}"));
        std::fs::create_dir_all(&path).unwrap();
        let mut cmd = self.mountd_command(user, &path, timeout_secs, brokers_override.unwrap_or(self.daemon_brokers()));
        let out = cmd.args(args).env("DFOS_PASSWORD", password).stdin(Stdio::null()).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status, text, path)
    }

    /// Deletes this deployment's topics so test runs don't pile up partitions.
    fn delete_topics(&self) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        use rdkafka::config::ClientConfig;
        let Ok(admin) =
            ClientConfig::new().set("bootstrap.servers", &self.brokers).create::<AdminClient<DefaultClientContext>>()
        else {
            return;
        };
        let topics = dfos_protocol::Topics::new(&self.namespace);
        let (requests, events) = (topics.requests(), topics.events());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _ = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                admin.delete_topics(
                    &[&requests, &events],
                    &AdminOptions::new().request_timeout(Some(Duration::from_secs(8))),
                ),
            )
            .await
        });
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for node in 0..self.nodes.len() {
            self.stop_node(node);
        }
        self.delete_topics();
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("--- logs kept in {} ---", self.dir.path().display());
            for entry in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    eprintln!("== {} (last lines)", path.display());
                    for line in tail.into_iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
        }
    }
}

pub struct Mount {
    pub path: PathBuf,
    child: Child,
    pub log: PathBuf,
}

impl Mount {
    /// The path of `rel` inside the mount, as a shell-quoted string.
    pub fn p(&self, rel: &str) -> String {
        let full = if rel.is_empty() { self.path.clone() } else { self.path.join(rel) };
        format!("'{}'", full.display())
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Unmounts through SIGTERM and returns mountd's exit status.
    pub fn unmount(mut self) -> std::process::ExitStatus {
        stop_child(&mut self.child, Duration::from_secs(20));
        self.child.wait().unwrap()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(20));
        if is_mounted(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// A deterministic pseudo-random byte source for test data.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0; len];
    rng.fill_bytes(&mut data);
    data
}

/// A bare protocol client on Kafka, for requests a mount would never send:
/// forged tokens, hostile paths, garbage bytes.
pub struct RawClient {
    producer: rdkafka::producer::BaseProducer,
    consumer: rdkafka::consumer::BaseConsumer,
    topics: dfos_protocol::Topics,
    reply_topic: String,
    next_id: u64,
}

impl RawClient {
    pub fn new(namespace: &str) -> RawClient {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::client::DefaultClientContext;
        use rdkafka::config::ClientConfig;
        use rdkafka::consumer::Consumer;
        let topics = dfos_protocol::Topics::new(namespace);
        let reply_topic = topics.reply(&format!("raw{}", rand::random::<u32>()));
        let cc = || {
            let mut c = ClientConfig::new();
            c.set("bootstrap.servers", brokers());
            c
        };
        let admin: AdminClient<DefaultClientContext> = cc().create().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let created = rt
            .block_on(
                admin
                    .create_topics([&NewTopic::new(&reply_topic, 1, TopicReplication::Fixed(1))], &AdminOptions::new()),
            )
            .unwrap();
        assert!(created[0].is_ok(), "{created:?}");
        let consumer: rdkafka::consumer::BaseConsumer = cc()
            .set("group.id", "raw-test")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&reply_topic, 0, rdkafka::Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        let producer = cc().create().unwrap();
        RawClient { producer, consumer, topics, reply_topic, next_id: 1 }
    }

    /// Produces raw bytes onto the request topic with the given key.
    pub fn produce_raw(&self, key: &str, bytes: &[u8]) {
        use rdkafka::producer::{BaseRecord, Producer};
        let requests = self.topics.requests();
        self.producer.send(BaseRecord::to(&requests).key(key).payload(bytes)).unwrap();
        self.producer.flush(Duration::from_secs(10)).unwrap();
    }

    /// Sends one request and waits up to 30 s for its reply.
    pub fn call(
        &mut self,
        user: &str,
        token: &str,
        request: dfos_protocol::Request,
    ) -> Result<dfos_protocol::Payload, dfos_protocol::ErrorCode> {
        use rdkafka::message::Message;
        let request_id = self.next_id;
        self.next_id += 1;
        let envelope = dfos_protocol::Envelope {
            version: dfos_protocol::PROTOCOL_VERSION,
            request_id,
            reply_to: self.reply_topic.clone(),
            user: user.into(),
            token: token.into(),
            client_time: dfos_protocol::Timestamp {
                secs: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64,
                nanos: 0,
            },
            request,
        };
        self.produce_raw(user, &dfos_protocol::encode_envelope(&envelope).unwrap());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Some(Ok(message)) = self.consumer.poll(Duration::from_millis(100)) {
                let reply = dfos_protocol::decode_reply(message.payload().unwrap_or_default()).unwrap();
                if reply.request_id == request_id {
                    return reply.result;
                }
            }
        }
        panic!("no reply to raw request {request_id}");
    }

    pub fn login(&mut self, (user, password): (&str, &str)) -> String {
        match self.call(user, "", dfos_protocol::Request::Login { password: password.into() }) {
            Ok(dfos_protocol::Payload::LoggedIn { token }) => token,
            other => panic!("login failed: {other:?}"),
        }
    }
}

/// The daemons' log level: info, unless `DFOS_TEST_LOG` asks for more while
/// a failing test is being diagnosed.
fn test_log_level() -> String {
    std::env::var("DFOS_TEST_LOG").unwrap_or_else(|_| "info".into())
}

/// Waits until `check` holds, polling; fails the test naming `what` when it
/// does not within `limit`. For changes that travel to another mount.
pub fn within(limit: Duration, what: &str, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
