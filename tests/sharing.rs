//! End-to-end: one user shares parts of their tree with another, who
//! reaches them under `.shared/<owner>` of their own mount with ordinary
//! shell tools. Grants are lines of the owner's `.shares` file.

mod common;

use std::time::Duration;

use common::*;
use dfos_protocol::{ErrorCode, Payload, Request};

/// Waits until `check` holds (changes reach the other user's mount through
/// events, or within the 1 s cache TTL for the list of sharers).
fn soon(what: &str, check: impl Fn() -> bool) {
    within(Duration::from_secs(10), what, check)
}

/// `cat` of a shell-quoted path: its contents, or None when cat fails.
fn read(quoted_path: &str) -> Option<String> {
    let out = sh(&format!("cat {quoted_path}"));
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_shared_directory_is_read_and_written_with_shell_tools_and_a_revoked_grant_shows_nothing() {
    let d = Deployment::start("sharing");
    let (owner, grantee) = (d.mount(USER1), d.mount(USER2));
    let (o, g) = (|rel: &str| owner.p(rel), |rel: &str| grantee.p(&format!(".shared/User1/{rel}")));
    ok(&format!("mkdir -p {0}/projects/report {0}/photos {0}/private", o("")));
    ok(&format!("echo draft > {}", o("projects/report/plan.txt")));
    ok(&format!("echo sunny > {}", o("photos/beach.txt")));
    ok(&format!("echo secret > {}", o("private/diary.txt")));
    assert_eq!(ok(&format!("ls -A {}", grantee.p(".shared"))), "", "nothing is shared yet");
    fails(&format!("ls {}", grantee.p(".shared/User1")));

    ok(&format!("printf 'projects/report User2 rw\\nphotos User2 ro  # holidays\\n' > {}", o(".shares")));
    soon("the list of sharers", || sh(&format!("ls {}", grantee.p(".shared"))).stdout == b"User1\n");
    assert_eq!(ok(&format!("ls -A {}", g(""))), "photos\nprojects\n", "only what leads to a grant");
    assert_eq!(ok(&format!("ls {}", g("projects"))), "report\n");
    assert_eq!(read(&g("projects/report/plan.txt")).as_deref(), Some("draft\n"));
    for hidden in ["private/diary.txt", ".shares", "private"] {
        fails(&format!("stat {}", g(hidden)));
    }
    assert_eq!(ok(&format!("ls -A {}", owner.p(".shared"))), "", "User2 shares nothing");

    // Read-write: appends, new files and directories, renames inside.
    ok(&format!("echo final >> {}", g("projects/report/plan.txt")));
    soon("an append through the share", || read(&o("projects/report/plan.txt")).as_deref() == Some("draft\nfinal\n"));
    ok(&format!(
        "mkdir {0} && echo x > {0}/f && mv {1} {2}",
        g("projects/report/sub"),
        g("projects/report/plan.txt"),
        g("projects/report/plan2.txt")
    ));
    soon("a new directory and a rename", || {
        read(&o("projects/report/sub/f")).as_deref() == Some("x\n")
            && read(&o("projects/report/plan2.txt")).is_some()
            && read(&o("projects/report/plan.txt")).is_none()
    });
    // The owner's own change reaches the grantee's mount.
    ok(&format!("echo v2 > {}", o("projects/report/plan2.txt")));
    soon("the owner's write", || read(&g("projects/report/plan2.txt")).as_deref() == Some("v2\n"));
    // A move from the grantee's own tree is a copy across trees (EXDEV).
    ok(&format!("echo mine > {}", grantee.p("mine.txt")));
    ok(&format!("mv {} {}", grantee.p("mine.txt"), g("projects/report/")));
    assert!(!grantee.join("mine.txt").exists());
    soon("the moved file", || read(&o("projects/report/mine.txt")).as_deref() == Some("mine\n"));
    fails(&format!("ln {} {}", g("projects/report/mine.txt"), grantee.p("link")));
    // The granted directory itself stays where its owner put it.
    fails(&format!("mv {} {}", g("projects/report"), g("projects/moved")));
    fails(&format!("touch {}", g("projects/new")));

    // Read-only: readable, shown without write bits, and nothing changes.
    assert_eq!(read(&g("photos/beach.txt")).as_deref(), Some("sunny\n"));
    assert_eq!(ok(&format!("stat -c %A {}", g("photos/beach.txt"))), "-r--r--r--\n");
    fails(&format!("echo x > {}", g("photos/new.txt")));
    fails(&format!("echo x >> {}", g("photos/beach.txt")));
    fails(&format!("rm {}", g("photos/beach.txt")));
    assert_eq!(ok(&format!("ls {}", o("photos"))), "beach.txt\n");
    assert_eq!(read(&o("photos/beach.txt")).as_deref(), Some("sunny\n"));

    // Below the mount: a shared request outside the owner's partition is
    // refused, so replicas cannot order it differently.
    let mut raw = RawClient::new(&d.namespace);
    let token = raw.login(USER2);
    let via_share = Request::Read { path: ".shared/User1/photos/beach.txt".into(), offset: 0, len: 10 };
    assert_eq!(raw.call("User2", &token, via_share), Err(ErrorCode::Invalid), "keyed by the grantee, not the owner");
    let own = Request::GetAttr { path: "".into() };
    assert!(matches!(raw.call("User2", &token, own), Ok(Payload::Attr(_))));

    // Revoked: the very next request is refused, and the grantee's mount
    // drops what it showed.
    ok(&format!("echo -n > {}", o(".shares")));
    soon("the revocation", || read(&g("projects/report/plan2.txt")).is_none());
    soon("the list of sharers after revocation", || sh(&format!("ls -A {}", grantee.p(".shared"))).stdout.is_empty());
    assert_eq!(read(&o("projects/report/plan2.txt")).as_deref(), Some("v2\n"), "the owner's files stay");
}
