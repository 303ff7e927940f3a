//! File names as the kernel gives them (any bytes but `/` and NUL) and as
//! the protocol carries them (UTF-8 strings).
//!
//! A name that is valid UTF-8 travels as it is. A byte that is not part of
//! valid UTF-8 (a Latin-1 name from an old tar archive, say) travels as one
//! character of a reserved range, U+10FF80 to U+10FFFF, one per byte value
//! 0x80 to 0xFF, and comes back as that byte: the mapping is the same on
//! every mount, so every mount sees the bytes that were written, and a
//! storage node keeps the name in its reserved-character form. A name whose
//! valid UTF-8 holds a reserved character itself cannot be told from an
//! escaped one and is refused (EINVAL).

use std::borrow::Cow;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// The character that stands for byte `0x80 + n` is `RESERVED_BASE + 0x80 + n`.
const RESERVED_BASE: u32 = 0x10FF00;

fn is_reserved(c: char) -> bool {
    c as u32 >= RESERVED_BASE + 0x80
}

/// `name` as the protocol carries it; `None` if it holds a reserved
/// character as valid UTF-8.
pub fn to_wire(name: &OsStr) -> Option<Cow<'_, str>> {
    let bytes = name.as_bytes();
    if let Ok(text) = std::str::from_utf8(bytes) {
        return (!text.chars().any(is_reserved)).then_some(Cow::Borrowed(text));
    }
    let mut wire = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        if chunk.valid().chars().any(is_reserved) {
            return None;
        }
        wire.push_str(chunk.valid());
        for &byte in chunk.invalid() {
            wire.push(char::from_u32(RESERVED_BASE + u32::from(byte)).expect("in the supplementary planes"));
        }
    }
    Some(Cow::Owned(wire))
}

/// The name the kernel is given for `wire`, a name as the protocol carries it.
pub fn from_wire(wire: &str) -> Cow<'_, OsStr> {
    if !wire.chars().any(is_reserved) {
        return Cow::Borrowed(OsStr::new(wire));
    }
    let mut bytes = Vec::with_capacity(wire.len());
    for c in wire.chars() {
        if is_reserved(c) {
            bytes.push((c as u32 - RESERVED_BASE) as u8);
        } else {
            bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
        }
    }
    Cow::Owned(OsString::from_vec(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn utf8_names_travel_unchanged_and_latin1_bytes_as_reserved_characters() {
        assert!(matches!(to_wire(OsStr::new("née.txt")), Some(Cow::Borrowed("née.txt"))));
        let latin1 = OsStr::from_bytes(b"caf\xe9 \xff.txt");
        let wire = to_wire(latin1).unwrap();
        assert_eq!(wire, "caf\u{10FFE9} \u{10FFFF}.txt");
        assert_eq!(from_wire(&wire), latin1);
        assert!(matches!(from_wire("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn a_reserved_character_given_as_utf8_is_refused() {
        assert!(to_wire(OsStr::new("a\u{10FFE9}")).is_none());
        let mixed = [b"\xe9".as_slice(), "\u{10FF80}".as_bytes()].concat();
        assert!(to_wire(OsStr::from_bytes(&mixed)).is_none());
        assert!(to_wire(OsStr::new("\u{10FF7F} is not reserved")).is_some());
    }

    proptest! {
        #[test]
        fn any_name_the_kernel_can_give_comes_back_as_it_went(bytes in proptest::collection::vec(1u8..=255, 1..64)) {
            let name = OsStr::from_bytes(&bytes);
            if let Some(wire) = to_wire(name) {
                prop_assert_eq!(from_wire(&wire), name);
            } else {
                prop_assert!(String::from_utf8_lossy(&bytes).chars().any(is_reserved));
            }
        }
    }
}
