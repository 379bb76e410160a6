//! The sled store and the recorder thread (feature `store`, on by
//! default): what the agent and the responder commands need, and what
//! the wire machines, which only leave records in an outbox, do not.

use std::{path::Path, sync::Arc, time::Duration};

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
}

pub struct SledStore {
    db: sled::Db,
    sessions: sled::Tree,
    /// Session id (8 bytes) ++ first statement seq of a chunk (4 bytes),
    /// big-endian → a chunk of statements ([`codec`]; older agents' JSON
    /// arrays still read).
    statements: sled::Tree,
    /// Session id → bytes up, bytes down, time (three big-endian u64) of an
    /// open session's last [`Record::Progress`].
    progress: sled::Tree,
    /// Approval request id → the request, its history and its grant (JSON).
    approvals: sled::Tree,
}

/// sled's page cache: the agent writes far more than it reads back, so a
/// small cache costs little, where sled's default (1 GiB) let a long-running
/// agent's memory grow with its store.
pub const STORE_CACHE: u64 = 16 << 20;

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("store");
        let shown = path.display().to_string();
        let opened = sled::Config::new()
            .path(&path)
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
        let sessions = db.open_tree("sessions")?;
        let statements = db.open_tree("statements")?;
        let progress = db.open_tree("progress")?;
        let approvals = db.open_tree("approvals")?;
        Ok(SledStore {
            db,
            sessions,
            statements,
            progress,
            approvals,
        })
    }

    /// Marks sessions left open by an agent that stopped as interrupted,
    /// with what the store holds of them: the statements recorded, the bytes
    /// of their last progress record, and as their end the last moment
    /// recorded (a statement's end or a progress record), not the moment the
    /// agent noticed.
    pub fn close_orphans(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.sessions.iter() {
            let (k, v) = item?;
            let mut s: Session = decode(&k, &v)?;
            if s.outcome != Outcome::Open {
                continue;
            }
            let mut last = s.id.micros();
            let (count, ended) = self.tally(s.id)?;
            s.statements = s.statements.max(count);
            last = last.max(ended);
            if let Some(p) = self.progress.get(&k)? {
                let word = |i: usize| {
                    p.get(i * 8..i * 8 + 8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_be_bytes)
                };
                s.bytes_up = s.bytes_up.max(word(0));
                s.bytes_down = s.bytes_down.max(word(1));
                last = last.max(word(2));
                self.progress.remove(&k)?;
            }
            s.outcome = Outcome::Interrupted;
            s.ended_at = Some(rfc3339_micros(last));
            s.detail = Some(format!(
                "the agent stopped while this session was open; counts and end are the last recorded (progress is recorded every {} ms while bytes move)",
                STATEMENT_FLUSH.as_millis()
            ));
            self.sessions.insert(k, encode(&s))?;
            n += 1;
        }
        self.db.flush()?;
        Ok(n)
    }

    /// How many statements of session `id` the store holds, and when the
    /// last of them ended (microseconds since the epoch; 0 if none).
    fn tally(&self, id: SessionId) -> Result<(u32, u64), StoreError> {
        let mut count = 0u32;
        let mut last = 0;
        for item in self.statements.scan_prefix(id.0.to_be_bytes()) {
            let (k, v) = item?;
            let chunk = codec::decode(&v).map_err(|e| StoreError::Corrupt(hex(&k), e))?;
            count = count.saturating_add(chunk.len() as u32);
            for st in &chunk {
                last = last.max(st.at + st.duration_us.unwrap_or(0));
            }
        }
        Ok((count, last))
    }
}

fn encode(s: &Session) -> Vec<u8> {
    serde_json::to_vec(s).expect("sessions always serialize")
}

fn decode(k: &[u8], v: &[u8]) -> Result<Session, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(hex(k), e.to_string()))
}

impl Store for SledStore {
    fn put_batch(&self, records: &[Record]) -> Result<(), StoreError> {
        let mut sessions = sled::Batch::default();
        let mut statements = sled::Batch::default();
        let mut progress = sled::Batch::default();
        for r in records {
            match r {
                Record::Session(s) => {
                    let key = s.id.0.to_be_bytes();
                    sessions.insert(&key, encode(s));
                    if s.outcome != Outcome::Open {
                        progress.remove(&key);
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
                    let mut key = session.0.to_be_bytes().to_vec();
                    key.extend_from_slice(&first.to_be_bytes());
                    statements.insert(key, encoded.as_slice());
                }
            }
        }
        // Statements first: a session record never names statements that are not there.
        self.statements.apply_batch(statements)?;
        self.progress.apply_batch(progress)?;
        self.sessions.apply_batch(sessions)?;
        Ok(())
    }

    fn statements(&self, id: SessionId) -> Result<Vec<Statement>, StoreError> {
        let mut out = Vec::new();
        for item in self.statements.scan_prefix(id.0.to_be_bytes()) {
            let (k, v) = item?;
            let chunk = codec::decode(&v).map_err(|e| StoreError::Corrupt(hex(&k), e))?;
            out.extend(chunk);
        }
        Ok(out)
    }

    fn get(&self, id: SessionId) -> Result<Option<Session>, StoreError> {
        let key = id.0.to_be_bytes();
        self.sessions
            .get(key)?
            .map(|v| decode(&key, &v))
            .transpose()
    }

    fn list(&self, filter: &Filter) -> Result<Vec<Session>, StoreError> {
        let start = filter.since_micros.unwrap_or(0) << 12;
        let mut out = Vec::new();
        for item in self.sessions.range(start.to_be_bytes()..) {
            let (k, v) = item?;
            let s = decode(&k, &v)?;
            if filter
                .workload
                .as_ref()
                .is_some_and(|w| s.workload.as_ref() != Some(w))
            {
                continue;
            }
            out.push(s);
        }
        if let Some(limit) = filter.limit {
            let skip = out.len().saturating_sub(limit);
            out.drain(..skip);
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
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
        self.approvals.insert(request.id.0.to_be_bytes(), value)?;
        self.approvals.flush()?;
        Ok(())
    }

    fn request(&self, id: RequestId) -> Result<Option<Request>, StoreError> {
        let key = id.0.to_be_bytes();
        self.approvals
            .get(key)?
            .map(|v| read_request(&key, &v))
            .transpose()
    }

    fn requests(&self, since: u64) -> Result<Vec<Request>, StoreError> {
        let start = since << 12;
        self.approvals
            .range(start.to_be_bytes()..)
            .map(|item| {
                let (k, v) = item?;
                read_request(&k, &v)
            })
            .collect()
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

/// Applies records in batches and makes them durable at most every
/// [`COMMIT_GAP`] (group commit: what arrives meanwhile is applied and joins
/// the next fsync), so a busy agent pays for a few fsyncs a second, not one
/// per batch. A failed write is retried, never dropped.
async fn write_loop(rx: &mut mpsc::Receiver<Record>, store: &dyn Store) {
    let mut buf = Vec::with_capacity(BATCH);
    let mut last_flush = tokio::time::Instant::now() - COMMIT_GAP;
    while rx.recv_many(&mut buf, BATCH).await > 0 {
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
