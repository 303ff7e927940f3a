//! Which requests may travel together in one `Request::Batch`, and the
//! bounds of a batch.
//!
//! A request that went behind (no one waits for its reply yet) waits up to
//! [`BATCH_DELAY`] in the mount and leaves with the next request, in order
//! (the transport in `rpc` does the sending). Guarantees: a batch holds at
//! most `MAX_BATCH_REQUESTS` requests and about `MAX_BATCH_BYTES` of paths
//! and data, never a login, a batch, a rename, a copy, an append or a write larger than
//! `MAX_BATCHED_DATA_BYTES`, so it stays a small message whose replay after
//! a storage node's crash gives what its first application gave.

use std::time::Duration;

use dfos_protocol::limits::{MAX_BATCHED_DATA_BYTES, MAX_BATCH_BYTES, MAX_BATCH_REQUESTS};
use dfos_protocol::{Request, APPEND_AT_END};

/// How long a request nobody waits for yet (a create, mkdir, unlink or
/// rmdir that went behind) may wait for company before it is sent alone.
/// `cp` closes a small file well within it, so the file's create and its
/// data travel as one message; `rm -r` sends a directory's unlinks a few
/// dozen at a time.
pub const BATCH_DELAY: Duration = Duration::from_millis(5);

/// Requests queued to travel together, in order, with their request ids.
#[derive(Default)]
pub struct Batch {
    requests: Vec<(u64, Request)>,
    bytes: usize,
    /// The record key all of them travel under.
    key: Option<String>,
    /// How many batches were taken before this one. A timer started for
    /// one batch sends only that batch: one that left early with a flush
    /// must not take the next file's lone create out of its company.
    generation: u64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Whether `request`, whose record key is `key`, may join without
    /// passing the batch's bounds. Requests into different trees (own or
    /// shared) belong in different partitions, so never in one batch.
    pub fn fits(&self, request: &Request, key: &str) -> bool {
        self.fits_all([(request, key)])
    }

    /// Whether all of `requests` (each with its record key, as for
    /// [`Batch::fits`]) may join, one after another.
    pub fn fits_all<'a>(&self, requests: impl IntoIterator<Item = (&'a Request, &'a str)>) -> bool {
        let (mut count, mut bytes, mut batch_key) = (self.requests.len(), self.bytes, self.key.as_deref());
        for (request, key) in requests {
            let joins = count < MAX_BATCH_REQUESTS
                && bytes + weight(request) <= MAX_BATCH_BYTES
                && batch_key.is_none_or(|batch_key| batch_key == key);
            if !joins {
                return false;
            }
            (count, bytes, batch_key) = (count + 1, bytes + weight(request), Some(batch_key.unwrap_or(key)));
        }
        true
    }

    /// Whether the request `request_id` waits in this batch.
    pub fn holds(&self, request_id: u64) -> bool {
        self.requests.iter().any(|(id, _)| *id == request_id)
    }

    /// `key`: as given to [`Batch::fits`].
    pub fn push(&mut self, request_id: u64, request: Request, key: &str) {
        self.bytes += weight(&request);
        self.key.get_or_insert_with(|| key.to_owned());
        self.requests.push((request_id, request));
    }

    /// The queued requests, in order, leaving the batch empty and starting
    /// the next generation.
    pub fn take(&mut self) -> Vec<(u64, Request)> {
        let next = Batch { generation: self.generation + 1, ..Batch::default() };
        std::mem::replace(self, next).requests
    }

    /// Names the batch now filling, for [`Batch::is_still`].
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the batch that had `generation` has not been taken yet: its
    /// [`BATCH_DELAY`] timer may send it.
    pub fn is_still(&self, generation: u64) -> bool {
        self.generation == generation
    }
}

/// Small requests join batches; a large write keeps its own message, which
/// the request log can serve reads from. A rename travels alone too: a
/// storage node that crashed after applying a batch replays all of it, and
/// an unlink of `x` replayed after a `mv a x` in the same batch would
/// remove the moved file. (Every other pair a batch can hold, behind
/// requests and at most one request someone waits for at its end, comes
/// out of a replay as it went in.)
pub fn batchable(request: &Request) -> bool {
    match request {
        Request::Login { .. }
        | Request::Batch { .. }
        | Request::Rename { .. }
        | Request::CopyRange { .. }
        | Request::ReadFiles { .. } => false,
        // A node places an append as it begins its message, so only alone.
        Request::Write { offset: APPEND_AT_END, .. } => false,
        Request::Write { data, .. } => data.len() <= MAX_BATCHED_DATA_BYTES,
        _ => true,
    }
}

/// The largest write that may join the batch of the exclusive create it
/// follows: the whole of a file up to this size then travels with its
/// create, and a node that refuses the create refuses it too, without the
/// round trip a larger file pays to wait for the create's answer first.
/// (Reads of it are plain reads, not served from the request log: fine at
/// this size.)
pub const MAX_WRITE_WITH_CREATE_BYTES: usize = 256 * 1024;

/// Whether `request` may join the batch of an exclusive create it follows.
pub fn may_follow_create(request: &Request) -> bool {
    match request {
        Request::Write { offset, data, .. } if *offset != APPEND_AT_END => data.len() <= MAX_WRITE_WITH_CREATE_BYTES,
        other => batchable(other),
    }
}

/// Roughly a batchable request's encoded size.
fn weight(request: &Request) -> usize {
    let data = match request {
        Request::Write { data, .. } => data.len(),
        _ => 0,
    };
    64 + request.path().len() + data
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfos_protocol::RenameMode;

    #[test]
    fn renames_logins_appends_and_large_writes_travel_alone() {
        let write = |len| Request::Write { path: "f".into(), offset: 0, data: vec![0; len] };
        assert!(!batchable(&Request::Write { path: "f".into(), offset: APPEND_AT_END, data: vec![0; 1] }));
        assert!(!may_follow_create(&Request::Write { path: "f".into(), offset: APPEND_AT_END, data: vec![0; 1] }));
        assert!(batchable(&Request::Unlink { path: "f".into() }));
        assert!(batchable(&write(MAX_BATCHED_DATA_BYTES)));
        assert!(!batchable(&write(MAX_BATCHED_DATA_BYTES + 1)));
        assert!(!batchable(&Request::Rename { from: "a".into(), to: "x".into(), mode: RenameMode::Replace }));
        assert!(!batchable(&Request::Login { password: "p".into() }));
        let copy = Request::CopyRange { from: "a".into(), from_offset: 0, to: "b".into(), to_offset: 0, len: 1 };
        assert!(!batchable(&copy));
    }

    #[test]
    fn a_batch_holds_a_bounded_number_of_requests_and_bytes() {
        let mut batch = Batch::default();
        let unlink = Request::Unlink { path: "f".into() };
        for id in 0..MAX_BATCH_REQUESTS as u64 {
            assert!(batch.fits(&unlink, "u"));
            batch.push(id, unlink.clone(), "u");
        }
        assert!(!batch.fits(&unlink, "u"), "full by count");
        let mut batch = Batch::default();
        let write = Request::Write { path: "f".into(), offset: 0, data: vec![0; MAX_BATCHED_DATA_BYTES] };
        while batch.fits(&write, "u") {
            batch.push(0, write.clone(), "u");
        }
        assert!(batch.bytes <= MAX_BATCH_BYTES && batch.requests.len() < MAX_BATCH_REQUESTS);
    }

    #[test]
    fn a_timer_sends_only_the_batch_it_was_started_for() {
        let mut batch = Batch::default();
        batch.push(1, Request::Unlink { path: "a".into() }, "u");
        let first = batch.generation();
        assert!(batch.is_still(first));
        assert_eq!(batch.take().len(), 1, "a flush takes the first batch early");
        batch.push(2, Request::Create { path: "b".into(), mode: 0o644, exclusive: true }, "u");
        assert!(!batch.is_still(first), "the first batch's timer must leave the second batch alone");
        assert!(batch.is_still(batch.generation()));
    }

    #[test]
    fn requests_into_another_tree_wait_for_a_batch_of_their_own() {
        let mut batch = Batch::default();
        batch.push(1, Request::Unlink { path: "f".into() }, "bob");
        assert!(!batch.fits(&Request::Unlink { path: ".shared/alice/f".into() }, "alice"));
        assert!(batch.fits(&Request::Unlink { path: "g".into() }, "bob"));
        batch.take();
        assert!(batch.fits(&Request::Unlink { path: ".shared/alice/f".into() }, "alice"), "an empty batch takes any");
    }
}
