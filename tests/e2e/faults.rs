//! Faults under load: the agent killed while pgbench runs through it.

use std::{
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{enforcement::direct, pgbench_init, s};

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// How many lines of the server's log say a connection was received.
fn connections_received(server_log: &std::path::Path) -> usize {
    std::fs::read_to_string(server_log)
        .unwrap_or_default()
        .matches("connection received")
        .count()
}

/// Completion times (µs since the epoch) of the transactions pgbench logged
/// (`-l`: `client txn latency script epoch_s epoch_us` per line).
fn pgbench_transactions(dir: &std::path::Path, prefix: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if !e.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        for line in std::fs::read_to_string(e.path()).unwrap().lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(s), Some(us)) = (f.get(4), f.get(5)) {
                out.push(s.parse::<u64>().unwrap() * 1_000_000 + us.parse::<u64>().unwrap());
            }
        }
    }
    out
}

/// SIGKILL while pgbench runs through the agent: no connect reaches the
/// server while it is down (the server's `log_connections` says so), the
/// statements answered before the documented window are all recorded, and
/// the interrupted sessions carry their true counts and their last moment
/// as their end.
#[test]
fn sigkill_under_pgbench_fails_closed_and_keeps_true_counts() {
    const CLIENTS: usize = 4;
    let (dir, db, mut agent) = super::postgres_and_agent("kill");
    let server_log = dir.join("server.log");
    direct(&db, "ALTER SYSTEM SET log_connections = on");
    direct(&db, "SELECT pg_reload_conf()");
    let conn = db.conninfo();
    pgbench_init(&conn);
    let logs = dir.join("pgbench-log");
    std::fs::create_dir_all(&logs).unwrap();
    let prefix = logs.join("tx");
    let bench = super::pg_tool_command(
        &agent,
        "pgbench",
        &[
            "-n",
            "-S",
            "-c",
            &CLIENTS.to_string(),
            "-j",
            "1",
            "-T",
            "30",
            "-l",
            "--log-prefix",
            prefix.to_str().unwrap(),
            &conn,
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));

    let killed_at = now_micros();
    agent.kill9();
    let bench = bench.wait_with_output().unwrap();
    let bench_err = String::from_utf8_lossy(&bench.stderr).into_owned();
    assert!(
        !bench.status.success(),
        "pgbench outlived the agent: {bench_err}"
    );

    // While the agent is down: connects of the workload fail, and none
    // reaches the server.
    std::thread::sleep(Duration::from_millis(300));
    let received = connections_received(&server_log);
    assert!(received > CLIENTS, "log_connections is not on");
    for _ in 0..3 {
        let out = super::pg_tool(&agent, "psql", &[&conn, "-X", "-c", "select 1"]);
        assert!(
            !out.status.success(),
            "psql got through with the agent down"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        connections_received(&server_log),
        received,
        "a connect reached the server while the agent was down"
    );

    // Restarted a while later: the open sessions are interrupted, with
    // their true counts, ending at their last recorded moment.
    std::thread::sleep(Duration::from_secs(1));
    let restarted_at = now_micros();
    agent.spawn();
    let sessions = agent.sessions();
    let interrupted: Vec<_> = sessions
        .iter()
        .filter(|x| x["outcome"] == "interrupted")
        .collect();
    assert_eq!(interrupted.len(), CLIENTS, "{sessions:#?}");
    let done = pgbench_transactions(&logs, "tx");
    let mut recorded = 0;
    let mut last_end = 0;
    for x in &interrupted {
        let show = agent.cli(&["sessions", "show", s(&x["id"]), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
        let events = v["statement_events"].as_array().unwrap();
        assert_eq!(x["statements"], events.len(), "{x:#}");
        assert!(!events.is_empty(), "{x:#}");
        assert!(
            x["bytes_up"].as_u64().unwrap() > 0 && x["bytes_down"].as_u64().unwrap() > 0,
            "{x:#}"
        );
        let end = interceptor::record::parse_rfc3339_micros(s(&x["ended_at"])).unwrap();
        assert!(
            end <= killed_at + 100_000 && end < restarted_at,
            "the end is not the last moment known: {x:#}"
        );
        last_end = last_end.max(end);
        recorded += events.len();
    }
    // Every transaction answered before the documented window (the README:
    // "about 250 ms") is recorded; none beyond what pgbench saw.
    let window = 250_000;
    let before_window = done.iter().filter(|&&t| t + window < killed_at).count();
    eprintln!(
        "pgbench answered {} transactions, {before_window} of them over {window} µs before the kill; \
         the store holds {recorded}; the last recorded moment is {} µs before the kill",
        done.len(),
        killed_at.saturating_sub(last_end)
    );
    assert!(
        recorded >= before_window,
        "statements answered before the window are missing: {recorded} < {before_window}"
    );
    assert!(recorded <= done.len(), "{recorded} > {}", done.len());
    assert!(killed_at - last_end < 1_000_000);
}
