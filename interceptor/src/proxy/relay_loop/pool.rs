//! The agent's relay loops, and how many of them carry connections.
//!
//! One loop thread per data-plane worker is started, but only as many carry
//! connections as the load needs. A loop that is awake when an event comes
//! answers it without a wakeup, and one loop handles many events per
//! wakeup: for request/response traffic that shares the node's CPUs with
//! the servers it talks to (a database on the same node), one busy loop
//! costs less CPU per request than two half-idle ones. Streams and
//! many-connection traffic that keep a loop busy need more of them.
//!
//! So a balancer thread looks at the loops' own CPU time every
//! [`Balance::every`]:
//! - a loop that used more than [`Balance::spread_at`] of a CPU hands every
//!   other connection to the next idle loop, which takes new connections
//!   from then on too;
//! - when the loops that take connections used so little that one fewer
//!   would each stay under [`Balance::gather_below`], the last of them
//!   hands all its connections to the others and takes no new ones.
//!
//! A connection moves between loops as a whole, with what it holds, by
//! leaving one loop's epoll and joining another's; nothing it has in flight
//! is lost (see `Loop::shed`). Moves happen a few times a second at most,
//! when the load changes.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::{debug, warn};

use super::{RelayLoop, Traffic};

/// When the balancer moves connections.
#[derive(Clone, Copy, Debug)]
pub struct Balance {
    /// How often it looks.
    pub every: Duration,
    /// A loop that used more of a CPU than this shares its connections.
    pub spread_at: f64,
    /// Loops that used, together, less than this much of a CPU for each
    /// loop but one, give up their last loop.
    pub gather_below: f64,
}

impl Default for Balance {
    fn default() -> Balance {
        Balance {
            every: Duration::from_millis(100),
            spread_at: 0.7,
            // Below the spread threshold by a margin: what was gathered
            // does not spread again at the next look.
            gather_below: 0.5,
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
    pub fn start(n: usize, busy_poll: Option<std::time::Duration>) -> std::io::Result<Arc<Loops>> {
        Loops::with_balance(n, busy_poll, Some(Balance::default()))
    }

    /// As [`Loops::start`]; `balance: None` keeps every loop taking
    /// connections and never moves one.
    pub fn with_balance(
        n: usize,
        busy_poll: Option<std::time::Duration>,
        balance: Option<Balance>,
    ) -> std::io::Result<Arc<Loops>> {
        let n = n.max(1);
        let loops = (0..n)
            .map(|i| RelayLoop::start(format!("relay-loop-{i}"), busy_poll))
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

    /// Hands a connection to one of the loops that take connections, in turn.
    pub fn submit(&self, traffic: Box<dyn Traffic>) {
        let active = self.shared.active.load(Ordering::Relaxed).max(1);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % active;
        self.shared.loops[i].submit(traffic);
    }

    /// How many loops take new connections now.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// How many connections each loop relays now.
    pub fn open(&self) -> Vec<usize> {
        self.shared.loops.iter().map(RelayLoop::open).collect()
    }

    /// Moves connections of loop `from` to loop `to`: every other one, or all.
    #[cfg(test)]
    fn shed(&self, from: usize, all: bool, to: usize) {
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

/// Looks at the loops' CPU time every `b.every` and moves connections
/// (see the module's documentation), until `stop`.
fn balancer(s: &Shared, b: Balance, stop: &AtomicBool) {
    let n = s.loops.len();
    let cpu = |l: &RelayLoop| l.cpu_time().unwrap_or_default();
    if s.loops.iter().any(|l| l.cpu_time().is_none()) {
        warn!("relay loop CPU time cannot be read: connections stay on the first loop");
    }
    let mut last: Vec<Duration> = s.loops.iter().map(cpu).collect();
    let mut at = Instant::now();
    while !stop.load(Ordering::Acquire) {
        std::thread::park_timeout(b.every);
        let now = Instant::now();
        let wall = now.duration_since(at).as_secs_f64();
        if wall < b.every.as_secs_f64() / 2.0 {
            continue; // woken early (stopping, or spuriously)
        }
        at = now;
        let used: Vec<Duration> = s.loops.iter().map(cpu).collect();
        let load: Vec<f64> = used
            .iter()
            .zip(&last)
            .map(|(u, l)| u.saturating_sub(*l).as_secs_f64() / wall)
            .collect();
        last = used;
        let active = s.active.load(Ordering::Relaxed).clamp(1, n);
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
        let (busiest, peak) = load[..active]
            .iter()
            .copied()
            .enumerate()
            .fold((0, 0.0), |m, (i, x)| if x > m.1 { (i, x) } else { m });
        let total: f64 = load[..active].iter().sum();
        if active < n && peak > b.spread_at && s.loops[busiest].open() > 1 {
            s.active.store(active + 1, Ordering::Relaxed);
            s.loops[busiest]
                .handle()
                .shed(false, handles(active..active + 1));
            debug!(loops = active + 1, load = peak, "relay loops: spread");
        } else if active > 1 && total < b.gather_below * (active - 1) as f64 {
            s.active.store(active - 1, Ordering::Relaxed);
            s.loops[active - 1]
                .handle()
                .shed(true, handles(0..active - 1));
            debug!(loops = active - 1, load = total, "relay loops: gathered");
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
    use crate::{proxy::Relayed, record::Outcome};

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
    ) -> (Vec<TcpStream>, mpsc::Receiver<Relayed>) {
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
                loops.submit(Box::new(super::super::Tcp::new(client, upstream, done)));
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

    /// Connections moved back and forth between two loops while they carry
    /// request/response traffic lose, reorder or repeat nothing, and end
    /// as they would have on one loop.
    #[test]
    fn connections_moved_between_loops_lose_nothing() {
        let loops = Loops::with_balance(2, None, None).unwrap();
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
                assert_eq!(r.outcome, Outcome::Closed, "{:?}", r.detail);
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
            // Low, so a busy loop on a slow test machine counts as busy.
            spread_at: 0.2,
            gather_below: 0.02,
        };
        let loops = Loops::with_balance(2, None, Some(balance)).unwrap();
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
            assert_eq!((r.outcome, r.down), (Outcome::Closed, 8), "{:?}", r.detail);
        }
    }
}
