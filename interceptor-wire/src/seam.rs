//! The seam between a protocol's wire machines and the agent.
//!
//! A machine owns its protocol's state (which answer belongs to which
//! statement, prepared statement and portal names, how the server reads
//! text) and holds no lock. Everything it asks of the agent goes through a
//! [`Gate`], one per connection:
//! - the statement seen (its classification, then its [`Verdict`]);
//! - the shape of a result (how its values are masked: a [`Plan`]);
//! - the value to mask;
//! - a server message that may echo values (the mask rule hiding it).
//!
//! The answer for the record goes to the connection's
//! [`Outbox`](crate::record::Outbox), which the agent drains.
//!
//! A verdict may be [`Verdict::Hold`]: the decision is made later,
//! elsewhere (an approval, say). The machine keeps the message and reads
//! nothing more of its client; the relay loop goes on with every other
//! connection. Whoever decides calls [`Ticket::decide`], which wakes the
//! connection (the relay's `Bell` for it): the machine is handed its input again, on
//! whichever relay loop carries the connection by then, and goes on with
//! that decision as if it had been given at once.

use std::{
    any::Any,
    sync::{Arc, Mutex, Weak},
};

use serde::{Deserialize, Serialize};

use crate::{
    record::{Action, Decision, StatementKind},
    sql::{Classification, Dialect},
};

/// What a connection's policy says of it, worked out once per policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flags {
    /// Mask rules apply to this connection at all.
    pub masking: bool,
    /// Bind parameter values are recorded.
    pub record_parameters: bool,
}

/// A statement's classification, and whether its text is free of what
/// [`redact_sql`](crate::redact::redact_sql) hides (so it is recorded as
/// it is, without a second scan).
#[derive(Clone)]
pub struct Classified {
    pub class: Arc<Classification>,
    pub plain: bool,
}

impl Classified {
    /// Text the agent wrote itself: nothing in it to hide.
    pub fn own(c: Classification) -> Self {
        Classified {
            class: Arc::new(c),
            plain: true,
        }
    }

    /// `text`, classified `c` anew.
    pub fn scanned(text: &str, c: Classification) -> Self {
        Classified {
            class: Arc::new(c),
            plain: !crate::redact::may_hold_secret(text),
        }
    }

    /// `text` classified anew, read as `reading` says (or why that is not
    /// certain: then it is `unknown`).
    pub fn afresh(text: &str, reading: Result<Dialect, String>) -> Self {
        let c = match reading {
            Ok(d) => crate::sql::classify_with(text, d),
            Err(why) => Classification::not_sql(why, crate::sql::Class::Unknown),
        };
        Classified::scanned(text, c)
    }
}

/// A statement the machine has seen, as the gate decides it.
pub struct Seen<'a> {
    pub kind: StatementKind,
    pub text: &'a str,
    pub class: &'a Classification,
    /// The kept decision on runs of one prepared statement, if this is
    /// one: the gate may answer from it while the policy that made it is
    /// in force.
    pub memo: Option<&'a mut Memo>,
}

/// A decision kept for the runs of one prepared statement (see
/// [`Seen::memo`]), and what made it (the gate's to say: the agent's keeps
/// its policy). (Weak: an old policy is not kept, nor can a new one take
/// its place in memory while this is held.)
#[derive(Default)]
pub struct Memo(pub Option<(Weak<dyn Any + Send + Sync>, Decision)>);

/// What the gate says of a statement.
pub enum Verdict {
    /// It goes on, recorded with this decision (`None`: nothing decides
    /// this connection's statements).
    Pass(Option<Decision>),
    /// It is refused.
    Refuse(Decision),
    /// It waits for a decision made elsewhere.
    Hold(Ticket),
}

impl Verdict {
    /// The verdict of a decision made now.
    pub fn of(d: Decision) -> Verdict {
        match d.action {
            Action::Allow => Verdict::Pass(Some(d)),
            _ => Verdict::Refuse(d),
        }
    }
}

/// Where a statement's message stands once asked (see [`decide`]).
pub enum Decided {
    /// It goes on, recorded with this decision (`None`: ungated).
    Go(Option<Decision>),
    /// It is refused.
    Refused(Decision),
    /// It waits for a decision: the message stays where it is, to be seen
    /// again once the connection is woken. Held just now, with what its
    /// client is to be told (its ticket's notice), that notice.
    Held(Option<Arc<str>>),
}

/// A decision as recorded (action, the rule's name, the approval request
/// behind it) and as enforced (the decision itself when it is not allowed).
pub struct Parts {
    pub action: Option<Action>,
    pub rule: Option<Arc<str>>,
    pub approval: Option<Arc<str>>,
    pub refused: Option<Decision>,
}

impl Decided {
    /// What is recorded and enforced; `Err`: it is held (with the notice
    /// for its client, if held just now).
    #[inline]
    pub fn parts(self) -> Result<Parts, Option<Arc<str>>> {
        let d = match self {
            Decided::Held(notice) => return Err(notice),
            Decided::Go(None) => {
                return Ok(Parts {
                    action: None,
                    rule: None,
                    approval: None,
                    refused: None,
                })
            }
            Decided::Go(Some(d)) => d,
            Decided::Refused(d) => {
                return Ok(Parts {
                    action: Some(d.action),
                    rule: Some(d.rule.clone()),
                    approval: d.via.as_ref().map(|v| v.request.clone()),
                    refused: Some(d),
                })
            }
        };
        let Decision { action, rule, via } = d;
        Ok(Parts {
            action: Some(action),
            rule: Some(rule),
            approval: via.map(|v| v.request.clone()),
            refused: None,
        })
    }
}

/// The verdict on `seen`, asked of `gate`; for a message held before (its
/// ticket kept in `held`), the decision that came since, and while none
/// has, it stays held. `holdable`: the message can wait; if not, a hold
/// refuses it by the holding rule (fail closed). Every machine decides
/// through this, so a held message is taken up again the same way.
pub fn decide(
    gate: &mut dyn Gate,
    held: &mut Option<Ticket>,
    seen: Seen<'_>,
    holdable: bool,
) -> Decided {
    let (ticket, fresh) = match held.take() {
        Some(t) => (t, false),
        None => match gate.statement(seen) {
            Verdict::Pass(d) => return Decided::Go(d),
            Verdict::Refuse(d) => return Decided::Refused(d),
            Verdict::Hold(t) => (t, true),
        },
    };
    match ticket.decision() {
        Some(d) if d.action == Action::Allow => Decided::Go(Some(d)),
        Some(d) => Decided::Refused(d),
        None if holdable => {
            let notice = ticket.0.notice.clone().filter(|_| fresh);
            *held = Some(ticket);
            Decided::Held(notice)
        }
        None => Decided::Refused(Decision::new(Action::Deny, ticket.rule().clone())),
    }
}

/// How a masked value is replaced. Values of non-text types become NULL
/// whatever the strategy, the only replacement valid for every type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// `****`.
    Redact,
    /// `****1234`: all but the last `keep` characters.
    Partial,
    /// A keyed hash (HMAC-SHA-256 with the agent's key, 16 hex digits): equal
    /// values stay equal, so joins and grouping still work.
    Hash,
}

/// How one result column is masked, and by which rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMask {
    pub rule: Arc<str>,
    pub strategy: Strategy,
    pub keep: usize,
}

/// How each column of a result is masked (`None`: as is), in the order of
/// its columns.
pub type Masks = Vec<Option<ColumnMask>>;

/// A result column: its name, and the name of its type as policy speaks of
/// types (the wire module maps its type ids to these; `None`: a type no
/// rule can name).
pub struct Column<'a> {
    pub name: &'a str,
    pub type_name: Option<&'a str>,
}

/// The agent's side of one connection (see the module's documentation).
pub trait Gate: Send {
    /// What the policy in force says of this connection.
    fn flags(&mut self) -> Flags;
    /// The classification of `text`, read as `reading` says (or why how
    /// the server reads it is not certain: then it is `unknown`).
    fn classify(&mut self, text: &str, reading: Result<Dialect, String>) -> Classified;
    /// How the server reads statement text has changed: classifications
    /// made before no longer hold.
    fn reading_changed(&mut self);
    /// The verdict on a statement seen.
    fn statement(&mut self, seen: Seen<'_>) -> Verdict;
    /// How the rows of a result with `columns` are masked (`None`: not at
    /// all). `class` is the statement's (`None`: not known) and `k` which
    /// of its statements this result is. (Rows whose columns were never
    /// seen are the machine's to mask whole: fail closed.)
    fn result_shape(
        &mut self,
        columns: &[Column<'_>],
        class: Option<&Classification>,
        k: usize,
    ) -> Option<Masks>;
    /// The strategy's text for `value`, masked as `how` says (the machine
    /// writes it as its column's type needs).
    fn mask(&self, how: &ColumnMask, value: &[u8]) -> Vec<u8>;
    /// A server message that may echo values arrived, about one of the
    /// statements of `classes` (none: no statement is waiting): the mask
    /// rule that hides it, if any.
    fn message_rule(&mut self, classes: &[Option<Arc<Classification>>]) -> Option<Arc<str>>;
    /// `rule` names a rule of the policy in force (so a refusal naming it
    /// is the agent's own).
    fn names_rule(&self, rule: &str) -> bool;
}

/// A gate that decides nothing: every statement passes, unmasked, and is
/// classified afresh each time (no cache). For machines run without the
/// agent: tests, fuzzing.
pub struct Open;

impl Gate for Open {
    fn flags(&mut self) -> Flags {
        Flags::default()
    }

    fn classify(&mut self, text: &str, reading: Result<Dialect, String>) -> Classified {
        Classified::afresh(text, reading)
    }

    fn reading_changed(&mut self) {}

    fn statement(&mut self, _: Seen<'_>) -> Verdict {
        Verdict::Pass(None)
    }

    fn result_shape(
        &mut self,
        _: &[Column<'_>],
        _: Option<&Classification>,
        _: usize,
    ) -> Option<Masks> {
        None
    }

    /// (Never asked: it plans no masking. It redacts.)
    fn mask(&self, _: &ColumnMask, _: &[u8]) -> Vec<u8> {
        b"****".to_vec()
    }

    fn message_rule(&mut self, _: &[Option<Arc<Classification>>]) -> Option<Arc<str>> {
        None
    }

    fn names_rule(&self, _: &str) -> bool {
        false
    }
}

/// A decision to come (see [`Verdict::Hold`]). Clones are the same ticket:
/// the machine keeps one, whoever decides another.
#[derive(Clone)]
pub struct Ticket(Arc<TicketInner>);

struct TicketInner {
    /// The rule that holds the statement.
    rule: Arc<str>,
    /// What the client is told while it waits (how to have it approved).
    notice: Option<Arc<str>>,
    decision: Mutex<Option<Decision>>,
    wake: Wake,
}

/// What wakes a connection whose statement is held (for the agent, a ring
/// of the relay's bell for it).
pub type Wake = Box<dyn Fn() + Send + Sync>;

impl Ticket {
    /// A ticket of `rule`; deciding it calls `wake`. `notice`: what the
    /// client is told while it waits.
    pub fn new(rule: Arc<str>, notice: Option<Arc<str>>, wake: Wake) -> Ticket {
        Ticket(Arc::new(TicketInner {
            rule,
            notice,
            decision: Mutex::new(None),
            wake,
        }))
    }

    /// Decides it (the first decision stands) and wakes its connection.
    pub fn decide(&self, d: Decision) {
        {
            let mut decision = self.0.decision.lock().unwrap_or_else(|p| p.into_inner());
            decision.get_or_insert(d);
        }
        (self.0.wake)();
    }

    /// The decision, once made.
    pub fn decision(&self) -> Option<Decision> {
        let decision = self.0.decision.lock().unwrap_or_else(|p| p.into_inner());
        decision.clone()
    }

    /// The rule that holds the statement.
    pub fn rule(&self) -> &Arc<str> {
        &self.0.rule
    }

    /// Whether it is decided.
    pub fn decided(&self) -> bool {
        self.decision().is_some()
    }
}
