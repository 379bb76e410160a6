//! Masking of result values: the strategies of mask rules, and the keyed
//! hash behind `strategy = "hash"`. How a masked value is written for a
//! column's type is the wire module's to say (for PostgreSQL,
//! `protocol::postgres::types`).

use sha2::{Digest, Sha256};

use crate::policy::Strategy;

/// Masks values with a per-agent key.
pub struct Masker {
    key: [u8; 32],
}

impl Masker {
    /// A masker whose hashes are stable as long as `secret` is.
    pub fn new(secret: &[u8]) -> Self {
        Masker {
            key: Sha256::digest(secret).into(),
        }
    }

    /// A masker with a random key (hashes change when the agent restarts).
    pub fn random() -> std::io::Result<Self> {
        let mut secret = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut secret)?;
        Ok(Masker::new(&secret))
    }

    /// The masked form of a text-like value.
    pub fn mask(&self, strategy: Strategy, keep: usize, value: &[u8]) -> Vec<u8> {
        match strategy {
            Strategy::Redact => b"****".to_vec(),
            Strategy::Partial => {
                let s = String::from_utf8_lossy(value);
                let chars: Vec<char> = s.chars().collect();
                if chars.len() <= keep {
                    return b"****".to_vec();
                }
                let tail: String = chars[chars.len() - keep..].iter().collect();
                format!("****{tail}").into_bytes()
            }
            Strategy::Hash => crate::identity::hex(&self.hmac(value)[..8]).into_bytes(),
        }
    }

    /// HMAC-SHA-256 (RFC 2104) of `msg` with the masker's key.
    pub fn hmac(&self, msg: &[u8]) -> [u8; 32] {
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&self.key);
        let pad = |b: u8| -> [u8; 64] { std::array::from_fn(|i| block[i] ^ b) };
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(msg)
            .finalize();
        Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize()
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies() {
        let m = Masker::new(b"k");
        assert_eq!(m.mask(Strategy::Redact, 4, b"alice@example.com"), b"****");
        assert_eq!(
            m.mask(Strategy::Partial, 4, b"4111111111111111"),
            b"****1111"
        );
        assert_eq!(m.mask(Strategy::Partial, 4, b"abc"), b"****");
        assert_eq!(
            m.mask(Strategy::Partial, 2, "héllo".as_bytes()),
            "****lo".as_bytes()
        );
        let a = m.mask(Strategy::Hash, 0, b"x");
        assert_eq!(a.len(), 16);
        assert_eq!(a, m.mask(Strategy::Hash, 0, b"x"));
        assert_ne!(a, m.mask(Strategy::Hash, 0, b"y"));
        assert_ne!(a, Masker::new(b"other").mask(Strategy::Hash, 0, b"x"));
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        // Key "Jefe" hashed to 32 bytes is not the RFC key, so build the
        // masker around the raw key directly.
        let mut m = Masker::new(b"");
        m.key = [0; 32];
        m.key[..4].copy_from_slice(b"Jefe");
        assert_eq!(
            crate::identity::hex(&m.hmac(b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
