//! What approvers can ask of the agent, however they reach it (HTTPS, or
//! the local socket): list and show requests, approve, deny, revoke. Every
//! call carries an approver's token; a refused one is recorded with the
//! request it named, never counted. Root on the host is no approver.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{oidc::Verifier, Broker, Deciding, Refusal, Verb};
use crate::record::{
    approval::{Attempt, Channel, Request},
    now_micros, RequestId,
};

/// A call, as the socket and HTTPS carry it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    List {
        /// Only requests made at or after (µs since the epoch).
        #[serde(default)]
        since: u64,
    },
    Show {
        id: RequestId,
    },
    Decide {
        id: RequestId,
        verb: VerbName,
        #[serde(default)]
        comment: Option<String>,
        #[serde(default)]
        break_glass: bool,
    },
}

/// [`Verb`] as calls name it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VerbName {
    Approve,
    Deny,
    Revoke,
}

impl From<VerbName> for Verb {
    fn from(v: VerbName) -> Verb {
        match v {
            VerbName::Approve => Verb::Approve,
            VerbName::Deny => Verb::Deny,
            VerbName::Revoke => Verb::Revoke,
        }
    }
}

/// What a call gets back.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Requests { requests: Vec<Request> },
    Request { request: Box<Request> },
    Error { status: u16, message: String },
}

/// Longest comment kept with a decision.
const MAX_COMMENT: usize = 1000;

/// The approvals service: the broker, and who may speak to it.
pub struct Service {
    pub broker: Arc<Broker>,
    pub verifier: Verifier,
}

impl Service {
    /// Answers `call` made with `token` over `channel`.
    pub fn call(&self, call: Call, token: Option<&str>, channel: Channel) -> Reply {
        let error = |status: u16, message: String| Reply::Error { status, message };
        let Some(token) = token.filter(|t| !t.trim().is_empty()) else {
            return error(
                401,
                "an approver's token is needed (root on the host is not an approver): pass --token-file".into(),
            );
        };
        let person = self.verifier.verify(token);
        match call {
            Call::List { since } => match person {
                Err(e) => error(401, e.to_string()),
                Ok(_) => match self.broker.list(since) {
                    Ok(requests) => Reply::Requests { requests },
                    Err(e) => error(500, e.to_string()),
                },
            },
            Call::Show { id } => match person {
                Err(e) => error(401, e.to_string()),
                Ok(_) => match self.broker.show(id) {
                    Ok(Some(r)) => Reply::Request {
                        request: Box::new(r),
                    },
                    Ok(None) => error(404, format!("no request {id}")),
                    Err(e) => error(500, e.to_string()),
                },
            },
            Call::Decide {
                id,
                verb,
                comment,
                break_glass,
            } => {
                let verb = Verb::from(verb);
                let person = match person {
                    Ok(p) => p,
                    Err(e) => {
                        let why = format!("token refused: {e}");
                        self.broker.attempted(id, verb, None, &channel, &why);
                        return error(401, why);
                    }
                };
                let comment = comment.map(|c| c.chars().take(MAX_COMMENT).collect());
                let d = Deciding {
                    verb,
                    person: &person,
                    comment,
                    channel,
                    break_glass,
                };
                match self.broker.decide(id, d) {
                    Ok(r) => Reply::Request {
                        request: Box::new(r),
                    },
                    Err(Refusal::Unknown(id)) => error(404, format!("no request {id}")),
                    Err(e @ Refusal::Refused { .. }) => error(403, e.to_string()),
                    Err(Refusal::Store(e)) => error(500, e.to_string()),
                }
            }
        }
    }
}

impl Broker {
    /// Records, with request `id` if there is one, a call that was refused
    /// before it named a person.
    pub fn attempted(
        &self,
        id: RequestId,
        verb: Verb,
        subject: Option<String>,
        channel: &Channel,
        why: &str,
    ) {
        warn!(request = %id, verb = verb.as_str(), %why, "a decision refused");
        let mut book = self.lock();
        let r = match book.open.get(&id) {
            Some(r) => r.clone(),
            None => match self.store.request(id) {
                Ok(Some(r)) => r,
                _ => return,
            },
        };
        let attempt = Attempt {
            at: now_micros(),
            action: verb.as_str().into(),
            subject,
            channel: channel.clone(),
            refused: why.to_owned(),
        };
        self.note_attempt(&mut book, r, attempt);
    }
}
