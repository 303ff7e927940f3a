//! Size limits shared by both daemons.
//!
//! One Kafka message must stay under the client's default `message.max.bytes`
//! (1,000,000), so file data moves in chunks of [`CHUNK_SIZE`] and directory
//! listings in pages bounded by [`READDIR_PAGE_BYTES`].

/// Largest file-data payload in one read or write request: as close to the
/// message limit as the envelope (path up to 4 KiB, user, token, reply topic)
/// allows, because the broker's cost is mostly per message. A multiple of the
/// page size. 960 KiB instead of 512 KiB made a 1 GiB write 15% and a cold
/// read 25% faster on the bench machine.
pub const CHUNK_SIZE: usize = 960 * 1024;
/// Upper bound for one encoded message; decoding refuses anything larger.
pub const MAX_MESSAGE_BYTES: usize = 1_000_000;
/// Budget for the encoded entries of one readdir reply page.
pub const READDIR_PAGE_BYTES: usize = 256 * 1024;
/// Longest accepted relative path, in bytes (Linux PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest accepted path component, in bytes (Linux NAME_MAX).
pub const MAX_NAME_BYTES: usize = 255;
