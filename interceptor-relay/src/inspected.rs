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
    let (client, server) = match (client.try_into(), upstream.try_into()) {
        (Ok(c), Ok(s)) => (Side::new(c), Side::new(s)),
        (Err(e), _) | (_, Err(e)) => return End::at_once(Ending::Failed(e)),
    };
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
                false => c.take(s.out.len())?,
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
            let from_server = s.take(c.out.len())?;
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
                let said = !self.client.out.is_empty();
                if said {
                    let _ = (&self.client.sock).write(&self.client.out);
                } else {
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
    /// Read from this side and not yet taken by its machine.
    input: BytesMut,
    /// To be written to this side.
    out: BytesMut,
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

impl Side {
    fn new(sock: Stream) -> Side {
        Side {
            sock,
            input: BytesMut::with_capacity(READ_ROOM),
            out: BytesMut::new(),
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

    /// Reads once, unless this side has ended, has nothing to read, or its
    /// peer has [`HIGH_WATER`] (`peer_unsent`) still to write. `Some(0)`:
    /// the end, now marked; `None`: nothing read.
    fn take(&mut self, peer_unsent: usize) -> io::Result<Option<usize>> {
        if self.ended || !self.readable || peer_unsent >= HIGH_WATER {
            return Ok(None);
        }
        // Keep the room at the front of one allocation: an emptied buffer
        // starts over from its beginning (a cheap reclaim), so a busy
        // connection keeps touching the same few cache lines.
        if self.input.is_empty() || self.input.capacity() - self.input.len() < READ_ROOM / 4 {
            self.input.reserve(READ_ROOM);
        }
        let room = self.input.capacity() - self.input.len();
        let Some(n) = sys::ready(read_into(self.sock.as_raw_fd(), &mut self.input))? else {
            self.readable = false;
            return Ok(None);
        };
        if n > 0 && n < room && !self.closing {
            // A short read drained the socket: more bytes bring an event.
            self.readable = false;
        }
        self.read += n as u64;
        self.ended = n == 0;
        Ok(Some(n))
    }

    /// Writes what it can of `out`.
    fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() && self.writable {
            let sent = sys::send(self.sock.as_raw_fd(), &self.out);
            match sys::ready(sent.and_then(sys::moved))? {
                Some(n) => self.out.advance(n),
                None => self.writable = false,
            }
        }
        Ok(())
    }

    /// Sends FIN once everything queued for this side is written.
    fn shut_when_flushed(&mut self) -> io::Result<()> {
        if self.shut || !self.out.is_empty() {
            return Ok(());
        }
        self.shut = true;
        sys::shutdown_write(self.sock.as_raw_fd())
    }
}

/// recv(2) into the free room of `buf`. (Not read(2): on a socket that
/// goes through the file layer first, position lock and access
/// notification included, which perf showed as a visible share of the
/// relay loop's time.)
fn read_into(fd: i32, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.spare_capacity_mut();
    // SAFETY: `room` is writable memory of `room.len()` bytes owned by
    // `buf`; recv(2) writes at most that many and reports how many.
    let n = unsafe { sys::recv(fd, room.as_mut_ptr().cast(), room.len())? };
    // SAFETY: the kernel initialised the first `n` bytes of the free room.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
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
            client: Side::new(client.into()),
            server: Side::new(upstream.into()),
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
}
