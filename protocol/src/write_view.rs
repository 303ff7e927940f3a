//! A `Write` request read in place: its strings and file data borrowed from
//! the message bytes instead of copied out of them.
//!
//! File data is most of every byte dfos moves. A reader that only needs to
//! look at a logged write (mountd serving reads straight from the request
//! log, storaged copying data to disk) decodes it with [`decode_write_view`]
//! and pays no copy and no allocation for the data. The view decodes the
//! same bytes as [`crate::decode_envelope`], with the same size limit, and
//! refuses every request that is not a `Write`.

use serde::de::{self, Deserialize, Deserializer, EnumAccess, SeqAccess, VariantAccess, Visitor};

use crate::codec::{decode_borrowed, CodecError};
use crate::Timestamp;

/// Index of `Request::Write` in the request enum (bincode encodes variant
/// indexes; the golden test of the envelope pins it).
const WRITE_VARIANT: u32 = 10;

/// The parts of a logged `Write` envelope that readers of its data check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteView<'a> {
    pub request_id: u64,
    pub user: &'a str,
    pub client_time: Timestamp,
    pub path: &'a str,
    pub offset: u64,
    pub data: &'a [u8],
}

/// Decodes `bytes` as an envelope carrying a `Write`, borrowing from them.
/// Any other request is a decode error.
pub fn decode_write_view(bytes: &[u8]) -> Result<WriteView<'_>, CodecError> {
    let envelope: EnvelopeOfWrite = decode_borrowed(bytes)?;
    let WriteFields { path, offset, data } = envelope.request;
    Ok(WriteView {
        request_id: envelope.request_id,
        user: envelope.user,
        client_time: envelope.client_time,
        path,
        offset,
        data,
    })
}

/// Field for field the shape of [`crate::Envelope`], borrowed.
#[derive(serde::Deserialize)]
struct EnvelopeOfWrite<'a> {
    #[allow(dead_code)]
    version: u16,
    request_id: u64,
    #[allow(dead_code)]
    reply_to: &'a str,
    user: &'a str,
    #[allow(dead_code)]
    token: &'a str,
    client_time: Timestamp,
    #[serde(borrow)]
    request: WriteFields<'a>,
}

struct WriteFields<'a> {
    path: &'a str,
    offset: u64,
    data: &'a [u8],
}

impl<'de: 'a, 'a> Deserialize<'de> for WriteFields<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_enum("Request", &[], OnlyWrite)
    }
}

struct OnlyWrite;

impl<'de> Visitor<'de> for OnlyWrite {
    type Value = WriteFields<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a Write request")
    }

    fn visit_enum<A: EnumAccess<'de>>(self, request: A) -> Result<Self::Value, A::Error> {
        let (variant, fields) = request.variant::<u32>()?;
        if variant != WRITE_VARIANT {
            return Err(de::Error::custom(format!("request variant {variant} is not a Write")));
        }
        fields.struct_variant(&["path", "offset", "data"], self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut fields: A) -> Result<Self::Value, A::Error> {
        let missing = |field| de::Error::custom(format!("Write without {field}"));
        let path = fields.next_element()?.ok_or_else(|| missing("path"))?;
        let offset = fields.next_element()?.ok_or_else(|| missing("offset"))?;
        let data = fields.next_element()?.ok_or_else(|| missing("data"))?;
        Ok(WriteFields { path, offset, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_envelope, Envelope, Request, PROTOCOL_VERSION};
    use proptest::prelude::*;

    fn envelope(request: Request) -> Envelope {
        Envelope {
            version: PROTOCOL_VERSION,
            request_id: 42,
            reply_to: "dfos.reply.m".into(),
            user: "U".into(),
            token: "t".into(),
            client_time: Timestamp { secs: 5, nanos: 6 },
            request,
        }
    }

    proptest! {
        #[test]
        fn a_view_sees_what_the_full_decode_sees(
            path in "[a-z/]{0,40}", offset in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..5000),
        ) {
            let bytes = encode_envelope(&envelope(Request::Write { path: path.clone(), offset, data: data.clone() })).unwrap();
            let view = decode_write_view(&bytes).unwrap();
            prop_assert_eq!(view.request_id, 42);
            prop_assert_eq!(view.user, "U");
            prop_assert_eq!(view.client_time, Timestamp { secs: 5, nanos: 6 });
            prop_assert_eq!(view.path, path.as_str());
            prop_assert_eq!(view.offset, offset);
            prop_assert_eq!(view.data, data.as_slice());
            // Borrowed: the data is the message's own bytes, its tail.
            prop_assert_eq!(view.data.as_ptr_range().end, bytes.as_ptr_range().end);
        }
    }

    #[test]
    fn other_requests_garbage_and_trailing_bytes_are_refused() {
        let read = encode_envelope(&envelope(Request::Read { path: "f".into(), offset: 0, len: 1 })).unwrap();
        assert!(decode_write_view(&read).is_err());
        assert!(decode_write_view(b"garbage").is_err());
        let mut write =
            encode_envelope(&envelope(Request::Write { path: "f".into(), offset: 0, data: vec![1] })).unwrap();
        assert!(decode_write_view(&write[..write.len() - 1]).is_err(), "truncated");
        write.push(0);
        assert!(matches!(decode_write_view(&write), Err(CodecError::Trailing(1))));
    }
}
