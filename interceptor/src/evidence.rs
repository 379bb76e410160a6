//! The agent's side of the evidence log: the node key, and the agent's own
//! events (its start after a gap, its stop) around what the recorder
//! writes. The log itself is `record::log`; checkpoints `record::seal`.

use std::path::Path;

use anyhow::Context;

use crate::record::{self, seal::NodeKey, Record, SledStore, Store};

/// Where the node's signing key lives in the data directory.
pub const KEY_FILE: &str = "node.key";

/// The name checkpoints carry: this host's, as C2SP origins are written.
pub fn origin() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}/interceptor")
}

/// The key's name is the origin the store first named: a host renamed
/// keeps signing as it did.
pub fn key_name(store: &SledStore) -> anyhow::Result<String> {
    let named = store.named_key()?;
    Ok(named
        .as_deref()
        .and_then(|v| record::seal::PublicKey::parse(v).ok())
        .map_or_else(origin, |k| k.name))
}

/// Opens the store for the agent: takes the node key (made at first
/// start, 0600), records the gap since the last agent and this start, and
/// seals what is there.
pub fn open(data_dir: &Path, config_path: &Path) -> anyhow::Result<SledStore> {
    let store = SledStore::open(data_dir)?;
    let path = data_dir.join(KEY_FILE);
    let key = NodeKey::load_or_create(&path, &key_name(&store)?)
        .with_context(|| format!("the node key {}", path.display()))?;
    if let Some(before) = store.named_key()? {
        if !key.public().matches(&before) {
            tracing::warn!(
                "{} is not the key that signed this store's checkpoints ({before}); checkpoints from now on are signed with {}",
                path.display(),
                key.public().vkey()
            );
        }
    }
    let fingerprint = key.public().fingerprint();
    store.set_key(key)?;
    let gap = gap(&store)?;
    if gap["clean"] == false {
        tracing::warn!(detail = %gap["detail"], "the last agent did not record its stop");
    }
    let config = std::fs::read(config_path).unwrap_or_default();
    let start = serde_json::json!({
        "event": "start",
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "origin": origin(),
        "key": fingerprint,
        "config": config_path,
        "config_sha256": record::hex(&<sha2::Sha256 as sha2::Digest>::digest(&config)),
    });
    store.put_batch(&[Record::Agent(gap), Record::Agent(start)])?;
    store.seal()?;
    Ok(store)
}

/// The gap record of a start: since when nothing was recorded, and whether
/// the agent before stopped cleanly (its stop is the log's last entry).
fn gap(store: &SledStore) -> anyhow::Result<serde_json::Value> {
    let head = store.found_head()?;
    let now = record::now_micros();
    if head.next == 0 {
        return Ok(
            serde_json::json!({"event": "gap", "clean": true, "first": true,
            "detail": "the log's first start"}),
        );
    }
    let last = head.next - 1;
    let bytes = store.entry(last)?.context("the log's newest entry")?;
    let e = record::log::parse(&bytes).map_err(|e| anyhow::anyhow!("entry {last}: {e}"))?;
    let stopped = e.header.kind == record::log::Kind::Agent
        && serde_json::from_slice::<serde_json::Value>(e.payload)
            .is_ok_and(|v| v["event"] == "stop");
    let sealed = store
        .checkpoints()
        .last()
        .transpose()?
        .map_or(0, |(size, _)| size);
    let detail = if stopped {
        "the agent was stopped: nothing was recorded in between".to_string()
    } else {
        format!(
            "the agent before did not record its stop (killed, crashed, or the host went down): nothing was recorded from its last entry until now{}",
            if head.next > sealed {
                format!("; its last {} entries were not sealed, and are sealed now", head.next - sealed)
            } else {
                String::new()
            }
        )
    };
    Ok(serde_json::json!({
        "event": "gap",
        "clean": stopped,
        "from": record::rfc3339_micros(e.header.at),
        "to": record::rfc3339_micros(now),
        "seconds": now.saturating_sub(e.header.at) / 1_000_000,
        "last_seq": last,
        "unsealed": head.next.saturating_sub(sealed),
        "detail": detail,
    }))
}

/// Records the agent's stop and seals the log with it.
pub fn stop(store: &SledStore, interrupted: usize) -> anyhow::Result<()> {
    store.put_batch(&[Record::Agent(
        serde_json::json!({"event": "stop", "interrupted_sessions": interrupted}),
    )])?;
    store.seal()?;
    Ok(())
}

/// Records, in a stopped agent's store, that `interceptor detach` removed
/// what the agent had installed, and seals it (when the node key is here).
pub fn detached(data_dir: &Path, what: serde_json::Value) -> anyhow::Result<()> {
    if !data_dir.join("store").exists() {
        return Ok(());
    }
    let store = SledStore::open(data_dir)?;
    let path = data_dir.join(KEY_FILE);
    if path.exists() {
        store.set_key(NodeKey::load(&path, &key_name(&store)?)?)?;
    }
    let mut event = serde_json::json!({"event": "detach"});
    if let (Some(e), Some(w)) = (event.as_object_mut(), what.as_object()) {
        e.extend(w.clone());
    }
    store.put_batch(&[Record::Agent(event)])?;
    store.seal()?;
    store.flush()?;
    Ok(())
}

/// For `cargo xtask bench recorder`: fills a new store in `dir` with
/// `statements` statements of `sessions` sessions taking turns (a
/// pgbench-like read each, prepared or with its values inline), through the agent's recorder with
/// hashing and checkpoints, and says how fast it went.
pub fn bench_recorder(
    dir: &Path,
    statements: u64,
    sessions: u32,
    distinct: bool,
) -> anyhow::Result<()> {
    use std::sync::Arc;

    use crate::record::{
        codec::Records, Action, Outcome, Recorder, Session, SessionIds, Statement, StatementKind,
    };
    anyhow::ensure!(sessions > 0, "--sessions must be at least 1");
    anyhow::ensure!(
        !dir.join("store").exists(),
        "{} already holds a store: give an empty directory",
        dir.display()
    );
    std::fs::create_dir_all(dir)?;
    let store = Arc::new(open(dir, Path::new("/dev/null"))?);
    let (recorder, writer) = Recorder::start(store.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ids = SessionIds::default();
    let text: Arc<str> = Arc::from("SELECT abalance FROM pgbench_accounts WHERE aid = $1");
    let rule: Arc<str> = Arc::from("reads");
    let tag: Arc<str> = Arc::from("SELECT 1");
    let started = std::time::Instant::now();
    rt.block_on(async {
        let mut open = Vec::new();
        for _ in 0..sessions {
            let mut s = Session::new(ids.next(), "127.0.0.1:40000".into());
            s.workload = Some("bench".into());
            s.identity = Some("spiffe://bench.test/bench".into());
            s.pid = std::process::id();
            s.target = Some("db".into());
            s.protocol = "postgres".into();
            recorder.record(s.clone()).await;
            open.push((s, Records::default(), 0u32));
        }
        for n in 0..statements {
            let (s, records, seq) = &mut open[(n % u64::from(sessions)) as usize];
            // `distinct`: each text its own, as `pgbench -M simple` sends
            // them (values inline); otherwise the runs of one prepared
            // statement share theirs.
            let text = if distinct {
                Arc::from(format!(
                    "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
                    n * 7919 % 100_000
                ))
            } else {
                text.clone()
            };
            let kind = if distinct {
                StatementKind::Query
            } else {
                StatementKind::Execute
            };
            let mut st = Statement::new(kind, None, text, crate::sql::Class::Read);
            st.seq = *seq;
            st.at = record::now_micros();
            st.decision = Some(Action::Allow);
            st.rule = Some(rule.clone());
            st.duration_us = Some(40);
            st.tags.push(tag.clone());
            st.rows = Some(1);
            st.tables = Arc::from(vec!["public.pgbench_accounts".to_string()]);
            records.push(&st);
            *seq += 1;
            if *seq % 256 == 0 {
                recorder.statements(s.id, records.take()).await;
            }
        }
        for (mut s, mut records, seq) in open {
            recorder.statements(s.id, records.take()).await;
            s.outcome = Outcome::Closed;
            s.statements = seq;
            s.ended_at = Some(record::rfc3339_micros(record::now_micros()));
            recorder.record(s).await;
        }
    });
    drop(recorder);
    writer.join();
    let took = started.elapsed().as_secs_f64();
    stop(&store, 0)?;
    store.flush()?;
    let entries = store.found_head()?.next;
    println!(
        "recorded {statements} statements ({entries} entries) in {took:.3} s: {:.0} statements/s",
        statements as f64 / took
    );
    Ok(())
}

/// How often the store's retention runs.
pub const RETENTION_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Prunes what `[store]` says to: segments whose entries are all older
/// than `retain`, never one a sink has not delivered; then, while the log
/// is larger than `max_size`, the oldest, delivered or not (each sink whose
/// undelivered entries go gets a `gap` record naming them). The pruning is
/// itself recorded (`prune`) and sealed. Returns that record, if any.
pub fn retention(
    store: &SledStore,
    cfg: &crate::config::StoreSection,
    sinks: &[String],
) -> anyhow::Result<Option<serde_json::Value>> {
    let segments = store.segments()?;
    if segments.len() < 2 {
        return Ok(None);
    }
    let mut cut = 0;
    let mut reasons = Vec::new();
    if let Some(keep) = cfg.retain_s {
        let before = record::now_micros().saturating_sub(keep * 1_000_000);
        for pair in segments.windows(2) {
            let last = pair[1].0 - 1;
            let Some(bytes) = store.entry(last)? else {
                break;
            };
            let at = record::log::parse(&bytes)
                .map_err(anyhow::Error::msg)?
                .header
                .at;
            if at >= before {
                break;
            }
            cut = pair[1].0;
        }
        if cut > 0 {
            reasons.push(format!(
                "older than store.retain ({})",
                cfg.retain.as_deref().unwrap_or("")
            ));
        }
    }
    let mut cursors = Vec::new();
    for name in sinks {
        cursors.push((name.clone(), store.cursor(name)?.unwrap_or(0)));
    }
    let needed = cursors.iter().map(|c| c.1).min().unwrap_or(u64::MAX);
    cut = cut.min(needed);
    if let Some(max) = cfg.max_bytes {
        let mut total: u64 = segments.iter().map(|s| s.1).sum();
        let mut i = 0;
        while total > max && i + 1 < segments.len() {
            total -= segments[i].1;
            i += 1;
            if segments[i].0 > cut {
                cut = segments[i].0;
                if !reasons.iter().any(|r| r.starts_with("store.max_size")) {
                    reasons.push(format!(
                        "store.max_size ({})",
                        cfg.max_size.as_deref().unwrap_or("")
                    ));
                }
            }
        }
    }
    if cut <= store.first_kept()? {
        return Ok(None);
    }
    let p = store.prune(cut)?;
    if p.segments == 0 {
        return Ok(None);
    }
    let mut records = Vec::new();
    for (sink, from) in cursors.iter().filter(|c| c.1 <= p.through) {
        let gap = serde_json::json!({
            "event": "gap",
            "sink": sink,
            "from": from,
            "through": p.through,
            "detail": format!("entries {from}–{} were pruned by store.max_size before sink `{sink}` delivered them", p.through),
        });
        tracing::warn!(
            sink,
            from,
            through = p.through,
            "pruned before the sink delivered them (store.max_size)"
        );
        records.push(Record::Agent(gap));
    }
    let event = serde_json::json!({
        "event": "prune",
        "from": p.from,
        "through": p.through,
        "entries": p.through + 1 - p.from,
        "segments": p.segments,
        "bytes": p.bytes,
        "reasons": reasons,
    });
    tracing::info!(
        from = p.from,
        through = p.through,
        bytes = p.bytes,
        "pruned the oldest entries of the log"
    );
    records.insert(0, Record::Agent(event.clone()));
    store.put_batch(&records)?;
    store.seal()?;
    Ok(Some(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(name: &str) -> (std::path::PathBuf, SledStore) {
        let dir =
            std::env::temp_dir().join(format!("icpt-retention-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = SledStore::open(&dir).unwrap();
        s.set_key(NodeKey::from_seed([2; 32], "t/interceptor"))
            .unwrap();
        s.set_segment_bytes(300);
        (dir, s)
    }

    fn fill(s: &SledStore, n: u32) {
        for i in 0..n {
            s.put_batch(&[Record::Agent(serde_json::json!({"event": "test", "n": i}))])
                .unwrap();
        }
    }

    fn events(s: &SledStore) -> Vec<serde_json::Value> {
        s.entries(0)
            .map(|r| {
                let (_, bytes) = r.unwrap();
                let e = record::log::parse(&bytes).unwrap();
                serde_json::from_slice(e.payload).unwrap()
            })
            .collect()
    }

    /// `retain` prunes the segments whose entries are all older, never past
    /// what a sink has not delivered, and records it; the log verifies.
    #[test]
    fn retain_prunes_old_segments_but_not_what_a_sink_still_needs() {
        let (dir, s) = store("retain");
        fill(&s, 20);
        std::thread::sleep(std::time::Duration::from_millis(1500));
        fill(&s, 20);
        let cfg = crate::config::StoreSection {
            retain: Some("1s".into()),
            retain_s: Some(1),
            ..Default::default()
        };
        // A sink that has delivered up to entry 5 holds the rest.
        s.set_cursor("siem", 5).unwrap();
        let held = retention(&s, &cfg, &["siem".to_string()]).unwrap();
        if let Some(p) = &held {
            assert!(p["through"].as_u64().unwrap() < 5, "{p}");
        }
        assert!(s.first_kept().unwrap() <= 5);
        // Delivered: the old segments go, the new ones stay.
        s.set_cursor("siem", s.found_head().unwrap().next).unwrap();
        let p = retention(&s, &cfg, &["siem".to_string()]).unwrap().unwrap();
        let through = p["through"].as_u64().unwrap();
        assert!((5..20).contains(&through), "{p}");
        assert!(p["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("older than store.retain"));
        let kept = events(&s);
        assert!(kept.iter().any(|e| e["event"] == "prune"));
        assert!(
            !kept.iter().any(|e| e["event"] == "gap"),
            "nothing undelivered was lost"
        );
        let report = s.audit(None).unwrap();
        assert!(report.intact(), "{report:#?}");
        assert_eq!(report.first, Some(through + 1));
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
