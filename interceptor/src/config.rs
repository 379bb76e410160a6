//! The agent's configuration file: one typed [`Config`], validated as a whole
//! before anything is attached, with errors that name the file and line.
//!
//! Owns parsing and static validation only; it never touches the kernel.
//! Checks that need the running system (does a cgroup exist?) live in
//! [`crate::cgroup`] and run before attach. Two exceptions, so a bad file
//! is refused where it is named: a target's TLS files are read, and a
//! credential's secret files must be root's alone (their contents are read
//! only when a connection needs them).

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Where the agent keeps its store and API socket unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/interceptor";
/// Default config file for every subcommand.
pub const DEFAULT_CONFIG: &str = "/etc/interceptor/interceptor.toml";

/// A problem in a config or policy file, located at `file:line:column`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct FileError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error(transparent)]
    Invalid(#[from] FileError),
}

/// Source text of a file, to turn byte spans into line and column.
pub struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    /// 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        line_col(self.text, offset).0
    }

    pub fn error_at(&self, span: Option<Range<usize>>, message: impl fmt::Display) -> FileError {
        let (line, column) = match span {
            Some(span) => line_col(self.text, span.start),
            None => (1, 1),
        };
        FileError {
            file: self.path.to_path_buf(),
            line,
            column,
            message: message.to_string(),
        }
    }

    /// Where `key = …` is first set, for errors about a value that parsed.
    pub fn key_span(&self, key: &str) -> Option<Range<usize>> {
        let mut at = 0;
        for line in self.text.split_inclusive('\n') {
            let t = line.trim_start();
            if t.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
            {
                let start = at + (line.len() - t.len());
                return Some(start..start + key.len());
            }
            at += line.len();
        }
        None
    }

    /// Deserializes TOML, mapping syntax and schema errors to a [`FileError`].
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, FileError> {
        toml::from_str(self.text).map_err(|e| self.error_at(e.span(), e.message()))
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Which destinations of a workload's TCP connects go through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Intercept {
    /// Every TCP connect (the safe default: nothing leaves unrecorded).
    #[default]
    All,
    /// Only connects to the addresses of configured targets; others go direct.
    Targets,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Trust domain of the SPIFFE ids minted for workloads.
    pub trust_domain: String,
    /// Port of the proxy listener on 127.0.0.1 and [::1].
    #[serde(default = "default_proxy_port")]
    pub proxy_port: u16,
    #[serde(default)]
    pub intercept: Intercept,
    /// bpffs directory for the pinned links and maps.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Directory under the cgroup2 mount for agent-managed workload cgroups.
    #[serde(default = "default_cgroup_parent")]
    pub managed_cgroup_parent: String,
    /// Policy files, relative to the config file's directory.
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    /// Store and API socket; `--data-dir` overrides it.
    pub data_dir: Option<PathBuf>,
    /// Level of the eBPF programs' log events: error, warn, info, debug, trace.
    #[serde(default = "default_ebpf_log_level")]
    pub ebpf_log_level: String,
    /// Secret for keyed-hash masking (at least 16 bytes); without it the
    /// key is random per run, so hashes change when the agent restarts.
    #[serde(default)]
    pub mask_key_file: Option<PathBuf>,
    /// Time to wait for an upstream connect, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub upstream_connect_timeout_ms: u64,
    /// Data-plane threads, and relay loops (default: one per CPU). Loops
    /// carry connections only as the load needs (see
    /// `interceptor_relay::Loops`); this is the most.
    #[serde(default)]
    pub workers: Option<std::num::NonZeroUsize>,
    /// Microseconds a data-plane thread keeps polling after it read bytes,
    /// yielding the CPU between rounds, instead of sleeping (0: off, at
    /// most 1000). Lower request/response latency for more agent CPU time.
    #[serde(default)]
    pub busy_poll_us: u32,
    /// Longest statement text recorded, in bytes; a longer one is recorded
    /// cut, with the length and SHA-256 of the whole.
    #[serde(default = "default_record_text_limit")]
    pub record_text_limit: usize,
    /// Bytes of statements one session may add to the store per second
    /// (with bursts of four seconds' worth); beyond, statements are decided
    /// as ever but not recorded one by one, and the recording says how many
    /// it dropped.
    #[serde(default = "default_record_bytes_per_second")]
    pub record_bytes_per_second: u64,
    /// End a relayed connection that moved no byte for this many seconds
    /// (0: never).
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// End a relayed connection one side of which ended its sending while
    /// the other has not, once no byte moved for this many seconds since
    /// (0: never).
    #[serde(default = "default_half_closed_timeout_s")]
    pub half_closed_timeout_s: u64,
    /// Where the agent's sockets for unix targets live: a directory only
    /// root may write to (created 0755 if missing; the start is refused if
    /// anyone else could create or replace a socket in it).
    #[serde(default = "default_unix_dir")]
    pub unix_dir: PathBuf,
    /// TLS between the applications and the agent (`[agent.tls]`).
    #[serde(default)]
    pub tls: AgentTls,
}

/// `[agent.tls]`: what the agent answers an application that asks for TLS.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTls {
    #[serde(default)]
    pub mode: Termination,
}

/// Whether the agent accepts the applications' TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Termination {
    /// Declined (PostgreSQL: `N`): the application goes on in plaintext
    /// over the host's loopback, or gives up if it insists.
    #[default]
    Off,
    /// Accepted with a certificate the node CA issues for the address (and
    /// the target's `server_names`).
    Terminate,
}

fn default_unix_dir() -> PathBuf {
    PathBuf::from("/run/interceptor")
}

fn default_idle_timeout_s() -> u64 {
    3600
}

fn default_half_closed_timeout_s() -> u64 {
    60
}

/// Least `record_text_limit` a config may set.
pub const MIN_RECORD_TEXT_LIMIT: usize = 256;
/// Least `record_bytes_per_second` a config may set.
pub const MIN_RECORD_RATE: u64 = 4096;

fn default_record_text_limit() -> usize {
    4096
}

fn default_record_bytes_per_second() -> u64 {
    1 << 20
}

/// Longest busy-polling window a config may ask for.
pub const MAX_BUSY_POLL_US: u32 = 1000;

impl AgentSection {
    /// How the relay loops treat connections: busy polling and timeouts.
    pub fn tuning(&self) -> interceptor_relay::Tuning {
        let secs = |s: u64| (s > 0).then(|| std::time::Duration::from_secs(s));
        interceptor_relay::Tuning {
            busy_poll: self.busy_poll(),
            idle: secs(self.idle_timeout_s),
            half_closed: secs(self.half_closed_timeout_s),
        }
    }

    /// The busy-polling window, if on.
    pub fn busy_poll(&self) -> Option<std::time::Duration> {
        (self.busy_poll_us > 0).then(|| std::time::Duration::from_micros(self.busy_poll_us.into()))
    }

    /// How many data-plane threads to run.
    pub fn worker_threads(&self) -> usize {
        self.workers.map_or_else(
            || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            std::num::NonZeroUsize::get,
        )
    }
}

fn default_proxy_port() -> u16 {
    15001
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/interceptor")
}
fn default_cgroup_parent() -> String {
    "interceptor".into()
}
fn default_ebpf_log_level() -> String {
    "info".into()
}
fn default_connect_timeout_ms() -> u64 {
    5000
}

/// Just-in-time approval (`[approvals]`): who signs approvers' tokens,
/// where approvers reach the agent, who is told.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsSection {
    /// The approval API over HTTPS (none: only the local socket, which
    /// still needs an approver's token).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The OIDC issuer approvers' tokens must come from (`iss`); its keys
    /// are found by discovery unless `jwks_file` is given.
    pub issuer: String,
    /// What approvers' tokens must be for (`aud`).
    pub audience: String,
    /// The issuer's keys as a JWKS file (air-gapped sites).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The claim that lists an approver's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Signature algorithms accepted (of RS256, ES256, EdDSA).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    /// Groups whose members may approve by break-glass in place of a
    /// rule's approvers: two of them, neither the requester nor an owner,
    /// and loudly recorded.
    #[serde(default)]
    pub break_glass_groups: Vec<String>,
    /// Where requests made and decided are posted.
    #[serde(default, rename = "webhook")]
    pub webhooks: Vec<Webhook>,
}

/// A webhook: JSON posted with a Slack-compatible `text` field.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
}

/// `[store]`: how much of the evidence log is kept.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Entries older than this are pruned (`30d`, `12h`); none: kept.
    #[serde(default)]
    pub retain: Option<String>,
    /// The oldest entries are pruned while the log is larger than this
    /// (`10GiB`, `500MiB`), even those a sink has not delivered yet.
    #[serde(default)]
    pub max_size: Option<String>,
    /// The log's files are this large (`64MiB`); pruning removes whole
    /// files, so the log keeps up to one more than `max_size` allows.
    #[serde(default)]
    pub segment_size: Option<String>,
    #[serde(skip_deserializing)]
    pub retain_s: Option<u64>,
    #[serde(skip_deserializing)]
    pub max_bytes: Option<u64>,
    #[serde(skip_deserializing, default = "default_segment")]
    pub segment_bytes: u64,
}

fn default_segment() -> u64 {
    crate::record::segments::SEGMENT_BYTES
}

/// `[[export.sink]]`: where the log's events are streamed, each as OCSF
/// JSON with its `seq`, index and session.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    #[serde(default, rename = "sink")]
    pub sinks: Vec<Sink>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sink {
    /// Names the sink's cursor: renaming a sink starts it over.
    pub name: String,
    /// `syslog` (RFC 5424 over TCP, octet-counted), `otlp` (OTLP/HTTP
    /// logs, protobuf) or `file` (JSON Lines, rotated by size).
    pub kind: String,
    /// syslog: the receiver's `host:port`.
    #[serde(default)]
    pub address: Option<String>,
    /// syslog: speak TLS, trusting `ca_file` (the system's roots if none)
    /// for `server_name` (the address's host if none).
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub server_name: Option<String>,
    /// otlp: the logs endpoint (`http://collector:4318/v1/logs`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// file: the file written; rotated to `path.1`, `path.2`… once
    /// larger than `max_size` (default 100MiB), `keep` (default 5) kept.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub max_size: Option<String>,
    #[serde(default)]
    pub keep: Option<u32>,
    /// Where a new sink starts: `start` (the oldest entry kept: default)
    /// or `now`.
    #[serde(default)]
    pub from: Option<String>,
}

/// `500MiB`, `10GiB`, `64KiB`, `2GB`, or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (like 500MiB or 10GiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        u => {
            return Err(format!(
                "`{s}`: unknown unit `{u}` (use KiB, MiB, GiB or TiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            retain: None,
            max_size: None,
            segment_size: None,
            retain_s: None,
            max_bytes: None,
            segment_bytes: default_segment(),
        }
    }
}

impl StoreSection {
    fn checked(mut self, src: &Source<'_>) -> Result<Self, FileError> {
        let at = |key: &str| src.key_span(key).or_else(|| src.key_span("store"));
        if let Some(r) = &self.retain {
            let d = crate::record::parse_duration(r)
                .map_err(|e| src.error_at(at("retain"), format!("store.retain: {e}")))?;
            if d.as_secs() < 60 {
                return Err(src.error_at(at("retain"), "store.retain must be at least 1m"));
            }
            self.retain_s = Some(d.as_secs());
        }
        if let Some(m) = &self.segment_size {
            let b = parse_size(m).map_err(|e| {
                src.error_at(at("segment_size"), format!("store.segment_size: {e}"))
            })?;
            if !(64 << 10..=1 << 30).contains(&b) {
                return Err(src.error_at(
                    at("segment_size"),
                    "store.segment_size must be between 64KiB and 1GiB",
                ));
            }
            self.segment_bytes = b;
        }
        if let Some(m) = &self.max_size {
            let b = parse_size(m)
                .map_err(|e| src.error_at(at("max_size"), format!("store.max_size: {e}")))?;
            if b < 2 * self.segment_bytes {
                return Err(src.error_at(
                    at("max_size"),
                    format!(
                        "store.max_size must be at least two segments ({} bytes; see store.segment_size)",
                        2 * self.segment_bytes
                    ),
                ));
            }
            self.max_bytes = Some(b);
        }
        Ok(self)
    }
}

impl ExportSection {
    fn checked(self, src: &Source<'_>, base: &Path) -> Result<Self, FileError> {
        let at = |key: &str| src.key_span(key).or_else(|| src.key_span("sink"));
        let mut names = HashSet::new();
        let mut sinks = Vec::new();
        for mut k in self.sinks {
            let bad = |what: String| {
                src.error_at(at("kind"), format!("export sink `{}`: {what}", k.name))
            };
            if !valid_name(&k.name) || !names.insert(k.name.clone()) {
                return Err(src.error_at(
                    at("name"),
                    format!(
                        "export sink name `{}` is not a plain name, or is used twice",
                        k.name
                    ),
                ));
            }
            let has = |f: bool, field: &str| {
                if f {
                    Ok(())
                } else {
                    Err(bad(format!("needs `{field}`")))
                }
            };
            match k.kind.as_str() {
                "syslog" => {
                    has(k.address.is_some(), "address")?;
                    let a = k.address.as_deref().unwrap_or_default();
                    if a.rsplit_once(':')
                        .and_then(|(_, p)| p.parse::<u16>().ok())
                        .is_none()
                    {
                        return Err(bad(format!("address `{a}` is not host:port")));
                    }
                    if !k.tls && (k.ca_file.is_some() || k.server_name.is_some()) {
                        return Err(bad("ca_file and server_name are for `tls = true`".into()));
                    }
                }
                "otlp" => {
                    has(k.endpoint.is_some(), "endpoint")?;
                    let e = k.endpoint.as_deref().unwrap_or_default();
                    if !e.starts_with("http://") && !e.starts_with("https://") {
                        return Err(bad(format!("endpoint `{e}` is not an http(s) URL")));
                    }
                }
                "file" => {
                    has(k.path.is_some(), "path")?;
                    if let Some(m) = &k.max_size {
                        parse_size(m).map_err(|e| bad(format!("max_size: {e}")))?;
                    }
                    if k.keep == Some(0) {
                        return Err(bad("keep must be at least 1".into()));
                    }
                }
                other => {
                    return Err(bad(format!(
                        "unknown kind `{other}` (use syslog, otlp or file)"
                    )))
                }
            }
            let fields_of = |kind: &str| -> &[&str] {
                match kind {
                    "syslog" => &["address", "tls", "ca_file", "server_name"],
                    "otlp" => &["endpoint"],
                    _ => &["path", "max_size", "keep"],
                }
            };
            let given = [
                ("address", k.address.is_some()),
                ("tls", k.tls),
                ("ca_file", k.ca_file.is_some()),
                ("server_name", k.server_name.is_some()),
                ("endpoint", k.endpoint.is_some()),
                ("path", k.path.is_some()),
                ("max_size", k.max_size.is_some()),
                ("keep", k.keep.is_some()),
            ];
            for (field, set) in given {
                if set && !fields_of(&k.kind).contains(&field) {
                    return Err(bad(format!(
                        "`{field}` is not a setting of a {} sink",
                        k.kind
                    )));
                }
            }
            if !matches!(k.from.as_deref(), None | Some("start") | Some("now")) {
                return Err(bad("from must be `start` or `now`".into()));
            }
            k.ca_file = k.ca_file.map(|f| base.join(f));
            k.path = k.path.map(|f| base.join(f));
            sinks.push(k);
        }
        Ok(ExportSection { sinks })
    }
}

/// Signature algorithms an approver's token may use: never `none` nor a
/// shared-secret one.
pub const APPROVER_ALGORITHMS: [&str; 3] = ["RS256", "ES256", "EdDSA"];

fn default_groups_claim() -> String {
    "groups".into()
}
fn default_algorithms() -> Vec<String> {
    APPROVER_ALGORITHMS.map(String::from).to_vec()
}
fn default_leeway() -> u64 {
    30
}

impl ApprovalsSection {
    /// Checked, its files relative to `base`.
    fn checked(mut self, src: &Source<'_>, base: &Path) -> Result<Self, FileError> {
        let at = |key: &str| src.key_span(key).or_else(|| src.key_span("approvals"));
        if !self.issuer.starts_with("https://")
            && !self.issuer.starts_with("http://127.0.0.1")
            && !self.issuer.starts_with("http://localhost")
        {
            return Err(src.error_at(
                at("issuer"),
                "approvals.issuer must be an https:// URL (http only on the loopback)",
            ));
        }
        if self.audience.is_empty() {
            return Err(src.error_at(at("audience"), "approvals.audience must not be empty"));
        }
        if self.groups_claim.is_empty() {
            return Err(src.error_at(
                at("groups_claim"),
                "approvals.groups_claim must name a claim (like `groups`)",
            ));
        }
        if self.algorithms.is_empty() {
            return Err(src.error_at(at("algorithms"), "approvals.algorithms must not be empty"));
        }
        for a in &self.algorithms {
            if !APPROVER_ALGORITHMS.contains(&a.as_str()) {
                return Err(src.error_at(
                    at("algorithms"),
                    format!(
                        "approvals.algorithms: `{a}` is not accepted (use {})",
                        APPROVER_ALGORITHMS.join(", ")
                    ),
                ));
            }
        }
        if self.leeway_s > 300 {
            return Err(src.error_at(at("leeway_s"), "approvals.leeway_s must be at most 300"));
        }
        if self.listen.is_some() && (self.cert_file.is_none() || self.key_file.is_none()) {
            return Err(src.error_at(
                at("listen"),
                "approvals.listen needs cert_file and key_file (the API is HTTPS only)",
            ));
        }
        for w in &self.webhooks {
            if !w.url.starts_with("https://") && !w.url.starts_with("http://") {
                return Err(src.error_at(
                    at("webhook"),
                    format!("webhook url `{}` is not an http(s) URL", w.url),
                ));
            }
        }
        for f in [&mut self.cert_file, &mut self.key_file, &mut self.jwks_file] {
            *f = f.take().map(|p| base.join(p));
        }
        Ok(self)
    }
}

/// How a workload's processes are found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Selector {
    /// An existing cgroup, relative to the cgroup2 mount (or absolute under it).
    Cgroup(String),
    /// The cgroup of a systemd unit.
    SystemdUnit(String),
    /// A cgroup the agent creates under `managed_cgroup_parent`.
    Managed,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: toml::Spanned<String>,
    cgroup: Option<String>,
    systemd_unit: Option<String>,
    #[serde(default)]
    managed: bool,
    spiffe_id: Option<String>,
    #[serde(default)]
    owners: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub name: String,
    pub selector: Selector,
    /// SPIFFE id of the workload (default `spiffe://<trust_domain>/<name>`).
    pub spiffe_id: String,
    /// People (OIDC subjects) and groups who own it: never approvers of
    /// its requests.
    pub owners: Vec<String>,
}

/// Application protocol spoken to a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque bytes.
    #[default]
    Tcp,
    /// PostgreSQL wire protocol: statements decided, masked and recorded.
    Postgres,
    /// A protocol for tests: each line a statement (see
    /// `protocol::lines`).
    #[cfg(test)]
    Lines,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Postgres => "postgres",
            #[cfg(test)]
            Protocol::Lines => "lines",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: toml::Spanned<String>,
    addresses: Vec<toml::Spanned<String>>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    tls: Option<crate::tls::TargetTls>,
    #[serde(default)]
    server_names: Vec<String>,
}

/// An address range of a target: a CIDR prefix and a port (0 = any port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AddrMatch {
    pub net: IpAddr,
    pub prefix: u8,
    pub port: u16,
}

impl AddrMatch {
    /// Whether this matches a local address: its network is loopback,
    /// unspecified or one of `host`'s addresses, or it contains one of them.
    pub fn is_local(&self, host: &[IpAddr]) -> bool {
        crate::local::is_local(self.net, host)
            || host
                .iter()
                .any(|h| self.contains(SocketAddr::new(*h, self.port)))
    }

    pub fn contains(&self, dst: SocketAddr) -> bool {
        if self.port != 0 && self.port != dst.port() {
            return false;
        }
        let ip = canonical_ip(dst.ip());
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.prefix),
            _ => false,
        }
    }

    /// Parses `IP:PORT`, `[IPv6]:PORT`, `CIDR:PORT`, `[CIDR]:PORT`, with `*` for any port.
    pub fn parse(s: &str) -> Result<Self, String> {
        let hint =
            "expected IP:PORT, CIDR:PORT or [IPv6/len]:PORT, with * for any port, or unix:/path";
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| format!("`{s}`: {hint}"))?;
            (h, p)
        } else {
            s.rsplit_once(':').ok_or_else(|| format!("`{s}`: {hint}"))?
        };
        let port = if port == "*" {
            0
        } else {
            match port.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(format!("`{s}`: bad port `{port}` ({hint})")),
            }
        };
        let (ip, prefix) = match host.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (host, None),
        };
        let net: IpAddr = ip.parse().map_err(|_| {
            format!("`{s}`: `{ip}` is not an IP address (host names are not resolved; {hint})")
        })?;
        let net = canonical_ip(net);
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(len) => match len.parse::<u8>() {
                Ok(l) if l <= max => l,
                _ => return Err(format!("`{s}`: bad prefix length `{len}` (0..={max})")),
            },
        };
        Ok(AddrMatch { net, prefix, port })
    }
}

/// IPv4-mapped IPv6 addresses are treated as the IPv4 address they carry.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = bits as usize;
    let whole = bits / 8;
    if a[..whole] != b[..whole] {
        return false;
    }
    let rem = bits % 8;
    rem == 0 || {
        let mask = 0xffu8 << (8 - rem);
        a[whole] & mask == b[whole] & mask
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub addresses: Vec<AddrMatch>,
    /// Unix stream socket paths (`unix:/path` in `addresses`): absolute
    /// and normal (no `.`, `..`, `//` or trailing `/`).
    pub unix: Vec<PathBuf>,
    pub protocol: Protocol,
    /// TLS from the agent to the server (TCP addresses: a unix socket
    /// never leaves the host).
    pub tls: Option<crate::tls::Origination>,
    /// Names applications reach the server by: the certificate the agent
    /// presents when it terminates their TLS names them too.
    pub server_names: Vec<String>,
}

/// Longest unix socket path (`sun_path`, without a NUL).
pub const UNIX_PATH_MAX: usize = 107;

/// Parses the path of a `unix:` address.
fn parse_unix_path(s: &str) -> Result<PathBuf, String> {
    let hint = "a unix address is `unix:` and an absolute, normal path";
    if !s.starts_with('/') {
        return Err(format!("`unix:{s}`: {hint}"));
    }
    if s.len() > UNIX_PATH_MAX || s.contains('\0') {
        return Err(format!(
            "`unix:{s}`: longer than a unix socket path may be ({UNIX_PATH_MAX} bytes)"
        ));
    }
    if s.len() > 1 && s.ends_with('/')
        || s.contains("//")
        || s.split('/').any(|c| c == "." || c == "..")
    {
        return Err(format!(
            "`unix:{s}`: {hint} (no `.`, `..`, `//` or trailing `/`)"
        ));
    }
    Ok(PathBuf::from(s))
}

impl Target {
    /// The agent's socket for this target's unix path number `i`, in `dir`.
    pub fn unix_socket(&self, dir: &Path, i: usize) -> PathBuf {
        dir.join(format!("{}.{i}.sock", self.name))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: AgentSection,
    #[serde(default)]
    approvals: Option<ApprovalsSection>,
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    export: ExportSection,
    #[serde(default, rename = "workload")]
    workloads: Vec<RawWorkload>,
    #[serde(default, rename = "target")]
    targets: Vec<RawTarget>,
    #[serde(default, rename = "credential")]
    credentials: Vec<crate::credential::RawCredential>,
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub path: PathBuf,
    pub agent: AgentSection,
    /// Just-in-time approval (none: review rules are refused at load).
    pub approvals: Option<ApprovalsSection>,
    /// How much of the evidence log is kept.
    pub store: StoreSection,
    /// Where the log's events are streamed.
    pub export: ExportSection,
    pub workloads: Vec<Workload>,
    pub targets: Vec<Target>,
    /// Upstream identities the agent logs in as, per workload and target.
    pub credentials: Vec<crate::credential::Credential>,
}

pub const PROXY_IP4: Ipv4Addr = Ipv4Addr::LOCALHOST;
pub const PROXY_IP6: Ipv6Addr = Ipv6Addr::LOCALHOST;

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        Ok(Self::parse(path, &text)?)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, FileError> {
        let src = Source { path, text };
        let raw: RawConfig = src.parse()?;
        let mut agent = raw.agent;
        if agent.trust_domain.is_empty()
            || !agent
                .trust_domain
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c))
        {
            return Err(src.error_at(
                src.key_span("trust_domain"),
                "agent.trust_domain must be a non-empty lowercase DNS-like name",
            ));
        }
        if agent.busy_poll_us > MAX_BUSY_POLL_US {
            return Err(src.error_at(
                src.key_span("busy_poll_us"),
                format!("agent.busy_poll_us must be at most {MAX_BUSY_POLL_US} (0: off)"),
            ));
        }
        if agent.proxy_port == 0 {
            return Err(src.error_at(src.key_span("proxy_port"), "agent.proxy_port must not be 0"));
        }
        if agent.record_text_limit < MIN_RECORD_TEXT_LIMIT {
            return Err(src.error_at(
                src.key_span("record_text_limit"),
                format!("agent.record_text_limit must be at least {MIN_RECORD_TEXT_LIMIT} bytes"),
            ));
        }
        if agent.record_bytes_per_second < MIN_RECORD_RATE {
            return Err(src.error_at(
                src.key_span("record_bytes_per_second"),
                format!("agent.record_bytes_per_second must be at least {MIN_RECORD_RATE}"),
            ));
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&agent.ebpf_log_level.as_str()) {
            return Err(src.error_at(
                src.key_span("ebpf_log_level"),
                "agent.ebpf_log_level must be one of error, warn, info, debug, trace",
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        agent.policies = agent.policies.iter().map(|p| base.join(p)).collect();
        agent.mask_key_file = agent.mask_key_file.map(|p| base.join(p));
        if !agent.managed_cgroup_parent.split('/').all(valid_name) {
            return Err(src.error_at(
                src.key_span("managed_cgroup_parent"),
                "agent.managed_cgroup_parent must be a relative path of plain names",
            ));
        }

        let mut names = HashSet::new();
        let mut workloads = Vec::new();
        for w in raw.workloads {
            let span = Some(w.name.span());
            let name = w.name.into_inner();
            if !valid_name(&name) || name.contains('.') {
                return Err(src.error_at(
                    span,
                    format!("workload name `{name}` must use only letters, digits, `-` and `_`"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(src.error_at(span, format!("workload `{name}` is defined twice")));
            }
            let selector = match (w.cgroup, w.systemd_unit, w.managed) {
                (Some(c), None, false) => Selector::Cgroup(c),
                (None, Some(u), false) => Selector::SystemdUnit(u),
                (None, None, true) => Selector::Managed,
                _ => {
                    return Err(src.error_at(
                        span,
                        format!(
                            "workload `{name}` needs exactly one of `cgroup`, `systemd_unit` or `managed = true`"
                        ),
                    ))
                }
            };
            let spiffe_id = w
                .spiffe_id
                .unwrap_or_else(|| format!("spiffe://{}/{name}", agent.trust_domain));
            if !spiffe_id.starts_with("spiffe://") {
                return Err(src.error_at(
                    span,
                    format!("spiffe_id of `{name}` must start with spiffe://"),
                ));
            }
            if w.owners.iter().any(|o| o.trim().is_empty()) {
                return Err(src.error_at(span, format!("workload `{name}`: an owner is empty")));
            }
            workloads.push(Workload {
                name,
                selector,
                spiffe_id,
                owners: w.owners,
            });
        }

        let mut targets = Vec::new();
        let mut tnames = HashSet::new();
        for t in raw.targets {
            let span = Some(t.name.span());
            let name = t.name.into_inner();
            if !valid_name(&name) {
                return Err(src.error_at(span, format!("target name `{name}` is not a plain name")));
            }
            if !tnames.insert(name.clone()) {
                return Err(src.error_at(span, format!("target `{name}` is defined twice")));
            }
            if t.addresses.is_empty() {
                return Err(src.error_at(span, format!("target `{name}` has no addresses")));
            }
            let mut addresses = Vec::new();
            let mut unix = Vec::new();
            for a in t.addresses {
                let span = Some(a.span());
                if let Some(path) = a.get_ref().strip_prefix("unix:") {
                    let path = parse_unix_path(path).map_err(|e| src.error_at(span.clone(), e))?;
                    if targets.iter().any(|t: &Target| t.unix.contains(&path))
                        || unix.contains(&path)
                    {
                        return Err(src.error_at(
                            span,
                            format!("`unix:{}` belongs to two targets", path.display()),
                        ));
                    }
                    unix.push(path);
                    continue;
                }
                let m = AddrMatch::parse(a.get_ref()).map_err(|e| src.error_at(span.clone(), e))?;
                if m.contains(SocketAddr::new(IpAddr::V4(PROXY_IP4), agent.proxy_port))
                    || m.contains(SocketAddr::new(IpAddr::V6(PROXY_IP6), agent.proxy_port))
                {
                    return Err(src.error_at(
                        span,
                        format!(
                            "target `{name}` covers the proxy listener itself (port {})",
                            agent.proxy_port
                        ),
                    ));
                }
                addresses.push(m);
            }
            for n in &t.server_names {
                if rustls::pki_types::DnsName::try_from(n.as_str()).is_err()
                    || n.parse::<IpAddr>().is_ok()
                {
                    return Err(src.error_at(
                        span,
                        format!("target `{name}`: server name `{n}` is not a DNS name"),
                    ));
                }
            }
            if (t.tls.is_some() || !t.server_names.is_empty()) && t.protocol != Protocol::Postgres {
                return Err(src.error_at(
                    span,
                    format!("target `{name}`: `tls` and `server_names` need a protocol the agent speaks (postgres)"),
                ));
            }
            let tls = t
                .tls
                .map(|tls| crate::tls::Origination::new(tls, base, &format!("target `{name}`")))
                .transpose()
                .map_err(|e| src.error_at(span.clone(), format!("{e:#}")))?;
            let target = Target {
                name,
                addresses,
                unix,
                protocol: t.protocol,
                tls,
                server_names: t.server_names,
            };
            for i in 0..target.unix.len() {
                let own = target.unix_socket(&agent.unix_dir, i);
                if own.as_os_str().len() > UNIX_PATH_MAX {
                    return Err(src.error_at(
                        span,
                        format!(
                            "the agent's socket for target `{}` would be {}, longer than a unix socket path may be; shorten the target's name or agent.unix_dir",
                            target.name,
                            own.display()
                        ),
                    ));
                }
            }
            targets.push(target);
        }
        let mut credentials: Vec<crate::credential::Credential> = Vec::new();
        for c in raw.credentials {
            let span = Some(c.workload.span());
            let (w, t) = (c.workload.get_ref().clone(), c.target.clone());
            if !workloads.iter().any(|x| x.name == w) {
                return Err(src.error_at(span, format!("credential: no workload `{w}`")));
            }
            match targets.iter().find(|x| x.name == t) {
                Some(x) if x.protocol == Protocol::Postgres => {}
                Some(_) => {
                    return Err(src.error_at(
                        span,
                        format!("credential: target `{t}` is no postgres target"),
                    ))
                }
                None => return Err(src.error_at(span, format!("credential: no target `{t}`"))),
            }
            if credentials.iter().any(|x| x.workload == w && x.target == t) {
                return Err(
                    src.error_at(span, format!("credential for `{w}` → `{t}` is given twice"))
                );
            }
            credentials.push(c.checked(base).map_err(|e| src.error_at(span, e))?);
        }
        let approvals = raw.approvals.map(|a| a.checked(&src, base)).transpose()?;
        let store = raw.store.checked(&src)?;
        let export = raw.export.checked(&src, base)?;
        Ok(Config {
            path: path.to_path_buf(),
            agent,
            approvals,
            store,
            export,
            workloads,
            targets,
            credentials,
        })
    }

    /// The credential `workload` logs in to `target` with, if any.
    pub fn credential(
        &self,
        workload: &str,
        target: &str,
    ) -> Option<&crate::credential::Credential> {
        self.credentials
            .iter()
            .find(|c| c.workload == workload && c.target == target)
    }

    pub fn workload(&self, name: &str) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.name == name)
    }

    /// The first target whose addresses contain `dst`.
    pub fn target_for(&self, dst: SocketAddr) -> Option<&Target> {
        self.targets
            .iter()
            .find(|t| t.addresses.iter().any(|a| a.contains(dst)))
    }

    /// The target `dst` reaches on a host whose interfaces have the
    /// addresses `host`: the first whose addresses contain it, else, for a
    /// local `dst`, the first with a local address on its port (every
    /// local address reaches a server on this host; see [`crate::local`]).
    pub fn target_for_on(&self, dst: SocketAddr, host: &[IpAddr]) -> Option<&Target> {
        self.target_for(dst).or_else(|| {
            if !crate::local::is_local(dst.ip(), host) {
                return None;
            }
            self.targets.iter().find(|t| {
                t.addresses
                    .iter()
                    .any(|a| a.is_local(host) && (a.port == 0 || a.port == dst.port()))
            })
        })
    }

    pub fn data_dir(&self, overridden: Option<&Path>) -> PathBuf {
        overridden
            .map(Path::to_path_buf)
            .or_else(|| self.agent.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
    }
}

pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agent]
trust_domain = "example.org"
proxy_port = 15001

[[workload]]
name = "billing"
managed = true

[[target]]
name = "db"
addresses = ["127.0.0.1:5432", "[::1]:5432", "10.0.0.0/8:*"]
protocol = "postgres"
"#;

    /// A unix address is an absolute, normal path that fits a socket
    /// address, belongs to one target, and leaves room for the agent's
    /// own socket for it.
    #[test]
    fn unix_addresses_are_absolute_normal_paths() {
        let with = |addr: &str| {
            let text = format!(
                "{GOOD}\n[[target]]\nname = \"local\"\naddresses = [\"{addr}\", \"127.0.0.1:6432\"]\n"
            );
            Config::parse(Path::new("c.toml"), &text)
        };
        let c = with("unix:/run/postgresql/.s.PGSQL.5432").unwrap();
        let t = &c.targets[1];
        assert_eq!(t.unix, [PathBuf::from("/run/postgresql/.s.PGSQL.5432")]);
        assert_eq!(t.addresses.len(), 1);
        assert_eq!(
            t.unix_socket(&c.agent.unix_dir, 0),
            Path::new("/run/interceptor/local.0.sock")
        );
        let long = format!("unix:/{}", "x".repeat(107));
        for bad in [
            "unix:run/pg.sock",
            "unix:/run/../pg.sock",
            "unix:/run/./pg.sock",
            "unix://run/pg.sock",
            "unix:/run/pg/",
            long.as_str(),
        ] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.line, 17, "{bad}: {e}");
            assert!(e.message.contains("unix"), "{bad}: {e}");
        }
        let twice = format!(
            "{GOOD}\n[[target]]\nname = \"a\"\naddresses = [\"unix:/s\"]\n\
             [[target]]\nname = \"b\"\naddresses = [\"unix:/s\"]\n"
        );
        let e = Config::parse(Path::new("c.toml"), &twice).unwrap_err();
        assert!(e.message.contains("two targets"), "{e}");
        let deep = GOOD.replace(
            "proxy_port = 15001",
            &format!("proxy_port = 15001\nunix_dir = \"/{}\"", "d".repeat(100)),
        );
        let e = Config::parse(
            Path::new("c.toml"),
            &format!("{deep}\n[[target]]\nname = \"x\"\naddresses = [\"unix:/s\"]\n"),
        )
        .unwrap_err();
        assert!(e.message.contains("shorten"), "{e}");
    }

    #[test]
    fn parses_a_good_config() {
        let c = Config::parse(Path::new("c.toml"), GOOD).unwrap();
        assert_eq!(c.workloads[0].spiffe_id, "spiffe://example.org/billing");
        assert_eq!(c.workloads[0].selector, Selector::Managed);
        let t = c.target_for("10.1.2.3:80".parse().unwrap()).unwrap();
        assert_eq!(t.name, "db");
        assert!(c
            .target_for("[::ffff:127.0.0.1]:5432".parse().unwrap())
            .is_some());
        assert!(c.target_for("127.0.0.1:5433".parse().unwrap()).is_none());
        assert!(c.target_for("11.0.0.1:80".parse().unwrap()).is_none());
    }

    /// A target on a local address is every local address on its port; a
    /// target that names an address itself keeps it.
    #[test]
    fn local_targets_claim_every_local_address_on_their_port() {
        let text =
            format!("{GOOD}\n[[target]]\nname = \"other\"\naddresses = [\"127.0.0.2:5432\"]\n");
        let c = Config::parse(Path::new("c.toml"), &text).unwrap();
        let host: Vec<IpAddr> = vec!["192.0.2.7".parse().unwrap(), "fd00::7".parse().unwrap()];
        let name = |dst: &str| {
            c.target_for_on(dst.parse().unwrap(), &host)
                .map(|t| t.name.as_str())
        };
        for dst in [
            "127.0.0.9:5432",
            "0.0.0.0:5432",
            "[::]:5432",
            "[::ffff:127.0.0.3]:5432",
            "192.0.2.7:5432",
            "[fd00::7]:5432",
        ] {
            assert_eq!(name(dst), Some("db"), "{dst}");
        }
        assert_eq!(name("127.0.0.2:5432"), Some("other"));
        assert_eq!(name("127.0.0.9:5433"), None);
        assert_eq!(name("192.0.2.8:5432"), None, "not this host's");
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let text = GOOD.replace("proxy_port = 15001", "proxy_port = = 1");
        let e = Config::parse(Path::new("x/c.toml"), &text).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.to_string().starts_with("x/c.toml:4:"), "{e}");
    }

    #[test]
    fn schema_errors_name_the_line() {
        let text = GOOD.replace("managed = true", "managed = true\ncolour = \"red\"");
        let e = Config::parse(Path::new("c.toml"), &text).unwrap_err();
        assert_eq!(e.line, 9, "{e}");
        assert!(e.message.contains("colour"), "{e}");
    }

    #[test]
    fn bad_addresses_and_duplicates_are_rejected_with_lines() {
        let text = GOOD.replace("10.0.0.0/8:*", "db.internal:5432");
        let e = Config::parse(Path::new("c.toml"), &text).unwrap_err();
        assert_eq!(e.line, 12, "{e}");
        assert!(e.message.contains("not an IP address"), "{e}");

        let text = format!("{GOOD}\n[[workload]]\nname = \"billing\"\nmanaged = true\n");
        let e = Config::parse(Path::new("c.toml"), &text).unwrap_err();
        assert!(e.message.contains("defined twice"), "{e}");
        assert_eq!(e.line, 16, "{e}");
    }

    #[test]
    fn bad_agent_values_name_their_line() {
        let text = GOOD.replace(
            "proxy_port = 15001",
            "proxy_port = 15001\nbusy_poll_us = 5000",
        );
        let e = Config::parse(Path::new("c.toml"), &text).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("at most 1000"), "{e}");
        let text = GOOD.replace("proxy_port = 15001", "  proxy_port  = 0");
        let e = Config::parse(Path::new("c.toml"), &text).unwrap_err();
        assert_eq!((e.line, e.column), (4, 3), "{e}");
        let text = GOOD.replace("proxy_port = 15001", "busy_poll_us = 50");
        let c = Config::parse(Path::new("c.toml"), &text).unwrap();
        assert_eq!(
            c.agent.busy_poll(),
            Some(std::time::Duration::from_micros(50))
        );
        let c = Config::parse(Path::new("c.toml"), GOOD).unwrap();
        assert_eq!(c.agent.busy_poll(), None);
    }

    #[test]
    fn a_target_covering_the_proxy_is_rejected() {
        let text = GOOD.replace("10.0.0.0/8:*", "127.0.0.0/8:*");
        let e = Config::parse(Path::new("c.toml"), &text).unwrap_err();
        assert!(e.message.contains("proxy listener"), "{e}");
    }

    #[test]
    fn cidr_matching() {
        let m = AddrMatch::parse("192.168.4.0/22:443").unwrap();
        assert!(m.contains("192.168.7.255:443".parse().unwrap()));
        assert!(!m.contains("192.168.8.0:443".parse().unwrap()));
        assert!(!m.contains("192.168.5.1:80".parse().unwrap()));
        assert!(AddrMatch::parse("1.2.3.4:0").is_err());
        assert!(AddrMatch::parse("1.2.3.4/33:1").is_err());
        let v6 = AddrMatch::parse("[fd00::/8]:*").unwrap();
        assert!(v6.contains("[fd12::1]:9".parse().unwrap()));
    }
}
