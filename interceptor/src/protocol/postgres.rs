//! PostgreSQL in the agent: the wire machines ([`interceptor_wire::postgres`],
//! re-exported here) on the relay loops, the sessions the agent opens
//! itself ([`login`]: a server that cannot be reached, TLS on either hop,
//! an injected credential), and the engine benchmark's harness.

use std::{io, sync::Arc};

use bytes::BytesMut;
use interceptor_relay::{self as relay_loop, End, Ending};

pub use interceptor_wire::postgres::*;

pub mod harness;
pub mod login;

/// PostgreSQL in the protocol registry (see [`super::handler`]).
pub struct Postgres;

impl super::Handler for Postgres {
    fn machines(
        &self,
        gate: Box<dyn Gate>,
        outbox: Outbox,
    ) -> Box<dyn relay_loop::Machines<Error = Ending>> {
        Box::new(OnLoop(Machines::new(State::new(gate, outbox))))
    }

    /// See [`login`].
    fn open<'a>(&'a self, o: super::Opening<'a>) -> super::Opens<'a> {
        Box::pin(login::open(o))
    }
}

/// Relays one PostgreSQL connection on a relay loop, its two machines
/// between the two sockets ([`interceptor_relay::relay_inspected`]): every
/// socket event is answered there, with no runtime in between. `bell`
/// wakes the connection when a held statement is decided (see
/// [`Verdict::Hold`]). What it records goes to the state's outbox, the
/// rest of it once the connection ends.
pub async fn relay(
    client: impl TryInto<relay_loop::Stream, Error = io::Error>,
    upstream: impl TryInto<relay_loop::Stream, Error = io::Error>,
    state: State,
    progress: Arc<relay_loop::Progress>,
    bell: relay_loop::Bell,
) -> End {
    let machines = OnLoop(Machines::new(state));
    relay_loop::relay_inspected(client, upstream, machines, progress, Some(bell)).await
}

/// A connection's machines as a relay loop drives them.
struct OnLoop(Machines);

/// A PostgreSQL connection's errors end it as the relay says: a refused
/// login is a refusal; the rest are failures.
fn ending(e: PgError) -> Ending {
    match e {
        PgError::Io(e) => Ending::Failed(e),
        e @ PgError::StartupRefused { .. } => Ending::Refused(e.to_string()),
        e => Ending::Failed(io::Error::other(e.to_string())),
    }
}

impl relay_loop::Machines for OnLoop {
    type Error = Ending;

    fn client(
        &mut self,
        input: &mut BytesMut,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) -> Result<(), Ending> {
        self.0.client(input, to_server, to_client).map_err(ending)
    }

    fn client_ended(&mut self, input: &[u8]) -> Result<(), Ending> {
        self.0.client_ended(input).map_err(ending)
    }

    fn server(&mut self, input: &mut BytesMut, to_client: &mut BytesMut) -> Result<(), Ending> {
        self.0.server(input, to_client).map_err(ending)
    }

    fn server_ended(&mut self, input: &[u8]) -> Result<(), Ending> {
        self.0.server_ended(input).map_err(ending)
    }

    fn holding(&self) -> bool {
        self.0.holding()
    }

    /// However the connection ends (its loop stopping included), what it
    /// has not recorded yet goes to the outbox before the end is told.
    fn ended(&mut self) {
        self.0.ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::loopback_pair as pair;
    use crate::{
        gate::{AgentGate, Parties},
        mask::Masker,
        policy::Policy,
    };
    use crate::{
        record::Action,
        sql::{Class, Classification},
    };
    use arc_swap::ArcSwap;
    use interceptor_wire::postgres::testing::{frame as msg, *};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The policy in `toml` (its errors naming `tag`).
    fn policy(tag: &str, toml: &str) -> Arc<ArcSwap<Policy>> {
        let policy = Policy::from_texts(&[(std::path::Path::new(tag), toml)], None).unwrap();
        Arc::new(ArcSwap::from_pointee(policy))
    }

    /// A connection of workload `w` to target `t` under `policy`.
    fn gated(policy: Arc<ArcSwap<Policy>>) -> State {
        let gate = AgentGate::new(
            Parties {
                policy,
                workload: "w".into(),
                target: "t".into(),
                masker: Arc::new(Masker::new(b"unit-test-key")),
            },
            None,
        );
        State::new(Box::new(gate), Outbox::default())
    }

    /// A denied Parse in a pipeline: the server gets Parse/Bind/Execute of
    /// the refusal instead, the client's own Bind/Execute/Sync follow
    /// unchanged (the server skips them after the error), and the client
    /// sees ErrorResponse then ReadyForQuery, never the injected answers.
    #[test]
    fn denied_parse_becomes_the_servers_own_error() {
        let toml = "[[rule]]\nid = \"no-writes\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\nclasses = [\"write\"]\naction = \"deny\"\n";
        let mut state = gated(policy("unit", toml));
        let mut input = b"\0\0\0\x09\0\x03\0\0\0".to_vec(); // startup, no parameters
        let parse = msg(b'P', b"s1\0DELETE FROM t\0\0\0");
        let bind = msg(b'B', b"\0s1\0\0\0\0\0\0\0");
        let exec = msg(b'E', b"\0\0\0\0\0");
        let sync = msg(b'S', b"");
        for m in [&parse, &bind, &exec, &sync] {
            input.extend_from_slice(m);
        }
        let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
        frontend(&mut &input[..], &mut to_server, &mut to_client, &mut state).unwrap();
        let sent = String::from_utf8_lossy(&to_server);
        assert!(
            !sent.contains("DELETE FROM t"),
            "the denied statement reached the server"
        );
        assert!(sent.contains("RAISE EXCEPTION USING ERRCODE = '42501'"));
        assert!(sent.contains("denied by rule \"no-writes\""));
        assert!(to_server.ends_with(&[bind.clone(), exec.clone(), sync.clone()].concat()));

        // The login's ReadyForQuery, then the batch's answer.
        let mut server = msg(b'Z', b"I");
        server.extend(msg(b'1', b""));
        server.extend(msg(b'2', b""));
        let error = msg(
            b'E',
            b"SERROR\0C42501\0Minterceptor: statement denied by rule \"no-writes\"\0\0",
        );
        server.extend(&error);
        server.extend(msg(b'Z', b"I"));
        let mut out = Vec::new();
        backend(&mut &server[..], &mut out, &mut state).unwrap();
        assert_eq!(out, [msg(b'Z', b"I"), error, msg(b'Z', b"I")].concat());
        let done = state.take_done();
        assert_eq!(done[0].decision, Some(Action::Deny));
        assert_eq!(done[0].rule.as_deref(), Some("no-writes"));
        assert_eq!(done[0].error.as_deref(), Some("42501"));
    }

    /// A Query sent after extended-protocol messages with no Sync between:
    /// if one of those messages fails, the server skips the Query (and
    /// everything else) until the client's Sync, and answers all of it with
    /// one ReadyForQuery. The statements after are answered by their own.
    #[test]
    fn a_query_skipped_after_a_failed_extended_message_is_recorded_as_not_run() {
        let allow =
            "[[rule]]\nid = \"all\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\naction = \"allow\"\n";
        let q = |sql: &str| msg(b'Q', format!("{sql}\0").as_bytes());
        let (sync, ready) = (msg(b'S', b""), msg(b'Z', b"I"));
        let error = |code: &str| msg(b'E', format!("SERROR\0C{code}\0Mno\0\0").as_bytes());
        let row = |v: &[u8]| msg(b'D', &[b"\0\x01\0\0\0\x01", v].concat());
        let column = msg(
            b'T',
            b"\0\x01?column?\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        );
        let selected = |v: &[u8]| {
            vec![
                column.clone(),
                row(v),
                msg(b'C', b"SELECT 1\0"),
                ready.clone(),
            ]
        };
        let exec = msg(b'E', b"\0\0\0\0\0");
        let answered = |text: &str, tags: &[&str], error: Option<&str>| -> Recorded {
            let tags = tags.iter().map(|t| t.to_string()).collect();
            (text.into(), tags, error.map(Into::into), true)
        };

        let cases: [(&str, Vec<Exchange>, Vec<Recorded>); 3] = [
            // The Bind fails (no parameter for $1): the Query is skipped.
            (
                "skip-bind",
                vec![
                    (
                        vec![
                            msg(b'P', b"s1\0SELECT $1::int\0\0\0"),
                            msg(b'B', b"\0s1\0\0\0\0\0\0\0"),
                            exec.clone(),
                            q("SELECT 2"),
                            sync.clone(),
                        ],
                        vec![msg(b'1', b""), error("08P01"), ready.clone()],
                    ),
                    (vec![q("SELECT 3")], selected(b"3")),
                ],
                vec![
                    answered("SELECT $1::int", &[], Some("08P01")),
                    answered("SELECT 2", &[], Some("08P01")),
                    answered("SELECT 3", &["SELECT 1"], None),
                ],
            ),
            // A Describe (not itself recorded) fails: the same.
            (
                "skip-describe",
                vec![
                    (
                        vec![
                            msg(b'P', b"s2\0SELECT 1\0\0\0"),
                            msg(b'D', b"Snope\0"),
                            q("SELECT 5"),
                            q("SELECT 55"),
                            sync.clone(),
                        ],
                        vec![msg(b'1', b""), error("26000"), ready.clone()],
                    ),
                    (vec![q("SELECT 6")], selected(b"6")),
                ],
                vec![
                    answered("SELECT 1", &[], Some("26000")),
                    answered("SELECT 5", &[], Some("26000")),
                    answered("SELECT 55", &[], Some("26000")),
                    answered("SELECT 6", &["SELECT 1"], None),
                ],
            ),
            // The extended messages succeed and the Query itself fails: it
            // is answered there, and the Sync by a ReadyForQuery of its own.
            (
                "query-fails",
                vec![
                    (
                        vec![
                            msg(b'P', b"s1\0SELECT 1\0\0\0"),
                            msg(b'B', b"\0s1\0\0\0\0\0\0\0"),
                            exec.clone(),
                            q("SELECT 1/0"),
                            sync.clone(),
                        ],
                        vec![
                            msg(b'1', b""),
                            msg(b'2', b""),
                            row(b"1"),
                            msg(b'C', b"SELECT 1\0"),
                            error("22012"),
                            ready.clone(),
                            ready.clone(),
                        ],
                    ),
                    (vec![q("SELECT 3")], selected(b"3")),
                ],
                vec![
                    answered("SELECT 1", &["SELECT 1"], None),
                    answered("SELECT 1/0", &[], Some("22012")),
                    answered("SELECT 3", &["SELECT 1"], None),
                ],
            ),
        ];
        for (tag, batches, want) in cases {
            let mut state = gated(policy(tag, allow));
            assert_eq!(relayed(&mut state, &batches), want, "{tag}");
        }
    }

    /// A FunctionCall is decided by the function it calls however large it
    /// is: one too large to hold is refused whole, or streams through.
    #[test]
    fn large_function_calls_are_decided_too() {
        let toml = "[[rule]]\nid = \"no-admin\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\nclasses = [\"admin\"]\naction = \"deny\"\n";
        let mut body = 2965u32.to_be_bytes().to_vec(); // lowrite
        body.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // no formats, one argument
        body.resize(MAX_STATEMENT + 100, b'x');
        let call = msg(b'F', &body);
        let startup = b"\0\0\0\x09\0\x03\0\0\0".to_vec();
        let input = [startup.clone(), call.clone(), msg(b'Q', b"SELECT 1\0")].concat();

        let mut denied = gated(policy("big-call", toml));
        let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
        frontend(&mut &input[..], &mut to_server, &mut to_client, &mut denied).unwrap();
        assert!(
            to_server.len() < 100_000,
            "{} bytes reached the server",
            to_server.len()
        );
        let sent = String::from_utf8_lossy(&to_server);
        assert!(sent.contains("denied by rule \"no-admin\""), "{sent}");
        assert!(to_server.ends_with(&msg(b'Q', b"SELECT 1\0")));
        let mut server = msg(b'Z', b"I");
        server.extend(msg(b'E', b"SERROR\0C42501\0Mdenied\0\0"));
        server.extend(msg(b'Z', b"I"));
        server.extend(msg(b'C', b"SELECT 1\0"));
        server.extend(msg(b'Z', b"I"));
        let mut out = Vec::new();
        backend(&mut &server[..], &mut out, &mut denied).unwrap();
        let done = denied.take_done();
        assert_eq!(done.len(), 2);
        assert_eq!(&*done[0].text, "<fast-path function call, oid 2965>");
        assert_eq!(done[0].decision, Some(Action::Deny));
        assert_eq!(
            tags(&done[1]),
            ["SELECT 1"],
            "the next batch is answered by its own"
        );

        let allow =
            "[[rule]]\nid = \"all\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\naction = \"allow\"\n";
        let mut allowed = gated(policy("big-call-ok", allow));
        let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
        frontend(
            &mut &input[..],
            &mut to_server,
            &mut to_client,
            &mut allowed,
        )
        .unwrap();
        assert!(to_server == input, "relayed unchanged");
        let mut server = msg(b'Z', b"I");
        server.extend(msg(b'V', b"\0\0\0\x04\0\0\0\x01"));
        server.extend(msg(b'Z', b"I"));
        server.extend(msg(b'C', b"SELECT 1\0"));
        server.extend(msg(b'Z', b"I"));
        backend(&mut &server[..], &mut out, &mut allowed).unwrap();
        let done = allowed.take_done();
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].decision, Some(Action::Allow));
        assert_eq!(tags(&done[1]), ["SELECT 1"]);
    }

    /// Statements that came in one read were sent together and share one
    /// time (the clocks are read once for them); the next read's
    /// statements get a later one, and their durations run from it.
    #[test]
    fn statements_of_one_read_share_their_time_and_the_next_read_has_its_own() {
        let allow =
            "[[rule]]\nid = \"all\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\naction = \"allow\"\n";
        let mut state = gated(policy("stamp", allow));
        let (mut front, mut back) = (Frontend::default(), Backend::default());
        let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
        let mut feed = |bytes: Vec<u8>| {
            let mut input = BytesMut::from(&bytes[..]);
            front
                .feed(&mut input, &mut to_server, &mut to_client, &mut state)
                .unwrap();
            assert!(input.is_empty());
        };
        feed(b"\0\0\0\x09\0\x03\0\0\0".to_vec());
        feed([msg(b'Q', b"select 1\0"), msg(b'Q', b"select 2\0")].concat());
        std::thread::sleep(std::time::Duration::from_millis(3));
        feed(msg(b'Q', b"select 3\0"));
        let mut answers = msg(b'Z', b"I");
        for _ in 0..3 {
            answers.extend(msg(b'C', b"SELECT 1\0"));
            answers.extend(msg(b'Z', b"I"));
        }
        let mut input = BytesMut::from(&answers[..]);
        back.feed(&mut input, &mut to_client, &mut state).unwrap();
        let done = state.take_done();
        let at: Vec<u64> = done.iter().map(|s| s.at).collect();
        assert_eq!(done.len(), 3);
        assert_eq!(at[0], at[1], "one read, one time");
        assert!(at[2] >= at[1] + 3000, "a later read, a later time: {at:?}");
        assert!(done.iter().all(|s| s.duration_us.is_some()));
    }

    /// Each run of a prepared statement is recorded: as the Parse's own
    /// record for a first run in the Parse's batch, as an `execute` (with
    /// the statement's text, class, decision and rule, and that batch's
    /// answer) for every other. Runs whose statement or portal the agent
    /// cannot know are recorded as such.
    #[test]
    fn executions_of_prepared_statements_are_recorded() {
        let allow = "[[rule]]\nid = \"reads\"\non = \"statement\"\nworkloads = [\"w\"]\ntargets = [\"t\"]\naction = \"allow\"\n";
        let rules = policy("exec", allow);
        let mut state = gated(rules.clone());
        let (mut f, mut b) = (Frontend::default(), Backend::default());
        let mut client: Vec<u8> = [0, 0, 0, 18, 0, 3, 0, 0].to_vec();
        client.extend_from_slice(b"user\0bob\0\0");
        let sync = msg(b'S', b"");
        let bind = |stmt: &str| {
            let mut body = format!("\0{stmt}\0").into_bytes();
            body.extend_from_slice(b"\0\0\0\x01\0\0\0\x017\0\0");
            msg(b'B', &body)
        };
        let exec = |portal: &str| msg(b'E', format!("{portal}\0\0\0\0\0").as_bytes());
        let ready = msg(b'Z', b"I");
        let (row, select) = (msg(b'D', b"\0\x01\0\0\0\x017"), msg(b'C', b"SELECT 1\0"));
        let read = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
        let write = "UPDATE t SET x = 'secret' WHERE y = $1";
        let batches: Vec<Exchange> = vec![
            // Prepared on its own (pgbench -M prepared), then run twice.
            (
                vec![
                    msg(b'P', format!("s1\0{read}\0\0\0").as_bytes()),
                    sync.clone(),
                ],
                vec![msg(b'1', b""), ready.clone()],
            ),
            (
                vec![bind("s1"), exec(""), sync.clone()],
                vec![msg(b'2', b""), row.clone(), select.clone(), ready.clone()],
            ),
            (
                vec![bind("s1"), exec(""), sync.clone()],
                vec![msg(b'2', b""), row.clone(), select.clone(), ready.clone()],
            ),
            // Parsed and run in one batch (pgbench -M extended), then run again.
            (
                vec![
                    msg(b'P', format!("\0{write}\0\0\0").as_bytes()),
                    bind(""),
                    exec(""),
                    sync.clone(),
                ],
                vec![
                    msg(b'1', b""),
                    msg(b'2', b""),
                    msg(b'C', b"UPDATE 3\0"),
                    ready.clone(),
                ],
            ),
            (
                vec![bind(""), exec(""), sync.clone()],
                vec![msg(b'2', b""), msg(b'C', b"UPDATE 3\0"), ready.clone()],
            ),
            // Closed, then bound again: the server says it does not exist.
            (
                vec![msg(b'C', b"Ss1\0"), sync.clone()],
                vec![msg(b'3', b""), ready.clone()],
            ),
            (
                vec![bind("s1"), exec(""), sync.clone()],
                vec![msg(b'E', b"SERROR\0C26000\0Mno s1\0\0"), ready.clone()],
            ),
            // A portal never bound.
            (
                vec![exec("nope"), sync.clone()],
                vec![msg(b'E', b"SERROR\0C34000\0Mno nope\0\0"), ready.clone()],
            ),
        ];
        let mut inp = BytesMut::new();
        let login = (vec![client], vec![ready.clone()]);
        let all: Vec<Exchange> = std::iter::once(login).chain(batches).collect();
        relay_batches(&mut state, (&mut f, &mut b), &mut inp, &all);
        let done = state.take_done();
        // kind, name, text, rows, error
        type Seen<'a> = (
            &'a str,
            Option<&'a str>,
            &'a str,
            Option<u64>,
            Option<&'a str>,
        );
        let seen: Vec<Seen> = done
            .iter()
            .map(|s| {
                (
                    s.kind.as_str(),
                    s.name.as_deref(),
                    &*s.text,
                    s.rows,
                    s.error.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("parse", Some("s1"), read, None, None),
                ("execute", Some("s1"), read, Some(1), None),
                ("execute", Some("s1"), read, Some(1), None),
                (
                    "parse",
                    Some(""),
                    "UPDATE t SET x = 'secret' WHERE y = $1",
                    Some(3),
                    None
                ),
                ("execute", Some(""), write, Some(3), None),
                (
                    "execute",
                    Some("s1"),
                    "<execute of statement \"s1\", whose text is not known>",
                    None,
                    Some("26000")
                ),
                (
                    "execute",
                    None,
                    "<execute of portal \"nope\", whose statement is not known>",
                    None,
                    Some("34000")
                ),
            ]
        );
        for s in &done[..5] {
            assert_eq!(s.decision, Some(Action::Allow), "{s:?}");
            assert_eq!(s.rule.as_deref(), Some("reads"), "{s:?}");
            assert!(!s.tables.is_empty(), "{s:?}");
        }
        assert_eq!(done[1].class, Class::Read);
        assert_eq!(done[4].class, Class::Write);
        assert_eq!(tags(&done[1]), ["SELECT 1"]);
        // What the agent cannot know is decided as `unknown`.
        assert_eq!(done[5].class, Class::Unknown);
        assert_eq!(done[5].decision, Some(Action::Allow));

        // Prepared and run while allowed, run again after a reload that
        // denies it: the server gets the refusal in place of the Execute
        // (the decision on the first run is not reused under the new
        // policy), and the client the server's own error where its Execute
        // failed.
        let exchange = |state: &mut State,
                        inp: &mut BytesMut,
                        f: &mut Frontend,
                        b: &mut Backend,
                        sent: &[u8],
                        answer: &[u8]| {
            let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
            inp.extend_from_slice(sent);
            f.feed(inp, &mut to_server, &mut to_client, state).unwrap();
            inp.extend_from_slice(answer);
            b.feed(inp, &mut to_client, state).unwrap();
            (to_server, to_client)
        };
        let parse = msg(b'P', format!("s2\0{read}\0\0\0").as_bytes());
        let sent = [parse, sync.clone()].concat();
        exchange(
            &mut state,
            &mut inp,
            &mut f,
            &mut b,
            &sent,
            &[msg(b'1', b""), ready.clone()].concat(),
        );
        let sent = [bind("s2"), exec(""), sync.clone()].concat();
        let answer = [msg(b'2', b""), row.clone(), select.clone(), ready.clone()].concat();
        let (to_server, _) = exchange(&mut state, &mut inp, &mut f, &mut b, &sent, &answer);
        assert_eq!(&to_server[..], &sent[..], "allowed before the reload");
        let deny = "[[rule]]\nid = \"no-balances\"\non = \"statement\"\nworkloads = [\"w\"]\ntargets = [\"t\"]\n\
                    tables = [\"public.pgbench_accounts\"]\naction = \"deny\"\n\n";
        rules.store(policy("exec-reloaded", &format!("{deny}{allow}")).load_full());
        let sent = [bind("s2"), exec(""), sync.clone()].concat();
        let error = msg(b'E', b"SERROR\0C42501\0Minterceptor: statement denied\0\0");
        let answer = [
            msg(b'2', b""),
            msg(b'1', b""),
            msg(b'2', b""),
            error.clone(),
            ready.clone(),
        ];
        let (to_server, to_client) = exchange(
            &mut state,
            &mut inp,
            &mut f,
            &mut b,
            &sent,
            &answer.concat(),
        );
        let relayed = String::from_utf8_lossy(&to_server);
        assert!(to_server.starts_with(&bind("s2")), "{relayed}");
        assert!(to_server.ends_with(&sync), "{relayed}");
        assert!(
            relayed.contains("RAISE EXCEPTION") && relayed.contains("no-balances"),
            "{relayed}"
        );
        // The client's Execute is gone: the one left is the refusal's own.
        let executes = to_server
            .windows(exec("").len())
            .filter(|w| *w == &exec("")[..]);
        assert_eq!(executes.count(), 1, "{relayed}");
        assert_eq!(
            &to_client[..],
            &[msg(b'2', b""), error, ready.clone()].concat()[..]
        );
        let done = state.take_done();
        let last = done.last().unwrap();
        assert_eq!(
            (last.kind.as_str(), last.name.as_deref(), &*last.text),
            ("execute", Some("s2"), read)
        );
        assert_eq!(last.decision, Some(Action::Deny));
        assert_eq!(last.rule.as_deref(), Some("no-balances"));
        assert_eq!(last.error.as_deref(), Some("42501"));

        // Many runs in one batch (executemany) each take their own answer;
        // so does a batch pipelined behind another.
        rules.store(policy("exec-again", allow).load_full());
        let insert = msg(b'P', b"s3\0INSERT INTO t VALUES ($1)\0\0\0");
        let runs = [
            bind("s3"),
            exec(""),
            bind("s3"),
            exec(""),
            bind("s3"),
            exec(""),
        ]
        .concat();
        let sent = [insert, sync.clone(), runs, sync.clone()].concat();
        let inserted = [msg(b'2', b""), msg(b'C', b"INSERT 0 1\0")].concat();
        let answer = [
            msg(b'1', b""),
            ready.clone(),
            inserted.clone(),
            inserted.clone(),
            inserted,
            ready.clone(),
        ];
        exchange(
            &mut state,
            &mut inp,
            &mut f,
            &mut b,
            &sent,
            &answer.concat(),
        );
        let done = state.take_done();
        let seen: Vec<(&str, Vec<String>)> =
            done.iter().map(|s| (s.kind.as_str(), tags(s))).collect();
        let one = || vec!["INSERT 0 1".to_string()];
        assert_eq!(
            seen,
            vec![
                ("parse", vec![]),
                ("execute", one()),
                ("execute", one()),
                ("execute", one())
            ]
        );
    }

    /// Whether a statement's text may hold a secret is cached with its
    /// classification: cold or warm, the cache records what redacting the
    /// text itself would.
    #[test]
    fn cached_statements_are_redacted_like_fresh_ones() {
        let texts = [
            "ALTER ROLE bob PASSWORD 'hunter2'",
            "ALTER ROLE bob PASSWORD 'other'",
            "alter role bob with encrypted password 'x' valid until 'infinity'",
            "SELECT 'password' FROM t WHERE a = 1",
            "SELECT 'password' FROM t WHERE a = 2",
            "select 1 /* password */",
            "select 2 /* password */",
            "CREATE USER u IDENTIFIED BY 'x'",
            "CREATE USER v IDENTIFIED BY 'y'",
            "SELECT \"password\" FROM t",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7",
        ];
        // The agent's gate, whose cache is under test (an empty policy).
        let mut state = gated(policy("cache", ""));
        let (mut f, mut b) = (Frontend::default(), Backend::default());
        let mut input = BytesMut::new();
        relay_batches(&mut state, (&mut f, &mut b), &mut input, &[login()]);
        for round in 0..2 {
            let batches: Vec<Exchange> = texts
                .iter()
                .map(|t| {
                    let q = msg(b'Q', format!("{t}\0").as_bytes());
                    (vec![q], vec![msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")])
                })
                .collect();
            relay_batches(&mut state, (&mut f, &mut b), &mut input, &batches);
            let done = state.take_done();
            let got: Vec<&str> = done.iter().map(|s| &*s.text).collect();
            let want: Vec<String> = texts.iter().map(|t| crate::redact::redact_sql(t)).collect();
            assert_eq!(got, want, "round {round}");
            assert_eq!(got[1], "ALTER ROLE bob PASSWORD '***'");
            assert_eq!(got[8], "CREATE USER v IDENTIFIED BY '***'");
        }
    }

    /// A statement whose class depends on a literal's value (SQL given to
    /// `query_to_xml`) is never decided by the cached classification of
    /// a text that differs only in that value.
    #[test]
    fn values_that_decide_a_class_are_read_every_time() {
        let toml = "[[rule]]\nid = \"no-writes\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\nclasses = [\"write\"]\naction = \"deny\"\n";
        let mut state = gated(policy("literals", toml));
        let harmless = "SELECT query_to_xml('select 1', true, false, '')";
        let harmful = "SELECT query_to_xml('delete from t returning 1', true, false, '')";
        let login = login();
        let query = |sql: &str| msg(b'Q', format!("{sql}\0").as_bytes());
        let answered = (
            vec![query(harmless)],
            vec![msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")],
        );
        let (mut f, mut b) = (Frontend::default(), Backend::default());
        let mut input = BytesMut::new();
        relay_batches(&mut state, (&mut f, &mut b), &mut input, &[login, answered]);
        let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
        input.extend_from_slice(&query(harmful));
        f.feed(&mut input, &mut to_server, &mut to_client, &mut state)
            .unwrap();
        let sent = String::from_utf8_lossy(&to_server);
        assert!(sent.contains("denied by rule \"no-writes\""), "{sent}");
        state.ended();
        let done = state.take_done();
        assert_eq!(done[0].decision, Some(Action::Allow));
        assert_eq!(done[1].rule.as_deref(), Some("no-writes"));
    }

    /// A role, session authorization or search path asked for in the
    /// startup packet is decided like the `SET` it amounts to: refused with
    /// a FATAL 42501 before the server sees the login, and recorded.
    #[test]
    fn startup_settings_are_decided_like_set() {
        let toml = "[[rule]]\nid = \"no-admin\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\nclasses = [\"admin\"]\naction = \"deny\"\n";
        let policy = policy("startup", toml);
        for (params, refused) in [
            (
                &b"user\0bob\0options\0-c role=postgres\0\0"[..],
                Some("SET role = 'postgres'"),
            ),
            (
                b"user\0bob\0search_path\0audit\0\0",
                Some("SET search_path = 'audit'"),
            ),
            (b"user\0bob\0options\0-c work_mem=64MB\0\0", None),
        ] {
            let mut state = gated(policy.clone());
            let mut input = ((8 + params.len()) as u32).to_be_bytes().to_vec();
            input.extend_from_slice(&[0, 3, 0, 0]);
            input.extend_from_slice(params);
            let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
            let r = frontend(&mut &input[..], &mut to_server, &mut to_client, &mut state);
            state.ended();
            let pending = state.take_done();
            match refused {
                Some(setting) => {
                    let e = r.unwrap_err().to_string();
                    assert!(e.contains("no-admin") && e.contains(setting), "{e}");
                    assert!(to_server.is_empty(), "the login reached the server");
                    let said = String::from_utf8_lossy(&to_client);
                    assert!(
                        to_client.starts_with(b"E")
                            && said.contains("FATAL")
                            && said.contains("42501"),
                        "{said}"
                    );
                    assert_eq!(&*pending[0].text, setting);
                    assert_eq!(pending[0].decision, Some(Action::Deny));
                    assert_eq!(pending[0].error.as_deref(), Some("42501"));
                }
                None => {
                    r.unwrap();
                    assert_eq!(to_server, input);
                    assert!(pending.is_empty());
                }
            }
        }
    }

    /// The machines give the same bytes and the same record however the
    /// input is cut: all at once, or one byte at a time (every frame split
    /// at every point, large passed-on frames included).
    #[test]
    fn frames_split_anywhere_relay_the_same() {
        let toml = "[[rule]]\nid = \"cards\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\naction = \"mask\"\ncolumns = [\"card\"]\nstrategy = \"redact\"\n";
        let policy = policy("split", toml);
        let mut client = b"\0\0\0\x09\0\x03\0\0\0".to_vec();
        client.extend(msg(b'Q', b"SELECT id, card FROM t\0"));
        client.extend(msg(b'P', b"s1\0SELECT card FROM t WHERE id = $1\0\0\0"));
        client.extend(msg(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x017\0\0"));
        client.extend(msg(b'E', b"\0\0\0\0\0"));
        client.extend(msg(b'S', b""));
        let long = format!("SELECT '{}'\0", "x".repeat(3000));
        client.extend(msg(b'Q', long.as_bytes()));
        client.extend(msg(b'd', &[7u8; 5000]));
        // The login's ReadyForQuery, then the Query's answer.
        let mut server = msg(b'Z', b"I");
        server.extend(msg(b'T', b"\0\x02id\0\0\0\0\0\0\x01\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0card\0\0\0\0\0\0\x02\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0"));
        server.extend(msg(b'D', b"\0\x02\0\0\0\x017\0\0\0\x104111111111111111"));
        server.extend(msg(b'C', b"SELECT 1\0"));
        server.extend(msg(b'Z', b"I"));
        server.extend(msg(b'd', &[9u8; 5000]));
        server.extend(msg(b'N', b"SNOTICE\0Mhello\0\0"));
        let run = |step: usize| {
            let mut state = gated(policy.clone());
            let (mut front, mut back) = (Frontend::default(), Backend::default());
            let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
            let mut input = BytesMut::new();
            for part in client.chunks(step) {
                input.extend_from_slice(part);
                front
                    .feed(&mut input, &mut to_server, &mut to_client, &mut state)
                    .unwrap();
            }
            front.eof(&input, &mut state).unwrap();
            let mut input = BytesMut::new();
            for part in server.chunks(step) {
                input.extend_from_slice(part);
                back.feed(&mut input, &mut to_client, &mut state).unwrap();
            }
            back.eof(&input).unwrap();
            state.ended();
            let texts: Vec<(String, u32)> = state
                .take_done()
                .into_iter()
                .map(|s| (s.text.to_string(), s.masked))
                .collect();
            (to_server, to_client, texts)
        };
        let whole = run(usize::MAX);
        assert_eq!(whole.0.len(), client.len(), "everything reaches the server");
        assert!(
            !String::from_utf8_lossy(&whole.1).contains("4111111111111111"),
            "the card was masked"
        );
        assert_eq!(whole.2.len(), 3);
        assert_eq!(whole.2[0].1, 1, "one value masked");
        for step in [1, 2, 3, 7, 64, 1021] {
            assert!(run(step) == whole, "cut every {step} bytes");
        }
        // A side that ends inside a frame is cut short, not taken as a clean end.
        let mut state = State::default();
        let mut front = Frontend::default();
        let mut input = BytesMut::from(&client[..client.len() - 10]);
        front
            .feed(
                &mut input,
                &mut BytesMut::new(),
                &mut BytesMut::new(),
                &mut state,
            )
            .unwrap();
        let e = front.eof(&input, &mut state).unwrap_err().to_string();
        assert!(e.contains("ended inside a message"), "{e}");
    }

    /// Rows of a prepared statement run later (asyncpg's prepare, then
    /// fetch; in the Parse's batch after a Flush, or in a later one after a
    /// Sync) are masked by the columns its Describe reported.
    #[test]
    fn rows_of_prepared_statements_run_later_are_masked_by_column() {
        let toml = "[[rule]]\nid = \"pii\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\naction = \"mask\"\ncolumns = [\"email\"]\nstrategy = \"redact\"\n";
        let mut cols = vec![0, 2];
        for (name, oid) in [("id", 23u32), ("email", 25)] {
            cols.extend_from_slice(name.as_bytes());
            cols.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
            cols.extend_from_slice(&oid.to_be_bytes());
            cols.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]);
        }
        for end in [b'H', b'S'] {
            let mut state = gated(policy("prepared-mask", toml));
            let (mut f, mut b) = (Frontend::default(), Backend::default());
            let mut inp = BytesMut::from(&b"\0\0\0\x09\0\x03\0\0\0"[..]);
            let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
            f.feed(&mut inp, &mut to_server, &mut to_client, &mut state)
                .unwrap();
            // The login's ReadyForQuery.
            inp.extend_from_slice(&msg(b'Z', b"I"));
            b.feed(&mut inp, &mut to_client, &mut state).unwrap();
            let mut round = |sent: Vec<Vec<u8>>, answer: Vec<Vec<u8>>| {
                let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
                inp.extend_from_slice(&sent.concat());
                f.feed(&mut inp, &mut to_server, &mut to_client, &mut state)
                    .unwrap();
                inp.extend_from_slice(&answer.concat());
                b.feed(&mut inp, &mut to_client, &mut state).unwrap();
                to_client
            };
            let mut described = vec![
                msg(b'1', b""),
                msg(b't', b"\0\x01\0\0\0\x17"),
                msg(b'T', &cols),
            ];
            if end == b'S' {
                described.push(msg(b'Z', b"I"));
            }
            round(
                vec![
                    msg(
                        b'P',
                        b"s1\0select id, email from customers where id = $1\0\0\0",
                    ),
                    msg(b'D', b"Ss1\0"),
                    msg(end, b""),
                ],
                described,
            );
            let row = msg(b'D', b"\0\x02\0\0\0\x011\0\0\0\x0fann@example.com");
            let got = round(
                vec![
                    msg(b'B', b"\0s1\0\0\0\0\0\0\0"),
                    msg(b'E', b"\0\0\0\0\0"),
                    msg(b'S', b""),
                ],
                vec![
                    msg(b'2', b""),
                    row,
                    msg(b'C', b"SELECT 1\0"),
                    msg(b'Z', b"I"),
                ],
            );
            let got = String::from_utf8_lossy(&got);
            assert!(!got.contains("example.com"), "{got:?}");
            assert!(got.contains("\0\0\0\x011\0\0\0\x04****"), "{got:?}");
            // One event for the Parse; after a Sync the run is one more.
            let kinds: Vec<String> = state
                .take_done()
                .iter()
                .map(|s| s.kind.to_string())
                .collect();
            let want = if end == b'S' {
                vec!["parse", "execute"]
            } else {
                vec!["parse"]
            };
            assert_eq!(kinds, want);
        }
    }

    /// A client that stops reading holds the server back: the relay stops
    /// reading from the server once a bounded amount waits for the client,
    /// instead of buffering the result. When the client reads again,
    /// everything arrives, and the session ends cleanly.
    #[tokio::test]
    async fn a_client_that_stops_reading_holds_the_server_back() {
        let (mut app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let relayed = relay(
            proxy_client,
            proxy_upstream,
            State::default(),
            Arc::default(),
            relay_loop::Bell::new(),
        );
        let flow = async {
            let startup = b"\0\0\0\x09\0\x03\0\0\0";
            app.write_all(startup).await.unwrap();
            let mut got = [0u8; 9];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, startup);
            // DataRows of 8 KiB until the server's writes stall.
            let mut frame = vec![b'D'];
            frame.extend_from_slice(&(4 + 8192u32).to_be_bytes());
            frame.resize(5 + 8192, 7);
            let (mut sent, mut at) = (0usize, 0usize);
            loop {
                match server.try_write(&frame[at..]) {
                    Ok(n) => {
                        sent += n;
                        at = (at + n) % frame.len();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let wait =
                            tokio::time::timeout(Duration::from_millis(500), server.writable());
                        if wait.await.is_err() {
                            break; // nobody takes more
                        }
                    }
                    Err(e) => panic!("{e}"),
                }
                assert!(
                    sent < 64 << 20,
                    "the relay took 64 MiB for a client that reads nothing"
                );
            }
            // Socket buffers on both hops plus the relay's own bound.
            assert!(
                sent < 32 << 20,
                "{sent} bytes went in before the server was held back"
            );
            let finish = async {
                server.write_all(&frame[at..]).await.unwrap();
                server.shutdown().await.unwrap();
                sent + frame.len() - at
            };
            let read = async {
                let mut all = Vec::new();
                app.read_to_end(&mut all).await.unwrap();
                all
            };
            let (total, all) = tokio::join!(finish, read);
            assert_eq!(all.len(), total, "every byte arrives");
            assert!(all.chunks(frame.len()).all(|f| f == &frame[..f.len()]));
            app.shutdown().await.unwrap();
            total
        };
        let (end, total) = tokio::join!(relayed, flow);
        assert!(matches!(end.how, Ending::Closed), "{end:?}");
        assert_eq!((end.up, end.down), (9, total as u64));
    }

    /// The end path is the opaque relay's: a side that fails resets the
    /// other, which learns that the connection broke rather than ended.
    #[tokio::test]
    async fn a_reset_on_one_side_resets_the_other() {
        let (mut app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let relayed = tokio::spawn(relay(
            proxy_client,
            proxy_upstream,
            State::default(),
            Arc::default(),
            relay_loop::Bell::new(),
        ));
        let startup = b"\0\0\0\x09\0\x03\0\0\0";
        app.write_all(startup).await.unwrap();
        let mut got = [0u8; 9];
        server.read_exact(&mut got).await.unwrap();
        interceptor_relay::sys::reset(&app);
        drop(app);
        let mut rest = Vec::new();
        let e = server.read_to_end(&mut rest).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
        let end = relayed.await.unwrap();
        assert!(matches!(end.how, Ending::Failed(_)), "{end:?}");
    }

    /// A gate for tests: decides nothing, except that it holds every
    /// statement whose text has `/* hold */`, handing the ticket over.
    struct Holding {
        open: interceptor_wire::seam::Open,
        bell: relay_loop::Bell,
        tickets: std::sync::mpsc::Sender<Ticket>,
    }

    impl Gate for Holding {
        fn flags(&mut self) -> Flags {
            self.open.flags()
        }
        fn classify(
            &mut self,
            text: &str,
            reading: Result<crate::sql::Dialect, String>,
        ) -> Classified {
            self.open.classify(text, reading)
        }
        fn reading_changed(&mut self) {
            self.open.reading_changed()
        }
        fn statement(&mut self, seen: interceptor_wire::seam::Seen<'_>) -> Verdict {
            if !seen.text.contains("/* hold */") {
                return self.open.statement(seen);
            }
            let bell = self.bell.clone();
            let wake = Box::new(move || bell.ring());
            let t = Ticket::new(
                "needs-a-second-person".into(),
                Some("held for a second person".into()),
                wake,
            );
            self.tickets.send(t.clone()).unwrap();
            Verdict::Hold(t)
        }
        fn result_shape(
            &mut self,
            columns: &[interceptor_wire::seam::Column<'_>],
            class: Option<&Classification>,
            k: usize,
        ) -> Option<interceptor_wire::seam::Masks> {
            self.open.result_shape(columns, class, k)
        }
        fn mask(&self, how: &crate::policy::ColumnMask, value: &[u8]) -> Vec<u8> {
            self.open.mask(how, value)
        }
        fn message_rule(&mut self, classes: &[Option<Arc<Classification>>]) -> Option<Arc<str>> {
            self.open.message_rule(classes)
        }
        fn names_rule(&self, rule: &str) -> bool {
            self.open.names_rule(rule)
        }
    }

    fn query(sql: &str) -> Vec<u8> {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&(5 + sql.len() as u32).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        m
    }

    /// The server's answer to one simple query.
    const ANSWER: &[u8] = b"C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I";

    /// Reads what reaches `server` within `wait`.
    async fn arrives(server: &mut tokio::net::TcpStream, wait: Duration) -> Vec<u8> {
        let mut got = Vec::new();
        let until = tokio::time::Instant::now() + wait;
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n @ 1..)) = tokio::time::timeout_at(until, server.read(&mut buf)).await {
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// A held statement waits without stopping its relay loop: it does not
    /// reach the server, nor does what its client sends behind it, while
    /// another connection on the same loop flows. Released, it goes on in
    /// order; refused, the server raises the refusal naming the decision's
    /// rule, and the session goes on. Both are recorded as decided.
    #[tokio::test]
    async fn a_held_statement_waits_alone_and_goes_on_as_decided() {
        let (tickets, decide) = std::sync::mpsc::channel();
        let outbox = Outbox::default();
        let bell = relay_loop::Bell::new();
        let gate = Holding {
            open: interceptor_wire::seam::Open,
            bell: bell.clone(),
            tickets,
        };
        let state = State::new(Box::new(gate), outbox.clone());
        let (mut app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let held = tokio::spawn(relay(
            proxy_client,
            proxy_upstream,
            state,
            Arc::default(),
            bell,
        ));
        // Another connection, on the same loop (this thread's only one).
        let (mut app2, proxy_client2) = pair().await;
        let (proxy_upstream2, mut server2) = pair().await;
        let other = tokio::spawn(relay(
            proxy_client2,
            proxy_upstream2,
            State::default(),
            Arc::default(),
            relay_loop::Bell::new(),
        ));
        let startup = b"\0\0\0\x09\0\x03\0\0\0";
        for (app, server) in [(&mut app, &mut server), (&mut app2, &mut server2)] {
            app.write_all(startup).await.unwrap();
            let mut got = [0u8; 9];
            server.read_exact(&mut got).await.unwrap();
            server.write_all(b"Z\0\0\0\x05I").await.unwrap();
            let mut z = [0u8; 6];
            app.read_exact(&mut z).await.unwrap();
        }

        let first = query("SELECT 1 /* hold */");
        let behind = query("SELECT 3");
        app.write_all(&[first.clone(), behind.clone()].concat())
            .await
            .unwrap();
        let ticket = tokio::task::spawn_blocking(move || {
            let t = decide.recv_timeout(Duration::from_secs(10)).unwrap();
            (t, decide)
        });
        let (ticket, decide) = ticket.await.unwrap();
        for _ in 0..3 {
            // The other connection flows meanwhile.
            app2.write_all(&query("SELECT 2")).await.unwrap();
            let mut q = vec![0u8; query("SELECT 2").len()];
            server2.read_exact(&mut q).await.unwrap();
            server2.write_all(ANSWER).await.unwrap();
            let mut a = vec![0u8; ANSWER.len()];
            app2.read_exact(&mut a).await.unwrap();
        }
        let early = arrives(&mut server, Duration::from_millis(300)).await;
        assert!(
            early.is_empty(),
            "a held statement reached the server: {early:?}"
        );

        ticket.decide(crate::policy::Decision::new(
            crate::policy::Action::Allow,
            "approved-by-bob".into(),
        ));
        let mut got = vec![0u8; first.len() + behind.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [first, behind].concat(), "released, in order");
        server.write_all(&[ANSWER, ANSWER].concat()).await.unwrap();
        let mut a = vec![0u8; 2 * ANSWER.len()];
        app.read_exact(&mut a).await.unwrap();

        // Held again, then refused.
        app.write_all(&query("DELETE FROM t /* hold */"))
            .await
            .unwrap();
        let ticket = tokio::task::spawn_blocking(move || {
            decide.recv_timeout(Duration::from_secs(10)).unwrap()
        });
        let ticket = ticket.await.unwrap();
        assert!(arrives(&mut server, Duration::from_millis(100))
            .await
            .is_empty());
        ticket.decide(crate::policy::Decision::new(
            crate::policy::Action::Deny,
            "denied-by-bob".into(),
        ));
        let refusal = arrives(&mut server, Duration::from_millis(500)).await;
        let refusal = String::from_utf8_lossy(&refusal);
        assert!(!refusal.contains("DELETE"), "{refusal}");
        assert!(
            refusal.contains("denied by rule \"denied-by-bob\""),
            "{refusal}"
        );
        server
            .write_all(b"E\0\0\0\x0cC42501\0\0Z\0\0\0\x05I")
            .await
            .unwrap();
        let mut a = [0u8; 19];
        app.read_exact(&mut a).await.unwrap();

        for (mut app, mut server) in [(app, server), (app2, server2)] {
            app.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            server.shutdown().await.unwrap();
        }
        assert!(matches!(held.await.unwrap().how, Ending::Closed));
        assert!(matches!(other.await.unwrap().how, Ending::Closed));
        let recorded: Vec<_> = outbox
            .take_statements()
            .into_iter()
            .map(|s| {
                (
                    s.text.to_string(),
                    s.decision,
                    s.rule.map(|r| r.to_string()),
                )
            })
            .collect();
        use crate::policy::Action::{Allow, Deny};
        assert_eq!(
            recorded,
            [
                (
                    "SELECT 1 /* hold */".into(),
                    Some(Allow),
                    Some("approved-by-bob".into())
                ),
                ("SELECT 3".into(), None, None),
                (
                    "DELETE FROM t /* hold */".into(),
                    Some(Deny),
                    Some("denied-by-bob".into())
                ),
            ]
        );
    }
}
