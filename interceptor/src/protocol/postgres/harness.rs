//! The engine harness behind `cargo xtask bench engine`: the two machines of
//! one PostgreSQL connection fed, in this process and with no socket, the
//! messages `pgbench -S` exchanges with a server, under a statement policy
//! (classification, decision, recording on). What it measures is what the
//! relay loop spends per transaction above moving bytes.

use std::{path::Path, sync::Arc, time::Instant};

use arc_swap::ArcSwap;
use bytes::{BufMut, BytesMut};

use super::{Backend, Frontend, Outbox, State};
use crate::gate::{AgentGate, Parties};
use crate::{mask::Masker, policy::Policy};

/// pgbench's query protocols (`-M`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Simple,
    Extended,
    Prepared,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "simple" => Ok(Mode::Simple),
            "extended" => Ok(Mode::Extended),
            "prepared" => Ok(Mode::Prepared),
            _ => Err(format!("`{s}`: simple, extended or prepared")),
        }
    }
}

const POLICY: &str = r#"
[defaults]
connect = "allow"
statement = "allow"

[[rule]]
id = "no-ddl"
on = "statement"
workloads = ["*"]
targets = ["*"]
classes = ["ddl", "admin", "unknown"]
action = "deny"
"#;

/// A review rule none of the traffic matches (writes to pgbench's tables),
/// added for `--review`: review must cost nothing where it does not apply.
const REVIEW: &str = r#"
[[rule]]
id = "review-writes"
on = "statement"
workloads = ["*"]
targets = ["*"]
classes = ["write", "ddl"]
tables = ["pgbench_*"]
action = "review"
approvers = [{ groups = ["dba"] }]
"#;

const SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = ";

fn message(out: &mut BytesMut, ty: u8, body: &[u8]) {
    out.put_u8(ty);
    out.put_u32(4 + body.len() as u32);
    out.put_slice(body);
}

fn cstrs(parts: &[&[u8]]) -> Vec<u8> {
    let mut b = Vec::new();
    for p in parts {
        b.extend_from_slice(p);
        b.push(0);
    }
    b
}

/// Bind of portal "" to `stmt` with one text parameter.
fn bind(stmt: &[u8], aid: u32) -> Vec<u8> {
    let value = aid.to_string();
    let mut b = cstrs(&[b"", stmt]);
    b.extend_from_slice(&0u16.to_be_bytes()); // parameter formats: all text
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&(value.len() as u32).to_be_bytes());
    b.extend_from_slice(value.as_bytes());
    b.extend_from_slice(&0u16.to_be_bytes()); // result formats: all text
    b
}

/// What the client sends for transaction `aid`, and the server's answer.
fn transaction(mode: Mode, aid: u32, client: &mut BytesMut, server: &mut BytesMut) {
    let param = format!("{SQL}$1");
    match mode {
        Mode::Simple => {
            let q = format!("{SQL}{aid};");
            message(client, b'Q', &cstrs(&[q.as_bytes()]));
        }
        Mode::Extended => {
            let mut parse = cstrs(&[b"", param.as_bytes()]);
            parse.extend_from_slice(&0u16.to_be_bytes());
            message(client, b'P', &parse);
            message(client, b'B', &bind(b"", aid));
            message(client, b'D', b"P\0");
            message(client, b'E', b"\0\0\0\0\0");
            message(client, b'S', b"");
            message(server, b'1', b"");
        }
        Mode::Prepared => {
            message(client, b'B', &bind(b"P0_1", aid));
            message(client, b'D', b"P\0");
            message(client, b'E', b"\0\0\0\0\0");
            message(client, b'S', b"");
        }
    }
    if mode != Mode::Simple {
        message(server, b'2', b"");
    }
    // RowDescription: one int4 column, abalance.
    let mut t = 1u16.to_be_bytes().to_vec();
    t.extend_from_slice(b"abalance\0");
    t.extend_from_slice(&16_398u32.to_be_bytes()); // table oid
    t.extend_from_slice(&3u16.to_be_bytes()); // column number
    t.extend_from_slice(&23u32.to_be_bytes()); // int4
    t.extend_from_slice(&4i16.to_be_bytes());
    t.extend_from_slice(&(-1i32).to_be_bytes());
    t.extend_from_slice(&0u16.to_be_bytes());
    message(server, b'T', &t);
    let mut d = 1u16.to_be_bytes().to_vec();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.push(b'0');
    message(server, b'D', &d);
    message(server, b'C', b"SELECT 1\0");
    message(server, b'Z', b"I");
}

/// One connection's machines, after its startup and (prepared) its
/// statement's preparation.
struct Connection {
    front: Frontend,
    back: Backend,
    state: State,
    from_client: BytesMut,
    from_server: BytesMut,
    to_server: BytesMut,
    to_client: BytesMut,
}

impl Connection {
    fn new(mode: Mode, review: bool) -> Connection {
        let text = match review {
            true => format!("{POLICY}{REVIEW}"),
            false => POLICY.to_owned(),
        };
        let policy = Policy::from_texts(&[(Path::new("bench.toml"), &text)], None)
            .expect("the bench policy compiles");
        let gate = AgentGate::new(
            Parties {
                policy: Arc::new(ArcSwap::from_pointee(policy)),
                workload: "pgbench".into(),
                target: "db".into(),
                masker: Arc::new(Masker::new(b"bench-engine-key")),
            },
            None,
        );
        let state = State::new(Box::new(gate), Outbox::default());
        let mut c = Connection {
            front: Frontend::default(),
            back: Backend::default(),
            state,
            from_client: BytesMut::new(),
            from_server: BytesMut::new(),
            to_server: BytesMut::new(),
            to_client: BytesMut::new(),
        };
        let mut startup = Vec::new();
        startup.extend_from_slice(&196_608u32.to_be_bytes());
        startup.extend_from_slice(&cstrs(&[b"user", b"postgres", b"database", b"bench", b""]));
        c.from_client.put_u32(4 + startup.len() as u32);
        c.from_client.put_slice(&startup);
        message(&mut c.from_server, b'R', &0u32.to_be_bytes());
        message(&mut c.from_server, b'S', b"client_encoding\0UTF8\0");
        message(
            &mut c.from_server,
            b'S',
            b"standard_conforming_strings\0on\0",
        );
        message(&mut c.from_server, b'Z', b"I");
        if mode == Mode::Prepared {
            let mut parse = cstrs(&[b"P0_1", format!("{SQL}$1").as_bytes()]);
            parse.extend_from_slice(&0u16.to_be_bytes());
            message(&mut c.from_client, b'P', &parse);
            message(&mut c.from_client, b'S', b"");
            message(&mut c.from_server, b'1', b"");
            message(&mut c.from_server, b'Z', b"I");
        }
        c.exchange();
        c
    }

    /// The client's bytes through its machine, then the server's answer
    /// through the other; what comes out is dropped.
    fn exchange(&mut self) {
        self.front
            .feed(
                &mut self.from_client,
                &mut self.to_server,
                &mut self.to_client,
                &mut self.state,
            )
            .expect("the client's bytes pass");
        self.back
            .feed(&mut self.from_server, &mut self.to_client, &mut self.state)
            .expect("the server's bytes pass");
        assert!(self.from_client.is_empty() && self.from_server.is_empty());
        self.to_server.clear();
        self.to_client.clear();
    }
}

/// Distinct transactions the run cycles through (their bytes are made
/// before the clock starts).
const DISTINCT: u32 = 1000;

/// Runs `txns` transactions of `mode` on one connection; nanoseconds per
/// transaction. Finished records are taken every 1000 transactions, as the
/// worker's flush task takes them every 200 ms.
pub fn run(mode: Mode, txns: u32, review: bool) -> f64 {
    let mut c = Connection::new(mode, review);
    let traffic: Vec<(BytesMut, BytesMut)> = (1..=DISTINCT)
        .map(|aid| {
            let (mut client, mut server) = (BytesMut::new(), BytesMut::new());
            transaction(mode, aid * 97, &mut client, &mut server);
            (client, server)
        })
        .collect();
    let start = Instant::now();
    for i in 0..txns {
        let (client, server) = &traffic[(i % DISTINCT) as usize];
        c.from_client.extend_from_slice(client);
        c.from_server.extend_from_slice(server);
        c.exchange();
        if i % 1000 == 999 {
            drop(c.state.outbox().take());
        }
    }
    let elapsed = start.elapsed();
    drop(c.state.outbox().take());
    elapsed.as_nanos() as f64 / f64::from(txns.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every mode's traffic passes the machines and is recorded: one
    /// statement per transaction (a prepared statement's runs are
    /// `execute`s), with the server's tag.
    #[test]
    fn the_harness_traffic_is_recorded_as_pgbench_would_be() {
        let each = [Mode::Simple, Mode::Extended, Mode::Prepared]
            .into_iter()
            .flat_map(|m| [(m, false), (m, true)]);
        for (mode, review) in each {
            let mut c = Connection::new(mode, review);
            let _ = c.state.take_done();
            for aid in 1..=3 {
                transaction(mode, aid, &mut c.from_client, &mut c.from_server);
                c.exchange();
            }
            let done = c.state.take_done();
            assert_eq!(done.len(), 3, "{mode:?}: {done:#?}");
            for s in &done {
                assert_eq!(
                    s.tags.iter().map(|t| &**t).collect::<Vec<_>>(),
                    ["SELECT 1"],
                    "{mode:?}: {s:#?}"
                );
                assert!(s.text.starts_with(SQL), "{mode:?}: {s:#?}");
                assert_eq!(s.decision, Some(crate::policy::Action::Allow), "{s:#?}");
            }
        }
        assert!(run(Mode::Simple, 10, true) > 0.0);
    }
}
