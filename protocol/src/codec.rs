//! bincode 2 (serde mode) with a decode size limit, so a hostile length
//! prefix inside a message cannot make the receiver allocate gigabytes.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::limits::{CHUNK_SIZE, MAX_MESSAGE_BYTES};
use crate::{Envelope, Event, Reply, Request};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("cannot encode: {0}")]
    Encode(String),
    #[error("cannot decode: {0}")]
    Decode(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_borrowed(bytes)
}

/// Decodes a whole message into a value that may borrow from it.
pub(crate) fn decode_borrowed<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    let (value, used) =
        bincode::serde::borrow_decode_from_slice(bytes, config()).map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

pub fn encode_envelope(envelope: &Envelope) -> Result<Vec<u8>, CodecError> {
    encode(envelope)
}

/// Room a buffer keeps in front of a write's data for the rest of its
/// envelope (reply topic, user, token, path of up to 4 KiB, numbers).
pub const WRITE_HEADROOM: usize = MAX_MESSAGE_BYTES - CHUNK_SIZE;

/// Encodes a `Write` envelope whose data already fills
/// `buffer[WRITE_HEADROOM..]`, by writing the envelope's other fields just
/// in front of the data: the very bytes [`encode_envelope`] gives, without
/// copying the data. `envelope.request` must be that `Write` with empty
/// data. Returns where the message starts in `buffer`.
pub fn encode_write_in_place(envelope: &Envelope, buffer: &mut [u8]) -> Result<usize, CodecError> {
    if !matches!(&envelope.request, Request::Write { data, .. } if data.is_empty()) {
        return Err(CodecError::Encode("in place: not a Write without data".into()));
    }
    let data_len = buffer.len().checked_sub(WRITE_HEADROOM).ok_or(CodecError::TooLarge(buffer.len()))?;
    let mut head = encode(envelope)?;
    // The data is the last field: its length prefix (0) ends the encoding.
    head.pop();
    let length = bincode::encode_to_vec(data_len as u64, config()).map_err(|e| CodecError::Encode(e.to_string()))?;
    head.extend_from_slice(&length);
    if head.len() > WRITE_HEADROOM || head.len() + data_len > MAX_MESSAGE_BYTES {
        return Err(CodecError::TooLarge(head.len() + data_len));
    }
    let start = WRITE_HEADROOM - head.len();
    buffer[start..WRITE_HEADROOM].copy_from_slice(&head);
    Ok(start)
}

pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope, CodecError> {
    decode(bytes)
}

pub fn encode_reply(reply: &Reply) -> Result<Vec<u8>, CodecError> {
    encode(reply)
}

pub fn decode_reply(bytes: &[u8]) -> Result<Reply, CodecError> {
    decode(bytes)
}

pub fn encode_event(event: &Event) -> Result<Vec<u8>, CodecError> {
    encode(event)
}

pub fn decode_event(bytes: &[u8]) -> Result<Event, CodecError> {
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use proptest::prelude::*;

    fn sample_envelope() -> Envelope {
        Envelope {
            version: PROTOCOL_VERSION,
            request_id: 7,
            reply_to: "dfos.reply.m".into(),
            user: "U".into(),
            token: "t".into(),
            client_time: Timestamp { secs: 1, nanos: 2 },
            request: Request::Write { path: "a/b".into(), offset: 300, data: vec![1, 2, 3] },
        }
    }

    /// Pins the wire format. If this fails, the change broke compatibility
    /// with deployed peers: append variants instead, or bump the version.
    #[test]
    fn golden_bytes_of_an_envelope() {
        let bytes = encode_envelope(&sample_envelope()).unwrap();
        let expected: Vec<u8> = vec![
            3, // version
            7, // request id (varint)
            12, b'd', b'f', b'o', b's', b'.', b'r', b'e', b'p', b'l', b'y', b'.', b'm', 1, b'U', // user
            1, b't', // token
            2, 2,  // time: secs zigzag(1)=2, nanos 2
            10, // Request::Write is variant 10
            3, b'a', b'/', b'b', // path
            251, 44, 1, // offset 300 as u16 varint
            3, 1, 2, 3, // data
        ];
        assert_eq!(bytes, expected);
    }

    proptest! {
        #[test]
        fn a_write_encoded_in_place_is_the_write_encoded_whole(
            path in "[a-z/]{0,300}", offset in any::<u64>(), len in prop_oneof![0..300usize, 60_000..70_000usize],
        ) {
            let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
            let mut envelope = sample_envelope();
            envelope.request = Request::Write { path: path.clone(), offset, data: data.clone() };
            let whole = encode_envelope(&envelope).unwrap();
            envelope.request = Request::Write { path, offset, data: Vec::new() };
            let mut buffer = vec![0xee; WRITE_HEADROOM];
            buffer.extend_from_slice(&data);
            let start = encode_write_in_place(&envelope, &mut buffer).unwrap();
            prop_assert_eq!(&buffer[start..], &whole[..]);
        }
    }

    #[test]
    fn only_a_write_without_data_that_fits_is_encoded_in_place() {
        let mut buffer = vec![0; WRITE_HEADROOM + 10];
        assert!(encode_write_in_place(&sample_envelope(), &mut buffer).is_err(), "carries data itself");
        let mut envelope = sample_envelope();
        envelope.request = Request::StatFs;
        assert!(encode_write_in_place(&envelope, &mut buffer).is_err());
        envelope.request = Request::Write { path: "f".into(), offset: 0, data: Vec::new() };
        assert!(encode_write_in_place(&envelope, &mut [0; 10]).is_err(), "no headroom");
        let mut too_long = vec![0; WRITE_HEADROOM + MAX_MESSAGE_BYTES];
        assert!(matches!(encode_write_in_place(&envelope, &mut too_long), Err(CodecError::TooLarge(_))));
        let mut full = vec![0; WRITE_HEADROOM + CHUNK_SIZE];
        assert!(encode_write_in_place(&envelope, &mut full).is_ok());
    }

    #[test]
    fn golden_bytes_of_an_append() {
        let append = Envelope {
            request: Request::Write { path: "a/b".into(), offset: APPEND_AT_END, data: vec![1, 2, 3] },
            ..sample_envelope()
        };
        let bytes = encode_envelope(&append).unwrap();
        let at_end = [253, 255, 255, 255, 255, 255, 255, 255, 255]; // u64::MAX as u64 varint
        assert_eq!(bytes[bytes.len() - 13..bytes.len() - 4], at_end);
    }

    #[test]
    fn golden_bytes_of_an_error_reply() {
        let reply = Reply { request_id: 1, node: "n".into(), result: Err(ErrorCode::NotEmpty) };
        assert_eq!(encode_reply(&reply).unwrap(), vec![1, 1, b'n', 1, 2]);
    }

    /// The read-from-log pair was appended after the first release: request
    /// variant 14, payload variant 7, so older peers keep decoding the rest.
    #[test]
    fn golden_bytes_of_a_read_from_log_and_its_location() {
        let mut envelope = sample_envelope();
        envelope.request = Request::ReadFromLog { path: "f".into(), offset: 2, len: 3 };
        let bytes = encode_envelope(&envelope).unwrap();
        assert_eq!(bytes[bytes.len() - 5..], [14, 1, b'f', 2, 3]);
        let location = LogLocation { partition: 1, offset: 2, request_id: 3, file_offset: 4, skip: 5, len: 6 };
        let reply = Reply { request_id: 1, node: "n".into(), result: Ok(Payload::InLog(location)) };
        // partition and offset are zigzag varints.
        assert_eq!(encode_reply(&reply).unwrap(), vec![1, 1, b'n', 0, 7, 2, 4, 3, 4, 5, 6]);
    }

    /// Appended after the read-from-log pair: request variant 15, payload
    /// variant 8.
    #[test]
    fn golden_bytes_of_a_locate_in_log_and_its_answer() {
        let mut envelope = sample_envelope();
        envelope.request = Request::LocateInLog { path: "f".into(), offset: 2, len: 3 };
        let bytes = encode_envelope(&envelope).unwrap();
        assert_eq!(bytes[bytes.len() - 5..], [15, 1, b'f', 2, 3]);
        let location = LogLocation { partition: 1, offset: 2, request_id: 3, file_offset: 4, skip: 5, len: 6 };
        let located = Payload::Located { locations: vec![location], size: 7 };
        let reply = Reply { request_id: 1, node: "n".into(), result: Ok(located) };
        assert_eq!(encode_reply(&reply).unwrap(), vec![1, 1, b'n', 0, 8, 1, 2, 4, 3, 4, 5, 6, 7]);
    }

    /// Appended after the locate pair: request variant 16, payload variant 9.
    #[test]
    fn golden_bytes_of_a_batch_and_its_answer() {
        let mut envelope = sample_envelope();
        let unlink = Batched { request_id: 8, request: Request::Unlink { path: "f".into() } };
        envelope.request =
            Request::Batch { requests: vec![unlink, Batched { request_id: 9, request: Request::StatFs }] };
        let bytes = encode_envelope(&envelope).unwrap();
        assert_eq!(bytes[bytes.len() - 8..], [16, 2, 8, 6, 1, b'f', 9, 12]);
        let answers = Payload::Batch(vec![Ok(Payload::Done), Err(ErrorCode::NotFound)]);
        let reply = Reply { request_id: 1, node: "n".into(), result: Ok(answers) };
        assert_eq!(encode_reply(&reply).unwrap(), vec![1, 1, b'n', 0, 9, 2, 0, 6, 1, 0]);
    }

    /// Appended after the batch pair: request variant 17, payload variant 10.
    #[test]
    fn golden_bytes_of_a_copy_range_and_its_answer() {
        let mut envelope = sample_envelope();
        envelope.request =
            Request::CopyRange { from: "a".into(), from_offset: 1, to: "b".into(), to_offset: 2, len: 3 };
        let bytes = encode_envelope(&envelope).unwrap();
        assert_eq!(bytes[bytes.len() - 8..], [17, 1, b'a', 1, 1, b'b', 2, 3]);
        let attr = FileAttr {
            kind: FileKind::File,
            size: 4,
            mode: 5,
            nlink: 1,
            atime: Timestamp { secs: 6, nanos: 0 },
            mtime: Timestamp { secs: 7, nanos: 0 },
            ctime: Timestamp { secs: 8, nanos: 0 },
            blocks: 9,
            link: None,
        };
        let reply = Reply { request_id: 1, node: "n".into(), result: Ok(Payload::Copied { len: 3, attr }) };
        // Timestamps' seconds are zigzag varints.
        assert_eq!(encode_reply(&reply).unwrap(), vec![1, 1, b'n', 0, 10, 3, 0, 4, 5, 1, 12, 0, 14, 0, 16, 0, 9, 0]);
    }

    /// Appended after the copy pair: request variant 18, payload variant 11.
    #[test]
    fn golden_bytes_of_a_read_files_and_its_answer() {
        let mut envelope = sample_envelope();
        envelope.request = Request::ReadFiles { paths: vec!["a".into(), "b".into()] };
        let bytes = encode_envelope(&envelope).unwrap();
        assert_eq!(bytes[bytes.len() - 6..], [18, 2, 1, b'a', 1, b'b']);
        let t = Timestamp { secs: 1, nanos: 0 };
        let attr = FileAttr {
            kind: FileKind::File,
            size: 2,
            mode: 3,
            nlink: 1,
            atime: t,
            mtime: t,
            ctime: t,
            blocks: 4,
            link: None,
        };
        let files = Payload::Files(vec![Ok(FileContent { attr, data: b"hi".to_vec() }), Err(ErrorCode::TooLarge)]);
        let reply = Reply { request_id: 1, node: "n".into(), result: Ok(files) };
        assert_eq!(
            encode_reply(&reply).unwrap(),
            vec![1, 1, b'n', 0, 11, 2, 0, 0, 2, 3, 1, 2, 0, 2, 0, 2, 0, 4, 0, 2, b'h', b'i', 1, 13]
        );
    }

    /// Appended after the read-files pair: request variant 19, payload variant 12.
    #[test]
    fn golden_bytes_of_a_read_tree_and_its_answer() {
        let mut envelope = sample_envelope();
        envelope.request = Request::ReadTree { path: "d".into() };
        let bytes = encode_envelope(&envelope).unwrap();
        assert_eq!(bytes[bytes.len() - 3..], [19, 1, b'd']);
        let t = Timestamp { secs: 1, nanos: 0 };
        // A file with two names carries its identity.
        let attr = FileAttr {
            kind: FileKind::File,
            size: 2,
            mode: 3,
            nlink: 2,
            atime: t,
            mtime: t,
            ctime: t,
            blocks: 4,
            link: Some(5),
        };
        let listing = Listing { path: "d".into(), entries: vec![DirEntry { name: "f".into(), attr }], more: false };
        let reply = Reply { request_id: 1, node: "n".into(), result: Ok(Payload::Tree(vec![listing])) };
        assert_eq!(
            encode_reply(&reply).unwrap(),
            vec![1, 1, b'n', 0, 12, 1, 1, b'd', 1, 1, b'f', 0, 2, 3, 2, 2, 0, 2, 0, 2, 0, 4, 1, 5, 0]
        );
    }

    /// Appended after mknod: request variant 23, change variant 4.
    #[test]
    fn golden_bytes_of_a_link_and_its_event() {
        let mut envelope = sample_envelope();
        envelope.request = Request::Link { from: "a".into(), to: "b".into() };
        let bytes = encode_envelope(&envelope).unwrap();
        assert_eq!(bytes[bytes.len() - 5..], [23, 1, b'a', 1, b'b']);
        let linked = Change::Linked { from: "a".into(), to: "b".into() };
        assert_eq!(event_bytes(linked), vec![3, 1, b'U', 1, b'o', 3, 4, 1, b'a', 1, b'b']);
    }

    /// Appended after link: request variant 24, error code 14.
    #[test]
    fn golden_bytes_of_a_fallocate_and_its_refusal() {
        let mut envelope = sample_envelope();
        envelope.request = Request::Allocate { path: "f".into(), offset: 1, len: 2, mode: AllocateMode::PunchHole };
        let bytes = encode_envelope(&envelope).unwrap();
        assert_eq!(bytes[bytes.len() - 6..], [24, 1, b'f', 1, 2, 2]);
        let reply = Reply { request_id: 1, node: "n".into(), result: Err(ErrorCode::NotSupported) };
        assert_eq!(encode_reply(&reply).unwrap(), vec![1, 1, b'n', 1, 14]);
    }

    #[test]
    fn hostile_length_prefix_is_refused_without_allocating() {
        // A string length claiming ~2^60 bytes.
        let mut bytes = vec![1, 7, 253];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(decode_envelope(&bytes), Err(CodecError::Decode(_))));
    }

    #[test]
    fn oversized_and_trailing_input_is_refused() {
        assert!(matches!(decode_envelope(&vec![0; MAX_MESSAGE_BYTES + 1]), Err(CodecError::TooLarge(_))));
        let mut bytes = encode_envelope(&sample_envelope()).unwrap();
        bytes.push(0);
        assert!(matches!(decode_envelope(&bytes), Err(CodecError::Trailing(1))));
        let big = Envelope {
            request: Request::Write { path: "x".into(), offset: 0, data: vec![0; MAX_MESSAGE_BYTES] },
            ..sample_envelope()
        };
        assert!(encode_envelope(&big).is_err());
    }

    /// A full chunk must fit in one message with the longest path, a long
    /// user name, token and reply topic: CHUNK_SIZE leaves room for them.
    /// A read block's reply stays under Kafka's default message limit.
    #[test]
    fn a_full_chunk_fits_with_the_largest_envelope() {
        use crate::limits::{CHUNK_SIZE, MAX_NAME_BYTES, MAX_PATH_BYTES, READ_BLOCK_SIZE};
        let envelope = Envelope {
            reply_to: "r".repeat(MAX_NAME_BYTES),
            user: "u".repeat(MAX_NAME_BYTES),
            token: "t".repeat(MAX_NAME_BYTES),
            request: Request::Write { path: "p".repeat(MAX_PATH_BYTES), offset: u64::MAX, data: vec![7; CHUNK_SIZE] },
            ..sample_envelope()
        };
        let bytes = encode_envelope(&envelope).unwrap();
        assert_eq!(decode_envelope(&bytes).unwrap(), envelope);
        let reply = Reply {
            request_id: u64::MAX,
            node: "n".repeat(MAX_NAME_BYTES),
            result: Ok(Payload::Data(vec![7; READ_BLOCK_SIZE])),
        };
        let encoded = encode_reply(&reply).unwrap();
        assert!(encoded.len() < 1_000_000, "{} bytes", encoded.len());
        assert_eq!(decode_reply(&encoded).unwrap(), reply);
    }

    /// The encoding of an event of user `U` from origin `o`, request 3,
    /// checked to decode back to the same event.
    fn event_bytes(change: Change) -> Vec<u8> {
        let event = Event { version: PROTOCOL_VERSION, user: "U".into(), origin: "o".into(), request_id: 3, change };
        let bytes = encode_event(&event).unwrap();
        assert_eq!(decode_event(&bytes).unwrap(), event);
        bytes
    }

    #[test]
    fn golden_bytes_of_an_event() {
        let renamed = Change::Renamed { from: "a".into(), to: "b".into() };
        assert_eq!(event_bytes(renamed), vec![3, 1, b'U', 1, b'o', 3, 3, 1, b'a', 1, b'b']);
        let exchanged = Change::Exchanged { a: "a".into(), b: "b".into() };
        assert_eq!(event_bytes(exchanged), vec![3, 1, b'U', 1, b'o', 3, 5, 1, b'a', 1, b'b']);
    }

    proptest! {
        #[test]
        fn round_trip(id: u64, path in ".{0,40}", offset: u64, data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let env = Envelope {
                request_id: id,
                request: Request::Write { path, offset, data },
                ..sample_envelope()
            };
            let back = decode_envelope(&encode_envelope(&env).unwrap()).unwrap();
            prop_assert_eq!(back, env);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_envelope(&bytes);
            let _ = decode_reply(&bytes);
        }
    }
}
