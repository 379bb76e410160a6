//! `cargo xtask demo`: the main job on one machine.
//!
//! A throw-away PostgreSQL that takes TLS alone, the agent with
//! `policies/demo.toml` and `policies/demo-approvals.toml`, workloads
//! running the unmodified `psql` through `interceptor exec` (their TLS
//! taken by the agent, one of them holding no password at all), one
//! statement held until a second person approves it (their identity from a
//! local OIDC provider), the sessions the agent recorded, and the evidence
//! verified.

use std::{path::Path, process::Command};

use anyhow::{Context, Result};

use crate::{agent::Agent, pg, require_root, root, setup};

/// The test OIDC provider (`tests/oidc/provider.mjs`), for the demo's
/// approvers.
struct Oidc {
    child: std::process::Child,
    issuer: String,
}

const PROVIDER: &str = "tests/oidc/provider.mjs";

impl Oidc {
    fn start(dir: &Path) -> Result<Oidc> {
        let port = pg::free_port()?;
        let mut child = Command::new("node")
            .arg(root().join(PROVIDER))
            .args(["serve", &port.to_string()])
            .arg(dir.join("oidc-key.json"))
            .arg(r#"{"dana": ["dba"], "ben": ["billing-devs"]}"#)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting the OIDC provider (node)")?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
            &mut line,
        )?;
        let Some(issuer) = line.trim().strip_prefix("ready ") else {
            anyhow::bail!("the OIDC provider did not start: {line:?}");
        };
        Ok(Oidc {
            issuer: issuer.to_owned(),
            child,
        })
    }

    /// A file holding `who`'s token.
    fn token_file(&self, who: &str, dir: &Path) -> Result<std::path::PathBuf> {
        let out = Command::new("node")
            .arg(root().join(PROVIDER))
            .args(["token", &self.issuer, who])
            .output()?;
        anyhow::ensure!(out.status.success(), "no token for {who}");
        let f = dir.join(format!("{who}.token"));
        std::fs::write(&f, out.stdout)?;
        Ok(f)
    }
}

impl Drop for Oidc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Billing deletes an invoice: the statement is held until dana, a DBA,
/// approves it; ben, who ran the command (and owns billing), cannot.
fn approve_a_delete(
    agent: &Agent,
    config: &Path,
    pg: &pg::Postgres,
    oidc: &Oidc,
    dir: &Path,
) -> Result<()> {
    let ben = oidc.token_file("ben", dir)?;
    let dana = oidc.token_file("dana", dir)?;
    step("ben runs billing's psql to delete an invoice: held for approval (psql shows the notice and waits)");
    let mut held = agent
        .cli()
        .args(["exec", "--config"])
        .arg(config)
        .args(["--workload", "billing", "--requester-token"])
        .arg(&ben)
        .args([
            "--",
            "psql",
            &pg.conninfo(),
            "-X",
            "-c",
            "delete from invoices where id = 1",
        ])
        .spawn()
        .context("running psql")?;
    let approvals = |token: &Path, args: &[&str]| {
        let mut c = agent.cli();
        c.arg("approvals")
            .args(args)
            .arg("--config")
            .arg(config)
            .arg("--token-file")
            .arg(token);
        c
    };
    let mut id = None;
    for _ in 0..100 {
        let out = approvals(&dana, &["list", "--pending"]).output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(line) = text.lines().nth(1).filter(|l| l.contains("pending")) {
            step("pending requests: interceptor approvals list --pending");
            print!("{text}");
            id = line.split_whitespace().next().map(str::to_owned);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let id = id.context("no request appeared")?;
    step(&format!(
        "ben tries to approve his own request: interceptor approvals approve {id}"
    ));
    let _ = approvals(&ben, &["approve", &id]).status()?;
    step(&format!(
        "dana, a DBA, approves it: interceptor approvals approve {id} --comment …"
    ));
    crate::run(&mut approvals(
        &dana,
        &["approve", &id, "--comment", "invoice 1 was a duplicate"],
    ))?;
    let ok = held.wait()?.success();
    println!(
        "-> the held psql {}",
        if ok {
            "went on and deleted the invoice"
        } else {
            "FAILED"
        }
    );
    step(&format!(
        "the request and its history: interceptor approvals show {id}"
    ));
    crate::run(&mut approvals(&dana, &["show", &id]))?;
    Ok(())
}

pub fn run() -> Result<()> {
    require_root("cargo xtask demo")?;
    setup::run()?;
    let bin = crate::agent::build(false)?;
    let dir = std::env::temp_dir().join(format!("interceptor-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = demo(&bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn list_sessions(agent: &Agent, config: &Path) -> Result<()> {
    crate::run(
        agent
            .cli()
            .args(["sessions", "list", "--config"])
            .arg(config),
    )
}

fn step(title: &str) {
    println!("\n=== {title}");
}

fn demo(bin: &Path, dir: &Path) -> Result<()> {
    step("starting a throw-away PostgreSQL (TLS only, SCRAM authentication)");
    let (ca, cert, key) = pg::test_certificate(dir, "orders-db");
    let pg = pg::Postgres::start_tls(
        &dir.join("pg"),
        (
            &std::fs::read_to_string(cert)?,
            &std::fs::read_to_string(key)?,
        ),
    )?;
    println!(
        "PostgreSQL listening on 127.0.0.1:{} (hostssl only: no plaintext over TCP)",
        pg.port
    );
    // The nightly job's credential: only the agent holds it.
    crate::run(Command::new("psql").args([
        pg.conninfo().as_str(),
        "-X",
        "-q",
        "-c",
        "create role billing_svc login password 'n1ghtly-only-the-agent-knows'",
    ]))?;
    let secret = dir.join("billing_svc.pw");
    {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret)?
            .write_all(b"n1ghtly-only-the-agent-knows\n")?;
    }

    step("starting the approvers' identity provider (OIDC, npm's oidc-provider)");
    let oidc = Oidc::start(dir)?;
    println!(
        "issuer {}: dana is a DBA; ben develops billing (he owns it)",
        oidc.issuer
    );

    let config = dir.join("interceptor.toml");
    let policy = root().join("policies").join("demo.toml");
    let approvals_policy = root().join("policies").join("demo-approvals.toml");
    std::fs::write(
        &config,
        format!(
            r#"[agent]
trust_domain = "demo.interceptor.local"
proxy_port = {proxy}
pin_dir = "/sys/fs/bpf/interceptor-demo"
managed_cgroup_parent = "interceptor-demo"
policies = ["{policy}", "{approvals_policy}"]
data_dir = "{data}"

# Applications that ask for TLS get it from the agent (node CA certificates).
[agent.tls]
mode = "terminate"

# Who approves: people with tokens from this issuer, for this audience.
[approvals]
issuer = "{issuer}"
audience = "urn:interceptor:approvals"

# Two applications that cannot be changed, each in an agent-managed cgroup.
[[workload]]
name = "billing"
managed = true
owners = ["billing-devs"]

[[workload]]
name = "reporting"
managed = true

[[workload]]
name = "nightly"
managed = true

[[target]]
name = "orders-db"
addresses = ["127.0.0.1:{pg}"]
protocol = "postgres"
# The agent's TLS to the server, verified, whatever the application speaks.
tls = {{ mode = "verify-full", ca_file = "{ca}" }}

# The nightly job holds no password: the agent logs in for it.
[[credential]]
workload = "nightly"
target = "orders-db"
user = "billing_svc"
password_file = "{secret}"
"#,
            proxy = pg::free_port()?,
            policy = policy.display(),
            approvals_policy = approvals_policy.display(),
            issuer = oidc.issuer,
            data = dir.join("data").display(),
            pg = pg.port,
            ca = ca.display(),
            secret = secret.display(),
        ),
    )?;
    step("agent configuration");
    print!("{}", std::fs::read_to_string(&config)?);
    for p in [&policy, &approvals_policy] {
        step(&format!("policy ({})", p.display()));
        print!("{}", std::fs::read_to_string(p)?);
    }

    step("the node CA, whose certificates the agent presents to applications that ask for TLS");
    crate::run(
        Command::new(bin)
            .args(["ca", "init", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null()),
    )?;

    step("starting the agent");
    let mut agent = Agent::start(bin, &config, &dir.join("agent.log"), true)?;

    let psql_on = |workload: Option<&str>, conn: &str, sql: &str| -> Result<bool> {
        let mut c = match workload {
            Some(w) => {
                let mut c = agent.cli();
                c.arg("exec")
                    .arg("--config")
                    .arg(&config)
                    .args(["--workload", w, "--", "psql"]);
                c
            }
            None => Command::new("psql"),
        };
        c.args([conn, "-X", "-c", sql]);
        Ok(c.status().context("running psql")?.success())
    };
    let conn = format!("{} sslmode=require", pg.conninfo());
    let psql = |workload: Option<&str>, sql: &str| psql_on(workload, &conn, sql);

    step(
        "billing runs an unmodified psql (sslmode=require): allowed by rule billing-uses-orders-db",
    );
    let ok = psql(
        Some("billing"),
        "select current_user, inet_server_port() as server_port, count(*) as tables from pg_tables",
    )?;
    println!("-> psql {}", if ok { "succeeded" } else { "FAILED" });

    step("reporting runs the same psql: denied by rule reporting-not-orders-db");
    let ok = psql(Some("reporting"), "select 1")?;
    println!(
        "-> psql {}",
        if ok {
            "succeeded (unexpected!)"
        } else {
            "failed, as policy says"
        }
    );

    step("a process outside every workload is not intercepted");
    psql(None, "select 'direct' as path")?;

    let bare = format!(
        "host=127.0.0.1 port={} dbname=postgres user=nightly sslmode=disable",
        pg.port
    );
    let sql = "select current_user, ssl as tls_to_server, version from pg_stat_ssl where pid = pg_backend_pid()";
    step("nightly's psql has no password and speaks no TLS: the agent logs in for it as billing_svc, over verified TLS");
    let ok = psql_on(Some("nightly"), &bare, sql)?;
    println!("-> psql {}", if ok { "succeeded" } else { "FAILED" });
    step("the same psql outside the workload: the server takes neither plaintext nor a missing password");
    let ok = psql_on(None, &bare, sql)?;
    println!(
        "-> psql {}",
        if ok {
            "succeeded (unexpected!)"
        } else {
            "failed: only the agent holds the credential"
        }
    );

    step("the database owner makes an invoices table, directly");
    psql(
        None,
        "create table invoices (id int, amount int); insert into invoices values (1, 100), (2, 250)",
    )?;
    approve_a_delete(&agent, &config, &pg, &oidc, dir)?;

    step("recorded sessions (from the running agent)");
    list_sessions(&agent, &config)?;
    let out = agent
        .cli()
        .args([
            "sessions",
            "list",
            "--json",
            "--workload",
            "billing",
            "--config",
        ])
        .arg(&config)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The last: the one whose delete was approved.
    if let Some(id) = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("\"id\": \""))
        .map(|s| s.trim_end_matches("\","))
    {
        step(&format!(
            "one session in full: interceptor sessions show {id}"
        ));
        crate::run(
            agent
                .cli()
                .args(["sessions", "show", id, "--config"])
                .arg(&config),
        )?;
    }

    let replay = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("\"id\": \""))
        .map(|s| s.trim_end_matches("\",").to_owned());

    step("stopping the agent; sessions stay readable from the store");
    agent.stop();
    list_sessions(&agent, &config)?;

    // A responder's view: the data directory alone, never written to.
    let data = dir.join("data");
    let data_arg = data.to_str().context("data directory")?;
    step("the evidence: the node's key, to pin (interceptor key show)");
    let key = agent
        .cli()
        .args(["key", "show", "--data-dir", data_arg])
        .output()?;
    let key = String::from_utf8_lossy(&key.stdout).into_owned();
    print!("{key}");
    let pin = key
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint:"))
        .map(|f| f.trim().to_owned())
        .context("key show printed no fingerprint")?;
    step("the log verified in place: every link, every signed checkpoint");
    crate::run(
        agent
            .cli()
            .args(["verify", "--data-dir", data_arg, "--pubkey", &pin]),
    )?;
    if let Some(id) = replay {
        step(&format!(
            "a session played back: interceptor sessions replay {id} --max"
        ));
        crate::run(
            agent
                .cli()
                .args(["sessions", "replay", &id, "--data-dir", data_arg, "--max"]),
        )?;
    }
    step("an evidence bundle taken away, and verified with only itself and the pinned key");
    let bundle = dir.join("evidence.jsonl");
    crate::run(
        agent
            .cli()
            .args(["export", "--data-dir", data_arg, "--out"])
            .arg(&bundle),
    )?;
    crate::run(
        agent
            .cli()
            .arg("verify")
            .arg(&bundle)
            .args(["--pubkey", &pin]),
    )?;

    step("detaching: no programs, pins or cgroups left behind");
    agent.detach()?;
    Ok(())
}
