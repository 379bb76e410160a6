//! `interceptor run`: puts the pieces together in the order a connection
//! meets them, and takes them down in reverse.
//!
//! Threads: the main thread runs a small runtime for accepting, signals and
//! eBPF log events; the data plane is one single-threaded runtime per CPU;
//! the recorder writer and the control API each have their own thread.

use std::{path::Path, sync::Arc};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{error, info};

use crate::{
    api, cgroup,
    config::Config,
    identity::Resolver,
    policy::Policy,
    proxy::{self, Proxy},
    record::{Record, Recorder, SessionIds, SledStore, Store},
    redirect::Redirect,
};

pub fn run(config_path: &Path, data_dir: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let policy = Policy::load(&config)?;
    let data_dir = config.data_dir(data_dir);
    info!(
        config = %serde_json::to_string(&config).unwrap_or_default(),
        rules = policy.rules.len(),
        grammar = crate::sql::GRAMMAR,
        "configuration loaded"
    );
    for w in &policy.warnings {
        tracing::warn!("policy: {w}");
    }
    if let Some(resp) = api::call(&data_dir, &api::Request::Status)? {
        anyhow::bail!(
            "another agent already serves {} ({resp:?}); stop it first",
            data_dir.display()
        );
    }
    own_data_dir(&data_dir)?;
    let ca = match config.agent.tls.mode {
        crate::config::Termination::Off => None,
        crate::config::Termination::Terminate => Some(Arc::new(
            crate::tls::ca::load(&data_dir)
                .context("agent.tls.mode = \"terminate\" needs the node CA")?,
        )),
    };
    let store = Arc::new(crate::evidence::open(&data_dir, config_path)?);
    store.put_batch(&[Record::Agent(policy.load_event("start"))])?;
    let orphans = store.close_orphans()?;
    if orphans > 0 {
        info!(
            sessions = orphans,
            "marked sessions left open by a previous agent as interrupted"
        );
    }
    let workloads = cgroup::resolve(&config, true)?;
    raise_fd_limit();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the control runtime")?;
    // Listen before attaching, so a redirected connect always finds us.
    let listeners = rt.block_on(proxy::bind())?;
    let listening: Vec<_> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let unix_listeners = rt.block_on(async { proxy::unix::bind(&config) })?;
    let host = crate::local::HostAddrs::read().context("reading the host's addresses")?;
    let (redirect, logger) = Redirect::start(&config, &workloads, &listeners, &host.get())?;
    let redirect = Arc::new(redirect);
    let names: Vec<&str> = workloads.iter().map(|w| w.workload.as_str()).collect();
    store.put_batch(&[Record::Agent(serde_json::json!({
        "event": "attach",
        "workloads": names,
        "attached": redirect.attached,
        "adopted": redirect.adopted,
    }))])?;
    info!(
        attached = redirect.attached,
        adopted = redirect.adopted,
        workloads = workloads.len(),
        port = config.agent.proxy_port,
        "eBPF programs in place"
    );
    let unix_paths: usize = config.targets.iter().map(|t| t.unix.len()).sum();
    match (&redirect.unix_missing, &redirect.unix_unguarded) {
        (None, None) => info!(
            unix_paths,
            dir = %config.agent.unix_dir.display(),
            "unix sockets: workloads' connects to targets' unix paths go through the agent, \
             and the kernel guard refuses every other way to those sockets"
        ),
        (None, Some(why)) => info!(
            unix_paths,
            dir = %config.agent.unix_dir.display(),
            "unix sockets: workloads' connects to targets' unix paths go through the agent; \
             no kernel guard here ({why}): other ways to those sockets are closed by their \
             directories' permissions, checked every second"
        ),
        (Some(why), _) => tracing::warn!(
            "unix sockets are not intercepted on this kernel ({why}): a workload reaches a \
             local server over its unix socket unseen; make such sockets unreachable to \
             workload users (docs/threat-model.md)"
        ),
    }

    let store_dyn: Arc<dyn Store> = store.clone();
    let (recorder, writer) = Recorder::start(store_dyn.clone());
    store.set_segment_bytes(config.store.segment_bytes);
    let service = approvals(&config, &data_dir, store.clone())?;
    let requesters = Arc::new(crate::approvals::Requesters::default());
    let sinks = crate::sinks::Sinks::start(
        store.clone(),
        &config.export.sinks,
        &crate::evidence::origin(),
    )
    .context("starting the export sinks")?;
    start_retention(store.clone(), &config);
    api::serve(
        &api::socket_path(&data_dir),
        store_dyn,
        config_path.display().to_string(),
        api::Served {
            service: service.clone(),
            requesters: requesters.clone(),
            sinks: sinks.states.clone(),
        },
    )?;

    let config = Arc::new(config);
    let proxy = Arc::new(Proxy {
        identity: Arc::new(
            Resolver::new(&config, &workloads).context("starting the executable hasher")?,
        ),
        config: config.clone(),
        policy: Arc::new(ArcSwap::from_pointee(policy)),
        meta: redirect.clone(),
        recorder,
        ids: Arc::new(SessionIds::default()),
        masker: Arc::new(masker(&config)?),
        listening,
        host: host.clone(),
        approvals: service.as_ref().map(|s| s.broker.clone()),
        requesters,
        ca,
    });
    let policy = proxy.policy.clone();
    let recorder = proxy.recorder.clone();
    let threads = config.agent.worker_threads();
    let workers = Arc::new(
        proxy
            .start_workers(threads)
            .context("starting the data plane")?,
    );
    drop(proxy);
    let (stop_tx, stop_rx) = watch::channel(false);
    let socket = api::socket_path(&data_dir);
    rt.block_on(async {
        if let Some(logger) = logger {
            tokio::spawn(forward_ebpf_logs(logger));
        }
        let accepting = tokio::spawn(Proxy::accept(
            listeners,
            unix_listeners,
            workers.clone(),
            stop_rx,
        ));
        tokio::spawn(follow_host_addresses(
            config.clone(),
            host,
            redirect.clone(),
        ));
        info!(data_dir = %data_dir.display(), threads, "agent ready");
        serve_signals(&config, &policy, &recorder).await;
        info!("shutting down: intercepted connects fail until an agent runs again");
        let _ = stop_tx.send(true);
        let _ = accepting.await;
    });
    redirect.stop();
    drop(rt);
    // Stopping the workers ends open sessions; their records were written as
    // open and are marked interrupted below once the writer has drained.
    match Arc::try_unwrap(workers) {
        Ok(w) => w.stop(),
        Err(_) => error!("data-plane workers still referenced at shutdown"),
    }
    drop(recorder);
    writer.join();
    if let Some(s) = &service {
        s.broker.stop();
    }
    let orphans = store.close_orphans()?;
    crate::evidence::stop(&store, orphans)?;
    // The sinks send the last entries (the stop) while their receivers
    // answer, for a moment; what they do not is sent after the next start.
    let end = store.found_head()?.next;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < deadline
        && sinks.status().iter().any(|s| s.up && s.sent < end)
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    sinks.stop();
    info!(interrupted = orphans, "agent stopped");
    let _ = std::fs::remove_file(socket);
    Ok(())
}

/// Just-in-time approval, if `[approvals]` is configured: the broker over
/// the store (pending requests and grants taken up again), the token
/// verifier, the HTTPS API if it listens, and the webhooks.
fn approvals(
    config: &Config,
    data_dir: &Path,
    store: Arc<SledStore>,
) -> anyhow::Result<Option<Arc<crate::approvals::service::Service>>> {
    use crate::approvals::{notify::Notifier, oidc::Verifier, service::Service, Broker};
    let Some(cfg) = &config.approvals else {
        return Ok(None);
    };
    let key = secret_file(&data_dir.join("approvals.key"))?;
    let tell: Option<crate::approvals::Tell> = Notifier::start(&cfg.webhooks)
        .map(|n| Box::new(move |r: &crate::record::Request, what: &str| n.tell(r, what)) as Box<_>);
    let broker = Broker::open(store, &key, tell).context("reading approval requests")?;
    let service = Arc::new(Service {
        broker,
        verifier: Verifier::new(cfg),
    });
    if let Some(listen) = cfg.listen {
        let (cert, key) = (
            cfg.cert_file.as_ref().expect("checked at load"),
            cfg.key_file.as_ref().expect("checked at load"),
        );
        let tls = crate::approvals::https::tls_config(cert, key)?;
        crate::approvals::https::serve(listen, tls, service.clone())?;
    }
    Ok(Some(service))
}

/// Runs the store's retention now and every [`crate::evidence::RETENTION_EVERY`],
/// on a thread of its own, if `[store]` asks for any.
fn start_retention(store: Arc<SledStore>, config: &Config) {
    let cfg = config.store.clone();
    if cfg.retain_s.is_none() && cfg.max_bytes.is_none() {
        return;
    }
    let sinks: Vec<String> = config.export.sinks.iter().map(|s| s.name.clone()).collect();
    let spawned = std::thread::Builder::new()
        .name("retention".into())
        .spawn(move || loop {
            if let Err(e) = crate::evidence::retention(&store, &cfg, &sinks) {
                error!(error = %e, "pruning the log failed");
            }
            std::thread::sleep(crate::evidence::RETENTION_EVERY);
        });
    if let Err(e) = spawned {
        error!(error = %e, "cannot start the store's retention");
    }
}

/// The 32 random bytes in `path`, made (mode 0600) if it is not there.
fn secret_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read(path) {
        Ok(k) if k.len() == 32 => return Ok(k),
        Ok(_) => anyhow::bail!("{} is not a 32-byte key; remove it to make a new one (pending approval requests then no longer match)", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut key = vec![0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, &key)?;
    f.sync_all()?;
    Ok(key)
}

/// Creates the data directory (0700), or checks one that exists: it must be
/// a directory of the agent's own user, not a symlink; one whose mode lets
/// others in is narrowed to 0700, and the log says so. Session records are
/// evidence: a directory another user owns could hold whatever they put there.
fn own_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating data directory {}", dir.display()));
        }
        Err(e) => return Err(e).with_context(|| format!("data directory {}", dir.display())),
        Ok(meta) => {
            let me = nix::unistd::geteuid().as_raw();
            anyhow::ensure!(
                meta.is_dir(),
                "data directory {} is not a directory (a symlink or file is refused); remove it or choose another agent.data_dir",
                dir.display()
            );
            anyhow::ensure!(
                meta.uid() == me,
                "refusing data directory {}: it belongs to uid {}, not to the agent's user (uid {me}), so another user may have put files in it; remove it and let the agent create it, or check its contents and `chown -R {me} {}`",
                dir.display(),
                meta.uid(),
                dir.display()
            );
            let mode = meta.mode() & 0o7777;
            if mode & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("restricting data directory {}", dir.display()))?;
                tracing::warn!(
                    data_dir = %dir.display(),
                    "data directory had mode {mode:o}; narrowed to 700 (records are evidence: root only)"
                );
            }
        }
    }
    Ok(())
}

/// The masking key: from `agent.mask_key_file` when set (stable hashes),
/// otherwise random for this run.
fn masker(config: &Config) -> anyhow::Result<crate::mask::Masker> {
    match &config.agent.mask_key_file {
        Some(path) => {
            let secret = std::fs::read(path)
                .with_context(|| format!("reading agent.mask_key_file {}", path.display()))?;
            anyhow::ensure!(
                secret.len() >= 16,
                "{} holds fewer than 16 bytes",
                path.display()
            );
            Ok(crate::mask::Masker::new(&secret))
        }
        None => Ok(crate::mask::Masker::random().context("reading /dev/urandom")?),
    }
}

/// Each proxied connection holds two sockets: lift the soft descriptor limit
/// to the hard one so thousands of concurrent connections fit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, "cannot raise the open-file limit");
            }
        }
    }
}

/// Waits for SIGTERM or SIGINT; on SIGHUP reloads the policy files in
/// place (connections keep flowing; a broken file keeps the old policy).
async fn serve_signals(config: &Config, policy: &ArcSwap<Policy>, recorder: &Recorder) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(h)) => (t, h),
        (Err(e), _) | (_, Err(e)) => {
            error!(error = %e, "cannot watch signals; stop the agent with SIGKILL");
            return std::future::pending().await;
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = tokio::signal::ctrl_c() => return,
            _ = hup.recv() => match Policy::load(config) {
                Ok(p) => {
                    info!(rules = p.rules.len(), "policy reloaded");
                    recorder.agent(p.load_event("reload")).await;
                    policy.store(Arc::new(p));
                }
                Err(e) => {
                    error!(error = %e, "policy reload failed; keeping the current policy");
                    recorder
                        .agent(serde_json::json!({"event": "policy", "reason": "reload refused", "error": e.to_string()}))
                        .await;
                }
            },
        }
    }
}

/// Keeps the interception of local targets on every address of the host
/// as interfaces gain and lose addresses, and the guard of unix targets on
/// their servers' sockets as servers make them anew.
async fn follow_host_addresses(
    config: Arc<Config>,
    host: Arc<crate::local::HostAddrs>,
    redirect: Arc<Redirect>,
) {
    let mut every = tokio::time::interval(crate::local::REFRESH);
    loop {
        every.tick().await;
        if let Err(e) = redirect.refresh_unix(&config) {
            error!(error = %e, "cannot follow the unix targets' sockets");
        }
        match host.refresh() {
            Ok(false) => {}
            Ok(true) => {
                let now = host.get();
                match redirect.refresh_targets(&config, &now) {
                    Ok(()) => {
                        info!(addresses = ?now, "host addresses changed; local targets follow")
                    }
                    Err(e) => error!(error = %e, "cannot follow the host's addresses"),
                }
            }
            Err(e) => error!(error = %e, "cannot read the host's addresses"),
        }
    }
}

/// Forwards the eBPF programs' aya-log events into our tracing output.
async fn forward_ebpf_logs(logger: crate::redirect::EbpfLogs) {
    // SAFETY: the logger owns its ring buffer fd for as long as it lives, and
    // as_raw_fd() always returns that same fd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => return error!(error = %e, "cannot poll eBPF log events"),
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => return error!(error = %e, "eBPF log events stopped"),
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
