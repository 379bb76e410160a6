//! Wire protocols as machines the agent drives: no socket, no runtime, no
//! policy and no store. A machine is handed the bytes that arrived and
//! appends what goes out; everything it asks of the agent goes through
//! one trait ([`seam::Gate`]), and what the record takes goes to an
//! [`Outbox`](interceptor_record::Outbox).
//!
//! The same machines run on the agent's relay loops, in the agent's
//! engine benchmark, and here from byte slices (tests and fuzzers), with
//! frames split anywhere.

pub mod postgres;
pub mod seam;

use interceptor_record as record;
use interceptor_sql::{self as sql, redact};
