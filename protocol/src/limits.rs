//! Size limits shared by both daemons.
//!
//! File data travels in requests of at most [`CHUNK_SIZE`] and replies of at
//! most [`READ_BLOCK_SIZE`]; directory listings in pages bounded by
//! [`READDIR_PAGE_BYTES`]. A request is larger than Kafka's default message
//! limit (1,000,000 bytes), so the request topic and the clients that produce
//! to it are configured with [`KAFKA_MAX_MESSAGE_BYTES`]; replies and events
//! stay under the default.

/// Largest file-data payload in one write request: 3.75 MiB, four read
/// blocks. Most of what the broker spends per write is per message (the
/// storage node's fetch, the reply, the change event), so fewer, larger
/// messages carry the same bytes for less; 960 KiB instead of 512 KiB had
/// made a 1 GiB write 15% faster. A multiple of the page size.
pub const CHUNK_SIZE: usize = 4 * READ_BLOCK_SIZE;
/// File data one read asks for: a random read of a few bytes should not
/// fetch megabytes. A chunk is a whole number of blocks, so a sequential
/// reader's blocks each lie within one logged write.
pub const READ_BLOCK_SIZE: usize = 960 * 1024;
/// Upper bound for one encoded message (a chunk plus its envelope: path up
/// to 4 KiB, user, token, reply topic); decoding refuses anything larger.
pub const MAX_MESSAGE_BYTES: usize = CHUNK_SIZE + 64 * 1024;
/// `max.message.bytes` of the request topic and `message.max.bytes` of
/// clients producing to it: one message plus Kafka's record framing.
pub const KAFKA_MAX_MESSAGE_BYTES: usize = MAX_MESSAGE_BYTES + 4096;
/// Budget for the encoded entries of one readdir reply page.
pub const READDIR_PAGE_BYTES: usize = 256 * 1024;
/// Longest accepted relative path, in bytes (Linux PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest accepted path component, in bytes (Linux NAME_MAX).
pub const MAX_NAME_BYTES: usize = 255;
/// Most requests one `Request::Batch` may hold.
pub const MAX_BATCH_REQUESTS: usize = 256;
/// A request joins a batch only if its file data is at most this long, so
/// a batch stays a small message and large writes keep their own (which the
/// request log can serve reads from).
pub const MAX_BATCHED_DATA_BYTES: usize = 32 * 1024;
/// Budget of one batch's file data and paths together.
pub const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Most bytes one `Request::CopyRange` copies: a storage node copies
/// them locally while that user's later requests wait, so a copy of a
/// large file is many requests of a few tens of milliseconds each (the
/// kernel asks again for the rest, as `copy_file_range(2)` allows).
pub const MAX_COPY_BYTES: u64 = 64 << 20;
/// Largest file a mount keeps whole in memory and a `Request::ReadFiles`
/// answers with.
pub const MAX_SMALL_FILE_BYTES: usize = 64 * 1024;
/// Most paths one `Request::ReadFiles` asks for.
pub const MAX_READ_FILES: usize = 128;
/// Most file data one answer to `Request::ReadFiles` carries, so it stays
/// under Kafka's default message limit with its attributes and framing.
pub const MAX_READ_FILES_BYTES: usize = 768 * 1024;
/// Longest extended attribute name, prefix included (Linux XATTR_NAME_MAX).
pub const MAX_XATTR_NAME_BYTES: usize = 255;
/// Largest extended attribute value (Linux XATTR_SIZE_MAX); a storage
/// node's filesystem may hold less (ext4: what fits in one block).
pub const MAX_XATTR_VALUE_BYTES: usize = 64 * 1024;
