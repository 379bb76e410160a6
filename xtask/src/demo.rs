//! `cargo xtask demo`: the main job on one machine.
//!
//! A throw-away PostgreSQL, the agent with `policies/demo.toml` and
//! `policies/demo-approvals.toml`, two workloads running the unmodified
//! `psql` through `interceptor exec`, one statement held until a second
//! person approves it (their identity from a local OIDC provider), and
//! the sessions the agent recorded.

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
    step("starting a throw-away PostgreSQL (SCRAM authentication)");
    let pg = pg::Postgres::start(&dir.join("pg"))?;
    println!("PostgreSQL listening on 127.0.0.1:{}", pg.port);

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

[[target]]
name = "orders-db"
addresses = ["127.0.0.1:{pg}"]
protocol = "postgres"
"#,
            proxy = pg::free_port()?,
            policy = policy.display(),
            approvals_policy = approvals_policy.display(),
            issuer = oidc.issuer,
            data = dir.join("data").display(),
            pg = pg.port,
        ),
    )?;
    step("agent configuration");
    print!("{}", std::fs::read_to_string(&config)?);
    for p in [&policy, &approvals_policy] {
        step(&format!("policy ({})", p.display()));
        print!("{}", std::fs::read_to_string(p)?);
    }

    step("starting the agent");
    let mut agent = Agent::start(bin, &config, &dir.join("agent.log"), true)?;

    let psql = |workload: Option<&str>, sql: &str| -> Result<bool> {
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
        c.args([pg.conninfo().as_str(), "-X", "-c", sql]);
        Ok(c.status().context("running psql")?.success())
    };

    step("billing runs an unmodified psql: allowed by rule billing-uses-orders-db");
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
