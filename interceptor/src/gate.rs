//! The agent's side of the seam (see [`crate::protocol::seam`]): one
//! connection's view of the policy, its classification cache and what its
//! statements taught about result columns, behind the [`Gate`] that its
//! wire machines ask.

use std::sync::Arc;

use arc_swap::ArcSwap;
// Keyed by what the client sends (statement text): foldhash, seeded at
// random per map, is several times cheaper than SipHash on such short
// keys, and each map is bounded whatever the client does.
use foldhash::HashMap;

use crate::{
    approvals::{Answer, Ask, Broker, Requesters},
    mask::Masker,
    policy::{Action, ColumnMask, Decision, Policy},
    protocol::seam::{Classified, Column, Flags, Gate, Masks, Memo, Seen, Ticket, Verdict},
    record::{
        approval::{Asked, Requester, Scope},
        StatementKind,
    },
    sql::{classify_with, Classification, Dialect, Sources},
};

/// Most classifications cached per connection.
const CLASS_CACHE: usize = 512;
/// Most aliases remembered per connection; past this, results whose
/// statement does not show their source are masked whole.
const MAX_ALIASES: usize = 10_000;

/// A connection's gate: its statements are decided by `policy` as those of
/// `workload` to `target`, and their result values masked by `masker`.
pub struct AgentGate {
    policy: Policies,
    seen: Cache,
    learned: Learned,
    /// How statements review rules match are asked about (none: the
    /// agent has no approvals configured, and they are refused).
    asking: Option<Asking>,
    /// Texts of prepared statements let through by approval (a ticket, or
    /// a grant) on this connection: the first run of each in a later batch
    /// goes with its Parse, whatever the grant's uses (a driver that
    /// prepares, then runs, asks once).
    approved_parses: Vec<([u8; 32], Verdicts)>,
    /// The person who started the asking process was looked up (once, on
    /// the first request: it reads /proc).
    person_known: bool,
}

/// How a prepared statement was let through by approval.
enum Verdicts {
    Ticket(Ticket),
    Granted(Decision),
}

/// Most prepared statements remembered as let through by approval.
const APPROVED_PARSES: usize = 16;

/// What the agent's side needs to ask for approval.
pub struct Asking {
    pub broker: Arc<Broker>,
    /// Who asks (workload, process; the person is looked up in
    /// `requesters` when the first request is made).
    pub requester: Requester,
    pub requesters: Arc<Requesters>,
    /// Rings the connection's bell: a held statement is decided.
    pub wake: Arc<dyn Fn() + Send + Sync>,
}

/// Who is speaking to what, and the policy that decides their statements.
pub struct Parties {
    pub policy: Arc<ArcSwap<Policy>>,
    pub workload: String,
    pub target: String,
    pub masker: Arc<Masker>,
}

/// The policy in force, as one connection sees it: a reload is noticed by
/// one atomic load (not an `ArcSwap` guard per statement), and what the
/// policy says of the connection is worked out once per policy.
struct Policies {
    parties: Parties,
    current: arc_swap::Cache<Arc<ArcSwap<Policy>>, Arc<Policy>>,
    /// The policy last consulted for [`Flags`], and what it said.
    flags: Option<(Arc<Policy>, Flags)>,
}

/// Classifications by classification key, and the buffer keys are written
/// into (so a cache hit allocates nothing).
#[derive(Default)]
struct Cache {
    by_key: HashMap<String, Classified>,
    key: String,
}

/// What the statements of one connection named, for results whose own
/// statement does not show where their columns come from (a cursor's
/// `FETCH`, an `EXECUTE`).
#[derive(Default)]
struct Learned {
    /// Every alias given and what it stands for.
    aliases: HashMap<String, Sources>,
    /// What computed, unnamed columns came from.
    unplaced: Sources,
    /// More aliases than [`MAX_ALIASES`]: such results are masked whole.
    saturated: bool,
}

impl Learned {
    fn learn(&mut self, c: &Classification) {
        for d in c.derivations.iter() {
            self.unplaced.add(&d.unplaced);
            self.unplaced.add(&d.everywhere);
            for (name, s) in &d.aliases {
                let full = self.aliases.len() >= MAX_ALIASES;
                match self.aliases.get_mut(name) {
                    Some(known) => known.add(s),
                    None if full => self.saturated = true,
                    None => {
                        self.aliases.insert(name.clone(), s.clone());
                    }
                }
            }
        }
    }
}

impl AgentGate {
    /// A connection of `parties`; statements review rules match are
    /// asked about as `asking` says.
    pub fn new(parties: Parties, asking: Option<Asking>) -> AgentGate {
        AgentGate {
            policy: Policies {
                current: arc_swap::Cache::new(parties.policy.clone()),
                parties,
                flags: None,
            },
            seen: Cache::default(),
            learned: Learned::default(),
            asking,
            approved_parses: Vec::new(),
            person_known: false,
        }
    }

    /// The verdict on a statement review rule `d.rule` matched: a grant
    /// lets it through, or it is held for approval. Without approvals
    /// configured it is refused (fail closed).
    fn review(&mut self, seen: &Seen<'_>, d: Decision, policy: &Policy) -> Verdict {
        let (Some(asking), Some(terms)) = (&mut self.asking, policy.review_terms(&d.rule)) else {
            return Verdict::Refuse(Decision::new(Action::Deny, d.rule));
        };
        if !std::mem::replace(&mut self.person_known, true) {
            let r = &mut asking.requester;
            r.human = r.evidence.as_ref().and_then(|e| asking.requesters.of(e));
        }
        let digest = asking.broker.digest(seen.text);
        if seen.kind == StatementKind::Execute {
            if let Some(i) = self.approved_parses.iter().position(|(g, _)| *g == digest) {
                let (_, how) = self.approved_parses.remove(i);
                let decided = match how {
                    Verdicts::Ticket(t) => t.decision(),
                    Verdicts::Granted(d) => Some(d),
                };
                if let Some(d) = decided.filter(|d| d.action == Action::Allow) {
                    return Verdict::Pass(Some(d));
                }
            }
        }
        let mut key = String::new();
        let shape = crate::redact::classification_key(seen.text, &mut key).then_some(key);
        let text = match crate::redact::may_hold_secret(seen.text) {
            true => crate::redact::redact_sql(seen.text),
            false => seen.text.to_owned(),
        };
        let asked = Asked::Statement {
            text,
            class: seen.class.class,
            tables: seen.class.tables.to_vec(),
            digest,
            shape,
        };
        let wake = asking.wake.clone();
        let ask = Ask {
            rule: &d.rule,
            terms: &terms,
            target: &self.policy.parties.target,
            requester: &asking.requester,
            asked,
        };
        let remember = seen.kind == StatementKind::Parse;
        let (verdict, how) = match asking.broker.ask(ask, Box::new(move || wake())) {
            Answer::Granted(d) => (Verdict::Pass(Some(d.clone())), Some(Verdicts::Granted(d))),
            Answer::Held(t) => (Verdict::Hold(t.clone()), Some(Verdicts::Ticket(t))),
            Answer::Refused(d) => (Verdict::Refuse(d), None),
        };
        if let (true, Some(how)) = (remember && terms.scope == Scope::Once, how) {
            if self.approved_parses.len() >= APPROVED_PARSES {
                self.approved_parses.remove(0);
            }
            self.approved_parses.push((digest, how));
        }
        verdict
    }

    /// What each of `cols` is computed from: its statement's derivation,
    /// and what the connection's statements said about its name. Rows whose
    /// statement does not show their source (or is not known) also count
    /// every computed column seen on the connection.
    fn derived(&self, cols: &[Column<'_>], d: Option<&crate::sql::Derivation>) -> Vec<Sources> {
        let learned = &self.learned;
        let opaque = d.is_none_or(|d| d.opaque);
        cols.iter()
            .enumerate()
            .map(|(i, col)| {
                let name = col.name.to_lowercase();
                let mut s = d.map(|d| d.column(i, &name)).unwrap_or_default();
                if let Some(from) = learned.aliases.get(&name) {
                    s.add(from);
                }
                if opaque {
                    s.add(&learned.unplaced);
                    // Rows of a statement that did not parse (or is not
                    // known) could hold anything: masked whole.
                    s.whole_row |= learned.saturated || d.is_none();
                }
                s
            })
            .collect()
    }
}

impl Gate for AgentGate {
    fn flags(&mut self) -> Flags {
        let Policies {
            parties: p,
            current,
            flags,
        } = &mut self.policy;
        let policy = current.load();
        match flags {
            Some((of, f)) if Arc::ptr_eq(of, policy) => *f,
            _ => {
                let f = Flags {
                    masking: policy.masks(&p.workload, &p.target),
                    record_parameters: policy.record_parameters,
                };
                *flags = Some((policy.clone(), f));
                f
            }
        }
    }

    /// Classification of `text`, cached by its
    /// [classification key](crate::redact::classification_key) (the text
    /// without its values, where that is certain to be safe), since drivers
    /// send the same statements with different values over and over.
    /// Whether the text may hold a secret is cached with it: every text of
    /// one key has the same words, and only a word leads to a secret.
    fn classify(&mut self, text: &str, reading: Result<Dialect, String>) -> Classified {
        let Cache { by_key, key } = &mut self.seen;
        let dialect = match reading {
            Ok(d) if crate::redact::classification_key(text, key) => d,
            // Not known how the server reads it, or no key: classified
            // anew (and not cached).
            other => return Classified::afresh(text, other),
        };
        if let Some(c) = by_key.get(key.as_str()) {
            return c.clone();
        }
        let c = Classified::scanned(key, classify_with(text, dialect));
        if c.class.reads_literals {
            // Its values decide it: every text of the key is read anew.
            return c;
        }
        if by_key.len() >= CLASS_CACHE {
            by_key.clear();
        }
        by_key.insert(key.clone(), c.clone());
        c
    }

    fn reading_changed(&mut self) {
        self.seen.by_key.clear();
    }

    /// Decided by the policy in force; a run of a prepared statement is
    /// taken from its memo while the policy that made it is in force.
    /// Statements other than runs teach what their columns come from, when
    /// masking applies.
    fn statement(&mut self, mut seen: Seen<'_>) -> Verdict {
        if seen.kind != StatementKind::Execute && self.flags().masking {
            self.learned.learn(seen.class);
        }
        let Policies {
            parties: p,
            current,
            ..
        } = &mut self.policy;
        let policy = current.load();
        let memo = match seen.memo.as_deref() {
            Some(Memo(Some((of, d)))) if std::ptr::addr_eq(of.as_ptr(), Arc::as_ptr(policy)) => {
                Some(d.clone())
            }
            _ => None,
        };
        let d = match memo {
            Some(d) => d,
            None => {
                let d = policy.decide_statement(&p.workload, &p.target, seen.class, seen.text);
                if let Some(m) = seen.memo.as_deref_mut() {
                    let of: Arc<dyn std::any::Any + Send + Sync> = policy.clone();
                    m.0 = Some((Arc::downgrade(&of), d.clone()));
                }
                d
            }
        };
        if d.action != Action::Review {
            return Verdict::of(d);
        }
        let policy = policy.clone();
        self.review(&seen, d, &policy)
    }

    fn result_shape(
        &mut self,
        cols: &[Column<'_>],
        class: Option<&Classification>,
        k: usize,
    ) -> Option<Masks> {
        let p = &self.policy.parties;
        let shape: Vec<(&str, Option<&str>)> = cols.iter().map(|c| (c.name, c.type_name)).collect();
        let derived = self.derived(cols, class.and_then(|c| c.derivations.get(k)));
        let plan = p
            .policy
            .load()
            .mask_plan(&p.workload, &p.target, class, &shape, &derived);
        plan.iter().any(Option::is_some).then_some(plan)
    }

    fn mask(&self, m: &ColumnMask, value: &[u8]) -> Vec<u8> {
        self.policy.parties.masker.mask(m.strategy, m.keep, value)
    }

    fn message_rule(&mut self, classes: &[Option<Arc<Classification>>]) -> Option<Arc<str>> {
        let p = &self.policy.parties;
        let policy = p.policy.load();
        if classes.is_empty() {
            policy.message_mask_rule(&p.workload, &p.target, None)
        } else {
            classes
                .iter()
                .find_map(|c| policy.message_mask_rule(&p.workload, &p.target, c.as_deref()))
        }
    }

    fn names_rule(&self, rule: &str) -> bool {
        self.policy.parties.policy.load().names_rule(rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::Class;

    fn gate(toml: &str) -> AgentGate {
        let policy = Policy::from_texts(&[(std::path::Path::new("p.toml"), toml)], None).unwrap();
        AgentGate::new(
            Parties {
                policy: Arc::new(ArcSwap::from_pointee(policy)),
                workload: "w".into(),
                target: "t".into(),
                masker: Arc::new(Masker::new(b"unit-test-key")),
            },
            None,
        )
    }

    /// Texts that differ only in their values share one cached
    /// classification; a text whose values decide its class is never
    /// cached; a change in how the server reads text empties the cache.
    #[test]
    fn classifications_are_cached_by_key() {
        let mut g = gate("");
        for aid in 1..=5 {
            let text = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid}");
            let c = g.classify(&text, Ok(Dialect::default()));
            assert_eq!(c.class.class, Class::Read);
        }
        assert_eq!(g.seen.by_key.len(), 1);
        g.classify(
            "SELECT query_to_xml('select 1', true, false, '')",
            Ok(Dialect::default()),
        );
        assert_eq!(
            g.seen.by_key.len(),
            1,
            "a text whose values decide it is not cached"
        );
        g.reading_changed();
        assert!(g.seen.by_key.is_empty());
    }

    /// Rows of a statement whose columns cannot be traced (it did not
    /// parse) are masked whole on a connection with mask rules; rows of one
    /// that parsed are masked by column.
    #[test]
    fn rows_of_untraceable_statements_are_masked_whole() {
        let toml = "[[rule]]\nid = \"cards\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\naction = \"mask\"\ncolumns = [\"card\"]\nstrategy = \"redact\"\n";
        let mut gate = gate(toml);
        let cols = [
            Column {
                name: "id",
                type_name: Some("int4"),
            },
            Column {
                name: "c",
                type_name: Some("text"),
            },
        ];
        let mut masked = |c: &Classification| -> Vec<bool> {
            let plan = gate.result_shape(&cols, Some(c), 0);
            plan.map_or(vec![false; 2], |p| p.iter().map(Option::is_some).collect())
        };
        assert_eq!(
            masked(&crate::sql::classify("select id, card as c from t")),
            [false, true]
        );
        assert_eq!(
            masked(&crate::sql::classify("select id, note as c from t")),
            [false, false]
        );
        assert_eq!(
            masked(&Classification::not_sql("<too large>", Class::Unknown)),
            [true, true]
        );
    }
}
