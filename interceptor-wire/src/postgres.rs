//! PostgreSQL wire protocol (v3) in the data path: framing, the startup
//! negotiation, and statement recording.
//!
//! Frames are read incrementally into an owned `BytesMut`; every length is
//! checked before it is used, and only the messages the agent inspects are
//! buffered whole, up to fixed limits: from the client the startup, Query,
//! Parse, Bind, Execute, Close, Describe and FunctionCall; from the server
//! authentication, CommandComplete, EmptyQueryResponse, PortalSuspended,
//! ErrorResponse, ParameterStatus and ReadyForQuery, and while a mask rule
//! applies RowDescription, NoData, DataRow and NoticeResponse too.
//! Everything else streams through untouched. A malformed frame from either side ends the
//! session with a recorded reason, never a panic.
//!
//! The agent must see plaintext. Unless it takes the client's TLS itself
//! (the agent's `[agent.tls]`, before these machines see a byte), they
//! answer `SSLRequest` and `GSSENCRequest` with `N` (a client with
//! `sslmode=prefer` or `disable` goes on in plaintext; one that insists on
//! TLS gives up, and the session says why). They strip
//! `SCRAM-SHA-256-PLUS` from the server's SASL offer: channel binding binds
//! the client's login to the TLS session it sees, which is never the
//! server's when the agent stands between them. `CancelRequest`
//! arrives on its own connection and is forwarded to the same destination,
//! so it reaches the backend that issued the key.
//!
//! Every Query, Parse and FunctionCall is classified ([`crate::sql`]) and
//! decided by the statement rules of the policy. A denied one never reaches
//! the server: in its place the server is asked to raise SQLSTATE 42501
//! naming the rule (see [`refusal_sql`]), so the error, the transaction
//! state and the extended protocol's skip-until-Sync are the server's own.

use std::{collections::VecDeque, io, sync::Arc, time::Instant};

// The per-connection maps are keyed by what the client sends (statement and
// portal names): foldhash, seeded at random per map, is several times
// cheaper than SipHash on such short keys, and each map is bounded
// (`MAX_NAMES`) whatever the client does.
use foldhash::HashMap;

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

mod code;
mod engine;
mod message;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod types;

pub use code::{BackendCode, FrontendCode};
pub use engine::{backend, frontend, Backend, Frontend, Machines};

pub use crate::record::{Outbox, Recording};
pub use crate::record::{Statement, StatementKind, Tags, Whole};
pub use crate::seam::{Classified, Flags, Gate, Ticket, Verdict};
use message::{be32, Column, Fields};

use crate::{
    record::{now_micros, Action, Decision},
    seam::{decide, Column as Col, Memo, Parts, Seen},
    sql::{Class, Classification, Dialect},
};

/// The name a session's [`Startup`] is recorded under (see
/// [`Facts`](crate::record::Facts)).
pub const FACTS: &str = "postgres";

/// What the startup message said: the session's facts (see [`FACTS`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Startup {
    pub user: Option<String>,
    /// Settings the startup packet asks for that a statement would need
    /// policy for (`role`, `session_authorization`, `search_path`), as
    /// `SET` statements; each is decided and recorded like one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settings: Vec<String>,
    pub database: Option<String>,
    pub application_name: Option<String>,
    /// The client asked for TLS or GSS encryption and was told no.
    pub encryption_declined: bool,
    /// This connection carried a CancelRequest.
    pub cancel_request: bool,
    /// The client asked for a replication connection.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replication: bool,
    /// Why the startup packet cannot be read as the server reads it (it is
    /// refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

/// Refuses a startup packet whose `options` the agent cannot read as the
/// server does (whatever the policy says).
pub const RULE_UNREADABLE_STARTUP: &str = "agent.unreadable-startup";

/// Startup packets are small; PostgreSQL itself refuses more than 10000 bytes.
pub const MAX_STARTUP: usize = 10_000;
/// Largest message PostgreSQL accepts (1 GiB - 1).
pub const MAX_MESSAGE: usize = (1 << 30) - 1;
/// Largest Query/Parse message buffered for recording; larger ones stream
/// through and are recorded as too large to inspect.
pub const MAX_STATEMENT: usize = 16 << 20;
/// Largest server message we buffer to inspect (auth, tags, errors).
const MAX_INSPECT: usize = 1 << 20;

/// Whether the bytes a client sent first open a PostgreSQL session: a
/// startup packet of protocol 3 (any minor version), or an SSL,
/// GSS-encryption or cancel request. `Some` once they tell, `None` while
/// they are still a prefix of one (fewer than its first 8 bytes).
pub fn opens_session(prefix: &[u8]) -> Option<bool> {
    let n = prefix.len().min(8);
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&prefix[..n]);
    // The length (big-endian, 8..=MAX_STARTUP): its first two bytes are zero.
    if b[..n.min(2)].iter().any(|&x| x != 0) {
        return Some(false);
    }
    if n >= 4 && !(8..=MAX_STARTUP as u32).contains(&u32::from_be_bytes([b[0], b[1], b[2], b[3]])) {
        return Some(false);
    }
    // The code: major 3, or 1234 with a minor of 5678..=5680.
    let major = u16::from_be_bytes([b[4], b[5]]);
    let minor = u16::from_be_bytes([b[6], b[7]]);
    let request = (CANCEL_REQUEST & 0xffff) as u16..=(GSSENC_REQUEST & 0xffff) as u16;
    let fits = match n {
        0..=4 => true,
        5 => b[4] == 0 || b[4] == (SSL_REQUEST >> 24) as u8,
        6 | 7 => major == 3 || (major == 1234 && (n == 6 || b[6] == (SSL_REQUEST >> 8) as u8)),
        _ => major == 3 || (major == 1234 && request.contains(&minor)),
    };
    if !fits {
        return Some(false);
    }
    (n == 8).then_some(true)
}

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
const AUTH_SASL: u32 = 10;
/// Classifications remembered per connection (drivers repeat their SQL).

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("malformed PostgreSQL frame from the {side}: {what}")]
    Malformed { side: &'static str, what: String },
    #[error(
        "the client requires TLS, which the agent declined (it takes the client's TLS with [agent.tls] mode = \"terminate\"); or use sslmode=prefer or disable"
    )]
    ClientRequiresTls,
    #[error("startup setting refused by rule \"{rule}\": {setting}")]
    StartupRefused { rule: String, setting: String },
    #[error(transparent)]
    Io(#[from] io::Error),
}

fn malformed(side: &'static str, what: impl Into<String>) -> PgError {
    PgError::Malformed {
        side,
        what: what.into(),
    }
}

/// Statements waiting for the server's ReadyForQuery, and what the server
/// said about them so far.
#[derive(Default)]
struct Batch {
    /// ParseComplete/BindComplete answers to messages the agent injected
    /// in place of a denied Parse or Execute: swallowed, the client never
    /// sent them. How many, per client batch (see [`State::batches`]).
    swallow: VecDeque<(u64, u32)>,
    /// Statements sent and not yet answered, oldest first.
    pending: VecDeque<Pending>,
    /// ReadyForQuery answers so far: the client batch being answered (see
    /// [`State::batches`]).
    answered: u64,
    /// Index in `pending` of the first statement of that batch whose
    /// answer is not complete.
    answering: usize,
    /// The first error of that batch, and the index it came at: the
    /// statements from there on did not run.
    failed: Option<(usize, String)>,
    /// Client batches closed by a Query or FunctionCall that came after
    /// extended-protocol messages with no Sync between, oldest first, each
    /// with how many of those messages it holds (see [`State::query_closed`]).
    query_closed: VecDeque<(u64, u32)>,
    /// That batch failed in an extended-protocol message: the server skips
    /// everything until the client's next Sync, whose ReadyForQuery
    /// answers every batch up to it.
    to_sync: bool,
    next_seq: u32,
    /// The server skips the client's messages until its next Sync (a
    /// refusal took the place of a Parse or Execute): they neither run
    /// nor bind anything.
    skipping: bool,
    /// ParseCompletes the server sent (for the client's Parses) since its
    /// last ReadyForQuery: which Parses of a failed batch took effect.
    parsed: u32,
    /// Answered statements, encoded as they complete.
    done: Outbox,
    shapes: Shapes,
    /// How the server reads statement text, as it last reported.
    lexing: Lexing,
    /// When the client's current read arrived, once a statement of it
    /// needed to know: statements that came in one read were sent together,
    /// and the clocks are read once for all of them.
    stamp: Option<(u64, Instant)>,
    /// The command tag last seen (see [`Batch::tag`]).
    last_tag: Option<Arc<str>>,
}

/// What an Execute runs (see [`Batch::run_of`]).
struct Run<'a> {
    /// The prepared statement's name, if known.
    name: Option<Arc<str>>,
    /// Its text, as recorded.
    text: Arc<str>,
    class: Arc<Classification>,
    /// Its kept decision (see [`Prepared::decided`]), if it is known.
    decided: Option<&'a mut Memo>,
}

impl Run<'_> {
    /// A run of a statement whose text is not known: `text` says so, and
    /// it is classified `unknown`.
    fn unknown(name: Option<Arc<str>>, text: String) -> Self {
        Run {
            name,
            class: Arc::new(Classification::not_sql(&text, Class::Unknown)),
            text: text.into(),
            decided: None,
        }
    }
}

/// A statement waiting for its batch's ReadyForQuery.
struct Pending {
    st: Statement,
    sent: Instant,
    class: Option<Arc<Classification>>,
    /// The client batch it came in (see [`State::batches`]).
    batch: u64,
    answers: Answers,
}

/// Which of its batch's results (CommandComplete, EmptyQueryResponse,
/// PortalSuspended) are a statement's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answers {
    /// None: a Parse not run in its batch, a Bind, a startup setting, a
    /// function call (whose answer is not a command result).
    Nothing,
    /// The next one: an Execute, or a Parse run in its own batch.
    One,
    /// Every one until ReadyForQuery: a simple Query (each of its
    /// statements has one).
    All,
}

/// Most statements waiting for an answer per connection; past this the
/// oldest is recorded unanswered (a client that never syncs cannot make
/// the agent hold more).
const MAX_PENDING: usize = 10_000;

/// The settings that change where PostgreSQL's scanner ends a literal, as
/// the server reports them in ParameterStatus (`None`: not reported yet).
#[derive(Default)]
struct Lexing {
    /// `standard_conforming_strings`: off, a backslash escapes a quote in
    /// a plain '…' string too.
    standard_strings: Option<bool>,
    /// `client_encoding`.
    encoding: Option<String>,
}

/// Client encodings (all client-only) whose characters can end in a byte
/// below 0x80: the server, decoding them, can swallow a backslash that a
/// UTF-8 reading of the same bytes sees.
const ASCII_SWALLOWING_ENCODINGS: &[&str] = &[
    "BIG5",
    "GB18030",
    "GBK",
    "JOHAB",
    "SJIS",
    "SHIFT_JIS_2004",
    "UHC",
];

/// One connection's protocol state, owned by its two machines (the relay
/// loop drives both, one at a time): no lock. What it asks of the agent
/// goes through its [`Gate`]; answered statements go to its [`Outbox`].
pub struct State {
    batch: Batch,
    startup: Startup,
    gate: Box<dyn Gate>,
    /// A statement waits for this decision (see [`Verdict::Hold`]).
    held: Option<Ticket>,
    /// NoticeResponses for the client (a statement held: why, and how to
    /// have it approved), sent at the next boundary between the server's
    /// messages.
    notices: BytesMut,
    /// Batches the client has closed (its startup packet, each Sync, Query
    /// and FunctionCall, each answered by one ReadyForQuery): which batch
    /// its messages belong to.
    batches: u64,
}

impl Default for State {
    /// A connection nothing decides, recorded into an outbox of its own.
    fn default() -> Self {
        State::new(Box::new(crate::seam::Open), Outbox::default())
    }
}

/// How each column of the rows now arriving is masked (`None`: as is), and
/// how its type writes a masked value; empty means every column (rows whose
/// shape was never seen: fail closed).
type Plan = Arc<Vec<Option<(crate::seam::ColumnMask, types::Form)>>>;

/// What a Describe asked about.
enum Described {
    Statement(String),
    Portal(String),
}

/// Most prepared statements and portals remembered for masking; past this
/// the maps are cleared and rows of forgotten ones are masked whole.
const MAX_NAMES: usize = 10_000;

/// Extended-protocol bookkeeping, so rows of a prepared statement executed
/// without a fresh RowDescription are still masked by their columns.
#[derive(Default)]
struct Shapes {
    describes: VecDeque<Described>,
    executes: VecDeque<String>,
    portal_stmt: HashMap<String, String>,
    stmts: HashMap<String, Prepared>,
    /// Bytes of statement text held in `stmts`.
    stmt_bytes: usize,
    stmt_cols: HashMap<String, Arc<Vec<Column>>>,
    portal_cols: HashMap<String, Arc<Vec<Column>>>,
    /// Plan of the rows now arriving, once known.
    plan: Option<Plan>,
    /// Results (CommandComplete, EmptyQueryResponse) since ReadyForQuery:
    /// which statement of a simple query the next rows belong to.
    results: usize,
}

/// A statement the server holds (its Parse was let through), as its
/// executions are recorded.
struct Prepared {
    /// Its name (shared by the records of its runs).
    name: Arc<str>,
    class: Arc<Classification>,
    /// As recorded (secrets redacted).
    text: Arc<str>,
    /// The batch its Parse came in (see [`State::batches`]), until
    /// an Execute in that batch: the Parse's record stands for that first
    /// run.
    first_run: Option<u64>,
    /// The decision on its runs, and the policy that made it: runs under
    /// the same policy are not decided again.
    decided: Memo,
}

/// Most statement text remembered for recording executions, per
/// connection; past this the statements are forgotten (their executions
/// are recorded as of an unknown statement).
const MAX_STMT_BYTES: usize = 8 << 20;

impl Shapes {
    /// The server now holds `p` as `name` (a Parse let through).
    fn prepared(&mut self, name: &str, p: Prepared) {
        if !self.stmt_cols.is_empty() {
            self.stmt_cols.remove(name); // (masking only: empty otherwise)
        }
        self.stmt_bytes += p.text.len();
        if self.stmt_bytes > MAX_STMT_BYTES {
            self.stmts.clear();
            self.stmt_bytes = p.text.len();
        }
        if let Some(old) = self.stmts.get_mut(name) {
            self.stmt_bytes -= old.text.len();
            *old = p;
            return;
        }
        if self.stmts.len() >= MAX_NAMES {
            self.stmts.clear();
            self.stmt_bytes = p.text.len();
        }
        self.stmts.insert(name.to_owned(), p);
    }

    /// The server does not hold `name` (any more), or not as we knew it.
    fn forget(&mut self, name: &str) {
        if !self.stmt_cols.is_empty() {
            self.stmt_cols.remove(name); // (masking only: empty otherwise)
        }
        if let Some(old) = self.stmts.remove(name) {
            self.stmt_bytes -= old.text.len();
        }
    }

    /// Which statement the server holds under which name is not known.
    fn forget_all(&mut self) {
        self.stmts.clear();
        self.stmt_cols.clear();
        self.stmt_bytes = 0;
    }

    /// Portal `portal` now runs statement `stmt` (a Bind).
    fn bound(&mut self, portal: &str, stmt: &str) {
        if !self.portal_cols.is_empty() {
            self.portal_cols.remove(portal); // (masking only: empty otherwise)
        }
        match self.portal_stmt.get_mut(portal) {
            Some(s) if s == stmt => {}
            Some(s) => stmt.clone_into(s),
            None => bounded_insert(&mut self.portal_stmt, portal.to_owned(), stmt.to_owned()),
        }
    }
}

impl Batch {
    /// What an Execute of `portal` (`None`: unreadable) runs: the name,
    /// text (as recorded) and classification of the statement it was bound
    /// to, or text saying what is not known (classified `unknown`). `None`
    /// for the first run of a statement whose Parse came in this batch: the
    /// Parse was decided and recorded for it.
    fn run_of(&mut self, portal: Option<&str>, batch: u64) -> Option<Run<'_>> {
        let stmt = portal.and_then(|p| self.shapes.portal_stmt.get(p));
        match stmt.map(|n| (n, self.shapes.stmts.get_mut(n))) {
            Some((name, Some(p))) if p.first_run == Some(batch) => {
                p.first_run = None;
                // Its Parse's record takes this run's answer.
                let parse = self.pending.iter_mut().rev().find(|e| {
                    e.batch == batch
                        && e.st.kind == StatementKind::Parse
                        && e.st.name.as_deref() == Some(name)
                });
                if let Some(e) = parse {
                    e.answers = Answers::One;
                }
                None
            }
            Some((_, Some(p))) => {
                p.first_run = None;
                Some(Run {
                    name: Some(p.name.clone()),
                    text: p.text.clone(),
                    class: p.class.clone(),
                    decided: Some(&mut p.decided),
                })
            }
            Some((name, None)) => {
                let text = format!("<execute of statement \"{name}\", whose text is not known>");
                Some(Run::unknown(Some(name.as_str().into()), text))
            }
            None => {
                let text = match portal {
                    Some(p) => format!("<execute of portal \"{p}\", whose statement is not known>"),
                    None => "<execute of an unreadable portal>".to_owned(),
                };
                Some(Run::unknown(None, text))
            }
        }
    }

    /// Numbers `st`, sent in client batch `batch`, and queues it until
    /// that batch's ReadyForQuery.
    fn push(
        &mut self,
        mut st: Statement,
        class: Option<Arc<Classification>>,
        batch: u64,
        answers: Answers,
    ) {
        st.seq = self.next_seq;
        self.next_seq += 1;
        let (at, sent) = *self
            .stamp
            .get_or_insert_with(|| (now_micros(), Instant::now()));
        st.at = at;
        if self.pending.len() >= MAX_PENDING {
            if let Some(oldest) = self.pending.pop_front() {
                self.done.push([&oldest.st]);
                self.answering = self.answering.saturating_sub(1);
                if let Some((at, _)) = &mut self.failed {
                    *at = at.saturating_sub(1);
                }
            }
        }
        self.pending.push_back(Pending {
            st,
            sent,
            class,
            batch,
            answers,
        });
    }

    /// The statement the next result of the batch being answered belongs
    /// to (past those that have none); `None`: one the agent does not
    /// record (or after an error, which ends the batch's results).
    fn answering(&mut self) -> Option<&mut Pending> {
        let batch = self.answered;
        let skip = self
            .pending
            .iter()
            .skip(self.answering)
            .take_while(|e| e.batch == batch)
            .position(|e| e.answers != Answers::Nothing)?;
        self.answering += skip;
        self.pending.get_mut(self.answering)
    }

    /// A result: CommandComplete (with its tag), EmptyQueryResponse or
    /// PortalSuspended.
    fn result(&mut self, tag: Option<&str>) {
        let tag = tag.map(|t| self.tag(t));
        let Some(e) = self.answering() else {
            return;
        };
        if let Some(tag) = tag {
            e.st.rows = tag.rsplit(' ').next().and_then(|n| n.parse().ok());
            e.st.tags.push(tag);
        }
        if e.answers == Answers::One {
            self.answering += 1;
        }
    }

    /// `tag`, shared with the last statement's if it is the same (a
    /// driver running one statement over and over gets the same tag).
    fn tag(&mut self, tag: &str) -> Arc<str> {
        match &self.last_tag {
            Some(t) if **t == *tag => t.clone(),
            _ => self.last_tag.insert(tag.into()).clone(),
        }
    }

    /// An ErrorResponse, after `completed` answers to the batch's
    /// extended-protocol messages: the statement whose answer is due failed
    /// (its Parse, Bind or run), and the rest of its batch does not run.
    fn error(&mut self, code: Option<String>, completed: u32) {
        if self.failed.is_some() {
            return;
        }
        let batch = self.answered;
        // Not all of a Query-closed batch's extended messages were answered:
        // one of them failed, not the Query, which the server skips.
        self.to_sync = self
            .query_closed
            .iter()
            .any(|&(n, extended)| n == batch && completed < extended);
        let at = self.answering;
        if let Some(e) = self.pending.get_mut(at).filter(|e| e.batch == batch) {
            e.st.error = code.clone();
        }
        self.failed = code.map(|c| (at, c));
        // The batch's Parses the server did not complete failed or were
        // skipped: a statement of that name is still what it was before,
        // or nothing, not what the agent saw in the Parse.
        let mut completed = self.parsed;
        let mut lost = Vec::new();
        for e in self.pending.iter().filter(|e| {
            e.batch == batch
                && e.st.kind == StatementKind::Parse
                && e.st.decision != Some(Action::Deny)
        }) {
            if completed > 0 {
                completed -= 1;
            } else if let Some(name) = &e.st.name {
                lost.push(name.clone());
            }
        }
        for name in lost {
            self.shapes.forget(&name);
        }
    }

    /// A ParseComplete or BindComplete: `true` if it answers a message the
    /// agent injected (it does not reach the client).
    fn swallowed(&mut self) -> bool {
        match self.swallow.front_mut() {
            Some((n, count)) if *n == self.answered && *count > 0 => {
                *count -= 1;
                true
            }
            _ => false,
        }
    }

    /// Values masked in the result now arriving.
    fn masked(&mut self, n: u32) {
        if let Some(e) = self.answering() {
            e.st.masked += n;
        }
    }
}

fn bounded_insert<V>(map: &mut HashMap<String, V>, k: String, v: V) {
    if map.len() >= MAX_NAMES && !map.contains_key(&k) {
        map.clear();
    }
    map.insert(k, v);
}

impl State {
    /// A connection whose statements `gate` decides, recorded into `outbox`.
    pub fn new(gate: Box<dyn Gate>, outbox: Outbox) -> Self {
        State {
            batch: Batch {
                done: outbox,
                ..Batch::default()
            },
            startup: Startup::default(),
            gate,
            held: None,
            notices: BytesMut::new(),
            batches: 0,
        }
    }

    /// Where its answered statements go.
    pub fn outbox(&self) -> &Outbox {
        &self.batch.done
    }

    /// A message of the client's waits for a decision.
    pub fn holding(&self) -> bool {
        self.held.is_some()
    }

    /// A statement is held; held just now, its client is told why (a
    /// notice).
    #[cold]
    fn held(&mut self, told: Option<Arc<str>>) -> Held {
        if let Some(text) = told {
            self.notices.extend_from_slice(&notice(&text));
        }
        Held
    }

    /// Notices waiting for the client (see [`State::told`]), taken.
    pub(super) fn take_notices(&mut self) -> Option<BytesMut> {
        (!self.notices.is_empty()).then(|| self.notices.split())
    }

    /// What the startup message said.
    pub fn startup(&mut self) -> &mut Startup {
        &mut self.startup
    }

    /// What the policy in force says of this connection.
    pub(super) fn flags(&mut self) -> Flags {
        self.gate.flags()
    }

    /// Classifies, decides and records a statement; the decision if it is
    /// not allowed, or that it is held (then nothing of it is recorded or
    /// remembered yet: it is seen again once decided).
    fn statement(
        &mut self,
        kind: StatementKind,
        name: Option<Arc<str>>,
        text: &str,
        class: Option<Classified>,
    ) -> Result<Option<Decision>, Held> {
        let Classified { class: c, plain } = class.unwrap_or_else(|| self.classified(text));
        let holdable = kind != StatementKind::Startup;
        let seen = Seen {
            kind,
            text,
            class: &c,
            memo: None,
        };
        let decided = decide(&mut *self.gate, &mut self.held, seen, holdable);
        let Parts {
            action,
            rule,
            approval,
            refused,
        } = decided.parts().map_err(|notice| self.held(notice))?;
        let limit = self.batch.done.text_limit();
        let (recorded, whole) = match plain {
            true if text.len() <= limit => (Arc::<str>::from(text), None),
            true => Whole::cut(text.to_owned(), limit),
            false => Whole::cut(crate::redact::redact_sql(text), limit),
        };
        // A Parse names the statement the server will hold (none: the
        // Parse was too large to read its name).
        let prepared = (kind == StatementKind::Parse).then(|| name.clone());
        let st = Statement {
            tables: c.tables.clone(),
            decision: action,
            rule,
            whole,
            approval,
            ..Statement::new(kind, name, recorded, c.class)
        };
        let batches = self.batches;
        let b = &mut self.batch;
        if b.skipping {
            // The server does not prepare it (nor is a refusal's unnamed
            // statement any different).
        } else if let Some(Some(stmt)) = prepared {
            match refused {
                None => {
                    let p = Prepared {
                        name: stmt.clone(),
                        class: c.clone(),
                        text: st.text.clone(),
                        first_run: Some(batches),
                        decided: Memo::default(),
                    };
                    b.shapes.prepared(&stmt, p);
                }
                // The server gets the refusal as its unnamed statement.
                Some(_) => {
                    b.shapes.forget(&stmt);
                    b.shapes.forget("");
                }
            }
        } else if prepared.is_some() {
            b.shapes.forget_all();
        }
        if refused.is_none() && !b.skipping {
            // SQL that redefines or drops prepared statements (PREPARE,
            // DEALLOCATE, DISCARD ALL) shares the protocol's names: what
            // the agent knew of them no longer holds.
            if c.forgets.all {
                b.shapes.forget_all();
            }
            for name in &c.forgets.names {
                b.shapes.forget(name);
            }
        }
        let answers = if kind == StatementKind::Query {
            Answers::All
        } else {
            Answers::Nothing
        };
        b.push(st, Some(c), batches, answers);
        if matches!(kind, StatementKind::Query | StatementKind::Function) {
            // A ReadyForQuery answers it alone.
            self.batch_closed();
        }
        Ok(refused)
    }

    /// Records a startup packet refused whatever the policy says (it
    /// cannot be read as the server reads it); the refusal.
    fn refused_startup(&mut self, text: &str) -> Decision {
        let d = Decision::new(Action::Deny, RULE_UNREADABLE_STARTUP.into());
        let st = Statement {
            decision: Some(Action::Deny),
            rule: Some(d.rule.clone()),
            error: Some("42501".into()),
            ..Statement::new(StatementKind::Startup, None, text.into(), Class::Unknown)
        };
        self.batch.push(st, None, self.batches, Answers::Nothing);
        d
    }

    /// An Execute of `portal` (`None`: unreadable): decided under the
    /// policy now in force as the statement it runs (a policy reloaded
    /// since the Parse applies), and recorded as a run of it (see
    /// [`Batch::run_of`]). The decision if it is not allowed, or that it
    /// is held (nothing of it is kept then: it is seen again once decided).
    fn executed(&mut self, portal: Option<&str>, masking: bool) -> Result<Option<Decision>, Held> {
        if self.batch.skipping {
            return Ok(None); // the server does not run it
        }
        let batches = self.batches;
        // (Taking the run of an Execute seen again after a hold finds it
        // as the first time: only a first run, which is not decided,
        // changes what is known.)
        let Some(Run {
            name,
            text,
            class: c,
            decided,
        }) = self.batch.run_of(portal, batches)
        else {
            if let (true, Some(portal)) = (masking, portal) {
                // Its rows come next.
                self.batch.shapes.executes.push_back(portal.into());
            }
            return Ok(None);
        };
        let seen = Seen {
            kind: StatementKind::Execute,
            text: &text,
            class: &c,
            memo: decided,
        };
        let decided = decide(&mut *self.gate, &mut self.held, seen, true);
        let Parts {
            action,
            rule,
            approval,
            refused,
        } = decided.parts().map_err(|notice| self.held(notice))?;
        let b = &mut self.batch;
        if let (true, Some(portal)) = (masking, portal) {
            // Its rows come next.
            b.shapes.executes.push_back(portal.into());
        }
        if refused.is_some() {
            // The refusal takes the unnamed statement and portal.
            b.shapes.forget("");
            b.shapes.bound("", "");
        }
        let st = Statement {
            tables: c.tables.clone(),
            decision: action,
            rule,
            approval,
            ..Statement::new(StatementKind::Execute, name, text, c.class)
        };
        b.push(st, Some(c), batches, Answers::One);
        Ok(refused)
    }

    /// Classification of `text` (by the gate), read as the server reads it
    /// now.
    pub(super) fn classified(&mut self, text: &str) -> Classified {
        let reading = self.lexing_doubt(text);
        self.gate.classify(text, reading)
    }

    /// How the server reads `text` now, or why that is not certain: a
    /// backslash before the server said whether plain strings are
    /// standard, non-ASCII text unless the client encoding is known to be
    /// safe, and either while an earlier statement (which could change
    /// those settings, even from inside a function) is still unanswered.
    /// Such text is `unknown`: the most restricted class.
    fn lexing_doubt(&self, text: &str) -> Result<Dialect, String> {
        let backslash = text.contains('\\');
        let non_ascii = !text.is_ascii();
        if !backslash && !non_ascii {
            // Plain ASCII without backslashes reads the same whatever the
            // settings.
            return Ok(Dialect::default());
        }
        let b = &self.batch;
        let dialect = Dialect {
            standard_strings: b.lexing.standard_strings != Some(false),
        };
        let what = if backslash {
            "a backslash"
        } else {
            "non-ASCII text"
        };
        if !b.pending.is_empty() {
            return Err(format!(
                "{what} while an earlier statement, which may change how the server reads it, is unanswered"
            ));
        }
        if backslash && b.lexing.standard_strings.is_none() {
            return Err(
                "a backslash before the server said whether standard_conforming_strings is on"
                    .into(),
            );
        }
        match &b.lexing.encoding {
            _ if !non_ascii => Ok(dialect),
            None => Err("non-ASCII text before the server named the client encoding".into()),
            Some(e) if ASCII_SWALLOWING_ENCODINGS.contains(&e.as_str()) => {
                Err(format!("non-ASCII text in client encoding {e}"))
            }
            Some(_) => Ok(dialect),
        }
    }

    /// ParameterStatus: the settings that change how statements are read.
    fn parameter_status(&mut self, body: &[u8]) {
        let Some(message::ParameterStatus { name, value }) = message::ParameterStatus::read(body)
        else {
            return;
        };
        let l = &mut self.batch.lexing;
        let before = (l.standard_strings, l.encoding.clone());
        match name {
            "standard_conforming_strings" => l.standard_strings = Some(value == "on"),
            "client_encoding" => l.encoding = Some(value.to_ascii_uppercase()),
            _ => return,
        }
        if (l.standard_strings, l.encoding.clone()) != before {
            // Classifications made under the old reading no longer hold.
            self.gate.reading_changed();
        }
    }

    /// ReadyForQuery: everything pending is complete.
    fn ready(&mut self) {
        let batches = self.batches;
        let b = &mut self.batch;
        b.shapes.describes.clear();
        b.shapes.executes.clear();
        b.shapes.plan = None;
        let now = Instant::now();
        b.shapes.results = 0;
        b.parsed = 0;
        let failed = b.failed.take();
        let mut batch = b.answered;
        if std::mem::take(&mut b.to_sync) {
            // The server skipped to the client's next Sync: the batches
            // closed by Queries or FunctionCalls until then are answered
            // here, and did not run.
            while b.query_closed.iter().any(|&(n, _)| n == batch + 1) {
                batch += 1;
            }
            batch = (batch + 1).min(batches.saturating_sub(1));
        }
        while b.query_closed.front().is_some_and(|&(n, _)| n <= batch) {
            b.query_closed.pop_front();
        }
        let Batch { pending, done, .. } = b;
        let answered = pending.iter().take_while(|e| e.batch <= batch).count();
        for (k, e) in pending.iter_mut().take(answered).enumerate() {
            e.st.duration_us = Some(now.duration_since(e.sent).as_micros() as u64);
            // What came after the error did not run: the error is theirs too.
            if let Some((at, code)) = &failed {
                if k >= *at && e.st.error.is_none() {
                    e.st.error = Some(code.clone());
                }
            }
        }
        // Encoded here and freed on this thread (see `Records`), where
        // they lie.
        done.push(pending.iter().take(answered).map(|e| &e.st));
        pending.drain(..answered);
        // What the server skipped after an error is not coming.
        while b.swallow.front().is_some_and(|(n, _)| *n <= batch) {
            b.swallow.pop_front();
        }
        b.answered = batch + 1;
        b.answering = 0;
    }

    /// The client's next read begins: its statements get a time of their own.
    fn client_read(&mut self) {
        self.batch.stamp = None;
    }

    /// Records a Bind with its parameter values.
    fn bind(&mut self, body: &[u8]) {
        let Some(bind) = message::Bind::read(body) else {
            return;
        };
        let Some(params) = bind.parameters() else {
            return;
        };
        let stmt = bind.statement;
        let b = &mut self.batch;
        let class = b
            .shapes
            .stmts
            .get(stmt)
            .map_or(Class::Unknown, |p| p.class.class);
        let text = format!("<bind to statement \"{stmt}\">");
        b.push(
            Statement {
                parameters: Some(params),
                ..Statement::new(StatementKind::Bind, Some(stmt.into()), text.into(), class)
            },
            None,
            self.batches,
            Answers::Nothing,
        );
    }

    /// How the rows of statement `k` of `class` (unknown: every rule may
    /// apply) with columns `cols` are masked; `None`: not at all.
    fn plan_for(
        &mut self,
        cols: Option<&[Column]>,
        class: Option<&Classification>,
        k: usize,
    ) -> Option<Plan> {
        let Some(cols) = cols else {
            // Rows whose columns we never saw: mask every value (fail closed).
            return Some(Arc::new(Vec::new()));
        };
        let shape: Vec<Col<'_>> = cols
            .iter()
            .map(|c| Col {
                name: &c.name,
                type_name: types::name_of(c.type_oid),
            })
            .collect();
        let masks = self.gate.result_shape(&shape, class, k)?;
        Some(Arc::new(
            masks
                .into_iter()
                .zip(cols)
                .map(|(m, c)| m.map(|m| (m, types::Form::of(c.type_oid))))
                .collect(),
        ))
    }

    /// Backend side of masking: learns row shapes from RowDescription and
    /// NoData, ends a result on PortalSuspended/EmptyQueryResponse, and
    /// returns a DataRow rewritten when any of its columns is masked.
    fn shape_message(&mut self, ty: BackendCode, body: &[u8]) -> Result<Option<BytesMut>, PgError> {
        match ty {
            BackendCode::RowDescription => {
                let cols = Arc::new(parse_row_description(body)?);
                let b = &mut self.batch;
                match b.shapes.describes.pop_front() {
                    Some(Described::Statement(n)) => {
                        bounded_insert(&mut b.shapes.stmt_cols, n, cols)
                    }
                    Some(Described::Portal(p)) => {
                        // The columns are the statement's too: a driver
                        // that describes a portal once runs the statement
                        // later through fresh portals it never describes.
                        if let Some(stmt) = b.shapes.portal_stmt.get(&p).cloned() {
                            bounded_insert(&mut b.shapes.stmt_cols, stmt, cols.clone());
                        }
                        bounded_insert(&mut b.shapes.portal_cols, p, cols)
                    }
                    None => {
                        // A simple query: rows of its statement that the
                        // results so far say is running follow now.
                        let class = b
                            .pending
                            .iter()
                            .find(|e| e.st.kind == StatementKind::Query)
                            .and_then(|e| e.class.clone());
                        let k = b.shapes.results;
                        let plan = self.plan_for(Some(&cols), class.as_deref(), k);
                        self.batch.shapes.plan = Some(plan.unwrap_or_else(nothing_masked));
                    }
                }
                Ok(None)
            }
            BackendCode::NoData => {
                self.batch.shapes.describes.pop_front();
                Ok(None)
            }
            BackendCode::PortalSuspended | BackendCode::EmptyQueryResponse => {
                let b = &mut self.batch;
                b.result(None);
                b.shapes.plan = None;
                b.shapes.executes.pop_front();
                b.shapes.results += usize::from(ty == BackendCode::EmptyQueryResponse);
                Ok(None)
            }
            _ => {
                let plan = match self.batch.shapes.plan.clone() {
                    Some(p) => Some(p),
                    None => {
                        let sh = &self.batch.shapes;
                        let (cols, class) = match sh.executes.front() {
                            Some(portal) => {
                                let stmt = sh.portal_stmt.get(portal);
                                let cols = sh
                                    .portal_cols
                                    .get(portal)
                                    .or_else(|| stmt.and_then(|s| sh.stmt_cols.get(s)))
                                    .cloned();
                                (
                                    cols,
                                    stmt.and_then(|s| sh.stmts.get(s)).map(|p| p.class.clone()),
                                )
                            }
                            None => (None, None),
                        };
                        let plan =
                            self.plan_for(cols.as_deref().map(|c| &c[..]), class.as_deref(), 0);
                        // Remember it for the rest of this result.
                        self.batch.shapes.plan = Some(plan.clone().unwrap_or_else(nothing_masked));
                        plan
                    }
                };
                let Some(plan) = plan.filter(|p| p.is_empty() || p.iter().any(Option::is_some))
                else {
                    return Ok(None);
                };
                let (row, masked) = mask_row(body, &plan, &*self.gate)?;
                self.batch.masked(masked);
                Ok(Some(row))
            }
        }
    }

    /// An ErrorResponse or NoticeResponse (`ty`) with the fields that can
    /// echo values (message, detail, hint, context, internal query) hidden,
    /// when a mask rule applies to the statement it answers (to any
    /// statement, when none is waiting); `None`: passed on as it is. The
    /// agent's own refusals pass.
    fn mask_message(&mut self, ty: BackendCode, body: &[u8]) -> Option<BytesMut> {
        // The statements of the batch being answered that have not had all
        // their answers: the message is about one of them.
        let classes: Vec<Option<Arc<Classification>>> = {
            let b = &self.batch;
            let batch = b.answered;
            b.pending
                .iter()
                .skip(b.answering)
                .take_while(|e| e.batch == batch)
                .map(|e| e.class.clone())
                .collect()
        };
        let rule = self.gate.message_rule(&classes)?;
        let fields = Fields::all(body)?;
        let own = fields.iter().any(|&(code, v)| {
            code == b'M'
                && v.strip_prefix("interceptor: statement denied by rule \"")
                    .and_then(|r| r.strip_suffix('"'))
                    .is_some_and(|id| self.gate.names_rule(id))
        });
        if own {
            return None;
        }
        let mut out = Vec::with_capacity(body.len());
        for (code, value) in fields {
            let value = match code {
                b'M' => format!(
                    "interceptor: the server's message is hidden: mask rule \"{rule}\" applies to this statement"
                ),
                b'D' | b'H' | b'W' | b'q' => continue,
                _ => value.to_owned(),
            };
            out.push(code);
            out.extend_from_slice(value.as_bytes());
            out.push(0);
        }
        out.push(0);
        let mut msg = BytesMut::with_capacity(out.len() + 5);
        put_message(&mut msg, ty.byte(), &out);
        Some(msg)
    }

    /// Frontend bookkeeping of Bind, Execute and Close (which statement
    /// each portal runs; each execution recorded) and, for masking, of
    /// Describe and Execute (whose rows arrive next).
    /// The decision on an Execute that is not allowed, or that it is held.
    fn note_frontend(
        &mut self,
        ty: FrontendCode,
        body: &[u8],
        masking: bool,
    ) -> Result<Option<Decision>, Held> {
        if ty == FrontendCode::Execute {
            let portal = message::Execute::read(body).map(|e| e.portal);
            return self.executed(portal, masking);
        }
        let b = &mut self.batch;
        if b.skipping {
            return Ok(None); // the server does not bind or close it
        }
        match ty {
            FrontendCode::Bind => {
                if let Some(bind) = message::Bind::read(body) {
                    b.shapes.bound(bind.portal, bind.statement);
                }
            }
            FrontendCode::Close => {
                let closed = message::Named::read(body).map(|n| (n.closes(), n.name));
                match closed {
                    Some((Some(message::Object::Statement), name)) => b.shapes.forget(name),
                    Some((Some(message::Object::Portal), name)) => {
                        b.shapes.portal_stmt.remove(name);
                        b.shapes.portal_cols.remove(name);
                    }
                    _ => {}
                }
            }
            FrontendCode::Describe if masking => {
                if let Some(d) = message::Named::read(body) {
                    b.shapes.describes.push_back(match d.describes() {
                        message::Object::Statement => Described::Statement(d.name.into()),
                        message::Object::Portal => Described::Portal(d.name.into()),
                    });
                }
            }
            _ => {}
        }
        Ok(None)
    }

    /// The client sent Sync (`refused`: a refusal came since the last).
    fn synced(&mut self, refused: bool) {
        self.batch_closed();
        if refused {
            // The server reads its messages again.
            self.batch.skipping = false;
        }
    }

    /// The Query or FunctionCall just handled closed a batch that holds
    /// `extended` extended-protocol messages, with no Sync since some were
    /// sent. Should one of them fail, the server skips the Query until the
    /// client's next Sync, and so answers these batches with one
    /// ReadyForQuery (see [`Batch::error`]).
    fn query_closed(&mut self, extended: u32) {
        let batch = self.batches.saturating_sub(1);
        let b = &mut self.batch;
        if b.query_closed.len() >= MAX_PENDING {
            b.query_closed.pop_front();
        }
        b.query_closed.push_back((batch, extended));
    }

    /// The client's message just handled ends its batch: a ReadyForQuery
    /// will answer it.
    fn batch_closed(&mut self) {
        self.batches += 1;
    }

    /// A Bind or Close too large to inspect went by: which statement any
    /// portal runs is no longer known (nor, for masking, its columns).
    fn portals_unknown(&mut self) {
        let b = &mut self.batch;
        b.shapes.portal_stmt.clear();
        b.shapes.portal_cols.clear();
    }

    /// The connection is over: what is still waiting for an answer is
    /// recorded as it stands, and so is what the startup said.
    pub fn ended(&mut self) {
        let b = &mut self.batch;
        b.done.push(b.pending.iter().map(|e| &e.st));
        b.pending.clear();
        b.done.set_facts(FACTS, &self.startup);
    }

    /// Statements answered since the last take (decoded from the outbox).
    pub fn take_done(&self) -> Vec<Statement> {
        self.batch.done.take_statements()
    }
}

/// A statement's message waits for a decision (see [`Verdict::Hold`]).
#[derive(Debug)]
pub(super) struct Held;

fn parse_startup(body: &[u8], st: &mut Startup) -> Result<(), PgError> {
    for parameter in message::StartupParameters::of(body) {
        let (k, v) = parameter.map_err(|what| malformed("client", what))?;
        match k {
            "user" => st.user = Some(v.into()),
            "database" => st.database = Some(v.into()),
            "application_name" => st.application_name = Some(v.into()),
            "replication" => st.replication = replication_asked(v),
            "options" => match server_options(v) {
                Ok(settings) => {
                    for (name, value) in settings {
                        guarded_setting(st, &name, &value);
                    }
                }
                Err(why) => {
                    st.unreadable.get_or_insert(format!("options {v:?}: {why}"));
                }
            },
            other => guarded_setting(st, other, v),
        }
    }
    Ok(())
}

/// Settings a statement would need policy for: changing them at startup
/// is the same as running `SET` first.
const GUARDED_SETTINGS: &[&str] = &[
    "role",
    "session_authorization",
    "search_path",
    "session_replication_role",
];

fn guarded_setting(st: &mut Startup, name: &str, value: &str) {
    // The server looks setting names up without regard to case.
    let name = name.to_ascii_lowercase().replace('-', "_");
    if GUARDED_SETTINGS.contains(&name.as_str()) {
        st.settings
            .push(format!("SET {name} = '{}'", value.replace('\'', "''")));
    }
}

/// Whether a `replication` startup parameter asks for a replication
/// connection: anything but a value the server reads as false (its
/// boolean parser takes unique prefixes of `false`, `no` and `off`, and
/// `0`) does, `database` and values the server rejects included.
fn replication_asked(value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    let prefix_of = |word: &str| !v.is_empty() && word.starts_with(v.as_str());
    !(prefix_of("false") || prefix_of("no") || v == "of" || v == "off" || v == "0")
}

/// The whitespace the server splits `options` on (C's `isspace` in the C
/// locale).
fn option_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// The settings the startup `options` parameter makes, read as the server
/// reads it: split at unescaped whitespace (`\` escapes the next byte),
/// then command-line switches as `getopt` takes them (bundled flags,
/// `-cname=value`, `-c name=value`, `--name=value`; `-` in a name is `_`).
/// Anything the server would not take as switches is an error (the server
/// refuses such a login too), and so is anything outside printable ASCII
/// and those spaces: a byte whose reading depends on the server's locale
/// is not guessed at.
fn server_options(options: &str) -> Result<Vec<(String, String)>, String> {
    if let Some(b) = options
        .bytes()
        .find(|&b| !(b.is_ascii_graphic() || option_space(b)))
    {
        return Err(format!(
            "byte 0x{b:02x} is not read the same on every server"
        ));
    }
    // pg_split_opts.
    let mut words = Vec::new();
    let mut bytes = options.bytes().peekable();
    loop {
        while bytes.next_if(|&b| option_space(b)).is_some() {}
        if bytes.peek().is_none() {
            break;
        }
        let mut word = Vec::new();
        let mut escaped = false;
        while let Some(&b) = bytes.peek() {
            if option_space(b) && !escaped {
                break;
            }
            bytes.next();
            if !escaped && b == b'\\' {
                escaped = true;
            } else {
                escaped = false;
                word.push(b);
            }
        }
        words.push(String::from_utf8(word).map_err(|_| "not UTF-8".to_owned())?);
    }
    // getopt over process_postgres_switches' switches: letters followed by
    // ':' take a value.
    const SWITCHES: &str = "B:bC:c:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:";
    let mut out = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let Some(flags) = word
            .strip_prefix('-')
            .filter(|f| !f.is_empty() && *f != "-")
        else {
            return Err(format!("`{word}` is not a switch"));
        };
        for (at, c) in flags.char_indices() {
            let Some(spec) = SWITCHES.find(c).filter(|_| c != ':') else {
                return Err(format!("-{c} is not a switch the server knows"));
            };
            if !SWITCHES[spec + 1..].starts_with(':') {
                continue;
            }
            let rest = &flags[at + c.len_utf8()..];
            let value = if rest.is_empty() {
                words.next().ok_or_else(|| format!("-{c} needs a value"))?
            } else {
                rest.to_owned()
            };
            if matches!(c, 'c' | '-') {
                let (name, value) = value
                    .split_once('=')
                    .ok_or_else(|| format!("-{c} {value}: a setting needs a value"))?;
                out.push((name.replace('-', "_"), value.to_owned()));
            }
            break;
        }
    }
    Ok(out)
}

/// SQL that makes the server itself raise the refusal (SQLSTATE 42501), so
/// the error, the transaction state and the skip-until-Sync that follow are
/// exactly the server's own.
pub fn refusal_sql(d: &Decision) -> String {
    // Rule ids are plain names (letters, digits, `-_.`): safe inside quotes.
    let (because, hint) = match &d.via {
        None => (
            String::new(),
            "ask the owners of the interceptor policy".to_owned(),
        ),
        Some(v) => {
            let (id, why) = (plain_text(&v.request), plain_text(&v.why));
            (
                format!(" (request {id}: {why})"),
                format!("see it with: interceptor approvals show {id}"),
            )
        }
    };
    format!(
        "DO $interceptor$ BEGIN RAISE EXCEPTION USING ERRCODE = '42501', \
         MESSAGE = 'interceptor: statement denied by rule \"{}\"{because}', \
         HINT = '{hint}'; END $interceptor$",
        d.rule
    )
}

/// `text` with only characters that are inert inside a quoted literal of
/// the refusal's dollar-quoted block (no quote, no `$`, no backslash, no
/// control character): others become `?`. (A reason may carry words the
/// agent did not write, a person's name say.)
fn plain_text(text: &str) -> String {
    text.chars()
        .take(300)
        .map(|c| match c {
            c if c.is_alphanumeric() => c,
            ' ' | '.' | ',' | ':' | ';' | '-' | '_' | '@' | '(' | ')' | '/' | '=' | '+' => c,
            _ => '?',
        })
        .collect()
}

/// The ErrorResponse that refuses a startup setting (SQLSTATE 42501).
fn startup_refusal(d: &Decision, setting: &str) -> BytesMut {
    fatal(
        "42501",
        &format!(
            "interceptor: startup setting denied by rule \"{}\": {setting}",
            d.rule
        ),
    )
}

/// A FATAL ErrorResponse with SQLSTATE `code` and `message`: how a
/// server refuses a login.
pub fn fatal(code: &str, message: &str) -> BytesMut {
    let mut body = Vec::new();
    for (field, text) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(text.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = BytesMut::new();
    put_message(&mut out, BackendCode::ErrorResponse.byte(), &body);
    out
}

/// A NoticeResponse saying `message` (SQLSTATE 00000): psql and the
/// drivers show or log it, whatever they are waiting for.
fn notice(message: &str) -> BytesMut {
    let mut body = Vec::new();
    for (field, text) in [
        (b'S', "NOTICE"),
        (b'V', "NOTICE"),
        (b'C', "00000"),
        (b'M', message),
    ] {
        body.push(field);
        body.extend(text.bytes().filter(|&b| b != 0));
        body.push(0);
    }
    body.push(0);
    let mut out = BytesMut::new();
    put_message(&mut out, BackendCode::NoticeResponse.byte(), &body);
    out
}

/// What a client's first frame is, to an agent that answers it with a
/// refusal (a [`fatal`] error).
#[derive(Debug, PartialEq, Eq)]
pub enum FirstFrame {
    /// Not whole yet.
    Partial,
    /// An SSLRequest or GSSENCRequest of `len` bytes, to be declined (`N`)
    /// before the client goes on.
    Encryption { len: usize },
    /// A startup packet, to be answered with the refusal.
    Startup,
    /// A CancelRequest, or anything malformed: nothing to answer.
    Other,
}

/// Reads the frame a client opens with (see [`FirstFrame`]).
pub fn first_frame(input: &[u8]) -> FirstFrame {
    let Some(head) = input.get(..4) else {
        return FirstFrame::Partial;
    };
    let len = be32(head) as usize;
    if !(8..=MAX_STARTUP).contains(&len) {
        return FirstFrame::Other;
    }
    let Some(frame) = input.get(..len) else {
        return FirstFrame::Partial;
    };
    match be32(&frame[4..8]) {
        SSL_REQUEST | GSSENC_REQUEST if len == 8 => FirstFrame::Encryption { len },
        v if v >> 16 == 3 => FirstFrame::Startup,
        _ => FirstFrame::Other,
    }
}

/// Appends a typed message (`ty`, its length, `body`) to `out`.
pub fn put_message(out: &mut BytesMut, ty: u8, body: &[u8]) {
    out.put_u8(ty);
    out.put_u32(4 + body.len() as u32);
    out.put_slice(body);
}

/// What goes to the server instead of a denied message: a simple Query in
/// place of a Query or FunctionCall (answered by ErrorResponse and
/// ReadyForQuery, as theirs would be); in place of a Parse or an Execute,
/// an unnamed Parse, Bind and Execute of the same, whose ParseComplete and
/// BindComplete are swallowed, so the client sees the error where its
/// message failed and the server skips to Sync on its own.
fn refusal(ty: FrontendCode, d: &Decision, state: &mut State) -> BytesMut {
    let sql = refusal_sql(d);
    let mut out = BytesMut::new();
    if matches!(ty, FrontendCode::Parse | FrontendCode::Execute) {
        let mut parse = Vec::with_capacity(sql.len() + 8);
        parse.push(0); // unnamed statement
        parse.extend_from_slice(sql.as_bytes());
        parse.extend_from_slice(&[0, 0, 0]); // NUL, no parameter types
        put_message(&mut out, FrontendCode::Parse.byte(), &parse);
        // portal "", statement "", no formats, no parameters, no result formats
        put_message(
            &mut out,
            FrontendCode::Bind.byte(),
            &[0, 0, 0, 0, 0, 0, 0, 0],
        );
        put_message(&mut out, FrontendCode::Execute.byte(), &[0, 0, 0, 0, 0]);
        let batch = state.batches;
        let b = &mut state.batch;
        match b.swallow.back_mut() {
            Some((n, count)) if *n == batch => *count += 2,
            _ => b.swallow.push_back((batch, 2)),
        }
        b.skipping = true;
    } else {
        let mut q = sql.into_bytes();
        q.push(0);
        put_message(&mut out, FrontendCode::Query.byte(), &q);
    }
    out
}

/// A plan that masks nothing (one unmasked column; rows are left as they are).
fn nothing_masked() -> Plan {
    Arc::new(vec![None])
}

/// Column names and type OIDs of a RowDescription.
fn parse_row_description(body: &[u8]) -> Result<Vec<Column>, PgError> {
    message::row_description(body).ok_or_else(|| malformed("server", "malformed RowDescription"))
}

/// A DataRow with the planned columns masked: text-like values by their
/// strategy, others as NULL. Returns the new frame and how many values
/// were masked.
fn mask_row(
    body: &[u8],
    plan: &[Option<(crate::seam::ColumnMask, types::Form)>],
    gate: &dyn Gate,
) -> Result<(BytesMut, u32), PgError> {
    let bad = || malformed("server", "malformed DataRow");
    let mut row = message::DataRow::read(body).ok_or_else(bad)?;
    let mut out = BytesMut::with_capacity(body.len() + 16);
    out.put_u8(BackendCode::DataRow.byte());
    out.put_u32(0); // length, set below
    out.put_u16(row.len() as u16);
    let mut masked = 0;
    for (i, value) in (&mut row).enumerate() {
        let column = if plan.is_empty() {
            Some(None) // every column, as NULL
        } else {
            plan.get(i).and_then(Option::as_ref).map(Some)
        };
        match (value, column) {
            (Some(_), Some(None)) => {
                masked += 1;
                out.put_i32(-1);
            }
            (Some(v), Some(Some((how, form)))) => {
                masked += 1;
                let value = match form {
                    types::Form::Null => None,
                    _ => form.write(gate.mask(how, v)),
                };
                match value {
                    Some(new) => {
                        out.put_i32(new.len() as i32);
                        out.put_slice(&new);
                    }
                    None => out.put_i32(-1),
                }
            }
            (Some(v), None) => {
                out.put_i32(v.len() as i32);
                out.put_slice(v);
            }
            (None, _) => out.put_i32(-1),
        }
    }
    if !row.whole() {
        return Err(bad());
    }
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    Ok((out, masked))
}

/// The SQLSTATE (`C` field) of an ErrorResponse body.
fn error_code(body: &[u8]) -> Option<String> {
    Fields::of(body).code().map(Into::into)
}

/// An AuthenticationSASL message offering `mechanisms` but the `*-PLUS`
/// ones (channel binding cannot survive a proxy).
fn without_channel_binding(mechanisms: &[&str]) -> BytesMut {
    let mechs: Vec<&str> = mechanisms
        .iter()
        .copied()
        .filter(|m| !m.ends_with("-PLUS"))
        .collect();
    let len = 4 + 4 + mechs.iter().map(|m| m.len() + 1).sum::<usize>() + 1;
    let mut out = BytesMut::with_capacity(1 + len);
    out.put_u8(BackendCode::Authentication.byte());
    out.put_u32(len as u32);
    out.put_u32(AUTH_SASL);
    for m in mechs {
        out.put_slice(m.as_bytes());
        out.put_u8(0);
    }
    out.put_u8(0);
    out
}

#[cfg(test)]
mod tests {
    use super::testing::{frame as msg, *};
    use super::*;

    /// Every prefix of a startup, SSL, GSS or cancel request is `None`
    /// until its eighth byte says `Some(true)`; other first bytes say
    /// `Some(false)` as soon as they can.
    #[test]
    fn what_opens_a_session_is_told_from_its_first_bytes() {
        let mut startup = vec![0, 0, 0, 0, 0, 3, 0, 0];
        startup.extend_from_slice(b"user\0app\0\0");
        let len = startup.len() as u32;
        startup[..4].copy_from_slice(&len.to_be_bytes());
        let request = |code: u32| {
            let mut m = 8u32.to_be_bytes().to_vec();
            m.extend_from_slice(&code.to_be_bytes());
            m
        };
        let mut v32 = startup.clone();
        v32[7] = 2; // protocol 3.2
        for whole in [
            startup,
            v32,
            request(SSL_REQUEST),
            request(GSSENC_REQUEST),
            request(CANCEL_REQUEST),
        ] {
            for n in 0..8 {
                assert_eq!(opens_session(&whole[..n]), None, "{whole:?}[..{n}]");
            }
            assert_eq!(opens_session(&whole), Some(true), "{whole:?}");
        }
        for other in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x16\x03\x01\x02\x00",            // TLS ClientHello
            b"\x05\x01\x00",                    // SOCKS5 greeting
            &[0, 0, 0, 4, 0, 3, 0, 0],          // too short a length
            &[0, 0, 0x27, 0x11, 0, 3, 0, 0],    // longer than 10000
            &[0, 0, 0, 8, 0, 2, 0, 0],          // protocol 2
            &[0, 0, 0, 8, 4, 0xd2, 0x16, 0x31], // 1234.5681
            &[0, 0, 0, 8, 1],
            &[0, 0, 0, 8, 4, 0xd2, 0x17],
        ] {
            assert_eq!(opens_session(other), Some(false), "{other:?}");
        }
    }

    /// Random and mutated input into both directions: an error or a clean
    /// end, never a panic or a hang (the input is finite, so every read ends).
    #[test]
    fn random_frames_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let valid = {
            let mut v = b"\0\0\0\x09\0\x03\0\0\0".to_vec();
            v.extend(msg(b'Q', b"select 1\0"));
            v.extend(msg(b'P', b"s\0select $1\0\0\x01\0\0\0\x17"));
            v.extend(msg(b'S', b""));
            v
        };
        for round in 0..3000 {
            let mut input = if round % 2 == 0 {
                valid.clone()
            } else {
                (0..(next() % 64)).map(|_| next() as u8).collect()
            };
            for _ in 0..(next() % 4) {
                if !input.is_empty() {
                    let i = (next() as usize) % input.len();
                    input[i] = next() as u8;
                }
            }
            let mut state = State::default();
            let (mut w, mut cw) = (Vec::new(), Vec::new());
            let _ = frontend(&mut &input[..], &mut w, &mut cw, &mut state);
            let mut out = Vec::new();
            let _ = backend(&mut &input[9.min(input.len())..], &mut out, &mut state);
        }
    }

    /// A gate for the machines alone: it decides nothing, and masks a
    /// value as `****` and its last `keep` bytes (the agent's strategies
    /// are the gate's to apply; the machine only writes what it gets).
    struct Tails;

    impl Gate for Tails {
        fn flags(&mut self) -> Flags {
            Flags::default()
        }
        fn classify(&mut self, text: &str, reading: Result<Dialect, String>) -> Classified {
            crate::seam::Open.classify(text, reading)
        }
        fn reading_changed(&mut self) {}
        fn statement(&mut self, _: Seen<'_>) -> Verdict {
            Verdict::Pass(None)
        }
        fn result_shape(
            &mut self,
            _: &[Col<'_>],
            _: Option<&Classification>,
            _: usize,
        ) -> Option<crate::seam::Masks> {
            None
        }
        fn mask(&self, how: &crate::seam::ColumnMask, value: &[u8]) -> Vec<u8> {
            let keep = value.len().min(how.keep);
            [b"****", &value[value.len() - keep..]].concat()
        }
        fn message_rule(&mut self, _: &[Option<Arc<Classification>>]) -> Option<Arc<str>> {
            None
        }
        fn names_rule(&self, _: &str) -> bool {
            false
        }
    }

    #[test]
    fn rows_are_reframed_with_masked_values_and_hostile_rows_rejected() {
        let m = &Tails;
        let mask = |strategy| crate::seam::ColumnMask {
            rule: "r".into(),
            strategy,
            keep: 2,
        };
        use types::Form;
        let plan = vec![
            None,
            Some((mask(crate::seam::Strategy::Partial), Form::Text)),
            Some((mask(crate::seam::Strategy::Redact), Form::Null)),
            Some((mask(crate::seam::Strategy::Partial), Form::Json)),
        ];
        // id "7", email "abcdef", amount "12.5", doc {"k": "v\"x"}
        let body = b"\0\x04\0\0\0\x017\0\0\0\x06abcdef\0\0\0\x0412.5\0\0\0\x0c{\"k\":\"v\\\"x\"}";
        let (row, n) = mask_row(body, &plan, m).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            &row[..],
            &msg(
                b'D',
                b"\0\x04\0\0\0\x017\0\0\0\x06****ef\xff\xff\xff\xff\0\0\0\x09\"****\\\"}\""
            )[..]
        );
        // A masked json value is still JSON: a string.
        let doc = &row[row.len() - 9..];
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(doc).unwrap(),
            serde_json::json!("****\"}")
        );
        // Every column, when the shape is unknown.
        let (row, n) = mask_row(body, &[], m).unwrap();
        assert_eq!(n, 4);
        assert_eq!(
            &row[..],
            &msg(
                b'D',
                b"\0\x04\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"
            )[..]
        );
        for hostile in [
            &b"\0"[..],
            b"\0\x01\0\0\0\x09abc",
            b"\0\x01\x7f\xff\xff\xffx",
            b"\0\x00extra",
        ] {
            assert!(mask_row(hostile, &plan, m).is_err(), "{hostile:?}");
        }
    }

    #[test]
    fn bind_parameters_are_read_or_refused() {
        // portal "", statement "s1", formats [text, text, binary], 3 params: "42", NULL, 0x0102
        let body =
            b"\0s1\0\0\x03\0\0\0\0\0\x01\0\x03\0\0\0\x0242\xff\xff\xff\xff\0\0\0\x02\x01\x02\0\0";
        let bind = message::Bind::read(body).unwrap();
        let (stmt, params) = (bind.statement, bind.parameters().unwrap());
        assert_eq!(stmt, "s1");
        assert_eq!(
            params,
            vec![Some("42".into()), None, Some("\\x0102".into())]
        );
        for hostile in [
            &b"\0s1"[..],
            b"\0s1\0\0\x05\0",
            b"\0s1\0\0\0\0\x01\x7f\xff\xff\xff",
        ] {
            let bind = message::Bind::read(hostile);
            assert!(bind.and_then(|b| b.parameters()).is_none(), "{hostile:?}");
        }
    }

    #[test]
    fn sasl_offer_loses_plus_mechanisms() {
        let mut body = Vec::new();
        body.extend_from_slice(&AUTH_SASL.to_be_bytes());
        body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let mechanisms = message::sasl_mechanisms(&body).unwrap();
        assert_eq!(mechanisms, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        let out = without_channel_binding(&mechanisms);
        assert_eq!(&out[..], b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0");
        assert_eq!(
            message::sasl_mechanisms(b"\0\0\0\x0c"),
            None,
            "another request"
        );
        assert_eq!(be32(&out[1..5]) as usize, out.len() - 1);
    }

    #[test]
    fn the_first_nul_is_found_wherever_it_is() {
        for len in 0..40 {
            for nul in 0..=len {
                let mut b: Vec<u8> = (0..len).map(|i| 1 + (i * 37 % 127) as u8).collect();
                if nul < len {
                    b[nul] = 0;
                    if nul + 3 < len {
                        b[nul + 3] = 0;
                    }
                }
                let first = b.iter().position(|&c| c == 0);
                let split = message::cstr(&b).map(|(s, rest)| (s.len(), rest.len()));
                assert_eq!(split, first.map(|n| (n, len - n - 1)), "{b:?}");
            }
        }
    }

    /// A refusal names the request behind it, and nothing in its reason
    /// can leave the literal it is quoted in.
    #[test]
    fn refusals_name_their_request_and_quote_its_reason_safely() {
        let d = Decision {
            via: Some(std::sync::Arc::new(crate::record::Via {
                request: "0190f3a1b2c3d4e5".into(),
                why: "denied by o'brien $interceptor$; DROP TABLE t; -- \\ \n".into(),
            })),
            ..Decision::new(crate::record::Action::Deny, "dba-review".into())
        };
        let sql = refusal_sql(&d);
        assert_eq!(sql.matches("$interceptor$").count(), 2, "{sql}");
        assert_eq!(sql.matches('\'').count(), 6, "{sql}");
        assert!(!sql.contains('\\') && !sql.contains('\n'), "{sql}");
        assert!(
            sql.contains(
                "(request 0190f3a1b2c3d4e5: denied by o?brien ?interceptor?; DROP TABLE t; -- ? ?)"
            ),
            "{sql}"
        );
        assert!(
            sql.contains("interceptor approvals show 0190f3a1b2c3d4e5"),
            "{sql}"
        );
    }

    #[test]
    fn error_codes_are_found() {
        assert_eq!(
            error_code(b"SERROR\0C42501\0Mno\0\0").as_deref(),
            Some("42501")
        );
        assert_eq!(error_code(b"SERROR\0\0"), None);
        assert_eq!(error_code(b"SERR"), None);
    }

    #[test]
    fn startup_parameters() {
        let mut st = Startup::default();
        parse_startup(b"user\0alice\0database\0orders\0\0", &mut st).unwrap();
        assert_eq!(st.user.as_deref(), Some("alice"));
        assert_eq!(st.database.as_deref(), Some("orders"));
        assert!(parse_startup(b"user\0alice", &mut st).is_err());
    }

    /// Hostile frames end the relay with an error, never a panic or a hang.
    #[test]
    fn malformed_frames_are_rejected() {
        let cases: [(&[u8], &str); 6] = [
            (&[0, 0, 0, 3, 0, 0, 0, 0], "startup packet length 3"),
            (
                &[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0],
                "startup packet length",
            ),
            (
                &[0, 0, 0, 8, 0x12, 0x34, 0x56, 0x78],
                "unsupported startup code",
            ),
            (b"\0\0\0\x09\0\x03\0\0\0Q\0\0\0\x02", "length 2"),
            (b"\0\0\0\x09\0\x03\0\0\0Q\x7f\xff\xff\xff", "length"),
            (
                b"\0\0\0\x09\0\x03\0\0\0&\0\0\0\x0cDELETE x\0",
                "unknown message type '&'",
            ),
        ];
        for (input, want) in cases {
            let mut state = State::default();
            let mut r = input;
            let (mut w, mut cw) = (Vec::new(), Vec::new());
            let e = frontend(&mut r, &mut w, &mut cw, &mut state).unwrap_err();
            assert!(e.to_string().contains(want), "{e} (wanted {want})");
        }
    }

    #[test]
    fn queries_are_recorded_and_ssl_is_declined() {
        let mut input = Vec::new();
        input.extend_from_slice(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]); // SSLRequest
        input.extend_from_slice(b"\0\0\0\0\0\x03\0\0user\0bob\0\0"); // length set below
        let startup_len = input.len() - 8;
        input[8..12].copy_from_slice(&(startup_len as u32).to_be_bytes());
        let q = b"ALTER ROLE bob PASSWORD 'hunter2'\0";
        input.push(b'Q');
        input.extend_from_slice(&((4 + q.len()) as u32).to_be_bytes());
        input.extend_from_slice(q);
        let mut state = State::default();
        let (mut w, mut cw) = (Vec::new(), Vec::new());
        frontend(&mut &input[..], &mut w, &mut cw, &mut state).unwrap();
        assert_eq!(cw, b"N");
        assert_eq!(
            w,
            &input[8..],
            "everything but the SSLRequest is forwarded unchanged"
        );
        assert_eq!(state.startup().user.as_deref(), Some("bob"));
        assert!(state.startup().encryption_declined);
        // The server answers (after the login's ReadyForQuery); the next
        // ReadyForQuery completes the statement.
        let mut server = b"Z\0\0\0\x05I".to_vec();
        server.extend_from_slice(b"C\0\0\0\x0fALTER ROLE\0");
        server.extend_from_slice(b"Z\0\0\0\x05I");
        let mut out = Vec::new();
        backend(&mut &server[..], &mut out, &mut state).unwrap();
        assert_eq!(out, server);
        let done = state.take_done();
        assert_eq!(done.len(), 1);
        assert_eq!(&*done[0].text, "ALTER ROLE bob PASSWORD '***'");
        assert_eq!(tags(&done[0]), ["ALTER ROLE"]);
        assert_eq!(done[0].class, Class::Admin);
    }

    /// What the server reported decides whether text with backslashes or
    /// non-ASCII bytes can be read as the SQL parser reads it: when it
    /// cannot, or when it is not yet known, or when an earlier statement
    /// that could change it is unanswered, the statement is `unknown`.
    #[test]
    fn backslashes_and_encodings_are_read_as_the_server_reads_them() {
        let status = |k: &str, v: &str| msg(b'S', format!("{k}\0{v}\0").as_bytes());
        let hidden = "SELECT 'a\\' , ' ; DELETE FROM t ; -- '";
        let gbk = "SELECT E'\u{4e2d}\\' ; DELETE FROM t ; SELECT 1 -- ' ;";
        let plain = "SELECT '\u{e9}\\' FROM t";
        for (reports, sql, want) in [
            (vec![], hidden, Class::Unknown),
            (vec![], plain, Class::Unknown),
            // With standard_conforming_strings off, \' escapes the quote:
            // the DELETE is outside every literal, and the server's own
            // grammar, told the setting, sees it.
            (
                vec![
                    ("standard_conforming_strings", "off"),
                    ("client_encoding", "UTF8"),
                ],
                hidden,
                Class::Write,
            ),
            (
                vec![
                    ("standard_conforming_strings", "on"),
                    ("client_encoding", "UTF8"),
                ],
                hidden,
                Class::Read,
            ),
            (
                vec![
                    ("standard_conforming_strings", "on"),
                    ("client_encoding", "GBK"),
                ],
                gbk,
                Class::Unknown,
            ),
            (
                vec![
                    ("standard_conforming_strings", "on"),
                    ("client_encoding", "UTF8"),
                ],
                gbk,
                Class::Read,
            ),
            (
                vec![
                    ("standard_conforming_strings", "on"),
                    ("client_encoding", "LATIN1"),
                ],
                plain,
                Class::Read,
            ),
        ] {
            let mut state = State::default();
            let mut server: Vec<u8> = reports.iter().flat_map(|(k, v)| status(k, v)).collect();
            server.extend(msg(b'Z', b"I"));
            backend(&mut &server[..], &mut Vec::new(), &mut state).unwrap();
            let mut input = b"\0\0\0\x09\0\x03\0\0\0".to_vec();
            input.extend(msg(b'Q', format!("{sql}\0").as_bytes()));
            // Pipelined behind it: the same text again, while the first is unanswered.
            input.extend(msg(b'Q', format!("{plain}\0").as_bytes()));
            frontend(
                &mut &input[..],
                &mut Vec::new(),
                &mut Vec::new(),
                &mut state,
            )
            .unwrap();
            state.ended();
            let pending = state.take_done();
            assert_eq!(pending[0].class, want, "{reports:?} {sql:?}");
            assert_eq!(pending[1].class, Class::Unknown, "{reports:?}: pipelined");
        }
    }

    /// `options` are read as the server reads them.
    #[test]
    fn startup_options_are_read_as_the_server_reads_them() {
        assert_eq!(
            server_options(r"-c role=admin --search-path=audit\ x -cwork_mem=64MB").unwrap(),
            [
                ("role".to_string(), "admin".to_string()),
                ("search_path".to_string(), "audit x".to_string()),
                ("work_mem".to_string(), "64MB".to_string()),
            ]
        );
    }
}
