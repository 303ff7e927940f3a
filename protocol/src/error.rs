//! Error codes carried in replies. Each maps to one errno on the mount
//! side; the mapping lives in mountd so that this crate stays
//! platform-neutral. Append-only, like every wire enum.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ErrorCode {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("no space left on device")]
    NoSpace,
    /// Wrong password, bad or expired session token, or a path that would
    /// leave the user's root.
    #[error("access denied")]
    AccessDenied,
    #[error("name too long")]
    NameTooLong,
    #[error("invalid argument")]
    Invalid,
    #[error("cross-device link")]
    CrossDevice,
    #[error("input/output error on the storage node")]
    Io,
    #[error("protocol version not supported")]
    UnsupportedVersion,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("file too large")]
    TooLarge,
    /// The storage node's filesystem cannot do what was asked (a
    /// fallocate mode it lacks).
    #[error("operation not supported")]
    NotSupported,
    /// The file has no extended attribute of the asked name (ENODATA).
    #[error("no such attribute")]
    NoAttribute,
}
