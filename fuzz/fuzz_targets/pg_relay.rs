//! Both directions of the PostgreSQL relay on arbitrary bytes, with the
//! repository's statement policy active for a workload that has deny and
//! mask rules, and Bind parameters recorded. The two machines are fed in
//! turns (the server answering while the client pipelines), in chunks of
//! a size the input chooses, so frames split anywhere. Every run must end
//! in `Ok` or an error, never a panic, a hang or a sanitizer report; and
//! every statement that reaches the server must be one the policy allows
//! when classified afresh (no cache, no earlier context).
#![no_main]

use std::{
    path::Path,
    sync::{Arc, LazyLock},
};

use arc_swap::ArcSwap;
use interceptor::{
    gate::{AgentGate, Parties},
    mask::Masker,
    policy::{Action, Policy},
    protocol::postgres::{Outbox, State},
};
use interceptor_wire::postgres::testing::{in_turns, Sent};
use libfuzzer_sys::fuzz_target;

static POLICY: LazyLock<Arc<ArcSwap<Policy>>> = LazyLock::new(|| {
    let rules = include_str!("../../policies/orders-db-statements.toml");
    let policy = Policy::from_texts(
        &[
            (
                Path::new("defaults.toml"),
                "[defaults]\nrecord_parameters = true\n",
            ),
            (Path::new("orders-db-statements.toml"), rules),
        ],
        None,
    )
    .expect("fuzz policy loads");
    Arc::new(ArcSwap::from_pointee(policy))
});

// The first byte splits the input (client bytes before, server bytes
// after) and sets the chunk size.
fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let step = 1 + (cut as usize * 7) % 509;
    let cut = (cut as usize * rest.len()) / 255;
    let (client, server) = rest.split_at(cut);
    let gate = AgentGate::new(
        Parties {
            policy: POLICY.clone(),
            workload: "reporting".into(),
            target: "orders-db".into(),
            masker: Arc::new(Masker::new(b"fuzz")),
        },
        None,
    );
    let mut state = State::new(Box::new(gate), Outbox::default());
    let mut sent = Sent::default();
    in_turns(&mut state, (client, server), step, |to_server| {
        for sql in sent.statements(to_server) {
            let c = interceptor::sql::classify(&sql);
            let d = POLICY
                .load()
                .decide_statement("reporting", "orders-db", &c, &sql);
            assert_ne!(
                d.action,
                Action::Deny,
                "{sql:?} reached the server ({})",
                d.rule
            );
        }
    });
    let _ = state.take_done();
    let _ = state.outbox().take_facts();
});
