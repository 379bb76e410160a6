//! Streaming the evidence log to SIEMs: each `[[export.sink]]` has a thread
//! that reads the log from its cursor (durable, in sled), renders each
//! entry's OCSF events, delivers them, and moves the cursor only once they
//! are delivered: at least once, in order, resuming after a restart or an
//! outage where it stopped. It reads the log's files, never the data
//! path's channel, so a sink that is down or behind costs the data path
//! nothing; a sink down is said in the agent's log and `interceptor status`.
//!
//! Each event carries its entry's `seq`, its `index` in the entry and its
//! session: a receiver drops what it got twice by (seq, index).

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::Sink,
    record::{self, log, SledStore},
};

mod file;
mod otlp;
mod syslog;

/// Most entries read for one delivery.
const BATCH_ENTRIES: usize = 64;
/// Most events in one delivery.
const BATCH_EVENTS: usize = 2048;
/// How often a sink that has caught up looks for new entries.
const IDLE: Duration = Duration::from_millis(100);
/// Longest wait between tries while a receiver is down.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// One event on its way: what a receiver needs to place and de-duplicate
/// it, and its OCSF JSON.
pub struct Event<'a> {
    pub seq: u64,
    pub index: u32,
    pub session: u64,
    pub workload: &'a str,
    pub kind: log::Kind,
    /// Its entry's time (µs since the epoch).
    pub at: u64,
    pub json: &'a [u8],
}

/// A way of delivering events.
pub trait Transport: Send {
    /// Delivers `events`, in order (an error: none may be taken as
    /// delivered).
    fn send(&mut self, events: &[Event<'_>]) -> Result<(), String>;
    /// Whether what was sent more than [`Transport::settle`] ago can be
    /// taken as delivered now (`false`: not yet; an error: the receiver
    /// went away, and what was not taken as delivered goes again).
    fn healthy(&mut self) -> Result<bool, String> {
        Ok(true)
    }
    /// How long after a send it counts as delivered (a receiver that
    /// acknowledges nothing, like syslog over TCP, gets time to fail).
    fn settle(&self) -> Duration {
        Duration::ZERO
    }
    /// Drops the connection, to start again.
    fn reset(&mut self) {}
}

/// What `interceptor status` shows of a sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SinkStatus {
    pub name: String,
    pub kind: String,
    /// The next entry to deliver (everything before it is delivered).
    pub cursor: u64,
    /// The next entry to send (what lies between is sent, not yet taken
    /// as delivered).
    #[serde(default)]
    pub sent: u64,
    /// Entries written and not delivered yet.
    pub behind: u64,
    pub up: bool,
    /// Since when it is up or down (RFC 3339).
    pub since: String,
    pub error: Option<String>,
}

/// The running sinks.
pub struct Sinks {
    pub states: Vec<Arc<Mutex<SinkStatus>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Sinks {
    /// Starts a thread per sink.
    pub fn start(store: Arc<SledStore>, sinks: &[Sink], origin: &str) -> anyhow::Result<Sinks> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut states = Vec::new();
        let mut threads = Vec::new();
        for s in sinks {
            let transport: Box<dyn Transport> = match s.kind.as_str() {
                "syslog" => Box::new(syslog::Syslog::new(s, origin)?),
                "otlp" => Box::new(otlp::Otlp::new(s, origin)),
                _ => Box::new(file::File::new(s)?),
            };
            let head = store.found_head()?.next;
            let cursor = match store.cursor(&s.name)? {
                Some(c) => c,
                None if s.from.as_deref() == Some("now") => head,
                None => store.first_kept()?,
            };
            store.set_cursor(&s.name, cursor)?;
            let state = Arc::new(Mutex::new(SinkStatus {
                name: s.name.clone(),
                kind: s.kind.clone(),
                cursor,
                sent: cursor,
                behind: head.saturating_sub(cursor),
                up: true,
                since: record::rfc3339_micros(record::now_micros()),
                error: None,
            }));
            let run = Runner {
                store: store.clone(),
                name: s.name.clone(),
                transport,
                state: state.clone(),
                stop: stop.clone(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("sink {}", s.name))
                    .spawn(move || run.run(cursor))?,
            );
            states.push(state);
        }
        Ok(Sinks {
            states,
            stop,
            threads,
        })
    }

    pub fn status(&self) -> Vec<SinkStatus> {
        self.states
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Stops the threads (what they sent and saw delivered is kept).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

struct Runner {
    store: Arc<SledStore>,
    name: String,
    transport: Box<dyn Transport>,
    state: Arc<Mutex<SinkStatus>>,
    stop: Arc<AtomicBool>,
}

impl Runner {
    fn set(&self, f: impl FnOnce(&mut SinkStatus)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn up(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !s.up {
            tracing::info!(sink = %self.name, "the sink's receiver is back; catching up");
            s.up = true;
            s.since = record::rfc3339_micros(record::now_micros());
            s.error = None;
        }
    }

    fn down(&self, error: &str, last_said: &mut Option<Instant>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.up {
            s.up = false;
            s.since = record::rfc3339_micros(record::now_micros());
        }
        s.error = Some(error.to_owned());
        // Said when it goes down, then every minute it stays down.
        if last_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            tracing::warn!(sink = %self.name, error, behind = s.behind, since = %s.since, "the sink's receiver is down; events wait in the log");
            *last_said = Some(Instant::now());
        }
    }

    /// Renders entries from `from` into `out`: up to a batch; returns the
    /// events' places and the seq after the last entry read.
    fn read(
        &self,
        from: u64,
        end: u64,
        out: &mut Vec<u8>,
        marks: &mut Vec<Mark>,
    ) -> Result<u64, String> {
        out.clear();
        marks.clear();
        let mut next = from;
        for item in self.store.entries(from).take(BATCH_ENTRIES) {
            let (seq, bytes) = item.map_err(|e| e.to_string())?;
            if seq >= end {
                break;
            }
            let e = log::parse(&bytes).map_err(|e| format!("entry {seq}: {e}"))?;
            let workload: Arc<str> = Arc::from(e.header.workload);
            let start = out.len();
            record::ocsf::write_events(out, seq, &e).map_err(|e| format!("entry {seq}: {e}"))?;
            let mut at = start;
            let mut index = 0;
            while let Some(nl) = out[at..].iter().position(|&b| b == b'\n') {
                marks.push(Mark {
                    seq,
                    index,
                    session: e.header.session,
                    workload: workload.clone(),
                    kind: e.header.kind,
                    at: e.header.at,
                    span: (at, at + nl),
                });
                index += 1;
                at += nl + 1;
            }
            next = seq + 1;
            if marks.len() >= BATCH_EVENTS {
                break;
            }
        }
        Ok(next)
    }

    fn run(mut self, mut cursor: u64) {
        let mut sent_to = cursor;
        // Sent, not yet taken as delivered: (next seq, when sent).
        let mut pending: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut backoff = Duration::from_millis(200);
        let mut last_said = None;
        let mut saved = cursor;
        let mut buf = Vec::with_capacity(1 << 20);
        let mut marks = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            let end = match self.store.found_head() {
                Ok(h) => h.next,
                Err(_) => break,
            };
            // Pruned from under us (max_size): go on from what is kept.
            if let Ok(first) = self.store.first_kept() {
                if sent_to < first {
                    sent_to = first;
                    cursor = cursor.max(first);
                }
            }
            let mut failed = None;
            if sent_to < end {
                match self.read(sent_to, end, &mut buf, &mut marks) {
                    Ok(next) => {
                        let events: Vec<Event<'_>> = marks
                            .iter()
                            .map(|m| Event {
                                seq: m.seq,
                                index: m.index,
                                session: m.session,
                                workload: &m.workload,
                                kind: m.kind,
                                at: m.at,
                                json: &buf[m.span.0..m.span.1],
                            })
                            .collect();
                        match self.transport.send(&events) {
                            Ok(()) => {
                                sent_to = next;
                                pending.push_back((next, Instant::now()));
                                self.up();
                                backoff = Duration::from_millis(200);
                            }
                            Err(e) => failed = Some(e),
                        }
                    }
                    Err(e) => failed = Some(format!("reading the log: {e}")),
                }
            }
            // Whether the receiver is still there (an error: it went away,
            // and what it had not been taken as delivered goes again).
            let mut settled = false;
            if failed.is_none() {
                match self.transport.healthy() {
                    Ok(h) => settled = h,
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(e) = failed {
                self.transport.reset();
                self.set(|s| s.behind = end.saturating_sub(cursor));
                self.down(&e, &mut last_said);
                // What was sent and not taken as delivered goes again.
                pending.clear();
                sent_to = cursor;
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            let settle = self.transport.settle();
            while let Some(&(next, at)) = pending.front() {
                if at.elapsed() < settle {
                    break;
                }
                if settle > Duration::ZERO && !settled {
                    break;
                }
                cursor = next;
                pending.pop_front();
            }
            if cursor != saved {
                match self.store.set_cursor(&self.name, cursor) {
                    Ok(()) => saved = cursor,
                    Err(e) => {
                        tracing::error!(sink = %self.name, error = %e, "saving the sink's cursor failed")
                    }
                }
            }
            self.set(|s| {
                s.cursor = cursor;
                s.sent = sent_to;
                s.behind = end.saturating_sub(cursor);
            });
            if sent_to >= end {
                std::thread::sleep(IDLE);
            }
        }
        // At a stop, what the receiver's TCP has acknowledged counts as
        // delivered (the rest goes again after the next start).
        if let Some(&(next, _)) = pending.back() {
            if self.transport.healthy() == Ok(true) {
                cursor = next;
            }
        }
        if let Err(e) = self.store.set_cursor(&self.name, cursor) {
            tracing::error!(sink = %self.name, error = %e, "saving the sink's cursor failed");
        }
    }
}

/// Where an event is in a rendered batch.
struct Mark {
    seq: u64,
    index: u32,
    session: u64,
    /// Its entry's workload (one allocation per entry, not per event).
    workload: Arc<str>,
    kind: log::Kind,
    at: u64,
    span: (usize, usize),
}
