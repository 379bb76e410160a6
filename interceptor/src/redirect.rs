//! Loading, attaching, pinning, adopting and detaching the eBPF programs, and
//! the agent's side of their maps.
//!
//! Layout in bpffs (`agent.pin_dir`, default `/sys/fs/bpf/interceptor`):
//!
//! ```text
//! maps-v<ABI>/ICPT_CONFIG ICPT_TARGETS ICPT_SOCK_META ICPT_CONN_META
//!             ICPT_ACCEPTED ICPT_LISTENERS AYA_LOGS
//!             ICPT_UNIX_TARGETS ICPT_UNIX_FLAGS ICPT_UNIX_SERVERS
//! links/<workload>@<program>   (also @icpt_connect_unix)
//! steering                  the sk_lookup link of the agent's network namespace
//! unix_guard                the fmod_ret link that keeps workloads off target
//!                           servers' unix sockets (see [`unix`])
//! ```
//!
//! Links are pinned so that they outlive the agent: while it is down the
//! programs keep sending intercepted connects to the proxy address, and the
//! steering program refuses every connection there because the agent's
//! listener has left `ICPT_LISTENERS` (fail closed), whoever else binds that
//! address meanwhile. The agent's listeners bind ephemeral ports: the proxy
//! address is never theirs to lose. A restarted agent reuses the pinned maps
//! and keeps the pinned links of workloads it still knows, so running
//! workloads are never touched. `interceptor detach` removes all of it.

use std::{
    fs, io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, SockMap},
    programs::{
        links::FdLink, links::PinnedLink, CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
    },
    Ebpf, EbpfLoader,
};
use interceptor_ebpf::{
    map_names, program_names, ConnMeta, ProxyConfig, TargetKey, ABI_VERSION, AF_INET, AF_INET6,
    LISTENER_V4, LISTENER_V6, TARGET_PORT_BITS,
};
use tracing::{info, warn};

use crate::{
    cgroup::{self, Resolved},
    config::{Config, Intercept, PROXY_IP4, PROXY_IP6},
};

mod sys;
pub mod unix;

/// The eBPF object, built from `interceptor-ebpf` by `build.rs`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor-ebpf"));

/// Programs in attach order: sock_ops and getpeername before the connect
/// programs, so no redirected connect ever lacks its 4-tuple entry.
const PROGRAMS: [&str; 5] = [
    program_names::SOCK_OPS,
    program_names::GETPEERNAME4,
    program_names::GETPEERNAME6,
    program_names::CONNECT4,
    program_names::CONNECT6,
];

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Reader of the eBPF programs' log ring buffer.
pub type EbpfLogs = aya_log::EbpfLogger<&'static dyn log::Log>;

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("cannot mount bpffs at {0}: {1}")]
    MountBpffs(PathBuf, nix::Error),
    #[error("{0} holds pinned maps of another interceptor version ({1}); run `interceptor detach` with the old version first")]
    AbiMismatch(PathBuf, String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("pinning {0}: {1}")]
    Pin(PathBuf, String),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("unix sockets: {0}")]
    Unix(#[from] unix::UnixError),
    #[error("this kernel cannot guard the unix targets' sockets ({0}), and workloads can reach them around the agent: {1}. Put each socket in a directory others may not search (e.g. `chmod o-x` on it), with no other link to it; the agent reaches it with CAP_DAC_READ_SEARCH")]
    UnixOpen(String, String),
    #[error("targets have unix addresses, but this kernel cannot redirect unix-socket connects ({0}); interception of unix sockets needs Linux 6.7+ with BTF")]
    UnixUnsupported(unix::UnixError),
}

/// An error and its sources on one line (aya's errors keep the errno in `source`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RedirectError + '_ {
    move |e| RedirectError::Io(path.to_path_buf(), e)
}

/// Paths of the agent's pins.
#[derive(Debug, Clone)]
pub struct Pins {
    pub root: PathBuf,
}

impl Pins {
    pub fn new(root: &Path) -> Self {
        Pins {
            root: root.to_path_buf(),
        }
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join(format!("maps-v{ABI_VERSION}"))
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    /// The pinned sk_lookup link that steers the proxy address.
    pub fn steering(&self) -> PathBuf {
        self.root.join("steering")
    }
    /// The pinned link of the unix guard (see [`unix`]).
    pub fn unix_guard(&self) -> PathBuf {
        self.root.join("unix_guard")
    }
    pub fn link(&self, workload: &str, program: &str) -> PathBuf {
        // bpffs refuses names with dots; workload names have no `@`.
        self.links().join(format!("{workload}@{program}"))
    }
    /// Whether every program of `workload` is pinned (attached).
    pub fn workload_attached(&self, workload: &str) -> bool {
        PROGRAMS.iter().all(|p| self.link(workload, p).exists())
    }
}

/// Mounts bpffs at `/sys/fs/bpf` if `dir` lives there and it is not mounted.
fn ensure_bpffs(dir: &Path) -> Result<(), RedirectError> {
    let base = Path::new("/sys/fs/bpf");
    if !dir.starts_with(base) {
        return Ok(());
    }
    let st =
        nix::sys::statfs::statfs(base).map_err(|e| RedirectError::Io(base.into(), e.into()))?;
    if st.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        base,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| RedirectError::MountBpffs(base.into(), e))
}

/// The agent's handle on the kernel side: maps it reads and writes, and the
/// loaded object (kept alive for the log ring buffer and any new links).
pub struct Redirect {
    accepted: Mutex<HashMap<MapData, u64, ConnMeta>>,
    targets: Mutex<LpmTrie<MapData, TargetKey, u32>>,
    config: Mutex<Array<MapData, ProxyConfig>>,
    /// Links attached by this run and adopted from earlier runs.
    pub attached: usize,
    pub adopted: usize,
    /// The unix programs, unless this kernel lacks them (then no target
    /// has a unix address: the start fails otherwise).
    unix: Option<unix::Unix>,
    /// Why the unix programs are not loaded.
    pub unix_missing: Option<String>,
    /// Why the unix guard is not in place (the programs are).
    pub unix_unguarded: Option<String>,
    /// Unix target sockets last seen reachable around the agent.
    unix_open: Mutex<Vec<String>>,
    /// sock_ops on the agent's own cgroup, where its accepted sockets live;
    /// not pinned: it goes with this process.
    _own_sock_ops: FdLink,
    _ebpf: Ebpf,
}

/// Log level of the eBPF programs (aya-log levels: error=1 … trace=5).
fn ebpf_level(name: &str) -> u8 {
    match name {
        "error" => 1,
        "warn" => 2,
        "info" => 3,
        "debug" => 4,
        _ => 5,
    }
}

impl Redirect {
    /// Loads (or adopts) everything, hands the proxy address to `listeners`
    /// (listening sockets on 127.0.0.1 and, if any, [::1]) and attaches the
    /// configured workloads. Also returns the eBPF log ring buffer reader.
    pub fn start(
        config: &Config,
        workloads: &[Resolved],
        listeners: &[impl AsRawFd],
        host: &[IpAddr],
    ) -> Result<(Self, Option<EbpfLogs>), RedirectError> {
        let pins = Pins::new(&config.agent.pin_dir);
        ensure_bpffs(&pins.root)?;
        let maps_dir = pins.maps();
        fs::create_dir_all(&maps_dir).map_err(io_err(&maps_dir))?;
        fs::create_dir_all(pins.links()).map_err(io_err(&pins.links()))?;
        for e in fs::read_dir(&pins.root)
            .map_err(io_err(&pins.root))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("maps-v") && e.path() != maps_dir {
                return Err(RedirectError::AbiMismatch(pins.root.clone(), name));
            }
        }
        let logs_pin = maps_dir.join("AYA_LOGS");
        let level = ebpf_level(&config.agent.ebpf_log_level);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_pin_path("AYA_LOGS", logs_pin.as_path())
            .override_global(aya_log::LEVEL, &level, false)
            .load(EBPF_OBJECT)?;

        let mut cfg_map: Array<MapData, ProxyConfig> = Array::try_from(
            ebpf.take_map(map_names::CONFIG)
                .ok_or(RedirectError::MissingMap(map_names::CONFIG))?,
        )
        .map_err(|e| RedirectError::Map(map_names::CONFIG, e))?;
        let own_cgroup = own_cgroup_id()?;
        let proxy = ProxyConfig {
            agent_cgroup_id: own_cgroup,
            proxy_ip4: u32::from_ne_bytes(PROXY_IP4.octets()),
            proxy_ip6: ip6_words(PROXY_IP6.octets()),
            proxy_port: config.agent.proxy_port,
            intercept_all: u8::from(config.agent.intercept == Intercept::All),
            agent_tgid: std::process::id(),
            ..ProxyConfig::default()
        };
        cfg_map
            .set(0, proxy, 0)
            .map_err(|e| RedirectError::Map(map_names::CONFIG, e))?;

        // Entries a dead agent never took describe sockets that are gone.
        let mut accepted: HashMap<MapData, u64, ConnMeta> = HashMap::try_from(
            ebpf.take_map(map_names::ACCEPTED)
                .ok_or(RedirectError::MissingMap(map_names::ACCEPTED))?,
        )
        .map_err(|e| RedirectError::Map(map_names::ACCEPTED, e))?;
        let stale: Vec<u64> = accepted.keys().filter_map(Result::ok).collect();
        for k in stale {
            let _ = accepted.remove(&k);
        }
        // The agent's side of each connection must be filed by cookie
        // before the first one arrives.
        let own_sock_ops = attach_own_sock_ops(&mut ebpf)?;
        let name = map_names::LISTENERS;
        let mut socks: SockMap<&mut MapData> =
            SockMap::try_from(ebpf.map_mut(name).ok_or(RedirectError::MissingMap(name))?)
                .map_err(|e| RedirectError::Map(name, e))?;
        for (slot, l) in [LISTENER_V4, LISTENER_V6].into_iter().zip(listeners) {
            socks
                .set(slot, l, 0)
                .map_err(|e| RedirectError::Map(name, e))?;
        }
        steer(&mut ebpf, &pins)?;

        let name = map_names::TARGETS;
        let mut targets: LpmTrie<MapData, TargetKey, u32> =
            LpmTrie::try_from(ebpf.take_map(name).ok_or(RedirectError::MissingMap(name))?)
                .map_err(|e| RedirectError::Map(name, e))?;
        set_targets(&mut targets, &target_keys(config, host))?;

        let wants_unix = config.targets.iter().any(|t| !t.unix.is_empty());
        let (unix, unix_missing) = match unix::Unix::load(&maps_dir, &pins.unix_guard()) {
            Ok(u) => {
                u.set_routes(&unix_routes(config))?;
                u.set_servers(&unix_servers(config))?;
                (Some(u), None)
            }
            Err(e) if wants_unix => return Err(RedirectError::UnixUnsupported(e)),
            Err(e) => (None, Some(e.to_string())),
        };
        if let Some(why) = unix.as_ref().and_then(|u| u.unguarded.as_ref()) {
            let open = unix::targets_reachable_around(config);
            if !open.is_empty() {
                return Err(RedirectError::UnixOpen(why.clone(), open.join("; ")));
            }
        }

        let mut attached = 0;
        let mut adopted = 0;
        let known: Vec<&str> = workloads.iter().map(|w| w.workload.as_str()).collect();
        remove_stale_links(&pins, &known)?;
        for w in workloads {
            let cg = fs::File::open(&w.dir).map_err(io_err(&w.dir))?;
            for prog in PROGRAMS {
                let pin = pins.link(&w.workload, prog);
                if pin.exists() {
                    match PinnedLink::from_pin(&pin) {
                        Ok(_) => {
                            adopted += 1;
                            continue;
                        }
                        Err(e) => {
                            warn!(pin = %pin.display(), error = %e, "unusable link pin; re-attaching");
                            fs::remove_file(&pin).map_err(io_err(&pin))?;
                        }
                    }
                }
                let link = attach(&mut ebpf, prog, &cg)?;
                link.pin(&pin)
                    .map_err(|e| RedirectError::Pin(pin.clone(), error_chain(&e)))?;
                attached += 1;
            }
            if let Some(u) = &unix {
                if u.attach(&cg, &pins.link(&w.workload, unix::CONNECT_UNIX))? {
                    attached += 1;
                } else {
                    adopted += 1;
                }
            }
            info!(workload = %w.workload, cgroup = %w.rel, cgroup_id = w.id, "workload attached");
        }

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "eBPF log events unavailable");
                None
            }
        };
        Ok((
            Redirect {
                accepted: Mutex::new(accepted),
                targets: Mutex::new(targets),
                config: Mutex::new(cfg_map),
                attached,
                adopted,
                unix_unguarded: unix.as_ref().and_then(|u| u.unguarded.clone()),
                unix_open: Mutex::default(),
                unix,
                unix_missing,
                _own_sock_ops: own_sock_ops,
                _ebpf: ebpf,
            },
            logger,
        ))
    }

    /// Intercepts `config`'s targets on the host's addresses as they are
    /// now (they were `host` at start or at the last call).
    pub fn refresh_targets(&self, config: &Config, host: &[IpAddr]) -> Result<(), RedirectError> {
        let mut trie = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        set_targets(&mut *trie, &target_keys(config, host))
    }

    /// Follows the unix targets' sockets: a server that made its socket
    /// anew has a new inode to guard, and a directory that was missing at
    /// start may now resolve.
    /// Without the guard, a socket that became reachable around the agent
    /// (its directory opened, a second link made) is logged as an error
    /// once, and again when it changes.
    pub fn refresh_unix(&self, config: &Config) -> Result<(), RedirectError> {
        let Some(u) = &self.unix else {
            return Ok(());
        };
        u.set_routes(&unix_routes(config))?;
        u.set_servers(&unix_servers(config))?;
        if u.unguarded.is_some() {
            let open = unix::targets_reachable_around(config);
            let mut last = self.unix_open.lock().unwrap_or_else(|p| p.into_inner());
            if *last != open {
                for why in &open {
                    tracing::error!(
                        "a unix target's socket is reachable around the agent: {why}; \
                         workloads can use it unchecked until that is undone"
                    );
                }
                *last = open;
            }
        }
        Ok(())
    }

    /// Marks the agent as gone (its pid no longer exempt); the links stay, so
    /// intercepted connects keep failing until an agent listens again.
    pub fn stop(&self) {
        let mut map = self.config.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(mut cfg) = map.get(&0, 0) {
            cfg.agent_tgid = 0;
            cfg.agent_cgroup_id = 0;
            let _ = map.set(0, cfg, 0);
        }
    }
}

impl crate::proxy::MetaSource for Redirect {
    fn take(&self, cookie: u64) -> Option<ConnMeta> {
        let mut map = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        let meta = map.get(&cookie, 0).ok()?;
        let _ = map.remove(&cookie);
        Some(meta)
    }
}

/// The agent's own cgroup directory.
fn own_cgroup() -> Result<PathBuf, RedirectError> {
    let mount = cgroup::cgroup2_mount()?;
    let rel =
        cgroup::proc_cgroup(std::process::id()).map_err(io_err(Path::new("/proc/self/cgroup")))?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

fn own_cgroup_id() -> Result<u64, RedirectError> {
    Ok(cgroup::cgroup_id(&own_cgroup()?)?)
}

/// Attaches sock_ops to the agent's own cgroup (beside whatever else runs
/// there: a cgroup link never replaces another), so its accepted sockets
/// take their metadata by cookie. Not pinned: dropping it detaches it.
fn attach_own_sock_ops(ebpf: &mut Ebpf) -> Result<FdLink, RedirectError> {
    let dir = own_cgroup()?;
    let cg = fs::File::open(&dir).map_err(io_err(&dir))?;
    attach(ebpf, program_names::SOCK_OPS, &cg)
}

/// Program `name` of the object.
fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, RedirectError> {
    ebpf.program_mut(name).ok_or(RedirectError::Program(
        name,
        aya::programs::ProgramError::NotLoaded,
    ))
}

/// Attaches the steering program to the agent's network namespace and pins
/// it, or adopts the one an earlier run pinned.
fn steer(ebpf: &mut Ebpf, pins: &Pins) -> Result<(), RedirectError> {
    let pin = pins.steering();
    if pin.exists() {
        match PinnedLink::from_pin(&pin) {
            Ok(_) => return Ok(()),
            Err(e) => {
                warn!(pin = %pin.display(), error = %e, "unusable steering pin; re-attaching");
                fs::remove_file(&pin).map_err(io_err(&pin))?;
            }
        }
    }
    let name = program_names::SK_LOOKUP;
    let perr = |e| RedirectError::Program(name, e);
    let p: &mut SkLookup = program(ebpf, name)?.try_into().map_err(perr)?;
    p.load().map_err(perr)?;
    let netns = Path::new("/proc/self/ns/net");
    let ns = fs::File::open(netns).map_err(io_err(netns))?;
    let id = p.attach(&ns).map_err(perr)?;
    let link: FdLink = p.take_link(id).map_err(perr)?.into();
    link.pin(&pin)
        .map_err(|e| RedirectError::Pin(pin.clone(), error_chain(&e)))?;
    Ok(())
}

/// Where the unix programs send a connect: each target path, as written
/// and as its directory resolves now, to the agent's socket for it.
fn unix_routes(config: &Config) -> Vec<(PathBuf, PathBuf)> {
    let mut routes = Vec::new();
    for t in &config.targets {
        for (i, path) in t.unix.iter().enumerate() {
            let own = t.unix_socket(&config.agent.unix_dir, i);
            routes.push((path.clone(), own.clone()));
            let resolved = path
                .parent()
                .and_then(|d| fs::canonicalize(d).ok())
                .zip(path.file_name())
                .map(|(d, f)| d.join(f));
            if let Some(r) = resolved.filter(|r| r != path && r.as_os_str().len() <= unix::SUN_PATH)
            {
                routes.push((r, own));
            }
        }
    }
    routes
}

/// The target servers' sockets to guard, with their target's index.
fn unix_servers(config: &Config) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    for (i, t) in config.targets.iter().enumerate() {
        out.extend(t.unix.iter().map(|p| (p.clone(), i as u32)));
    }
    out
}

fn ip6_words(o: [u8; 16]) -> [u32; 4] {
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
    })
}

/// The intercepted-destinations map's keys for `config`'s targets on a
/// host with the addresses `host`: each target's own addresses, and for one
/// with a local address, every local address on its port (see
/// [`crate::local`]).
fn target_keys(config: &Config, host: &[IpAddr]) -> Vec<(Key<TargetKey>, u32)> {
    let key = |net: IpAddr, prefix: u8, port: u16| {
        let (addr, prefix) = match net {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 96 + u32::from(prefix)),
            IpAddr::V6(v6) => (v6.octets(), u32::from(prefix)),
        };
        Key::new(
            TARGET_PORT_BITS + prefix,
            TargetKey {
                port: port.to_be_bytes(),
                addr,
            },
        )
    };
    let mut keys = Vec::new();
    for (i, t) in config.targets.iter().enumerate() {
        for a in &t.addresses {
            keys.push((key(a.net, a.prefix, a.port), i as u32));
        }
    }
    // After every explicit address, so those keep their own target.
    for (i, t) in config.targets.iter().enumerate() {
        for a in t.addresses.iter().filter(|a| a.is_local(host)) {
            let local = crate::local::ALWAYS.into_iter().chain(
                host.iter()
                    .map(|h| (*h, if h.is_ipv4() { 32 } else { 128 })),
            );
            for (net, prefix) in local {
                keys.push((key(net, prefix, a.port), i as u32));
            }
        }
    }
    keys
}

/// Brings the intercepted-destinations map to `keys`: adds first, then
/// removes what is no longer wanted, so no wanted destination is ever
/// missing from it, even for a moment.
fn set_targets(
    trie: &mut LpmTrie<impl std::borrow::BorrowMut<MapData>, TargetKey, u32>,
    keys: &[(Key<TargetKey>, u32)],
) -> Result<(), RedirectError> {
    let name = map_names::TARGETS;
    let id = |k: &Key<TargetKey>| (k.prefix_len(), k.data().port, k.data().addr);
    let mut seen = std::collections::HashSet::new();
    for (k, v) in keys {
        // The first of several with one key wins, as in `Config::target_for`.
        if seen.insert(id(k)) {
            trie.insert(k, v, 0)
                .map_err(|e| RedirectError::Map(name, e))?;
        }
    }
    let old: Vec<Key<TargetKey>> = trie.keys().filter_map(Result::ok).collect();
    for k in old.iter().filter(|k| !seen.contains(&id(k))) {
        let _ = trie.remove(k);
    }
    Ok(())
}

/// Attaches cgroup program `name` to `cg`. A cgroup link always runs beside
/// the cgroup's other programs; "Single" only means no legacy multi-attach
/// flag.
fn attach(ebpf: &mut Ebpf, name: &'static str, cg: &fs::File) -> Result<FdLink, RedirectError> {
    let perr = |e| RedirectError::Program(name, e);
    let link = |e: aya::programs::links::LinkError| RedirectError::Pin(name.into(), e.to_string());
    if name == program_names::SOCK_OPS {
        let p: &mut SockOps = program(ebpf, name)?.try_into().map_err(perr)?;
        if p.fd().is_err() {
            p.load().map_err(perr)?;
        }
        let id = p.attach(cg, CgroupAttachMode::Single).map_err(perr)?;
        FdLink::try_from(p.take_link(id).map_err(perr)?).map_err(link)
    } else {
        let p: &mut CgroupSockAddr = program(ebpf, name)?.try_into().map_err(perr)?;
        if p.fd().is_err() {
            p.load().map_err(perr)?;
        }
        let id = p.attach(cg, CgroupAttachMode::Single).map_err(perr)?;
        FdLink::try_from(p.take_link(id).map_err(perr)?).map_err(link)
    }
}

/// Unpins links of workloads that are no longer configured.
fn remove_stale_links(pins: &Pins, known: &[&str]) -> Result<(), RedirectError> {
    let dir = pins.links();
    for e in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let workload = name.rsplit_once('@').map_or(name.as_str(), |(w, _)| w);
        if !known.contains(&workload) {
            warn!(pin = %e.path().display(), "detaching a workload no longer in the config");
            unpin_link(&e.path())?;
        }
    }
    Ok(())
}

fn unpin_link(path: &Path) -> Result<(), RedirectError> {
    match PinnedLink::from_pin(path) {
        Ok(link) => {
            let _detached: FdLink = link.unpin().map_err(io_err(path))?;
            Ok(())
        }
        Err(_) => fs::remove_file(path).map_err(io_err(path)),
    }
}

/// What `detach` removed.
#[derive(Debug, Default)]
pub struct Detached {
    pub links: usize,
    pub maps: usize,
    pub cgroups_removed: bool,
    pub processes_moved: usize,
}

/// Removes every link, map pin and managed cgroup the agent installed.
pub fn detach(config: &Config) -> Result<Detached, RedirectError> {
    let pins = Pins::new(&config.agent.pin_dir);
    let mut out = Detached::default();
    for link in [pins.steering(), pins.unix_guard()] {
        if link.exists() {
            unpin_link(&link)?;
            out.links += 1;
        }
    }
    let links = pins.links();
    if links.is_dir() {
        for e in fs::read_dir(&links).map_err(io_err(&links))?.flatten() {
            unpin_link(&e.path())?;
            out.links += 1;
        }
        fs::remove_dir(&links).map_err(io_err(&links))?;
    }
    if pins.root.is_dir() {
        for e in fs::read_dir(&pins.root)
            .map_err(io_err(&pins.root))?
            .flatten()
        {
            let p = e.path();
            if p.is_dir() && e.file_name().to_string_lossy().starts_with("maps-v") {
                for m in fs::read_dir(&p).map_err(io_err(&p))?.flatten() {
                    fs::remove_file(m.path()).map_err(io_err(&m.path()))?;
                    out.maps += 1;
                }
                fs::remove_dir(&p).map_err(io_err(&p))?;
            }
        }
        fs::remove_dir(&pins.root).map_err(io_err(&pins.root))?;
    }
    let mount = cgroup::cgroup2_mount()?;
    let managed = mount.join(&config.agent.managed_cgroup_parent);
    if managed.is_dir() {
        out.processes_moved = cgroup::remove_managed(&managed, &mount)?;
        out.cgroups_removed = true;
    }
    Ok(out)
}

/// Normalises a socket address to the eBPF key form (IPv4-mapped → IPv4).
pub fn key_parts(addr: SocketAddr) -> ([u32; 4], u16, u32) {
    match crate::config::canonical_ip(addr.ip()) {
        IpAddr::V4(v4) => (
            [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            addr.port(),
            u32::from(AF_INET),
        ),
        IpAddr::V6(v6) => (ip6_words(v6.octets()), addr.port(), u32::from(AF_INET6)),
    }
}

/// The original destination recorded by connect4/6.
pub fn original_dst(meta: &ConnMeta) -> SocketAddr {
    let ip = if meta.orig_family == AF_INET {
        IpAddr::V4(meta.orig_ip[0].to_ne_bytes().into())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in meta.orig_ip.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(o.into())
    };
    SocketAddr::new(ip, meta.orig_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_dst_round_trips() {
        for s in ["10.1.2.3:5432", "[fd00::1]:443"] {
            let addr: SocketAddr = s.parse().unwrap();
            let (ip, port, fam) = key_parts(addr);
            let meta = ConnMeta {
                orig_ip: ip,
                orig_port: port,
                orig_family: fam as u16,
                ..ConnMeta::default()
            };
            assert_eq!(original_dst(&meta), addr);
        }
    }
}
