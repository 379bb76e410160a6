//! `cargo xtask setup`: the eBPF toolchain and the packages tests use.
//!
//! Idempotent: each step checks before it acts.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::run as run_cmd;

/// Debian packages the tests, demo and benchmarks use.
const PACKAGES: &[(&str, &str)] = &[
    // (a file the package provides, the package)
    ("/usr/lib/postgresql", "postgresql"),
    ("/usr/bin/psql", "postgresql-client"),
    ("/usr/bin/python3", "python3"),
    // setpriv: the end-to-end tests run attacks as the unprivileged `nobody`.
    ("/usr/bin/setpriv", "util-linux"),
    // A minimal userspace relay the l4 benchmark compares against.
    ("/usr/bin/socat", "socat"),
    // The syslog receiver of the export sink tests.
    ("/usr/sbin/rsyslogd", "rsyslog"),
    // The pooler the postgres benchmark compares against.
    ("/usr/sbin/pgbouncer", "pgbouncer"),
    // pgjdbc, the JDBC driver the masking end-to-end test runs, and a JDK.
    ("/usr/share/java/postgresql.jar", "libpostgresql-jdbc-java"),
    ("/usr/bin/javac", "default-jdk-headless"),
    // The approval tests' CA and certificates.
    ("/usr/bin/openssl", "openssl"),
    // callgrind: instructions per transaction in `bench engine`.
    ("/usr/bin/valgrind", "valgrind"),
];

pub fn run() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    packages()?;
    python_clients()?;
    oidc_provider()?;
    Ok(())
}

/// The OIDC provider the approval tests start (npm's `oidc-provider`, and
/// `jose` to mint the tokens they refuse), at the versions the lock file
/// pins, into `tests/oidc/node_modules`.
fn oidc_provider() -> Result<()> {
    let dir = crate::root().join("tests/oidc");
    if dir.join("node_modules/oidc-provider/package.json").exists()
        && dir.join("node_modules/jose/package.json").exists()
    {
        return Ok(());
    }
    if !Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("setup: installing Node.js and npm (Debian)");
        run_cmd(Command::new("apt-get").args(["install", "-y", "-q", "nodejs", "npm"]))?;
    }
    eprintln!("setup: installing the test OIDC provider (npm ci in tests/oidc)");
    run_cmd(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir),
    )
}

/// What the end-to-end tests take from PyPI: the PostgreSQL client
/// libraries they drive through the agent (asyncpg and pg8000, both on the
/// extended protocol; psycopg 3 on the system's libpq, over TLS), and
/// opentelemetry-proto, with which the OTLP receiver of the sink tests
/// decodes what the agent sends.
fn python_clients() -> Result<()> {
    let have = Command::new("python3")
        .args([
            "-c",
            "import asyncpg, pg8000, psycopg\nfrom opentelemetry.proto.collector.logs.v1 import logs_service_pb2",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if have {
        return Ok(());
    }
    eprintln!("setup: installing asyncpg, pg8000, psycopg and opentelemetry-proto from PyPI");
    run_cmd(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "asyncpg==0.32.0",
        "pg8000==1.31.6",
        "psycopg==3.2.13",
        "opentelemetry-proto==1.45.2",
    ]))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context(
        "the nightly toolchain is needed for the eBPF programs (rustup toolchain install nightly)",
    )?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to the nightly toolchain");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("interceptor")
}

/// bpf-linker linked against the LLVM that ships inside the nightly
/// toolchain (no system LLVM of that version exists on Debian 12).
fn bpf_linker() -> Result<()> {
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let prefix = cache_dir().join("llvm-rust");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib).with_context(|| format!("creating {}", plib.display()))?;
    for name in ["libLLVM.so".to_owned(), llvm.clone()] {
        let link = plib.join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker against the nightly toolchain's LLVM {major} (about a minute)"
    );
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(path, _)| !std::path::Path::new(path).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    let pg_bin = crate::pg::bin_dir().is_some();
    let mut missing = missing;
    if !pg_bin && !missing.contains(&"postgresql") {
        missing.push("postgresql");
    }
    // The pg_query crate (PostgreSQL's parser) generates its bindings with
    // bindgen, which loads libclang.
    if !libclang() {
        missing.push("libclang-dev");
    }
    // rsyslog's TLS driver (GnuTLS), for the syslog-over-TLS sink test.
    if !rsyslog_gtls() {
        missing.push("rsyslog-gnutls");
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run_cmd(Command::new("apt-get").arg("update").arg("-q"))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Whether rsyslog's GnuTLS network stream driver is installed.
fn rsyslog_gtls() -> bool {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().join("rsyslog/lmnsd_gtls.so").exists())
}

/// Whether a libclang that bindgen can load is installed.
fn libclang() -> bool {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
        .any(|e| e.path().join("lib/libclang.so").exists())
}
