//! End-to-end: encryption in transit. `scripts/kafka.sh` opens a TLS
//! listener beside the plaintext one (port + 2000), with a certificate
//! signed by a test CA. Both daemons reach Kafka only through it, verify
//! the broker's certificate, and a mount works with ordinary tools; a
//! mount that does not trust the certificate, or speaks plaintext to the
//! TLS port, fails with a clear error and mounts nothing; a storage daemon
//! that does not trust it exits with a clear error.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn tls_brokers() -> String {
    let plain = brokers();
    let first = plain.split(',').next().unwrap();
    let (host, port) = first.rsplit_once(':').expect("host:port in DFOS_BROKERS");
    format!("{host}:{}", port.parse::<u16>().unwrap() + 2000)
}

/// The CA that signed the test broker's certificate.
fn test_ca() -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(repo.join("scripts/kafka.sh")).arg("tls-ca").output().unwrap();
    let ca = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(ca.exists(), "{}: no test CA; start the broker with scripts/kafka.sh start", ca.display());
    ca
}

#[test]
fn a_mount_over_tls_works_and_a_broker_it_cannot_verify_mounts_nothing() {
    let tls = tls_brokers();
    assert!(
        std::net::TcpStream::connect(&tls).is_ok(),
        "no TLS listener on {tls}: restart the broker with scripts/kafka.sh stop && scripts/kafka.sh start"
    );
    let ca = test_ca();
    let settings = vec!["security.protocol=ssl".to_owned(), format!("ssl.ca.location={}", ca.display())];
    let d = Deployment::start_with_daemon_kafka("tls", DaemonKafka { brokers: Some(tls.clone()), settings });
    let m = d.mount(USER1);

    // Whole files in several chunks, small files, a listing, a rename.
    ok(&format!("head -c 9000000 /dev/urandom > {}", m.p("random.bin")));
    ok(&format!("mkdir {0} && seq 1 1000 > {0}/numbers && mv {0} {1}", m.p("d"), m.p("docs")));
    assert_eq!(ok(&format!("ls {}", m.p(""))), "docs\nrandom.bin\n");
    drop_caches();
    assert_eq!(ok(&format!("wc -l < {}", m.p("docs/numbers"))), "1000\n");
    let on_node = std::fs::read(d.storage.join("User1/random.bin")).unwrap();
    assert_eq!(on_node.len(), 9_000_000);
    assert_eq!(std::fs::read(m.join("random.bin")).unwrap(), on_node, "read back through TLS");

    // A CA that did not sign the broker's certificate: the handshake fails.
    let other = d.dir.path().join("other-ca");
    std::fs::create_dir(&other).unwrap();
    ok(&format!(
        "cd {} && openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=other -keyout ca.key -out ca.pem 2>/dev/null",
        other.display()
    ));
    let untrusting = format!("ssl.ca.location={}", other.join("ca.pem").display());
    let (status, output, path) = d.mount_fails_with("User1", "1234", None, 3, &["-X", &untrusting]);
    assert!(!status.success());
    assert!(output.contains("cannot reach Kafka") && output.contains("ssl.ca.location"), "{output}");
    assert!(!is_mounted(&path));

    // A storage daemon that does not trust it exits with the same hint.
    let storage = d.dir.path().join("untrusting-storage");
    let storaged = Command::new(bin("storaged"))
        .args(["--brokers", &tls, "--namespace", "tls-untrusting", "--timeout", "3", "--storage"])
        .arg(&storage)
        .args(["-X", "security.protocol=ssl", "-X", &untrusting])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&storaged.stderr);
    assert!(!storaged.status.success());
    assert!(printed.contains("cannot prepare Kafka topics") && printed.contains("ssl.ca.location"), "{printed}");

    // Plaintext to the TLS port: refused as well, never a half-mounted folder.
    let (status, output, path) = d.mount_fails_with("User1", "1234", None, 3, &["-X", "security.protocol=plaintext"]);
    assert!(!status.success());
    assert!(output.contains("cannot reach Kafka"), "{output}");
    assert!(!is_mounted(&path));
}
