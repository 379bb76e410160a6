//! Approvers' tokens: OIDC JWTs checked against the issuer's keys (its
//! JWKS, found by discovery or given as a file), its name (`iss`), the
//! audience (`aud`), their time (`exp`, `nbf`, with a small leeway) and an
//! algorithm allowlist (RS256, ES256, EdDSA: never `none`, never a shared
//! secret). What a valid token says becomes a [`Person`].

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use jsonwebtoken::{
    jwk::{Jwk, JwkSet},
    Algorithm, DecodingKey, Validation,
};
use tracing::{info, warn};

use crate::{config::ApprovalsSection, record::approval::Person};

/// Why a token was not taken.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("not a JWT: {0}")]
    Malformed(String),
    #[error("signature algorithm {0} is not accepted (accepted: {1})")]
    Algorithm(String, String),
    #[error("the token names no key (`kid`) and the issuer has more than one")]
    NoKid,
    #[error("no key `{0}` at the issuer, even after fetching its keys again")]
    UnknownKey(String),
    #[error("the issuer's key `{0}` cannot check a {1:?} signature: {2}")]
    Key(String, Algorithm, String),
    #[error("token refused: {0}")]
    Invalid(String),
    #[error("the token has no `{0}` claim listing its holder's groups")]
    NoGroups(String),
    #[error("the token has no subject (`sub`)")]
    NoSubject,
    #[error("the issuer's keys could not be had: {0}")]
    Keys(String),
}

/// The issuer's keys, and when they were last fetched.
struct Keys {
    set: JwkSet,
    fetched: Option<Instant>,
}

/// Fetching the keys again (for an unknown `kid`) happens at most this
/// often, so tokens naming made-up keys cannot flood the issuer.
const REFETCH_GAP: Duration = Duration::from_secs(10);

/// Checks approvers' tokens (see the module's documentation).
pub struct Verifier {
    issuer: String,
    audience: String,
    groups_claim: String,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    source: Source,
    keys: Mutex<Keys>,
}

/// Where the issuer's keys come from.
enum Source {
    File(std::path::PathBuf),
    Discovery(ureq::Agent),
}

impl Verifier {
    /// A verifier for `[approvals]`; its keys are fetched now (a failure
    /// is logged: they are fetched again when a token comes).
    pub fn new(cfg: &ApprovalsSection) -> Verifier {
        let algorithms = cfg
            .algorithms
            .iter()
            .filter_map(|a| match a.as_str() {
                "RS256" => Some(Algorithm::RS256),
                "ES256" => Some(Algorithm::ES256),
                "EdDSA" => Some(Algorithm::EdDSA),
                _ => None,
            })
            .collect();
        let source = match &cfg.jwks_file {
            Some(f) => Source::File(f.clone()),
            None => Source::Discovery(http_agent()),
        };
        let v = Verifier {
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            groups_claim: cfg.groups_claim.clone(),
            algorithms,
            leeway: cfg.leeway_s,
            source,
            keys: Mutex::new(Keys {
                set: JwkSet { keys: Vec::new() },
                fetched: None,
            }),
        };
        match v.fetch() {
            Ok(set) => {
                info!(keys = set.keys.len(), issuer = %v.issuer, "approvers' token keys loaded");
                *v.keys.lock().unwrap_or_else(|p| p.into_inner()) = Keys {
                    set,
                    fetched: Some(Instant::now()),
                };
            }
            Err(e) => warn!(error = %e, issuer = %v.issuer, "approvers' token keys not loaded yet"),
        }
        v
    }

    /// The issuer's keys, from the file or by discovery.
    fn fetch(&self) -> Result<JwkSet, TokenError> {
        let keys = |e: String| TokenError::Keys(e);
        match &self.source {
            Source::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| keys(format!("{}: {e}", path.display())))?;
                serde_json::from_str(&text).map_err(|e| keys(format!("{}: {e}", path.display())))
            }
            Source::Discovery(agent) => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    self.issuer.trim_end_matches('/')
                );
                let doc: serde_json::Value = get_json(agent, &url).map_err(keys)?;
                let jwks = doc
                    .get("jwks_uri")
                    .and_then(|u| u.as_str())
                    .ok_or_else(|| keys(format!("{url} names no jwks_uri")))?;
                let set: serde_json::Value = get_json(agent, jwks).map_err(keys)?;
                serde_json::from_value(set).map_err(|e| keys(format!("{jwks}: {e}")))
            }
        }
    }

    /// The key `kid` names (or the only key, if it names none): fetched
    /// again once if it is not known.
    fn key(&self, kid: Option<&str>) -> Result<Jwk, TokenError> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let find = |set: &JwkSet| match kid {
            Some(k) => set.find(k).cloned(),
            None if set.keys.len() == 1 => set.keys.first().cloned(),
            None => None,
        };
        if let Some(k) = find(&keys.set) {
            return Ok(k);
        }
        let stale = keys.fetched.is_none_or(|t| t.elapsed() >= REFETCH_GAP);
        if stale {
            let set = self.fetch()?;
            *keys = Keys {
                set,
                fetched: Some(Instant::now()),
            };
            if let Some(k) = find(&keys.set) {
                return Ok(k);
            }
        }
        match kid {
            Some(k) => Err(TokenError::UnknownKey(k.to_owned())),
            None => Err(TokenError::NoKid),
        }
    }

    /// The person `token` speaks for, if it is valid.
    pub fn verify(&self, token: &str) -> Result<Person, TokenError> {
        let token = token.trim();
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if !self.algorithms.contains(&header.alg) {
            let accepted: Vec<String> = self.algorithms.iter().map(|a| format!("{a:?}")).collect();
            return Err(TokenError::Algorithm(
                format!("{:?}", header.alg),
                accepted.join(", "),
            ));
        }
        let jwk = self.key(header.kid.as_deref())?;
        let kid = header.kid.clone().unwrap_or_default();
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| TokenError::Key(kid.clone(), header.alg, e.to_string()))?;
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.leeway = self.leeway;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let claims = data.claims;
        let subject = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty())
            .ok_or(TokenError::NoSubject)?;
        let groups = match claims.get(&self.groups_claim) {
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect(),
            Some(serde_json::Value::String(one)) => vec![one.clone()],
            _ => return Err(TokenError::NoGroups(self.groups_claim.clone())),
        };
        Ok(Person {
            issuer: self.issuer.clone(),
            subject: subject.to_owned(),
            groups,
        })
    }
}

/// An HTTP(S) client for the issuer and webhooks: short timeouts, the
/// system's CA bundle (as `SSL_CERT_FILE` names it) or the built-in roots.
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// GETs `url` as JSON (at most 1 MiB).
fn get_json(agent: &ureq::Agent, url: &str) -> Result<serde_json::Value, String> {
    let mut resp = agent.get(url).call().map_err(|e| format!("{url}: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    resp.body_mut()
        .with_config()
        .limit(1 << 20)
        .read_json()
        .map_err(|e| format!("{url}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key made for this test (Ed25519), and its public half as a JWK.
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIE+PTKtCdgZcxlJz5AqJc4u8OvOpAtqpDzXTsI7YXTud\n-----END PRIVATE KEY-----\n";
    const JWKS: &str = r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": "k1", "x": "8U09ktcn2Du0Nf42bBgR3fLr7Hb2A2do5UXVnTseWEg"}]}"#;

    fn verifier(dir: &std::path::Path) -> Verifier {
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, JWKS).unwrap();
        let text = format!(
            "[agent]\ntrust_domain = \"t\"\nproxy_port = 1\n\n[approvals]\nissuer = \"https://id.example.org\"\n\
             audience = \"interceptor\"\njwks_file = \"{}\"\n",
            jwks.display()
        );
        let config = crate::config::Config::parse(std::path::Path::new("c.toml"), &text).unwrap();
        Verifier::new(config.approvals.as_ref().unwrap())
    }

    fn token(claims: serde_json::Value, kid: &str) -> String {
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        let key = jsonwebtoken::EncodingKey::from_ed_pem(KEY.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    /// Keys from a JWKS file (air-gapped sites): a good EdDSA token names
    /// its person and groups; one of another audience, or naming another
    /// key, is refused.
    #[test]
    fn tokens_are_checked_against_a_jwks_file() {
        let dir = std::env::temp_dir().join(format!("icpt-oidc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v = verifier(&dir);
        let exp = crate::record::now_micros() / 1_000_000 + 600;
        let claims = |aud: &str| {
            serde_json::json!({
                "iss": "https://id.example.org", "aud": aud, "sub": "alice",
                "groups": ["dba", "oncall"], "exp": exp,
            })
        };
        let p = v.verify(&token(claims("interceptor"), "k1")).unwrap();
        assert_eq!((p.subject.as_str(), p.groups.len()), ("alice", 2));
        let e = v.verify(&token(claims("other"), "k1")).unwrap_err();
        assert!(e.to_string().contains("InvalidAudience"), "{e}");
        let e = v.verify(&token(claims("interceptor"), "k2")).unwrap_err();
        assert!(e.to_string().contains("no key `k2`"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
