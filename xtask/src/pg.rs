//! A throw-away PostgreSQL server: its own data directory, port and socket
//! directory, SCRAM authentication, stopped on drop.
//!
//! Standard library only: the end-to-end tests include this file too.

use std::{
    io,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

pub const USER: &str = "postgres";
pub const PASSWORD: &str = "interceptor-demo";

pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

/// The newest PostgreSQL server binaries directory (`initdb`, `pg_ctl`, `postgres`).
pub fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

/// Runs a command as the `postgres` system user (initdb refuses root).
fn as_postgres(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
    c.stdout(Stdio::null());
    c
}

fn check(c: &mut Command) -> io::Result<()> {
    let out = c.stderr(Stdio::piped()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{c:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Postgres {
    /// initdb with SCRAM for every connection, then start on a free port
    /// of 127.0.0.1.
    pub fn start(dir: &Path) -> io::Result<Self> {
        Self::start_on(dir, "127.0.0.1")
    }

    /// [`Postgres::start`] listening on `listen_addresses` (`*`: every
    /// address, IPv4 and IPv6).
    pub fn start_on(dir: &Path, listen_addresses: &str) -> io::Result<Self> {
        let bin = bin_dir().ok_or_else(|| {
            io::Error::other("PostgreSQL server binaries not found; run cargo xtask setup")
        })?;
        std::fs::create_dir_all(dir)?;
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, PASSWORD)?;
        check(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir),
        )?;
        let data = dir.join("data");
        check(
            as_postgres(&bin, "initdb")
                .args(["-A", "scram-sha-256", "-U", USER, "--no-sync", "-D"])
                .arg(&data)
                .arg(format!("--pwfile={}", pwfile.display())),
        )?;
        if listen_addresses != "127.0.0.1" {
            // SCRAM from any address it listens on, not only loopback.
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))?
                .write_all(b"host all all all scram-sha-256\n")?;
        }
        let port = free_port()?;
        let pg = Postgres {
            port,
            dir: dir.to_path_buf(),
            bin,
        };
        check(
            as_postgres(&pg.bin, "pg_ctl")
                .args(["-w", "-l"])
                .arg(dir.join("server.log"))
                .arg("-D")
                .arg(&data)
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses='{listen_addresses}' -c fsync=off -c max_connections=200",
                    dir.display()
                ))
                .arg("start"),
        )?;
        Ok(pg)
    }

    /// A libpq connection string for this server (over TCP).
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} password={PASSWORD} dbname=postgres",
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
            .status();
    }
}

pub fn free_port() -> io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
