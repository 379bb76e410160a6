//! A throw-away PostgreSQL server: its own data directory, port and socket
//! directory, SCRAM authentication (TLS too, on asking), stopped on drop;
//! and a test CA with a certificate from it.
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
        Self::start_with(dir, listen_addresses, None)
    }

    /// [`Postgres::start`] with `ssl = on` and the certificate chain and
    /// key `tls` (PEM): TCP connections must use TLS (`hostssl` only), the
    /// unix socket needs none.
    pub fn start_tls(dir: &Path, tls: (&str, &str)) -> io::Result<Self> {
        Self::start_with(dir, "127.0.0.1", Some(tls))
    }

    /// Replaces the server's certificate and key (PEM) and reloads it.
    #[allow(dead_code)] // the end-to-end tests', which include this file
    pub fn set_certificate(&self, cert: &str, key: &str) -> io::Result<()> {
        std::fs::write(self.dir.join("server.crt"), cert)?;
        std::fs::write(self.dir.join("server.key"), key)?;
        check(
            as_postgres(&self.bin, "pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .arg("reload"),
        )?;
        // pg_ctl reload only signals; new connections see it once the
        // postmaster has read it.
        std::thread::sleep(std::time::Duration::from_millis(500));
        Ok(())
    }

    fn start_with(
        dir: &Path,
        listen_addresses: &str,
        tls: Option<(&str, &str)>,
    ) -> io::Result<Self> {
        let bin = bin_dir().ok_or_else(|| {
            io::Error::other("PostgreSQL server binaries not found; run cargo xtask setup")
        })?;
        std::fs::create_dir_all(dir)?;
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, PASSWORD)?;
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(dir.join("server.crt"), cert)?;
            std::fs::write(dir.join("server.key"), key)?;
            std::fs::set_permissions(
                dir.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )?;
        }
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
        let mut options = String::new();
        if tls.is_some() {
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all scram-sha-256\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256\n\
                 hostssl all all ::1/128 scram-sha-256\n",
            )?;
            options = format!(
                " -c ssl=on -c ssl_cert_file={0}/server.crt -c ssl_key_file={0}/server.key",
                dir.display()
            );
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
                    "-p {port} -k {} -c listen_addresses='{listen_addresses}' -c fsync=off -c max_connections=200{options}",
                    dir.display()
                ))
                .arg("start"),
        )?;
        Ok(pg)
    }

    /// A libpq connection string for this server over its unix socket.
    #[allow(dead_code)] // the end-to-end tests', which include this file
    pub fn local_conninfo(&self) -> String {
        format!(
            "host={} port={} user={USER} password={PASSWORD} dbname=postgres",
            self.dir.display(),
            self.port
        )
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

/// A test CA (`DIR/ca.crt`) and a certificate for 127.0.0.1 from it
/// (`DIR/<name>.crt` and `.key`, EC P-256), made by openssl: the CA, the
/// certificate and its key.
pub fn test_certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (cert, key, csr, ext) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.csr")),
        dir.join(format!("{name}.ext")),
    );
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let subject = format!("/CN=interceptor {name}");
    let mut made = Vec::new();
    let mut root = Command::new("openssl");
    root.args([
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=interceptor test CA",
    ])
    .args(ec)
    .arg("-keyout")
    .arg(&ca_key)
    .arg("-out")
    .arg(&ca);
    made.push(root);
    let mut request = Command::new("openssl");
    request
        .args(["req", "-subj", &subject])
        .args(ec)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr);
    made.push(request);
    let mut sign = Command::new("openssl");
    sign.args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert);
    made.push(sign);
    for mut c in made {
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (ca, cert, key)
}
