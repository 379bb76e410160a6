//! interceptor: a node agent that brings segregation of duties to
//! app-to-app traffic without changing the applications.
//!
//! Modules in the order a connection meets them: eBPF [`redirect`] sends a
//! workload's connect to the [`proxy`], which finds the caller's
//! [`identity`], asks [`policy`], relays, and hands the session to
//! [`record`] ([`evidence`]: the node key and the agent's own events).
//! [`config`], [`cgroup`], [`api`], [`agent`] and [`cli`] hold it together.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod agent;
pub mod api;
pub mod approvals;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod credential;
pub mod evidence;
pub mod gate;
pub mod identity;
pub mod local;
pub mod mask;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod redirect;
pub mod sinks;
pub mod tls;

/// SQL as the server reads it, and the redaction scanner: their own crate
/// (see `interceptor-sql`), under the agent's paths.
pub use interceptor_sql::{self as sql, redact};

/// What the agent records, and its store: their own crate (see
/// `interceptor-record`), under the agent's path.
pub use interceptor_record as record;
