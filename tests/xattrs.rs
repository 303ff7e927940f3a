//! End-to-end: extended attributes through a real mount (`--xattrs`), set
//! and read with setfattr, getfattr, `cp -a`, `tar --xattrs` and the system calls
//! themselves, compared with what a local directory answers; kept through
//! renames, emptying, other mounts and read-only shares.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use common::*;

fn c(text: &str) -> CString {
    CString::new(text).unwrap()
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// setxattr(2) with `flags`: the errno on failure.
fn set(path: &Path, name: &str, value: &[u8], flags: libc::c_int) -> Result<(), i32> {
    let (path, name) = (c_path(path), c(name));
    // SAFETY: NUL-terminated strings and a valid buffer, all outliving the call.
    let rc = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    }
}

/// getxattr(2) into a buffer of `size` bytes: the length it returned, or the errno.
fn get_into(path: &Path, name: &str, size: usize) -> Result<usize, i32> {
    let (path, name) = (c_path(path), c(name));
    let mut buffer = vec![0u8; size];
    let pointer = if size == 0 { std::ptr::null_mut() } else { buffer.as_mut_ptr().cast() };
    // SAFETY: as in `set`; a null buffer with size 0 only asks the length.
    let rc = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), pointer, size) };
    if rc >= 0 {
        Ok(rc as usize)
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    }
}

/// The same calls on a file of the mount and on a local file answer alike.
fn same_answers(on_mount: &Path, local: &Path) {
    for path in [on_mount, local] {
        std::fs::write(path, "x").unwrap();
    }
    let both = |call: &dyn Fn(&Path) -> Result<usize, i32>, what: &str| {
        assert_eq!(call(on_mount), call(local), "{what}");
    };
    both(&|p| set(p, "user.k", b"v", libc::XATTR_REPLACE).map(|()| 0), "replace of a missing attribute");
    both(&|p| set(p, "user.k", b"value", libc::XATTR_CREATE).map(|()| 0), "create");
    both(&|p| set(p, "user.k", b"again", libc::XATTR_CREATE).map(|()| 0), "create of an existing one");
    both(&|p| get_into(p, "user.k", 0), "asking the size");
    both(&|p| get_into(p, "user.k", 2), "a buffer too small");
    both(&|p| get_into(p, "user.missing", 64), "a missing attribute");
    both(&|p| set(p, "user.big", &vec![7u8; 64 * 1024], 0).map(|()| 0), "more than an ext4 inode holds");
}

#[test]
fn extended_attributes_are_kept_follow_renames_reach_other_mounts_and_survive_cp_a_and_tar() {
    // With a trash: emptying a file (`>`) keeps its old bytes there, and
    // the emptied file keeps its attributes.
    let d = Deployment::start_with_storaged_flags("xattrs", &["--trash-hours", "1"]);
    let m = d.mount_with_xattrs(USER1);
    let other = d.mount_with_xattrs(USER1);
    ok(&format!("echo hello > {}", m.p("notes.txt")));
    ok(&format!("setfattr -n user.color -v blue {}", m.p("notes.txt")));
    ok(&format!("setfattr -n user.bytes -v 0x00ff0a01 {}", m.p("notes.txt")));
    ok(&format!("setfattr -n user.empty {}", m.p("notes.txt")));
    let dumped = |path: &str| ok(&format!("getfattr -d -e hex --absolute-names {path} | tail -n +2"));
    let expected = "user.bytes=0x00ff0a01\nuser.color=0x626c7565\nuser.empty=0x\n\n";
    assert_eq!(dumped(&m.p("notes.txt")), expected);
    let on_node = d.storage.join("User1/notes.txt");
    assert_eq!(dumped(&format!("'{}'", on_node.display())), expected, "real attributes of the node's file");
    assert_eq!(ok(&format!("getfattr -n user.color --only-values {}", m.p("notes.txt"))), "blue");
    within(Duration::from_secs(5), "another mount sees them", || {
        sh(&format!("getfattr -n user.color --only-values {}", other.p("notes.txt"))).stdout == b"blue"
    });

    ok(&format!("mkdir {}", m.p("dir")));
    ok(&format!("setfattr -n user.kind -v folder {}", m.p("dir")));
    ok(&format!("mv {} {}", m.p("notes.txt"), m.p("dir/renamed.txt")));
    assert_eq!(dumped(&m.p("dir/renamed.txt")), expected, "a rename keeps them");
    assert_eq!(ok(&format!("getfattr -n user.kind --only-values {}", m.p("dir"))), "folder");

    ok(&format!("echo rewritten > {}", m.p("dir/renamed.txt")));
    assert_eq!(dumped(&m.p("dir/renamed.txt")), expected, "emptying a file keeps them");
    assert_eq!(ok(&format!("cat {}", m.p("dir/renamed.txt"))), "rewritten\n");
    ok(&format!("setfattr -x user.color {}", m.p("dir/renamed.txt")));
    let gone = fails(&format!("getfattr -n user.color {}", m.p("dir/renamed.txt")));
    assert!(gone.contains("No such attribute"), "{gone}");
    let refused = fails(&format!("setfattr -n security.label -v x {}", m.p("dir/renamed.txt")));
    assert!(refused.contains("Operation not supported"), "{refused}");
    assert!(fails(&format!("getfattr -n security.selinux {}", m.p("dir"))).contains("No such attribute"));
    assert!(ok(&format!("ls -l {}", m.p("dir"))).contains("renamed.txt"));

    // cp -a carries them out of the mount and back in.
    let local = d.local_dir("copy");
    ok(&format!("cp -a {} '{}'", m.p("dir"), local.display()));
    let local_dir = local.join("dir");
    assert_eq!(ok(&format!("getfattr -n user.kind --only-values '{}'", local_dir.display())), "folder");
    ok(&format!("setfattr -n user.origin -v local '{}'", local_dir.join("renamed.txt").display()));
    ok(&format!("cp -a '{}' {}", local_dir.display(), m.p("back")));
    assert_eq!(dumped(&m.p("back/renamed.txt")), "user.bytes=0x00ff0a01\nuser.empty=0x\nuser.origin=0x6c6f63616c\n\n");
    assert_eq!(ok(&format!("getfattr -n user.kind --only-values {}", m.p("back"))), "folder");

    // tar --xattrs makes each file with mknod(2), sets its attributes,
    // then writes it: out of the mount and back in.
    let archive = d.dir.path().join("x.tar");
    ok(&format!("tar --xattrs -cf '{}' -C {} back", archive.display(), m.p("")));
    let extracted = d.local_dir("extracted");
    ok(&format!("tar --xattrs -xf '{}' -C '{}'", archive.display(), extracted.display()));
    let from_tar = extracted.join("back/renamed.txt");
    assert_eq!(ok(&format!("getfattr -n user.origin --only-values '{}'", from_tar.display())), "local");
    ok(&format!("mkdir {} && tar --xattrs -xf '{}' -C {}", m.p("untarred"), archive.display(), m.p("untarred")));
    assert_eq!(dumped(&m.p("untarred/back/renamed.txt")), dumped(&m.p("back/renamed.txt")));
    assert_eq!(ok(&format!("cat {}", m.p("untarred/back/renamed.txt"))), "rewritten\n");

    same_answers(&m.join("calls"), &local.join("calls"));
}

#[test]
fn without_xattrs_a_mount_refuses_them_and_the_kernel_stops_asking() {
    let d = Deployment::start("no-xattrs");
    let m = d.mount(USER1);
    ok(&format!("echo hello > {}", m.p("f")));
    let refused = fails(&format!("setfattr -n user.color -v blue {}", m.p("f")));
    assert!(refused.contains("Operation not supported"), "{refused}");
    assert!(fails(&format!("getfattr -n user.color {}", m.p("f"))).contains("Operation not supported"));
    assert!(ok(&format!("ls -l {}", m.p(""))).contains(" f\n"));
    // cp -a of a file that has attributes still copies it, without them.
    let local = d.local_dir("src");
    std::fs::write(local.join("tagged"), "data").unwrap();
    ok(&format!("setfattr -n user.tag -v x '{}'", local.join("tagged").display()));
    ok(&format!("cp -a '{}' {}", local.join("tagged").display(), m.p("tagged")));
    assert_eq!(std::fs::read_to_string(m.join("tagged")).unwrap(), "data");
    assert_eq!(
        ok(&format!("getfattr -d --absolute-names '{}'", d.storage.join("User1/f").display())),
        "",
        "nothing was set on the node"
    );
}

#[test]
fn through_a_read_only_share_attributes_are_read_but_never_changed() {
    let d = Deployment::start("xattrs-shared");
    let owner = d.mount_with_xattrs(USER1);
    let grantee = d.mount_with_xattrs(USER2);
    ok(&format!("mkdir {0}/ro {0}/rw && echo a > {0}/ro/f && echo b > {0}/rw/f", owner.p("")));
    ok(&format!("setfattr -n user.tag -v mine {}", owner.p("ro/f")));
    ok(&format!("printf 'ro User2 ro\\nrw User2 rw\\n' > {}", owner.p(".shares")));
    let shared = |rel: &str| grantee.p(&format!(".shared/User1/{rel}"));
    within(Duration::from_secs(10), "the grant reaches the grantee", || {
        sh(&format!("getfattr -n user.tag --only-values {}", shared("ro/f"))).stdout == b"mine"
    });
    let refused = fails(&format!("setfattr -n user.tag -v theirs {}", shared("ro/f")));
    assert!(refused.contains("Permission denied"), "{refused}");
    assert!(fails(&format!("setfattr -x user.tag {}", shared("ro/f"))).contains("Permission denied"));
    ok(&format!("setfattr -n user.by -v grantee {}", shared("rw/f")));
    assert_eq!(ok(&format!("getfattr -n user.tag --only-values {}", owner.p("ro/f"))), "mine");
    assert_eq!(ok(&format!("getfattr -n user.by --only-values {}", owner.p("rw/f"))), "grantee");
    assert_eq!(ok(&format!("getfattr -d --absolute-names {}", grantee.p(".shared"))), "");
}

#[test]
fn tar_right_after_changes_sees_no_file_change_as_it_reads() {
    // A directory made here carries the ctime this mount foresaw until the
    // node's is read; the node's listing arriving mid-tar once moved it,
    // and tar exited 1 with "file changed as we read it".
    let d = Deployment::start("xattrs-tar-c");
    let m = d.mount_with_xattrs(USER1);
    ok(&format!("mkdir {0} && echo a > {0}/f && setfattr -n user.k -v v {0}/f", m.p("t")));
    let archive = d.dir.path().join("t.tar");
    let out = sh(&format!("tar --xattrs -cf '{}' -C {} t", archive.display(), m.p("")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
