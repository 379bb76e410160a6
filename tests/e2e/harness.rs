//! Test harness: a real agent process with its own config, pins, cgroups and
//! data directory; real echo servers on loopback; an unmodified Python client
//! run through `interceptor exec`.
//!
//! These tests need root, cgroup2 and eBPF. They fail (never skip) without.

use std::{
    collections::HashSet,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_interceptor");
pub const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/client.py");
pub const POLICIES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");

/// uid and gid of `nobody`: an unprivileged local user.
pub const NOBODY: &str = "65534";

pub fn require_root() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "the end-to-end tests need root (cgroups, eBPF); run them with `cargo xtask test` as root"
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An echo server that remembers the peer address of every connection.
pub struct Echo {
    pub port: u16,
    pub peers: Arc<Mutex<HashSet<SocketAddr>>>,
}

impl Echo {
    /// Listens on 127.0.0.1 and [::1] with the same port.
    pub fn start() -> Echo {
        let peers = Arc::new(Mutex::new(HashSet::new()));
        loop {
            let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = v4.local_addr().unwrap().port();
            let Ok(v6) = TcpListener::bind(("::1", port)) else {
                continue;
            };
            for l in [v4, v6] {
                let peers = peers.clone();
                std::thread::spawn(move || {
                    for c in l.incoming().flatten() {
                        // A connection reset before it was accepted (the
                        // agent refused it) has no peer any more.
                        if let Ok(peer) = c.peer_addr() {
                            peers.lock().unwrap().insert(peer);
                        }
                        std::thread::spawn(move || echo(c));
                    }
                });
            }
            return Echo { port, peers };
        }
    }

    pub fn saw_port(&self, port: u16) -> bool {
        self.peers.lock().unwrap().iter().any(|p| p.port() == port)
    }
}

fn echo(mut c: TcpStream) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = c.shutdown(std::net::Shutdown::Write);
}

pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub proxy_port: u16,
    pub pin_dir: PathBuf,
    pub cgroup_parent: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

/// cgroup2 mount, as the agent finds it.
pub fn cgroup2() -> PathBuf {
    interceptor::cgroup::cgroup2_mount().unwrap()
}

impl Agent {
    /// Writes a config with the given workload/target sections and policy,
    /// and starts the agent.
    pub fn start(name: &str, sections: &str, policy: &str) -> Agent {
        let mut a = Agent::prepare(name, sections, policy);
        a.spawn();
        a
    }

    /// Writes the files without starting the agent.
    pub fn prepare(name: &str, sections: &str, policy: &str) -> Agent {
        require_root();
        let dir =
            std::env::temp_dir().join(format!("icpt-e2e-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let proxy_port = free_port();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/icpt-e2e-{name}"));
        let parent = format!("icpt-e2e-{name}");
        let config = dir.join("interceptor.toml");
        std::fs::write(dir.join("policy.toml"), policy).unwrap();
        std::fs::write(
            &config,
            format!(
                "[agent]\ntrust_domain = \"e2e.test\"\nproxy_port = {proxy_port}\npin_dir = \"{}\"\n\
                 managed_cgroup_parent = \"{parent}\"\npolicies = [\"policy.toml\"]\ndata_dir = \"{}\"\n\
                 unix_dir = \"{}\"\nebpf_log_level = \"debug\"\n\n{sections}",
                pin_dir.display(),
                dir.join("data").display(),
                dir.join("run").display()
            ),
        )
        .unwrap();
        Agent {
            name: name.into(),
            cgroup_parent: cgroup2().join(&parent),
            dir,
            config,
            proxy_port,
            pin_dir,
            child: None,
            log: Arc::default(),
        }
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let mut child = Command::new(BIN)
            .args(["run", "--log-level", "info,interceptor=debug", "--config"])
            .arg(&self.config)
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let log = self.log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("agent ready") {
                    let _ = tx.send(());
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        self.child = Some(child);
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            panic!(
                "agent `{}` did not become ready; log:\n{}",
                self.name,
                self.log()
            );
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGHUP: reload the policy; waits until the agent logs the outcome.
    pub fn reload(&self) {
        let pid = self.child.as_ref().expect("running").id();
        let before = self.log().matches("policy reload").count();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.log().matches("policy reload").count() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "no reload logged:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, no cleanup: the pinned programs stay.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            c.wait().unwrap();
        }
    }

    /// Runs `interceptor ARGS --config <ours>` (the option goes before a `--`).
    pub fn cli(&self, args: &[&str]) -> Output {
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        Command::new(BIN)
            .args(&args[..split])
            .arg("--config")
            .arg(&self.config)
            .args(&args[split..])
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    }

    /// Runs the test client inside `workload` (or outside every workload when
    /// `None`) and parses its JSON report.
    pub fn client(&self, workload: Option<&str>, args: &[&str]) -> Value {
        report(&self.client_output(workload, args), args, workload)
    }

    /// [`Agent::client`] as the unprivileged user `nobody` (uid and gid
    /// 65534, no supplementary groups): for attacks that need no privilege.
    /// Debian's python runs it, reading the client from stdin (nobody may
    /// not read root's interpreters nor the source tree).
    pub fn client_as_nobody(&self, workload: Option<&str>, args: &[&str]) -> Value {
        let mut c = self.run_in(workload, "setpriv");
        c.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
            .args(["/usr/bin/python3", "-"])
            .args(args)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(&std::fs::read(CLIENT).unwrap()).unwrap();
        }
        let v = report(&child.wait_with_output().unwrap(), args, workload);
        assert_eq!(v["uid"], 65534, "not run as nobody: {v}");
        v
    }

    pub fn client_output(&self, workload: Option<&str>, args: &[&str]) -> Output {
        let mut c = self.run_in(workload, "python3");
        c.arg(CLIENT).args(args).output().unwrap()
    }

    /// `program` inside `workload` (through `interceptor exec`), or outside
    /// every workload when `None`.
    pub fn run_in(&self, workload: Option<&str>, program: &str) -> Command {
        match workload {
            Some(w) => {
                let mut c = Command::new(BIN);
                c.args(["exec", "--config"]).arg(&self.config).args([
                    "--workload",
                    w,
                    "--",
                    program,
                ]);
                c
            }
            None => Command::new(program),
        }
    }

    /// `sessions list --json`, waiting until `want(sessions)` holds (records
    /// are batched, so they land a little after the connection ends).
    pub fn sessions_until(&self, what: &str, want: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let s = self.sessions();
            if want(&s) {
                return s;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for sessions: {what}; have:\n{}\nagent log:\n{}",
                    serde_json::to_string_pretty(&s).unwrap(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn sessions(&self) -> Vec<Value> {
        let out = self.cli(&["sessions", "list", "--json"]);
        assert!(
            out.status.success(),
            "sessions list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
    }

    pub fn detach(&mut self) -> Output {
        self.stop();
        self.cli(&["detach"])
    }
}

/// The test client's JSON report, from a run that must have succeeded.
fn report(out: &Output, args: &[&str], workload: Option<&str>) -> Value {
    assert!(
        out.status.success(),
        "client {args:?} in {workload:?} failed: {}\nstdout: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let _ = self.cli(&["detach"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Config sections: one managed workload `app` and an `echo` target on both
/// loopback addresses, plus any `extra` sections.
pub fn app_and_echo(echo_port: u16, extra: &str) -> String {
    format!(
        "[[workload]]\nname = \"app\"\nmanaged = true\n\n[[target]]\nname = \"echo\"\n\
         addresses = [\"127.0.0.1:{echo_port}\", \"[::1]:{echo_port}\"]\n\n{extra}"
    )
}

/// Policy: `app` may reach `echo`; everything else is denied.
pub const ALLOW_APP_ECHO: &str = r#"
[defaults]
connect = "deny"
unmatched_destination = "deny"

[[rule]]
id = "app-to-echo"
workloads = ["app"]
targets = ["echo"]
action = "allow"
"#;

pub use crate::pg::test_certificate;
