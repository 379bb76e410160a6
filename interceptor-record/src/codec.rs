//! The stored form of recorded statements: a compact binary encoding,
//! written by the relay loop that saw each statement, as it completes (so
//! its many small buffers are freed by the thread that made them, and only
//! whole records cross threads).
//!
//! A record is a format byte, then a count and that many statements.
//! Integers are LEB128 varints; an optional value is a 0 or 1 byte, then
//! the value. Enums are one byte each, by the explicit tables below (never
//! by declaration order, so reordering an enum cannot change what old
//! records mean).
//!
//! In the current format ([`FORMAT`]) a record says each string once: a
//! string is a varint `v`, then either `v >> 1` bytes of UTF-8 (`v` even:
//! a new string, the record's next) or nothing (`v` odd: the record's
//! string number `v >> 1` again). The runs of a prepared statement share
//! their text, kind, rule, tables and tags, so on `pgbench -M prepared` a
//! statement takes about a fifth of its plainly written size. A repeated
//! string other than a statement's text must be at most [`SHORT`] bytes
//! (the text is shared when decoded, not copied), so a record cannot
//! decode to much more than its own size. Each statement's seq and time
//! are written as the (zigzag) difference from the previous one's.
//!
//! A statement whose text was cut at the recording limit has the whole
//! text's length and SHA-256 (an optional value: a varint and 32 bytes);
//! each statement ends with the approval request behind its decision (an
//! optional string). Records of the format before that last field
//! ([`FORMAT_NO_APPROVAL`]), of the format before the whole text's hash
//! ([`FORMAT_NO_WHOLE`]),
//! of the first binary format ([`FORMAT_PLAIN`]: every string written out,
//! seq and time whole) and JSON arrays (they start with `[`), written by
//! older agents, still decode.
//!
//! Decoding checks every length against the bytes left before it allocates,
//! so a damaged record is an error, never a panic or a huge allocation.

use std::sync::Arc;

use interceptor_sql::Class;

use crate::{Action, Statement, StatementKind, Whole};

/// First byte of a record in the current format.
const FORMAT: u8 = 4;
/// First byte of a record of the format before [`Statement::approval`].
const FORMAT_NO_APPROVAL: u8 = 3;
/// First byte of a record of the format before [`Statement::whole`].
const FORMAT_NO_WHOLE: u8 = 2;
/// First byte of a record of the first binary format.
const FORMAT_PLAIN: u8 = 1;

/// Most statements in one record: far fewer tree updates than one per
/// statement (each costs the recorder about as much as encoding a hundred
/// statements).
pub const PER_RECORD: u32 = 256;

/// A record is sealed once it holds this many bytes, so it stays well
/// inside sled's log (values past an eighth of a segment go to files of
/// their own) whatever the statements' size.
pub const RECORD_BYTES: usize = 32 << 10;

/// Longest string other than a statement's text that a record says again
/// by number.
const SHORT: usize = 64;

/// Appends the record of `list` to `out`.
pub fn encode(list: &[Statement], out: &mut Vec<u8>) {
    let mut w = Writer::default();
    for s in list {
        w.statement(s);
    }
    w.record(list.len() as u32, out);
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
    /// The record being filled: its first seq and count.
    open: Option<(u32, u32)>,
    body: Writer,
    /// How many bytes of statements may be recorded, and when.
    budget: Option<Budget>,
    /// Statements the budget turned away since the last were recorded.
    dropped: Dropped,
}

/// A token bucket of statement bytes, on the statements' own clock.
#[derive(Debug)]
struct Budget {
    per_second: u64,
    /// Bytes that may be recorded now (at most four seconds' worth).
    left: u64,
    /// When `left` was last filled (µs since the epoch).
    at: u64,
}

impl Budget {
    fn take(&mut self, cost: u64, now: u64) -> bool {
        let cap = self.per_second.saturating_mul(4);
        let earned =
            u128::from(now.saturating_sub(self.at)) * u128::from(self.per_second) / 1_000_000;
        if earned > 0 {
            self.left = (u128::from(self.left) + earned).min(u128::from(cap)) as u64;
            self.at = now;
        }
        match self.left.checked_sub(cost) {
            Some(left) => {
                self.left = left;
                true
            }
            None => false,
        }
    }
}

#[derive(Debug, Default)]
struct Dropped {
    count: u64,
    bytes: u64,
    denied: u64,
    /// The first one's seq and time, the last one's time.
    first: Option<(u32, u64)>,
    last_at: u64,
}

/// What a statement costs the store, near enough: its text (a prepared
/// statement's runs share theirs), its parameters and the rest.
fn cost(s: &Statement) -> u64 {
    let text = if s.kind == StatementKind::Execute {
        0
    } else {
        s.text.len()
    };
    let parameters: usize = s
        .parameters
        .iter()
        .flatten()
        .map(|p| p.as_ref().map_or(1, |p| p.len()))
        .sum();
    (32 + text + parameters) as u64
}

impl Records {
    /// Records at most `bytes_per_second` of statements (in bursts of up to
    /// four seconds' worth); beyond, statements are counted, and the next
    /// record says how many were not recorded (see [`Records::push`]).
    pub fn limit(&mut self, bytes_per_second: u64) {
        self.budget = Some(Budget {
            per_second: bytes_per_second,
            left: bytes_per_second.saturating_mul(4),
            at: 0,
        });
    }

    /// Encodes `s`, unless the budget is spent: then it is only counted.
    /// The statements counted are said by one of kind `dropped`, under the
    /// seq of the first of them, before the next recorded statement (or at
    /// the next [`Records::take`]).
    pub fn push(&mut self, s: &Statement) {
        if let Some(b) = &mut self.budget {
            if b.at == 0 {
                b.at = s.at;
            }
            let cost = cost(s);
            if !b.take(cost, s.at) {
                let d = &mut self.dropped;
                d.count += 1;
                d.bytes += cost;
                d.denied += u64::from(s.decision == Some(Action::Deny));
                d.first.get_or_insert((s.seq, s.at));
                d.last_at = s.at;
                return;
            }
        }
        self.say_dropped();
        self.encode(s);
    }

    /// Records the statement that says what the budget turned away.
    fn say_dropped(&mut self) {
        let d = std::mem::take(&mut self.dropped);
        let (Some((seq, at)), Some(b)) = (d.first, &self.budget) else {
            return;
        };
        let text = format!(
            "{} statements ({} bytes) not recorded: over this session's recording rate of {} bytes/s \
             (agent.record_bytes_per_second); {} of them denied; all decided as usual; the last at {}",
            d.count,
            d.bytes,
            b.per_second,
            d.denied,
            crate::rfc3339_micros(d.last_at)
        );
        self.encode(&Statement {
            seq,
            at,
            ..Statement::new(StatementKind::Dropped, None, text.into(), Class::Unknown)
        });
    }

    fn encode(&mut self, s: &Statement) {
        if self
            .open
            .is_some_and(|(_, n)| n >= PER_RECORD || self.body.body.len() >= RECORD_BYTES)
        {
            self.seal();
        }
        let (_, n) = self.open.get_or_insert((s.seq, 0));
        *n += 1;
        self.body.statement(s);
    }

    /// Every statement pushed since the last take, in records.
    pub fn take(&mut self) -> Vec<Chunk> {
        self.say_dropped();
        self.seal();
        std::mem::take(&mut self.sealed)
    }

    fn seal(&mut self) {
        let Some((first, count)) = self.open.take() else {
            return;
        };
        let mut bytes = Vec::new();
        self.body.record(count, &mut bytes);
        self.sealed.push(Chunk {
            first,
            count,
            bytes,
        });
    }
}

/// Slots of the writer's index of the strings a record has said, in pairs
/// (each string has one pair, which keeps the two last said there).
const SLOTS: usize = 256;

/// The statements of one record being written, and what the reader of
/// them will know at each point: the strings said so far, the last seq
/// and time.
#[derive(Debug)]
struct Writer {
    body: Vec<u8>,
    /// Strings said so far in this record.
    said: u32,
    /// Where some of them are in `body`, by a hash of their bytes: (start,
    /// length, number). A string not found is said again, which is never
    /// wrong, only longer.
    index: [(u32, u32, u32); SLOTS],
    /// The last statement's shared strings (name, text, rule, first tag)
    /// as this record said them, with their numbers: the next statement
    /// holding the very same string (the runs of a prepared statement
    /// share theirs) refers to it without a lookup. They are held, so
    /// their memory cannot come to hold another string meanwhile.
    recent: [Option<(Arc<str>, u32)>; 4],
    /// Likewise the last statement's kind, and its tables, with their
    /// numbers.
    recent_kind: Option<(StatementKind, u32)>,
    recent_tables: Option<(Arc<[String]>, Vec<u32>)>,
    next_seq: u64,
    last_at: u64,
}

/// [`Writer::recent`] slots.
const NAME: usize = 0;
const TEXT: usize = 1;
const RULE: usize = 2;
const TAG: usize = 3;

impl Default for Writer {
    fn default() -> Self {
        Writer {
            body: Vec::new(),
            said: 0,
            index: [(0, 0, u32::MAX); SLOTS],
            recent: Default::default(),
            recent_kind: None,
            recent_tables: None,
            next_seq: 0,
            last_at: 0,
        }
    }
}

impl Writer {
    /// Appends the record of the statements written so far to `out`, and
    /// starts the next.
    fn record(&mut self, count: u32, out: &mut Vec<u8>) {
        out.reserve(self.body.len() + 6);
        out.push(FORMAT);
        varint(out, count.into());
        out.extend_from_slice(&self.body);
        let mut body = std::mem::take(&mut self.body);
        body.clear();
        *self = Writer {
            body,
            ..Writer::default()
        };
    }

    fn statement(&mut self, s: &Statement) {
        let seq = u64::from(s.seq);
        varint(&mut self.body, zigzag(seq.wrapping_sub(self.next_seq)));
        self.next_seq = seq + 1;
        varint(&mut self.body, zigzag(s.at.wrapping_sub(self.last_at)));
        self.last_at = s.at;
        self.kind(s.kind);
        self.option(s.name.as_ref(), |w, n| w.shared(NAME, n, false));
        self.shared(TEXT, &s.text, true);
        self.body.push(class_byte(s.class));
        self.tables(&s.tables);
        self.body.push(match s.decision {
            None => 0,
            Some(a) => action_byte(a),
        });
        self.option(s.rule.as_ref(), |w, r| w.shared(RULE, r, false));
        varint(&mut self.body, s.masked.into());
        self.option(s.parameters.as_deref(), |w, ps| {
            varint(&mut w.body, ps.len() as u64);
            for p in ps {
                w.option(p.as_deref(), |w, p| {
                    w.string(p, false);
                });
            }
        });
        self.option(s.duration_us, |w, d| varint(&mut w.body, d));
        varint(&mut self.body, s.tags.len() as u64);
        let mut tags = s.tags.iter();
        if let Some(first) = tags.next() {
            self.shared(TAG, first, false);
        }
        for t in tags {
            self.string(t, false);
        }
        self.option(s.rows, |w, r| varint(&mut w.body, r));
        self.option(s.error.as_deref(), |w, e| {
            w.string(e, false);
        });
        self.option(s.whole.as_ref(), |w, whole| {
            varint(&mut w.body, whole.len);
            w.body.extend_from_slice(&whole.sha256);
        });
        self.option(s.approval.as_deref(), |w, a| {
            w.string(a, false);
        });
    }

    /// Says a statement's kind (by its name): by the number it last had if
    /// it is the same kind.
    fn kind(&mut self, kind: StatementKind) {
        match self.recent_kind {
            Some((k, number)) if k == kind => again(&mut self.body, number),
            _ => self.recent_kind = self.string(kind.as_str(), false).map(|n| (kind, n)),
        }
    }

    /// Says a statement's tables: by the numbers they last had if they are
    /// the very same list.
    fn tables(&mut self, tables: &Arc<[String]>) {
        varint(&mut self.body, tables.len() as u64);
        if let Some((held, numbers)) = &self.recent_tables {
            if Arc::ptr_eq(held, tables) {
                for &n in numbers {
                    again(&mut self.body, n);
                }
                return;
            }
        }
        let numbers: Vec<Option<u32>> = tables.iter().map(|t| self.string(t, false)).collect();
        self.recent_tables = numbers
            .into_iter()
            .collect::<Option<_>>()
            .map(|numbers| (tables.clone(), numbers));
    }

    /// Says `s`, which slot `slot` of [`Writer::recent`] keeps: by the
    /// number it has there if it is the very string, else as [`string`]
    /// does.
    fn shared(&mut self, slot: usize, s: &Arc<str>, text: bool) {
        if let Some((held, number)) = &self.recent[slot] {
            if Arc::ptr_eq(held, s) {
                again(&mut self.body, *number);
                return;
            }
        }
        if let Some(number) = self.string(s, text) {
            self.recent[slot] = Some((s.clone(), number));
        }
    }

    /// Says `s`: by number if this record said it already (and it may be
    /// said so: `text`, or at most [`SHORT`] bytes), else in full. The
    /// number by which it may be said again, if it may.
    fn string(&mut self, s: &str, text: bool) -> Option<u32> {
        let pair = pair_of(s.as_bytes());
        let referable = text || s.len() <= SHORT;
        if referable {
            for &(start, len, number) in &self.index[pair..pair + 2] {
                if number != u32::MAX
                    && len as usize == s.len()
                    && self.body[start as usize..][..s.len()] == *s.as_bytes()
                {
                    again(&mut self.body, number);
                    return Some(number);
                }
            }
        }
        varint(&mut self.body, (s.len() as u64) << 1);
        let start = self.body.len();
        self.body.extend_from_slice(s.as_bytes());
        let said = self.said;
        self.said = said.saturating_add(1);
        // (Past 4 GiB of record, or 4 billion strings, strings are said in full.)
        if let (Ok(start), Ok(len), true) = (
            u32::try_from(start),
            u32::try_from(s.len()),
            said < u32::MAX,
        ) {
            self.index[pair + 1] = self.index[pair];
            self.index[pair] = (start, len, said);
            return referable.then_some(said);
        }
        None
    }

    fn option<T>(&mut self, v: Option<T>, put: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.body.push(0),
            Some(v) => {
                self.body.push(1);
                put(self, v);
            }
        }
    }
}

/// The first slot of the writer's index pair for a string: a hash of its
/// length and its first and last eight bytes (the rest is compared).
fn pair_of(s: &[u8]) -> usize {
    let word = |b: &[u8]| match <[u8; 8]>::try_from(b) {
        Ok(w) => u64::from_le_bytes(w),
        Err(_) => b.iter().rev().fold(0, |w, &c| w << 8 | u64::from(c)),
    };
    let n = s.len();
    let h = (n as u64)
        ^ word(&s[..n.min(8)]).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ word(&s[n.saturating_sub(8)..]).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    let h = (h ^ h >> 29).wrapping_mul(0x1656_67b1_9e37_79f9);
    (h >> (64 - SLOTS.trailing_zeros() + 1)) as usize * 2
}

/// Says the record's string numbered `number` again.
fn again(body: &mut Vec<u8>, number: u32) {
    varint(body, u64::from(number) << 1 | 1);
}

/// A difference as an unsigned varint that is short for small magnitudes
/// of either sign (two's complement differences of u64s).
fn zigzag(d: u64) -> u64 {
    let d = d as i64;
    ((d << 1) ^ (d >> 63)) as u64
}

fn unzigzag(v: u64) -> u64 {
    ((v >> 1) as i64 ^ -((v & 1) as i64)) as u64
}

/// The statements of a stored record, in any format.
pub fn decode(bytes: &[u8]) -> Result<Vec<Statement>, String> {
    let format = match bytes.first() {
        Some(b'[') => return serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Some(&f @ (FORMAT | FORMAT_NO_APPROVAL | FORMAT_NO_WHOLE | FORMAT_PLAIN)) => f,
        Some(b) => return Err(format!("unknown statement record format {b:#04x}")),
        None => return Err("empty statement record".into()),
    };
    let mut r = Reader {
        rest: &bytes[1..],
        plain: format == FORMAT_PLAIN,
        whole: format >= FORMAT_NO_APPROVAL,
        approval: format >= FORMAT,
        said: Vec::new(),
        next_seq: 0,
        last_at: 0,
    };
    let n = r.count(MIN_STATEMENT)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(r.statement()?);
    }
    if !r.rest.is_empty() {
        return Err(format!("{} bytes after the last statement", r.rest.len()));
    }
    Ok(out)
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

struct Reader<'a> {
    rest: &'a [u8],
    /// The first binary format: strings in full, seq and time whole.
    plain: bool,
    /// Statements have [`Statement::whole`].
    whole: bool,
    /// Statements end with [`Statement::approval`].
    approval: bool,
    /// Strings said so far in this record.
    said: Vec<Arc<str>>,
    next_seq: u64,
    last_at: u64,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let (&b, rest) = self.rest.split_first().ok_or("record cut short")?;
        self.rest = rest;
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
            Ok(n) if n.saturating_mul(min_size) <= self.rest.len() => Ok(n),
            _ => Err(format!("{n} items cannot fit in {} bytes", self.rest.len())),
        }
    }

    fn utf8(&mut self, n: usize) -> Result<&str, String> {
        if n > self.rest.len() {
            return Err(format!(
                "{n} bytes of text cannot fit in {}",
                self.rest.len()
            ));
        }
        let (s, rest) = self.rest.split_at(n);
        self.rest = rest;
        std::str::from_utf8(s).map_err(|_| "text is not UTF-8".into())
    }

    /// A statement's text: shared with the record's other statements that
    /// say it.
    fn text(&mut self) -> Result<Arc<str>, String> {
        self.said().map(|(s, _)| s)
    }

    /// Any other string: said again only if it is at most [`SHORT`] bytes.
    fn string(&mut self) -> Result<String, String> {
        self.shared().map(|s| s.to_string())
    }

    /// A string other than a statement's text, shared with its other
    /// mentions in the record.
    fn shared(&mut self) -> Result<Arc<str>, String> {
        match self.said()? {
            (s, true) if s.len() > SHORT => Err(format!(
                "a {}-byte string other than a statement's text said again",
                s.len()
            )),
            (s, _) => Ok(s),
        }
    }

    /// A string, and whether the record said it before.
    fn said(&mut self) -> Result<(Arc<str>, bool), String> {
        if self.plain {
            let n = self.count(1)?;
            return Ok((self.utf8(n)?.into(), false));
        }
        let v = self.varint()?;
        if v & 1 == 1 {
            let said = usize::try_from(v >> 1).ok().and_then(|k| self.said.get(k));
            return match said {
                Some(s) => Ok((s.clone(), true)),
                None => Err(format!("string {} before it was said", v >> 1)),
            };
        }
        let n = usize::try_from(v >> 1).map_err(|_| "string too long".to_string())?;
        let s: Arc<str> = self.utf8(n)?.into();
        self.said.push(s.clone());
        Ok((s, false))
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

    /// A statement's seq and time.
    fn seq_at(&mut self) -> Result<(u32, u64), String> {
        if self.plain {
            return Ok((self.u32()?, self.varint()?));
        }
        let seq = self.next_seq.wrapping_add(unzigzag(self.varint()?));
        let seq = u32::try_from(seq).map_err(|_| "seq out of range".to_string())?;
        self.next_seq = u64::from(seq) + 1;
        self.last_at = self.last_at.wrapping_add(unzigzag(self.varint()?));
        Ok((seq, self.last_at))
    }

    fn statement(&mut self) -> Result<Statement, String> {
        let (seq, at) = self.seq_at()?;
        let kind = self.string()?;
        let kind = StatementKind::from_name(&kind)
            .ok_or_else(|| format!("unknown statement kind {kind:?}"))?;
        let name = self.option(Self::shared)?;
        let text = self.text()?;
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
        let n = self.count(1)?;
        let tags = (0..n).map(|_| self.shared()).collect::<Result<_, _>>()?;
        let rows = self.option(Self::varint)?;
        let error = self.option(Self::string)?;
        let whole = match self.whole {
            true => self.option(|r| {
                let len = r.varint()?;
                let (hash, rest) = r.rest.split_first_chunk::<32>().ok_or("record cut short")?;
                r.rest = rest;
                Ok(Whole { len, sha256: *hash })
            })?,
            false => None,
        };
        let approval = match self.approval {
            true => self.option(Self::string)?.map(Arc::from),
            false => None,
        };
        Ok(Statement {
            seq,
            at,
            kind,
            name,
            text,
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
            whole,
            approval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statements() -> Vec<Statement> {
        let plain = Statement {
            at: 1_709_210_096_789_012,
            ..Statement::new(StatementKind::Query, None, "SELECT 1".into(), Class::Read)
        };
        let full = Statement {
            seq: u32::MAX,
            at: 4_102_444_799_999_999,
            kind: StatementKind::Bind,
            name: Some("s1 ünïcode".into()),
            text: "UPDATE \"ta\u{0}ble\" SET x = $1 -- 🎉\n".into(),
            class: Class::Unknown,
            tables: Arc::from(vec!["public.accounts".to_string(), String::new()]),
            decision: Some(Action::Review),
            rule: Some("deny-writes".into()),
            masked: 300,
            parameters: Some(vec![Some("42".into()), None, Some(String::new())]),
            duration_us: Some(1 << 40),
            tags: ["UPDATE 3".into(), "COMMIT".into()].into_iter().collect(),
            rows: Some(3),
            error: Some("42501".into()),
            whole: Some(Whole {
                len: 1 << 40,
                sha256: [0xab; 32],
            }),
            approval: Some("0190f3a1b2c3d4e5".into()),
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
        let list: Vec<Statement> = (0..600u32)
            .map(|i| Statement {
                seq: 1000 + i,
                ..base[i as usize % base.len()].clone()
            })
            .collect();
        let mut records = Records::default();
        for s in &list[..400] {
            records.push(s);
        }
        let first = records.take();
        for s in &list[400..] {
            records.push(s);
        }
        let second = records.take();
        assert!(records.take().is_empty());
        let shape: Vec<(u32, u32)> = first
            .iter()
            .chain(&second)
            .map(|c| (c.first, c.count))
            .collect();
        assert_eq!(shape, [(1000, 256), (1256, 144), (1400, 200)]);
        let back: Vec<Statement> = first
            .iter()
            .chain(&second)
            .flat_map(|c| decode(&c.bytes).unwrap())
            .collect();
        assert_eq!(back, list);
        let mut whole = Vec::new();
        encode(&list[..256], &mut whole);
        assert_eq!(
            first[0].bytes, whole,
            "the same bytes as a record encoded at once"
        );
    }

    /// Large statements are sealed by size: a record ends at the first
    /// statement that takes it past [`RECORD_BYTES`].
    #[test]
    fn records_of_large_statements_are_sealed_by_size() {
        let list: Vec<Statement> = (0..20u32)
            .map(|i| Statement {
                seq: i,
                ..Statement::new(
                    StatementKind::Query,
                    None,
                    format!("SELECT '{i}{}'", "x".repeat(5000)).into(),
                    Class::Read,
                )
            })
            .collect();
        let mut records = Records::default();
        for s in &list {
            records.push(s);
        }
        let chunks = records.take();
        let counts: Vec<u32> = chunks.iter().map(|c| c.count).collect();
        assert_eq!(counts, [7, 7, 6]);
        assert!(chunks.iter().all(|c| c.bytes.len() < RECORD_BYTES + 6000));
        let back: Vec<Statement> = chunks
            .iter()
            .flat_map(|c| decode(&c.bytes).unwrap())
            .collect();
        assert_eq!(back, list);
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

    /// A cut text's whole length and hash round-trip; records of the format
    /// before that field still decode.
    #[test]
    fn cut_texts_keep_their_whole_and_older_records_decode() {
        let long = "SELECT '".to_string() + &"é".repeat(5000) + "'";
        let (text, whole) = Whole::cut(long.clone(), 4096);
        assert!(text.len() <= 4096 && text.len() >= 4095, "{}", text.len());
        assert!(long.starts_with(&*text));
        let whole = whole.unwrap();
        assert_eq!(whole.len, long.len() as u64);
        use sha2::Digest;
        assert_eq!(whole.sha256, <[u8; 32]>::from(sha2::Sha256::digest(&long)));
        let cut = vec![Statement {
            whole: Some(whole),
            ..Statement::new(StatementKind::Query, None, text, Class::Read)
        }];
        let mut bytes = Vec::new();
        encode(&cut, &mut bytes);
        assert_eq!(decode(&bytes).unwrap(), cut);
        let json = serde_json::to_string(&cut).unwrap();
        assert_eq!(serde_json::from_str::<Vec<Statement>>(&json).unwrap(), cut);
        let (short, none) = Whole::cut("SELECT 1".into(), 4096);
        assert!(none.is_none());
        // The same statement without the field, as the format before wrote it.
        let older = vec![Statement::new(
            StatementKind::Query,
            None,
            short,
            Class::Read,
        )];
        let mut bytes = Vec::new();
        encode(&older, &mut bytes);
        assert_eq!(bytes.pop(), Some(0), "no approval: an empty option last");
        bytes[0] = FORMAT_NO_APPROVAL;
        assert_eq!(decode(&bytes).unwrap(), older);
        assert_eq!(bytes.pop(), Some(0), "no whole: an empty option last");
        bytes[0] = FORMAT_NO_WHOLE;
        assert_eq!(decode(&bytes).unwrap(), older);
    }

    /// The approval request behind a statement's decision round-trips.
    #[test]
    fn approvals_behind_statements_are_kept() {
        let list = vec![
            Statement {
                approval: Some("0190f3a1b2c3d4e5".into()),
                decision: Some(Action::Allow),
                rule: Some("dba-review".into()),
                ..Statement::new(
                    StatementKind::Query,
                    None,
                    "DELETE FROM t".into(),
                    Class::Write,
                )
            },
            Statement {
                seq: 1,
                ..Statement::new(StatementKind::Query, None, "SELECT 1".into(), Class::Read)
            },
        ];
        let mut bytes = Vec::new();
        encode(&list, &mut bytes);
        assert_eq!(bytes[0], FORMAT);
        assert_eq!(decode(&bytes).unwrap(), list);
    }

    /// Over its budget, a session's statements are counted, not encoded,
    /// and one statement says how many, under the first one's seq, before
    /// the next recorded one; denied ones count too.
    #[test]
    fn statements_over_the_budget_are_counted_and_said() {
        let mut r = Records::default();
        r.limit(4096);
        let text: Arc<str> = "x".repeat(968).into(); // costs 1000
        let t0 = 1_709_210_096_000_000;
        let st = |seq: u32, at: u64| Statement {
            seq,
            at,
            decision: Some(if seq.is_multiple_of(2) {
                Action::Deny
            } else {
                Action::Allow
            }),
            ..Statement::new(StatementKind::Query, None, text.clone(), Class::Read)
        };
        // A burst: four seconds' worth pass, the rest are counted.
        for seq in 0..100 {
            r.push(&st(seq, t0));
        }
        // One second later: a thousand more bytes may go.
        r.push(&st(100, t0 + 1_000_000));
        let got: Vec<Statement> = r
            .take()
            .iter()
            .flat_map(|c| decode(&c.bytes).unwrap())
            .collect();
        let kinds: Vec<&str> = got.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds, [&["query"; 16][..], &["dropped", "query"]].concat());
        let said = &got[16];
        assert_eq!(said.seq, 16);
        assert!(
            said.text
                .starts_with("84 statements (84000 bytes) not recorded")
                && said.text.contains("42 of them denied"),
            "{}",
            said.text
        );
        assert_eq!(got[17].seq, 100);
        // The second earned 4096 bytes, of which 3480 are left: three
        // more go, and what is turned away then is said at the next take.
        for seq in 101..110 {
            r.push(&st(seq, t0 + 1_000_001));
        }
        let got: Vec<Statement> = r
            .take()
            .iter()
            .flat_map(|c| decode(&c.bytes).unwrap())
            .collect();
        let kinds: Vec<&str> = got.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds, ["query", "query", "query", "dropped"]);
        assert!(got[3].text.starts_with("6 statements"), "{}", got[3].text);
        assert_eq!(got[3].seq, 104);
    }

    /// The runs of a prepared statement say its text, kind, rule, tables
    /// and tag once per record; they decode sharing one text.
    #[test]
    fn runs_of_a_statement_say_their_strings_once() {
        let text: Arc<str> = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;".into();
        let runs: Vec<Statement> = (0..PER_RECORD)
            .map(|i| Statement {
                seq: 7 + i,
                at: 1_709_210_096_789_012 + u64::from(i) * 57,
                name: Some("P_1".into()),
                tables: Arc::from(vec!["public.pgbench_accounts".to_string()]),
                decision: Some(Action::Allow),
                rule: Some("bench".into()),
                duration_us: Some(40 + u64::from(i % 9)),
                tags: ["SELECT 1".into()].into(),
                rows: Some(1),
                ..Statement::new(StatementKind::Execute, None, text.clone(), Class::Read)
            })
            .collect();
        let mut bytes = Vec::new();
        encode(&runs, &mut bytes);
        let back = decode(&bytes).unwrap();
        assert_eq!(back, runs);
        assert!(back.iter().all(|s| Arc::ptr_eq(&s.text, &back[0].text)));
        // Written out in full, each run would take over 120 bytes.
        let per_run = bytes.len() / runs.len();
        assert!(per_run <= 24, "{per_run} bytes per run");
    }

    /// A string the writer refers to because the last statement held the
    /// very same one (name, text, rule, tag, kind, tables) decodes as what
    /// each statement holds, however statements alternate between shared,
    /// equal and different strings, and whatever a string's length.
    #[test]
    fn strings_shared_with_the_last_statement_decode_as_written() {
        let long = "x".repeat(SHORT + 1);
        let (a, b): (Arc<str>, Arc<str>) = ("SELECT 1".into(), "SELECT 2".into());
        let (t1, t2): (Arc<[String]>, Arc<[String]>) = (
            Arc::from(vec!["public.a".to_string()]),
            Arc::from(vec!["public.b".to_string(), long.clone()]),
        );
        let name: Arc<str> = long.as_str().into();
        let tag: Arc<str> = "SELECT 1".into();
        let st = |text: &Arc<str>, tables: &Arc<[String]>, kind: StatementKind| Statement {
            kind,
            name: Some(name.clone()),
            tables: tables.clone(),
            rule: Some(text.clone()),
            tags: [tag.clone(), text.clone()].into_iter().collect(),
            ..Statement::new(StatementKind::Execute, None, text.clone(), Class::Read)
        };
        use StatementKind::{Execute, Parse};
        let list: Vec<Statement> = [
            st(&a, &t1, Execute),
            st(&a, &t1, Execute),
            st(&b, &t2, Execute),
            st(&"SELECT 1".into(), &t2, Execute),
            st(&a, &Arc::from(vec!["public.a".to_string()]), Parse),
            st(&b, &t1, Execute),
            st(&a, &t2, Execute),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, s)| Statement { seq: i as u32, ..s })
        .collect();
        let mut bytes = Vec::new();
        encode(&list, &mut bytes);
        assert_eq!(decode(&bytes).unwrap(), list);
    }

    /// Records of the first binary format (every string in full), which
    /// older agents wrote, still decode.
    #[test]
    fn records_of_the_first_binary_format_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/store");
        let bytes = std::fs::read(dir.join("two")).unwrap();
        assert_eq!(bytes[0], FORMAT_PLAIN);
        let list = decode(&bytes).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(
            &*list[0].text,
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42;"
        );
        assert_eq!(list[0].kind, StatementKind::Query);
    }

    /// Only a statement's text (shared when decoded) may be said again
    /// whatever its length: any other string said again is short, so a
    /// small record cannot decode to a huge one.
    #[test]
    fn long_strings_other_than_texts_are_not_said_again() {
        let long = "t".repeat(SHORT + 1);
        let st = Statement {
            tables: Arc::from(vec![long.clone(), long.clone()]),
            ..Statement::new(
                StatementKind::Query,
                None,
                long.as_str().into(),
                Class::Read,
            )
        };
        let mut bytes = Vec::new();
        encode(std::slice::from_ref(&st), &mut bytes);
        assert_eq!(decode(&bytes).unwrap(), std::slice::from_ref(&st));
        // The same record with the tables saying the text again by number.
        let mut forged = vec![FORMAT, 1, 0, 0];
        forged.push(5 << 1); // kind: a new 5-byte string
        forged.extend_from_slice(b"query");
        forged.push(0); // no name
        varint(&mut forged, (long.len() as u64) << 1);
        forged.extend_from_slice(long.as_bytes());
        forged.push(class_byte(Class::Read));
        forged.extend_from_slice(&[2, 1 << 1 | 1, 1 << 1 | 1]); // two tables: string 1 again
        forged.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        let err = decode(&forged).unwrap_err();
        assert!(err.contains("said again"), "{err}");
        // Said again as a text, it is fine.
        let mut runs = Vec::new();
        encode(&[st.clone(), st.clone()], &mut runs);
        assert!(runs.len() < 2 * bytes.len() - long.len());
    }

    #[test]
    fn fuzzing_seeds_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/store");
        for seed in ["two", "json", "runs"] {
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
