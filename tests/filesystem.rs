//! End-to-end: shell tools on a real dfos mount, backed by a real broker
//! and a real storage daemon. Each test checks results against a local
//! file or directory and against the bytes on the storage node's disk.

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, PermissionsExt};

use common::*;

#[test]
fn copy_in_and_out_of_a_64mib_a_one_byte_and_an_empty_file() {
    let d = Deployment::start("copy");
    let m = d.mount(USER1);
    let src = d.dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("big.bin"), random_bytes(64 << 20, 1)).unwrap();
    fs::write(src.join("one"), b"x").unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    let out = d.dir.path().join("out");
    fs::create_dir(&out).unwrap();
    for name in ["big.bin", "one", "empty"] {
        ok(&format!("cp '{}' {}", src.join(name).display(), m.p("")));
        drop_caches();
        ok(&format!("cp {} '{}'", m.p(name), out.join(name).display()));
        ok(&format!("cmp '{}' '{}'", src.join(name).display(), out.join(name).display()));
        ok(&format!("cmp '{}' '{}'", src.join(name).display(), d.storage.join("User1").join(name).display()));
    }
    assert_eq!(fs::metadata(m.join("empty")).unwrap().len(), 0);
    assert_eq!(
        ok(&format!("sha256sum < {}", m.p("big.bin"))),
        ok(&format!("sha256sum < '{}'", src.join("big.bin").display()))
    );
}

#[test]
fn tar_extracts_contents_modes_and_times_in_about_one_message_per_file() {
    let d = Deployment::start("tar");
    let m = d.mount(USER1);
    let src = d.local_dir("src");
    fs::create_dir(src.join("sub")).unwrap();
    for i in 0..30 {
        let path = src.join(if i % 5 == 0 { format!("sub/f{i}") } else { format!("f{i}") });
        fs::write(&path, random_bytes(100 + i * 37, i as u64)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(if i % 2 == 0 { 0o640 } else { 0o755 })).unwrap();
        ok(&format!("touch -d '2020-0{}-15 12:34:56' '{}'", i % 9 + 1, path.display()));
    }
    let archive = d.dir.path().join("src.tar");
    ok(&format!("tar cf '{}' -C '{}' .", archive.display(), src.display()));
    let local = d.local_dir("local");
    ok(&format!("tar xf '{}' -C '{}'", archive.display(), local.display()));
    fs::create_dir(m.join("x")).unwrap();
    let before = d.request_messages();
    ok(&format!("tar xf '{}' -C {}", archive.display(), m.p("x")));
    let messages = d.request_messages() - before;
    // A create with its data, the mtime, a chown and the mode: four per file, one by one.
    assert!(messages < 45, "tar x of 30 files took {messages} messages");
    let listing = |dir: &str| ok(&format!("cd {dir} && find . -type f | sort | xargs stat -c '%n %a %Y %s'"));
    let expected = listing(&format!("'{}'", local.display()));
    assert_eq!(listing(&m.p("x")), expected, "as the mount shows them");
    assert_eq!(listing(&format!("'{}'", d.storage.join("User1/x").display())), expected, "on the storage node");
    let before = d.request_messages();
    ok(&format!("diff -r '{}' {}", local.display(), m.p("x")));
    let messages = d.request_messages() - before;
    assert!(messages < 10, "reading back 30 files just extracted took {messages} messages");
}

/// Names that are not UTF-8 (Latin-1, as in old tar archives) work as any
/// other: created, listed, read, renamed, linked to, seen by another
/// mount and archived, with the bytes they were given. A name holding one
/// of the characters that stand for such bytes on the wire is refused.
#[test]
fn names_that_are_not_utf8_keep_their_bytes() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let d = Deployment::start("latin1");
    let m = d.mount(USER1);
    let name = |bytes: &[u8]| OsStr::from_bytes(bytes).to_owned();
    let names = [name(b"caf\xe9.txt"), name(b"\xff\xfe"), name(b"mixed-\xe9-\xc3\xa9")];
    for n in &names {
        fs::write(m.path.join(n), n.as_bytes()).unwrap();
    }
    fs::create_dir(m.path.join(name(b"dir-\xe8"))).unwrap();
    fs::write(m.path.join(name(b"dir-\xe8")).join(name(b"inner-\xe9")), "inner").unwrap();
    fs::rename(m.path.join(&names[0]), m.path.join(name(b"renamed-\xe0"))).unwrap();
    std::os::unix::fs::symlink(name(b"target-\xe9"), m.path.join(name(b"link-\xe9"))).unwrap();
    let mut listed: Vec<_> = fs::read_dir(&m.path).unwrap().map(|e| e.unwrap().file_name()).collect();
    listed.sort();
    let mut expected =
        vec![name(b"dir-\xe8"), name(b"link-\xe9"), names[2].clone(), name(b"renamed-\xe0"), names[1].clone()];
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(fs::read(m.path.join(name(b"renamed-\xe0"))).unwrap(), names[0].as_bytes());
    assert_eq!(fs::read_link(m.path.join(name(b"link-\xe9"))).unwrap().as_os_str(), name(b"target-\xe9"));

    let other = d.mount(USER1);
    assert_eq!(fs::read(other.path.join(&names[1])).unwrap(), names[1].as_bytes());
    let archive = d.dir.path().join("names.tar");
    ok(&format!("tar cf '{}' -C {} .", archive.display(), m.p("")));
    let local = d.local_dir("extracted");
    ok(&format!("tar xf '{}' -C '{}'", archive.display(), local.display()));
    let back = d.local_dir("back");
    fs::create_dir(m.path.join("x")).unwrap();
    ok(&format!("tar xf '{}' -C {}", archive.display(), m.p("x")));
    ok(&format!("tar cf - -C {} . | tar xf - -C '{}'", m.p("x"), back.display()));
    ok(&format!("diff -r --no-dereference '{}' '{}'", local.display(), back.display()));
    assert_eq!(fs::read(local.join(name(b"dir-\xe8")).join(name(b"inner-\xe9"))).unwrap(), b"inner");

    let reserved = "a\u{10FFE9}";
    assert_eq!(fs::write(m.path.join(reserved), "x").unwrap_err().raw_os_error(), Some(libc::EINVAL));
}

/// Inode numbers survive the kernel forgetting its inodes (`drop_caches`
/// evicts them, as memory pressure does): `tar` makes a delayed symlink
/// only if its placeholder's number is unchanged, and git and `find
/// -samefile` compare them too. Before, every number changed, and under
/// load `tar x` now and then left placeholders where symlinks belonged.
/// A name removed and made again gets a new number, as on a local disk.
#[test]
fn inode_numbers_survive_the_kernel_forgetting_its_inodes() {
    use std::os::unix::fs::MetadataExt;
    let d = Deployment::start("inode-numbers");
    let m = d.mount(USER1);
    fs::create_dir_all(m.join("d/e")).unwrap();
    for path in ["f", "d/g", "d/e/h"] {
        fs::write(m.join(path), path).unwrap();
    }
    let numbers = || ["f", "d", "d/g", "d/e", "d/e/h"].map(|p| fs::symlink_metadata(m.join(p)).unwrap().ino());
    let before = numbers();
    drop_caches();
    assert_eq!(numbers(), before);
    fs::remove_file(m.join("d/g")).unwrap();
    fs::write(m.join("d/g"), "again").unwrap();
    drop_caches();
    let after = numbers();
    assert_ne!(after[2], before[2], "a file made again is another file");
    assert_eq!([after[0], after[1], after[3], after[4]], [before[0], before[1], before[3], before[4]]);
}

#[test]
fn random_offset_writes_then_truncate_match_a_local_file() {
    let d = Deployment::start("random-writes");
    let m = d.mount(USER1);
    let local_path = d.dir.path().join("model.bin");
    let mut local = fs::File::create(&local_path).unwrap();
    let mut remote =
        fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(m.join("f.bin")).unwrap();
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for round in 0..60 {
        let offset = rng.gen_range(0..5_000_000u64);
        let len = rng.gen_range(1..900_000usize);
        let data = random_bytes(len, round);
        local.write_all_at(&data, offset).unwrap();
        remote.write_all_at(&data, offset).unwrap();
    }
    // Appending through a seek to the end exercises the write path too.
    for f in [&mut local, &mut remote] {
        f.seek(SeekFrom::End(0)).unwrap();
        f.write_all(b"tail").unwrap();
    }
    remote.sync_all().unwrap();
    ok(&format!("cmp '{}' {}", local_path.display(), m.p("f.bin")));
    local.set_len(1_234_567).unwrap();
    remote.set_len(1_234_567).unwrap();
    drop(remote);
    ok(&format!("cmp '{}' {}", local_path.display(), m.p("f.bin")));
    drop_caches();
    ok(&format!("cmp '{}' {}", local_path.display(), m.p("f.bin")));
    ok(&format!("cmp '{}' '{}'", local_path.display(), d.storage.join("User1/f.bin").display()));
}

/// The storage node starts writing a large write's pages to its disk as
/// they land, and leaves a small one's to the kernel (storaged's
/// `writeback`). Asked of ext4 with `filefrag`: an extent still flagged
/// `delalloc` has not begun its writeback. Any `sync` on the machine (other
/// tests drop caches) flushes both files at once, so one of a few rounds
/// must find the small file waiting and the large one on its way; without
/// early writeback no round can.
#[test]
fn a_large_write_is_on_its_way_to_the_nodes_disk_when_close_returns_and_a_small_one_waits() {
    let d = Deployment::start("early-writeback");
    let m = d.mount(USER1);
    let waits_for_writeback = |name: &str| {
        let extents = ok(&format!("filefrag -v '{}'", d.storage.join("User1").join(name).display()));
        extents.contains("delalloc")
    };
    let seen = (0..5).any(|round| {
        ok(&format!("head -c 4096 /dev/urandom > {}", m.p(&format!("small{round}"))));
        ok(&format!("dd if=/dev/urandom of={} bs=1M count=8 status=none", m.p(&format!("large{round}"))));
        waits_for_writeback(&format!("small{round}")) && !waits_for_writeback(&format!("large{round}"))
    });
    assert!(seen, "in no round was the large file's writeback started while the small file's waited");
}

/// Rewriting bytes the storage node has cached, by whole chunks and by a
/// few bytes, must read back new everywhere, before and after the caches
/// are dropped.
#[test]
fn rewriting_cached_bytes_in_whole_chunks_and_in_pieces_reads_back_new() {
    let d = Deployment::start("rewrite");
    let m = d.mount(USER1);
    let local = d.dir.path().join("model.bin");
    let on_node = d.storage.join("User1/f.bin");
    fs::write(&local, random_bytes(4 << 20, 7)).unwrap();
    ok(&format!("cp '{}' {}", local.display(), m.p("f.bin")));
    // Into every page cache on the way: mountd's, the kernel's, the node's.
    ok(&format!("cmp '{}' {}", local.display(), m.p("f.bin")));
    ok(&format!("cmp '{}' '{}'", local.display(), on_node.display()));
    let patch = d.dir.path().join("patch.bin");
    fs::write(&patch, random_bytes(2 << 20, 8)).unwrap();
    for target in [local.display().to_string(), m.p("f.bin")] {
        // 2 MiB from 1 MiB: aligned whole chunks; then 5 bytes at an odd offset.
        ok(&format!("dd if='{}' of={target} bs=1M seek=1 conv=notrunc,fsync status=none", patch.display()));
        ok(&format!("printf hello | dd of={target} bs=1 seek=1234567 conv=notrunc,fsync status=none"));
    }
    ok(&format!("cmp '{}' {}", local.display(), m.p("f.bin")));
    ok(&format!("cmp '{}' '{}'", local.display(), on_node.display()));
    drop_caches();
    ok(&format!("cmp '{}' {}", local.display(), m.p("f.bin")));
    ok(&format!("cmp '{}' '{}'", local.display(), on_node.display()));
}

/// Up to eight large chunks of a file are in flight at once: rewrites of
/// the same range while earlier ones are still in flight must land in
/// order, chunks written back to front must all land, and a small write
/// straddling two chunks must follow them, on the mount and on the node.
#[test]
fn overlapping_and_disjoint_large_writes_in_flight_land_as_written() {
    use dfos_protocol::limits::CHUNK_SIZE;
    let d = Deployment::start("in-flight");
    let m = d.mount(USER1);
    let mut model = vec![0u8; 9 * CHUNK_SIZE];
    let file = fs::OpenOptions::new().write(true).create_new(true).open(m.join("f")).unwrap();
    let mut write = |data: &[u8], offset: usize| {
        file.write_all_at(data, offset as u64).unwrap();
        model[offset..offset + data.len()].copy_from_slice(data);
    };
    for round in 0..6 {
        write(&random_bytes(3 * CHUNK_SIZE + 12345, round), 0);
    }
    for chunk in (3..9).rev() {
        write(&random_bytes(CHUNK_SIZE, 100 + chunk as u64), chunk * CHUNK_SIZE);
    }
    write(b"straddles", CHUNK_SIZE - 4);
    file.sync_all().unwrap();
    drop(file);
    let on_node = d.storage.join("User1/f");
    assert!(fs::read(m.join("f")).unwrap() == model, "the mount reads other bytes than were written");
    assert!(fs::read(&on_node).unwrap() == model, "the storage node holds other bytes than were written");
    drop_caches();
    assert!(fs::read(m.join("f")).unwrap() == model, "after dropping caches the mount reads other bytes");
}

/// Write-only handles bypass the kernel's page cache; a reader holding the
/// file open on the same mount, with its pages cached, must still see each
/// write at once, and the size it grew to, before and after the writer
/// closes, and so must a new open and a shared mapping.
#[test]
fn a_reader_sees_every_write_of_a_write_only_handle_at_once() {
    let d = Deployment::start("write-only");
    let m = d.mount(USER1);
    let path = m.join("f");
    let writer = fs::OpenOptions::new().write(true).create_new(true).open(&path).unwrap();
    writer.write_all_at(&[b'a'; 4096], 0).unwrap();
    let reader = fs::File::open(&path).unwrap();
    let mut page = [0u8; 4096];
    assert_eq!(reader.read_at(&mut page, 0).unwrap(), 4096);
    assert_eq!(page, [b'a'; 4096]);
    writer.write_all_at(b"bb", 0).unwrap();
    writer.write_all_at(b"tail", 8192).unwrap();
    let mut seen = vec![0u8; 16384];
    let expected = |seen: &[u8]| {
        let mut want = vec![b'a'; 4096];
        want[..2].copy_from_slice(b"bb");
        want.resize(8192, 0);
        want.extend_from_slice(b"tail");
        assert_eq!(seen, &want[..]);
    };
    let n = reader.read_at(&mut seen, 0).unwrap();
    expected(&seen[..n]);
    assert_eq!(reader.metadata().unwrap().len(), 8196);
    drop(writer);
    let n = reader.read_at(&mut seen, 0).unwrap();
    expected(&seen[..n]);
    // A write-only open of a file whose pages a reader holds cached.
    let rewriter = fs::OpenOptions::new().write(true).open(&path).unwrap();
    rewriter.write_all_at(b"cc", 4094).unwrap();
    drop(rewriter);
    let n = reader.read_at(&mut seen, 0).unwrap();
    assert_eq!(&seen[4094..4096], b"cc");
    assert_eq!(n, 8196);
    assert_eq!(fs::read(&path).unwrap()[4090..4100], [b'a', b'a', b'a', b'a', b'c', b'c', 0, 0, 0, 0]);

    // A shared mapping (through a read-write handle) sees a write-only
    // handle's write, and what is stored through it reaches the node.
    use std::os::fd::AsRawFd;
    let mapped = fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    // SAFETY: a fresh shared mapping of 8192 bytes of a file at least that
    // long, read and written only within its bounds and unmapped below.
    let mapping = unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mapped.as_raw_fd(),
            0,
        );
        assert_ne!(at, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        std::slice::from_raw_parts_mut(at as *mut u8, 8192)
    };
    assert_eq!(&mapping[..2], b"bb");
    fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(b"dd", 0).unwrap();
    assert_eq!(&mapping[..2], b"dd", "the mapping kept bytes a write-only handle replaced");
    mapping[4096..4100].copy_from_slice(b"eeee");
    // SAFETY: the mapping made above, whole.
    unsafe {
        assert_eq!(libc::msync(mapping.as_mut_ptr().cast(), 8192, libc::MS_SYNC), 0);
        assert_eq!(libc::munmap(mapping.as_mut_ptr().cast(), 8192), 0);
    }
    drop(mapped);
    assert_eq!(&fs::read(&path).unwrap()[..2], b"dd");
    assert_eq!(&fs::read(&path).unwrap()[4096..4100], b"eeee");
    assert_eq!(&fs::read(d.storage.join("User1/f")).unwrap()[4096..4100], b"eeee");
}

#[test]
fn ls_l_shows_sizes_and_modes() {
    let d = Deployment::start("ls-l");
    let m = d.mount(USER1);
    ok(&format!("head -c 12345 /dev/urandom > {0}; chmod 640 {0}", m.p("a")));
    ok(&format!("head -c 3 /dev/zero > {0}; chmod 755 {0}", m.p("b")));
    ok(&format!("mkdir -m 700 {}", m.p("dir")));
    let listing = ok(&format!("ls -l {}", m.p("")));
    let fields = |name: &str| -> (String, String) {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("{name} missing in {listing}"));
        let parts: Vec<&str> = line.split_whitespace().collect();
        (parts[0].to_owned(), parts[4].to_owned())
    };
    assert_eq!(fields("a"), ("-rw-r-----".into(), "12345".into()));
    assert_eq!(fields("b"), ("-rwxr-xr-x".into(), "3".into()));
    assert_eq!(fields("dir").0, "drwx------");
    let on_disk = fs::metadata(d.storage.join("User1/a")).unwrap();
    assert_eq!((on_disk.len(), on_disk.permissions().mode() & 0o777), (12345, 0o640));
}

#[test]
fn mkdir_p_mv_file_mv_directory_and_rm_r() {
    let d = Deployment::start("tree");
    let m = d.mount(USER1);
    ok(&format!("mkdir -p {}", m.p("a/b/c")));
    ok(&format!("echo hello > {}", m.p("f.txt")));
    ok(&format!("mv {} {}", m.p("f.txt"), m.p("a/b/c/")));
    assert_eq!(ok(&format!("cat {}", m.p("a/b/c/f.txt"))), "hello\n");
    ok(&format!("head -c 2000000 /dev/urandom > {}", m.p("a/b/data")));
    let sum = ok(&format!("cd {} && sha256sum data", m.p("a/b")));
    ok(&format!("mv {} {}", m.p("a"), m.p("z")));
    assert!(!m.join("a").exists());
    assert_eq!(ok(&format!("cd {} && sha256sum data", m.p("z/b"))), sum);
    assert_eq!(ok(&format!("cat {}", m.p("z/b/c/f.txt"))), "hello\n");
    assert_eq!(fs::read_to_string(d.storage.join("User1/z/b/c/f.txt")).unwrap(), "hello\n");
    // rename(2) replaces an existing file, and an empty directory.
    ok(&format!("echo new > {}; echo old > {}", m.p("n"), m.p("o")));
    ok(&format!("mv -f {} {}", m.p("n"), m.p("o")));
    assert_eq!(ok(&format!("cat {}", m.p("o"))), "new\n");
    ok(&format!("mkdir {} && mkdir {}", m.p("e1"), m.p("e2")));
    ok(&format!("mv -T {} {}", m.p("e1"), m.p("e2")));
    assert!(!m.join("e1").exists() && m.join("e2").is_dir());
    ok(&format!("rm -r {}", m.p("z")));
    assert!(!m.join("z").exists());
    assert!(!d.storage.join("User1/z").exists());
    assert_eq!(ok(&format!("ls {}", m.p(""))), "e2\no\n");
}

#[test]
fn errors_are_the_posix_ones() {
    let d = Deployment::start("errors");
    let m = d.mount(USER1);
    ok(&format!("mkdir -p {}", m.p("d/sub")));
    let err = fs::remove_dir(m.join("d")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY), "{err}");
    assert!(fails(&format!("rmdir {}", m.p("d"))).contains("Directory not empty"));
    let err = fs::File::open(m.join("missing")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    assert!(fails(&format!("cat {}", m.p("missing"))).contains("No such file or directory"));
    let err = fs::create_dir(m.join("d")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    assert!(fails(&format!("mkdir {}", m.p("d"))).contains("File exists"));
    let err = fs::remove_file(m.join("d")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EISDIR));
    ok(&format!("touch {}", m.p("file")));
    let err = fs::create_dir(m.join("file/x")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
    let err = fs::OpenOptions::new().write(true).create_new(true).open(m.join("file")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    let long = "n".repeat(256);
    let err = fs::File::create(m.join(&long)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));
}

#[test]
fn symlinks_survive_tar_and_cp_a_and_are_read_moved_and_removed() {
    let d = Deployment::start("symlinks");
    let m = d.mount(USER1);
    let src = d.local_dir("src");
    fs::create_dir(src.join("a")).unwrap();
    fs::write(src.join("a/f"), b"through the link\n").unwrap();
    let links = [("rel", "a/f"), ("dir", "a"), ("dangling", "/nonexistent/x"), ("up", "../../outside")];
    for (name, target) in links {
        std::os::unix::fs::symlink(target, src.join(name)).unwrap();
    }
    ok(&format!("touch -h -d '2020-03-04 05:06:07' '{}'", src.join("rel").display()));
    let archive = d.dir.path().join("links.tar");
    ok(&format!("tar cf '{}' -C '{}' .", archive.display(), src.display()));
    fs::create_dir(m.join("x")).unwrap();
    ok(&format!("tar xf '{}' -C {}", archive.display(), m.p("x")));
    let local = d.local_dir("local");
    ok(&format!("tar xf '{}' -C '{}'", archive.display(), local.display()));
    let links_of = |dir: &str| ok(&format!("cd {dir} && find . -type l | sort | xargs stat -c '%n %N %Y'"));
    let expected = links_of(&format!("'{}'", local.display()));
    assert_eq!(expected.lines().count(), links.len(), "{expected}");
    assert_eq!(links_of(&m.p("x")), expected, "as the mount shows them");
    assert_eq!(links_of(&format!("'{}'", d.storage.join("User1/x").display())), expected, "on the storage node");
    ok(&format!("diff -r --no-dereference '{}' {}", local.display(), m.p("x")));
    assert_eq!(ok(&format!("cat {}", m.p("x/rel"))), "through the link\n");
    assert_eq!(ok(&format!("cat {}", m.p("x/dir/f"))), "through the link\n");
    assert_eq!(fs::read_link(m.join("x/up")).unwrap().to_str(), Some("../../outside"));

    ok(&format!("cp -a {} {}", m.p("x"), m.p("copy")));
    assert_eq!(links_of(&m.p("copy")), expected, "cp -a keeps links and their times");
    let other = d.mount(USER1);
    assert_eq!(fs::read_link(other.join("copy/dir")).unwrap().to_str(), Some("a"), "another mount sees the link");

    ok(&format!("ln -s a/f {}", m.p("x/new")));
    assert!(fails(&format!("ln -s a/f {}", m.p("x/new"))).contains("File exists"));
    let err = std::os::unix::fs::symlink("", m.join("x/empty")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "an empty target is refused, as locally");
    ok(&format!("mv {} {}", m.p("x/new"), m.p("x/moved")));
    assert_eq!(fs::read_link(d.storage.join("User1/x/moved")).unwrap().to_str(), Some("a/f"));
    ok(&format!("rm {} {}", m.p("x/moved"), m.p("x/dir")));
    assert!(fs::symlink_metadata(d.storage.join("User1/x/dir")).is_err());
    assert_eq!(
        fs::read(d.storage.join("User1/x/a/f")).unwrap(),
        b"through the link\n",
        "removing a link keeps its target"
    );
    assert!(fs::symlink_metadata(other.join("x/moved")).is_err(), "another mount sees the removal");
}

#[test]
fn named_pipes_and_unix_sockets_work_on_the_mount_and_devices_are_refused() {
    let d = Deployment::start("nodes");
    let m = d.mount(USER1);
    let src = d.local_dir("src");
    ok(&format!("mkfifo -m 600 '{}' && touch -h -d '2021-01-02 03:04:05' '{0}'", src.join("pipe").display()));
    let archive = d.dir.path().join("nodes.tar");
    ok(&format!("tar cf '{}' -C '{}' .", archive.display(), src.display()));
    fs::create_dir(m.join("x")).unwrap();
    ok(&format!("tar xpf '{}' -C {}", archive.display(), m.p("x")));
    let node = |dir: &str| ok(&format!("stat -c '%F %a %Y' {dir}/pipe"));
    assert_eq!(node(&m.p("x")), "fifo 600 1609556645\n", "tar restores a pipe with its mode and time");
    assert_eq!(node(&format!("'{}'", d.storage.join("User1/x").display())), node(&m.p("x")), "on the storage node");

    let through = ok(&format!("cd {} && (echo through the pipe > pipe &) && cat pipe", m.p("x")));
    assert_eq!(through, "through the pipe\n", "the kernel carries a pipe's bytes");
    ok(&format!("chmod 644 {}", m.p("x/pipe")));
    assert_eq!(node(&format!("'{}'", d.storage.join("User1/x").display())), "fifo 644 1609556645\n");
    let other = d.mount(USER1);
    assert_eq!(ok(&format!("stat -c %F {}", other.p("x/pipe"))), "fifo\n", "another mount sees a pipe");

    let echoed = ok(&format!(
        "cd {} && python3 -c '
import socket, os
server = socket.socket(socket.AF_UNIX)
server.bind(\"sock\")
server.listen(1)
client = socket.socket(socket.AF_UNIX)
client.connect(\"sock\")
conn, _ = server.accept()
client.sendall(b\"over the socket\")
print(conn.recv(100).decode())
'",
        m.p("x")
    ));
    assert_eq!(echoed, "over the socket\n");
    assert_eq!(ok(&format!("stat -c %F {}", m.p("x/sock"))), "socket\n");
    assert!(fs::symlink_metadata(d.storage.join("User1/x/sock")).unwrap().file_type().is_socket());

    assert!(fails(&format!("mknod {} c 1 3", m.p("x/null"))).contains("Operation not permitted"));
    assert!(fails(&format!("mkfifo {}", m.p("x/pipe"))).contains("File exists"));
    ok(&format!("rm {} {}", m.p("x/pipe"), m.p("x/sock")));
    assert_eq!(fs::read_dir(d.storage.join("User1/x")).unwrap().count(), 0);
}

#[test]
fn fallocate_reserves_zeroes_and_punches_holes_as_on_a_local_disk() {
    use std::os::unix::fs::MetadataExt;
    let d = Deployment::start("fallocate");
    let m = d.mount(USER1);
    let local = d.local_dir("local");
    let script = |dir: &str| {
        ok(&format!(
            "cd {dir} && fallocate -l 5M f && printf 'abcdefgh%.0s' $(seq 1 1024) > g && \
             fallocate -p -o 4096 -l 2048 g && fallocate -z -o 8000 -l 100 g && fallocate -n -o 8192 -l 1M g && \
             fallocate -z -o 8190 -l 10 g && python3 -c 'import os; os.posix_fallocate(os.open(\"h\", os.O_WRONLY | os.O_CREAT), 0, 3 << 20)' && \
             stat -c '%n %s' f g h && md5sum f g h"
        ))
    };
    let expected = script(&format!("'{}'", local.display()));
    assert_eq!(script(&m.p("")), expected, "sizes and bytes as on the local disk");
    let f = fs::metadata(d.storage.join("User1/f")).unwrap();
    assert_eq!(f.len(), 5 << 20);
    assert!(f.blocks() * 512 >= 5 << 20, "the node reserved the space: {} blocks", f.blocks());
    let g = fs::read(d.storage.join("User1/g")).unwrap();
    assert!(g[4096..6144].iter().all(|&b| b == 0) && &g[..8] == b"abcdefgh", "the hole reads as zeros on the node");
    let other = d.mount(USER1);
    assert_eq!(
        ok(&format!("cd {} && md5sum f g h", other.p(""))),
        expected.lines().skip(3).collect::<Vec<_>>().join("\n") + "\n"
    );
    let refused = fails(&format!("fallocate -c -o 0 -l 4096 {}", m.p("f")));
    assert!(refused.contains("not supported"), "a mode dfos has no name for: {refused}");
    assert_eq!(fs::metadata(d.storage.join("User1/f")).unwrap().len(), 5 << 20, "and nothing changed");
}

#[test]
fn a_read_only_mount_reads_and_follows_changes_but_refuses_every_change_with_erofs() {
    let d = Deployment::start("read-only");
    let rw = d.mount(USER1);
    fs::create_dir(rw.join("d")).unwrap();
    fs::write(rw.join("d/f"), "kept").unwrap();
    let ro = d.mount_with(USER1, 30, &["--read-only"]);
    assert!(
        ok("mount").lines().any(|l| l.contains(&format!(" {} ", ro.path.display())) && l.contains("(ro,")),
        "{}",
        ok("mount")
    );
    assert_eq!(fs::read_to_string(ro.join("d/f")).unwrap(), "kept");
    for change in [
        format!("touch {}", ro.p("new")),
        format!("echo x > {}", ro.p("d/f")),
        format!("echo x >> {}", ro.p("d/f")),
        format!("mkdir {}", ro.p("e")),
        format!("rm {}", ro.p("d/f")),
        format!("mv {} {}", ro.p("d/f"), ro.p("g")),
        format!("chmod 600 {}", ro.p("d/f")),
        format!("truncate -s 0 {}", ro.p("d/f")),
        format!("ln -s f {}", ro.p("d/l")),
    ] {
        assert!(fails(&change).contains("Read-only file system"), "{change}");
    }
    assert_eq!(fs::read_to_string(d.storage.join("User1/d/f")).unwrap(), "kept", "nothing changed on the node");
    assert_eq!(fs::read_dir(d.storage.join("User1")).unwrap().count(), 1);
    fs::write(rw.join("d/f"), "changed elsewhere").unwrap();
    let start = std::time::Instant::now();
    while fs::read_to_string(ro.join("d/f")).unwrap() != "changed elsewhere" {
        assert!(start.elapsed() < std::time::Duration::from_secs(5), "the read-only mount follows other mounts");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn append_truncate_chmod_and_touch() {
    let d = Deployment::start("attrs");
    let m = d.mount(USER1);
    ok(&format!("echo one > {0}; echo more >> {0}; echo more >> {0}", m.p("notes.txt")));
    assert_eq!(ok(&format!("cat {}", m.p("notes.txt"))), "one\nmore\nmore\n");
    ok(&format!("truncate -s 3 {}", m.p("notes.txt")));
    assert_eq!(ok(&format!("cat {}", m.p("notes.txt"))), "one");
    ok(&format!("truncate -s 10 {}", m.p("notes.txt")));
    drop_caches();
    assert_eq!(fs::read(m.join("notes.txt")).unwrap(), b"one\0\0\0\0\0\0\0");
    assert_eq!(fs::read(d.storage.join("User1/notes.txt")).unwrap(), b"one\0\0\0\0\0\0\0");
    ok(&format!("chmod 600 {}", m.p("notes.txt")));
    assert_eq!(ok(&format!("stat -c %a {}", m.p("notes.txt"))).trim(), "600");
    ok(&format!("touch -d '2001-02-03 04:05:06 UTC' {}", m.p("notes.txt")));
    assert_eq!(ok(&format!("stat -c %Y {}", m.p("notes.txt"))).trim(), "981173106");
    ok(&format!("touch -d yesterday {}", m.p("notes.txt")));
    let mtime: i64 = ok(&format!("stat -c %Y {}", m.p("notes.txt"))).trim().parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - 86400 - mtime).abs() < 120, "mtime {mtime} is not yesterday");
    assert!(ok(&format!("ls -l --time-style=+%F {}", m.p(""))).contains("-rw------- "));
    ok(&format!("df {}", m.p("")));
}

#[test]
fn a_directory_of_2000_entries_lists_completely() {
    let d = Deployment::start("bigdir");
    let m = d.mount(USER1);
    ok(&format!("mkdir {0} && cd {0} && seq -f 'file-%05g' 1 2000 | xargs touch", m.p("many")));
    drop_caches();
    let names = ok(&format!("ls {}", m.p("many")));
    let expected: Vec<String> = (1..=2000).map(|i| format!("file-{i:05}")).collect();
    assert_eq!(names.lines().collect::<Vec<_>>(), expected);
    let long = ok(&format!("ls -l {} | grep -c '^-rw'", m.p("many")));
    assert_eq!(long.trim(), "2000");
    assert_eq!(ok(&format!("find {} -type f | wc -l", m.p("many"))).trim(), "2000");
}

/// The mount's reply topic, found by its name's prefix.
fn reply_topic_of(d: &Deployment, consumer: &rdkafka::consumer::BaseConsumer) -> String {
    use rdkafka::consumer::Consumer;
    let prefix = dfos_protocol::Topics::new(&d.namespace).reply("");
    let metadata = consumer.fetch_metadata(None, std::time::Duration::from_secs(10)).unwrap();
    metadata
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .find(|name| name.starts_with(&prefix))
        .expect("the mount's reply topic exists")
}

/// Bytes of the replies at offsets `from..` of the reply topic, and the
/// offset after the last.
fn reply_bytes_since(consumer: &rdkafka::consumer::BaseConsumer, topic: &str, from: i64) -> (usize, i64) {
    use rdkafka::consumer::Consumer;
    use rdkafka::message::Message;
    use std::time::Duration;
    let (_, end) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10)).unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, rdkafka::Offset::Offset(from)).unwrap();
    consumer.assign(&assignment).unwrap();
    let (mut bytes, mut next) = (0, from);
    while next < end {
        let message = consumer.poll(Duration::from_secs(10)).expect("replies up to the end").unwrap();
        bytes += message.payload().map_or(0, <[u8]>::len);
        next = message.offset() + 1;
    }
    (bytes, end)
}

fn test_consumer() -> rdkafka::consumer::BaseConsumer {
    rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", "dfos-test")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// A file of `size` random bytes beside the deployment, copied into the
/// mount as `f.bin` with `cp`; returns the source.
fn random_file_copied_in(d: &Deployment, m: &Mount, size: usize, seed: u64) -> std::path::PathBuf {
    let src = d.dir.path().join("src.bin");
    fs::write(&src, random_bytes(size, seed)).unwrap();
    ok(&format!("cp '{}' {}", src.display(), m.p("f.bin")));
    src
}

/// Reads `f.bin` back cold and compares it with `src`; returns the bytes
/// the mount's replies carried from offset `from` on, and the next offset.
fn reply_bytes_of_a_cold_read(
    m: &Mount,
    src: &std::path::Path,
    consumer: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    from: i64,
) -> (usize, i64) {
    drop_caches();
    ok(&format!("cmp '{}' {}", src.display(), m.p("f.bin")));
    reply_bytes_since(consumer, topic, from)
}

/// Bytes a mount wrote are still in the request log; the storage node
/// says where, and the mount fetches them from there. Its replies then
/// carry no file data. A restarted node has forgotten where the bytes
/// are, and its replies carry them again.
#[test]
fn reads_of_written_bytes_come_from_the_request_log_and_plainly_after_a_restart() {
    let mut d = Deployment::start("read-from-log");
    let m = d.mount(USER1);
    let src = random_file_copied_in(&d, &m, 24 << 20, 5);
    let consumer = test_consumer();
    let topic = reply_topic_of(&d, &consumer);
    let (_, before) = reply_bytes_since(&consumer, &topic, 0);
    let (located, after_located) = reply_bytes_of_a_cold_read(&m, &src, &consumer, &topic, before);
    // The first block of a read carries its bytes (a lone read does not seek
    // the log); the other 23 MiB must not.
    assert!(located < (4 << 20), "reading 24 MiB from the log put {located} bytes into replies");
    d.stop_node(0);
    d.start_node(0);
    let (plain, _) = reply_bytes_of_a_cold_read(&m, &src, &consumer, &topic, after_located);
    assert!(plain >= 24 << 20, "after a restart the replies carry the bytes; they held {plain}");
}

/// When the logged write a node points at is gone from Kafka (deleted
/// records, retention), the mount reads the bytes plainly instead.
#[test]
fn reads_whose_logged_write_was_deleted_carry_their_bytes_instead() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let d = Deployment::start("log-deleted");
    let m = d.mount(USER1);
    let src = random_file_copied_in(&d, &m, 24 << 20, 6);
    let requests = dfos_protocol::Topics::new(&d.namespace).requests();
    let mut everything = rdkafka::TopicPartitionList::new();
    for partition in 0..dfos_protocol::topics::DEFAULT_REQUEST_PARTITIONS {
        everything.add_partition_offset(&requests, partition, rdkafka::Offset::End).unwrap();
    }
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::config::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(admin.delete_records(&everything, &AdminOptions::new())).unwrap();
    let consumer = test_consumer();
    let topic = reply_topic_of(&d, &consumer);
    let (_, before) = reply_bytes_since(&consumer, &topic, 0);
    let (plain, _) = reply_bytes_of_a_cold_read(&m, &src, &consumer, &topic, before);
    assert!(plain >= 23 << 20, "the bytes came back in replies; they held {plain}");
}

/// Whatever changes a file after its bytes were logged, reads show the
/// change: a piece overwritten, a truncate and regrow, a rename over it,
/// delete and create anew, rewriting it whole. Each step is done with the
/// same shell command on a local file and compared with caches dropped.
#[test]
fn bytes_changed_after_they_were_logged_read_back_changed() {
    let d = Deployment::start("log-changes");
    let m = d.mount(USER1);
    let local = d.local_dir("model");
    let sources: Vec<_> = (0..3)
        .map(|i| {
            let path = d.dir.path().join(format!("r{i}.bin"));
            fs::write(&path, random_bytes(3 << 20, 20 + i)).unwrap();
            path.display().to_string()
        })
        .collect();
    let steps = [
        format!("cp {} f", sources[0]),
        format!("cp {} g && mv g f", sources[1]),
        "rm f && truncate -s 3M f".to_string(),
        format!("cp {} f", sources[0]),
        "printf 'a few new bytes' | dd of=f bs=1 seek=1572864 conv=notrunc status=none".to_string(),
        "truncate -s 1000 f && truncate -s 3M f".to_string(),
        format!("dd if={} of=f bs=960K skip=1 seek=1 count=1 conv=notrunc status=none", sources[1]),
        format!("mkdir d && cp {} d/x", sources[2]),
        "mv d e && mkdir d && truncate -s 3M d/x".to_string(),
    ];
    for step in steps {
        ok(&format!("cd {} && {step}", local.display()));
        ok(&format!("cd {} && {step}", m.path.display()));
        drop_caches();
        ok(&format!("diff -r {} {}", local.display(), m.path.display()));
    }
}

/// A read's bytes pass through the mount's reply topic when they are not
/// located in the request log (here: the node restarted since the write);
/// they must leave the broker's log soon after, instead of piling up on
/// its disk for an hour.
#[test]
fn read_data_leaves_the_reply_topic_soon_after() {
    use rdkafka::consumer::Consumer;
    use std::time::{Duration, Instant};
    let mut d = Deployment::start("reply-retention");
    let m = d.mount(USER1);
    // More than one 64 MiB segment of replies, so one can be deleted.
    let src = random_file_copied_in(&d, &m, 96 << 20, 3);
    d.stop_node(0);
    d.start_node(0);
    drop_caches();
    ok(&format!("cmp '{}' {}", src.display(), m.p("f.bin")));
    let consumer = test_consumer();
    let reply_topic = reply_topic_of(&d, &consumer);
    let (_, end) = consumer.fetch_watermarks(&reply_topic, 0, Duration::from_secs(10)).unwrap();
    assert!(end >= 96, "96 MiB came back as at least 96 replies, got {end}");
    // Retention is 10 s and the broker checks every 5 s; allow far more.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (start, _) = consumer.fetch_watermarks(&reply_topic, 0, Duration::from_secs(10)).unwrap();
        if start > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no reply was deleted from {reply_topic} within 90 s");
        std::thread::sleep(Duration::from_secs(1));
    }
}
