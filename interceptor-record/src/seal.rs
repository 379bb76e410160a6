//! Checkpoints of the evidence log, signed with the node's Ed25519 key, in
//! the form of C2SP's tlog-checkpoint and signed-note:
//!
//! ```text
//! <origin>
//! <size>
//! <base64 hash of entry size-1>
//! time <RFC 3339>
//! from <size of the checkpoint before> <its base64 hash>
//!
//! — <origin> <base64(key id ‖ signature)>
//! ```
//!
//! The head is the hash of the newest entry of a hash chain (see
//! [`crate::log`]), not a Merkle root. The `from` line binds each seal to
//! the range it covers: it names the checkpoint before, so checkpoints form
//! a chain of their own, and an old range cannot be sealed again by a
//! newer one without breaking it. The key id is the first four bytes of
//! SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key), as signed-note defines it for
//! Ed25519; a responder pins the key as its verifier key
//! (`<name>+<key id hex>+<base64(0x01 ‖ public key)>`) or its fingerprint
//! (`SHA256:` and the hex SHA-256 of the public key).

use std::{io::Write, path::Path};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::{hex, parse_rfc3339_micros, rfc3339_micros};

/// The node's signing key (`DATA_DIR/node.key`: 32 secret bytes, 0600).
pub struct NodeKey {
    signing: SigningKey,
    public: PublicKey,
}

impl NodeKey {
    /// The key in `path`, made (mode 0600, from /dev/urandom) if absent.
    pub fn load_or_create(path: &Path, name: &str) -> std::io::Result<NodeKey> {
        use std::os::unix::fs::OpenOptionsExt;
        match Self::load(path, name) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        let mut seed = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(&seed)?;
        f.sync_all()?;
        Ok(Self::from_seed(seed, name))
    }

    /// The key in `path` (never made).
    pub fn load(path: &Path, name: &str) -> std::io::Result<NodeKey> {
        let bytes = std::fs::read(path)?;
        let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} holds {} bytes, not a 32-byte Ed25519 key",
                    path.display(),
                    bytes.len()
                ),
            )
        })?;
        Ok(Self::from_seed(seed, name))
    }

    pub fn from_seed(seed: [u8; 32], name: &str) -> NodeKey {
        let signing = SigningKey::from_bytes(&seed);
        let public = PublicKey::new(name, signing.verifying_key());
        NodeKey { signing, public }
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The signed note of `cp`.
    pub fn sign(&self, cp: &Checkpoint) -> String {
        let body = cp.body();
        let sig = self.signing.sign(body.as_bytes());
        let mut blob = self.public.id.to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        format!(
            "{body}\n\u{2014} {} {}\n",
            self.public.name,
            B64.encode(blob)
        )
    }
}

/// A verifier key: a name and an Ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    key: VerifyingKey,
    id: [u8; 4],
}

impl PublicKey {
    fn new(name: &str, key: VerifyingKey) -> PublicKey {
        let mut h = Sha256::new();
        h.update(name.as_bytes());
        h.update(b"\n\x01");
        h.update(key.as_bytes());
        let id = h.finalize()[..4].try_into().expect("4 bytes");
        PublicKey {
            name: name.to_owned(),
            key,
            id,
        }
    }

    /// `<name>+<key id hex>+<base64(0x01 ‖ key)>`.
    pub fn vkey(&self) -> String {
        let mut blob = vec![1u8];
        blob.extend_from_slice(self.key.as_bytes());
        format!("{}+{}+{}", self.name, hex(&self.id), B64.encode(blob))
    }

    /// `SHA256:` and the hex SHA-256 of the 32-byte public key.
    pub fn fingerprint(&self) -> String {
        format!("SHA256:{}", hex(&Sha256::digest(self.key.as_bytes())))
    }

    /// Reads a verifier key ([`PublicKey::vkey`]).
    pub fn parse(vkey: &str) -> Result<PublicKey, String> {
        let vkey = vkey.trim();
        let bad = |why: &str| format!("`{vkey}` is not a verifier key (name+id+key): {why}");
        // Names never hold `+`; base64 may.
        let mut parts = vkey.splitn(3, '+');
        let (Some(name), Some(id), Some(blob)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected three parts joined by `+`"));
        };
        let blob = B64.decode(blob).map_err(|_| bad("the key is not base64"))?;
        let raw: [u8; 32] = match blob.split_first() {
            Some((1, rest)) => rest.try_into().map_err(|_| bad("not a 32-byte key"))?,
            _ => return Err(bad("not an Ed25519 key (type 0x01)")),
        };
        let key = VerifyingKey::from_bytes(&raw).map_err(|_| bad("not a valid Ed25519 point"))?;
        let out = PublicKey::new(name, key);
        if hex(&out.id) != id {
            return Err(bad("its id does not match its name and key"));
        }
        Ok(out)
    }

    /// The key a responder pinned (`pin`: a verifier key, or a
    /// fingerprint, which stands for the key the evidence names, `named`,
    /// if it matches), or why the evidence's key is not it. An error: `pin`
    /// is neither.
    pub fn pinned(
        pin: &str,
        named: Option<&PublicKey>,
    ) -> Result<Result<PublicKey, String>, String> {
        let pin = pin.trim();
        if !pin.starts_with("SHA256:") {
            return PublicKey::parse(pin).map(Ok);
        }
        Ok(match named {
            Some(k) if k.matches(pin) => Ok(k.clone()),
            _ => Err(Self::not_pinned(named, pin)),
        })
    }

    /// Says that the evidence names `named`, not the key `pin` names.
    pub fn not_pinned(named: Option<&PublicKey>, pin: &str) -> String {
        format!(
            "the evidence names key {}, not the pinned key {pin}",
            named.map_or("none".into(), PublicKey::fingerprint)
        )
    }

    /// Whether `pin` (a verifier key or a fingerprint) names this key.
    pub fn matches(&self, pin: &str) -> bool {
        let pin = pin.trim();
        if pin.starts_with("SHA256:") {
            return pin.eq_ignore_ascii_case(&self.fingerprint());
        }
        PublicKey::parse(pin).is_ok_and(|k| k.key == self.key)
    }
}

/// What a checkpoint says (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    /// Entries sealed: seqs below this.
    pub size: u64,
    /// Hash of entry `size - 1`.
    pub head: [u8; 32],
    /// When it was signed (µs since the epoch).
    pub at: u64,
    /// The checkpoint before: its size and head (0 and zeros for none).
    pub from: (u64, [u8; 32]),
}

impl Checkpoint {
    /// The note's text, ending with the blank line before the signatures.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\ntime {}\nfrom {} {}\n",
            self.origin,
            self.size,
            B64.encode(self.head),
            rfc3339_micros(self.at),
            self.from.0,
            B64.encode(self.from.1)
        )
    }

    /// Reads a signed note and checks its signature with `key`.
    pub fn open(note: &str, key: &PublicKey) -> Result<Checkpoint, String> {
        let (body, sigs) = note
            .split_once("\n\n")
            .ok_or("not a signed note (no blank line before the signatures)")?;
        let body = format!("{body}\n");
        let cp = Self::parse_body(&body)?;
        let mut seen = Vec::new();
        for line in sigs.lines().filter(|l| !l.is_empty()) {
            let rest = line
                .strip_prefix("\u{2014} ")
                .ok_or_else(|| format!("`{line}` is not a signature line"))?;
            let (name, blob) = rest
                .rsplit_once(' ')
                .ok_or_else(|| format!("`{line}` is not a signature line"))?;
            let blob = B64
                .decode(blob)
                .map_err(|_| format!("the signature of `{name}` is not base64"))?;
            if blob.len() != 68 {
                return Err(format!(
                    "the signature of `{name}` is not an Ed25519 signature"
                ));
            }
            if name == key.name && blob[..4] == key.id {
                let sig = ed25519_dalek::Signature::from_slice(&blob[4..])
                    .map_err(|_| "malformed signature".to_string())?;
                return key
                    .key
                    .verify_strict(body.as_bytes(), &sig)
                    .map(|()| cp)
                    .map_err(|_| {
                        format!(
                            "its signature does not verify with key {}",
                            key.fingerprint()
                        )
                    });
            }
            seen.push(format!("{name} (key id {})", hex(&blob[..4])));
        }
        Err(format!(
            "it is not signed by key {} ({}); signed by: {}",
            key.name,
            key.fingerprint(),
            if seen.is_empty() {
                "nobody".into()
            } else {
                seen.join(", ")
            }
        ))
    }

    fn parse_body(body: &str) -> Result<Checkpoint, String> {
        let mut lines = body.lines();
        let mut next = |what: &str| {
            lines
                .next()
                .ok_or_else(|| format!("the checkpoint has no {what}"))
        };
        let origin = next("origin")?.to_owned();
        let size = next("size")?
            .parse()
            .map_err(|_| "its size is not a number".to_string())?;
        let head = hash64(next("hash")?)?;
        let at = next("time")?
            .strip_prefix("time ")
            .and_then(parse_rfc3339_micros)
            .ok_or("its time line is malformed")?;
        let from = next("from line")?
            .strip_prefix("from ")
            .and_then(|f| f.split_once(' '))
            .ok_or("its from line is malformed")?;
        let from = (
            from.0
                .parse()
                .map_err(|_| "its from size is not a number".to_string())?,
            hash64(from.1)?,
        );
        Ok(Checkpoint {
            origin,
            size,
            head,
            at,
            from,
        })
    }
}

fn hash64(s: &str) -> Result<[u8; 32], String> {
    B64.decode(s)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("`{s}` is not a base64 SHA-256"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_sign_and_open_and_refuse_other_keys_and_edits() {
        let key = NodeKey::from_seed([7; 32], "host-a/interceptor");
        // Keys whose base64 holds `+` too.
        for seed in 0..40u8 {
            let k = NodeKey::from_seed([seed; 32], "h/interceptor");
            assert_eq!(&PublicKey::parse(&k.public().vkey()).unwrap(), k.public());
        }
        let cp = Checkpoint {
            origin: "host-a/interceptor".into(),
            size: 42,
            head: [3; 32],
            at: 1_800_000_000_000_000,
            from: (40, [2; 32]),
        };
        let note = key.sign(&cp);
        assert!(note.contains("\n\n\u{2014} host-a/interceptor "), "{note}");
        assert_eq!(Checkpoint::open(&note, key.public()).unwrap(), cp);

        let vkey = key.public().vkey();
        let parsed = PublicKey::parse(&vkey).unwrap();
        assert_eq!(&parsed, key.public());
        assert!(parsed.matches(&vkey) && parsed.matches(&key.public().fingerprint()));

        let other = NodeKey::from_seed([8; 32], "host-a/interceptor");
        assert!(!parsed.matches(&other.public().fingerprint()));
        let forged = other.sign(&cp);
        let e = Checkpoint::open(&forged, key.public()).unwrap_err();
        assert!(e.contains("not signed by key"), "{e}");

        let edited = note.replacen("42", "43", 1);
        let e = Checkpoint::open(&edited, key.public()).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        assert!(PublicKey::parse("nonsense").is_err());
        assert!(PublicKey::parse(&vkey.replacen('+', "x+", 1)).is_err());
    }
}
