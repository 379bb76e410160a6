//! Credential injection (`[[credential]]`, [docs/tls.md]): the agent logs
//! in to a target's server as a configured user for a workload, whose
//! applications then hold no database secret. The workload is still who
//! asks: policy and the record name it; the upstream user is a recorded
//! fact.
//!
//! Secrets live in files that must be root's alone (checked when the
//! configuration is loaded) and are read afresh for every upstream login,
//! so rotating one needs no restart. They are never logged, recorded or
//! shown: the configuration names the files, never what they hold.
//!
//! The login itself is SCRAM-SHA-256 (RFC 5802, RFC 7677), with channel
//! binding (`tls-server-end-point`, RFC 5929) over the agent's own TLS to
//! the server when it offers `-PLUS`: the math is here, the messages are
//! the protocol's.
//!
//! [docs/tls.md]: ../../docs/tls.md

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ring::{digest, hmac, pbkdf2, rand::SecureRandom};
use serde::{Deserialize, Serialize};

/// A `[[credential]]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub workload: toml::Spanned<String>,
    pub target: String,
    pub user: String,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    #[serde(default)]
    pub server_key_file: Option<PathBuf>,
}

/// The upstream identity a workload logs in to a target as.
#[derive(Debug, Clone, Serialize)]
pub struct Credential {
    pub workload: String,
    pub target: String,
    pub user: String,
    pub secret: Secret,
}

/// Where the secret is (the files only: their contents are read per login).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Secret {
    PasswordFile(PathBuf),
    /// SCRAM keys as PostgreSQL 18 hands them on (`scram_client_key`,
    /// `scram_server_key`): base64 of the 32-byte ClientKey and ServerKey.
    ScramKeys {
        client_key_file: PathBuf,
        server_key_file: PathBuf,
    },
}

impl RawCredential {
    /// Checks the table (paths relative to `base`): one kind of secret,
    /// in files root's alone.
    pub fn checked(self, base: &Path) -> Result<Credential, String> {
        let workload = self.workload.into_inner();
        let what = format!("credential for `{workload}` → `{}`", self.target);
        if self.user.is_empty() || self.user.contains('\0') {
            return Err(format!("{what}: `user` must be a user name"));
        }
        let secret = match (self.password_file, self.client_key_file, self.server_key_file) {
            (Some(p), None, None) => Secret::PasswordFile(base.join(p)),
            (None, Some(c), Some(s)) => Secret::ScramKeys {
                client_key_file: base.join(c),
                server_key_file: base.join(s),
            },
            _ => {
                return Err(format!(
                    "{what}: give either `password_file`, or both `client_key_file` and `server_key_file`"
                ))
            }
        };
        for f in secret.files() {
            private(f).map_err(|e| format!("{what}: {e}"))?;
        }
        Ok(Credential {
            workload,
            target: self.target,
            user: self.user,
            secret,
        })
    }
}

/// A secret file must be a regular file owned by root and readable by it
/// alone.
pub fn private(path: &Path) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} must be owned by root with mode 0600 (it is {:o}, owner uid {}): refused",
            path.display(),
            meta.mode() & 0o777,
            meta.uid()
        ));
    }
    Ok(())
}

impl Secret {
    fn files(&self) -> Vec<&Path> {
        match self {
            Secret::PasswordFile(p) => vec![p],
            Secret::ScramKeys {
                client_key_file,
                server_key_file,
            } => vec![client_key_file, server_key_file],
        }
    }

    /// Reads the secret now (a file replaced on disk counts from the next
    /// login on). The checks of load are made again: a file changed to be
    /// readable by others is refused.
    pub fn read(&self) -> Result<Keys, String> {
        for f in self.files() {
            private(f)?;
        }
        let read = |p: &Path| fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        match self {
            Secret::PasswordFile(p) => {
                let mut pw = read(p)?;
                // One line: its end is no part of the password.
                if pw.ends_with(b"\n") {
                    pw.pop();
                    if pw.ends_with(b"\r") {
                        pw.pop();
                    }
                }
                if pw.is_empty() {
                    return Err(format!("{} is empty", p.display()));
                }
                Ok(Keys::Password(pw))
            }
            Secret::ScramKeys {
                client_key_file,
                server_key_file,
            } => {
                let key = |p: &Path| -> Result<[u8; 32], String> {
                    let text = read(p)?;
                    let raw = B64
                        .decode(text.trim_ascii())
                        .map_err(|_| format!("{} is not base64", p.display()))?;
                    raw.try_into()
                        .map_err(|_| format!("{} does not hold a 32-byte key", p.display()))
                };
                Ok(Keys::Scram {
                    client: key(client_key_file)?,
                    server: key(server_key_file)?,
                })
            }
        }
    }
}

/// A secret as read for one login.
pub enum Keys {
    Password(Vec<u8>),
    Scram { client: [u8; 32], server: [u8; 32] },
}

/// Most PBKDF2 iterations a server may ask for (PostgreSQL's default is
/// 4096): more would let it keep the agent busy.
const MAX_ITERATIONS: u32 = 1 << 20;

/// One SCRAM-SHA-256 exchange, as the client.
pub struct Scram {
    /// `n,,`, `y,,` or `p=tls-server-end-point,,`.
    gs2: String,
    binding: Vec<u8>,
    nonce: String,
    first_bare: String,
    /// The server's signature the final message must carry.
    expected: Option<Vec<u8>>,
}

impl Scram {
    /// Starts an exchange: with `binding` (the server certificate's
    /// `tls-server-end-point` hash) when the server offered `-PLUS`;
    /// `tls` says the agent speaks TLS to it (so a server that offered no
    /// `-PLUS` is told the agent could have bound).
    pub fn new(binding: Option<Vec<u8>>, tls: bool) -> Scram {
        let mut raw = [0u8; 18];
        ring::rand::SystemRandom::new()
            .fill(&mut raw)
            .expect("the system's random numbers");
        let nonce = B64.encode(raw);
        let gs2 = match (&binding, tls) {
            (Some(_), _) => "p=tls-server-end-point,,",
            (None, true) => "y,,",
            (None, false) => "n,,",
        };
        // PostgreSQL takes the user from the startup packet.
        let first_bare = format!("n=,r={nonce}");
        Scram {
            gs2: gs2.into(),
            binding: binding.unwrap_or_default(),
            nonce,
            first_bare,
            expected: None,
        }
    }

    /// The client-first message.
    pub fn first(&self) -> String {
        format!("{}{}", self.gs2, self.first_bare)
    }

    /// The client-final message answering the server-first one.
    pub fn answer(&mut self, server_first: &[u8], keys: &Keys) -> Result<String, String> {
        let server_first =
            std::str::from_utf8(server_first).map_err(|_| "a server-first message not UTF-8")?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attr in server_first.split(',') {
            match attr.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(v),
                Some(("i", v)) => iterations = Some(v),
                Some(("m", _)) => return Err("the server asks for a SCRAM extension".into()),
                _ => {}
            }
        }
        let nonce = nonce.ok_or("the server-first message has no nonce")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err("the server's nonce does not extend the agent's".into());
        }
        let (client_key, server_key) = match keys {
            Keys::Scram { client, server } => (client.to_vec(), server.to_vec()),
            Keys::Password(pw) => {
                let salt = B64
                    .decode(salt.ok_or("the server-first message has no salt")?)
                    .map_err(|_| "the server's salt is not base64")?;
                let i: u32 = iterations
                    .and_then(|i| i.parse().ok())
                    .filter(|&i| (1..=MAX_ITERATIONS).contains(&i))
                    .ok_or("the server's iteration count is missing or out of range")?;
                let mut salted = [0u8; 32];
                pbkdf2::derive(
                    pbkdf2::PBKDF2_HMAC_SHA256,
                    i.try_into().expect("at least 1"),
                    &salt,
                    pw,
                    &mut salted,
                );
                let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
                (
                    hmac::sign(&key, b"Client Key").as_ref().to_vec(),
                    hmac::sign(&key, b"Server Key").as_ref().to_vec(),
                )
            }
        };
        let mut cbind = self.gs2.as_bytes().to_vec();
        cbind.extend_from_slice(&self.binding);
        let without_proof = format!("c={},r={nonce}", B64.encode(cbind));
        let auth = format!("{},{server_first},{without_proof}", self.first_bare);
        let stored = digest::digest(&digest::SHA256, &client_key);
        let signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored.as_ref()),
            auth.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        self.expected = Some(
            hmac::sign(
                &hmac::Key::new(hmac::HMAC_SHA256, &server_key),
                auth.as_bytes(),
            )
            .as_ref()
            .to_vec(),
        );
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final message: the server knew the secret too.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(server_final).unwrap_or_default();
        if let Some(e) = text.strip_prefix("e=") {
            return Err(format!("the server refused the login: {e}"));
        }
        let v = text
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .and_then(|v| B64.decode(v).ok())
            .ok_or("the server-final message carries no signature")?;
        match &self.expected {
            // Compared in constant time.
            Some(e)
                if e.len() == v.len() && e.iter().zip(&v).fold(0, |d, (a, b)| d | (a ^ b)) == 0 =>
            {
                Ok(())
            }
            _ => {
                Err("the server's SCRAM signature is wrong: it does not know the credential".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example exchange, with its nonce, salt and password.
    #[test]
    fn the_rfc_7677_exchange() {
        let mut s = Scram::new(None, false);
        s.nonce = "rOprNGfwEbeRWgbNEkqO".into();
        s.first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let fin = s
            .answer(server_first, &Keys::Password(b"pencil".to_vec()))
            .unwrap();
        assert_eq!(
            fin,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(s
            .verify(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
            .is_err());
        assert!(s.verify(b"e=invalid-proof").is_err());
        // A nonce that is not the agent's, and absurd iteration counts.
        let mut s = Scram::new(None, false);
        assert!(s
            .answer(b"r=other,s=AA==,i=4096", &Keys::Password(b"x".to_vec()))
            .is_err());
        let bad = format!("r={}x,s=AA==,i=0", s.nonce);
        assert!(s
            .answer(bad.as_bytes(), &Keys::Password(b"x".to_vec()))
            .is_err());
    }
}
