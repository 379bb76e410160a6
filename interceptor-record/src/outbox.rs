//! Where one connection's machines leave what the record takes: its
//! answered statements, encoded as they complete (on the relay loop, where
//! they were made), and at the end what the protocol tells of the session
//! (its [`Facts`]). The
//! agent's worker drains it while the connection runs and once it ends.
//!
//! The one lock here is taken once per answered batch by the loop and
//! once per flush (every 200 ms) by the worker.

use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    codec::{Chunk, Records},
    Facts, Statement,
};

/// How much of a session's statements the store takes (see
/// `agent.record_text_limit` and `agent.record_bytes_per_second`).
#[derive(Debug, Clone, Copy)]
pub struct Recording {
    pub text_limit: usize,
    pub bytes_per_second: u64,
}

impl Default for Recording {
    fn default() -> Self {
        Recording {
            text_limit: 4096,
            bytes_per_second: 1 << 20,
        }
    }
}

/// One connection's records on their way (see the module's
/// documentation). Clones share it.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Mutex<Held>>,
    text_limit: usize,
}

#[derive(Default)]
struct Held {
    records: Records,
    facts: Facts,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new(Recording::default())
    }
}

impl Outbox {
    pub fn new(recording: Recording) -> Outbox {
        let mut records = Records::default();
        records.limit(recording.bytes_per_second);
        Outbox {
            shared: Arc::new(Mutex::new(Held {
                records,
                facts: Facts::default(),
            })),
            text_limit: recording.text_limit,
        }
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Longest statement text recorded whole.
    pub fn text_limit(&self) -> usize {
        self.text_limit
    }

    /// Encodes `statements` (see [`Records::push`]).
    pub fn push<'a>(&self, statements: impl IntoIterator<Item = &'a Statement>) {
        let mut held = self.held();
        for s in statements {
            held.records.push(s);
        }
    }

    /// The statements pushed since the last take, in records.
    pub fn take(&self) -> Vec<Chunk> {
        self.held().records.take()
    }

    /// What `protocol` tells of the session (left at the connection's
    /// end).
    pub fn set_facts(&self, protocol: &str, facts: &impl serde::Serialize) {
        self.held().facts.set(protocol, facts);
    }

    pub fn take_facts(&self) -> Facts {
        std::mem::take(&mut self.held().facts)
    }

    /// The statements pushed since the last take (decoded from
    /// [`Outbox::take`]), for tests.
    pub fn take_statements(&self) -> Vec<Statement> {
        self.take()
            .iter()
            .flat_map(|c| super::codec::decode(&c.bytes).expect("records the agent encoded"))
            .collect()
    }
}
