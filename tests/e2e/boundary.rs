//! The boundary as an unprivileged local user attacks it: the proxy's
//! address, stale connection metadata, descriptors handed in from outside.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::harness::*;

/// A listener bound by `nobody` on `host:port`, recording what it accepts.
struct Squatter {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Squatter {
    fn start(host: &str, port: u16) -> Squatter {
        let mut child = Command::new("setpriv")
            .args([
                "--reuid",
                NOBODY,
                "--regid",
                NOBODY,
                "--clear-groups",
                // Debian's (`cargo xtask setup` installs it): nobody may not
                // run root's own interpreters.
                "/usr/bin/python3",
                "-",
                "squat",
                host,
                &port.to_string(),
            ])
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("setpriv (util-linux) runs the squatter as nobody");
        // The client's source through stdin: nobody may not read our tree.
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(include_bytes!("client.py"))
            .expect("squatter script");
        drop(stdin);
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = lines.clone();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = tx.send(line.clone());
                }
                seen.lock().unwrap().push(line);
            }
        });
        let ready = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("the squatter could not listen on {host}:{port}"));
        assert!(ready.contains(&format!("\"uid\": {NOBODY}")), "{ready}");
        Squatter { child, lines }
    }

    fn accepted(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("accepted"))
            .cloned()
            .collect()
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Hole 1: the proxy's address belongs to the agent even when it is down.
/// `nobody` binds it before the agent starts, while it runs and after it was
/// killed: no workload connect ever reaches the squatter, connects fail
/// while the agent is down, and the agent starts regardless.
#[test]
fn nobody_can_answer_for_the_agent_on_its_address() {
    let echo = Echo::start();
    let mut agent = Agent::prepare("squat", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let port = echo.port.to_string();
    let proxy = agent.proxy_port;
    // Squatting before the first start: the agent starts anyway.
    let v4 = Squatter::start("127.0.0.1", proxy);
    let v6 = Squatter::start("::1", proxy);
    agent.spawn();
    let through = agent.client(Some("app"), &["echo", "127.0.0.1", &port]);
    assert_eq!(through["received_sha256"], through["sent_sha256"]);
    let through6 = agent.client(Some("app"), &["echo", "::1", &port]);
    assert_eq!(through6["received_sha256"], through6["sent_sha256"]);
    // A host process aimed at the proxy address meets the agent, not the
    // squatter, and is refused there.
    let outside = agent.client(None, &["connect", "127.0.0.1", &proxy.to_string()]);
    assert_ne!(outside["first_read"], 6, "{outside}");
    agent.sessions_until("the host process refused", |s| {
        s.iter().any(|x| x["rule"] == "proxy.no-metadata")
    });

    agent.kill9();
    let peers = echo.peers.lock().unwrap().len();
    for host in ["127.0.0.1", "::1"] {
        let down = agent.client(Some("app"), &["connect", host, &port]);
        assert_eq!(down["connected"], false, "connect went through: {down}");
        assert_eq!(down["error"], "ConnectionRefusedError", "{down}");
    }
    assert_eq!(
        echo.peers.lock().unwrap().len(),
        peers,
        "a connect went direct"
    );

    // Restarted with the squatters still bound: it starts and serves.
    agent.spawn();
    let again = agent.client(Some("app"), &["echo", "127.0.0.1", &port]);
    assert_eq!(again["received_sha256"], again["sent_sha256"]);
    agent.sessions_until("the session after restart", |s| {
        s.iter()
            .any(|x| x["pid"] == again["pid"] && x["outcome"] == "closed")
    });
    assert!(
        v4.accepted().is_empty() && v6.accepted().is_empty(),
        "the squatter received connections: {:?} {:?}",
        v4.accepted(),
        v6.accepted()
    );
}

/// Hole 5: metadata lives as long as its socket. A workload connects while
/// the agent is down (refused); after a restart, a host process that binds
/// the same source port and connects to the proxy address is not taken for
/// the workload.
#[test]
fn metadata_of_a_closed_socket_is_never_given_to_another() {
    let echo = Echo::start();
    let mut agent = Agent::start("stale", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let proxy = agent.proxy_port.to_string();
    agent.kill9();
    let src = free_port().to_string();
    let down = agent.client_as_nobody(
        Some("app"),
        &["connect", "127.0.0.1", &echo.port.to_string(), &src],
    );
    assert_eq!(down["error"], "ConnectionRefusedError", "{down}");

    agent.spawn();
    let host = agent.client_as_nobody(None, &["connect", "127.0.0.1", &proxy, &src]);
    assert_ne!(host["first_read"], 6, "relayed: {host}");
    let sessions = agent.sessions_until("the host process's session", |s| {
        s.iter().any(|x| x["outcome"] == "refused")
    });
    let x = sessions.iter().find(|x| x["outcome"] == "refused").unwrap();
    assert_eq!(x["rule"], "proxy.no-metadata", "{x:#}");
    assert_eq!(x["workload"], serde_json::Value::Null, "{x:#}");
    assert!(
        sessions.iter().all(|x| x["workload"] != "app"),
        "a host process was recorded as the workload: {sessions:#?}"
    );
}

/// Hole 4: a socket made outside the workload's cgroup connects without
/// interception. `interceptor exec` passes on no inherited descriptor but
/// stdio unless `--keep-fds` names it, and then warns that it is a socket.
#[test]
fn exec_passes_on_no_socket_made_outside_unless_asked() {
    let echo = Echo::start();
    let agent = Agent::start("fds", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let port = echo.port.to_string();
    // The parent makes a TCP socket outside every workload and leaves it
    // inheritable (descriptor number printed by the child as FD).
    let run = |keep: bool| -> (serde_json::Value, String) {
        let script = r#"
import os, socket, subprocess, sys
s = socket.socket()
os.set_inheritable(s.fileno(), True)
fd = str(s.fileno())
args = sys.argv[1:]
args = [fd if a == "FD" else a for a in args]
r = subprocess.run(args, pass_fds=[s.fileno()], capture_output=True, text=True)
sys.stdout.write(r.stdout)
sys.stderr.write(r.stderr)
sys.exit(r.returncode)
"#;
        let mut args: Vec<String> = vec![
            "-c".into(),
            script.into(),
            BIN.into(),
            "exec".into(),
            "--config".into(),
            agent.config.display().to_string(),
            "--workload".into(),
            "app".into(),
        ];
        if keep {
            args.extend(["--keep-fds".into(), "FD".into()]);
        }
        args.extend(
            [
                "--",
                "python3",
                CLIENT,
                "fdconnect",
                "127.0.0.1",
                &port,
                "FD",
            ]
            .map(String::from),
        );
        let out = Command::new("python3").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        (serde_json::from_slice(&out.stdout).unwrap(), stderr)
    };
    let (closed, _) = run(false);
    assert_eq!(closed["connected"], false, "{closed}");
    assert_eq!(
        closed["errno"], 9,
        "the inherited socket was passed on: {closed}"
    );

    // Asked for, it is passed on, and its connect goes direct: which is why
    // exec warns.
    let (kept, stderr) = run(true);
    assert_eq!(kept["connected"], true, "{kept}");
    assert!(
        stderr.contains("is a socket made outside workload `app`"),
        "{stderr}"
    );
    assert!(echo.saw_port(kept["local_port"].as_u64().unwrap() as u16));
    // --keep-fds of a descriptor that is not open is an error.
    let out = agent.cli(&[
        "exec",
        "--workload",
        "app",
        "--keep-fds",
        "77",
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("descriptor 77 is not open"));
}

/// Hole 7: a data directory made beforehand by another user is refused
/// (they could have put records or a store of their own in it); one of the
/// agent's own that others may enter is narrowed to 0700, and the log says so.
#[test]
fn a_data_directory_of_another_user_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut agent = Agent::prepare("datadir", &app_and_echo(free_port(), ""), ALLOW_APP_ECHO);
    let data = agent.dir.join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    let out = agent.cli(&["run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("refusing data directory") && err.contains("uid 65534"),
        "{err}"
    );
    assert!(!agent.pin_dir.exists(), "attached before refusing: {err}");

    std::os::unix::fs::chown(&data, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    agent.spawn();
    assert!(agent.log().contains("narrowed to 700"), "{}", agent.log());
    assert_eq!(std::fs::metadata(&data).unwrap().mode() & 0o777, 0o700);
}

/// Hole 2: a PostgreSQL target named by 127.0.0.1 is the same target on
/// every local address that reaches its server (here one listening on every
/// address): 127.0.0.2, 0.0.0.0, `::`, `::1` and the host's own addresses.
/// Whether the agent intercepts every connect (and allows unmatched
/// destinations) or only its targets, each of them is checked and recorded
/// as the target: a write is refused there as on 127.0.0.1.
#[test]
fn every_local_address_of_a_local_target_is_that_target() {
    let dir = std::env::temp_dir().join(format!("icpt-e2e-pgserver-local-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let db = crate::pg::Postgres::start_on(&dir, "*").expect("starting PostgreSQL");
    crate::enforcement::direct(&db, "CREATE TABLE t (x int)");
    let sections = format!(
        "[[workload]]\nname = \"app\"\nmanaged = true\n\n[[target]]\nname = \"db\"\n\
         addresses = [\"127.0.0.1:{}\"]\nprotocol = \"postgres\"\n",
        db.port
    );
    let policy = r#"
[defaults]
connect = "deny"
unmatched_destination = "allow"

[[rule]]
id = "app-db"
workloads = ["app"]
targets = ["db"]
action = "allow"

[[rule]]
id = "no-writes"
on = "statement"
workloads = ["app"]
targets = ["db"]
classes = ["write"]
action = "deny"
"#;
    let host = interceptor::local::HostAddrs::read().unwrap().get();
    let mut addresses = vec!["127.0.0.2", "0.0.0.0", "::", "::1"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    addresses.extend(
        host.iter()
            .filter(|a| {
                !a.is_loopback()
                    && !matches!(a, std::net::IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
            })
            .map(|a| a.to_string()),
    );
    eprintln!("local addresses tried: {addresses:?}");
    for intercept in ["all", "targets"] {
        let mut agent = Agent::prepare(&format!("local-{intercept}"), &sections, policy);
        let text = std::fs::read_to_string(&agent.config).unwrap();
        std::fs::write(
            &agent.config,
            text.replace(
                "[agent]\n",
                &format!("[agent]\nintercept = \"{intercept}\"\n"),
            ),
        )
        .unwrap();
        agent.spawn();
        for a in &addresses {
            let conn = db
                .conninfo()
                .replace("host=127.0.0.1", &format!("host={a}"));
            let read = crate::psql_tuples(&agent, &conn, "SELECT count(*) FROM t");
            assert!(
                read.status.success(),
                "{intercept}, {a}: {}",
                String::from_utf8_lossy(&read.stderr)
            );
            let write = crate::psql_tuples(&agent, &conn, "INSERT INTO t VALUES (1)");
            let err = String::from_utf8_lossy(&write.stderr);
            assert!(
                !write.status.success() && err.contains("no-writes"),
                "{intercept}: a write through {a} was not refused: {err}"
            );
        }
        let want = addresses.len() * 2;
        let sessions = agent.sessions_until(&format!("{want} sessions"), |s| {
            s.iter().filter(|x| x["outcome"] == "closed").count() >= want
        });
        for x in &sessions {
            assert_eq!(x["target"], "db", "{intercept}: {x:#}");
            assert_eq!(x["protocol"], "postgres", "{intercept}: {x:#}");
        }
    }
    assert_eq!(
        crate::enforcement::direct(&db, "SELECT count(*) FROM t"),
        "0"
    );
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Hole 2, second half: an opaque connection that opens a PostgreSQL
/// session is told by its first bytes, however they are split, before any
/// of them goes upstream; it is refused (`defaults.unknown_postgres`) and
/// recorded as PostgreSQL, unless policy allows such sessions. Other bytes
/// are relayed as ever.
#[test]
fn postgres_on_an_opaque_destination_is_recognised_and_refused() {
    let dir = std::env::temp_dir().join(format!("icpt-e2e-pgserver-opaque-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let db = crate::pg::Postgres::start(&dir).expect("starting PostgreSQL");
    let echo = Echo::start();
    // `db` is declared opaque (protocol tcp, the default).
    let sections = format!(
        "{}\n[[target]]\nname = \"db\"\naddresses = [\"127.0.0.1:{}\"]\n",
        app_and_echo(echo.port, ""),
        db.port
    );
    let policy = |unknown: &str| {
        format!(
            "{}\n[[rule]]\nid = \"app-db\"\nworkloads = [\"app\"]\ntargets = [\"db\"]\naction = \"allow\"\n",
            ALLOW_APP_ECHO.replace(
                "[defaults]\n",
                &format!("[defaults]\nunknown_postgres = \"{unknown}\"\n")
            )
        )
    };
    let mut agent = Agent::start("opaque", &sections, &policy("deny"));
    let port = echo.port.to_string();
    let ssl_request = "0000000804d2162f";
    for (how, hex) in [
        ("whole", ssl_request.to_string()),
        ("split", "0000,0008,04,d2162f".to_string()),
        ("startup", "000000090003000000".to_string()),
    ] {
        let r = agent.client_as_nobody(Some("app"), &["raw", "127.0.0.1", &port, &hex]);
        assert_eq!(r["received"], "", "{how}: relayed: {r}");
    }
    // Other first bytes go through, even one that starts as a startup would.
    for hex in ["474554202f20485454502f312e310d0a", "00016869"] {
        let r = agent.client(
            Some("app"),
            &["raw", "127.0.0.1", &port, &format!("{hex},")],
        );
        assert_eq!(r["received"], hex, "{r}");
    }
    let conn = db.conninfo();
    let psql = crate::psql_tuples(&agent, &conn, "SELECT 1");
    assert!(!psql.status.success(), "psql got through an opaque target");
    let sessions = agent.sessions_until("four refused PostgreSQL sessions", |s| {
        s.iter()
            .filter(|x| x["rule"] == "defaults.unknown_postgres")
            .count()
            >= 4
    });
    for x in sessions
        .iter()
        .filter(|x| x["rule"] == "defaults.unknown_postgres")
    {
        assert_eq!(x["outcome"], "denied", "{x:#}");
        assert_eq!(x["protocol"], "postgres", "{x:#}");
        assert_eq!(x["bytes_up"], 0, "bytes went upstream: {x:#}");
    }

    // Allowed by policy: relayed, and still recorded as PostgreSQL.
    agent.stop();
    std::fs::write(agent.dir.join("policy.toml"), policy("allow")).unwrap();
    agent.spawn();
    let psql = crate::psql_tuples(&agent, &conn, "SELECT 41 + 1");
    assert!(
        psql.status.success(),
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&psql.stdout).trim(), "42");
    let sessions = agent.sessions_until("an allowed PostgreSQL session", |s| {
        s.iter()
            .any(|x| x["outcome"] == "closed" && x["protocol"] == "postgres")
    });
    let x = sessions
        .iter()
        .find(|x| x["outcome"] == "closed" && x["protocol"] == "postgres")
        .unwrap();
    assert_eq!(x["target"], "db", "{x:#}");
    assert!(s_of(&x["detail"]).contains("relayed unchecked"), "{x:#}");
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
}

fn s_of(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// A connect made by sendto(MSG_FASTOPEN), with no connect call, meets the
/// same hooks: redirected, attributed and recorded.
#[test]
fn tcp_fast_open_is_intercepted_too() {
    let echo = Echo::start();
    let agent = Agent::start("tfo", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let r = agent.client_as_nobody(
        Some("app"),
        &["fastopen", "127.0.0.1", &echo.port.to_string()],
    );
    assert_eq!(r["received"], "fast\n", "{r}");
    let port = r["local_port"].as_u64().unwrap() as u16;
    assert!(!echo.saw_port(port), "a Fast Open connect went direct");
    agent.sessions_until("the Fast Open session", |s| {
        s.iter()
            .any(|x| x["pid"] == r["pid"] && x["rule"] == "app-to-echo" && x["bytes_up"] == 5)
    });
}

/// Connects a unix stream socket to `path` (from `cwd`), as `nobody` when
/// `as_nobody`, in `workload` or not: the errno, or, once connected,
/// `ended` if the peer closed at once, else `open`.
fn unix_connect(
    agent: &Agent,
    workload: Option<&str>,
    as_nobody: bool,
    cwd: &std::path::Path,
    path: &str,
) -> String {
    const PY: &str = "import socket, sys\n\
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
        try:\n    s.connect(sys.argv[1])\n\
        except OSError as e:\n    print(e.errno); sys.exit(0)\n\
        s.settimeout(5)\n\
        try:\n    print('ended' if s.recv(1) == b'' else 'open')\n\
        except OSError:\n    print('open')\n";
    let mut c = if as_nobody {
        let mut c = agent.run_in(workload, "setpriv");
        c.args([
            "--reuid",
            NOBODY,
            "--regid",
            NOBODY,
            "--clear-groups",
            "/usr/bin/python3",
        ]);
        c
    } else {
        agent.run_in(workload, "/usr/bin/python3")
    };
    let out = c.args(["-c", PY, path]).current_dir(cwd).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs `interceptor run` on `agent`'s config for at most 30 s: its log if
/// it exited by itself, `None` if it became ready (then it is stopped).
fn run_until_ready_or_exit(agent: &Agent) -> Option<String> {
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&agent.config)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("agent ready") {
                let _ = tx.send(None);
            }
            log.push_str(&line);
            log.push('\n');
        }
        let _ = tx.send(Some(log));
    });
    let got = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the agent neither started nor stopped");
    if got.is_none() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }
    child.wait().unwrap();
    got
}

/// Hole 3: a workload reached a local PostgreSQL over its unix socket, and
/// nothing saw it. Now a connect of a workload to a target's unix path goes
/// to the agent: identity, policy, statements and recording as for TCP;
/// while the agent is down the path meets nobody listening.
///
/// Every other way to that socket (a symlink, a hard link, a relative path,
/// `/proc/self/root/…`) is refused by the kernel guard where the kernel
/// runs BPF LSM or tracing programs. On a kernel without (this test's
/// machine), the agent starts only once the socket's directory is closed
/// to others, reaches it itself with `CAP_DAC_READ_SEARCH`, and says so
/// when a second link to the socket appears. The upstream connect is made
/// as the caller, so the socket's own permissions still hold. A process of
/// no workload that uses the agent's socket directly is refused and
/// recorded; one that uses the server's socket is not touched.
#[test]
fn unix_socket_connects_go_through_the_agent_and_no_other_way() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("icpt-e2e-pgserver-unix-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    let db = crate::pg::Postgres::start(&dir).expect("starting PostgreSQL");
    crate::enforcement::direct(&db, "CREATE TABLE t (x int)");
    let name = format!(".s.PGSQL.{}", db.port);
    let sock = dir.join(&name);
    let sections = format!(
        "[[workload]]\nname = \"app\"\nmanaged = true\n\n[[target]]\nname = \"db\"\n\
         addresses = [\"unix:{}\"]\nprotocol = \"postgres\"\n",
        sock.display()
    );
    let policy = r#"
[defaults]
connect = "deny"

[[rule]]
id = "app-db"
workloads = ["app"]
targets = ["db"]
action = "allow"

[[rule]]
id = "no-writes"
on = "statement"
workloads = ["app"]
targets = ["db"]
classes = ["write"]
action = "deny"
"#;
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    let mut agent = Agent::prepare("unix", &sections, policy);
    // The directory open to all: without a kernel guard, no start.
    mode(&dir, 0o755);
    let guarded = match run_until_ready_or_exit(&agent) {
        None => true,
        Some(log) => {
            assert!(
                log.contains("cannot guard the unix targets' sockets")
                    && log.contains("lets others search it"),
                "{log}"
            );
            false
        }
    };
    eprintln!("kernel guard of unix sockets: {guarded}");
    mode(&dir, 0o750);
    agent.spawn();
    assert!(
        agent.log().contains("unix sockets: workloads' connects"),
        "{}",
        agent.log()
    );
    let conn_in = |d: &std::path::Path| {
        db.conninfo()
            .replace("host=127.0.0.1", &format!("host={}", d.display()))
    };
    let conn = conn_in(&dir);
    let psql_as_nobody = |agent: &Agent, conn: &str, sql: &str| {
        crate::pg_tool(
            agent,
            "setpriv",
            &[
                "--reuid",
                NOBODY,
                "--regid",
                NOBODY,
                "--clear-groups",
                "psql",
                conn,
                "-X",
                "-A",
                "-t",
                "-c",
                sql,
            ],
        )
    };

    // The path itself: through the agent, statements checked; as root
    // and as nobody, who may not search the directory.
    let read = crate::psql_tuples(&agent, &conn, "SELECT count(*) FROM t");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let read = psql_as_nobody(&agent, &conn, "SELECT count(*) FROM t");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let write = crate::psql_tuples(&agent, &conn, "INSERT INTO t VALUES (1)");
    let err = String::from_utf8_lossy(&write.stderr);
    assert!(
        !write.status.success() && err.contains("no-writes"),
        "a write went through: {err}"
    );
    let original = format!("unix:{}", sock.display());
    let sessions = agent.sessions_until("3 unix sessions", |s| {
        s.iter().filter(|x| x["outcome"] == "closed").count() >= 3
    });
    let closed: Vec<_> = sessions
        .iter()
        .filter(|x| x["outcome"] == "closed")
        .collect();
    for x in &closed {
        assert_eq!(x["target"], "db", "{x:#}");
        assert_eq!(x["protocol"], "postgres", "{x:#}");
        assert_eq!(x["workload"], "app", "{x:#}");
        assert_eq!(x["original_dst"], original.as_str(), "{x:#}");
    }
    assert!(closed.iter().any(|x| x["uid"] == 65534), "{closed:#?}");

    // Every other way to the same socket, from the workload: refused
    // (EPERM by the guard, EACCES by the closed directory).
    let ways = std::env::temp_dir().join(format!("icpt-e2e-unix-ways-{id}"));
    let _ = std::fs::remove_dir_all(&ways);
    std::fs::create_dir_all(&ways).unwrap();
    std::os::unix::fs::symlink(&sock, ways.join(&name)).unwrap();
    let proc_root = format!("/proc/self/root{}", sock.display());
    let other_ways = |agent: &Agent, when: &str| {
        let out = psql_as_nobody(agent, &conn_in(&ways), "INSERT INTO t VALUES (2)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && (err.contains("Permission denied") || err.contains("Operation not permitted")),
            "{when}: the server's socket was reached through a symlink: {err}"
        );
        let errno = unix_connect(agent, Some("app"), true, &ways, &proc_root);
        assert!(
            errno == "13" || errno == "1",
            "{when}: {proc_root}: {errno}"
        );
        if guarded {
            // Root may search any directory: only the guard stops it.
            let errno = unix_connect(agent, Some("app"), false, &dir, &format!("./{name}"));
            assert_eq!(errno, "1", "{when}: a relative path reached the server");
        }
    };
    other_ways(&agent, "agent running");
    // A second link is a way around the closed directory: without the
    // guard the agent says so at once.
    let link = ways.join("hard.sock");
    std::fs::hard_link(&sock, &link).unwrap();
    if guarded {
        let errno = unix_connect(&agent, Some("app"), true, &ways, link.to_str().unwrap());
        assert_eq!(errno, "1", "a hard link reached the server");
    } else {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !agent.log().contains("reachable around the agent") {
            assert!(std::time::Instant::now() < deadline, "{}", agent.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    std::fs::remove_file(&link).unwrap();
    // A process of no workload is not touched.
    let out = Command::new("psql")
        .args([&conn, "-X", "-A", "-t", "-c", "SELECT 1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The agent's own socket, used directly by a process of no workload:
    // refused and recorded.
    let own = agent.dir.join("run/db.0.sock");
    assert_eq!(
        unix_connect(&agent, None, false, &ways, own.to_str().unwrap()),
        "ended"
    );
    agent.sessions_until("the unattributed connect", |s| {
        s.iter()
            .any(|x| x["rule"] == "identity.unattributed" && x["original_dst"] == original.as_str())
    });

    // The server's socket closed to others: a workload user without
    // access is refused by the agent as the kernel would refuse them.
    mode(&sock, 0o700);
    let as_nobody = psql_as_nobody(&agent, &conn, "SELECT 1");
    let err = String::from_utf8_lossy(&as_nobody.stderr);
    assert!(
        !as_nobody.status.success() && err.contains("Permission denied"),
        "nobody reached a socket closed to them through the agent: {err}"
    );
    let as_root = crate::psql_tuples(&agent, &conn, "SELECT 1");
    assert!(
        as_root.status.success(),
        "{}",
        String::from_utf8_lossy(&as_root.stderr)
    );
    mode(&sock, 0o777);

    // Agent down: the path meets nobody; the other ways stay closed.
    agent.kill9();
    let down = crate::psql_tuples(&agent, &conn, "INSERT INTO t VALUES (3)");
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(
        !down.status.success() && err.contains("Connection refused"),
        "with the agent down: {err}"
    );
    other_ways(&agent, "agent down");
    agent.spawn();
    assert!(agent.log().contains("adopted=6"), "{}", agent.log());
    let again = crate::psql_tuples(&agent, &conn, "SELECT count(*) FROM t");
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    assert_eq!(
        crate::enforcement::direct(&db, "SELECT count(*) FROM t"),
        "0"
    );
    drop(agent);
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&ways);
}
