//! Both PostgreSQL machines on arbitrary bytes, with a gate that passes
//! reads, holds writes, refuses the rest, and masks every value. The two
//! machines are fed in turns, in chunks of a size the input chooses, so
//! frames split anywhere; held statements are decided between turns,
//! allowed and denied in an order the input chooses, and their
//! connection fed again as a woken one is. Every run must end in `Ok` or
//! an error, never a panic, a hang or a sanitizer report; and every
//! statement that reaches the server must be one the gate passed, or a
//! held one allowed before it went (nothing held slips through early).
#![no_main]

use std::sync::{Arc, Mutex};

use interceptor_record::{Action, Decision};
use interceptor_sql::{Class, Classification, Dialect};
use interceptor_wire::{
    postgres::{
        testing::{in_turns, Sent},
        Outbox, State,
    },
    seam::{
        Classified, Column, ColumnMask, Flags, Gate, Masks, Open, Seen, Strategy, Ticket, Verdict,
    },
};
use libfuzzer_sys::fuzz_target;

/// What the gate let through so far, and the tickets waiting.
#[derive(Default)]
struct Ledger {
    passed: Vec<String>,
    waiting: Vec<(Ticket, String)>,
}

struct Strict(Arc<Mutex<Ledger>>);

impl Gate for Strict {
    fn flags(&mut self) -> Flags {
        Flags {
            masking: true,
            record_parameters: true,
        }
    }

    fn classify(&mut self, text: &str, reading: Result<Dialect, String>) -> Classified {
        Open.classify(text, reading)
    }

    fn reading_changed(&mut self) {}

    fn statement(&mut self, seen: Seen<'_>) -> Verdict {
        let mut ledger = self.0.lock().unwrap();
        match seen.class.class {
            Class::Read => {
                ledger.passed.push(seen.text.to_owned());
                Verdict::Pass(Some(decision(Action::Allow, "reads")))
            }
            Class::Write => {
                let t = Ticket::new("writes-wait".into(), Some("wait".into()), Box::new(|| {}));
                ledger.waiting.push((t.clone(), seen.text.to_owned()));
                Verdict::Hold(t)
            }
            _ => Verdict::Refuse(decision(Action::Deny, "the-rest")),
        }
    }

    fn result_shape(
        &mut self,
        columns: &[Column<'_>],
        _: Option<&Classification>,
        k: usize,
    ) -> Option<Masks> {
        let strategy = [Strategy::Redact, Strategy::Partial, Strategy::Hash][k % 3];
        let mask = ColumnMask {
            rule: "every-value".into(),
            strategy,
            keep: 2,
        };
        Some(vec![Some(mask); columns.len()])
    }

    fn mask(&self, how: &ColumnMask, value: &[u8]) -> Vec<u8> {
        match how.strategy {
            Strategy::Partial => {
                let keep = value.len().saturating_sub(how.keep);
                [b"****", &value[keep..]].concat()
            }
            _ => b"****".to_vec(),
        }
    }

    fn message_rule(&mut self, _: &[Option<Arc<Classification>>]) -> Option<Arc<str>> {
        Some("every-value".into())
    }

    fn names_rule(&self, rule: &str) -> bool {
        matches!(rule, "reads" | "writes-wait" | "the-rest")
    }
}

fn decision(action: Action, rule: &str) -> Decision {
    Decision::new(action, rule.into())
}

// The first byte splits the input (client bytes before, server bytes
// after) and sets the chunk size; the second, which held statements are
// allowed.
fuzz_target!(|data: &[u8]| {
    let Some((&[cut, choice], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let step = 1 + (cut as usize * 7) % 509;
    let cut = (cut as usize * rest.len()) / 255;
    let (client, server) = rest.split_at(cut);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut state = State::new(Box::new(Strict(ledger.clone())), Outbox::default());
    let (mut sent, mut decided) = (Sent::default(), 0u32);
    in_turns(&mut state, (client, server), step, |to_server| {
        let mut ledger = ledger.lock().unwrap();
        for sql in sent.statements(to_server) {
            assert!(
                ledger.passed.contains(&sql),
                "{sql:?} reached the server, not passed by the gate"
            );
        }
        // The tickets waiting are decided, and the connection woken.
        for (ticket, text) in std::mem::take(&mut ledger.waiting) {
            let allow = choice >> (decided % 8) & 1 == 1;
            decided += 1;
            if allow {
                ledger.passed.push(text);
            }
            let action = if allow { Action::Allow } else { Action::Deny };
            ticket.decide(decision(action, "second-person"));
        }
    });
    let _ = state.take_done();
    let _ = state.outbox().take_facts();
});
