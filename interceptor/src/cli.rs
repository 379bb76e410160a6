//! The command line: `run`, `exec`, `sessions`, `approvals`, `policy`,
//! `detach`.
//!
//! Listings come from the running agent's API when it answers, or straight
//! from the store when it is stopped. Every listing has `--json`.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, ensure, Context};
use clap::{Parser, Subcommand};

mod approvals;
mod evidence;

use crate::{
    api::{self, Request, Response},
    cgroup,
    config::{Config, DEFAULT_CONFIG},
    policy,
    protocol::postgres::{self, Startup},
    record::{self, Filter, Session, SessionId, SledStore, Statement, Store},
    redirect,
};

#[derive(Parser)]
#[command(
    name = "interceptor",
    version,
    about = "Segregation of duties for app-to-app traffic, without changing the apps"
)]
pub struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info`, `interceptor=debug`.
    #[arg(long, global = true, default_value = "info", env = "INTERCEPTOR_LOG")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args)]
pub struct ConfigArg {
    /// Agent configuration file.
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

#[derive(clap::Args)]
pub struct StoreArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Data directory (overrides agent.data_dir; given alone, no
    /// configuration file is read).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl StoreArgs {
    /// `--data-dir`, or the configuration's.
    pub fn data_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.data_dir {
            Some(d) => Ok(d.clone()),
            None => Ok(Config::load(&self.config.config)?.data_dir(None)),
        }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the agent: attach to the configured workloads and proxy their connections.
    Run {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Run a command inside a workload's cgroup; exits with the command's status.
    Exec {
        #[command(flatten)]
        config: ConfigArg,
        /// Workload whose cgroup the command joins.
        #[arg(long, short)]
        workload: String,
        /// Run even if the agent has not attached to this workload (traffic is then NOT intercepted).
        #[arg(long)]
        allow_unattached: bool,
        /// Pass on these inherited descriptors (e.g. `3,4`) besides stdin,
        /// stdout and stderr; every other one is closed. A socket among them
        /// keeps the cgroup it was created in: its connects are NOT intercepted.
        #[arg(long, value_delimiter = ',', value_name = "FD,…")]
        keep_fds: Vec<i32>,
        /// A file holding the OIDC token of the person running the command:
        /// its requests for approval name them, and they can never approve
        /// those requests.
        #[arg(long, value_name = "FILE")]
        requester_token: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Recorded sessions.
    Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// Whether the agent runs, and its export sinks: delivered up to
    /// where, behind by how much, up or down since when.
    Status {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
    /// The node CA, which issues the certificates the agent presents to
    /// applications whose TLS it terminates (`[agent.tls]`).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The node's signing key.
    Key {
        #[command(subcommand)]
        command: evidence::KeyCommand,
    },
    /// Check the evidence log of a data directory (never written to): every
    /// entry links to the one before, checkpoints are signed by the node's
    /// key and match; the first broken link is reported. Exit 0 intact, 1
    /// not, 2 could not check.
    Verify(evidence::VerifyArgs),
    /// Write an evidence bundle: the selected records as OCSF JSON Lines,
    /// with the checkpoints and hashes that prove them, and the node's
    /// public key (read from a private copy of the data directory).
    Export(evidence::ExportArgs),
    /// Just-in-time approval: requests, approvals, grants.
    Approvals {
        #[command(subcommand)]
        command: approvals::ApprovalsCommand,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Remove every eBPF link, pinned map and managed cgroup the agent installed.
    Detach {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// For benchmarks: the two PostgreSQL machines of one connection fed
    /// `pgbench -S` traffic in this process, with no socket; prints
    /// nanoseconds per transaction.
    #[command(hide = true)]
    BenchEngine {
        /// pgbench's protocol: simple, extended or prepared.
        #[arg(long)]
        mode: crate::protocol::postgres::harness::Mode,
        #[arg(long, default_value_t = 200_000)]
        txns: u32,
        /// With a review rule that matches none of the traffic.
        #[arg(long)]
        review: bool,
    },
    /// For benchmarks: fills a new store with pgbench-like statements
    /// through the recorder (hashing, checkpoints) and prints the rate.
    #[command(hide = true)]
    BenchRecorder {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 2_000_000)]
        statements: u64,
        #[arg(long, default_value_t = 64)]
        sessions: u32,
        /// Each statement's text its own (values inline), not one shared text.
        #[arg(long)]
        distinct: bool,
    },
    /// For benchmarks: relays every connection made to a free loopback port
    /// (printed first) to ADDR with the agent's relay loop and nothing else:
    /// no eBPF, identity, policy or recording.
    #[command(hide = true)]
    BenchRelay {
        #[arg(long, value_name = "ADDR")]
        to: std::net::SocketAddr,
        /// Relay loop threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Make the node CA (`DATA_DIR/ca/`, its key root's alone, 0600)
    /// unless there is one; then show it.
    Init {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print the node CA's certificate (PEM, on stdout) for the
    /// applications' trust store; its subject and fingerprint on stderr.
    Show {
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
pub enum SessionsCommand {
    /// List sessions, oldest first.
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
        /// Only this workload's sessions.
        #[arg(long)]
        workload: Option<String>,
        /// Only sessions started within this long (e.g. 90s, 15m, 2h, 7d).
        #[arg(long, value_parser = record::parse_duration)]
        since: Option<std::time::Duration>,
        /// Show at most this many (the newest).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show one session.
    Show {
        #[command(flatten)]
        store: StoreArgs,
        id: SessionId,
        #[arg(long)]
        json: bool,
    },
    /// Play a session back as a timeline with its real timing: connect and
    /// decision, each statement, approvals, the end.
    Replay(evidence::ReplayArgs),
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// What would happen if workload W ran SQL against target T, and why.
    Explain {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        workload: String,
        #[arg(long)]
        target: String,
        /// SQL to classify (as one message; several statements allowed).
        #[arg(long)]
        sql: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Validate policy files; with --config, also check the workloads and targets they name.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_level);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // aya-log speaks the `log` crate: forward it into tracing.
    struct Bridge;
    impl log::Log for Bridge {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            let target = r.target();
            match r.level() {
                log::Level::Error => tracing::error!(ebpf = target, "{}", r.args()),
                log::Level::Warn => tracing::warn!(ebpf = target, "{}", r.args()),
                log::Level::Info => tracing::info!(ebpf = target, "{}", r.args()),
                log::Level::Debug => tracing::debug!(ebpf = target, "{}", r.args()),
                log::Level::Trace => tracing::trace!(ebpf = target, "{}", r.args()),
            }
        }
        fn flush(&self) {}
    }
    static BRIDGE: Bridge = Bridge;
    let _ = log::set_logger(&BRIDGE);
    log::set_max_level(log::LevelFilter::Trace);
}

fn dispatch(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Run { store } => {
            crate::agent::run(&store.config.config, store.data_dir.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec {
            config,
            workload,
            allow_unattached,
            keep_fds,
            requester_token,
            command,
        } => exec(
            &config.config,
            &workload,
            allow_unattached,
            &keep_fds,
            requester_token.as_deref(),
            &command,
        ),
        Command::Sessions { command } => {
            output_to_pipes();
            sessions(command)
        }
        Command::Approvals { command } => {
            output_to_pipes();
            approvals::run(command)
        }
        Command::Status { store, json } => {
            output_to_pipes();
            status(&store, json)
        }
        Command::Ca { command } => {
            output_to_pipes();
            ca(command)
        }
        Command::Key { command } => {
            output_to_pipes();
            evidence::key(command)
        }
        Command::Verify(args) => {
            output_to_pipes();
            evidence::verify(args)
        }
        Command::Export(args) => evidence::export(args),
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    config,
                    workload,
                    target,
                    sql,
                    json,
                },
        } => explain(&config.config, &workload, &target, sql.as_deref(), json),
        Command::Policy {
            command: PolicyCommand::Check { config, files },
        } => {
            let config = config.map(|c| Config::load(&c)).transpose()?;
            let p = policy::Policy::load_files(&files, config.as_ref())?;
            for w in &p.warnings {
                println!("warning: {w}");
            }
            println!(
                "ok: {} file(s), {} rule(s); defaults: connect={}, unmatched_destination={}",
                files.len(),
                p.rules.len(),
                p.default_connect,
                p.default_unmatched
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchEngine { mode, txns, review } => {
            let ns = crate::protocol::postgres::harness::run(mode, txns, review);
            println!("{ns:.1}");
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchRecorder {
            data_dir,
            statements,
            sessions,
            distinct,
        } => {
            crate::evidence::bench_recorder(&data_dir, statements, sessions, distinct)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchRelay { to, threads } => {
            interceptor_relay::bare(to, threads)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Detach { store } => {
            let config = Config::load(&store.config.config)?;
            let data_dir = config.data_dir(store.data_dir.as_deref());
            if let Some(Response::Status { pid, .. }) = api::call(&data_dir, &Request::Status)? {
                bail!("the agent is running (pid {pid}); stop it before detaching");
            }
            let d = redirect::detach(&config)?;
            crate::evidence::detached(
                &data_dir,
                serde_json::json!({
                    "links": d.links,
                    "maps": d.maps,
                    "cgroups_removed": d.cgroups_removed,
                    "processes_moved": d.processes_moved,
                }),
            )?;
            println!(
                "detached: {} link(s), {} pinned map(s) removed; managed cgroups {}{}",
                d.links,
                d.maps,
                if d.cgroups_removed {
                    "removed"
                } else {
                    "absent"
                },
                if d.processes_moved > 0 {
                    format!(
                        " ({} process(es) moved to the root cgroup)",
                        d.processes_moved
                    )
                } else {
                    String::new()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn explain(
    config: &Path,
    workload: &str,
    target: &str,
    sql: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    if config.workload(workload).is_none() {
        bail!("unknown workload `{workload}`");
    }
    if !config.targets.iter().any(|t| t.name == target) {
        bail!("unknown target `{target}`");
    }
    let policy = policy::Policy::load(&config)?;
    let decision = policy.decide_connect(workload, Some(target));
    let class = sql.map(crate::sql::classify);
    let statement_decision = class
        .as_ref()
        .zip(sql)
        .map(|(c, sql)| policy.decide_statement(workload, target, c, sql));
    if json {
        let terms = |d: &policy::Decision| {
            (d.action == policy::Action::Review)
                .then(|| policy.review_terms(&d.rule))
                .flatten()
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "workload": workload,
                "target": target,
                "connect": decision,
                "connect_review": terms(&decision),
                "statement": class,
                "statement_decision": statement_decision,
                "statement_review": statement_decision.as_ref().and_then(terms),
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("connect: {} (rule {})", decision.action, decision.rule);
    if let Some(r) = review_line(&policy, &decision) {
        println!("  {r}");
    }
    if let Some(c) = class {
        println!("statement class: {}", c.class);
        let tables = if c.tables.is_empty() {
            "-".to_string()
        } else {
            c.tables.join(", ")
        };
        println!("tables: {tables}");
        if !c.functions.is_empty() {
            println!(
                "functions this agent does not know: {} (unknown unless an allow rule names them in `functions`)",
                c.functions.join(", ")
            );
        }
        if let Some(e) = c.parse_error {
            println!(
                "not parsed by {} ({e}): treated as unknown, the most restricted class",
                crate::sql::GRAMMAR
            );
        }
        if let Some(d) = c.doubt {
            println!("unknown: {d}");
        }
        if let Some(d) = statement_decision {
            println!("statement: {} (rule {})", d.action, d.rule);
            if let Some(r) = review_line(&policy, &d) {
                println!("  {r}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a review decision means: who must approve, and how long it waits.
fn review_line(policy: &policy::Policy, d: &policy::Decision) -> Option<String> {
    if d.action != policy::Action::Review {
        return None;
    }
    let t = policy.review_terms(&d.rule)?;
    let groups: Vec<String> = t
        .approvers
        .iter()
        .map(|a| format!("{} of [{}]", a.count, a.groups.join(", ")))
        .collect();
    Some(format!(
        "held for approval by {} (distinct people; never the requester or the workload's owners); waits {}s, the request {}s; an approval grants scope `{}` for {}s{}",
        groups.join(" and "),
        t.hold_us / 1_000_000,
        t.pending_ttl_us / 1_000_000,
        t.scope.as_str(),
        t.duration_us / 1_000_000,
        t.uses.map_or(String::new(), |n| format!(", {n} use(s)"))
    ))
}

/// Runs `command` in `workload`'s cgroup. The process enters the cgroup
/// before it does anything else that could make a socket, and the command
/// inherits no descriptor but stdio and `keep_fds`: a socket made outside
/// the cgroup would connect without interception (cgroup hooks follow the
/// socket's cgroup, not its user's).
fn exec(
    config: &Path,
    workload: &str,
    allow_unattached: bool,
    keep_fds: &[i32],
    requester_token: Option<&Path>,
    command: &[String],
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    if let Some(f) = requester_token {
        // This process becomes the command: the agent ties the person to
        // its pid, as the kernel gives it.
        let token =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let req = Request::Requester {
            token: token.trim().to_owned(),
        };
        match api::call(&config.data_dir(None), &req)? {
            Some(Response::Requester { subject }) => {
                tracing::debug!(%subject, "requests of this command name its requester")
            }
            Some(Response::Error { message }) => bail!("--requester-token: {message}"),
            Some(other) => bail!("unexpected answer from the agent: {other:?}"),
            None => bail!("--requester-token: no agent answers to take it"),
        }
    }
    let w = config.workload(workload).with_context(|| {
        let names: Vec<&str> = config.workloads.iter().map(|w| w.name.as_str()).collect();
        format!(
            "unknown workload `{workload}` (configured: {})",
            names.join(", ")
        )
    })?;
    let mount = cgroup::cgroup2_mount()?;
    let dir = cgroup::workload_dir(&mount, &config, w)?;
    if !dir.is_dir() {
        bail!(
            "workload `{workload}` has no cgroup yet ({}); start the agent first",
            dir.display()
        );
    }
    let pins = redirect::Pins::new(&config.agent.pin_dir);
    if !allow_unattached && !pins.workload_attached(workload) {
        bail!(
            "workload `{workload}` is not attached (no pinned programs in {}): its traffic would not be intercepted; start the agent, or pass --allow-unattached",
            pins.links().display()
        );
    }
    cgroup::enter(&dir, std::process::id())?;
    for fd in close_inherited(keep_fds)? {
        eprintln!(
            "warning: descriptor {fd} passed on with --keep-fds is a socket made outside workload `{workload}`: its connects are not intercepted"
        );
    }
    let err = std::process::Command::new(&command[0])
        .args(&command[1..])
        .exec();
    eprintln!("error: cannot run `{}`: {err}", command[0]);
    Ok(ExitCode::from(
        if err.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        },
    ))
}

/// Marks every open descriptor above stderr close-on-exec, except `keep`
/// (made inheritable); returns those of `keep` that are sockets.
fn close_inherited(keep: &[i32]) -> anyhow::Result<Vec<i32>> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .context("listing /proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for &fd in keep {
        ensure!(
            open.contains(&fd),
            "--keep-fds: descriptor {fd} is not open"
        );
    }
    let mut sockets = Vec::new();
    for fd in open.into_iter().filter(|&fd| fd > 2) {
        // The directory listing's own descriptor is closed by now: EBADF.
        let Ok(bits) = fcntl(fd, FcntlArg::F_GETFD) else {
            continue;
        };
        let mut flags = FdFlag::from_bits_truncate(bits);
        let kept = keep.contains(&fd);
        flags.set(FdFlag::FD_CLOEXEC, !kept);
        fcntl(fd, FcntlArg::F_SETFD(flags)).with_context(|| format!("descriptor {fd}"))?;
        if kept
            && nix::sys::stat::fstat(fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
        {
            sockets.push(fd);
        }
    }
    Ok(sockets)
}

/// `interceptor status`: the running agent and its sinks (exit 1 when it
/// is not running, or a sink is down).
fn status(store: &StoreArgs, json: bool) -> anyhow::Result<ExitCode> {
    let data_dir = store.data_dir()?;
    let Some(resp) = api::call(&data_dir, &Request::Status)? else {
        if json {
            println!("{}", serde_json::json!({"running": false}));
        } else {
            println!("the agent is not running ({})", data_dir.display());
        }
        return Ok(ExitCode::from(1));
    };
    let Response::Status { pid, config, sinks } = resp else {
        bail!("unexpected answer from the agent: {resp:?}");
    };
    let down = sinks.iter().any(|s| !s.up);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"running": true, "pid": pid, "config": config, "sinks": sinks})
            )?
        );
    } else {
        println!("agent running: pid {pid}, config {config}");
        if sinks.is_empty() {
            println!("no export sinks");
        }
        for s in &sinks {
            println!(
                "sink {:<16} {:<7} {:<5} since {}  next entry {}, {} behind{}",
                s.name,
                s.kind,
                if s.up { "up" } else { "DOWN" },
                s.since,
                s.cursor,
                s.behind,
                s.error
                    .as_ref()
                    .map_or(String::new(), |e| format!("  ({e})"))
            );
        }
    }
    Ok(if down {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Fetches from the running agent, or from the store when none answers.
fn query(store: &StoreArgs, req: Request) -> anyhow::Result<Response> {
    let data_dir = store.data_dir()?;
    if let Some(resp) = api::call(&data_dir, &req)? {
        return Ok(resp);
    }
    if !data_dir.join("store").exists() {
        bail!(
            "no session store in {} (has the agent ever run with this data directory?)",
            data_dir.display()
        );
    }
    // A private copy: the data directory is never written to.
    let db = SledStore::open_copy(&data_dir)?;
    Ok(match req {
        Request::SessionsList { filter } => Response::Sessions {
            sessions: db.list(&filter)?,
        },
        Request::SessionsShow { id } => api::show(&db, id)?,
        Request::Status | Request::Approvals { .. } | Request::Requester { .. } => {
            bail!("the agent is not running")
        }
    })
}

/// A listing piped into `head` ends quietly when the reader goes, as
/// other Unix tools do, instead of panicking on the broken pipe: the
/// default action of SIGPIPE, which Rust programs ignore. Only for
/// commands that print; the agent keeps ignoring it.
fn output_to_pipes() {
    // SAFETY: setting a signal's disposition to its default has no
    // preconditions; no handler of ours is replaced.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn sessions(cmd: SessionsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SessionsCommand::Replay(args) => evidence::replay(args),
        SessionsCommand::List {
            store,
            json,
            workload,
            since,
            limit,
        } => {
            let filter = Filter {
                workload,
                since_micros: since
                    .map(|d| record::now_micros().saturating_sub(d.as_micros() as u64)),
                limit,
            };
            let sessions = match query(&store, Request::SessionsList { filter })? {
                Response::Sessions { sessions } => sessions,
                other => bail!("unexpected answer from the agent: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&sessions)?);
            } else {
                print_table(&sessions);
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionsCommand::Show { store, id, json } => {
            let (session, statements) = match query(&store, Request::SessionsShow { id })? {
                Response::Session {
                    session,
                    statements,
                } => (session, statements),
                other => bail!("unexpected answer from the agent: {other:?}"),
            };
            let Some(s) = session else {
                eprintln!("error: no session {id}");
                return Ok(ExitCode::from(1));
            };
            if json {
                let mut v = serde_json::to_value(&s)?;
                v["statement_events"] = serde_json::to_value(&statements)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_session(&s);
                print_statements(&statements);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_statements(list: &[Statement]) {
    if list.is_empty() {
        return;
    }
    println!("statements:");
    for st in list {
        let result = match (&st.error, st.tags.last()) {
            (Some(code), _) => format!("error {code}"),
            (None, Some(tag)) => tag.to_string(),
            (None, None) => "-".into(),
        };
        let took = st.duration_us.map_or("-".into(), |d| format!("{d} µs"));
        let by = match (&st.approval, st.decision) {
            (Some(r), Some(policy::Action::Allow)) => format!("  [approved: request {r}]"),
            (Some(r), _) => format!("  [refused: request {r}]"),
            (None, _) => String::new(),
        };
        println!(
            "  #{:<4} {}  {:<6} {:>10}  {:<16} {}{by}",
            st.seq,
            crate::record::rfc3339_micros(st.at),
            st.kind,
            took,
            result,
            st.text.replace('\n', " ")
        );
    }
}

fn opt(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("-")
}

fn print_table(sessions: &[Session]) {
    println!(
        "{:<16}  {:<27}  {:<12}  {:>7}  {:<22}  {:<12}  {:<11}  {:>10}  {:>10}  RULE",
        "ID", "STARTED", "WORKLOAD", "PID", "DESTINATION", "TARGET", "OUTCOME", "UP", "DOWN"
    );
    for s in sessions {
        println!(
            "{:<16}  {:<27}  {:<12}  {:>7}  {:<22}  {:<12}  {:<11}  {:>10}  {:>10}  {}",
            s.id,
            s.started_at,
            opt(&s.workload),
            s.pid,
            opt(&s.original_dst),
            opt(&s.target),
            s.outcome.to_string(),
            s.bytes_up,
            s.bytes_down,
            opt(&s.rule)
        );
    }
    println!("{} session(s)", sessions.len());
}

fn print_session(s: &Session) {
    let rows: Vec<(&str, String)> = vec![
        ("id", s.id.to_string()),
        ("workload", opt(&s.workload).into()),
        ("identity", opt(&s.identity).into()),
        ("outcome", s.outcome.to_string()),
        ("rule", opt(&s.rule).into()),
        ("approval", opt(&s.approval).into()),
        ("detail", opt(&s.detail).into()),
        ("original_dst", opt(&s.original_dst).into()),
        ("target", opt(&s.target).into()),
        ("protocol", s.protocol.clone()),
        ("client", s.client.clone()),
        ("started_at", s.started_at.clone()),
        ("ended_at", opt(&s.ended_at).into()),
        ("bytes_up", s.bytes_up.to_string()),
        ("bytes_down", s.bytes_down.to_string()),
    ];
    for (k, v) in rows {
        println!("{k:<14} {v}");
    }
    if let Some(pg) = s.facts.get::<Startup>(postgres::FACTS) {
        println!("postgres:");
        println!("  {:<14} {}", "user", opt(&pg.user));
        println!("  {:<14} {}", "database", opt(&pg.database));
        println!("  {:<14} {}", "application", opt(&pg.application_name));
        if pg.encryption_declined {
            println!(
                "  {:<14} the client asked for TLS/GSS encryption; the agent declined",
                "encryption"
            );
        }
        if pg.cancel_request {
            println!("  {:<14} this connection carried a CancelRequest", "cancel");
        }
    }
    if let Some(t) = s.facts.get::<crate::tls::Facts>(crate::tls::FACTS) {
        print_object("tls", &serde_json::to_value(t).unwrap_or_default());
    }
    if let Some(c) = s
        .facts
        .get::<postgres::login::Injected>(postgres::login::CREDENTIAL_FACTS)
    {
        print_object("credential", &serde_json::to_value(c).unwrap_or_default());
    }
    if let Some(e) = &s.evidence {
        print_object("evidence", &serde_json::to_value(e).unwrap_or_default());
    }
}

/// A JSON object's fields under `title`, those of objects within as
/// `outer.inner`.
fn print_object(title: &str, value: &serde_json::Value) {
    fn rows(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    rows(&key, v, out);
                }
            }
            serde_json::Value::String(s) => out.push((prefix.into(), s.clone())),
            serde_json::Value::Null => out.push((prefix.into(), "-".into())),
            other => out.push((prefix.into(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    rows("", value, &mut out);
    println!("{title}:");
    let width = out.iter().map(|(k, _)| k.len()).max().unwrap_or(0).max(14);
    for (k, v) in out {
        println!("  {k:<width$} {v}");
    }
}

/// `ca init`, `ca show`.
fn ca(cmd: CaCommand) -> anyhow::Result<ExitCode> {
    let (CaCommand::Init { store } | CaCommand::Show { store }) = &cmd;
    let dir = store.data_dir()?;
    if let CaCommand::Init { .. } = cmd {
        let origin = crate::evidence::origin();
        let host = origin.split('/').next().unwrap_or("node");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let made = crate::tls::ca::init(&dir, host)?;
        let (crt, key) = crate::tls::ca::files(&dir);
        eprintln!(
            "{} the node CA: {} (key {})",
            if made { "made" } else { "kept" },
            crt.display(),
            key.display()
        );
    }
    let shown = crate::tls::ca::show(&dir)?;
    print!("{}", shown.pem);
    eprintln!("subject: {}", shown.subject);
    eprintln!("fingerprint: {}", shown.fingerprint);
    Ok(ExitCode::SUCCESS)
}
