//! Streaming to SIEMs, losing nothing: a real rsyslog (Debian's) over TCP
//! and over TLS, an OTLP/HTTP receiver that decodes the real protobuf
//! schema (Python's opentelemetry-proto), and a file rotated by size; all
//! receivers stopped for 30 s under pgbench load, and the agent SIGKILLed
//! while it streams. Every event of the log arrives, at least once, and
//! within a session in order.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use super::*;

/// An rsyslogd of its own, receiving RFC 5424 over TCP (TLS with `tls`)
/// and writing each message's structured data and text to `out`.
struct Rsyslog {
    conf: PathBuf,
    out: PathBuf,
    child: Option<Child>,
    port: u16,
}

impl Rsyslog {
    fn new(dir: &Path, name: &str, tls: Option<&(PathBuf, PathBuf, PathBuf)>) -> Rsyslog {
        let dir = dir.join(name);
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let port = free_port();
        let out = dir.join("out.log");
        let driver = match tls {
            None => String::new(),
            Some((ca, cert, key)) => format!(
                " defaultNetstreamDriver=\"gtls\" defaultNetstreamDriverCAFile=\"{}\" \
                 defaultNetstreamDriverCertFile=\"{}\" defaultNetstreamDriverKeyFile=\"{}\"",
                ca.display(),
                cert.display(),
                key.display()
            ),
        };
        let module = if tls.is_some() {
            "module(load=\"imtcp\" streamDriver.name=\"gtls\" streamDriver.mode=\"1\" streamDriver.authMode=\"anon\")"
        } else {
            "module(load=\"imtcp\")"
        };
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                "global(workDirectory=\"{}\" maxMessageSize=\"256k\"{driver})\n\
                 main_queue(queue.timeoutShutdown=\"20000\")\n\
                 {module}\n\
                 template(name=\"ev\" type=\"string\" string=\"%structured-data%\\t%msg%\\n\")\n\
                 input(type=\"imtcp\" port=\"{port}\")\n\
                 action(type=\"omfile\" file=\"{}\" template=\"ev\")\n",
                dir.join("work").display(),
                out.display()
            ),
        )
        .unwrap();
        let mut r = Rsyslog {
            conf,
            out,
            child: None,
            port,
        };
        r.start();
        r
    }

    fn start(&mut self) {
        let pid = self.conf.with_extension("pid");
        let _ = std::fs::remove_file(&pid);
        let child = Command::new("/usr/sbin/rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&self.conf)
            .arg("-i")
            .arg(&pid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting rsyslogd (cargo xtask setup installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "rsyslogd did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, as a service manager stops it.
    fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// Frozen (SIGSTOP) for `frozen`, its kernel still taking bytes, then
    /// SIGKILLed: what it had taken and not written out is lost with it.
    fn freeze_then_kill(&mut self, frozen: Duration) {
        if let Some(c) = &self.child {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        }
        std::thread::sleep(frozen);
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }

    fn signal(&mut self, signal: nix::sys::signal::Signal) {
        if let Some(mut c) = self.child.take() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), signal).unwrap();
            c.wait().unwrap();
        }
    }

    /// (seq, index, session) of each message received, in order.
    fn received(&self) -> Vec<(u64, u64, String)> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .map(|l| {
                let sd = l.split('\t').next().unwrap();
                let field = |name: &str| {
                    let at = sd
                        .find(&format!("{name}=\""))
                        .unwrap_or_else(|| panic!("{name} in {l}"));
                    let rest = &sd[at + name.len() + 2..];
                    rest[..rest.find('"').unwrap()].to_owned()
                };
                let json: serde_json::Value =
                    serde_json::from_str(l.split_once('\t').unwrap().1.trim())
                        .unwrap_or_else(|e| panic!("{e}: {l}"));
                assert_eq!(
                    json["metadata"]["uid"],
                    format!("{}.{}", field("seq"), field("index"))
                );
                (
                    field("seq").parse().unwrap(),
                    field("index").parse().unwrap(),
                    field("session"),
                )
            })
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The OTLP/HTTP receiver (tests/e2e/otlp_receiver.py).
struct Otlp {
    port: u16,
    out: PathBuf,
    child: Option<Child>,
}

impl Otlp {
    fn new(dir: &Path) -> Otlp {
        let mut o = Otlp {
            port: free_port(),
            out: dir.join("otlp.jsonl"),
            child: None,
        };
        o.start();
        o
    }

    fn start(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/otlp_receiver.py");
        self.child = Some(
            Command::new("python3")
                .arg(script)
                .arg(self.port.to_string())
                .arg(&self.out)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the OTLP receiver did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn received(&self) -> Vec<(u64, u64, String)> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["service"], "interceptor");
                assert_eq!(v["scope"], "interceptor");
                assert_eq!(v["uid"], format!("{}.{}", v["seq"], v["index"]));
                assert!(v["time_unix_nano"].as_u64().unwrap() > 1_700_000_000_000_000_000);
                (
                    v["seq"].as_u64().unwrap(),
                    v["index"].as_u64().unwrap(),
                    s(&v["session"]).to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for Otlp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every event of the log in `data`, as (seq, index, session), in order.
fn expected(data: &Path) -> Vec<(u64, u64, String)> {
    use interceptor::record::{log, ocsf, segments::Frames, SessionId};
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for f in Frames::all(&data.join("log")).unwrap() {
        let f = f.unwrap();
        let e = log::parse(&f.entry).unwrap();
        buf.clear();
        let n = ocsf::write_events(&mut buf, f.seq, &e).unwrap();
        for i in 0..n {
            out.push((f.seq, i, SessionId(e.header.session).to_string()));
        }
    }
    out
}

/// Checks `got` holds every event of `want`, and that within a session the
/// first time each event came is in the log's order.
fn complete(name: &str, want: &[(u64, u64, String)], got: &[(u64, u64, String)]) {
    let have: HashSet<(u64, u64)> = got.iter().map(|(s, i, _)| (*s, *i)).collect();
    let missing: Vec<_> = want
        .iter()
        .filter(|(s, i, _)| !have.contains(&(*s, *i)))
        .collect();
    assert!(
        missing.is_empty(),
        "{name}: {} of {} events missing, the first {:?}",
        missing.len(),
        want.len(),
        &missing[..missing.len().min(5)]
    );
    let mut seen = HashSet::new();
    let mut last: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (seq, index, session) in got {
        if !seen.insert((*seq, *index)) {
            continue;
        }
        if session == "0000000000000000" {
            continue;
        }
        if let Some(before) = last.insert(session, (*seq, *index)) {
            assert!(
                before < (*seq, *index),
                "{name}: session {session}: {before:?} came before ({seq}, {index}) the first time"
            );
        }
    }
}

fn status(agent: &Agent) -> (bool, serde_json::Value) {
    let out = agent.cli(&["status", "--json"]);
    (
        out.status.success(),
        serde_json::from_slice(&out.stdout).unwrap_or_default(),
    )
}

/// Waits until every sink has delivered everything written.
fn caught_up(agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (ok, v) = status(agent);
        if ok
            && v["sinks"]
                .as_array()
                .is_some_and(|l| l.iter().all(|s| s["behind"] == 0 && s["up"] == true))
        {
            return;
        }
        assert!(Instant::now() < deadline, "sinks did not catch up: {v:#}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn sinks_deliver_every_event_across_receiver_outages_and_an_agent_killed_mid_stream() {
    let (dir, db, mut agent) = postgres_and_agent("sinks");
    let certs = test_certificate(&dir, "syslog");
    let mut plain = Rsyslog::new(&dir, "plain", None);
    let mut tls = Rsyslog::new(&dir, "tls", Some(&certs));
    let mut otlp = Otlp::new(&dir);
    let file = dir.join("events.jsonl");
    let sinks = format!(
        "[[export.sink]]\nname = \"siem\"\nkind = \"syslog\"\naddress = \"127.0.0.1:{}\"\n\n\
         [[export.sink]]\nname = \"siem-tls\"\nkind = \"syslog\"\naddress = \"127.0.0.1:{}\"\ntls = true\nca_file = \"{}\"\n\n\
         [[export.sink]]\nname = \"collector\"\nkind = \"otlp\"\nendpoint = \"http://127.0.0.1:{}/v1/logs\"\n\n\
         [[export.sink]]\nname = \"archive\"\nkind = \"file\"\npath = \"{}\"\nmax_size = \"1MiB\"\nkeep = 1000\n",
        plain.port,
        tls.port,
        certs.0.display(),
        otlp.port,
        file.display()
    );
    agent.stop();
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(&agent.config, format!("{text}\n{sinks}")).unwrap();
    agent.spawn();
    pgbench_init(&db.conninfo());
    let conninfo = db.conninfo();
    let bench = |agent: &Agent, secs: &str| {
        pg_tool_command(
            agent,
            "pgbench",
            &["-n", "-S", "-c", "2", "-T", secs, &conninfo],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
    };

    // Under load, every receiver stopped for 30 s, then started again:
    // one rsyslog hangs, then crashes (what its kernel took for it in that
    // second is lost with it: those events must come again), the other is
    // stopped.
    let mut load = bench(&agent, "50");
    std::thread::sleep(Duration::from_secs(5));
    plain.freeze_then_kill(Duration::from_secs(1));
    tls.stop();
    otlp.stop();
    let down_at = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let (ok, v) = status(&agent);
    assert!(
        !ok,
        "status says all is well with every receiver down: {v:#}"
    );
    let sinks = v["sinks"].as_array().unwrap();
    for name in ["siem", "siem-tls", "collector"] {
        let s = sinks.iter().find(|s| s["name"] == name).unwrap();
        assert_eq!(s["up"], false, "{name}: {s}");
        assert!(s["behind"].as_u64().unwrap() > 0, "{name}: {s}");
    }
    assert!(
        agent.log().contains("the sink's receiver is down"),
        "{}",
        agent.log()
    );
    std::thread::sleep(Duration::from_secs(30).saturating_sub(down_at.elapsed()));
    plain.start();
    tls.start();
    otlp.start();
    assert!(
        load.wait().unwrap().success(),
        "pgbench through the agent failed"
    );
    caught_up(&agent);

    // The agent killed while it streams, and started again.
    let mut load = bench(&agent, "8");
    std::thread::sleep(Duration::from_secs(3));
    agent.kill9();
    let _ = load.wait();
    agent.spawn();
    let mut load = bench(&agent, "3");
    assert!(load.wait().unwrap().success());
    caught_up(&agent);
    agent.stop();

    let want = expected(&agent.dir.join("data"));
    assert!(
        want.len() > 10_000,
        "only {} events: too little load",
        want.len()
    );
    complete("syslog", &want, &plain.received());
    complete("syslog over TLS", &want, &tls.received());
    complete("otlp", &want, &otlp.received());
    let mut rotated = Vec::new();
    let mut files = vec![file.clone()];
    for n in 1.. {
        let p = PathBuf::from(format!("{}.{n}", file.display()));
        if !p.exists() {
            break;
        }
        files.push(p);
    }
    assert!(files.len() > 2, "the file sink did not rotate: {files:?}");
    // Oldest first: the highest number.
    for p in files.iter().rev() {
        for l in std::fs::read_to_string(p).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let um = &v["unmapped"];
            let session = v["metadata"]["correlation_uid"]
                .as_str()
                .unwrap_or("0000000000000000");
            rotated.push((
                um["seq"].as_u64().unwrap(),
                um["index"].as_u64().unwrap(),
                session.to_owned(),
            ));
        }
    }
    complete("file", &want, &rotated);
    drop(agent);
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
}
