//! Session tokens: `<expiry-secs>.<hex HMAC-SHA256(user, expiry)>`.
//!
//! The key is derived from the user's stored password hash, so every storage
//! daemon that reads the same credentials file verifies the same tokens
//! without sharing any other secret, and changing a password revokes the
//! user's sessions. Expiry is compared with the envelope's time, never the
//! daemon's clock, so replaying the log on a replica gives the same verdict.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use dfos_protocol::Timestamp;

/// Sessions last long enough for a mount that stays up for weeks; mountd
/// logs in again when a token is refused.
pub const SESSION_LIFETIME_SECS: i64 = 30 * 24 * 3600;

fn mac(user: &str, password_hash: &str, expiry: i64) -> Hmac<Sha256> {
    let key = Sha256::new().chain_update(b"dfos-session-v1\0").chain_update(password_hash.as_bytes()).finalize();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(user.as_bytes());
    mac.update(b"\0");
    mac.update(&expiry.to_be_bytes());
    mac
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// How many seconds ago `t` was by this daemon's clock (negative if ahead).
pub fn age_secs(t: Timestamp) -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    now - t.secs
}

pub fn issue(user: &str, password_hash: &str, now: Timestamp) -> String {
    let expiry = now.secs.saturating_add(SESSION_LIFETIME_SECS);
    let tag = mac(user, password_hash, expiry).finalize().into_bytes();
    format!("{expiry}.{}", hex(&tag))
}

pub fn verify(token: &str, user: &str, password_hash: &str, now: Timestamp) -> bool {
    let Some((expiry, tag)) = token.split_once('.') else {
        return false;
    };
    let (Ok(expiry), Some(tag)) = (expiry.parse::<i64>(), unhex(tag)) else {
        return false;
    };
    expiry > now.secs && mac(user, password_hash, expiry).verify_slice(&tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp { secs: 1000, nanos: 0 };

    #[test]
    fn a_token_verifies_only_for_its_user_key_and_lifetime() {
        let token = issue("alice", "hashA", NOW);
        assert!(verify(&token, "alice", "hashA", NOW));
        assert!(!verify(&token, "bob", "hashA", NOW));
        assert!(!verify(&token, "alice", "hashB", NOW));
        let late = Timestamp { secs: NOW.secs + SESSION_LIFETIME_SECS, nanos: 0 };
        assert!(!verify(&token, "alice", "hashA", late));
    }

    #[test]
    fn forged_tokens_fail() {
        for bad in ["", ".", "abc", "99999999999.00", "1.zz", "1000000000000.", &"9".repeat(100)] {
            assert!(!verify(bad, "alice", "hashA", NOW), "{bad:?}");
        }
        let token = issue("alice", "hashA", NOW);
        let (exp, tag) = token.split_once('.').unwrap();
        let longer = format!("{}.{tag}", exp.parse::<i64>().unwrap() + 1);
        assert!(!verify(&longer, "alice", "hashA", NOW));
    }
}
