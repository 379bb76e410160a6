//! `cargo xtask bench recorder`: the evidence log's speeds on this machine,
//! in one run: the recorder (hashing and checkpoints on) filling a store
//! with pgbench-like statements, `export` of the whole store to a bundle
//! (and to /dev/null, the exporter alone), `verify` in place and of the
//! bundle; with each command's peak memory. Targets: record ≥ 100k
//! statements/s, export ≥ 200k events/s, verify ≥ 500k/s, export in a few
//! tens of MB whatever the store's size.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// Statements recorded per run (`--statements N` to change).
const STATEMENTS: u64 = 2_000_000;

/// Runs `cmd`, its stdout to `out` (none: kept); its wall time (s), peak
/// resident memory (bytes) and output.
fn measured(cmd: &mut Command, out: Option<&Path>) -> Result<(f64, u64, String)> {
    use std::os::unix::process::ExitStatusExt;
    match out {
        Some(p) => cmd.stdout(std::fs::File::create(p)?),
        None => cmd.stdout(Stdio::piped()),
    };
    cmd.stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stdout {
            let _ = std::io::Read::read_to_string(&mut s, &mut text);
        }
        if let Some(mut s) = stderr {
            let _ = std::io::Read::read_to_string(&mut s, &mut text);
        }
        text
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child, with valid pointers; the child is
    // reaped here and never waited for again.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let took = started.elapsed().as_secs_f64();
    if pid < 0 {
        bail!("waiting for {cmd:?}: {}", std::io::Error::last_os_error());
    }
    std::mem::forget(child);
    let text = reader.join().unwrap_or_default();
    let status = std::process::ExitStatus::from_raw(status);
    if !status.success() {
        bail!("{cmd:?} failed ({status}): {text}");
    }
    Ok((took, usage.ru_maxrss as u64 * 1024, text))
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / (1 << 20) as f64)
}

pub fn recorder(args: &[String]) -> Result<()> {
    crate::require_root("cargo xtask bench recorder")?;
    let statements = match args {
        [] => STATEMENTS,
        [flag, n] if flag == "--statements" => n.parse().context("--statements N")?,
        _ => bail!("usage: cargo xtask bench recorder [--statements N]"),
    };
    let bin = crate::agent::build(true)?;
    println!(
        "interceptor bench recorder — {statements} pgbench-like statements of 64 sessions \
         through the recorder (hashing, checkpoints), then export and verify (release build)"
    );
    println!(
        "{:<9} {:>16} {:>22} {:>22} {:>22} {:>22}",
        "texts",
        "record stmt/s",
        "export ev/s (file)",
        "export ev/s (null)",
        "verify stmt/s",
        "verify bundle ev/s"
    );
    let work = std::env::temp_dir().join(format!("icpt-bench-recorder-{}", std::process::id()));
    for distinct in [false, true] {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let data = work.join("data");
        let data_arg = data.to_str().context("path")?;
        let mut rec = Command::new(&bin);
        rec.args(["bench-recorder", "--data-dir", data_arg, "--statements"])
            .arg(statements.to_string());
        if distinct {
            rec.arg("--distinct");
        }
        let (_, rec_rss, text) = measured(&mut rec, None)?;
        let rate: f64 = text
            .rsplit(": ")
            .next()
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("bench-recorder said {text:?}"))?;
        let (_, _, key) = measured(
            Command::new(&bin).args(["key", "show", "--data-dir", data_arg, "--json"]),
            None,
        )?;
        let key = key
            .split("\"key\":\"")
            .nth(1)
            .and_then(|k| k.split('"').next())
            .context("key show")?
            .to_owned();
        let bundle = work.join("all.jsonl");
        let events = statements + 64 * 2;
        let (export_s, export_rss, _) = measured(
            Command::new(&bin)
                .args(["export", "--data-dir", data_arg, "--out"])
                .arg(&bundle),
            None,
        )?;
        let (null_s, _, _) = measured(
            Command::new(&bin).args(["export", "--data-dir", data_arg, "--out", "-"]),
            Some(Path::new("/dev/null")),
        )?;
        let (verify_s, verify_rss, _) = measured(
            Command::new(&bin).args(["verify", "--data-dir", data_arg, "--pubkey", &key]),
            None,
        )?;
        let (vb_s, vb_rss, _) = measured(
            Command::new(&bin)
                .arg("verify")
                .arg(&bundle)
                .args(["--pubkey", &key]),
            None,
        )?;
        let size = std::fs::metadata(&bundle)?.len();
        println!(
            "{:<9} {:>16.0} {:>22.0} {:>22.0} {:>22.0} {:>22.0}",
            if distinct { "distinct" } else { "shared" },
            rate,
            events as f64 / export_s,
            events as f64 / null_s,
            statements as f64 / verify_s,
            events as f64 / vb_s,
        );
        println!(
            "          peak memory: record {}, export {}, verify {}, verify bundle {}; bundle {}",
            mb(rec_rss),
            mb(export_rss),
            mb(verify_rss),
            mb(vb_rss),
            mb(size)
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "(rates include starting each command and copying the store's index; \
         `export (file)` is bound by this disk, `(null)` is the exporter alone)"
    );
    Ok(())
}
