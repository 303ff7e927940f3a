//! End-to-end: two mounts of the same user. Changes made through one show
//! up in the other through `dfos.events` long before any cache expires
//! (the mounts run with a cache TTL far above the waits here, so only the
//! event path can make these pass).

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;

/// Waits until `check` holds; the mounts' caches would hide the change for
/// 60 s, so holding within 5 s means an event invalidated them.
fn soon(what: &str, check: impl Fn() -> bool) {
    within(Duration::from_secs(5), &format!("{what} reaching the other mount"), check)
}

/// A mount of USER1 whose caches outlive every wait here by far, with
/// `extra` arguments.
fn long_cached_mount(d: &Deployment, extra: &[&str]) -> Mount {
    d.mount_with(USER1, 30, &[&["--cache-ttl", "60"], extra].concat())
}

/// Two mounts of the deployment's first user, with long cache lifetimes.
fn two_long_cached_mounts(d: &Deployment) -> (Mount, Mount) {
    (long_cached_mount(d, &[]), long_cached_mount(d, &[]))
}

/// Two long-cached mounts of the deployment, both seeing an empty `log`.
fn two_mounts_with_an_empty_log(d: &Deployment) -> (Mount, Mount) {
    let (a, b) = two_long_cached_mounts(d);
    fs::write(a.join("log"), "").unwrap();
    soon("a create", || b.join("log").exists());
    (a, b)
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

#[test]
fn changes_through_one_mount_reach_another_of_the_same_user() {
    let d = Deployment::start("coherence");
    let (a, b) = two_long_cached_mounts(&d);
    fs::create_dir(a.join("d")).unwrap();
    fs::write(a.join("d/f"), "v1").unwrap();
    // B caches the listing, the attributes and the contents.
    assert_eq!(names(&b.join("d")), ["f"]);
    assert_eq!(fs::read_to_string(b.join("d/f")).unwrap(), "v1");
    assert!(!b.join("d/new").exists());

    fs::write(a.join("d/new"), "n").unwrap();
    soon("a create", || b.join("d/new").exists() && names(&b.join("d")) == ["f", "new"]);

    fs::write(a.join("d/f"), "version two").unwrap();
    soon("an overwrite", || fs::read_to_string(b.join("d/f")).ok().as_deref() == Some("version two"));

    fs::remove_file(a.join("d/new")).unwrap();
    soon("an unlink", || !b.join("d/new").exists());

    fs::rename(a.join("d"), a.join("e")).unwrap();
    soon("a rename", || {
        !b.join("d").exists() && fs::read_to_string(b.join("e/f")).ok().as_deref() == Some("version two")
    });

    // And the other way round.
    fs::write(b.join("e/from-b"), "b").unwrap();
    soon("a create from B", || fs::read_to_string(a.join("e/from-b")).ok().as_deref() == Some("b"));
}

/// Appends through two mounts, one right after the other (a log file
/// shared by two machines): each `open(O_APPEND)` asks a storage node
/// where the file ends, so no append lands on another's, though the
/// change event of the one before may not have arrived yet. Before, the
/// second mount appended at the end it had cached and overwrote the first
/// mount's line every time. A truncate through the appending mount moves
/// its end back.
#[test]
fn appends_through_two_mounts_in_turn_keep_every_line() {
    let d = Deployment::start("appends");
    let (a, b) = two_mounts_with_an_empty_log(&d);
    let mut script = String::new();
    for i in 1..=20 {
        script += &format!("echo a{i} >> {}; echo b{i} >> {}; ", a.p("log"), b.p("log"));
    }
    ok(&script);
    let expected: String = (1..=20).map(|i| format!("a{i}\nb{i}\n")).collect();
    assert_eq!(fs::read_to_string(d.storage.join("User1/log")).unwrap(), expected);
    assert_eq!(fs::read_to_string(b.join("log")).unwrap(), expected, "the last appender reads it all at once");
    soon("the appends", || fs::read_to_string(a.join("log")).ok().as_deref() == Some(expected.as_str()));

    let truncated = "import os; fd = os.open(os.sys.argv[1], os.O_WRONLY | os.O_APPEND); \
        os.write(fd, b'12345'); os.ftruncate(fd, 2); os.write(fd, b'xy'); os.close(fd)";
    ok(&format!("python3 -c \"{truncated}\" {}", b.p("log")));
    assert_eq!(fs::read_to_string(b.join("log")).unwrap(), "a1xy", "appended at the truncated end");
}

/// Appends from two mounts at the same moment keep every line, each
/// mount's in its own order: a storage node places each append at the end
/// the file has when it applies it. Before, each mount appended at the end
/// it had last been told of, and lines appended within the same few
/// milliseconds overwrote each other.
#[test]
fn appends_through_two_mounts_at_once_keep_every_line() {
    let d = Deployment::start("appends-at-once");
    let (a, b) = two_mounts_with_an_empty_log(&d);
    let appender = |mount: &str, tag: &str| format!("for i in $(seq 1 150); do echo {tag}$i >> {mount}; done");
    ok(&format!("({}) & first=$!; ({}); wait $first", appender(&a.p("log"), "a"), appender(&b.p("log"), "b")));
    let stored = fs::read_to_string(d.storage.join("User1/log")).unwrap();
    let lines: Vec<&str> = stored.lines().collect();
    assert_eq!(lines.len(), 300, "every line, none overwritten:\n{stored}");
    for tag in ["a", "b"] {
        let own: Vec<&str> = lines.iter().copied().filter(|line| line.starts_with(tag)).collect();
        let expected: Vec<String> = (1..=150).map(|i| format!("{tag}{i}")).collect();
        assert_eq!(own, expected, "mount {tag}'s lines in its order");
    }
    for mount in [&a, &b] {
        soon("all the appends", || fs::read_to_string(mount.join("log")).ok().as_deref() == Some(stored.as_str()));
    }
}

/// `renameat2(RENAME_EXCHANGE)` swaps a file and a directory atomically:
/// the storage node swaps them, the mount that asked and another mount
/// see them swapped, and a file open through the first mount follows its
/// file to the other name. Exchanging with a missing name fails with
/// ENOENT and changes nothing. Before, the mount refused every exchange
/// with EINVAL.
#[test]
fn rename_exchange_swaps_a_file_and_a_directory_on_every_mount() {
    let d = Deployment::start("exchange");
    let (a, b) = two_long_cached_mounts(&d);
    fs::write(a.join("file"), "the file").unwrap();
    fs::create_dir(a.join("dir")).unwrap();
    fs::write(a.join("dir/inner"), "inside").unwrap();
    soon("the tree on b", || fs::read_to_string(b.join("dir/inner")).is_ok_and(|s| s == "inside"));
    assert_eq!(fs::read_to_string(b.join("file")).unwrap(), "the file");
    let exchange = r#"import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[1] + "/file", os.O_WRONLY | os.O_APPEND)
for there in ("dir", "missing"):
    rc = libc.renameat2(-100, (sys.argv[1] + "/file").encode(), -100, (sys.argv[1] + "/" + there).encode(), 2)
    print(there, "ok" if rc == 0 else os.strerror(ctypes.get_errno()))
os.write(fd, b" and more"); os.close(fd)"#;
    let out = ok(&format!("python3 -c '{exchange}' {}", a.p("")));
    assert_eq!(out, "dir ok\nmissing No such file or directory\n");
    for (root, what) in [(d.storage.join("User1"), "storage"), (a.path.clone(), "mount a")] {
        assert_eq!(fs::read_to_string(root.join("dir")).unwrap(), "the file and more", "{what}");
        assert_eq!(fs::read_to_string(root.join("file/inner")).unwrap(), "inside", "{what}");
    }
    soon("the exchange on b", || fs::read_to_string(b.join("dir")).is_ok_and(|s| s == "the file and more"));
    assert_eq!(fs::read_to_string(b.join("file/inner")).unwrap(), "inside");
    assert_eq!(names(&b.path), ["dir", "file"]);
}

/// With `--close-to-open`, every open asks a storage node, so what another
/// mount closed is read at once, without waiting for its change event
/// (without the flag, the first such read in this loop already saw the
/// version before).
#[test]
fn close_to_open_reads_what_another_mount_just_closed() {
    let d = Deployment::start("close-to-open");
    let a = long_cached_mount(&d, &[]);
    let b = long_cached_mount(&d, &["--close-to-open"]);
    fs::write(a.join("f"), "version 0").unwrap();
    soon("a create", || fs::read_to_string(b.join("f")).is_ok_and(|s| s == "version 0"));
    for i in 1..=50 {
        // Growing, so the kernel's cached size would cut a stale read short.
        let version = format!("version {i}{}", "+".repeat(i));
        fs::write(a.join("f"), &version).unwrap();
        assert_eq!(fs::read_to_string(b.join("f")).unwrap(), version, "round {i}");
    }
}

/// A file open for writing on one mount follows a rename made through
/// another, as it would on a local disk or NFS: its later writes land in
/// the renamed file. Before, they named the old path and failed (ENOENT).
/// A file open on the first mount that the rename replaced is detached:
/// its reads fail rather than return the new file's bytes.
#[test]
fn an_open_file_follows_a_rename_made_through_another_mount() {
    use std::io::{Read, Write};
    let d = Deployment::start("rename-open");
    let (a, b) = two_long_cached_mounts(&d);
    fs::write(a.join("old"), "replaced").unwrap();
    let mut writer = fs::File::create(a.join("f")).unwrap();
    writer.write_all(b"part one, ").unwrap();
    writer.sync_all().unwrap();
    let mut replaced = fs::File::open(a.join("old")).unwrap();
    soon("a create", || b.join("f").exists() && b.join("old").exists());
    fs::rename(b.join("f"), b.join("old")).unwrap();
    soon("a rename", || !a.join("f").exists() && fs::read_to_string(a.join("old")).is_ok_and(|s| s == "part one, "));
    writer.write_all(b"part two").unwrap();
    writer.sync_all().unwrap();
    drop(writer);
    assert_eq!(fs::read_to_string(d.storage.join("User1/old")).unwrap(), "part one, part two");
    assert!(!d.storage.join("User1/f").exists());
    let mut bytes = Vec::new();
    if replaced.read_to_end(&mut bytes).is_ok() {
        assert_eq!(String::from_utf8_lossy(&bytes), "replaced", "never the bytes of the file that replaced it");
    }
}

/// Bytes one mount wrote are read by the other straight from the request
/// log (the same user's writes), and a later overwrite of a piece through
/// the first mount shows in the second.
#[test]
fn large_files_written_through_one_mount_read_back_through_another() {
    let d = Deployment::start("coherence-large");
    let (a, b) = two_long_cached_mounts(&d);
    let model = d.dir.path().join("model.bin");
    fs::write(&model, random_bytes(8 << 20, 9)).unwrap();
    ok(&format!("cp '{}' {}", model.display(), a.p("big.bin")));
    ok(&format!("cmp '{}' {}", model.display(), b.p("big.bin")));
    let patch = "printf 'patched by A' | dd of={} bs=1 seek=3145728 conv=notrunc status=none";
    ok(&patch.replace("{}", &format!("'{}'", model.display())));
    ok(&patch.replace("{}", &a.p("big.bin")));
    soon("an overwrite of a piece", || sh(&format!("cmp '{}' {}", model.display(), b.p("big.bin"))).status.success());
}

/// A file read once is read again from the kernel's page cache while it is
/// unchanged, across close and open as NFS does: even with the storage
/// daemon stopped. A change through another mount drops those pages.
#[test]
fn an_unchanged_file_is_reread_from_the_page_cache_until_another_mount_changes_it() {
    let mut d = Deployment::start("keep-cache");
    let a = d.mount_with(USER1, 3, &["--cache-ttl", "60"]);
    let b = long_cached_mount(&d, &[]);
    let model = d.dir.path().join("model.bin");
    fs::write(&model, random_bytes(4 << 20, 11)).unwrap();
    // Written through A itself, so no other mount's events are on their way.
    ok(&format!("cp '{}' {}", model.display(), a.p("f.bin")));
    let compare = format!("cmp '{}' {}", model.display(), a.p("f.bin"));
    // Other tests running beside this one drop every page cache on the
    // machine now and then (drop_caches); a few attempts make sure one
    // run of three reads is not disturbed. Without the kept cache no
    // attempt can pass: the third read has no storage daemon to ask.
    let reread_without_storage = (0..5).any(|_| {
        ok(&compare);
        ok(&compare);
        d.stop_node(0);
        let cached = sh(&compare).status.success();
        d.start_node(0);
        cached
    });
    assert!(reread_without_storage, "the third read needed the stopped storage daemon every time");
    let patch = "printf 'changed by B' | dd of={} bs=1 seek=2000000 conv=notrunc status=none";
    ok(&patch.replace("{}", &format!("'{}'", model.display())));
    ok(&patch.replace("{}", &b.p("f.bin")));
    soon("a change of a cached file", || sh(&compare).status.success());
}

/// A small file `cp` wrote (through a write-only handle, which bypasses
/// the page cache) is handed to the kernel's page cache once its close is
/// answered, so reading it back (`diff`, a compiler) needs no FUSE read;
/// another mount's change still replaces what the kernel kept.
#[test]
fn a_small_file_this_mount_wrote_is_read_back_from_the_kernels_page_cache() {
    let d = Deployment::start("store-pages");
    let (a, b) = two_long_cached_mounts(&d);
    let model = d.dir.path().join("model.bin");
    fs::write(&model, random_bytes(10_000, 5)).unwrap();
    let resident_pages = || ok(&format!("fincore --noheadings --output PAGES {}", a.p("f.bin"))).trim().to_owned();
    // Other tests drop every page cache on the machine now and then; one
    // attempt of a few must find the pages there. Without them none can.
    let kept = (0..5).any(|_| {
        ok(&format!("rm -f {0} && cp '{1}' {0}", a.p("f.bin"), model.display()));
        resident_pages() == "3"
    });
    assert!(kept, "the 3 pages of a 10,000-byte file were never in the kernel's page cache after cp");
    ok(&format!("cmp '{}' {}", model.display(), a.p("f.bin")));
    fs::write(b.join("f.bin"), "changed by B").unwrap();
    soon("a change of a file whose pages the kernel kept", || {
        fs::read(a.join("f.bin")).is_ok_and(|bytes| bytes == b"changed by B")
    });
}

/// A small file's create travels with its data, and unlinks of known names
/// travel together (`Request::Batch`), so `cp -r` and `rm -r` put fewer
/// messages into the request log than they make requests; every change in
/// a batch still reaches the other mount (each carries its own request id,
/// by which mounts tell replicas' copies of one change apart).
#[test]
fn batched_creates_and_unlinks_take_fewer_messages_and_all_reach_another_mount() {
    let d = Deployment::start("batches");
    let (a, b) = two_long_cached_mounts(&d);
    let src = d.local_dir("tree");
    for dir in 0..4 {
        fs::create_dir(src.join(format!("d{dir}"))).unwrap();
        for file in 0..25 {
            fs::write(src.join(format!("d{dir}/f{file}")), format!("file {file} of {dir}\n").repeat(file + 1)).unwrap();
        }
    }
    fs::create_dir(a.join("copy")).unwrap();
    assert!(names(&b.join("copy")).is_empty(), "B caches the empty listing");

    let before = d.request_messages();
    ok(&format!("cp -r '{}' {}", src.display(), a.p("copy/tree")));
    let copy_messages = d.request_messages() - before;
    // One by one: 5 mkdirs, 100 creates and 100 writes.
    assert!(copy_messages < 195, "cp -r of 100 files and 5 directories took {copy_messages} messages");
    soon("the copied tree", || names(&b.join("copy")) == ["tree"]);
    ok(&format!("diff -r '{}' {}", src.display(), b.p("copy/tree")));

    let before = d.request_messages();
    ok(&format!("rm -r {}", a.p("copy/tree")));
    let remove_messages = d.request_messages() - before;
    assert!(remove_messages < 80, "rm -r of 100 files and 5 directories took {remove_messages} messages");
    soon("the removal", || names(&b.join("copy")).is_empty());
    for dir in 0..4 {
        assert!(!b.join(&format!("copy/tree/d{dir}")).exists());
    }
    assert!(names(&a.join("copy")).is_empty());
}

#[test]
fn a_missing_name_stays_known_missing_in_the_kernel_until_another_mount_creates_it() {
    let d = Deployment::start("negative");
    let a = d.mount(USER1);
    let b = d.mount(USER1);
    fs::create_dir(b.join("include")).unwrap();
    soon("B's directory on A", || a.join("include").is_dir());
    // A has not listed the directory: only a storage node knows what is in it.
    let before = d.request_messages();
    for _ in 0..30 {
        assert!(!a.join("include/config.h").exists());
    }
    let messages = d.request_messages() - before;
    assert!(messages < 10, "30 lookups of one missing name took {messages} messages");
    fs::write(b.join("include/config.h"), b"#define DFOS 1\n").unwrap();
    soon("B's new file on A", || a.join("include/config.h").exists());
    assert_eq!(fs::read(a.join("include/config.h")).unwrap(), b"#define DFOS 1\n");
}

#[test]
fn an_fsync_travels_with_the_write_it_makes_durable() {
    let d = Deployment::start("fsync-batch");
    let m = d.mount(USER1);
    fs::create_dir(m.join("logs")).unwrap();
    let before = d.request_messages();
    for i in 0..10 {
        ok(&format!("printf 'entry {i}\\n' | dd of={} conv=fsync status=none", m.p(&format!("logs/{i}"))));
    }
    let messages = d.request_messages() - before;
    // One by one: a create, a write and an fsync per file.
    assert!(messages < 25, "10 files written with dd conv=fsync took {messages} messages");
    for i in 0..10 {
        let on_node = fs::read_to_string(d.storage.join(format!("User1/logs/{i}"))).unwrap();
        assert_eq!(on_node, format!("entry {i}\n"), "what fsync returned for is on the storage node");
    }
}

/// `cp` within a mount copies on the storage node (`copy_file_range`): a
/// file larger than one copy request arrives whole, in a few request
/// messages instead of one per chunk. A copy into the middle of a file,
/// from a file whose last writes the mount still buffers, carries those
/// writes; and another mount that had the target cached sees the copy.
#[test]
fn copies_within_a_mount_happen_on_the_storage_node_and_reach_another_mount() {
    use dfos_protocol::limits::{CHUNK_SIZE, MAX_COPY_BYTES};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let d = Deployment::start("copy-range");
    let (a, b) = two_long_cached_mounts(&d);
    let size = MAX_COPY_BYTES as usize + 3 * CHUNK_SIZE + 12345;
    let source = d.dir.path().join("source.bin");
    fs::write(&source, random_bytes(size, 21)).unwrap();
    ok(&format!("cp '{}' {}", source.display(), a.p("big")));
    let before = d.request_messages();
    ok(&format!("cp {} {}", a.p("big"), a.p("big-copy")));
    let messages = d.request_messages() - before;
    let chunks = size.div_ceil(CHUNK_SIZE) as i64;
    assert!(messages < chunks / 2, "{messages} request messages for a copy of {chunks} chunks");
    ok(&format!("cmp '{}' {}", source.display(), a.p("big-copy")));
    ok(&format!("cmp '{}' '{}'", source.display(), d.storage.join("User1/big-copy").display()));
    ok(&format!("cmp '{}' {}", source.display(), b.p("big-copy")));

    let mut model = random_bytes(100_000, 22);
    fs::write(a.join("target"), &model).unwrap();
    assert!(fs::read(b.join("target")).unwrap() == model, "B caches the target");
    let buffered = fs::OpenOptions::new().read(true).write(true).create_new(true).open(a.join("s")).unwrap();
    let written = random_bytes(50_000, 23);
    buffered.write_all_at(&written, 0).unwrap();
    let target = fs::OpenOptions::new().write(true).open(a.join("target")).unwrap();
    let (mut from, mut to) = (1000i64, 99_000i64);
    // SAFETY: two open descriptors and two offsets the call may advance.
    let copied =
        unsafe { libc::copy_file_range(buffered.as_raw_fd(), &mut from, target.as_raw_fd(), &mut to, 40_000, 0) };
    assert_eq!(copied, 40_000, "{}", std::io::Error::last_os_error());
    drop((buffered, target));
    model.resize(139_000, 0);
    model[99_000..].copy_from_slice(&written[1000..41_000]);
    assert!(fs::read(a.join("target")).unwrap() == model, "the copy on A differs from the model");
    assert!(fs::read(d.storage.join("User1/target")).unwrap() == model, "the node's target differs");
    soon("a copy into a cached file", || fs::read(b.join("target")).unwrap() == model);
}

/// A mount reading through a directory of small files another mount wrote
/// (`diff -r`, `grep -r` on a fresh mount) gets them a directory at a time,
/// not one round trip each; what it got that way still gives way to a
/// change made through the other mount.
#[test]
fn small_files_another_mount_wrote_are_fetched_many_at_a_time() {
    let d = Deployment::start("prefetch");
    let a = long_cached_mount(&d, &[]);
    let local = d.dir.path().join("model");
    let files = 200;
    for sub in ["", "/sub"] {
        fs::create_dir_all(format!("{}{sub}", local.display())).unwrap();
        for i in 0..files / 2 {
            let len = 100 + (i * 37) % 3000;
            fs::write(format!("{}{sub}/f{i:03}", local.display()), random_bytes(len, i as u64)).unwrap();
        }
    }
    ok(&format!("cp -r '{}' {}", local.display(), a.p("tree")));
    let b = long_cached_mount(&d, &[]);
    let before = d.request_messages();
    ok(&format!("diff -r '{}' {}", local.display(), b.p("tree")));
    let messages = d.request_messages() - before;
    assert!(messages < 40, "{messages} request messages for a diff -r of {files} files on a fresh mount");
    fs::write(a.join("tree/sub/f007"), "changed through A").unwrap();
    soon("a change to a prefetched file", || fs::read(b.join("tree/sub/f007")).unwrap() == b"changed through A");
    ok(&format!("cp {} '{}/sub/f007'", a.p("tree/sub/f007"), local.display()));
    ok(&format!("diff -r '{}' {}", local.display(), b.p("tree")));
}

#[test]
fn a_fresh_mount_walks_a_tree_another_mount_made_in_a_few_requests() {
    let d = Deployment::start("tree-walk");
    let a = long_cached_mount(&d, &[]);
    let local = d.dir.path().join("model");
    let mut dirs = 0;
    for top in 0..4 {
        for mid in 0..4 {
            for leaf in 0..2 {
                let dir = local.join(format!("t{top}/m{mid}/l{leaf}"));
                fs::create_dir_all(&dir).unwrap();
                fs::write(dir.join("f"), format!("{top}{mid}{leaf}")).unwrap();
                dirs += 1;
            }
        }
    }
    ok(&format!("cp -r '{}' {}", local.display(), a.p("tree")));
    let listing = |root: &str| ok(&format!("cd {root} && find . -printf '%y %s %p\\n' | sort"));
    let b = long_cached_mount(&d, &[]);
    let before = d.request_messages();
    let walked = listing(&b.p("tree"));
    let messages = d.request_messages() - before;
    assert_eq!(walked, listing(&local.display().to_string()));
    assert!(messages < 8, "{messages} request messages for a find of {dirs} leaf directories on a fresh mount");
    // Reading every file goes on from one directory's small files to the next ones'.
    let before = d.request_messages();
    ok(&format!("diff -r '{}' {}", local.display(), b.p("tree")));
    let messages = d.request_messages() - before;
    assert!(messages < 8, "{messages} request messages to read the {dirs} files of as many directories");
    // Listings that came ahead still follow the other mount's changes.
    fs::create_dir(a.join("tree/t3/m3/l1/new")).unwrap();
    fs::remove_file(a.join("tree/t2/m0/l0/f")).unwrap();
    fs::create_dir(local.join("t3/m3/l1/new")).unwrap();
    fs::remove_file(local.join("t2/m0/l0/f")).unwrap();
    soon("a directory made in a prefetched listing", || b.join("tree/t3/m3/l1/new").is_dir());
    soon("a file removed from a prefetched listing", || !b.join("tree/t2/m0/l0/f").exists());
    assert_eq!(listing(&b.p("tree")), listing(&local.display().to_string()));
}

/// `ls -ld`, `find -newer`, `make` and file managers read a directory's
/// mtime to see that its entries changed. The mount that changes them
/// shows the new time at once, and another mount once the event arrives.
#[test]
fn a_directory_mtime_moves_with_its_entries_on_both_mounts() {
    use std::os::unix::fs::MetadataExt;
    let d = Deployment::start("dir-mtime");
    let (a, b) = two_long_cached_mounts(&d);
    let stamp = |m: fs::Metadata| (m.mtime(), m.mtime_nsec());
    let on_a = |p: &str| stamp(fs::metadata(a.join(p)).unwrap());
    let on_b = |p: &str| stamp(fs::metadata(b.join(p)).unwrap());
    let stored = |p: &str| stamp(fs::metadata(d.storage.join("User1").join(p)).unwrap());
    let links = |p: &str| {
        (fs::metadata(a.join(p)).unwrap().nlink(), fs::metadata(d.storage.join("User1").join(p)).unwrap().nlink())
    };
    fs::create_dir_all(a.join("d/keep")).unwrap();
    fs::create_dir(a.join("e")).unwrap();
    assert_eq!(on_b("d"), stored("d"), "B reads d from the node");
    let untouched = on_a("d/keep");

    let steps: [(&str, &[&str]); 6] = [
        ("touch d/f", &["d"]),
        ("ln -s f d/l", &["d"]),
        ("mkdir d/sub", &["d"]),
        ("mv d/f e/f", &["d", "e"]),
        ("rm d/l e/f", &["d", "e"]),
        ("rmdir d/sub", &["d"]),
    ];
    for (step, changed) in steps {
        let before: Vec<_> = changed.iter().map(|p| (on_a(p), on_b(p))).collect();
        ok(&format!("cd {} && {step}", a.p("")));
        for (dir, (a_before, b_before)) in changed.iter().zip(before) {
            assert!(on_a(dir) > a_before, "{step}: A shows {dir}'s change at once");
            soon(step, || on_b(dir) > b_before);
            assert_eq!(on_b(dir), stored(dir), "{step}: B shows the node's time of {dir}");
        }
        if step.starts_with("mkdir") {
            assert_eq!(links("d"), (4, 4), "d holds keep and sub");
        }
    }
    assert_eq!(links("d"), (3, 3), "sub is gone again");
    assert_eq!(on_a("d/keep"), untouched, "a directory whose entries stayed keeps its time");
    assert_eq!(on_b("d/keep"), stored("d/keep"));
}

/// With `storaged --trash-hours`, what `rm` deletes and what a save by
/// rename replaces stay in `.trash/`, where both mounts see them at once,
/// `mv` restores them and `rm` there frees them for good.
#[test]
fn deleted_and_replaced_files_wait_in_the_trash_and_can_be_restored() {
    let d = Deployment::start_with_storaged_flags("trash", &["--trash-hours", "24"]);
    let (a, b) = two_long_cached_mounts(&d);
    let versions = |root: &str| {
        let found = ok(&format!("cd {root} && find .trash -type f | sort"));
        found.lines().map(|l| l.to_owned()).collect::<Vec<_>>()
    };
    fs::create_dir(a.join("docs")).unwrap();
    fs::write(a.join("docs/notes.txt"), "first draft\n").unwrap();
    assert!(fails(&format!("ls {}", b.p(".trash"))).contains("No such file"), "no trash before anything is deleted");
    ok(&format!("sed -i s/first/second/ {}", a.p("docs/notes.txt")));
    fs::remove_file(a.join("docs/notes.txt")).unwrap();

    let kept = versions(&a.p(""));
    assert_eq!(kept.len(), 2, "{kept:?}");
    let contents: Vec<String> = kept.iter().map(|v| fs::read_to_string(a.join(v)).unwrap()).collect();
    assert_eq!(contents, ["first draft\n", "second draft\n"], "oldest first: {kept:?}");
    for version in &kept {
        let (dir, name) = version.rsplit_once('/').unwrap();
        assert!(dir.starts_with(".trash/20") && dir.ends_with("/docs"), "{version}: its bucket, then its old path");
        assert!(name.starts_with("notes.txt@"), "{version}");
    }
    soon("the trash", || versions(&b.p("")) == kept);
    assert_eq!(versions(&format!("'{}'", d.storage.join("User1").display())), kept, "on the storage node");

    ok(&format!("mv {} {}", a.p(&kept[1]), a.p("docs/notes.txt")));
    assert_eq!(fs::read_to_string(a.join("docs/notes.txt")).unwrap(), "second draft\n", "restored by mv");
    soon("the restore", || fs::read_to_string(b.join("docs/notes.txt")).ok().as_deref() == Some("second draft\n"));
    ok(&format!("echo third > {}", a.p("docs/notes.txt")));
    let after = versions(&a.p(""));
    let overwritten: Vec<&String> = after.iter().filter(|v| !kept.contains(v)).collect();
    assert_eq!(overwritten.len(), 1, "{after:?}");
    assert_eq!(
        fs::read_to_string(a.join(overwritten[0])).unwrap(),
        "second draft\n",
        "a shell's > keeps what it empties"
    );
    assert_eq!(fs::read_to_string(a.join("docs/notes.txt")).unwrap(), "third\n");
    ok(&format!("rm -r {}", a.p(".trash")));
    assert!(!d.storage.join("User1/.trash").exists(), "deleting in the trash frees the space");
    assert_eq!(fs::read_to_string(d.storage.join("User1/docs/notes.txt")).unwrap(), "third\n");
}

/// `tar x` and `ln` make hard links: one file under several names, which a
/// change through any name reaches on both mounts at once, though each
/// mount caches by path (a file with several names is not cached).
#[test]
fn hard_links_are_one_file_under_every_name_on_both_mounts_and_only_the_last_name_goes_to_the_trash() {
    use std::os::unix::fs::MetadataExt;
    let d = Deployment::start_with_storaged_flags("hardlinks", &["--trash-hours", "24"]);
    let (a, b) = two_long_cached_mounts(&d);
    let src = d.local_dir("src");
    fs::create_dir(src.join("bin")).unwrap();
    fs::write(src.join("bin/tool"), "#!/bin/sh\necho tool\n").unwrap();
    fs::hard_link(src.join("bin/tool"), src.join("bin/alias")).unwrap();
    fs::hard_link(src.join("bin/tool"), src.join("also")).unwrap();
    let archive = d.dir.path().join("links.tar");
    ok(&format!("tar cf '{}' -C '{}' .", archive.display(), src.display()));
    fs::create_dir(a.join("x")).unwrap();
    ok(&format!("tar xf '{}' -C {}", archive.display(), a.p("x")));
    let on_node = |rel: &str| fs::metadata(d.storage.join("User1/x").join(rel)).unwrap();
    let inode = on_node("bin/tool").ino();
    for name in ["bin/alias", "also"] {
        assert_eq!(on_node(name).ino(), inode, "{name}: tar made a hard link on the storage node");
    }
    assert_eq!(on_node("also").nlink(), 3);
    let counts = |m: &Mount| ok(&format!("cd {} && stat -c %h bin/tool bin/alias also", m.p("x")));
    // The name linked from may show its old count until the kernel's
    // attribute TTL (1 s) passes; the other names show it at once.
    soon("the link count", || counts(&a) == "3\n3\n3\n");
    assert_eq!(counts(&b), "3\n3\n3\n");

    let content = "#!/bin/sh\necho tool\necho changed\n";
    ok(&format!("echo 'echo changed' >> {}", a.p("x/also")));
    assert_eq!(fs::read_to_string(a.join("x/bin/alias")).unwrap(), content, "through another name, at once");
    assert_eq!(fs::read_to_string(a.join("x/bin/tool")).unwrap(), content);
    assert_eq!(fs::read_to_string(b.join("x/bin/tool")).unwrap(), content, "on the other mount, at once");
    ok(&format!("printf 'echo shorter\\n' > {}", b.p("x/bin/tool")));
    for name in ["x/bin/tool", "x/bin/alias", "x/also"] {
        assert_eq!(fs::read_to_string(a.join(name)).unwrap(), "echo shorter\n", "{name}: emptied and rewritten");
    }

    // A file the kernel knows by one name, linked: both names show the
    // link at once, and what is written through either.
    ok(&format!("echo hello > {0} && stat {0} >/dev/null", a.p("x/solo")));
    ok(&format!("ln {} {}", a.p("x/solo"), a.p("x/pair")));
    assert_eq!(ok(&format!("stat -c %h {} {}", a.p("x/solo"), a.p("x/pair"))), "2\n2\n");
    ok(&format!("echo more >> {}", a.p("x/pair")));
    assert_eq!(fs::read_to_string(a.join("x/solo")).unwrap(), "hello\nmore\n");

    ok(&format!("ln {} {}", a.p("x/also"), a.p("x/fourth")));
    assert!(fails(&format!("ln {} {}", a.p("x/also"), a.p("x/fourth"))).contains("File exists"));
    assert!(fails(&format!("ln {} {}", a.p("x/bin"), a.p("x/dirlink"))).contains("hard link not allowed"));
    assert_eq!(on_node("fourth").ino(), inode);
    assert_eq!(fs::read_to_string(b.join("x/fourth")).unwrap(), "echo shorter\n", "the other mount sees the new name");

    // Removing a name keeps the file under the others; the trash keeps
    // only a file's last name.
    ok(&format!("rm {} {} {}", a.p("x/also"), a.p("x/bin/alias"), b.p("x/fourth")));
    assert!(!d.storage.join("User1/.trash").exists(), "nothing kept while another name holds the bytes");
    soon("the last link count", || ok(&format!("stat -c %h {}", b.p("x/bin/tool"))) == "1\n");
    ok(&format!("rm {}", b.p("x/bin/tool")));
    // The unlink of a known file goes behind: `rm` returns before the node has it.
    let kept = || sh(&format!("cd '{}' && find .trash -type f", d.storage.join("User1").display())).stdout;
    soon("the unlink", || !kept().is_empty());
    let kept = String::from_utf8(kept()).unwrap();
    assert_eq!(kept.lines().count(), 1, "{kept}");
    soon("the kept version", || fs::read_to_string(a.join(kept.trim())).ok().as_deref() == Some("echo shorter\n"));
}

/// The names of a hard-linked file are one inode, on the mount that linked
/// it and on another: tools that find hard links by inode number keep
/// them one file (`tar c` stores a link, `cp -a` makes one, `find
/// -samefile` finds both names).
#[test]
fn the_names_of_a_hard_link_share_one_inode_number_on_every_mount() {
    let d = Deployment::start("link-inodes");
    let (a, b) = two_long_cached_mounts(&d);
    fs::create_dir(a.join("x")).unwrap();
    ok(&format!("echo data > {} && ln {} {}", a.p("x/f"), a.p("x/f"), a.p("x/g")));
    for m in [&a, &b] {
        let numbers = ok(&format!("cd {} && stat -c %i f g", m.p("x")));
        let (f, g) = numbers.split_once('\n').unwrap();
        assert_eq!(f, g.trim(), "one inode for both names: {numbers}");
        let same = ok(&format!("find {} -samefile {}", m.p("x"), m.p("x/f")));
        assert_eq!(same.lines().count(), 2, "{same}");
    }
    let archive = d.dir.path().join("x.tar");
    ok(&format!("tar cf '{}' -C {} .", archive.display(), b.p("x")));
    let listed = ok(&format!("tar tvf '{}'", archive.display()));
    assert!(listed.contains("link to"), "tar stored the second name as a hard link: {listed}");
    let copy = d.local_dir("copy");
    ok(&format!("cp -a {}/. '{}'", a.p("x"), copy.display()));
    assert_eq!(ok(&format!("stat -c %h '{}'", copy.join("f").display())), "2\n", "cp -a kept the link");
    ok(&format!("rm {}", a.p("x/f")));
    assert_eq!(ok(&format!("cat {}", a.p("x/g"))), "data\n", "the other name serves on");
}
