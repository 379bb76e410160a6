//! Two sockets with a protocol's machines between them: the loop reads a
//! side when it has something and its peer is not too far behind
//! ([`HIGH_WATER`]), hands the bytes to the machines, and writes what they
//! produce. The machines never touch a socket; this never parses.
//!
//! The end is the opaque relay's: a clean end of one side is passed on as a
//! FIN once what it sent is delivered; an error resets both sides, except
//! that bytes the machines addressed to the client themselves (the agent's
//! last word, a refused login say) go out first, followed by a FIN, so the
//! client reads why.
//!
//! Machines may hold a message (a decision on it is made elsewhere): while
//! they say so ([`Machines::holding`]) the client is not read, so what it
//! sends next waits in its socket and pushes back on it; the server side
//! flows on. Whoever decides rings the connection's [`Bell`], and the
//! machines are handed the client's input again, on whichever loop relays
//! the connection by then.

use std::{
    io::{self, Write},
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
};

use bytes::{Buf, BytesMut};

use crate::{
    submit_here,
    sys::{self, reset},
    Bell, End, Ending, Event, Progress, Pumped, Stream, Traffic,
};

/// A protocol's machines for one connection, as the loop drives them.
pub trait Machines: Send + 'static {
    /// What ends a connection early; the relay's own failures are
    /// `io::Error`s.
    type Error: From<io::Error> + Into<Ending>;
    /// Takes what it can of the client's `input`: what goes to the server
    /// is appended to `to_server`, the machines' own answers to `to_client`.
    fn client(
        &mut self,
        input: &mut BytesMut,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) -> Result<(), Self::Error>;
    /// The client ended its sending, leaving `input` untaken.
    fn client_ended(&mut self, input: &[u8]) -> Result<(), Self::Error>;
    /// Takes what it can of the server's `input`, appending what goes to
    /// the client.
    fn server(&mut self, input: &mut BytesMut, to_client: &mut BytesMut)
        -> Result<(), Self::Error>;
    /// The server ended its sending, leaving `input` untaken.
    fn server_ended(&mut self, input: &[u8]) -> Result<(), Self::Error>;
    /// A message of the client's is held, waiting for a decision: read no
    /// more from the client until the bell rings.
    fn holding(&self) -> bool {
        false
    }
    /// The connection is over (its end is reported right after), or its
    /// loop stopped: last words for whoever reads what the machines kept.
    fn ended(&mut self) {}
}

/// Machines chosen at run time (a protocol registry's entry) are machines.
impl<M: Machines + ?Sized> Machines for Box<M> {
    type Error = M::Error;

    fn client(
        &mut self,
        input: &mut BytesMut,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) -> Result<(), Self::Error> {
        (**self).client(input, to_server, to_client)
    }

    fn client_ended(&mut self, input: &[u8]) -> Result<(), Self::Error> {
        (**self).client_ended(input)
    }

    fn server(
        &mut self,
        input: &mut BytesMut,
        to_client: &mut BytesMut,
    ) -> Result<(), Self::Error> {
        (**self).server(input, to_client)
    }

    fn server_ended(&mut self, input: &[u8]) -> Result<(), Self::Error> {
        (**self).server_ended(input)
    }

    fn holding(&self) -> bool {
        (**self).holding()
    }

    fn ended(&mut self) {
        (**self).ended()
    }
}

/// A layer between one side's socket and the machines (TLS, say): what
/// is read from the socket is opened into the bytes the machines read;
/// what they send is sealed before it is written.
pub trait Layer: Send {
    /// Takes what it can of `wire` (read from the socket; what it leaves
    /// comes back with the next bytes read), appending what that carried
    /// to `plain` and what the layer itself must answer (alerts, key
    /// updates) to `reply`. `Ok(true)`: the peer closed the layer.
    fn open(
        &mut self,
        wire: &mut BytesMut,
        plain: &mut BytesMut,
        reply: &mut BytesMut,
    ) -> io::Result<bool>;
    /// Seals all of `plain` into `wire`.
    fn seal(&mut self, plain: &mut BytesMut, wire: &mut BytesMut) -> io::Result<()>;
    /// The layer's last words before this side's FIN, into `wire`.
    fn close(&mut self, wire: &mut BytesMut);
}

/// One side of an inspected connection as the relay takes it: its
/// socket, the [`Layer`] over it if any, and what was already read and
/// opened of it before (the machines are handed that first).
pub struct Endpoint {
    pub stream: Stream,
    pub layer: Option<Box<dyn Layer>>,
    pub input: BytesMut,
}

impl From<Stream> for Endpoint {
    fn from(stream: Stream) -> Endpoint {
        Endpoint {
            stream,
            layer: None,
            input: BytesMut::new(),
        }
    }
}

/// Relays `client` and `upstream` with `machines` between them on this
/// thread's relay loops, until both sides end; bytes read from each are
/// shown in `progress` as they go. `bell` wakes machines that hold a
/// message.
pub async fn relay_inspected<M: Machines>(
    client: impl TryInto<Stream, Error = io::Error>,
    upstream: impl TryInto<Stream, Error = io::Error>,
    machines: M,
    progress: Arc<Progress>,
    bell: Option<Bell>,
) -> End {
    match (client.try_into(), upstream.try_into()) {
        (Ok(c), Ok(s)) => relay_endpoints(c.into(), s.into(), machines, progress, bell).await,
        (Err(e), _) | (_, Err(e)) => End::at_once(Ending::Failed(e)),
    }
}

/// [`relay_inspected`] of two [`Endpoint`]s.
pub async fn relay_endpoints<M: Machines>(
    client: Endpoint,
    server: Endpoint,
    machines: M,
    progress: Arc<Progress>,
    bell: Option<Bell>,
) -> End {
    let (client, server) = (Side::new(client), Side::new(server));
    let (done, ended) = tokio::sync::oneshot::channel();
    submit_here(Box::new(Inspected {
        client,
        server,
        machines,
        progress,
        bell,
        done: Some(done),
    }));
    ended
        .await
        .unwrap_or_else(|_| End::at_once(Ending::Stopped))
}

/// An inspected connection as the loop sees it.
struct Inspected<M: Machines> {
    client: Side,
    server: Side,
    machines: M,
    progress: Arc<Progress>,
    bell: Option<Bell>,
    done: Option<tokio::sync::oneshot::Sender<End>>,
}

impl<M: Machines> Inspected<M> {
    /// Moves everything that can move; `true` when both sides have ended.
    /// `woken`: the bell rang, so the machines look at the client's input
    /// again even if nothing new came.
    fn step(&mut self, mut woken: bool) -> Result<bool, M::Error> {
        let Inspected {
            client: c,
            server: s,
            machines,
            ..
        } = self;
        loop {
            s.flush()?;
            c.flush()?;
            let from_client = match machines.holding() {
                true => None,
                false => c.take(s.unsent())?,
            };
            match from_client {
                Some(0) => machines.client_ended(&c.input)?,
                Some(_) => machines.client(&mut c.input, &mut s.out, &mut c.out)?,
                None if std::mem::take(&mut woken) && !c.ended => {
                    machines.client(&mut c.input, &mut s.out, &mut c.out)?;
                    if !machines.holding() {
                        continue; // the client may be read again
                    }
                }
                None => {}
            }
            let from_server = s.take(c.unsent())?;
            match from_server {
                Some(0) => machines.server_ended(&s.input)?,
                Some(_) => machines.server(&mut s.input, &mut c.out)?,
                None => {}
            }
            if c.ended {
                s.shut_when_flushed()?;
            }
            if s.ended {
                c.shut_when_flushed()?;
            }
            if c.ended && s.ended && c.shut && s.shut {
                return Ok(true);
            }
            if from_client.is_none() && from_server.is_none() {
                return Ok(false);
            }
        }
    }

    /// Reports the end (see the module's documentation).
    fn end(&mut self, result: Result<(), M::Error>) -> Pumped {
        let how = match result {
            Ok(()) => Ending::Closed,
            Err(e) => {
                if !self.client.last_words() {
                    reset(&self.client.sock);
                }
                reset(&self.server.sock);
                e.into()
            }
        };
        if let Some(done) = self.done.take() {
            self.machines.ended();
            let _ = done.send(End {
                up: self.client.read,
                down: self.server.read,
                how,
                sniffed: false,
            });
        }
        Pumped::Over
    }
}

/// A connection dropped before its end was reported (its loop stopped):
/// the machines still have their last word; the end reads as stopped.
impl<M: Machines> Drop for Inspected<M> {
    fn drop(&mut self) {
        if self.done.is_some() {
            self.machines.ended();
        }
    }
}

impl<M: Machines> Traffic for Inspected<M> {
    fn sockets(&self) -> [RawFd; 2] {
        [self.client.sock.as_raw_fd(), self.server.sock.as_raw_fd()]
    }

    fn pump(&mut self, event: Option<Event>, _: &mut [u8]) -> Pumped {
        match event {
            Some(e) if e.upstream => self.server.saw(e),
            Some(e) => self.client.saw(e),
            None => {}
        }
        let before = self.client.read + self.server.read;
        let woken = self.bell.as_ref().is_some_and(Bell::take_rung);
        let stepped = self.step(woken);
        self.progress.set(self.client.read, self.server.read);
        match stepped {
            Ok(false) => Pumped::Open {
                moved: self.client.read + self.server.read - before,
            },
            Ok(true) => self.end(Ok(())),
            Err(e) => self.end(Err(e)),
        }
    }

    fn refuse(mut self: Box<Self>, e: io::Error) {
        self.end(Err(e.into()));
    }

    fn half_closed(&self) -> bool {
        self.client.ended != self.server.ended
    }

    fn bell(&self) -> Option<&Bell> {
        self.bell.as_ref()
    }
}

/// Unsent output above which a side is not read until its peer catches up.
pub const HIGH_WATER: usize = 256 * 1024;
/// Free room a read asks for.
const READ_ROOM: usize = 64 * 1024;

/// One socket of a relayed connection, with what epoll last said of it.
struct Side {
    sock: Stream,
    /// Read from this side (opened, under a layer) and not yet taken by
    /// its machine.
    input: BytesMut,
    /// To be written to this side (sealed first, under a layer).
    out: BytesMut,
    /// The layer over the socket, if any.
    layer: Option<Sealed>,
    /// `input` holds bytes the machines have not been handed yet (read
    /// before the relay took the connection).
    fresh: bool,
    /// Bytes read from this side.
    read: u64,
    /// This side has closed its sending half (read 0).
    ended: bool,
    /// Our sending half to this side is shut down.
    shut: bool,
    /// A read may find something (cleared by EAGAIN, or by a short read
    /// unless the peer's end was reported: that brings no new event).
    readable: bool,
    /// The peer's end or an error was reported.
    closing: bool,
    /// A write may go through (cleared by EAGAIN).
    writable: bool,
}

/// A side's [`Layer`] with the bytes on the socket's side of it.
struct Sealed {
    layer: Box<dyn Layer>,
    /// Read from the socket, not yet opened.
    wire_in: BytesMut,
    /// Sealed, not yet written.
    wire_out: BytesMut,
    /// The peer closed the layer.
    peer_closed: bool,
    /// Our closing words are queued.
    closed: bool,
}

impl Side {
    fn new(end: Endpoint) -> Side {
        let mut input = end.input;
        let fresh = !input.is_empty();
        if input.capacity() < READ_ROOM {
            input.reserve(READ_ROOM);
        }
        Side {
            sock: end.stream,
            input,
            out: BytesMut::new(),
            layer: end.layer.map(|layer| Sealed {
                layer,
                wire_in: BytesMut::new(),
                wire_out: BytesMut::new(),
                peer_closed: false,
                closed: false,
            }),
            fresh,
            read: 0,
            ended: false,
            shut: false,
            readable: true,
            closing: false,
            writable: true,
        }
    }

    /// Takes in what epoll reported for this socket.
    fn saw(&mut self, e: Event) {
        self.readable |= e.input();
        self.closing |= e.ended();
        self.writable |= e.room();
    }

    /// Bytes for this side not written yet.
    fn unsent(&self) -> usize {
        self.out.len() + self.layer.as_ref().map_or(0, |l| l.wire_out.len())
    }

    /// Reads once (under a layer: until something opens), unless this side
    /// has ended, has nothing to read, or its peer has [`HIGH_WATER`]
    /// (`peer_unsent`) still to write. `Some(0)`: the end, now marked;
    /// `None`: nothing read.
    fn take(&mut self, peer_unsent: usize) -> io::Result<Option<usize>> {
        if self.ended || peer_unsent >= HIGH_WATER {
            return Ok(None);
        }
        if std::mem::take(&mut self.fresh) {
            return Ok(Some(self.input.len()));
        }
        let Some(sealed) = self.layer.as_mut() else {
            if !self.readable {
                return Ok(None);
            }
            let n = recv_some(
                &self.sock,
                &mut self.input,
                &mut self.readable,
                self.closing,
            )?;
            if let Some(n) = n {
                self.read += n as u64;
                self.ended = n == 0;
            }
            return Ok(n);
        };
        loop {
            if sealed.peer_closed {
                self.ended = true;
                return Ok(Some(0));
            }
            if !self.readable {
                return Ok(None);
            }
            let Some(n) = recv_some(
                &self.sock,
                &mut sealed.wire_in,
                &mut self.readable,
                self.closing,
            )?
            else {
                return Ok(None);
            };
            self.read += n as u64;
            if n == 0 {
                self.ended = true;
                return Ok(Some(0));
            }
            let before = self.input.len();
            sealed.peer_closed =
                sealed
                    .layer
                    .open(&mut sealed.wire_in, &mut self.input, &mut sealed.wire_out)?;
            if self.input.len() > before {
                return Ok(Some(self.input.len() - before));
            }
        }
    }

    /// Writes what it can of `out` (sealed first, under a layer).
    fn flush(&mut self) -> io::Result<()> {
        let out = match self.layer.as_mut() {
            Some(sealed) => {
                if !self.out.is_empty() {
                    sealed.layer.seal(&mut self.out, &mut sealed.wire_out)?;
                }
                &mut sealed.wire_out
            }
            None => &mut self.out,
        };
        while !out.is_empty() && self.writable {
            let sent = sys::send(self.sock.as_raw_fd(), out);
            match sys::ready(sent.and_then(sys::moved))? {
                Some(n) => out.advance(n),
                None => self.writable = false,
            }
        }
        Ok(())
    }

    /// Sends FIN once everything queued for this side is written (a
    /// layer's closing words last).
    fn shut_when_flushed(&mut self) -> io::Result<()> {
        if self.shut || !self.out.is_empty() {
            return Ok(());
        }
        if let Some(sealed) = self.layer.as_mut().filter(|s| !s.closed) {
            sealed.closed = true;
            sealed.layer.close(&mut sealed.wire_out);
            self.flush()?;
        }
        if self.unsent() > 0 {
            return Ok(());
        }
        self.shut = true;
        sys::shutdown_write(self.sock.as_raw_fd())
    }

    /// Writes once what is queued for this side (a connection that failed
    /// still says the machines' last word). `false`: there was nothing.
    fn last_words(&mut self) -> bool {
        if self.unsent() == 0 {
            return false;
        }
        if let Some(sealed) = self.layer.as_mut() {
            if sealed
                .layer
                .seal(&mut self.out, &mut sealed.wire_out)
                .is_ok()
            {
                sealed.layer.close(&mut sealed.wire_out);
            }
            let _ = (&self.sock).write(&sealed.wire_out);
        } else {
            let _ = (&self.sock).write(&self.out);
        }
        true
    }
}

/// One recv(2) into `buf`, keeping its free room at the front of one
/// allocation (an emptied buffer starts over from its beginning: a cheap
/// reclaim, so a busy connection keeps touching the same few cache
/// lines). `None`: nothing to read (`readable` cleared); a short read
/// clears it too unless the peer's end was reported (`closing`: that
/// brings no new event).
fn recv_some(
    sock: &Stream,
    buf: &mut BytesMut,
    readable: &mut bool,
    closing: bool,
) -> io::Result<Option<usize>> {
    if buf.is_empty() || buf.capacity() - buf.len() < READ_ROOM / 4 {
        buf.reserve(READ_ROOM);
    }
    let room = buf.capacity() - buf.len();
    let Some(n) = sys::ready(sys::recv_into(sock.as_raw_fd(), buf))? else {
        *readable = false;
        return Ok(None);
    };
    if n > 0 && n < room && !closing {
        // A short read drained the socket: more bytes bring an event.
        *readable = false;
    }
    Ok(Some(n))
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read,
        net::{TcpListener, TcpStream},
        sync::atomic::{AtomicBool, Ordering},
        thread,
        time::{Duration, Instant},
    };

    use super::*;
    use crate::Loops;

    /// Passes bytes on, but holds at each `H` until `released`.
    struct HoldAtH {
        released: Arc<AtomicBool>,
        held: bool,
    }

    impl HoldAtH {
        fn new(released: Arc<AtomicBool>) -> Self {
            HoldAtH {
                released,
                held: false,
            }
        }

        /// One that never holds.
        fn passing() -> Self {
            HoldAtH::new(Arc::new(AtomicBool::new(true)))
        }
    }

    impl Machines for HoldAtH {
        type Error = io::Error;

        fn client(
            &mut self,
            input: &mut BytesMut,
            to_server: &mut BytesMut,
            _: &mut BytesMut,
        ) -> io::Result<()> {
            let released = self.released.load(Ordering::SeqCst);
            let upto = match input.iter().position(|&b| b == b'H') {
                Some(at) if !released => at,
                _ => input.len(),
            };
            self.held = upto < input.len();
            to_server.extend_from_slice(&input.split_to(upto));
            Ok(())
        }

        fn client_ended(&mut self, _: &[u8]) -> io::Result<()> {
            Ok(())
        }

        fn server(&mut self, input: &mut BytesMut, to_client: &mut BytesMut) -> io::Result<()> {
            to_client.extend_from_slice(&input.split());
            Ok(())
        }

        fn server_ended(&mut self, _: &[u8]) -> io::Result<()> {
            Ok(())
        }

        fn holding(&self) -> bool {
            self.held
        }
    }

    /// An echo server's address.
    fn echo() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = s.read(&mut buf) {
                        if (&s).write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    /// An app's end of a connection relayed by `loops` to `server`, with
    /// `machines` between.
    fn relayed<M: Machines>(
        loops: &Loops,
        server: std::net::SocketAddr,
        machines: M,
        bell: Option<Bell>,
    ) -> TcpStream {
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let app = TcpStream::connect(front.local_addr().unwrap()).unwrap();
        let (client, _) = front.accept().unwrap();
        let upstream = TcpStream::connect(server).unwrap();
        for s in [&client, &upstream] {
            s.set_nonblocking(true).unwrap();
        }
        let (done, _) = tokio::sync::oneshot::channel();
        loops.submit(Box::new(Inspected {
            client: Side::new(Stream::from(client).into()),
            server: Side::new(Stream::from(upstream).into()),
            machines,
            progress: Arc::default(),
            bell,
            done: Some(done),
        }));
        app.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        app
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// A held message waits without stopping its loop: another connection
    /// on the same loop flows meanwhile. What the client sends behind it
    /// waits too. The connection then moves to another loop, and a ring
    /// of its bell still reaches it there: the held bytes go on, in order.
    #[test]
    fn a_held_connection_is_woken_on_the_loop_it_moved_to() {
        let loops = Loops::with_balance(2, crate::Tuning::default(), None).unwrap();
        let server = echo();
        let released = Arc::new(AtomicBool::new(false));
        let bell = Bell::new();
        let hold = HoldAtH::new(released.clone());
        // Both on loop 0 (submits alternate between the two loops).
        let mut held = relayed(&loops, server, hold, Some(bell.clone()));
        let mut filler = relayed(&loops, server, HoldAtH::passing(), None);
        let mut other = relayed(&loops, server, HoldAtH::passing(), None);
        wait_for("three connections on the loops", || loops.open() == [2, 1]);

        held.write_all(b"abcHdef").unwrap();
        let mut got = [0u8; 3];
        held.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
        held.write_all(b"ghi").unwrap();

        // The loop holding it serves the other connections.
        for c in [&mut other, &mut filler] {
            c.write_all(b"ping").unwrap();
            let mut pong = [0u8; 4];
            c.read_exact(&mut pong).unwrap();
            assert_eq!(&pong, b"ping");
        }
        held.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut none = [0u8; 1];
        let e = held.read(&mut none).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );

        // Move everything on loop 0 to loop 1, then decide.
        loops.shed(0, true, 1);
        wait_for("the move", || loops.open() == [0, 3]);
        released.store(true, Ordering::SeqCst);
        bell.ring();
        held.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut rest = [0u8; 7];
        held.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"Hdefghi");
    }

    /// A toy layer: frames of at most 200 bytes, `len` then the bytes
    /// xored with 0x5a; a frame of length 0 closes.
    struct Frames;

    fn frame(plain: &[u8], wire: &mut Vec<u8>) {
        for chunk in plain.chunks(200) {
            wire.push(chunk.len() as u8);
            wire.extend(chunk.iter().map(|b| b ^ 0x5a));
        }
    }

    /// Opens whole frames of `wire`; `true` once a closing frame came.
    fn unframe(wire: &mut BytesMut, plain: &mut Vec<u8>) -> bool {
        while let Some(&len) = wire.first() {
            if len == 0 {
                wire.advance(1);
                return true;
            }
            if wire.len() < 1 + len as usize {
                break;
            }
            plain.extend(wire[1..1 + len as usize].iter().map(|b| b ^ 0x5a));
            wire.advance(1 + len as usize);
        }
        false
    }

    impl Layer for Frames {
        fn open(
            &mut self,
            wire: &mut BytesMut,
            plain: &mut BytesMut,
            _: &mut BytesMut,
        ) -> io::Result<bool> {
            let mut out = Vec::new();
            let closed = unframe(wire, &mut out);
            plain.extend_from_slice(&out);
            Ok(closed)
        }

        fn seal(&mut self, plain: &mut BytesMut, wire: &mut BytesMut) -> io::Result<()> {
            let mut out = Vec::new();
            frame(&plain.split(), &mut out);
            wire.extend_from_slice(&out);
            Ok(())
        }

        fn close(&mut self, wire: &mut BytesMut) {
            wire.extend_from_slice(&[0]);
        }
    }

    /// Under a layer, the machines see what it opens and the app gets
    /// what it seals, whatever the records' split across reads; bytes
    /// opened before the relay took the connection go first; the layer's
    /// closing words precede the FIN both ways.
    #[test]
    fn a_layer_opens_what_is_read_and_seals_what_is_written() {
        let loops = Loops::with_balance(1, crate::Tuning::default(), None).unwrap();
        let server = echo();
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut app = TcpStream::connect(front.local_addr().unwrap()).unwrap();
        let (client, _) = front.accept().unwrap();
        let upstream = TcpStream::connect(server).unwrap();
        for s in [&client, &upstream] {
            s.set_nonblocking(true).unwrap();
        }
        let (done, ended) = tokio::sync::oneshot::channel();
        let client = Endpoint {
            stream: client.into(),
            layer: Some(Box::new(Frames)),
            input: BytesMut::from(&b"early:"[..]),
        };
        loops.submit(Box::new(Inspected {
            client: Side::new(client),
            server: Side::new(Stream::from(upstream).into()),
            machines: HoldAtH::passing(),
            progress: Arc::default(),
            bell: None,
            done: Some(done),
        }));
        app.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let plain: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut wire = Vec::new();
        frame(&plain, &mut wire);
        wire.push(0);
        let writer = {
            let mut app = app.try_clone().unwrap();
            thread::spawn(move || {
                // Odd-sized pieces: frames split across reads.
                for piece in wire.chunks(977) {
                    app.write_all(piece).unwrap();
                }
            })
        };
        let mut back = Vec::new();
        app.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        let mut back = BytesMut::from(&back[..]);
        let mut opened = Vec::new();
        assert!(unframe(&mut back, &mut opened), "closed by a closing frame");
        assert!(back.is_empty(), "nothing after the closing frame");
        assert_eq!(&opened[..6], b"early:");
        assert!(opened[6..] == plain[..], "echoed whole and in order");
        let end = ended.blocking_recv().unwrap();
        assert!(matches!(end.how, Ending::Closed), "{:?}", end.how);
    }
}
