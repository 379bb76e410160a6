//! The stored form of recorded statements: a compact binary encoding,
//! written by the relay loop that saw each statement, as it completes (so
//! its many small buffers are freed by the thread that made them, and only
//! whole records cross threads), and about a third the size of JSON.
//!
//! A record is [`FORMAT`] then a count and that many statements. Integers
//! are LEB128 varints; strings are a length and UTF-8 bytes; an optional
//! value is a 0 or 1 byte, then the value. Enums are one byte each, by the
//! explicit tables below (never by declaration order, so reordering an enum
//! cannot change what old records mean). Records written before this format
//! are JSON arrays and start with `[`: [`decode`] reads both.
//!
//! Decoding checks every length against the bytes left before it allocates,
//! so a damaged record is an error, never a panic or a huge allocation.

use std::{borrow::Cow, sync::Arc};

use crate::{policy::Action, protocol::postgres::Statement, sql::Class};

/// First byte of a binary statement record.
const FORMAT: u8 = 1;

/// Most statements in one record: far fewer tree updates than one per
/// statement, and small enough to stay inside sled's log.
pub const PER_RECORD: u32 = 64;

/// Appends the record of `list` to `out`.
pub fn encode(list: &[Statement], out: &mut Vec<u8>) {
    header(out, list.len() as u64);
    for s in list {
        statement(out, s);
    }
}

/// Consecutive statements of one session in one record, keyed in the store
/// by the seq of the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub first: u32,
    pub count: u32,
    pub bytes: Vec<u8>,
}

/// Statements encoded one at a time as they complete, into records of at
/// most [`PER_RECORD`]. The relay loop that made a statement encodes it and
/// frees it; only whole records go to other threads.
#[derive(Debug, Default)]
pub struct Records {
    sealed: Vec<Chunk>,
    /// The record being filled: its first seq, count and statements.
    open: Option<(u32, u32)>,
    body: Vec<u8>,
}

impl Records {
    pub fn push(&mut self, s: &Statement) {
        if self.open.is_some_and(|(_, n)| n >= PER_RECORD) {
            self.seal();
        }
        let (_, n) = self.open.get_or_insert((s.seq, 0));
        *n += 1;
        statement(&mut self.body, s);
    }

    /// Every statement pushed since the last take, in records.
    pub fn take(&mut self) -> Vec<Chunk> {
        self.seal();
        std::mem::take(&mut self.sealed)
    }

    fn seal(&mut self) {
        let Some((first, count)) = self.open.take() else {
            return;
        };
        let mut bytes = Vec::with_capacity(self.body.len() + 6);
        header(&mut bytes, count.into());
        bytes.extend_from_slice(&self.body);
        self.body.clear();
        self.sealed.push(Chunk {
            first,
            count,
            bytes,
        });
    }
}

/// Starts a record of `count` statements.
fn header(out: &mut Vec<u8>, count: u64) {
    out.push(FORMAT);
    varint(out, count);
}

/// Appends one statement of a record.
fn statement(out: &mut Vec<u8>, s: &Statement) {
    varint(out, s.seq.into());
    varint(out, s.at);
    string(out, &s.kind);
    option(out, s.name.as_deref(), string);
    string(out, &s.text);
    out.push(class_byte(s.class));
    varint(out, s.tables.len() as u64);
    for t in s.tables.iter() {
        string(out, t);
    }
    out.push(match s.decision {
        None => 0,
        Some(a) => action_byte(a),
    });
    option(out, s.rule.as_deref(), string);
    varint(out, s.masked.into());
    option(out, s.parameters.as_deref(), |out, ps| {
        varint(out, ps.len() as u64);
        for p in ps {
            option(out, p.as_deref(), string);
        }
    });
    option(out, s.duration_us, varint);
    varint(out, s.tags.len() as u64);
    for t in &s.tags {
        string(out, t);
    }
    option(out, s.rows, varint);
    option(out, s.error.as_deref(), string);
}

/// The statements of a stored record, in either format.
pub fn decode(bytes: &[u8]) -> Result<Vec<Statement>, String> {
    match bytes.first() {
        Some(b'[') => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Some(&FORMAT) => {
            let mut r = Reader(&bytes[1..]);
            let n = r.count(MIN_STATEMENT)?;
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(r.statement()?);
            }
            if !r.0.is_empty() {
                return Err(format!("{} bytes after the last statement", r.0.len()));
            }
            Ok(out)
        }
        Some(b) => Err(format!("unknown statement record format {b:#04x}")),
        None => Err("empty statement record".into()),
    }
}

/// Fewest bytes one statement takes (every field at its shortest).
const MIN_STATEMENT: usize = 15;

fn class_byte(c: Class) -> u8 {
    match c {
        Class::Read => 1,
        Class::Write => 2,
        Class::Ddl => 3,
        Class::Admin => 4,
        Class::Unknown => 5,
    }
}

fn action_byte(a: Action) -> u8 {
    match a {
        Action::Allow => 1,
        Action::Deny => 2,
        Action::Mask => 3,
        Action::Review => 4,
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn string(out: &mut Vec<u8>, s: &str) {
    varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn option<T>(out: &mut Vec<u8>, v: Option<T>, put: impl FnOnce(&mut Vec<u8>, T)) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put(out, v);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let (&b, rest) = self.0.split_first().ok_or("record cut short")?;
        self.0 = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                break;
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("integer too large".into())
    }

    fn u32(&mut self) -> Result<u32, String> {
        u32::try_from(self.varint()?).map_err(|_| "integer too large".to_string())
    }

    /// A count of items that each take at least `min_size` bytes, checked
    /// against what is left.
    fn count(&mut self, min_size: usize) -> Result<usize, String> {
        let n = self.varint()?;
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min_size) <= self.0.len() => Ok(n),
            _ => Err(format!("{n} items cannot fit in {} bytes", self.0.len())),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.count(1)?;
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8(s.to_vec()).map_err(|_| "text is not UTF-8".into())
    }

    fn option<T>(
        &mut self,
        get: impl FnOnce(&mut Self) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        match self.byte()? {
            0 => Ok(None),
            1 => get(self).map(Some),
            b => Err(format!("bad option marker {b}")),
        }
    }

    fn strings(&mut self) -> Result<Vec<String>, String> {
        let n = self.count(1)?;
        (0..n).map(|_| self.string()).collect()
    }

    fn statement(&mut self) -> Result<Statement, String> {
        let seq = self.u32()?;
        let at = self.varint()?;
        let kind = self.string()?;
        let name = self.option(Self::string)?;
        let text = self.string()?;
        let class = match self.byte()? {
            1 => Class::Read,
            2 => Class::Write,
            3 => Class::Ddl,
            4 => Class::Admin,
            5 => Class::Unknown,
            b => return Err(format!("unknown class {b}")),
        };
        let tables = self.strings()?;
        let decision = match self.byte()? {
            0 => None,
            1 => Some(Action::Allow),
            2 => Some(Action::Deny),
            3 => Some(Action::Mask),
            4 => Some(Action::Review),
            b => return Err(format!("unknown decision {b}")),
        };
        let rule = self.option(Self::string)?;
        let masked = self.u32()?;
        let parameters = self.option(|r| {
            let n = r.count(1)?;
            (0..n).map(|_| r.option(Self::string)).collect()
        })?;
        let duration_us = self.option(Self::varint)?;
        let tags = self.strings()?;
        let rows = self.option(Self::varint)?;
        let error = self.option(Self::string)?;
        Ok(Statement {
            seq,
            at,
            kind: Cow::Owned(kind),
            name,
            text: text.into(),
            class,
            tables: Arc::from(tables),
            decision,
            rule: rule.map(Arc::from),
            masked,
            parameters,
            duration_us,
            tags,
            rows,
            error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statements() -> Vec<Statement> {
        let plain = Statement {
            at: 1_709_210_096_789_012,
            ..Statement::new("query", None, "SELECT 1".into(), Class::Read)
        };
        let full = Statement {
            seq: u32::MAX,
            at: 4_102_444_799_999_999,
            kind: Cow::Borrowed("bind"),
            name: Some("s1 ünïcode".into()),
            text: "UPDATE \"ta\u{0}ble\" SET x = $1 -- 🎉\n".into(),
            class: Class::Unknown,
            tables: Arc::from(vec!["public.accounts".to_string(), String::new()]),
            decision: Some(Action::Review),
            rule: Some("deny-writes".into()),
            masked: 300,
            parameters: Some(vec![Some("42".into()), None, Some(String::new())]),
            duration_us: Some(1 << 40),
            tags: vec!["UPDATE 3".into(), "COMMIT".into()],
            rows: Some(3),
            error: Some("42501".into()),
        };
        let mut list = vec![plain.clone(), full];
        for (i, (class, action)) in [
            (Class::Write, Action::Allow),
            (Class::Ddl, Action::Deny),
            (Class::Admin, Action::Mask),
        ]
        .into_iter()
        .enumerate()
        {
            list.push(Statement {
                seq: i as u32 + 2,
                class,
                decision: Some(action),
                ..plain.clone()
            });
        }
        list
    }

    /// Statements pushed one by one come back in records of at most
    /// [`PER_RECORD`], each keyed by its first seq, all of them in order.
    #[test]
    fn statements_are_sealed_into_records_as_they_come() {
        let base = statements();
        let list: Vec<Statement> = (0..150u32)
            .map(|i| Statement {
                seq: 1000 + i,
                ..base[i as usize % base.len()].clone()
            })
            .collect();
        let mut records = Records::default();
        for s in &list[..100] {
            records.push(s);
        }
        let first = records.take();
        for s in &list[100..] {
            records.push(s);
        }
        let second = records.take();
        assert!(records.take().is_empty());
        let shape: Vec<(u32, u32)> = first
            .iter()
            .chain(&second)
            .map(|c| (c.first, c.count))
            .collect();
        assert_eq!(shape, [(1000, 64), (1064, 36), (1100, 50)]);
        let back: Vec<Statement> = first
            .iter()
            .chain(&second)
            .flat_map(|c| decode(&c.bytes).unwrap())
            .collect();
        assert_eq!(back, list);
        let mut whole = Vec::new();
        encode(&list[..64], &mut whole);
        assert_eq!(
            first[0].bytes, whole,
            "the same bytes as a record encoded at once"
        );
    }

    #[test]
    fn statements_round_trip_smaller_than_json() {
        let list = statements();
        let mut bytes = Vec::new();
        encode(&list, &mut bytes);
        assert_eq!(decode(&bytes).unwrap(), list);
        let json = serde_json::to_vec(&list).unwrap();
        assert_eq!(decode(&json).unwrap(), list, "records written as JSON");
        assert!(
            bytes.len() * 2 < json.len(),
            "{} vs {}",
            bytes.len(),
            json.len()
        );
        let far = vec![Statement {
            at: u64::MAX,
            ..list[0].clone()
        }];
        let mut bytes = Vec::new();
        encode(&far, &mut bytes);
        assert_eq!(decode(&bytes).unwrap(), far);
        let mut empty = Vec::new();
        encode(&[], &mut empty);
        assert_eq!(decode(&empty).unwrap(), vec![]);
    }

    #[test]
    fn fuzzing_seeds_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/store");
        for seed in ["two", "json"] {
            let list = decode(&std::fs::read(dir.join(seed)).unwrap()).unwrap();
            assert!(!list.is_empty(), "{seed}");
        }
    }

    #[test]
    fn damaged_records_are_errors() {
        let mut bytes = Vec::new();
        encode(&statements(), &mut bytes);
        // Every cut is an error, never a panic.
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "cut at {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        // Any single damaged byte decodes to something else or to an error.
        let want = decode(&bytes).unwrap();
        for i in 0..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                if let Ok(got) = decode(&bad) {
                    assert_ne!(got, want, "byte {i} ^ {flip:#x}");
                }
            }
        }
        // A huge count or length is refused before anything is allocated.
        assert!(decode(&[FORMAT, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        let mut huge = vec![FORMAT, 1, 0, 0];
        huge.extend_from_slice(&[0xff; 9]);
        huge.push(0x01);
        assert!(decode(&huge).is_err());
        assert!(decode(&[0x7b]).is_err());
    }
}
