//! Just-in-time approval as recorded: a [`Request`] made when a review
//! rule matched, the approvals and refusals it met, its decision, and the
//! [`Grant`] an approval made (same id as its request), with each use.
//! Kept whole after expiry: the history is evidence.
//!
//! This is data only; who may approve and when is the agent's to decide.

use serde::{Deserialize, Serialize};

use interceptor_sql::Class;

use crate::{Evidence, SessionId};

/// A request's id: time-ordered like a [`SessionId`], shown the same way
/// (16 hex digits). Its grant has the same id.
pub type RequestId = SessionId;

/// One group of approvers a rule asks for: `count` distinct people who
/// each belong to at least one of `groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approvers {
    pub groups: Vec<String>,
    pub count: u32,
}

/// What an approval grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Exactly what was held: the same statement text (or the connect).
    Once,
    /// Statements of the same shape: the same text without its values.
    Statement,
    /// Everything the rule covers on the target.
    Target,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Once => "once",
            Scope::Statement => "statement",
            Scope::Target => "target",
        }
    }
}

/// The terms of a review rule, as they stood when a request was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terms {
    /// Groups of approvers, all of which must be filled (AND).
    pub approvers: Vec<Approvers>,
    pub scope: Scope,
    /// How long a request may wait for a decision (µs).
    pub pending_ttl_us: u64,
    /// How long a grant lasts from its approval (µs).
    pub duration_us: u64,
    /// Uses a grant allows (`None`: any number while it lasts).
    pub uses: Option<u32>,
    /// How long a held statement or connect waits (µs).
    pub hold_us: u64,
    /// Groups whose members may approve by break-glass: recorded loudly,
    /// and still by someone other than the requester.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub break_glass: Vec<String>,
}

/// A person, as an approver's token (or a requester's) says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    /// The token's issuer and subject: together, who it is.
    pub issuer: String,
    pub subject: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// Who asked: the workload (by the kernel's account), and the person who
/// started its process, if one said so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    pub workload: String,
    /// SPIFFE id.
    pub identity: String,
    pub session: Option<SessionId>,
    pub evidence: Option<Evidence>,
    /// The person who started the process (`interceptor exec
    /// --requester-token`): never an approver of its requests.
    pub human: Option<Person>,
    /// The workload's owners when the request was made: never approvers.
    #[serde(default)]
    pub owners: Vec<String>,
}

/// What was asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Asked {
    /// A connection to the target.
    Connect,
    /// A statement on the target.
    Statement {
        /// Its text, secrets redacted.
        text: String,
        class: Class,
        #[serde(default)]
        tables: Vec<String>,
        /// What a `once` grant matches: the SHA-256 of the whole text.
        #[serde(with = "crate::hex32")]
        digest: [u8; 32],
        /// What a `statement` grant matches: the text without its values
        /// (`None`: it has no such key; only its digest matches).
        shape: Option<String>,
    },
}

/// How an approval or refusal arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    /// `https` or `socket`.
    pub by: String,
    /// The peer (address, or the local user).
    pub peer: String,
}

/// One approval counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub person: Person,
    #[serde(with = "crate::micros_as_rfc3339")]
    pub at: u64,
    pub comment: Option<String>,
    pub channel: Channel,
    /// Counted by break-glass, not by the rule's approvers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub break_glass: bool,
}

/// Something tried on a request that was refused (never counted): who,
/// if the token said, and why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    #[serde(with = "crate::micros_as_rfc3339")]
    pub at: u64,
    /// `approve`, `deny` or `revoke`.
    pub action: String,
    /// The subject, if a valid token named one.
    pub subject: Option<String>,
    pub channel: Channel,
    pub refused: String,
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    /// Approved: its grant is in force (until it expires, is used up or
    /// revoked: see [`Grant`]).
    Approved,
    Denied,
    /// No decision within the pending TTL.
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Denied => "denied",
            Status::Expired => "expired",
        }
    }
}

/// A decision on a request (or a grant's revocation): when, by whom
/// (none: by the clock), and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decided {
    #[serde(with = "crate::micros_as_rfc3339")]
    pub at: u64,
    pub by: Option<Person>,
    pub comment: Option<String>,
    pub channel: Option<Channel>,
}

/// What an approval made: it covers what its terms' scope says, from its
/// approval for the terms' duration, for the terms' uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    #[serde(with = "crate::micros_as_rfc3339")]
    pub from: u64,
    #[serde(with = "crate::micros_as_rfc3339")]
    pub until: u64,
    /// Uses so far.
    pub used: u64,
    /// The latest uses (at most [`Grant::KEPT_USES`]; every statement
    /// record names the request whose grant let it through).
    #[serde(default)]
    pub uses: Vec<Use>,
    pub revoked: Option<Decided>,
}

impl Grant {
    /// Uses kept in the grant itself.
    pub const KEPT_USES: usize = 100;
}

/// One use of a grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Use {
    #[serde(with = "crate::micros_as_rfc3339")]
    pub at: u64,
    pub session: Option<SessionId>,
}

/// A request for approval and all that came of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: RequestId,
    #[serde(with = "crate::micros_as_rfc3339")]
    pub created_at: u64,
    /// Until when it may be decided.
    #[serde(with = "crate::micros_as_rfc3339")]
    pub expires_at: u64,
    /// The review rule that made it.
    pub rule: String,
    pub target: String,
    pub requester: Requester,
    pub asked: Asked,
    pub terms: Terms,
    pub status: Status,
    /// Approvals counted so far.
    #[serde(default)]
    pub approvals: Vec<Approval>,
    /// What was tried and refused.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// How it was decided (approved: when the last approval came).
    pub decided: Option<Decided>,
    /// Made when approved.
    pub grant: Option<Grant>,
    /// How many times what it asks for was held or refused waiting.
    #[serde(default)]
    pub asked_times: u32,
}

impl Request {
    /// Most refused attempts kept with a request (the rest are counted in
    /// the agent's log): a flood of bad tokens cannot grow it without bound.
    pub const KEPT_ATTEMPTS: usize = 100;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request reads back as written, as JSON (the stored form).
    #[test]
    fn requests_round_trip_as_json() {
        let r = Request {
            id: SessionId(0x0190_f3a1_b2c3_d4e5),
            created_at: 1_709_210_096_000_000,
            expires_at: 1_709_210_996_000_000,
            rule: "dba-review".into(),
            target: "orders-db".into(),
            requester: Requester {
                workload: "billing".into(),
                identity: "spiffe://example.org/billing".into(),
                session: Some(SessionId(7)),
                evidence: None,
                human: Some(Person {
                    issuer: "https://id.example.org".into(),
                    subject: "carol".into(),
                    groups: vec!["dev".into()],
                }),
                owners: vec!["billing-team".into()],
            },
            asked: Asked::Statement {
                text: "DELETE FROM orders WHERE id = 1".into(),
                class: Class::Write,
                tables: vec!["orders".into()],
                digest: [7; 32],
                shape: Some("delete from orders where id = ?".into()),
            },
            terms: Terms {
                approvers: vec![Approvers {
                    groups: vec!["dba".into()],
                    count: 1,
                }],
                scope: Scope::Statement,
                pending_ttl_us: 900_000_000,
                duration_us: 3_600_000_000,
                uses: Some(1),
                hold_us: 60_000_000,
                break_glass: vec![],
            },
            status: Status::Approved,
            approvals: vec![Approval {
                person: Person {
                    issuer: "https://id.example.org".into(),
                    subject: "alice".into(),
                    groups: vec!["dba".into()],
                },
                at: 1_709_210_100_000_000,
                comment: Some("ok".into()),
                channel: Channel {
                    by: "https".into(),
                    peer: "10.0.0.2:50123".into(),
                },
                break_glass: false,
            }],
            attempts: vec![],
            decided: None,
            grant: Some(Grant {
                from: 1_709_210_100_000_000,
                until: 1_709_213_700_000_000,
                used: 1,
                uses: vec![Use {
                    at: 1_709_210_100_000_001,
                    session: Some(SessionId(7)),
                }],
                revoked: None,
            }),
            asked_times: 1,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"scope\":\"statement\""), "{json}");
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r);
    }
}
