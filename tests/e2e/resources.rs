//! Bounded resources: what one workload's session may take from the agent
//! and its store.

use crate::{harness::*, s};

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.len()
        };
    }
    total
}

/// Hole 6: statement texts are recorded up to `agent.record_text_limit`,
/// with the length and SHA-256 of the whole; a session's statements beyond
/// `agent.record_bytes_per_second` are decided as ever but only counted,
/// and the recording says how many it dropped (denied ones too).
#[test]
fn long_statements_are_cut_and_a_flood_is_counted() {
    let policy = format!(
        "{}\n[[rule]]\nid = \"no-deletes\"\non = \"statement\"\nworkloads = [\"app\"]\n\
         targets = [\"db\"]\nclasses = [\"write\"]\naction = \"deny\"\n",
        super::APP_DB
    );
    let (dir, db, mut agent) =
        super::postgres_and_agent_with("bounded", &policy, Some("CREATE TABLE t (x int)"));
    agent.stop();
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace("[agent]\n", "[agent]\nrecord_bytes_per_second = 16384\n"),
    )
    .unwrap();
    agent.spawn();
    let conn = db.conninfo();
    let store = agent.dir.join("data").join("store");
    let run_file = |agent: &Agent, name: &str, sql: &str| {
        let file = dir.join(name);
        std::fs::write(&file, sql).unwrap();
        let out = super::pg_tool(
            agent,
            "psql",
            &[
                &conn,
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=0",
                "-f",
                file.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };

    // Ten statements of 1 MiB each.
    let before = dir_bytes(&store);
    let mib = "x".repeat(1 << 20);
    let long: String = (0..10)
        .map(|_| format!("SELECT length('{mib}');\n"))
        .collect();
    let out = run_file(&agent, "long.sql", &long);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("1048576")
            .count(),
        10
    );
    let events = super::events_of_kind_until(&agent, "query", |e| {
        e.iter().filter(|x| x["whole"].is_object()).count() >= 10
    });
    let cut: Vec<_> = events.iter().filter(|x| x["whole"].is_object()).collect();
    assert_eq!(cut.len(), 10);
    for x in &cut {
        assert!(s(&x["text"]).len() <= 4096, "{}", s(&x["text"]).len());
        // SELECT length('…') as psql sends it.
        assert_eq!(x["whole"]["len"], (1u64 << 20) + 18, "{}", x["whole"]);
        assert_eq!(s(&x["whole"]["sha256"]).len(), 64);
    }
    agent.stop();
    let grown = dir_bytes(&store).saturating_sub(before);
    eprintln!("10 MiB of statements grew the store by {grown} bytes");
    assert!(
        grown < 2 << 20,
        "the store grew by {grown} bytes for 10 MiB sent"
    );
    agent.spawn();

    // A flood: 3000 statements, every third a denied DELETE.
    let flood: String = (0..3000)
        .map(|i| {
            if i % 3 == 2 {
                "DELETE FROM t;\n".to_string()
            } else {
                format!("SELECT {i};\n")
            }
        })
        .collect();
    run_file(&agent, "flood.sql", &flood);
    let sessions = agent.sessions_until("the flood's session", |x| {
        x.iter().filter(|x| x["outcome"] == "closed").count() >= 2
    });
    let flood_session = sessions
        .iter()
        .filter(|x| x["outcome"] == "closed")
        .max_by_key(|x| x["statements"].as_u64())
        .unwrap();
    let show = agent.cli(&["sessions", "show", s(&flood_session["id"]), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let events = v["statement_events"].as_array().unwrap();
    let recorded = events.iter().filter(|e| e["kind"] == "query").count();
    let mut dropped = 0;
    let mut denied_dropped = 0;
    for e in events.iter().filter(|e| e["kind"] == "dropped") {
        let t = s(&e["text"]);
        let n = |after: &str| -> u64 {
            t.split(after)
                .next()
                .unwrap()
                .split_whitespace()
                .last()
                .unwrap()
                .parse()
                .unwrap()
        };
        dropped += n(" statements (");
        denied_dropped += n(" of them denied");
    }
    eprintln!("flood: {recorded} recorded, {dropped} dropped ({denied_dropped} denied)");
    assert!(dropped > 0, "nothing was dropped");
    assert!(denied_dropped > 0, "denied statements were not counted");
    assert_eq!(recorded as u64 + dropped, 3000);
    assert_eq!(
        crate::enforcement::direct(&db, "SELECT count(*) FROM t"),
        "0"
    );
}

/// Hole 6: executables are hashed off the data path. While one workload
/// runs a 1 GiB executable whose modification time it changes before each
/// connect (a new hash every time), another workload's connects take no
/// longer, and still carry their own executable's hash.
#[test]
fn a_huge_executable_does_not_slow_other_workloads() {
    let echo = Echo::start();
    let sections = format!(
        "{}\n[[workload]]\nname = \"big\"\nmanaged = true\n",
        app_and_echo(echo.port, "")
    );
    let policy = ALLOW_APP_ECHO.replace("workloads = [\"app\"]", "workloads = [\"app\", \"big\"]");
    let agent = Agent::start("bigexe", &sections, &policy);
    let bigpy = agent.dir.join("bigpy");
    std::fs::copy("/usr/bin/python3", &bigpy).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&bigpy)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let port = echo.port.to_string();
    let script = format!(
        "import os, socket, sys, time\n\
         exe = sys.executable\n\
         for i in range(8):\n\
         \x20   t = time.time_ns() + i\n\
         \x20   os.utime(exe, ns=(t, t))\n\
         \x20   s = socket.create_connection(('127.0.0.1', {port}))\n\
         \x20   s.sendall(b'x'); s.recv(1); s.close()\n"
    );
    let mut big = std::process::Command::new(BIN)
        .args(["exec", "--config"])
        .arg(&agent.config)
        .args(["--workload", "big", "--"])
        .arg(&bigpy)
        .args(["-c", &script])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut times = Vec::new();
    for _ in 0..8 {
        let r = agent.client(Some("app"), &["connect", "127.0.0.1", &port]);
        assert_eq!(r["first_read"], 6, "{r}");
        times.push(r["elapsed_ms"].as_f64().unwrap());
    }
    assert!(big.wait().unwrap().success());
    times.sort_by(f64::total_cmp);
    eprintln!("app's connect + first read beside the 1 GiB executable, ms: {times:?}");
    assert!(
        times[times.len() / 2] < 100.0,
        "median {} ms",
        times[times.len() / 2]
    );
    assert!(
        times[times.len() - 1] < 300.0,
        "slowest {} ms",
        times[times.len() - 1]
    );
    let sessions = agent.sessions_until("16 sessions", |s| {
        s.iter().filter(|x| x["outcome"] == "closed").count() >= 16
    });
    for x in sessions.iter().filter(|x| x["workload"] == "app") {
        assert_eq!(
            s(&x["evidence"]["exe_sha256"]).len(),
            64,
            "no hash for app: {x:#}"
        );
    }
    assert_eq!(
        sessions.iter().filter(|x| x["workload"] == "big").count(),
        8,
        "{sessions:#?}"
    );
}

/// Hole 6: idle and half-closed connections end at their configured
/// timeouts (`agent.idle_timeout_s`, `agent.half_closed_timeout_s`), both
/// sides reset, and the session says why.
#[test]
fn idle_and_half_closed_connections_time_out() {
    // A server that takes connections and never answers nor closes.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hold_port = holder.local_addr().unwrap().port().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in holder.incoming().flatten() {
            held.push(c);
        }
    });
    let policy = "[defaults]\nconnect = \"allow\"\nunmatched_destination = \"allow\"\n";
    let mut agent = Agent::prepare("timeouts", &app_and_echo(free_port(), ""), policy);
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replace(
            "[agent]\n",
            "[agent]\nidle_timeout_s = 2\nhalf_closed_timeout_s = 1\n",
        ),
    )
    .unwrap();
    agent.spawn();
    let t = std::time::Instant::now();
    // Says nothing, hears nothing.
    let idle = agent.client(Some("app"), &["raw", "127.0.0.1", &hold_port, ""]);
    let idle_took = t.elapsed();
    // Says a line and ends its sending; the server never ends its own.
    let t = std::time::Instant::now();
    let half = agent.client(Some("app"), &["raw", "127.0.0.1", &hold_port, "68690a,"]);
    let half_took = t.elapsed();
    eprintln!("idle ended after {idle_took:?} ({idle}), half closed after {half_took:?} ({half})");
    assert!(
        idle_took >= std::time::Duration::from_secs(2)
            && idle_took < std::time::Duration::from_secs(5)
    );
    assert!(
        half_took >= std::time::Duration::from_secs(1)
            && half_took < std::time::Duration::from_secs(4)
    );
    let sessions = agent.sessions_until("two timed-out sessions", |s| {
        s.iter().filter(|x| x["outcome"] == "error").count() >= 2
    });
    let details: Vec<&str> = sessions.iter().map(|x| s(&x["detail"])).collect();
    assert!(
        details.iter().any(|d| d.contains("idle for 2 s")),
        "{details:?}"
    );
    assert!(
        details.iter().any(|d| d.contains("half closed for 1 s")),
        "{details:?}"
    );
}
