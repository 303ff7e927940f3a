//! End-to-end: authentication, isolation between users, and what a mount
//! does when the broker, the storage daemon or the input misbehaves.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::process::Command;
use std::time::Duration;

use common::*;
use dfos_protocol::{ErrorCode, Request};

#[test]
fn two_users_mounted_at_once_see_only_their_own_files() {
    let d = Deployment::start("two-users");
    let m1 = d.mount(USER1);
    let m2 = d.mount(USER2);
    ok(&format!("echo secret > {}", m1.p("secret.txt")));
    ok(&format!("mkdir {}", m1.p("private")));
    ok(&format!("echo mine > {}", m2.p("mine.txt")));
    assert_eq!(ok(&format!("ls {}", m1.p(""))), "private\nsecret.txt\n");
    assert_eq!(ok(&format!("ls {}", m2.p(""))), "mine.txt\n");
    assert!(!m2.join("secret.txt").exists());
    // Symlinks planted on the storage node never lead out of a user's root.
    symlink("../User1", d.storage.join("User2/escape")).unwrap();
    symlink("../User1/secret.txt", d.storage.join("User2/leak")).unwrap();
    fails(&format!("cat {}", m2.p("escape/secret.txt")));
    fails(&format!("ls {}", m2.p("escape/")));
    fails(&format!("cat {}", m2.p("leak")));
    fails(&format!("echo overwrite > {}", m2.p("leak")));
    assert_eq!(fs::read_to_string(d.storage.join("User1/secret.txt")).unwrap(), "secret\n");

    // Below the mount: User2's session cannot name User1's files either.
    let mut raw = RawClient::new(&d.namespace);
    let token2 = raw.login(USER2);
    let read = |path: &str| Request::Read { path: path.into(), offset: 0, len: 100 };
    assert_eq!(raw.call("User1", &token2, read("secret.txt")), Err(ErrorCode::AccessDenied));
    assert_eq!(raw.call("User2", &token2, read("../User1/secret.txt")), Err(ErrorCode::Invalid));
    assert_eq!(raw.call("User2", &token2, read("/etc/passwd")), Err(ErrorCode::Invalid));
    assert_eq!(raw.call("User2", &token2, read("leak")), Err(ErrorCode::AccessDenied));
    assert_eq!(raw.call("User2", "", read("mine.txt")), Err(ErrorCode::AccessDenied));
    assert!(
        matches!(raw.call("User2", &token2, read("mine.txt")), Ok(dfos_protocol::Payload::Data(d)) if d == b"mine\n")
    );
    // Nor set attributes on them, through a path, a planted link or a name
    // outside the one namespace kept.
    let tag = |path: &str, name: &str| Request::SetXattr {
        path: path.into(),
        name: name.into(),
        value: b"x".to_vec(),
        mode: dfos_protocol::XattrMode::Either,
    };
    assert_eq!(raw.call("User2", &token2, tag("../User1/secret.txt", "user.t")), Err(ErrorCode::Invalid));
    assert_eq!(raw.call("User2", &token2, tag("leak", "user.t")), Err(ErrorCode::NotPermitted));
    assert_eq!(raw.call("User2", &token2, tag("mine.txt", "trusted.t")), Err(ErrorCode::NotSupported));
    assert_eq!(raw.call("User2", &token2, tag("mine.txt", "user.nul\0")), Err(ErrorCode::Invalid));
    assert!(ok(&format!("getfattr -d -m - '{}'", d.storage.join("User1/secret.txt").display())).is_empty());
}

#[test]
fn a_wrong_password_or_unknown_user_mounts_nothing() {
    let d = Deployment::start("wrong-password");
    for (user, password) in [("User1", "12345"), ("Nobody", "1234")] {
        let (status, output, path) = d.mount_fails(user, password, None, 30);
        assert!(!status.success());
        assert!(output.contains("authentication failed"), "{output}");
        assert!(!is_mounted(&path));
    }
}

#[test]
fn no_broker_is_a_clear_error_within_the_deadline() {
    let d = Deployment::start("no-broker");
    let (status, output, path) = d.mount_fails("User1", "1234", Some("127.0.0.1:1"), 3);
    assert!(!status.success());
    assert!(output.contains("cannot reach Kafka"), "{output}");
    assert!(!is_mounted(&path));
}

#[test]
fn more_replicas_than_live_brokers_is_a_clear_error_within_the_deadline() {
    let d = Deployment::start("too-few-brokers");
    let namespace = format!("{}-rf3", d.namespace);
    let output = Command::new(bin("storaged"))
        .args(["--brokers", &d.brokers, "--namespace", &namespace, "--replication-factor", "3", "--timeout", "3"])
        .arg("--credentials")
        .arg(&d.credentials)
        .arg("--storage")
        .arg(d.dir.path().join("storage-rf3"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("replication factor 3 needs that many live brokers"), "{stderr}");
}

#[test]
fn a_restarted_storage_daemon_serves_an_idle_mount_without_remount() {
    let mut d = Deployment::start("restart");
    let m = d.mount(USER1);
    ok(&format!("echo before > {}", m.p("a")));
    d.stop_node(0);
    d.start_node(0);
    assert_eq!(ok(&format!("cat {}", m.p("a"))), "before\n");
    ok(&format!("echo after > {}", m.p("b")));
    assert_eq!(fs::read_to_string(d.storage.join("User1/b")).unwrap(), "after\n");
}

#[test]
fn a_second_storage_daemon_on_the_same_directory_refuses_to_start_and_the_first_serves_on() {
    let d = Deployment::start("second-daemon");
    let m = d.mount(USER1);
    ok(&format!("echo before > {}", m.p("a")));
    let (status, printed) = d.second_daemon_of(0, Duration::from_secs(60));
    assert!(!status.success(), "{printed}");
    assert!(
        printed.contains("is in use by another storaged") && printed.contains(&format!("pid {}", d.node_pid(0))),
        "{printed}"
    );
    // Had it run, both would apply each request: this exclusive create
    // would fail on one of them.
    ok(&format!("cp {} {}", m.p("a"), m.p("b")));
    assert_eq!(ok(&format!("cat {}", m.p("b"))), "before\n");
    assert_eq!(fs::read_to_string(d.storage.join("User1/b")).unwrap(), "before\n");
}

#[test]
fn a_dead_storage_daemon_gives_eio_after_the_deadline_then_recovers() {
    let mut d = Deployment::start("deadline");
    let m = d.mount_with_timeout(USER1, 3);
    ok(&format!("echo x > {}", m.p("a")));
    d.kill_node(0);
    let err = fs::metadata(m.join("never-looked-up")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    d.start_node(0);
    // The first requests may still be queued behind the stale ones.
    let mut attempts = 0;
    while fs::read_to_string(m.join("a")).ok().as_deref() != Some("x\n") {
        attempts += 1;
        assert!(attempts < 20, "mount did not recover");
        std::thread::sleep(Duration::from_millis(500));
    }
    ok(&format!("echo y > {}", m.p("b")));
}

#[test]
fn random_bytes_on_the_request_topic_do_not_stop_the_storage_daemon() {
    let d = Deployment::start("garbage");
    let m = d.mount(USER1);
    let raw = RawClient::new(&d.namespace);
    raw.produce_raw("User1", b"");
    raw.produce_raw("User1", &[0xff; 16]);
    for (i, len) in [1usize, 7, 100, 4096, 900_000].into_iter().enumerate() {
        raw.produce_raw("User1", &random_bytes(len, i as u64));
        raw.produce_raw("User2", &random_bytes(len, 100 + i as u64));
    }
    // A length prefix that claims an enormous string.
    raw.produce_raw("User1", &[1, 1, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    ok(&format!("echo still-serving > {}", m.p("after-garbage")));
    assert_eq!(ok(&format!("cat {}", m.p("after-garbage"))), "still-serving\n");
    assert_eq!(fs::read_to_string(d.storage.join("User1/after-garbage")).unwrap(), "still-serving\n");
    let log = fs::read_to_string(d.log_path("storaged-0-run1")).unwrap();
    assert!(log.contains("skipping message"), "garbage was not reported in the log");
}

#[test]
fn a_create_refused_after_it_was_answered_fails_the_close() {
    let d = Deployment::start("create-behind");
    let m = d.mount(USER1);
    fs::create_dir(m.join("d")).unwrap();
    // Out of band, so no event tells the mount: it still believes d/x free.
    symlink("/etc/passwd", d.storage.join("User1/d/x")).unwrap();
    let src = d.local_dir("src").join("f");
    fs::write(&src, "data").unwrap();
    let err = fails(&format!("cp '{}' {}", src.display(), m.p("d/x")));
    assert!(err.contains("d/x"), "{err}");
    assert!(fs::symlink_metadata(d.storage.join("User1/d/x")).unwrap().file_type().is_symlink());
    assert!(fs::read_to_string("/etc/passwd").unwrap().contains("root"));
}

/// A storage daemon restarted between requests, after a clean stop or a
/// SIGKILL while idle, has nothing in doubt: its first request after the
/// restart is refused when it must be. Here that request is the loser's
/// side of a race for a new name (below), whose refused exclusive create
/// used to be taken for its own earlier effect, so the loser's bytes
/// landed in the winner's file.
#[test]
fn a_restarted_storage_daemon_refuses_its_first_request_when_it_must() {
    let mut d = Deployment::start("restart-refuses");
    let m = d.mount(USER1);
    let src = d.local_dir("src").join("f");
    fs::write(&src, "loser").unwrap();
    for (dir, killed) in [("stopped", false), ("killed", true)] {
        fs::create_dir(m.join(dir)).unwrap();
        assert_eq!(ok(&format!("ls -A {}", m.p(dir))), "");
        // Out of band, so no event tells the mount: it still believes the name free.
        fs::write(d.storage.join("User1").join(dir).join("x"), "the winner's").unwrap();
        if killed {
            d.kill_node(0);
        } else {
            d.stop_node(0);
        }
        d.start_node(0);
        let err = fails(&format!("cp '{}' {}", src.display(), m.p(&format!("{dir}/x"))));
        assert!(err.contains("exists"), "{dir}: {err}");
        assert_eq!(fs::read_to_string(d.storage.join("User1").join(dir).join("x")).unwrap(), "the winner's", "{dir}");
    }
}

/// Two mounts racing for one new name: the other mount's file appeared
/// on the node after this mount listed the directory and answered its own
/// exclusive create. However the loser's bytes travel (with the create,
/// in a large write of their own, or long after it), none land in the
/// winner's file, and the loser's tool hears EEXIST.
#[test]
fn a_lost_exclusive_create_leaves_the_other_mounts_file_as_it_was() {
    let d = Deployment::start("lost-create");
    let m = d.mount(USER1);
    let src = d.local_dir("src");
    fs::write(src.join("small"), "loser").unwrap();
    fs::write(src.join("large"), vec![b'L'; 1 << 20]).unwrap();
    // One directory each: a refusal makes the mount drop what it believed
    // of the directory, and a later `cp` would then see the file and
    // overwrite it, as it should.
    let losers = [
        ("small", format!("cp '{}' {}", src.join("small").display(), m.p("small/x"))),
        ("large", format!("cp '{}' {}", src.join("large").display(), m.p("large/x"))),
        // noclobber: an O_EXCL open, and the bytes 200 ms later.
        ("late", format!("set -C; {{ sleep 0.2; echo late; }} > {}", m.p("late/x"))),
    ];
    for (dir, _) in &losers {
        fs::create_dir(m.join(dir)).unwrap();
        assert_eq!(ok(&format!("ls -A {}", m.p(dir))), "");
        // Out of band, so no event tells the mount: it still believes the name free.
        fs::write(d.storage.join("User1").join(dir).join("x"), format!("the winner's {dir}")).unwrap();
    }
    for (dir, loser) in &losers {
        let err = fails(loser);
        assert!(err.contains("exists"), "{dir}: {err}");
        let on_node = fs::read_to_string(d.storage.join("User1").join(dir).join("x")).unwrap();
        assert_eq!(on_node, format!("the winner's {dir}"));
    }
    // The mount drops what it believed of the names: after the kernel's
    // entry timeout (1 s) they read as the winner's files.
    std::thread::sleep(Duration::from_millis(1100));
    for (dir, _) in &losers {
        assert_eq!(ok(&format!("cat {}", m.p(&format!("{dir}/x")))), format!("the winner's {dir}"));
    }
}

#[test]
fn sigint_and_sigterm_unmount_cleanly() {
    let d = Deployment::start("signals");
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let m = d.mount(USER1);
        ok(&format!("echo kept > {}", m.p("f")));
        let path = m.path.clone();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(m.pid() as i32, signal) };
        let status = m.unmount();
        assert!(status.success(), "mountd exited with {status} on signal {signal}");
        assert!(!is_mounted(&path), "still mounted after signal {signal}");
    }
    assert_eq!(fs::read_to_string(d.storage.join("User1/f")).unwrap(), "kept\n");
}

#[test]
fn a_password_file_takes_precedence_over_the_environment() {
    let d = Deployment::start("password-file");
    let file = d.local_dir("secrets").join("pw");
    fs::write(&file, "1234\n").unwrap();
    // DFOS_PASSWORD is wrong here; only the file's first line is right.
    let m = d.mount_with(("User1", "not-the-password"), 30, &["--password-file", file.to_str().unwrap()]);
    ok(&format!("touch {}", m.p("in")));
    assert!(d.storage.join("User1/in").exists());
}

/// A request topic made by an earlier dfos takes messages of ~1 MiB; a
/// storage daemon starting on it raises the limit, so whole chunks (four
/// times that) are written and read back.
#[test]
fn a_request_topic_from_an_earlier_version_takes_whole_chunks_after_storaged_starts() {
    use dfos_protocol::limits::{CHUNK_SIZE, KAFKA_MAX_MESSAGE_BYTES};
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
    let mut d = Deployment::start_replicated("old-topic", 0, &brokers(), 1);
    let requests = dfos_protocol::Topics::new(&d.namespace).requests();
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::config::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let partitions = dfos_protocol::topics::DEFAULT_REQUEST_PARTITIONS;
    let old = NewTopic::new(&requests, partitions, TopicReplication::Fixed(1)).set("max.message.bytes", "1048588");
    for created in runtime.block_on(admin.create_topics([&old], &AdminOptions::new())).unwrap() {
        created.unwrap();
    }
    let node = d.add_node();
    d.start_node(node);
    let m = d.mount(USER1);
    let data = random_bytes(3 * CHUNK_SIZE + 12345, 11);
    fs::write(m.join("big.bin"), &data).unwrap();
    drop_caches();
    assert!(fs::read(m.join("big.bin")).unwrap() == data, "the file read back differs");
    let described =
        runtime.block_on(admin.describe_configs([&ResourceSpecifier::Topic(&requests)], &AdminOptions::new())).unwrap();
    let topic = described.into_iter().next().unwrap().unwrap();
    let limit: usize = topic.get("max.message.bytes").unwrap().value.as_deref().unwrap().parse().unwrap();
    assert!(limit >= KAFKA_MAX_MESSAGE_BYTES, "max.message.bytes is still {limit}");
    assert_eq!(topic.get("retention.ms").unwrap().value.as_deref(), Some("-1"), "dfos's own settings kept");
}
