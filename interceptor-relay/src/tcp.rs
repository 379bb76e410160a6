//! Opaque TCP (or any stream): bytes both ways, copied through the loop's
//! buffer while messages are small, spliced through a pipe once a read
//! fills it.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use crate::{
    submit_here,
    sys::{moved, ready, recv, reset, send, shutdown_write, splice},
    Done, End, Ending, Event, Pumped, Stream, Traffic,
};

/// Pipe capacity asked for (the kernel may grant less).
const PIPE_SIZE: usize = 1 << 20;

/// Bytes a connection has relayed so far: written by its relay loop, read
/// by whoever shows or records them while the connection lasts.
#[derive(Debug, Default)]
pub struct Progress {
    up: AtomicU64,
    down: AtomicU64,
}

impl Progress {
    pub fn set(&self, up: u64, down: u64) {
        self.up.store(up, Ordering::Relaxed);
        self.down.store(down, Ordering::Relaxed);
    }

    pub fn get(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

/// What an opaque connection does when the client's first bytes might open
/// a session of a protocol the caller must know of: nothing the client
/// sends goes upstream until `opens` tells.
#[derive(Debug, Clone)]
pub struct Sniff {
    /// Whether these first bytes (at most eight) open such a session;
    /// `None`: too few to tell.
    pub opens: fn(&[u8]) -> Option<bool>,
    /// If they do: `None` relays it (said in [`End::sniffed`]); `Some(why)`
    /// ends the connection with both sides reset, refused for that reason.
    pub refuse: Option<String>,
}

/// Relays `client` and `upstream` as opaque bytes on this thread's relay
/// loops until both directions end, counting the bytes in `progress` as
/// they go, and looking at the client's first bytes as `sniff` says.
pub async fn relay(
    client: impl TryInto<Stream, Error = io::Error>,
    upstream: impl TryInto<Stream, Error = io::Error>,
    progress: Arc<Progress>,
    sniff: Option<Sniff>,
) -> End {
    let (client, upstream) = match (client.try_into(), upstream.try_into()) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => return End::at_once(Ending::Failed(e)),
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
    rx.await.unwrap_or_else(|_| End::at_once(Ending::Stopped))
}

/// An opaque TCP connection: bytes both ways, counted.
pub(crate) struct Tcp {
    client: Stream,
    upstream: Stream,
    up: Direction,
    down: Direction,
    done: Option<Done>,
    /// Where the bytes moved so far are shown while the connection lasts.
    progress: Option<Arc<Progress>>,
    /// Until the client's first bytes tell whether they open a session of
    /// the protocol sniffed for: what to do if they do.
    sniff: Option<Sniff>,
    /// They did, and the connection goes on.
    sniffed: bool,
}

impl Tcp {
    pub(crate) fn new(client: impl Into<Stream>, upstream: impl Into<Stream>, done: Done) -> Tcp {
        Tcp {
            client: client.into(),
            upstream: upstream.into(),
            up: Direction::default(),
            down: Direction::default(),
            done: Some(done),
            progress: None,
            sniff: None,
            sniffed: false,
        }
    }

    /// Looks at what the client has sent so far without taking it: whether
    /// the up direction may run (`Ok(true)`). Ends sniffing once the bytes
    /// tell (or the client can send no more); `Err(Some(why))` when they
    /// open a session that is to be refused, `Err(None)` with the
    /// socket's error in `failed` (a peek takes a socket error away from the
    /// read that would otherwise meet it).
    fn sniffed(
        &mut self,
        client_ended: bool,
        failed: &mut Option<io::Error>,
    ) -> Result<bool, Option<String>> {
        let Some(opens) = self.sniff.as_ref().map(|s| s.opens) else {
            return Ok(true);
        };
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
        let told = match opens(&first[..n as usize]) {
            // An end before eight bytes: no session can follow.
            None if n == 0 || client_ended => false,
            None => return Ok(false),
            Some(told) => told,
        };
        let sniff = self.sniff.take();
        if told {
            self.sniffed = true;
            if let Some(why) = sniff.and_then(|s| s.refuse) {
                return Err(Some(why));
            }
        }
        Ok(true)
    }

    /// Reports the end; on an error both sides are reset.
    fn end(&mut self, result: io::Result<()>) -> Pumped {
        let how = match result {
            Ok(()) => Ending::Closed,
            Err(e) => {
                reset(&self.client);
                reset(&self.upstream);
                Ending::Failed(e)
            }
        };
        self.report(how)
    }

    fn report(&mut self, how: Ending) -> Pumped {
        if let Some(done) = self.done.take() {
            done(End {
                up: self.up.total,
                down: self.down.total,
                how,
                sniffed: self.sniffed,
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
                    return self.report(Ending::Refused(why));
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
pub(crate) struct Direction {
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

#[cfg(test)]
mod tests {
    //! The relay against real loopback sockets, without eBPF.
    use super::*;
    use crate::{loopback_pair as pair, RelayLoop, Tuning};
    use std::{
        io::Write,
        net::TcpStream,
        sync::mpsc,
        time::{Duration, Instant},
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sets a socket's buffer size (`SO_SNDBUF` or `SO_RCVBUF`).
    fn buffer(s: &impl AsRawFd, option: libc::c_int, bytes: libc::c_int) {
        // SAFETY: setsockopt(2) on a live socket, reading a c_int.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
    }

    /// A sniffer that never recognises anything the tests send: the bytes
    /// it looks at still go through, in order.
    fn note() -> Option<Sniff> {
        Some(Sniff {
            opens: |first| (first.len() >= 8).then_some(false),
            refuse: None,
        })
    }

    fn closed(r: &End) -> bool {
        matches!(r.how, Ending::Closed)
    }

    fn failure(r: &End) -> String {
        match &r.how {
            Ending::Failed(e) => e.to_string(),
            other => panic!("not failed: {other:?}"),
        }
    }

    #[tokio::test]
    async fn half_close_travels_and_the_reverse_direction_keeps_flowing() {
        let (mut app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let relay = tokio::spawn(relay(proxy_client, proxy_upstream, Arc::default(), note()));
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
        assert!((r.up, r.down) == (7, 11) && closed(&r), "{r:?}");
    }

    #[tokio::test]
    async fn bytes_and_the_end_arriving_together_are_both_relayed() {
        // The end queued right behind the bytes brings no event of its own:
        // the relay must not take the short read of the bytes as the last.
        for round in 0..200 {
            let (mut app, proxy_client) = pair().await;
            let (proxy_upstream, mut server) = pair().await;
            let relay = tokio::spawn(relay(proxy_client, proxy_upstream, Arc::default(), note()));
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
        let relay = tokio::spawn(relay(proxy_client, proxy_upstream, Arc::default(), note()));
        crate::sys::reset(&app);
        drop(app);
        let r = relay.await.unwrap();
        let kind = match &r.how {
            Ending::Failed(e) => e.kind(),
            other => panic!("not failed: {other:?}"),
        };
        assert!(
            matches!(
                kind,
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ),
            "{r:?}"
        );
        let mut buf = [0u8; 8];
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn bulk_switches_to_splice_and_arrives_intact() {
        let (mut app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let relay = tokio::spawn(relay(proxy_client, proxy_upstream, Arc::default(), note()));
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
        assert!(
            (r.up, r.down) == (data.len() as u64, 2) && closed(&r),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_slow_reader_holds_the_writer_back_and_loses_nothing() {
        let (mut app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let relay = tokio::spawn(relay(proxy_client, proxy_upstream, Arc::default(), note()));
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
        let relay = tokio::spawn(relay(proxy_client, proxy_upstream, Arc::default(), note()));
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
        let (mut app, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        // Small buffers toward the server, so that it is full after a few
        // small messages and the relay holds bytes for it.
        buffer(&proxy_upstream, libc::SO_SNDBUF, 4096);
        buffer(&server, libc::SO_RCVBUF, 4096);
        let relay = tokio::spawn(relay(proxy_client, proxy_upstream, Arc::default(), note()));
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
        assert!((r.up, r.down) == (4, 0) && closed(&r), "{r:?}");
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
        assert!(failure(&r).contains("half closed for 1 s"), "{r:?}");
        let r = idle.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(failure(&r).contains("idle for 2 s"), "{r:?}");
        assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
        let e = std::io::Read::read(&mut idle_server, &mut got).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        // 3 s in, talking every 0.3 s: still open.
        assert!(talking.try_recv().is_err(), "a live connection was ended");
        drop((talker, talker_server));
        let r = talking.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(closed(&r), "{r:?}");
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
