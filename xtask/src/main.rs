//! Project tasks: `setup`, `test`, `demo`, `bench`, `fuzz`.
//!
//! Every task installs what it needs, idempotently, so a fresh machine (a
//! user's or CI's) needs nothing done by hand.

mod agent;
mod bench;
mod demo;
mod fuzz;
mod gen;
mod pg;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <setup | test | demo | bench l4 [SETTINGS] [LOAD…] | bench postgres [SETTINGS] | bench memory [SETTINGS] | fuzz [SECONDS]>

  setup      install the eBPF toolchain (nightly rust-src, bpf-linker) and test packages
  test       setup, then every test: unit, in-process, privileged end-to-end, and 60 s of each fuzzer
  demo       run the agent with policies/demo.toml against a throw-away PostgreSQL
  bench l4 [LOAD…]  direct vs through the agent: rr, saturation, transactions, bulk, connect
  bench postgres    pgbench -S direct, through the agent, through pgbouncer
  bench memory      the agent's memory after 100000 sessions and per idle connection
  SETTINGS          --busy-poll-us N: run the agent with agent.busy_poll_us = N
                    --workers N: agent.workers = N (and N bare relay threads)
  gen walk          regenerate interceptor-sql/src/walk.rs from pg_query's parse tree types
  gen functions     regenerate interceptor-sql/src/functions.rs from pg_proc of the installed PostgreSQL
  fuzz [SECONDS]    coverage-guided fuzzing of the PostgreSQL relay, the SQL scanner and stored records (default 60 s each)";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("test") => test(&args[1..]),
        Some("demo") => demo::run(),
        Some("bench") => bench::run(&args[1..]),
        Some("gen") => gen::run(&args[1..]),
        Some("fuzz") => match args.get(1).map(|s| s.parse::<u64>()) {
            None => fuzz::run_all(60),
            Some(Ok(n)) if n > 0 => fuzz::run_all(n),
            Some(_) => Err(anyhow::anyhow!("fuzz takes a number of seconds per target")),
        },
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command to completion, failing with its command line on error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("{what} needs root (cgroups, eBPF and bpffs); run it as root, e.g. with sudo -E");
    }
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn test(extra: &[String]) -> Result<()> {
    require_root("cargo xtask test")?;
    setup::run()?;
    // Unit and in-process tests, then the privileged end-to-end suite, which
    // touches the kernel and runs serially.
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["test", "--workspace", "--lib", "--bins"]))?;
    // The tokio-postgres application the approval tests run.
    run(cargo().args(["build", "-p", "interceptor", "--example", "pg_client"]))?;
    let mut e2e = cargo();
    e2e.args([
        "test",
        "-p",
        "interceptor",
        "--test",
        "e2e",
        "--",
        "--test-threads=1",
    ]);
    e2e.args(extra);
    run(&mut e2e)?;
    fuzz::run_all(60)
}
