//! Protocol handlers: what the proxy understands of a target's traffic.
//! A target with `protocol = "tcp"` is relayed as opaque bytes.
//!
//! A protocol the agent inspects is an entry of [`handler`]: it makes one
//! connection's machines (which talk to the agent through the
//! [`seam`](seam::Gate) alone) and says how a client is told that its
//! server cannot be reached. The session pipeline, the statement flush,
//! the record and the relay name no protocol: adding one is a config
//! variant, a wire module, its gate part where it needs one, and an entry
//! here. (The test protocol [`lines`] is one, and goes through the whole
//! pipeline in `proxy`'s tests.)

use std::{future::Future, pin::Pin, time::Duration};

use interceptor_relay::{Ending, Machines, Sniff};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    config::Protocol,
    policy::Policy,
    record::{Action, Decision, Outbox},
};

#[cfg(test)]
pub mod lines;
pub mod postgres;
pub use interceptor_wire::seam;

/// A client's socket, as a handler answers it before any relaying.
pub trait Client: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Client for T {}

/// A handler's future.
pub type Answer<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// What the agent does with the connections of one protocol it inspects.
pub trait Handler: Sync {
    /// One connection's machines: they ask `gate` and leave what the record
    /// takes in `outbox`.
    fn machines(
        &self,
        gate: Box<dyn seam::Gate>,
        outbox: Outbox,
    ) -> Box<dyn Machines<Error = Ending>>;

    /// Tells a client whose server cannot be reached (`message` says why)
    /// as that server's own clients are told, waiting at most `wait` for
    /// the client's first words. `false`: the protocol has no way to say
    /// it, and the client is reset.
    fn refuse_upstream<'a>(
        &'a self,
        client: &'a mut dyn Client,
        message: &'a str,
        wait: Duration,
    ) -> Answer<'a>;
}

/// A session of a protocol the agent inspects, found on a connection
/// relayed as opaque bytes (a destination that is no target of that
/// protocol): its statements would go unchecked, so policy decides it
/// (`defaults.unknown_postgres`). Only PostgreSQL is told by its first
/// bytes today.
pub struct Unexpected {
    /// The protocol's name, as sessions record it.
    pub protocol: &'static str,
    pub decision: Decision,
    refusal: String,
}

impl Unexpected {
    /// How a session found and relayed is described.
    pub const RELAYED: &'static str = "a PostgreSQL session to a destination that is no postgres target: relayed unchecked (defaults.unknown_postgres = allow)";

    /// What `policy` decides of one found on a connection to `dst`.
    pub fn decided(policy: &Policy, dst: &str) -> Unexpected {
        let decision = policy.decide_unknown_postgres();
        let refusal = format!(
            "a PostgreSQL session to {dst}, which is no postgres target: its statements cannot be checked; refused by rule `{}`",
            decision.rule
        );
        Unexpected {
            protocol: "postgres",
            decision,
            refusal,
        }
    }

    /// How the relay tells it, and refuses it unless it is allowed.
    pub fn sniff(&self) -> Sniff {
        Sniff {
            opens: postgres::opens_session,
            refuse: (self.decision.action != Action::Allow).then(|| self.refusal.clone()),
        }
    }
}

/// The name policy keeps for a type a mask rule names (`types`), as the
/// wire module that knows it spells it; `None`: no wire module knows it.
pub fn type_name(name: &str) -> Option<&'static str> {
    postgres::types::canonical(name)
}

/// The handler of `protocol` (`None`: opaque bytes).
pub fn handler(protocol: Protocol) -> Option<&'static dyn Handler> {
    match protocol {
        Protocol::Tcp => None,
        Protocol::Postgres => Some(&postgres::Postgres),
        #[cfg(test)]
        Protocol::Lines => Some(&lines::Lines),
    }
}
