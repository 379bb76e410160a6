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
use bytes::BytesMut;
use interceptor::{
    gate::{AgentGate, Parties},
    mask::Masker,
    policy::{Action, Policy},
    protocol::postgres::{Backend, Frontend, Outbox, State},
};
use libfuzzer_sys::fuzz_target;

static POLICY: LazyLock<Arc<ArcSwap<Policy>>> = LazyLock::new(|| {
    let rules = include_str!("../../policies/orders-db-statements.toml");
    let policy = Policy::from_texts(
        &[
            (Path::new("defaults.toml"), "[defaults]\nrecord_parameters = true\n"),
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
    let gate = AgentGate::new(Parties {
        policy: POLICY.clone(),
        workload: "reporting".into(),
        target: "orders-db".into(),
        masker: Arc::new(Masker::new(b"fuzz")),
    });
    let mut state = State::new(Box::new(gate), Outbox::default());
    let (mut front, mut back) = (Frontend::default(), Backend::default());
    let (mut from_client, mut from_server) = (BytesMut::new(), BytesMut::new());
    let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
    let (mut client_parts, mut server_parts) = (client.chunks(step), server.chunks(step));
    let (mut client_over, mut server_over) = (false, false);
    while !(client_over && server_over) {
        if !client_over {
            client_over = match client_parts.next() {
                Some(part) => {
                    from_client.extend_from_slice(part);
                    front
                        .feed(&mut from_client, &mut to_server, &mut to_client, &mut state)
                        .is_err()
                }
                None => {
                    let _ = front.eof(&from_client, &mut state);
                    true
                }
            };
        }
        if !server_over {
            server_over = match server_parts.next() {
                Some(part) => {
                    from_server.extend_from_slice(part);
                    back.feed(&mut from_server, &mut to_client, &mut state).is_err()
                }
                None => {
                    let _ = back.eof(&from_server);
                    true
                }
            };
        }
    }
    for sql in statements_sent(&to_server) {
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
    state.ended();
    let _ = state.take_done();
    let _ = state.outbox().take_startup();
});

/// The SQL of every Query and Parse in what went to the server (after the
/// startup packet), except the agent's own refusals.
fn statements_sent(out: &[u8]) -> Vec<String> {
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let mut found = Vec::new();
    if out.len() < 4 {
        return found;
    }
    let mut rest = &out[be32(out).min(out.len())..];
    while rest.len() >= 5 {
        let (ty, len) = (rest[0], be32(&rest[1..5]));
        let Some(body) = rest.get(5..1 + len) else {
            break;
        };
        let sql = match ty {
            b'Q' => body,
            b'P' => body.splitn(2, |&c| c == 0).nth(1).unwrap_or_default(),
            _ => &[],
        };
        let sql = String::from_utf8_lossy(sql.split(|&c| c == 0).next().unwrap_or_default());
        if matches!(ty, b'Q' | b'P') && !sql.starts_with("DO $interceptor$") {
            found.push(sql.into_owned());
        }
        rest = &rest[1 + len..];
    }
    found
}
