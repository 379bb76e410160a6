//! Scripted PostgreSQL exchanges for tests that drive the machines with a
//! gate of their own (this crate's, and the agent's with its policy).

use bytes::BytesMut;

use super::{put_message, Backend, Frontend, State, Statement};

/// A statement's command tags.
pub fn tags(s: &Statement) -> Vec<String> {
    s.tags.iter().map(|t| t.to_string()).collect()
}

/// One message: its type byte, its length, `body`.
pub fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    put_message(&mut out, ty, body);
    out.to_vec()
}

/// What the client sends and what the server answers, message by
/// message, for one batch.
pub type Exchange = (Vec<Vec<u8>>, Vec<Vec<u8>>);

/// Drives both machines through `batches`, checking that both
/// directions pass unchanged.
pub fn relay_batches(
    state: &mut State,
    (f, b): (&mut Frontend, &mut Backend),
    inp: &mut BytesMut,
    batches: &[Exchange],
) {
    let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
    for (from_client, from_server) in batches {
        let sent = from_client.concat();
        inp.extend_from_slice(&sent);
        to_server.clear();
        f.feed(inp, &mut to_server, &mut to_client, state).unwrap();
        assert_eq!(&to_server[..], &sent[..], "relayed unchanged");
        let answer = from_server.concat();
        inp.extend_from_slice(&answer);
        to_client.clear();
        b.feed(inp, &mut to_client, state).unwrap();
        assert_eq!(&to_client[..], &answer[..], "relayed unchanged");
    }
}

/// A startup with no parameters, and the server's ReadyForQuery after
/// the login.
pub fn login() -> Exchange {
    (
        vec![b"\0\0\0\x09\0\x03\0\0\0".to_vec()],
        vec![frame(b'Z', b"I")],
    )
}

/// A login, then `batches` (see [`relay_batches`]); the statements
/// recorded as (text, tags, error, answered).
pub fn relayed(state: &mut State, batches: &[Exchange]) -> Vec<Recorded> {
    let (mut f, mut b) = (Frontend::default(), Backend::default());
    let all: Vec<Exchange> = std::iter::once(login())
        .chain(batches.iter().cloned())
        .collect();
    relay_batches(state, (&mut f, &mut b), &mut BytesMut::new(), &all);
    state
        .take_done()
        .into_iter()
        .map(|s| {
            let answered = s.duration_us.is_some();
            (s.text.to_string(), tags(&s), s.error, answered)
        })
        .collect()
}

/// A statement recorded: text, tags, error, answered.
pub type Recorded = (String, Vec<String>, Option<String>, bool);

/// Reads the statements in what went to the server, as it grows: for
/// fuzzers that check what reached the server against what was decided.
#[derive(Default)]
pub struct Sent {
    /// Where the next unread frame starts (`None`: the startup packet is
    /// still to be passed over).
    at: Option<usize>,
}

impl Sent {
    /// The SQL of each whole Query and Parse that `out` (everything sent
    /// so far) holds beyond what earlier calls read, the agent's own
    /// refusals left out.
    pub fn statements(&mut self, out: &[u8]) -> Vec<String> {
        let mut found = Vec::new();
        let mut at = match self.at {
            Some(at) => at,
            None => match out.get(..4) {
                Some(len) => super::be32(len) as usize,
                None => return found,
            },
        };
        self.at = Some(at);
        while let Some(head) = out.get(at..at + 5) {
            let (ty, len) = (head[0], super::be32(&head[1..]) as usize);
            let Some(body) = out.get(at + 5..at + 1 + len) else {
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
            at += 1 + len;
            self.at = Some(at);
        }
        found
    }
}

/// Feeds both machines of `state`'s connection in turns, `step` bytes of
/// `client`, then of `server`, at a time, so frames split anywhere; after
/// each turn, `turn` is handed everything sent to the server
/// so far (it may decide what is held). A connection that holds a
/// statement is fed again, with or without new bytes, as a woken one is;
/// one still held after two turns with nothing new is ended. An error
/// ends its side. At the end, the state has ended.
pub fn in_turns(
    state: &mut State,
    (client, server): (&[u8], &[u8]),
    step: usize,
    mut turn: impl FnMut(&[u8]),
) {
    let (mut front, mut back) = (Frontend::default(), Backend::default());
    let (mut from_client, mut from_server) = (BytesMut::new(), BytesMut::new());
    let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
    let (mut client_parts, mut server_parts) = (client.chunks(step), server.chunks(step));
    let (mut client_over, mut server_over, mut idle) = (false, false, 0);
    while !(client_over && server_over) {
        if !client_over {
            let part = client_parts.next();
            idle = if part.is_none() { idle + 1 } else { 0 };
            client_over = match part {
                None if !state.holding() || idle > 2 => {
                    let _ = front.eof(&from_client, state);
                    true
                }
                _ => {
                    from_client.extend_from_slice(part.unwrap_or_default());
                    let fed = front.feed(&mut from_client, &mut to_server, &mut to_client, state);
                    fed.is_err()
                }
            };
        }
        if !server_over {
            server_over = match server_parts.next() {
                Some(part) => {
                    from_server.extend_from_slice(part);
                    back.feed(&mut from_server, &mut to_client, state).is_err()
                }
                None => {
                    let _ = back.eof(&from_server);
                    true
                }
            };
        }
        to_client.clear();
        turn(&to_server);
    }
    state.ended();
}
