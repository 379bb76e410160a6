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
    str::FromStr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

pub mod approval;
pub mod audit;
pub mod bundle;
pub mod codec;
pub mod event;
pub mod log;
pub mod ocsf;
mod outbox;
pub mod seal;
#[cfg(feature = "store")]
pub mod segments;

pub use approval::{Request, RequestId};
pub use event::{Action, Decision, Facts, Statement, StatementKind, Tags, Via, Whole};
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
    /// The approval request behind the connect's decision (a review rule
    /// decided it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
    /// Why it ended the way it did (error text, refusal reason).
    pub detail: Option<String>,
    /// The application's side of the connection (its source address).
    pub client: String,
    pub evidence: Option<Evidence>,
    /// What the connection's protocol told of it, under the protocol's
    /// name (`postgres`: what its startup said), beside the session's own
    /// fields.
    #[serde(default, flatten)]
    pub facts: Facts,
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
            approval: None,
            detail: None,
            client,
            evidence: None,
            facts: Facts::default(),
            statements: 0,
        }
    }
}

#[cfg(feature = "store")]
mod store;
#[cfg(feature = "store")]
pub use store::*;
