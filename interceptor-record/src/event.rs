//! What a session's record holds besides the session itself: the
//! statements seen on it, and what its protocol told of it. Facts of
//! protocols are data here; no protocol module is imported.

use std::{collections::BTreeMap, fmt, sync::Arc};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use interceptor_sql::Class;

/// The outcome of a policy question, with the rule that answered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub action: Action,
    pub rule: Arc<str>,
    /// The approval request behind it, when a review rule matched (boxed:
    /// decisions are moved on every statement, and this is rare).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<Arc<Via>>,
}

impl Decision {
    /// `action` by `rule`, with no approval behind it.
    pub fn new(action: Action, rule: Arc<str>) -> Self {
        Decision {
            action,
            rule,
            via: None,
        }
    }
}

/// The approval request behind a decision (see [`Decision::via`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Via {
    /// The request's id (its grant has the same id).
    pub request: Arc<str>,
    /// What became of it, in a few words (`approved by alice`, `no
    /// decision within 60s`), for the refusal a client reads.
    pub why: Arc<str>,
}

/// What a rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    /// Statement rules: mask result columns.
    Mask,
    /// Just-in-time approval by another person: held until decided.
    Review,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Mask => "mask",
            Action::Review => "review",
        })
    }
}

/// What kind of message a recorded statement stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatementKind {
    /// A setting of the startup packet, decided as the `SET` it amounts to.
    Startup,
    /// A simple-protocol Query.
    Query,
    /// An extended-protocol Parse (and its first runs in the same batch).
    Parse,
    /// A run of a prepared statement in a later batch than its Parse.
    Execute,
    /// A Bind's parameter values (only when policy asks).
    Bind,
    /// A fast-path FunctionCall.
    Function,
    /// Statements over the recording budget, counted (see `record::codec`).
    Dropped,
}

impl StatementKind {
    pub const ALL: [StatementKind; 7] = [
        StatementKind::Startup,
        StatementKind::Query,
        StatementKind::Parse,
        StatementKind::Execute,
        StatementKind::Bind,
        StatementKind::Function,
        StatementKind::Dropped,
    ];

    /// The name records and the API use.
    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Startup => "startup",
            StatementKind::Query => "query",
            StatementKind::Parse => "parse",
            StatementKind::Execute => "execute",
            StatementKind::Bind => "bind",
            StatementKind::Function => "function",
            StatementKind::Dropped => "dropped",
        }
    }

    /// The kind named `name`, if any.
    pub fn from_name(name: &str) -> Option<StatementKind> {
        StatementKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for StatementKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A statement's command tags.
pub type Tags = smallvec::SmallVec<[Arc<str>; 1]>;

/// One recorded statement (or batch of extended-protocol messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub seq: u32,
    /// When it arrived (the statements of one read share it), in
    /// microseconds since the epoch (RFC 3339 in JSON).
    #[serde(with = "crate::micros_as_rfc3339")]
    pub at: u64,
    pub kind: StatementKind,
    /// Prepared statement name (extended protocol; empty = unnamed).
    pub name: Option<Arc<str>>,
    /// Statement text with secrets redacted (shared by the runs of one
    /// prepared statement).
    pub text: Arc<str>,
    /// What the statement does (the worst of several in one message).
    pub class: Class,
    /// Tables and views it names.
    #[serde(default)]
    pub tables: Arc<[String]>,
    /// `allow` or `deny`, and the rule that decided.
    pub decision: Option<Action>,
    pub rule: Option<Arc<str>>,
    /// Result values masked in this statement's batch.
    #[serde(default)]
    pub masked: u32,
    /// Bind parameter values (`kind = "bind"`, only when policy asks):
    /// text as sent, binary as `\x` hex, each cut at 256 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Vec<Option<String>>>,
    pub duration_us: Option<u64>,
    /// Command tags the server returned for this statement's batch (most
    /// statements have one: held inline).
    pub tags: Tags,
    /// Rows returned or affected (from the last command tag).
    pub rows: Option<u64>,
    /// SQLSTATE of the first error in the batch.
    pub error: Option<String>,
    /// Set when `text` was cut at the recording limit
    /// (`agent.record_text_limit`): what the whole text was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole: Option<Whole>,
    /// The approval request whose grant let it through, or whose refusal
    /// stopped it (a review rule matched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Arc<str>>,
}

/// A statement text recorded cut: the length in bytes and the SHA-256 of
/// the whole text as it would have been recorded (secrets redacted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whole {
    pub len: u64,
    #[serde(with = "crate::hex32")]
    pub sha256: [u8; 32],
}

impl Whole {
    /// `text` cut to at most `limit` bytes (at a character boundary), and
    /// what the whole was, if it had to be cut.
    pub fn cut(text: String, limit: usize) -> (Arc<str>, Option<Whole>) {
        if text.len() <= limit {
            return (text.into(), None);
        }
        use sha2::Digest;
        let whole = Whole {
            len: text.len() as u64,
            sha256: sha2::Sha256::digest(text.as_bytes()).into(),
        };
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        (text[..end].into(), Some(whole))
    }
}

impl Statement {
    /// A statement not yet numbered nor stamped, nor answered.
    pub fn new(kind: StatementKind, name: Option<Arc<str>>, text: Arc<str>, class: Class) -> Self {
        Statement {
            seq: 0,
            at: 0,
            kind,
            name,
            text,
            class,
            tables: Arc::default(),
            decision: None,
            rule: None,
            masked: 0,
            parameters: None,
            duration_us: None,
            tags: Tags::new(),
            rows: None,
            error: None,
            whole: None,
            approval: None,
        }
    }
}

/// What a connection's protocol told of its session, kept as data: one
/// object per protocol, under the protocol's name (for PostgreSQL,
/// `postgres`: what its startup packet said). The record knows no
/// protocol's fields; a reader that knows one reads its object back
/// typed ([`Facts::get`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Facts(BTreeMap<String, serde_json::Value>);

impl Facts {
    /// Sets `protocol`'s facts.
    pub fn set(&mut self, protocol: &str, facts: &impl Serialize) {
        let value = serde_json::to_value(facts).expect("facts are plain data");
        self.0.insert(protocol.to_owned(), value);
    }

    /// `protocol`'s facts, read as `T` (`None`: none, or not a `T`).
    pub fn get<T: DeserializeOwned>(&self, protocol: &str) -> Option<T> {
        serde_json::from_value(self.0.get(protocol)?.clone()).ok()
    }

    /// Takes in `other`'s facts (its own stand over these).
    pub fn extend(&mut self, other: Facts) {
        self.0.extend(other.0);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
