//! The relay: relayed connections, moved by threads of their own once the
//! agent has let them through. It names no protocol, policy or record: a
//! connection ends with a neutral [`End`], which the agent interprets.
//!
//! A data-plane worker does the work that needs the agent (identity,
//! policy, the upstream connect, recording) and then hands both sockets to
//! a loop thread (as many as the load needs: see [`Loops`]) as a
//! [`Traffic`]: an opaque stream ([`relay`]), or one whose protocol the
//! agent inspects, with its machines between the two sockets. From there on every byte is moved by that thread's
//! `epoll` loop, with no runtime, task or waker between a socket event and
//! the system call that answers it. That path is what a request waits on,
//! twice per round trip, and on a virtual machine it runs with cold caches
//! after every wakeup: the shorter it is, the less latency and CPU the
//! proxy adds. Each connection reports its end (bytes both ways, how it
//! ended) back to the worker, which records it.
//!
//! Small messages are copied through one 64 KiB buffer per loop (the
//! cheapest path for request/response traffic; a connection holds memory
//! only for bytes its peer has not yet taken). Once a read fills that
//! buffer the stream is bulk, and the rest of that direction moves with
//! `splice(2)` through a pipe, never entering userspace.
//!
//! Busy polling (`agent.busy_poll_us`, off by default). A request relayed
//! to a server is usually answered within tens of microseconds. A loop
//! that sleeps in the meantime pays for a wakeup to see the answer, and on
//! virtual machines waking an idle CPU is the largest part of what a proxy
//! adds to request/response latency. With a window set, the loop keeps
//! calling `epoll_wait` without blocking for that long after it last read
//! bytes, yielding the CPU (`sched_yield`) between rounds, so a runnable
//! task on this CPU (the server being answered, say) runs first: the loop
//! fills idle time rather than competing for busy time. The price is CPU
//! time that monitoring will show (up to the window after every message
//! read), and on burstable or shared machines idle time is not free.
//!
//! Semantics, for every relayed connection (inspected ones included): a FIN
//! from one side becomes a FIN to the other while the reverse direction
//! keeps flowing; an error on either side resets both.

use std::{
    io::{self, Write},
    net::TcpStream,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
    time::Duration,
};

use sys::send;

mod bare;
mod bell;
mod event_loop;
mod inspected;
mod pool;
pub mod sys;
mod tcp;

pub use bare::bare;
pub use bell::Bell;
pub use event_loop::{install, submit_here, RelayLoop};
pub use inspected::{relay_endpoints, relay_inspected, Endpoint, Layer, Machines, HIGH_WATER};
pub use pool::Loops;
pub use tcp::{relay, Progress, Sniff};

/// What the loop calls once with a connection's end.
pub type Done = Box<dyn FnOnce(End) + Send>;

/// How a relayed connection ended: bytes each way, and how.
#[derive(Debug)]
pub struct End {
    /// Bytes from the client.
    pub up: u64,
    /// Bytes from the upstream side.
    pub down: u64,
    pub how: Ending,
    /// The client's first bytes opened a session of the protocol a
    /// [`Sniff`] looked for (relayed, or refused for it).
    pub sniffed: bool,
}

/// How a connection ended.
#[derive(Debug)]
pub enum Ending {
    /// Both directions ended cleanly.
    Closed,
    /// A socket failed (or a timeout passed); both sides were reset.
    Failed(io::Error),
    /// Refused for this reason (a [`Sniff`] told); both sides were reset.
    Refused(String),
    /// The loop stopped before the connection ended.
    Stopped,
}

/// A socket's failure.
impl From<io::Error> for Ending {
    fn from(e: io::Error) -> Ending {
        Ending::Failed(e)
    }
}

impl End {
    /// An end with no byte moved.
    pub fn at_once(how: Ending) -> End {
        End {
            up: 0,
            down: 0,
            how,
            sniffed: false,
        }
    }
}

/// A connected stream socket, TCP or unix, non-blocking: one side of a
/// relayed connection. The loop only reads, writes, splices and shuts it
/// down, which every stream socket does alike.
#[derive(Debug)]
pub struct Stream(OwnedFd);

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream(s.into())
    }
}

impl From<std::os::unix::net::UnixStream> for Stream {
    fn from(s: std::os::unix::net::UnixStream) -> Stream {
        Stream(s.into())
    }
}

/// Leaving the runtime keeps the socket non-blocking.
impl TryFrom<tokio::net::TcpStream> for Stream {
    type Error = io::Error;
    fn try_from(s: tokio::net::TcpStream) -> io::Result<Stream> {
        Ok(s.into_std()?.into())
    }
}

impl TryFrom<tokio::net::UnixStream> for Stream {
    type Error = io::Error;
    fn try_from(s: tokio::net::UnixStream) -> io::Result<Stream> {
        Ok(s.into_std()?.into())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send(self.as_raw_fd(), buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a loop relays for one connection: its two sockets and what moves
/// bytes between them. The loop owns it from [`RelayLoop::submit`] until
/// [`Traffic::pump`] says it is over; dropping it closes the sockets.
pub trait Traffic: Send {
    /// The client's socket and the upstream one, both non-blocking.
    fn sockets(&self) -> [RawFd; 2];
    /// Moves what can move after `event` (`None`: nothing is known; look at
    /// both sockets). Reports the connection's end itself, then says
    /// [`Pumped::Over`].
    fn pump(&mut self, event: Option<Event>, scratch: &mut [u8]) -> Pumped;
    /// The loop cannot take it (stopped, the sockets cannot be watched, or
    /// a timeout passed): report that end.
    fn refuse(self: Box<Self>, e: io::Error);
    /// One side has ended its sending and the other not.
    fn half_closed(&self) -> bool;
    /// What wakes it from another thread, if anything may (see [`Bell`]).
    fn bell(&self) -> Option<&Bell> {
        None
    }
}

/// What epoll reported for one socket of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// The upstream socket (else the client's).
    pub upstream: bool,
    pub(crate) events: libc::c_int,
}

impl Event {
    /// The peer ended its sending half, or the socket failed: reading will
    /// say which, and no further event will.
    pub fn ended(self) -> bool {
        self.events & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) != 0
    }

    /// Something to read: bytes, an end or an error.
    pub fn input(self) -> bool {
        self.ended() || self.events & libc::EPOLLIN != 0
    }

    /// Room to write.
    pub fn room(self) -> bool {
        self.events & (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) != 0
    }
}

/// How a connection stands after [`Traffic::pump`].
pub enum Pumped {
    /// Still open; `moved`: bytes read (busy polling counts from a read;
    /// the balancer counts the bytes).
    Open { moved: u64 },
    /// Over, and its end reported.
    Over,
}

/// How a loop treats its connections beyond moving their bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tuning {
    /// Keep polling this long after each read (see the module's
    /// documentation).
    pub busy_poll: Option<Duration>,
    /// End a connection that has moved no byte for this long.
    pub idle: Option<Duration>,
    /// End a connection one side of which has ended its sending while the
    /// other has not, once no byte has moved for this long since.
    pub half_closed: Option<Duration>,
}

/// A connected loopback pair for relay tests: (the connecting end, the
/// accepted end).
#[cfg(test)]
pub(crate) async fn loopback_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}
