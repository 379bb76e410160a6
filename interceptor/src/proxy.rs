//! The proxy: accepts redirected connections on loopback, finds who made each
//! one and where it was going, asks policy, and relays bytes both ways.
//!
//! Its listeners bind ephemeral loopback ports; connections for the proxy
//! address (`agent.proxy_port`) reach them only by the kernel's steering
//! (see [`crate::redirect`]), and each one's metadata is found by the cookie
//! of the accepted socket.
//!
//! A connection with no interception metadata is refused and recorded, never
//! relayed blind. Half-close is preserved (a FIN from one side becomes a FIN
//! to the other while the reverse direction keeps flowing); a reset on one
//! side becomes a reset on the other.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use interceptor_ebpf::ConnMeta;
use interceptor_relay::{
    self as relay_loop,
    sys::{local_hop, reset},
    End, Ending,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tracing::{debug, warn};

use crate::{
    config::{Config, Target, PROXY_IP4, PROXY_IP6},
    identity::Resolver,
    policy::{Action, Decision, Policy},
    protocol,
    record::{
        now_micros, rfc3339_micros, Outbox, Outcome, Recorder, Recording, Session, SessionIds,
    },
    redirect::original_dst,
};

mod flush;
pub mod unix;

pub use flush::STATEMENT_FLUSH;

/// Rule name recorded when a connection cannot be tied to a workload.
pub const RULE_UNATTRIBUTED: &str = "identity.unattributed";
/// Rule name recorded when a connection arrives without interception metadata.
pub const RULE_NO_METADATA: &str = "proxy.no-metadata";
/// Rule name recorded when a connect was aimed at the proxy itself.
pub const RULE_PROXY_LOOP: &str = "proxy.loop";

/// Where the proxy finds what the kernel learned about a connection.
pub trait MetaSource: Send + Sync {
    /// Looks up and removes the metadata filed for the accepted socket whose
    /// cookie (`SO_COOKIE`) is `cookie`.
    fn take(&self, cookie: u64) -> Option<ConnMeta>;
}

/// A connection as accepted: on the proxy address, or on the agent's
/// socket for unix path `path` of target `target`.
pub enum Accepted {
    Tcp(std::net::TcpStream, SocketAddr),
    Unix {
        stream: std::os::unix::net::UnixStream,
        target: usize,
        path: usize,
    },
}

/// The data-plane threads and the channels that feed them connections.
pub struct Workers {
    senders: Vec<mpsc::UnboundedSender<Accepted>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: AtomicUsize,
    /// The relay loops the workers hand connections to.
    loops: Arc<relay_loop::Loops>,
}

impl Workers {
    fn dispatch(&self, conn: Accepted) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        if self.senders[i].send(conn).is_err() {
            warn!(worker = i, "data-plane worker is gone; connection dropped");
        }
    }

    /// Stops the relay loops, then the workers; open connections end, and
    /// what they had not recorded is (see [`flush::drain`]).
    pub fn stop(self) {
        self.loops.stop();
        drop(self.senders);
        for t in self.threads {
            let _ = t.join();
        }
        drop(self.loops);
    }
}

pub struct Proxy {
    pub config: Arc<Config>,
    pub policy: Arc<ArcSwap<Policy>>,
    pub meta: Arc<dyn MetaSource>,
    pub identity: Arc<Resolver>,
    pub recorder: Recorder,
    pub ids: Arc<SessionIds>,
    /// Keyed masking of result values (targets whose protocol is inspected).
    pub masker: Arc<crate::mask::Masker>,
    /// Where the listeners are bound: a connect aimed there is a loop.
    pub listening: Vec<SocketAddr>,
    /// This host's addresses: a local target is reached through any of them.
    pub host: Arc<crate::local::HostAddrs>,
    /// Just-in-time approval (none: not configured; what review rules
    /// match is refused).
    pub approvals: Option<Arc<crate::approvals::Broker>>,
    /// People who said they started processes (`interceptor exec
    /// --requester-token`).
    pub requesters: Arc<crate::approvals::Requesters>,
    /// The node CA, when the agent terminates the applications' TLS
    /// (`[agent.tls] mode = "terminate"`).
    pub ca: Option<Arc<crate::tls::ca::Authority>>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {0}: {1}")]
pub struct BindError(pub SocketAddr, pub io::Error);

/// Binds the proxy listeners on ephemeral ports of 127.0.0.1 and [::1]
/// (the steering program brings them the proxy address's connections).
/// IPv6 is optional: a host without ::1 gets a warning and IPv6 connects of
/// workloads fail closed.
pub async fn bind() -> Result<Vec<TcpListener>, BindError> {
    let v4 = SocketAddr::new(IpAddr::V4(PROXY_IP4), 0);
    let mut out = vec![listen(v4)?];
    let v6 = SocketAddr::new(IpAddr::V6(PROXY_IP6), 0);
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
        let loops = relay_loop::Loops::start(n, self.config.agent.tuning())?;
        let mut ticks = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, mut rx) = mpsc::unbounded_channel::<Accepted>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let me = self.clone();
            let recorder = self.recorder.clone();
            let tick = Arc::new(tokio::sync::Notify::new());
            ticks.push(tick.clone());
            let loops = loops.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("data-plane-{i}"))
                    .spawn(move || {
                        // Connections are relayed by the loop threads.
                        relay_loop::install(loops);
                        rt.block_on(async move {
                            tokio::spawn(flush::run(recorder.clone(), tick));
                            while let Some(conn) = rx.recv().await {
                                let me = me.clone();
                                let registered = match conn {
                                    Accepted::Tcp(s, peer) => TcpStream::from_std(s)
                                        .map(|s| drop(tokio::spawn(me.handle(s, peer)))),
                                    Accepted::Unix {
                                        stream,
                                        target,
                                        path,
                                    } => tokio::net::UnixStream::from_std(stream).map(|s| {
                                        drop(tokio::spawn(me.handle_unix(s, target, path)))
                                    }),
                                };
                                if let Err(e) = registered {
                                    warn!(error = %e, "cannot register a connection");
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
            loops,
        })
    }

    /// Accepts on `listeners` and `unix` until `shutdown` turns true,
    /// handing each connection to a data-plane worker in turn.
    pub async fn accept(
        listeners: Vec<TcpListener>,
        unix: Vec<unix::Listener>,
        workers: Arc<Workers>,
        shutdown: watch::Receiver<bool>,
    ) {
        let mut tasks = Vec::new();
        for l in listeners {
            let l = Arc::new(l);
            tasks.push(tokio::spawn(accept_loop(
                workers.clone(),
                shutdown.clone(),
                move || {
                    let l = l.clone();
                    async move {
                        let (s, peer) = l.accept().await?;
                        Ok(Accepted::Tcp(s.into_std()?, peer))
                    }
                },
            )));
        }
        for l in unix {
            let l = Arc::new(l);
            tasks.push(tokio::spawn(accept_loop(
                workers.clone(),
                shutdown.clone(),
                move || {
                    let l = l.clone();
                    async move {
                        let (s, _) = l.listener.accept().await?;
                        Ok(Accepted::Unix {
                            stream: s.into_std()?,
                            target: l.target,
                            path: l.path,
                        })
                    }
                },
            )));
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
        local_hop(&client, peer);
        let mut s = Session::new(self.ids.next(), peer.to_string());
        let cookie = match socket_cookie(&client) {
            Ok(c) => c,
            Err(e) => return self.finish(s, Outcome::Error, Some(e.to_string())).await,
        };
        let Some(meta) = self.meta.take(cookie) else {
            reset(&client);
            s.rule = Some(RULE_NO_METADATA.into());
            let why = "no interception metadata for this connection (not redirected by the agent); refused";
            debug!(%peer, "{why}");
            return self.finish(s, Outcome::Refused, Some(why.into())).await;
        };
        let dst = original_dst(&meta);
        let target = self.config.target_for_on(dst, &self.host.get());
        let workload = self.identify(&mut s, &meta, target, dst.to_string()).await;
        if dst.port() == self.config.agent.proxy_port
            && matches!(crate::config::canonical_ip(dst.ip()), IpAddr::V4(a) if a == PROXY_IP4)
            || dst == SocketAddr::new(IpAddr::V6(PROXY_IP6), self.config.agent.proxy_port)
            || self.listening.iter().any(|l| {
                l.port() == dst.port()
                    && crate::config::canonical_ip(l.ip()) == crate::config::canonical_ip(dst.ip())
            })
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
        if let Err((outcome, why)) = self
            .authorize(&mut s, workload, target, meta.cgroup_id)
            .await
        {
            reset(&client);
            return self.finish(s, outcome, Some(why)).await;
        }
        self.recorder.record(s.clone()).await;
        let timeout = self.connect_timeout();
        let upstream = within(timeout, TcpStream::connect(dst)).await.inspect(|u| {
            let _ = u.set_nodelay(true);
            local_hop(u, dst);
        });
        self.serve(s, client, upstream, target, dst.to_string(), Some(dst.ip()))
            .await;
    }

    /// A connection on the agent's socket for unix path `path` of target
    /// `target`: the connect of a workload to that path, sent here by the
    /// unix programs (or made here directly; it is the same connect). Who
    /// made it is told by the socket's peer credentials, its process kept
    /// from being replaced meanwhile by a pidfd; the upstream connect is
    /// made as that process's user and groups, so the server's socket
    /// permissions and its peer authentication see whom they would have
    /// seen.
    async fn handle_unix(self: Arc<Self>, client: tokio::net::UnixStream, ti: usize, pi: usize) {
        let config = self.config.clone();
        let t = &config.targets[ti];
        let dst = &t.unix[pi];
        let original = format!("unix:{}", dst.display());
        let peer = match unix::Peer::of(&client) {
            Ok(p) => p,
            Err(e) => {
                let s = Session::new(self.ids.next(), "unix".into());
                let why = format!("cannot tell who connected: {e}");
                return self.finish(s, Outcome::Error, Some(why)).await;
            }
        };
        let mut s = Session::new(self.ids.next(), format!("unix:pid={}", peer.pid));
        let meta = peer.meta();
        let workload = self
            .identify(&mut s, &meta, Some(t), original.clone())
            .await;
        if let Some(e) = s.evidence.as_mut() {
            e.attribution = "peer credentials".into();
        }
        if !peer.alive() {
            // Its pid may be another process's by now: nothing read of it
            // can be trusted.
            (s.workload, s.identity) = (None, None);
            s.rule = Some(RULE_UNATTRIBUTED.into());
            let why = format!(
                "process {} ended before it could be identified; refused",
                peer.pid
            );
            return self.finish(s, Outcome::Denied, Some(why)).await;
        }
        if let Err((outcome, why)) = self
            .authorize(&mut s, workload, Some(t), meta.cgroup_id)
            .await
        {
            reset(&client);
            return self.finish(s, outcome, Some(why)).await;
        }
        self.recorder.record(s.clone()).await;
        let timeout = self.connect_timeout();
        let upstream = within(
            timeout,
            unix::connect_as(dst.clone(), peer.creds(), timeout),
        )
        .await;
        self.serve(s, client, upstream, Some(t), original, None)
            .await;
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.config.agent.upstream_connect_timeout_ms)
    }

    /// Fills the session with who made the connection and where it was
    /// going; the workload, if the caller belongs to one.
    async fn identify(
        &self,
        s: &mut Session,
        meta: &ConnMeta,
        target: Option<&Target>,
        original: String,
    ) -> Option<String> {
        let id = self.identity.resolve(meta).await;
        s.workload = id.workload.clone();
        s.identity = id.spiffe_id.clone();
        s.pid = meta.tgid;
        s.exe = id.evidence.exe.clone();
        s.uid = meta.uid;
        s.cgroup = id.evidence.cgroup.clone();
        s.original_dst = Some(original);
        s.evidence = Some(id.evidence);
        if let Some(t) = target {
            s.target = Some(t.name.clone());
            s.protocol = t.protocol.to_string();
        }
        id.workload
    }

    /// Whether the connect may go on: the caller is a workload and policy
    /// allows it to reach `target`, or a review rule's approval does (a
    /// connect held for approval waits here, with no upstream connection).
    /// Sets the session's rule.
    async fn authorize(
        &self,
        s: &mut Session,
        workload: Option<String>,
        target: Option<&Target>,
        cgroup_id: u64,
    ) -> Result<(), (Outcome, String)> {
        let Some(workload) = workload else {
            s.rule = Some(RULE_UNATTRIBUTED.into());
            let why = format!("cgroup id {cgroup_id} belongs to no configured workload");
            return Err((Outcome::Denied, why));
        };
        let mut decision = self
            .policy
            .load()
            .decide_connect(&workload, target.map(|t| t.name.as_str()));
        if let (Action::Review, Some(t)) = (decision.action, target) {
            decision = self.review_connect(s, decision, t).await;
        }
        s.rule = Some(decision.rule.to_string());
        s.approval = decision.via.as_ref().map(|v| v.request.to_string());
        if decision.action != Action::Allow {
            debug!(%workload, target = ?target.map(|t| &t.name), rule = %decision.rule, "denied");
            let why = match &decision.via {
                Some(v) => format!(
                    "connect refused by rule `{}` (request {}: {})",
                    decision.rule, v.request, v.why
                ),
                None => format!("connect denied by rule `{}`", decision.rule),
            };
            return Err((Outcome::Denied, why));
        }
        Ok(())
    }

    /// The decision on a connect to `target` that review rule `d.rule`
    /// matched: by a grant in force, or once its request is decided (or
    /// the rule's hold is over).
    async fn review_connect(&self, s: &Session, d: Decision, target: &Target) -> Decision {
        let terms = self.policy.load().review_terms(&d.rule);
        let (Some(broker), Some(terms)) = (&self.approvals, terms) else {
            return Decision::new(Action::Deny, d.rule);
        };
        let mut requester = self.requester(s);
        requester.human = s.evidence.as_ref().and_then(|e| self.requesters.of(e));
        let ask = crate::approvals::Ask {
            rule: &d.rule,
            terms: &terms,
            target: &target.name,
            requester: &requester,
            asked: crate::record::approval::Asked::Connect,
        };
        let woken = Arc::new(tokio::sync::Notify::new());
        let wake = woken.clone();
        match broker.ask(ask, Box::new(move || wake.notify_one())) {
            crate::approvals::Answer::Granted(d) | crate::approvals::Answer::Refused(d) => d,
            crate::approvals::Answer::Held(ticket) => loop {
                if let Some(d) = ticket.decision() {
                    break d;
                }
                woken.notified().await;
            },
        }
    }

    /// Who asks, for a request made on session `s`: the workload and its
    /// process (the person who started it is looked up only when a request
    /// is made: [`crate::approvals::Requesters::of`] reads /proc).
    fn requester(&self, s: &Session) -> crate::record::approval::Requester {
        let workload = s.workload.clone().unwrap_or_default();
        let owners = self
            .config
            .workload(&workload)
            .map(|w| w.owners.clone())
            .unwrap_or_default();
        crate::record::approval::Requester {
            human: None,
            workload,
            identity: s.identity.clone().unwrap_or_default(),
            session: Some(s.id),
            evidence: s.evidence.clone(),
            owners,
        }
    }

    /// The rest of an admitted connection: tells the client when the
    /// server cannot be reached, else relays and records it.
    async fn serve<C, U>(
        &self,
        mut s: Session,
        client: C,
        upstream: Result<U, (Outcome, String)>,
        target: Option<&Target>,
        dst: String,
        ip: Option<IpAddr>,
    ) where
        C: AsFd + TryInto<relay_loop::Stream, Error = io::Error>,
        U: TryInto<relay_loop::Stream, Error = io::Error>,
    {
        let progress = Arc::new(relay_loop::Progress::default());
        let inspected = target.and_then(|t| Some((t, protocol::handler(t.protocol)?)));
        let r = if let Some((t, h)) = inspected {
            let to = Destination {
                target: t,
                dst: &dst,
                ip,
            };
            self.relay_inspected(&mut s, h, client, upstream, to, progress)
                .await
        } else {
            let upstream = match upstream {
                Ok(u) => u,
                Err((outcome, cause)) => {
                    reset(&client);
                    return self
                        .finish(s, outcome, Some(format!("upstream {dst}: {cause}")))
                        .await;
                }
            };
            // A session of a protocol the agent inspects, where policy
            // expected opaque bytes, would go unchecked: it is told by its
            // first bytes.
            let unexpected = protocol::Unexpected::decided(&self.policy.load(), &dst);
            let listed = flush::Listed::new(s.id, None, progress.clone());
            let sniff = Some(unexpected.sniff());
            let r = Relayed::from(relay_loop::relay(client, upstream, progress, sniff).await);
            listed.finish(&self.recorder).await;
            if r.sniffed {
                s.protocol = unexpected.protocol.into();
                s.rule = Some(unexpected.decision.rule.to_string());
            }
            r
        };
        s.bytes_up = r.up;
        s.bytes_down = r.down;
        let detail = match (r.sniffed, r.detail) {
            (true, None) => Some(protocol::Unexpected::RELAYED.into()),
            (_, detail) => detail,
        };
        self.finish(s, r.outcome, detail).await;
    }

    /// Relays a connection whose protocol the agent inspects, with
    /// `handler`'s machines between the two sockets. Its statements are
    /// recorded as they complete (by this thread's [`flush::run`], every
    /// [`flush::STATEMENT_FLUSH`]) and whatever is left at the end
    /// ([`flush::Listed::finish`]). The handler opens the session first
    /// when the server cannot be reached or the agent stands in its TLS or
    /// login ([`protocol::Handler::open`]).
    async fn relay_inspected(
        &self,
        s: &mut Session,
        handler: &dyn protocol::Handler,
        client: impl TryInto<relay_loop::Stream, Error = io::Error>,
        upstream: Result<impl TryInto<relay_loop::Stream, Error = io::Error>, (Outcome, String)>,
        to: Destination<'_>,
        progress: Arc<relay_loop::Progress>,
    ) -> Relayed {
        let bell = relay_loop::Bell::new();
        let asking = self.approvals.as_ref().map(|broker| {
            let bell = bell.clone();
            crate::gate::Asking {
                broker: broker.clone(),
                requester: self.requester(s),
                requesters: self.requesters.clone(),
                wake: Arc::new(move || bell.ring()),
            }
        });
        let workload = s.workload.clone().unwrap_or_default();
        let gate = crate::gate::AgentGate::new(
            crate::gate::Parties {
                policy: self.policy.clone(),
                workload: workload.clone(),
                target: to.target.name.clone(),
                masker: self.masker.clone(),
            },
            asking,
        );
        let outbox = Outbox::new(Recording {
            text_limit: self.config.agent.record_text_limit,
            bytes_per_second: self.config.agent.record_bytes_per_second,
        });
        let mut machines = handler.machines(Box::new(gate), outbox.clone());
        let listed = flush::Listed::new(s.id, Some(outbox.clone()), progress.clone());
        let credential = self.config.credential(&workload, &to.target.name);
        let ca = self.ca.as_deref().filter(|_| to.ip.is_some());
        let stands_in = ca.is_some() || credential.is_some() || to.target.tls.is_some();
        let opened = match upstream {
            Ok(u) if !stands_in => match (client.try_into(), u.try_into()) {
                (Ok(c), Ok(u)) => Ok(protocol::Opened {
                    client: c.into(),
                    server: u.into(),
                    keep: None,
                }),
                (Err(e), _) | (_, Err(e)) => Err(io_unopened(e)),
            },
            upstream => match crate::tls::Conn::new(client) {
                Ok(client) => {
                    let o = protocol::Opening {
                        client,
                        upstream: upstream.and_then(|u| {
                            crate::tls::Conn::new(u).map_err(|e| (Outcome::Error, e.to_string()))
                        }),
                        dst: to.dst,
                        ip: to.ip,
                        target: to.target,
                        workload: &workload,
                        ca,
                        credential,
                        machines: &mut *machines,
                        facts: &mut s.facts,
                    };
                    handler.open(o).await
                }
                Err(e) => Err(io_unopened(e)),
            },
        };
        let r = match opened {
            Ok(o) => {
                let end =
                    relay_loop::relay_endpoints(o.client, o.server, machines, progress, Some(bell));
                let r = Relayed::from(end.await);
                drop(o.keep);
                r
            }
            Err(u) => {
                machines.ended();
                Relayed {
                    up: 0,
                    down: 0,
                    outcome: u.outcome,
                    detail: Some(u.why),
                    sniffed: false,
                }
            }
        };
        s.statements = listed.finish(&self.recorder).await;
        s.facts.extend(outbox.take_facts());
        r
    }
}

/// Where an admitted connection goes.
struct Destination<'a> {
    target: &'a Target,
    /// `host:port`, or `unix:path`.
    dst: &'a str,
    /// The address (none: a unix socket).
    ip: Option<IpAddr>,
}

fn io_unopened(e: io::Error) -> protocol::Unopened {
    let (outcome, why) = io_outcome(e);
    protocol::Unopened {
        outcome,
        why: why.unwrap_or_default(),
    }
}

/// Runs an upstream connect for at most `timeout`: the stream, or how the
/// session ends and why.
async fn within<U>(
    timeout: Duration,
    connect: impl std::future::Future<Output = io::Result<U>>,
) -> Result<U, (Outcome, String)> {
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(u)) => Ok(u),
        Ok(Err(e)) => {
            let outcome = if e.kind() == io::ErrorKind::ConnectionRefused {
                Outcome::Refused
            } else {
                Outcome::Error
            };
            Err((outcome, e.to_string()))
        }
        Err(_) => Err((
            Outcome::Error,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

/// Loops on `accept`, handing each connection to a worker, until `stop`
/// turns.
async fn accept_loop<F, Fut>(workers: Arc<Workers>, mut stop: watch::Receiver<bool>, accept: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = io::Result<Accepted>>,
{
    loop {
        tokio::select! {
            r = accept() => match r {
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
}

/// The socket's cookie (`SO_COOKIE`): unique among the sockets of this boot.
fn socket_cookie<S: AsFd>(s: &S) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(2) on a live socket into a u64 whose size it is told.
    let r = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Result of relaying one connection.
pub struct Relayed {
    pub up: u64,
    pub down: u64,
    pub outcome: Outcome,
    pub detail: Option<String>,
    /// An opaque connection turned out to carry a session of a protocol
    /// the agent inspects (see [`protocol::Unexpected`]): relayed, or
    /// refused for it.
    pub sniffed: bool,
}

/// How the relay's end of a connection is recorded.
impl From<End> for Relayed {
    fn from(end: End) -> Relayed {
        let (outcome, detail) = match end.how {
            Ending::Closed => (Outcome::Closed, None),
            Ending::Failed(e) => io_outcome(e),
            Ending::Refused(why) => (Outcome::Denied, Some(why)),
            Ending::Stopped => (Outcome::Interrupted, Some("the relay loop stopped".into())),
        };
        Relayed {
            up: end.up,
            down: end.down,
            outcome,
            detail,
            sniffed: end.sniffed,
        }
    }
}

/// How an I/O error ends a session: a reset, or an error.
pub(crate) fn io_outcome(e: io::Error) -> (Outcome, Option<String>) {
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
    use super::*;

    fn congestion_control(s: &TcpStream) -> String {
        let mut name = [0u8; 16];
        let mut len = name.len() as libc::socklen_t;
        // SAFETY: getsockopt(2) into a live 16-byte buffer whose length it is told.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_CONGESTION,
                name.as_mut_ptr().cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        let name = &name[..len as usize];
        String::from_utf8_lossy(name.split(|&b| b == 0).next().unwrap()).into_owned()
    }

    /// Hops on this host switch to reno; a hop to another host keeps the
    /// node's default.
    #[tokio::test]
    async fn only_local_hops_change_congestion_control() {
        let (a, b) = loopback_pair().await;
        let default = congestion_control(&b);
        local_hop(&b, "10.1.2.3:5432".parse().unwrap());
        assert_eq!(congestion_control(&b), default);
        local_hop(&a, b.local_addr().unwrap());
        assert_eq!(congestion_control(&a), "reno");
    }

    use crate::record::{SessionId, Store};

    /// No metadata for anyone: the pipeline test starts after admission.
    struct NoMeta;

    impl MetaSource for NoMeta {
        fn take(&self, _: u64) -> Option<ConnMeta> {
            None
        }
    }

    /// A proxy (no eBPF: the tests start after admission) for workload
    /// `app` and the `lines` target `lines-db`, deciding by `rules`.
    fn lines_proxy(
        rules: &str,
        recorder: Recorder,
        approvals: Option<Arc<crate::approvals::Broker>>,
    ) -> Proxy {
        let config = "[agent]\ntrust_domain = \"example.org\"\nproxy_port = 15001\n\n\
                      [[workload]]\nname = \"app\"\nmanaged = true\n\n\
                      [[target]]\nname = \"lines-db\"\naddresses = [\"127.0.0.1:1\"]\nprotocol = \"lines\"\n";
        let config = Arc::new(Config::parse(std::path::Path::new("c.toml"), config).unwrap());
        let policy = Policy::from_texts(&[(std::path::Path::new("p.toml"), rules)], None).unwrap();
        Proxy {
            identity: Arc::new(Resolver::new(&config, &[]).unwrap()),
            config,
            policy: Arc::new(ArcSwap::from_pointee(policy)),
            meta: Arc::new(NoMeta),
            recorder,
            ids: Arc::default(),
            masker: Arc::new(crate::mask::Masker::new(b"lines")),
            listening: Vec::new(),
            host: Arc::default(),
            approvals,
            requesters: Arc::default(),
            ca: None,
        }
    }

    /// A protocol is a registry entry. The test protocol `lines` (a config
    /// variant, a wire module and an entry in `protocol::handler`, all
    /// `cfg(test)`) goes through the session pipeline as PostgreSQL does:
    /// its server's absence is told its own way; its statements are decided
    /// through the seam (a denied one never reaches the server), recorded
    /// with their answers, and counted in the session's record. The
    /// pipeline, the flush, the record and the relay do not name it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_protocol_is_a_registry_entry() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rules = "[[rule]]\nid = \"no-writes\"\non = \"statement\"\nworkloads = [\"*\"]\n\
                     targets = [\"*\"]\nclasses = [\"write\"]\naction = \"deny\"\n";
        let dir = std::env::temp_dir().join(format!("icpt-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(crate::record::SledStore::open(&dir).unwrap());
        let (recorder, writer) = Recorder::start(store.clone());
        let proxy = lines_proxy(rules, recorder.clone(), None);
        let config = proxy.config.clone();
        let target = &config.targets[0];
        let session = |id| Session {
            workload: Some("app".into()),
            target: Some(target.name.clone()),
            protocol: target.protocol.to_string(),
            ..Session::new(SessionId(id), "test".into())
        };

        // The server cannot be reached: said the protocol's way.
        let (mut app, client) = loopback_pair().await;
        let refused = Err((Outcome::Refused, "Connection refused".to_owned()));
        let serve = proxy.serve::<_, TcpStream>(
            session(1),
            client,
            refused,
            Some(target),
            "db:1".into(),
            None,
        );
        let (_, told) = tokio::join!(serve, async {
            let mut told = String::new();
            app.read_to_string(&mut told).await.unwrap();
            told
        });
        assert_eq!(
            told,
            "ERR could not connect to server db:1: Connection refused\n"
        );

        // Relayed: decided, answered, recorded.
        let (mut app, client) = loopback_pair().await;
        let (upstream, mut server) = loopback_pair().await;
        let serve = proxy.serve(
            session(2),
            client,
            Ok(upstream),
            Some(target),
            "db:1".into(),
            None,
        );
        let talk = async {
            app.write_all(b"SELECT 1\nDELETE FROM t\nSELECT 2\n")
                .await
                .unwrap();
            let mut got = vec![0u8; 18];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(
                got, b"SELECT 1\nSELECT 2\n",
                "the denied statement stays out"
            );
            server.write_all(b"one\ntwo\n").await.unwrap();
            app.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            server.shutdown().await.unwrap();
            let mut seen = String::new();
            app.read_to_string(&mut seen).await.unwrap();
            seen
        };
        let (_, seen) = tokio::join!(serve, talk);
        assert_eq!(seen, "ERR denied by rule \"no-writes\"\none\ntwo\n");
        drop(proxy);
        drop(recorder);
        writer.join();
        let recorded = store.get(SessionId(2)).unwrap().unwrap();
        assert_eq!(
            (recorded.protocol.as_str(), recorded.statements),
            ("lines", 3)
        );
        assert_eq!(recorded.outcome, Outcome::Closed);
        let statements: Vec<_> = store
            .statements(SessionId(2))
            .unwrap()
            .into_iter()
            .map(|s| {
                let tags: Vec<String> = s.tags.iter().map(|t| t.to_string()).collect();
                (s.text.to_string(), s.decision, tags)
            })
            .collect();
        assert_eq!(
            statements,
            [
                (
                    "SELECT 1".into(),
                    Some(Action::Allow),
                    vec!["one".to_owned()]
                ),
                ("DELETE FROM t".into(), Some(Action::Deny), vec![]),
                (
                    "SELECT 2".into(),
                    Some(Action::Allow),
                    vec!["two".to_owned()]
                ),
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A statement a review rule matches waits, its connection alone,
    /// until a second person approves it; then it goes on as if nothing
    /// happened, recorded under the request that let it through.
    #[tokio::test(flavor = "current_thread")]
    async fn a_review_rule_holds_a_statement_until_approved() {
        use crate::approvals::{Broker, Deciding, Verb};
        use crate::record::approval::{Channel, Person, Status};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rules = "[[rule]]\nid = \"writes-reviewed\"\non = \"statement\"\nworkloads = [\"*\"]\n\
                     targets = [\"*\"]\nclasses = [\"write\"]\naction = \"review\"\n\
                     approvers = [{ groups = [\"dba\"] }]\nhold = \"30s\"\n";
        let dir = std::env::temp_dir().join(format!("icpt-review-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(crate::record::SledStore::open(&dir).unwrap());
        let broker = Broker::open(store.clone(), b"k", None).unwrap();
        let (recorder, writer) = Recorder::start(store.clone());
        let proxy = lines_proxy(rules, recorder.clone(), Some(broker.clone()));
        let config = proxy.config.clone();
        let target = &config.targets[0];
        let s = Session {
            workload: Some("app".into()),
            target: Some(target.name.clone()),
            protocol: target.protocol.to_string(),
            ..Session::new(SessionId(3), "test".into())
        };
        let (mut app, client) = loopback_pair().await;
        let (upstream, mut server) = loopback_pair().await;
        let serve = proxy.serve(s, client, Ok(upstream), Some(target), "db:1".into(), None);
        let talk = async {
            app.write_all(b"DELETE FROM t\nSELECT 1\n").await.unwrap();
            let mut buf = [0u8; 64];
            let early =
                tokio::time::timeout(Duration::from_millis(300), server.read(&mut buf)).await;
            assert!(early.is_err(), "a held statement reached the server");
            let pending: Vec<_> = broker
                .list(0)
                .unwrap()
                .into_iter()
                .filter(|r| r.status == Status::Pending)
                .collect();
            assert_eq!(pending.len(), 1);
            let approver = Person {
                issuer: "https://id.example.org".into(),
                subject: "alice".into(),
                groups: vec!["dba".into()],
            };
            let d = Deciding {
                verb: Verb::Approve,
                person: &approver,
                comment: None,
                channel: Channel {
                    by: "test".into(),
                    peer: "-".into(),
                },
                break_glass: false,
            };
            broker.decide(pending[0].id, d).unwrap();
            let mut got = vec![0u8; 23];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, b"DELETE FROM t\nSELECT 1\n", "released, in order");
            server.write_all(b"deleted\none\n").await.unwrap();
            app.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            server.shutdown().await.unwrap();
            let mut seen = String::new();
            app.read_to_string(&mut seen).await.unwrap();
            (seen, pending[0].id)
        };
        let (_, (seen, id)) = tokio::join!(serve, talk);
        assert_eq!(seen, "deleted\none\n");
        drop(proxy);
        drop(recorder);
        writer.join();
        broker.stop();
        let statements = store.statements(SessionId(3)).unwrap();
        assert_eq!(statements[0].decision, Some(Action::Allow));
        assert_eq!(statements[0].rule.as_deref(), Some("writes-reviewed"));
        assert_eq!(
            statements[0].approval.as_deref(),
            Some(id.to_string().as_str())
        );
        assert_eq!(statements[1].approval, None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
