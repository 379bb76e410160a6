//! Just-in-time approval end to end: a real PostgreSQL, a real OIDC
//! provider (npm's `oidc-provider`, issuing RS256 JWT access tokens by
//! client credentials, with discovery and JWKS), the agent's HTTPS approval
//! API with a certificate made here (openssl), and unmodified clients in
//! the workload: psql, pgbench and a tokio-postgres application.
//! Tokens the agent must refuse are minted here (with the provider's key,
//! or with others) by `tests/oidc/provider.mjs mint`.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::*;

const PROVIDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/oidc/provider.mjs");
const AUDIENCE: &str = "urn:interceptor:approvals";

/// The people of the tests, as the provider knows them: subject → groups.
const PEOPLE: &str = r#"{
  "alice": ["dba"], "bob": ["security"], "dave": ["dba"], "erin": ["dba"],
  "carol": ["dev"], "olga": ["dba", "billing-owners"], "nogroups": []
}"#;

/// The OIDC provider, running.
struct Oidc {
    child: Child,
    issuer: String,
    key: PathBuf,
}

impl Oidc {
    fn start(dir: &Path) -> Oidc {
        let port = free_port();
        let key = dir.join("oidc-key.json");
        let mut child = Command::new("node")
            .args([PROVIDER, "serve", &port.to_string()])
            .arg(&key)
            .arg(PEOPLE)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node (cargo xtask setup installs it and the provider)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(
            line.starts_with("ready "),
            "the OIDC provider did not start ({line:?}); run cargo xtask setup"
        );
        Oidc {
            child,
            issuer: line["ready ".len()..].trim().to_owned(),
            key,
        }
    }

    /// An access token for `who`, from the provider (client credentials).
    fn token(&self, who: &str) -> String {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut resp = agent
            .post(format!("{}/token", self.issuer))
            .send_form([
                ("grant_type", "client_credentials"),
                ("client_id", who),
                ("client_secret", &format!("{who}-secret")),
                ("scope", "approve"),
                ("resource", AUDIENCE),
            ])
            .unwrap();
        let v: Value = resp.body_mut().read_json().unwrap();
        v["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no token for {who}: {v}"))
            .to_owned()
    }

    /// A token with `claims`, signed as `how` says (`[ALG, KID, foreign]`).
    fn mint(&self, claims: Value, how: &[&str]) -> String {
        let out = Command::new("node")
            .args([PROVIDER, "mint"])
            .arg(&self.key)
            .arg(claims.to_string())
            .args(how)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Claims of a good token for `who` in `groups`, with `change` made.
    fn claims(&self, who: &str, groups: &[&str], change: Value) -> Value {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut c = json!({
            "iss": self.issuer, "aud": AUDIENCE, "sub": who, "groups": groups,
            "iat": now, "exp": now + 600,
        });
        for (k, v) in change.as_object().unwrap() {
            match v {
                Value::Null => {
                    c.as_object_mut().unwrap().remove(k);
                }
                v => c[k] = v.clone(),
            }
        }
        c
    }
}

impl Drop for Oidc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A webhook receiver: answers its first post with HTTP 500 (the agent
/// must retry), every other with 200, and keeps what it was sent.
struct Hook {
    url: String,
    got: Arc<Mutex<Vec<Value>>>,
}

impl Hook {
    fn start() -> Hook {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        let got: Arc<Mutex<Vec<Value>>> = Arc::default();
        let kept = got.clone();
        std::thread::spawn(move || {
            let mut first = true;
            for c in l.incoming().flatten() {
                let body = read_post(&c);
                let status = if std::mem::take(&mut first) {
                    "500 Busy"
                } else {
                    "200 OK"
                };
                if status.starts_with("200") {
                    if let Ok(v) = serde_json::from_slice(&body) {
                        kept.lock().unwrap().push(v);
                    }
                }
                let _ = (&c).write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        Hook { url, got }
    }

    /// The events posted about request `id`, waiting for `want` of them.
    fn events(&self, id: &str, want: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let events: Vec<String> = self
                .got
                .lock()
                .unwrap()
                .iter()
                .filter(|m| m["request"]["id"] == id)
                .map(|m| m["event"].as_str().unwrap_or_default().to_owned())
                .collect();
            if events.len() >= want || Instant::now() > deadline {
                return events;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The body of an HTTP request read from `c`.
fn read_post(mut c: &std::net::TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n @ 1..) = c.read(&mut chunk) else {
            return buf;
        };
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < end + 4 + len {
            let Ok(n @ 1..) = c.read(&mut chunk) else {
                break;
            };
            buf.extend_from_slice(&chunk[..n]);
        }
        return buf[end + 4..].to_vec();
    }
}

/// PostgreSQL, the provider, and an agent with approvals on.
struct Stage {
    hook: Hook,
    dir: PathBuf,
    db: pg::Postgres,
    oidc: Oidc,
    agent: Agent,
    /// The approval API's URL, and the CA its certificate is checked with.
    api: String,
    ca: PathBuf,
}

/// Table the statements of the tests touch, made directly.
const SETUP: &str = "
CREATE TABLE orders (id int PRIMARY KEY, n int);
INSERT INTO orders SELECT g, 0 FROM generate_series(1, 200) g;
CREATE TABLE payroll (id int, pay int); INSERT INTO payroll VALUES (1, 10);
CREATE TABLE ledger (id int, v int); INSERT INTO ledger VALUES (1, 0);
CREATE TABLE prices (id int, v int); INSERT INTO prices VALUES (1, 0);
CREATE TABLE stock (id int, v int); INSERT INTO stock VALUES (1, 0);
CREATE TABLE audit (id int); INSERT INTO audit VALUES (1);
CREATE TABLE temp_notes (id int);
CREATE TABLE counters (id int, v int); INSERT INTO counters VALUES (1, 0);
";

/// The review rules of the tests (with `app` allowed to reach `db`).
const POLICY: &str = r#"
[[rule]]
id = "app-db"
workloads = ["app"]
targets = ["db"]
action = "allow"

[[rule]]
id = "echo-needs-approval"
workloads = ["app"]
targets = ["echo"]
action = "review"
approvers = [{ groups = ["dba"] }]
hold = "20s"

[[rule]]
id = "orders-writes"
on = "statement"
workloads = ["app"]
targets = ["db"]
classes = ["write"]
tables = ["orders"]
action = "review"
approvers = [{ groups = ["dba"] }]
hold = "60s"
grant = { scope = "once" }

[[rule]]
id = "payroll-two-groups"
on = "statement"
workloads = ["app"]
targets = ["db"]
tables = ["payroll"]
classes = ["write"]
action = "review"
approvers = [{ groups = ["dba"] }, { groups = ["security"] }]
hold = "60s"

[[rule]]
id = "ledger-ask-then-retry"
on = "statement"
workloads = ["app"]
targets = ["db"]
tables = ["ledger"]
classes = ["write"]
action = "review"
approvers = [{ groups = ["dba"] }]
hold = "0s"
grant = { scope = "statement", duration = "1h" }

[[rule]]
id = "prices-short-grant"
on = "statement"
workloads = ["app"]
targets = ["db"]
tables = ["prices"]
classes = ["write"]
action = "review"
approvers = [{ groups = ["dba"] }]
hold = "0s"
grant = { scope = "target", duration = "4s" }

[[rule]]
id = "stock-single-use"
on = "statement"
workloads = ["app"]
targets = ["db"]
tables = ["stock"]
classes = ["write"]
action = "review"
approvers = [{ groups = ["dba"] }]
hold = "0s"
grant = { scope = "statement", uses = 1 }

[[rule]]
id = "audit-short-hold"
on = "statement"
workloads = ["app"]
targets = ["db"]
tables = ["audit"]
classes = ["write"]
action = "review"
approvers = [{ groups = ["dba"] }]
hold = "2s"

[[rule]]
id = "counters-by-shape"
on = "statement"
workloads = ["app"]
targets = ["db"]
tables = ["counters"]
classes = ["write"]
action = "review"
approvers = [{ groups = ["dba"] }]
hold = "60s"
grant = { scope = "statement", duration = "1h" }

[[rule]]
id = "temp-short-ttl"
on = "statement"
workloads = ["app"]
targets = ["db"]
tables = ["temp_notes"]
classes = ["write"]
action = "review"
approvers = [{ groups = ["dba"] }]
hold = "0s"
grant = { pending_ttl = "3s" }
"#;

impl Stage {
    fn start(name: &str, echo_port: Option<u16>) -> Stage {
        require_root();
        let dir =
            std::env::temp_dir().join(format!("icpt-e2e-approvals-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = pg::Postgres::start(&dir.join("pg")).expect("starting PostgreSQL");
        enforcement::direct(&db, SETUP);
        let oidc = Oidc::start(&dir);
        // A CA, and the approval API's certificate for 127.0.0.1 from it.
        let (ca, cert, key) = test_certificate(&dir, "api");
        let api_port = free_port();
        let hook = Hook::start();
        // A webhook that is down: it must delay nothing.
        let down = format!("http://127.0.0.1:{}/", free_port());
        // (A target the connect rule names, whether or not a test uses it.)
        let echo = format!(
            "[[target]]\nname = \"echo\"\naddresses = [\"127.0.0.1:{}\"]\n\n",
            echo_port.unwrap_or_else(free_port)
        );
        let sections = format!(
            "[approvals]\nlisten = \"127.0.0.1:{api_port}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
             issuer = \"{}\"\naudience = \"{AUDIENCE}\"\n\n\
             [[approvals.webhook]]\nurl = \"{down}\"\n\n[[approvals.webhook]]\nurl = \"{}\"\n\n\
             [[workload]]\nname = \"app\"\nmanaged = true\nowners = [\"billing-owners\"]\n\n\
             [[target]]\nname = \"db\"\naddresses = [\"127.0.0.1:{}\"]\nprotocol = \"postgres\"\n\n{echo}",
            cert.display(),
            key.display(),
            oidc.issuer,
            hook.url,
            db.port
        );
        let agent = Agent::start(name, &sections, POLICY);
        Stage {
            hook,
            api: format!("https://127.0.0.1:{api_port}"),
            ca,
            dir,
            db,
            oidc,
            agent,
        }
    }

    /// A file holding `who`'s token from the provider.
    fn token_file(&self, who: &str) -> PathBuf {
        let f = self.dir.join(format!("{who}.token"));
        if !f.exists() {
            std::fs::write(&f, self.oidc.token(who)).unwrap();
        }
        f
    }

    /// `interceptor approvals ARGS` as `who`, over HTTPS.
    fn approvals(&self, who: &str, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("approvals")
            .args(args)
            .args(["--server", &self.api, "--ca-file"])
            .arg(&self.ca)
            .arg("--token-file")
            .arg(self.token_file(who))
            .output()
            .unwrap()
    }

    /// `approve|deny ID` as `who`; must succeed.
    fn decide(&self, who: &str, verb: &str, id: &str) {
        let out = self.approvals(who, &[verb, id, "--comment", "checked the ticket"]);
        assert!(
            out.status.success(),
            "{who} {verb} {id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The requests, as `approvals list --json` over the local socket
    /// shows them to `who`.
    fn requests(&self) -> Vec<Value> {
        let out = Command::new(BIN)
            .args(["approvals", "list", "--json", "--config"])
            .arg(&self.agent.config)
            .arg("--token-file")
            .arg(self.token_file("alice"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn request(&self, id: &str) -> Value {
        let out = self.approvals("alice", &["show", id, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The id of the pending request of rule `rule` made after the ones in
    /// `known`, waiting for it to appear.
    fn pending(&self, rule: &str, known: &[String]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = self.requests().into_iter().find(|r| {
                r["rule"] == rule
                    && r["status"] == "pending"
                    && !known.iter().any(|k| r["id"] == k.as_str())
            });
            if let Some(r) = found {
                return r["id"].as_str().unwrap().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no pending request of {rule}; agent log:\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// psql inside `app` running `sql` (with `ON_ERROR_STOP`), as a child;
    /// `requester`: the person who started it.
    fn psql(&self, sql: &str, requester: Option<&str>) -> Child {
        let mut c = Command::new(BIN);
        c.args(["exec", "--config"])
            .arg(&self.agent.config)
            .args(["--workload", "app"]);
        if let Some(who) = requester {
            c.arg("--requester-token").arg(self.token_file(who));
        }
        c.args([
            "--",
            "psql",
            &self.db.conninfo(),
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    }

    /// The table value `sql` reads, directly.
    fn read(&self, sql: &str) -> String {
        enforcement::direct(&self.db, sql).trim().to_owned()
    }
}

/// What a finished child said (stdout, stderr), and whether it succeeded.
fn finished(child: Child) -> (bool, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The tokio-postgres application inside `app`, running `sql` one by one.
fn pg_client_child(s: &Stage, sql: &[&str]) -> Child {
    let client = Path::new(BIN).parent().unwrap().join("examples/pg_client");
    assert!(
        client.exists(),
        "{} is missing: cargo build -p interceptor --example pg_client (cargo xtask test does)",
        client.display()
    );
    s.agent
        .run_in(Some("app"), client.to_str().unwrap())
        .arg(s.db.conninfo())
        .args(sql)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// [`pg_client_child`] to its end: a JSON line per statement, then the
/// notices.
fn pg_client(s: &Stage, sql: &[&str]) -> Vec<Value> {
    let (ok, out, err) = finished(pg_client_child(s, sql));
    assert!(ok, "{out}{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs `sql` in psql inside `app` to its end.
fn psql_now(s: &Stage, sql: &str) -> (bool, String, String) {
    finished(s.psql(sql, None))
}

/// Statements under review wait for a second person, on psql, pgbench and
/// tokio-postgres: approved, they run as if nothing happened; denied or
/// undecided in time, the server raises 42501 naming the rule and the
/// request, and the session goes on. `hold = "0s"` refuses at once and the
/// try after approval passes; grants end with their duration and their
/// uses; two groups need two people. A hundred held statements hold only
/// their own connections: pgbench flows beside them.
#[test]
fn statements_under_review_wait_for_a_second_person() {
    let s = Stage::start("review", None);
    let mut known: Vec<String> = Vec::new();

    // Approved: psql's statement runs, after a notice naming the request.
    let held = s.psql("DELETE FROM orders WHERE id = 1", None);
    let id = s.pending("orders-writes", &known);
    known.push(id.clone());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        s.read("SELECT count(*) FROM orders WHERE id = 1"),
        "1",
        "ran before approval"
    );
    s.decide("alice", "approve", &id);
    let (ok, out, err) = finished(held);
    assert!(ok, "{out}{err}");
    assert!(out.contains("DELETE 1"), "{out}");
    assert!(
        err.contains("NOTICE") && err.contains(&id),
        "psql shows the notice: {err}"
    );
    assert_eq!(s.read("SELECT count(*) FROM orders WHERE id = 1"), "0");
    let r = s.request(&id);
    assert_eq!(r["status"], "approved");
    assert_eq!(r["approvals"][0]["person"]["subject"], "alice");
    assert_eq!(r["grant"]["used"], 1);
    // Told to the webhook (its first answer was a 500: retried), with a
    // Slack-compatible text; the one that is down slowed nothing.
    assert_eq!(s.hook.events(&id, 2), ["requested", "approved"]);
    let m = s.hook.got.lock().unwrap()[0].clone();
    assert!(m["text"].as_str().unwrap().contains(&id), "{m}");

    // Denied: 42501 naming rule and request; the session stays usable.
    let held = s.psql("DELETE FROM orders WHERE id = 2; SELECT 'still here'", None);
    let id = s.pending("orders-writes", &known);
    known.push(id.clone());
    s.decide("alice", "deny", &id);
    let (ok, out, err) = finished(held);
    assert!(!ok, "{out}");
    assert!(
        err.contains("orders-writes") && err.contains(&id) && err.contains("denied by alice"),
        "{err}"
    );
    assert_eq!(s.read("SELECT count(*) FROM orders WHERE id = 2"), "1");

    // Undecided within the hold (2s): refused; the session goes on
    // (tokio-postgres runs the next statement on the same connection).
    let started = Instant::now();
    let lines = pg_client(&s, &["DELETE FROM audit", "SELECT 1"]);
    assert_eq!(lines[0]["code"], "42501", "{lines:?}");
    let why = lines[0]["error"].as_str().unwrap();
    assert!(
        why.contains("audit-short-hold") && why.contains("no decision within 2s"),
        "{why}"
    );
    assert_eq!(
        lines[1]["rows"], 1,
        "the session is usable after a refusal: {lines:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(s.read("SELECT count(*) FROM audit"), "1");
    known.push(s.pending("audit-short-hold", &known));

    // hold = 0s: refused at once, the request left pending; approved, the
    // retry passes (scope statement: other values too).
    let asked = Instant::now();
    let (ok, _, err) = psql_now(&s, "UPDATE ledger SET v = 1 WHERE id = 1");
    assert!(!ok && err.contains("waiting for approval"), "{err}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "a refusal waited {:?} (a webhook is down)",
        asked.elapsed()
    );
    let id = s.pending("ledger-ask-then-retry", &known);
    known.push(id.clone());
    s.decide("alice", "approve", &id);
    let (ok, out, err) = psql_now(&s, "UPDATE ledger SET v = 2 WHERE id = 1");
    assert!(ok, "{out}{err}");
    assert_eq!(s.read("SELECT v FROM ledger"), "2");

    // A grant ends with its duration (4s): then review again.
    let (ok, _, _) = psql_now(&s, "UPDATE prices SET v = 1");
    assert!(!ok);
    let id = s.pending("prices-short-grant", &known);
    known.push(id.clone());
    s.decide("dave", "approve", &id);
    let (ok, out, err) = psql_now(&s, "UPDATE prices SET v = 2");
    assert!(ok, "{out}{err}");
    std::thread::sleep(Duration::from_millis(4500));
    let (ok, _, err) = psql_now(&s, "UPDATE prices SET v = 3");
    assert!(!ok && err.contains("waiting for approval"), "{err}");
    assert_eq!(s.read("SELECT v FROM prices"), "2");
    known.push(s.pending("prices-short-grant", &known));

    // A single-use grant: the second use is held again.
    let (ok, _, _) = psql_now(&s, "UPDATE stock SET v = v + 1");
    assert!(!ok);
    let id = s.pending("stock-single-use", &known);
    known.push(id.clone());
    s.decide("alice", "approve", &id);
    assert!(psql_now(&s, "UPDATE stock SET v = v + 1").0);
    let (ok, _, err) = psql_now(&s, "UPDATE stock SET v = v + 1");
    assert!(!ok && err.contains("waiting for approval"), "{err}");
    assert_eq!(s.read("SELECT v FROM stock"), "1");
    known.push(s.pending("stock-single-use", &known));

    // Two groups: a dba and a security person; the same one twice counts once.
    let held = s.psql("UPDATE payroll SET pay = 11", None);
    let id = s.pending("payroll-two-groups", &known);
    known.push(id.clone());
    s.decide("alice", "approve", &id);
    let again = s.approvals("alice", &["approve", &id]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("counts once"));
    assert_eq!(s.request(&id)["status"], "pending");
    s.decide("bob", "approve", &id);
    let (ok, out, err) = finished(held);
    assert!(ok, "{out}{err}");
    assert_eq!(s.read("SELECT pay FROM payroll"), "11");
    assert_eq!(s.request(&id)["approvals"].as_array().unwrap().len(), 2);

    // tokio-postgres (extended protocol: Parse, then Bind and Execute in a
    // second round trip) held and approved: both halves go, once.
    let app = pg_client_child(&s, &["DELETE FROM orders WHERE id = 10", "SELECT 1"]);
    let id = s.pending("orders-writes", &known);
    known.push(id.clone());
    s.decide("erin", "approve", &id);
    let (ok, out, err) = finished(app);
    assert!(ok, "{out}{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["rows"], 1, "{out}");
    assert!(
        lines[2]["notices"][0].as_str().unwrap().contains(&id),
        "{out}"
    );
    assert_eq!(s.read("SELECT count(*) FROM orders WHERE id = 10"), "0");

    // pgbench through a review rule: its first update held, approved for
    // the statement's shape; the other 49 pass under the grant.
    let script = s.dir.join("counters.sql");
    std::fs::write(&script, "UPDATE counters SET v = v + 1 WHERE id = 1;\n").unwrap();
    let bench = pg_tool_command(
        &s.agent,
        "pgbench",
        &[
            "-n",
            "-t",
            "50",
            "-f",
            script.to_str().unwrap(),
            &s.db.conninfo(),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let id = s.pending("counters-by-shape", &known);
    known.push(id.clone());
    s.decide("alice", "approve", &id);
    let (ok, out, err) = finished(bench);
    assert!(ok, "{out}{err}");
    assert_eq!(s.read("SELECT v FROM counters"), "50");
    assert_eq!(s.request(&id)["grant"]["used"], 50);

    pgbench_init(&s.db.conninfo());
    // A hundred held statements, each holding only its own connection:
    // pgbench -S flows beside them on the same workload and relay loops.
    let many: Vec<Child> = (0..100)
        .map(|i| s.psql(&format!("DELETE FROM orders WHERE id = {}", 100 + i), None))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while s
        .requests()
        .iter()
        .filter(|r| r["rule"] == "orders-writes" && r["status"] == "pending")
        .count()
        < 100
    {
        assert!(Instant::now() < deadline, "not all 100 held");
        std::thread::sleep(Duration::from_millis(200));
    }
    let bench = pg_tool(
        &s.agent,
        "pgbench",
        &["-n", "-S", "-c", "4", "-T", "3", &s.db.conninfo()],
    );
    let text = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let tps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tps in {text}"));
    assert!(tps > 100.0, "pgbench beside held statements: {tps} tps");
    assert_eq!(s.read("SELECT count(*) FROM orders WHERE id >= 100"), "101");
    for r in s.requests() {
        if r["rule"] == "orders-writes" && r["status"] == "pending" {
            let id = r["id"].as_str().unwrap();
            let out = s.approvals("alice", &["deny", id]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    for c in many {
        let (ok, _, err) = finished(c);
        assert!(!ok && err.contains("denied by alice"), "{err}");
    }
    assert_eq!(s.read("SELECT count(*) FROM orders WHERE id >= 100"), "101");

    // The record names the request behind each reviewed statement.
    let sessions = s.agent.sessions();
    let mut named = 0;
    for sess in &sessions {
        let id = sess["id"].as_str().unwrap();
        let out = s.agent.cli(&["sessions", "show", id, "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        for st in v["statement_events"].as_array().into_iter().flatten() {
            if st["approval"].is_string() {
                named += 1;
            }
        }
    }
    assert!(named >= 6, "statements naming their request: {named}");
}

/// Approving needs a valid token of another person in the rule's groups,
/// counted once; every refusal is clear, recorded, never counted. Held
/// connects wait without an upstream connection. A restarted agent keeps
/// its pending requests.
#[test]
fn approvers_are_other_people_with_valid_tokens() {
    let echo = Echo::start();
    let mut s = Stage::start("approvers", Some(echo.port));
    let (ok, _, err) = psql_now(&s, "UPDATE ledger SET v = 5");
    assert!(!ok && err.contains("waiting for approval"), "{err}");
    let id = s.pending("ledger-ask-then-retry", &[]);

    // Tokens refused, each with its reason.
    let o = &s.oidc;
    let good = o.token("alice");
    // A signature changed in its middle.
    let mut forged = good.into_bytes();
    let at = forged.len() - 40;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let none = format!(
        "{}.{}.",
        base64_url(&json!({ "alg": "none", "typ": "JWT" }).to_string()),
        base64_url(&o.claims("alice", &["dba"], json!({})).to_string())
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let bad: Vec<(&str, String, &str)> = vec![
        ("forged signature", forged, "InvalidSignature"),
        ("alg none", none, "not a JWT"),
        (
            "HS256 with the public key",
            o.mint(o.claims("alice", &["dba"], json!({})), &["HS256"]),
            "not accepted",
        ),
        (
            "expired",
            o.mint(
                o.claims("alice", &["dba"], json!({ "exp": now - 3600 })),
                &[],
            ),
            "ExpiredSignature",
        ),
        (
            "not yet valid",
            o.mint(
                o.claims("alice", &["dba"], json!({ "nbf": now + 3600 })),
                &[],
            ),
            "ImmatureSignature",
        ),
        (
            "wrong audience",
            o.mint(
                o.claims("alice", &["dba"], json!({ "aud": "someone-else" })),
                &[],
            ),
            "InvalidAudience",
        ),
        (
            "wrong issuer",
            o.mint(
                o.claims("alice", &["dba"], json!({ "iss": "https://evil.example" })),
                &[],
            ),
            "InvalidIssuer",
        ),
        (
            "unknown kid",
            o.mint(
                o.claims("alice", &["dba"], json!({})),
                &["RS256", "no-such-key"],
            ),
            "no key `no-such-key`",
        ),
        (
            "a key of its own",
            o.mint(
                o.claims("alice", &["dba"], json!({})),
                &["RS256", "", "foreign"],
            ),
            "InvalidSignature",
        ),
        (
            "no groups claim",
            o.mint(o.claims("alice", &["dba"], json!({ "groups": null })), &[]),
            "no `groups` claim",
        ),
    ];
    let agent = https(&s.ca);
    for (what, token, want) in &bad {
        let (status, v) = call(
            &agent,
            &s.api,
            &format!("/v1/requests/{id}/approve"),
            Some(token),
        );
        assert_eq!(status, 401, "{what}: {v}");
        let message = v["message"].as_str().unwrap_or_default();
        assert!(message.contains(want), "{what}: {message}");
    }
    let (status, _) = call(&agent, &s.api, "/v1/requests", None);
    assert_eq!(status, 401, "no token, no listing");
    let r = s.request(&id);
    assert_eq!(r["status"], "pending");
    assert_eq!(r["approvals"].as_array().unwrap().len(), 0);
    assert_eq!(r["attempts"].as_array().unwrap().len(), bad.len(), "{r}");

    // Root through the local socket, without a token: no approver.
    let out = Command::new(BIN)
        .args(["approvals", "approve", &id, "--config"])
        .arg(&s.agent.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token is needed"));

    // People refused: an owner, outside the groups, unknown request.
    let refused = |who: &str, id: &str, want: &str| {
        let out = s.approvals(who, &["approve", id]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{who}: {err}");
    };
    refused("olga", &id, "owner");
    refused("bob", &id, "in none of the groups");
    refused("nogroups", &id, "in none of the groups");
    refused("alice", "00000000000000aa", "no request");

    // The human requester: carol started psql; she cannot approve it.
    let held = s.psql("DELETE FROM orders WHERE id = 50", Some("carol"));
    let mine = s.pending("orders-writes", &[]);
    let r = s.request(&mine);
    assert_eq!(r["requester"]["human"]["subject"], "carol", "{r}");
    // (carol is in no dba group either; a token naming her with dba still fails)
    let carol_dba = o.mint(o.claims("carol", &["dba"], json!({})), &[]);
    let (status, v) = call(
        &agent,
        &s.api,
        &format!("/v1/requests/{mine}/approve"),
        Some(&carol_dba),
    );
    assert_eq!(status, 403, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("own request"),
        "{v}"
    );

    // Two approvers racing on the last place: one counts.
    let tokens = [o.token("alice"), o.token("dave"), o.token("erin")];
    let results: Vec<u16> = std::thread::scope(|sc| {
        let hs: Vec<_> = tokens
            .iter()
            .map(|t| {
                let (agent, api, path) = (&agent, &s.api, format!("/v1/requests/{mine}/approve"));
                sc.spawn(move || call(agent, api, &path, Some(t)).0)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        results.iter().filter(|s| **s == 200).count(),
        1,
        "{results:?}"
    );
    let (ok, out, err) = finished(held);
    assert!(ok, "{out}{err}");
    assert_eq!(s.request(&mine)["approvals"].as_array().unwrap().len(), 1);

    // An expired request cannot be approved.
    let (ok, _, _) = psql_now(&s, "INSERT INTO temp_notes VALUES (1)");
    assert!(!ok);
    let short = s.pending("temp-short-ttl", &[]);
    std::thread::sleep(Duration::from_millis(3500));
    refused("alice", &short, "expired");

    // A connect under review is held with no upstream connection, then
    // relayed once approved, or reset once denied.
    let waiting = s
        .agent
        .run_in(Some("app"), "python3")
        .args([CLIENT, "echo", "127.0.0.1", &echo.port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let c = s.pending("echo-needs-approval", &[]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        echo.peers.lock().unwrap().is_empty(),
        "an upstream connection while held"
    );
    s.decide("alice", "approve", &c);
    let (ok, out, err) = finished(waiting);
    assert!(ok, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["sent_sha256"], v["received_sha256"], "{v}");
    let refused_connect = s
        .agent
        .run_in(Some("app"), "python3")
        .args([CLIENT, "echo", "127.0.0.1", &echo.port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let c2 = s.pending("echo-needs-approval", std::slice::from_ref(&c));
    s.decide("dave", "deny", &c2);
    let (ok, out, _) = finished(refused_connect);
    let relayed = ok && serde_json::from_str::<Value>(&out).is_ok_and(|v| v["received"] != 0);
    assert!(!relayed, "a denied connect relayed: {out}");

    // Restarted with a request pending: it stays pending, and is decided.
    s.agent.stop();
    s.agent.spawn();
    assert_eq!(s.request(&id)["status"], "pending");
    s.decide("alice", "approve", &id);
    let (ok, out, err) = psql_now(&s, "UPDATE ledger SET v = 6");
    assert!(ok, "{out}{err}");
    assert_eq!(s.read("SELECT v FROM ledger"), "6");
}

/// An HTTPS client that trusts `ca`.
fn https(ca: &Path) -> ureq::Agent {
    use ureq::tls::{Certificate, RootCerts, TlsConfig};
    let pem = std::fs::read(ca).unwrap();
    let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|i| match i {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    ureq::Agent::config_builder()
        .tls_config(
            TlsConfig::builder()
                .root_certs(RootCerts::new_with_certs(&certs))
                .build(),
        )
        .http_status_as_error(false)
        .build()
        .into()
}

/// POSTs (or, for a listing, GETs) `path` with `token`: the status and body.
fn call(agent: &ureq::Agent, api: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let url = format!("{api}{path}");
    let auth = format!("Bearer {}", token.unwrap_or(""));
    let resp = if path.ends_with("/requests") {
        agent.get(&url).header("Authorization", &auth).call()
    } else {
        agent
            .post(&url)
            .header("Authorization", &auth)
            .send_json(json!({ "comment": "via the API" }))
    };
    let mut resp = resp.unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_json().unwrap_or(Value::Null))
}

/// Base64url without padding.
fn base64_url(text: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let b = text.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | u32::from(c) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}
