//! The sled store and the recorder thread (feature `store`, on by
//! default): what the agent and the responder commands need, and what
//! the wire machines, which only leave records in an outbox, do not.

use std::{
    collections::HashMap,
    os::unix::fs::DirBuilderExt,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use tokio::sync::mpsc;

use super::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the session store at {0}: {1}")]
    Open(String, sled::Error),
    #[error("the session store at {0} is in use by another process (is the agent running? its API socket did not answer)")]
    Locked(String),
    #[error("session store: {0}")]
    Sled(#[from] sled::Error),
    #[error("session store holds an unreadable record {0}: {1}")]
    Corrupt(String, String),
}

/// What the data path hands the writer.
#[derive(Debug, Clone)]
pub enum Record {
    /// A session's current state (written on start and on end).
    Session(Box<Session>),
    /// Consecutive statements of a session, already in their stored form
    /// (see [`codec`]), keyed by the seq of the first.
    Statements {
        session: SessionId,
        first: u32,
        encoded: Vec<u8>,
    },
    /// How far an open session has got: bytes each way as of `at`
    /// (microseconds since the epoch). Kept until the session's last record.
    Progress {
        session: SessionId,
        up: u64,
        down: u64,
        at: u64,
    },
    /// One of the agent's own events (start, stop, gap, policy, ...).
    Agent(crate::log::AgentEvent),
}

/// Filter for listings.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Filter {
    pub workload: Option<String>,
    /// Only sessions started at or after this time (microseconds since epoch).
    pub since_micros: Option<u64>,
    pub limit: Option<usize>,
}

/// Where sessions live. Small on purpose, so the engine can change.
pub trait Store: Send + Sync {
    fn put_batch(&self, records: &[Record]) -> Result<(), StoreError>;
    /// A session's statements, in order.
    fn statements(&self, id: SessionId) -> Result<Vec<Statement>, StoreError>;
    fn get(&self, id: SessionId) -> Result<Option<Session>, StoreError>;
    /// Sessions matching `filter`, oldest first.
    fn list(&self, filter: &Filter) -> Result<Vec<Session>, StoreError>;
    fn flush(&self) -> Result<(), StoreError>;
    /// Signs a checkpoint of the log if entries were added since the last
    /// one and the store has a key; whether it did.
    fn seal(&self) -> Result<bool, StoreError>;
}

/// The store: the evidence log's entries in append-only segment files
/// (`DATA_DIR/log`, see [`crate::segments`]), and in sled (`DATA_DIR/store`)
/// one tree, `log`, of what finds them and what vouches for them, under
/// one-byte prefixes, so that the index of a batch of entries is applied
/// at once (docs/store-format.md):
///
/// - `L` seq → where entry seq is ([`crate::segments::Location`]);
/// - `S` session id → seq of the session's latest entry;
/// - `T` session id ‖ first statement seq (u32) → seq of that chunk's entry;
/// - `A` request id → seq of the request's latest entry;
/// - `C` size → the signed checkpoint of the first `size` entries;
/// - `M` name → the store's own facts (`Mhead`: where the log ends;
///   `Mkey`: the node's verifier key).
///
/// `progress` holds the bytes each way of open sessions (kept until they
/// end; not evidence: a session's last entry says what it moved).
pub struct SledStore {
    db: sled::Db,
    log: sled::Tree,
    progress: sled::Tree,
    /// Sink name → the next seq it is to deliver.
    cursors: sled::Tree,
    /// The segment files' directory.
    log_dir: std::path::PathBuf,
    tail: Mutex<Tail>,
    /// Open sessions' workloads, SPIFFE ids and pids, for their
    /// statements' entries.
    workloads: Mutex<HashMap<u64, Who>>,
    key: OnceLock<crate::seal::NodeKey>,
    /// The segment last read from, kept open.
    reading: Mutex<Option<(u64, std::fs::File)>>,
    /// A private copy this store was opened from (removed when dropped).
    scratch: Option<std::path::PathBuf>,
    /// What opening found and mended (a write cut short by a crash).
    pub recovered: Option<String>,
}

/// The log's end, and the file appends go to (none: a reader's copy).
struct Tail {
    head: Head,
    writer: Option<crate::segments::Writer>,
}

/// What a pruning removed: entries `from..=through`, in whole segments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    pub from: u64,
    pub through: u64,
    pub segments: u64,
    pub bytes: u64,
}

/// Who ran a session's statements, as its statements' entries say.
#[derive(Debug, Clone)]
struct Who {
    workload: Arc<str>,
    identity: Arc<str>,
    pid: u32,
}

impl Who {
    fn of(s: &Session) -> Who {
        Who {
            workload: Arc::from(s.workload.as_deref().unwrap_or("")),
            identity: Arc::from(s.identity.as_deref().unwrap_or("")),
            pid: s.pid,
        }
    }
}

/// Entries of the log in order, with their seqs.
pub type Entries<'a> = Box<dyn Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + 'a>;

/// Where the log ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The seq the next entry takes.
    pub next: u64,
    /// The hash of entry `next - 1` (zeros for an empty log).
    pub prev: [u8; 32],
    /// Its time (entries' times never go back).
    pub at: u64,
    /// The segment the next entry goes to, and where in it.
    pub segment: u64,
    pub end: u64,
}

impl Head {
    const EMPTY: Head = Head {
        next: 0,
        prev: [0; 32],
        at: 0,
        segment: 0,
        end: 0,
    };

    fn encode(&self) -> [u8; 64] {
        let mut h = [0u8; 64];
        h[..8].copy_from_slice(&self.next.to_be_bytes());
        h[8..40].copy_from_slice(&self.prev);
        h[40..48].copy_from_slice(&self.at.to_be_bytes());
        h[48..56].copy_from_slice(&self.segment.to_be_bytes());
        h[56..].copy_from_slice(&self.end.to_be_bytes());
        h
    }

    fn decode(v: &[u8]) -> Option<Head> {
        let word = |at: usize| {
            v.get(at..at + 8)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8")))
        };
        (v.len() == 64).then(|| Head {
            next: word(0).expect("8"),
            prev: v[8..40].try_into().expect("32"),
            at: word(40).expect("8"),
            segment: word(48).expect("8"),
            end: word(56).expect("8"),
        })
    }
}

const HEAD_KEY: &[u8] = b"Mhead";
const KEY_KEY: &[u8] = b"Mkey";

fn key8(prefix: u8, n: u64) -> [u8; 9] {
    let mut k = [prefix; 9];
    k[1..].copy_from_slice(&n.to_be_bytes());
    k
}

fn seq_of(v: &[u8]) -> Option<u64> {
    v.try_into().ok().map(u64::from_be_bytes)
}

/// sled's page cache: the agent writes far more than it reads back, so a
/// small cache costs little, where sled's default (1 GiB) let a long-running
/// agent's memory grow with its store.
pub const STORE_CACHE: u64 = 16 << 20;

fn io_err(what: &Path, e: std::io::Error) -> StoreError {
    StoreError::Corrupt(what.display().to_string(), e.to_string())
}

impl SledStore {
    /// Opens `DIR/store` and `DIR/log` for the agent (or a test): it may
    /// write. A write a crash cut short is mended first (entries written
    /// whole but not indexed are indexed; a frame cut short is removed:
    /// [`SledStore::recovered`] says so), and a store written by an agent
    /// before the log existed has its records moved into the log
    /// ([`SledStore::import_legacy`]).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let mut store = Self::open_path(&dir.join("store"), dir.join("log"), None)?;
        store.recover()?;
        store.import_legacy()?;
        Ok(store)
    }

    fn open_path(
        path: &Path,
        log_dir: std::path::PathBuf,
        scratch: Option<std::path::PathBuf>,
    ) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let opened = sled::Config::new()
            .path(path)
            .cache_capacity(STORE_CACHE)
            .open();
        let db = opened.map_err(|e| match e {
            sled::Error::Io(ref io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.raw_os_error() == Some(libc::EAGAIN) =>
            {
                StoreError::Locked(shown.clone())
            }
            e => StoreError::Open(shown.clone(), e),
        })?;
        let log = db.open_tree("log")?;
        let progress = db.open_tree("progress")?;
        let cursors = db.open_tree("cursors")?;
        let head = log
            .get(HEAD_KEY)?
            .and_then(|v| Head::decode(&v))
            .unwrap_or(Head::EMPTY);
        Ok(SledStore {
            db,
            log,
            progress,
            cursors,
            log_dir,
            tail: Mutex::new(Tail { head, writer: None }),
            workloads: Mutex::default(),
            key: OnceLock::new(),
            reading: Mutex::default(),
            scratch,
            recovered: None,
        })
    }

    /// Takes up the log's end for writing: entries a crash left written but
    /// not indexed are indexed; a frame cut short is cut off.
    fn recover(&mut self) -> Result<(), StoreError> {
        use crate::segments::{self, Frames, Writer};
        let dir = self.log_dir.clone();
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let mut head = tail.head;
        let listed = segments::segments(&dir).map_err(|e| io_err(&dir, e))?;
        let mut notes = Vec::new();
        if listed.is_empty() {
            if head.next > 0 {
                notes.push(format!(
                    "the log's files are gone: entries before {} are missing; the log goes on from there",
                    head.next
                ));
            }
            tail.writer = Some(Writer::open(&dir, None).map_err(|e| io_err(&dir, e))?);
            head.segment = head.next;
            head.end = 0;
            tail.head = head;
            drop(tail);
            self.recovered = (!notes.is_empty()).then(|| notes.join("; "));
            return Ok(());
        }
        // An empty log has its first segment at 0.
        let start = if head.next == 0 && head.end == 0 {
            (listed[0], 0)
        } else {
            (head.segment, head.end)
        };
        let mut batch = sled::Batch::default();
        let mut adopted = 0u64;
        let mut cut: Option<(u64, u64)> = None;
        let frames = Frames::from(&dir, Some(start)).map_err(|e| io_err(&dir, e))?;
        for f in frames {
            let f = match f {
                Ok(f) => f,
                Err(
                    segments::Bad::Torn {
                        segment, offset, ..
                    }
                    | segments::Bad::Length {
                        segment, offset, ..
                    },
                ) => {
                    cut = Some((segment, offset));
                    break;
                }
                Err(e) => {
                    return Err(StoreError::Corrupt(
                        dir.display().to_string(),
                        e.to_string(),
                    ))
                }
            };
            let ok = f.seq == head.next
                && crate::log::parse(&f.entry).is_ok_and(|e| e.header.prev == head.prev);
            if !ok {
                cut = Some((f.at.segment, f.at.offset));
                break;
            }
            let e = crate::log::parse(&f.entry).expect("parsed above");
            batch.insert(&key8(b'L', f.seq), &f.at.encode()[..]);
            if let Some(k) = index_key(&e) {
                batch.insert(k, &f.seq.to_be_bytes()[..]);
            }
            head = Head {
                next: f.seq + 1,
                prev: e.link(f.seq),
                at: e.header.at,
                segment: f.at.segment,
                end: f.at.end(),
            };
            adopted += 1;
        }
        if adopted > 0 {
            notes.push(format!(
                "{adopted} entries written whole by an agent that stopped before indexing them were indexed"
            ));
        }
        if let Some((segment, offset)) = cut {
            let path = segments::segment_path(&dir, segment);
            let len = std::fs::metadata(&path)
                .map_err(|e| io_err(&path, e))?
                .len();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
            f.set_len(offset).map_err(|e| io_err(&path, e))?;
            f.sync_all().map_err(|e| io_err(&path, e))?;
            notes.push(format!(
                "{} bytes at the end of segment {segment}, a write cut short (or not the log's next entry), were removed",
                len - offset
            ));
            // Later segments can only hold what followed the cut.
            for later in listed.iter().filter(|&&s| s > segment) {
                let p = segments::segment_path(&dir, *later);
                let aside = p.with_extension("log.cut");
                std::fs::rename(&p, &aside).map_err(|e| io_err(&p, e))?;
                notes.push(format!("segment {later} set aside as {}", aside.display()));
            }
            if head.segment != segment && head.end == 0 {
                head.segment = segment;
            }
        }
        batch.insert(HEAD_KEY, &head.encode()[..]);
        self.log.apply_batch(batch)?;
        self.db.flush()?;
        let at = (head.next > 0 || head.end > 0).then_some((head.segment, head.end));
        let at = at.filter(|(s, _)| segments::segment_path(&dir, *s).exists());
        tail.writer = Some(Writer::open(&dir, at).map_err(|e| io_err(&dir, e))?);
        tail.head = head;
        drop(tail);
        self.recovered = (!notes.is_empty()).then(|| notes.join("; "));
        if let Some(n) = &self.recovered {
            tracing::warn!("the log was mended at open: {n}");
        }
        Ok(())
    }

    /// Opens a private copy of `DIR/store` (in the system's temporary
    /// directory, removed when the store is dropped), reading the log's
    /// segment files where they are, read-only: responders read a data
    /// directory, perhaps one taken from another host or one a running
    /// agent holds, without writing a byte to it. The copy is retried
    /// until no file changed while it was taken.
    pub fn open_copy(dir: &Path) -> Result<Self, StoreError> {
        let src = dir.join("store");
        if !src.join("db").is_file() {
            return Err(StoreError::Corrupt(
                src.display().to_string(),
                "no sled store here (has an agent ever run with this data directory?)".into(),
            ));
        }
        let scratch = std::env::temp_dir().join(format!(
            "interceptor-copy-{}-{}",
            std::process::id(),
            now_micros()
        ));
        let copy_err = |e: std::io::Error| {
            StoreError::Corrupt(src.display().to_string(), format!("copying it: {e}"))
        };
        let mut tries = 0;
        loop {
            let _ = std::fs::remove_dir_all(&scratch);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&scratch)
                .map_err(copy_err)?;
            let before = stamp(&src).map_err(copy_err)?;
            copy_dir(&src, &scratch.join("store")).map_err(copy_err)?;
            tries += 1;
            if stamp(&src).map_err(copy_err)? == before || tries == 5 {
                if tries == 5 {
                    tracing::warn!("the store kept changing while it was copied (an agent is writing); reading the last copy");
                }
                break;
            }
        }
        let opened = Self::open_path(
            &scratch.join("store"),
            dir.join("log"),
            Some(scratch.clone()),
        );
        let mut store = match opened {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&scratch);
                return Err(e);
            }
        };
        if store.has_legacy() {
            // An older agent's store: its records are moved into a log of
            // the copy's own, never into the data directory.
            store.log_dir = scratch.join("log");
            store.recover()?;
            store.import_legacy()?;
        }
        Ok(store)
    }

    /// Where the log ends (as the store last wrote it).
    pub fn found_head(&self) -> Result<Head, StoreError> {
        Ok(self.lock_tail().head)
    }

    /// Where the store last wrote that the log ends, as sled holds it now.
    pub fn written_head(&self) -> Result<Option<Head>, StoreError> {
        Ok(self.log.get(HEAD_KEY)?.and_then(|v| Head::decode(&v)))
    }

    fn lock_tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes segments once they hold `bytes` (`[store] segment_size`).
    pub fn set_segment_bytes(&self, bytes: u64) {
        if let Some(w) = self.lock_tail().writer.as_mut() {
            w.segment_bytes = bytes.max(1);
        }
    }

    /// The log's segments: the first seq of each, and its size in bytes,
    /// oldest first.
    pub fn segments(&self) -> Result<Vec<(u64, u64)>, StoreError> {
        let dir = &self.log_dir;
        crate::segments::segments(dir)
            .map_err(|e| io_err(dir, e))?
            .into_iter()
            .map(|first| {
                let path = crate::segments::segment_path(dir, first);
                let len = std::fs::metadata(&path)
                    .map_err(|e| io_err(&path, e))?
                    .len();
                Ok((first, len))
            })
            .collect()
    }

    /// Removes the segments wholly before `cut` (never the one being
    /// written), the index rows of their entries, and the checkpoints that
    /// seal only them (the newest of those stays). The caller records the
    /// pruning in the log (an agent `prune` event): the log stays
    /// verifiable from its first kept entry.
    pub fn prune(&self, cut: u64) -> Result<Pruned, StoreError> {
        let segments = self.segments()?;
        let writing = self.lock_tail().head.segment;
        let mut removed = Vec::new();
        for (i, (start, len)) in segments.iter().enumerate() {
            let end = segments.get(i + 1).map_or(u64::MAX, |n| n.0);
            if end > cut || *start == writing {
                break;
            }
            removed.push((*start, end, *len));
        }
        let (Some(oldest), Some(last)) = (removed.first(), removed.last()) else {
            return Ok(Pruned::default());
        };
        let kept = last.1;
        let pruned = Pruned {
            from: oldest.0,
            through: kept - 1,
            segments: removed.len() as u64,
            bytes: removed.iter().map(|r| r.2).sum(),
        };
        *self.reading.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let mut batch = sled::Batch::default();
        for item in self.log.range(key8(b'L', 0)..key8(b'L', kept)) {
            batch.remove(item?.0);
        }
        self.log.apply_batch(batch)?;
        for prefix in [b"S", b"T", b"A"] {
            for item in self.log.scan_prefix(prefix) {
                let (k, v) = item?;
                if seq_of(&v).is_some_and(|s| s < kept) {
                    // Only if no newer entry took its place meanwhile.
                    let _ = self
                        .log
                        .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)?;
                }
            }
        }
        let sealed: Vec<u64> = self
            .checkpoints()
            .filter_map(|c| c.ok().map(|(size, _)| size))
            .take_while(|&size| size <= kept)
            .collect();
        for size in sealed.iter().rev().skip(1) {
            self.log.remove(key8(b'C', *size))?;
        }
        self.flush()?;
        for (start, _, _) in &removed {
            let path = crate::segments::segment_path(&self.log_dir, *start);
            std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
        }
        std::fs::File::open(&self.log_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(&self.log_dir, e))?;
        Ok(pruned)
    }

    /// Where sink `name` is: the next seq it is to deliver.
    pub fn cursor(&self, name: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.cursors.get(name)?.and_then(|v| seq_of(&v)))
    }

    /// Moves sink `name`'s cursor, durably.
    pub fn set_cursor(&self, name: &str, next: u64) -> Result<(), StoreError> {
        self.cursors.insert(name, &next.to_be_bytes())?;
        self.cursors.flush()?;
        Ok(())
    }

    /// Every sink's cursor.
    pub fn cursors(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.cursors
            .iter()
            .map(|item| {
                let (k, v) = item?;
                Ok((
                    String::from_utf8_lossy(&k).into_owned(),
                    seq_of(&v).unwrap_or(0),
                ))
            })
            .collect()
    }

    /// The directory of the log's segment files.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Signs checkpoints with `key` from now on (the agent's node key).
    pub fn set_key(&self, key: crate::seal::NodeKey) -> Result<(), StoreError> {
        self.log.insert(KEY_KEY, key.public().vkey().as_bytes())?;
        let _ = self.key.set(key);
        Ok(())
    }

    /// The verifier key the store names (of the node that signed it).
    pub fn named_key(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .log
            .get(KEY_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The tree the index lives in, for tests that tamper with it.
    #[doc(hidden)]
    pub fn log_tree(&self) -> &sled::Tree {
        &self.log
    }

    /// Where the index puts entry `seq`.
    pub fn location(&self, seq: u64) -> Result<Option<crate::segments::Location>, StoreError> {
        Ok(self
            .log
            .get(key8(b'L', seq))?
            .and_then(|v| crate::segments::Location::decode(&v)))
    }

    /// Entry `seq`'s bytes.
    pub fn entry(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(at) = self.location(seq)? else {
            return Ok(None);
        };
        let mut open = self.reading.lock().unwrap_or_else(|p| p.into_inner());
        if open.as_ref().is_none_or(|(s, _)| *s != at.segment) {
            let path = crate::segments::segment_path(&self.log_dir, at.segment);
            let f = std::fs::File::open(&path).map_err(|e| io_err(&path, e))?;
            *open = Some((at.segment, f));
        }
        let (_, f) = open.as_ref().expect("opened");
        crate::segments::read_at(f, at, seq)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("entry {seq}"), e))
    }

    /// Entries from `seq` on up to the log's end, in order, with their
    /// seqs (read from the segment files front to back).
    pub fn entries(&self, from: u64) -> Entries<'_> {
        let end = self.lock_tail().head.next;
        let start = match self.location(from) {
            Ok(at) => at.map(|a| (a.segment, a.offset)),
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        let frames = match crate::segments::Frames::from(&self.log_dir, start) {
            Ok(f) => f,
            Err(e) => return Box::new(std::iter::once(Err(io_err(&self.log_dir, e)))),
        };
        Box::new(
            frames
                .map(|f| {
                    f.map(|f| (f.seq, f.entry))
                        .map_err(|e| StoreError::Corrupt("the log".into(), e.to_string()))
                })
                .skip_while(move |r| r.as_ref().is_ok_and(|(s, _)| *s < from))
                .take_while(move |r| r.as_ref().map_or(true, |(s, _)| *s < end)),
        )
    }

    /// The seq of the first entry kept (the log's size if it is empty).
    pub fn first_kept(&self) -> Result<u64, StoreError> {
        let end = self.lock_tail().head.next;
        Ok(self
            .log
            .scan_prefix(b"L")
            .keys()
            .next()
            .transpose()?
            .and_then(|k| seq_of(&k[1..]))
            .unwrap_or(end))
    }

    /// Signed checkpoints, by size, as their notes.
    pub fn checkpoints(&self) -> impl Iterator<Item = Result<(u64, String), StoreError>> + '_ {
        self.checkpoints_since(0)
    }

    /// Signed checkpoints of size `from` or more, by size.
    pub fn checkpoints_since(
        &self,
        from: u64,
    ) -> impl Iterator<Item = Result<(u64, String), StoreError>> + '_ {
        self.log
            .range(key8(b'C', from)..=key8(b'C', u64::MAX))
            .map(|item| {
                let (k, v) = item?;
                let size = seq_of(&k[1..])
                    .ok_or_else(|| StoreError::Corrupt(hex(&k), "bad key".into()))?;
                Ok((size, String::from_utf8_lossy(&v).into_owned()))
            })
    }

    /// The seq of session `id`'s newest entry (its state or statements).
    pub fn last_entry_of(&self, id: SessionId) -> Result<Option<u64>, StoreError> {
        let state = self.log.get(key8(b'S', id.0))?.and_then(|v| seq_of(&v));
        let mut statements = None;
        for item in self.log.scan_prefix(key8(b'T', id.0)) {
            let (_, v) = item?;
            statements = statements.max(seq_of(&v));
        }
        Ok(state.max(statements))
    }

    /// Every index entry (`S`, `T`, `A`): its key and the seq it names.
    pub fn index(
        &self,
    ) -> impl Iterator<Item = Result<(sled::IVec, Option<u64>), StoreError>> + '_ {
        [b"S", b"T", b"A"].into_iter().flat_map(|p| {
            self.log.scan_prefix(p).map(|item| {
                let (k, v) = item?;
                Ok((k, seq_of(&v)))
            })
        })
    }

    /// The entry an index key names, parsed with `read`.
    fn indexed<T>(
        &self,
        key: &[u8],
        read: impl FnOnce(crate::log::Entry<'_>) -> Result<T, String>,
    ) -> Result<Option<T>, StoreError> {
        let Some(v) = self.log.get(key)? else {
            return Ok(None);
        };
        let seq = seq_of(&v).ok_or_else(|| StoreError::Corrupt(hex(key), "not a seq".into()))?;
        let bytes = self.entry(seq)?.ok_or_else(|| {
            StoreError::Corrupt(hex(key), format!("names entry {seq}, which is not there"))
        })?;
        let e = crate::log::parse(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("entry {seq}"), e))?;
        read(e)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("entry {seq}"), e))
    }

    /// Marks sessions left open by an agent that stopped as interrupted,
    /// with what the store holds of them: the statements recorded, the bytes
    /// of their last progress record, and as their end the last moment
    /// recorded (a statement's end or a progress record), not the moment the
    /// agent noticed.
    pub fn close_orphans(&self) -> Result<usize, StoreError> {
        let mut closed = Vec::new();
        for item in self.log.scan_prefix(b"S") {
            let (k, _) = item?;
            let Some(id) = seq_of(&k[1..]) else { continue };
            let Some(mut s) = self.get(SessionId(id))? else {
                continue;
            };
            if s.outcome != Outcome::Open {
                continue;
            }
            let mut last = s.id.micros();
            let (count, ended) = self.tally(s.id)?;
            s.statements = s.statements.max(count);
            last = last.max(ended);
            if let Some(p) = self.progress.get(id.to_be_bytes())? {
                let word = |i: usize| {
                    p.get(i * 8..i * 8 + 8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_be_bytes)
                };
                s.bytes_up = s.bytes_up.max(word(0));
                s.bytes_down = s.bytes_down.max(word(1));
                last = last.max(word(2));
            }
            s.outcome = Outcome::Interrupted;
            s.ended_at = Some(rfc3339_micros(last));
            s.detail = Some(format!(
                "the agent stopped while this session was open; counts and end are the last recorded (progress is recorded every {} ms while bytes move)",
                STATEMENT_FLUSH.as_millis()
            ));
            closed.push(Record::Session(Box::new(s)));
        }
        self.put_batch(&closed)?;
        self.db.flush()?;
        Ok(closed.len())
    }

    /// How many statements of session `id` the store holds, and when the
    /// last of them ended (microseconds since the epoch; 0 if none).
    fn tally(&self, id: SessionId) -> Result<(u32, u64), StoreError> {
        let mut count = 0u32;
        let mut last = 0;
        for st in self.statements(id)? {
            count = count.saturating_add(1);
            last = last.max(st.at + st.duration_us.unwrap_or(0));
        }
        Ok((count, last))
    }

    /// Who ran session `id`, as its latest entry says.
    fn who(&self, id: u64) -> Result<Who, StoreError> {
        if let Some(w) = self
            .workloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(w.clone());
        }
        let s = self.get(SessionId(id))?;
        Ok(s.as_ref().map_or(
            Who {
                workload: Arc::from(""),
                identity: Arc::from(""),
                pid: 0,
            },
            Who::of,
        ))
    }

    /// Whether the store holds trees of an agent before the log.
    fn has_legacy(&self) -> bool {
        let names = self.db.tree_names();
        ["sessions", "statements", "approvals"]
            .into_iter()
            .any(|n| names.iter().any(|t| t.as_ref() == n.as_bytes()))
    }

    /// Moves the records of a store written before the log existed (trees
    /// `sessions`, `statements`, `approvals`) into the log, oldest first,
    /// then records that it did and drops those trees. What they held is
    /// kept as it was found: nothing vouched for it before.
    fn import_legacy(&self) -> Result<(), StoreError> {
        if !self.has_legacy() {
            return Ok(());
        }
        let sessions = self.db.open_tree("sessions")?;
        let statements = self.db.open_tree("statements")?;
        let approvals = self.db.open_tree("approvals")?;
        let (mut n_sessions, mut n_chunks, mut n_requests) = (0u64, 0u64, 0u64);
        for item in sessions.iter() {
            let (k, v) = item?;
            let s = decode(&k, &v)?;
            let mut batch = Vec::new();
            for item in statements.scan_prefix(&k) {
                let (sk, sv) = item?;
                let first = sk
                    .get(8..12)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_be_bytes)
                    .ok_or_else(|| StoreError::Corrupt(hex(&sk), "bad key".into()))?;
                // Older formats are written anew in the current one.
                let list = codec::decode(&sv).map_err(|e| StoreError::Corrupt(hex(&sk), e))?;
                let mut encoded = Vec::new();
                codec::encode(&list, &mut encoded);
                batch.push(Record::Statements {
                    session: s.id,
                    first,
                    encoded,
                });
                n_chunks += 1;
            }
            self.workloads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(s.id.0, Who::of(&s));
            batch.insert(0, Record::Session(Box::new(s)));
            self.put_batch(&batch)?;
            n_sessions += 1;
        }
        for item in approvals.iter() {
            let (k, v) = item?;
            self.put_request(&read_request(&k, &v)?)?;
            n_requests += 1;
        }
        self.put_batch(&[Record::Agent(serde_json::json!({
            "event": "import",
            "sessions": n_sessions,
            "statement_entries": n_chunks,
            "approval_requests": n_requests,
            "detail": "records written by an agent that kept no log, moved into it as they were found: nothing vouches for them before this entry",
        }))])?;
        self.flush()?;
        for t in ["sessions", "statements", "approvals"] {
            self.db.drop_tree(t)?;
        }
        self.workloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(())
    }
}

/// Sizes and modification times of the files under `dir`, to tell whether
/// it changed while it was copied.
fn stamp(dir: &Path) -> std::io::Result<Vec<(std::path::PathBuf, u64, std::time::SystemTime)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let meta = e.metadata()?;
        if meta.is_dir() {
            out.extend(stamp(&e.path())?);
        } else {
            out.push((e.path(), meta.len(), meta.modified()?));
        }
    }
    out.sort();
    Ok(out)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

impl Drop for SledStore {
    fn drop(&mut self) {
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn encode(s: &Session) -> Vec<u8> {
    serde_json::to_vec(s).expect("sessions always serialize")
}

fn decode(k: &[u8], v: &[u8]) -> Result<Session, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(hex(k), e.to_string()))
}

/// A batch of entries on its way into the log: the head moves only once
/// the batch is written to the segment and indexed.
struct Appending {
    head: Head,
    first: u64,
    frames: Vec<u8>,
    /// Each entry's seq, offset in `frames` and length.
    placed: Vec<(u64, u64, u32)>,
    batch: sled::Batch,
    buf: Vec<u8>,
}

impl Appending {
    fn new(head: Head) -> Self {
        Appending {
            head,
            first: head.next,
            frames: Vec::new(),
            placed: Vec::new(),
            batch: sled::Batch::default(),
            buf: Vec::new(),
        }
    }

    /// Adds an entry; returns its seq.
    fn push(
        &mut self,
        kind: crate::log::Kind,
        session: u64,
        workload: &str,
        payload: &[u8],
    ) -> u64 {
        let seq = self.head.next;
        let at = now_micros().max(self.head.at);
        let header = crate::log::Header {
            kind,
            at,
            session,
            workload,
            prev: self.head.prev,
        };
        self.buf.clear();
        crate::log::encode(&mut self.buf, &header, payload);
        let e = crate::log::parse(&self.buf).expect("an entry just encoded");
        self.head.next = seq + 1;
        self.head.prev = e.link(seq);
        self.head.at = at;
        self.placed
            .push((seq, self.frames.len() as u64, self.buf.len() as u32));
        crate::segments::frame(&mut self.frames, seq, &self.buf);
        seq
    }

    fn index(&mut self, key: &[u8], seq: u64) {
        self.batch.insert(key, &seq.to_be_bytes());
    }

    /// Writes the frames, then applies the index; the head moves if both
    /// were done. A failed index leaves the segment as it was.
    fn apply(mut self, log: &sled::Tree, tail: &mut Tail) -> Result<(), StoreError> {
        if self.placed.is_empty() {
            return Ok(());
        }
        let writer = tail.writer.as_mut().ok_or_else(|| {
            StoreError::Corrupt(
                "the log".into(),
                "opened to read: nothing is written to it".into(),
            )
        })?;
        let (segment, base) = writer
            .append(&self.frames, self.first)
            .map_err(|e| StoreError::Corrupt("the log".into(), format!("appending: {e}")))?;
        for (seq, off, len) in &self.placed {
            let at = crate::segments::Location {
                segment,
                offset: base + off,
                len: *len,
            };
            self.batch.insert(&key8(b'L', *seq), &at.encode()[..]);
        }
        self.head.segment = segment;
        self.head.end = base + self.frames.len() as u64;
        self.batch.insert(HEAD_KEY, &self.head.encode()[..]);
        if let Err(e) = log.apply_batch(self.batch) {
            writer.truncate(base);
            return Err(e.into());
        }
        tail.head = self.head;
        Ok(())
    }
}

/// The index key of an entry found in the segments but not indexed.
fn index_key(e: &crate::log::Entry<'_>) -> Option<Vec<u8>> {
    use crate::log::Kind;
    match e.header.kind {
        Kind::Session => Some(key8(b'S', e.header.session).to_vec()),
        Kind::Statements => {
            let st = crate::log::Statements::read(e.payload).ok()?;
            let mut k = key8(b'T', e.header.session).to_vec();
            k.extend_from_slice(&st.first.to_be_bytes());
            Some(k)
        }
        Kind::Approval => {
            let v: serde_json::Value = serde_json::from_slice(e.payload).ok()?;
            let id: SessionId = v.get("id")?.as_str()?.parse().ok()?;
            Some(key8(b'A', id.0).to_vec())
        }
        Kind::Agent => None,
    }
}

impl Store for SledStore {
    fn put_batch(&self, records: &[Record]) -> Result<(), StoreError> {
        use crate::log::Kind;
        let mut progress = sled::Batch::default();
        let mut tail = self.lock_tail();
        let mut out = Appending::new(tail.head);
        let mut ended = Vec::new();
        let mut payload = Vec::new();
        for r in records {
            match r {
                Record::Session(s) => {
                    let workload = s.workload.as_deref().unwrap_or("");
                    let seq = out.push(Kind::Session, s.id.0, workload, &encode(s));
                    out.index(&key8(b'S', s.id.0), seq);
                    let mut open = self.workloads.lock().unwrap_or_else(|p| p.into_inner());
                    if s.outcome == Outcome::Open {
                        open.insert(s.id.0, Who::of(s));
                    } else {
                        ended.push(s.id.0);
                        progress.remove(&s.id.0.to_be_bytes());
                    }
                }
                Record::Progress {
                    session,
                    up,
                    down,
                    at,
                } => {
                    let mut v = [0u8; 24];
                    for (i, w) in [up, down, at].into_iter().enumerate() {
                        v[i * 8..i * 8 + 8].copy_from_slice(&w.to_be_bytes());
                    }
                    progress.insert(&session.0.to_be_bytes(), &v);
                }
                Record::Statements {
                    session,
                    first,
                    encoded,
                } => {
                    let who = self.who(session.0)?;
                    payload.clear();
                    crate::log::Statements {
                        first: *first,
                        pid: who.pid,
                        identity: &who.identity,
                        chunk: encoded,
                    }
                    .encode(&mut payload);
                    let seq = out.push(Kind::Statements, session.0, &who.workload, &payload);
                    let mut key = key8(b'T', session.0).to_vec();
                    key.extend_from_slice(&first.to_be_bytes());
                    out.index(&key, seq);
                }
                Record::Agent(event) => {
                    let json = serde_json::to_vec(event).expect("events are plain data");
                    out.push(Kind::Agent, 0, "", &json);
                }
            }
        }
        out.apply(&self.log, &mut tail)?;
        drop(tail);
        self.progress.apply_batch(progress)?;
        let mut open = self.workloads.lock().unwrap_or_else(|p| p.into_inner());
        for id in ended {
            open.remove(&id);
        }
        Ok(())
    }

    fn statements(&self, id: SessionId) -> Result<Vec<Statement>, StoreError> {
        let mut out = Vec::new();
        for item in self.log.scan_prefix(key8(b'T', id.0)) {
            let (k, _) = item?;
            let chunk = self
                .indexed(&k, |e| {
                    codec::decode(crate::log::Statements::read(e.payload)?.chunk)
                })?
                .unwrap_or_default();
            out.extend(chunk);
        }
        Ok(out)
    }

    fn get(&self, id: SessionId) -> Result<Option<Session>, StoreError> {
        self.indexed(&key8(b'S', id.0), |e| {
            serde_json::from_slice(e.payload).map_err(|e| e.to_string())
        })
    }

    fn list(&self, filter: &Filter) -> Result<Vec<Session>, StoreError> {
        let start = filter.since_micros.unwrap_or(0) << 12;
        let mut out = Vec::new();
        for item in self.log.range(key8(b'S', start)..key8(b'S', u64::MAX)) {
            let (k, _) = item?;
            let Some(s) = self
                .indexed(&k, |e| {
                    if filter
                        .workload
                        .as_ref()
                        .is_some_and(|w| w.as_str() != e.header.workload)
                    {
                        return Ok(None);
                    }
                    serde_json::from_slice::<Session>(e.payload)
                        .map(Some)
                        .map_err(|e| e.to_string())
                })?
                .flatten()
            else {
                continue;
            };
            out.push(s);
        }
        if let Some(limit) = filter.limit {
            let skip = out.len().saturating_sub(limit);
            out.drain(..skip);
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), StoreError> {
        if let Some(w) = self.lock_tail().writer.as_mut() {
            w.sync()
                .map_err(|e| StoreError::Corrupt("the log".into(), format!("syncing: {e}")))?;
        }
        self.db.flush()?;
        Ok(())
    }

    fn seal(&self) -> Result<bool, StoreError> {
        let Some(key) = self.key.get() else {
            return Ok(false);
        };
        let tail = self.lock_tail();
        let head = tail.head;
        let last = match self.log.scan_prefix(b"C").next_back().transpose()? {
            Some((_, note)) => {
                let note = String::from_utf8_lossy(&note);
                let cp = crate::seal::Checkpoint::open(&note, key.public())
                    .map_err(|e| StoreError::Corrupt("the newest checkpoint".into(), e))?;
                (cp.size, cp.head)
            }
            None => (0, [0; 32]),
        };
        if last.0 == head.next {
            return Ok(false);
        }
        let cp = crate::seal::Checkpoint {
            origin: key.public().name.clone(),
            size: head.next,
            head: head.prev,
            at: now_micros(),
            from: last,
        };
        self.log
            .insert(key8(b'C', cp.size), key.sign(&cp).as_bytes())?;
        drop(tail);
        self.flush()?;
        Ok(true)
    }
}

/// Where approval requests and their grants live (see [`crate::approval`]).
/// Small on purpose: a fleet-wide store on a distributed engine can take
/// its place. Every write is durable when it returns: a decision must
/// survive the agent.
pub trait ApprovalStore: Send + Sync {
    /// Writes `request` whole (a new one, or its new state).
    fn put_request(&self, request: &Request) -> Result<(), StoreError>;
    fn request(&self, id: RequestId) -> Result<Option<Request>, StoreError>;
    /// Requests made at or after `since` (µs since the epoch), oldest first.
    fn requests(&self, since: u64) -> Result<Vec<Request>, StoreError>;
}

impl ApprovalStore for SledStore {
    fn put_request(&self, request: &Request) -> Result<(), StoreError> {
        let value = serde_json::to_vec(request).expect("requests always serialize");
        let session = request.requester.session.map_or(0, |s| s.0);
        let mut tail = self.lock_tail();
        let mut out = Appending::new(tail.head);
        let seq = out.push(
            crate::log::Kind::Approval,
            session,
            &request.requester.workload,
            &value,
        );
        out.index(&key8(b'A', request.id.0), seq);
        out.apply(&self.log, &mut tail)?;
        drop(tail);
        self.flush()?;
        Ok(())
    }

    fn request(&self, id: RequestId) -> Result<Option<Request>, StoreError> {
        self.indexed(&key8(b'A', id.0), |e| {
            serde_json::from_slice(e.payload).map_err(|e| e.to_string())
        })
    }

    fn requests(&self, since: u64) -> Result<Vec<Request>, StoreError> {
        let start = since << 12;
        let mut out = Vec::new();
        for item in self.log.range(key8(b'A', start)..key8(b'A', u64::MAX)) {
            let (k, _) = item?;
            out.extend(self.indexed(&k, |e| {
                serde_json::from_slice(e.payload).map_err(|e| e.to_string())
            })?);
        }
        Ok(out)
    }
}

fn read_request(k: &[u8], v: &[u8]) -> Result<Request, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(hex(k), e.to_string()))
}

/// Capacity of the channel between the data path and the writer.
const CHANNEL: usize = 8192;
/// Most records applied in one batch.
const BATCH: usize = 1024;
/// Shortest time between two fsyncs of the store.
const COMMIT_GAP: Duration = Duration::from_millis(50);

/// The data path's handle: cheap to clone, never blocks on disk.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Record>,
}

/// Joins the writer thread; dropping every [`Recorder`] lets it finish.
pub struct RecorderWriter {
    thread: std::thread::JoinHandle<()>,
}

impl RecorderWriter {
    /// Waits until every record sent so far is applied and flushed.
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

impl Recorder {
    pub fn start(store: Arc<dyn Store>) -> (Recorder, RecorderWriter) {
        let (tx, mut rx) = mpsc::channel::<Record>(CHANNEL);
        let thread = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("building the recorder runtime");
                rt.block_on(write_loop(&mut rx, store.as_ref()));
            })
            .expect("spawning the recorder thread");
        (Recorder { tx }, RecorderWriter { thread })
    }

    /// Records a session state; waits if the writer is behind.
    pub async fn record(&self, s: Session) {
        if self.tx.send(Record::Session(Box::new(s))).await.is_err() {
            tracing::error!("recorder stopped; a session record was not stored");
        }
    }

    /// Records one of the agent's own events; waits if the writer is behind.
    pub async fn agent(&self, event: crate::log::AgentEvent) {
        if self.tx.send(Record::Agent(event)).await.is_err() {
            tracing::error!("recorder stopped; an agent event was not stored");
        }
    }

    /// Records how far an open session has got; waits if the writer is behind.
    pub async fn progress(&self, id: SessionId, up: u64, down: u64) {
        let record = Record::Progress {
            session: id,
            up,
            down,
            at: now_micros(),
        };
        if self.tx.send(record).await.is_err() {
            tracing::error!(session = %id, "recorder stopped; progress was not stored");
        }
    }

    /// Records statements of a session, already in their stored form (see
    /// [`codec::Records`]); waits if the writer is behind.
    pub async fn statements(&self, id: SessionId, chunks: Vec<codec::Chunk>) {
        for chunk in chunks {
            let record = Record::Statements {
                session: id,
                first: chunk.first,
                encoded: chunk.bytes,
            };
            if self.tx.send(record).await.is_err() {
                tracing::error!(session = %id, "recorder stopped; statements were not stored");
                return;
            }
        }
    }
}

/// Longest time entries wait for a checkpoint while the agent runs.
pub const SEAL_EVERY: Duration = Duration::from_secs(10);

/// Applies records in batches and makes them durable at most every
/// [`COMMIT_GAP`] (group commit: what arrives meanwhile is applied and joins
/// the next fsync), so a busy agent pays for a few fsyncs a second, not one
/// per batch. A failed write is retried, never dropped. Entries are sealed
/// by a checkpoint at most [`SEAL_EVERY`] after they were written (those
/// written by others than the recorder too), and once more when the last
/// sender goes.
async fn write_loop(rx: &mut mpsc::Receiver<Record>, store: &dyn Store) {
    let mut buf = Vec::with_capacity(BATCH);
    let mut last_flush = tokio::time::Instant::now() - COMMIT_GAP;
    let mut seal_due: Option<tokio::time::Instant> = None;
    loop {
        // Idle, it still looks every half period for entries others wrote
        // (approval requests, the agent's own events) and seals them.
        let wake = seal_due.unwrap_or_else(|| tokio::time::Instant::now() + SEAL_EVERY / 2);
        let got = tokio::time::timeout_at(wake, rx.recv_many(&mut buf, BATCH))
            .await
            .ok();
        match got {
            Some(0) => break,
            None if seal_due.is_none() => seal(store),
            None => {}
            Some(_) => {
                let due = last_flush + COMMIT_GAP;
                loop {
                    while let Err(e) = store.put_batch(&buf) {
                        tracing::error!(error = %e, records = buf.len(), "writing sessions failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    buf.clear();
                    // Until the fsync is due, keep applying what arrives.
                    match tokio::time::timeout_at(due, rx.recv_many(&mut buf, BATCH)).await {
                        Ok(n) if n > 0 => continue,
                        _ => break,
                    }
                }
                if let Err(e) = store.flush() {
                    tracing::error!(error = %e, "flushing the session store failed");
                }
                last_flush = tokio::time::Instant::now();
                seal_due.get_or_insert(last_flush + SEAL_EVERY);
            }
        }
        if seal_due.is_some_and(|d| d <= tokio::time::Instant::now()) {
            seal(store);
            seal_due = None;
        }
    }
    seal(store);
}

fn seal(store: &dyn Store) {
    if let Err(e) = store.seal() {
        tracing::error!(error = %e, "signing a checkpoint of the log failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29T12:34:56.789012Z
        assert_eq!(
            rfc3339_micros(1_709_210_096_789_012),
            "2024-02-29T12:34:56.789012Z"
        );
        for us in [
            0,
            1_709_210_096_789_012,
            951_782_400_000_001,
            4_102_444_799_999_999,
        ] {
            assert_eq!(parse_rfc3339_micros(&rfc3339_micros(us)), Some(us));
        }
        for bad in [
            "2024-02-29T12:34:56.789012",
            "2024-13-01T00:00:00.000000Z",
            "2024-02-29 12:34:56.789012Z",
            "2024-02-29T24:00:00.000000Z",
            "+024-02-29T12:34:56.789012Z",
        ] {
            assert_eq!(parse_rfc3339_micros(bad), None, "{bad}");
        }
    }

    #[test]
    fn ids_are_ordered_and_parse_back() {
        let ids = SessionIds::default();
        let a = ids.next();
        let b = ids.next();
        assert!(b > a);
        assert_eq!(a.to_string().parse::<SessionId>().unwrap(), a);
        assert!("xyz".parse::<SessionId>().is_err());
        assert!(a.micros() <= now_micros());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("42").unwrap(), Duration::from_secs(42));
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("m").is_err());
    }

    /// A session stored as the agent wrote it when its PostgreSQL startup
    /// was a field of its own reads back with the startup as its
    /// `postgres` facts, and is stored again the same (as JSON: the facts'
    /// own keys come sorted).
    #[test]
    fn sessions_stored_with_a_startup_read_back_with_it_as_facts() {
        let stored = br#"{"id":"0006445c8a1b2c3d","workload":"web","identity":null,"pid":7,"exe":null,"uid":0,"cgroup":null,"original_dst":"127.0.0.1:5432","target":"db","protocol":"postgres","started_at":"2026-12-01T10:00:00.000000Z","ended_at":null,"bytes_up":9,"bytes_down":6,"outcome":"closed","rule":"r","detail":null,"client":"127.0.0.1:1","evidence":null,"postgres":{"user":"app","database":"orders","application_name":null,"encryption_declined":true,"cancel_request":false},"statements":0}"#;
        let s = decode(b"k", stored).unwrap();
        #[derive(Deserialize)]
        struct Startup {
            user: Option<String>,
            database: Option<String>,
            encryption_declined: bool,
        }
        let pg: Startup = s.facts.get("postgres").unwrap();
        assert_eq!(pg.user.as_deref(), Some("app"));
        assert_eq!(pg.database.as_deref(), Some("orders"));
        assert!(pg.encryption_declined);
        assert_eq!(s.statements, 0);
        let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
        assert_eq!(json(&encode(&s)), json(stored));
        let plain = Session::new(s.id, "127.0.0.1:1".into());
        let json = String::from_utf8(encode(&plain)).unwrap();
        assert!(!json.contains("postgres"), "{json}");
        assert_eq!(decode(b"k", json.as_bytes()).unwrap(), plain);
    }

    fn session(id: SessionId, workload: &str) -> Session {
        Session {
            workload: Some(workload.into()),
            ..Session::new(id, "127.0.0.1:1".into())
        }
    }

    #[test]
    fn sled_store_survives_reopen_and_closes_orphans() {
        let dir = std::env::temp_dir().join(format!("icpt-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ids = SessionIds::default();
        let (a, b) = (ids.next(), ids.next());
        {
            let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir).unwrap());
            let (rec, writer) = Recorder::start(store);
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async {
                rec.record(session(a, "web")).await;
                // `a` ran two statements, the second ending 2.5 ms after
                // its start, and moved bytes; then the agent died.
                let mut list = codec::Records::default();
                for seq in 0..2 {
                    list.push(&Statement {
                        seq,
                        at: a.micros() + 1000 * u64::from(seq + 1),
                        duration_us: Some(500),
                        ..Statement::new(
                            StatementKind::Query,
                            None,
                            "SELECT 1".into(),
                            interceptor_sql::Class::Read,
                        )
                    });
                }
                rec.statements(a, list.take()).await;
                rec.progress(a, 10, 20).await;
                let mut closed = session(b, "batch");
                rec.progress(b, 1, 2).await;
                closed.outcome = Outcome::Closed;
                rec.record(closed).await;
            });
            drop(rec);
            writer.join();
        }
        // sled's flusher thread can hold the directory's lock for a moment
        // after the store is dropped (seen once in about ten runs).
        let mut tries = 0;
        let store = loop {
            match SledStore::open(&dir) {
                Ok(s) => break s,
                Err(_) if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopening the store: {e}"),
            }
        };
        assert_eq!(store.progress.len(), 1, "a closed session's progress stays");
        let reopened = now_micros();
        assert_eq!(store.close_orphans().unwrap(), 1);
        let x = store.get(a).unwrap().unwrap();
        assert_eq!(x.outcome, Outcome::Interrupted);
        // What the store holds, and the last moment it knew (the progress
        // record, later than the statements), not the moment of reopening.
        assert_eq!((x.statements, x.bytes_up, x.bytes_down), (2, 10, 20));
        let end = parse_rfc3339_micros(x.ended_at.as_deref().unwrap()).unwrap();
        assert!(end >= a.micros() + 2500 && end <= reopened, "{x:?}");
        assert!(store.progress.is_empty());
        let web = store
            .list(&Filter {
                workload: Some("batch".into()),
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(web.len(), 1);
        assert_eq!(web[0].id, b);
        let since = store
            .list(&Filter {
                since_micros: Some(b.micros() + 1_000_000),
                ..Filter::default()
            })
            .unwrap();
        assert!(since.is_empty());
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod recovery_tests {
    use super::*;

    fn reopen(dir: &Path) -> SledStore {
        for _ in 0..50 {
            if let Ok(s) = SledStore::open(dir) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        SledStore::open(dir).unwrap()
    }

    fn event(n: u32) -> Record {
        Record::Agent(serde_json::json!({"event": "test", "n": n}))
    }

    /// A crash between writing a batch's frames and indexing them leaves
    /// whole entries past the store's head: the next open indexes them. A
    /// frame cut short is cut off, and the log goes on where it ended.
    #[test]
    fn a_crashed_write_is_mended_at_open() {
        let dir = std::env::temp_dir().join(format!("icpt-recover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let s = SledStore::open(&dir).unwrap();
            s.put_batch(&[event(0), event(1)]).unwrap();
            s.flush().unwrap();
        }
        // sled as it was after the first batch; the log gets a second.
        let saved = dir.join("saved");
        copy_dir(&dir.join("store"), &saved).unwrap();
        {
            let s = reopen(&dir);
            s.put_batch(&[event(2), event(3)]).unwrap();
            s.flush().unwrap();
        }
        std::fs::remove_dir_all(dir.join("store")).unwrap();
        std::fs::rename(&saved, dir.join("store")).unwrap();
        // And half a frame more.
        let seg = crate::segments::segment_path(&dir.join("log"), 0);
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        std::io::Write::write_all(&mut f, &[0, 0, 1, 0, 0, 0]).unwrap();
        drop(f);

        let s = reopen(&dir);
        let note = s.recovered.clone().unwrap();
        assert!(note.contains("2 entries written whole"), "{note}");
        assert!(note.contains("6 bytes at the end of segment 0"), "{note}");
        assert_eq!(s.found_head().unwrap().next, 4);
        s.put_batch(&[event(4)]).unwrap();
        s.flush().unwrap();
        let seqs: Vec<u64> = s.entries(0).map(|r| r.unwrap().0).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
        let report = s.audit(None).unwrap();
        assert!(report.intact(), "{report:#?}");
        assert_eq!(
            s.entry(3).unwrap().map(|e| e.len()),
            s.entries(3).next().map(|r| r.unwrap().1.len())
        );
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Pruning removes whole old segments and their index; with its record
    /// in the log, the log verifies from its first kept entry; without it,
    /// the cut shows.
    #[test]
    fn pruned_segments_leave_a_log_that_verifies_from_its_first_kept_entry() {
        let dir = std::env::temp_dir().join(format!("icpt-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = SledStore::open(&dir).unwrap();
        s.set_key(crate::seal::NodeKey::from_seed([4; 32], "t/interceptor"))
            .unwrap();
        s.set_segment_bytes(400);
        let ids = SessionIds::default();
        let old = ids.next();
        let mut session = Session::new(old, "127.0.0.1:1".into());
        session.workload = Some("web".into());
        s.put_batch(&[Record::Session(Box::new(session))]).unwrap();
        for n in 0..40 {
            s.put_batch(&[event(n)]).unwrap();
        }
        s.seal().unwrap();
        let segments = s.segments().unwrap();
        assert!(segments.len() > 5, "{segments:?}");
        let p = s.prune(20).unwrap();
        assert_eq!(p.from, 0);
        assert!(p.through < 20 && p.segments >= 2, "{p:?}");
        assert_eq!(s.first_kept().unwrap(), p.through + 1);
        assert!(
            s.get(old).unwrap().is_none(),
            "a session wholly pruned is gone from the index"
        );
        assert_eq!(
            s.segments().unwrap().len() as u64,
            segments.len() as u64 - p.segments
        );
        let unrecorded = s.audit(None).unwrap();
        assert!(
            unrecorded
                .findings
                .iter()
                .any(|f| f.contains("no pruning record")),
            "{unrecorded:#?}"
        );
        s.put_batch(&[Record::Agent(
            serde_json::json!({"event": "prune", "through": p.through}),
        )])
        .unwrap();
        s.seal().unwrap();
        let report = s.audit(None).unwrap();
        assert!(report.intact(), "{report:#?}");
        assert_eq!(report.first, Some(p.through + 1));
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Entries written by others than the recorder (approval requests, the
    /// agent's own events) are sealed within the period too, with no
    /// record going through the recorder.
    #[test]
    fn an_idle_recorder_seals_what_others_wrote() {
        let dir = std::env::temp_dir().join(format!("icpt-idle-seal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(SledStore::open(&dir).unwrap());
        store
            .set_key(crate::seal::NodeKey::from_seed([3; 32], "t/interceptor"))
            .unwrap();
        let (rec, writer) = Recorder::start(store.clone());
        store.put_batch(&[event(1)]).unwrap();
        let deadline = std::time::Instant::now() + SEAL_EVERY;
        while store.checkpoints().count() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "not sealed within {SEAL_EVERY:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(rec);
        writer.join();
        assert_eq!(store.audit(None).unwrap().sealed_through, 1);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
