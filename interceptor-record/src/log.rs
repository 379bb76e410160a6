//! The evidence log: every record the agent keeps — sessions, statements,
//! approval requests, the agent's own events — in one append-only sequence.
//! Each entry has a sequence number (its key) and names the hash of the
//! entry before it, so changing, removing, reordering or inserting an entry
//! breaks a link that [`Chain`] finds. Checkpoints ([`crate::seal`]) sign
//! the hash of the newest entry.
//!
//! An entry is a header, then the payload:
//!
//! ```text
//! format u8 (1) | kind u8 | at u64 | session u64 | prev [32] | len u8 | workload | payload
//! ```
//!
//! (integers big-endian; `at` in microseconds since the epoch, never less
//! than the entry before's; `session` 0 when none). Its hash, the link the
//! next entry names, is
//!
//! ```text
//! SHA-256("interceptor log v1\0" | seq u64 | header | SHA-256(payload))
//! ```
//!
//! so an entry can be left out of an export as its header and the digest of
//! its payload (a [`Stub`]) and the chain still be checked through it; the
//! header tells what was left out (kind, time, session, workload), so a
//! reader can check nothing it selected was.
//!
//! This module reads bytes only: the store, the export and `verify` all
//! check chains with it.

use sha2::{Digest, Sha256};

use crate::hex;

/// First byte of every entry.
pub const FORMAT: u8 = 1;
const DOMAIN: &[u8] = b"interceptor log v1\0";
/// Bytes of the header before the workload's name.
const FIXED: usize = 1 + 1 + 8 + 8 + 32 + 1;
/// Longest workload name an entry carries (names are configuration keys).
pub const WORKLOAD_MAX: usize = 255;

/// What an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A session's state as JSON (a session has an entry when it is
    /// allowed and one when it ends).
    Session,
    /// Consecutive statements of a session ([`Statements`]).
    Statements,
    /// An approval request's state as JSON, each time it changes.
    Approval,
    /// One of the agent's own events as JSON ([`AgentEvent`]).
    Agent,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Session => 1,
            Kind::Statements => 2,
            Kind::Approval => 3,
            Kind::Agent => 4,
        }
    }

    fn from_code(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Session,
            2 => Kind::Statements,
            3 => Kind::Approval,
            4 => Kind::Agent,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Session => "session",
            Kind::Statements => "statements",
            Kind::Approval => "approval",
            Kind::Agent => "agent",
        }
    }
}

/// An entry's header (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'a> {
    pub kind: Kind,
    pub at: u64,
    pub session: u64,
    pub workload: &'a str,
    pub prev: [u8; 32],
}

/// One entry, read from its bytes.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub header: Header<'a>,
    /// The header's bytes (what the hash covers besides the payload's digest).
    pub head: &'a [u8],
    pub payload: &'a [u8],
}

/// Appends the entry to `out`. A workload name past [`WORKLOAD_MAX`] bytes
/// is cut (at a character boundary).
pub fn encode(out: &mut Vec<u8>, h: &Header<'_>, payload: &[u8]) {
    let mut w = h.workload;
    if w.len() > WORKLOAD_MAX {
        let mut end = WORKLOAD_MAX;
        while !w.is_char_boundary(end) {
            end -= 1;
        }
        w = &w[..end];
    }
    out.reserve(FIXED + w.len() + payload.len());
    out.push(FORMAT);
    out.push(h.kind.code());
    out.extend_from_slice(&h.at.to_be_bytes());
    out.extend_from_slice(&h.session.to_be_bytes());
    out.extend_from_slice(&h.prev);
    out.push(w.len() as u8);
    out.extend_from_slice(w.as_bytes());
    out.extend_from_slice(payload);
}

/// Reads an entry; never panics on damaged bytes.
pub fn parse(bytes: &[u8]) -> Result<Entry<'_>, String> {
    if bytes.len() < FIXED {
        return Err(format!(
            "{} bytes: shorter than an entry's header",
            bytes.len()
        ));
    }
    if bytes[0] != FORMAT {
        return Err(format!("unknown entry format {}", bytes[0]));
    }
    let kind =
        Kind::from_code(bytes[1]).ok_or_else(|| format!("unknown entry kind {}", bytes[1]))?;
    let word = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let len = usize::from(bytes[FIXED - 1]);
    let end = FIXED + len;
    let workload = bytes
        .get(FIXED..end)
        .ok_or("the workload's name runs past the entry")?;
    let workload = std::str::from_utf8(workload).map_err(|_| "the workload's name is not UTF-8")?;
    Ok(Entry {
        header: Header {
            kind,
            at: word(2),
            session: word(10),
            workload,
            prev: bytes[18..50].try_into().expect("32 bytes"),
        },
        head: &bytes[..end],
        payload: &bytes[end..],
    })
}

/// The hash of entry `seq` from its header's bytes and its payload's digest.
pub fn link_parts(seq: u64, head: &[u8], payload_digest: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update(DOMAIN)
        .chain_update(seq.to_be_bytes())
        .chain_update(head)
        .chain_update(payload_digest)
        .finalize()
        .into()
}

pub fn digest(payload: &[u8]) -> [u8; 32] {
    Sha256::digest(payload).into()
}

impl Entry<'_> {
    /// This entry's hash as entry `seq`.
    pub fn link(&self, seq: u64) -> [u8; 32] {
        link_parts(seq, self.head, &digest(self.payload))
    }
}

/// An entry left out of an export: enough to check the chain through it,
/// and to see what it was.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stub {
    pub seq: u64,
    /// The header's bytes, hex.
    pub head: String,
    /// SHA-256 of the payload, hex.
    pub digest: String,
}

impl Stub {
    pub fn of(seq: u64, e: &Entry<'_>) -> Stub {
        Stub {
            seq,
            head: hex(e.head),
            digest: hex(&digest(e.payload)),
        }
    }
}

/// Where a chain of entries breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Break {
    #[error("entry {seq} is unreadable: {why}")]
    Unreadable { seq: u64, why: String },
    #[error("entry {expected} is missing: the entry after {} is numbered {found} (entries removed, or inserted out of order)", expected - 1)]
    Missing { expected: u64, found: u64 },
    #[error("entry {seq} does not name the hash of entry {}: entry {} was changed, removed or moved, or entry {seq} was put there", seq - 1, seq - 1)]
    Link { seq: u64 },
    #[error("entry {seq} is dated before entry {} (entries reordered, or one changed)", seq - 1)]
    Time { seq: u64 },
}

/// Walks entries in order, checking each links to the one before; the
/// first entry's link is taken as it stands (the log's start, or the first
/// entry kept after pruning: what comes before it is not checked here).
#[derive(Debug, Clone, Default)]
pub struct Chain {
    /// The next seq expected, and the hash of the entry before it.
    last: Option<(u64, [u8; 32])>,
    at: u64,
}

impl Chain {
    /// A chain that continues from entry `seq - 1` with hash `head`.
    pub fn after(seq: u64, head: [u8; 32], at: u64) -> Chain {
        Chain {
            last: Some((seq, head)),
            at,
        }
    }

    /// Checks entry `seq` given as its header's bytes and its payload's
    /// digest; returns its hash.
    pub fn push_parts(
        &mut self,
        seq: u64,
        head: &[u8],
        payload_digest: &[u8; 32],
    ) -> Result<[u8; 32], Break> {
        let h = parse(head)
            .map_err(|why| Break::Unreadable { seq, why })?
            .header;
        if let Some((next, prev)) = self.last {
            if seq != next {
                return Err(Break::Missing {
                    expected: next,
                    found: seq,
                });
            }
            if h.prev != prev {
                return Err(Break::Link { seq });
            }
            if h.at < self.at {
                return Err(Break::Time { seq });
            }
        }
        let link = link_parts(seq, head, payload_digest);
        self.last = Some((seq + 1, link));
        self.at = h.at;
        Ok(link)
    }

    /// Checks entry `seq` given whole.
    pub fn push(&mut self, seq: u64, bytes: &[u8]) -> Result<[u8; 32], Break> {
        let e = parse(bytes).map_err(|why| Break::Unreadable { seq, why })?;
        self.push_parts(seq, e.head, &digest(e.payload))
    }

    /// How many entries came before the next (the size of the log so far),
    /// and the newest entry's hash.
    pub fn head(&self) -> Option<(u64, [u8; 32])> {
        self.last
    }
}

/// The payload of a [`Kind::Statements`] entry: the first statement's
/// seq (u32), the session's process id (u32), its SPIFFE id (a length
/// byte, then UTF-8), then the statements' stored form ([`crate::codec`]).
/// Each entry names who ran its statements, so an event made of it alone
/// says so too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statements<'a> {
    pub first: u32,
    pub pid: u32,
    pub identity: &'a str,
    pub chunk: &'a [u8],
}

impl<'a> Statements<'a> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut id = self.identity;
        while id.len() > 255 {
            let mut end = 255;
            while !id.is_char_boundary(end) {
                end -= 1;
            }
            id = &id[..end];
        }
        out.extend_from_slice(&self.first.to_be_bytes());
        out.extend_from_slice(&self.pid.to_be_bytes());
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(self.chunk);
    }

    pub fn read(payload: &'a [u8]) -> Result<Statements<'a>, String> {
        let word = |at: usize| {
            payload
                .get(at..at + 4)
                .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
                .ok_or("a statements entry cut short")
        };
        let (first, pid) = (word(0)?, word(4)?);
        let len = usize::from(*payload.get(8).ok_or("a statements entry cut short")?);
        let identity = payload
            .get(9..9 + len)
            .ok_or("a statements entry cut short")?;
        Ok(Statements {
            first,
            pid,
            identity: std::str::from_utf8(identity).map_err(|_| "an identity that is not UTF-8")?,
            chunk: &payload[9 + len..],
        })
    }
}

/// One of the agent's own events (an [`Kind::Agent`] entry), as JSON:
/// `{"event": "start" | "stop" | "gap" | "policy" | "attach" | "detach" |
/// "prune" | "import", ...}`.
pub type AgentEvent = serde_json::Value;

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u64) -> Vec<Vec<u8>> {
        let mut prev = [0u8; 32];
        (0..n)
            .map(|seq| {
                let mut out = Vec::new();
                let h = Header {
                    kind: Kind::Agent,
                    at: 1000 + seq,
                    session: seq,
                    workload: "web",
                    prev,
                };
                encode(&mut out, &h, format!("payload {seq}").as_bytes());
                prev = parse(&out).unwrap().link(seq);
                out
            })
            .collect()
    }

    fn walk(list: &[(u64, Vec<u8>)]) -> Result<(), Break> {
        let mut c = Chain::default();
        for (seq, e) in list {
            c.push(*seq, e)?;
        }
        Ok(())
    }

    #[test]
    fn a_chain_checks_and_every_kind_of_tampering_breaks_it_where_it_was_done() {
        let good: Vec<(u64, Vec<u8>)> = entries(6)
            .into_iter()
            .enumerate()
            .map(|(i, e)| (i as u64, e))
            .collect();
        walk(&good).unwrap();
        let e = parse(&good[2].1).unwrap();
        assert_eq!(
            (e.header.kind, e.header.workload, e.payload),
            (Kind::Agent, "web", &b"payload 2"[..])
        );

        let mut changed = good.clone();
        *changed[2].1.last_mut().unwrap() ^= 1;
        assert_eq!(walk(&changed), Err(Break::Link { seq: 3 }));

        let mut removed = good.clone();
        removed.remove(2);
        assert_eq!(
            walk(&removed),
            Err(Break::Missing {
                expected: 2,
                found: 3
            })
        );

        let mut swapped = good.clone();
        let (a, b) = (swapped[2].1.clone(), swapped[3].1.clone());
        swapped[2].1 = b;
        swapped[3].1 = a;
        assert_eq!(walk(&swapped), Err(Break::Link { seq: 2 }));

        // Renumbered after a removal: the link still breaks.
        let renumbered: Vec<(u64, Vec<u8>)> = removed
            .iter()
            .enumerate()
            .map(|(i, (_, e))| (i as u64, e.clone()))
            .collect();
        assert_eq!(walk(&renumbered), Err(Break::Link { seq: 2 }));

        let mut garbage = good.clone();
        garbage[4].1.truncate(10);
        assert!(matches!(
            walk(&garbage),
            Err(Break::Unreadable { seq: 4, .. })
        ));

        // A stub stands for its entry.
        let mut c = Chain::default();
        for (seq, bytes) in &good {
            let e = parse(bytes).unwrap();
            let s = Stub::of(*seq, &e);
            assert_eq!(s.head, hex(e.head));
            c.push_parts(*seq, e.head, &digest(e.payload)).unwrap();
        }
        assert_eq!(c.head().unwrap().0, 6);
    }

    #[test]
    fn damaged_headers_are_errors() {
        let mut e = entries(1).remove(0);
        e[0] = 9;
        assert!(parse(&e).is_err());
        e[0] = FORMAT;
        e[1] = 0;
        assert!(parse(&e).is_err());
        e[1] = 4;
        e[FIXED - 1] = 200;
        assert!(parse(&e).is_err());
        assert!(parse(&e[..10]).is_err());
        let mut out = Vec::new();
        let long = "é".repeat(200);
        encode(
            &mut out,
            &Header {
                kind: Kind::Session,
                at: 0,
                session: 0,
                workload: &long,
                prev: [0; 32],
            },
            b"x",
        );
        let w = parse(&out).unwrap().header.workload;
        assert!(w.len() <= WORKLOAD_MAX && long.starts_with(w));
    }
}
