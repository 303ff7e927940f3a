//! A write's data gathered where its message will be.
//!
//! A chunk that grows past [`MAX_BATCHED_DATA_BYTES`] (a large write, which
//! travels in a message of its own) keeps its bytes behind
//! [`WRITE_HEADROOM`] bytes of room, so sending it writes the envelope in
//! front of the data ([`dfos_protocol::encode_write_in_place`]) instead of
//! copying every byte into a new message: one copy fewer per byte written
//! (perf had put mountd's user-space copies at nearly half its samples
//! while writing). A smaller one is a plain buffer: it joins a batch as the
//! data of an ordinary `Write`, uncopied.

use dfos_protocol::limits::{CHUNK_SIZE, MAX_BATCHED_DATA_BYTES};
use dfos_protocol::WRITE_HEADROOM;

#[derive(Default)]
pub struct Chunk {
    buffer: Vec<u8>,
    /// The buffer starts with `WRITE_HEADROOM` bytes of room.
    framed: bool,
}

/// What a chunk is ready to become.
pub enum Gathered {
    /// Small: the data of a `Write` request.
    Data(Vec<u8>),
    /// Large: room for the envelope, then the data.
    Framed(Vec<u8>),
}

impl Chunk {
    pub fn data(&self) -> &[u8] {
        if self.framed {
            &self.buffer[WRITE_HEADROOM..]
        } else {
            &self.buffer
        }
    }

    pub fn len(&self) -> usize {
        self.data().len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// Appends `data`; the chunk must stay within `CHUNK_SIZE`.
    pub fn extend(&mut self, data: &[u8]) {
        let len = self.len() + data.len();
        debug_assert!(len <= CHUNK_SIZE);
        if !self.framed && len > MAX_BATCHED_DATA_BYTES {
            // A large write from here on: room for a whole chunk at once.
            let mut framed = Vec::with_capacity(WRITE_HEADROOM + CHUNK_SIZE);
            framed.resize(WRITE_HEADROOM, 0);
            framed.extend_from_slice(&self.buffer);
            (self.buffer, self.framed) = (framed, true);
        }
        self.buffer.extend_from_slice(data);
    }

    pub fn into_gathered(self) -> Gathered {
        if self.framed {
            Gathered::Framed(self.buffer)
        } else {
            Gathered::Data(self.buffer)
        }
    }

    /// A write's data as a chunk again (given back by a batch it could
    /// not join). Sent as it is, it is copied into its message.
    pub fn plain(data: Vec<u8>) -> Chunk {
        Chunk { buffer: data, framed: false }
    }

    /// Just the data.
    pub fn into_data(self) -> Vec<u8> {
        match self.into_gathered() {
            Gathered::Data(data) => data,
            Gathered::Framed(buffer) => buffer[WRITE_HEADROOM..].to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_chunk_is_plain_and_a_large_one_sits_behind_the_headroom() {
        let mut chunk = Chunk::default();
        assert!(chunk.is_empty() && chunk.data().is_empty());
        chunk.extend(b"abc");
        chunk.extend(b"de");
        assert_eq!((chunk.data(), chunk.len()), (&b"abcde"[..], 5));
        assert!(matches!(chunk.into_gathered(), Gathered::Data(data) if data == b"abcde"));

        let mut chunk = Chunk::default();
        chunk.extend(b"abcde");
        chunk.extend(&vec![7; CHUNK_SIZE - 5]);
        assert_eq!(chunk.len(), CHUNK_SIZE);
        assert_eq!(&chunk.data()[..6], b"abcde\x07");
        let Gathered::Framed(buffer) = chunk.into_gathered() else { panic!("a full chunk is framed") };
        assert_eq!(buffer.len(), WRITE_HEADROOM + CHUNK_SIZE);
        assert_eq!(&buffer[WRITE_HEADROOM..WRITE_HEADROOM + 5], b"abcde");
    }
}
