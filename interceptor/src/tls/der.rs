//! What the agent reads of an X.509 certificate itself (RFC 5280): its
//! subject, to record and to sign as, and its signature's hash, for
//! channel binding. A few DER walks over the certificate rustls already
//! checked; anything unexpected reads as `None`.

use std::fmt;

/// One DER element: its tag and contents, and what follows it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |l, &b| l << 8 | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// The elements of `der`'s contents, in order.
fn elements(mut der: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, body, rest) = element(der)?;
        der = rest;
        Some((tag, body))
    })
}

/// Elements as (tag, contents).
type Elements<'a> = Vec<(u8, &'a [u8])>;

/// The certificate's `tbsCertificate` fields and its signature algorithm.
fn parts(cert: &[u8]) -> Option<(Elements<'_>, &[u8])> {
    let (SEQUENCE, cert, _) = element(cert)? else {
        return None;
    };
    let mut top = elements(cert);
    let (SEQUENCE, tbs) = top.next()? else {
        return None;
    };
    let (SEQUENCE, alg) = top.next()? else {
        return None;
    };
    let (OID, oid) = elements(alg).next()? else {
        return None;
    };
    // The version ([0]) is optional: drop it.
    let fields = elements(tbs).filter(|&(t, _)| t != 0xa0).collect();
    Some((fields, oid))
}

/// A distinguished name, as its attributes in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(pub Vec<(Attribute, String)>);

/// The attributes of names the agent writes by name; others by OID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    CommonName,
    Organization,
    OrganizationalUnit,
    Country,
    Locality,
    State,
    Other(String),
}

impl Attribute {
    fn of(oid: &[u8]) -> Attribute {
        match oid {
            [0x55, 0x04, 0x03] => Attribute::CommonName,
            [0x55, 0x04, 0x0a] => Attribute::Organization,
            [0x55, 0x04, 0x0b] => Attribute::OrganizationalUnit,
            [0x55, 0x04, 0x06] => Attribute::Country,
            [0x55, 0x04, 0x07] => Attribute::Locality,
            [0x55, 0x04, 0x08] => Attribute::State,
            other => Attribute::Other(dotted(other)),
        }
    }

    fn label(&self) -> &str {
        match self {
            Attribute::CommonName => "CN",
            Attribute::Organization => "O",
            Attribute::OrganizationalUnit => "OU",
            Attribute::Country => "C",
            Attribute::Locality => "L",
            Attribute::State => "ST",
            Attribute::Other(oid) => oid,
        }
    }
}

/// An OID's dotted form.
fn dotted(oid: &[u8]) -> String {
    let mut arcs = Vec::new();
    let mut v: u64 = 0;
    for &b in oid {
        v = v << 7 | (b & 0x7f) as u64;
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (v / 40).min(2);
                arcs.push(first);
                arcs.push(v - first * 40);
            } else {
                arcs.push(v);
            }
            v = 0;
        }
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// RFC 4514's form, most significant first as written in the certificate
/// (`CN=db.example,O=Example`).
impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (a, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}=", a.label())?;
            for c in v.chars() {
                if ",+\"\\<>;=".contains(c) {
                    write!(f, "\\{c}")?;
                } else {
                    write!(f, "{c}")?;
                }
            }
        }
        Ok(())
    }
}

/// The certificate's subject.
pub fn subject(cert: &[u8]) -> Option<Name> {
    let (fields, _) = parts(cert)?;
    // serial, signature, issuer, validity, subject
    let &(SEQUENCE, name) = fields.get(4)? else {
        return None;
    };
    let mut out = Vec::new();
    for (tag, rdn) in elements(name) {
        if tag != SET {
            return None;
        }
        for (tag, pair) in elements(rdn) {
            if tag != SEQUENCE {
                return None;
            }
            let mut it = elements(pair);
            let (OID, oid) = it.next()? else {
                return None;
            };
            let (_, value) = it.next()?;
            out.push((
                Attribute::of(oid),
                String::from_utf8_lossy(value).into_owned(),
            ));
        }
    }
    Some(Name(out))
}

/// The hash of a certificate's signature algorithm, as channel binding
/// picks it.
pub enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

/// The hash `tls-server-end-point` uses for this certificate: its
/// signature's, SHA-256 for MD5, SHA-1 and the rest.
pub fn signature_hash(cert: &[u8]) -> Option<Hash> {
    let (_, oid) = parts(cert)?;
    Some(match oid {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03] => Hash::Sha384,
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04] => Hash::Sha512,
        _ => Hash::Sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_signature_hashes_are_read() {
        let mut params = rcgen::CertificateParams::new(vec!["db.test".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "db.test");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Ex, ample");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let name = subject(cert.der()).unwrap();
        assert_eq!(name.to_string(), "CN=db.test,O=Ex\\, ample");
        assert!(matches!(signature_hash(cert.der()), Some(Hash::Sha384)));
        assert_eq!(
            dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]),
            "1.2.840.113549"
        );
        for cut in [0, 1, 10, cert.der().len() - 1] {
            assert!(subject(&cert.der()[..cut]).is_none());
        }
    }
}
