//! End-to-end: several storage daemons as replicas of one request log,
//! killed and restarted under load, a fresh replica catching up, and a
//! 3-broker Kafka cluster losing a broker mid-copy.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::model::{tree_listing, Workload};
use common::*;

const CATCH_UP: Duration = Duration::from_secs(180);

fn user_tree(d: &Deployment, node: usize) -> Vec<String> {
    tree_listing(&d.node_storage(node).join("User1"))
}

fn assert_same_trees(d: &Deployment, nodes: &[usize], expected: &[String]) {
    for &node in nodes {
        d.wait_caught_up(node, CATCH_UP);
        let tree = user_tree(d, node);
        assert!(tree == expected, "node {node} differs:\n{:#?}\nexpected:\n{:#?}", tree, expected);
    }
}

/// Starts `cp SRC MOUNT/copy.bin` and returns once `watched` (the copy as
/// a storage node sees it) holds at least `bytes`.
fn copy_until(m: &Mount, src: &Path, watched: &Path, bytes: u64) -> std::process::Child {
    let mut cp = Command::new("cp").arg(src).arg(m.join("copy.bin")).spawn().unwrap();
    let start = Instant::now();
    while fs::metadata(watched).map_or(0, |m| m.len()) < bytes {
        assert!(start.elapsed() < Duration::from_secs(300), "copy never reached {bytes} bytes");
        assert!(cp.try_wait().unwrap().is_none(), "cp finished before the failure was injected");
        std::thread::sleep(Duration::from_millis(20));
    }
    cp
}

#[test]
fn a_replica_killed_mid_copy_loses_nothing_and_converges() {
    let mut d = Deployment::start_replicated("kill-mid-copy", 2, &brokers(), 1);
    let m = d.mount(USER1);
    let src = d.dir.path().join("src.bin");
    fs::write(&src, random_bytes(200 << 20, 7)).unwrap();
    let mut cp = copy_until(&m, &src, &d.node_storage(1).join("User1/copy.bin"), 100 << 20);
    d.kill_node(1);
    assert!(cp.wait().unwrap().success(), "cp failed after a replica was killed");
    ok(&format!("cmp '{}' {}", src.display(), m.p("copy.bin")));
    d.start_node(1);
    let expected = user_tree(&d, 0);
    assert_same_trees(&d, &[0, 1], &expected);
    ok(&format!("cmp '{}' '{}'", src.display(), d.node_storage(1).join("User1/copy.bin").display()));
}

#[test]
fn random_workload_with_crashing_replicas_converges_to_the_model() {
    let mut d = Deployment::start_replicated("crashing-replicas", 2, &brokers(), 1);
    let m = d.mount_with_xattrs(USER1);
    let model = d.local_dir("model");
    let mut workload = Workload::new(2024);
    for round in 0..6 {
        let victim = round % 2;
        // SIGKILL from another thread lands at an arbitrary point of the
        // victim's work, while the mount keeps going on the other replica.
        let pid = d.node_pid(victim) as i32;
        let delay = Duration::from_millis(200 + 150 * round as u64);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: kill(2) on the victim's pid, still our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        for _ in 0..40 {
            workload.step(&m.path, &model);
        }
        killer.join().unwrap();
        d.kill_node(victim);
        d.start_node(victim);
    }
    let expected = tree_listing(&model);
    assert_same_trees(&d, &[0, 1], &expected);
}

#[test]
fn a_fresh_replica_catches_up_then_serves_alone() {
    let mut d = Deployment::start_replicated("fresh-replica", 2, &brokers(), 1);
    let m = d.mount_with_xattrs(USER1);
    let model = d.local_dir("model");
    let mut workload = Workload::new(99);
    for _ in 0..60 {
        workload.step(&m.path, &model);
    }
    let fresh = d.add_node();
    d.start_node(fresh);
    d.wait_caught_up(fresh, CATCH_UP);
    assert_eq!(user_tree(&d, fresh), tree_listing(&model));
    d.stop_node(0);
    d.stop_node(1);
    for _ in 0..40 {
        workload.step(&m.path, &model);
    }
    ok(&format!("echo alone > {}", m.p("alone.txt")));
    fs::write(model.join("alone.txt"), "alone\n").unwrap();
    assert_eq!(user_tree(&d, fresh), tree_listing(&model));
}

#[test]
fn all_replicas_down_gives_eio_then_the_same_mount_recovers() {
    let mut d = Deployment::start_replicated("all-down", 2, &brokers(), 1);
    let m = d.mount_with_timeout(USER1, 3);
    ok(&format!("echo x > {}", m.p("a")));
    d.stop_node(0);
    d.kill_node(1);
    let err = fs::metadata(m.join("not-cached")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let err = fs::write(m.join("b"), "y").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    d.start_node(0);
    d.start_node(1);
    let start = Instant::now();
    while fs::read_to_string(m.join("a")).ok().as_deref() != Some("x\n") {
        assert!(start.elapsed() < Duration::from_secs(30), "mount did not recover");
        std::thread::sleep(Duration::from_millis(300));
    }
    ok(&format!("echo z > {}", m.p("c")));
    assert_eq!(ok(&format!("cat {}", m.p("c"))), "z\n");
    d.wait_caught_up(1, CATCH_UP);
    assert_eq!(user_tree(&d, 0), user_tree(&d, 1));
}

/// A 3-node Kafka cluster of this test's own, on its own ports.
struct KafkaCluster {
    port: u16,
}

impl KafkaCluster {
    fn script(&self, args: &[&str]) -> std::process::Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh");
        Command::new(script)
            .args(args)
            .env("DFOS_KAFKA_NODES", "3")
            .env("DFOS_KAFKA_PORT", self.port.to_string())
            .output()
            .unwrap()
    }

    fn start(port: u16) -> KafkaCluster {
        let cluster = KafkaCluster { port };
        let out = cluster.script(&["start"]);
        assert!(out.status.success(), "cluster start: {}", String::from_utf8_lossy(&out.stderr));
        cluster
    }

    fn bootstrap(&self) -> String {
        (0..3).map(|i| format!("127.0.0.1:{}", self.port + i)).collect::<Vec<_>>().join(",")
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        self.script(&["stop"]);
    }
}

#[test]
fn a_three_broker_cluster_survives_losing_a_broker_mid_copy() {
    let cluster = KafkaCluster::start(29092);
    let d = Deployment::start_replicated("kafka-cluster", 1, &cluster.bootstrap(), 3);
    let m = d.mount(USER1);
    let src = d.dir.path().join("src.bin");
    fs::write(&src, random_bytes(120 << 20, 3)).unwrap();
    let target = d.storage.join("User1/copy.bin");
    let mut cp = copy_until(&m, &src, &target, 40 << 20);
    let out = cluster.script(&["kill-node", "2"]);
    assert!(out.status.success());
    assert!(cp.wait().unwrap().success(), "cp failed after a broker was killed");
    drop_caches();
    ok(&format!("cmp '{}' {}", src.display(), m.p("copy.bin")));
    ok(&format!("cmp '{}' '{}'", src.display(), target.display()));
}
