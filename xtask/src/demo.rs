//! `cargo xtask demo`: the main job on one machine.
//!
//! A throw-away PostgreSQL, the agent with `policies/demo.toml`, two
//! workloads running the unmodified `psql` through `interceptor exec`, and
//! the sessions the agent recorded.

use std::{path::Path, process::Command};

use anyhow::{Context, Result};

use crate::{agent::Agent, pg, require_root, root, setup};

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

    let config = dir.join("interceptor.toml");
    let policy = root().join("policies").join("demo.toml");
    std::fs::write(
        &config,
        format!(
            r#"[agent]
trust_domain = "demo.interceptor.local"
proxy_port = {proxy}
pin_dir = "/sys/fs/bpf/interceptor-demo"
managed_cgroup_parent = "interceptor-demo"
policies = ["{policy}"]
data_dir = "{data}"

# Two applications that cannot be changed, each in an agent-managed cgroup.
[[workload]]
name = "billing"
managed = true

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
            data = dir.join("data").display(),
            pg = pg.port,
        ),
    )?;
    step("agent configuration");
    print!("{}", std::fs::read_to_string(&config)?);
    step(&format!("policy ({})", policy.display()));
    print!("{}", std::fs::read_to_string(&policy)?);

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
    if let Some(id) = text
        .lines()
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

    step("stopping the agent; sessions stay readable from the store");
    agent.stop();
    list_sessions(&agent, &config)?;

    step("detaching: no programs, pins or cgroups left behind");
    agent.detach()?;
    Ok(())
}
