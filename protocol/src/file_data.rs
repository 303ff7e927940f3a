//! Serde for file-data fields: the wire form of `serde_bytes` (a length and
//! the raw bytes), decoded with a single copy out of the message.
//!
//! `serde_bytes` asks for an owned buffer, which bincode fills by zeroing a
//! new `Vec` and then copying into it; for a 960 KiB chunk the zeroing cost
//! as much as the copy. Asking for the bytes instead lets bincode lend them
//! from the message, and they are copied once into the field.

use serde::de::{Deserializer, Error, Visitor};
use serde::Serializer;

pub fn serialize<S: Serializer>(data: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_bytes(data)
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    deserializer.deserialize_bytes(FileData)
}

struct FileData;

impl<'de> Visitor<'de> for FileData {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("file data")
    }

    fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
        Ok(bytes.to_vec())
    }

    fn visit_byte_buf<E: Error>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(bytes)
    }
}
