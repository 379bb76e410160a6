//! The agent's relay loops, and how many of them carry connections.
//!
//! One loop thread per data-plane worker is started, but connections only
//! go to as many as help. One loop handles many events per wakeup, and a
//! loop that is awake when an event comes answers it without one: for
//! request/response traffic that shares the node's CPUs with the servers
//! it talks to (a database on the same node), one busy loop costs less CPU
//! per request than two half-idle ones, and leaves the server more. Streams
//! and many-connection traffic can need more loops. Which of the two a
//! node's traffic is, only trying tells: so the balancer tries.
//!
//! A balancer thread looks every [`Balance::every`] at how long each loop
//! was runnable (on a CPU or waiting for one, from `schedstat`), the CPU
//! time the loops used, and the bytes they moved:
//! - once the bytes moved per second have been steady for a few looks,
//!   a trial starts: of one more loop if a loop that takes connections
//!   was runnable more than [`Balance::busy_at`] of the time (the busiest
//!   hands the new loop every other connection, and it takes new ones
//!   too), or of one fewer (the last hands all of its connections to the
//!   others); where both are possible, trials alternate. One more loop is
//!   kept if the bytes per second grew by [`Balance::keep_gain`] over the
//!   next few looks, one fewer unless they fell by as much; otherwise the
//!   move is undone. The next trial waits [`Balance::retry_after`] looks,
//!   twice as long after each failed one, and after one fewer loop was
//!   kept (the loop it gave up had not paid after all); only one more loop
//!   kept brings the wait back to its start;
//! - when the loops that take connections used together less CPU than
//!   [`Balance::gather_below`] for every loop but one, the last of them
//!   hands all its connections to the others and takes no new ones.
//!
//! A connection moves between loops as a whole, with what it holds, by
//! leaving one loop's epoll and joining another's; nothing it has in flight
//! is lost (see `Loop::shed`). Moves happen a few times a second at most.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::{debug, warn};

use crate::{RelayLoop, Traffic};

/// When the balancer moves connections.
#[derive(Clone, Copy, Debug)]
pub struct Balance {
    /// How often it looks.
    pub every: Duration,
    /// Share of the time a loop was runnable above which one more loop is tried.
    pub busy_at: f64,
    /// Growth of the bytes moved per second for which a trial loop is kept.
    pub keep_gain: f64,
    /// CPU (in CPUs) per loop but one under which the loops give up their last.
    pub gather_below: f64,
    /// Looks between a trial that was given up and the next.
    pub retry_after: u32,
}

impl Default for Balance {
    fn default() -> Balance {
        Balance {
            every: Duration::from_millis(100),
            busy_at: 0.85,
            keep_gain: 1.1,
            gather_below: 0.3,
            retry_after: 20,
        }
    }
}

/// Looks before a trial whose bytes per second are its baseline.
const BASELINE_LOOKS: usize = 5;
/// Looks a trial is measured over (after one that lets it settle).
const TRIAL_LOOKS: usize = 4;
/// Most spread of the baseline's rates, against their mean, for a trial
/// to start: a load that is still changing (connections starting, say)
/// would make any trial look good or bad.
const STEADY: f64 = 0.2;

/// What the balancer saw at one look, over the time since the last.
#[derive(Clone, Copy, Debug, Default)]
struct Look {
    /// The busiest loop that takes connections, the share of the time it
    /// was runnable, and how many connections it has.
    busiest: usize,
    busy: f64,
    busiest_open: usize,
    /// CPUs the loops that take connections used, together.
    cpu: f64,
    /// Bytes all loops moved per second.
    rate: f64,
}

/// What the balancer does after a look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Stay,
    /// Take one more loop, with every other connection of this one.
    Spread {
        from: usize,
    },
    /// Give up the last loop that takes connections.
    Gather,
}

/// The balancer's memory: recent rates, the trial under way, and when the
/// next may start.
struct Climber {
    rates: VecDeque<f64>,
    trial: Option<Trial>,
    quiet_until: u64,
    backoff: u64,
    /// Where both are possible, the next trial is of one more loop.
    next_spread: bool,
}

/// A trial of one more loop (`spread`) or one fewer.
struct Trial {
    baseline: f64,
    started: u64,
    rates: Vec<f64>,
    spread: bool,
}

fn mean(xs: impl ExactSizeIterator<Item = f64>) -> f64 {
    let n = xs.len().max(1) as f64;
    xs.sum::<f64>() / n
}

impl Climber {
    fn new(b: &Balance) -> Climber {
        Climber {
            rates: VecDeque::new(),
            trial: None,
            quiet_until: 0,
            backoff: b.retry_after.into(),
            next_spread: true,
        }
    }

    /// No connection is open: what the looks so far measured, and any
    /// trial under way, no longer count. What the trials taught (how long
    /// the next waits, and which way it goes) is kept: connections that
    /// come and go do not make the node's traffic new, and each trial
    /// costs while it runs.
    fn pause(&mut self) {
        self.rates.clear();
        self.trial = None;
    }

    /// The last looks moved bytes at a steady rate.
    fn steady(&self) -> bool {
        if self.rates.len() < BASELINE_LOOKS {
            return false;
        }
        let (lo, hi) = self
            .rates
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        hi > 0.0 && hi - lo <= STEADY * mean(self.rates.iter().copied())
    }

    /// Look number `now` of `active` loops taking connections, of `n`.
    fn step(&mut self, now: u64, active: usize, n: usize, look: &Look, b: &Balance) -> Step {
        if let Some(t) = &mut self.trial {
            if now > t.started + 1 {
                t.rates.push(look.rate);
            }
            if t.rates.len() < TRIAL_LOOKS {
                return Step::Stay;
            }
            let t = self.trial.take().expect("checked above");
            self.rates.clear();
            let rate = mean(t.rates.iter().copied());
            // One more loop must earn its keep; one fewer is kept unless
            // it clearly costs.
            let kept = if t.spread {
                rate >= t.baseline * b.keep_gain
            } else {
                rate * b.keep_gain >= t.baseline
            };
            debug!(
                kept,
                spread = t.spread,
                baseline = t.baseline,
                rate,
                "relay loops: trial"
            );
            // The next trial goes the other way, where it can.
            self.next_spread = !t.spread;
            if kept && t.spread {
                // The traffic gained: more loops may help further.
                self.backoff = b.retry_after.into();
                self.quiet_until = now + self.backoff;
            } else {
                // A failed trial, or one fewer loop kept (the loop that
                // trial gave up had not paid after all): the next waits
                // twice as long.
                self.quiet_until = now + self.backoff;
                self.backoff = (self.backoff * 2).min(u64::from(b.retry_after) * 64);
            }
            if kept {
                return Step::Stay;
            }
            return match t.spread {
                true => Step::Gather,
                false => Step::Spread { from: look.busiest },
            };
        }
        if active > 1 && look.cpu < b.gather_below * (active - 1) as f64 {
            self.rates.clear();
            return Step::Gather;
        }
        self.rates.push_back(look.rate);
        if self.rates.len() > BASELINE_LOOKS {
            self.rates.pop_front();
        }
        if now < self.quiet_until || !self.steady() {
            return Step::Stay;
        }
        let can_spread = active < n && look.busy > b.busy_at && look.busiest_open > 1;
        let can_gather = active > 1;
        let spread = match (can_spread, can_gather) {
            (false, false) => return Step::Stay,
            (true, true) => self.next_spread,
            (s, _) => s,
        };
        self.trial = Some(Trial {
            baseline: mean(self.rates.iter().copied()),
            started: now,
            rates: Vec::new(),
            spread,
        });
        match spread {
            true => Step::Spread { from: look.busiest },
            false => Step::Gather,
        }
    }
}

/// The loops, shared by the data-plane workers. Dropping the last
/// reference stops the balancer, then the loops.
pub struct Loops {
    shared: Arc<Shared>,
    next: AtomicUsize,
    balancer: Option<(JoinHandle<()>, Arc<AtomicBool>)>,
}

struct Shared {
    loops: Vec<RelayLoop>,
    /// How many loops, from the first, take new connections.
    active: AtomicUsize,
}

impl Loops {
    /// Starts `n` loops (at least one), balanced as [`Balance::default`]
    /// says; `busy_poll` as for [`RelayLoop::start`].
    pub fn start(n: usize, tuning: crate::Tuning) -> std::io::Result<Arc<Loops>> {
        Loops::with_balance(n, tuning, Some(Balance::default()))
    }

    /// As [`Loops::start`]; `balance: None` keeps every loop taking
    /// connections and never moves one.
    pub fn with_balance(
        n: usize,
        tuning: crate::Tuning,
        balance: Option<Balance>,
    ) -> std::io::Result<Arc<Loops>> {
        let n = n.max(1);
        let loops = (0..n)
            .map(|i| RelayLoop::start(format!("relay-loop-{i}"), tuning))
            .collect::<std::io::Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            loops,
            active: AtomicUsize::new(if balance.is_some() { 1 } else { n }),
        });
        let balancer = match balance {
            Some(b) if n > 1 => {
                let stop = Arc::new(AtomicBool::new(false));
                let (s, st) = (shared.clone(), stop.clone());
                let t = std::thread::Builder::new()
                    .name("relay-balancer".into())
                    .spawn(move || balancer(&s, b, &st))?;
                Some((t, stop))
            }
            _ => None,
        };
        Ok(Arc::new(Loops {
            shared,
            next: AtomicUsize::new(0),
            balancer,
        }))
    }

    /// Stops every loop and waits for them: their connections are dropped
    /// (see [`RelayLoop::stop`]); one handed over later is refused.
    pub fn stop(&self) {
        for l in &self.shared.loops {
            l.stop();
        }
    }

    /// Hands a connection to one of the loops that take connections, in turn.
    pub fn submit(&self, traffic: Box<dyn Traffic>) {
        let active = self.shared.active.load(Ordering::Relaxed).max(1);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % active;
        self.shared.loops[i].submit(traffic);
    }

    /// How many loops take new connections now.
    #[cfg(test)]
    fn active(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// How many connections each loop relays now.
    #[cfg(test)]
    pub(crate) fn open(&self) -> Vec<usize> {
        self.shared.loops.iter().map(RelayLoop::open).collect()
    }

    /// Moves connections of loop `from` to loop `to`: every other one, or all.
    #[cfg(test)]
    pub(crate) fn shed(&self, from: usize, all: bool, to: usize) {
        let to = vec![self.shared.loops[to].handle().clone()];
        self.shared.loops[from].handle().shed(all, to);
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        if let Some((t, stop)) = self.balancer.take() {
            stop.store(true, Ordering::Release);
            t.thread().unpark();
            let _ = t.join();
        }
        // The loops stop as `shared` goes.
    }
}

/// Counters of one loop at one moment.
#[derive(Clone, Copy, Default)]
struct Counters {
    runnable: Option<Duration>,
    cpu: Duration,
}

/// Looks at the loops every `b.every` and moves connections (see the
/// module's documentation), until `stop`.
fn balancer(s: &Shared, b: Balance, stop: &AtomicBool) {
    let n = s.loops.len();
    let counters = |l: &RelayLoop| Counters {
        runnable: l.runnable_time(),
        cpu: l.cpu_time().unwrap_or_default(),
    };
    let moved = || s.loops.iter().map(RelayLoop::moved).sum::<u64>();
    if s.loops.iter().any(|l| l.cpu_time().is_none()) {
        warn!("relay loop CPU time cannot be read: idle loops are not given up");
    }
    let mut last: Vec<Counters> = s.loops.iter().map(counters).collect();
    let mut last_moved = moved();
    let mut at = Instant::now();
    let mut climber = Climber::new(&b);
    let mut looks = 0u64;
    // No connection anywhere: nothing to look at until one comes.
    let mut idle = false;
    while !stop.load(Ordering::Acquire) {
        std::thread::park_timeout(b.every);
        if s.loops.iter().all(|l| l.open() == 0) {
            s.active.store(1, Ordering::Relaxed);
            idle = true;
            continue;
        }
        if idle {
            // Counting starts over from here; the next trial waits as it would have.
            (last, last_moved, at) = (
                s.loops.iter().map(counters).collect(),
                moved(),
                Instant::now(),
            );
            climber.pause();
            idle = false;
            continue;
        }
        let now = Instant::now();
        let wall = now.duration_since(at).as_secs_f64();
        if wall < b.every.as_secs_f64() / 2.0 {
            continue; // woken early (stopping, or spuriously)
        }
        at = now;
        looks += 1;
        let c: Vec<Counters> = s.loops.iter().map(counters).collect();
        let share = |a: Duration, b: Duration| a.saturating_sub(b).as_secs_f64() / wall;
        let active = s.active.load(Ordering::Relaxed).clamp(1, n);
        let mut look = Look::default();
        for (i, (now, was)) in c.iter().zip(&last).enumerate().take(active) {
            let cpu = share(now.cpu, was.cpu);
            // Without schedstat, the CPU time stands in (it misses the
            // time spent waiting for a CPU).
            let busy = match (now.runnable, was.runnable) {
                (Some(r), Some(w)) => share(r, w),
                _ => cpu,
            };
            look.cpu += cpu;
            if busy >= look.busy {
                (look.busiest, look.busy) = (i, busy);
            }
        }
        look.busiest_open = s.loops[look.busiest].open();
        let m = moved();
        look.rate = m.saturating_sub(last_moved) as f64 / wall;
        (last, last_moved) = (c, m);

        let handles = |r: std::ops::Range<usize>| {
            s.loops[r]
                .iter()
                .map(|l| l.handle().clone())
                .collect::<Vec<_>>()
        };
        // A connection handed to a loop just as it stopped taking new ones
        // joins the others.
        for l in &s.loops[active..] {
            if l.open() > 0 {
                l.handle().shed(true, handles(0..active));
            }
        }
        match climber.step(looks, active, n, &look, &b) {
            Step::Stay => {}
            Step::Spread { from } => {
                s.active.store(active + 1, Ordering::Relaxed);
                s.loops[from]
                    .handle()
                    .shed(false, handles(active..active + 1));
                debug!(
                    loops = active + 1,
                    busy = look.busy,
                    "relay loops: one more tried"
                );
            }
            Step::Gather => {
                s.active.store(active - 1, Ordering::Relaxed);
                s.loops[active - 1]
                    .handle()
                    .shed(true, handles(0..active - 1));
                debug!(loops = active - 1, cpu = look.cpu, "relay loops: gathered");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Connections moved between real loops over loopback sockets.
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        sync::mpsc,
        thread,
    };

    use super::*;
    use crate::{End, Ending};

    /// A server on loopback: each connection is handled by `serve` on a
    /// thread of its own.
    fn server(serve: fn(TcpStream)) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for s in l.incoming() {
                let s = s.unwrap();
                thread::spawn(move || serve(s));
            }
        });
        addr
    }

    fn echo(mut s: TcpStream) {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => s.write_all(&buf[..n]).unwrap(),
            }
        }
    }

    /// Reads to the end and answers with how many bytes came.
    fn sink(mut s: TcpStream) {
        let mut buf = [0u8; 65536];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        let _ = s.write_all(&total.to_be_bytes());
    }

    /// `n` connections from apps to `to`, relayed by `loops`: the apps'
    /// ends, and where each relayed connection reports its end.
    fn connect(
        loops: &Loops,
        to: std::net::SocketAddr,
        n: usize,
    ) -> (Vec<TcpStream>, mpsc::Receiver<End>) {
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, rx) = mpsc::channel();
        let apps = (0..n)
            .map(|_| {
                let app = TcpStream::connect(front.local_addr().unwrap()).unwrap();
                let (client, _) = front.accept().unwrap();
                let upstream = TcpStream::connect(to).unwrap();
                for s in [&client, &upstream] {
                    s.set_nonblocking(true).unwrap();
                    s.set_nodelay(true).unwrap();
                }
                let tx = tx.clone();
                let done = Box::new(move |r| {
                    let _ = tx.send(r);
                });
                loops.submit(Box::new(crate::tcp::Tcp::new(client, upstream, done)));
                app.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                app
            })
            .collect();
        (apps, rx)
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn busy(rate: f64) -> Look {
        Look {
            busiest: 0,
            busy: 0.95,
            busiest_open: 8,
            cpu: 0.6,
            rate,
        }
    }

    /// Feeds looks to a climber; what it did at each.
    fn climb(c: &mut Climber, from: u64, active: &mut usize, looks: &[Look]) -> Vec<Step> {
        let b = Balance::default();
        looks
            .iter()
            .enumerate()
            .map(|(i, look)| {
                let step = c.step(from + i as u64, *active, 4, look, &b);
                match step {
                    Step::Spread { .. } => *active += 1,
                    Step::Gather => *active -= 1,
                    Step::Stay => {}
                }
                step
            })
            .collect()
    }

    /// `quiet` busy looks at `rate` in which the climber stays, then one in
    /// which it takes `then`.
    fn quiet_then(
        c: &mut Climber,
        from: u64,
        active: &mut usize,
        (rate, quiet): (f64, usize),
        then: Step,
    ) {
        let mut want = vec![Step::Stay; quiet];
        want.push(then);
        let looks = vec![busy(rate); quiet + 1];
        assert_eq!(climb(c, from, active, &looks), want, "from look {from}");
    }

    #[test]
    fn trials_keep_one_more_loop_only_if_more_bytes_move_and_one_fewer_unless_fewer_do() {
        use Step::*;
        let mut c = Climber::new(&Balance::default());
        let mut active = 1;
        let rate = |r: f64, k: usize| vec![busy(r); k];
        // Busy at a steady rate for five looks: one more loop is tried;
        // the look after the move only settles; four looks at 20% more keep it.
        quiet_then(&mut c, 1, &mut active, (100.0, 4), Spread { from: 0 });
        let steps = climb(
            &mut c,
            6,
            &mut active,
            &[
                busy(50.0),
                busy(120.0),
                busy(120.0),
                busy(120.0),
                busy(120.0),
            ],
        );
        assert_eq!((steps, active), (vec![Stay; 5], 2));
        // `retry_after` looks later, one fewer is tried (trials alternate);
        // 100 against 120 is a clear loss, so the loop comes back.
        quiet_then(&mut c, 11, &mut active, (120.0, 19), Gather);
        let steps = climb(&mut c, 31, &mut active, &rate(100.0, 5));
        assert_eq!((steps.last(), active), (Some(&Spread { from: 0 }), 2));
        // A failed trial doubles the wait. One more loop that moves 4% more
        // is not worth it.
        quiet_then(&mut c, 36, &mut active, (120.0, 19), Spread { from: 0 });
        let steps = climb(&mut c, 56, &mut active, &rate(125.0, 5));
        assert_eq!((steps.last(), active), (Some(&Gather), 2));
        // Twice as long again; then one fewer loop that moves only a
        // little less is kept. The loop kept earlier had not paid after
        // all: the wait doubles again (80 looks), as after a failed trial.
        quiet_then(&mut c, 61, &mut active, (120.0, 39), Gather);
        let steps = climb(&mut c, 101, &mut active, &rate(118.0, 5));
        assert_eq!((steps, active), (vec![Stay; 5], 1));
        // A failed trial's wait outlasts the connections: after every one
        // has closed (the balancer pauses), new ones find the same wait.
        quiet_then(&mut c, 106, &mut active, (120.0, 79), Spread { from: 0 });
        let steps = climb(&mut c, 186, &mut active, &rate(100.0, 5));
        assert_eq!((steps.last(), active), (Some(&Gather), 1));
        c.pause();
        quiet_then(&mut c, 191, &mut active, (100.0, 159), Spread { from: 0 });
        // A trial under way when the connections closed is void: not
        // judged, and the next may start once the rate is steady again.
        c.pause();
        active = 1;
        let steps = climb(&mut c, 351, &mut active, &rate(100.0, 5));
        assert_eq!((steps.last(), active), (Some(&Spread { from: 0 }), 2));
    }

    #[test]
    fn loops_that_are_not_busy_are_not_tried_and_idle_ones_are_given_up() {
        let mut c = Climber::new(&Balance::default());
        let mut active = 1;
        let calm = Look {
            busy: 0.5,
            ..busy(100.0)
        };
        let steps = climb(&mut c, 1, &mut active, &[calm; 10]);
        assert!(steps.iter().all(|s| *s == Step::Stay));
        // Nor while the rate is still changing.
        let steps = climb(
            &mut c,
            11,
            &mut active,
            &[busy(50.0), busy(80.0), busy(110.0)],
        );
        assert!(steps.iter().all(|s| *s == Step::Stay));
        // One connection cannot be shared.
        let alone = Look {
            busiest_open: 1,
            ..busy(100.0)
        };
        let steps = climb(&mut c, 21, &mut active, &[alone; 10]);
        assert!(steps.iter().all(|s| *s == Step::Stay));
        // Three loops that together use less than `gather_below` per loop
        // but one give up one loop per look.
        let mut active = 3;
        let idle = Look {
            cpu: 0.4,
            busy: 0.1,
            ..busy(1.0)
        };
        let steps = climb(&mut c, 31, &mut active, &[idle, idle, idle]);
        assert_eq!(steps, [Step::Gather, Step::Stay, Step::Stay]);
        assert_eq!(active, 2, "0.4 CPU needs two loops to stay under 0.3 each");
    }

    /// Connections moved back and forth between two loops while they carry
    /// request/response traffic lose, reorder or repeat nothing, and end
    /// as they would have on one loop.
    #[test]
    fn connections_moved_between_loops_lose_nothing() {
        let loops = Loops::with_balance(2, crate::Tuning::default(), None).unwrap();
        let (apps, ended) = connect(&loops, server(echo), 16);
        wait_for("every connection on a loop", || {
            loops.open().iter().sum::<usize>() == 16
        });
        let talkers: Vec<_> = apps
            .into_iter()
            .enumerate()
            .map(|(c, mut app)| {
                thread::spawn(move || {
                    let mut sent = 0u64;
                    for i in 0..1500usize {
                        let len = 1 + (i * 7919 + c * 31) % 6000;
                        let msg: Vec<u8> = (0..len).map(|k| (k + i + c) as u8).collect();
                        app.write_all(&msg).unwrap();
                        let mut back = vec![0u8; len];
                        app.read_exact(&mut back)
                            .unwrap_or_else(|e| panic!("conn {c}, message {i}: {e}"));
                        assert!(back == msg, "conn {c}, message {i} came back altered");
                        sent += len as u64;
                    }
                    app.shutdown(std::net::Shutdown::Write).unwrap();
                    let mut rest = Vec::new();
                    app.read_to_end(&mut rest).unwrap();
                    assert!(rest.is_empty());
                    sent
                })
            })
            .collect();
        let mut moves = 0;
        while !talkers.iter().all(|t| t.is_finished()) {
            loops.shed(0, false, 1);
            thread::sleep(Duration::from_millis(3));
            loops.shed(1, true, 0);
            thread::sleep(Duration::from_millis(3));
            moves += 2;
        }
        assert!(moves >= 10, "the traffic ended before connections moved");
        let mut sent: Vec<u64> = talkers.into_iter().map(|t| t.join().unwrap()).collect();
        let mut relayed: Vec<u64> = (0..16)
            .map(|_| {
                let r = ended.recv_timeout(Duration::from_secs(20)).unwrap();
                assert!(matches!(r.how, Ending::Closed), "{:?}", r.how);
                assert_eq!(r.up, r.down);
                r.up
            })
            .collect();
        sent.sort_unstable();
        relayed.sort_unstable();
        assert_eq!(sent, relayed);
        wait_for("the loops to be empty", || loops.open() == [0, 0]);
    }

    /// A loop kept busy shares its connections with the next loop, which
    /// then takes new ones too; once the traffic stops, the connections
    /// gather on the first loop again. Every byte reaches the server.
    #[test]
    fn a_busy_loop_spreads_and_idle_loops_gather() {
        let balance = Balance {
            every: Duration::from_millis(50),
            // Low, so a busy loop on a slow test machine counts as busy,
            // and a trial is kept whatever the rate did.
            busy_at: 0.2,
            keep_gain: 0.0,
            gather_below: 0.02,
            retry_after: 1,
        };
        let loops = Loops::with_balance(2, crate::Tuning::default(), Some(balance)).unwrap();
        assert_eq!(loops.active(), 1);
        let (apps, ended) = connect(&loops, server(sink), 8);
        wait_for("new connections on the first loop", || {
            loops.open() == [8, 0]
        });
        let streaming = Arc::new(AtomicBool::new(true));
        let writers: Vec<_> = apps
            .into_iter()
            .map(|mut app| {
                let streaming = streaming.clone();
                thread::spawn(move || {
                    let chunk = vec![5u8; 64 * 1024];
                    let mut sent = 0u64;
                    while streaming.load(Ordering::Relaxed) {
                        app.write_all(&chunk).unwrap();
                        sent += chunk.len() as u64;
                    }
                    (app, sent)
                })
            })
            .collect();
        wait_for("the busy loop to spread", || {
            loops.active() == 2 && loops.open()[1] > 0
        });
        streaming.store(false, Ordering::Relaxed);
        let apps: Vec<(TcpStream, u64)> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        wait_for("the idle loops to gather", || {
            loops.active() == 1 && loops.open() == [8, 0]
        });
        for (mut app, sent) in apps {
            app.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = [0u8; 8];
            app.read_exact(&mut got).unwrap();
            assert_eq!(u64::from_be_bytes(got), sent, "the server got every byte");
        }
        for _ in 0..8 {
            let r = ended.recv_timeout(Duration::from_secs(20)).unwrap();
            assert!(matches!(r.how, Ending::Closed) && r.down == 8, "{r:?}");
        }
    }
}
