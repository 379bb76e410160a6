//! The proxy: accepts redirected connections on loopback, finds who made each
//! one and where it was going, asks policy, and relays bytes both ways.
//!
//! A connection with no interception metadata is refused and recorded, never
//! relayed blind. Half-close is preserved (a FIN from one side becomes a FIN
//! to the other while the reverse direction keeps flowing); a reset on one
//! side becomes a reset on the other.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use interceptor_ebpf::{ConnMeta, SockKey};
use tokio::{
    io::unix::AsyncFd,
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tracing::{debug, warn};

use crate::{
    config::{Config, Protocol, PROXY_IP4, PROXY_IP6},
    identity::Resolver,
    policy::{Action, Policy},
    protocol::postgres,
    record::{now_micros, rfc3339_micros, Outcome, Recorder, Session, SessionIds},
    redirect::{original_dst, sock_key},
};

mod flush;

/// Rule name recorded when a connection cannot be tied to a workload.
pub const RULE_UNATTRIBUTED: &str = "identity.unattributed";
/// Rule name recorded when a connection arrives without interception metadata.
pub const RULE_NO_METADATA: &str = "proxy.no-metadata";
/// Rule name recorded when a connect was aimed at the proxy itself.
pub const RULE_PROXY_LOOP: &str = "proxy.loop";

/// Where the proxy finds what the kernel learned about a connection.
pub trait MetaSource: Send + Sync {
    /// Looks up and removes the metadata filed under `key`.
    fn take(&self, key: &SockKey) -> Option<ConnMeta>;
}

/// The data-plane threads and the channels that feed them connections.
pub struct Workers {
    senders: Vec<mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: AtomicUsize,
}

impl Workers {
    fn dispatch(&self, conn: (std::net::TcpStream, SocketAddr)) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        if self.senders[i].send(conn).is_err() {
            warn!(worker = i, "data-plane worker is gone; connection dropped");
        }
    }

    /// Stops the workers; their open connections end.
    pub fn stop(self) {
        drop(self.senders);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

pub struct Proxy {
    pub config: Arc<Config>,
    pub policy: Arc<ArcSwap<Policy>>,
    pub meta: Arc<dyn MetaSource>,
    pub identity: Arc<Resolver>,
    pub recorder: Recorder,
    pub ids: Arc<SessionIds>,
    /// Keyed masking of result values (PostgreSQL targets).
    pub masker: Arc<crate::mask::Masker>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on {0}: {1} (is another agent running, or the port taken? see agent.proxy_port)"
)]
pub struct BindError(pub SocketAddr, pub io::Error);

/// Binds the proxy listeners on 127.0.0.1 and [::1]. IPv6 is optional: a host
/// without ::1 gets a warning and IPv6 connects of workloads fail closed.
pub async fn bind(port: u16) -> Result<Vec<TcpListener>, BindError> {
    let v4 = SocketAddr::new(IpAddr::V4(PROXY_IP4), port);
    let mut out = vec![listen(v4)?];
    let v6 = SocketAddr::new(IpAddr::V6(PROXY_IP6), port);
    match listen(v6) {
        Ok(l) => out.push(l),
        Err(e) => warn!(error = %e, "no IPv6 proxy listener: IPv6 connects of workloads will fail"),
    }
    Ok(out)
}

fn listen(addr: SocketAddr) -> Result<TcpListener, BindError> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| BindError(addr, e))?;
    sock.set_reuseaddr(true).map_err(|e| BindError(addr, e))?;
    sock.bind(addr).map_err(|e| BindError(addr, e))?;
    sock.listen(4096).map_err(|e| BindError(addr, e))
}

impl Proxy {
    /// Starts `n` data-plane threads, each with its own single-threaded
    /// runtime. A connection lives on one thread from accept to close: no
    /// work stealing, no cross-thread wakeups on the per-message path.
    pub fn start_workers(self: &Arc<Self>, n: usize) -> io::Result<Workers> {
        let mut senders = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        let busy_poll = self.config.agent.busy_poll();
        let mut ticks = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, mut rx) = mpsc::unbounded_channel::<(std::net::TcpStream, SocketAddr)>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let me = self.clone();
            let recorder = self.recorder.clone();
            let tick = Arc::new(tokio::sync::Notify::new());
            ticks.push(tick.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("data-plane-{i}"))
                    .spawn(move || {
                        rt.block_on(async move {
                            if let Some(window) = busy_poll {
                                tokio::spawn(crate::busy_poll::poller(window));
                            }
                            tokio::spawn(flush::run(recorder.clone(), tick));
                            while let Some((s, peer)) = rx.recv().await {
                                match TcpStream::from_std(s) {
                                    Ok(s) => drop(tokio::spawn(me.clone().handle(s, peer))),
                                    Err(e) => warn!(error = %e, "cannot register a connection"),
                                }
                            }
                            // Stopping: the open sessions' statements, done
                            // or unanswered, are recorded before they go.
                            flush::drain(&recorder).await;
                        });
                        // Dropping the runtime here ends this thread's open connections.
                    })?,
            );
            senders.push(tx);
        }
        flush::start_ticker(&ticks)?;
        Ok(Workers {
            senders,
            threads,
            next: AtomicUsize::new(0),
        })
    }

    /// Accepts on `listeners` until `shutdown` turns true, handing each
    /// connection to a data-plane worker in turn.
    pub async fn accept(
        listeners: Vec<TcpListener>,
        workers: Arc<Workers>,
        shutdown: watch::Receiver<bool>,
    ) {
        let mut tasks = Vec::new();
        for l in listeners {
            let workers = workers.clone();
            let mut stop = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = l.accept() => match r.and_then(|(s, peer)| Ok((s.into_std()?, peer))) {
                            Ok(conn) => workers.dispatch(conn),
                            Err(e) => {
                                // EMFILE and friends: back off instead of spinning.
                                warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        },
                        _ = stop.changed() => break,
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn finish(&self, mut s: Session, outcome: Outcome, detail: Option<String>) {
        s.outcome = outcome;
        s.detail = detail;
        s.ended_at = Some(rfc3339_micros(now_micros()));
        self.recorder.record(s).await;
    }

    async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let _ = client.set_nodelay(true);
        let mut s = Session::new(self.ids.next(), peer.to_string());
        let local = match client.local_addr() {
            Ok(a) => a,
            Err(e) => return self.finish(s, Outcome::Error, Some(e.to_string())).await,
        };
        let Some(meta) = self.meta.take(&sock_key(peer, local)) else {
            reset(&client);
            s.rule = Some(RULE_NO_METADATA.into());
            let why = "no interception metadata for this connection (not redirected by the agent); refused";
            debug!(%peer, "{why}");
            return self.finish(s, Outcome::Refused, Some(why.into())).await;
        };
        let dst = original_dst(&meta);
        let id = self.identity.resolve(&meta);
        s.workload = id.workload.clone();
        s.identity = id.spiffe_id.clone();
        s.pid = meta.tgid;
        s.exe = id.evidence.exe.clone();
        s.uid = meta.uid;
        s.cgroup = id.evidence.cgroup.clone();
        s.original_dst = Some(dst.to_string());
        s.evidence = Some(id.evidence);
        let target = self.config.target_for(dst);
        if let Some(t) = target {
            s.target = Some(t.name.clone());
            s.protocol = t.protocol.to_string();
        }
        if dst.port() == self.config.agent.proxy_port
            && matches!(crate::config::canonical_ip(dst.ip()), IpAddr::V4(a) if a == PROXY_IP4)
            || dst == SocketAddr::new(IpAddr::V6(PROXY_IP6), self.config.agent.proxy_port)
        {
            reset(&client);
            s.rule = Some(RULE_PROXY_LOOP.into());
            return self
                .finish(
                    s,
                    Outcome::Refused,
                    Some("connect aimed at the proxy itself".into()),
                )
                .await;
        }
        let Some(workload) = id.workload else {
            reset(&client);
            s.rule = Some(RULE_UNATTRIBUTED.into());
            let why = format!(
                "cgroup id {} belongs to no configured workload",
                meta.cgroup_id
            );
            return self.finish(s, Outcome::Denied, Some(why)).await;
        };
        let decision = self
            .policy
            .load()
            .decide_connect(&workload, target.map(|t| t.name.as_str()));
        s.rule = Some(decision.rule.clone());
        if decision.action != Action::Allow {
            reset(&client);
            let why = format!("connect denied by rule `{}`", decision.rule);
            debug!(%workload, %dst, rule = %decision.rule, "denied");
            return self.finish(s, Outcome::Denied, Some(why)).await;
        }
        self.recorder.record(s.clone()).await;

        let timeout = Duration::from_millis(self.config.agent.upstream_connect_timeout_ms);
        let upstream = match tokio::time::timeout(timeout, TcpStream::connect(dst)).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                reset(&client);
                let outcome = if e.kind() == io::ErrorKind::ConnectionRefused {
                    Outcome::Refused
                } else {
                    Outcome::Error
                };
                return self
                    .finish(s, outcome, Some(format!("upstream {dst}: {e}")))
                    .await;
            }
            Err(_) => {
                reset(&client);
                return self
                    .finish(
                        s,
                        Outcome::Error,
                        Some(format!(
                            "upstream {dst}: connect timed out after {timeout:?}"
                        )),
                    )
                    .await;
            }
        };
        let _ = upstream.set_nodelay(true);
        let postgres = target.is_some_and(|t| t.protocol == Protocol::Postgres);
        let r = if postgres {
            self.relay_postgres(&mut s, client, upstream).await
        } else {
            relay(client, upstream).await
        };
        s.bytes_up = r.up;
        s.bytes_down = r.down;
        self.finish(s, r.outcome, r.detail).await;
    }

    /// Relays a PostgreSQL connection. Its statements are recorded as they
    /// complete (by this thread's [`flush::run`], every
    /// [`flush::STATEMENT_FLUSH`]) and whatever is left at the end
    /// ([`flush::Listed::finish`]).
    async fn relay_postgres(
        &self,
        s: &mut Session,
        client: TcpStream,
        upstream: TcpStream,
    ) -> Relayed {
        let state = Arc::new(postgres::State::with_gate(postgres::Gate {
            policy: self.policy.clone(),
            workload: s.workload.clone().unwrap_or_default(),
            target: s.target.clone().unwrap_or_default(),
            masker: self.masker.clone(),
        }));
        let listed = flush::Listed::new(s.id, state.clone());
        let relayed = postgres::relay(client, upstream, &state).await;
        s.statements = listed.finish(&self.recorder).await;
        s.postgres = Some(state.take_startup());
        let (up, down, result) = relayed;
        let (outcome, detail) = match result {
            Ok(()) => (Outcome::Closed, None),
            Err(postgres::PgError::Io(e)) => io_outcome(e),
            Err(e @ postgres::PgError::StartupRefused { .. }) => {
                (Outcome::Denied, Some(e.to_string()))
            }
            Err(e) => (Outcome::Error, Some(e.to_string())),
        };
        Relayed {
            up,
            down,
            outcome,
            detail,
        }
    }
}

/// Closes a socket with RST instead of FIN (SO_LINGER 0) when it is dropped.
fn reset<S: AsFd>(s: &S) {
    set_linger_zero(s.as_fd());
}

fn set_linger_zero(fd: BorrowedFd<'_>) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Linger, &l);
}

/// Result of relaying one connection.
pub struct Relayed {
    pub up: u64,
    pub down: u64,
    pub outcome: Outcome,
    pub detail: Option<String>,
}

/// Relays until both directions end. A read of 0 bytes (FIN) shuts down the
/// other side's write half; an error on either direction resets both.
pub async fn relay(client: TcpStream, upstream: TcpStream) -> Relayed {
    let (client, upstream) = match (into_fd(client), into_fd(upstream)) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            return finish_relay(Err(e), &AtomicU64::new(0), &AtomicU64::new(0));
        }
    };
    let (up_n, down_n) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = both(
        pump(&client, &upstream, &up_n),
        pump(&upstream, &client, &down_n),
    )
    .await;
    if result.is_err() {
        reset(client.get_ref());
        reset(upstream.get_ref());
    }
    finish_relay(result, &up_n, &down_n)
}

/// A relayed socket: registered with the runtime directly, so a pump can
/// clear readiness itself after a short read (one syscall less per message).
pub(crate) type Sock = AsyncFd<std::net::TcpStream>;

pub(crate) fn into_fd(s: TcpStream) -> io::Result<Sock> {
    // SAFETY: the std TcpStream owns its fd for as long as the AsyncFd lives
    // and always reports that same fd.
    unsafe { AsyncFd::register(s.into_std()?) }.map_err(io::Error::from)
}

/// Runs both directions; the first error ends both.
async fn both(
    up: impl std::future::Future<Output = io::Result<()>>,
    down: impl std::future::Future<Output = io::Result<()>>,
) -> io::Result<()> {
    tokio::pin!(up, down);
    tokio::select! {
        a = &mut up => match a {
            Ok(()) => down.await,
            Err(e) => Err(e),
        },
        b = &mut down => match b {
            Ok(()) => up.await,
            Err(e) => Err(e),
        },
    }
}

/// How an I/O error ends a session: a reset, or an error.
fn io_outcome(e: io::Error) -> (Outcome, Option<String>) {
    let resetish = matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    );
    let outcome = if resetish {
        Outcome::Reset
    } else {
        Outcome::Error
    };
    (outcome, Some(e.to_string()))
}

fn finish_relay(result: io::Result<()>, up: &AtomicU64, down: &AtomicU64) -> Relayed {
    let (outcome, detail) = match result {
        Ok(()) => (Outcome::Closed, None),
        Err(e) => io_outcome(e),
    };
    Relayed {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
        outcome,
        detail,
    }
}

/// A non-blocking pipe used as the in-kernel buffer of one direction.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// Pipe capacity asked for (the kernel may grant less).
const PIPE_SIZE: usize = 1 << 20;
/// Userspace buffer of a direction; a read that fills it switches to splice.
const COPY_BUF: usize = 64 * 1024;

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
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Copies one direction. Small messages go through a userspace buffer (the
/// cheapest path for request/response traffic); once a read fills that
/// buffer the stream is bulk, and the rest moves with splice(2) through a
/// pipe, never entering userspace. Counts into `total`; ends with the write
/// side shut down after EOF, or with the first error.
async fn pump(from: &Sock, to: &Sock, total: &AtomicU64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut pipe: Option<Pipe> = None;
    let (from_fd, to_fd) = (from.as_raw_fd(), to.as_raw_fd());
    loop {
        let n = match &pipe {
            Some(p) => {
                let n =
                    read_with(from, None, || splice(from_fd, p.w.as_raw_fd(), PIPE_SIZE)).await?;
                let mut left = n;
                while left > 0 {
                    left -= write_with(to, || splice(p.r.as_raw_fd(), to_fd, left)).await?;
                }
                n
            }
            None => {
                let len = buf.len();
                let n = read_with(from, Some(len), || (&mut from.get_ref()).read(&mut buf)).await?;
                let mut done = 0;
                while done < n {
                    done += write_with(to, || (&mut to.get_ref()).write(&buf[done..n])).await?;
                }
                if n == len {
                    // Bulk: switch to splice if a pipe can be had (else keep copying).
                    pipe = Pipe::new().ok();
                }
                n
            }
        };
        if n == 0 {
            return shutdown_write(to_fd);
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Waits for readability and runs `op` until it does not block. With
/// `short_of: Some(len)`, a read of fewer than `len` bytes means the socket
/// is drained, so readiness is cleared without another (blocking) read; an
/// edge that arrives meanwhile is still seen (tokio compares event ticks).
async fn read_with(
    s: &Sock,
    short_of: Option<usize>,
    mut op: impl FnMut() -> io::Result<usize>,
) -> io::Result<usize> {
    loop {
        let mut guard = s.readable().await?;
        match guard.try_io(|_| op()) {
            Ok(Ok(n)) => {
                crate::busy_poll::activity();
                if short_of.is_some_and(|len| n > 0 && n < len) {
                    guard.clear_ready();
                }
                return Ok(n);
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// Waits for writability and runs `op` until it does not block.
async fn write_with(s: &Sock, mut op: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        let mut guard = s.writable().await?;
        match guard.try_io(|_| op()) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

/// Sends FIN; a peer that is already gone is not an error here.
pub(crate) fn shutdown_write(fd: RawFd) -> io::Result<()> {
    match nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write) {
        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A connected loopback pair for relay tests: (the connecting end, the
/// accepted end).
#[cfg(test)]
pub(crate) async fn loopback_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

#[cfg(test)]
mod tests {
    //! The relay against real loopback sockets, without eBPF.
    use super::{loopback_pair as pair, *};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn half_close_travels_and_the_reverse_direction_keeps_flowing() {
        let (mut app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let relay = tokio::spawn(relay(proxy_client, proxy_upstream));
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
    async fn a_reset_on_one_side_resets_the_other() {
        let (app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let relay = tokio::spawn(relay(proxy_client, proxy_upstream));
        reset(&app);
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
        let relay = tokio::spawn(relay(proxy_client, proxy_upstream));
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
}
