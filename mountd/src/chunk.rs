//! A write's data gathered where its message will be.
//!
//! The bytes of a chunk are kept behind [`WRITE_HEADROOM`] bytes of room,
//! so sending it writes the envelope in front of the data
//! ([`dfos_protocol::encode_write_in_place`]) instead of copying every byte
//! into a new message: one copy fewer per byte written (perf had put
//! mountd's user-space copies at nearly half its samples while writing).

use dfos_protocol::limits::CHUNK_SIZE;
use dfos_protocol::WRITE_HEADROOM;

/// A first write at least this long starts a stream of chunks: room for a
/// whole chunk is taken at once rather than grown into.
const STREAMING_WRITE: usize = 64 * 1024;

#[derive(Default)]
pub struct Chunk {
    /// Empty, or the headroom followed by the data.
    buffer: Vec<u8>,
}

impl Chunk {
    pub fn data(&self) -> &[u8] {
        self.buffer.get(WRITE_HEADROOM..).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.data().len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// Appends `data`; the chunk must stay within `CHUNK_SIZE`.
    pub fn extend(&mut self, data: &[u8]) {
        debug_assert!(self.len() + data.len() <= CHUNK_SIZE);
        if self.buffer.is_empty() {
            let room = if data.len() >= STREAMING_WRITE { CHUNK_SIZE } else { data.len() };
            self.buffer.reserve_exact(WRITE_HEADROOM + room);
            self.buffer.resize(WRITE_HEADROOM, 0);
        } else if self.len() + data.len() == CHUNK_SIZE {
            // Filled to the end: one exact allocation, not a doubling.
            self.buffer.reserve_exact(WRITE_HEADROOM + CHUNK_SIZE - self.buffer.len());
        }
        self.buffer.extend_from_slice(data);
    }

    /// The headroom and the data, for encoding in place.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buffer
    }

    /// Just the data.
    pub fn into_data(self) -> Vec<u8> {
        self.data().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_sits_behind_the_headroom_and_grows_to_a_whole_chunk() {
        let mut chunk = Chunk::default();
        assert!(chunk.is_empty() && chunk.data().is_empty());
        chunk.extend(b"abc");
        chunk.extend(b"de");
        assert_eq!((chunk.data(), chunk.len()), (&b"abcde"[..], 5));
        let rest = vec![7; CHUNK_SIZE - 5];
        chunk.extend(&rest);
        assert_eq!(chunk.len(), CHUNK_SIZE);
        let buffer = chunk.into_buffer();
        assert_eq!(buffer.len(), WRITE_HEADROOM + CHUNK_SIZE);
        assert_eq!(&buffer[WRITE_HEADROOM..WRITE_HEADROOM + 5], b"abcde");
    }
}
