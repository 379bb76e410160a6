//! Masking of result values: the strategies of mask rules, and the keyed
//! hash behind `strategy = "hash"`.
//!
//! Only text-like values are rewritten (their wire form is the same in text
//! and binary formats); a masked value of any other type becomes NULL, the
//! one replacement that is valid for every type and format.

use sha2::{Digest, Sha256};

use crate::policy::Strategy;

/// PostgreSQL type OIDs whose binary form is their text: text, varchar,
/// bpchar, name, unknown.
const TEXT_LIKE: &[u32] = &[25, 1043, 1042, 19, 705];
/// `json`: text in both forms, which must stay JSON.
const JSON: u32 = 114;

/// How a masked value of a column's type is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The strategy's text as it is.
    Text,
    /// The strategy's text as a JSON string (`"****1234"`), so drivers that
    /// decode `json` still can.
    Json,
    /// NULL: valid for every type and format (`jsonb`, numbers, …).
    Null,
}

impl Form {
    pub fn of(type_oid: u32) -> Self {
        if TEXT_LIKE.contains(&type_oid) {
            Form::Text
        } else if type_oid == JSON {
            Form::Json
        } else {
            Form::Null
        }
    }
}

/// Built-in PostgreSQL types a mask rule can name in `types`, with the
/// names PostgreSQL itself accepts for them, and their OIDs.
const TYPES: &[(&[&str], u32)] = &[
    (&["text"], 25),
    (&["varchar", "character varying"], 1043),
    (&["bpchar", "char", "character"], 1042),
    (&["name"], 19),
    (&["json"], 114),
    (&["jsonb"], 3802),
    (&["xml"], 142),
    (&["uuid"], 2950),
    (&["bytea"], 17),
    (&["bool", "boolean"], 16),
    (&["int2", "smallint"], 21),
    (&["int4", "integer", "int"], 23),
    (&["int8", "bigint"], 20),
    (&["numeric", "decimal"], 1700),
    (&["float4", "real"], 700),
    (&["float8", "double precision"], 701),
    (&["money"], 790),
    (&["date"], 1082),
    (&["time"], 1083),
    (&["timestamp"], 1114),
    (&["timestamptz"], 1184),
    (&["interval"], 1186),
    (&["inet"], 869),
    (&["cidr"], 650),
    (&["macaddr"], 829),
    (&["oid"], 26),
];

/// The OID of the built-in type called `name` (any case), if there is one.
pub fn type_oid(name: &str) -> Option<u32> {
    let name = name.to_ascii_lowercase();
    TYPES
        .iter()
        .find(|(names, _)| names.contains(&name.as_str()))
        .map(|&(_, oid)| oid)
}

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

    /// The masked value of a column of form `form` (`None`: NULL).
    pub fn masked(
        &self,
        form: Form,
        strategy: Strategy,
        keep: usize,
        value: &[u8],
    ) -> Option<Vec<u8>> {
        match form {
            Form::Text => Some(self.mask(strategy, keep, value)),
            Form::Json => {
                let text = String::from_utf8_lossy(&self.mask(strategy, keep, value)).into_owned();
                Some(serde_json::Value::String(text).to_string().into_bytes())
            }
            Form::Null => None,
        }
    }

    /// HMAC-SHA-256 (RFC 2104) of `msg` with the masker's key.
    fn hmac(&self, msg: &[u8]) -> [u8; 32] {
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
