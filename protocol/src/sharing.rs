//! How one user reaches files another user shares with them, on the wire.
//!
//! No request type is added for it: a path of the form
//! `.shared/<owner>/<rest>` names `<rest>` in `<owner>`'s tree, and
//! `.shared` alone lists the owners who share something with the caller.
//! The storage node checks the owner's grants (the `.shares` file at the
//! root of the owner's tree) for every such request.
//!
//! Guarantees:
//! - a request that reaches another owner's tree travels in that owner's
//!   partition (keyed by [`routing_key`]), so it is ordered with the
//!   owner's own requests and every replica applies both in the same order;
//! - [`partition_of`] is the partition librdkafka's default partitioner
//!   (`consistent_random`: CRC-32 of the key) picks for a key, so a storage
//!   node can refuse a shared request that came in any other partition.

use crate::Request;

/// The directory at every mount's root through which shared trees appear.
/// A user's own tree cannot hold an entry of this name at its root.
pub const SHARED_DIR: &str = ".shared";

/// The file at the root of an owner's tree that lists their grants, one
/// per line: `<path> <user> <ro|rw>` (`.` for the whole tree; `#` starts
/// a comment). Only its owner can read or change it.
pub const GRANTS_FILE: &str = ".shares";

/// `Some((owner, rest))` when `path` is in another owner's tree:
/// `.shared/<owner>` (then `rest` is `""`, the owner's root) or
/// `.shared/<owner>/<rest>`. `None` for `.shared` itself and for every
/// path of the caller's own tree.
pub fn split_shared(path: &str) -> Option<(&str, &str)> {
    let below = path.strip_prefix(SHARED_DIR)?.strip_prefix('/')?;
    let (owner, rest) = below.split_once('/').unwrap_or((below, ""));
    (!owner.is_empty()).then_some((owner, rest))
}

/// The path through which `rest` of `owner`'s tree appears on a mount.
pub fn shared_path(owner: &str, rest: &str) -> String {
    let root = crate::path::join(SHARED_DIR, owner);
    if rest.is_empty() {
        root
    } else {
        crate::path::join(&root, rest)
    }
}

/// Whose partition `request` belongs in: the owner of its main path when
/// that is in a shared tree, otherwise the caller (`user`) itself.
pub fn routing_key<'a>(user: &'a str, request: &'a Request) -> &'a str {
    match request {
        Request::Batch { requests } => requests.first().map_or(user, |b| routing_key(user, &b.request)),
        _ => split_shared(request.path()).map_or(user, |(owner, _)| owner),
    }
}

/// The partition librdkafka's default partitioner gives `key` among
/// `partitions` (`rd_crc32(key) % partitions`).
pub fn partition_of(key: &str, partitions: usize) -> i32 {
    (crc32(key.as_bytes()) % partitions.max(1) as u32) as i32
}

/// CRC-32 (IEEE 802.3, reflected, as zlib and librdkafka compute it). Keys
/// are user names, a few bytes, so a table buys nothing.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_paths_name_an_owner_and_a_path_in_their_tree() {
        assert_eq!(split_shared(".shared/alice"), Some(("alice", "")));
        assert_eq!(split_shared(".shared/alice/a/b"), Some(("alice", "a/b")));
        for own in [".shared", ".sharedx/a", "a/.shared/b", "", ".shared/"] {
            assert_eq!(split_shared(own), None, "{own}");
        }
        assert_eq!(shared_path("alice", ""), ".shared/alice");
        assert_eq!(shared_path("alice", "a/b"), ".shared/alice/a/b");
    }

    #[test]
    fn requests_are_keyed_by_the_owner_of_their_main_path() {
        let read = |path: &str| Request::Read { path: path.into(), offset: 0, len: 1 };
        assert_eq!(routing_key("bob", &read("x")), "bob");
        assert_eq!(routing_key("bob", &read(".shared")), "bob");
        assert_eq!(routing_key("bob", &read(".shared/alice/x")), "alice");
        let batched = crate::Batched { request_id: 1, request: read(".shared/alice/x") };
        assert_eq!(routing_key("bob", &Request::Batch { requests: vec![batched] }), "alice");
    }

    #[test]
    fn the_checksum_is_crc32() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }
}
