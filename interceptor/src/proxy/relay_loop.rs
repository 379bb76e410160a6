//! The relay loop: relayed connections, moved by a thread of their own
//! once the proxy has let them through.
//!
//! A data-plane worker does the work that needs the agent (identity,
//! policy, the upstream connect, recording) and then hands both sockets to
//! a loop thread (as many as the load needs: see [`Loops`]) as a
//! [`Traffic`]: opaque TCP ([`relay`]) or
//! PostgreSQL (`protocol::postgres::relay`, whose machines sit between the
//! two sockets). From there on every byte is moved by that thread's
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
//! Semantics, as for every relayed connection: a FIN from one side becomes
//! a FIN to the other while the reverse direction keeps flowing; an error
//! on either side resets both.

use std::{
    cell::RefCell,
    io::{self, Write},
    net::TcpStream,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::warn;

mod pool;

pub use pool::Loops;

use super::{reset, shutdown_write, Relayed};
use crate::record::Outcome;

/// Pipe capacity asked for (the kernel may grant less).
const PIPE_SIZE: usize = 1 << 20;
/// The copy buffer; a read that fills it switches the direction to splice.
const COPY_BUF: usize = 64 * 1024;
/// epoll token of the loop's doorbell. A connection's sockets use their
/// slot index shifted left by one, plus [`UPSTREAM`] for the upstream one.
const BELL: u64 = u64::MAX;
const UPSTREAM: u64 = 1;

/// What the loop calls once with a TCP connection's end.
pub type Done = Box<dyn FnOnce(Relayed) + Send>;

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
}

/// What epoll reported for one socket of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// The upstream socket (else the client's).
    pub upstream: bool,
    events: libc::c_int,
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

/// How often a loop with timeouts looks for connections past them.
const SWEEP: Duration = Duration::from_secs(1);

/// What a loop is asked to do.
pub(crate) enum Job {
    /// Relay this connection.
    Relay(Box<dyn Traffic>),
    /// Hand connections over to other loops, in turn: every other one
    /// (`all` false) or all of them.
    Shed { all: bool, to: Vec<Handle> },
}

/// Where a loop takes jobs from other threads.
#[derive(Clone)]
pub(crate) struct Handle {
    jobs: mpsc::Sender<Job>,
    bell: Arc<OwnedFd>,
}

impl Handle {
    /// Hands a connection to the loop.
    pub(crate) fn submit(&self, traffic: Box<dyn Traffic>) {
        if let Err(mpsc::SendError(Job::Relay(t))) = self.send(Job::Relay(traffic)) {
            t.refuse(io::Error::other("the relay loop has stopped"));
        }
    }

    fn send(&self, job: Job) -> Result<(), mpsc::SendError<Job>> {
        self.jobs.send(job)?;
        ring(&self.bell);
        Ok(())
    }

    /// Asks the loop to hand connections over to `to` (see [`Job::Shed`]).
    pub(crate) fn shed(&self, all: bool, to: Vec<Handle>) {
        // A loop that has stopped has nothing left to hand over.
        let _ = self.send(Job::Shed { all, to });
    }
}

/// A running loop thread. Dropping it stops the thread; connections still
/// open are closed without their end being reported.
pub struct RelayLoop {
    handle: Handle,
    stop: Arc<AtomicBool>,
    /// Connections it relays now.
    open: Arc<AtomicUsize>,
    /// Bytes its connections have moved so far.
    moved: Arc<AtomicU64>,
    /// The loop thread's id (0 until it has started).
    tid: Arc<AtomicI32>,
    thread: Option<JoinHandle<()>>,
}

impl RelayLoop {
    /// Starts a loop thread named `name`. With `tuning.busy_poll`, the
    /// thread keeps polling (without sleeping) for that long after each
    /// read (see the module's documentation for why, and at what price);
    /// with its timeouts, connections past them are ended.
    pub fn start(name: String, tuning: Tuning) -> io::Result<RelayLoop> {
        // SAFETY: plain eventfd(2); the fd is owned right below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and belongs to nobody else.
        let bell = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let epoll = Epoll::new()?;
        epoll.add(bell.as_raw_fd(), BELL, libc::EPOLLIN | libc::EPOLLET)?;
        let (jobs, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let moved = Arc::new(AtomicU64::new(0));
        let tid = Arc::new(AtomicI32::new(0));
        let thread = {
            let (bell, stop, open, m, t) = (
                bell.clone(),
                stop.clone(),
                open.clone(),
                moved.clone(),
                tid.clone(),
            );
            std::thread::Builder::new().name(name).spawn(move || {
                // SAFETY: gettid(2) takes no arguments and cannot fail.
                t.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                let mut l = Loop {
                    epoll,
                    slots: Vec::new(),
                    free: Vec::new(),
                    open,
                    moved: m,
                    scratch: vec![0; COPY_BUF].into_boxed_slice(),
                    busy_poll: tuning.busy_poll,
                    last_read: None,
                    tuning,
                    clock: Clock::default(),
                };
                if let Err(e) = l.run(&rx, &bell, &stop) {
                    warn!(error = %e, "relay loop failed; its connections are closed");
                }
            })?
        };
        Ok(RelayLoop {
            handle: Handle { jobs, bell },
            stop,
            open,
            moved,
            tid,
            thread: Some(thread),
        })
    }

    /// Hands a connection to the loop.
    pub fn submit(&self, traffic: Box<dyn Traffic>) {
        self.handle.submit(traffic);
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// How many connections the loop relays now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Bytes its connections have moved so far.
    pub(crate) fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    /// Time the loop thread has been runnable so far: on a CPU, or waiting
    /// for one (`schedstat`; `None` where the kernel does not keep it).
    pub(crate) fn runnable_time(&self) -> Option<Duration> {
        let tid = self.tid.load(Ordering::Relaxed);
        if tid == 0 {
            return None;
        }
        let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
        let mut f = s.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(on_cpu)), Some(Ok(waiting))) = (f.next(), f.next()) else {
            return None;
        };
        Some(Duration::from_nanos(on_cpu + waiting))
    }

    /// CPU time the loop thread has used so far (user and system).
    pub(crate) fn cpu_time(&self) -> Option<Duration> {
        use std::os::unix::thread::JoinHandleExt;
        let thread = self.thread.as_ref()?.as_pthread_t();
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `thread` is a live thread (joined only on drop); the
        // clock id is written into a local.
        if unsafe { libc::pthread_getcpuclockid(thread, &mut clock) } != 0 {
            return None;
        }
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: reads a clock into a local timespec.
        if unsafe { libc::clock_gettime(clock, &mut t) } != 0 {
            return None;
        }
        Some(Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
    }
}

impl Drop for RelayLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        ring(&self.handle.bell);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

thread_local! {
    /// The loops this data-plane worker hands connections to.
    static LOOPS: RefCell<Option<Arc<Loops>>> = const { RefCell::new(None) };
}

/// Gives the calling thread (a data-plane worker) the loops it hands
/// connections to.
pub fn install(loops: Arc<Loops>) {
    LOOPS.with(|slot| *slot.borrow_mut() = Some(loops));
}

/// Hands `traffic` to this worker's loops (a loop of its own is started
/// on first use where none were installed).
pub(crate) fn submit_here(traffic: Box<dyn Traffic>) {
    LOOPS.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_none() {
            match Loops::start(1, Tuning::default()) {
                Ok(l) => *slot = Some(l),
                Err(e) => return traffic.refuse(e),
            }
        }
        slot.as_ref().expect("set above").submit(traffic);
    });
}

/// What an opaque connection does when the client's first bytes open a
/// PostgreSQL session (see [`crate::protocol::postgres::opens_session`]):
/// nothing the client sends goes upstream until they tell.
#[derive(Debug, Clone)]
pub enum Sniff {
    /// Relay it (it is reported in [`super::Relayed::postgres`]).
    Note,
    /// End the connection with both sides reset, as denied for this reason.
    Refuse(String),
}

/// Relays `client` and `upstream` as opaque bytes on a relay loop
/// until both directions end, counting the bytes in `progress` as they go,
/// and looking at the client's first bytes as `sniff` says.
pub async fn relay(
    client: impl TryInto<Stream, Error = io::Error>,
    upstream: impl TryInto<Stream, Error = io::Error>,
    progress: Arc<crate::record::Progress>,
    sniff: Option<Sniff>,
) -> Relayed {
    let (client, upstream) = match (client.try_into(), upstream.try_into()) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => return failed(e),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tcp = Tcp::new(
        client,
        upstream,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    tcp.progress = Some(progress);
    tcp.sniff = sniff;
    submit_here(Box::new(tcp));
    rx.await.unwrap_or_else(|_| Relayed {
        up: 0,
        down: 0,
        outcome: Outcome::Interrupted,
        detail: Some("the relay loop stopped".into()),
        postgres: false,
    })
}

fn failed(e: io::Error) -> Relayed {
    Relayed {
        up: 0,
        down: 0,
        outcome: Outcome::Error,
        detail: Some(e.to_string()),
        postgres: false,
    }
}

/// `interceptor bench-relay`: relays every connection made to a free
/// loopback port (printed on stdout) to `to` on `threads` loops, balanced
/// as the agent's are, with nothing else around it. Benchmarks run it beside the agent
/// to show what of a figure is the relaying itself. Runs until killed.
pub fn bare(to: std::net::SocketAddr, threads: usize) -> io::Result<()> {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let mut out = io::stdout();
    writeln!(out, "{}", listener.local_addr()?.port())?;
    out.flush()?;
    let loops = Loops::start(threads, Tuning::default())?;
    for client in listener.incoming() {
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let (Ok(upstream), Ok(from)) = (TcpStream::connect(to), client.peer_addr()) else {
            continue; // the client sees its connection closed
        };
        for (s, peer) in [(&client, from), (&upstream, to)] {
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            super::local_hop(s, peer);
        }
        loops.submit(Box::new(Tcp::new(client, upstream, Box::new(|_| {}))));
    }
    Ok(())
}

fn ring(bell: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to our eventfd; a full
    // counter (EAGAIN) still leaves the bell rung.
    unsafe { libc::write(bell.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// The loop thread's state.
struct Loop {
    epoll: Epoll,
    slots: Vec<Option<Box<dyn Traffic>>>,
    free: Vec<usize>,
    /// Connections in `slots`, for the balancer.
    open: Arc<AtomicUsize>,
    /// Bytes moved so far, for the balancer.
    moved: Arc<AtomicU64>,
    scratch: Box<[u8]>,
    busy_poll: Option<Duration>,
    last_read: Option<Instant>,
    tuning: Tuning,
    clock: Clock,
}

/// When each connection last moved bytes and since when it is half
/// closed, by slot; kept only when the loop has timeouts.
#[derive(Default)]
struct Clock {
    /// Read once per wake-up.
    now: Option<Instant>,
    last_sweep: Option<Instant>,
    active: Vec<Instant>,
    half_since: Vec<Option<Instant>>,
}

impl Loop {
    fn run(
        &mut self,
        jobs: &mpsc::Receiver<Job>,
        bell: &OwnedFd,
        stop: &AtomicBool,
    ) -> io::Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let polling = self
                .busy_poll
                .zip(self.last_read)
                .is_some_and(|(window, t)| t.elapsed() < window);
            let timed = self.tuning.idle.is_some() || self.tuning.half_closed.is_some();
            let sleep = match (polling, timed && self.open.load(Ordering::Relaxed) > 0) {
                (true, _) => 0,
                (false, true) => SWEEP.as_millis() as libc::c_int,
                (false, false) => -1,
            };
            let n = self.epoll.wait(&mut events, sleep)?;
            if timed {
                let now = Instant::now();
                self.clock.now = Some(now);
                if self.clock.last_sweep.is_none_or(|t| now - t >= SWEEP) {
                    self.clock.last_sweep = Some(now);
                    self.sweep(now);
                }
            }
            if n == 0 && polling {
                // Let whatever else is runnable here (the server being
                // answered, say) go first.
                // SAFETY: sched_yield takes no arguments and cannot fail.
                unsafe { libc::sched_yield() };
                continue;
            }
            for ev in &events[..n] {
                let token = ev.u64;
                if token != BELL {
                    let event = Event {
                        upstream: token & UPSTREAM != 0,
                        events: ev.events as libc::c_int,
                    };
                    self.pump((token >> 1) as usize, Some(event));
                    continue;
                }
                let mut count = [0u8; 8];
                // SAFETY: reads the eventfd counter into a live 8-byte buffer.
                unsafe { libc::read(bell.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
                if stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                while let Ok(job) = jobs.try_recv() {
                    match job {
                        Job::Relay(traffic) => self.add(traffic),
                        Job::Shed { all, to } => self.shed(all, &to),
                    }
                }
            }
        }
    }

    fn add(&mut self, traffic: Box<dyn Traffic>) {
        let [client, upstream] = traffic.sockets();
        let interest = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
        let token = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let registered = self
            .epoll
            .add(client, (token as u64) << 1, interest)
            .and_then(|()| {
                self.epoll
                    .add(upstream, (token as u64) << 1 | UPSTREAM, interest)
            });
        if let Err(e) = registered {
            self.free.push(token);
            // Its sockets close with it, which takes them out of epoll.
            return traffic.refuse(e);
        }
        self.slots[token] = Some(traffic);
        self.open.fetch_add(1, Ordering::Relaxed);
        if let Some(now) = self.clock.now {
            let c = &mut self.clock;
            c.active.resize(self.slots.len(), now);
            c.half_since.resize(self.slots.len(), None);
            c.active[token] = now;
            c.half_since[token] = None;
        }
        // Bytes may have come before the sockets were registered (or while
        // the connection moved here from another loop).
        self.pump(token, None);
    }

    /// Hands connections over to the loops of `to`, in turn: every other
    /// one, or all. Each leaves this loop's epoll first; the loop it joins
    /// looks at both its sockets (and epoll reports what is pending when
    /// they are added), so nothing that arrived in between is missed.
    fn shed(&mut self, all: bool, to: &[Handle]) {
        if to.is_empty() {
            return;
        }
        let (mut seen, mut moved) = (0, 0);
        for token in 0..self.slots.len() {
            if self.slots[token].is_none() {
                continue;
            }
            seen += 1;
            if !all && seen % 2 == 1 {
                continue; // stays
            }
            let traffic = self.slots[token].take().expect("checked above");
            for fd in traffic.sockets() {
                // Fails only for a socket already closed, which is not watched.
                let _ = self.epoll.delete(fd);
            }
            self.free.push(token);
            self.open.fetch_sub(1, Ordering::Relaxed);
            to[moved % to.len()].submit(traffic);
            moved += 1;
        }
    }

    /// Ends the connections past a timeout.
    fn sweep(&mut self, now: Instant) {
        let Tuning {
            idle, half_closed, ..
        } = self.tuning;
        for token in 0..self.slots.len() {
            let Some(traffic) = &self.slots[token] else {
                continue;
            };
            let c = &mut self.clock;
            let (Some(&active), Some(since)) = (c.active.get(token), c.half_since.get_mut(token))
            else {
                continue;
            };
            *since = traffic.half_closed().then(|| since.unwrap_or(now));
            let quiet = now.saturating_duration_since(active);
            // Half closed and quiet since it became so: a reply still
            // streaming after the client's end is not stuck.
            let half_quiet = since.map(|t| now.saturating_duration_since(t.max(active)));
            let why =
                if let Some(limit) = half_closed.filter(|&d| half_quiet.is_some_and(|q| q >= d)) {
                    format!(
                        "half closed for {} s (agent.half_closed_timeout_s)",
                        limit.as_secs()
                    )
                } else if let Some(limit) = idle.filter(|&d| quiet >= d) {
                    format!("idle for {} s (agent.idle_timeout_s)", limit.as_secs())
                } else {
                    continue;
                };
            let traffic = self.slots[token].take().expect("checked above");
            for fd in traffic.sockets() {
                let _ = self.epoll.delete(fd);
            }
            self.free.push(token);
            self.open.fetch_sub(1, Ordering::Relaxed);
            traffic.refuse(io::Error::new(io::ErrorKind::TimedOut, why));
        }
    }

    fn pump(&mut self, token: usize, event: Option<Event>) {
        let Some(Some(traffic)) = self.slots.get_mut(token) else {
            return; // over earlier in this batch of events
        };
        match traffic.pump(event, &mut self.scratch) {
            Pumped::Open { moved } => {
                if let Some(now) = self.clock.now {
                    let c = &mut self.clock;
                    if let (Some(a), true) = (c.active.get_mut(token), moved > 0) {
                        *a = now;
                    }
                    if let Some(since) = c.half_since.get_mut(token) {
                        *since = traffic.half_closed().then(|| since.unwrap_or(now));
                    }
                }
                if moved > 0 {
                    self.moved.fetch_add(moved, Ordering::Relaxed);
                    if self.busy_poll.is_some() {
                        self.last_read = Some(Instant::now());
                    }
                }
            }
            Pumped::Over => {
                // Dropping it closes its sockets (which leaves epoll).
                self.slots[token] = None;
                self.free.push(token);
                self.open.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// An opaque TCP connection: bytes both ways, counted.
struct Tcp {
    client: Stream,
    upstream: Stream,
    up: Direction,
    down: Direction,
    done: Option<Done>,
    /// Where the bytes moved so far are shown while the connection lasts.
    progress: Option<Arc<crate::record::Progress>>,
    /// Until the client's first bytes tell whether they open a PostgreSQL
    /// session: what to do if they do.
    sniff: Option<Sniff>,
    /// They did, and the connection goes on.
    postgres: bool,
}

impl Tcp {
    fn new(client: impl Into<Stream>, upstream: impl Into<Stream>, done: Done) -> Tcp {
        Tcp {
            client: client.into(),
            upstream: upstream.into(),
            up: Direction::default(),
            down: Direction::default(),
            done: Some(done),
            progress: None,
            sniff: None,
            postgres: false,
        }
    }

    /// Looks at what the client has sent so far without taking it: whether
    /// the up direction may run (`Ok(true)`). Ends sniffing once the bytes
    /// tell (or the client can send no more); `Err(Some(why))` when they
    /// open a PostgreSQL session that is to be refused, `Err(None)` with the
    /// socket's error in `failed` (a peek takes a socket error away from the
    /// read that would otherwise meet it).
    fn sniffed(
        &mut self,
        client_ended: bool,
        failed: &mut Option<io::Error>,
    ) -> Result<bool, Option<String>> {
        if self.sniff.is_none() {
            return Ok(true);
        }
        let mut first = [0u8; 8];
        // SAFETY: recv(2) into a live 8-byte buffer; MSG_PEEK leaves the
        // bytes queued, MSG_DONTWAIT keeps it from blocking.
        let n = unsafe {
            libc::recv(
                self.client.as_raw_fd(),
                first.as_mut_ptr().cast(),
                first.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(false);
            }
            *failed = Some(e);
            return Err(None);
        }
        let told = match crate::protocol::postgres::opens_session(&first[..n as usize]) {
            // An end before eight bytes: no session can follow.
            None if n == 0 || client_ended => false,
            None => return Ok(false),
            Some(told) => told,
        };
        let sniff = self.sniff.take();
        if told {
            self.postgres = true;
            if let Some(Sniff::Refuse(why)) = sniff {
                return Err(Some(why));
            }
        }
        Ok(true)
    }

    /// Reports the end; on an error both sides are reset.
    fn end(&mut self, result: io::Result<()>) -> Pumped {
        let (outcome, detail) = match result {
            Ok(()) => (Outcome::Closed, None),
            Err(e) => {
                reset(&self.client);
                reset(&self.upstream);
                super::io_outcome(e)
            }
        };
        self.report(outcome, detail)
    }

    fn report(&mut self, outcome: Outcome, detail: Option<String>) -> Pumped {
        if let Some(done) = self.done.take() {
            done(Relayed {
                up: self.up.total,
                down: self.down.total,
                outcome,
                detail,
                postgres: self.postgres,
            });
        }
        Pumped::Over
    }
}

impl Traffic for Tcp {
    fn sockets(&self) -> [RawFd; 2] {
        [self.client.as_raw_fd(), self.upstream.as_raw_fd()]
    }

    /// Which directions run, and whether a short copy read may be taken to
    /// mean their source is drained. A direction runs when its source has
    /// something to say (bytes, an end, an error), or when its destination
    /// has room again and bytes wait for it: no system call is spent asking
    /// a quiet socket. A short read means drained (more bytes bring an
    /// event of their own) only where this very event came from the source
    /// and did not report its end: an end queued right behind the bytes
    /// brings no new event, nor do bytes that came while the direction was
    /// waiting for room.
    fn pump(&mut self, event: Option<Event>, scratch: &mut [u8]) -> Pumped {
        // Per direction: `None` if it does not run, else whether a short
        // read means drained.
        let (mut up, down) = match event {
            None => (Some(false), Some(false)),
            Some(e) if e.upstream => (
                (e.room() && self.up.waiting()).then_some(false),
                e.input().then_some(!e.ended()),
            ),
            Some(e) => (
                e.input().then_some(!e.ended()),
                (e.room() && self.down.waiting()).then_some(false),
            ),
        };
        if self.sniff.is_some() {
            let client_ended = event.is_some_and(|e| !e.upstream && e.ended());
            let mut failed = None;
            match self.sniffed(client_ended, &mut failed) {
                // Not yet: the client's bytes stay queued; its next bytes
                // bring an event of their own.
                Ok(false) => up = None,
                // Told: the up direction reads what was queued.
                Ok(true) => up = up.or(Some(false)),
                Err(Some(why)) => {
                    reset(&self.client);
                    reset(&self.upstream);
                    return self.report(Outcome::Denied, Some(why));
                }
                Err(None) => {
                    return self.end(Err(failed.unwrap_or_else(|| io::ErrorKind::Other.into())))
                }
            }
        }
        let before = self.up.total + self.down.total;
        let result = (|| {
            if let Some(short_drains) = up {
                self.up
                    .pump(&self.client, &self.upstream, scratch, short_drains)?;
            }
            if let Some(short_drains) = down {
                self.down
                    .pump(&self.upstream, &self.client, scratch, short_drains)?;
            }
            Ok(())
        })();
        if let Some(p) = &self.progress {
            p.set(self.up.total, self.down.total);
        }
        match result {
            Ok(()) if self.up.finished() && self.down.finished() => self.end(Ok(())),
            Ok(()) => Pumped::Open {
                moved: self.up.total + self.down.total - before,
            },
            Err(e) => self.end(Err(e)),
        }
    }

    fn refuse(mut self: Box<Self>, e: io::Error) {
        self.end(Err(e));
    }

    fn half_closed(&self) -> bool {
        self.up.eof != self.down.eof
    }
}

/// One direction: bytes read but not yet written (in `pending` or the
/// pipe), and how it stands.
#[derive(Default)]
struct Direction {
    /// Bytes the peer has not taken yet (empty, without capacity, while the
    /// peer keeps up).
    pending: Vec<u8>,
    sent: usize,
    pipe: Option<Pipe>,
    in_pipe: usize,
    eof: bool,
    total: u64,
}

impl Direction {
    fn finished(&self) -> bool {
        self.eof && !self.waiting()
    }

    /// Bytes read and not yet taken by the destination.
    fn waiting(&self) -> bool {
        self.sent < self.pending.len() || self.in_pipe > 0
    }

    /// Relays until `from` has nothing more or `to` takes nothing more
    /// (what it read is added to `total`). With `short_drains`, a short
    /// copy read is taken to mean `from` has nothing more.
    fn pump(
        &mut self,
        from: &Stream,
        to: &Stream,
        scratch: &mut [u8],
        short_drains: bool,
    ) -> io::Result<()> {
        loop {
            if self.sent < self.pending.len() {
                let Some(n) =
                    ready(send(to.as_raw_fd(), &self.pending[self.sent..]).and_then(moved))?
                else {
                    return Ok(());
                };
                self.sent += n;
                if self.sent == self.pending.len() {
                    (self.pending, self.sent) = (Vec::new(), 0);
                }
                continue;
            }
            if let (Some(p), true) = (&self.pipe, self.in_pipe > 0) {
                let Some(n) =
                    ready(splice(p.r.as_raw_fd(), to.as_raw_fd(), self.in_pipe).and_then(moved))?
                else {
                    return Ok(());
                };
                self.in_pipe -= n;
                continue;
            }
            if self.eof {
                return Ok(());
            }
            let n = match &self.pipe {
                Some(p) => {
                    let Some(n) = ready(splice(from.as_raw_fd(), p.w.as_raw_fd(), PIPE_SIZE))?
                    else {
                        return Ok(());
                    };
                    self.in_pipe = n;
                    n
                }
                None => {
                    // SAFETY: `scratch` is writable for its length.
                    let read =
                        unsafe { recv(from.as_raw_fd(), scratch.as_mut_ptr(), scratch.len()) };
                    let Some(n) = ready(read)? else {
                        return Ok(());
                    };
                    let mut sent = 0;
                    while sent < n {
                        match ready(send(to.as_raw_fd(), &scratch[sent..n]).and_then(moved))? {
                            Some(k) => sent += k,
                            None => {
                                self.pending.extend_from_slice(&scratch[sent..n]);
                                break;
                            }
                        }
                    }
                    if n == scratch.len() {
                        // Bulk: splice from now on if a pipe can be had.
                        self.pipe = Pipe::new().ok();
                    }
                    n
                }
            };
            if n == 0 {
                self.eof = true;
                shutdown_write(to.as_raw_fd())?;
                return Ok(());
            }
            self.total += n as u64;
            if short_drains && self.pipe.is_none() && n < scratch.len() {
                // Drained: no read just to see EAGAIN.
                return Ok(());
            }
        }
    }
}

/// A write or splice out that moved nothing (it would spin): an error.
pub(crate) fn moved(n: usize) -> io::Result<usize> {
    if n == 0 {
        Err(io::ErrorKind::WriteZero.into())
    } else {
        Ok(n)
    }
}

/// `None` where the call would block: that ends a pump round (epoll is
/// edge-triggered, and the next edge resumes it).
pub(crate) fn ready(r: io::Result<usize>) -> io::Result<Option<usize>> {
    match r {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// A non-blocking pipe: the in-kernel buffer of a bulk direction.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we pass.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both fds are open and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on a pipe fd we own; failure only keeps the default size.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(Pipe { r, w })
    }
}

// recv(2), send(2) and epoll_wait(2) are made as plain system calls: glibc's
// wrappers are cancellation points, which bracket every call with two more
// that switch the thread's cancellation state, paid on every message by a
// loop whose threads are never cancelled.

/// The result of a system call: a count, or the error it set.
fn syscall_result(n: libc::c_long) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// recv(2) into `len` bytes at `buf`.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes.
pub(crate) unsafe fn recv(fd: RawFd, buf: *mut u8, len: usize) -> io::Result<usize> {
    let none = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: the caller vouches for `buf`; no address is asked for.
    syscall_result(unsafe { libc::syscall(libc::SYS_recvfrom, fd, buf, len, 0, none, none) })
}

/// send(2) of `buf`, without SIGPIPE.
pub(crate) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let none = std::ptr::null::<libc::c_void>();
    // SAFETY: `buf` is valid for reads of its length; no address is passed.
    syscall_result(unsafe {
        libc::syscall(
            libc::SYS_sendto,
            fd,
            buf.as_ptr(),
            buf.len(),
            libc::MSG_NOSIGNAL,
            none,
            0,
        )
    })
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call (owned by the
    // caller's TcpStream or Pipe); no offsets are passed.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    syscall_result(n as libc::c_long)
}

struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: plain epoll_create1(2); the fd is owned right below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and belongs to nobody else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn add(&self, fd: RawFd, token: u64, events: libc::c_int) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, events)
    }

    fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, events: libc::c_int) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: events as u32,
            u64: token,
        };
        // SAFETY: an epoll_ctl(2) on our epoll fd (a closed `fd` gives
        // EBADF); ev lives across the call.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1: forever) for events.
    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: libc::c_int) -> io::Result<usize> {
        loop {
            // SAFETY: events is a valid buffer of the length passed.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_epoll_wait,
                    self.0.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    timeout_ms,
                )
            };
            match syscall_result(n) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The relay against real loopback sockets, without eBPF.
    use super::*;
    use crate::proxy::loopback_pair as pair;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn half_close_travels_and_the_reverse_direction_keeps_flowing() {
        let (mut app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let relay = tokio::spawn(relay(
            proxy_client,
            proxy_upstream,
            Arc::default(),
            Some(Sniff::Note),
        ));
        app.write_all(b"request").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap(); // EOF arrives: the FIN was relayed
        assert_eq!(got, b"request");
        server.write_all(b"late answer").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"late answer");
        let r = relay.await.unwrap();
        assert_eq!((r.up, r.down, r.outcome), (7, 11, Outcome::Closed));
    }

    #[tokio::test]
    async fn bytes_and_the_end_arriving_together_are_both_relayed() {
        // The end queued right behind the bytes brings no event of its own:
        // the relay must not take the short read of the bytes as the last.
        for round in 0..200 {
            let (mut app, proxy_client) = pair().await;
            let (proxy_upstream, mut server) = pair().await;
            let relay = tokio::spawn(relay(
                proxy_client,
                proxy_upstream,
                Arc::default(),
                Some(Sniff::Note),
            ));
            tokio::time::sleep(Duration::from_micros(200)).await;
            app.write_all(&[7u8; 100]).await.unwrap();
            app.shutdown().await.unwrap();
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut got))
                .await
                .unwrap_or_else(|_| panic!("round {round}: the end was not relayed"))
                .unwrap();
            assert_eq!(got.len(), 100);
            drop(server);
            assert_eq!(relay.await.unwrap().up, 100);
        }
    }

    #[tokio::test]
    async fn a_reset_on_one_side_resets_the_other() {
        let (app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let relay = tokio::spawn(relay(
            proxy_client,
            proxy_upstream,
            Arc::default(),
            Some(Sniff::Note),
        ));
        super::super::reset(&app);
        drop(app);
        let r = relay.await.unwrap();
        assert_eq!(r.outcome, Outcome::Reset, "{:?}", r.detail);
        let mut buf = [0u8; 8];
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn bulk_switches_to_splice_and_arrives_intact() {
        let (mut app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let relay = tokio::spawn(relay(
            proxy_client,
            proxy_upstream,
            Arc::default(),
            Some(Sniff::Note),
        ));
        let data: Vec<u8> = (0..(5u32 << 20))
            .map(|i| (i * 7 + i / 4093) as u8)
            .collect();
        let (back, got) = tokio::join!(
            async {
                app.write_all(&data).await.unwrap();
                app.shutdown().await.unwrap();
                let mut back = Vec::new();
                app.read_to_end(&mut back).await.unwrap();
                back
            },
            async {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                server.write_all(b"ok").await.unwrap();
                server.shutdown().await.unwrap();
                got
            },
        );
        assert!(got == data, "bulk data differs");
        assert_eq!(back, b"ok");
        let r = relay.await.unwrap();
        assert_eq!(
            (r.up, r.down, r.outcome),
            (data.len() as u64, 2, Outcome::Closed)
        );
    }

    #[tokio::test]
    async fn a_slow_reader_holds_the_writer_back_and_loses_nothing() {
        let (mut app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let relay = tokio::spawn(relay(
            proxy_client,
            proxy_upstream,
            Arc::default(),
            Some(Sniff::Note),
        ));
        // More than the socket buffers and a pipe can hold together.
        let data: Vec<u8> = (0..(128u32 << 20)).map(|i| (i % 251) as u8).collect();
        let (reading, read_started) = tokio::sync::oneshot::channel::<()>();
        let writer = async {
            app.write_all(&data).await.unwrap();
            app.shutdown().await.unwrap();
        };
        let reader = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            reading.send(()).unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        };
        let watcher = async {
            tokio::pin!(writer);
            tokio::select! {
                () = &mut writer => panic!("all 128 MiB were taken before the server read: nothing held the writer back"),
                _ = read_started => writer.await,
            }
        };
        let ((), got) = tokio::join!(watcher, reader);
        assert!(got == data, "data differs after backpressure");
        drop(server);
        let r = relay.await.unwrap();
        assert_eq!(r.up, data.len() as u64);
    }

    #[tokio::test]
    async fn small_messages_to_a_slow_reader_wait_in_the_relay_and_arrive_in_order() {
        let (mut app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let relay = tokio::spawn(relay(
            proxy_client,
            proxy_upstream,
            Arc::default(),
            Some(Sniff::Note),
        ));
        // Messages shorter than the copy buffer, spaced so that each read
        // takes one: the copy path, until the server's buffers are full
        // and a write takes only part of a message.
        let messages: Vec<Vec<u8>> = (0..400u32)
            .map(|m| (0..30_000u32).map(|i| ((m * 31 + i) % 253) as u8).collect())
            .collect();
        let writer = async {
            for m in &messages {
                app.write_all(m).await.unwrap();
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            app.shutdown().await.unwrap();
        };
        let reader = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        assert!(got == messages.concat(), "bytes lost or reordered");
        drop(server);
        assert_eq!(relay.await.unwrap().up, 12_000_000);
    }

    #[tokio::test]
    async fn an_end_sent_while_the_relay_waits_for_room_is_relayed() {
        use nix::sys::socket::{setsockopt, sockopt};
        let (mut app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        // Small buffers toward the server, so that it is full after a few
        // small messages and the relay holds bytes for it.
        setsockopt(&proxy_upstream, sockopt::SndBuf, &4096).unwrap();
        setsockopt(&server, sockopt::RcvBuf, &4096).unwrap();
        let relay = tokio::spawn(relay(
            proxy_client,
            proxy_upstream,
            Arc::default(),
            Some(Sniff::Note),
        ));
        // Two, each short of the copy buffer: the relay holds part of the
        // first, and the second waits in its receive queue.
        for _ in 0..2 {
            app.write_all(&[3u8; 60_000]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Then a last short message and the end, while the relay waits.
        app.write_all(&[4u8; 1000]).await.unwrap();
        app.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), server.read_to_end(&mut got))
            .await
            .expect("the end was not relayed")
            .unwrap();
        assert_eq!(got.len(), 121_000);
        assert_eq!(&got[120_000..], &[4u8; 1000][..]);
        drop((app, server));
        assert_eq!(relay.await.unwrap().up, 121_000);
    }

    /// States (`R`, `S`, …) of this process's thread named `name`, sampled
    /// `n` times over about `n` ms.
    fn states(name: &str, n: usize) -> String {
        let task = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == name))
            .expect("the loop thread");
        (0..n)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(1));
                let stat = std::fs::read_to_string(task.join("stat")).unwrap();
                stat[stat.rfind(')').unwrap() + 2..].chars().next().unwrap()
            })
            .collect()
    }

    #[test]
    fn busy_poll_keeps_the_loop_awake_only_for_the_window_after_a_read() {
        let l = RelayLoop::start(
            "relay-busy-test".into(),
            Tuning {
                busy_poll: Some(Duration::from_millis(400)),
                ..Tuning::default()
            },
        )
        .unwrap();
        let (done, ended) = mpsc::channel();
        let (mut app, client, upstream, mut server) = std_pairs();
        l.submit(Box::new(Tcp::new(
            client,
            upstream,
            Box::new(move |r| done.send(r).unwrap()),
        )));
        // Idle (once it has taken the connection in): it sleeps in epoll_wait.
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !states("relay-busy-test", 30).contains('R'),
            "polling before any read"
        );
        app.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        std::io::Read::read_exact(&mut server, &mut got).unwrap();
        // Within the window it keeps polling: runnable, not asleep.
        let during = states("relay-busy-test", 30);
        assert!(during.contains('R'), "not polling after a read: {during}");
        std::thread::sleep(Duration::from_millis(500));
        let after = states("relay-busy-test", 30);
        assert!(
            !after.contains('R'),
            "still polling after the window: {after}"
        );
        drop((app, server));
        let r = ended.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((r.up, r.down, r.outcome), (4, 0, Outcome::Closed));
    }

    /// A connection that moves no byte past the idle timeout, and one left
    /// half closed and quiet past its timeout, are ended with both sides
    /// reset; one that keeps talking, more slowly than the timeouts, is
    /// not, even half closed.
    #[test]
    fn idle_and_half_closed_connections_end_at_their_timeouts() {
        let l = RelayLoop::start(
            "relay-timeout-test".into(),
            Tuning {
                idle: Some(Duration::from_secs(2)),
                half_closed: Some(Duration::from_secs(1)),
                ..Tuning::default()
            },
        )
        .unwrap();
        let start = |l: &RelayLoop| {
            let (done, ended) = mpsc::channel();
            let (app, client, upstream, server) = std_pairs();
            l.submit(Box::new(Tcp::new(
                client,
                upstream,
                Box::new(move |r| done.send(r).unwrap()),
            )));
            (app, server, ended)
        };
        let t = Instant::now();
        let (_idle_app, mut idle_server, idle) = start(&l);
        let (half_app, _half_server, half) = start(&l);
        half_app.shutdown(std::net::Shutdown::Write).unwrap();
        let (mut talker, mut talker_server, talking) = start(&l);
        // Half closed, and the server's reply keeps streaming.
        talker.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = [0u8; 1];
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(300));
            talker_server.write_all(b"x").unwrap();
            std::io::Read::read_exact(&mut talker, &mut got).unwrap();
        }
        let r = half.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(r.outcome, Outcome::Error);
        assert!(
            r.detail.as_deref().unwrap().contains("half closed for 1 s"),
            "{:?}",
            r.detail
        );
        let r = idle.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            r.detail.as_deref().unwrap().contains("idle for 2 s"),
            "{:?}",
            r.detail
        );
        assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
        let e = std::io::Read::read(&mut idle_server, &mut got).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        // 3 s in, talking every 0.3 s: still open.
        assert!(talking.try_recv().is_err(), "a live connection was ended");
        drop((talker, talker_server));
        let r = talking.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(r.outcome, Outcome::Closed, "{:?}", r.detail);
    }

    /// (app, proxy's client side, proxy's upstream side, server), the
    /// proxy's two non-blocking as the loop wants them.
    fn std_pairs() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let pair = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            (c, s)
        };
        let ((app, client), (upstream, server)) = (pair(), pair());
        client.set_nonblocking(true).unwrap();
        upstream.set_nonblocking(true).unwrap();
        (app, client, upstream, server)
    }
}
