//! One loop thread: its epoll, the connections it relays (by slot), the
//! jobs other threads hand it through a doorbell, and the timeouts.

use std::{
    cell::RefCell,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::warn;

use crate::{sys::Epoll, Event, Loops, Pumped, Traffic, Tuning};

/// The scratch buffer; a read that fills it switches the direction to splice.
pub(crate) const COPY_BUF: usize = 64 * 1024;
/// epoll token of the loop's doorbell. A connection's sockets use their
/// slot index shifted left by one, plus [`UPSTREAM`] for the upstream one.
const BELL: u64 = u64::MAX;
const UPSTREAM: u64 = 1;

/// How often a loop with timeouts looks for connections past them.
const SWEEP: Duration = Duration::from_secs(1);

/// What a loop is asked to do.
pub(crate) enum Job {
    /// Relay this connection.
    Relay(Box<dyn Traffic>),
    /// Hand connections over to other loops, in turn: every other one
    /// (`all` false) or all of them.
    Shed { all: bool, to: Vec<Handle> },
    /// The connection in `slot` whose [`Bell`](crate::Bell) is `bell` was
    /// rung: pump it (unless it has left, or the slot holds another).
    Wake { slot: usize, bell: usize },
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

    /// Asks the loop to pump the connection in `slot` (see [`Job::Wake`]).
    pub(crate) fn wake(&self, slot: usize, bell: usize) {
        // A loop that has stopped has nothing left to wake.
        let _ = self.send(Job::Wake { slot, bell });
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
    thread: Mutex<Option<JoinHandle<()>>>,
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
        let handle = Handle {
            jobs,
            bell: bell.clone(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let moved = Arc::new(AtomicU64::new(0));
        let tid = Arc::new(AtomicI32::new(0));
        let thread = {
            let (me, bell, stop, open, m, t) = (
                handle.clone(),
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
                    me,
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
            handle,
            stop,
            open,
            moved,
            tid,
            thread: Mutex::new(Some(thread)),
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
        // Held while the clock is read: the thread is not joined meanwhile.
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        let thread = handle.as_ref()?.as_pthread_t();
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `thread` is a live thread (joined only by `stop`, which
        // waits for the lock held here); the clock id is written into a
        // local.
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

impl RelayLoop {
    /// Stops the loop thread and waits for it: the connections it relays
    /// are dropped there (each [`Traffic`] has its last word as it goes),
    /// without their end being reported.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        ring(&self.handle.bell);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for RelayLoop {
    fn drop(&mut self) {
        self.stop();
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

/// Hands `traffic` to this thread's loops (a loop of its own is started
/// on first use where none were installed).
pub fn submit_here(traffic: Box<dyn Traffic>) {
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

fn ring(bell: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to our eventfd; a full
    // counter (EAGAIN) still leaves the bell rung.
    unsafe { libc::write(bell.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// The loop thread's state.
struct Loop {
    /// Where other threads reach this loop (given to the bells of the
    /// connections it takes in).
    me: Handle,
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
                        Job::Wake { slot, bell } => {
                            let here = self.slots.get(slot).and_then(|t| t.as_ref()?.bell());
                            if here.is_some_and(|b| b.id() == bell) {
                                self.pump(slot, None);
                            }
                        }
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
        if let Some(bell) = traffic.bell() {
            bell.joined(&self.me, token);
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
        // the connection moved here from another loop), and its bell may
        // have rung in between.
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
