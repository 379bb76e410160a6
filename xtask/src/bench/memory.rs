//! `cargo xtask bench memory`: the agent's resident memory after many
//! sessions, and per idle connection beside the bare relay's, in one run.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{bare_relay, bench_config, release_builds, Servers, Tuning};
use crate::agent::Agent;

/// Sessions opened and closed through the agent before its memory is read.
const SESSIONS: u64 = 100_000;
/// Connections held open, idle, while it is read again.
const IDLE: usize = 2_000;
/// Goal for the agent's memory per idle connection.
const GOAL_PER_CONN: f64 = 16.0 * 1024.0;

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// The bench client `args`, in workload `bench` when `agent` is given,
/// with room for thousands of sockets.
fn client(me: &Path, agent: Option<(&Agent, &Path)>, args: &[String]) -> Command {
    let mut c = match agent {
        Some((a, config)) => {
            let mut c = a.cli();
            c.arg("exec")
                .arg("--config")
                .arg(config)
                .args(["--workload", "bench", "--", "sh"]);
            c
        }
        None => Command::new("sh"),
    };
    c.args(["-c", "ulimit -n 16384 && exec \"$0\" \"$@\""])
        .arg(me)
        .args(["bench", "client"])
        .args(args);
    c
}

/// Opens [`IDLE`] connections through `agent` (or to `addr` directly)
/// and returns the client holding them, once they are all open.
fn hold(me: &Path, agent: Option<(&Agent, &Path)>, addr: &str) -> Result<Child> {
    let mut child = client(me, agent, &["hold".into(), addr.into(), IDLE.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    if line.trim() != format!("held={IDLE}") {
        let _ = child.kill();
        bail!("hold client said {line:?}");
    }
    // Let the agent's side settle (records written, buffers shrunk).
    thread::sleep(Duration::from_secs(2));
    Ok(child)
}

fn release(mut child: Child) -> Result<()> {
    drop(child.stdin.take());
    child.wait()?;
    Ok(())
}

pub fn memory(tuning: &Tuning) -> Result<()> {
    let (agent_bin, me) = release_builds()?;
    let dir = std::env::temp_dir().join(format!("interceptor-bench-mem-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let servers = Servers::start(&me)?;
    let addr = format!("127.0.0.1:{}", servers.echo);
    let config = bench_config(
        &dir,
        "interceptor-bench-mem",
        &tuning.lines,
        &format!("[[target]]\nname = \"echo\"\naddresses = [\"{addr}\"]\n"),
    )?;
    let result = (|| -> Result<()> {
        let agent = Agent::start(&agent_bin, &config, &dir.join("agent.log"), false)?;
        let pid = agent.pid().context("agent pid")?;
        thread::sleep(Duration::from_secs(1));
        let start = rss(pid)?;
        // Idle connections first, on a fresh heap: after many sessions the
        // allocator holds freed memory that new connections would reuse.
        let held = hold(&me, Some((&agent, &config)), &addr)?;
        let idle = rss(pid)?;
        release(held)?;
        let t = Instant::now();
        let churn = ["churn".to_string(), addr.clone(), SESSIONS.to_string()];
        let out = client(&me, Some((&agent, &config)), &churn).output()?;
        if !out.status.success() {
            bail!("churn failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let churn_secs = t.elapsed().as_secs_f64();
        thread::sleep(Duration::from_secs(2));
        let after = rss(pid)?;

        let (mut bare, port) = bare_relay(&agent_bin, &addr, tuning.bare_threads())?;
        thread::sleep(Duration::from_millis(500));
        let bare_before = rss(bare.id())?;
        let held = hold(&me, None, &format!("127.0.0.1:{port}"))?;
        let bare_idle = rss(bare.id())?;
        release(held)?;
        let _ = bare.kill();
        let _ = bare.wait();

        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let per_agent = idle.saturating_sub(start) as f64 / IDLE as f64;
        let per_bare = bare_idle.saturating_sub(bare_before) as f64 / IDLE as f64;
        println!(
            "interceptor bench memory — the agent's resident memory (VmRSS), release build, same run"
        );
        println!(
            "at start {:.1} MiB; then {IDLE} idle connections, closed; then {SESSIONS} sessions \
             ({:.0} s, {:.0} sessions/s): {:.1} MiB",
            mib(start),
            churn_secs,
            SESSIONS as f64 / churn_secs,
            mib(after)
        );
        println!(
            "{IDLE} idle connections: {:.1} KiB each through the agent ({:.1} MiB in all), \
             {:.1} KiB each through the bare relay: ×{:.2} of the bare relay",
            per_agent / 1024.0,
            mib(idle),
            per_bare / 1024.0,
            if per_bare > 0.0 {
                per_agent / per_bare
            } else {
                f64::NAN
            }
        );
        println!(
            "target ≤ {:.0} KiB per idle connection: {}",
            GOAL_PER_CONN / 1024.0,
            if per_agent <= GOAL_PER_CONN {
                "met"
            } else {
                "not met"
            }
        );
        Ok(())
    })();
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `bench client churn ADDR N`: N sessions, 8 at a time, each one echo
/// round trip. `bench client hold ADDR N`: N connections, each one echo
/// round trip, then held open until stdin closes.
pub fn load(load: &str, addr: &str, n: u64) -> Result<()> {
    fn once(s: &mut TcpStream) -> std::io::Result<()> {
        let mut back = [0u8; 16];
        s.write_all(&[9u8; 16])?;
        s.read_exact(&mut back)
    }
    match load {
        "churn" => {
            let threads: Vec<_> = (0..8)
                .map(|i| {
                    let addr = addr.to_owned();
                    thread::spawn(move || -> std::io::Result<()> {
                        for _ in (i..n).step_by(8) {
                            let mut s = TcpStream::connect(&addr)?;
                            once(&mut s)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for t in threads {
                t.join().expect("churn thread")?;
            }
        }
        "hold" => {
            let mut held = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let mut s = TcpStream::connect(addr)?;
                once(&mut s)?;
                held.push(s);
            }
            println!("held={n}");
            std::io::stdout().flush()?;
            let mut rest = Vec::new();
            std::io::stdin().read_to_end(&mut rest)?;
        }
        _ => bail!("unknown load {load}"),
    }
    Ok(())
}
