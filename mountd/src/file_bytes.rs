//! Bytes of a file handed to the kernel: a range of a shared buffer.
//!
//! A fetched chunk stays in one buffer (a reply's decoded data, or the
//! Kafka client's own copy of a logged write), and every block, small file
//! and read answered from it is a range of that buffer, so the reply to the
//! kernel is the only copy after the bytes arrived.

use std::ops::Range;
use std::sync::Arc;

/// Whatever owns the bytes: a `Vec`, or a message held from the Kafka client.
pub trait Backing: AsRef<[u8]> + Send + Sync {}
impl<T: AsRef<[u8]> + Send + Sync> Backing for T {}

#[derive(Clone)]
pub struct FileBytes {
    data: Arc<dyn Backing>,
    range: Range<usize>,
}

impl FileBytes {
    /// `range` of `data`, clamped to its length.
    pub fn shared(data: Arc<dyn Backing>, range: Range<usize>) -> Self {
        FileBytes { range: clamp(range, (*data).as_ref().len()), data }
    }

    /// `range` of these bytes (not of the whole buffer), clamped to them.
    pub fn slice(&self, range: Range<usize>) -> Self {
        let range = clamp(range, self.len());
        FileBytes { range: self.range.start + range.start..self.range.start + range.end, data: self.data.clone() }
    }
}

fn clamp(range: Range<usize>, len: usize) -> Range<usize> {
    let end = range.end.min(len);
    range.start.min(end)..end
}

impl From<Vec<u8>> for FileBytes {
    fn from(data: Vec<u8>) -> Self {
        FileBytes { range: 0..data.len(), data: Arc::new(data) }
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &(*self.data).as_ref()[self.range.clone()]
    }
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "FileBytes({} bytes)", self.len())
    }
}

impl<T: AsRef<[u8]>> PartialEq<T> for FileBytes {
    fn eq(&self, other: &T) -> bool {
        **self == *other.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_slices_stay_within_their_bytes() {
        let bytes = FileBytes::shared(Arc::new((0..10).collect::<Vec<u8>>()), 2..8);
        assert_eq!(bytes, [2, 3, 4, 5, 6, 7]);
        assert_eq!(bytes.slice(1..3), [3, 4]);
        assert_eq!(bytes.slice(4..100), [6, 7], "clamped to the slice, not the buffer");
        assert_eq!(bytes.slice(9..12), [] as [u8; 0]);
        assert_eq!(FileBytes::shared(Arc::new(vec![1, 2]), 5..9), [] as [u8; 0]);
    }
}
