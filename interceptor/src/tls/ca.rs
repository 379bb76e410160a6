//! The node CA of TLS termination: a key and a self-signed certificate in
//! `DATA_DIR/ca/` (`interceptor ca init`; the key root's alone, 0600),
//! which issues the certificates the agent presents to applications that
//! ask for TLS. An operator adds its certificate (`interceptor ca show`)
//! to the applications' trust store; nothing else trusts it.
//!
//! Issued certificates are short-lived ([`LEAF_LIFETIME`]) and cached per
//! target and address, renewed when half their life is gone. Each names
//! the address the application connected to and the target's
//! `server_names`, and nothing else: an application asking for another
//! name (SNI) gets a certificate that does not match it, as it would from
//! the server.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use super::der;

/// How long a certificate the CA issues is valid.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long the CA's own certificate is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issued certificates start this much in the past (clocks differ).
const BACKDATE: Duration = Duration::from_secs(300);

/// The CA's files in `data_dir`: its certificate and its key.
pub fn files(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("ca");
    (dir.join("ca.crt"), dir.join("ca.key"))
}

/// The CA's certificate as `ca show` prints it.
pub struct Shown {
    pub pem: String,
    pub subject: String,
    /// `SHA256:` and the hex digest of its DER.
    pub fingerprint: String,
}

impl Shown {
    fn of(der: &CertificateDer<'_>) -> Shown {
        let pem = pem_of("CERTIFICATE", der);
        Shown {
            pem,
            subject: der::subject(der).map_or_else(String::new, |n| n.to_string()),
            fingerprint: format!("SHA256:{}", crate::record::hex(&Sha256::digest(der))),
        }
    }
}

fn pem_of(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Makes the CA in `data_dir` unless it has one; `true` when made now.
pub fn init(data_dir: &Path, host: &str) -> anyhow::Result<bool> {
    let (crt, key) = files(data_dir);
    if crt.exists() || key.exists() {
        load(data_dir).context("the node CA in place cannot be used")?;
        return Ok(false);
    }
    let dir = crt.parent().expect("a file in a directory");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    let pair = KeyPair::generate().context("making the CA's key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_name(host);
    let now = SystemTime::now();
    params.not_before = now.into();
    params.not_after = (now + CA_LIFETIME).into();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params
        .self_signed(&pair)
        .context("signing the CA's certificate")?;
    // The key first (0600 from its creation), under a temporary name.
    write_new(&key, pair.serialize_pem().as_bytes(), 0o600)?;
    write_new(&crt, cert.pem().as_bytes(), 0o644)?;
    Ok(true)
}

/// Writes `bytes` to a file created with `mode` under a temporary name,
/// then renamed to `path`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("new");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The CA's subject: its host's name in its common name.
fn ca_name(host: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "interceptor");
    dn.push(DnType::CommonName, format!("interceptor node CA {host}"));
    dn
}

/// The CA's certificate, for `ca show`.
pub fn show(data_dir: &Path) -> anyhow::Result<Shown> {
    let (crt, _) = files(data_dir);
    let der = CertificateDer::from_pem_file(&crt).with_context(|| {
        format!(
            "reading the node CA's certificate {} (made by `interceptor ca init`)",
            crt.display()
        )
    })?;
    Ok(Shown::of(&der))
}

/// The node CA, issuing.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pub shown: Shown,
    /// Issued, by target and address: the settings presenting it and when
    /// to renew it.
    issued: Mutex<HashMap<(String, Option<IpAddr>), Issued>>,
}

/// Settings presenting an issued certificate, and when to renew it.
type Issued = (Arc<rustls::ServerConfig>, SystemTime);

/// Loads the CA of `data_dir`; refused unless its key is root's alone.
pub fn load(data_dir: &Path) -> anyhow::Result<Authority> {
    let (crt, key) = files(data_dir);
    let hint = "make one with `interceptor ca init`";
    let meta = fs::metadata(&key)
        .with_context(|| format!("the node CA's key {} ({hint})", key.display()))?;
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        bail!(
            "the node CA's key {} must be owned by root and readable by it alone (mode 0600; it is {:o}, owner uid {})",
            key.display(),
            meta.mode() & 0o777,
            meta.uid()
        );
    }
    let pem = fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
    let pair = KeyPair::from_pem(&pem).with_context(|| format!("reading {}", key.display()))?;
    let der = CertificateDer::from_pem_file(&crt)
        .with_context(|| format!("reading {} ({hint})", crt.display()))?;
    let name = der::subject(&der).context("the node CA's certificate names no subject")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    for (a, v) in name.0 {
        let ty = match a {
            der::Attribute::CommonName => DnType::CommonName,
            der::Attribute::Organization => DnType::OrganizationName,
            other => bail!("the node CA's subject has an attribute it never writes: {other:?}"),
        };
        params.distinguished_name.push(ty, v);
    }
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = Issuer::new(params, pair);
    Ok(Authority {
        issuer,
        shown: Shown::of(&der),
        issued: Mutex::new(HashMap::new()),
    })
}

impl Authority {
    /// TLS settings presenting a certificate for target `target` at `ip`
    /// (none: a unix socket) and its `names`, offering `alpn`; issued now
    /// or cached.
    pub fn server_config(
        &self,
        target: &str,
        names: &[String],
        ip: Option<IpAddr>,
        alpn: &[&[u8]],
    ) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let now = SystemTime::now();
        let key = (target.to_owned(), ip);
        let mut issued = self.issued.lock().expect("not poisoned");
        if let Some((config, renew)) = issued.get(&key) {
            if now < *renew {
                return Ok(config.clone());
            }
        }
        let (chain, pair) = self.issue(names, ip, now)?;
        let mut config = rustls::ServerConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, pair)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let config = Arc::new(config);
        issued.insert(key, (config.clone(), now + LEAF_LIFETIME / 2));
        Ok(config)
    }

    /// A certificate for `names` and `ip`, valid from a little before
    /// `now` for [`LEAF_LIFETIME`], with its key.
    fn issue(
        &self,
        names: &[String],
        ip: Option<IpAddr>,
        now: SystemTime,
    ) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let mut params = CertificateParams::default();
        let first = names
            .first()
            .cloned()
            .or_else(|| ip.map(|a| a.to_string()))
            .unwrap_or_else(|| "localhost".into());
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, first);
        for n in names {
            params.subject_alt_names.push(SanType::DnsName(
                n.clone()
                    .try_into()
                    .with_context(|| format!("`{n}` is not a DNS name"))?,
            ));
        }
        if let Some(ip) = ip {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        } else if names.is_empty() {
            params
                .subject_alt_names
                .push(SanType::DnsName("localhost".try_into()?));
        }
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + LEAF_LIFETIME).into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let pair = KeyPair::generate().context("making a certificate's key")?;
        let cert = params
            .signed_by(&pair, &self.issuer)
            .context("issuing a certificate")?;
        let key = PrivateKeyDer::from_pem_slice(pair.serialize_pem().as_bytes())
            .context("reading a key just made")?;
        Ok((vec![cert.der().clone()], key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CA is made once, with its key 0600, and loaded back; what it
    /// issues chains to it for the target's names and the address, and
    /// for nothing else; issued settings are cached.
    #[test]
    fn the_node_ca_issues_for_the_names_and_address_asked() {
        let dir = std::env::temp_dir().join(format!("icpt-ca-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert!(init(&dir, "node1").unwrap());
        assert!(!init(&dir, "node1").unwrap(), "kept");
        let (crt, key) = files(&dir);
        assert_eq!(fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        let ca = load(&dir).unwrap();
        assert_eq!(
            ca.shown.subject,
            "O=interceptor,CN=interceptor node CA node1"
        );
        assert!(ca.shown.pem.starts_with("-----BEGIN CERTIFICATE-----\n"));

        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let names = vec!["db.test".to_owned()];
        let (chain, _) = ca.issue(&names, Some(ip), SystemTime::now()).unwrap();
        let roots = super::super::roots(&crt, "test").unwrap();
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            super::super::provider(),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let now = rustls::pki_types::UnixTime::now();
        for name in ["db.test", "10.1.2.3"] {
            let sn = rustls::pki_types::ServerName::try_from(name).unwrap();
            v.verify_server_cert(&chain[0], &[], &sn, &[], now)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for name in ["other.test", "10.1.2.4"] {
            let sn = rustls::pki_types::ServerName::try_from(name).unwrap();
            assert!(
                v.verify_server_cert(&chain[0], &[], &sn, &[], now).is_err(),
                "{name}"
            );
        }
        let a = ca.server_config("t", &names, Some(ip), &[]).unwrap();
        let b = ca.server_config("t", &names, Some(ip), &[]).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "cached");

        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&dir).err().unwrap().to_string();
        assert!(e.contains("mode 0600"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }
}
