//! Sharing: what one user may do in another user's tree.
//!
//! An owner lists grants in the [`GRANTS_FILE`] at the root of their tree,
//! with ordinary tools, one per line: `<path> <user> <ro|rw>`, `.` for the
//! whole tree. A grantee reaches the tree through paths under
//! `.shared/<owner>/` ([`dfos_protocol::sharing`]).
//!
//! Guarantees:
//! - a grantee sees only the granted paths and the directories on the way
//!   to them (listings are filtered), never the owner's grants file, trash
//!   or own `.shared`; anything else is `NotFound` to them;
//! - `ro` allows reading; `rw` also writing, and making, removing and
//!   renaming entries inside the granted directory, but not the granted
//!   path itself, which only its owner moves;
//! - what cannot be written through a grant shows without write bits;
//! - grants are read from the owner's tree at the point in the owner's
//!   partition where the request is applied, so every replica decides the
//!   same, and a revoked grant refuses the very next request.

use dfos_protocol::path::{join, split, TRASH_DIR};
use dfos_protocol::sharing::{shared_path, split_shared, GRANTS_FILE, SHARED_DIR};
use dfos_protocol::{Change, DirEntry, ErrorCode, FileAttr, Listing, Payload, Request};

/// What a grantee may do at one path, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// A directory on the way to a grant: it can be looked up and listed
    /// (showing only what leads on), nothing else.
    Traverse,
    ReadOnly,
    ReadWrite,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    path: String,
    user: String,
    access: Access,
}

/// The grants one owner gives one grantee.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    given: Vec<Grant>,
}

impl Grants {
    /// Reads an owner's grants file; lines that do not parse are skipped
    /// (and logged), so a typo revokes rather than widens.
    pub fn parse(owner: &str, text: &str, grantee: &str) -> Grants {
        let mut given = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            match parse_line(line) {
                Some(grant) if grant.user == grantee => given.push(grant),
                Some(_) => {}
                None => log::info!("op=grants user={owner} line={} ignored: {line:?}", number + 1),
            }
        }
        Grants { given }
    }

    pub fn is_empty(&self) -> bool {
        self.given.is_empty()
    }

    /// What the grantee may do at `path` of the owner's tree (`None`:
    /// they may not even see it).
    pub fn access(&self, path: &str) -> Option<Access> {
        if is_private(path) {
            return None;
        }
        let within = |grant: &Grant| {
            grant.path.is_empty()
                || path == grant.path
                || path.strip_prefix(grant.path.as_str()).is_some_and(|rest| rest.starts_with('/'))
        };
        if let Some(best) = self.given.iter().filter(|g| within(g)).map(|g| g.access).max() {
            return Some(best);
        }
        let leads_to = |grant: &Grant| {
            (path.is_empty() && !grant.path.is_empty())
                || grant.path.strip_prefix(path).is_some_and(|rest| rest.starts_with('/'))
        };
        self.given.iter().any(leads_to).then_some(Access::Traverse)
    }

    /// Whether `request` (paths in the owner's tree) is allowed: `NotFound`
    /// for a path the grantee cannot see, `AccessDenied` for one they see
    /// but may not use so.
    pub fn allow(&self, request: &Request) -> Result<(), ErrorCode> {
        for (path, need) in needs(request) {
            let (at, wanted) = match need {
                Need::See => (self.access(path), Access::Traverse),
                Need::Read => (self.access(path), Access::ReadOnly),
                Need::Write => (self.access(path), Access::ReadWrite),
                Need::Entry => {
                    let here = self.access(path);
                    let parent = if path.is_empty() { None } else { self.access(split(path).0) };
                    (here.min(parent), Access::ReadWrite)
                }
            };
            match at {
                None if need != Need::Entry => return Err(ErrorCode::NotFound),
                Some(access) if access >= wanted => {}
                _ => return Err(ErrorCode::AccessDenied),
            }
        }
        Ok(())
    }

    /// `result` as the grantee may see it: listings filtered to what they
    /// can see, under the paths they used, and write bits taken off what
    /// they cannot write.
    pub fn present(
        &self,
        owner: &str,
        request: &Request,
        result: Result<Payload, ErrorCode>,
    ) -> Result<Payload, ErrorCode> {
        let dir = request.path();
        Ok(match result? {
            Payload::Attr(attr) => Payload::Attr(self.shown(dir, attr)),
            Payload::Entries { entries, more } => Payload::Entries { entries: self.visible(dir, entries), more },
            Payload::Tree(listings) => Payload::Tree(
                listings
                    .into_iter()
                    .filter(|listing| self.access(&listing.path).is_some())
                    .map(|Listing { path, entries, more }| Listing {
                        entries: self.visible(&path, entries),
                        path: shared_path(owner, &path),
                        more,
                    })
                    .collect(),
            ),
            // Bytes are read through the grantee's own request, not the log:
            // the owner's logged writes are not theirs to fetch.
            Payload::Located { size, .. } => Payload::Located { locations: Vec::new(), size },
            other => other,
        })
    }

    fn visible(&self, dir: &str, entries: Vec<DirEntry>) -> Vec<DirEntry> {
        entries
            .into_iter()
            .filter_map(|DirEntry { name, attr }| {
                let path = join(dir, &name);
                self.access(&path).is_some().then(|| DirEntry { attr: self.shown(&path, attr), name })
            })
            .collect()
    }

    fn shown(&self, path: &str, attr: FileAttr) -> FileAttr {
        match self.access(path) {
            Some(Access::ReadWrite) => attr,
            _ => without_write_bits(attr),
        }
    }
}

pub fn without_write_bits(mut attr: FileAttr) -> FileAttr {
    attr.mode &= !0o222;
    attr
}

/// Names at an owner's root that no grant reaches.
fn is_private(path: &str) -> bool {
    let first = path.split('/').next().unwrap_or_default();
    [GRANTS_FILE, TRASH_DIR, SHARED_DIR].contains(&first)
}

fn parse_line(line: &str) -> Option<Grant> {
    let mut words = line.split_whitespace();
    let (path, user, access) = (words.next()?, words.next()?, words.next()?);
    if words.next().is_some() || !crate::credentials::valid_user_name(user) {
        return None;
    }
    let access = match access {
        "ro" => Access::ReadOnly,
        "rw" => Access::ReadWrite,
        _ => return None,
    };
    let path = path.trim_start_matches("./").trim_end_matches('/');
    let path = if path == "." { "" } else { path };
    if crate::paths::check_syntax(path).is_err() || (!path.is_empty() && is_private(path)) {
        return None;
    }
    Some(Grant { path: path.to_owned(), user: user.to_owned(), access })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Look it up or list it.
    See,
    Read,
    /// Change its contents or attributes.
    Write,
    /// Make, remove or rename the entry: its directory must be writable.
    Entry,
}

/// What `request` needs at each of its paths. Exhaustive, so a new
/// request type must say what it needs.
fn needs(request: &Request) -> Vec<(&str, Need)> {
    match request {
        Request::Lookup { path }
        | Request::GetAttr { path }
        | Request::ReadDir { path, .. }
        | Request::ReadTree { path }
        | Request::ListXattrs { path } => {
            vec![(path, Need::See)]
        }
        Request::Read { path, .. }
        | Request::ReadFromLog { path, .. }
        | Request::LocateInLog { path, .. }
        | Request::ReadLink { path }
        | Request::GetXattr { path, .. }
        | Request::Fsync { path } => vec![(path, Need::Read)],
        Request::ReadFiles { paths } => paths.iter().map(|path| (path.as_str(), Need::Read)).collect(),
        Request::Write { path, .. }
        | Request::SetAttr { path, .. }
        | Request::Allocate { path, .. }
        | Request::SetXattr { path, .. }
        | Request::RemoveXattr { path, .. } => vec![(path, Need::Write)],
        Request::CopyRange { from, to, .. } => vec![(from, Need::Read), (to, Need::Write)],
        Request::Create { path, .. }
        | Request::Mkdir { path, .. }
        | Request::Symlink { path, .. }
        | Request::MakeNode { path, .. }
        | Request::Unlink { path }
        | Request::Rmdir { path } => vec![(path, Need::Entry)],
        Request::Rename { from, to, .. } => vec![(from, Need::Entry), (to, Need::Entry)],
        Request::Link { from, to } => vec![(from, Need::Read), (to, Need::Entry)],
        // Not about a path of the tree; the service never routes these here.
        Request::Login { .. } | Request::StatFs | Request::Batch { .. } => Vec::new(),
    }
}

/// Where a request's paths lead.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// The caller's own tree.
    Own,
    /// `.shared` itself: the list of owners sharing with the caller.
    SharedList,
    /// Another owner's tree: the request with its paths in that tree.
    Owner { owner: &'a str, request: Request },
}

/// Sorts out `request`'s paths. Paths into two trees are `CrossDevice`
/// (as a rename between two mounts is), and an entry named `.shared` at
/// the caller's own root cannot be made.
pub fn route(request: &Request) -> Result<Route<'_>, ErrorCode> {
    // Almost every request stays in the caller's tree: nothing to collect.
    if !request.any_path(|path| path.starts_with(SHARED_DIR)) {
        return Ok(Route::Own);
    }
    let paths = request.paths();
    let owners: Vec<Option<&str>> = paths.iter().map(|path| split_shared(path).map(|(owner, _)| owner)).collect();
    match owners.first().copied().flatten() {
        Some(owner) => {
            if owners.iter().any(|o| *o != Some(owner)) {
                return Err(ErrorCode::CrossDevice);
            }
            let in_tree = |path: &str| split_shared(path).map_or_else(String::new, |(_, rest)| rest.to_owned());
            let request = match request.map_paths(&in_tree) {
                // The owner's logged writes are not the grantee's to fetch.
                Request::ReadFromLog { path, offset, len } => Request::Read { path, offset, len },
                other => other,
            };
            Ok(Route::Owner { owner, request })
        }
        None if owners.iter().any(Option::is_some) => Err(ErrorCode::CrossDevice),
        None if paths.contains(&SHARED_DIR) => match request {
            Request::Lookup { .. }
            | Request::GetAttr { .. }
            | Request::ReadDir { .. }
            | Request::ReadTree { .. }
            | Request::ListXattrs { .. }
            | Request::GetXattr { .. } => Ok(Route::SharedList),
            Request::Read { .. }
            | Request::ReadFromLog { .. }
            | Request::LocateInLog { .. }
            | Request::ReadFiles { .. } => Err(ErrorCode::IsDir),
            _ => Err(ErrorCode::NotPermitted),
        },
        None => Ok(Route::Own),
    }
}

/// The user and change an event carries: a change made through a shared
/// path is the owner's, at its path in the owner's tree, so the owner's
/// mounts (and every grantee's) hear of it.
pub fn in_owners_tree(user: &str, change: Change) -> (String, Change) {
    let first = match &change {
        Change::Modified { path } | Change::Created { path } | Change::Removed { path } => path,
        Change::Renamed { from, .. } | Change::Linked { from, .. } | Change::Exchanged { a: from, .. } => from,
    };
    match split_shared(first) {
        Some((owner, _)) => {
            let owner = owner.to_owned();
            let in_tree = |path: &str| split_shared(path).map_or_else(String::new, |(_, rest)| rest.to_owned());
            let change = change.map_paths(&in_tree);
            (owner, change)
        }
        None => (user.to_owned(), change),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# shared with bob\nprojects/report bob rw\nphotos bob ro  # holidays\n. carol ro\nbad line\nx bob rwx\n.trash bob rw\n";

    #[test]
    fn grants_give_each_path_its_access_and_hide_the_rest() {
        let bob = Grants::parse("alice", TEXT, "bob");
        assert_eq!(bob.access("projects/report/a/b"), Some(Access::ReadWrite));
        assert_eq!(bob.access("projects/report"), Some(Access::ReadWrite));
        assert_eq!(bob.access("photos/2024.jpg"), Some(Access::ReadOnly));
        assert_eq!(bob.access("projects"), Some(Access::Traverse));
        assert_eq!(bob.access(""), Some(Access::Traverse));
        for hidden in ["projects/other", "projects/reportx", "secret", ".trash", ".shares", "x"] {
            assert_eq!(bob.access(hidden), None, "{hidden}");
        }
        let carol = Grants::parse("alice", TEXT, "carol");
        assert_eq!(carol.access("anything/at/all"), Some(Access::ReadOnly));
        assert_eq!(carol.access(".shares"), None, "the grants file is the owner's alone");
        assert_eq!(carol.access(".trash/1/f"), None);
        assert!(Grants::parse("alice", TEXT, "dave").is_empty());
    }

    #[test]
    fn requests_need_the_access_their_kind_asks_for() {
        let bob = Grants::parse("alice", TEXT, "bob");
        let write = |path: &str| Request::Write { path: path.into(), offset: 0, data: vec![1] };
        let create = |path: &str| Request::Create { path: path.into(), mode: 0o644, exclusive: true };
        assert_eq!(bob.allow(&write("projects/report/f")), Ok(()));
        assert_eq!(bob.allow(&create("projects/report/f")), Ok(()));
        assert_eq!(bob.allow(&write("photos/a")), Err(ErrorCode::AccessDenied));
        assert_eq!(bob.allow(&create("photos/a")), Err(ErrorCode::AccessDenied));
        assert_eq!(bob.allow(&Request::Read { path: "photos/a".into(), offset: 0, len: 1 }), Ok(()));
        assert_eq!(bob.allow(&Request::Read { path: "secret".into(), offset: 0, len: 1 }), Err(ErrorCode::NotFound));
        assert_eq!(bob.allow(&Request::ReadDir { path: "projects".into(), after: None }), Ok(()));
        assert_eq!(
            bob.allow(&Request::Read { path: "projects".into(), offset: 0, len: 1 }),
            Err(ErrorCode::AccessDenied)
        );
        assert_eq!(bob.allow(&create("projects/new")), Err(ErrorCode::AccessDenied), "on the way is not inside");
        assert_eq!(bob.allow(&Request::Rmdir { path: "projects/report".into() }), Err(ErrorCode::AccessDenied));
        let rename = |from: &str, to: &str| Request::Rename {
            from: from.into(),
            to: to.into(),
            mode: dfos_protocol::RenameMode::Replace,
        };
        assert_eq!(bob.allow(&rename("projects/report/a", "projects/report/b")), Ok(()));
        assert_eq!(bob.allow(&rename("projects/report/a", "photos/a")), Err(ErrorCode::AccessDenied));
        assert_eq!(bob.allow(&create(".shares")), Err(ErrorCode::AccessDenied));
    }

    #[test]
    fn listings_show_only_what_leads_to_a_grant_without_write_bits_where_read_only() {
        let bob = Grants::parse("alice", TEXT, "bob");
        let attr = |kind| FileAttr {
            kind,
            size: 0,
            mode: 0o755,
            nlink: 1,
            atime: Default::default(),
            mtime: Default::default(),
            ctime: Default::default(),
            blocks: 0,
            link: None,
        };
        let entry = |name: &str| DirEntry { name: name.into(), attr: attr(dfos_protocol::FileKind::Directory) };
        let root = Request::ReadDir { path: String::new(), after: None };
        let listing = Payload::Entries {
            entries: vec![entry(".shares"), entry(".trash"), entry("photos"), entry("projects"), entry("secret")],
            more: false,
        };
        let Ok(Payload::Entries { entries, .. }) = bob.present("alice", &root, Ok(listing)) else { panic!() };
        let shown: Vec<(&str, u32)> = entries.iter().map(|e| (e.name.as_str(), e.attr.mode)).collect();
        assert_eq!(shown, [("photos", 0o555), ("projects", 0o555)]);
        let tree = Payload::Tree(vec![
            Listing { path: "projects".into(), entries: vec![entry("other"), entry("report")], more: false },
            Listing { path: "projects/report".into(), entries: vec![entry("a")], more: false },
            Listing { path: "secret".into(), entries: vec![entry("b")], more: false },
        ]);
        let asked = Request::ReadTree { path: "projects".into() };
        let Ok(Payload::Tree(listings)) = bob.present("alice", &asked, Ok(tree)) else { panic!() };
        let shown: Vec<(&str, Vec<(&str, u32)>)> = listings
            .iter()
            .map(|l| (l.path.as_str(), l.entries.iter().map(|e| (e.name.as_str(), e.attr.mode)).collect()))
            .collect();
        assert_eq!(
            shown,
            [
                (".shared/alice/projects", vec![("report", 0o755)]),
                (".shared/alice/projects/report", vec![("a", 0o755)])
            ]
        );
    }

    #[test]
    fn routes_keep_each_request_in_one_tree() {
        let read = |path: &str| Request::ReadFromLog { path: path.into(), offset: 0, len: 1 };
        assert_eq!(route(&read("a")), Ok(Route::Own));
        assert_eq!(
            route(&read(".shared/alice/a/b")),
            Ok(Route::Owner { owner: "alice", request: Request::Read { path: "a/b".into(), offset: 0, len: 1 } })
        );
        assert_eq!(route(&Request::ReadDir { path: ".shared".into(), after: None }), Ok(Route::SharedList));
        assert_eq!(route(&Request::Mkdir { path: ".shared".into(), mode: 0o755 }), Err(ErrorCode::NotPermitted));
        let rename = |from: &str, to: &str| Request::Rename {
            from: from.into(),
            to: to.into(),
            mode: dfos_protocol::RenameMode::Replace,
        };
        assert_eq!(route(&rename("a", ".shared/alice/a")), Err(ErrorCode::CrossDevice));
        assert_eq!(route(&rename(".shared/alice/a", ".shared/carol/a")), Err(ErrorCode::CrossDevice));
        assert_eq!(route(&rename(".shared/alice/a", "a")), Err(ErrorCode::CrossDevice));
    }
}
