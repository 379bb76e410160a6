//! Export bundles: a selection of the log, as OCSF events with what it
//! takes to check them against the node's signed checkpoints on another
//! machine, in one JSON Lines file:
//!
//! ```text
//! {"bundle": {format, origin, key, fingerprint, created_at, selection, from, anchor}}
//! {"stub": {seq, head, digest}}                    an entry left out
//! {"entry": {seq, head, payload}}                  an entry selected, whole (base64)
//! {...OCSF event...}                               its events, one per line
//! {"checkpoint": {size, note}}                     after entry size-1
//! {"end": {lines, entries, selected, events, sha256}}
//! ```
//!
//! Every entry from the first to the last in the bundle is there, whole
//! or as a stub, so the chain is checked through the stubs up to a
//! checkpoint that seals it. A stub's header tells what it was (kind,
//! time, session, workload): `verify` checks none of them matched the
//! selection. When the bundle does not start at the log's start, its first
//! line after the header is the stub of the entry just before the
//! selection (`anchor`), dated before it: nothing earlier was selected.
//! Each event is made again from its entry and must be the same to the
//! byte; the end line counts the lines and holds the SHA-256 of every line
//! before it but the events, so a bundle cut short or changed by one byte
//! is found.

use std::io::{BufRead, Write};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{
    audit::{Audit, Report},
    hex,
    log::{self, Header, Kind},
    ocsf,
    seal::PublicKey,
    SessionId,
};

pub const FORMAT: u32 = 1;

/// What an export takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// Entries written at or after (µs since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// … and at or before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionId>,
}

impl Selection {
    /// Whether an entry with this header is selected. The agent's own
    /// events (start, stop, gaps) go with every selection of their time.
    pub fn matches(&self, h: &Header<'_>) -> bool {
        if self.since.is_some_and(|t| h.at < t) || self.until.is_some_and(|t| h.at > t) {
            return false;
        }
        if h.kind == Kind::Agent {
            return true;
        }
        if self.workload.as_deref().is_some_and(|w| w != h.workload) {
            return false;
        }
        if self.session.is_some_and(|s| s.0 != h.session) {
            return false;
        }
        true
    }

    /// The earliest time a selected entry can have been written.
    fn starts(&self) -> Option<u64> {
        let session = self.session.map(SessionId::micros);
        match (self.since, session) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// How an export went.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Exported {
    pub from: u64,
    pub to: u64,
    pub entries: u64,
    pub selected: u64,
    pub events: u64,
    pub checkpoints: u64,
    /// Entries at the bundle's end no checkpoint sealed yet.
    pub unsealed: u64,
}

/// Counts what goes through, and hashes it.
struct Hashing<W: Write> {
    inner: W,
    hash: Sha256,
    lines: u64,
}

impl<W: Write> Hashing<W> {
    /// Event lines, already serialized, each ending with a newline: not
    /// hashed (each is made again from its entry, which is), only counted.
    fn events(&mut self, bytes: &[u8], lines: u64) -> std::io::Result<()> {
        self.lines += lines;
        self.inner.write_all(bytes)
    }

    fn line(&mut self, v: &Value) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec(v).expect("JSON values serialize");
        bytes.push(b'\n');
        self.hash.update(&bytes);
        self.lines += 1;
        self.inner.write_all(&bytes)
    }
}

/// Entries in order, with their seqs.
pub type Entries<'a> = Box<dyn Iterator<Item = Result<(u64, Vec<u8>), String>> + 'a>;
/// Checkpoints in order: size and signed note.
pub type Seals<'a> = Box<dyn Iterator<Item = Result<(u64, String), String>> + 'a>;

/// Where the log is read from: the store, or (in tests) anything that can
/// give entries by seq, in order from a seq, and checkpoints.
pub trait Source {
    /// The first entry kept and the next seq (the log's size).
    fn bounds(&self) -> Result<(u64, u64), String>;
    fn entry(&self, seq: u64) -> Result<Option<Vec<u8>>, String>;
    /// Entries from `seq` on.
    fn entries_from(&self, seq: u64) -> Entries<'_>;
    /// Checkpoints (size, note) from size `from` on, by size.
    fn checkpoints_from(&self, from: u64) -> Seals<'_>;
    /// The size of the first checkpoint larger than `seq`.
    fn sealed_after(&self, seq: u64) -> Result<Option<u64>, String> {
        self.checkpoints_from(seq + 1)
            .next()
            .transpose()
            .map(|c| c.map(|(size, _)| size))
    }
    /// Seq of the last entry of session `id` (its latest state or
    /// statements), if known.
    fn last_of_session(&self, id: SessionId) -> Result<Option<u64>, String>;
    /// The node's verifier key, as the store names it.
    fn key(&self) -> Result<Option<String>, String>;
}

/// The first seq whose entry was written at or after `t` (entries' times
/// never go back), by bisection.
fn first_at(src: &dyn Source, t: u64, lo: u64, hi: u64) -> Result<u64, String> {
    let (mut lo, mut hi) = (lo, hi);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let at = match src.entry(mid)? {
            Some(b) => log::parse(&b)?.header.at,
            // A hole (tampering, or damage): verify will say; go on.
            None => 0,
        };
        if at < t {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Writes the bundle of `sel` to `out`; `progress(done, total)` is told
/// as entries go by.
pub fn export(
    src: &dyn Source,
    sel: &Selection,
    origin: &str,
    out: impl Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Exported, String> {
    let (first, size) = src.bounds()?;
    let start = match sel.starts() {
        Some(t) => first_at(src, t, first, size)?,
        None => first,
    };
    let anchor = start > first;
    let from = if anchor { start - 1 } else { start };
    // The last entry the selection can need.
    let needed = match sel.session {
        Some(id) => src.last_of_session(id)?.unwrap_or(start),
        None => size.saturating_sub(1),
    };
    let key = src.key()?;
    // The bundle ends where a checkpoint seals everything needed, or at
    // the log's end.
    let mut to = src.sealed_after(needed)?.unwrap_or(size);
    if let Some(until) = sel.until {
        // Past `until`, nothing more is selected: end at the first
        // checkpoint after the first entry written later.
        let later = first_at(src, until.saturating_add(1), start, size)?;
        to = to.min(src.sealed_after(later)?.unwrap_or(size));
    }
    let mut w = Hashing {
        inner: std::io::BufWriter::with_capacity(1 << 20, out),
        hash: Sha256::new(),
        lines: 0,
    };
    let io = |e: std::io::Error| format!("writing the bundle: {e}");
    let vkey = key.as_deref().and_then(|k| PublicKey::parse(k).ok());
    w.line(&json!({"bundle": {
        "format": FORMAT,
        "origin": origin,
        "key": key,
        "fingerprint": vkey.as_ref().map(PublicKey::fingerprint),
        "created_at": crate::rfc3339_micros(crate::now_micros()),
        "selection": sel,
        "from": from,
        "anchor": anchor,
    }}))
    .map_err(io)?;
    let mut done = Exported {
        from,
        to,
        ..Exported::default()
    };
    let mut seals = src
        .checkpoints_from(from + 1)
        .take_while(|c| c.as_ref().map_or(true, |(s, _)| *s <= to))
        .peekable();
    let total = to.saturating_sub(from);
    let mut sealed_to = from;
    let mut events = Vec::with_capacity(1 << 20);
    for item in src.entries_from(from) {
        let (seq, bytes) = item?;
        if seq >= to {
            break;
        }
        let e = log::parse(&bytes).map_err(|e| format!("entry {seq}: {e}"))?;
        let take = !(anchor && seq == from) && sel.matches(&e.header);
        if take {
            w.line(&json!({"entry": {"seq": seq, "head": hex(e.head), "payload": B64.encode(e.payload)}}))
                .map_err(io)?;
            events.clear();
            let n = ocsf::write_events(&mut events, seq, &e)
                .map_err(|e| format!("entry {seq}: {e}"))?;
            w.events(&events, n).map_err(io)?;
            done.selected += 1;
            done.events += n;
        } else {
            w.line(&json!({"stub": log::Stub::of(seq, &e)}))
                .map_err(io)?;
        }
        done.entries += 1;
        while let Some(c) = seals.next_if(|c| c.as_ref().map_or(true, |(s, _)| *s <= seq + 1)) {
            let (size, note) = c?;
            w.line(&json!({"checkpoint": {"size": size, "note": note}}))
                .map_err(io)?;
            done.checkpoints += 1;
            sealed_to = size;
        }
        if done.entries.is_multiple_of(4096) {
            progress(done.entries, total);
        }
    }
    progress(done.entries, total);
    done.unsealed = to.saturating_sub(sealed_to.max(from));
    let digest = hex(&w.hash.clone().finalize());
    let lines = w.lines;
    w.line(&json!({"end": {
        "lines": lines,
        "entries": done.entries,
        "selected": done.selected,
        "events": done.events,
        "sha256": digest,
    }}))
    .map_err(io)?;
    w.inner.flush().map_err(io)?;
    Ok(done)
}

/// What `verify` says of a bundle: the audit of its chain and
/// checkpoints, with what it found of the bundle itself.
#[derive(Debug, Default, Clone, Serialize)]
pub struct BundleReport {
    #[serde(flatten)]
    pub audit: Report,
    pub origin: Option<String>,
    pub selection: Option<Selection>,
    pub selected: u64,
    pub events: u64,
}

#[derive(Deserialize)]
struct Line {
    bundle: Option<Value>,
    stub: Option<log::Stub>,
    entry: Option<WholeEntry>,
    checkpoint: Option<SealLine>,
    end: Option<End>,
}

#[derive(Deserialize)]
struct WholeEntry {
    seq: u64,
    head: String,
    payload: String,
}

#[derive(Deserialize)]
struct SealLine {
    size: u64,
    note: String,
}

#[derive(Deserialize)]
struct End {
    lines: u64,
    entries: u64,
    selected: u64,
    events: u64,
    sha256: String,
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Checks a bundle read from `input` (see the module's documentation).
/// `pin`: the node's key as the responder knows it (a verifier key or a
/// fingerprint); without it, the key the bundle names is used, and the
/// report says so.
pub fn verify(input: impl BufRead, pin: Option<&str>) -> Result<BundleReport, String> {
    // One line buffer for the whole bundle: its lines are read into it.
    let mut input = input;
    let mut line: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut hash = Sha256::new();
    let mut n = 0u64;
    let mut next = |line: &mut Vec<u8>| -> Result<Option<u64>, String> {
        line.clear();
        let got = input
            .read_until(b'\n', line)
            .map_err(|e| format!("reading the bundle: {e}"))?;
        if got == 0 {
            return Ok(None);
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        n += 1;
        Ok(Some(n))
    };
    if next(&mut line)?.is_none() {
        return Err("an empty file is not a bundle".into());
    }
    let first = std::mem::take(&mut line);
    hash.update(&first);
    hash.update(b"\n");
    let head: Line = serde_json::from_slice(&first)
        .map_err(|_| "not a bundle (its first line is no bundle header)".to_string())?;
    let header = head
        .bundle
        .ok_or("not a bundle (its first line is no bundle header)")?;
    if header["format"] != json!(FORMAT) {
        return Err(format!(
            "bundle format {} is not one this version reads ({FORMAT})",
            header["format"]
        ));
    }
    let named = header["key"]
        .as_str()
        .and_then(|k| PublicKey::parse(k).ok());
    let mut report = BundleReport {
        origin: header["origin"].as_str().map(str::to_owned),
        selection: serde_json::from_value(header["selection"].clone()).ok(),
        ..BundleReport::default()
    };
    let sel = report.selection.clone().unwrap_or_default();
    let (key, early) = match pin {
        None => (named.clone(), None),
        Some(p) => match PublicKey::pinned(p, named.as_ref())? {
            Ok(k) => {
                let other = (named.as_ref() != Some(&k))
                    .then(|| PublicKey::not_pinned(named.as_ref(), &k.fingerprint()));
                (Some(k), other)
            }
            Err(why) => (None, Some(why)),
        },
    };
    let mut audit = Audit::new(key, pin.is_some(), false);
    if let Some(f) = early {
        audit.report.find(f);
    }
    let anchor = header["anchor"] == json!(true);
    let from = header["from"].as_u64();
    // Events still to come from the entry before, as the lines they must be.
    let mut owed: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut owed_at = 0usize;
    let mut owed_of = 0u64;
    let mut ended = None;
    let mut entries = 0u64;
    let mut last_at = 0u64;
    let mut session_ended = false;
    while let Some(no) = next(&mut line)? {
        let bytes: &[u8] = &line;
        if ended.is_some() {
            if bytes.is_empty() {
                continue;
            }
            audit
                .report
                .find(format!("line {no}: more after the end line"));
            break;
        }
        if owed_at < owed.len() {
            // The line must be the next event made, to the byte, then its
            // newline (no scan for the newline unless it is not).
            let rest = &owed[owed_at..];
            let end = if rest.starts_with(bytes) && rest.get(bytes.len()) == Some(&b'\n') {
                owed_at + bytes.len()
            } else {
                audit.report.find(format!(
                    "line {no}: an event of entry {owed_of} is not what the entry holds: the event was changed"
                ));
                rest.iter()
                    .position(|&b| b == b'\n')
                    .map_or(owed.len(), |i| owed_at + i)
            };
            owed_at = end + 1;
            report.events += 1;
            continue;
        }
        if bytes.is_empty() {
            continue;
        }
        let Ok(parsed) = serde_json::from_slice::<Line>(bytes) else {
            audit.report.find(format!(
                "line {no} is not a line of a bundle: the bundle was changed or cut"
            ));
            hash.update(bytes);
            hash.update(b"\n");
            continue;
        };
        if let Some(end) = parsed.end {
            ended = Some((no, end));
            continue;
        }
        hash.update(bytes);
        hash.update(b"\n");
        if let Some(s) = parsed.stub {
            let head =
                unhex(&s.head).ok_or_else(|| format!("line {no}: a stub's head is not hex"))?;
            let digest: [u8; 32] = unhex(&s.digest)
                .and_then(|d| d.try_into().ok())
                .ok_or_else(|| format!("line {no}: a stub's digest is not a SHA-256"))?;
            match log::parse(&head) {
                Ok(e) => {
                    let is_anchor = anchor && Some(s.seq) == from && entries == 0;
                    if is_anchor {
                        if sel.starts().is_some_and(|t| e.header.at >= t) {
                            audit.report.find(format!(
                                "entry {} before the selection is dated within it: selected entries before the bundle may be missing",
                                s.seq
                            ));
                        }
                    } else if sel.matches(&e.header) {
                        audit.report.find(format!(
                            "entry {} ({}, {}) matches the selection but was left out",
                            s.seq,
                            e.header.kind.as_str(),
                            crate::rfc3339_micros(e.header.at)
                        ));
                    }
                    last_at = e.header.at;
                }
                Err(why) => audit
                    .report
                    .find(format!("line {no}: entry {}: {why}", s.seq)),
            }
            audit.stub(s.seq, &head, &digest, None);
            entries += 1;
        } else if let Some(w) = parsed.entry {
            let head =
                unhex(&w.head).ok_or_else(|| format!("line {no}: an entry's head is not hex"))?;
            let payload = B64
                .decode(&w.payload)
                .map_err(|_| format!("line {no}: an entry's payload is not base64"))?;
            let mut bytes = head;
            bytes.extend_from_slice(&payload);
            match log::parse(&bytes) {
                Ok(e) => {
                    owed.clear();
                    owed_at = 0;
                    if let Err(why) = ocsf::write_events(&mut owed, w.seq, &e) {
                        audit.report.find(format!("entry {}: {why}", w.seq));
                    }
                    if e.header.kind == Kind::Session
                        && sel.session.is_some_and(|s| s.0 == e.header.session)
                        && serde_json::from_slice::<Value>(e.payload)
                            .is_ok_and(|v| v["outcome"] != "open")
                    {
                        session_ended = true;
                    }
                    last_at = e.header.at;
                }
                Err(why) => audit
                    .report
                    .find(format!("line {no}: entry {}: {why}", w.seq)),
            }
            owed_of = w.seq;
            audit.entry(w.seq, &bytes);
            report.selected += 1;
            entries += 1;
        } else if let Some(c) = parsed.checkpoint {
            audit.checkpoint(c.size, &c.note);
        } else {
            audit.report.find(format!(
                "line {no} is neither an entry, a stub, an event nor a checkpoint"
            ));
        }
    }
    if owed_at < owed.len() {
        let left = owed[owed_at..].iter().filter(|&&b| b == b'\n').count();
        audit
            .report
            .find(format!("{left} event(s) of entry {owed_of} are missing"));
    }
    let digest = hex(&hash.finalize());
    match ended {
        None => audit
            .report
            .find("the bundle has no end line: it was cut".into()),
        Some((no, end)) => {
            if end.sha256 != digest || end.lines != no - 1 {
                audit.report.find(
                    "the bundle's lines are not the ones its end line hashed: it was changed"
                        .into(),
                );
            }
            if (end.entries, end.selected, end.events) != (entries, report.selected, report.events)
            {
                audit.report.find(format!(
                    "the end line counts {} entries, {} selected and {} events; the bundle holds {entries}, {} and {}",
                    end.entries, end.selected, end.events, report.selected, report.events
                ));
            }
        }
    }
    let mut r = audit.finish();
    if sel.session.is_some() && !session_ended {
        r.warnings.push(
            "the session had not ended when the bundle was made: it may go on past the bundle"
                .into(),
        );
    } else if sel.session.is_none() && sel.until.is_none_or(|u| last_at <= u) {
        r.warnings.push(format!(
            "the selection is open-ended: it holds what the log held up to {} (entries written later are not in it)",
            crate::rfc3339_micros(last_at)
        ));
    }
    report.audit = r;
    Ok(report)
}

#[cfg(feature = "store")]
impl Source for crate::SledStore {
    fn bounds(&self) -> Result<(u64, u64), String> {
        let size = self.found_head().map_err(|e| e.to_string())?.next;
        let first = self
            .entries(0)
            .next()
            .transpose()
            .map_err(|e| e.to_string())?
            .map_or(size, |(s, _)| s);
        Ok((first, size))
    }

    fn entry(&self, seq: u64) -> Result<Option<Vec<u8>>, String> {
        Ok(crate::SledStore::entry(self, seq)
            .map_err(|e| e.to_string())?
            .map(|v| v.to_vec()))
    }

    fn entries_from(&self, seq: u64) -> Entries<'_> {
        Box::new(
            self.entries(seq)
                .map(|r| r.map(|(s, v)| (s, v.to_vec())).map_err(|e| e.to_string())),
        )
    }

    fn checkpoints_from(&self, from: u64) -> Seals<'_> {
        Box::new(
            self.checkpoints_since(from)
                .map(|r| r.map_err(|e| e.to_string())),
        )
    }

    fn last_of_session(&self, id: SessionId) -> Result<Option<u64>, String> {
        self.last_entry_of(id).map_err(|e| e.to_string())
    }

    fn key(&self) -> Result<Option<String>, String> {
        self.named_key().map_err(|e| e.to_string())
    }
}

#[cfg(all(test, feature = "store"))]
mod tests {
    use super::*;
    use crate::audit::tests::{key, open, sealed_store};

    fn bundle(name: &str, sel: &Selection) -> (Vec<u8>, Exported) {
        let dir = sealed_store(name);
        let store = open(&dir);
        let mut out = Vec::new();
        let done = export(
            &store,
            sel,
            "test-host/interceptor",
            &mut out,
            &mut |_, _| {},
        )
        .unwrap();
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        (out, done)
    }

    /// The end line's hash of `text`: every line but the events.
    fn kept_digest(text: &str) -> String {
        let mut h = Sha256::new();
        for l in text.lines() {
            if ["{\"entry\"", "{\"stub\"", "{\"checkpoint\"", "{\"bundle\""]
                .iter()
                .any(|p| l.starts_with(p))
            {
                h.update(l.as_bytes());
                h.update(b"\n");
            }
        }
        hex(&h.finalize())
    }

    fn check(bytes: &[u8], pin: Option<&str>) -> BundleReport {
        verify(bytes, pin).unwrap()
    }

    fn has(r: &BundleReport, want: &str) {
        assert!(
            r.audit.findings.iter().any(|f| f.contains(want)),
            "want `{want}` in {:#?}",
            r.audit.findings
        );
    }

    #[test]
    fn a_whole_export_verifies_with_the_pinned_key_and_any_edit_is_found() {
        let (b, done) = bundle("all", &Selection::default());
        assert_eq!(
            (
                done.from,
                done.to,
                done.entries,
                done.selected,
                done.unsealed
            ),
            (0, 10, 10, 10, 0)
        );
        // 3 × (connect, 1 statement, end) and the stop.
        assert_eq!(done.events, 10);
        let vkey = key().public().vkey();
        let r = check(&b, Some(&vkey));
        assert!(r.audit.intact(), "{r:#?}");
        assert_eq!((r.selected, r.events, r.audit.sealed_through), (10, 10, 10));
        let r = check(&b, Some(&key().public().fingerprint()));
        assert!(r.audit.intact(), "{r:#?}");

        // Every event is OCSF, with our sequence and the session.
        let text = String::from_utf8(b.clone()).unwrap();
        let events: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v.get("class_uid").is_some())
            .collect();
        assert_eq!(events.len(), 10);
        let query = events
            .iter()
            .find(|e| e["activity_name"] == "Query")
            .unwrap();
        assert_eq!(query["class_uid"], 6005);
        assert_eq!(query["type_uid"], 600504);
        assert_eq!(query["query_info"]["query_string"], "SELECT 0");
        assert_eq!(query["actor"]["app_name"], "web");
        assert!(query["metadata"]["correlation_uid"].is_string());
        let connect = events
            .iter()
            .find(|e| e["activity_name"] == "Connect")
            .unwrap();
        assert_eq!(connect["actor"]["process"]["pid"], 0);

        // One byte changed anywhere is found: in an event, a payload, the
        // end line, or the header.
        for (i, find) in [
            ("SELECT 0", "the event was changed"),
            ("\"payload\":\"", "does not name the hash"),
            ("\"sha256\":\"", "it was changed"),
            ("\"origin\":\"test", "it was changed"),
        ] {
            let at = text.find(i).unwrap() + i.len() - 1;
            let mut edited = b.clone();
            edited[at] = if edited[at] == b'A' { b'B' } else { b'A' };
            let r = check(&edited, Some(&vkey));
            assert!(!r.audit.intact(), "{i}: {r:#?}");
            let _ = find;
        }
        // The event changed and the end line's hash made again: the event
        // is made again from its entry, and differs.
        let forged = text.replacen("SELECT 0", "SELECT 9", 1);
        let body: String = forged
            .lines()
            .filter(|l| !l.starts_with("{\"end\""))
            .map(|l| format!("{l}\n"))
            .collect();
        let end = format!(
            "{{\"end\":{{\"lines\":{},\"entries\":10,\"selected\":10,\"events\":10,\"sha256\":\"{}\"}}}}\n",
            body.lines().count(),
            kept_digest(&body)
        );
        let r = check(format!("{body}{end}").as_bytes(), Some(&vkey));
        has(&r, "the event was changed");
        assert_eq!(r.audit.findings.len(), 1, "{r:#?}");
        // Cut short.
        let r = check(&b[..b.len() / 2], Some(&vkey));
        has(&r, "it was cut");
        // An entry taken out with its event, and two entries swapped: the
        // chain says where, whatever the end line says.
        let lines: Vec<&str> = text.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.starts_with("{\"entry\"") && l.contains("\"seq\":4}"))
            .unwrap();
        let mut out: Vec<&str> = lines.clone();
        out.drain(at..at + 2);
        let r = check(out.join("\n").as_bytes(), Some(&vkey));
        has(&r, "entry 4 is missing");
        let mut out: Vec<&str> = lines.clone();
        out.swap(at, at + 2);
        out.swap(at + 1, at + 3);
        let r = check(out.join("\n").as_bytes(), Some(&vkey));
        has(&r, "entry 4 is missing: the entry after 3 is numbered 5");
        // Another key.
        let other = crate::seal::NodeKey::from_seed([1; 32], "test-host/interceptor");
        let r = check(&b, Some(&other.public().vkey()));
        has(&r, "not the pinned key");
        has(&r, "not signed by key");
    }

    #[test]
    fn a_selection_leaves_out_stubs_and_a_dropped_entry_is_found() {
        let dir = sealed_store("one");
        let store = open(&dir);
        let second = crate::Store::list(&store, &crate::Filter::default()).unwrap()[1].id;
        let sel = Selection {
            session: Some(second),
            ..Selection::default()
        };
        let mut b = Vec::new();
        let done = export(&store, &sel, "h", &mut b, &mut |_, _| {}).unwrap();
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        // Entries 3..5 are the session's, 2 is the anchor, and the
        // checkpoint of size 6 seals them.
        assert_eq!(done.selected, 3, "{done:?}");
        assert!(
            done.from == 2 && done.to == 6 && done.entries == 4,
            "{done:?}"
        );
        let vkey = key().public().vkey();
        let r = check(&b, Some(&vkey));
        assert!(r.audit.intact(), "{r:#?}");
        assert!(r.audit.warnings.is_empty(), "{r:#?}");

        // An exporter that leaves a selected entry out as a stub is caught.
        let text = String::from_utf8(b).unwrap();
        let mut out = String::new();
        let mut skip_events = 0;
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            if skip_events > 0 && v.get("class_uid").is_some() {
                skip_events -= 1;
                continue;
            }
            if let Some(e) = v.get("entry").filter(|e| e["seq"] == 4) {
                let head = unhex(e["head"].as_str().unwrap()).unwrap();
                let payload = B64.decode(e["payload"].as_str().unwrap()).unwrap();
                let mut bytes = head;
                bytes.extend_from_slice(&payload);
                let stub = log::Stub::of(4, &log::parse(&bytes).unwrap());
                out.push_str(&json!({"stub": stub}).to_string());
                out.push('\n');
                skip_events = 1;
                continue;
            }
            if v.get("end").is_some() {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        let end = format!(
            "{{\"end\":{{\"lines\":{},\"entries\":4,\"selected\":2,\"events\":2,\"sha256\":\"{}\"}}}}\n",
            out.lines().count(),
            kept_digest(&out)
        );
        let r = check(format!("{out}{end}").as_bytes(), Some(&vkey));
        has(&r, "entry 4 (statements");
        assert_eq!(r.audit.findings.len(), 1, "{r:#?}");
    }
}
