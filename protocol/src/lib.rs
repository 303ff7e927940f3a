//! The dfos wire contract, and nothing else.
//!
//! mountd and storaged share exactly these types. bincode encodes enum
//! variants by index, so every enum here is append-only: add variants at the
//! end, never reorder or remove them. [`PROTOCOL_VERSION`] travels in every
//! envelope, and `tests/golden.rs`-style tests in [`codec`] pin the bytes.

pub mod codec;
pub mod error;
mod file_data;
pub mod limits;
pub mod message;
pub mod path;
pub mod sharing;
pub mod topics;
mod write_view;

pub use codec::{
    decode_envelope, decode_event, decode_reply, encode_envelope, encode_event, encode_reply, encode_write_in_place,
    CodecError, WRITE_HEADROOM,
};
pub use error::ErrorCode;
pub use message::*;
pub use topics::Topics;
pub use write_view::{decode_write_view, WriteView};

/// Bumped whenever a change is not purely additive at the end of an enum.
pub const PROTOCOL_VERSION: u16 = 3;
