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

use std::{
    io::{self, Write},
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
};

use bytes::{Buf, BytesMut};

use crate::{
    submit_here,
    sys::{self, reset},
    End, Ending, Event, Progress, Pumped, Stream, Traffic,
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
}

/// Relays `client` and `upstream` with `machines` between them on this
/// thread's relay loops, until both sides end; bytes read from each are
/// shown in `progress` as they go.
pub async fn relay_inspected<M: Machines>(
    client: impl TryInto<Stream, Error = io::Error>,
    upstream: impl TryInto<Stream, Error = io::Error>,
    machines: M,
    progress: Arc<Progress>,
) -> End {
    let (client, server) = match (Side::new(client), Side::new(upstream)) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => return End::at_once(Ending::Failed(e)),
    };
    let (done, ended) = tokio::sync::oneshot::channel();
    submit_here(Box::new(Inspected {
        client,
        server,
        machines,
        progress,
        done: Some(done),
    }));
    ended
        .await
        .unwrap_or_else(|_| End::at_once(Ending::Stopped))
}

/// An inspected connection as the loop sees it.
struct Inspected<M> {
    client: Side,
    server: Side,
    machines: M,
    progress: Arc<Progress>,
    done: Option<tokio::sync::oneshot::Sender<End>>,
}

impl<M: Machines> Inspected<M> {
    /// Moves everything that can move; `true` when both sides have ended.
    fn step(&mut self) -> Result<bool, M::Error> {
        let Inspected {
            client: c,
            server: s,
            machines,
            ..
        } = self;
        loop {
            s.flush()?;
            c.flush()?;
            let from_client = c.take(s.out.len())?;
            match from_client {
                Some(0) => machines.client_ended(&c.input)?,
                Some(_) => machines.client(&mut c.input, &mut s.out, &mut c.out)?,
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
        let stepped = self.step();
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
    fn new(s: impl TryInto<Stream, Error = io::Error>) -> io::Result<Side> {
        Ok(Side {
            sock: s.try_into()?,
            input: BytesMut::with_capacity(READ_ROOM),
            out: BytesMut::new(),
            read: 0,
            ended: false,
            shut: false,
            readable: true,
            closing: false,
            writable: true,
        })
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
