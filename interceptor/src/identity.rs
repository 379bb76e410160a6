//! Workload identity: which workload made a connection, and the evidence.
//!
//! The kernel-captured cgroup id is the primary key: it names the workload
//! even when the process is gone. Live process facts (executable and its
//! hash, start time, systemd unit) are added only when `/proc/<tgid>` still
//! belongs to the same process: started before the connect, in the same
//! cgroup. `comm` is recorded, never trusted.

use std::{
    collections::HashMap,
    fs,
    path::PathBuf,
    sync::{Mutex, RwLock},
};

use interceptor_ebpf::ConnMeta;

use crate::{cgroup, cgroup::Resolved, config::Config};

pub mod hasher;

pub use interceptor_record::{hex, hex32, Evidence};

/// A resolved identity: the workload (if any) and its SPIFFE id.
#[derive(Debug, Clone)]
pub struct Identity {
    pub workload: Option<String>,
    pub spiffe_id: Option<String>,
    pub evidence: Evidence,
}

struct WorkloadCg {
    name: String,
    spiffe_id: String,
    dir: PathBuf,
    rel: String,
    id: u64,
}

/// Resolves [`ConnMeta`] to an [`Identity`]; caches cgroup ids, executable
/// hashes and user names.
pub struct Resolver {
    workloads: Vec<WorkloadCg>,
    /// cgroup id → (workload index, cgroup path) for sub-cgroups found so far.
    sub_cgroups: RwLock<HashMap<u64, (usize, String)>>,
    hasher: hasher::Hasher,
    users: Mutex<HashMap<u32, Option<String>>>,
    ticks_per_s: u64,
}

impl Resolver {
    pub fn new(config: &Config, resolved: &[Resolved]) -> std::io::Result<Self> {
        let workloads = resolved
            .iter()
            .map(|r| WorkloadCg {
                name: r.workload.clone(),
                spiffe_id: config
                    .workload(&r.workload)
                    .map(|w| w.spiffe_id.clone())
                    .unwrap_or_default(),
                dir: r.dir.clone(),
                rel: r.rel.clone(),
                id: r.id,
            })
            .collect();
        Ok(Resolver {
            workloads,
            sub_cgroups: RwLock::default(),
            hasher: hasher::Hasher::start()?,
            users: Mutex::default(),
            // SAFETY: sysconf has no memory-safety preconditions.
            ticks_per_s: match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
                n if n > 0 => n as u64,
                _ => 100,
            },
        })
    }

    /// Which workload owns cgroup `id`, and the cgroup's path.
    fn workload_of(&self, id: u64) -> Option<(usize, String)> {
        if let Some(i) = self.workloads.iter().position(|w| w.id == id) {
            return Some((i, self.workloads[i].rel.clone()));
        }
        if let Some(hit) = self.sub_cgroups.read().ok()?.get(&id) {
            return Some(hit.clone());
        }
        for (i, w) in self.workloads.iter().enumerate() {
            if let Some(dir) = cgroup::find_by_id(&w.dir, id, 8) {
                let rel = format!("{}/{}", w.rel, dir.strip_prefix(&w.dir).ok()?.display());
                self.sub_cgroups.write().ok()?.insert(id, (i, rel.clone()));
                return Some((i, rel));
            }
        }
        None
    }

    /// Attributes a connection: reads /proc, and waits for the hash of the
    /// caller's executable at most [`hasher::DEADLINE`] (cached; made off
    /// the data path, never behind another executable's).
    pub async fn resolve(&self, meta: &ConnMeta) -> Identity {
        let (mut id, hash) = self.resolve_now(meta);
        if let Some(slot) = hash {
            id.evidence.exe_sha256 = hasher::wait(slot).await;
        }
        id
    }

    /// What can be known at once, and the executable's hash to wait for.
    fn resolve_now(&self, meta: &ConnMeta) -> (Identity, Option<hasher::Slot>) {
        let comm_len = meta
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(meta.comm.len());
        let mut ev = Evidence {
            pid: meta.tgid,
            tid: meta.tid,
            uid: meta.uid,
            gid: meta.gid,
            cgroup_id: meta.cgroup_id,
            comm: String::from_utf8_lossy(&meta.comm[..comm_len]).into_owned(),
            netns_cookie: meta.netns_cookie,
            attribution: "kernel".into(),
            ..Evidence::default()
        };
        ev.user = self.user_name(meta.uid);
        let owner = self.workload_of(meta.cgroup_id);
        if let Some((_, rel)) = &owner {
            ev.cgroup = Some(rel.clone());
            ev.systemd_unit = systemd_unit(rel);
        }
        let mut hash = None;
        if let Some(p) = self.live_process(meta, owner.as_ref().map(|(_, r)| r.as_str())) {
            ev.process_start = Some(p.start);
            ev.exe = p.exe;
            hash = p.exe_hash;
            ev.attribution = "process".into();
        }
        let (workload, spiffe_id) = match owner {
            Some((i, _)) => (
                Some(self.workloads[i].name.clone()),
                Some(self.workloads[i].spiffe_id.clone()),
            ),
            None => (None, None),
        };
        (
            Identity {
                workload,
                spiffe_id,
                evidence: ev,
            },
            hash,
        )
    }

    fn live_process(&self, meta: &ConnMeta, cgroup_rel: Option<&str>) -> Option<LiveProcess> {
        let pid = meta.tgid;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised comm; starttime is field 22 overall.
        let after = &stat[stat.rfind(')')? + 2..];
        let start_ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
        let start_ns = start_ticks.saturating_mul(1_000_000_000) / self.ticks_per_s;
        // A process started after the connect is a reused pid.
        if start_ns
            > meta
                .ktime_ns
                .saturating_add(1_000_000_000 / self.ticks_per_s)
        {
            return None;
        }
        let now_cg = cgroup::proc_cgroup(pid).ok()?;
        match cgroup_rel {
            Some(rel) if now_cg == rel || now_cg.starts_with(&format!("{rel}/")) => {}
            _ => return None,
        }
        let exe_path = format!("/proc/{pid}/exe");
        let exe = fs::read_link(&exe_path)
            .ok()
            .map(|p| p.display().to_string());
        let exe_hash = fs::File::open(&exe_path)
            .ok()
            .and_then(|f| self.hasher.hash(f));
        Some(LiveProcess {
            start: crate::record::rfc3339_micros(boot_wall_micros() + start_ns / 1000),
            exe,
            exe_hash,
        })
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        let mut users = self.users.lock().ok()?;
        users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }
}

struct LiveProcess {
    start: String,
    exe: Option<String>,
    exe_hash: Option<hasher::Slot>,
}

/// The innermost systemd unit (`.service` or `.scope`) in a cgroup path.
pub fn systemd_unit(cgroup_rel: &str) -> Option<String> {
    cgroup_rel
        .rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

/// Wall-clock time of boot in microseconds: now minus CLOCK_BOOTTIME.
fn boot_wall_micros() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    let us = |c| {
        clock_gettime(c).map_or(0, |t| {
            t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
        })
    };
    us(ClockId::CLOCK_REALTIME).saturating_sub(us(ClockId::CLOCK_BOOTTIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_come_from_the_innermost_component() {
        assert_eq!(
            systemd_unit("/system.slice/billing.service/worker").as_deref(),
            Some("billing.service")
        );
        assert_eq!(systemd_unit("/interceptor/billing"), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hashes_the_running_executable() {
        let cfg = Config::parse(
            std::path::Path::new("c.toml"),
            "[agent]\ntrust_domain = \"t\"\n",
        )
        .unwrap();
        let r = Resolver::new(&cfg, &[]).unwrap();
        let mut slot = r
            .hasher
            .hash(fs::File::open("/proc/self/exe").unwrap())
            .unwrap();
        // This test binary is large: no deadline here.
        let me = slot
            .wait_for(Option::is_some)
            .await
            .unwrap()
            .clone()
            .flatten()
            .unwrap();
        use sha2::Digest;
        let whole = sha2::Sha256::digest(fs::read(std::env::current_exe().unwrap()).unwrap());
        assert_eq!(me, hex(&whole));
    }
}
