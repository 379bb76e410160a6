//! A throw-away PostgreSQL server for the demo and benchmarks: its own data
//! directory, port and socket directory, SCRAM authentication, stopped and
//! removed on drop.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{run, setup::pg_bin_dir};

pub const USER: &str = "postgres";
pub const PASSWORD: &str = "interceptor-demo";

pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

/// Runs a command as the `postgres` system user (initdb refuses root).
fn as_postgres(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
    c
}

impl Postgres {
    pub fn start(dir: &Path) -> Result<Self> {
        let bin =
            pg_bin_dir().context("PostgreSQL server binaries not found; run cargo xtask setup")?;
        std::fs::create_dir_all(dir)?;
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, PASSWORD)?;
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir))?;
        let data = dir.join("data");
        run(as_postgres(&bin, "initdb")
            .args(["-A", "scram-sha-256", "-U", USER, "--no-sync", "-D"])
            .arg(&data)
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(std::process::Stdio::null()))?;
        let port = free_port()?;
        let pg = Postgres {
            port,
            dir: dir.to_path_buf(),
            bin,
        };
        run(as_postgres(&pg.bin, "pg_ctl")
            .args(["-w", "-l"])
            .arg(dir.join("server.log"))
            .arg("-D")
            .arg(&data)
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                dir.display()
            ))
            .arg("start")
            .stdout(std::process::Stdio::null()))?;
        Ok(pg)
    }

    /// A libpq connection string for this server (over TCP).
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} password={PASSWORD} dbname=postgres sslmode=disable",
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin, "pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop")
            .stdout(std::process::Stdio::null())
            .status();
    }
}

pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
