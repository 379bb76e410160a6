//! A protocol for tests, to show that a protocol is a registry entry: the
//! client sends statements, one per line; the server answers each with a
//! line. A statement is classified and decided through the seam like any
//! other; a refused one never reaches the server, and the client reads
//! `ERR denied by rule "…"` in its place. Each statement is recorded with
//! the server's answer as its tag.

use std::{collections::VecDeque, sync::Arc};

use bytes::BytesMut;
use interceptor_relay::{Ending, Machines};

use super::seam::{decide, Gate, Seen, Ticket};
use crate::{
    record::{now_micros, Decision, Outbox, Statement, StatementKind},
    sql::Dialect,
};

/// The registry's entry.
pub struct Lines;

impl super::Handler for Lines {
    fn machines(&self, gate: Box<dyn Gate>, outbox: Outbox) -> Box<dyn Machines<Error = Ending>> {
        Box::new(Conn {
            gate,
            outbox,
            pending: VecDeque::new(),
            held: None,
            seq: 0,
        })
    }

    /// Only a server that cannot be reached: `ERR` and why.
    fn open<'a>(&'a self, mut o: super::Opening<'a>) -> super::Opens<'a> {
        Box::pin(async move {
            match o.upstream {
                Ok(u) => Ok(super::Opened {
                    client: o.client.into_endpoint(),
                    server: u.into_endpoint(),
                    keep: None,
                }),
                Err((outcome, cause)) => {
                    let said = format!("ERR could not connect to server {}: {cause}\n", o.dst);
                    let _ = o.client.send(said.as_bytes()).await;
                    o.client.shutdown().await;
                    Err(super::Unopened {
                        outcome,
                        why: format!("upstream {}: {cause}", o.dst),
                    })
                }
            }
        })
    }
}

/// Longest line.
const MAX_LINE: usize = 64 * 1024;

struct Conn {
    gate: Box<dyn Gate>,
    outbox: Outbox,
    /// Statements in the order they came, and whether each is done (a
    /// refused one at once, one sent once the server answered it): they
    /// are recorded in that order.
    pending: VecDeque<(Statement, bool)>,
    held: Option<Ticket>,
    seq: u32,
}

impl Conn {
    /// Decides and records the statement `text`: the refusal if it is
    /// refused; `Err`: it is held.
    fn statement(&mut self, text: &str) -> Result<Option<Decision>, ()> {
        let c = self.gate.classify(text, Ok(Dialect::default()));
        let seen = Seen {
            kind: StatementKind::Query,
            text,
            class: &c.class,
            memo: None,
        };
        let decided = decide(&mut *self.gate, &mut self.held, seen, true);
        let parts = decided.parts().map_err(|_| ())?;
        let refused = parts.refused;
        let mut st = Statement {
            decision: parts.action,
            rule: parts.rule,
            approval: parts.approval,
            tables: c.class.tables.clone(),
            ..Statement::new(StatementKind::Query, None, Arc::from(text), c.class.class)
        };
        st.seq = self.seq;
        st.at = now_micros();
        self.seq += 1;
        self.pending.push_back((st, refused.is_some()));
        self.record_done();
        Ok(refused)
    }

    /// Records the statements done, up to the first that is not.
    fn record_done(&mut self) {
        while let Some((st, true)) = self.pending.front() {
            self.outbox.push([st]);
            self.pending.pop_front();
        }
    }
}

fn line(input: &BytesMut) -> Result<Option<usize>, Ending> {
    match input.iter().position(|&b| b == b'\n') {
        Some(at) => Ok(Some(at)),
        None if input.len() > MAX_LINE => Err(Ending::Refused("a line too long".into())),
        None => Ok(None),
    }
}

impl Machines for Conn {
    type Error = Ending;

    fn client(
        &mut self,
        input: &mut BytesMut,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) -> Result<(), Ending> {
        while let Some(at) = line(input)? {
            let text = String::from_utf8_lossy(&input[..at]).into_owned();
            let Ok(refused) = self.statement(&text) else {
                return Ok(()); // held: seen again once decided
            };
            let whole = input.split_to(at + 1);
            match refused {
                Some(d) => to_client
                    .extend_from_slice(format!("ERR denied by rule \"{}\"\n", d.rule).as_bytes()),
                None => to_server.extend_from_slice(&whole),
            }
        }
        Ok(())
    }

    fn client_ended(&mut self, _: &[u8]) -> Result<(), Ending> {
        Ok(())
    }

    fn server(&mut self, input: &mut BytesMut, to_client: &mut BytesMut) -> Result<(), Ending> {
        while let Some(at) = line(input)? {
            let answer = input.split_to(at + 1);
            if let Some((st, done)) = self.pending.iter_mut().find(|(_, done)| !done) {
                st.tags.push(String::from_utf8_lossy(&answer[..at]).into());
                st.duration_us = Some(now_micros().saturating_sub(st.at));
                *done = true;
            }
            self.record_done();
            to_client.extend_from_slice(&answer);
        }
        Ok(())
    }

    fn server_ended(&mut self, _: &[u8]) -> Result<(), Ending> {
        Ok(())
    }

    fn holding(&self) -> bool {
        self.held.is_some()
    }

    fn ended(&mut self) {
        self.outbox.push(self.pending.iter().map(|(st, _)| st));
        self.pending.clear();
    }
}
