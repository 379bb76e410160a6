//! Evidence for incident responders: the store's log verified in place,
//! and every way of tampering with it found where it was done, on the
//! store a real agent wrote; responder commands that read a data
//! directory with nothing else and never write to it.

use std::{path::Path, process::Command};

use interceptor::record::log;

use super::*;

/// Runs `interceptor ARGS` with no configuration at all.
fn bare(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

/// Every file under `dir` with its contents' hash and mode, to show a
/// command left it as it was.
fn snapshot(dir: &Path) -> Vec<(String, String, u32)> {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = e.metadata().unwrap();
        if meta.is_dir() {
            out.extend(snapshot(&e.path()));
        } else if e.file_type().unwrap().is_file() {
            let bytes = std::fs::read(e.path()).unwrap();
            out.push((
                e.path().display().to_string(),
                interceptor::record::hex(&sha2::Sha256::digest(&bytes)),
                meta.mode(),
            ));
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn entry_key(seq: u64) -> Vec<u8> {
    let mut k = vec![b'L'];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `verify --data-dir DIR --pubkey KEY`: its exit code and output.
fn verify(dir: &Path, key: &str) -> (i32, String) {
    let out = bare(&[
        "verify",
        "--data-dir",
        dir.to_str().unwrap(),
        "--pubkey",
        key,
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_store_verifies_in_place_and_every_tampering_is_found_where_it_was_done() {
    let echo = Echo::start();
    let mut agent = Agent::start("evidence", &app_and_echo(echo.port, ""), ALLOW_APP_ECHO);
    let port = echo.port.to_string();
    for _ in 0..3 {
        agent.client(Some("app"), &["echo", "127.0.0.1", &port]);
    }
    agent.sessions_until("3 closed sessions", |s| {
        s.iter().filter(|x| x["outcome"] == "closed").count() == 3
    });
    // Killed, then started again: the gap is a record of its own.
    std::thread::sleep(Duration::from_millis(300));
    agent.kill9();
    agent.spawn();
    agent.client(Some("app"), &["echo", "127.0.0.1", &port]);
    agent.sessions_until("4 closed sessions", |s| {
        s.iter().filter(|x| x["outcome"] == "closed").count() == 4
    });
    agent.stop();

    let data = agent.dir.join("data");
    let data_arg = data.to_str().unwrap();
    let key_file = data.join("node.key");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&key_file).unwrap().mode() & 0o777, 0o600);
    let out = bare(&["key", "show", "--data-dir", data_arg, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (vkey, fingerprint) = (s(&key["key"]).to_owned(), s(&key["fingerprint"]).to_owned());
    assert!(
        fingerprint.starts_with("SHA256:") && fingerprint.len() == 71,
        "{key}"
    );

    // Responders read with the data directory alone, and write nothing.
    let before = snapshot(&data);
    let (code, text) = verify(&data, &vkey);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("intact") && !text.contains("warning"),
        "{text}"
    );
    let (code, text) = verify(&data, &fingerprint);
    assert_eq!(code, 0, "{text}");
    let out = bare(&["sessions", "list", "--data-dir", data_arg, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.len(), 4, "{list:?}");
    let out = bare(&[
        "sessions",
        "show",
        s(&list[0]["id"]),
        "--data-dir",
        data_arg,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        snapshot(&data),
        before,
        "a responder command wrote to the data directory"
    );

    // A bundle taken away: verified with only itself and the pinned key,
    // after the data directory is gone; one byte changed is found.
    let bundle = agent.dir.join("all.jsonl");
    let out = bare(&[
        "export",
        "--data-dir",
        data_arg,
        "--out",
        bundle.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("4 checkpoint(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let one = agent.dir.join("one.jsonl");
    let out = bare(&[
        "export",
        "--data-dir",
        data_arg,
        "--session",
        s(&list[1]["id"]),
        "--out",
        one.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        snapshot(&data),
        before,
        "export wrote to the data directory"
    );
    let away = std::env::temp_dir().join(format!("icpt-e2e-away-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&away);
    std::fs::create_dir_all(&away).unwrap();
    for f in [&bundle, &one] {
        std::fs::copy(f, away.join(f.file_name().unwrap())).unwrap();
    }
    let verify_bundle = |path: &Path, key: &str| {
        let out = Command::new(BIN)
            .args(["verify", path.to_str().unwrap(), "--pubkey", key])
            .current_dir(&away)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    for f in ["all.jsonl", "one.jsonl"] {
        let (code, text) = verify_bundle(&away.join(f), &fingerprint);
        assert_eq!(code, 0, "{f}: {text}");
        assert!(text.contains("intact"), "{text}");
    }
    let text = std::fs::read_to_string(away.join("one.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["class_uid"] == 6005)
        .collect();
    assert!(events.len() >= 2, "{events:#?}");
    let connect = &events[0];
    assert_eq!(connect["activity_name"], "Connect");
    assert_eq!(connect["actor"]["app_uid"], "spiffe://e2e.test/app");
    assert_eq!(connect["actor"]["process"]["pid"], list[1]["pid"]);
    assert!(s(&connect["actor"]["process"]["file"]["path"]).contains("python3"));
    assert_eq!(connect["metadata"]["correlation_uid"], list[1]["id"]);
    assert_eq!(connect["dst_endpoint"]["port"], echo.port);
    let mut edited = std::fs::read(away.join("all.jsonl")).unwrap();
    let at = edited.windows(8).position(|w| w == b"\"python3").unwrap() + 1;
    edited[at] = b'P';
    std::fs::write(away.join("edited.jsonl"), &edited).unwrap();
    let (code, text) = verify_bundle(&away.join("edited.jsonl"), &vkey);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("NOT INTACT"), "{text}");
    let other = interceptor::record::seal::NodeKey::from_seed([3; 32], "x/interceptor");
    let (code, text) = verify_bundle(&away.join("all.jsonl"), &other.public().vkey());
    assert_eq!(code, 1, "{text}");
    let _ = std::fs::remove_dir_all(&away);

    // What the log holds of the agent itself.
    let frames = read_frames(&data);
    let events: Vec<serde_json::Value> = frames
        .iter()
        .filter_map(|(_, v)| {
            let e = log::parse(v).unwrap();
            (e.header.kind == log::Kind::Agent).then(|| serde_json::from_slice(e.payload).unwrap())
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|e| s(&e["event"])).collect();
    assert_eq!(
        names,
        ["gap", "start", "policy", "attach", "gap", "start", "policy", "attach", "stop"],
        "{events:#?}"
    );
    assert_eq!(events[0]["first"], true);
    assert_eq!(events[4]["clean"], false, "{}", events[4]);
    assert_eq!(events[2]["files"][0]["sha256"].as_str().unwrap().len(), 64);

    // Each tampering on a copy taken with the agent stopped, in the log's
    // files and in sled; `verify` finds it and says where.
    let count = frames.len() as u64;
    // The first session entry from the middle on (it names the echo
    // server's address).
    let named = (count / 2..count)
        .find(|&seq| frames[seq as usize].1.windows(9).any(|w| w == b"127.0.0.1"))
        .unwrap();
    type Frames = Vec<(u64, Vec<u8>)>;
    let tamper = |name: &str, f: &dyn Fn(&sled::Tree, &mut Frames), wants: &[&str]| {
        let copy = agent.dir.join(format!("tampered-{name}"));
        copy_dir(&data, &copy);
        let mut frames = read_frames(&copy);
        let before = frames.clone();
        {
            let db = sled::open(copy.join("store")).unwrap();
            f(&db.open_tree("log").unwrap(), &mut frames);
            db.flush().unwrap();
        }
        if frames != before {
            write_frames(&copy, &frames);
        }
        let (code, text) = verify(&copy, &vkey);
        assert_eq!(code, 1, "{name}: {text}");
        for want in wants {
            assert!(text.contains(want), "{name}: want `{want}` in\n{text}");
        }
        let _ = std::fs::remove_dir_all(&copy);
    };
    let mid = count / 2;
    tamper(
        "changed",
        &|_, f| {
            let v = &mut f[named as usize].1;
            let at = v.windows(9).position(|w| w == b"127.0.0.1").unwrap();
            v[at + 8] = b'2';
        },
        &[&format!(
            "entry {} does not name the hash of entry {named}",
            named + 1
        )],
    );
    tamper(
        "deleted",
        &|_, f| {
            f.remove(mid as usize);
        },
        &[&format!("entry {mid} is missing")],
    );
    tamper(
        "swapped",
        &|_, f| {
            let (a, b) = (f[mid as usize].1.clone(), f[mid as usize + 1].1.clone());
            f[mid as usize].1 = b;
            f[mid as usize + 1].1 = a;
        },
        &[&format!(
            "entry {mid} does not name the hash of entry {}",
            mid - 1
        )],
    );
    tamper(
        "appended",
        &|_, f| {
            let e = log::parse(&f[count as usize - 1].1).unwrap();
            let h = log::Header {
                prev: e.link(count - 1),
                at: e.header.at + 1,
                ..e.header.clone()
            };
            let mut out = Vec::new();
            log::encode(&mut out, &h, br#"{"event":"gap"}"#);
            f.push((count, out));
        },
        &[&format!(
            "entries {count}–{count} come after the checkpoint of the agent's stop"
        )],
    );
    tamper(
        "cut",
        &|_, f| {
            f.truncate(count as usize - 3);
        },
        &[&format!(
            "seals entries up to {}, but the log ends at entry {}",
            count - 1,
            count - 4
        )],
    );
    tamper(
        "resigned",
        &|t, _| {
            use interceptor::record::seal::{Checkpoint, NodeKey, PublicKey};
            let (k, note) = t.scan_prefix(b"C").next_back().unwrap().unwrap();
            let note = String::from_utf8(note.to_vec()).unwrap();
            let ours = PublicKey::parse(&vkey).unwrap();
            let cp = Checkpoint::open(&note, &ours).unwrap();
            let theirs = NodeKey::from_seed([9; 32], &ours.name);
            t.insert(k, theirs.sign(&cp).as_bytes()).unwrap();
            // And the store's own record of its key, too.
            t.insert(b"Mkey", theirs.public().vkey().as_bytes())
                .unwrap();
        },
        &[&format!("checkpoint {count}: it is not signed by key")],
    );
    // sled edited: an index row changed, one deleted, two swapped.
    tamper(
        "index",
        &|t, _| {
            let (k, _) = t.scan_prefix(b"S").next().unwrap().unwrap();
            t.insert(k, &0u64.to_be_bytes()).unwrap();
            t.remove(entry_key(mid)).unwrap();
            let (a, b) = (
                t.get(entry_key(mid + 2)).unwrap().unwrap(),
                t.get(entry_key(mid + 3)).unwrap().unwrap(),
            );
            t.insert(entry_key(mid + 2), b).unwrap();
            t.insert(entry_key(mid + 3), a).unwrap();
        },
        &[
            "names entry 0, which is not its record",
            &format!("the index does not put entry {mid} where it is"),
            &format!("the index does not put entry {} where it is", mid + 2),
            &format!("the index does not put entry {} where it is", mid + 3),
        ],
    );
    drop(agent);
}

/// Every frame of the log's segment files in `data`: seq and entry.
fn read_frames(data: &Path) -> Vec<(u64, Vec<u8>)> {
    interceptor::record::segments::Frames::all(&data.join("log"))
        .unwrap()
        .map(|f| f.map(|f| (f.seq, f.entry)).unwrap())
        .collect()
}

/// Writes `frames` as the log's one segment, in place of what was there.
fn write_frames(data: &Path, frames: &[(u64, Vec<u8>)]) {
    use interceptor::record::segments;
    let dir = data.join("log");
    for s in segments::segments(&dir).unwrap() {
        std::fs::remove_file(segments::segment_path(&dir, s)).unwrap();
    }
    let mut out = Vec::new();
    for (seq, e) in frames {
        segments::frame(&mut out, *seq, e);
    }
    std::fs::write(segments::segment_path(&dir, frames[0].0), out).unwrap();
}

/// `[store] max_size` prunes the oldest segments, even ones a sink that is
/// down still needs (a gap record names what it lost), records each
/// pruning, and the log verifies from its first kept entry.
#[test]
fn retention_keeps_the_log_bounded_and_verifiable() {
    let echo = Echo::start();
    let dead = free_port();
    let sections = format!(
        "{}\n[store]\nsegment_size = \"64KiB\"\nmax_size = \"256KiB\"\n\n\
         [[export.sink]]\nname = \"nowhere\"\nkind = \"syslog\"\naddress = \"127.0.0.1:{dead}\"\n",
        app_and_echo(echo.port, "")
    );
    let mut agent = Agent::start("retention", &sections, ALLOW_APP_ECHO);
    let r = agent.client(
        Some("app"),
        &["many", "127.0.0.1", &echo.port.to_string(), "600"],
    );
    assert_eq!(r["ok"], 600, "{r}");
    let data = agent.dir.join("data");
    let deadline = Instant::now() + Duration::from_secs(60);
    let prunes = loop {
        let prunes: Vec<serde_json::Value> = read_frames(&data)
            .iter()
            .filter_map(|(_, v)| {
                let e = log::parse(v).ok()?;
                (e.header.kind == log::Kind::Agent)
                    .then(|| serde_json::from_slice::<serde_json::Value>(e.payload).ok())
                    .flatten()
            })
            .filter(|e| e["event"] == "prune" || (e["event"] == "gap" && e["sink"] == "nowhere"))
            .collect();
        if prunes.iter().any(|e| e["event"] == "prune") {
            break prunes;
        }
        assert!(
            Instant::now() < deadline,
            "nothing pruned:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let prune = prunes.iter().find(|e| e["event"] == "prune").unwrap();
    assert_eq!(prune["from"], 0, "{prune}");
    assert!(
        s(&prune["reasons"][0]).starts_with("store.max_size"),
        "{prune}"
    );
    let gap = prunes.iter().find(|e| e["event"] == "gap").unwrap();
    assert_eq!(gap["from"], 0, "{gap}");
    assert_eq!(gap["through"], prune["through"], "{gap}");
    agent.stop();
    let total: u64 = std::fs::read_dir(data.join("log"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        total <= (256 + 64 + 64) << 10,
        "the log holds {total} bytes"
    );
    let out = bare(&["verify", "--data-dir", data.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = read_frames(&data)[0].0;
    assert!(
        first > 0 && text.contains(&format!("entries {first}–")),
        "{text}"
    );
}
