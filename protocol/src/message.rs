//! Envelope, requests and replies.
//!
//! Paths are relative to the user's root, `/`-separated, with `""` meaning
//! the root itself. The server validates every path; the client is never
//! trusted. Every mutating request carries its time in the envelope so
//! that applying it twice (a replay on a replica) gives the same result.

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// Wall-clock time as seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

/// The offset of a [`Request::Write`] that appends (`O_APPEND`): the
/// storage node writes the bytes at the end the file has when it applies
/// the request, so appends from several mounts, in whatever order they
/// reach the log, never overwrite each other. An append never travels in a
/// [`Request::Batch`].
pub const APPEND_AT_END: u64 = u64::MAX;

/// What travels on `dfos.requests`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u16,
    /// Unique per mount; the reply carries it back.
    pub request_id: u64,
    /// Topic the storage daemons answer on (`dfos.reply.<mount-id>`).
    pub reply_to: String,
    pub user: String,
    /// Empty for [`Request::Login`]; otherwise the token Login returned.
    pub token: String,
    pub client_time: Timestamp,
    pub request: Request,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RenameMode {
    /// POSIX rename(2): an existing target is replaced when compatible.
    Replace,
    /// renameat2(RENAME_NOREPLACE): fail with Exists if the target exists.
    NoReplace,
    /// renameat2(RENAME_EXCHANGE): both names must exist; they swap what
    /// they name, atomically, whatever kinds those are.
    Exchange,
}

/// What a [`Request::Allocate`] does to its range, as the fallocate(2)
/// modes that name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllocateMode {
    /// Mode 0: space is reserved, and the size grows to cover the range.
    Extend,
    /// `FALLOC_FL_KEEP_SIZE`: space is reserved; the size stays.
    KeepSize,
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: the range reads as
    /// zeros and its space is freed; the size stays.
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE`: the range reads as zeros, and the size
    /// grows to cover it.
    ZeroRange,
    /// `FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`.
    ZeroRangeKeepSize,
}

/// What a [`Request::SetXattr`] may find: setxattr(2)'s flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum XattrMode {
    /// No flag: the attribute is made or replaced.
    Either,
    /// `XATTR_CREATE`: `Exists` if the attribute is there.
    Create,
    /// `XATTR_REPLACE`: `NoAttribute` if it is not.
    Replace,
}

/// The one namespace of extended attributes dfos keeps, as NFS does
/// (RFC 8276): the others belong to the kernel of the machine holding the
/// file (`security.*`, `system.*` ACLs, `trusted.*`), and would mean
/// something else on every storage node.
pub const USER_XATTR_PREFIX: &str = "user.";

/// Names under this prefix are the storage nodes' own (a file's link
/// identity), never a user's.
pub const RESERVED_XATTR_PREFIX: &str = "user.dfos.";

/// Whether `name` is an extended attribute dfos keeps for users.
pub fn is_user_xattr(name: &str) -> bool {
    name.len() > USER_XATTR_PREFIX.len()
        && name.starts_with(USER_XATTR_PREFIX)
        && !name.starts_with(RESERVED_XATTR_PREFIX)
}

/// A time to set, either a given instant or the envelope's time ("now").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    At(Timestamp),
    Now,
}

impl SetTime {
    /// The instant meant, `now` being the envelope's time.
    pub fn at(self, now: Timestamp) -> Timestamp {
        match self {
            SetTime::At(t) => t,
            SetTime::Now => now,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Login {
        password: String,
    },
    Lookup {
        path: String,
    },
    GetAttr {
        path: String,
    },
    /// Lists `path` in name order, starting after the name `after`
    /// (the cookie). Entries carry their attributes (readdirplus).
    ReadDir {
        path: String,
        after: Option<String>,
    },
    Create {
        path: String,
        mode: u32,
        exclusive: bool,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Unlink {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Rename {
        from: String,
        to: String,
        mode: RenameMode,
    },
    Read {
        path: String,
        offset: u64,
        len: u32,
    },
    Write {
        path: String,
        /// Where the bytes go; [`APPEND_AT_END`] for an append, which
        /// the storage node places at the file's end as it applies it.
        offset: u64,
        /// Raw bytes on the wire (same encoding as a `u8` sequence, but
        /// copied in one piece instead of element by element).
        #[serde(with = "crate::file_data")]
        data: Vec<u8>,
    },
    SetAttr {
        path: String,
        size: Option<u64>,
        mode: Option<u32>,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    },
    StatFs,
    Fsync {
        path: String,
    },
    /// Like [`Request::Read`], but the node may answer with
    /// [`Payload::InLog`]: where in the request log the write that holds
    /// these very bytes is, so the mount fetches them from Kafka directly
    /// instead of having them produced into the log a second time.
    ReadFromLog {
        path: String,
        offset: u64,
        len: u32,
    },
    /// Where the bytes of `offset..offset + len` are in the request log,
    /// write by write: answered with [`Payload::Located`]. One request
    /// serves a whole read-ahead window.
    LocateInLog {
        path: String,
        offset: u64,
        len: u64,
    },
    /// Several requests in one message, applied in order as if they had
    /// come one by one (each with its own request id, which its log line
    /// and change event carry), answered with one [`Payload::Batch`]. A
    /// mount sends the requests it does not wait for (a create that went
    /// behind, unlinks of known names) together with the next one, so the
    /// broker carries one message instead of several. Never nested, never
    /// holds a login.
    Batch {
        requests: Vec<Batched>,
    },
    /// Copies up to `len` bytes (at most [`MAX_COPY_BYTES`]) of the file
    /// `from`, from `from_offset` on, into the file `to` at `to_offset`, on
    /// the storage node itself (`copy_file_range`): the bytes never cross
    /// the broker. Answered with [`Payload::Copied`]; fewer bytes than asked
    /// at the end of `from`. Never in a batch: its result depends on
    /// another file, so a batch replayed after a crash could copy bytes
    /// that a later request of the same batch had already changed.
    ///
    /// [`MAX_COPY_BYTES`]: crate::limits::MAX_COPY_BYTES
    CopyRange {
        from: String,
        from_offset: u64,
        to: String,
        to_offset: u64,
        len: u64,
    },
    /// The whole contents of several small files in one round trip, at most
    /// [`MAX_READ_FILES`] of them: answered with [`Payload::Files`], one
    /// result per path in order, until the answer holds
    /// [`MAX_READ_FILES_BYTES`] of data (later paths are left out). A file
    /// over [`MAX_SMALL_FILE_BYTES`] is answered `TooLarge`. A mount asks
    /// for the next small files of a directory it is reading through.
    ///
    /// [`MAX_READ_FILES`]: crate::limits::MAX_READ_FILES
    /// [`MAX_READ_FILES_BYTES`]: crate::limits::MAX_READ_FILES_BYTES
    /// [`MAX_SMALL_FILE_BYTES`]: crate::limits::MAX_SMALL_FILE_BYTES
    ReadFiles {
        paths: Vec<String>,
    },
    /// The listing of the directory `path`, of the directories below it, and
    /// of its later siblings and theirs: depth first in name order, as
    /// `find` and `cp -r` go on from `path`. Each listing is whole, until
    /// the next one would pass [`READDIR_PAGE_BYTES`]: answered with
    /// [`Payload::Tree`]. When `path` alone passes it, its first page is
    /// the answer, as for [`Request::ReadDir`]. A mount asks for this when
    /// a tool descends from a directory it listed into one it has not.
    ///
    /// [`READDIR_PAGE_BYTES`]: crate::limits::READDIR_PAGE_BYTES
    ReadTree {
        path: String,
    },
    /// Makes `path` a symbolic link holding `target`, stored as is (at most
    /// [`MAX_PATH_BYTES`], no NUL). Storage nodes never follow it; the
    /// kernel of a mount resolves it, as NFS clients do. Answered with the
    /// link's [`Payload::Attr`].
    ///
    /// [`MAX_PATH_BYTES`]: crate::limits::MAX_PATH_BYTES
    Symlink {
        path: String,
        target: String,
    },
    /// What the symbolic link `path` holds: answered with
    /// [`Payload::LinkTarget`], `Invalid` when `path` is not a link.
    ReadLink {
        path: String,
    },
    /// Makes `path` a named pipe or a Unix socket's name (`kind` is
    /// [`FileKind::Fifo`] or [`FileKind::Socket`]; any other is refused
    /// with `NotPermitted`, as Linux refuses devices to unprivileged
    /// users). Answered with its [`Payload::Attr`].
    MakeNode {
        path: String,
        kind: FileKind,
        mode: u32,
    },
    /// Gives the file at `from` a second name `to` (a hard link): both
    /// names are then one file, as `ln` makes on a local disk. Anything
    /// but a directory may be linked; `to` must not exist. Answered with
    /// the file's [`Payload::Attr`] (its `nlink` counts the names).
    Link {
        from: String,
        to: String,
    },
    /// fallocate(2) of `len` bytes at `offset` of the regular file `path`
    /// (see [`AllocateMode`]). Answered with the file's [`Payload::Attr`];
    /// `NotSupported` when the node's filesystem lacks the mode.
    Allocate {
        path: String,
        offset: u64,
        len: u64,
        mode: AllocateMode,
    },
    /// The value of the extended attribute `name` of `path` (never
    /// following a symlink there): answered with [`Payload::Xattr`],
    /// `NoAttribute` when it has none of that name. Only `user.` names
    /// ([`is_user_xattr`]) are kept; any other is `NotSupported`.
    GetXattr {
        path: String,
        name: String,
    },
    /// The names of `path`'s extended attributes (only `user.` ones):
    /// answered with [`Payload::XattrNames`].
    ListXattrs {
        path: String,
    },
    /// Sets the extended attribute `name` of `path` to `value` (at most
    /// [`MAX_XATTR_VALUE_BYTES`]; the name at most [`MAX_XATTR_NAME_BYTES`]).
    /// Answered with the file's [`Payload::Attr`] after it (its ctime moved).
    ///
    /// [`MAX_XATTR_VALUE_BYTES`]: crate::limits::MAX_XATTR_VALUE_BYTES
    /// [`MAX_XATTR_NAME_BYTES`]: crate::limits::MAX_XATTR_NAME_BYTES
    SetXattr {
        path: String,
        name: String,
        #[serde(with = "crate::file_data")]
        value: Vec<u8>,
        mode: XattrMode,
    },
    /// Removes the extended attribute `name` of `path`: `NoAttribute` if it
    /// has none. Answered with the file's [`Payload::Attr`] after it.
    RemoveXattr {
        path: String,
        name: String,
    },
}

/// One request of a [`Request::Batch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batched {
    pub request_id: u64,
    pub request: Request,
}

/// The one rule a batch's requests follow beyond "each as if it came
/// alone": once an exclusive create in the batch is refused (another mount
/// made the name first), every later request of the batch naming that path
/// inherits the refusal unapplied, so a loser's bytes never land in the
/// winner's file. Storage nodes apply batches by it; test doubles of the
/// transport use it too.
#[derive(Debug)]
pub struct RefusedCreates<E> {
    refused: Vec<(String, E)>,
}

impl<E: Clone> Default for RefusedCreates<E> {
    fn default() -> Self {
        RefusedCreates { refused: Vec::new() }
    }
}

impl<E: Clone> RefusedCreates<E> {
    /// The refused path `request` names and the refusal it inherits, if any.
    pub fn inherited(&self, request: &Request) -> Option<(&str, E)> {
        let (path, error) = self.refused.iter().find(|(path, _)| request.any_path(|p| p == path))?;
        Some((path, error.clone()))
    }

    /// Notes how `request` went, applied.
    pub fn record<T>(&mut self, request: &Request, result: &Result<T, E>) {
        if let (Request::Create { path, exclusive: true, .. }, Err(error)) = (request, result) {
            self.refused.push((path.clone(), error.clone()));
        }
    }
}

/// The requests that name exactly one path, binding it to `$path`: one
/// list for every match that reads or rewrites it.
macro_rules! single_path {
    ($path:ident) => {
        Request::Lookup { path: $path }
            | Request::GetAttr { path: $path }
            | Request::ReadDir { path: $path, .. }
            | Request::ReadTree { path: $path }
            | Request::Create { path: $path, .. }
            | Request::Mkdir { path: $path, .. }
            | Request::Symlink { path: $path, .. }
            | Request::ReadLink { path: $path }
            | Request::MakeNode { path: $path, .. }
            | Request::Unlink { path: $path }
            | Request::Rmdir { path: $path }
            | Request::Read { path: $path, .. }
            | Request::ReadFromLog { path: $path, .. }
            | Request::LocateInLog { path: $path, .. }
            | Request::Write { path: $path, .. }
            | Request::SetAttr { path: $path, .. }
            | Request::Allocate { path: $path, .. }
            | Request::Fsync { path: $path }
            | Request::GetXattr { path: $path, .. }
            | Request::ListXattrs { path: $path }
            | Request::SetXattr { path: $path, .. }
            | Request::RemoveXattr { path: $path, .. }
    };
}

impl Request {
    /// Short name for log lines.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Login { .. } => "login",
            Request::Lookup { .. } => "lookup",
            Request::GetAttr { .. } => "getattr",
            Request::ReadDir { .. } => "readdir",
            Request::Create { .. } => "create",
            Request::Mkdir { .. } => "mkdir",
            Request::Unlink { .. } => "unlink",
            Request::Rmdir { .. } => "rmdir",
            Request::Rename { .. } => "rename",
            Request::Read { .. } => "read",
            Request::Write { .. } => "write",
            Request::SetAttr { .. } => "setattr",
            Request::StatFs => "statfs",
            Request::Fsync { .. } => "fsync",
            Request::ReadFromLog { .. } => "read-from-log",
            Request::LocateInLog { .. } => "locate-in-log",
            Request::Batch { .. } => "batch",
            Request::CopyRange { .. } => "copy-range",
            Request::ReadFiles { .. } => "read-files",
            Request::ReadTree { .. } => "read-tree",
            Request::Symlink { .. } => "symlink",
            Request::ReadLink { .. } => "readlink",
            Request::MakeNode { .. } => "mknod",
            Request::Link { .. } => "link",
            Request::Allocate { .. } => "fallocate",
            Request::GetXattr { .. } => "getxattr",
            Request::ListXattrs { .. } => "listxattr",
            Request::SetXattr { .. } => "setxattr",
            Request::RemoveXattr { .. } => "removexattr",
        }
    }

    /// Whether applying the request changes the store. Replicas persist
    /// their applied offset after every mutation; other requests can be
    /// replayed freely.
    /// Cheap (no allocation), so it can run on every request; agrees with
    /// [`Request::change`], whose match is exhaustive (tested below).
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Request::Create { .. }
                | Request::Mkdir { .. }
                | Request::Symlink { .. }
                | Request::MakeNode { .. }
                | Request::Link { .. }
                | Request::Unlink { .. }
                | Request::Rmdir { .. }
                | Request::Rename { .. }
                | Request::Write { .. }
                | Request::SetAttr { .. }
                | Request::CopyRange { .. }
                | Request::Allocate { .. }
                | Request::SetXattr { .. }
                | Request::RemoveXattr { .. }
        ) || matches!(self, Request::Batch { requests } if requests.iter().any(|b| b.request.mutates()))
    }

    /// The main path, for log lines ("" for requests without one).
    pub fn path(&self) -> &str {
        match self {
            Request::Login { .. } | Request::StatFs | Request::Batch { .. } => "",
            single_path!(path) => path,
            Request::Rename { from, .. } => from,
            Request::CopyRange { to, .. } | Request::Link { to, .. } => to,
            Request::ReadFiles { paths } => paths.first().map_or("", String::as_str),
        }
    }
}

impl Request {
    /// The same request with every path it names passed through `f` (a
    /// batch's requests too). Everything else is kept as it is.
    pub fn map_paths(&self, f: &impl Fn(&str) -> String) -> Request {
        let mut request = self.clone();
        match &mut request {
            Request::Login { .. } | Request::StatFs => {}
            single_path!(path) => *path = f(path),
            Request::Rename { from, to, .. } | Request::CopyRange { from, to, .. } | Request::Link { from, to } => {
                *from = f(from);
                *to = f(to);
            }
            Request::ReadFiles { paths } => paths.iter_mut().for_each(|path| *path = f(path)),
            Request::Batch { requests } => {
                requests.iter_mut().for_each(|batched| batched.request = batched.request.map_paths(f))
            }
        }
        request
    }

    /// Every path the request names, its main one ([`Request::path`]) first.
    pub fn paths(&self) -> Vec<&str> {
        let mut paths = Vec::new();
        self.for_each_path(&mut |path| paths.push(path));
        paths
    }

    /// Whether any path the request names passes `check`, without
    /// collecting them: the storage node asks this of every request.
    pub fn any_path(&self, check: impl Fn(&str) -> bool) -> bool {
        let mut found = false;
        self.for_each_path(&mut |path| found = found || check(path));
        found
    }

    /// Calls `f` with every path the request names, in [`Request::paths`] order.
    fn for_each_path<'a>(&'a self, f: &mut impl FnMut(&'a str)) {
        match self {
            Request::Rename { from: first, to: second, .. }
            | Request::CopyRange { to: first, from: second, .. }
            | Request::Link { to: first, from: second } => {
                f(first);
                f(second);
            }
            Request::ReadFiles { paths } => paths.iter().for_each(|path| f(path)),
            Request::Batch { requests } => requests.iter().for_each(|b| b.request.for_each_path(f)),
            Request::Login { .. } | Request::StatFs => {}
            other => f(other.path()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    /// A device or anything else a user cannot make through dfos.
    Other,
    /// A named pipe: its bytes pass inside the kernel of the mount that
    /// opens it, never through dfos.
    Fifo,
    /// A Unix socket's name, likewise local to the mount that binds it.
    Socket,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileAttr {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits only (0o7777).
    pub mode: u32,
    pub nlink: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub blocks: u64,
    /// For a file with several names (a hard link), an identity that every
    /// storage node gives it alike: the first link made to it names it, so
    /// a mount can show all its names as one inode. `None` for every other
    /// file, and for files linked before storage nodes gave identities.
    pub link: Option<u64>,
}

impl FileAttr {
    /// A file with more than one name (a hard link): a change made through
    /// one name is not seen under the others' paths, so what is known of
    /// it by path must be asked again rather than kept.
    pub fn has_other_names(&self) -> bool {
        self.kind != FileKind::Directory && self.nlink > 1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub attr: FileAttr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsStats {
    pub block_size: u32,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_available: u64,
    pub files: u64,
    pub files_free: u64,
    pub name_max: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    LoggedIn {
        token: String,
    },
    Attr(FileAttr),
    /// One page of a listing; `more` says whether to ask again after the
    /// last name of this page.
    Entries {
        entries: Vec<DirEntry>,
        more: bool,
    },
    Data(#[serde(with = "crate::file_data")] Vec<u8>),
    /// A write applied; `attr` is the file after it.
    Written {
        attr: FileAttr,
    },
    StatFs(FsStats),
    Done,
    /// The answer to [`Request::ReadFromLog`] when the bytes are in the log.
    InLog(LogLocation),
    /// The answer to [`Request::LocateInLog`]: consecutive locations from
    /// the asked offset on, covering a prefix of the range (none when its
    /// first byte is not in the log), and the file's size as of then.
    Located {
        locations: Vec<LogLocation>,
        size: u64,
    },
    /// The answer to [`Request::Batch`]: one result per request, in order.
    Batch(Vec<Result<Payload, ErrorCode>>),
    /// The answer to [`Request::CopyRange`]: how many bytes were copied,
    /// and the destination file after the copy.
    Copied {
        len: u64,
        attr: FileAttr,
    },
    /// The answer to [`Request::ReadFiles`].
    Files(Vec<Result<FileContent, ErrorCode>>),
    /// The answer to [`Request::ReadTree`]: whole listings, the asked
    /// directory's first. Only that one can be partial (`more`), and then
    /// it is the only one.
    Tree(Vec<Listing>),
    /// The answer to [`Request::ReadLink`].
    LinkTarget(String),
    /// The answer to [`Request::GetXattr`].
    Xattr(#[serde(with = "crate::file_data")] Vec<u8>),
    /// The answer to [`Request::ListXattrs`], in the node's order.
    XattrNames(Vec<String>),
}

/// One directory of a [`Payload::Tree`], `path` relative to the user's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub path: String,
    pub entries: Vec<DirEntry>,
    pub more: bool,
}

/// A small file, whole, with its attributes as of reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileContent {
    pub attr: FileAttr,
    #[serde(with = "crate::file_data")]
    pub data: Vec<u8>,
}

/// Where file bytes already are in the request log: the data of the
/// `Write` at `partition`/`offset` of `dfos.requests`, from `skip` on,
/// `len` bytes. `request_id` and `file_offset` identify that write, so the
/// reader can check it found the message the node meant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLocation {
    pub partition: i32,
    pub offset: i64,
    pub request_id: u64,
    pub file_offset: u64,
    pub skip: u32,
    pub len: u32,
}

/// What travels on `dfos.reply.<mount-id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub request_id: u64,
    /// Which storage node answered; with replicas several may.
    pub node: String,
    pub result: Result<Payload, ErrorCode>,
}

/// One effect of a mutation, as other mounts need to hear of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Contents or attributes changed (write, truncate, chmod, utimes).
    Modified {
        path: String,
    },
    Created {
        path: String,
    },
    Removed {
        path: String,
    },
    Renamed {
        from: String,
        to: String,
    },
    /// `to` was made a second name of the file at `from`: a new entry, and
    /// `from`'s link count changed.
    Linked {
        from: String,
        to: String,
    },
    /// What `a` and `b` name was swapped (RENAME_EXCHANGE).
    Exchanged {
        a: String,
        b: String,
    },
}

/// What travels on `dfos.events` (key = user) after each applied mutation,
/// so other mounts of the same user can drop what they cached. Every
/// replica publishes it; receivers deduplicate by origin and request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub version: u16,
    pub user: String,
    /// Reply topic of the mount whose request caused it.
    pub origin: String,
    pub request_id: u64,
    pub change: Change,
}

impl Request {
    /// The change this request makes once applied successfully.
    pub fn change(&self) -> Option<Change> {
        match self {
            Request::Write { path, .. }
            | Request::SetAttr { path, .. }
            | Request::Allocate { path, .. }
            | Request::SetXattr { path, .. }
            | Request::RemoveXattr { path, .. } => Some(Change::Modified { path: path.clone() }),
            Request::Create { path, .. }
            | Request::Mkdir { path, .. }
            | Request::Symlink { path, .. }
            | Request::MakeNode { path, .. } => Some(Change::Created { path: path.clone() }),
            Request::Unlink { path } | Request::Rmdir { path } => Some(Change::Removed { path: path.clone() }),
            Request::Rename { from, to, mode: RenameMode::Exchange } => {
                Some(Change::Exchanged { a: from.clone(), b: to.clone() })
            }
            Request::Rename { from, to, .. } => Some(Change::Renamed { from: from.clone(), to: to.clone() }),
            Request::CopyRange { to, .. } => Some(Change::Modified { path: to.clone() }),
            Request::Link { from, to } => Some(Change::Linked { from: from.clone(), to: to.clone() }),
            Request::Login { .. }
            | Request::Lookup { .. }
            | Request::GetAttr { .. }
            | Request::ReadDir { .. }
            | Request::Read { .. }
            | Request::ReadFromLog { .. }
            | Request::LocateInLog { .. }
            | Request::StatFs
            | Request::Fsync { .. }
            | Request::ReadFiles { .. }
            | Request::ReadTree { .. }
            | Request::ReadLink { .. }
            | Request::GetXattr { .. }
            | Request::ListXattrs { .. } => None,
            // Each request of a batch makes its own change.
            Request::Batch { .. } => None,
        }
    }
}

impl Change {
    /// The same change with its paths passed through `f`.
    pub fn map_paths(&self, f: &impl Fn(&str) -> String) -> Change {
        match self {
            Change::Modified { path } => Change::Modified { path: f(path) },
            Change::Created { path } => Change::Created { path: f(path) },
            Change::Removed { path } => Change::Removed { path: f(path) },
            Change::Renamed { from, to } => Change::Renamed { from: f(from), to: f(to) },
            Change::Linked { from, to } => Change::Linked { from: f(from), to: f(to) },
            Change::Exchanged { a, b } => Change::Exchanged { a: f(a), b: f(b) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutates_agrees_with_change() {
        let p = || "p".to_string();
        let all = [
            Request::Login { password: p() },
            Request::Lookup { path: p() },
            Request::GetAttr { path: p() },
            Request::ReadDir { path: p(), after: None },
            Request::Create { path: p(), mode: 0, exclusive: true },
            Request::Mkdir { path: p(), mode: 0 },
            Request::Unlink { path: p() },
            Request::Rmdir { path: p() },
            Request::Rename { from: p(), to: p(), mode: RenameMode::Replace },
            Request::Read { path: p(), offset: 0, len: 1 },
            Request::Write { path: p(), offset: 0, data: vec![] },
            Request::SetAttr { path: p(), size: None, mode: None, atime: None, mtime: None },
            Request::StatFs,
            Request::Fsync { path: p() },
            Request::ReadFromLog { path: p(), offset: 0, len: 1 },
            Request::LocateInLog { path: p(), offset: 0, len: 1 },
            Request::CopyRange { from: p(), from_offset: 0, to: p(), to_offset: 0, len: 1 },
            Request::ReadFiles { paths: vec![p()] },
            Request::ReadTree { path: p() },
            Request::Symlink { path: p(), target: p() },
            Request::ReadLink { path: p() },
            Request::MakeNode { path: p(), kind: FileKind::Fifo, mode: 0o644 },
            Request::Link { from: p(), to: p() },
            Request::Allocate { path: p(), offset: 0, len: 1, mode: AllocateMode::PunchHole },
            Request::GetXattr { path: p(), name: p() },
            Request::ListXattrs { path: p() },
            Request::SetXattr { path: p(), name: p(), value: vec![1], mode: XattrMode::Create },
            Request::RemoveXattr { path: p(), name: p() },
        ];
        for request in all.clone() {
            assert_eq!(request.mutates(), request.change().is_some(), "{}", request.name());
            let moved = request.map_paths(&|path| format!("d/{path}"));
            assert!(moved.paths().iter().all(|path| *path == "d/p"), "{}", request.name());
            assert_eq!(moved.paths().len(), request.paths().len(), "{}", request.name());
            assert_eq!(moved.any_path(|path| path == "d/p"), !moved.paths().is_empty(), "{}", request.name());
            assert!(!moved.any_path(|path| path == "p"), "{}", request.name());
            assert_eq!(moved.paths().first(), Some(&moved.path()).filter(|p| !p.is_empty()), "{}", request.name());
        }
        for request in all {
            let mutates = request.mutates();
            let batched = |request_id, request| Batched { request_id, request };
            let batch = Request::Batch { requests: vec![batched(1, Request::StatFs), batched(2, request)] };
            assert_eq!(batch.mutates(), mutates, "a batch mutates when one of its requests does");
        }
    }
}
