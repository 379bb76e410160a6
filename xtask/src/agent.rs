//! Starting and stopping an interceptor agent for the demo and benchmarks.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{cargo, root, run};

/// Builds the agent (release when `release`), returning the binary's path.
pub fn build(release: bool) -> Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "-p", "interceptor"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("interceptor"))
}

pub struct Agent {
    pub bin: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    detached: bool,
}

impl Agent {
    /// Starts `interceptor run` and waits until it says it is ready. Its log
    /// goes to `log` (and, for the demo, is echoed when `echo` is set).
    pub fn start(bin: &Path, config: &Path, log: &Path, echo: bool) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let mut file = std::fs::File::create(log)?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Write;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
                if echo {
                    eprintln!("  agent | {line}");
                }
                if line.contains("agent ready") {
                    let _ = tx.send(());
                }
            }
        });
        let mut agent = Agent {
            bin: bin.to_path_buf(),
            config: config.to_path_buf(),
            child: Some(child),
            detached: false,
        };
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            agent.stop();
            bail!("the agent did not become ready; see {}", log.display());
        }
        Ok(agent)
    }

    /// `interceptor <args> --config <config>`.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("NO_COLOR", "1");
        c
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGHUP (policy reload) and gives the agent a moment.
    pub fn reload(&self) -> Result<()> {
        let child = self.child.as_ref().context("the agent is not running")?;
        run(Command::new("kill").args(["-HUP", &child.id().to_string()]))?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// Removes everything the agent installed.
    pub fn detach(&mut self) -> Result<()> {
        self.stop();
        if std::mem::replace(&mut self.detached, true) {
            return Ok(());
        }
        run(self.cli().arg("detach").arg("--config").arg(&self.config))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}
