//! Applies one request to a user's directory tree on local disk.
//!
//! Each user's files live as plain files under `root/<user>/`, with the same
//! names and bytes the user wrote, so an admin can read or back them up with
//! ordinary tools. Every path goes through [`crate::paths::resolve`], and the
//! final component is opened with `O_NOFOLLOW` or examined with `lstat`.
//! Times a request sets come from the envelope, so applying the same request
//! twice leaves the same mode, size, bytes and mtime.

use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dfos_protocol::limits::{
    CHUNK_SIZE, MAX_COPY_BYTES, MAX_NAME_BYTES, MAX_PATH_BYTES, MAX_READ_FILES, MAX_READ_FILES_BYTES,
    MAX_SMALL_FILE_BYTES, MAX_XATTR_NAME_BYTES, MAX_XATTR_VALUE_BYTES, READDIR_PAGE_BYTES, READ_BLOCK_SIZE,
};
use dfos_protocol::path::{join, split};
use dfos_protocol::{
    is_user_xattr, DirEntry, ErrorCode, FileAttr, FileContent, FileKind, FsStats, Listing, Payload, RenameMode,
    Request, SetTime, Timestamp, XattrMode, APPEND_AT_END,
};

use crate::fresh_files::{FreshFiles, Kind};
use crate::log_index::FileStamp;
use crate::paths::{self, PathError};
use crate::sys;
use crate::trash::Trash;
use crate::writeback;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bad path: {0}")]
    Path(#[from] PathError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("request too large")]
    TooLarge,
    #[error("symlinks are not followed")]
    Symlink,
    #[error("request not valid here: {0}")]
    NotApplicable(&'static str),
}

impl StoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::Path(PathError::NotRelative | PathError::Nul) => ErrorCode::Invalid,
            StoreError::Path(PathError::TooLong) => ErrorCode::NameTooLong,
            StoreError::Path(PathError::ThroughSymlink) | StoreError::Symlink => ErrorCode::AccessDenied,
            StoreError::TooLarge => ErrorCode::TooLarge,
            StoreError::NotApplicable(_) => ErrorCode::Invalid,
            StoreError::Io(e) => io_error_code(e),
        }
    }
}

/// The nearest protocol code for an OS error; anything unexpected is `Io`.
pub fn io_error_code(e: &io::Error) -> ErrorCode {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorCode::NotFound,
        Some(libc::EEXIST) => ErrorCode::Exists,
        Some(libc::ENOTEMPTY) => ErrorCode::NotEmpty,
        Some(libc::ENOTDIR) => ErrorCode::NotDir,
        Some(libc::EISDIR) => ErrorCode::IsDir,
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorCode::NoSpace,
        Some(libc::EACCES | libc::ELOOP) => ErrorCode::AccessDenied,
        Some(libc::EPERM) => ErrorCode::NotPermitted,
        Some(libc::ENAMETOOLONG) => ErrorCode::NameTooLong,
        Some(libc::EINVAL) => ErrorCode::Invalid,
        Some(libc::EXDEV) => ErrorCode::CrossDevice,
        Some(libc::EFBIG) => ErrorCode::TooLarge,
        Some(libc::EOPNOTSUPP) => ErrorCode::NotSupported,
        Some(libc::ENODATA) => ErrorCode::NoAttribute,
        Some(libc::E2BIG) => ErrorCode::TooLarge,
        _ => ErrorCode::Io,
    }
}

type StoreResult<T> = Result<T, StoreError>;

pub struct Store {
    root: PathBuf,
    trash: Option<Trash>,
    /// Empty files and directories creates and mkdirs rename into place.
    fresh: Option<FreshFiles>,
}

fn to_system_time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos.min(999_999_999))
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + Duration::from_nanos(t.nanos.min(999_999_999) as u64)
    }
}

fn timestamp(secs: i64, nanos: i64) -> Timestamp {
    Timestamp { secs, nanos: nanos.clamp(0, 999_999_999) as u32 }
}

pub fn attr_of(meta: &fs::Metadata) -> FileAttr {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Directory
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_fifo() {
        FileKind::Fifo
    } else if ft.is_socket() {
        FileKind::Socket
    } else {
        FileKind::Other
    };
    FileAttr {
        kind,
        size: meta.size(),
        mode: meta.mode() & 0o7777,
        nlink: meta.nlink() as u32,
        atime: timestamp(meta.atime(), meta.atime_nsec()),
        mtime: timestamp(meta.mtime(), meta.mtime_nsec()),
        ctime: timestamp(meta.ctime(), meta.ctime_nsec()),
        blocks: meta.blocks(),
        link: None,
    }
}

fn open_nofollow(path: &Path, write: bool) -> StoreResult<File> {
    let mut options = OpenOptions::new();
    // O_NONBLOCK: a FIFO someone made in the data root must not stall the
    // node in open() waiting for its other end; regular files ignore it.
    options.read(!write).write(write).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    options.open(path).map_err(open_error)
}

/// An open that met a symlink as the final component says so.
fn open_error(e: io::Error) -> StoreError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        StoreError::Symlink
    } else {
        StoreError::Io(e)
    }
}

/// Copies up to `len` bytes of `source` from `from` into `target` at `to`
/// within the kernel (`copy_file_range(2)`: no copy through this process,
/// and a shared extent where the filesystem can). Stops early only at the
/// end of `source`; returns how many bytes it copied.
fn copy_range(source: &File, from: u64, target: &File, to: u64, len: u64) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let offset = |at: u64| i64::try_from(at).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    let (mut from, mut to) = (offset(from)?, offset(to)?);
    let mut copied = 0;
    while copied < len {
        let want = usize::try_from(len - copied).unwrap_or(usize::MAX);
        // SAFETY: both descriptors are open for the call's duration, and the
        // offsets are valid i64s the kernel advances by what it copied.
        let done =
            unsafe { libc::copy_file_range(source.as_raw_fd(), &mut from, target.as_raw_fd(), &mut to, want, 0) };
        match done {
            0 => break,
            n if n > 0 => copied += n as u64,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(copied)
}

/// A regular file of at most `MAX_SMALL_FILE_BYTES`, whole.
fn read_small_file(path: &Path) -> StoreResult<FileContent> {
    let file = open_nofollow(path, false)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(StoreError::Io(io::Error::from_raw_os_error(libc::EISDIR)));
    }
    if meta.len() > MAX_SMALL_FILE_BYTES as u64 {
        return Err(StoreError::TooLarge);
    }
    let data = read_at_most(&file, 0, meta.len() as usize)?;
    Ok(FileContent { attr: attr_of(&meta), data })
}

/// Reads up to `len` bytes at `offset`, stopping early only at end of file.
/// The buffer is not zeroed first: the kernel's copy is the only one.
fn read_at_most(mut file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::with_capacity(len);
    file.seek(SeekFrom::Start(offset))?;
    file.take(len as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

impl Store {
    pub fn new(root: &Path) -> io::Result<Self> {
        fs::create_dir_all(root)?;
        Ok(Store { root: root.to_owned(), trash: None, fresh: None })
    }

    /// Creates and mkdirs take an empty file or directory made ahead of
    /// time (see [`crate::fresh_files`]). Only for the daemon holding the
    /// storage lock.
    pub fn with_fresh_files(mut self) -> io::Result<Self> {
        self.fresh = Some(FreshFiles::start(&self.root)?);
        Ok(self)
    }

    /// Keeps deleted and replaced files in each user's trash for
    /// `keep_hours` (see [`crate::trash`]); 0 deletes them at once.
    pub fn with_trash(mut self, keep_hours: u64) -> Self {
        self.trash = (keep_hours > 0).then(|| Trash::new(keep_hours));
        self
    }

    /// A truncate to zero (`>`, `cp` onto a file, `O_TRUNC`) is an
    /// overwrite: with a trash, the old bytes go there and an empty file
    /// with the same mode takes their place, to be written anew.
    fn keep_before_emptying(&self, root: &Path, rel: &str, target: &Path, now: Timestamp) -> StoreResult<()> {
        let old = fs::symlink_metadata(target)?;
        if old.len() == 0 {
            return Ok(());
        }
        // The emptied file is a new one: it keeps the old one's attributes
        // (read only when a trash may take the old one away).
        let attributes = if self.trash.is_some() { user_xattrs(target) } else { Vec::new() };
        if !self.kept_in_trash(root, rel, target, now) {
            return Ok(());
        }
        let mode = old.mode() & 0o7777;
        let fresh =
            OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).mode(mode).open(target)?;
        fresh.set_permissions(Permissions::from_mode(mode))?;
        for (name, value) in attributes {
            if let Err(e) = sys::set_xattr(target, &name, &value, 0) {
                log::warn!("op=trash path={rel:?} attribute {name:?} not kept on the emptied file: {e}");
            }
        }
        Ok(())
    }

    /// Whether the regular file at `rel` went to the trash instead of
    /// being removed. A file with other names (hard links) keeps its
    /// bytes under them, and emptying it must empty them too: it is
    /// removed or truncated in place, never moved.
    fn kept_in_trash(&self, root: &Path, rel: &str, victim: &Path, now: Timestamp) -> bool {
        let sole_file = fs::symlink_metadata(victim).is_ok_and(|m| m.file_type().is_file() && m.nlink() == 1);
        sole_file && self.trash.as_ref().is_some_and(|trash| trash.keep(root, rel, now))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The user's root directory, created on first use.
    pub fn user_root(&self, user: &str) -> io::Result<PathBuf> {
        let dir = self.root.join(user);
        if !dir.is_dir() {
            fs::create_dir_all(&dir)?;
            fs::set_permissions(&dir, Permissions::from_mode(0o755))?;
        }
        Ok(dir)
    }

    /// The owner's grants file as text; empty when there is none, or it is
    /// not a regular file (a symlink is never followed), or is over 1 MiB.
    pub fn grants_text(&self, owner: &str) -> String {
        let Ok(path) = paths::resolve(&self.root.join(owner), dfos_protocol::sharing::GRANTS_FILE) else {
            return String::new();
        };
        let Ok(file) = open_nofollow(&path, false) else { return String::new() };
        let mut text = String::new();
        use std::io::Read as _;
        match file.take(1 << 20).read_to_string(&mut text) {
            Ok(_) => text,
            Err(_) => String::new(),
        }
    }

    /// What identifies the regular file at `rel` now (None: not one).
    pub fn stamp(&self, user: &str, rel: &str) -> Option<FileStamp> {
        FileStamp::of(&self.metadata(user, rel)?)
    }

    /// The inode number of whatever `rel` names now, not following a
    /// final symlink (None: nothing there).
    pub fn inode_number(&self, user: &str, rel: &str) -> Option<u64> {
        Some(self.metadata(user, rel)?.ino())
    }

    /// The size of the regular file `rel` names now (None: not one).
    pub fn regular_file_size(&self, user: &str, rel: &str) -> Option<u64> {
        Some(self.metadata(user, rel)?).filter(fs::Metadata::is_file).map(|meta| meta.len())
    }

    /// What `rel` names now, not following a final symlink.
    fn metadata(&self, user: &str, rel: &str) -> Option<fs::Metadata> {
        let path = paths::resolve(&self.root.join(user), rel).ok()?;
        fs::symlink_metadata(path).ok()
    }

    /// Applies `request` for `user`. `now` is the envelope's time.
    /// Login is not a store operation and is refused here.
    pub fn apply(&self, user: &str, now: Timestamp, request: &Request) -> StoreResult<Payload> {
        let root = self.user_root(user)?;
        let payload = self.apply_unlabelled(&root, now, request)?;
        Ok(with_link_identities(&root, request, payload))
    }

    /// `apply` in the user's tree at `root`, before the attributes of
    /// files with several names are given their link identity.
    fn apply_unlabelled(&self, root: &Path, now: Timestamp, request: &Request) -> StoreResult<Payload> {
        let at = |rel: &str| paths::resolve(root, rel);
        match request {
            Request::Login { .. } => Err(StoreError::NotApplicable("login is handled by the service")),
            Request::Batch { .. } => Err(StoreError::NotApplicable("a batch is taken apart by the service")),
            Request::Lookup { path } | Request::GetAttr { path } => {
                Ok(Payload::Attr(attr_of(&fs::symlink_metadata(at(path)?)?)))
            }
            Request::ReadDir { path, after } => read_dir(&at(path)?, after.as_deref()),
            Request::ReadTree { path } => read_tree(root, path),
            Request::Create { path, mode, exclusive } => self.create(&at(path)?, *mode, *exclusive, now),
            Request::Mkdir { path, mode } => self.mkdir(&at(path)?, *mode, now),
            Request::Unlink { path } => {
                let target = at(path)?;
                if fs::symlink_metadata(&target)?.is_dir() {
                    return Err(StoreError::Io(io::Error::from_raw_os_error(libc::EISDIR)));
                }
                if !self.kept_in_trash(root, path, &target, now) {
                    fs::remove_file(&target)?;
                }
                stamp_parent(&target, now);
                Ok(Payload::Done)
            }
            Request::Rmdir { path } => {
                if path.is_empty() {
                    return Err(StoreError::Io(io::Error::from_raw_os_error(libc::EBUSY)));
                }
                let dir = at(path)?;
                fs::remove_dir(&dir)?;
                stamp_parent(&dir, now);
                Ok(Payload::Done)
            }
            Request::Rename { from, to, mode } => {
                if from.is_empty() || to.is_empty() {
                    return Err(StoreError::Io(io::Error::from_raw_os_error(libc::EBUSY)));
                }
                let (from_rel, to_rel) = (from, to);
                let (from, to) = (at(from)?, at(to)?);
                // Only a non-directory replaces a file; anything else fails below
                // with the file still in place.
                let moves_a_non_directory = fs::symlink_metadata(&from).is_ok_and(|m| !m.is_dir());
                if *mode == RenameMode::Replace && from_rel != to_rel && moves_a_non_directory {
                    self.kept_in_trash(root, to_rel, &to, now);
                }
                rename(&from, &to, *mode)?;
                stamp_parent(&from, now);
                if from.parent() != to.parent() {
                    stamp_parent(&to, now);
                }
                Ok(Payload::Done)
            }
            // Locating data in the log is the service's business (it knows
            // the log); the store answers with the bytes, or locates none.
            Request::Read { path, offset, len } | Request::ReadFromLog { path, offset, len } => {
                let file = open_nofollow(&at(path)?, false)?;
                // The reply must fit Kafka's default message limit.
                let len = (*len as usize).min(READ_BLOCK_SIZE);
                Ok(Payload::Data(read_at_most(&file, *offset, len)?))
            }
            Request::LocateInLog { path, .. } => {
                let file = open_nofollow(&at(path)?, false)?;
                Ok(Payload::Located { locations: Vec::new(), size: file.metadata()?.len() })
            }
            Request::Write { path, offset, data } => {
                if data.len() > CHUNK_SIZE {
                    return Err(StoreError::TooLarge);
                }
                if *offset == APPEND_AT_END {
                    // The service places an append before applying it; one
                    // it could not place fails as a write there would.
                    open_nofollow(&at(path)?, true)?;
                    return Err(StoreError::NotApplicable("an append at no regular file's end"));
                }
                let file = writeback::write_at(&at(path)?, data, *offset).map_err(open_error)?;
                file.set_times(FileTimes::new().set_modified(to_system_time(now)))?;
                Ok(Payload::Written { attr: attr_of(&file.metadata()?) })
            }
            Request::Symlink { path, target } => {
                validate_link_target(target)?;
                let link = at(path)?;
                std::os::unix::fs::symlink(target, &link)?;
                stamp_parent(&link, now);
                sys::set_times_nofollow(&link, Some(now), Some(now))?;
                Ok(Payload::Attr(attr_of(&fs::symlink_metadata(&link)?)))
            }
            Request::MakeNode { path, kind, mode } => {
                let node = at(path)?;
                make_node(&node, *kind, *mode, now)?;
                stamp_parent(&node, now);
                Ok(Payload::Attr(attr_of(&fs::symlink_metadata(&node)?)))
            }
            Request::Link { from, to } => {
                let (source, link) = (at(from)?, at(to)?);
                if fs::symlink_metadata(&source)?.is_dir() {
                    return Err(StoreError::Io(io::Error::from_raw_os_error(libc::EPERM)));
                }
                give_link_identity(&source, from, to, now);
                // linkat(2) without AT_SYMLINK_FOLLOW: a symlink at `from`
                // gets a second name itself; what it points to is never read.
                fs::hard_link(&source, &link)?;
                stamp_parent(&link, now);
                Ok(Payload::Attr(attr_of(&fs::symlink_metadata(&link)?)))
            }
            Request::ReadLink { path } => {
                let target = fs::read_link(at(path)?)?;
                // Links made through dfos hold UTF-8; one an admin made may not.
                let target = target.into_os_string().into_string().map_err(|_| invalid())?;
                Ok(Payload::LinkTarget(target))
            }
            Request::SetAttr { path, size, mode, atime, mtime } => {
                let target = at(path)?;
                let kind = attr_of(&fs::symlink_metadata(&target)?).kind;
                if matches!(kind, FileKind::Symlink | FileKind::Fifo | FileKind::Socket) {
                    let times = [atime, mtime].map(|t| t.map(|t| t.at(now)));
                    return set_node_attr(&target, kind == FileKind::Symlink, *size, *mode, times);
                }
                if *size == Some(0) {
                    self.keep_before_emptying(root, path, &target, now)?;
                }
                let file = open_nofollow(&target, size.is_some())?;
                if let Some(size) = size {
                    file.set_len(*size)?;
                }
                if let Some(mode) = mode {
                    file.set_permissions(Permissions::from_mode(mode & 0o7777))?;
                }
                let resolve_time = |t: &SetTime| to_system_time(t.at(now));
                let mut times = FileTimes::new();
                if let Some(t) = atime {
                    times = times.set_accessed(resolve_time(t));
                }
                // A truncate counts as a modification, like ftruncate(2).
                match (mtime, size) {
                    (Some(t), _) => times = times.set_modified(resolve_time(t)),
                    (None, Some(_)) => times = times.set_modified(to_system_time(now)),
                    (None, None) => {}
                }
                file.set_times(times)?;
                Ok(Payload::Attr(attr_of(&file.metadata()?)))
            }
            Request::Allocate { path, offset, len, mode } => {
                let file = open_nofollow(&at(path)?, true)?;
                sys::allocate(&file, *mode, *offset, *len)?;
                // The kernel stamps every mode with its own clock; replicas
                // agree on the request's.
                file.set_times(FileTimes::new().set_modified(to_system_time(now)))?;
                Ok(Payload::Attr(attr_of(&file.metadata()?)))
            }
            Request::CopyRange { from, from_offset, to, to_offset, len } => {
                let source = open_nofollow(&at(from)?, false)?;
                let target = open_nofollow(&at(to)?, true)?;
                let len = copy_range(&source, *from_offset, &target, *to_offset, (*len).min(MAX_COPY_BYTES))?;
                target.set_times(FileTimes::new().set_modified(to_system_time(now)))?;
                Ok(Payload::Copied { len, attr: attr_of(&target.metadata()?) })
            }
            Request::ReadFiles { paths } => {
                if paths.len() > MAX_READ_FILES {
                    return Err(StoreError::TooLarge);
                }
                let mut budget = MAX_READ_FILES_BYTES;
                let mut files = Vec::with_capacity(paths.len());
                for path in paths {
                    let file = at(path).map_err(StoreError::from).and_then(|path| read_small_file(&path));
                    if let Ok(content) = &file {
                        let Some(left) = budget.checked_sub(content.data.len()) else { break };
                        budget = left;
                    }
                    files.push(file.map_err(|e| e.code()));
                }
                Ok(Payload::Files(files))
            }
            Request::GetXattr { path, name } => {
                let name = kept_xattr_name(name)?;
                Ok(Payload::Xattr(sys::get_xattr(&at(path)?, name)?))
            }
            Request::ListXattrs { path } => {
                let mut names = sys::list_xattrs(&at(path)?)?;
                // Whatever else the node's own kernel keeps there is its own.
                names.retain(|name| is_user_xattr(name));
                Ok(Payload::XattrNames(names))
            }
            Request::SetXattr { path, name, value, mode } => {
                let name = kept_xattr_name(name)?;
                if value.len() > MAX_XATTR_VALUE_BYTES {
                    return Err(StoreError::TooLarge);
                }
                let flags = match mode {
                    XattrMode::Either => 0,
                    XattrMode::Create => libc::XATTR_CREATE,
                    XattrMode::Replace => libc::XATTR_REPLACE,
                };
                let target = at(path)?;
                sys::set_xattr(&target, name, value, flags)?;
                Ok(Payload::Attr(attr_of(&fs::symlink_metadata(&target)?)))
            }
            Request::RemoveXattr { path, name } => {
                let target = at(path)?;
                sys::remove_xattr(&target, kept_xattr_name(name)?)?;
                Ok(Payload::Attr(attr_of(&fs::symlink_metadata(&target)?)))
            }
            Request::StatFs => statfs(root),
            Request::Fsync { path } => {
                open_nofollow(&at(path)?, false)?.sync_all()?;
                Ok(Payload::Done)
            }
        }
    }
}

/// Where a file's link identity is kept: with the file itself, so every
/// name of it has it and it goes with the file. Users cannot see or set
/// it (`is_user_xattr` leaves `user.dfos.` out).
const LINK_XATTR: &str = "user.dfos.link";

/// Gives the file at `source` its link identity when it gets its second
/// name (or first gets one at all): derived from the link request alone,
/// so every storage node gives the same. A file that already has several
/// names keeps its identity. A filesystem without user attributes leaves
/// the file without one, and its names show as separate inodes.
fn give_link_identity(source: &Path, from: &str, to: &str, now: Timestamp) {
    let Ok(meta) = fs::symlink_metadata(source) else { return };
    if meta.file_type().is_symlink() || (meta.nlink() > 1 && link_identity(source).is_some()) {
        return;
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(from.as_bytes())
        .chain_update([0])
        .chain_update(to.as_bytes())
        .chain_update(now.secs.to_le_bytes())
        .chain_update(now.nanos.to_le_bytes())
        .finalize();
    if let Err(e) = sys::set_xattr(source, LINK_XATTR, &digest[..8], 0) {
        log::debug!("op=link path={from:?} cannot keep a link identity: {e}");
    }
}

fn link_identity(path: &Path) -> Option<u64> {
    let value = sys::get_xattr(path, LINK_XATTR).ok()?;
    Some(u64::from_le_bytes(value.try_into().ok()?))
}

/// Fills `link` in every attribute of a file with several names in
/// `payload`, an answer to `request`.
fn with_link_identities(root: &Path, request: &Request, mut payload: Payload) -> Payload {
    let label = |rel: &str, attr: &mut FileAttr| {
        if attr.has_other_names() {
            attr.link = paths::resolve(root, rel).ok().and_then(|path| link_identity(&path));
        }
    };
    match (&mut payload, request) {
        (Payload::Attr(attr) | Payload::Written { attr } | Payload::Copied { attr, .. }, request) => {
            label(request.path(), attr)
        }
        (Payload::Entries { entries, .. }, request) => {
            for entry in entries {
                label(&join(request.path(), &entry.name), &mut entry.attr);
            }
        }
        (Payload::Tree(listings), _) => {
            for listing in listings {
                for entry in &mut listing.entries {
                    label(&join(&listing.path, &entry.name), &mut entry.attr);
                }
            }
        }
        (Payload::Files(files), Request::ReadFiles { paths }) => {
            for (file, path) in files.iter_mut().zip(paths) {
                if let Ok(content) = file {
                    label(path, &mut content.attr);
                }
            }
        }
        _ => {}
    }
    payload
}

impl Store {
    /// One made ahead of time, given the mode and times asked for, then
    /// renamed to `path` unless something has that name. Whatever goes
    /// wrong, `plainly` does it the usual way, and says why if it fails.
    /// One that cannot be set up is dropped (the pool's directory is
    /// emptied at the next start); one whose name is taken goes back.
    fn place_fresh(
        &self,
        kind: Kind,
        path: &Path,
        mode: u32,
        now: Timestamp,
        plainly: impl FnOnce() -> StoreResult<Payload>,
    ) -> StoreResult<Payload> {
        let Some((pool, fresh)) = self.fresh.as_ref().and_then(|pool| Some((pool, pool.take(kind)?))) else {
            return plainly();
        };
        let Ok(opened) = open_nofollow(&fresh, false) else { return plainly() };
        if set_mode_and_times(&opened, mode, now).is_err() {
            return plainly();
        }
        if sys::rename_no_replace(&fresh, path).is_err() {
            pool.give_back(kind, fresh);
            return plainly();
        }
        stamp_parent(path, now);
        Ok(Payload::Attr(attr_of(&opened.metadata()?)))
    }

    fn create(&self, path: &Path, mode: u32, exclusive: bool, now: Timestamp) -> StoreResult<Payload> {
        self.place_fresh(Kind::File, path, mode, now, || create(path, mode, exclusive, now))
    }

    fn mkdir(&self, dir: &Path, mode: u32, now: Timestamp) -> StoreResult<Payload> {
        self.place_fresh(Kind::Directory, dir, mode, now, || {
            fs::create_dir(dir)?;
            stamp_parent(dir, now);
            let file = open_nofollow(dir, false)?;
            set_mode_and_times(&file, mode, now)?;
            Ok(Payload::Attr(attr_of(&file.metadata()?)))
        })
    }
}

/// The daemon's umask must not change the mode the client asked for, and
/// a replay must give the same times.
fn set_mode_and_times(file: &File, mode: u32, now: Timestamp) -> io::Result<()> {
    file.set_permissions(Permissions::from_mode(mode & 0o7777))?;
    file.set_times(FileTimes::new().set_accessed(to_system_time(now)).set_modified(to_system_time(now)))
}

fn create(path: &Path, mode: u32, exclusive: bool, now: Timestamp) -> StoreResult<Payload> {
    let mut options = OpenOptions::new();
    options.write(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).mode(mode & 0o7777);
    let file = match options.clone().create_new(true).open(path) {
        Ok(file) => {
            set_mode_and_times(&file, mode, now)?;
            stamp_parent(path, now);
            file
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !exclusive => options.open(path)?,
        Err(e) => return Err(e.into()),
    };
    Ok(Payload::Attr(attr_of(&file.metadata()?)))
}

fn rename(from: &Path, to: &Path, mode: RenameMode) -> StoreResult<()> {
    match mode {
        RenameMode::Replace => fs::rename(from, to)?,
        RenameMode::NoReplace => sys::rename_no_replace(from, to)?,
        RenameMode::Exchange => sys::rename_exchange(from, to)?,
    }
    Ok(())
}

/// The `user.` extended attributes of `path` with their values (none if
/// they cannot be read).
fn user_xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let names = sys::list_xattrs(path).unwrap_or_default();
    names
        .into_iter()
        .filter(|name| is_user_xattr(name))
        .filter_map(|name| sys::get_xattr(path, &name).ok().map(|value| (name, value)))
        .collect()
}

/// `name` if it is an extended attribute dfos keeps: other namespaces are
/// not supported (EOPNOTSUPP, as Linux answers for a namespace a
/// filesystem lacks), an overlong name is refused (a mount's kernel
/// refuses one with ERANGE before it travels).
fn kept_xattr_name(name: &str) -> StoreResult<&str> {
    if !is_user_xattr(name) {
        return Err(StoreError::Io(io::Error::from_raw_os_error(libc::EOPNOTSUPP)));
    }
    if name.len() > MAX_XATTR_NAME_BYTES {
        return Err(StoreError::Io(io::Error::from_raw_os_error(libc::ENAMETOOLONG)));
    }
    Ok(name)
}

fn invalid() -> StoreError {
    StoreError::Io(io::Error::from_raw_os_error(libc::EINVAL))
}

/// What symlink(2) would refuse, refused before touching the disk.
fn validate_link_target(target: &str) -> StoreResult<()> {
    if target.is_empty() {
        return Err(StoreError::Io(io::Error::from_raw_os_error(libc::ENOENT)));
    }
    if target.len() > MAX_PATH_BYTES {
        return Err(StoreError::Path(PathError::TooLong));
    }
    if target.contains('\0') {
        return Err(StoreError::Path(PathError::Nul));
    }
    Ok(())
}

/// A named pipe or a socket's name, with exactly the mode asked for and
/// the request's time; devices are refused, as to an unprivileged user.
fn make_node(node: &Path, kind: FileKind, mode: u32, now: Timestamp) -> StoreResult<()> {
    let type_bits = match kind {
        FileKind::Fifo => libc::S_IFIFO,
        FileKind::Socket => libc::S_IFSOCK,
        FileKind::File | FileKind::Directory | FileKind::Symlink | FileKind::Other => {
            return Err(StoreError::Io(io::Error::from_raw_os_error(libc::EPERM)));
        }
    };
    sys::make_node(node, type_bits, mode)?;
    // The daemon's umask must not change the mode the client asked for;
    // chmod follows links, but `node` was just made and is not one.
    fs::set_permissions(node, Permissions::from_mode(mode & 0o7777))?;
    Ok(sys::set_times_nofollow(node, Some(now), Some(now))?)
}

/// A setattr that reaches a symbolic link itself (`touch -h`, `tar x`
/// restoring a link's times), a named pipe or a socket's name, none of
/// which may be opened here: times are set on the node, never on what a
/// link points to. None has a size to change, and a link has no mode of
/// its own (Linux refuses `lchmod` too).
fn set_node_attr(
    node: &Path,
    is_link: bool,
    size: Option<u64>,
    mode: Option<u32>,
    times: [Option<Timestamp>; 2],
) -> StoreResult<Payload> {
    if size.is_some() {
        return Err(invalid());
    }
    match mode {
        Some(_) if is_link => return Err(StoreError::Io(io::Error::from_raw_os_error(libc::EPERM))),
        Some(mode) => fs::set_permissions(node, Permissions::from_mode(mode & 0o7777))?,
        None => {}
    }
    let [atime, mtime] = times;
    sys::set_times_nofollow(node, atime, mtime)?;
    Ok(Payload::Attr(attr_of(&fs::symlink_metadata(node)?)))
}

/// A directory whose entries changed is stamped with the request's time,
/// as a written file is: every replica applying the log agrees on it, and
/// the mount that made the change can predict it. The change itself is
/// done by then, so a failure here is logged, never reported as the
/// change's.
fn stamp_parent(entry: &Path, now: Timestamp) {
    let Some(parent) = entry.parent() else { return };
    if let Err(e) = sys::set_times_nofollow(parent, None, Some(now)) {
        log::warn!("op=stamp-directory path={parent:?} cannot set its mtime: {e}");
    }
}

/// One page of `dir` in byte order of names, starting after `after`.
/// Sorting every time costs O(n log n) per page, which is cheap next to a
/// Kafka round trip, and makes the cookie a name that stays valid when
/// entries are added or removed between pages.
fn read_dir(dir: &Path, after: Option<&str>) -> StoreResult<Payload> {
    let (entries, more) = list_dir(dir, after, &mut { READDIR_PAGE_BYTES })?;
    Ok(Payload::Entries { entries, more })
}

/// What one entry costs of a listing's budget: its name and about what its
/// encoded attributes take.
fn entry_cost(name: &str) -> usize {
    name.len() + 96
}

/// The entries of `dir` after `after`, in name order, while they fit in
/// `budget` (which they use up); `more` when some were left out.
fn list_dir(dir: &Path, after: Option<&str>, budget: &mut usize) -> StoreResult<(Vec<DirEntry>, bool)> {
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR).into());
    }
    let mut names: Vec<String> = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        match entry.file_name().into_string() {
            Ok(name) if after.is_none_or(|a| name.as_str() > a) => names.push(name),
            Ok(_) => {}
            Err(raw) => log::warn!("op=readdir path={} skipping non-UTF-8 name {raw:?}", dir.display()),
        }
    }
    names.sort_unstable();
    let mut entries = Vec::new();
    let mut more = false;
    for name in names {
        let cost = entry_cost(&name);
        if cost > *budget {
            more = true;
            break;
        }
        // An entry removed since read_dir is simply left out.
        if let Ok(meta) = fs::symlink_metadata(dir.join(&name)) {
            *budget -= cost;
            entries.push(DirEntry { name, attr: attr_of(&meta) });
        }
    }
    Ok((entries, more))
}

/// `rel`'s listing, then those of the directories below it, then those of
/// its later sibling directories and theirs: depth first in name order, as
/// a walk that came into `rel` goes on. Each listing is whole; the answer
/// ends before the first that would pass one readdir page's budget.
/// Symlinks are listed, never followed.
fn read_tree(root: &Path, rel: &str) -> StoreResult<Payload> {
    let mut budget = READDIR_PAGE_BYTES;
    let (entries, more) = list_dir(&paths::resolve(root, rel)?, None, &mut budget)?;
    let first = Listing { path: rel.to_owned(), entries, more };
    if more {
        return Ok(Payload::Tree(vec![first]));
    }
    let mut below = later_siblings_last_first(root, rel);
    below.extend(subdirectories_last_first(&first));
    let mut listings = vec![first];
    while let Some(dir) = below.pop() {
        let mut left = budget.saturating_sub(entry_cost(&dir));
        match list_dir(&root.join(&dir), None, &mut left) {
            Ok((_, true)) => break,
            Ok((entries, false)) => {
                budget = left;
                let listing = Listing { path: dir, entries, more: false };
                below.extend(subdirectories_last_first(&listing));
                listings.push(listing);
            }
            // Unreadable here (a mode an admin set): the mount lists it itself.
            Err(_) => continue,
        }
    }
    Ok(Payload::Tree(listings))
}

/// The paths of a listing's directories (not symlinks to one), last name
/// first, so that popping them walks in name order.
fn subdirectories_last_first(listing: &Listing) -> Vec<String> {
    let dirs = listing.entries.iter().rev().filter(|entry| entry.attr.kind == FileKind::Directory);
    let names = dirs.map(|entry| entry.name.as_str());
    names.map(|name| join(&listing.path, name)).filter(|path| path.len() <= MAX_PATH_BYTES).collect()
}

/// The directories (not symlinks to one) next to `rel` whose names sort
/// after its own, last name first. None for the root, or when its parent
/// cannot be read.
fn later_siblings_last_first(root: &Path, rel: &str) -> Vec<String> {
    if rel.is_empty() {
        return Vec::new();
    }
    let (parent, name) = split(rel);
    let Ok(entries) = fs::read_dir(root.join(parent)) else { return Vec::new() };
    let mut later: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|sibling| sibling.as_str() > name)
        .map(|sibling| join(parent, &sibling))
        .filter(|path| path.len() <= MAX_PATH_BYTES)
        .collect();
    later.sort_unstable_by(|a, b| b.cmp(a));
    later
}

fn statfs(root: &Path) -> StoreResult<Payload> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let path = CString::new(root.as_os_str().as_bytes()).map_err(|_| StoreError::Path(PathError::Nul))?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value and the call fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(Payload::StatFs(FsStats {
        block_size: st.f_frsize as u32,
        blocks: st.f_blocks as u64,
        blocks_free: st.f_bfree as u64,
        blocks_available: st.f_bavail as u64,
        files: st.f_files as u64,
        files_free: st.f_ffree as u64,
        name_max: MAX_NAME_BYTES as u32,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfos_protocol::AllocateMode;

    const T: Timestamp = Timestamp { secs: 1_700_000_000, nanos: 5 };

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).unwrap();
        (dir, store)
    }

    fn code(r: StoreResult<Payload>) -> ErrorCode {
        r.unwrap_err().code()
    }

    /// What a request gave, without what differs between two stores that
    /// did the same (inode-dependent link identities, the kernel's ctime).
    fn outcome(result: StoreResult<Payload>) -> Result<(FileKind, u64, u32, u32, Timestamp, Timestamp), ErrorCode> {
        match result {
            Ok(Payload::Attr(a)) => Ok((a.kind, a.size, a.mode, a.nlink, a.atime, a.mtime)),
            Ok(other) => panic!("not an attribute answer: {other:?}"),
            Err(e) => Err(e.code()),
        }
    }

    /// A store whose creates and mkdirs take fresh files, its pool full.
    fn pooled_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).unwrap().with_fresh_files().unwrap();
        store.fresh.as_ref().unwrap().wait_until_full();
        (dir, store)
    }

    /// The inodes in the pool of `store` (kept at `storage`), once it is full.
    fn fresh_inodes(store: &Store, storage: &Path) -> std::collections::HashSet<u64> {
        store.fresh.as_ref().unwrap().wait_until_full();
        let dir = crate::fresh_files::directory(storage);
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().ino()).collect()
    }

    #[test]
    fn creates_and_mkdirs_from_fresh_files_answer_as_plain_ones() {
        let (plain_dir, plain) = store();
        let (pooled_dir, pooled) = pooled_store();
        let made = fresh_inodes(&pooled, pooled_dir.path());
        assert!(!made.is_empty(), "the pool has filled");
        let create = |path: &str, mode, exclusive| Request::Create { path: path.into(), mode, exclusive };
        let mkdir = |path: &str, mode| Request::Mkdir { path: path.into(), mode };
        let steps = [
            create("f", 0o640, true),
            create("f", 0o600, true),
            Request::Write { path: "f".into(), offset: 0, data: b"kept".to_vec() },
            create("f", 0o600, false),
            mkdir("d", 0o750),
            mkdir("d", 0o700),
            create("d", 0o644, true),
            create("d", 0o644, false),
            mkdir("f", 0o755),
            create("missing/x", 0o644, true),
            mkdir("missing/x", 0o755),
            create("f/x", 0o644, true),
            mkdir("d/e", 0o1777),
            create("d/e/g", 0o4755, true),
            Request::Symlink { path: "s".into(), target: "f".into() },
            create("s", 0o644, true),
            create("s", 0o644, false),
            mkdir("s", 0o755),
            create("../escape", 0o644, true),
        ];
        for step in &steps {
            let (a, b) = (plain.apply("u", T, step), pooled.apply("u", T, step));
            if matches!(step, Request::Create { .. } | Request::Mkdir { .. }) {
                assert_eq!(outcome(a), outcome(b), "{step:?}");
            } else {
                assert_eq!(a.is_ok(), b.is_ok(), "{step:?}");
            }
        }
        let pooled_root = pooled_dir.path().join("u");
        for (path, kind) in [("f", Kind::File), ("d", Kind::Directory), ("d/e", Kind::Directory), ("d/e/g", Kind::File)]
        {
            let meta = fs::symlink_metadata(pooled_root.join(path)).unwrap();
            assert!(made.contains(&meta.ino()), "{path} ({kind:?}) came from the pool");
        }
        assert_eq!(fs::read(pooled_root.join("f")).unwrap(), b"kept");
        let names = |root: &Path| {
            let mut names = walk(root);
            names.sort();
            names
        };
        assert_eq!(names(&pooled_root), names(&plain_dir.path().join("u")), "the same tree, nothing else");
    }

    #[test]
    fn fresh_files_someone_removed_are_dropped_and_the_pool_recovers() {
        let (dir, pooled) = pooled_store();
        for entry in fs::read_dir(crate::fresh_files::directory(dir.path())).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                fs::remove_dir(path).unwrap();
            } else {
                fs::remove_file(path).unwrap();
            }
        }
        for i in 0..300 {
            let create = Request::Create { path: format!("f{i}"), mode: 0o644, exclusive: true };
            pooled.apply("u", T, &create).unwrap();
        }
        let made = fresh_inodes(&pooled, dir.path());
        pooled.apply("u", T, &Request::Create { path: "probe".into(), mode: 0o644, exclusive: true }).unwrap();
        let probe = fs::symlink_metadata(dir.path().join("u/probe")).unwrap();
        assert!(made.contains(&probe.ino()), "creates come from the pool again");
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            found.push(path.file_name().unwrap().to_string_lossy().into_owned());
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                let dir_name = path.file_name().unwrap().to_string_lossy().into_owned();
                found.extend(walk(&path).into_iter().map(|name| format!("{dir_name}/{name}")));
            }
        }
        found
    }

    #[test]
    fn write_read_truncate_round_trip_with_envelope_times() {
        let (dir, s) = store();
        s.apply("u", T, &Request::Create { path: "f".into(), mode: 0o640, exclusive: true }).unwrap();
        s.apply("u", T, &Request::Write { path: "f".into(), offset: 3, data: b"abc".to_vec() }).unwrap();
        let Payload::Data(d) = s.apply("u", T, &Request::Read { path: "f".into(), offset: 0, len: 100 }).unwrap()
        else {
            panic!()
        };
        assert_eq!(d, b"\0\0\0abc");
        let Payload::Attr(a) = s
            .apply(
                "u",
                T,
                &Request::SetAttr { path: "f".into(), size: Some(2), mode: Some(0o600), atime: None, mtime: None },
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!((a.size, a.mode, a.mtime), (2, 0o600, T));
        assert_eq!(fs::read(dir.path().join("u/f")).unwrap(), b"\0\0");
    }

    #[test]
    fn a_copy_range_copies_on_the_node_up_to_the_limit_and_stops_at_the_end_of_the_source() {
        let (dir, s) = store();
        let source: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        s.user_root("u").unwrap();
        fs::write(dir.path().join("u/a"), &source).unwrap();
        fs::write(dir.path().join("u/b"), b"0123456789").unwrap();
        let copy = |from_offset, to_offset, len| Request::CopyRange {
            from: "a".into(),
            from_offset,
            to: "b".into(),
            to_offset,
            len,
        };
        let Payload::Copied { len, attr } = s.apply("u", T, &copy(7, 4, 100_000)).unwrap() else { panic!() };
        assert_eq!((len, attr.size, attr.mtime), (100_000, 100_004, T));
        let mut model = b"0123".to_vec();
        model.extend_from_slice(&source[7..100_007]);
        assert!(fs::read(dir.path().join("u/b")).unwrap() == model);
        // Past the end of the source: what there is, then nothing.
        let Payload::Copied { len, .. } = s.apply("u", T, &copy(299_990, 0, u64::MAX)).unwrap() else { panic!() };
        assert_eq!(len, 10);
        let Payload::Copied { len, .. } = s.apply("u", T, &copy(400_000, 0, 5)).unwrap() else { panic!() };
        assert_eq!(len, 0);
        // A missing source, a directory, and a path out of the user's root.
        let missing = Request::CopyRange { from: "nope".into(), from_offset: 0, to: "b".into(), to_offset: 0, len: 1 };
        assert_eq!(code(s.apply("u", T, &missing)), ErrorCode::NotFound);
        s.apply("u", T, &Request::Mkdir { path: "d".into(), mode: 0o755 }).unwrap();
        let into_dir = Request::CopyRange { from: "a".into(), from_offset: 0, to: "d".into(), to_offset: 0, len: 1 };
        assert_eq!(code(s.apply("u", T, &into_dir)), ErrorCode::IsDir);
        let escape = Request::CopyRange { from: "../x".into(), from_offset: 0, to: "b".into(), to_offset: 0, len: 1 };
        assert!(s.apply("u", T, &escape).is_err());
    }

    #[test]
    fn a_fifo_in_the_data_root_does_not_stall_reads() {
        let (dir, s) = store();
        s.user_root("u").unwrap();
        let fifo = std::ffi::CString::new(dir.path().join("u/fifo").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let (done, answered) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let read = Request::Read { path: "fifo".into(), offset: 0, len: 10 };
            let files = Request::ReadFiles { paths: vec!["fifo".into()] };
            done.send((s.apply("u", T, &read).is_ok(), s.apply("u", T, &files).is_ok())).unwrap();
        });
        answered.recv_timeout(Duration::from_secs(10)).expect("a read of a FIFO is answered");
    }

    #[test]
    fn read_files_answers_small_files_whole_in_order_within_a_budget() {
        let (dir, s) = store();
        s.user_root("u").unwrap();
        fs::write(dir.path().join("u/a"), b"alpha").unwrap();
        fs::write(dir.path().join("u/big"), vec![1; MAX_SMALL_FILE_BYTES + 1]).unwrap();
        s.apply("u", T, &Request::Mkdir { path: "d".into(), mode: 0o755 }).unwrap();
        let paths = ["a", "nope", "big", "d", "../x"].map(String::from).to_vec();
        let Payload::Files(files) = s.apply("u", T, &Request::ReadFiles { paths }).unwrap() else { panic!() };
        let codes: Vec<_> = files.iter().map(|f| f.as_ref().err().copied()).collect();
        assert_eq!(
            codes[1..],
            [Some(ErrorCode::NotFound), Some(ErrorCode::TooLarge), Some(ErrorCode::IsDir), Some(ErrorCode::Invalid)]
        );
        let alpha = files[0].as_ref().unwrap();
        assert_eq!((alpha.data.as_slice(), alpha.attr.size), (&b"alpha"[..], 5));
        // The budget: a later file that would pass it, and all after, are left out.
        let full = MAX_SMALL_FILE_BYTES;
        let count = MAX_READ_FILES_BYTES / full + 2;
        for i in 0..count {
            fs::write(dir.path().join(format!("u/f{i}")), vec![2; full]).unwrap();
        }
        let paths: Vec<String> = (0..count).map(|i| format!("f{i}")).collect();
        let Payload::Files(files) = s.apply("u", T, &Request::ReadFiles { paths }).unwrap() else { panic!() };
        assert_eq!(files.len(), MAX_READ_FILES_BYTES / full);
        let too_many = vec!["a".to_string(); MAX_READ_FILES + 1];
        assert_eq!(code(s.apply("u", T, &Request::ReadFiles { paths: too_many })), ErrorCode::TooLarge);
    }

    #[test]
    fn a_copy_range_copies_at_most_max_copy_bytes() {
        let (dir, s) = store();
        s.user_root("u").unwrap();
        let big = fs::File::create(dir.path().join("u/a")).unwrap();
        big.set_len(MAX_COPY_BYTES + 4096).unwrap();
        fs::write(dir.path().join("u/b"), b"").unwrap();
        let copy = Request::CopyRange { from: "a".into(), from_offset: 0, to: "b".into(), to_offset: 0, len: u64::MAX };
        let Payload::Copied { len, attr } = s.apply("u", T, &copy).unwrap() else { panic!() };
        assert_eq!((len, attr.size), (MAX_COPY_BYTES, MAX_COPY_BYTES));
    }

    #[test]
    fn posix_errors_come_back_as_codes() {
        let (_d, s) = store();
        s.apply("u", T, &Request::Mkdir { path: "d".into(), mode: 0o755 }).unwrap();
        s.apply("u", T, &Request::Create { path: "d/x".into(), mode: 0o644, exclusive: true }).unwrap();
        assert_eq!(code(s.apply("u", T, &Request::Rmdir { path: "d".into() })), ErrorCode::NotEmpty);
        assert_eq!(code(s.apply("u", T, &Request::Mkdir { path: "d".into(), mode: 0o755 })), ErrorCode::Exists);
        assert_eq!(code(s.apply("u", T, &Request::GetAttr { path: "nope".into() })), ErrorCode::NotFound);
        assert_eq!(code(s.apply("u", T, &Request::Unlink { path: "d".into() })), ErrorCode::IsDir);
        assert_eq!(
            code(s.apply("u", T, &Request::Create { path: "d/x".into(), mode: 0o644, exclusive: true })),
            ErrorCode::Exists
        );
        assert_eq!(code(s.apply("u", T, &Request::GetAttr { path: "../v".into() })), ErrorCode::Invalid);
        s.apply("u", T, &Request::Create { path: "y".into(), mode: 0o644, exclusive: true }).unwrap();
        let no_replace = Request::Rename { from: "y".into(), to: "d/x".into(), mode: RenameMode::NoReplace };
        assert_eq!(code(s.apply("u", T, &no_replace)), ErrorCode::Exists);
    }

    #[test]
    fn symlinks_never_lead_out_of_the_user_root() {
        let (dir, s) = store();
        fs::create_dir_all(dir.path().join("other")).unwrap();
        fs::write(dir.path().join("other/secret"), b"s").unwrap();
        s.user_root("u").unwrap();
        std::os::unix::fs::symlink("../other", dir.path().join("u/link")).unwrap();
        std::os::unix::fs::symlink("../other/secret", dir.path().join("u/file")).unwrap();
        let read = |p: &str| Request::Read { path: p.into(), offset: 0, len: 10 };
        assert_eq!(code(s.apply("u", T, &read("link/secret"))), ErrorCode::AccessDenied);
        assert_eq!(code(s.apply("u", T, &read("file"))), ErrorCode::AccessDenied);
        let write = Request::Write { path: "file".into(), offset: 0, data: b"x".to_vec() };
        assert_eq!(code(s.apply("u", T, &write)), ErrorCode::AccessDenied);
        assert_eq!(fs::read(dir.path().join("other/secret")).unwrap(), b"s");
    }

    #[test]
    fn a_directory_whose_entries_change_takes_the_request_time_as_its_mtime() {
        let (_dir, s) = store();
        let at = |secs| Timestamp { secs, nanos: 7 };
        let mtime = |path: &str| {
            let Payload::Attr(attr) = s.apply("u", T, &Request::GetAttr { path: path.into() }).unwrap() else {
                panic!()
            };
            attr.mtime
        };
        let steps: [(Request, &[&str]); 7] = [
            (Request::Mkdir { path: "a".into(), mode: 0o755 }, &[""]),
            (Request::Mkdir { path: "b".into(), mode: 0o755 }, &[""]),
            (Request::Create { path: "a/f".into(), mode: 0o644, exclusive: true }, &["a"]),
            (Request::Symlink { path: "a/l".into(), target: "f".into() }, &["a"]),
            (Request::Rename { from: "a/f".into(), to: "b/f".into(), mode: RenameMode::Replace }, &["a", "b"]),
            (Request::Unlink { path: "b/f".into() }, &["b"]),
            (Request::Rmdir { path: "b".into() }, &[""]),
        ];
        for (i, (request, changed)) in steps.into_iter().enumerate() {
            let now = at(1_000 + i as i64);
            s.apply("u", now, &request).unwrap();
            for dir in changed {
                assert_eq!(mtime(dir), now, "{} changes {dir:?}", request.name());
            }
        }
        assert_eq!(mtime("a"), at(1_004), "a's last change was the rename out of it");
        let reopen = Request::Create { path: "a/l2".into(), mode: 0o644, exclusive: false };
        s.apply("u", at(2_000), &reopen).unwrap();
        s.apply("u", at(3_000), &reopen).unwrap();
        assert_eq!(mtime("a"), at(2_000), "opening an existing name changes no entry");
    }

    #[test]
    fn pipes_and_socket_names_are_made_with_their_mode_and_time_and_devices_are_refused() {
        let (dir, s) = store();
        let node = |path: &str, kind| Request::MakeNode { path: path.into(), kind, mode: 0o640 };
        for (path, kind) in [("pipe", FileKind::Fifo), ("sock", FileKind::Socket)] {
            let Payload::Attr(attr) = s.apply("u", T, &node(path, kind)).unwrap() else { panic!() };
            assert_eq!((attr.kind, attr.mode, attr.mtime), (kind, 0o640, T), "{path}");
            let on_disk = fs::symlink_metadata(dir.path().join("u").join(path)).unwrap().file_type();
            assert!(on_disk.is_fifo() || on_disk.is_socket());
            assert_eq!(code(s.apply("u", T, &node(path, kind))), ErrorCode::Exists);
            let chmod = Request::SetAttr { path: path.into(), size: None, mode: Some(0o600), atime: None, mtime: None };
            let Payload::Attr(attr) = s.apply("u", T, &chmod).unwrap() else { panic!() };
            assert_eq!(attr.mode, 0o600, "{path} is never opened to change its mode");
            let old = Timestamp { secs: 1_000_000, nanos: 0 };
            let touch = Request::SetAttr {
                path: path.into(),
                size: None,
                mode: None,
                atime: None,
                mtime: Some(SetTime::At(old)),
            };
            let Payload::Attr(attr) = s.apply("u", T, &touch).unwrap() else { panic!() };
            assert_eq!(attr.mtime, old);
            let truncate = Request::SetAttr { path: path.into(), size: Some(0), mode: None, atime: None, mtime: None };
            assert_eq!(code(s.apply("u", T, &truncate)), ErrorCode::Invalid);
        }
        let read = Request::Read { path: "pipe".into(), offset: 0, len: 10 };
        assert!(s.apply("u", T, &read).is_err(), "a pipe's bytes are never read here, and the attempt does not block");
        for kind in [FileKind::Other, FileKind::File, FileKind::Directory, FileKind::Symlink] {
            assert_eq!(code(s.apply("u", T, &node("dev", kind))), ErrorCode::NotPermitted, "{kind:?}");
        }
        assert!(fs::symlink_metadata(dir.path().join("u/dev")).is_err());
    }

    #[test]
    fn deleted_and_replaced_files_go_to_the_trash_under_their_path_and_time_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(dir.path()).unwrap().with_trash(2);
        let user = dir.path().join("u");
        // 2026-12-06T19:55:01.000000007Z
        let at = |secs: i64| Timestamp { secs: 1_796_586_901 + secs, nanos: 7 };
        let write = |path: &str, data: &[u8], now| {
            let create = Request::Create { path: path.into(), mode: 0o640, exclusive: false };
            s.apply("u", now, &create).unwrap();
            s.apply("u", now, &Request::Write { path: path.into(), offset: 0, data: data.to_vec() }).unwrap();
        };
        s.apply("u", at(0), &Request::Mkdir { path: "d".into(), mode: 0o755 }).unwrap();
        write("d/f", b"first", at(0));
        s.apply("u", at(1), &Request::Unlink { path: "d/f".into() }).unwrap();
        let kept = user.join(".trash/2026-12-06T19/d/f@19.55.02.000000007");
        assert_eq!(fs::read(&kept).unwrap(), b"first");
        assert_eq!(fs::metadata(&kept).unwrap().mode() & 0o777, 0o640, "moved, not copied");
        assert!(!user.join("d/f").exists());

        write("d/f", b"second", at(2));
        write("d/f.tmp", b"third", at(3));
        let save = Request::Rename { from: "d/f.tmp".into(), to: "d/f".into(), mode: RenameMode::Replace };
        s.apply("u", at(3), &save).unwrap();
        assert_eq!(fs::read(user.join("d/f")).unwrap(), b"third");
        assert_eq!(fs::read(user.join(".trash/2026-12-06T19/d/f@19.55.04.000000007")).unwrap(), b"second");
        write("d/g", b"twice", at(3));
        s.apply("u", at(3), &Request::Unlink { path: "d/g".into() }).unwrap();
        write("d/g", b"again", at(3));
        s.apply("u", at(3), &Request::Unlink { path: "d/g".into() }).unwrap();
        let bucket = user.join(".trash/2026-12-06T19/d");
        assert_eq!(fs::read(bucket.join("g@19.55.04.000000007")).unwrap(), b"twice");
        assert_eq!(fs::read(bucket.join("g@19.55.04.000000007-2")).unwrap(), b"again", "one time, two versions");

        s.apply("u", at(4), &Request::Mkdir { path: "e".into(), mode: 0o755 }).unwrap();
        let dir_over_file = Request::Rename { from: "e".into(), to: "d/f".into(), mode: RenameMode::Replace };
        assert_eq!(code(s.apply("u", at(4), &dir_over_file)), ErrorCode::NotDir);
        assert_eq!(fs::read(user.join("d/f")).unwrap(), b"third", "a failing rename leaves the file in place");
        let purge = Request::Unlink { path: ".trash/2026-12-06T19/d/f@19.55.02.000000007".into() };
        s.apply("u", at(5), &purge).unwrap();
        assert!(!kept.exists() && !user.join(".trash/2026-12-06T20").exists(), "deleting in the trash frees the space");

        s.apply("u", at(6), &Request::Symlink { path: "l".into(), target: "d/f".into() }).unwrap();
        s.apply("u", at(6), &Request::Unlink { path: "l".into() }).unwrap();
        assert!(fs::symlink_metadata(user.join("l")).is_err(), "links are removed, not kept");

        let empty = |secs| Request::SetAttr {
            path: "d/f".into(),
            size: Some(0),
            mode: None,
            atime: None,
            mtime: Some(SetTime::At(at(secs))),
        };
        let tag = Request::SetXattr {
            path: "d/f".into(),
            name: "user.tag".into(),
            value: b"kept".to_vec(),
            mode: XattrMode::Either,
        };
        s.apply("u", at(7), &tag).unwrap();
        let Payload::Attr(attr) = s.apply("u", at(7), &empty(7)).unwrap() else { panic!() };
        assert_eq!((attr.size, attr.mode, attr.mtime), (0, 0o640, at(7)), "an empty file with the old mode");
        assert_eq!(sys::get_xattr(&user.join("d/f"), "user.tag").unwrap(), b"kept", "and the old attributes");
        assert_eq!(sys::get_xattr(&bucket.join("f@19.55.08.000000007"), "user.tag").unwrap(), b"kept");
        assert_eq!(fs::read(bucket.join("f@19.55.08.000000007")).unwrap(), b"third", "emptying keeps the old bytes");
        s.apply("u", at(8), &empty(8)).unwrap();
        assert!(!bucket.join("f@19.55.09.000000007").exists(), "an empty file leaves no version");

        // Three hours on, the 19:00 bucket is past its two hours and goes.
        fs::create_dir(user.join(".trash/keep-me")).unwrap();
        write("h", b"later", at(3 * 3600));
        s.apply("u", at(3 * 3600), &Request::Unlink { path: "h".into() }).unwrap();
        assert!(!user.join(".trash/2026-12-06T19").exists());
        assert!(user.join(".trash/2026-12-06T22/h@22.55.01.000000007").exists());
        assert!(user.join(".trash/keep-me").exists(), "only buckets are swept");

        // A user's own .trash that leads elsewhere is never followed.
        fs::remove_dir_all(user.join(".trash")).unwrap();
        fs::create_dir(dir.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink("../elsewhere", user.join(".trash")).unwrap();
        write("x", b"x", at(4 * 3600));
        s.apply("u", at(4 * 3600), &Request::Unlink { path: "x".into() }).unwrap();
        assert!(!user.join("x").exists(), "removed as asked");
        assert_eq!(fs::read_dir(dir.path().join("elsewhere")).unwrap().count(), 0);
    }

    #[test]
    fn links_a_user_makes_are_kept_as_given_and_never_followed() {
        let (dir, s) = store();
        fs::create_dir_all(dir.path().join("other")).unwrap();
        fs::write(dir.path().join("other/secret"), b"s").unwrap();
        let link = |path: &str, target: &str| Request::Symlink { path: path.into(), target: target.into() };
        let Payload::Attr(attr) = s.apply("u", T, &link("esc", "../other")).unwrap() else { panic!() };
        assert_eq!((attr.kind, attr.size, attr.mtime), (FileKind::Symlink, 8, T));
        s.apply("u", T, &link("abs", &dir.path().join("other/secret").to_string_lossy())).unwrap();
        let read_link = s.apply("u", T, &Request::ReadLink { path: "esc".into() }).unwrap();
        assert_eq!(read_link, Payload::LinkTarget("../other".into()));
        let read = |p: &str| Request::Read { path: p.into(), offset: 0, len: 10 };
        assert_eq!(code(s.apply("u", T, &read("esc/secret"))), ErrorCode::AccessDenied);
        assert_eq!(code(s.apply("u", T, &read("abs"))), ErrorCode::AccessDenied);
        let create = Request::Create { path: "esc/new".into(), mode: 0o644, exclusive: true };
        assert_eq!(code(s.apply("u", T, &create)), ErrorCode::AccessDenied);
        let create = Request::Create { path: "abs".into(), mode: 0o644, exclusive: false };
        assert_eq!(code(s.apply("u", T, &create)), ErrorCode::AccessDenied);
        let truncate = Request::SetAttr { path: "abs".into(), size: Some(0), mode: None, atime: None, mtime: None };
        assert_eq!(code(s.apply("u", T, &truncate)), ErrorCode::Invalid);
        let chmod = Request::SetAttr { path: "abs".into(), size: None, mode: Some(0o777), atime: None, mtime: None };
        assert_eq!(code(s.apply("u", T, &chmod)), ErrorCode::NotPermitted);
        let old = Timestamp { secs: 1_000_000, nanos: 0 };
        let touch =
            Request::SetAttr { path: "abs".into(), size: None, mode: None, atime: None, mtime: Some(SetTime::At(old)) };
        let Payload::Attr(attr) = s.apply("u", T, &touch).unwrap() else { panic!() };
        assert_eq!((attr.kind, attr.mtime), (FileKind::Symlink, old), "the link's own time");
        let secret = fs::metadata(dir.path().join("other/secret")).unwrap();
        assert_eq!((secret.len(), secret.mode() & 0o777 != 0o777), (1, true), "the target is untouched");
        assert_ne!(secret.mtime(), old.secs);
        assert_eq!(code(s.apply("u", T, &Request::ReadLink { path: "abs/x".into() })), ErrorCode::AccessDenied);
        s.apply("u", T, &Request::Create { path: "plain".into(), mode: 0o644, exclusive: true }).unwrap();
        assert_eq!(code(s.apply("u", T, &Request::ReadLink { path: "plain".into() })), ErrorCode::Invalid);
        assert_eq!(code(s.apply("u", T, &link("plain", "x"))), ErrorCode::Exists);
        assert_eq!(code(s.apply("u", T, &link("e", ""))), ErrorCode::NotFound);
        assert_eq!(code(s.apply("u", T, &link("n", "a\0b"))), ErrorCode::Invalid);
        assert_eq!(code(s.apply("u", T, &link("l", &"x".repeat(4097)))), ErrorCode::NameTooLong);
        s.apply("u", T, &Request::Unlink { path: "esc".into() }).unwrap();
        assert!(dir.path().join("other/secret").exists(), "unlinking a link removes only the link");
    }

    #[test]
    fn a_hard_link_is_one_file_under_two_names_and_is_never_moved_to_the_trash() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(dir.path()).unwrap().with_trash(2);
        let user = dir.path().join("u");
        let link = |from: &str, to: &str| Request::Link { from: from.into(), to: to.into() };
        let attr = |path: &str| {
            let Payload::Attr(attr) = s.apply("u", T, &Request::GetAttr { path: path.into() }).unwrap() else {
                panic!()
            };
            attr
        };
        s.apply("u", T, &Request::Create { path: "a".into(), mode: 0o600, exclusive: true }).unwrap();
        s.apply("u", T, &Request::Write { path: "a".into(), offset: 0, data: b"one".to_vec() }).unwrap();
        s.apply("u", T, &Request::Mkdir { path: "d".into(), mode: 0o755 }).unwrap();
        let later = Timestamp { secs: T.secs + 60, nanos: 0 };
        let Payload::Attr(linked) = s.apply("u", later, &link("a", "d/b")).unwrap() else { panic!() };
        assert_eq!((linked.kind, linked.size, linked.mode, linked.nlink), (FileKind::File, 3, 0o600, 2));
        assert_eq!(attr("d").mtime, later, "the new name's directory is stamped");
        assert!(attr("a").has_other_names() && attr("d/b").has_other_names());
        s.apply("u", T, &Request::Write { path: "d/b".into(), offset: 3, data: b" two".to_vec() }).unwrap();
        assert_eq!(fs::read(user.join("a")).unwrap(), b"one two", "written through one name, read through the other");

        assert_eq!(code(s.apply("u", T, &link("a", "d/b"))), ErrorCode::Exists);
        assert_eq!(code(s.apply("u", T, &link("nope", "c"))), ErrorCode::NotFound);
        assert_eq!(code(s.apply("u", T, &link("d", "e"))), ErrorCode::NotPermitted, "no links to directories");
        assert_eq!(code(s.apply("u", T, &link("a", "../v/x"))), ErrorCode::Invalid);
        s.apply("u", T, &Request::Symlink { path: "sym".into(), target: "a".into() }).unwrap();
        let Payload::Attr(linked) = s.apply("u", T, &link("sym", "sym2")).unwrap() else { panic!() };
        assert_eq!((linked.kind, linked.nlink), (FileKind::Symlink, 2), "the symlink itself, not what it names");

        let empty = Request::SetAttr { path: "a".into(), size: Some(0), mode: None, atime: None, mtime: None };
        s.apply("u", T, &empty).unwrap();
        assert_eq!(fs::read(user.join("d/b")).unwrap(), b"", "emptied in place, under both names");
        s.apply("u", T, &Request::Write { path: "a".into(), offset: 0, data: b"three".to_vec() }).unwrap();
        s.apply("u", T, &Request::Unlink { path: "a".into() }).unwrap();
        assert_eq!(fs::read(user.join("d/b")).unwrap(), b"three");
        assert_eq!(attr("d/b").nlink, 1);
        assert!(!user.join(".trash").exists(), "a file with another name is never moved to the trash");
    }

    /// Both names of a linked file carry one identity, which two replicas
    /// applying the same requests give alike; users never see it.
    #[test]
    fn a_linked_file_has_one_identity_under_every_name_on_every_replica() {
        let (first, second) = (store(), store());
        let identities = [&first.1, &second.1].map(|s| {
            s.apply("u", T, &Request::Create { path: "a".into(), mode: 0o644, exclusive: true }).unwrap();
            s.apply("u", T, &Request::Mkdir { path: "d".into(), mode: 0o755 }).unwrap();
            let Payload::Attr(lone) = s.apply("u", T, &Request::GetAttr { path: "a".into() }).unwrap() else {
                panic!()
            };
            assert_eq!(lone.link, None, "a file with one name has none");
            let Payload::Attr(linked) = s.apply("u", T, &Request::Link { from: "a".into(), to: "d/b".into() }).unwrap()
            else {
                panic!()
            };
            let Payload::Entries { entries, .. } =
                s.apply("u", T, &Request::ReadDir { path: "".into(), after: None }).unwrap()
            else {
                panic!()
            };
            let listed = entries.iter().find(|e| e.name == "a").unwrap().attr.link;
            let Payload::Tree(tree) = s.apply("u", T, &Request::ReadTree { path: "d".into() }).unwrap() else {
                panic!()
            };
            assert_eq!(tree[0].entries[0].attr.link, linked.link, "listings carry it too");
            // A third name keeps the identity the second gave.
            s.apply("u", T, &Request::Link { from: "d/b".into(), to: "c".into() }).unwrap();
            let Payload::Attr(third) = s.apply("u", T, &Request::GetAttr { path: "c".into() }).unwrap() else {
                panic!()
            };
            assert!(linked.link.is_some());
            assert_eq!((listed, third.link), (linked.link, linked.link));
            let Payload::XattrNames(names) = s.apply("u", T, &Request::ListXattrs { path: "a".into() }).unwrap() else {
                panic!()
            };
            assert!(names.is_empty(), "{names:?}");
            let set = Request::SetXattr {
                path: "a".into(),
                name: LINK_XATTR.into(),
                value: vec![1],
                mode: XattrMode::Either,
            };
            assert_eq!(code(s.apply("u", T, &set)), ErrorCode::NotSupported);
            linked.link
        });
        assert_eq!(identities[0], identities[1]);
    }

    #[test]
    fn user_extended_attributes_are_kept_on_the_file_and_other_namespaces_refused() {
        let (dir, s) = store();
        s.apply("u", T, &Request::Create { path: "f".into(), mode: 0o644, exclusive: true }).unwrap();
        let set = |name: &str, value: &[u8], mode| Request::SetXattr {
            path: "f".into(),
            name: name.into(),
            value: value.to_vec(),
            mode,
        };
        let get = |name: &str| Request::GetXattr { path: "f".into(), name: name.into() };
        let list = Request::ListXattrs { path: "f".into() };
        assert_eq!(code(s.apply("u", T, &get("user.k"))), ErrorCode::NoAttribute);
        assert_eq!(code(s.apply("u", T, &set("user.k", b"v", XattrMode::Replace))), ErrorCode::NoAttribute);
        s.apply("u", T, &set("user.k", b"v1", XattrMode::Create)).unwrap();
        assert_eq!(code(s.apply("u", T, &set("user.k", b"v2", XattrMode::Create))), ErrorCode::Exists);
        s.apply("u", T, &set("user.k", b"v2", XattrMode::Replace)).unwrap();
        s.apply("u", T, &set("user.empty", b"", XattrMode::Either)).unwrap();
        assert_eq!(s.apply("u", T, &get("user.k")).unwrap(), Payload::Xattr(b"v2".to_vec()));
        assert_eq!(s.apply("u", T, &get("user.empty")).unwrap(), Payload::Xattr(Vec::new()));
        // Kept as real attributes of the user's file, for admins' tools too.
        assert_eq!(sys::get_xattr(&dir.path().join("u/f"), "user.k").unwrap(), b"v2");
        let Payload::XattrNames(mut names) = s.apply("u", T, &list).unwrap() else { panic!() };
        names.sort();
        assert_eq!(names, ["user.empty", "user.k"]);
        s.apply("u", T, &Request::RemoveXattr { path: "f".into(), name: "user.k".into() }).unwrap();
        let remove_again = Request::RemoveXattr { path: "f".into(), name: "user.k".into() };
        assert_eq!(code(s.apply("u", T, &remove_again)), ErrorCode::NoAttribute);
        for name in ["security.capability", "trusted.x", "system.posix_acl_access", "user.", "k"] {
            assert_eq!(code(s.apply("u", T, &set(name, b"v", XattrMode::Either))), ErrorCode::NotSupported, "{name}");
            assert_eq!(code(s.apply("u", T, &get(name))), ErrorCode::NotSupported, "{name}");
        }
        let long = format!("user.{}", "n".repeat(MAX_XATTR_NAME_BYTES));
        assert_eq!(code(s.apply("u", T, &set(&long, b"v", XattrMode::Either))), ErrorCode::NameTooLong);
        let huge = vec![0u8; MAX_XATTR_VALUE_BYTES + 1];
        assert_eq!(code(s.apply("u", T, &set("user.h", &huge, XattrMode::Either))), ErrorCode::TooLarge);
        assert_eq!(code(s.apply("u", T, &set("user.nul\0", b"v", XattrMode::Either))), ErrorCode::Invalid);
        let hostile = Request::GetXattr { path: "../v/f".into(), name: "user.k".into() };
        assert!(s.apply("u", T, &hostile).is_err());
        // A symlink's own attributes, never its target's.
        s.apply("u", T, &Request::Symlink { path: "l".into(), target: "f".into() }).unwrap();
        let via_link = Request::GetXattr { path: "l".into(), name: "user.empty".into() };
        assert_eq!(code(s.apply("u", T, &via_link)), ErrorCode::NoAttribute);
    }

    #[test]
    fn fallocate_reserves_zeroes_and_punches_with_the_request_time_as_mtime() {
        let (dir, s) = store();
        let allocate = |offset, len, mode| Request::Allocate { path: "f".into(), offset, len, mode };
        let attr = |r: StoreResult<Payload>| match r.unwrap() {
            Payload::Attr(attr) => attr,
            other => panic!("{other:?}"),
        };
        assert_eq!(code(s.apply("u", T, &allocate(0, 1, AllocateMode::Extend))), ErrorCode::NotFound);
        s.apply("u", T, &Request::Create { path: "f".into(), mode: 0o644, exclusive: true }).unwrap();
        s.apply("u", T, &Request::Write { path: "f".into(), offset: 0, data: vec![7; 8192] }).unwrap();
        let later = |secs| Timestamp { secs: T.secs + secs, nanos: 0 };
        let reserved = attr(s.apply("u", later(1), &allocate(0, 1 << 20, AllocateMode::Extend)));
        assert_eq!((reserved.size, reserved.mtime), (1 << 20, later(1)));
        assert!(reserved.blocks * 512 >= 1 << 20);
        let kept = attr(s.apply("u", later(2), &allocate(0, 4 << 20, AllocateMode::KeepSize)));
        assert_eq!((kept.size, kept.mtime), (1 << 20, later(2)), "the size stays; the mtime moves, as locally");
        let punched = attr(s.apply("u", later(3), &allocate(4096, 2048, AllocateMode::PunchHole)));
        assert_eq!((punched.size, punched.mtime), (1 << 20, later(3)));
        attr(s.apply("u", later(4), &allocate(8000, 100, AllocateMode::ZeroRangeKeepSize)));
        let bytes = fs::read(dir.path().join("u/f")).unwrap();
        assert!(bytes[..4096].iter().all(|&b| b == 7) && bytes[4096..6144].iter().all(|&b| b == 0));
        assert!(bytes[6144..8000].iter().all(|&b| b == 7) && bytes[8000..8100].iter().all(|&b| b == 0));
        assert!(bytes[8100..8192].iter().all(|&b| b == 7) && bytes[8192..].iter().all(|&b| b == 0));
        let grown = attr(s.apply("u", later(5), &allocate(2 << 20, 10, AllocateMode::ZeroRange)));
        assert_eq!(grown.size, (2 << 20) + 10);
        assert_eq!(code(s.apply("u", T, &allocate(u64::MAX, 1, AllocateMode::Extend))), ErrorCode::TooLarge);
        s.apply("u", T, &Request::Mkdir { path: "d".into(), mode: 0o755 }).unwrap();
        let on_dir = Request::Allocate { path: "d".into(), offset: 0, len: 1, mode: AllocateMode::Extend };
        assert_eq!(code(s.apply("u", T, &on_dir)), ErrorCode::IsDir);
    }

    #[test]
    fn a_tree_lists_directories_depth_first_within_one_page_and_never_follows_symlinks() {
        let (dir, s) = store();
        for d in ["t/b", "t/a/y", "t/a/x", "t/b/z"] {
            fs::create_dir_all(dir.path().join("u").join(d)).unwrap();
        }
        fs::write(dir.path().join("u/t/a/x/f"), b"f").unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("u/t/c")).unwrap();
        let tree = |path: &str| {
            let Payload::Tree(listings) = s.apply("u", T, &Request::ReadTree { path: path.into() }).unwrap() else {
                panic!()
            };
            listings
        };
        let listings = tree("t");
        let paths: Vec<&str> = listings.iter().map(|l| l.path.as_str()).collect();
        assert_eq!(paths, ["t", "t/a", "t/a/x", "t/a/y", "t/b", "t/b/z"], "c is a symlink, listed but not followed");
        let paths_from_a: Vec<String> = tree("t/a").into_iter().map(|l| l.path).collect();
        assert_eq!(paths_from_a, ["t/a", "t/a/x", "t/a/y", "t/b", "t/b/z"], "the walk goes on to a's later siblings");
        let paths_from_b: Vec<String> = tree("t/b").into_iter().map(|l| l.path).collect();
        assert_eq!(paths_from_b, ["t/b", "t/b/z"], "a's tree comes before b's");
        let names = |l: &Listing| l.entries.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&listings[0]), ["a", "b", "c"]);
        assert_eq!(names(&listings[2]), ["f"]);
        assert!(listings.iter().all(|l| !l.more));
        assert_eq!(code(s.apply("u", T, &Request::ReadTree { path: "t/c".into() })), ErrorCode::NotDir);

        // Within one page: a directory that would pass it ends the answer.
        let per_dir = READDIR_PAGE_BYTES / entry_cost("file-0000") / 3;
        for d in ["big/1", "big/2", "big/3", "big/4"] {
            fs::create_dir_all(dir.path().join("u").join(d)).unwrap();
            for i in 0..per_dir {
                fs::write(dir.path().join("u").join(d).join(format!("file-{i:04}")), b"").unwrap();
            }
        }
        let listings = tree("big");
        let paths: Vec<&str> = listings.iter().map(|l| l.path.as_str()).collect();
        assert_eq!(paths, ["big", "big/1", "big/2"]);
        assert!(listings[1..].iter().all(|l| l.entries.len() == per_dir));
        // A directory larger than a page alone: its first page, as ReadDir gives it.
        for i in 0..READDIR_PAGE_BYTES / entry_cost("file-0000") {
            fs::write(dir.path().join("u/big/4").join(format!("more-{i:04}")), b"").unwrap();
        }
        let listings = tree("big/4");
        assert_eq!(listings.len(), 1);
        assert!(listings[0].more);
        let Payload::Entries { entries, more } =
            s.apply("u", T, &Request::ReadDir { path: "big/4".into(), after: None }).unwrap()
        else {
            panic!()
        };
        assert_eq!((entries, more), (listings[0].entries.clone(), true));
    }

    #[test]
    fn listing_pages_cover_every_entry_once() {
        let (_d, s) = store();
        for i in 0..3000 {
            s.apply(
                "u",
                T,
                &Request::Create { path: format!("file-with-a-long-name-{i:05}"), mode: 0o644, exclusive: true },
            )
            .unwrap();
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let Payload::Entries { entries, more } =
                s.apply("u", T, &Request::ReadDir { path: "".into(), after: after.clone() }).unwrap()
            else {
                panic!()
            };
            after = entries.last().map(|e| e.name.clone());
            seen.extend(entries.into_iter().map(|e| e.name));
            if !more {
                break;
            }
        }
        assert_eq!(seen.len(), 3000);
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
    }
}
