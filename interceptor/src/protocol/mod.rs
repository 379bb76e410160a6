//! Protocol handlers: what the proxy understands of a target's traffic.
//! A target with `protocol = "tcp"` is relayed as opaque bytes.

pub mod postgres;
pub mod seam;
