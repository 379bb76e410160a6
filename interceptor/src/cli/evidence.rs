//! The responders' commands: `key show`, `verify` (and the store they
//! read: always a private copy, so a data directory taken from a host is
//! never written to).

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context};
use clap::Subcommand;

use super::StoreArgs;
use crate::record::{
    self,
    audit::Report,
    bundle::{self, Selection},
    seal::{NodeKey, PublicKey},
    SessionId, SledStore,
};

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Print the node's public key (a signed-note verifier key) and its
    /// fingerprint, for responders to pin.
    Show {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// An export bundle to check (with the agent and its host absent);
    /// without it, the data directory's store is checked in place.
    pub bundle: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The node's key as pinned by the responder: its verifier key (from
    /// `interceptor key show`), its fingerprint (`SHA256:…`), or a file
    /// holding either. Without it, the key the store names is used, and
    /// the report says it was not pinned.
    #[arg(long, value_name = "KEY")]
    pub pubkey: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn key(cmd: KeyCommand) -> anyhow::Result<ExitCode> {
    let KeyCommand::Show { store, json } = cmd;
    let dir = store.data_dir()?;
    let path = dir.join(crate::evidence::KEY_FILE);
    // The private key's file when readable (root, on the host), or else
    // the key the store names (a copy taken away, without the secret).
    let key = match std::fs::metadata(&path) {
        Ok(_) => {
            let name = match SledStore::open_copy(&dir) {
                Ok(s) => crate::evidence::key_name(&s)?,
                Err(_) => crate::evidence::origin(),
            };
            NodeKey::load(&path, &name)
                .with_context(|| format!("reading {}", path.display()))?
                .public()
                .clone()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let store = SledStore::open_copy(&dir)?;
            let Some(v) = store.named_key()? else {
                bail!(
                    "no node key in {} (the agent makes it at its first start)",
                    dir.display()
                );
            };
            PublicKey::parse(&v).map_err(anyhow::Error::msg)?
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"key": key.vkey(), "fingerprint": key.fingerprint(), "name": key.name})
        );
    } else {
        println!("key:         {}", key.vkey());
        println!("fingerprint: {}", key.fingerprint());
    }
    Ok(ExitCode::SUCCESS)
}

/// `--pubkey`'s text: the argument, or what the file it names holds.
fn pin_text(arg: &str) -> String {
    std::fs::read_to_string(arg).map_or_else(|_| arg.trim().to_owned(), |t| t.trim().to_owned())
}

#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Entries written at or after this time: RFC 3339 (2026-12-07T10:00:00Z)
    /// or a time ago (90s, 15m, 2h, 7d).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<u64>,
    /// Entries written at or before this time (as --since).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<u64>,
    /// Only this workload's sessions, statements and approvals (and the
    /// agent's own events of that time).
    #[arg(long)]
    pub workload: Option<String>,
    /// Only this session's records.
    #[arg(long)]
    pub session: Option<SessionId>,
    /// The bundle to write (made 0600; written under a temporary name and
    /// renamed once whole), or `-` for standard output.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// RFC 3339, or a time ago.
fn parse_time(s: &str) -> Result<u64, String> {
    if let Some(t) = record::parse_rfc3339_micros(s) {
        return Ok(t);
    }
    if let Some(whole) = s.strip_suffix('Z').filter(|w| w.len() == 19) {
        if let Some(t) = record::parse_rfc3339_micros(&format!("{whole}.000000Z")) {
            return Ok(t);
        }
    }
    let ago = record::parse_duration(s).map_err(|_| {
        format!("`{s}` is neither a time (2026-12-07T10:00:00Z) nor a time ago (15m, 2h, 7d)")
    })?;
    Ok(record::now_micros().saturating_sub(ago.as_micros() as u64))
}

pub fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = args.store.data_dir()?;
    let store = SledStore::open_copy(&dir)?;
    let sel = Selection {
        since: args.since,
        until: args.until,
        workload: args.workload,
        session: args.session,
    };
    let origin = store
        .named_key()?
        .and_then(|k| PublicKey::parse(&k).ok())
        .map_or_else(|| "unknown/interceptor".into(), |k| k.name);
    // `-`: standard output; a file is written under a temporary name and
    // renamed once whole.
    let to_stdout = args.out.as_os_str() == "-";
    let partial = args.out.with_extension("partial");
    let file: Box<dyn std::io::Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&partial)
                .with_context(|| format!("creating {}", partial.display()))?,
        )
    };
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} entries {per_sec} {eta}")
            .expect("a valid template"),
    );
    let started = std::time::Instant::now();
    let done = bundle::export(&store, &sel, &origin, file, &mut |n, total| {
        bar.set_length(total);
        bar.set_position(n);
    });
    bar.finish_and_clear();
    let done = match done {
        Ok(d) => d,
        Err(e) => {
            if !to_stdout {
                let _ = std::fs::remove_file(&partial);
            }
            bail!("{e}");
        }
    };
    if !to_stdout {
        std::fs::File::open(&partial)?.sync_all()?;
        std::fs::rename(&partial, &args.out)
            .with_context(|| format!("renaming {} to {}", partial.display(), args.out.display()))?;
    }
    let took = started.elapsed().as_secs_f64();
    let mut say: Box<dyn std::io::Write> = if to_stdout {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    writeln!(
        say,
        "{}: entries {}–{} ({} selected, {} events), {} checkpoint(s){}",
        args.out.display(),
        done.from,
        done.to.saturating_sub(1),
        done.selected,
        done.events,
        done.checkpoints,
        if done.unsealed > 0 {
            format!(
                "; the newest {} entries are not sealed yet (an agent seals within 10 s)",
                done.unsealed
            )
        } else {
            String::new()
        }
    )?;
    eprintln!(
        "exported in {took:.2}s ({:.0} events/s)",
        done.events as f64 / took.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.bundle {
        let started = std::time::Instant::now();
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let pin = args.pubkey.as_deref().map(pin_text);
        let r = bundle::verify(
            std::io::BufReader::with_capacity(1 << 20, file),
            pin.as_deref(),
        )
        .map_err(anyhow::Error::msg)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(if r.audit.intact() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        let code = print_report(&r.audit, path, started.elapsed(), false)?;
        println!(
            "  bundle of {} ({}): {} entries selected, {} events",
            r.origin.as_deref().unwrap_or("?"),
            serde_json::to_string(&r.selection)?,
            r.selected,
            r.events
        );
        return Ok(code);
    }
    let dir = args.store.data_dir()?;
    let store = SledStore::open_copy(&dir)?;
    let started = std::time::Instant::now();
    let named = store.named_key()?.and_then(|v| PublicKey::parse(&v).ok());
    let pinned = args
        .pubkey
        .as_deref()
        .map(|p| PublicKey::pinned(&pin_text(p), named.as_ref()))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let report = match pinned {
        None => store.audit(None)?,
        Some(Ok(k)) => store.audit(Some(k))?,
        Some(Err(why)) => {
            let mut r = store.audit(None)?;
            r.pinned = true;
            r.findings.insert(0, why);
            r
        }
    };
    print_report(&report, &dir, started.elapsed(), args.json)
}

fn print_report(
    r: &Report,
    what: &Path,
    took: std::time::Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        let range = match (r.first, r.last) {
            (Some(a), Some(b)) => format!("entries {a}–{b}"),
            _ => "no entries".into(),
        };
        println!(
            "{}: {} ({range}), {} checkpoint(s), sealed below entry {}; key {}{}",
            what.display(),
            if r.intact() { "intact" } else { "NOT INTACT" },
            r.checkpoints,
            r.sealed_through,
            r.key.as_deref().unwrap_or("none"),
            if r.pinned {
                " (pinned)"
            } else {
                " (not pinned)"
            },
        );
        for f in &r.findings {
            println!("  broken: {f}");
        }
        if r.more_findings > 0 {
            println!("  … and {} more", r.more_findings);
        }
        for w in &r.warnings {
            println!("  warning: {w}");
        }
        eprintln!(
            "checked {} entries in {:.2}s",
            r.entries,
            took.as_secs_f64()
        );
    }
    Ok(if r.intact() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[derive(clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    pub id: SessionId,
    /// Play this many times faster than it happened.
    #[arg(long, default_value_t = 1.0, conflicts_with = "max")]
    pub speed: f64,
    /// No waiting between events.
    #[arg(long)]
    pub max: bool,
    /// The timeline as JSON Lines, one event per line.
    #[arg(long)]
    pub json: bool,
}

/// One moment of a session's timeline.
struct Moment {
    at: u64,
    what: &'static str,
    text: String,
    json: serde_json::Value,
}

/// A session's timeline: its connect and decision, each statement, the
/// approval requests it made and what came of them, its end.
fn timeline(store: &SledStore, id: SessionId) -> anyhow::Result<Vec<Moment>> {
    use crate::record::{approval::Status, ApprovalStore, Store};
    use serde_json::json;
    let Some(s) = store.get(id)? else {
        bail!("no session {id}");
    };
    let mut out = Vec::new();
    let start = record::parse_rfc3339_micros(&s.started_at).unwrap_or(id.micros());
    let decided = match s.outcome {
        record::Outcome::Denied | record::Outcome::Refused => "refused",
        _ => "allowed",
    };
    out.push(Moment {
        at: start,
        what: "connect",
        text: format!(
            "{} (pid {}, {}) → {} [{}]: {decided} by rule {}{}",
            s.workload.as_deref().unwrap_or("-"),
            s.pid,
            s.exe.as_deref().unwrap_or("-"),
            s.target.as_deref().unwrap_or("-"),
            s.original_dst.as_deref().unwrap_or("-"),
            s.rule.as_deref().unwrap_or("-"),
            s.approval
                .as_ref()
                .map_or(String::new(), |r| format!(" (approval request {r})")),
        ),
        json: json!({"workload": s.workload, "identity": s.identity, "pid": s.pid, "exe": s.exe,
            "target": s.target, "destination": s.original_dst, "decision": decided, "rule": s.rule,
            "approval": s.approval}),
    });
    for st in store.statements(id)? {
        let result = match (&st.error, st.tags.last()) {
            (Some(code), _) => format!("error {code}"),
            (None, Some(tag)) => tag.to_string(),
            (None, None) => "-".into(),
        };
        let decision = st.decision.map_or("-".to_string(), |d| d.to_string());
        out.push(Moment {
            at: st.at,
            what: "statement",
            text: format!(
                "#{} {} {} [{}] {decision}{} → {result}{}: {}",
                st.seq,
                st.kind,
                st.class,
                st.tables.join(","),
                st.rule
                    .as_ref()
                    .map_or(String::new(), |r| format!(" by {r}")),
                st.duration_us
                    .map_or(String::new(), |d| format!(" in {d} µs")),
                st.text.replace('\n', " "),
            ),
            json: serde_json::to_value(&st)?,
        });
    }
    for r in store.requests(id.micros())? {
        if r.requester.session != Some(id) {
            continue;
        }
        out.push(Moment {
            at: r.created_at,
            what: "requested",
            text: format!(
                "approval request {} by rule {} ({})",
                r.id,
                r.rule,
                r.status.as_str()
            ),
            json: json!({"request": r.id, "rule": r.rule, "asked": r.asked}),
        });
        for a in &r.approvals {
            out.push(Moment {
                at: a.at,
                what: "approved",
                text: format!(
                    "request {} approved by {}{}",
                    r.id,
                    a.person.subject,
                    if a.break_glass { " (BREAK-GLASS)" } else { "" }
                ),
                json: json!({"request": r.id, "by": a.person, "comment": a.comment, "break_glass": a.break_glass}),
            });
        }
        if let (Some(d), Status::Approved | Status::Denied | Status::Expired) =
            (&r.decided, r.status)
        {
            out.push(Moment {
                at: d.at,
                what: "decided",
                text: format!(
                    "request {} {}{}",
                    r.id,
                    r.status.as_str(),
                    d.by.as_ref().map_or(String::new(), |p| format!(" by {}", p.subject))
                ),
                json: json!({"request": r.id, "status": r.status, "by": d.by, "comment": d.comment}),
            });
        }
    }
    if let Some(end) = s.ended_at.as_deref().and_then(record::parse_rfc3339_micros) {
        out.push(Moment {
            at: end,
            what: "end",
            text: format!(
                "{} ({} bytes up, {} down, {} statements){}",
                s.outcome,
                s.bytes_up,
                s.bytes_down,
                s.statements,
                s.detail
                    .as_ref()
                    .map_or(String::new(), |d| format!(": {d}"))
            ),
            json: json!({"outcome": s.outcome, "bytes_up": s.bytes_up, "bytes_down": s.bytes_down,
                "statements": s.statements, "detail": s.detail}),
        });
    }
    // Stable: a statement and its request made in the same microsecond
    // keep the order they were added in.
    out.sort_by_key(|m| m.at);
    Ok(out)
}

pub fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    anyhow::ensure!(
        args.speed > 0.0 && args.speed.is_finite(),
        "--speed must be a positive number"
    );
    let dir = args.store.data_dir()?;
    let store = SledStore::open_copy(&dir)?;
    let moments = timeline(&store, args.id)?;
    drop(store);
    let start = moments.first().map_or(0, |m| m.at);
    let mut prev = start;
    let mut out = std::io::stdout().lock();
    for m in &moments {
        if !args.max && m.at > prev {
            let wait = (m.at - prev) as f64 / args.speed;
            out.flush()?;
            std::thread::sleep(std::time::Duration::from_micros(wait as u64));
        }
        prev = prev.max(m.at);
        let offset = m.at.saturating_sub(start);
        if args.json {
            let mut line = serde_json::json!({
                "at": record::rfc3339_micros(m.at),
                "offset_us": offset,
                "event": m.what,
                "session": args.id,
            });
            if let (Some(o), Some(extra)) = (line.as_object_mut(), m.json.as_object()) {
                for (k, v) in extra {
                    o.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            writeln!(out, "{line}")?;
        } else {
            writeln!(
                out,
                "{} +{:>10.3}s  {:<9} {}",
                record::rfc3339_micros(m.at),
                offset as f64 / 1e6,
                m.what,
                m.text
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
