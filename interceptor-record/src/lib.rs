//! Session recording: the [`Session`] record, the [`Store`] trait with its
//! sled engine, and the [`Recorder`] that batches writes off the data path.
//!
//! The data path only ever sends into a bounded channel; when the writer
//! falls behind, senders wait (backpressure) — records are never dropped.
//! One writer thread applies batches as they arrive and fsyncs at most every
//! 50 ms (group commit), so a slow disk never adds latency to relayed bytes.
//! sled holds three trees: sessions by time-ordered id, statement chunks, and
//! the progress of open sessions (docs/store-format.md).

use std::{
    fmt,
    path::Path,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub mod codec;
pub mod event;
mod outbox;

pub use event::{Action, Decision, Startup, Statement, StatementKind, Tags, Whole};
pub use outbox::{Outbox, Recording};

/// How often the statements and progress of open sessions are recorded
/// (the agent's statement flush).
pub const STATEMENT_FLUSH: Duration = Duration::from_millis(200);

/// Evidence behind an attribution, as stored with the session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub pid: u32,
    pub tid: u32,
    /// Process start, RFC 3339 (from /proc; absent when the process was gone).
    pub process_start: Option<String>,
    pub exe: Option<String>,
    pub exe_sha256: Option<String>,
    pub uid: u32,
    pub user: Option<String>,
    pub gid: u32,
    /// cgroup v2 path of the caller, relative to the mount.
    pub cgroup: Option<String>,
    pub cgroup_id: u64,
    pub systemd_unit: Option<String>,
    /// Thread name at connect (kernel-captured; spoofable, informative only).
    pub comm: String,
    pub netns_cookie: u64,
    /// `process`: live /proc facts matched; `kernel`: only what the kernel captured.
    pub attribution: String,
}

/// Serde for a SHA-256 digest shown as 64 lowercase hex digits.
pub mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bad = || serde::de::Error::custom(format!("`{text}` is not a SHA-256 (64 hex digits)"));
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(text.get(i * 2..i * 2 + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(out)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Time-ordered session id: microseconds since the epoch in the upper bits,
/// a sequence in the low 12 bits; shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for SessionId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() != 16 {
            return Err(format!("`{s}` is not a session id (16 hex digits)"));
        }
        u64::from_str_radix(s, 16)
            .map(SessionId)
            .map_err(|_| format!("`{s}` is not a session id (16 hex digits)"))
    }
}

impl Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hands out strictly increasing [`SessionId`]s.
#[derive(Default)]
pub struct SessionIds {
    last: AtomicU64,
}

impl SessionIds {
    pub fn next(&self) -> SessionId {
        let now = now_micros() << 12;
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev + 1);
            match self
                .last
                .compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return SessionId(next),
                Err(p) => prev = p,
            }
        }
    }
}

impl SessionId {
    pub fn micros(self) -> u64 {
        self.0 >> 12
    }
}

pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// RFC 3339 UTC time with microseconds, from microseconds since the epoch.
pub fn rfc3339_micros(us: u64) -> String {
    let secs = us / 1_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    // Written digit by digit: this runs for every recorded statement.
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y.clamp(0, 9999) as u64);
    put(5, 2, m.into());
    put(8, 2, d.into());
    put(11, 2, rem / 3600);
    put(14, 2, rem / 60 % 60);
    put(17, 2, rem % 60);
    put(20, 6, us % 1_000_000);
    out.iter().map(|&b| b as char).collect()
}

/// Microseconds since the epoch from the form [`rfc3339_micros`] writes.
pub fn parse_rfc3339_micros(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let shape = b"0000-00-00T00:00:00.000000Z";
    if b.len() != shape.len()
        || !b.iter().zip(shape).all(|(c, want)| match want {
            b'0' => c.is_ascii_digit(),
            _ => c == want,
        })
    {
        return None;
    }
    let num = |at: usize, width: usize| {
        b[at..at + width]
            .iter()
            .fold(0u64, |v, c| v * 10 + u64::from(c - b'0'))
    };
    let (y, m, d) = (num(0, 4) as i64, num(5, 2) as u32, num(8, 2) as u32);
    let (hh, mm, ss) = (num(11, 2), num(14, 2), num(17, 2));
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    let days = u64::try_from(days_from_civil(y, m, d)).ok()?;
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000 + num(20, 6))
}

/// (year, month, day), proleptic Gregorian, to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Serde for microseconds since the epoch shown as RFC 3339 text.
pub mod micros_as_rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(us: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339_micros(*us))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        super::parse_rfc3339_micros(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{text}` is not a time like 2024-02-29T12:34:56.789012Z"
            ))
        })
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Parses `90s`, `15m`, `2h`, `7d` (or a plain number of seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (like 90s, 15m, 2h, 7d)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Still relaying.
    Open,
    /// Both directions ended with a clean close.
    Closed,
    /// One side reset the connection.
    Reset,
    /// Policy denied the connect.
    Denied,
    /// Refused before policy: no metadata for the connection (not redirected
    /// by the agent, or aimed at the proxy itself).
    Refused,
    /// The agent could not reach the destination or failed mid-relay.
    Error,
    /// The agent stopped while the session was open.
    Interrupted,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self).ok();
        f.write_str(s.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

/// One proxied (or refused) connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: SessionId,
    pub workload: Option<String>,
    pub identity: Option<String>,
    pub pid: u32,
    pub exe: Option<String>,
    pub uid: u32,
    pub cgroup: Option<String>,
    pub original_dst: Option<String>,
    pub target: Option<String>,
    pub protocol: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub outcome: Outcome,
    /// The rule that decided the connect.
    pub rule: Option<String>,
    /// Why it ended the way it did (error text, refusal reason).
    pub detail: Option<String>,
    /// The application's side of the connection (its source address).
    pub client: String,
    pub evidence: Option<Evidence>,
    /// What the PostgreSQL startup said (postgres targets only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<Startup>,
    /// Statements recorded so far (their text is in the statements tree).
    #[serde(default)]
    pub statements: u32,
}

impl Session {
    /// A new open session for a connection from `client`, facts to be filled in.
    pub fn new(id: SessionId, client: String) -> Self {
        Session {
            id,
            workload: None,
            identity: None,
            pid: 0,
            exe: None,
            uid: 0,
            cgroup: None,
            original_dst: None,
            target: None,
            protocol: "tcp".into(),
            started_at: rfc3339_micros(id.micros()),
            ended_at: None,
            bytes_up: 0,
            bytes_down: 0,
            outcome: Outcome::Open,
            rule: None,
            detail: None,
            client,
            evidence: None,
            postgres: None,
            statements: 0,
        }
    }
}

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
        Ok(SledStore {
            db,
            sessions,
            statements,
            progress,
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
