//! `cargo xtask bench engine`: what the PostgreSQL machines cost per
//! `pgbench -S` transaction, with no socket, client or server in the way
//! (`interceptor bench-engine`, the harness in
//! `interceptor/src/protocol/postgres/harness.rs`): nanoseconds (median of
//! five runs) and instructions (callgrind, the difference between a long
//! and a short run, so start-up costs cancel out).

use std::process::Command;

use anyhow::{bail, Context, Result};

const MODES: [&str; 3] = ["simple", "extended", "prepared"];
const TIMED_TXNS: u32 = 200_000;
const RUNS: usize = 5;
const SHORT: u32 = 2_000;
const LONG: u32 = 12_000;

pub fn engine() -> Result<()> {
    crate::require_root("cargo xtask bench engine")?;
    crate::setup::run()?;
    let bin = crate::agent::build(true)?;
    println!(
        "interceptor bench engine — pgbench -S traffic through the two PostgreSQL machines of one \
         connection, in process (classification, decision and recording on; release build)"
    );
    println!(
        "(+ review: with a review rule that matches none of the traffic, which must cost nothing)"
    );
    println!("mode                 ns/txn (median of {RUNS} × {TIMED_TXNS})   instructions/txn (callgrind)");
    for (mode, review) in MODES.into_iter().flat_map(|m| [(m, false), (m, true)]) {
        let extra: &[&str] = if review { &["--review"] } else { &[] };
        let mut ns = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let out = Command::new(&bin)
                .args(["bench-engine", "--mode", mode, "--txns"])
                .arg(TIMED_TXNS.to_string())
                .args(extra)
                .output()
                .context("running interceptor bench-engine")?;
            if !out.status.success() {
                bail!(
                    "bench-engine {mode}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let text = String::from_utf8_lossy(&out.stdout);
            ns.push(
                text.trim()
                    .parse::<f64>()
                    .context("bench-engine's figure")?,
            );
        }
        ns.sort_by(f64::total_cmp);
        let instructions = match (
            callgrind(&bin, mode, SHORT, extra)?,
            callgrind(&bin, mode, LONG, extra)?,
        ) {
            (Some(short), Some(long)) => {
                format!("{:.0}", (long - short) as f64 / f64::from(LONG - SHORT))
            }
            _ => "n/a (no valgrind)".into(),
        };
        let name = if review {
            format!("{mode} + review")
        } else {
            mode.to_owned()
        };
        println!(
            "{name:<20} {:>8.0}                          {instructions}",
            ns[RUNS / 2]
        );
    }
    Ok(())
}

/// Instructions the whole run of `txns` transactions took (callgrind's
/// "Collected"), or `None` without valgrind.
fn callgrind(bin: &std::path::Path, mode: &str, txns: u32, extra: &[&str]) -> Result<Option<u64>> {
    let out = match Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(bin)
        .args(["bench-engine", "--mode", mode, "--txns"])
        .arg(txns.to_string())
        .args(extra)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("running valgrind"),
    };
    if !out.status.success() {
        bail!("callgrind {mode}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let collected = err
        .lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .with_context(|| format!("no `Collected` line from callgrind: {err}"))?;
    Ok(Some(collected))
}
