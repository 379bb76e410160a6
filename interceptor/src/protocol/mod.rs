//! Protocol handlers: what the proxy understands of a target's traffic.
//! A target with `protocol = "tcp"` is relayed as opaque bytes.
//!
//! A protocol the agent inspects is an entry of [`handler`]: it makes one
//! connection's machines (which talk to the agent through the
//! [`seam`](seam::Gate) alone) and opens the sessions the agent stands in
//! before the relay takes them ([`Handler::open`]: a client told that its
//! server cannot be reached, TLS on either hop, a credential's login), the
//! protocol's way. The session pipeline, the statement flush,
//! the record and the relay name no protocol: adding one is a config
//! variant, a wire module, its gate part where it needs one, and an entry
//! here. (The test protocol [`lines`] is one, and goes through the whole
//! pipeline in `proxy`'s tests.)

use std::{future::Future, net::IpAddr, pin::Pin};

use interceptor_relay::{Ending, Endpoint, Machines, Sniff};

use crate::{
    config::{Protocol, Target},
    credential::Credential,
    policy::Policy,
    record::{Action, Decision, Facts, Outbox, Outcome},
    tls::{ca, Conn},
};

#[cfg(test)]
pub mod lines;
pub mod postgres;
pub use interceptor_wire::seam;

/// What a handler is given to open a session itself, before the relay
/// takes it: when the server cannot be reached (the client is told why),
/// or the agent stands in the session's TLS or login.
pub struct Opening<'a> {
    pub client: Conn,
    /// The server's side, or how the connect failed and why.
    pub upstream: Result<Conn, (Outcome, String)>,
    /// Where the client was going (`host:port`, or `unix:path`).
    pub dst: &'a str,
    /// Its address (none: a unix socket): the certificate issued to the
    /// client names it, and so does the one asked of the server unless
    /// the target sets a `server_name`.
    pub ip: Option<IpAddr>,
    pub target: &'a Target,
    pub workload: &'a str,
    /// Accept the client's TLS with this CA's certificates.
    pub ca: Option<&'a ca::Authority>,
    /// Log in to the server with this.
    pub credential: Option<&'a Credential>,
    /// The connection's machines: they see the login as they would on the
    /// relay.
    pub machines: &'a mut dyn Machines<Error = Ending>,
    /// The session's facts: what opening told (TLS, the credential).
    pub facts: &'a mut Facts,
}

/// A session opened: its two sides for the relay, and what must live as
/// long as it does.
pub struct Opened {
    pub client: Endpoint,
    pub server: Endpoint,
    pub keep: Option<Box<dyn Send>>,
}

/// A session that could not be opened: how it ends, and why.
pub struct Unopened {
    pub outcome: Outcome,
    pub why: String,
}

/// A handler's future.
pub type Opens<'a> = Pin<Box<dyn Future<Output = Result<Opened, Unopened>> + Send + 'a>>;

/// What the agent does with the connections of one protocol it inspects.
pub trait Handler: Sync {
    /// One connection's machines: they ask `gate` and leave what the record
    /// takes in `outbox`.
    fn machines(
        &self,
        gate: Box<dyn seam::Gate>,
        outbox: Outbox,
    ) -> Box<dyn Machines<Error = Ending>>;

    /// Opens a session as `o` says: a server that cannot be reached is
    /// told to the client as that server's own clients are told; TLS on
    /// either hop and a credential's login as the protocol does them.
    fn open<'a>(&'a self, o: Opening<'a>) -> Opens<'a>;
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
