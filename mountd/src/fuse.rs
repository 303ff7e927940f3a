//! The thin fuser adapter: kernel types in, [`DfosFs`] calls, errno out.
//!
//! Each kernel request becomes a tokio task that owns its reply object, so
//! a slow Kafka round trip never blocks a FUSE worker thread. The only
//! logic here is type conversion and the errno mapping, which is an
//! exhaustive match so a new error variant forces a decision.

use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    CopyFileRangeFlags, Errno, FileAttr as KernelAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};

use dfos_protocol::{AllocateMode, ErrorCode, FileAttr, FileKind, RenameMode, SetTime, Timestamp, XattrMode};

use crate::file_bytes::FileBytes;
use crate::fs::{AttrChange, DfosFs, Entry, FsError, Opened, Placement};
use crate::rpc::{RpcError, Transport};

/// Short, never zero: the kernel misbehaves with a TTL of 0.
const TTL: Duration = Duration::from_secs(1);
/// For a file with several names (hard links): the kernel holds one inode
/// per name, and a write through one name must show through the others at
/// their next look, so their attributes are asked again almost at once.
const HARD_LINKED_TTL: Duration = Duration::from_millis(1);

fn ttl_of(attr: &FileAttr) -> &'static Duration {
    if attr.has_other_names() {
        &HARD_LINKED_TTL
    } else {
        &TTL
    }
}
/// Largest read and write the kernel sends in one call, and the `st_blksize`
/// reported, so `cp` and friends move a whole max_write per system call.
/// A power of two, as tools expect of `st_blksize`.
const IO_SIZE: u32 = 1024 * 1024;

pub fn errno(error: &FsError) -> Errno {
    match error {
        FsError::Rpc(RpcError::Remote(code)) => errno_of_code(*code),
        FsError::Rpc(RpcError::Timeout | RpcError::Kafka(_) | RpcError::Encode(_)) => Errno::EIO,
        FsError::Stale(_) => Errno::ENOENT,
        FsError::BadName => Errno::EINVAL,
        FsError::UnexpectedReply => Errno::EIO,
        FsError::BadHandle(_) => Errno::EBADF,
    }
}

pub fn errno_of_code(code: ErrorCode) -> Errno {
    let raw = match code {
        ErrorCode::NotFound => libc::ENOENT,
        ErrorCode::Exists => libc::EEXIST,
        ErrorCode::NotEmpty => libc::ENOTEMPTY,
        ErrorCode::NotDir => libc::ENOTDIR,
        ErrorCode::IsDir => libc::EISDIR,
        ErrorCode::NoSpace => libc::ENOSPC,
        ErrorCode::AccessDenied => libc::EACCES,
        ErrorCode::NameTooLong => libc::ENAMETOOLONG,
        ErrorCode::Invalid => libc::EINVAL,
        ErrorCode::CrossDevice => libc::EXDEV,
        ErrorCode::Io => libc::EIO,
        ErrorCode::UnsupportedVersion => libc::EPROTO,
        ErrorCode::NotPermitted => libc::EPERM,
        ErrorCode::TooLarge => libc::EFBIG,
        ErrorCode::NotSupported => libc::EOPNOTSUPP,
        ErrorCode::NoAttribute => libc::ENODATA,
    };
    Errno::from_i32(raw)
}

fn system_time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos.min(999_999_999))
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp { secs: d.as_secs() as i64, nanos: d.subsec_nanos() },
        Err(before) => Timestamp { secs: -(before.duration().as_secs() as i64), nanos: 0 },
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(timestamp(t)),
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File | FileKind::Other => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

/// The session's notifier, known once the session exists (after the
/// adapter is made).
pub type NotifierSlot = Arc<std::sync::OnceLock<fuser::Notifier>>;

/// Makes the kernel drop its attributes of `ino` (not its pages): the size
/// it holds is older than a storage node's.
fn drop_kernel_attrs(notifier: &NotifierSlot, ino: INodeNo) {
    if let Some(notifier) = notifier.get() {
        let _ = notifier.inval_inode(ino, -1, 0);
    }
}

/// Stores what [`DfosFs::content_for_kernel`] offers as `ino`'s pages.
fn give_kernel_content<T: Transport>(fs: &DfosFs<T>, notifier: &NotifierSlot, ino: INodeNo) {
    let (Some(notifier), Some((content, version))) = (notifier.get(), fs.content_for_kernel(ino.0)) else {
        return;
    };
    match notifier.store(ino, 0, &content) {
        // A write another thread answered meanwhile left the kernel pages
        // older than the file: they go, or a reader opening now would get them.
        Ok(()) if !fs.kernel_holds(ino.0, version) => {
            let _ = notifier.inval_inode(ino, 0, 0);
        }
        Ok(()) => {}
        Err(e) => log::debug!("op=store-pages ino={} error={e}", ino.0),
    }
}

/// What a mount serves beyond the defaults (`Config`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Serving {
    /// Extended attributes are served; without them every xattr call is
    /// ENOSYS, after which the kernel stops asking (`Config::xattrs`).
    pub xattrs: bool,
    /// Every open asks a storage node for the file's attributes
    /// (`Config::close_to_open`).
    pub close_to_open: bool,
}

pub struct FuseAdapter<T: Transport> {
    fs: Arc<DfosFs<T>>,
    runtime: tokio::runtime::Handle,
    attrs: KernelAttrs,
    notifier: NotifierSlot,
    serving: Serving,
}

impl<T: Transport> FuseAdapter<T> {
    pub fn new(fs: Arc<DfosFs<T>>, runtime: tokio::runtime::Handle, notifier: NotifierSlot, serving: Serving) -> Self {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FuseAdapter { fs, runtime, attrs: KernelAttrs { uid, gid }, notifier, serving }
    }

    /// Runs `work` on the runtime and hands its result to `answer`.
    fn spawn<R, F, A>(&self, work: impl FnOnce(Arc<DfosFs<T>>) -> F, answer: A)
    where
        F: Future<Output = Result<R, FsError>> + Send + 'static,
        A: FnOnce(Result<R, FsError>) + Send + 'static,
        R: Send + 'static,
    {
        let future = work(self.fs.clone());
        self.runtime.spawn(async move { answer(future.await) });
    }

    /// Flush and release: answered here when there is nothing to send or
    /// wait for, which saves a hand-off to a tokio worker per close. After
    /// a flush that sent bytes, a small file's content goes into the
    /// kernel's page cache, once the close has its answer.
    fn flush_inode(&self, ino: INodeNo, reply: ReplyEmpty) {
        if let Some(done) = self.fs.flush_now(ino.0) {
            return empty(reply)(done);
        }
        let (fs, notifier) = (self.fs.clone(), self.notifier.clone());
        let answer = move |flushed: Result<(), FsError>| {
            let store = flushed.is_ok();
            empty(reply)(flushed);
            if store {
                give_kernel_content(&fs, &notifier, ino);
            }
        };
        self.spawn(move |fs| async move { fs.flush(ino.0).await }, answer);
    }

    fn reply_entry(&self, reply: ReplyEntry) -> impl FnOnce(Result<Entry, FsError>) + Send + 'static {
        let attrs = self.attrs;
        move |result| match result {
            Ok(entry) => reply.entry(ttl_of(&entry.attr), &attrs.kernel_attr(entry.ino, &entry.attr), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Like `reply_entry`, but a name found missing is answered with node
    /// id 0, which the kernel keeps as a negative entry for `TTL`, as it
    /// keeps a found one: repeated lookups of a missing name (PATH and
    /// include-path searches, imports, lock-file checks) stay in the
    /// kernel, and another mount's create of it drops the entry at once
    /// through `dfos.events`.
    fn reply_lookup(&self, reply: ReplyEntry) -> impl FnOnce(Result<Entry, FsError>) + Send + 'static {
        let answer = self.reply_entry(reply);
        move |result| match result {
            Err(FsError::Rpc(RpcError::Remote(ErrorCode::NotFound))) => answer(Ok(Entry { ino: 0, attr: missing() })),
            other => answer(other),
        }
    }

    fn reply_attr(&self, ino: u64, reply: ReplyAttr) -> impl FnOnce(Result<FileAttr, FsError>) + Send + 'static {
        let attrs = self.attrs;
        move |result| match result {
            Ok(attr) => reply.attr(ttl_of(&attr), &attrs.kernel_attr(ino, &attr)),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// Builds kernel attributes; copied into reply tasks.
#[derive(Clone, Copy)]
struct KernelAttrs {
    uid: u32,
    gid: u32,
}

impl KernelAttrs {
    fn kernel_attr(&self, ino: u64, attr: &FileAttr) -> KernelAttr {
        KernelAttr {
            ino: INodeNo(ino),
            size: attr.size,
            blocks: attr.blocks,
            atime: system_time(attr.atime),
            mtime: system_time(attr.mtime),
            ctime: system_time(attr.ctime),
            crtime: system_time(attr.ctime),
            kind: file_type(attr.kind),
            perm: (attr.mode & 0o7777) as u16,
            nlink: attr.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: IO_SIZE,
            flags: 0,
        }
    }
}

/// A handle opened write-only bypasses the kernel's page cache (direct
/// I/O): every byte written would otherwise be copied into fresh cache
/// pages first (without that copy, a 1 GiB `dd` onto the mount cost the
/// machine about a third less kernel time), and the writer cannot read
/// them back anyway. Such a handle cannot be mapped (`mmap` needs read
/// access), and the kernel drops cached pages of the range before each
/// direct write, so readers of the file on this mount still see every
/// write at once.
fn opens_for_writing(open_flags: i32) -> bool {
    open_flags & libc::O_ACCMODE != libc::O_RDONLY || open_flags & libc::O_TRUNC != 0
}

/// How the kernel treats a handle opened with `open_flags`: write-only
/// ones bypass the page cache (above); a read-only one has nothing to
/// flush, so its `close()` sends no FLUSH (`FOPEN_NOFLUSH`, Linux 5.16 and
/// later; older kernels ignore it), one FUSE round trip less per file that
/// `cat`, `diff` or `grep` read.
fn handle_flags(open_flags: i32) -> FopenFlags {
    if open_flags & libc::O_ACCMODE == libc::O_WRONLY {
        FopenFlags::FOPEN_DIRECT_IO
    } else if !opens_for_writing(open_flags) {
        FopenFlags::FOPEN_NOFLUSH
    } else {
        FopenFlags::empty()
    }
}

/// setxattr(2)'s flags (the kernel has refused any other bits).
fn xattr_mode(flags: i32) -> Option<XattrMode> {
    match flags {
        0 => Some(XattrMode::Either),
        libc::XATTR_CREATE => Some(XattrMode::Create),
        libc::XATTR_REPLACE => Some(XattrMode::Replace),
        _ => None,
    }
}

/// Answers getxattr and listxattr the way the kernel asks: with the size
/// alone when `size` is 0, ERANGE when the bytes do not fit in `size`.
fn answer_xattr(size: u32) -> impl FnOnce(Result<Vec<u8>, FsError>, ReplyXattr) + Send + 'static {
    move |result, reply| match result {
        Ok(bytes) if size == 0 => reply.size(bytes.len() as u32),
        Ok(bytes) if bytes.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(bytes) => reply.data(&bytes),
        Err(e) => reply.error(errno(&e)),
    }
}

fn allocate_mode(mode: i32) -> Option<AllocateMode> {
    const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
    const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;
    const ZERO_RANGE_KEEP_SIZE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    match mode {
        0 => Some(AllocateMode::Extend),
        KEEP_SIZE => Some(AllocateMode::KeepSize),
        PUNCH_HOLE => Some(AllocateMode::PunchHole),
        ZERO_RANGE => Some(AllocateMode::ZeroRange),
        ZERO_RANGE_KEEP_SIZE => Some(AllocateMode::ZeroRangeKeepSize),
        _ => None,
    }
}

/// The attributes sent with a negative entry; the kernel reads only its
/// node id (0) and TTL.
fn missing() -> FileAttr {
    FileAttr {
        kind: FileKind::File,
        size: 0,
        blocks: 0,
        mode: 0,
        nlink: 0,
        atime: Timestamp { secs: 0, nanos: 0 },
        mtime: Timestamp { secs: 0, nanos: 0 },
        ctime: Timestamp { secs: 0, nanos: 0 },
        link: None,
    }
}

fn empty(reply: ReplyEmpty) -> impl FnOnce(Result<(), FsError>) + Send + 'static {
    move |result| match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

impl<T: Transport> Filesystem for FuseAdapter<T> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(IO_SIZE);
        let _ = config.set_max_readahead(IO_SIZE);
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let answer = self.reply_lookup(reply);
        if let Some(done) = self.fs.lookup_now(parent.0, name) {
            return answer(done);
        }
        let name = name.to_owned();
        self.spawn(move |fs| async move { fs.lookup(parent.0, &name).await }, answer);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let answer = self.reply_attr(ino.0, reply);
        if let Some(done) = self.fs.getattr_now(ino.0) {
            return answer(done);
        }
        self.spawn(move |fs| async move { fs.getattr(ino.0).await }, answer);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let answer = self.reply_attr(ino.0, reply);
        let (atime, mtime) = (atime.map(set_time), mtime.map(set_time));
        // Submitting spawns tasks, which needs the runtime's context here.
        let _runtime = self.runtime.enter();
        let change = AttrChange { size, mode, atime, mtime };
        if let Some(done) = self.fs.setattr_now(ino.0, change) {
            return answer(done);
        }
        self.spawn(move |fs| async move { fs.setattr(ino.0, change).await }, answer);
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let name = name.to_owned();
        let answer = self.reply_entry(reply);
        self.spawn(move |fs| async move { fs.mkdir(parent.0, &name, mode & !umask).await }, answer);
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (name, target) = (link_name.to_owned(), target.as_os_str().to_owned());
        let answer = self.reply_entry(reply);
        self.spawn(move |fs| async move { fs.symlink(parent.0, &name, &target).await }, answer);
    }

    /// `ln`: a second name for a file (never a directory: the kernel
    /// refuses those before asking).
    /// The new name is a kernel inode of its own (inodes are per path), so
    /// the kernel would keep what it cached of the old name's inode, link
    /// count and all, until its TTL: once answered, that is dropped.
    fn link(&self, _req: &Request, ino: INodeNo, new_parent: INodeNo, new_name: &OsStr, reply: ReplyEntry) {
        let name = new_name.to_owned();
        let answer = self.reply_entry(reply);
        let notifier = self.notifier.clone();
        let answer_then_drop_old = move |result: Result<Entry, FsError>| {
            let linked = result.is_ok();
            answer(result);
            if let (true, Some(notifier)) = (linked, notifier.get()) {
                // ENOENT only means the kernel had nothing cached.
                let _ = notifier.inval_inode(ino, 0, 0);
            }
        };
        self.spawn(move |fs| async move { fs.link(ino.0, new_parent.0, &name).await }, answer_then_drop_old);
    }

    /// `mkfifo`, and `bind` of a Unix socket. The kernel keeps what passes
    /// through either; dfos stores only the name. Devices are refused.
    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::File,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            _ => FileKind::Other,
        };
        let (name, mode) = (name.to_owned(), mode & !umask & 0o7777);
        let answer = self.reply_entry(reply);
        self.spawn(move |fs| async move { fs.mknod(parent.0, &name, kind, mode).await }, answer);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let answer = move |result: Result<String, FsError>| match result {
            Ok(target) => reply.data(crate::names::from_wire(&target).as_bytes()),
            Err(e) => reply.error(errno(&e)),
        };
        self.spawn(move |fs| async move { fs.readlink(ino.0).await }, answer);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let answer = empty(reply);
        // Submitting spawns tasks, which needs the runtime's context here.
        let _runtime = self.runtime.enter();
        if let Some(done) = self.fs.unlink_now(parent.0, name) {
            return answer(done);
        }
        let name = name.to_owned();
        self.spawn(move |fs| async move { fs.unlink(parent.0, &name).await }, answer);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn(move |fs| async move { fs.rmdir(parent.0, &name).await }, empty(reply));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mode = if flags.is_empty() {
            RenameMode::Replace
        } else if flags == RenameFlags::RENAME_NOREPLACE {
            RenameMode::NoReplace
        } else if flags == RenameFlags::RENAME_EXCHANGE {
            RenameMode::Exchange
        } else {
            // RENAME_WHITEOUT (overlayfs's) is not supported.
            return reply.error(Errno::EINVAL);
        };
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.spawn(
            move |fs| async move { fs.rename(parent.0, &name, newparent.0, &newname, mode).await },
            empty(reply),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let handle_flags = handle_flags(flags.0);
        let answer = move |opened: Result<Opened, FsError>| match opened {
            Ok(opened) => {
                let mut flags = handle_flags;
                if opened.keep_cache {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                if opened.uncached {
                    flags |= FopenFlags::FOPEN_DIRECT_IO;
                }
                reply.opened(FileHandle(opened.handle), flags)
            }
            Err(e) => reply.error(errno(&e)),
        };
        let shared_write = opens_for_writing(flags.0) && self.fs.is_shared(ino.0);
        let append = flags.0 & libc::O_APPEND != 0;
        let fresh = append || self.serving.close_to_open;
        if shared_write || fresh {
            let notifier = self.notifier.clone();
            let work = move |fs: Arc<DfosFs<T>>| async move {
                if shared_write {
                    fs.refuse_read_only_share(ino.0).await?;
                }
                if !fresh {
                    return fs.open(ino.0);
                }
                let opened = fs.open_fresh(ino.0, append).await?;
                // Reads past the kernel's size, and appends, must not trust it.
                drop_kernel_attrs(&notifier, ino);
                Ok(opened)
            };
            return self.spawn(work, answer);
        }
        answer(self.fs.open(ino.0))
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let answer = move |result: Result<FileBytes, FsError>| match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        };
        // Blocks that have arrived are answered here; the read-ahead they
        // start needs the runtime.
        let _runtime = self.runtime.enter();
        if let Some(done) = self.fs.read_now(ino.0, offset, size) {
            return answer(done);
        }
        self.spawn(move |fs| async move { fs.read(ino.0, offset, size).await }, answer);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _runtime = self.runtime.enter();
        let at = match flags.0 & libc::O_APPEND {
            0 => (offset, Placement::AtOffset),
            _ => (self.fs.append_offset(ino.0, offset, data.len()), Placement::AtEnd),
        };
        // An append goes where the node finds the end: the kernel's size
        // for the file is stale once the write is answered.
        let notifier = (at.1 == Placement::AtEnd).then(|| self.notifier.clone());
        let answer = move |result: Result<u32, FsError>| {
            match result {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(&e)),
            }
            if let Some(notifier) = &notifier {
                drop_kernel_attrs(notifier, ino);
            }
        };
        if let Some(done) = self.fs.write_now(ino.0, at, data) {
            return answer(done);
        }
        let data = data.to_vec();
        self.spawn(move |fs| async move { fs.write(ino.0, at, &data).await }, answer);
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        self.flush_inode(ino, reply);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.flush_inode(ino, reply);
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.spawn(move |fs| async move { fs.fsync(ino.0).await }, empty(reply));
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.spawn(
            move |fs| async move { fs.copy_range(ino_in.0, offset_in, ino_out.0, offset_out, len).await },
            move |result| match result {
                Ok(copied) => reply.written(copied),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    /// `fallocate(1)`, `posix_fallocate(3)` (which would otherwise write
    /// a byte into every block of the range), hole punching. Modes the
    /// protocol has no name for are refused here.
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(mode) = allocate_mode(mode) else {
            return reply.error(Errno::EOPNOTSUPP);
        };
        self.spawn(move |fs| async move { fs.allocate(ino.0, offset, length, mode).await }, empty(reply));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.spawn(
            move |fs| async move { fs.opendir(ino.0).await },
            move |result| match result {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.fs.listing(fh.0) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(&e)),
        };
        let dots = [(ino.0, "."), (self.fs.parent_ino(ino.0), "..")];
        let total = dots.len() + entries.len();
        for index in offset as usize..total {
            let full = if index < dots.len() {
                let (dot_ino, name) = dots[index];
                reply.add(INodeNo(dot_ino), index as u64 + 1, FileType::Directory, name)
            } else {
                let entry = &entries[index - dots.len()];
                // Plain readdir does not count lookups; the number is a hint.
                let name = crate::names::from_wire(&entry.name);
                reply.add(INodeNo(u64::MAX), index as u64 + 1, file_type(entry.attr.kind), name)
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let entries = match self.fs.listing(fh.0) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(&e)),
        };
        let maker = self.attrs;
        let dots = [(ino.0, "."), (self.fs.parent_ino(ino.0), "..")];
        let total = dots.len() + entries.len();
        for index in offset as usize..total {
            let next = index as u64 + 1;
            if index < dots.len() {
                let (dot_ino, name) = dots[index];
                let attr = FileAttr {
                    kind: FileKind::Directory,
                    size: 0,
                    mode: 0o755,
                    nlink: 2,
                    atime: Timestamp::default(),
                    mtime: Timestamp::default(),
                    ctime: Timestamp::default(),
                    blocks: 0,
                    link: None,
                };
                // The kernel neither caches nor counts "." and "..".
                if reply.add(
                    INodeNo(dot_ino),
                    next,
                    name,
                    &Duration::ZERO,
                    &maker.kernel_attr(dot_ino, &attr),
                    Generation(0),
                ) {
                    break;
                }
                continue;
            }
            let entry = &entries[index - dots.len()];
            let child = match self.fs.remember_child(ino.0, &entry.name, entry.attr.link) {
                Ok(child) => child,
                Err(e) => return reply.error(errno(&e)),
            };
            if reply.add(
                INodeNo(child),
                next,
                crate::names::from_wire(&entry.name),
                ttl_of(&entry.attr),
                &maker.kernel_attr(child, &entry.attr),
                Generation(0),
            ) {
                // Not handed to the kernel after all, so not counted.
                self.fs.forget(child, 1);
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.spawn(
            move |fs| async move { fs.statfs().await },
            move |result| match result {
                Ok(s) => reply.statfs(
                    s.blocks,
                    s.blocks_free,
                    s.blocks_available,
                    s.files,
                    s.files_free,
                    s.block_size,
                    s.name_max,
                    s.block_size,
                ),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.serving.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let answer = answer_xattr(size);
        if let Some(done) = self.fs.getxattr_now(name) {
            return answer(done, reply);
        }
        let name = name.to_owned();
        self.spawn(move |fs| async move { fs.getxattr(ino.0, &name).await }, move |result| answer(result, reply));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.serving.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let answer = answer_xattr(size);
        self.spawn(move |fs| async move { fs.listxattr(ino.0).await }, move |result| answer(result, reply));
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        if !self.serving.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let Some(mode) = xattr_mode(flags).filter(|_| position == 0) else {
            return reply.error(Errno::EINVAL);
        };
        let (name, value) = (name.to_owned(), value.to_vec());
        self.spawn(move |fs| async move { fs.setxattr(ino.0, &name, &value, mode).await }, empty(reply));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if !self.serving.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let name = name.to_owned();
        self.spawn(move |fs| async move { fs.removexattr(ino.0, &name).await }, empty(reply));
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = name.to_owned();
        let attrs = self.attrs;
        let exclusive = flags & libc::O_EXCL != 0;
        // A create that went behind is refused, if at all, at close: its
        // handle's close must reach the mount even when opened read-only.
        let handle_flags = handle_flags(flags).difference(FopenFlags::FOPEN_NOFLUSH);
        let mode = mode & 0o7777 & !umask;
        let answer = move |result: Result<(Entry, u64), FsError>| match result {
            Ok((entry, fh)) => {
                let attr = attrs.kernel_attr(entry.ino, &entry.attr);
                reply.created(&TTL, &attr, Generation(0), FileHandle(fh), handle_flags)
            }
            Err(e) => reply.error(errno(&e)),
        };
        let _runtime = self.runtime.enter();
        if let Some(done) = self.fs.create_now(parent.0, &name, mode, exclusive) {
            return answer(done);
        }
        self.spawn(move |fs| async move { fs.create(parent.0, &name, mode, exclusive).await }, answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_has_its_errno() {
        let pairs = [
            (ErrorCode::NotFound, libc::ENOENT),
            (ErrorCode::Exists, libc::EEXIST),
            (ErrorCode::NotEmpty, libc::ENOTEMPTY),
            (ErrorCode::NotDir, libc::ENOTDIR),
            (ErrorCode::IsDir, libc::EISDIR),
            (ErrorCode::NoSpace, libc::ENOSPC),
            (ErrorCode::AccessDenied, libc::EACCES),
            (ErrorCode::NameTooLong, libc::ENAMETOOLONG),
            (ErrorCode::Invalid, libc::EINVAL),
            (ErrorCode::CrossDevice, libc::EXDEV),
            (ErrorCode::Io, libc::EIO),
            (ErrorCode::NotPermitted, libc::EPERM),
            (ErrorCode::TooLarge, libc::EFBIG),
            (ErrorCode::NotSupported, libc::EOPNOTSUPP),
            (ErrorCode::NoAttribute, libc::ENODATA),
        ];
        for (code, raw) in pairs {
            assert_eq!(errno_of_code(code).code(), raw, "{code:?}");
        }
    }

    #[test]
    fn only_read_only_handles_skip_the_flush_at_close_and_only_write_only_ones_bypass_the_page_cache() {
        assert_eq!(handle_flags(libc::O_RDONLY), FopenFlags::FOPEN_NOFLUSH);
        assert_eq!(handle_flags(libc::O_RDONLY | libc::O_TRUNC), FopenFlags::empty());
        assert_eq!(handle_flags(libc::O_RDWR), FopenFlags::empty());
        assert_eq!(handle_flags(libc::O_WRONLY | libc::O_APPEND), FopenFlags::FOPEN_DIRECT_IO);
    }

    #[test]
    fn transport_failures_and_deadlines_are_eio() {
        assert_eq!(errno(&FsError::Rpc(RpcError::Timeout)).code(), libc::EIO);
        assert_eq!(errno(&FsError::Rpc(RpcError::Kafka("down".into()))).code(), libc::EIO);
        assert_eq!(errno(&FsError::Stale(9)).code(), libc::ENOENT);
        assert_eq!(errno(&FsError::BadName).code(), libc::EINVAL);
    }
}
