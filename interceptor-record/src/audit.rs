//! Checking a log against itself and its checkpoints: what `interceptor
//! verify` runs, on a store in place and on an export bundle. An [`Audit`]
//! is fed entries in seq order, each checkpoint before the entry at its
//! size (the first one it does not seal), and says what it found.

use std::collections::VecDeque;

use crate::{
    log::{self, Break, Chain, Kind},
    seal::{Checkpoint, PublicKey},
};

/// Most findings kept (the rest are counted).
const FINDINGS: usize = 50;

/// What an audit found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    /// Entries checked (whole or as stubs).
    pub entries: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
    pub checkpoints: u64,
    /// Entries below this seq are sealed by a checkpoint that verified.
    pub sealed_through: u64,
    /// The key checkpoints were checked with, and whether it was pinned.
    pub key: Option<String>,
    pub pinned: bool,
    /// Broken links and bad checkpoints, first first: tampering, or damage.
    pub findings: Vec<String>,
    pub more_findings: u64,
    /// What holds but cannot be proven (entries not sealed yet, an
    /// unpinned key).
    pub warnings: Vec<String>,
}

impl Report {
    pub fn intact(&self) -> bool {
        self.findings.is_empty()
    }

    pub fn find(&mut self, f: String) {
        if self.findings.len() < FINDINGS {
            self.findings.push(f);
        } else {
            self.more_findings += 1;
        }
    }
}

/// See the module's documentation.
pub struct Audit {
    key: Option<PublicKey>,
    chain: Chain,
    /// Checkpoints read but not reached yet (size past the entries so far).
    waiting: VecDeque<Checkpoint>,
    /// The last checkpoint that verified: its size and head.
    last_seal: Option<(u64, [u8; 32])>,
    /// Whether the last sealed entry was the agent's stop.
    sealed_at_stop: bool,
    /// A `stop` event: the next entry must be the `gap` of the next start.
    after_stop: Option<u64>,
    /// The kind and event of the newest entry.
    newest_stop: bool,
    /// The latest `prune` event's `through` (entries up to it removed).
    pruned_through: Option<u64>,
    /// Whether the walk starts at the log's start (or at its first kept
    /// entry), rather than wherever an export began.
    whole_log: bool,
    pub report: Report,
}

impl Audit {
    /// An audit checking checkpoints with `key` (`pinned`: given by the
    /// responder, not read from what is checked).
    pub fn new(key: Option<PublicKey>, pinned: bool, whole_log: bool) -> Audit {
        let report = Report {
            key: key.as_ref().map(PublicKey::fingerprint),
            pinned,
            ..Report::default()
        };
        Audit {
            key,
            chain: Chain::default(),
            waiting: VecDeque::new(),
            last_seal: None,
            sealed_at_stop: false,
            after_stop: None,
            newest_stop: false,
            pruned_through: None,
            whole_log,
            report,
        }
    }

    /// A checkpoint, as its signed note.
    pub fn checkpoint(&mut self, size: u64, note: &str) {
        self.report.checkpoints += 1;
        let Some(key) = &self.key else {
            return;
        };
        let cp = match Checkpoint::open(note, key) {
            Ok(cp) => cp,
            Err(e) => return self.report.find(format!("checkpoint {size}: {e}")),
        };
        if cp.size != size {
            return self.report.find(format!(
                "checkpoint {size} is stored under the wrong size (it says {})",
                cp.size
            ));
        }
        match self.last_seal {
            Some(before) if before != cp.from => self.report.find(format!(
                "checkpoint {size} follows checkpoint {} but names checkpoint {} as the one before it: checkpoints were removed, replaced or re-signed",
                before.0, cp.from.0
            )),
            _ => {}
        }
        self.last_seal = Some((cp.size, cp.head));
        match self.chain.head() {
            // Sealing only entries before the walk began (pruned, or left
            // out of a bundle before its start).
            None => {
                if self.report.first.is_none() {
                    self.waiting.push_back(cp);
                }
            }
            Some((next, _)) if cp.size < next => self.report.find(format!(
                "checkpoint {size} comes after entry {} had been read: stored out of order",
                next - 1
            )),
            Some(_) => self.waiting.push_back(cp),
        }
        self.reach();
    }

    /// Compares the chain with the checkpoints it has reached.
    fn reach(&mut self) {
        let Some((next, head)) = self.chain.head() else {
            return;
        };
        while let Some(cp) = self.waiting.front() {
            if cp.size > next {
                break;
            }
            let cp = self.waiting.pop_front().expect("front");
            if cp.size < next {
                // Sealed entries before the walk began.
                if self.report.first.is_some_and(|f| cp.size > f) {
                    self.report
                        .find(format!("checkpoint {} was not reached in order", cp.size));
                }
                continue;
            }
            if cp.head != head {
                self.report.find(format!(
                    "checkpoint {} does not match the log: one of entries {}–{} (the range it seals) differs from what was signed",
                    cp.size,
                    cp.from.0,
                    cp.size - 1
                ));
            } else {
                self.report.sealed_through = cp.size;
                self.sealed_at_stop = self.newest_stop;
            }
        }
    }

    /// Entry `seq`, whole.
    pub fn entry(&mut self, seq: u64, bytes: &[u8]) {
        match log::parse(bytes) {
            Ok(e) => {
                let event = (e.header.kind == Kind::Agent)
                    .then(|| serde_json::from_slice::<serde_json::Value>(e.payload).ok())
                    .flatten();
                self.stub(seq, e.head, &log::digest(e.payload), event.as_ref());
            }
            Err(why) => {
                self.report.find(Break::Unreadable { seq, why }.to_string());
                self.resume(seq);
            }
        }
    }

    /// Entry `seq` as its header and payload digest (`event`: an agent
    /// event's JSON, when the payload is at hand).
    pub fn stub(
        &mut self,
        seq: u64,
        head: &[u8],
        digest: &[u8; 32],
        event: Option<&serde_json::Value>,
    ) {
        if self.report.first.is_none() {
            self.report.first = Some(seq);
            let prev = log::parse(head).map(|e| e.header.prev).unwrap_or_default();
            if self.whole_log && seq == 0 && prev != [0; 32] {
                self.report
                    .find("entry 0 names an entry before it: the log's start was cut".into());
            }
        }
        match self.chain.push_parts(seq, head, digest) {
            Ok(_) => {}
            Err(b) => {
                self.report.find(b.to_string());
                // Go on from here, to find what else is wrong.
                let mut c = Chain::default();
                if c.push_parts(seq, head, digest).is_ok() {
                    self.chain = c;
                }
            }
        }
        self.report.entries += 1;
        self.report.last = Some(seq);
        let name = event.and_then(|e| e.get("event")).and_then(|e| e.as_str());
        if let Some(stop) = self.after_stop {
            match name {
                Some("gap") => self.after_stop = None,
                // `interceptor detach`, run while no agent runs.
                Some("detach") => {}
                _ => {
                    self.after_stop = None;
                    self.report.find(format!(
                        "entry {seq} follows the agent's stop (entry {stop}) but is not the gap record of its next start: put there by hand"
                    ));
                }
            }
        }
        self.newest_stop = name == Some("stop");
        if self.newest_stop {
            self.after_stop = Some(seq);
        }
        if name == Some("prune") {
            self.pruned_through = event
                .and_then(|e| e.get("through"))
                .and_then(|t| t.as_u64());
        }
        self.reach();
    }

    /// Goes on after an unreadable entry, from the next one as it stands.
    fn resume(&mut self, seq: u64) {
        self.report.entries += 1;
        self.report.last = Some(seq);
        self.chain = Chain::default();
    }

    /// Ends the walk: what was never reached, what is not sealed.
    pub fn finish(mut self) -> Report {
        let end = self.chain.head().map_or(0, |(n, _)| n);
        for cp in std::mem::take(&mut self.waiting) {
            self.report.find(format!(
                "checkpoint {} seals entries up to {}, but the log ends at entry {}: entries were cut from its end",
                cp.size,
                cp.size - 1,
                end.saturating_sub(1)
            ));
        }
        if self.whole_log {
            if let Some(first) = self.report.first.filter(|&f| f > 0) {
                if self.pruned_through.map(|t| t + 1) != Some(first) {
                    self.report.find(format!(
                        "the log starts at entry {first}, and no pruning record says entries before it were pruned: entries were removed from its start"
                    ));
                }
            }
        }
        if self.key.is_none() {
            self.report.warnings.push(
                "no key to check checkpoints with: nothing is proven beyond the chain's own links"
                    .into(),
            );
        } else if !self.report.pinned {
            self.report.warnings.push(
                "checked with the key the store itself names: pin the node's key (--pubkey) so a forger cannot bring their own".into(),
            );
        }
        if self.report.checkpoints == 0 && self.report.entries > 0 {
            self.report
                .warnings
                .push("no checkpoint: nothing is sealed".into());
        }
        if end > self.report.sealed_through && self.report.entries > 0 {
            let n = end
                - self
                    .report
                    .sealed_through
                    .max(self.report.first.unwrap_or(0));
            if self.sealed_at_stop {
                self.report.find(format!(
                    "entries {}–{} come after the checkpoint of the agent's stop, and no agent sealed them: added by hand",
                    self.report.sealed_through,
                    end - 1
                ));
            } else {
                self.report.warnings.push(format!(
                    "the newest {n} entries ({}–{}) are not sealed by a checkpoint yet (an agent seals within 10 s, and at its stop)",
                    end - n,
                    end - 1
                ));
            }
        }
        self.report
    }
}

#[cfg(feature = "store")]
impl crate::SledStore {
    /// Audits the whole log in place, reading its segment files front to
    /// back (`pin`: the node's key as the responder knows it; otherwise
    /// the key the store names), and that the store's index puts every
    /// entry where it is and names the entries it should.
    pub fn audit(&self, pin: Option<PublicKey>) -> Result<Report, crate::StoreError> {
        use crate::segments::{Bad, Frames};
        let (key, pinned) = match pin {
            Some(k) => (Some(k), true),
            None => (
                self.named_key()?.and_then(|v| PublicKey::parse(&v).ok()),
                false,
            ),
        };
        let mut audit = Audit::new(key, pinned, true);
        let mut seals = self.checkpoints().peekable();
        let frames = Frames::all(self.log_dir()).map_err(|e| {
            crate::StoreError::Corrupt(self.log_dir().display().to_string(), e.to_string())
        })?;
        let mut torn: Option<Bad> = None;
        let mut end: Option<(u64, [u8; 32])> = None;
        for f in frames {
            let f = match f {
                Ok(f) => f,
                Err(b) => {
                    if let Some(before) = torn.replace(b) {
                        audit.report.find(before.to_string());
                    }
                    continue;
                }
            };
            if let Some(b) = torn.take() {
                // Something readable follows: not the end of a crashed write.
                audit
                    .report
                    .find(format!("{b}, and the log goes on after it"));
            }
            while seals
                .peek()
                .is_some_and(|s| s.as_ref().map_or(true, |(size, _)| *size <= f.seq))
            {
                let (size, note) = seals.next().expect("peeked")?;
                audit.checkpoint(size, &note);
            }
            audit.entry(f.seq, &f.entry);
            if self.location(f.seq)? != Some(f.at) {
                audit.report.find(format!(
                    "the index does not put entry {} where it is (segment {}, offset {})",
                    f.seq, f.at.segment, f.at.offset
                ));
            }
            end = log::parse(&f.entry)
                .ok()
                .map(|e| (f.seq + 1, e.link(f.seq)));
        }
        for s in seals {
            let (size, note) = s?;
            audit.checkpoint(size, &note);
        }
        if let Some(b) = torn {
            audit.report.warnings.push(format!(
                "{b}: a write cut short (the agent was killed mid-write); the next start removes it"
            ));
        }
        let mut report = audit.finish();
        match (self.written_head()?, end) {
            (Some(w), Some((next, prev))) if w.next == next && w.prev == prev => {}
            (Some(w), Some((next, _))) if w.next != next => report.find(format!(
                "the store last wrote that its log ends at entry {}, but the log's files end at entry {}: entries were cut from or added to its end",
                w.next as i64 - 1,
                next as i64 - 1
            )),
            (Some(w), Some(_)) => report.find(format!(
                "entry {} is not the entry the store last wrote at the log's end: it was changed",
                w.next as i64 - 1
            )),
            (Some(w), None) if w.next > 0 => report.find(format!(
                "the store says its log holds entries up to {}, but its files hold none",
                w.next - 1
            )),
            (None, Some(_)) => report.find("the store's record of where its log ends is missing".into()),
            _ => {}
        }
        for item in self.index() {
            let (k, seq) = item?;
            let what = match k.first() {
                Some(b'S') => Kind::Session,
                Some(b'T') => Kind::Statements,
                _ => Kind::Approval,
            };
            let id = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes);
            let Some(seq) = seq else {
                report.find(format!(
                    "index key {} does not name an entry",
                    crate::hex(&k)
                ));
                continue;
            };
            let bytes = self.entry(seq).ok().flatten();
            let ok = bytes
                .as_deref()
                .and_then(|b| log::parse(b).ok())
                .is_some_and(|e| {
                    e.header.kind == what
                        && (what == Kind::Approval || Some(e.header.session) == id)
                        && (what != Kind::Statements
                            || log::Statements::read(e.payload)
                                .is_ok_and(|s| Some(&s.first.to_be_bytes()[..]) == k.get(9..13)))
                });
            if !ok {
                report.find(format!(
                    "the index of {} {} names entry {seq}, which is not its record",
                    what.as_str(),
                    id.map_or("?".into(), |i| format!("{i:016x}")),
                ));
            }
        }
        Ok(report)
    }
}

#[cfg(all(test, feature = "store"))]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::{seal::NodeKey, Record, Session, SessionIds, SledStore, Store};

    pub(crate) fn key() -> NodeKey {
        NodeKey::from_seed([5; 32], "test-host/interceptor")
    }

    /// A store of 3 sessions with statements, sealed twice, ended by a
    /// stop and its checkpoint; returns its directory.
    pub(crate) fn sealed_store(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("icpt-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = SledStore::open(&dir).unwrap();
        store.set_key(key()).unwrap();
        let ids = SessionIds::default();
        for i in 0..3 {
            let id = ids.next();
            let mut s = Session::new(id, "127.0.0.1:1".into());
            s.workload = Some("web".into());
            let mut list = crate::codec::Records::default();
            list.push(&crate::Statement {
                seq: 0,
                at: id.micros(),
                ..crate::Statement::new(
                    crate::StatementKind::Query,
                    None,
                    format!("SELECT {i}").into(),
                    interceptor_sql::Class::Read,
                )
            });
            let mut records = vec![Record::Session(Box::new(s.clone()))];
            for c in list.take() {
                records.push(Record::Statements {
                    session: id,
                    first: c.first,
                    encoded: c.bytes,
                });
            }
            s.outcome = crate::Outcome::Closed;
            records.push(Record::Session(Box::new(s)));
            store.put_batch(&records).unwrap();
            if i == 1 {
                assert!(store.seal().unwrap());
            }
        }
        store
            .put_batch(&[Record::Agent(serde_json::json!({"event": "stop"}))])
            .unwrap();
        assert!(store.seal().unwrap());
        assert!(!store.seal().unwrap(), "nothing new to seal");
        drop(store);
        dir
    }

    pub(crate) fn open(dir: &Path) -> SledStore {
        for _ in 0..50 {
            if let Ok(s) = SledStore::open(dir) {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        SledStore::open(dir).unwrap()
    }

    /// Audits a sealed store after `tamper` had its way with its index tree
    /// and its log's frames (seq and entry, rewritten as given).
    fn audit_after(
        name: &str,
        tamper: impl FnOnce(&sled::Tree, &mut Vec<(u64, Vec<u8>)>),
    ) -> Report {
        let dir = sealed_store(name);
        let store = open(&dir);
        let seg = crate::segments::segment_path(store.log_dir(), 0);
        let mut frames: Vec<(u64, Vec<u8>)> = crate::segments::Frames::all(store.log_dir())
            .unwrap()
            .map(|f| f.map(|f| (f.seq, f.entry)).unwrap())
            .collect();
        let before = frames.clone();
        tamper(store.log_tree(), &mut frames);
        if frames != before {
            let mut out = Vec::new();
            for (seq, e) in &frames {
                crate::segments::frame(&mut out, *seq, e);
            }
            std::fs::write(&seg, out).unwrap();
        }
        let r = store.audit(Some(key().public().clone())).unwrap();
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn an_untouched_store_verifies_and_each_tampering_is_found_where_it_was_done() {
        let r = audit_after("clean", |_, _| {});
        assert!(r.intact(), "{r:?}");
        // 3 × (open, statements, end) and the stop; both checkpoints match.
        assert_eq!((r.entries, r.checkpoints, r.sealed_through), (10, 2, 10));
        assert!(r.warnings.is_empty(), "{r:?}");

        let has = |r: &Report, want: &str| {
            assert!(
                r.findings.iter().any(|f| f.contains(want)),
                "want `{want}` in {:#?}",
                r.findings
            );
        };
        let r = audit_after("changed", |_, f| {
            let e = &mut f[4].1;
            let n = e.len();
            e[n - 3] ^= 0x20;
        });
        has(&r, "entry 5 does not name the hash of entry 4");

        let r = audit_after("deleted", |_, f| {
            f.remove(4);
        });
        has(&r, "entry 4 is missing");

        let r = audit_after("swapped", |_, f| {
            let (a, b) = (f[4].1.clone(), f[5].1.clone());
            f[4].1 = b;
            f[5].1 = a;
        });
        has(&r, "entry 4 does not name the hash of entry 3");

        let r = audit_after("appended", |_, f| {
            let e = crate::log::parse(&f[9].1).unwrap();
            let mut out = Vec::new();
            let h = crate::log::Header {
                prev: e.link(9),
                at: e.header.at + 1,
                ..e.header.clone()
            };
            crate::log::encode(&mut out, &h, br#"{"event":"start"}"#);
            f.push((10, out));
        });
        has(&r, "entry 10 follows the agent's stop (entry 9)");
        has(&r, "come after the checkpoint of the agent's stop");
        has(&r, "the log's files end at entry 10");

        let r = audit_after("cut", |_, f| {
            f.truncate(8);
        });
        has(
            &r,
            "checkpoint 10 seals entries up to 9, but the log ends at entry 7",
        );
        has(
            &r,
            "the store last wrote that its log ends at entry 9, but the log's files end at entry 7",
        );

        let r = audit_after("resigned", |t, _| {
            let mut k = [b'C'; 9];
            k[1..].copy_from_slice(&10u64.to_be_bytes());
            let note = String::from_utf8(t.get(k).unwrap().unwrap().to_vec()).unwrap();
            let body = note.split_once("\n\n").unwrap().0;
            let cp = Checkpoint::open(&note, key().public()).unwrap();
            let other = NodeKey::from_seed([6; 32], "test-host/interceptor");
            assert!(other.sign(&cp).starts_with(body));
            t.insert(k, other.sign(&cp).as_bytes()).unwrap();
        });
        has(&r, "checkpoint 10: it is not signed by key");

        let r = audit_after("index", |t, _| {
            let k = t.scan_prefix(b"S").next().unwrap().unwrap().0;
            t.insert(k, &3u64.to_be_bytes()).unwrap();
            let mut l = [b'L'; 9];
            l[1..].copy_from_slice(&6u64.to_be_bytes());
            t.remove(l).unwrap();
        });
        has(&r, "names entry 3, which is not its record");
        has(&r, "the index does not put entry 6 where it is");
    }
}
