//! TLS both ways and credential injection (docs/tls.md), against a real
//! PostgreSQL with `ssl = on` and `hostssl`-only SCRAM authentication:
//! certificates made here (rcgen), real clients (psql, pgbench, pgjdbc,
//! psycopg) inside a workload, and probes that speak TLS badly.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::Value;

use super::{enforcement::direct, pg, pg_tool, pg_tool_command, pgbench_init, s};
use crate::harness::*;

const PROBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/tlsprobe.py");
const JDBC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/JdbcQuery.java");

/// A test CA.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (and 127.0.0.1 with `ip`), valid
    /// from `from` to `to` days from now: its PEM, its key's, its DER.
    fn leaf(&self, names: &[&str], ip: bool, from: i64, to: i64) -> (String, String, Vec<u8>) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        if ip {
            params
                .subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        let day = |d: i64| {
            let now = SystemTime::now();
            let off = Duration::from_secs(d.unsigned_abs() * 86_400);
            if d < 0 {
                now - off
            } else {
                now + off
            }
        };
        params.not_before = day(from).into();
        params.not_after = day(to).into();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// A throw-away PostgreSQL with TLS on (`hostssl` only) presenting `leaf`.
fn tls_postgres(name: &str, leaf: &(String, String, Vec<u8>)) -> (PathBuf, pg::Postgres) {
    require_root();
    let dir = std::env::temp_dir().join(format!("icpt-e2e-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let db = pg::Postgres::start_tls(&dir, (&leaf.0, &leaf.1)).expect("starting PostgreSQL");
    (dir, db)
}

/// Config sections: workload `app` (and `batch`), target `db` on `db`'s
/// port with `target` lines, then `extra`.
fn sections(db: &pg::Postgres, head: &str, target: &str, extra: &str) -> String {
    format!(
        "{head}\n[[workload]]\nname = \"app\"\nmanaged = true\n\n[[workload]]\nname = \"batch\"\n\
         managed = true\n\n[[target]]\nname = \"db\"\naddresses = [\"127.0.0.1:{}\"]\n\
         protocol = \"postgres\"\n{target}\n\n{extra}",
        db.port
    )
}

const POLICY: &str = "[[rule]]\nid = \"apps-db\"\nworkloads = [\"app\", \"batch\"]\n\
                      targets = [\"db\"]\naction = \"allow\"\n\n\
                      [[rule]]\nid = \"app-no-ddl\"\non = \"statement\"\nworkloads = [\"app\"]\n\
                      targets = [\"db\"]\nclasses = [\"ddl\"]\naction = \"deny\"\n";

/// Writes `text` to `path`, root's alone (0600), replacing it at once.
fn secret(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn psql_in(agent: &Agent, workload: &str, conn: &str, sql: &str) -> Output {
    let mut c = agent.run_in(Some(workload), "psql");
    c.args([conn, "-X", "-A", "-t", "-c", sql]);
    c.env_remove("PGPASSWORD").output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn sha256_hex(b: &[u8]) -> String {
    interceptor::record::hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

/// The newest session of the agent's that `pick` accepts, once one has
/// ended.
fn newest(agent: &Agent, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
    let all = agent.sessions_until(what, |ss| {
        ss.iter().any(|x| pick(x) && x["outcome"] != "open")
    });
    all.into_iter()
        .filter(|x| pick(x) && x["outcome"] != "open")
        .last()
        .unwrap()
}

/// With a credential for `app` → `db`, an application with no password and
/// `sslmode=disable` logs in through the agent, which speaks verified TLS
/// to the server and SCRAM-SHA-256-PLUS as the credential's user; the same
/// application directly is refused (the server takes TLS alone). The
/// session records the workload as who asked, the upstream user, and the
/// server's TLS (version, cipher, certificate); the secret is nowhere in
/// the record, the agent's log or `policy explain`. A password rotated on
/// disk is used by the next connection; Ctrl-C still cancels (the cancel
/// key the application holds is the agent's); SCRAM keys log in as the
/// password does; statement rules still key on the workload, not on the
/// user the agent logs in as; a password file others may read is refused
/// at load.
#[test]
fn injected_credentials_log_in_over_verified_tls() {
    let ca = Ca::new("inject");
    let good = ca.leaf(&["db.test"], true, -1, 2);
    let (dir, db) = tls_postgres("inject", &good);
    direct(
        &db,
        "create role svc login password 'first-secret-0xA1'; grant pg_read_all_stats to svc; \
         grant create on schema public to svc",
    );
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let pw = dir.join("svc.pw");
    secret(&pw, "first-secret-0xA1\n");
    // SCRAM keys, as PostgreSQL 18 hands them on, made from the server's
    // verifier and the password.
    let verifier = direct(
        &db,
        "select rolpassword from pg_authid where rolname = 'svc'",
    );
    let (client_key, server_key) = scram_keys(&verifier, "first-secret-0xA1");
    let (ck, sk) = (dir.join("svc.client"), dir.join("svc.server"));
    secret(&ck, &client_key);
    secret(&sk, &server_key);
    let target = format!(
        "tls = {{ mode = \"verify-full\", ca_file = \"{}\", server_name = \"db.test\" }}",
        ca_file.display()
    );
    let creds = format!(
        "[[credential]]\nworkload = \"app\"\ntarget = \"db\"\nuser = \"svc\"\npassword_file = \"{}\"\n\n\
         [[credential]]\nworkload = \"batch\"\ntarget = \"db\"\nuser = \"svc\"\n\
         client_key_file = \"{}\"\nserver_key_file = \"{}\"\n",
        pw.display(),
        ck.display(),
        sk.display()
    );
    let mut agent = Agent::start("inject", &sections(&db, "", &target, &creds), POLICY);
    let app_conn = format!(
        "host=127.0.0.1 port={} user=app dbname=postgres sslmode=disable",
        db.port
    );
    let sql =
        "select current_user, s.ssl, s.version from pg_stat_ssl s where pid = pg_backend_pid()";

    let through = ok(&psql_in(&agent, "app", &app_conn, sql));
    assert_eq!(through, "svc|t|TLSv1.3");
    let mut directly = std::process::Command::new("psql");
    directly.args([&app_conn, "-X", "-A", "-t", "-c", sql]);
    let e = failed(&directly.env_remove("PGPASSWORD").output().unwrap());
    assert!(e.contains("no encryption"), "{e}");

    let x = newest(&agent, "the injected session", |x| {
        x["credential"]["user"] == "svc"
    });
    assert_eq!(x["outcome"], "closed", "{x}");
    assert_eq!(x["workload"], "app");
    assert_eq!(x["identity"], "spiffe://e2e.test/app");
    assert_eq!(x["postgres"]["user"], "app", "what the application asked");
    assert_eq!(x["credential"]["method"], "SCRAM-SHA-256-PLUS", "{x}");
    let server = &x["tls"]["server"];
    assert_eq!(server["how"], "verify-full", "{x}");
    assert_eq!(server["version"], "TLSv1_3");
    assert!(s(&server["cipher"]).starts_with("TLS13_"), "{x}");
    assert_eq!(server["certificate_sha256"], sha256_hex(&good.2));
    assert_eq!(server["certificate_subject"], "CN=db.test");
    assert_eq!(server["server_name"], "db.test");
    assert!(x["tls"]["client"].is_null(), "the application spoke no TLS");
    let id = s(&x["id"]).to_owned();
    let shown = ok(&agent.cli(&["sessions", "show", &id]));
    assert!(
        shown.contains("credential:") && shown.contains("svc"),
        "{shown}"
    );

    // Ctrl-C: psql sends a CancelRequest with the key it was given.
    let t = Instant::now();
    let mut c = pg_tool_command(&agent, "timeout", &[]);
    c.args([
        "-s",
        "INT",
        "2",
        "psql",
        &app_conn,
        "-X",
        "-c",
        "select pg_sleep(30)",
    ]);
    let out = c.env_remove("PGPASSWORD").output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("canceling statement due to user request"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    newest(&agent, "the cancel", |x| {
        x["postgres"]["cancel_request"] == true
    });

    // Rotation: the server's password changes; the old file fails (the
    // application reads the server's refusal), the new one works at once.
    direct(&db, "alter role svc password 'second-secret-0xB2'");
    let e = failed(&psql_in(&agent, "app", &app_conn, "select 1"));
    assert!(
        e.contains("password authentication failed for user \"svc\""),
        "{e}"
    );
    let x = newest(&agent, "the refused login", |x| {
        s(&x["detail"]).contains("upstream login as `svc`")
    });
    assert_eq!(x["outcome"], "error", "{x}");
    secret(&pw, "second-secret-0xB2\n");
    assert_eq!(
        ok(&psql_in(&agent, "app", &app_conn, "select current_user")),
        "svc"
    );

    // SCRAM keys (made for the first password: the role gets it back).
    direct(&db, "alter role svc password 'first-secret-0xA1'");
    let verifier2 = direct(
        &db,
        "select rolpassword from pg_authid where rolname = 'svc'",
    );
    let (client_key, server_key) = scram_keys(&verifier2, "first-secret-0xA1");
    secret(&ck, &client_key);
    secret(&sk, &server_key);
    let batch_conn = app_conn.replace("user=app", "user=batch");
    assert_eq!(
        ok(&psql_in(
            &agent,
            "batch",
            &batch_conn,
            "select current_user"
        )),
        "svc"
    );
    let x = newest(&agent, "the keys' session", |x| x["workload"] == "batch");
    assert_eq!(x["credential"]["method"], "SCRAM-SHA-256-PLUS", "{x}");
    // Policy keys on the workload, not on the user both log in as: app may
    // not make a table, batch may. (app's file back to the password the
    // role has again.)
    secret(&pw, "first-secret-0xA1\n");
    let ddl = "create table made_by_svc (a int)";
    let e = failed(&psql_in(&agent, "app", &app_conn, ddl));
    assert!(e.contains("app-no-ddl"), "{e}");
    ok(&psql_in(&agent, "batch", &batch_conn, ddl));
    let x = newest(&agent, "the refused DDL", |x| {
        x["workload"] == "app" && x["credential"]["user"] == "svc" && x["statements"] == 1
    });
    let id = s(&x["id"]).to_owned();
    let shown = ok(&agent.cli(&["sessions", "show", &id, "--json"]));
    assert!(
        shown.contains("made_by_svc") && shown.contains("app-no-ddl") && shown.contains("42501"),
        "{shown}"
    );

    // The secrets are nowhere: not in the record, the log, or explain.
    let explain = agent.cli(&["policy", "explain", "--workload", "app", "--target", "db"]);
    let log = agent.log();
    agent.stop();
    for secret in ["first-secret-0xA1", "second-secret-0xB2", &client_key] {
        assert!(!log.contains(secret), "the log holds a secret");
        assert!(
            !String::from_utf8_lossy(&explain.stdout).contains(secret),
            "explain shows a secret"
        );
        assert!(
            !grep_dir(&agent.dir.join("data"), secret.as_bytes()),
            "the data directory holds a secret"
        );
    }

    // Readable by others: refused at load (then put back, so the agent's
    // pins can be detached with its config).
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = agent.cli(&["run"]);
    let e = failed(&out);
    assert!(e.contains("must be owned by root with mode 0600"), "{e}");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    done(agent, db, dir);
}

/// `sqls` run directly, each on its own, as the server's owner over its
/// unix socket (which takes no TLS and no client certificate).
fn direct_local(db: &pg::Postgres, sqls: &[&str]) {
    let mut c = std::process::Command::new("psql");
    c.args([&db.local_conninfo(), "-X", "-A", "-t"]);
    for sql in sqls {
        c.args(["-c", sql]);
    }
    ok(&c.output().unwrap());
}

/// Ends a test: the agent detached, the server stopped, its files gone.
fn done(agent: Agent, db: pg::Postgres, dir: PathBuf) {
    drop(agent);
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
}

/// Whether any file under `dir` holds `needle`.
fn grep_dir(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            grep_dir(&p, needle)
        } else {
            std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        }
    })
}

/// The base64 ClientKey and ServerKey of `password` under the server's
/// SCRAM verifier `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
fn scram_keys(verifier: &str, password: &str) -> (String, String) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let rest = verifier.strip_prefix("SCRAM-SHA-256$").unwrap();
    let (iter_salt, keys) = rest.split_once('$').unwrap();
    let (iterations, salt) = iter_salt.split_once(':').unwrap();
    let (_, server_key) = keys.split_once(':').unwrap();
    let mut salted = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations.parse().unwrap(),
        &b64.decode(salt).unwrap(),
        password.as_bytes(),
        &mut salted,
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &salted);
    let client = ring::hmac::sign(&key, b"Client Key");
    (b64.encode(client.as_ref()), server_key.to_owned())
}

/// With `[agent.tls] mode = "terminate"`, applications that insist on TLS
/// work unchanged: psql with `sslmode=require`, and with `verify-full`
/// trusting the node CA by address and by a name the target lists;
/// pgbench, pgjdbc (`ssl=true&sslmode=require`) and psycopg. The agent
/// speaks verified TLS to the server meanwhile. A client that trusts
/// another CA refuses the agent's certificate; one that requires channel
/// binding cannot have it. A probe that sends no TLS after its SSLRequest
/// ends with the reason recorded; one that starts with a ClientHello (the
/// direct negotiation) is served.
#[test]
fn applications_that_insist_on_tls_work_through_termination() {
    let ca = Ca::new("term");
    let good = ca.leaf(&["db.test"], true, -1, 2);
    let (dir, db) = tls_postgres("term", &good);
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let target = format!(
        "tls = {{ mode = \"verify-full\", ca_file = \"{}\" }}\nserver_names = [\"db.test\"]",
        ca_file.display()
    );
    let head = "[agent.tls]\nmode = \"terminate\"\n";
    let mut agent = Agent::prepare("term", &sections(&db, head, &target, ""), POLICY);
    // No CA yet: the agent says how to make one.
    let e = failed(&agent.cli(&["run"]));
    assert!(e.contains("interceptor ca init"), "{e}");
    let made = agent.cli(&["ca", "init"]);
    let pem = ok(&made);
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let key = agent.dir.join("data/ca/ca.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let shown = agent.cli(&["ca", "show"]);
    assert_eq!(ok(&shown), pem, "show prints what init made");
    let node_ca = agent.dir.join("node-ca.crt");
    std::fs::write(&node_ca, format!("{pem}\n")).unwrap();
    agent.spawn();

    let base = db.conninfo();
    let sql = "select s.ssl from pg_stat_ssl s where pid = pg_backend_pid()";
    let require = format!("{base} sslmode=require");
    assert_eq!(ok(&psql_in(&agent, "app", &require, sql)), "t");
    let x = newest(&agent, "a terminated session", |x| {
        !x["tls"]["client"].is_null()
    });
    assert_eq!(x["tls"]["client"]["how"], "terminated", "{x}");
    assert_eq!(x["tls"]["client"]["version"], "TLSv1_3", "{x}");
    assert_eq!(x["tls"]["server"]["how"], "verify-full", "{x}");
    assert_eq!(x["outcome"], "closed", "{x}");
    // SCRAM between the two cannot survive TLS on both hops: the agent
    // logged in with the application's password, channel bound.
    assert_eq!(x["credential"]["relayed"], true, "{x}");
    assert_eq!(x["credential"]["method"], "SCRAM-SHA-256-PLUS", "{x}");
    assert_eq!(x["credential"]["user"], pg::USER, "{x}");

    let full_ip = format!(
        "{base} sslmode=verify-full sslrootcert={}",
        node_ca.display()
    );
    assert_eq!(ok(&psql_in(&agent, "app", &full_ip, sql)), "t");
    let full_name = format!(
        "host=db.test hostaddr=127.0.0.1 port={} user={} password={} dbname=postgres \
         sslmode=verify-full sslrootcert={}",
        db.port,
        pg::USER,
        pg::PASSWORD,
        node_ca.display()
    );
    assert_eq!(ok(&psql_in(&agent, "app", &full_name, sql)), "t");
    let x = newest(&agent, "by name", |x| {
        x["tls"]["client"]["server_name"] == "db.test"
    });
    assert_eq!(x["outcome"], "closed", "{x}");
    // Trusting another CA: the agent's certificate is refused.
    let other = format!(
        "{base} sslmode=verify-full sslrootcert={}",
        ca_file.display()
    );
    let e = failed(&psql_in(&agent, "app", &other, sql));
    assert!(e.contains("certificate verify failed"), "{e}");
    let x = newest(&agent, "the refused certificate", |x| {
        s(&x["detail"]).contains("client TLS")
    });
    assert!(s(&x["detail"]).contains("node CA"), "{x}");
    // Channel binding cannot survive termination.
    let bound = format!("{require} channel_binding=require");
    let e = failed(&psql_in(&agent, "app", &bound, sql));
    assert!(e.contains("channel binding"), "{e}");

    // pgbench, pgjdbc, psycopg.
    pgbench_init(&base);
    let out = pg_tool(&agent, "pgbench", &["-n", "-S", "-t", "50", &require]);
    let text = ok(&out);
    assert!(
        text.contains("number of transactions actually processed: 50"),
        "{text}"
    );
    let url = format!(
        "jdbc:postgresql://127.0.0.1:{}/postgres?ssl=true&sslmode=require",
        db.port
    );
    let out = pg_tool(
        &agent,
        "java",
        &[
            "-cp",
            "/usr/share/java/postgresql.jar",
            JDBC,
            &url,
            pg::USER,
            pg::PASSWORD,
            "select s.ssl::text, count(*) from pg_stat_ssl s, pgbench_branches where pid = pg_backend_pid() group by 1",
        ],
    );
    assert_eq!(ok(&out), "true|1");
    let out = pg_tool(
        &agent,
        "python3",
        &[PROBE, "psycopg", &require, "select 40 + 2"],
    );
    let v: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(v["rows"], serde_json::json!([["42"]]), "{v}");
    assert_eq!(v["ssl"], true, "{v}");
    let jdbc = newest(&agent, "pgjdbc's session", |x| {
        x["evidence"]["comm"] == "java"
    });
    assert_eq!(jdbc["tls"]["client"]["how"], "terminated", "{jdbc}");

    // No TLS after the SSLRequest: ended, the reason recorded.
    let port = db.port.to_string();
    let out = pg_tool(&agent, "python3", &[PROBE, "garbage", "127.0.0.1", &port]);
    let v: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(v["answer"], "S", "{v}");
    assert_ne!(v["end"], "timeout", "{v}");
    let x = newest(&agent, "the malformed records", |x| {
        s(&x["detail"]).contains("malformed TLS records")
    });
    assert_eq!(x["outcome"], "error", "{x}");
    // A ClientHello first: PostgreSQL 17's direct negotiation, served.
    let out = pg_tool(&agent, "python3", &[PROBE, "hello", "127.0.0.1", &port]);
    let v: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(v["handshake"], true, "{v}");
    assert_eq!(v["alpn"], "postgresql", "{v}");
    assert_eq!(v["first"], "R", "the server's authentication request: {v}");
    newest(&agent, "the direct session", |x| {
        x["tls"]["client"]["how"] == "terminated (direct)"
    });
    done(agent, db, dir);
}

/// A server that fails verification is refused, and the application reads
/// why (a FATAL, not a dropped socket): a certificate of another CA, an
/// expired one, one for another name. `verify-ca` takes the other name and
/// `require` any certificate. A server that asks for the agent's
/// certificate gets the target's `client_cert`. Without termination a ClientHello where the
/// startup packet belongs ends the session naming it.
#[test]
fn servers_that_fail_verification_are_refused_with_the_reason() {
    let ca = Ca::new("verify");
    let stranger = Ca::new("stranger");
    let good = ca.leaf(&["db.test"], true, -1, 2);
    let (dir, db) = tls_postgres("verify", &good);
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let target = |mode: &str| {
        format!(
            "tls = {{ mode = \"{mode}\", ca_file = \"{}\", server_name = \"db.test\" }}",
            ca_file.display()
        )
    };
    let mut agent = Agent::start(
        "verify",
        &sections(&db, "", &target("verify-full"), ""),
        POLICY,
    );
    let conn = db.conninfo();
    assert_eq!(ok(&psql_in(&agent, "app", &conn, "select 1")), "1");

    let cases = [
        (
            stranger.leaf(&["db.test"], true, -1, 2),
            "is not signed by a CA the target trusts",
        ),
        (
            ca.leaf(&["db.test"], true, -10, -1),
            "the server's certificate expired at",
        ),
        (
            ca.leaf(&["other.test"], true, -1, 2),
            "is not valid for db.test (it names other.test",
        ),
    ];
    for (leaf, why) in &cases {
        db.set_certificate(&leaf.0, &leaf.1).unwrap();
        let e = failed(&psql_in(&agent, "app", &conn, "select 1"));
        assert!(e.contains("FATAL") && e.contains(why), "{why}: {e}");
        let x = newest(&agent, why, |x| s(&x["detail"]).contains(why));
        assert_eq!(x["outcome"], "error", "{x}");
        assert!(s(&x["detail"]).starts_with("upstream TLS: "), "{x}");
        assert!(s(&x["tls"]["server"]["error"]).contains(why), "{x}");
    }
    // Looser modes take what they do not check.
    let config = std::fs::read_to_string(&agent.config).unwrap();
    for (mode, leaf) in [("verify-ca", &cases[2].0), ("require", &cases[1].0)] {
        agent.stop();
        std::fs::write(&agent.config, config.replace("verify-full", mode)).unwrap();
        agent.spawn();
        db.set_certificate(&leaf.0, &leaf.1).unwrap();
        assert_eq!(
            ok(&psql_in(&agent, "app", &conn, "select 1")),
            "1",
            "{mode}"
        );
        let x = newest(&agent, mode, |x| x["tls"]["server"]["how"] == mode);
        assert_eq!(x["outcome"], "closed", "{x}");
    }

    // A server that asks for the agent's certificate (clientcert): refused
    // without one, its own error relayed; served with the target's.
    db.set_certificate(&good.0, &good.1).unwrap();
    let hba = dir.join("data/pg_hba.conf");
    std::fs::write(
        &hba,
        "local all all scram-sha-256\n\
         hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n",
    )
    .unwrap();
    let server_ca = dir.join("client-ca.crt");
    std::fs::write(&server_ca, &ca.pem).unwrap();
    direct_local(
        &db,
        &[
            &format!("alter system set ssl_ca_file = '{}'", server_ca.display()),
            "select pg_reload_conf()",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let e = failed(&psql_in(&agent, "app", &conn, "select 1"));
    assert!(e.contains("certificate"), "{e}");
    let (cert, key, _) = ca.leaf(&["interceptor-agent"], false, -1, 2);
    let (cert_file, key_file) = (dir.join("agent.crt"), dir.join("agent.key"));
    std::fs::write(&cert_file, cert).unwrap();
    secret(&key_file, &key);
    agent.stop();
    let with_cert = config.replace(
        "server_name = \"db.test\"",
        &format!(
            "server_name = \"db.test\", client_cert = \"{}\", client_key = \"{}\"",
            cert_file.display(),
            key_file.display()
        ),
    );
    std::fs::write(&agent.config, with_cert).unwrap();
    agent.spawn();
    let sql = "select client_dn from pg_stat_ssl where pid = pg_backend_pid()";
    assert_eq!(
        ok(&psql_in(&agent, "app", &conn, sql)),
        "/CN=interceptor-agent"
    );

    // No termination: a ClientHello where the startup packet belongs.
    let port = db.port.to_string();
    let out = pg_tool(&agent, "python3", &[PROBE, "hello", "127.0.0.1", &port]);
    let v: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(v["handshake"], false, "{v}");
    let x = newest(&agent, "the ClientHello", |x| {
        s(&x["detail"]).contains("a TLS ClientHello where the startup packet belongs")
    });
    assert_eq!(x["outcome"], "error", "{x}");
    done(agent, db, dir);
}
