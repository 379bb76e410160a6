//! `cargo xtask bench l4`: the same loads directly and through the agent, in
//! one run, with the ratio of each figure.
//!
//! The load generator and the servers are this program itself, built in
//! release (`bench-client`, `bench-server` subcommands), so both paths are
//! measured with identical code; the through-agent client runs under
//! `interceptor exec` in a managed workload.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{agent::Agent, cargo, pg::free_port, require_root, root, run as run_cmd};

mod engine;
mod memory;
mod recorder;

const RR_RATE: u64 = 2000; // requests per second on the persistent connection
const RR_COUNT: u64 = 10_000;
/// Each load runs this many times per path, alternating direct and agent;
/// the report shows medians.
const ROUNDS: usize = 3;
const RR_SIZE: usize = 64;
const SAT_CONNS: usize = 32; // connections streaming at once
const SAT_SECS: u64 = 5;
const TX_CONNS: usize = 64; // connections doing request/response at once
const TX_SIZE: usize = 1024;
const BULK_BYTES: u64 = 1 << 30;
const CONNECTS: u64 = 2000;

pub fn run(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("l4") => {
            let (tuning, loads) = Tuning::parse(&args[1..])?;
            l4(&tuning, &loads)
        }
        Some("postgres") => {
            let (tuning, rest) = Tuning::parse(&args[1..])?;
            let tls_only = match rest.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                [] => false,
                ["tls"] => true,
                _ => bail!("bench postgres takes no loads but `tls` (got {rest:?})"),
            };
            require_root("cargo xtask bench")?;
            crate::setup::run()?;
            let agent_bin = crate::agent::build(true)?;
            if !tls_only {
                scratch("interceptor-pgbench", |dir| postgres(&tuning, &agent_bin, dir))?;
            }
            scratch("interceptor-pgbench-tls", |dir| {
                postgres_tls(&tuning, &agent_bin, dir)
            })
        }
        Some("memory") => {
            let (tuning, rest) = Tuning::parse(&args[1..])?;
            if !rest.is_empty() {
                bail!("bench memory takes no loads (got {rest:?})");
            }
            memory::memory(&tuning)
        }
        Some("engine") => {
            if args.len() > 1 {
                bail!("bench engine takes no arguments (got {:?})", &args[1..]);
            }
            engine::engine()
        }
        Some("recorder") => recorder::recorder(&args[1..]),
        Some("client") => client(&args[1..]),
        Some("server") => server(),
        _ => bail!(
            "usage: cargo xtask bench <l4 [SETTINGS] [LOAD…] | postgres [SETTINGS] [tls] | memory [SETTINGS] | engine | recorder [--statements N]> \
             (SETTINGS: --busy-poll-us N, --workers N)"
        ),
    }
}

/// Agent settings a bench run asks for (`--busy-poll-us N`, `--workers N`).
#[derive(Default)]
struct Tuning {
    /// Lines of the agent's `[agent]` section.
    lines: String,
    /// Data-plane threads asked for; the bare relay gets as many loop threads.
    workers: Option<usize>,
}

impl Tuning {
    /// The bench arguments' settings, and the other arguments.
    fn parse(args: &[String]) -> Result<(Tuning, Vec<String>)> {
        let (mut t, mut rest) = (Tuning::default(), Vec::new());
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut number = |what: &str| -> Result<u32> {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("{a} needs {what}"))
            };
            match a.as_str() {
                "--busy-poll-us" => {
                    let us = number("a number of microseconds")?;
                    t.lines.push_str(&format!("busy_poll_us = {us}\n"));
                }
                "--workers" => {
                    let n = number("a number of threads (at least 1)")?;
                    if n == 0 {
                        bail!("--workers needs a number of threads (at least 1)");
                    }
                    t.lines.push_str(&format!("workers = {n}\n"));
                    t.workers = Some(n as usize);
                }
                _ => rest.push(a.clone()),
            }
        }
        Ok((t, rest))
    }

    /// Loop threads of the bare relay: as many as the agent's workers.
    fn bare_threads(&self) -> usize {
        self.workers.unwrap_or_else(default_workers)
    }

    /// The header line naming non-default agent settings, if any.
    fn note(&self) -> String {
        if self.lines.is_empty() {
            String::new()
        } else {
            format!(
                "agent settings: {}\n",
                self.lines.trim_end().replace('\n', ", ")
            )
        }
    }
}

/// Release builds of the agent and of this program (the load generator and
/// servers), for benches of loads of our own: their paths.
fn release_builds() -> Result<(PathBuf, PathBuf)> {
    require_root("cargo xtask bench")?;
    crate::setup::run()?;
    let agent_bin = crate::agent::build(true)?;
    run_cmd(cargo().args(["build", "--release", "-p", "xtask"]))?;
    Ok((agent_bin, root().join("target/release/xtask")))
}

/// The echo and sink servers (`bench server`), in their own process outside
/// every workload; stopped on drop.
struct Servers {
    child: std::process::Child,
    echo: u16,
    sink: u16,
}

impl Servers {
    fn start(me: &Path) -> Result<Servers> {
        let mut child = Command::new(me)
            .args(["bench", "server"])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let mut ports = line.split_whitespace().map(str::parse::<u16>);
        match (ports.next(), ports.next()) {
            (Some(Ok(echo)), Some(Ok(sink))) => Ok(Servers { child, echo, sink }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("bench server said {line:?}")
            }
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `only`: names of loads to run (all when empty).
fn l4(tuning: &Tuning, only: &[String]) -> Result<()> {
    let (agent_bin, me) = release_builds()?;
    let dir = std::env::temp_dir().join(format!("interceptor-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let servers = Servers::start(&me)?;
    let (echo, sink) = (servers.echo, servers.sink);

    let config = bench_config(
        &dir,
        "interceptor-bench",
        &tuning.lines,
        &format!(
            "[[target]]\nname = \"echo\"\naddresses = [\"127.0.0.1:{echo}\"]\n\
             [[target]]\nname = \"sink\"\naddresses = [\"127.0.0.1:{sink}\"]\n"
        ),
    )?;
    let result = (|| -> Result<()> {
        let agent = Agent::start(&agent_bin, &config, &dir.join("agent.log"), false)?;
        // The agent's relay loop alone: what relaying costs here, before the agent's own work.
        let bare = Relays::bare(&agent_bin, &[echo, sink], tuning.bare_threads())?;
        // socat: a common general-purpose relay, for scale.
        let socat = Relays::socat(&[echo, sink]);
        println!(
            "interceptor bench l4 — direct, through the agent, through a bare relay and through \
             socat (release build, same run, median of {ROUNDS} alternating rounds)\n\
             bare relay: `interceptor bench-relay`, the agent's relay loop on {} thread(s) \
             and nothing else (no eBPF, identity, policy, recording)\n{}",
            tuning.bare_threads(),
            tuning.note()
        );
        let loads: [(&str, Vec<String>); 5] = [
            ("rr", vec![format!("127.0.0.1:{echo}")]),
            ("saturation", vec![format!("127.0.0.1:{sink}")]),
            ("transactions", vec![format!("127.0.0.1:{echo}")]),
            ("bulk", vec![format!("127.0.0.1:{sink}")]),
            ("connect", vec![format!("127.0.0.1:{echo}")]),
        ];
        println!(
            "{:<42} {:>14} | {:>18} | {:>18} | {:>18} | target (agent)",
            "figure", "direct", "agent (vs direct)", "bare (vs direct)", "socat (vs direct)"
        );
        for (load, args) in loads {
            if !only.is_empty() && !only.iter().any(|o| o == load) {
                continue;
            }
            let refs: Vec<Option<String>> = [Some(&bare), socat.as_ref()]
                .iter()
                .map(|r| r.map(|r| r.addr(&args[0])))
                .collect();
            let (mut direct, mut proxied) = (Vec::new(), Vec::new());
            let mut ref_runs = vec![Vec::new(); refs.len()];
            for _ in 0..ROUNDS {
                direct.push(measure(&me, None, load, &args)?);
                proxied.push(measure(&me, Some((&agent, &config)), load, &args)?);
                for (addr, runs) in refs.iter().zip(&mut ref_runs) {
                    if let Some(addr) = addr {
                        runs.push(measure(&me, None, load, std::slice::from_ref(addr))?);
                    }
                }
            }
            let (d, a) = (median(direct), median(proxied));
            let r: Vec<Option<Vec<(String, f64)>>> = ref_runs
                .into_iter()
                .map(|runs| (!runs.is_empty()).then(|| median(runs)))
                .collect();
            for row in rows(load) {
                print_row(&row, &d, &a, &r);
            }
        }
        drop(agent);
        Ok(())
    })();
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Reference relays in front of the bench servers.
struct Relays {
    children: Vec<std::process::Child>,
    /// (server port, relay port)
    ports: Vec<(u16, u16)>,
}

impl Relays {
    /// `socat`, one per server (`None` if socat is not installed).
    fn socat(servers: &[u16]) -> Option<Relays> {
        let mut r = Relays {
            children: Vec::new(),
            ports: Vec::new(),
        };
        for &port in servers {
            let listen = free_port().ok()?;
            let child = Command::new("socat")
                .arg(format!(
                    "TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr,nodelay,backlog=1024"
                ))
                .arg(format!("TCP:127.0.0.1:{port},nodelay"))
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            r.children.push(child);
            r.ports.push((port, listen));
        }
        thread::sleep(Duration::from_millis(300));
        Some(r)
    }

    /// The bare relay (`interceptor bench-relay`), one process per server,
    /// with `threads` loop threads.
    fn bare(agent_bin: &Path, servers: &[u16], threads: usize) -> Result<Relays> {
        let mut r = Relays {
            children: Vec::new(),
            ports: Vec::new(),
        };
        for &port in servers {
            let (child, listen) = bare_relay(agent_bin, &format!("127.0.0.1:{port}"), threads)?;
            r.children.push(child);
            r.ports.push((port, listen));
        }
        Ok(r)
    }

    /// The relay's address in front of `addr` (`127.0.0.1:PORT`).
    fn addr(&self, addr: &str) -> String {
        let port: u16 = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let via = self
            .ports
            .iter()
            .find(|(s, _)| *s == port)
            .map_or(0, |(_, l)| *l);
        format!("127.0.0.1:{via}")
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loop thread per CPU, as the agent has by default (one per worker).
fn default_workers() -> usize {
    thread::available_parallelism().map_or(1, usize::from)
}

/// Starts `interceptor bench-relay --to UPSTREAM --threads N`; returns it
/// and the port it listens on.
fn bare_relay(
    agent_bin: &Path,
    upstream: &str,
    threads: usize,
) -> Result<(std::process::Child, u16)> {
    let mut child = Command::new(agent_bin)
        .args(["bench-relay", "--to", upstream, "--threads"])
        .arg(threads.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the bare relay")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    match line.trim().parse() {
        Ok(port) => Ok((child, port)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("bare relay said {line:?}")
        }
    }
}

/// Policy of the benchmarks: workload `bench` may reach every target.
const BENCH_POLICY: &str =
    "[[rule]]\nid = \"bench\"\nworkloads = [\"bench\"]\ntargets = [\"*\"]\naction = \"allow\"\n";

/// Writes an agent config (managed workload `bench`, its own pins and
/// cgroups named `name`, `tuning` lines in `[agent]`, `targets` sections)
/// and the bench policy into `dir`.
fn bench_config(dir: &Path, name: &str, tuning: &str, targets: &str) -> Result<PathBuf> {
    std::fs::write(dir.join("policy.toml"), BENCH_POLICY)?;
    let config = dir.join("interceptor.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ntrust_domain = \"bench.local\"\nproxy_port = {}\npin_dir = \"/sys/fs/bpf/{name}\"\n\
             managed_cgroup_parent = \"{name}\"\npolicies = [\"policy.toml\"]\ndata_dir = \"{}\"\n{tuning}\
             [[workload]]\nname = \"bench\"\nmanaged = true\n{targets}",
            free_port()?,
            dir.join("data").display()
        ),
    )?;
    Ok(config)
}

/// Runs one load in a client process; returns its `key=value` figures.
fn measure(
    me: &Path,
    agent: Option<(&Agent, &PathBuf)>,
    load: &str,
    args: &[String],
) -> Result<Vec<(String, f64)>> {
    let mut cmd = match agent {
        Some((a, config)) => {
            let mut c = a.cli();
            c.arg("exec")
                .arg("--config")
                .arg(config)
                .args(["--workload", "bench", "--"])
                .arg(me);
            c
        }
        None => Command::new(me),
    };
    cmd.args(["bench", "client", load]).args(args);
    let out = cmd.output().context("running the bench client")?;
    if !out.status.success() {
        bail!(
            "bench client {load} ({}) failed: {}",
            if agent.is_some() { "agent" } else { "direct" },
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect())
}

/// Per-figure median over rounds.
fn median(rounds: Vec<Vec<(String, f64)>>) -> Vec<(String, f64)> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|(k, _)| {
            (
                k.clone(),
                middle(rounds.iter().map(|r| get(r, k)).collect()),
            )
        })
        .collect()
}

fn get(f: &[(String, f64)], k: &str) -> f64 {
    f.iter().find(|(n, _)| n == k).map_or(f64::NAN, |(_, v)| *v)
}

/// One line of the report: the same figure over the three paths.
struct Row {
    name: String,
    unit: &'static str,
    key: &'static str,
    /// Lower is better (latency) rather than higher (throughput).
    lower_better: bool,
    note: &'static str,
}

fn rows(load: &str) -> Vec<Row> {
    let row = |name: String, unit, key, lower_better, note| Row {
        name,
        unit,
        key,
        lower_better,
        note,
    };
    match load {
        "rr" => vec![
            row(
                format!("request/response p50 ({RR_RATE}/s, {RR_SIZE} B)"),
                "µs",
                "p50_us",
                true,
                "added ≤ 50 µs",
            ),
            row("request/response p99".into(), "µs", "p99_us", true, ""),
        ],
        "saturation" => vec![row(
            format!("saturation, {SAT_CONNS} conns streaming"),
            "Gb/s",
            "gbps",
            false,
            "ratio ≥ 0.8",
        )],
        "transactions" => vec![row(
            format!("transactions, {TX_CONNS} conns ping-pong {TX_SIZE} B"),
            "k/s",
            "ktps",
            false,
            "(per-message cost)",
        )],
        "bulk" => vec![row(
            "bulk single stream, 1 GiB".into(),
            "Gb/s",
            "gbps",
            false,
            "ratio ≥ 0.8",
        )],
        "connect" => vec![
            row(
                format!("connect() p50 ({CONNECTS} sequential)"),
                "µs",
                "p50_us",
                true,
                "added ≤ 150 µs",
            ),
            row("connect() p99".into(), "µs", "p99_us", true, ""),
        ],
        _ => vec![],
    }
}

fn print_row(
    r: &Row,
    d: &[(String, f64)],
    a: &[(String, f64)],
    refs: &[Option<Vec<(String, f64)>>],
) {
    let dv = get(d, r.key);
    let cell = |v: f64| {
        let delta = if r.lower_better {
            format!("{:+.1}", v - dv)
        } else {
            format!("×{:.2}", v / dv)
        };
        format!("{v:>9.1} {delta:>8}")
    };
    let others: Vec<String> = refs
        .iter()
        .map(|s| {
            s.as_ref()
                .map_or_else(|| format!("{:>18}", "-"), |s| cell(get(s, r.key)))
        })
        .collect();
    println!(
        "{:<42} {:>9.1} {:<4} | {} | {} | {}",
        r.name,
        dv,
        r.unit,
        cell(get(a, r.key)),
        others.join(" | "),
        r.note
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// The load generator; prints `key=value` figures.
fn client(args: &[String]) -> Result<()> {
    let (load, addr) = match args {
        [l, a, ..] => (l.as_str(), a.as_str()),
        _ => bail!("bench client LOAD ADDR"),
    };
    match load {
        "rr" => {
            let mut s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            let req = [7u8; RR_SIZE];
            let mut resp = [0u8; RR_SIZE];
            let gap = Duration::from_nanos(1_000_000_000 / RR_RATE);
            let mut lat = Vec::with_capacity(RR_COUNT as usize);
            let start = Instant::now();
            for i in 0..RR_COUNT + 500 {
                let due = start + gap * i as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
                let t = Instant::now();
                s.write_all(&req)?;
                s.read_exact(&mut resp)?;
                if i >= 500 {
                    // the first 500 warm up
                    lat.push(t.elapsed().as_nanos() as f64 / 1000.0);
                }
            }
            lat.sort_by(f64::total_cmp);
            println!(
                "p50_us={} p99_us={}",
                percentile(&lat, 0.5),
                percentile(&lat, 0.99)
            );
        }
        "saturation" => {
            let bytes = many(addr, SAT_CONNS, |s, stop| {
                let buf = vec![5u8; 64 * 1024];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&buf)?;
                    n += buf.len() as u64;
                }
                Ok(n)
            })?;
            println!("gbps={}", bytes as f64 * 8.0 / SAT_SECS as f64 / 1e9);
        }
        "transactions" => {
            let done = many(addr, TX_CONNS, |s, stop| {
                let buf = [1u8; TX_SIZE];
                let mut back = [0u8; TX_SIZE];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&buf)?;
                    s.read_exact(&mut back)?;
                    n += 1;
                }
                Ok(n)
            })?;
            println!("ktps={}", done as f64 / SAT_SECS as f64 / 1000.0);
        }
        "bulk" => {
            let mut s = TcpStream::connect(addr)?;
            let buf = vec![3u8; 1 << 20];
            let start = Instant::now();
            let mut left = BULK_BYTES;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                s.write_all(&buf[..n])?;
                left -= n as u64;
            }
            s.shutdown(Shutdown::Write)?;
            let mut ack = String::new();
            s.read_to_string(&mut ack)?;
            let secs = start.elapsed().as_secs_f64();
            if ack.trim().parse::<u64>().ok() != Some(BULK_BYTES) {
                bail!("sink received {ack:?} bytes, sent {BULK_BYTES}");
            }
            println!("gbps={}", BULK_BYTES as f64 * 8.0 / secs / 1e9);
        }
        "churn" | "hold" => {
            let n: u64 = args
                .get(2)
                .and_then(|n| n.parse().ok())
                .context("bench client churn|hold ADDR N")?;
            memory::load(load, addr, n)?;
        }
        "connect" => {
            let mut lat = Vec::with_capacity(CONNECTS as usize);
            for _ in 0..CONNECTS {
                let t = Instant::now();
                let s = TcpStream::connect(addr)?;
                lat.push(t.elapsed().as_nanos() as f64 / 1000.0);
                drop(s);
                thread::sleep(Duration::from_micros(200));
            }
            lat.sort_by(f64::total_cmp);
            println!(
                "p50_us={} p99_us={}",
                percentile(&lat, 0.5),
                percentile(&lat, 0.99)
            );
        }
        _ => bail!("unknown load {load}"),
    }
    Ok(())
}

/// Runs `work` on `conns` connections at once for [`SAT_SECS`]; sums what
/// each returns.
fn many(
    addr: &str,
    conns: usize,
    work: fn(&mut TcpStream, &AtomicBool) -> std::io::Result<u64>,
) -> Result<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    for _ in 0..conns {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        streams.push(s);
    }
    let threads: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let stop = stop.clone();
            thread::spawn(move || work(&mut s, &stop))
        })
        .collect();
    thread::sleep(Duration::from_secs(SAT_SECS));
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in threads {
        total += t.join().expect("client thread")?;
    }
    Ok(total)
}

/// Echo and sink servers on loopback; prints "ECHO_PORT SINK_PORT".
fn server() -> Result<()> {
    let echo = TcpListener::bind("127.0.0.1:0")?;
    let sink = TcpListener::bind("127.0.0.1:0")?;
    println!(
        "{} {}",
        echo.local_addr()?.port(),
        sink.local_addr()?.port()
    );
    std::io::stdout().flush()?;
    let e = thread::spawn(move || {
        for c in echo.incoming().flatten() {
            thread::spawn(move || {
                let _ = c.set_nodelay(true);
                let mut c = c;
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    for c in sink.incoming().flatten() {
        thread::spawn(move || {
            let mut c = c;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let _ = write!(c, "{total}");
        });
    }
    let _ = e.join();
    Ok(())
}

/// pgbench run length per configuration.
const PG_SECS: u32 = 5;
/// Rounds of the PostgreSQL bench: runs here vary by ±10% from one to the
/// next, so each path runs once per round and ratios are taken within rounds.
const PG_ROUNDS: usize = 7;

/// `cargo xtask bench postgres`: pgbench `-S` in every query mode at 1 and 8
/// clients, directly, through the agent (statements recorded) and through
/// pgbouncer in session mode, in one run.
fn postgres(tuning: &Tuning, agent_bin: &Path, dir: &Path) -> Result<()> {
    let db = crate::pg::Postgres::start(&dir.join("pg"))?;
    let conn = db.conninfo();
    run_cmd(
        Command::new("pgbench")
            .args(["-i", "-q", "-s", "10", &conn])
            .stderr(Stdio::null()),
    )?;
    let bouncer = Pgbouncer::start(&dir.join("bouncer"), db.port)?;
    let bare = Relays::bare(agent_bin, &[db.port], tuning.bare_threads())?;
    let config = bench_config(
        dir,
        "interceptor-pgbench",
        &tuning.lines,
        &format!(
            "[[target]]\nname = \"db\"\naddresses = [\"127.0.0.1:{}\"]\nprotocol = \"postgres\"\n\n\
             # Approvals on (for the review rows), with no network: keys from a file.\n\
             [approvals]\nissuer = \"https://id.bench.local\"\naudience = \"bench\"\njwks_file = \"jwks.json\"\n",
            db.port
        ),
    )?;
    std::fs::write(dir.join("jwks.json"), "{\"keys\": []}")?;
    let agent = Agent::start(agent_bin, &config, &dir.join("agent.log"), false)?;
    let (agent_pid, bouncer_pid) = (agent.pid(), bouncer.pid());
    let bare_pid = bare.children.first().map(std::process::Child::id);
    println!(
        "interceptor bench postgres — pgbench -S, {PG_SECS} s per run, scale 10 (release build, \
         same run, {PG_ROUNDS} rounds, each running every path once, starting with the next path)\n\
         median tps; the median over rounds of its ratio to direct in the same round; and the \
         median of the proxy's own CPU time per transaction (all its threads)\n\
         agent/pgb: the median over rounds of the agent's tps over pgbouncer's in the same round, \
         and in how many rounds the agent was ahead\n\
         bare relay: `interceptor bench-relay`, the agent's relay loop on {} thread(s) \
         moving bytes and nothing else (what relaying alone costs here)\n{}",
        tuning.bare_threads(),
        tuning.note()
    );
    println!(
        "{:<22} {:>10} | {:>28} | {:>28} | {:>28} | {:>9}",
        "mode, clients",
        "direct tps",
        "agent (vs direct) cpu/txn",
        "pgbouncer (vs direct) cpu/txn",
        "bare relay (vs direct) cpu/txn",
        "agent/pgb"
    );
    let bouncer_conn = conn.replace(
        &format!("port={}", db.port),
        &format!("port={}", bouncer.port),
    );
    let bare_conn = conn.replace(
        &format!("port={}", db.port),
        &format!("port={}", bare.ports[0].1),
    );
    // Per row, for the agent and (for scale) the bare relay.
    let (mut verdicts, mut bare_verdicts) = (Vec::new(), Vec::new());
    let mut budget_line = None;
    for mode in ["simple", "extended", "prepared"] {
        for clients in [1, 8] {
            let runs: [Vec<Costed>; 4] = in_rounds(PG_ROUNDS, |path| match path {
                0 => costed(None, || pgbench(None, &conn, mode, clients)),
                1 => costed(agent_pid, || {
                    pgbench(Some((&agent, &config)), &conn, mode, clients)
                }),
                2 => costed(bouncer_pid, || pgbench(None, &bouncer_conn, mode, clients)),
                _ => costed(bare_pid, || pgbench(None, &bare_conn, mode, clients)),
            })?;
            if mode == "simple" && clients == 8 {
                budget_line = budget("simple, 8", &runs);
            }
            let [d, a, b, r] = &runs;
            let row = format!("{mode}, {clients}");
            let (agent, bare) = (Verdict::of(&row, a, d, b), Verdict::of(&row, r, d, b));
            let (vs_pgb, ahead) = (agent.pgb, agent.ahead);
            verdicts.push(agent);
            bare_verdicts.push(bare);
            println!(
                "{:<22} {:>10.0} | {} | {} | {} | {:>9}",
                format!("{mode}, {clients}"),
                middle(d.iter().map(|c| c.tps).collect()),
                proxied(a, d),
                proxied(b, d),
                proxied(r, d),
                format!("×{vs_pgb:.2} {ahead}/{PG_ROUNDS}"),
            );
        }
    }
    // Once more with a masking rule on the column pgbench -S reads.
    std::fs::write(
        dir.join("policy.toml"),
        format!("{BENCH_POLICY}\n\
         [[rule]]\nid = \"mask-balance\"\non = \"statement\"\nworkloads = [\"bench\"]\ntargets = [\"*\"]\n\
         action = \"mask\"\ncolumns = [\"abalance\"]\nstrategy = \"redact\"\n"),
    )?;
    agent.reload()?;
    for mode in ["simple", "prepared"] {
        let (mut d, mut m) = (Vec::new(), Vec::new());
        for round in 0..PG_ROUNDS {
            let direct = || costed(None, || pgbench(None, &conn, mode, 8));
            let masked = || {
                costed(agent_pid, || {
                    pgbench(Some((&agent, &config)), &conn, mode, 8)
                })
            };
            if round % 2 == 0 {
                d.push(direct()?);
                m.push(masked()?);
            } else {
                m.push(masked()?);
                d.push(direct()?);
            }
        }
        println!(
            "{:<22} {:>10.0} | {} | {:>28} | {:>28} | {:>9}",
            format!("{mode}, 8, masking"),
            middle(d.iter().map(|c| c.tps).collect()),
            proxied(&m, &d),
            "-",
            "-",
            "-"
        );
    }
    // Review costs nothing where it does not apply: the agent with a
    // review rule that matches none of pgbench -S's statements (writes
    // to its tables), against the agent without it, in the same rounds.
    let with_review = format!(
        "{BENCH_POLICY}\n[[rule]]\nid = \"review-writes\"\non = \"statement\"\nworkloads = [\"bench\"]\n\
         targets = [\"*\"]\nclasses = [\"write\", \"ddl\"]\ntables = [\"pgbench_*\"]\naction = \"review\"\n\
         approvers = [{{ groups = [\"dba\"] }}]\n"
    );
    println!(
        "\nthe agent with a review rule that matches no statement of the run, against the agent \
         without it (same rounds, the policy reloaded between runs):"
    );
    for mode in ["simple", "prepared"] {
        let (mut plain, mut review) = (Vec::new(), Vec::new());
        for round in 0..PG_ROUNDS {
            for k in 0..2 {
                let on = (round + k) % 2 == 1;
                let policy = if on {
                    with_review.as_str()
                } else {
                    BENCH_POLICY
                };
                std::fs::write(dir.join("policy.toml"), policy)?;
                agent.reload()?;
                let run = costed(agent_pid, || {
                    pgbench(Some((&agent, &config)), &conn, mode, 8)
                })?;
                if on { &mut review } else { &mut plain }.push(run);
            }
        }
        println!(
            "{:<22} {:>10.0} | {} | {:>28} | {:>28} | {:>9}",
            format!("{mode}, 8, review rule"),
            middle(plain.iter().map(|c| c.tps).collect()),
            proxied(&review, &plain),
            "(first column: agent",
            "without the rule)",
            "-"
        );
    }
    if let Some(line) = budget_line {
        println!("\n{line}");
    }
    println!("\ntarget: agent {}", Verdict::targets(&verdicts));
    println!(
        "for scale, the bare relay (no policy, no recording) by the same measures: {}",
        Verdict::targets(&bare_verdicts)
    );
    drop(agent);
    Ok(())
}

/// Rounds of the TLS rows of the PostgreSQL bench.
const TLS_ROUNDS: usize = 5;

/// `cargo xtask bench postgres tls` (and the end of `bench postgres`):
/// what TLS costs through the agent. A PostgreSQL that takes TLS alone
/// (`hostssl`), pgbench -S directly with `sslmode=require`; through the
/// agent with the application in plaintext and the agent's TLS to the
/// server (verify-full); and with the application's TLS terminated by the
/// agent too (`sslmode=require`; the agent logs in with its password).
fn postgres_tls(tuning: &Tuning, agent_bin: &Path, dir: &Path) -> Result<()> {
    let (ca, cert, key) = crate::pg::test_certificate(dir, "db");
    let db = crate::pg::Postgres::start_tls(
        &dir.join("pg"),
        (
            &std::fs::read_to_string(cert)?,
            &std::fs::read_to_string(key)?,
        ),
    )?;
    let conn = format!("{} sslmode=require", db.conninfo());
    run_cmd(
        Command::new("pgbench")
            .args(["-i", "-q", "-s", "10", &conn])
            .stderr(Stdio::null()),
    )?;
    let config = bench_config(
        dir,
        "interceptor-pgbench-tls",
        &format!("{}\n[agent.tls]\nmode = \"terminate\"\n", tuning.lines),
        &format!(
            "[[target]]\nname = \"db\"\naddresses = [\"127.0.0.1:{}\"]\nprotocol = \"postgres\"\n\
             tls = {{ mode = \"verify-full\", ca_file = \"{}\" }}\n",
            db.port,
            ca.display()
        ),
    )?;
    let mut init = Command::new(agent_bin);
    init.args(["ca", "init", "--config"]).arg(&config);
    run_cmd(init.stdout(Stdio::null()).stderr(Stdio::null()))?;
    let agent = Agent::start(agent_bin, &config, &dir.join("agent.log"), false)?;
    let agent_pid = agent.pid();
    let plain = db.conninfo() + " sslmode=disable";
    println!(
        "\ninterceptor bench postgres tls — pgbench -S, {PG_SECS} s per run, a PostgreSQL that takes \
         TLS alone (TLS 1.3, P-256 certificate), {TLS_ROUNDS} rounds, each running every path once\n\
         upstream TLS: the application in plaintext on the host's loopback, the agent's TLS to the \
         server (verify-full)\nterminated: the application's TLS (sslmode=require) ended by the \
         agent with a certificate of its node CA, and the agent's TLS to the server\n{}",
        tuning.note()
    );
    println!(
        "{:<16} {:>14} | {:>34} | {:>34}",
        "mode, clients",
        "direct TLS tps",
        "agent, upstream TLS (vs direct TLS)",
        "agent, terminated (vs direct TLS)"
    );
    for mode in ["simple", "prepared"] {
        for clients in [1, 8] {
            let runs: [Vec<Costed>; 3] = in_rounds(TLS_ROUNDS, |path| match path {
                0 => costed(None, || pgbench(None, &conn, mode, clients)),
                1 => costed(agent_pid, || {
                    pgbench(Some((&agent, &config)), &plain, mode, clients)
                }),
                _ => costed(agent_pid, || {
                    pgbench(Some((&agent, &config)), &conn, mode, clients)
                }),
            })?;
            let [d, u, t] = &runs;
            println!(
                "{:<16} {:>14.0} | {:>34} | {:>34}",
                format!("{mode}, {clients}"),
                middle(d.iter().map(|c| c.tps).collect()),
                proxied(u, d),
                proxied(t, d),
            );
        }
    }
    drop(agent);
    Ok(())
}

/// `rounds` rounds of every one of `N` paths (`run(path)`), each round
/// starting with the next path so no path always follows the same one:
/// the runs of each path.
fn in_rounds<const N: usize>(
    rounds: usize,
    mut run: impl FnMut(usize) -> Result<Costed>,
) -> Result<[Vec<Costed>; N]> {
    let mut runs: [Vec<Costed>; N] = std::array::from_fn(|_| Vec::new());
    for round in 0..rounds {
        for k in 0..N {
            let path = (round + k) % N;
            runs[path].push(run(path)?);
        }
    }
    Ok(runs)
}

/// Runs `bench` in a new directory `/tmp/<name>-<pid>`, removed after.
fn scratch(name: &str, bench: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = bench(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The median of a few runs.
fn middle(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// One run: tps, the proxy's CPU microseconds per transaction, and the
/// whole machine's (client, server, proxy and anything else).
struct Costed {
    tps: f64,
    cpu_us: Option<f64>,
    machine: Option<Machine>,
}

/// The whole machine's CPU over one run.
#[derive(Clone, Copy)]
struct Machine {
    /// Busy CPU time (all CPUs) per transaction, in microseconds.
    busy_us: f64,
    /// Share of the CPUs' time they were idle.
    idle: f64,
}

/// Runs `run` (which returns tps) and charges the CPU time process `pid`
/// used meanwhile, and the machine's, to the transactions of the run.
fn costed(pid: Option<u32>, run: impl FnOnce() -> Result<f64>) -> Result<Costed> {
    let (before, machine_before) = (pid.and_then(cpu_secs), machine_secs());
    let tps = run()?;
    let (after, machine_after) = (pid.and_then(cpu_secs), machine_secs());
    let per_txn = |secs: f64| secs * 1e6 / (tps * PG_SECS as f64);
    let cpu_us = match (before, after) {
        (Some(b), Some(a)) if tps > 0.0 => Some(per_txn(a - b)),
        _ => None,
    };
    let machine = match (machine_before, machine_after) {
        (Some((b_busy, b_idle)), Some((a_busy, a_idle))) if tps > 0.0 => {
            let (busy, idle) = (a_busy - b_busy, a_idle - b_idle);
            Some(Machine {
                busy_us: per_txn(busy),
                idle: idle / (busy + idle).max(f64::MIN_POSITIVE),
            })
        }
        _ => None,
    };
    Ok(Costed {
        tps,
        cpu_us,
        machine,
    })
}

/// Seconds the machine's CPUs have been busy and idle so far, all CPUs
/// summed (`/proc/stat`; idle counts I/O wait, busy leaves out time stolen
/// by the hypervisor).
fn machine_secs() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq …, in USER_HZ (100) ticks.
    let at = |i: usize| ticks.get(i).copied();
    let busy = at(0)? + at(1)? + at(2)? + at(5)? + at(6)?;
    let idle = at(3)? + at(4)?;
    Some((busy / 100.0, idle / 100.0))
}

/// What the ×0.8 target leaves a proxy to spend at one row, against what
/// each proxy made the whole machine spend. With the CPUs saturated, tps is
/// the machine's CPU over its CPU time per transaction, so a proxy reaches
/// ×0.8 only if it adds at most a quarter of the direct path's CPU time per
/// transaction: its own, and any more it makes the client and server spend.
fn budget(row: &str, runs: &[Vec<Costed>; 4]) -> Option<String> {
    let [d, a, b, r] = runs;
    let busy = |runs: &[Costed]| -> Option<Vec<f64>> {
        runs.iter().map(|c| c.machine.map(|m| m.busy_us)).collect()
    };
    let direct = busy(d)?;
    let idle = |runs: &[Costed]| -> Option<f64> {
        let idle: Option<Vec<f64>> = runs.iter().map(|c| c.machine.map(|m| m.idle)).collect();
        Some(middle(idle?) * 100.0)
    };
    let added = |name: &str, runs: &[Costed]| -> Option<String> {
        let added = busy(runs)?
            .iter()
            .zip(&direct)
            .map(|(p, d)| p - d)
            .collect();
        let own: Vec<f64> = runs.iter().filter_map(|c| c.cpu_us).collect();
        let own = if own.is_empty() {
            String::new()
        } else {
            format!("{:.0} its own, ", middle(own))
        };
        Some(format!(
            "{name} {:.0} µs ({own}CPUs idle {:.0}%)",
            middle(added),
            idle(runs)?
        ))
    };
    let base = middle(direct.clone());
    Some(format!(
        "machine CPU per transaction at {row} (all CPUs, medians; what a proxy adds is paired \
         with direct by round):\n  direct {base:.0} µs (CPUs idle {:.0}%); added by {}, {}, {}\n  \
         with the CPUs busy, ×0.8 of direct leaves a proxy {:.0} µs to add per transaction on \
         this machine",
        idle(d)?,
        added("the agent", a)?,
        added("pgbouncer", b)?,
        added("the bare relay", r)?,
        base / 4.0,
    ))
}

/// How a proxy fared at one row, against the targets.
struct Verdict {
    row: String,
    /// The median over rounds of its tps over direct's.
    direct: f64,
    /// The median over rounds of its tps over pgbouncer's.
    pgb: f64,
    /// Rounds in which it was ahead of pgbouncer.
    ahead: usize,
}

impl Verdict {
    fn of(row: &str, runs: &[Costed], direct: &[Costed], pgb: &[Costed]) -> Verdict {
        Verdict {
            row: row.to_owned(),
            direct: paired(runs, direct),
            pgb: paired(runs, pgb),
            ahead: runs.iter().zip(pgb).filter(|(r, b)| r.tps > b.tps).count(),
        }
    }

    /// The targets (≥ 0.8× direct at simple, 8; never behind pgbouncer by
    /// the median), and whether `rows` meet them.
    fn targets(rows: &[Verdict]) -> String {
        let simple8 = rows
            .iter()
            .find(|v| v.row == "simple, 8")
            .map_or(0.0, |v| v.direct);
        let behind: Vec<String> = rows
            .iter()
            .filter(|v| v.pgb < 1.0)
            .map(|v| {
                format!(
                    "{} (×{:.2}, ahead in {}/{PG_ROUNDS} rounds)",
                    v.row, v.pgb, v.ahead
                )
            })
            .collect();
        format!(
            "≥ 0.8× direct at 8 clients (simple): ×{simple8:.2} ({}); never behind pgbouncer: {}",
            if simple8 >= 0.8 { "met" } else { "not met" },
            if behind.is_empty() {
                "met".to_owned()
            } else {
                format!("not met, behind at {}", behind.join("; "))
            }
        )
    }
}

/// The median over rounds of `a`'s tps over `b`'s in the same round.
fn paired(a: &[Costed], b: &[Costed]) -> f64 {
    middle(a.iter().zip(b).map(|(a, b)| a.tps / b.tps).collect())
}

/// Median tps, the median of its ratio to `direct` in the same round, and
/// the median CPU per transaction.
fn proxied(runs: &[Costed], direct: &[Costed]) -> String {
    let tps = middle(runs.iter().map(|r| r.tps).collect());
    let ratio = paired(runs, direct);
    let cpu: Vec<f64> = runs.iter().filter_map(|r| r.cpu_us).collect();
    let cpu = if cpu.is_empty() {
        "-".to_owned()
    } else {
        format!("{:.1} µs", middle(cpu))
    };
    format!("{tps:>9.0} {:>7} {cpu:>10}", format!("×{ratio:.2}"))
}

/// User plus system CPU time of process `pid`, all its threads, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start with the
    // state (field 3); utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux architecture this runs on.
    Some(ticks / 100.0)
}

/// Runs pgbench (through the agent when given) and returns its tps.
fn pgbench(agent: Option<(&Agent, &PathBuf)>, conn: &str, mode: &str, clients: u32) -> Result<f64> {
    let mut cmd = match agent {
        Some((a, config)) => {
            let mut c = a.cli();
            c.arg("exec").arg("--config").arg(config).args([
                "--workload",
                "bench",
                "--",
                "pgbench",
            ]);
            c
        }
        None => Command::new("pgbench"),
    };
    let c = clients.to_string();
    cmd.args([
        "-n",
        "-S",
        "-M",
        mode,
        "-c",
        &c,
        "-j",
        &c,
        "-T",
        &PG_SECS.to_string(),
        conn,
    ]);
    let out = cmd.output().context("running pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench {mode} -c {clients} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("tps = ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .with_context(|| format!("no tps in pgbench output: {text}"))
}

/// pgbouncer in session mode in front of the bench PostgreSQL.
struct Pgbouncer {
    port: u16,
    child: std::process::Child,
}

impl Pgbouncer {
    /// pgbouncer's own process id (a child of the `runuser` we started).
    fn pid(&self) -> Option<u32> {
        let me = self.child.id();
        std::fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    fn start(dir: &Path, pg_port: u16) -> Result<Pgbouncer> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let userlist = dir.join("userlist.txt");
        std::fs::write(
            &userlist,
            format!("\"{}\" \"{}\"\n", crate::pg::USER, crate::pg::PASSWORD),
        )?;
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={pg_port} dbname=postgres\n\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = scram-sha-256\nauth_file = {}\npool_mode = session\n\
                 max_client_conn = 200\ndefault_pool_size = 50\nlogfile = {}\n",
                userlist.display(),
                dir.join("pgbouncer.log").display()
            ),
        )?;
        run_cmd(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir),
        )?;
        // pgbouncer refuses to run as root.
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--", "pgbouncer"])
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting pgbouncer")?;
        for _ in 0..50 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Pgbouncer { port, child });
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "pgbouncer did not start; see {}",
            dir.join("pgbouncer.log").display()
        )
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        // This run's pgbouncer only (not others on the machine), then the
        // `runuser` waiting for it (which passes SIGTERM on, if pgbouncer
        // could not be found).
        let pid = self.pid().unwrap_or(self.child.id());
        let _ = Command::new("kill").arg(pid.to_string()).status();
        let _ = self.child.wait();
    }
}
