//! The responders' commands: `key show`, `verify` (and the store they
//! read: always a private copy, so a data directory taken from a host is
//! never written to).

use std::{path::Path, process::ExitCode};

use anyhow::{bail, Context};
use clap::Subcommand;

use super::StoreArgs;
use crate::record::{
    audit::Report,
    seal::{NodeKey, PublicKey},
    SledStore,
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
    let key = match NodeKey::load(&path, "") {
        Ok(_) => {
            let named = SledStore::open_copy(&dir).ok().and_then(|s| s.named_key().ok().flatten());
            let name = named
                .as_deref()
                .and_then(|v| PublicKey::parse(v).ok())
                .map_or_else(crate::evidence::origin, |k| k.name);
            NodeKey::load(&path, &name)?.public().clone()
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

/// What `--pubkey` names: a verifier key, or a fingerprint (then the key
/// itself comes from `named`, if it matches).
fn pinned(pin: &str, named: Option<&str>) -> anyhow::Result<Result<PublicKey, String>> {
    let text = match std::fs::read_to_string(pin) {
        Ok(t) => t.trim().to_owned(),
        Err(_) => pin.trim().to_owned(),
    };
    if text.starts_with("SHA256:") {
        let named = named.and_then(|v| PublicKey::parse(v).ok());
        return Ok(match named {
            Some(k) if k.matches(&text) => Ok(k),
            Some(k) => Err(format!(
                "the key this evidence names ({}) is not the pinned key {text}",
                k.fingerprint()
            )),
            None => Err(format!("this evidence names no key to match the pinned {text}")),
        });
    }
    Ok(Ok(PublicKey::parse(&text).map_err(anyhow::Error::msg)?))
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let dir = args.store.data_dir()?;
    let store = SledStore::open_copy(&dir)?;
    let started = std::time::Instant::now();
    let named = store.named_key()?;
    let report = match args.pubkey.as_deref().map(|p| pinned(p, named.as_deref())).transpose()? {
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
            if r.pinned { " (pinned)" } else { " (not pinned)" },
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
