//! Statement enforcement tried as an attacker would, against a real server:
//! the bypass corpus (`tests/bypass.toml`) over both query protocols,
//! startup options the server reads its own way, and masking leaks.
//! Each test checks the server's own state, not only the agent's word.

use super::*;

/// The database objects the corpus aims at, made directly (as the owner).
const SETUP: &str = "
CREATE TABLE canary (id int, card text);
INSERT INTO canary VALUES (1, '4111111111111111');
CREATE SEQUENCE canary_seq;
SELECT lo_create(4242);
CREATE SCHEMA app;
CREATE FUNCTION purge_canary() RETURNS int LANGUAGE sql VOLATILE
  AS 'DELETE FROM canary RETURNING 1';
CREATE FUNCTION app.purge() RETURNS int LANGUAGE sql VOLATILE
  AS 'DELETE FROM canary RETURNING 1';
CREATE FUNCTION app.report() RETURNS bigint LANGUAGE sql STABLE
  AS 'SELECT count(*) FROM canary';
CREATE FUNCTION purge_op(int, int) RETURNS bool LANGUAGE sql VOLATILE
  AS 'DELETE FROM canary RETURNING true';
CREATE OPERATOR public.=== (LEFTARG = int, RIGHTARG = int, FUNCTION = purge_op);
CREATE ROLE app_admin;
";

/// What the corpus could change, read directly from the server.
const STATE: &str = "SELECT (SELECT count(*) FROM canary) || ' ' || \
     (SELECT last_value FROM canary_seq) || ' ' || \
     (SELECT count(*) FROM pg_largeobject_metadata WHERE oid = 4242) || ' ' || \
     (SELECT count(*) FROM pg_class WHERE relname IN ('canary_copy', 'canary_two')) || ' ' || \
     (SELECT count(*) FROM pg_prepared_xacts)";
const UNTOUCHED: &str = "1 1 1 0 0";

/// With [`APP_DB`]: `app` may only read, may not touch `public.canary` by
/// name, may not sleep, and may call the one function of its own it is
/// vouched for.
const READ_ONLY: &str = "
[defaults]
statement = \"deny\"

[[rule]]
id = \"reads\"
on = \"statement\"
workloads = [\"app\"]
targets = [\"db\"]
classes = [\"read\"]
action = \"allow\"

[[rule]]
id = \"canary-is-sacred\"
on = \"statement\"
workloads = [\"app\"]
targets = [\"db\"]
classes = [\"write\", \"ddl\"]
tables = [\"public.canary\"]
action = \"deny\"

[[rule]]
id = \"no-sleep\"
on = \"statement\"
workloads = [\"app\"]
targets = [\"db\"]
patterns = [\"pg_sleep\"]
action = \"deny\"

[[rule]]
id = \"report-is-read-only\"
on = \"statement\"
workloads = [\"app\"]
targets = [\"db\"]
functions = [\"app.report\"]
classes = [\"read\"]
action = \"allow\"
";

#[derive(serde::Deserialize)]
struct Case {
    hole: String,
    sql: String,
    class: interceptor::sql::Class,
}

#[derive(serde::Deserialize)]
struct Corpus {
    case: Vec<Case>,
}

fn corpus() -> Vec<Case> {
    let text = include_str!("../bypass.toml");
    toml::from_str::<Corpus>(text).unwrap().case
}

/// `psql -X -A -t -c SQL` straight to the server (no agent).
pub(super) fn direct(db: &pg::Postgres, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([
            &db.conninfo(),
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The rule a refusal message names, if the agent refused.
fn refused_by(message: &str) -> Option<&str> {
    let rest = message.split("denied by rule \"").nth(1)?;
    rest.split('"').next()
}

/// A server and its agent, torn down in that order, then their directory.
struct Served {
    agent: Agent,
    db: pg::Postgres,
    dir: RemovedOnDrop,
}

struct RemovedOnDrop(std::path::PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server prepared with `setup`, and an agent whose policy is
/// [`APP_DB`] and `rules`.
fn start(name: &str, rules: &str, setup: &str) -> Served {
    let (dir, db, agent) = postgres_and_agent_with(name, &format!("{APP_DB}{rules}"), Some(setup));
    Served {
        agent,
        db,
        dir: RemovedOnDrop(dir),
    }
}

/// Every corpus case, over the simple protocol (psql) and the extended
/// protocol (pg8000), from a workload allowed only to read: each case
/// that is more than a read is refused by the agent, and afterwards the
/// server's tables, sequence, large object and prepared transactions are
/// as they were.
#[test]
fn the_bypass_corpus_is_refused_and_the_server_is_untouched() {
    let served = start("bypass", READ_ONLY, SETUP);
    let (agent, db) = (&served.agent, &served.db);
    assert_eq!(direct(db, STATE), UNTOUCHED);
    let conn = db.conninfo();
    let cases = corpus();
    let expect = |case: &Case, how: &str, ok: bool, message: &str| {
        let by = refused_by(message);
        let want: Option<&str> = match case.hole.as_str() {
            "patterns" => Some("no-sleep"),
            "names" if case.class > interceptor::sql::Class::Read => Some("canary-is-sacred"),
            _ if case.class > interceptor::sql::Class::Read => Some("*"),
            _ => None,
        };
        match want {
            None => assert!(ok, "[{how}] {:?} (a read) failed: {message}", case.sql),
            Some(rule) => {
                assert!(!ok, "[{how}] {:?} ran", case.sql);
                let by = by.unwrap_or_else(|| {
                    panic!(
                        "[{how}] {:?} failed, but not by the agent: {message}",
                        case.sql
                    )
                });
                assert!(
                    rule == "*" || by == rule,
                    "[{how}] {:?}: refused by {by}, want {rule}",
                    case.sql
                );
            }
        }
    };
    // Simple protocol: one psql per case.
    for case in &cases {
        let out = pg_tool(
            agent,
            "psql",
            &[
                &conn,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                &case.sql,
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        expect(case, "simple", out.status.success(), &stderr);
    }
    assert_eq!(
        direct(db, STATE),
        UNTOUCHED,
        "the simple protocol changed the server"
    );
    // Extended protocol: pg8000, one connection per case.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/bypass.py");
    let mut child = pg_tool_command(
        agent,
        "python3",
        &[
            script,
            "127.0.0.1",
            &db.port.to_string(),
            pg::USER,
            pg::PASSWORD,
        ],
    )
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for case in &cases {
            writeln!(stdin, "{}", serde_json::to_string(&case.sql).unwrap()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "bypass.py failed");
    let results: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), cases.len(), "bypass.py skipped cases");
    for (case, r) in cases.iter().zip(&results) {
        // The server refuses several statements in one Parse itself; the
        // agent must still refuse first (its error is the one seen).
        expect(
            case,
            "extended",
            r["ok"] == true,
            r["message"].as_str().unwrap_or_default(),
        );
    }
    assert_eq!(
        direct(db, STATE),
        UNTOUCHED,
        "the extended protocol changed the server"
    );

    // A function an allow rule vouches for runs; one it does not is refused.
    let out = psql_tuples(agent, &conn, "SELECT app.report()");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = psql_tuples(agent, &conn, "SELECT app.report(), app.purge()");
    assert!(!out.status.success());
    assert_eq!(direct(db, STATE), UNTOUCHED);
}

/// `options` in the startup packet is read as the server reads it: any
/// whitespace byte splits, flags bundle; what the agent cannot read is
/// refused, and so is a replication connection no rule names.
#[test]
fn startup_options_are_read_as_the_server_reads_them() {
    let served = start("startup", READ_ONLY, SETUP);
    let (agent, db) = (&served.agent, &served.db);
    let conn = db.conninfo();
    for (options, rule) in [
        ("-c\x0brole=app_admin", "defaults.statement"),
        ("-c role=app_admin", "defaults.statement"),
        ("-crole=app_admin", "defaults.statement"),
        ("-ec role=app_admin", "defaults.statement"),
        ("--role=app_admin", "defaults.statement"),
        ("-c session-authorization=app_admin", "defaults.statement"),
        ("-c ROLE=app_admin", "defaults.statement"),
        ("-c role=app_admin extra", "agent.unreadable-startup"),
        ("-c\u{a0}role=app_admin", "agent.unreadable-startup"),
    ] {
        let out = pg_tool_command(
            agent,
            "psql",
            &[&conn, "-X", "-A", "-t", "-c", "SELECT current_user"],
        )
        .env("PGOPTIONS", options)
        .output()
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "PGOPTIONS={options:?} logged in: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(
            refused_by(&stderr.replace("startup setting denied", "denied")),
            Some(rule),
            "PGOPTIONS={options:?}: {stderr}"
        );
    }
    // Harmless options pass.
    let out = pg_tool_command(
        agent,
        "psql",
        &[&conn, "-X", "-A", "-t", "-c", "SHOW work_mem"],
    )
    .env("PGOPTIONS", "-c work_mem=8MB -e")
    .output()
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "8MB",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A replication connection: refused unless a rule names it (here the
    // read-only default refuses it first; the policy unit tests show the
    // by-name refusal under an allowing default).
    let out = pg_tool(
        agent,
        "psql",
        &[
            &format!("{conn} replication=database"),
            "-X",
            "-c",
            "IDENTIFY_SYSTEM",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("<replication connection>"), "{stderr}");
    assert!(
        refused_by(&stderr.replace("startup setting denied", "denied")).is_some(),
        "{stderr}"
    );
    agent.sessions_until("refused logins recorded", |s| {
        s.iter().filter(|x| x["outcome"] == "denied").count() >= 10
    });
}

const CARDS: &str = "
CREATE TABLE cards (id int, card text, note text, doc json, docb jsonb);
INSERT INTO cards VALUES (1, '4111111111111111', 'hello', '{\"n\": \"4111111111111111\"}', '{\"n\": 1}');
";

/// With [`APP_DB`]: `app` sees card numbers and documents masked.
const MASK_CARDS: &str = "
[[rule]]
id = \"cards\"
on = \"statement\"
workloads = [\"app\"]
targets = [\"db\"]
action = \"mask\"
columns = [\"card\", \"doc\", \"docb\"]
strategy = \"partial\"
keep = 4
";

const CARD: &str = "4111111111111111";

/// Masking tried as an attacker would: renames the agent cannot follow
/// column by column are masked, values echoed in errors are hidden, what
/// carries data past masking is refused, a masked json value stays JSON,
/// a prepared statement redefined by SQL is not run under its old shape,
/// and pgjdbc's describe-once pattern keeps its shape.
#[test]
fn masked_values_do_not_leak() {
    let served = start("masking", MASK_CARDS, CARDS);
    let (agent, db) = (&served.agent, &served.db);
    let conn = db.conninfo();
    for sql in [
        "SELECT x FROM cards AS t(i, x)",
        "SELECT t.x FROM cards t(i, x)",
        "WITH c(a, b) AS (SELECT * FROM cards) SELECT b FROM c",
        "SELECT y FROM (SELECT * FROM cards) s(i, y)",
        "SELECT upper(x) FROM (SELECT card AS x FROM cards) s",
        "SELECT * FROM unnest(ARRAY(SELECT card FROM cards))",
        "SELECT value FROM json_each_text(json_build_object('c', (SELECT card FROM cards LIMIT 1)))",
        "SELECT (SELECT x FROM cards t(i, x) LIMIT 1)",
        "SELECT * FROM (SELECT upper(card) FROM cards) s, (SELECT 1) o",
    ] {
        let out = psql_tuples(agent, &conn, sql);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!stdout.contains(CARD), "{sql} leaked: {stdout}");
        // Masked by the rule (partial, keep 4), not dropped or NULL.
        assert!(stdout.contains("****1111"), "{sql}: {stdout}");
    }
    // Plain columns are left alone.
    let out = psql_tuples(agent, &conn, "SELECT id, note FROM cards");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1|hello");
    // A value echoed in an error is hidden; the SQLSTATE stays.
    let out = pg_tool(
        agent,
        "psql",
        &[
            &conn,
            "-X",
            "-v",
            "VERBOSITY=verbose",
            "-c",
            "SELECT card::int FROM cards",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains(CARD), "an error echoed the card: {stderr}");
    // (22003: the value "4111…" is out of range for type integer.)
    assert!(
        stderr.contains("22003") && stderr.contains("mask rule \"cards\""),
        "{stderr}"
    );
    // Outlets: refused by the mask rule.
    for sql in [
        "DO $$ BEGIN RAISE NOTICE '%', (SELECT card FROM cards LIMIT 1); END $$",
        "SELECT pg_notify('leak', card) FROM cards",
    ] {
        let out = psql_tuples(agent, &conn, sql);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sql} ran");
        assert_eq!(refused_by(&stderr), Some("cards"), "{sql}: {stderr}");
    }
    // Over the extended protocol.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/masking.py");
    let out = pg_tool(
        agent,
        "python3",
        &[
            script,
            "127.0.0.1",
            &db.port.to_string(),
            pg::USER,
            pg::PASSWORD,
        ],
    );
    assert!(
        out.status.success(),
        "masking.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !v.to_string().contains(CARD),
        "leaked over the extended protocol: {v}"
    );
    assert_eq!(v["json"], serde_json::json!(["****11\"}", null]), "{v}");
    assert_eq!(v["stale"], serde_json::json!([[null, null]]), "{v}");
    // The refused second Parse, then the first statement's row: masked.
    assert_eq!(v["failed_parse"][0], "E:42P05", "{v}");
    assert_eq!(v["failed_parse"].as_array().unwrap().len(), 2, "{v}");
    let row = serde_json::json!([["1", "****1111", "hello"]]);
    assert_eq!(v["portal"]["first"], row, "{v}");
    for later in v["portal"]["later"].as_array().unwrap() {
        assert_eq!(later, &row, "a later run lost its shape: {v}");
    }
}

/// pgjdbc (Debian's libpostgresql-jdbc-java) with default settings: from
/// its sixth run a prepared statement is sent as Bind/Execute alone, and
/// every run must come back masked by column, not as NULLs, for
/// statements with and without a masked column.
#[test]
fn pgjdbc_prepared_statements_keep_their_masking_shape() {
    let served = start("pgjdbc", MASK_CARDS, CARDS);
    let (agent, db) = (&served.agent, &served.db);
    let classes = served.dir.0.join("java");
    std::fs::create_dir_all(&classes).unwrap();
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/JdbcMask.java");
    let jar = "/usr/share/java/postgresql.jar";
    let out = std::process::Command::new("javac")
        .args(["-cp", jar, "-d"])
        .arg(&classes)
        .arg(source)
        .output()
        .expect("javac (cargo xtask setup installs a JDK)");
    assert!(
        out.status.success(),
        "javac: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cp = format!("{jar}:{}", classes.display());
    let out = pg_tool(
        agent,
        "java",
        &[
            "-cp",
            &cp,
            "JdbcMask",
            &db.port.to_string(),
            pg::USER,
            pg::PASSWORD,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "java: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 21, "{stdout}");
    for (i, l) in lines[..10].iter().enumerate() {
        assert_eq!(*l, "card 1|****1111|hello", "run {}:\n{stdout}", i + 1);
    }
    for (i, l) in lines[10..20].iter().enumerate() {
        assert_eq!(*l, "note hello", "run {}:\n{stdout}", i + 1);
    }
    // The driver decoded the masked json value: a JSON string.
    assert_eq!(lines[20], "json \"****11\\\"}\"", "{stdout}");
}
