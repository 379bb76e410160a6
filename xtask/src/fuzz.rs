//! `cargo xtask fuzz [SECONDS]`: coverage-guided fuzzing (cargo-fuzz,
//! libFuzzer, AddressSanitizer) of what reads untrusted bytes: the
//! PostgreSQL relay in both directions (the wire machines with a gate of
//! their own that holds statements, and with the agent's gate and
//! policy), the SQL classifier, redactor and classification cache key,
//! the cache key against PostgreSQL's own lexer (`key`, a differential
//! fuzzer), the stored form of recorded statements, and what `verify`
//! reads from others (export bundles, log entries, signed checkpoints), and
//! what TLS brings (records from an application whose TLS the agent
//! terminates, servers' certificates and SCRAM messages: `tls_peer`).
//! Each target runs SECONDS (default 60) from the seeds in its fuzz
//! directory's `seeds` plus the corpus it has grown in its `corpus`; a
//! crash, a broken invariant or a hang fails the task and leaves the input
//! in its `artifacts`. The SQL, record and wire crates' targets live in
//! their crates' `fuzz` directories (they build without the agent), the
//! agent's in `fuzz`. All build into one target directory
//! (`target/fuzz`), so what they share is built once.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{root, run};

/// Fuzz directories and their targets.
pub const TARGETS: &[(&str, &[&str])] = &[
    ("interceptor-sql/fuzz", &["sql", "key"]),
    ("interceptor-record/fuzz", &["store", "bundle"]),
    ("interceptor-wire/fuzz", &["machines"]),
    ("fuzz", &["pg_relay", "tls_peer"]),
];

pub fn run_all(seconds: u64) -> Result<()> {
    cargo_fuzz()?;
    for (dir, targets) in TARGETS {
        let dir = root().join(dir);
        for target in *targets {
            fuzz(&dir, target, seconds)?;
        }
    }
    Ok(())
}

/// Runs `target` of the fuzz directory `dir` for `seconds`.
fn fuzz(dir: &std::path::Path, target: &str, seconds: u64) -> Result<()> {
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    eprintln!("fuzz: {target} for {seconds} s");
    run(nightly(dir)
        .args(["fuzz", "run", "-O", target, "--target-dir"])
        .arg(root().join("target/fuzz"))
        .arg(&corpus)
        .arg(dir.join("seeds").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args(["-rss_limit_mb=4096", "-timeout=10", "-print_final_stats=1"]))
}

/// cargo through rustup's proxy with the nightly toolchain (sanitizers).
fn nightly(dir: &std::path::Path) -> Command {
    let mut c = Command::new("cargo");
    c.arg("+nightly")
        .current_dir(dir)
        .env_remove("RUSTUP_TOOLCHAIN");
    c
}

fn cargo_fuzz() -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("fuzz: installing cargo-fuzz (a few minutes)");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}
