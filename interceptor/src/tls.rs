//! TLS on both hops of a session ([docs/tls.md]): origination to a
//! target's server (`[[target]] tls`), termination of the applications'
//! TLS with certificates the node CA issues on the fly (`[agent.tls]`,
//! [`ca`]), and the relay's [`Layer`] for either, so the relay loop opens
//! and seals records where it reads and writes.
//!
//! [docs/tls.md]: ../../docs/tls.md

use std::{
    fmt,
    io::{self, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;
use bytes::{BufMut, BytesMut};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod ca;
mod conn;
pub mod der;

pub use conn::{Conn, HandshakeError};

/// The session facts' name for what TLS told of it (see [`Facts`]).
///
/// [`Facts`]: crate::record::Facts
pub const FACTS: &str = "tls";

/// The crypto the agent's TLS uses: ring, as ureq's (one crypto library
/// in the agent; deprecated only for lacking post-quantum key exchange).
pub fn provider() -> Arc<CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of the PEM file `file`, as roots (`what` names it in
/// errors).
pub fn roots(file: &Path, what: &str) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(file)
        .with_context(|| format!("{what}: reading {}", file.display()))?
    {
        let c = c.with_context(|| format!("{what}: {}", file.display()))?;
        roots
            .add(c)
            .with_context(|| format!("{what}: a certificate of {}", file.display()))?;
    }
    if roots.is_empty() {
        anyhow::bail!("{what}: {} holds no certificate", file.display());
    }
    Ok(roots)
}

/// The certificate chain and the private key in two PEM files (`what`
/// names them in errors).
pub fn chain_and_key(
    cert: &Path,
    key: &Path,
    what: &str,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("{what}: reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{what}: reading {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{what}: {} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{what}: reading {}", key.display()))?;
    Ok((certs, key))
}

/// How a target's server is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A chain to a trusted CA, for the server's name (`server_name`, else
    /// the address connected to).
    VerifyFull,
    /// A chain to a trusted CA, whatever name it is for.
    VerifyCa,
    /// Encryption only: any certificate (libpq's `sslmode=require`).
    Require,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::VerifyFull => "verify-full",
            Mode::VerifyCa => "verify-ca",
            Mode::Require => "require",
        })
    }
}

/// A target's `tls` table: TLS from the agent to its server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetTls {
    pub mode: Mode,
    /// The CAs trusted for the server (PEM; default: the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The name verified and sent (SNI); default: the address connected to.
    #[serde(default)]
    pub server_name: Option<String>,
    /// The agent's certificate and key, for a server that asks for one.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

/// The CAs of a system, where no `ca_file` is given.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A target's upstream TLS, ready to connect with (its files read at load).
#[derive(Clone, Serialize)]
pub struct Origination {
    #[serde(flatten)]
    pub settings: TargetTls,
    #[serde(skip)]
    config: Arc<rustls::ClientConfig>,
    #[serde(skip)]
    name: Option<ServerName<'static>>,
}

impl fmt::Debug for Origination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.settings.fmt(f)
    }
}

impl Origination {
    /// `settings`' paths relative to `base`; `what` names the target.
    pub fn new(mut settings: TargetTls, base: &Path, what: &str) -> anyhow::Result<Origination> {
        for p in [
            &mut settings.ca_file,
            &mut settings.client_cert,
            &mut settings.client_key,
        ]
        .into_iter()
        .flatten()
        {
            *p = base.join(&*p);
        }
        let provider = provider();
        let verifier = match settings.mode {
            Mode::Require => None,
            Mode::VerifyFull | Mode::VerifyCa => {
                let file = settings
                    .ca_file
                    .clone()
                    .unwrap_or_else(|| SYSTEM_ROOTS.into());
                let roots = roots(&file, &format!("{what}: tls.ca_file"))?;
                let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .with_context(|| format!("{what}: tls.ca_file {}", file.display()))?;
                Some(v)
            }
        };
        let verifier = Arc::new(Verifier {
            mode: settings.mode,
            webpki: verifier,
            provider: provider.clone(),
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&settings.client_cert, &settings.client_key) {
            (Some(c), Some(k)) => {
                crate::credential::private(k)
                    .map_err(|e| anyhow::anyhow!("{what}: tls.client_key {e}"))?;
                let (chain, key) = chain_and_key(c, k, &format!("{what}: tls.client_cert"))?;
                builder.with_client_auth_cert(chain, key).with_context(|| {
                    format!("{what}: tls.client_cert and client_key do not fit together")
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => anyhow::bail!("{what}: tls.client_cert and tls.client_key go together"),
        };
        let name =
            match &settings.server_name {
                Some(n) => Some(ServerName::try_from(n.clone()).with_context(|| {
                    format!("{what}: tls.server_name `{n}` is not a server name")
                })?),
                None => None,
            };
        Ok(Origination {
            settings,
            config: Arc::new(config),
            name,
        })
    }

    /// A client session to a server at `dst` (its name, if none is set).
    pub fn connection(&self, dst: IpAddr) -> rustls::ClientConnection {
        let name = self
            .name
            .clone()
            .unwrap_or(ServerName::IpAddress(dst.into()));
        rustls::ClientConnection::new(self.config.clone(), name)
            .expect("a client session of a built config")
    }
}

/// Verifies a server as its target's mode says.
#[derive(Debug)]
struct Verifier {
    mode: Mode,
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        let verified = webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        match verified {
            // The chain held (webpki checks the name last).
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.mode == Mode::VerifyCa => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why a TLS session failed, in words for the record and the application.
pub fn reason(e: &rustls::Error) -> String {
    use CertificateError as C;
    let time = |t: &UnixTime| crate::record::rfc3339_micros(t.as_secs() * 1_000_000);
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => {
                "the server's certificate is not signed by a CA the target trusts (tls.ca_file)"
                    .into()
            }
            C::ExpiredContext {
                time: now,
                not_after,
            } => format!(
                "the server's certificate expired at {} (it is now {})",
                time(not_after),
                time(now)
            ),
            C::Expired => "the server's certificate has expired".into(),
            C::NotValidYetContext {
                time: now,
                not_before,
            } => format!(
                "the server's certificate is not valid before {} (it is now {})",
                time(not_before),
                time(now)
            ),
            C::NotValidYet => "the server's certificate is not valid yet".into(),
            C::NotValidForNameContext {
                expected,
                presented,
            } => format!(
                "the server's certificate is not valid for {} (it names {})",
                expected.to_str(),
                presented
                    .iter()
                    .map(|n| san(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            C::NotValidForName => {
                "the server's certificate is not valid for the name asked for".into()
            }
            other => format!("the server's certificate was refused: {other:?}"),
        },
        rustls::Error::AlertReceived(a) => format!("the peer sent TLS alert {a:?}"),
        other => format!("TLS: {other}"),
    }
}

/// A name as webpki presents it (`DnsName("db.test")`, `IpAddress(…)`),
/// bare.
fn san(n: &str) -> &str {
    ["DnsName(\"", "IpAddress("]
        .iter()
        .find_map(|p| n.strip_prefix(p))
        .map_or(n, |rest| rest.trim_end_matches(')').trim_end_matches('"'))
}

/// What TLS told of a session, on either hop (the session's `tls` facts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// The application's TLS, terminated by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<Session>,
    /// The agent's TLS to the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<Session>,
}

/// One hop's TLS session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// `terminated` (the application's, by the agent) or the mode the
    /// server was verified in.
    pub how: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    /// The name asked for (SNI from the application; the name verified
    /// toward the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// The server's certificate: SHA-256 of its DER, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_subject: Option<String>,
    /// Why the handshake failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Session {
    /// What a finished (or failed) handshake of `tls` tells.
    pub fn of(how: String, tls: &rustls::Connection, peer_certificate: bool) -> Session {
        let mut s = Session {
            how,
            version: tls.protocol_version().map(|v| format!("{v:?}")),
            cipher: tls
                .negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite())),
            ..Session::default()
        };
        if let rustls::Connection::Server(sc) = tls {
            s.server_name = sc.server_name().map(str::to_owned);
        }
        if let Some(cert) = tls
            .peer_certificates()
            .and_then(|c| c.first())
            .filter(|_| peer_certificate)
        {
            s.certificate_sha256 = Some(crate::record::hex(&Sha256::digest(cert)));
            s.certificate_subject = der::subject(cert).map(|dn| dn.to_string());
        }
        s
    }
}

/// The `tls-server-end-point` channel binding of a server certificate
/// (RFC 5929): its hash by the hash of its signature, SHA-256 for MD5 and
/// SHA-1.
pub fn server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use ring::digest;
    let alg = match der::signature_hash(cert)? {
        der::Hash::Sha384 => &digest::SHA384,
        der::Hash::Sha512 => &digest::SHA512,
        der::Hash::Sha256 => &digest::SHA256,
    };
    Some(digest::digest(alg, cert).as_ref().to_vec())
}

/// TLS as a relay [`interceptor_relay::Layer`]: the relay loop opens the
/// records it reads and seals what it writes.
pub struct Layer(pub rustls::Connection);

impl interceptor_relay::Layer for Layer {
    fn open(
        &mut self,
        wire: &mut BytesMut,
        plain: &mut BytesMut,
        reply: &mut BytesMut,
    ) -> io::Result<bool> {
        let taken = conn::take_records(&mut self.0, wire, plain);
        let mut w = reply.writer();
        while self.0.wants_write() {
            self.0.write_tls(&mut w)?;
        }
        taken.map_err(conn::tls_io)
    }

    fn seal(&mut self, plain: &mut BytesMut, wire: &mut BytesMut) -> io::Result<()> {
        let mut w = wire.writer();
        while !plain.is_empty() {
            let n = self.0.writer().write(plain)?;
            bytes::Buf::advance(plain, n);
            while self.0.wants_write() {
                self.0.write_tls(&mut w)?;
            }
        }
        Ok(())
    }

    fn close(&mut self, wire: &mut BytesMut) {
        self.0.send_close_notify();
        let mut w = wire.writer();
        while self.0.wants_write() && self.0.write_tls(&mut w).is_ok() {}
    }
}
