//! The relay as two byte-driven machines, client → server ([`Frontend`])
//! and server → client ([`Backend`]), and the pair of them with their
//! state ([`Machines`]), which the agent's relay loop feeds from the
//! sockets.
//!
//! A machine never touches a socket. It is handed what has arrived, takes
//! every whole frame it can (or passes on what has come of a frame it does
//! not inspect), and appends what must go out. So the agent's relay loop
//! drives them straight from socket events, and the tests and
//! fuzzers drive the very same machines from byte slices ([`frontend`],
//! [`backend`], with no runtime), in chunks that split frames anywhere.

use std::io::{Read, Write};

use bytes::{Buf, BufMut, BytesMut};

use crate::{
    record::{Decision, StatementKind},
    sql::Classification,
};

use super::{
    be32,
    code::{BackendCode as Back, FrontendCode as Front},
    error_code, malformed, message, parse_startup, refusal, startup_refusal,
    without_channel_binding, Class, Classified, PgError, State, CANCEL_REQUEST, GSSENC_REQUEST,
    MAX_INSPECT, MAX_MESSAGE, MAX_STARTUP, MAX_STATEMENT, SSL_REQUEST,
};

/// The part of a frame still to come that is not inspected: passed on, or
/// (for a refused statement too large to hold) dropped.
#[derive(Debug, Default)]
struct Rest {
    forward: usize,
    discard: usize,
}

impl Rest {
    /// Moves what `input` holds of the frame. `true`: the frame is done.
    #[inline]
    fn drain(&mut self, input: &mut Flow) -> bool {
        self.done() || self.drain_some(input)
    }

    fn drain_some(&mut self, input: &mut Flow) -> bool {
        if self.discard > 0 {
            let n = self.discard.min(input.len());
            input.advance(n);
            self.discard -= n;
        }
        if self.forward > 0 {
            let n = self.forward.min(input.len());
            input.pass(n);
            self.forward -= n;
        }
        self.done()
    }

    fn done(&self) -> bool {
        self.forward == 0 && self.discard == 0
    }

    /// Passes on what `input` holds of a `total`-byte frame; the rest follows.
    fn start(&mut self, input: &mut Flow, total: usize) {
        let have = input.len().min(total);
        input.pass(have);
        self.forward = total - have;
    }
}

/// What a machine is handed (it derefs to the bytes not yet taken), and
/// where what it passes on goes. Frames passed on as they are, nearly all
/// of them, are not copied one by one: a run of them is copied out at
/// once, when something else must go out after it (a refusal, a masked
/// row) or a frame is dropped, and when the flow ends.
struct Flow<'a> {
    input: &'a mut BytesMut,
    out: &'a mut BytesMut,
    /// `input[..at]` is taken.
    at: usize,
    /// `input[from..at]` is passed on, not yet copied to `out`.
    from: usize,
}

impl<'a> Flow<'a> {
    fn new(input: &'a mut BytesMut, out: &'a mut BytesMut) -> Self {
        Flow {
            input,
            out,
            at: 0,
            from: 0,
        }
    }

    /// Passes on the next `n` bytes (no more than are here).
    fn pass(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.at += n;
    }

    /// Drops the next `n` bytes (no more than are here).
    fn advance(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.settle();
        self.at += n;
        self.from = self.at;
    }

    /// Sends `bytes` after what was passed on so far.
    fn put(&mut self, bytes: &[u8]) {
        self.settle();
        self.out.extend_from_slice(bytes);
    }

    fn settle(&mut self) {
        if self.from < self.at {
            self.out.extend_from_slice(&self.input[self.from..self.at]);
            self.from = self.at;
        }
    }
}

impl std::ops::Deref for Flow<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.input[self.at..]
    }
}

impl Drop for Flow<'_> {
    fn drop(&mut self) {
        self.settle();
        self.input.advance(self.at);
    }
}

/// The type and whole length (type byte included) of the typed message at
/// the start of `input`, its length checked. `None`: the header is not all here.
fn header(input: &[u8], side: &'static str) -> Result<Option<(u8, usize)>, PgError> {
    if input.len() < 5 {
        return Ok(None);
    }
    let (ty, len) = (input[0], be32(&input[1..5]) as usize);
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(malformed(
            side,
            format!("message '{}' with length {len}", ty as char),
        ));
    }
    Ok(Some((ty, 1 + len)))
}

/// Why a side ended where it did, if that was not between messages.
fn cut_short(input: &[u8], rest: &Rest, side: &'static str) -> Result<(), PgError> {
    if !rest.done() || input.len() >= 5 {
        Err(malformed(side, "connection ended inside a message"))
    } else if !input.is_empty() {
        Err(malformed(side, "connection ended inside a message header"))
    } else {
        Ok(())
    }
}

/// Client → server.
#[derive(Debug, Default)]
pub struct Frontend {
    /// The startup packet has passed; typed messages follow.
    typed: bool,
    rest: Rest,
    /// A refusal took the place of a Parse or Execute since the client's
    /// last Sync: the server skips what comes until the next.
    skipping: bool,
    /// Extended-protocol messages (Parse, Bind, Describe, Execute, Close,
    /// and those the agent sends in place of one) sent to the server in
    /// the client's open batch.
    extended: u32,
    /// Some were sent since the client's last Sync: a Query or
    /// FunctionCall now may be one the server skips (see
    /// [`State::query_closed`]).
    extended_since_sync: bool,
}

impl Frontend {
    /// Takes what it can of `input`; what goes to the server is appended to
    /// `to_server`, the agent's own answers to `to_client`.
    pub fn feed(
        &mut self,
        input: &mut BytesMut,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
        state: &mut State,
    ) -> Result<(), PgError> {
        // What policy says of this connection, once per read (a reload is
        // seen at the next one).
        let flags = state.flags();
        state.client_read();
        let input = &mut Flow::new(input, to_server);
        while self.rest.drain(input) {
            let more = if self.typed {
                let ty = input.first().copied().and_then(Front::new);
                let more = self.message(input, state, flags)?;
                if more {
                    self.sent(ty, state);
                }
                more
            } else {
                self.startup(input, to_client, state)?
            };
            if !more {
                break;
            }
        }
        Ok(())
    }

    /// The client closed its side, leaving `input` unread.
    pub fn eof(&self, input: &[u8], state: &mut State) -> Result<(), PgError> {
        if self.typed {
            return cut_short(input, &self.rest, "client");
        }
        match input.is_empty() {
            true if state.startup().encryption_declined => Err(PgError::ClientRequiresTls),
            true => Ok(()),
            false => Err(malformed(
                "client",
                "connection ended inside the startup packet",
            )),
        }
    }

    /// One untyped startup-phase packet. `false`: it is not all here.
    fn startup(
        &mut self,
        input: &mut Flow,
        to_client: &mut BytesMut,
        state: &mut State,
    ) -> Result<bool, PgError> {
        // Check the length as soon as it is there: a hostile length must not
        // make us wait for bytes that will never come.
        if input.first() == Some(&0x16) {
            return Err(malformed(
                "client",
                "a TLS ClientHello where the startup packet belongs (sslnegotiation=direct); \
                 the agent takes the client's TLS only with [agent.tls] mode = \"terminate\"",
            ));
        }
        if input.len() < 4 {
            return Ok(false);
        }
        let len = be32(&input[0..4]) as usize;
        if !(8..=MAX_STARTUP).contains(&len) {
            return Err(malformed(
                "client",
                format!("startup packet length {len} (allowed 8..={MAX_STARTUP})"),
            ));
        }
        if input.len() < len {
            return Ok(false);
        }
        match be32(&input[4..8]) {
            SSL_REQUEST | GSSENC_REQUEST if len == 8 => {
                input.advance(8);
                state.startup().encryption_declined = true;
                to_client.put_u8(b'N');
            }
            CANCEL_REQUEST if len == 16 => {
                state.startup().cancel_request = true;
                input.pass(16);
                self.typed = true;
            }
            v if v >> 16 == 3 => {
                parse_startup(&input[8..len], state.startup())?;
                let (settings, replication, unreadable) = {
                    let st = state.startup();
                    (st.settings.clone(), st.replication, st.unreadable.clone())
                };
                // Each request is decided like the statement it amounts to
                // (a replication connection by name only); options the
                // agent cannot read as the server does are refused
                // whatever the policy says.
                let mut requests: Vec<(String, Option<Classified>)> = Vec::new();
                if let Some(why) = unreadable {
                    let text = format!("<startup {why}>");
                    let d = state.refused_startup(&text);
                    to_client.extend_from_slice(&startup_refusal(&d, &text));
                    return Err(PgError::StartupRefused {
                        rule: d.rule.to_string(),
                        setting: text,
                    });
                }
                if replication {
                    let text = "<replication connection>".to_owned();
                    let c = Classification {
                        commands: std::sync::Arc::new(["REPLICATION"]),
                        ..Classification::not_sql(&text, Class::Admin)
                    };
                    requests.push((text, Some(Classified::own(c))));
                }
                requests.extend(settings.into_iter().map(|t| (t, None)));
                for (text, class) in requests {
                    let decided = state.statement(StatementKind::Startup, None, &text, class);
                    let Ok(refused) = decided else {
                        unreachable!("a startup request is never held")
                    };
                    if let Some(d) = refused {
                        // Refused as the server refuses a login: FATAL, then close.
                        if let Some(e) = state.batch.pending.back_mut() {
                            e.st.error = Some("42501".into());
                        }
                        to_client.extend_from_slice(&startup_refusal(&d, &text));
                        return Err(PgError::StartupRefused {
                            rule: d.rule.to_string(),
                            setting: text,
                        });
                    }
                }
                input.pass(len);
                // The server's ReadyForQuery after the login answers it.
                state.batch_closed();
                self.typed = true;
            }
            other => {
                return Err(malformed(
                    "client",
                    format!("unsupported startup code {other}"),
                ))
            }
        }
        Ok(true)
    }

    /// One typed message, or the start of one passed on as it comes.
    /// `false`: what the machine needs of it is not all here.
    fn message(
        &mut self,
        input: &mut Flow,
        state: &mut State,
        flags: super::Flags,
    ) -> Result<bool, PgError> {
        let Some((byte, total)) = header(input, "client")? else {
            return Ok(false);
        };
        let Some(ty) = Front::new(byte) else {
            // The server would end the session too; nothing unknown passes.
            return Err(malformed(
                "client",
                format!("unknown message type {:?}", byte as char),
            ));
        };
        if ty == Front::Sync {
            state.synced(std::mem::take(&mut self.skipping));
        }
        let masking = flags.masking;
        if matches!(ty, Front::Bind | Front::Execute | Front::Close)
            || masking && ty == Front::Describe
        {
            if total > MAX_INSPECT {
                return Ok(self.uninspected(ty, input, total, state, masking));
            }
            if input.len() < total {
                return Ok(false);
            }
            let Ok(refused) = state.note_frontend(ty, &input[5..total], masking) else {
                return Ok(false); // held: seen again once decided
            };
            if ty == Front::Bind && flags.record_parameters {
                state.bind(&input[5..total]);
            }
            match refused {
                None => input.pass(total),
                Some(d) => {
                    input.advance(total);
                    self.refuse(ty, &d, state, input);
                }
            }
            return Ok(true);
        }
        if ty == Front::FunctionCall {
            return self.function_call(input, total, state);
        }
        if matches!(ty, Front::Query | Front::Parse) && total <= MAX_STATEMENT {
            if input.len() < total {
                return Ok(false);
            }
            let body = &input[5..total];
            let denied = match ty {
                Front::Query => {
                    let q = message::Query::read(body)
                        .ok_or_else(|| malformed("client", "Query without a terminated string"))?;
                    state.statement(StatementKind::Query, None, q.sql, None)
                }
                _ => {
                    let p = message::Parse::read(body)
                        .ok_or_else(|| malformed("client", "Parse without a statement name"))?;
                    let (name, sql) = (p.name, p.sql);
                    let sql =
                        sql.ok_or_else(|| malformed("client", "Parse without a terminated query"))?;
                    let c = state.classified(sql);
                    state.statement(StatementKind::Parse, Some(name.into()), sql, Some(c))
                }
            };
            let Ok(denied) = denied else {
                return Ok(false); // held: seen again once decided
            };
            match denied {
                None => input.pass(total),
                Some(d) => {
                    input.advance(total);
                    self.refuse(ty, &d, state, input);
                }
            }
            return Ok(true);
        }
        if matches!(ty, Front::Query | Front::Parse) {
            let text = format!("<statement of {total} bytes, too large to inspect>");
            let kind = if ty == Front::Query {
                StatementKind::Query
            } else {
                StatementKind::Parse
            };
            let c = Classified::own(Classification::not_sql(&text, Class::Unknown));
            let have = input.len().min(total);
            // A Parse's statement name comes first: known if it is here.
            let name = (ty == Front::Parse)
                .then(|| message::Parse::read(&input[5..have]).map(|p| p.name.into()))
                .flatten();
            let Ok(denied) = state.statement(kind, name, &text, Some(c)) else {
                return Ok(false); // held: seen again once decided
            };
            if let Some(d) = denied {
                // Nothing of it reaches the server; the refusal takes its place.
                input.advance(have);
                self.rest.discard = total - have;
                self.refuse(ty, &d, state, input);
                return Ok(true);
            }
        }
        self.rest.start(input, total);
        Ok(true)
    }

    /// A FunctionCall, of any size: decided by the function it calls (its
    /// first four bytes) as soon as they are here, then passed on as it
    /// comes, or dropped whole and refused. `true`: taken.
    fn function_call(
        &mut self,
        input: &mut Flow,
        total: usize,
        state: &mut State,
    ) -> Result<bool, PgError> {
        if total < 9 {
            return Err(malformed("client", "FunctionCall without a function"));
        }
        if input.len() < 9 {
            return Ok(false);
        }
        let call = message::FunctionCall::read(&input[5..9]).expect("four bytes are here");
        let text = format!("<fast-path function call, oid {}>", call.function);
        let c = Classified::own(Classification::not_sql(&text, Class::Admin));
        match state.statement(StatementKind::Function, None, &text, Some(c)) {
            Err(_held) => return Ok(false), // seen again once decided
            Ok(None) => self.rest.start(input, total),
            Ok(Some(d)) => {
                let have = input.len().min(total);
                input.advance(have);
                self.rest.discard = total - have;
                self.refuse(Front::FunctionCall, &d, state, input);
            }
        }
        Ok(true)
    }

    /// Sends the refusal of a denied `ty` message in its place.
    fn refuse(&mut self, ty: Front, d: &Decision, state: &mut State, to_server: &mut Flow) {
        to_server.put(&refusal(ty, d, state));
        if matches!(ty, Front::Parse | Front::Execute) {
            self.skipping = true;
            // In place of one: a Parse, Bind and Execute.
            self.extended = self.extended.saturating_add(2);
        }
    }

    /// A message of type `ty` went (or has begun to go) to the server.
    fn sent(&mut self, ty: Option<Front>, state: &mut State) {
        match ty {
            Some(t) if t.extended() => {
                self.extended = self.extended.saturating_add(1);
                self.extended_since_sync = true;
            }
            Some(Front::Query | Front::FunctionCall) => {
                if self.extended_since_sync {
                    state.query_closed(self.extended);
                }
                self.extended = 0;
            }
            Some(Front::Sync) => {
                self.extended = 0;
                self.extended_since_sync = false;
            }
            _ => {}
        }
    }

    /// A Bind, Execute, Close or Describe too large to inspect whole
    /// (over [`MAX_INSPECT`]). A Bind's portal and statement names come
    /// first, and are taken if they are here; otherwise what it names is
    /// lost with it. An Execute runs an unknown portal: decided as such, and
    /// dropped whole if refused. `true`: more may follow.
    fn uninspected(
        &mut self,
        ty: Front,
        input: &mut Flow,
        total: usize,
        state: &mut State,
        masking: bool,
    ) -> bool {
        let have = input.len().min(total);
        match ty {
            Front::Bind => {
                let body = &input[5..have];
                match message::Bind::read(body) {
                    // A Bind is never refused (its Execute may be).
                    Some(_) => drop(state.note_frontend(Front::Bind, body, masking)),
                    None => state.portals_unknown(),
                }
            }
            Front::Close => state.portals_unknown(),
            Front::Execute => {
                let Ok(refused) = state.note_frontend(Front::Execute, &[], masking) else {
                    return false; // held: seen again once decided
                };
                if let Some(d) = refused {
                    input.advance(have);
                    self.rest.discard = total - have;
                    self.refuse(Front::Execute, &d, state, input);
                    return true;
                }
            }
            _ => {}
        }
        self.rest.start(input, total);
        true
    }
}

/// Server → client.
#[derive(Debug, Default)]
pub struct Backend {
    rest: Rest,
    /// This connection carries a CancelRequest: the server's answer (it
    /// closes) is relayed as it is.
    cancel: bool,
    /// The server has spoken: whether this is a cancel connection is known
    /// (the client's first packet, which says so, reached the server first).
    spoken: bool,
    /// Answers that complete a message (ParseComplete, BindComplete,
    /// CloseComplete, NoData, RowDescription, CommandComplete,
    /// EmptyQueryResponse, PortalSuspended) since the last ReadyForQuery.
    completed: u32,
}

impl Backend {
    /// Takes what it can of `input`, appending what goes to the client.
    pub fn feed(
        &mut self,
        input: &mut BytesMut,
        to_client: &mut BytesMut,
        state: &mut State,
    ) -> Result<(), PgError> {
        if !self.spoken {
            self.spoken = true;
            self.cancel = state.startup().cancel_request;
        }
        let input = &mut Flow::new(input, to_client);
        if self.cancel {
            let all = input.len();
            input.pass(all);
            return Ok(());
        }
        let masking = state.flags().masking;
        while self.rest.drain(input) {
            let Some((byte, total)) = header(input, "server")? else {
                break;
            };
            // A code the server has no message for: passed on, uninspected.
            let ty = Back::new(byte);
            if matches!(ty, Some(Back::ParseComplete | Back::BindComplete)) && total == 5 {
                let b = &mut state.batch;
                if b.swallowed() {
                    self.took(ty);
                    input.advance(5);
                    continue;
                }
                if ty == Some(Back::ParseComplete) {
                    b.parsed += 1;
                }
            }
            let shaping = matches!(
                ty,
                Some(
                    Back::RowDescription
                        | Back::NoData
                        | Back::DataRow
                        | Back::PortalSuspended
                        | Back::EmptyQueryResponse
                )
            );
            if let (true, Some(code)) = (masking && shaping, ty) {
                if total > MAX_INSPECT {
                    if code == Back::DataRow {
                        return Err(malformed(
                            "server",
                            format!("a {total}-byte row is too large to mask"),
                        ));
                    }
                } else {
                    if input.len() < total {
                        break;
                    }
                    self.took(ty);
                    match state.shape_message(code, &input[5..total])? {
                        Some(row) => {
                            input.advance(total);
                            input.put(&row);
                        }
                        None => input.pass(total),
                    }
                    continue;
                }
            }
            if let (true, Some(code @ (Back::ErrorResponse | Back::NoticeResponse))) = (masking, ty)
            {
                // Errors and notices can echo values (`invalid input
                // syntax for type integer: "4111…"`, a key's detail).
                if total > MAX_INSPECT {
                    return Err(malformed(
                        "server",
                        format!("a {total}-byte error or notice is too large to mask"),
                    ));
                }
                if input.len() < total {
                    break;
                }
                self.took(ty);
                let body = &input[5..total];
                let masked = state.mask_message(code, body);
                if code == Back::ErrorResponse {
                    self.failed(state, body);
                }
                match masked {
                    Some(m) => {
                        input.advance(total);
                        input.put(&m);
                    }
                    None => input.pass(total),
                }
                continue;
            }
            let inspected = matches!(
                ty,
                Some(
                    Back::Authentication
                        | Back::CommandComplete
                        | Back::ErrorResponse
                        | Back::ReadyForQuery
                        | Back::ParameterStatus
                        | Back::EmptyQueryResponse
                        | Back::PortalSuspended
                )
            );
            if !(inspected && total <= MAX_INSPECT) {
                self.took(ty);
                self.rest.start(input, total);
                continue;
            }
            if input.len() < total {
                break;
            }
            self.took(ty);
            let body = &input[5..total];
            match ty {
                Some(Back::Authentication) => {
                    if let Some(mechanisms) = message::sasl_mechanisms(body) {
                        let offer = without_channel_binding(&mechanisms);
                        input.advance(total);
                        input.put(&offer);
                        continue;
                    }
                }
                Some(Back::CommandComplete) => {
                    let b = &mut state.batch;
                    b.result(message::CommandComplete::read(body).map(|c| c.tag));
                    b.shapes.plan = None;
                    b.shapes.executes.pop_front();
                    b.shapes.results += 1;
                }
                Some(Back::ErrorResponse) => self.failed(state, body),
                Some(Back::EmptyQueryResponse | Back::PortalSuspended) => state.batch.result(None),
                Some(Back::ReadyForQuery) => {
                    self.completed = 0;
                    state.ready();
                }
                Some(Back::ParameterStatus) => state.parameter_status(body),
                _ => {}
            }
            input.pass(total);
        }
        Ok(())
    }

    /// An ErrorResponse (`body`): the statement being answered failed.
    fn failed(&self, state: &mut State, body: &[u8]) {
        let b = &mut state.batch;
        b.error(error_code(body), self.completed);
        b.shapes.plan = None;
    }

    /// A server message of type `ty` is taken (whole, or begun).
    fn took(&mut self, ty: Option<Back>) {
        let completes = ty.is_some_and(Back::completes);
        self.completed = self.completed.saturating_add(u32::from(completes));
    }

    /// The server closed its side, leaving `input` unread.
    pub fn eof(&self, input: &[u8]) -> Result<(), PgError> {
        if self.cancel {
            return Ok(());
        }
        cut_short(input, &self.rest, "server")
    }
}

/// Read size of the byte-slice drivers: odd, so frames split anywhere.
const CHUNK: usize = 1021;

/// Client → server over any byte streams, until the client's end: what
/// the client sent is read from `r`, what goes on to the server written
/// to `w`, the agent's own answers to `client_w`. For tests and fuzzing;
/// the agent itself drives the machines from its relay loop.
pub fn frontend(
    r: &mut impl Read,
    w: &mut impl Write,
    client_w: &mut impl Write,
    state: &mut State,
) -> Result<(), PgError> {
    let mut m = Frontend::default();
    let (mut input, mut out, mut answers) = (BytesMut::new(), BytesMut::new(), BytesMut::new());
    let mut chunk = [0u8; CHUNK];
    loop {
        let n = r.read(&mut chunk)?;
        input.extend_from_slice(&chunk[..n]);
        let fed = match n {
            0 => m.eof(&input, state),
            _ => m.feed(&mut input, &mut out, &mut answers, state),
        };
        // The client gets the agent's answer even when it ends the session.
        client_w.write_all(&answers)?;
        answers.clear();
        fed?;
        w.write_all(&out)?;
        out.clear();
        if n == 0 {
            return Ok(());
        }
    }
}

/// Server → client over any byte streams, until the server's end. For
/// tests and fuzzing, like [`frontend`].
pub fn backend(r: &mut impl Read, w: &mut impl Write, state: &mut State) -> Result<(), PgError> {
    let mut m = Backend::default();
    let (mut input, mut out) = (BytesMut::new(), BytesMut::new());
    let mut chunk = [0u8; CHUNK];
    loop {
        let n = r.read(&mut chunk)?;
        input.extend_from_slice(&chunk[..n]);
        match n {
            0 => m.eof(&input)?,
            _ => m.feed(&mut input, &mut out, state)?,
        }
        w.write_all(&out)?;
        out.clear();
        if n == 0 {
            return Ok(());
        }
    }
}

/// One connection's machines and the state they share, as a relay loop
/// drives them: the client's bytes, the server's, and the end of each.
pub struct Machines {
    front: Frontend,
    back: Backend,
    state: State,
}

impl Machines {
    pub fn new(state: State) -> Machines {
        Machines {
            front: Frontend::default(),
            back: Backend::default(),
            state,
        }
    }

    /// What the client sent (`input`, whole frames taken): what goes on
    /// to the server, and the agent's own answers to the client.
    pub fn client(
        &mut self,
        input: &mut BytesMut,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) -> Result<(), PgError> {
        let fed = self
            .front
            .feed(input, to_server, to_client, &mut self.state);
        self.tell(to_client);
        fed
    }

    /// Sends the notices waiting for the client, if what goes to it is
    /// between two of the server's messages (else they wait for the end
    /// of the one being passed on).
    fn tell(&mut self, to_client: &mut BytesMut) {
        if self.back.rest.done() {
            if let Some(n) = self.state.take_notices() {
                to_client.extend_from_slice(&n);
            }
        }
    }

    /// The client's end, with what was left of its last frame.
    pub fn client_ended(&mut self, input: &[u8]) -> Result<(), PgError> {
        self.front.eof(input, &mut self.state)
    }

    /// What the server sent: what goes on to the client.
    pub fn server(
        &mut self,
        input: &mut BytesMut,
        to_client: &mut BytesMut,
    ) -> Result<(), PgError> {
        let fed = self.back.feed(input, to_client, &mut self.state);
        self.tell(to_client);
        fed
    }

    /// The server's end, with what was left of its last frame.
    pub fn server_ended(&mut self, input: &[u8]) -> Result<(), PgError> {
        self.back.eof(input)
    }

    /// A statement waits for its decision (see [`super::Verdict::Hold`]).
    pub fn holding(&self) -> bool {
        self.state.holding()
    }

    /// However the connection ends, what it has not recorded yet goes to
    /// the outbox.
    pub fn ended(&mut self) {
        self.state.ended();
    }
}
