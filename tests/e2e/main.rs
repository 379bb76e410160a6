//! End-to-end tests: real kernel, real cgroups and eBPF, real processes.
//! Run serially (`--test-threads=1`) as root, by `cargo xtask test`.

mod approvals;
mod boundary;
mod enforcement;
mod evidence;
mod faults;
mod harness;
mod resources;
mod sinks;
mod tls;

use std::time::{Duration, Instant};

use harness::*;

fn s(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or_default()
}

#[test]
fn only_workload_processes_are_redirected() {
    let echo = Echo::start();
    let agent = Agent::start("scope", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let port = echo.port.to_string();

    let inside = agent.client(Some("app"), &["echo", "127.0.0.1", &port]);
    assert_eq!(inside["received_sha256"], inside["sent_sha256"]);
    let inside_port = inside["local_port"].as_u64().unwrap() as u16;
    assert!(
        !echo.saw_port(inside_port),
        "the workload's connection reached the server directly"
    );

    let outside = agent.client(None, &["echo", "127.0.0.1", &port]);
    let outside_port = outside["local_port"].as_u64().unwrap() as u16;
    assert!(echo.saw_port(outside_port), "a host process was redirected");

    agent.sessions_until("the workload's session", |s| {
        s.iter()
            .any(|x| x["pid"] == inside["pid"] && x["outcome"] == "closed")
    });
    std::thread::sleep(Duration::from_millis(300));
    let sessions = agent.sessions();
    let ours: Vec<_> = sessions
        .iter()
        .filter(|x| x["pid"] == inside["pid"])
        .collect();
    assert_eq!(ours.len(), 1);
    assert!(
        sessions.iter().all(|x| x["pid"] != outside["pid"]),
        "a host process was recorded"
    );
    let x = ours[0];
    assert_eq!(x["workload"], "app");
    assert_eq!(x["identity"], "spiffe://e2e.test/app");
    assert_eq!(x["outcome"], "closed");
    assert_eq!(x["rule"], "app-to-echo");
    assert_eq!(x["target"], "echo");
    assert_eq!(x["bytes_up"], 5);
    assert_eq!(x["bytes_down"], 5);
    assert_eq!(s(&x["original_dst"]), format!("127.0.0.1:{port}"));
    assert!(s(&x["exe"]).contains("python3"), "exe: {}", x["exe"]);
    assert_eq!(s(&x["cgroup"]), "/icpt-e2e-scope/app");
    assert_eq!(x["evidence"]["attribution"], "process");
    assert_eq!(x["evidence"]["exe_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(x["evidence"]["uid"], 0);
    assert_eq!(x["evidence"]["user"], "root");
}

#[test]
fn getpeername_shows_the_original_destination() {
    let echo = Echo::start();
    let agent = Agent::start("peer", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let port = echo.port.to_string();
    let cases = [
        ("127.0.0.1", "127.0.0.1", format!("127.0.0.1:{port}")),
        ("::1", "::1", format!("[::1]:{port}")),
        // A dual-stack IPv6 socket connecting to an IPv4-mapped address.
        (
            "::ffff:127.0.0.1",
            "::ffff:127.0.0.1",
            format!("127.0.0.1:{port}"),
        ),
    ];
    for (host, want_peer, want_dst) in cases {
        let r = agent.client(Some("app"), &["echo", host, &port, "4096"]);
        assert_eq!(r["peer_host"], want_peer, "getpeername host for {host}");
        assert_eq!(r["peer_port"], echo.port, "getpeername port for {host}");
        assert_eq!(r["received_sha256"], r["sent_sha256"]);
        assert!(
            !echo.saw_port(r["local_port"].as_u64().unwrap() as u16),
            "{host} went direct"
        );
        let sessions = agent.sessions_until(&format!("session of {host}"), |s| {
            s.iter()
                .any(|x| x["pid"] == r["pid"] && x["outcome"] == "closed")
        });
        let x = sessions.iter().find(|x| x["pid"] == r["pid"]).unwrap();
        assert_eq!(s(&x["original_dst"]), want_dst);
        assert_eq!(x["bytes_up"], 4096);
    }
}

#[test]
fn hundred_megabytes_each_way_arrive_intact_with_half_close() {
    let echo = Echo::start();
    // With busy polling on (keys before the first table belong to [agent]),
    // so the poller runs alongside the splice path.
    let sections = format!("busy_poll_us = 200\n{}", app_and_echo(echo.port, ""));
    let agent = Agent::start("bulk", &sections, ALLOW_APP_ECHO);
    let n: u64 = 100 * 1000 * 1000;
    let r = agent.client(
        Some("app"),
        &["echo", "127.0.0.1", &echo.port.to_string(), &n.to_string()],
    );
    assert_eq!(r["sent"], n);
    // The client shut down its write side first and still read every echoed
    // byte: the half-close travelled through the proxy and back.
    assert_eq!(r["received"], n);
    assert_eq!(r["received_sha256"], r["sent_sha256"]);
    let sessions = agent.sessions_until("bulk session closed", |s| {
        s.iter()
            .any(|x| x["pid"] == r["pid"] && x["outcome"] == "closed")
    });
    let x = sessions.iter().find(|x| x["pid"] == r["pid"]).unwrap();
    assert_eq!(x["bytes_up"], n);
    assert_eq!(x["bytes_down"], n);
}

#[test]
fn a_thousand_concurrent_connections_are_all_attributed_and_relayed() {
    let echo = Echo::start();
    // Busy polling on: the poller shares each worker with hundreds of relays.
    let sections = format!("busy_poll_us = 200\n{}", app_and_echo(echo.port, ""));
    let agent = Agent::start("many", &sections, ALLOW_APP_ECHO);
    let r = agent.client(
        Some("app"),
        &["many", "127.0.0.1", &echo.port.to_string(), "1000"],
    );
    assert_eq!(r["errors"], serde_json::json!([]), "client errors");
    assert_eq!(r["opened"], 1000);
    assert_eq!(r["ok"], 1000);
    let sessions = agent.sessions_until("1000 closed sessions", |s| {
        s.iter()
            .filter(|x| x["pid"] == r["pid"] && x["outcome"] == "closed")
            .count()
            == 1000
    });
    let ours: Vec<_> = sessions.iter().filter(|x| x["pid"] == r["pid"]).collect();
    assert_eq!(ours.len(), 1000, "no extra or missing sessions");
    for x in ours {
        assert_eq!(x["workload"], "app");
        assert_eq!(x["rule"], "app-to-echo");
        assert_eq!(x["bytes_up"], x["bytes_down"]);
        assert!(x["bytes_up"].as_u64().unwrap() >= 7);
    }
}

#[test]
fn a_process_that_exits_right_after_connecting_is_attributed() {
    let echo = Echo::start();
    let agent = Agent::start("quick", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let mut pids = Vec::new();
    for _ in 0..5 {
        let r = agent.client(Some("app"), &["quick", "127.0.0.1", &echo.port.to_string()]);
        pids.push(r["pid"].clone());
    }
    let sessions = agent.sessions_until("5 short-lived sessions ended", |s| {
        pids.iter()
            .all(|p| s.iter().any(|x| &x["pid"] == p && x["outcome"] != "open"))
    });
    for p in &pids {
        let x = sessions.iter().find(|x| &x["pid"] == p).unwrap();
        assert_eq!(x["workload"], "app", "{x}");
        assert_eq!(x["identity"], "spiffe://e2e.test/app");
        assert_eq!(s(&x["cgroup"]), "/icpt-e2e-quick/app");
        assert_eq!(x["evidence"]["comm"], "python3");
        assert_eq!(x["bytes_up"], 4);
    }
}

#[test]
fn threads_are_attributed_to_their_process() {
    let echo = Echo::start();
    let agent = Agent::start("threads", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let r = agent.client(
        Some("app"),
        &["thread", "127.0.0.1", &echo.port.to_string()],
    );
    assert_ne!(
        r["pid"], r["tid"],
        "the client must connect from a second thread"
    );
    let sessions = agent.sessions_until("thread session", |s| {
        s.iter()
            .any(|x| x["pid"] == r["pid"] && x["outcome"] == "closed")
    });
    let x = sessions.iter().find(|x| x["pid"] == r["pid"]).unwrap();
    assert_eq!(x["evidence"]["pid"], r["pid"]);
    assert_eq!(x["evidence"]["tid"], r["tid"]);
    assert_eq!(x["evidence"]["attribution"], "process");
}

#[test]
fn no_loop_and_connects_to_the_proxy_port_are_refused() {
    let echo = Echo::start();
    let agent = Agent::start("loop", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let proxy = agent.proxy_port.to_string();

    // The agent's own upstream connect is not redirected back to itself:
    // exactly one session for one client connection.
    let r = agent.client(Some("app"), &["echo", "127.0.0.1", &echo.port.to_string()]);
    assert_eq!(r["received_sha256"], r["sent_sha256"]);
    std::thread::sleep(Duration::from_millis(500));
    let all = agent.sessions();
    assert_eq!(all.len(), 1, "{all:#?}");

    // From inside the workload, the kernel refuses a connect to the proxy.
    let inside = agent.client(Some("app"), &["connect", "127.0.0.1", &proxy]);
    assert_eq!(inside["connected"], false, "{inside}");
    assert_eq!(inside["error"], "PermissionError", "{inside}");
    let inside6 = agent.client(Some("app"), &["connect", "::1", &proxy]);
    assert_eq!(inside6["connected"], false, "{inside6}");

    // From a host process, the proxy finds no metadata: refused and recorded.
    let outside = agent.client(None, &["connect", "127.0.0.1", &proxy]);
    assert_ne!(
        outside["first_read"], 6,
        "the proxy relayed a connection it cannot attribute"
    );
    let sessions = agent.sessions_until("refused session", |s| {
        s.iter().any(|x| x["outcome"] == "refused")
    });
    let x = sessions.iter().find(|x| x["outcome"] == "refused").unwrap();
    assert_eq!(x["rule"], "proxy.no-metadata");
    assert_eq!(x["workload"], serde_json::Value::Null);
}

#[test]
fn a_denied_connect_fails_fast_and_is_recorded_with_its_rule() {
    let echo = Echo::start();
    let other = Echo::start();
    let policy = r#"
[defaults]
connect = "allow"
unmatched_destination = "deny"

[[rule]]
id = "app-not-echo"
workloads = ["app"]
targets = ["echo"]
action = "deny"
"#;
    let agent = Agent::start("deny", &app_and_echo(echo.port, ""), policy);
    for (port, rule) in [
        (echo.port, "app-not-echo"),
        (other.port, "defaults.unmatched_destination"),
    ] {
        let t = Instant::now();
        let r = agent.client(Some("app"), &["connect", "127.0.0.1", &port.to_string()]);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(r["elapsed_ms"].as_f64().unwrap() < 1000.0, "{r}");
        assert!(
            r["error"] == "ConnectionResetError" || r["first_read"] == 0,
            "a denied connection carried data: {r}"
        );
        let sessions = agent.sessions_until(&format!("denied by {rule}"), |s| {
            s.iter().any(|x| x["rule"] == rule)
        });
        let x = sessions.iter().find(|x| x["rule"] == rule).unwrap();
        assert_eq!(x["outcome"], "denied");
        assert_eq!(x["bytes_up"], 0);
        assert_eq!(s(&x["original_dst"]), format!("127.0.0.1:{port}"));
    }
    assert!(
        echo.peers.lock().unwrap().is_empty(),
        "a denied connect reached the server"
    );
    assert!(
        other.peers.lock().unwrap().is_empty(),
        "a denied connect reached the server"
    );
    // The listing filters by workload and time.
    let out = agent.cli(&["sessions", "list", "--workload", "app", "--since", "5m"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("app-not-echo") && text.contains("2 session(s)"),
        "{text}"
    );
    // Piped into a reader that has gone (`| head` done reading), a listing
    // ends quietly instead of panicking on the broken pipe.
    for args in ["sessions list", "sessions list --json"] {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{BIN} {args} --config {} | {{ exec 0<&-; sleep 0.3; }}",
                agent.config.display()
            ))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args} | head: {stderr}");
    }
}

fn icpt_programs_loaded() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("icpt_")))
        .count()
}

#[test]
fn sigkill_fails_closed_restart_adopts_and_detach_cleans_up() {
    let echo = Echo::start();
    let mut agent = Agent::start("restart", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let port = echo.port.to_string();
    let first = agent.client(Some("app"), &["echo", "127.0.0.1", &port]);
    let before = agent.sessions_until("first session", |s| {
        s.iter()
            .any(|x| x["pid"] == first["pid"] && x["outcome"] == "closed")
    });
    assert!(icpt_programs_loaded() >= 7);
    // Records are durable once their batch is fsynced (group commit); give
    // the writer that moment before pulling the plug.
    std::thread::sleep(Duration::from_millis(300));

    agent.kill9();
    let peers_before = echo.peers.lock().unwrap().len();
    let down = agent.client(Some("app"), &["connect", "127.0.0.1", &port]);
    assert_eq!(
        down["connected"], false,
        "connect went through with the agent down: {down}"
    );
    assert_eq!(down["error"], "ConnectionRefusedError", "{down}");
    assert_eq!(
        echo.peers.lock().unwrap().len(),
        peers_before,
        "a connect went direct while the agent was down"
    );

    agent.spawn();
    assert!(agent.log().contains("adopted=6"), "{}", agent.log());
    let again = agent.client(Some("app"), &["echo", "127.0.0.1", &port]);
    assert_eq!(again["received_sha256"], again["sent_sha256"]);
    let after = agent.sessions_until("session after restart", |s| {
        s.iter()
            .any(|x| x["pid"] == again["pid"] && x["outcome"] == "closed")
    });
    for old in &before {
        let same = after
            .iter()
            .find(|x| x["id"] == old["id"])
            .expect("earlier session kept");
        assert_eq!(same, old);
    }

    agent.stop();
    // Stopped agent: listings read the store directly.
    let offline = agent.sessions();
    assert_eq!(offline.len(), after.len());
    let show = agent.cli(&["sessions", "show", s(&before[0]["id"])]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("app-to-echo"));

    let out = agent.detach();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !agent.pin_dir.exists(),
        "pins left in {}",
        agent.pin_dir.display()
    );
    assert!(
        !agent.cgroup_parent.exists(),
        "cgroup left: {}",
        agent.cgroup_parent.display()
    );
    assert_eq!(
        icpt_programs_loaded(),
        0,
        "eBPF programs still loaded after detach"
    );
}

#[test]
fn malformed_config_is_rejected_with_file_and_line_and_nothing_attached() {
    let agent = Agent::prepare(
        "badcfg",
        "[[workload]]\nname = \"app\"\nmanaged = true\n",
        "",
    );
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let app = "[[workload]]\nname = \"app\"\nmanaged = true\n";
    // Writes `config` (and `policy`), runs the agent, and checks that it
    // refused with a message containing every one of `want`, having
    // attached nothing and created no cgroup.
    let refused = |config: &str, policy: &str, want: &[&str]| {
        std::fs::write(&agent.config, config).unwrap();
        std::fs::write(agent.dir.join("policy.toml"), policy).unwrap();
        let out = agent.cli(&["run"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            want.iter().all(|w| err.contains(w)),
            "wanted {want:?} in: {err}"
        );
        assert!(!agent.pin_dir.exists(), "something was pinned: {err}");
        assert!(
            !agent.cgroup_parent.exists(),
            "a managed cgroup was created: {err}"
        );
    };
    refused(
        &text.replace("trust_domain = \"e2e.test\"", "trust_domain = e2e.test"),
        "",
        &["interceptor.toml:2:"],
    );
    // A workload naming a cgroup that does not exist.
    refused(
        &text.replace(
            app,
            &format!(
                "{app}\n[[workload]]\nname = \"legacy\"\ncgroup = \"icpt-e2e-no-such-cgroup\"\n"
            ),
        ),
        "",
        &["legacy", "does not exist"],
    );
    // The root cgroup (which also holds the agent here) is never a workload.
    refused(
        &text.replace(app, "[[workload]]\nname = \"everything\"\ncgroup = \"/\"\n"),
        "",
        &["refusing cgroup"],
    );
    // A policy naming an unknown workload.
    refused(
        &text,
        "[[rule]]\nid = \"r\"\nworkloads = [\"ghost\"]\ntargets = [\"*\"]\naction = \"allow\"\n",
        &["policy.toml:3:", "ghost"],
    );

    // exec with an unknown workload.
    let out = agent.cli(&["exec", "--workload", "nope", "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown workload `nope`"), "{err}");
}

#[test]
fn exec_returns_the_exit_code_and_refuses_unattached_workloads() {
    let echo = Echo::start();
    let mut agent = Agent::start("exec", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let out = agent.cli(&["exec", "--workload", "app", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = agent.cli(&[
        "exec",
        "--workload",
        "app",
        "--",
        "cat",
        "/proc/self/cgroup",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("0::/icpt-e2e-exec/app"));
    assert!(agent.detach().status.success());
    let out = agent.cli(&["exec", "--workload", "app", "--", "true"]);
    assert!(!out.status.success());
}

#[test]
fn the_policies_in_the_repository_load() {
    // Every policy file under policies/ passes `policy check` against a
    // config that defines what it names.
    let agent = Agent::prepare(
        "policies",
        "[approvals]\nissuer = \"https://id.example.org\"\naudience = \"interceptor\"\n\n\
         [[workload]]\nname = \"billing\"\nmanaged = true\n\n[[workload]]\nname = \"reporting\"\nmanaged = true\n\n\
         [[workload]]\nname = \"nightly\"\nmanaged = true\n\n[[target]]\nname = \"orders-db\"\naddresses = [\"127.0.0.1:5432\"]\nprotocol = \"postgres\"\n",
        "",
    );
    let mut n = 0;
    for e in std::fs::read_dir(POLICIES).unwrap().flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "toml") {
            let out = agent.cli(&["policy", "check", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(!stdout.contains("warning:"), "{}: {stdout}", path.display());
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn existing_cgroups_and_systemd_units_are_workloads_too() {
    let echo = Echo::start();
    let mount = cgroup2();
    let slice = mount.join("icpt-e2e-sel.slice");
    let unit = slice.join("icpt-legacy.service");
    let plain = slice.join("plain");
    std::fs::create_dir_all(&unit).unwrap();
    std::fs::create_dir_all(&plain).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for d in ["icpt-legacy.service", "plain", ""] {
                let _ = std::fs::remove_dir(self.0.join(d));
            }
        }
    }
    let _cleanup = Cleanup(slice.clone());
    let sections = format!(
        "[[workload]]\nname = \"legacy\"\nsystemd_unit = \"icpt-legacy.service\"\n\n\
         [[workload]]\nname = \"plain\"\ncgroup = \"icpt-e2e-sel.slice/plain\"\n\n\
         [[target]]\nname = \"echo\"\naddresses = [\"127.0.0.1:{}\"]\n",
        echo.port
    );
    let policy = "[[rule]]\nid = \"both\"\nworkloads = [\"legacy\", \"plain\"]\ntargets = [\"echo\"]\naction = \"allow\"\n";
    let mut agent = Agent::start("sel", &sections, policy);
    let port = echo.port.to_string();
    let a = agent.client(Some("legacy"), &["echo", "127.0.0.1", &port]);
    let b = agent.client(Some("plain"), &["echo", "127.0.0.1", &port]);
    let sessions = agent.sessions_until("both sessions", |s| {
        [&a, &b].iter().all(|r| {
            s.iter()
                .any(|x| x["pid"] == r["pid"] && x["outcome"] == "closed")
        })
    });
    let xa = sessions.iter().find(|x| x["pid"] == a["pid"]).unwrap();
    assert_eq!(xa["workload"], "legacy");
    assert_eq!(s(&xa["cgroup"]), "/icpt-e2e-sel.slice/icpt-legacy.service");
    assert_eq!(xa["evidence"]["systemd_unit"], "icpt-legacy.service");
    let xb = sessions.iter().find(|x| x["pid"] == b["pid"]).unwrap();
    assert_eq!(xb["workload"], "plain");
    assert_eq!(xb["identity"], "spiffe://e2e.test/plain");
    // The eBPF programs' own log events reach the agent's log.
    assert!(agent.log().contains("redirected tgid"), "{}", agent.log());
    // Detach leaves cgroups the agent did not create.
    assert!(agent.detach().status.success());
    assert!(unit.is_dir() && plain.is_dir());
}

#[test]
fn sighup_reloads_the_policy_and_a_broken_file_keeps_the_old_one() {
    let echo = Echo::start();
    let agent = Agent::start("reload", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let port = echo.port.to_string();
    let r = agent.client(Some("app"), &["echo", "127.0.0.1", &port]);
    assert_eq!(r["received_sha256"], r["sent_sha256"]);

    // A broken file: the agent says so and keeps allowing.
    std::fs::write(agent.dir.join("policy.toml"), "[[rule]]\nid = \n").unwrap();
    agent.reload();
    assert!(
        agent.log().contains("policy reload failed"),
        "{}",
        agent.log()
    );
    let r = agent.client(Some("app"), &["echo", "127.0.0.1", &port]);
    assert_eq!(r["received_sha256"], r["sent_sha256"]);

    std::fs::write(
        agent.dir.join("policy.toml"),
        "[[rule]]\nid = \"now-denied\"\nworkloads = [\"app\"]\ntargets = [\"echo\"]\naction = \"deny\"\n",
    )
    .unwrap();
    agent.reload();
    let r = agent.client(Some("app"), &["connect", "127.0.0.1", &port]);
    assert_ne!(r["first_read"], 6, "{r}");
    agent.sessions_until("denied after reload", |s| {
        s.iter()
            .any(|x| x["rule"] == "now-denied" && x["outcome"] == "denied")
    });
}

#[test]
fn udp_is_left_alone() {
    let echo = Echo::start();
    let agent = Agent::start("udp", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    let seen = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        sock.send_to(&buf[..n], from).unwrap();
        from.port()
    });
    let r = agent.client(Some("app"), &["udp", "127.0.0.1", &port.to_string()]);
    assert_eq!(r["echoed"], "datagram");
    assert_eq!(r["peer_port"], port);
    // The datagram came straight from the application's own socket.
    assert_eq!(
        seen.join().unwrap() as u64,
        r["local_port"].as_u64().unwrap()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(agent.sessions().is_empty(), "UDP produced a session");
}

#[test]
fn intercept_targets_only_redirects_listed_destinations() {
    let echo = Echo::start();
    let other = Echo::start();
    let mut agent = Agent::prepare("targets", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace("[agent]\n", "[agent]\nintercept = \"targets\"\n"),
    )
    .unwrap();
    agent.spawn();

    let listed = agent.client(Some("app"), &["echo", "127.0.0.1", &echo.port.to_string()]);
    assert!(
        !echo.saw_port(listed["local_port"].as_u64().unwrap() as u16),
        "a target went direct"
    );
    let unlisted = agent.client(Some("app"), &["echo", "127.0.0.1", &other.port.to_string()]);
    assert!(
        other.saw_port(unlisted["local_port"].as_u64().unwrap() as u16),
        "a destination outside the targets was redirected"
    );
    let sessions = agent.sessions_until("the target's session", |s| {
        s.iter()
            .any(|x| x["pid"] == listed["pid"] && x["outcome"] == "closed")
    });
    assert!(sessions.iter().all(|x| x["pid"] != unlisted["pid"]));
    // The store is for root only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent.dir.join("data"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[path = "../../xtask/src/pg.rs"]
#[allow(dead_code)]
mod pg;

/// Policy of the PostgreSQL tests: `app` may reach `db`.
const APP_DB: &str =
    "[[rule]]\nid = \"app-db\"\nworkloads = [\"app\"]\ntargets = [\"db\"]\naction = \"allow\"\n";

/// A throw-away PostgreSQL (in the returned directory) and an agent with a
/// managed workload `app` allowed to reach it as target `db`.
fn postgres_and_agent(name: &str) -> (std::path::PathBuf, pg::Postgres, Agent) {
    postgres_and_agent_with(name, APP_DB, None)
}

/// [`postgres_and_agent`] with `policy`, after running `setup` on the
/// server directly (as its owner).
fn postgres_and_agent_with(
    name: &str,
    policy: &str,
    setup: Option<&str>,
) -> (std::path::PathBuf, pg::Postgres, Agent) {
    require_root();
    let dir = std::env::temp_dir().join(format!("icpt-e2e-pgserver-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let db = pg::Postgres::start(&dir).expect("starting PostgreSQL");
    if let Some(sql) = setup {
        enforcement::direct(&db, sql);
    }
    let sections = format!(
        "[[workload]]\nname = \"app\"\nmanaged = true\n\n[[target]]\nname = \"db\"\n\
         addresses = [\"127.0.0.1:{}\"]\nprotocol = \"postgres\"\n",
        db.port
    );
    let agent = Agent::start(name, &sections, policy);
    (dir, db, agent)
}

/// `pgbench -i -s 1` on `conn`, directly (as the owner).
fn pgbench_init(conn: &str) {
    let init = std::process::Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", conn])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
}

/// `tool ARGS` (psql, pgbench) to run inside workload `app`.
fn pg_tool_command(agent: &Agent, tool: &str, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(BIN);
    c.args(["exec", "--config"])
        .arg(&agent.config)
        .args(["--workload", "app", "--", tool])
        .args(args);
    c
}

/// Runs `tool ARGS` (psql, pgbench) inside workload `app`.
fn pg_tool(agent: &Agent, tool: &str, args: &[&str]) -> std::process::Output {
    pg_tool_command(agent, tool, args).output().unwrap()
}

/// `psql -X -A -t -c SQL` on `conn` inside workload `app`: bare result rows.
fn psql_tuples(agent: &Agent, conn: &str, sql: &str) -> std::process::Output {
    pg_tool(agent, "psql", &[conn, "-X", "-A", "-t", "-c", sql])
}

#[test]
fn postgres_clients_run_unmodified_and_statements_are_recorded() {
    let (dir, db, mut agent) = postgres_and_agent("pg");
    let conn = db.conninfo(); // libpq's default sslmode=prefer: the agent declines TLS

    // Several statements in one simple-protocol message, and a secret.
    let out = pg_tool(
        &agent,
        "psql",
        &[
            &conn,
            "-X",
            "-A",
            "-t",
            "-c",
            "select 40 + 2; select 'second'",
            "-c",
            "CREATE ROLE icpt_tmp LOGIN PASSWORD 'topsecret'",
            "-c",
            "DROP ROLE icpt_tmp",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("42") && stdout.contains("second"),
        "{stdout}"
    );

    let sessions = agent.sessions_until("psql session", |s| {
        s.iter()
            .any(|x| x["outcome"] == "closed" && x["statements"].as_u64() >= Some(3))
    });
    let x = sessions
        .iter()
        .find(|x| x["statements"].as_u64() >= Some(3))
        .unwrap();
    assert_eq!(x["protocol"], "postgres");
    assert_eq!(x["postgres"]["user"], "postgres");
    assert_eq!(x["postgres"]["database"], "postgres");
    assert_eq!(x["postgres"]["encryption_declined"], true);
    let show = agent.cli(&["sessions", "show", s(&x["id"]), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let st = v["statement_events"].as_array().unwrap();
    let texts: Vec<&str> = st.iter().map(|e| s(&e["text"])).collect();
    assert_eq!(texts[0], "select 40 + 2; select 'second'");
    assert_eq!(st[0]["tags"], serde_json::json!(["SELECT 1", "SELECT 1"]));
    assert_eq!(st[0]["class"], "read");
    assert_eq!(texts[1], "CREATE ROLE icpt_tmp LOGIN PASSWORD '***'");
    assert_eq!(st[1]["class"], "admin");
    assert_eq!(st[1]["tags"], serde_json::json!(["CREATE ROLE"]));
    let raw = String::from_utf8_lossy(&show.stdout);
    assert!(!raw.contains("topsecret"), "a password reached the store");

    // Statements are recorded while their session is still open.
    let live_args = [
        &conn,
        "-X",
        "-c",
        "select 'live-marker'",
        "-c",
        "select pg_sleep(6)",
    ];
    let mut live = pg_tool_command(&agent, "psql", &live_args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let marked = |e: &[serde_json::Value]| e.iter().any(|x| x["text"] == "select 'live-marker'");
    let seen = events_of_kind_until(&agent, "query", marked);
    let running = live.try_wait().unwrap().is_none();
    assert!(live.wait().unwrap().success());
    assert!(
        marked(&seen),
        "a statement of an open session was not recorded within 10 s"
    );
    assert!(
        running,
        "psql ended before its first statement was seen recorded"
    );

    // policy explain: the connect decision and what a statement does.
    let out = agent.cli(&[
        "policy",
        "explain",
        "--workload",
        "app",
        "--target",
        "db",
        "--json",
        "--sql",
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["connect"]["action"], "allow");
    assert_eq!(v["connect"]["rule"], "app-db");
    assert_eq!(v["statement"]["class"], "write");
    assert_eq!(v["statement_decision"]["rule"], "defaults.statement");
    assert_eq!(v["statement"]["tables"], serde_json::json!(["d", "orders"]));

    // An error is recorded with its SQLSTATE.
    let out = pg_tool(
        &agent,
        "psql",
        &[&conn, "-X", "-c", "select * from no_such_table"],
    );
    assert!(!out.status.success());
    let sessions = agent.sessions_until("error statement", |s| {
        s.len() >= 2 && s.iter().all(|x| x["outcome"] != "open")
    });
    let last = sessions.last().unwrap();
    let show = agent.cli(&["sessions", "show", s(&last["id"]), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(v["statement_events"][0]["error"], "42P01");

    // A client that insists on TLS gets a clear failure, and the session says why.
    let out = pg_tool(
        &agent,
        "psql",
        &[&format!("{conn} sslmode=require"), "-X", "-c", "select 1"],
    );
    assert!(!out.status.success());
    agent.sessions_until("TLS refusal recorded", |list| {
        list.iter()
            .any(|x| s(&x["detail"]).contains("requires TLS"))
    });

    // pgbench in every query mode, unmodified.
    let out = pg_tool(&agent, "pgbench", &["-i", "-q", "-s", "1", &conn]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for mode in ["simple", "extended", "prepared"] {
        let out = pg_tool(
            &agent,
            "pgbench",
            &["-n", "-c", "2", "-t", "25", "-M", mode, &conn],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("number of transactions actually processed: 50/50"),
            "{mode}: {text}"
        );
    }

    // Statement policy, hot-reloaded: DDL, admin and unparseable statements
    // are denied, and so are writes to pgbench_history however they hide.
    std::fs::write(
        agent.dir.join("policy.toml"),
        format!(
            "{APP_DB}\n[[rule]]\nid = \"no-ddl\"\non = \"statement\"\nworkloads = [\"app\"]\ntargets = [\"db\"]\n\
             classes = [\"ddl\", \"admin\", \"unknown\"]\naction = \"deny\"\n\n\
             [[rule]]\nid = \"history-is-append-only\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\n\
             classes = [\"write\"]\ntables = [\"public.pgbench_history\"]\naction = \"deny\"\n"
        ),
    )
    .unwrap();
    agent.reload();
    let count = |sql: &str| -> String {
        let out = psql_tuples(&agent, &conn, sql);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let history = count("select count(*) from pgbench_history");
    assert!(history.parse::<u64>().unwrap() > 0, "{history}");
    // The session stays usable after a refusal: the next statements run.
    let out = pg_tool(
        &agent,
        "psql",
        &[
            &conn,
            "-X",
            "-A",
            "-t",
            "-v",
            "VERBOSITY=verbose",
            "-c",
            "select 'before'",
            "-c",
            "drop table pgbench_accounts",
            "-c",
            "select 'after'",
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("before") && text.contains("after"), "{text}");
    assert!(
        text.contains("42501") && text.contains("denied by rule \"no-ddl\""),
        "{text}"
    );
    assert_eq!(count("select count(*) from pgbench_accounts"), "100000");
    for sql in [
        "delete from pgbench_history",
        "WITH d AS (DELETE FROM pgbench_history RETURNING *) SELECT count(*) FROM d",
        "EXPLAIN ANALYZE DELETE FROM pgbench_history",
        "COPY (DELETE FROM pgbench_history RETURNING *) TO STDOUT",
        "select 1; delete from pgbench_history",
        "DO $$ BEGIN DELETE FROM pgbench_history; END $$",
        "PREPARE p AS DELETE FROM pgbench_history",
        "/* hidden */ DELETE /* in */ FROM pgbench_history",
        "SELECT set_config('role', 'postgres', false)",
        "SET ROLE postgres",
        "COPY pgbench_history TO PROGRAM 'cat'",
        "SELECT pg_read_file('/etc/hostname')",
    ] {
        let out = pg_tool(&agent, "psql", &[&conn, "-X", "-c", sql]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sql} ran");
        assert!(
            err.contains("interceptor: statement denied by rule"),
            "{sql}: {err}"
        );
    }
    // A harmless statement first, then a write hidden from a scanner that
    // misjudged where a literal or comment ends: behind a twin that differs
    // only there (whose cached classification must not carry over), or
    // behind a setting that changes how the server reads backslashes
    // (standard_conforming_strings) or which bytes a backslash is (a client
    // encoding whose characters end in ASCII bytes).
    for (first, write) in [
        (
            "SELECT 1 AS abc$x$, 2 ; SELECT 7 ; SELECT 3 AS d$x$",
            "SELECT 1 AS abc$x$, 2 ; DELETE FROM pgbench_history ; SELECT 3 AS d$x$",
        ),
        (
            "SELECT 1 /* /* */ ' */ ; SELECT 7 ; SELECT 'z'",
            "SELECT 1 /* /* */ ' */ ; DELETE FROM pgbench_history ; SELECT 'z'",
        ),
        (
            "SELECT name'\\' ; SELECT 7 ; SELECT 'x'",
            "SELECT name'\\' ; DELETE FROM pgbench_history ; SELECT 'x'",
        ),
        (
            "SET standard_conforming_strings = off",
            "SELECT 'a\\' , ' ; DELETE FROM pgbench_history ; -- '",
        ),
        (
            "SET client_encoding = 'GBK'",
            "SELECT E'\u{4e2d}\\' ; DELETE FROM pgbench_history ; SELECT 1 -- ' ;",
        ),
    ] {
        let out = pg_tool(
            &agent,
            "psql",
            &[&conn, "-X", "-A", "-t", "-c", first, "-c", write],
        );
        let (got, err) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            !first.contains("SELECT 7") || got.lines().any(|l| l == "7"),
            "{first}: {got}{err}"
        );
        assert!(
            err.contains("interceptor: statement denied by rule"),
            "{write}: {got}{err}"
        );
    }
    // A role asked for in the startup packet is a SET ROLE by another door.
    let with_role = format!("{conn} options='-c role=postgres'");
    let out = pg_tool(&agent, "psql", &[&with_role, "-X", "-c", "select 1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("startup setting denied by rule \"no-ddl\": SET role = 'postgres'"),
        "{err}"
    );
    // COPY FROM into a table a rule protects is a write to that table.
    let out = pg_tool(
        &agent,
        "psql",
        &[&conn, "-X", "-c", "copy pgbench_history from stdin"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("denied by rule \"history-is-append-only\""),
        "{err}"
    );
    assert_eq!(
        count("select count(*) from pgbench_history"),
        history,
        "a denied write ran"
    );
    // Extended protocol (pgbench's Parse/Bind/Execute, named or not).
    std::fs::write(dir.join("bad.sql"), "DELETE FROM pgbench_history;\n").unwrap();
    std::process::Command::new("chmod")
        .arg("a+r")
        .arg(dir.join("bad.sql"))
        .status()
        .unwrap();
    for mode in ["extended", "prepared"] {
        let out = pg_tool(
            &agent,
            "pgbench",
            &[
                "-n",
                "-t",
                "1",
                "-M",
                mode,
                "-f",
                dir.join("bad.sql").to_str().unwrap(),
                &conn,
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("denied by rule \"history-is-append-only\""),
            "{mode}: {err}"
        );
    }
    assert_eq!(count("select count(*) from pgbench_history"), history);
    // Reads still work in every mode.
    for mode in ["simple", "extended", "prepared"] {
        let out = pg_tool(
            &agent,
            "pgbench",
            &["-n", "-S", "-t", "20", "-M", mode, &conn],
        );
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every refusal is recorded with its rule.
    let all = agent.sessions();
    let mut denied = 0;
    for x in &all {
        let show = agent.cli(&["sessions", "show", s(&x["id"]), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
        for st in v["statement_events"].as_array().into_iter().flatten() {
            if st["decision"] == "deny" {
                denied += 1;
                assert!(
                    st["rule"] == "no-ddl" || st["rule"] == "history-is-append-only",
                    "{st}"
                );
                // A run of a statement whose Parse was refused: the server
                // fails its Bind first (no such statement).
                let unknown_run = st["kind"] == "execute" && st["class"] == "unknown";
                let code = if unknown_run { "26000" } else { "42501" };
                assert_eq!(st["error"], code, "{st}");
            }
        }
    }
    assert!(denied >= 15, "{denied} refusals recorded");
    // Every run of a prepared statement is recorded: pgbench -M prepared
    // parses its SELECT once (named) and runs it once per transaction, each
    // run an `execute` event.
    let runs_per_session = || -> Vec<usize> {
        let mut runs: Vec<usize> = agent
            .sessions()
            .iter()
            .map(|x| {
                let show = agent.cli(&["sessions", "show", s(&x["id"]), "--json"]);
                let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
                let events = v["statement_events"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                // The named statement pgbench prepares (-M extended's is unnamed).
                let Some(name) = events.iter().find_map(|st| {
                    let named = st["kind"] == "parse" && !s(&st["name"]).is_empty();
                    (named && s(&st["text"]).starts_with("SELECT abalance"))
                        .then(|| st["name"].clone())
                }) else {
                    return 0;
                };
                events
                    .iter()
                    .filter(|st| {
                        st["kind"] == "execute"
                            && st["name"] == name
                            && s(&st["text"]).contains("abalance")
                            && st["rows"] == 1
                            && st["class"] == "read"
                    })
                    .count()
            })
            .filter(|&n| n > 0)
            .collect();
        runs.sort();
        runs
    };
    // -S -t 20, then the two clients of -c 2 -t 25 (TPC-B reads the balance
    // too); the last session's statements reach the store just after it ends.
    let want = vec![20, 25, 25];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut runs = runs_per_session();
    while runs != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        runs = runs_per_session();
    }
    assert_eq!(
        runs, want,
        "runs of SELECT abalance recorded per prepared session"
    );

    // Ctrl-C in psql cancels the running query through the agent: the
    // CancelRequest travels on its own connection to the same backend.
    let child = std::process::Command::new(BIN)
        .args(["exec", "--config"])
        .arg(&agent.config)
        .args([
            "--workload",
            "app",
            "--",
            "psql",
            &conn,
            "-X",
            "-c",
            "select pg_sleep(60)",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "cancel took {:?}",
        t.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("canceling statement due to user request"),
        "{err}"
    );
    agent.sessions_until("cancel request session", |s| {
        s.iter()
            .any(|x| x["postgres"]["cancel_request"] == true && x["outcome"] == "closed")
    });

    // Malformed frames from a raw client end that session with a reason.
    let port = db.port.to_string();
    for (bytes, why) in [
        // A startup packet that says it is 3 bytes long.
        ("00000003", "startup packet length 3"),
        // A valid startup (user=postgres), then a Query claiming 2 bytes.
        (
            "00000017000300007573657200706f73746772657300005100000002",
            "message 'Q' with length 2",
        ),
    ] {
        let _ = agent.client(Some("app"), &["raw", "127.0.0.1", &port, bytes]);
        let list = agent.sessions_until(why, |list| {
            list.iter().any(|x| s(&x["detail"]).contains(why))
        });
        let x = list.iter().find(|x| s(&x["detail"]).contains(why)).unwrap();
        assert_eq!(x["outcome"], "error");
    }

    // An agent stopped while a statement runs records that statement first;
    // its session is then marked interrupted.
    let text = "select pg_sleep(60) as stop_marker";
    let mut client = pg_tool_command(&agent, "psql", &[&conn, "-X", "-c", text])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The server runs it (asked directly, not through the agent).
    let deadline = Instant::now() + Duration::from_secs(10);
    let running = format!(
        "select count(*) from pg_stat_activity where query = '{text}' and state = 'active'"
    );
    loop {
        let out = std::process::Command::new("psql")
            .args([&conn, "-X", "-A", "-t", "-c", &running])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).trim() == "1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the statement never ran on the server"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.stop();
    let _ = client.kill();
    let _ = client.wait();
    let list = agent.sessions();
    let x = list
        .iter()
        .find(|x| x["outcome"] == "interrupted")
        .unwrap_or_else(|| panic!("no interrupted session: {list:?}"));
    let show = agent.cli(&["sessions", "show", s(&x["id"]), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert!(
        v["statement_events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["text"] == text)),
        "the running statement was not recorded: {v}"
    );
    drop(agent);
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Recorded statement events of `kind` (`bind`, `function`…) in all sessions.
fn events_of_kind(agent: &Agent, kind: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for x in agent.sessions() {
        let show = agent.cli(&["sessions", "show", s(&x["id"]), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
        out.extend(
            v["statement_events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["kind"] == kind)
                .cloned(),
        );
    }
    out
}

/// [`events_of_kind`], asked again until `enough` holds or 10 s have passed
/// (the caller's assertions then say what is missing).
fn events_of_kind_until(
    agent: &Agent,
    kind: &str,
    enough: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = events_of_kind(agent, kind);
        if enough(&events) || Instant::now() > deadline {
            return events;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn client_libraries_and_large_copies_get_the_same_results_as_direct() {
    let (dir, db, agent) = postgres_and_agent("pglibs");
    let clients = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/pgclients.py");
    let port = db.port.to_string();
    let args = [
        "python3",
        clients,
        "127.0.0.1",
        &port,
        pg::USER,
        pg::PASSWORD,
    ];
    let direct = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        direct.status.success(),
        "{}",
        String::from_utf8_lossy(&direct.stderr)
    );
    let through = pg_tool(&agent, args[0], &args[1..]);
    assert!(
        through.status.success(),
        "{}",
        String::from_utf8_lossy(&through.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&through.stdout),
        String::from_utf8_lossy(&direct.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&through.stdout).unwrap();
    assert_eq!(
        v["asyncpg"]["params"],
        serde_json::json!([["42", "x", "2.50"]])
    );
    assert_eq!(v["asyncpg"]["error"], "42P01");
    assert_eq!(v["asyncpg"]["notify"], "hello through the agent");
    assert_eq!(v["asyncpg"]["notice"], "a notice");
    assert_eq!(
        v["asyncpg"]["cursor"],
        serde_json::json!((1..=30).collect::<Vec<_>>())
    );
    assert_eq!(v["asyncpg"]["parameter_status"], "icpt-libs");
    assert_eq!(v["pg8000"]["error"], "22012");
    assert_eq!(v["pg8000"]["after_error"], "still usable");
    // A Query after a failed Bind, with no Sync between: the server skips
    // it, and one ReadyForQuery answers everything up to the Sync. The
    // agent records it as not run, and the next Query with its own answer.
    assert_eq!(
        v["raw"],
        serde_json::json!({"skipped": ["1", "E:08P01", "Z"], "after": ["T", "D", "C", "Z"]})
    );
    let queries = events_of_kind_until(&agent, "query", |e| {
        e.iter().any(|x| x["text"] == "SELECT 'icpt-after'")
    });
    let query = |text: &str| {
        let found = queries.iter().rfind(|x| x["text"] == text);
        found.unwrap_or_else(|| panic!("{text} not recorded: {queries:?}"))
    };
    let skipped = query("SELECT 'icpt-skipped'");
    assert_eq!(skipped["error"], "08P01", "{skipped}");
    assert_eq!(skipped["tags"], serde_json::json!([]), "{skipped}");
    let after = query("SELECT 'icpt-after'");
    assert_eq!(after["tags"], serde_json::json!(["SELECT 1"]), "{after}");
    assert_eq!(after["error"], serde_json::Value::Null, "{after}");
    assert!(after["duration_us"].is_u64(), "{after}");

    // COPY both ways with large data (about 45 MB each way) through the agent.
    let conn = db.conninfo();
    let psql = |sql: &str| {
        let out = psql_tuples(&agent, &conn, sql);
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    psql("create table big (id int, payload text)");
    let data = psql(
        "copy (select g, repeat(md5(g::text), 4) from generate_series(1, 300000) g) to stdout",
    );
    assert!(data.len() > 40_000_000, "{} bytes", data.len());
    std::fs::write(dir.join("big.tsv"), &data).unwrap();
    std::process::Command::new("chmod")
        .arg("a+r")
        .arg(dir.join("big.tsv"))
        .status()
        .unwrap();
    let copy_in = format!("\\copy big from '{}'", dir.join("big.tsv").display());
    let out = pg_tool(&agent, "psql", &[&conn, "-X", "-c", &copy_in]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "COPY 300000");
    let back = psql("copy big to stdout");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "COPY TO STDOUT differs from what went in");

    // Fast-path function calls: libpq's large-object functions (lo_creat,
    // lo_open, lowrite, loread…) travel as FunctionCall messages.
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 31 + i / 977) as u8).collect();
    let (blob_in, blob_out) = (dir.join("blob.in"), dir.join("blob.out"));
    std::fs::write(&blob_in, &blob).unwrap();
    let imported = String::from_utf8(psql(&format!("\\lo_import {}", blob_in.display()))).unwrap();
    let oid = imported
        .trim()
        .strip_prefix("lo_import ")
        .unwrap_or_else(|| panic!("psql said {imported:?}"));
    psql(&format!("\\lo_export {oid} {}", blob_out.display()));
    assert!(
        std::fs::read(&blob_out).unwrap() == blob,
        "large object read back through the agent differs"
    );
    psql(&format!("select lo_unlink({oid})"));
    let calls = events_of_kind_until(&agent, "function", |c| !c.is_empty());
    assert!(
        calls.iter().any(|c| c["class"] == "admin"
            && s(&c["text"]).starts_with("<fast-path function call, oid ")),
        "fast-path calls not recorded: {calls:?}"
    );

    // Masking: by column, in text (psql) and binary (asyncpg) formats, for
    // simple queries and for prepared statements executed again without a
    // new RowDescription.
    psql(
        "create table customers (id int, email text, card varchar(20), note text, amount numeric)",
    );
    psql("insert into customers values (1, 'ann@example.com', '4111111111111111', 'vip', 12.50), (2, 'bob@example.com', '5500000000000004', 'vip', null)");
    std::fs::write(
        agent.dir.join("policy.toml"),
        format!(
            "{APP_DB}\n\
             [[rule]]\nid = \"pii\"\non = \"statement\"\nworkloads = [\"app\"]\ntargets = [\"db\"]\naction = \"mask\"\ncolumns = [\"email\", \"amount\"]\nstrategy = \"redact\"\n\n\
             [[rule]]\nid = \"cards\"\non = \"statement\"\nworkloads = [\"app\"]\ntargets = [\"db\"]\naction = \"mask\"\ncolumns = [\"card*\"]\nstrategy = \"partial\"\nkeep = 4\n\n\
             [[rule]]\nid = \"notes\"\non = \"statement\"\nworkloads = [\"app\"]\ntargets = [\"db\"]\naction = \"mask\"\ncolumns = [\"note\"]\nstrategy = \"hash\"\n\n\
             [[rule]]\nid = \"tags\"\non = \"statement\"\nworkloads = [\"app\"]\ntargets = [\"db\"]\naction = \"mask\"\ncolumns = [\"tag_*\"]\ntypes = [\"varchar\"]\nstrategy = \"redact\"\n"
        ),
    )
    .unwrap();
    agent.reload();
    let text = String::from_utf8(psql("select * from customers order by id")).unwrap();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert_eq!(rows[0][0], "1");
    assert_eq!(rows[0][1], "****");
    assert_eq!(rows[0][2], "****1111");
    assert_eq!(rows[0][3].len(), 16, "{text}");
    assert_eq!(rows[0][3], rows[1][3], "equal values hash equally");
    assert_eq!(rows[0][4], "", "a masked numeric is NULL");
    assert_eq!(rows[1][2], "****0004");
    assert!(
        !text.contains("example.com") && !text.contains("12.50"),
        "{text}"
    );
    // Results without masked columns are left alone.
    let plain = String::from_utf8(psql("select count(*), max(id) from customers")).unwrap();
    assert_eq!(plain.trim(), "2|2");
    // A rule can choose columns by type as well as by name.
    let typed = String::from_utf8(psql(
        "select 'a'::text as tag_text, 'b'::varchar as tag_varchar, 'c'::varchar as other",
    ))
    .unwrap();
    assert_eq!(typed.trim(), "a|****|c");
    // A masked column stays masked under another name, inside an
    // expression, through a subquery or a UNION, and inside whole rows.
    let derived = String::from_utf8(psql(
        "select email as e, upper(note) as n, card || '', id as plain from customers where id = 1",
    ))
    .unwrap();
    let cols: Vec<&str> = derived.trim().split('|').collect();
    assert_eq!(cols[0], "****", "{derived}");
    assert_eq!(cols[1].len(), 16, "{derived}");
    assert_eq!(cols[2], "****1111", "{derived}");
    assert_eq!(cols[3], "1", "{derived}");
    for sql in [
        "select x from (select email as x from customers) s",
        "select 'z' union all select email from customers",
        "with c(x) as (select email from customers) select x from c",
        "select row_to_json(c) from customers c",
        "select c::text from customers c",
    ] {
        let out = String::from_utf8(psql(sql)).unwrap();
        assert!(!out.contains("example.com"), "{sql}: {out}");
    }
    // COPY data is never masked: a COPY out of masked columns is refused by
    // the mask rule; one naming only unmasked columns runs.
    let out = psql_tuples(&agent, &conn, "copy customers to stdout");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("denied by rule \"pii\""), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("example.com"));
    assert_eq!(
        String::from_utf8(psql("copy customers (id) to stdout")).unwrap(),
        "1\n2\n"
    );
    let script = "import asyncio, asyncpg, json, sys\n\
        async def main():\n\
        \x20   c = await asyncpg.connect(host='127.0.0.1', port=int(sys.argv[1]), user='postgres', password=sys.argv[2], database='postgres', ssl=False)\n\
        \x20   st = await c.prepare('select id, email, card, amount from customers where id = $1')\n\
        \x20   a = await st.fetchrow(1)\n\
        \x20   b = await st.fetchrow(2)\n\
        \x20   r = await c.fetch('select email from customers order by id')\n\
        \x20   print(json.dumps([list(map(str, a)), list(map(str, b)), [x[0] for x in r]]))\n\
        asyncio.run(main())\n";
    let out = pg_tool(&agent, "python3", &["-c", script, &port, pg::PASSWORD]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0], serde_json::json!(["1", "****", "****1111", "None"]));
    assert_eq!(v[1], serde_json::json!(["2", "****", "****0004", "None"]));
    assert_eq!(v[2], serde_json::json!(["****", "****"]));
    // Masked values are counted with the statements.
    let sessions = agent.sessions_until("masked statements recorded", |list| {
        list.iter().filter(|x| x["outcome"] != "open").count() >= 4
    });
    let mut masked = 0;
    for x in &sessions {
        let show = agent.cli(&["sessions", "show", s(&x["id"]), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
        for st in v["statement_events"].as_array().into_iter().flatten() {
            masked += st["masked"].as_u64().unwrap_or(0);
        }
    }
    assert!(masked >= 8, "{masked} masked values recorded");

    // Bind parameters are recorded only when the policy asks for it.
    assert!(
        events_of_kind(&agent, "bind").is_empty(),
        "parameters recorded without being asked"
    );
    std::fs::write(
        agent.dir.join("policy.toml"),
        format!("[defaults]\nrecord_parameters = true\n\n{APP_DB}"),
    )
    .unwrap();
    agent.reload();
    let out = pg_tool(&agent, "python3", &["-c", script, &port, pg::PASSWORD]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0][1], "ann@example.com", "no mask rule any more");
    let binds = events_of_kind_until(&agent, "bind", |b| b.len() >= 2);
    let params: Vec<&serde_json::Value> = binds.iter().map(|b| &b["parameters"]).collect();
    // asyncpg sends int4 parameters in binary.
    assert!(
        params.contains(&&serde_json::json!(["\\x00000001"])),
        "{params:?}"
    );
    assert!(
        params.contains(&&serde_json::json!(["\\x00000002"])),
        "{params:?}"
    );

    use std::io::{BufRead, Write};
    // A prepared statement is decided at every run, under the policy in
    // force then: one prepared while allowed and run again after a reload
    // that denies it is refused there (the server's own error, the
    // connection still usable), and every run is recorded.
    let script = "import asyncio, asyncpg, sys\n\
        async def main():\n\
        \x20   c = await asyncpg.connect(host='127.0.0.1', port=int(sys.argv[1]), user='postgres', password=sys.argv[2], database='postgres', ssl=False)\n\
        \x20   st = await c.prepare('select count(*) from customers where id > $1')\n\
        \x20   print(await st.fetchval(0), flush=True)\n\
        \x20   sys.stdin.readline()\n\
        \x20   try:\n\
        \x20       print('ran', await st.fetchval(0), flush=True)\n\
        \x20   except asyncpg.PostgresError as e:\n\
        \x20       print(e.sqlstate, str(e).splitlines()[0], flush=True)\n\
        \x20   print(await c.fetchval('select 7'), flush=True)\n\
        asyncio.run(main())\n";
    let mut child = pg_tool_command(&agent, "python3", &["-c", script, &port, pg::PASSWORD])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "2", "the first run is allowed");
    std::fs::write(
        agent.dir.join("policy.toml"),
        format!(
            "[[rule]]\nid = \"customers-closed\"\non = \"statement\"\nworkloads = [\"app\"]\ntargets = [\"db\"]\n\
             tables = [\"public.customers\"]\naction = \"deny\"\n\n{APP_DB}"
        ),
    )
    .unwrap();
    agent.reload();
    writeln!(child.stdin.as_mut().unwrap()).unwrap();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert!(
        rest[0].starts_with("42501 ") && rest[0].contains("denied by rule \"customers-closed\""),
        "{rest:?}"
    );
    assert_eq!(rest[1], "7", "the connection stays usable");
    // asyncpg prepares (Parse, Describe, Flush) and runs in one batch: the
    // Parse's record stands for the first run; the second run is an
    // `execute` of its own.
    let counted = "select count(*) from customers where id > $1";
    let runs = events_of_kind_until(&agent, "execute", |e| {
        e.iter().any(|x| x["rule"] == "customers-closed")
    });
    let runs: Vec<&serde_json::Value> = runs.iter().filter(|x| s(&x["text"]) == counted).collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(
        (&runs[0]["decision"], &runs[0]["error"], &runs[0]["tags"]),
        (
            &serde_json::json!("deny"),
            &serde_json::json!("42501"),
            &serde_json::json!([])
        )
    );
    let parses = events_of_kind(&agent, "parse");
    let parsed: Vec<&serde_json::Value> =
        parses.iter().filter(|x| s(&x["text"]) == counted).collect();
    assert_eq!(parsed.len(), 1, "{parsed:?}");
    // fetchval asks for one row: the server suspends the portal (no tag).
    assert_eq!(
        (&parsed[0]["decision"], &parsed[0]["error"]),
        (&serde_json::json!("allow"), &serde_json::Value::Null)
    );
    drop(agent);
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A PostgreSQL target that is down: the client is told so as a server
/// would tell it (FATAL 08001 naming the cause), not with a reset, and
/// the session is recorded as refused.
#[test]
fn a_postgres_target_that_is_down_gets_a_fatal_error_naming_the_cause() {
    let port = free_port(); // nothing listens there
    let sections = format!(
        "[[workload]]\nname = \"app\"\nmanaged = true\n\n[[target]]\nname = \"db\"\n\
         addresses = [\"127.0.0.1:{port}\"]\nprotocol = \"postgres\"\n"
    );
    let agent = Agent::start("pg-down", &sections, APP_DB);
    let conn = format!("host=127.0.0.1 port={port} user=postgres password=x dbname=postgres");
    let out = pg_tool(&agent, "psql", &[&conn, "-X", "-c", "select 1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("could not connect to server 127.0.0.1:{port}"))
            && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(!stderr.contains("reset"), "{stderr}");
    agent.sessions_until("the refused session", |s| {
        s.iter().any(|x| x["outcome"] == "refused")
    });
}
