//! Just-in-time approval: a statement or connect that a review rule
//! matches waits (held, its connection alone) until other people approve
//! it, and an approval grants what the rule's terms say for as long as they
//! say.
//!
//! The [`Broker`] keeps the requests that are pending and the grants that
//! may still be used, in memory under one lock, and writes every change
//! through to an [`ApprovalStore`] before it takes effect. The data path
//! asks it only when a review rule matched ([`Broker::ask`]): a grant in
//! force lets the statement through at once; otherwise a request is made
//! (or the pending one for the same thing is found) and the statement is
//! held on a [`Ticket`] that a decision, or the rule's hold, settles.
//!
//! Deciding takes a person, as a verified token says ([`oidc`]): never the
//! requester, never an owner of the workload, each counted once, and only
//! from the groups the rule names ([`people`]). There is no override.
//! Break-glass, where configured, is its own path: two people of the
//! break-glass groups, each loudly recorded.

pub mod https;
pub mod notify;
pub mod oidc;
pub mod people;
pub mod service;

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::Duration,
};

use tracing::{info, warn};

use crate::{
    protocol::seam::{Ticket, Wake},
    record::{
        approval::{
            Approval, Asked, Attempt, Channel, Decided, Grant, Person, Request, Requester, Scope,
            Status, Terms, Use,
        },
        now_micros, rfc3339_micros, Action, ApprovalStore, Decision, RequestId, SessionIds,
        StoreError, Via,
    },
};

/// Most pending requests one workload may have: past it, what review rules
/// match is refused without a new request (a workload cannot grow the
/// agent's memory and store without bound by asking).
const MAX_PENDING: usize = if cfg!(test) { 5 } else { 1000 };

/// What a review rule matched, as the data path asks about it.
pub struct Ask<'a> {
    pub rule: &'a Arc<str>,
    pub terms: &'a Terms,
    pub target: &'a str,
    pub requester: &'a Requester,
    pub asked: Asked,
}

/// The broker's answer to an [`Ask`].
pub enum Answer {
    /// A grant in force covers it: it goes on, recorded with this.
    Granted(Decision),
    /// It waits on this ticket.
    Held(Ticket),
    /// Refused now (the rule holds nothing: `hold = "0s"`); the request
    /// stays pending, so a try after approval passes.
    Refused(Decision),
}

/// What a person may do to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Approve,
    Deny,
    Revoke,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Approve => "approve",
            Verb::Deny => "deny",
            Verb::Revoke => "revoke",
        }
    }
}

/// A person's decision on a request, as it arrived.
pub struct Deciding<'a> {
    pub verb: Verb,
    pub person: &'a Person,
    pub comment: Option<String>,
    pub channel: Channel,
    /// Approving by break-glass.
    pub break_glass: bool,
}

/// Why a decision was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("no request {0}")]
    Unknown(RequestId),
    #[error("request {id}: {why}")]
    Refused { id: RequestId, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a request made or decided is told, with what happened to it.
pub type Tell = Box<dyn Fn(&Request, &str) + Send + Sync>;

/// Requests, grants and held tickets; see the module's documentation.
pub struct Broker {
    store: Arc<dyn ApprovalStore>,
    /// Keys the digests of held statements (see [`Broker::digest`]).
    key: crate::mask::Masker,
    book: Mutex<Book>,
    /// Rung when the earliest deadline may have changed.
    clock: Condvar,
    ids: SessionIds,
    /// Where requests made and decided are told (webhooks).
    tell: Option<Tell>,
}

#[derive(Default)]
struct Book {
    /// Pending requests, and approved ones whose grant may still be used.
    open: BTreeMap<RequestId, Request>,
    /// Tickets held on each pending request, with when each is refused.
    held: BTreeMap<RequestId, Vec<(Ticket, u64)>>,
    /// When something falls due (µs since the epoch), and what.
    due: BinaryHeap<Reverse<(u64, RequestId)>>,
    stopped: bool,
}

impl Broker {
    /// A broker over `store`, with the requests it holds that are still
    /// pending or whose grants may still be used. `tell` is called with
    /// each request made or decided, and what happened.
    pub fn open(
        store: Arc<dyn ApprovalStore>,
        key: &[u8],
        tell: Option<Tell>,
    ) -> Result<Arc<Broker>, StoreError> {
        let now = now_micros();
        let mut book = Book::default();
        for r in store.requests(0)? {
            if r.status == Status::Pending || grant_in_force(&r, now) {
                book.due.push(Reverse((next_due(&r), r.id)));
                book.open.insert(r.id, r);
            }
        }
        let pending = book
            .open
            .values()
            .filter(|r| r.status == Status::Pending)
            .count();
        if !book.open.is_empty() {
            info!(
                pending,
                grants = book.open.len() - pending,
                "approval requests and grants taken up from the store"
            );
        }
        let broker = Arc::new(Broker {
            store,
            key: crate::mask::Masker::new(key),
            book: Mutex::new(book),
            clock: Condvar::new(),
            ids: SessionIds::default(),
            tell,
        });
        let b = broker.clone();
        std::thread::Builder::new()
            .name("approvals".into())
            .spawn(move || b.keep_time())
            .expect("spawning the approvals clock");
        Ok(broker)
    }

    /// What identifies a statement's text for a `once` grant: keyed, so
    /// a copy of the store cannot be searched for a secret the text held.
    pub fn digest(&self, text: &str) -> [u8; 32] {
        self.key.hmac(text.as_bytes())
    }

    /// Stops the clock thread.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.clock.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The data path's question (see the module's documentation). `wake`
    /// wakes the connection when a held ticket is decided; `notice` says
    /// what its client is told while it waits.
    pub fn ask(&self, ask: Ask<'_>, wake: Wake) -> Answer {
        let now = now_micros();
        let mut book = self.lock();
        if let Some(d) = self.use_grant(&mut book, &ask, now) {
            return Answer::Granted(d);
        }
        let id = match book
            .open
            .values_mut()
            .find(|r| r.status == Status::Pending && r.expires_at > now && same_ask(r, &ask))
        {
            Some(r) => {
                r.asked_times = r.asked_times.saturating_add(1);
                r.id
            }
            None => {
                let workload = &ask.requester.workload;
                let pending = book
                    .open
                    .values()
                    .filter(|r| r.status == Status::Pending && r.requester.workload == *workload)
                    .count();
                if pending >= MAX_PENDING {
                    warn!(%workload, pending, "too many pending approval requests; refused without a new one");
                    return Answer::Refused(Decision::new(Action::Deny, ask.rule.clone()));
                }
                let r = self.request(&ask, now);
                if let Err(e) = self.store.put_request(&r) {
                    // Nothing can approve what is not stored: refused.
                    warn!(error = %e, rule = %ask.rule, "an approval request could not be stored; refused");
                    return Answer::Refused(Decision::new(Action::Deny, ask.rule.clone()));
                }
                info!(request = %r.id, rule = %r.rule, workload = %r.requester.workload, target = %r.target, "approval requested");
                self.told(&r, "requested");
                book.due.push(Reverse((r.expires_at, r.id)));
                self.clock.notify_all();
                let id = r.id;
                book.open.insert(id, r);
                id
            }
        };
        let hold = ask.terms.hold_us;
        if hold == 0 {
            let why = "waiting for approval (this rule holds nothing: try again once approved)";
            return Answer::Refused(refusal(ask.rule, id, why));
        }
        let notice = format!(
            "interceptor: held for approval by rule \"{}\": request {id}. It waits up to {} for a decision (interceptor approvals approve {id}); once approved it goes on as if nothing happened.",
            ask.rule,
            seconds(hold)
        );
        let ticket = Ticket::new(ask.rule.clone(), Some(notice.into()), wake);
        let until = now.saturating_add(hold);
        book.held
            .entry(id)
            .or_default()
            .push((ticket.clone(), until));
        book.due.push(Reverse((until, id)));
        self.clock.notify_all();
        Answer::Held(ticket)
    }

    /// A new pending request for `ask`.
    fn request(&self, ask: &Ask<'_>, now: u64) -> Request {
        Request {
            id: self.ids.next(),
            created_at: now,
            expires_at: now.saturating_add(ask.terms.pending_ttl_us),
            rule: ask.rule.to_string(),
            target: ask.target.to_owned(),
            requester: ask.requester.clone(),
            asked: ask.asked.clone(),
            terms: ask.terms.clone(),
            status: Status::Pending,
            approvals: Vec::new(),
            attempts: Vec::new(),
            decided: None,
            grant: None,
            asked_times: 1,
        }
    }

    /// A grant in force that covers `ask`, used once: the decision that
    /// lets it through.
    fn use_grant(&self, book: &mut Book, ask: &Ask<'_>, now: u64) -> Option<Decision> {
        let r = book
            .open
            .values_mut()
            .find(|r| grant_in_force(r, now) && r.rule == **ask.rule && covers(r, ask))?;
        let g = r.grant.as_mut().expect("in force");
        g.used += 1;
        if g.uses.len() >= Grant::KEPT_USES {
            g.uses.remove(0);
        }
        g.uses.push(Use {
            at: now,
            session: ask.requester.session,
        });
        // A grant with a count of uses is written through at once, so a
        // restart cannot give a use back; others are written when decided.
        if r.terms.uses.is_some() {
            if let Err(e) = self.store.put_request(r) {
                warn!(error = %e, request = %r.id, "a grant's use could not be stored; refused");
                return None;
            }
        }
        Some(Decision {
            action: Action::Allow,
            rule: ask.rule.clone(),
            via: Some(std::sync::Arc::new(Via {
                request: r.id.to_string().into(),
                why: "granted".into(),
            })),
        })
    }

    /// A person's decision on request `id`. Refused ones are recorded
    /// with the request, and never counted.
    pub fn decide(&self, id: RequestId, d: Deciding<'_>) -> Result<Request, Refusal> {
        let now = now_micros();
        let mut book = self.lock();
        let mut r = match book.open.get(&id) {
            Some(r) => r.clone(),
            None => match self.store.request(id)? {
                Some(r) => r,
                None => {
                    warn!(request = %id, subject = %d.person.subject, verb = d.verb.as_str(), "a decision on an unknown request, refused");
                    return Err(Refusal::Unknown(id));
                }
            },
        };
        if let Err(why) = allowed(&r, &d, now) {
            warn!(request = %id, subject = %d.person.subject, verb = d.verb.as_str(), %why, "a decision refused");
            let attempt = Attempt {
                at: now,
                action: d.verb.as_str().into(),
                subject: Some(d.person.subject.clone()),
                channel: d.channel.clone(),
                refused: why.clone(),
            };
            self.note_attempt(&mut book, r, attempt);
            return Err(Refusal::Refused { id, why });
        }
        let decided = Decided {
            at: now,
            by: Some(d.person.clone()),
            comment: d.comment.clone(),
            channel: Some(d.channel.clone()),
        };
        let what = match d.verb {
            Verb::Approve => {
                r.approvals.push(Approval {
                    person: d.person.clone(),
                    at: now,
                    comment: d.comment.clone(),
                    channel: d.channel.clone(),
                    break_glass: d.break_glass,
                });
                if d.break_glass {
                    warn!(request = %id, subject = %d.person.subject, "BREAK-GLASS approval: counted in place of the rule's approvers");
                }
                if people::filled(&r.terms.approvers, &r.approvals) {
                    r.status = Status::Approved;
                    r.decided = Some(decided);
                    r.grant = Some(Grant {
                        from: now,
                        until: now.saturating_add(r.terms.duration_us),
                        used: 0,
                        uses: Vec::new(),
                        revoked: None,
                    });
                    match d.break_glass {
                        true => "approved by BREAK-GLASS",
                        false => "approved",
                    }
                } else {
                    match d.break_glass {
                        true => "BREAK-GLASS approval counted",
                        false => "approval counted",
                    }
                }
            }
            Verb::Deny => {
                r.status = Status::Denied;
                r.decided = Some(decided);
                "denied"
            }
            Verb::Revoke => {
                let g = r.grant.as_mut().expect("checked");
                g.revoked = Some(decided);
                "revoked"
            }
        };
        // Written before it takes effect.
        self.store.put_request(&r)?;
        info!(request = %id, subject = %d.person.subject, break_glass = d.break_glass, "{what}");
        self.told(&r, what);
        match r.status {
            Status::Approved if d.verb == Verb::Approve => {
                self.release(&mut book, &mut r, now);
                book.due.push(Reverse((next_due(&r), id)));
                self.clock.notify_all();
            }
            Status::Denied => {
                let by = &d.person.subject;
                let why = match &d.comment {
                    Some(c) => format!("denied by {by}: {c}"),
                    None => format!("denied by {by}"),
                };
                self.refuse_held(&mut book, &r, &why);
            }
            _ => {}
        }
        match r.status == Status::Pending || grant_in_force(&r, now) {
            true => book.open.insert(id, r.clone()),
            false => book.open.remove(&id),
        };
        Ok(r)
    }

    /// Records a refused attempt with request `r` (the first
    /// [`Request::KEPT_ATTEMPTS`] of them).
    fn note_attempt(&self, book: &mut Book, mut r: Request, attempt: Attempt) {
        if r.attempts.len() >= Request::KEPT_ATTEMPTS {
            return;
        }
        r.attempts.push(attempt);
        if let Err(e) = self.store.put_request(&r) {
            warn!(error = %e, request = %r.id, "a refused decision could not be recorded");
            return;
        }
        if let Some(open) = book.open.get_mut(&r.id) {
            open.attempts = r.attempts;
        }
    }

    /// Lets the tickets held on approved request `r` go, each a use of its
    /// grant while uses remain; the rest are refused.
    fn release(&self, book: &mut Book, r: &mut Request, now: u64) {
        let Some(held) = book.held.remove(&r.id) else {
            return;
        };
        let rule: Arc<str> = r.rule.as_str().into();
        for (ticket, _) in held {
            let g = r.grant.as_mut().expect("approved");
            let left = r.terms.uses.is_none_or(|n| g.used < u64::from(n));
            if !left {
                ticket.decide(refusal(
                    &rule,
                    r.id,
                    "approved, but its grant was used up by another held statement: ask again",
                ));
                continue;
            }
            g.used += 1;
            g.uses.push(Use {
                at: now,
                session: r.requester.session,
            });
            ticket.decide(Decision {
                action: Action::Allow,
                rule: rule.clone(),
                via: Some(std::sync::Arc::new(Via {
                    request: r.id.to_string().into(),
                    why: "approved".into(),
                })),
            });
        }
        if let Err(e) = self.store.put_request(r) {
            warn!(error = %e, request = %r.id, "the uses of a grant could not be stored");
        }
    }

    /// Refuses every ticket held on `r`.
    fn refuse_held(&self, book: &mut Book, r: &Request, why: &str) {
        let rule: Arc<str> = r.rule.as_str().into();
        for (ticket, _) in book.held.remove(&r.id).unwrap_or_default() {
            ticket.decide(refusal(&rule, r.id, why));
        }
    }

    /// Requests made at or after `since` (µs since the epoch), oldest
    /// first, as they stand now.
    pub fn list(&self, since: u64) -> Result<Vec<Request>, StoreError> {
        let book = self.lock();
        let mut all = self.store.requests(since)?;
        for r in &mut all {
            if let Some(open) = book.open.get(&r.id) {
                *r = open.clone();
            }
        }
        Ok(all)
    }

    /// Request `id` as it stands now.
    pub fn show(&self, id: RequestId) -> Result<Option<Request>, StoreError> {
        if let Some(r) = self.lock().open.get(&id) {
            return Ok(Some(r.clone()));
        }
        self.store.request(id)
    }

    /// The clock thread: refuses held tickets whose hold is over, expires
    /// requests left undecided, and forgets grants that ended.
    fn keep_time(&self) {
        let mut book = self.lock();
        loop {
            if book.stopped {
                return;
            }
            let now = now_micros();
            match book.due.peek() {
                Some(&Reverse((at, id))) if at <= now => {
                    book.due.pop();
                    self.fall_due(&mut book, id, now);
                }
                next => {
                    let wait = next.map_or(Duration::from_secs(3600), |Reverse((at, _))| {
                        Duration::from_micros(at - now)
                    });
                    book = self
                        .clock
                        .wait_timeout(book, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// Whatever of request `id` is due at `now`.
    fn fall_due(&self, book: &mut Book, id: RequestId, now: u64) {
        let of = book.open.get(&id);
        let rule = of.map(|r| Arc::<str>::from(r.rule.as_str()));
        let why = of.map(|r| {
            format!(
                "no decision within {} (the hold of its rule); the request stays pending: try again once approved",
                seconds(r.terms.hold_us)
            )
        });
        if let (Some(held), Some(rule), Some(why)) = (book.held.get_mut(&id), &rule, &why) {
            held.retain(|(ticket, until)| {
                if *until > now {
                    return !ticket.decided();
                }
                ticket.decide(refusal(rule, id, why));
                false
            });
            if held.is_empty() {
                book.held.remove(&id);
            }
        }
        let Some(r) = book.open.get_mut(&id) else {
            return;
        };
        if r.status == Status::Pending && r.expires_at <= now {
            r.status = Status::Expired;
            r.decided = Some(Decided {
                at: now,
                by: None,
                comment: Some("no decision within the pending TTL".into()),
                channel: None,
            });
            let r = r.clone();
            if let Err(e) = self.store.put_request(&r) {
                warn!(error = %e, request = %id, "an expired request could not be stored");
            }
            info!(request = %id, "approval request expired");
            self.told(&r, "expired");
            self.refuse_held(book, &r, "the request expired undecided");
            book.open.remove(&id);
        } else if r.status != Status::Pending && !grant_in_force(r, now) {
            let r = book.open.remove(&id).expect("present");
            // Its uses since the last write.
            if let Err(e) = self.store.put_request(&r) {
                warn!(error = %e, request = %id, "an ended grant could not be stored");
            }
        }
    }

    fn told(&self, r: &Request, what: &str) {
        if let Some(tell) = &self.tell {
            tell(r, what);
        }
    }
}

/// A refusal by `rule` naming request `id` and why.
fn refusal(rule: &Arc<str>, id: RequestId, why: &str) -> Decision {
    Decision {
        action: Action::Deny,
        rule: rule.clone(),
        via: Some(std::sync::Arc::new(Via {
            request: id.to_string().into(),
            why: why.into(),
        })),
    }
}

/// `us` microseconds, for people.
fn seconds(us: u64) -> String {
    let s = us / 1_000_000;
    match s {
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Why `d` may not be taken on `r` now, if it may not.
fn allowed(r: &Request, d: &Deciding<'_>, now: u64) -> Result<(), String> {
    if let Some(why) = people::barred(r, d.person) {
        return Err(why);
    }
    match d.verb {
        Verb::Approve | Verb::Deny => {
            if r.status != Status::Pending {
                return Err(format!("it is {} already", r.status.as_str()));
            }
            if r.expires_at <= now {
                return Err(format!(
                    "it expired at {} undecided",
                    rfc3339_micros(r.expires_at)
                ));
            }
            if d.verb == Verb::Approve && people::counted(r, d.person) {
                return Err(format!(
                    "{} has approved it already: each person counts once",
                    d.person.subject
                ));
            }
            if d.break_glass && d.verb == Verb::Deny {
                return Err("break-glass approves; deny as an approver".into());
            }
            people::eligible(r, d.person, d.break_glass)
        }
        Verb::Revoke => {
            if !grant_in_force(r, now) {
                return Err("it has no grant in force".into());
            }
            people::eligible(r, d.person, false)
        }
    }
}

/// Whether `r` has a grant that may still be used at `now`.
fn grant_in_force(r: &Request, now: u64) -> bool {
    r.status == Status::Approved
        && r.grant.as_ref().is_some_and(|g| {
            g.revoked.is_none()
                && now < g.until
                && r.terms.uses.is_none_or(|n| g.used < u64::from(n))
        })
}

/// When `r` next needs the clock: its expiry while pending, its grant's end.
fn next_due(r: &Request) -> u64 {
    match (&r.status, &r.grant) {
        (Status::Approved, Some(g)) => g.until,
        _ => r.expires_at,
    }
}

/// Whether pending request `r` asks for what `ask` does: the same rule,
/// workload, person and target, and the same text (or a connect).
fn same_ask(r: &Request, ask: &Ask<'_>) -> bool {
    r.rule == **ask.rule
        && r.target == ask.target
        && r.requester.workload == ask.requester.workload
        && r.requester.human == ask.requester.human
        && match (&r.asked, &ask.asked) {
            (Asked::Connect, Asked::Connect) => true,
            (Asked::Statement { digest: a, .. }, Asked::Statement { digest: b, .. }) => a == b,
            _ => false,
        }
}

/// Whether approved request `r`'s grant covers `ask` (its rule is `ask`'s).
fn covers(r: &Request, ask: &Ask<'_>) -> bool {
    if r.target != ask.target || r.requester.workload != ask.requester.workload {
        return false;
    }
    match (r.terms.scope, &r.asked, &ask.asked) {
        (_, Asked::Connect, Asked::Connect) => true,
        (Scope::Target, Asked::Statement { .. }, Asked::Statement { .. }) => true,
        (
            Scope::Statement,
            Asked::Statement {
                shape: a,
                digest: da,
                ..
            },
            Asked::Statement {
                shape: b,
                digest: db,
                ..
            },
        ) => da == db || (a.is_some() && a == b),
        (Scope::Once, Asked::Statement { digest: a, .. }, Asked::Statement { digest: b, .. }) => {
            a == b
        }
        _ => false,
    }
}

/// People who said they started processes (`interceptor exec
/// --requester-token`, its token verified by the agent), by process: the
/// requester of a request is the person who started the asking process or
/// one of its ancestors.
#[derive(Default)]
pub struct Requesters(Mutex<std::collections::HashMap<(u32, u64), Person>>);

/// How far up a process's ancestors a requester is looked for.
const ANCESTORS: usize = 64;

impl Requesters {
    /// `person` started process `pid` (which is running now).
    pub fn register(&self, pid: u32, person: Person) -> std::io::Result<()> {
        let (_, start) = stat(pid)?;
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Processes gone since are forgotten.
        map.retain(|&(p, s), _| stat(p).is_ok_and(|(_, now)| now == s));
        map.insert((pid, start), person);
        Ok(())
    }

    /// The person who started the process `e` tells of, or an ancestor.
    pub fn of(&self, e: &crate::record::Evidence) -> Option<Person> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return None;
        }
        let mut pid = e.pid;
        for _ in 0..ANCESTORS {
            let Ok((parent, start)) = stat(pid) else {
                return None;
            };
            if let Some(p) = map.get(&(pid, start)) {
                return Some(p.clone());
            }
            if parent <= 1 {
                return None;
            }
            pid = parent;
        }
        None
    }
}

/// A process's parent and start time (clock ticks since boot), from
/// `/proc/PID/stat`.
fn stat(pid: u32) -> std::io::Result<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "unreadable /proc stat");
    // After the command name (which may hold anything but ends at the
    // last `)`): state, ppid, … starttime is the 20th.
    let rest = &text[text.rfind(')').ok_or_else(bad)? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let parent = fields.get(1).and_then(|f| f.parse().ok()).ok_or_else(bad)?;
    let start = fields
        .get(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(bad)?;
    Ok((parent, start))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::record::{
        approval::{Approvers, Scope},
        SessionId, SledStore,
    };
    use interceptor_sql::Class;

    struct Fixture {
        dir: std::path::PathBuf,
        store: Arc<SledStore>,
        broker: Arc<Broker>,
    }

    impl Fixture {
        fn new(name: &str) -> Fixture {
            let dir =
                std::env::temp_dir().join(format!("icpt-approvals-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let store = Arc::new(SledStore::open(&dir).unwrap());
            let broker = Broker::open(store.clone(), b"test-key", None).unwrap();
            Fixture { dir, store, broker }
        }

        /// The broker of the same store, as a restarted agent has it.
        fn reopen(&mut self) {
            self.broker.stop();
            self.broker = Broker::open(self.store.clone(), b"test-key", None).unwrap();
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.broker.stop();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn terms(scope: Scope, hold_ms: u64, duration_ms: u64, uses: Option<u32>) -> Terms {
        Terms {
            approvers: vec![Approvers {
                groups: vec!["dba".into()],
                count: 1,
            }],
            scope,
            pending_ttl_us: 60_000_000,
            duration_us: duration_ms * 1000,
            uses,
            hold_us: hold_ms * 1000,
            break_glass: vec![],
        }
    }

    fn requester() -> Requester {
        Requester {
            workload: "billing".into(),
            identity: "spiffe://example.org/billing".into(),
            session: Some(SessionId(1)),
            evidence: None,
            human: Some(person("carol", &["dev"])),
            owners: vec!["billing-team".into()],
        }
    }

    fn person(subject: &str, groups: &[&str]) -> Person {
        Person {
            issuer: "https://id.example.org".into(),
            subject: subject.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    /// Asks about `text` under `terms`; wakes count into `woken`.
    fn ask(b: &Broker, terms: &Terms, text: &str, woken: &Arc<AtomicUsize>) -> Answer {
        let w = woken.clone();
        let rule: Arc<str> = "dba-review".into();
        let who = requester();
        b.ask(
            Ask {
                rule: &rule,
                terms,
                target: "orders-db",
                requester: &who,
                asked: Asked::Statement {
                    text: text.into(),
                    class: Class::Write,
                    tables: vec!["orders".into()],
                    digest: b.digest(text),
                    shape: Some("delete from orders where id = ?".into()),
                },
            },
            Box::new(move || {
                w.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }

    fn decide(b: &Broker, id: RequestId, verb: Verb, who: &Person) -> Result<Request, Refusal> {
        decide_as(b, id, verb, who, false)
    }

    /// [`decide`], by break-glass if `break_glass`.
    fn decide_as(
        b: &Broker,
        id: RequestId,
        verb: Verb,
        who: &Person,
        break_glass: bool,
    ) -> Result<Request, Refusal> {
        b.decide(
            id,
            Deciding {
                verb,
                person: who,
                comment: Some("checked".into()),
                channel: Channel {
                    by: "test".into(),
                    peer: "-".into(),
                },
                break_glass,
            },
        )
    }

    fn held(a: Answer) -> Ticket {
        match a {
            Answer::Held(t) => t,
            Answer::Granted(d) | Answer::Refused(d) => panic!("not held: {d:?}"),
        }
    }

    fn pending(b: &Broker) -> Vec<Request> {
        let mut all = b.list(0).unwrap();
        all.retain(|r| r.status == Status::Pending);
        all
    }

    /// Held, then approved by an approver: the ticket lets it go (its
    /// connection woken) under the request, whose once-grant it used.
    #[test]
    fn a_held_statement_goes_on_when_approved() {
        let f = Fixture::new("approve");
        let woken = Arc::new(AtomicUsize::new(0));
        let t = terms(Scope::Once, 60_000, 60_000, Some(1));
        let ticket = held(ask(
            &f.broker,
            &t,
            "DELETE FROM orders WHERE id = 1",
            &woken,
        ));
        let id = pending(&f.broker)[0].id;
        assert!(ticket.decision().is_none());
        let r = decide(&f.broker, id, Verb::Approve, &person("alice", &["dba"])).unwrap();
        assert_eq!(r.status, Status::Approved);
        let d = ticket.decision().expect("decided");
        assert_eq!(d.action, Action::Allow);
        assert_eq!(&*d.via.unwrap().request, id.to_string());
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        let r = f.broker.show(id).unwrap().unwrap();
        assert_eq!(
            r.grant.unwrap().used,
            1,
            "the held statement used the grant"
        );
        // Used once: the same statement again is held again.
        held(ask(
            &f.broker,
            &t,
            "DELETE FROM orders WHERE id = 1",
            &woken,
        ));
    }

    /// Denied: the ticket is refused by the rule, naming the request and
    /// who denied it.
    #[test]
    fn a_denied_statement_is_refused() {
        let f = Fixture::new("deny");
        let woken = Arc::new(AtomicUsize::new(0));
        let t = terms(Scope::Once, 60_000, 60_000, Some(1));
        let ticket = held(ask(&f.broker, &t, "DELETE FROM orders", &woken));
        let id = pending(&f.broker)[0].id;
        decide(&f.broker, id, Verb::Deny, &person("alice", &["dba"])).unwrap();
        let d = ticket.decision().unwrap();
        assert_eq!(d.action, Action::Deny);
        assert_eq!(&*d.rule, "dba-review");
        assert!(d.via.unwrap().why.contains("denied by alice: checked"));
        assert_eq!(f.broker.show(id).unwrap().unwrap().status, Status::Denied);
    }

    /// Undecided within the hold: refused, the request still pending.
    #[test]
    fn a_hold_runs_out() {
        let f = Fixture::new("hold");
        let woken = Arc::new(AtomicUsize::new(0));
        let t = terms(Scope::Once, 200, 60_000, Some(1));
        let ticket = held(ask(&f.broker, &t, "DELETE FROM orders", &woken));
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while ticket.decision().is_none() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let d = ticket.decision().expect("refused when the hold ran out");
        assert_eq!(d.action, Action::Deny);
        assert!(
            d.via.as_ref().unwrap().why.contains("no decision within"),
            "{d:?}"
        );
        assert_eq!(pending(&f.broker).len(), 1);
    }

    /// `hold = 0s`: refused at once, the request left pending; approved,
    /// the next try passes under the grant, and a single-use grant only
    /// once.
    #[test]
    fn a_zero_hold_refuses_and_the_retry_passes_once_approved() {
        let f = Fixture::new("zero");
        let woken = Arc::new(AtomicUsize::new(0));
        let t = terms(Scope::Statement, 0, 60_000, Some(1));
        let text = "DELETE FROM orders WHERE id = 7";
        let Answer::Refused(d) = ask(&f.broker, &t, text, &woken) else {
            panic!("not refused")
        };
        assert!(d.via.unwrap().why.contains("waiting for approval"));
        // Asked again before approval: the same request.
        let _ = ask(&f.broker, &t, text, &woken);
        let p = pending(&f.broker);
        assert_eq!((p.len(), p[0].asked_times), (1, 2));
        decide(
            &f.broker,
            p[0].id,
            Verb::Approve,
            &person("alice", &["dba"]),
        )
        .unwrap();
        // The same shape with other values is covered (scope statement).
        let Answer::Granted(d) = ask(&f.broker, &t, "DELETE FROM orders WHERE id = 8", &woken)
        else {
            panic!("not granted")
        };
        assert_eq!(d.action, Action::Allow);
        // Single use: the next is refused (a new request).
        assert!(matches!(
            ask(&f.broker, &t, text, &woken),
            Answer::Refused(_)
        ));
        assert_eq!(pending(&f.broker).len(), 1);
    }

    /// A grant lasts its duration from approval; then review again.
    #[test]
    fn a_grant_expires() {
        let f = Fixture::new("expiry");
        let woken = Arc::new(AtomicUsize::new(0));
        let t = terms(Scope::Target, 0, 300, None);
        let _ = ask(&f.broker, &t, "DELETE FROM orders", &woken);
        let id = pending(&f.broker)[0].id;
        decide(&f.broker, id, Verb::Approve, &person("alice", &["dba"])).unwrap();
        for text in ["UPDATE orders SET x = 1", "DELETE FROM orders"] {
            assert!(matches!(
                ask(&f.broker, &t, text, &woken),
                Answer::Granted(_)
            ));
        }
        std::thread::sleep(Duration::from_millis(400));
        assert!(matches!(
            ask(&f.broker, &t, "DELETE FROM orders", &woken),
            Answer::Refused(_)
        ));
        let r = f.broker.show(id).unwrap().unwrap();
        assert_eq!(r.grant.unwrap().used, 2);
    }

    /// Segregation of duties: the requester, an owner, someone outside
    /// the approvers' groups and an approver counted already are refused,
    /// each recorded; two groups need two people; an unknown request is
    /// said so.
    #[test]
    fn only_other_people_of_the_named_groups_count_once() {
        let f = Fixture::new("sod");
        let woken = Arc::new(AtomicUsize::new(0));
        let mut t = terms(Scope::Once, 60_000, 60_000, Some(1));
        t.approvers.push(Approvers {
            groups: vec!["security".into()],
            count: 1,
        });
        let ticket = held(ask(&f.broker, &t, "DROP TABLE orders", &woken));
        let id = pending(&f.broker)[0].id;
        let refused = |who: &Person, want: &str| {
            let e = decide(&f.broker, id, Verb::Approve, who).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        };
        refused(
            &person("carol", &["dba", "security"]),
            "never decides their own",
        );
        refused(&person("olga", &["dba", "billing-team"]), "owner");
        refused(&person("mallory", &["dev"]), "in none of the groups");
        let both = person("alice", &["dba", "security"]);
        let r = decide(&f.broker, id, Verb::Approve, &both).unwrap();
        assert_eq!(r.status, Status::Pending, "one person fills one group");
        refused(&both, "counts once");
        assert!(ticket.decision().is_none());
        let r = decide(&f.broker, id, Verb::Approve, &person("sam", &["security"])).unwrap();
        assert_eq!(r.status, Status::Approved);
        assert_eq!(ticket.decision().unwrap().action, Action::Allow);
        refused(&person("bob", &["dba"]), "approved already");
        let r = f.broker.show(id).unwrap().unwrap();
        assert_eq!(r.approvals.len(), 2);
        assert_eq!(r.attempts.len(), 5, "{:?}", r.attempts);
        assert!(matches!(
            decide(&f.broker, SessionId(42), Verb::Approve, &both),
            Err(Refusal::Unknown(_))
        ));
    }

    /// Two approvers racing on the last place: one approves, the other is
    /// told it is approved already.
    #[test]
    fn racing_approvals_fill_the_last_place_once() {
        let f = Fixture::new("race");
        let woken = Arc::new(AtomicUsize::new(0));
        let t = terms(Scope::Once, 60_000, 60_000, Some(1));
        let _ticket = held(ask(&f.broker, &t, "DELETE FROM orders", &woken));
        let id = pending(&f.broker)[0].id;
        let results: Vec<bool> = std::thread::scope(|s| {
            let hs: Vec<_> = ["alice", "bob", "dave", "erin"]
                .map(|who| {
                    let b = &f.broker;
                    s.spawn(move || decide(b, id, Verb::Approve, &person(who, &["dba"])).is_ok())
                })
                .into_iter()
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
        let r = f.broker.show(id).unwrap().unwrap();
        assert_eq!((r.approvals.len(), r.attempts.len()), (1, 3));
    }

    /// Break-glass: only members of the break-glass groups, two of them,
    /// each recorded as such; the requester still cannot.
    #[test]
    fn break_glass_takes_two_people_of_its_groups() {
        let f = Fixture::new("glass");
        let woken = Arc::new(AtomicUsize::new(0));
        let mut t = terms(Scope::Once, 60_000, 60_000, Some(1));
        t.break_glass = vec!["sre-oncall".into()];
        let ticket = held(ask(&f.broker, &t, "DELETE FROM orders", &woken));
        let id = pending(&f.broker)[0].id;
        let glass = |who: &Person| decide_as(&f.broker, id, Verb::Approve, who, true);
        let e = glass(&person("alice", &["dba"])).unwrap_err();
        assert!(e.to_string().contains("break glass"), "{e}");
        let e = glass(&person("carol", &["sre-oncall"])).unwrap_err();
        assert!(e.to_string().contains("own request"), "{e}");
        let r = glass(&person("sam", &["sre-oncall"])).unwrap();
        assert_eq!(r.status, Status::Pending, "one person breaks no glass");
        assert!(r.approvals[0].break_glass);
        let r = glass(&person("tess", &["sre-oncall"])).unwrap();
        assert_eq!(r.status, Status::Approved);
        assert_eq!(ticket.decision().unwrap().action, Action::Allow);
    }

    /// A workload cannot pile up requests: past the cap, what it asks for
    /// is refused without a new one.
    #[test]
    fn pending_requests_are_capped_per_workload() {
        let f = Fixture::new("cap");
        let woken = Arc::new(AtomicUsize::new(0));
        let t = terms(Scope::Once, 0, 60_000, Some(1));
        for i in 0..MAX_PENDING + 3 {
            let a = ask(
                &f.broker,
                &t,
                &format!("DELETE FROM orders WHERE id = {i}"),
                &woken,
            );
            assert!(matches!(a, Answer::Refused(_)));
        }
        assert_eq!(pending(&f.broker).len(), MAX_PENDING);
    }

    /// A restarted agent keeps its pending requests and grants.
    #[test]
    fn requests_and_grants_outlive_a_restart() {
        let mut f = Fixture::new("restart");
        let woken = Arc::new(AtomicUsize::new(0));
        let t = terms(Scope::Statement, 0, 60_000, None);
        let _ = ask(&f.broker, &t, "DELETE FROM orders WHERE id = 1", &woken);
        f.reopen();
        let p = pending(&f.broker);
        assert_eq!(p.len(), 1);
        decide(
            &f.broker,
            p[0].id,
            Verb::Approve,
            &person("alice", &["dba"]),
        )
        .unwrap();
        f.reopen();
        assert!(matches!(
            ask(&f.broker, &t, "DELETE FROM orders WHERE id = 2", &woken),
            Answer::Granted(_)
        ));
        // Revoked, it covers nothing.
        decide(&f.broker, p[0].id, Verb::Revoke, &person("bob", &["dba"])).unwrap();
        assert!(matches!(
            ask(&f.broker, &t, "DELETE FROM orders WHERE id = 3", &woken),
            Answer::Refused(_)
        ));
    }
}
