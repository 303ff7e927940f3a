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

impl ErrorCode {
    /// Every code, in wire order (the order of the variants).
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::NotFound,
        ErrorCode::Exists,
        ErrorCode::NotEmpty,
        ErrorCode::NotDir,
        ErrorCode::IsDir,
        ErrorCode::NoSpace,
        ErrorCode::AccessDenied,
        ErrorCode::NameTooLong,
        ErrorCode::Invalid,
        ErrorCode::CrossDevice,
        ErrorCode::Io,
        ErrorCode::UnsupportedVersion,
        ErrorCode::NotPermitted,
        ErrorCode::TooLarge,
        ErrorCode::NotSupported,
        ErrorCode::NoAttribute,
    ];

    /// The code's wire index, one byte, for records a storage node keeps
    /// on its own disk.
    pub fn index(self) -> u8 {
        match self {
            ErrorCode::NotFound => 0,
            ErrorCode::Exists => 1,
            ErrorCode::NotEmpty => 2,
            ErrorCode::NotDir => 3,
            ErrorCode::IsDir => 4,
            ErrorCode::NoSpace => 5,
            ErrorCode::AccessDenied => 6,
            ErrorCode::NameTooLong => 7,
            ErrorCode::Invalid => 8,
            ErrorCode::CrossDevice => 9,
            ErrorCode::Io => 10,
            ErrorCode::UnsupportedVersion => 11,
            ErrorCode::NotPermitted => 12,
            ErrorCode::TooLarge => 13,
            ErrorCode::NotSupported => 14,
            ErrorCode::NoAttribute => 15,
        }
    }

    pub fn from_index(index: u8) -> Option<ErrorCode> {
        ErrorCode::ALL.get(index as usize).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_are_the_wire_order_and_round_trip() {
        for (position, code) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(code.index() as usize, position, "{code:?}");
            assert_eq!(ErrorCode::from_index(code.index()), Some(code));
            let wire = bincode::serde::encode_to_vec(code, bincode::config::standard()).unwrap();
            assert_eq!(wire, [code.index()], "{code:?} travels as its index");
        }
        assert_eq!(ErrorCode::from_index(ErrorCode::ALL.len() as u8), None);
    }
}
