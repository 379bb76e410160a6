//! Unix sockets: a workload's connect to a target's unix path goes to the
//! agent's own socket for that target, and no other way to that server's
//! socket is left open.
//!
//! Two programs, built here at start from the running kernel's BTF (aya
//! 0.14 can neither attach `cgroup/connect_unix` nor call kfuncs):
//!
//! - `icpt_connect_unix` (`cgroup/connect_unix`, kernel 6.7+, attached to
//!   each workload cgroup like the TCP programs): a stream connect whose
//!   path is in `ICPT_UNIX_TARGETS` is rewritten to the agent's socket for
//!   that target (`bpf_sock_addr_set_sun_path`); a rewrite that fails
//!   refuses the connect. Where the guard runs, every stream connect of a
//!   workload socket is marked in `ICPT_UNIX_FLAGS` by socket cookie.
//! - `icpt_unix_guard` (the BPF LSM hook `unix_stream_connect`, or where
//!   BPF LSM is not enabled, `fmod_ret` on `security_unix_stream_connect`:
//!   the kernel calls either once the path has been resolved to a
//!   listening socket): a marked connect that reached a target server's socket
//!   (`ICPT_UNIX_SERVERS`, by inode) is refused with `EPERM`. So a symlink,
//!   a hard link, a relative path or `/proc/self/root/…` cannot reach the
//!   server around the agent: only the agent's own connects (never marked)
//!   do.
//!
//! Both are pinned like the TCP programs, so while the agent is down the
//! rewritten connects meet its socket with nobody listening
//! (`ECONNREFUSED`) and the guard keeps refusing the other ways.
//!
//! Kernels built without BPF trampolines run neither kind of guard. There
//! the other ways are closed by the file system itself: the agent starts
//! only if each target socket sits in a directory others may not search
//! and has no second link ([`reachable_around`]); it reaches the socket
//! with `CAP_DAC_READ_SEARCH` (see `proxy::unix::connect_as`).

use std::{
    fs, io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use tracing::warn;

use super::sys::{self, Asm, Btf, Cond, ProgSpec, Size, FP, R0, R1, R2, R3, R4, R6, R7, R8, R9};

/// Longest `sun_path`.
pub const SUN_PATH: usize = 108;
/// Key of `ICPT_UNIX_TARGETS`: a path, NUL-padded (room for the kernel's
/// string read to add its NUL after a full 108-byte path).
const PATH_KEY: usize = 112;
/// Value of `ICPT_UNIX_TARGETS`: the agent socket's path length, then the path.
const PATH_VALUE: usize = 4 + SUN_PATH;
/// Key of `ICPT_UNIX_SERVERS`: inode number, kernel device number, padding.
const INODE_KEY: usize = 16;

pub const TARGETS: &str = "ICPT_UNIX_TARGETS";
pub const FLAGS: &str = "ICPT_UNIX_FLAGS";
pub const SERVERS: &str = "ICPT_UNIX_SERVERS";
pub const CONNECT_UNIX: &str = "icpt_connect_unix";
const GUARD: &str = "icpt_unix_guard";

const SOCK_STREAM: i32 = 1;
const EPERM: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum UnixError {
    #[error("{0}")]
    Btf(#[from] sys::BtfError),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> UnixError {
    let what = what.into();
    move |source| UnixError::Sys { what, source }
}

/// The agent's handle on the unix programs and their maps.
pub struct Unix {
    targets: OwnedFd,
    servers: OwnedFd,
    connect: OwnedFd,
    /// Why the guard could not be attached (this kernel runs neither BPF
    /// LSM nor tracing programs); `None` when it is in place.
    pub unguarded: Option<String>,
}

/// A pinned map, or a new one pinned there.
fn pinned_map(
    dir: &Path,
    name: &str,
    kind: u32,
    key: usize,
    value: usize,
    entries: u32,
) -> Result<OwnedFd, UnixError> {
    let pin = dir.join(name);
    if pin.exists() {
        return sys::obj_get(&pin).map_err(sys_err(format!("opening {}", pin.display())));
    }
    let fd = sys::map_create(kind, key as u32, value as u32, entries, name)
        .map_err(sys_err(format!("creating map {name}")))?;
    sys::obj_pin(&fd, &pin).map_err(sys_err(format!("pinning {}", pin.display())))?;
    Ok(fd)
}

/// Offsets the programs read, from the running kernel's BTF.
struct Layout {
    uaddr: i16,
    uaddrlen: i16,
    cookie: i32,
    dentry: i32,
    inode: i32,
    ino: i32,
    sb: i32,
    dev: i32,
    cast_to_kern_ctx: u32,
    set_sun_path: u32,
    /// The BPF LSM hook, if this kernel has BPF LSM built in.
    lsm_hook: Option<u32>,
    security_hook: u32,
}

impl Layout {
    fn read() -> Result<Layout, UnixError> {
        let btf = Btf::from_kernel()?;
        let at = |outer: &str, path: &[&str]| btf.offset(outer, path);
        Ok(Layout {
            uaddr: at("bpf_sock_addr_kern", &["uaddr"])? as i16,
            uaddrlen: at("bpf_sock_addr_kern", &["uaddrlen"])? as i16,
            cookie: at("sock", &["__sk_common", "skc_cookie"])? as i32,
            dentry: at("unix_sock", &["path", "dentry"])? as i32,
            inode: at("dentry", &["d_inode"])? as i32,
            ino: at("inode", &["i_ino"])? as i32,
            sb: at("inode", &["i_sb"])? as i32,
            dev: at("super_block", &["s_dev"])? as i32,
            cast_to_kern_ctx: btf.func("bpf_cast_to_kern_ctx")?,
            set_sun_path: btf.func("bpf_sock_addr_set_sun_path")?,
            lsm_hook: btf.func("bpf_lsm_unix_stream_connect").ok(),
            security_hook: btf.func("security_unix_stream_connect")?,
        })
    }
}

/// `cgroup/connect_unix`: mark the socket in `flags` (only for a guard to
/// read: `None` where none runs), rewrite a target's path.
fn connect_program(l: &Layout, targets: &OwnedFd, flags: Option<&OwnedFd>) -> Vec<u64> {
    const KEY: i16 = -128;
    let mut a = Asm::default();
    a.mov(R6, R1)
        // struct bpf_sock_addr.type
        .load(Size::W, R2, R6, 32)
        .jump_if(Cond::Ne, R2, SOCK_STREAM, "allow");
    if let Some(flags) = flags {
        a.mov(R1, R6)
            .call(sys::GET_SOCKET_COOKIE)
            .store(Size::DW, FP, -8, R0)
            .store_imm(Size::W, FP, -16, 1)
            .map(R1, flags)
            .mov(R2, FP)
            .add_imm(R2, -8)
            .mov(R3, FP)
            .add_imm(R3, -16)
            .mov_imm(R4, 0)
            .call(sys::MAP_UPDATE);
    }
    for i in 0..(PATH_KEY / 8) as i16 {
        a.store_imm(Size::DW, FP, KEY + 8 * i, 0);
    }
    a.mov(R1, R6)
        .kfunc(l.cast_to_kern_ctx)
        .mov(R7, R0)
        .load(Size::DW, R8, R7, l.uaddr)
        .load(Size::W, R9, R7, l.uaddrlen)
        // The path's length: the address less its family.
        .add_imm(R9, -2)
        .jump_if(Cond::Sle, R9, 0, "allow")
        .jump_if(Cond::Gt, R9, SUN_PATH as i32, "allow")
        // Up to the first NUL, at most the length; the rest stays zero.
        .add_imm(R9, 1)
        .mov(R1, FP)
        .add_imm(R1, KEY.into())
        .mov(R2, R9)
        .mov(R3, R8)
        .add_imm(R3, 2)
        .call(sys::PROBE_READ_KERNEL_STR)
        .map(R1, targets)
        .mov(R2, FP)
        .add_imm(R2, KEY.into())
        .call(sys::MAP_LOOKUP)
        .jump_if(Cond::Eq, R0, 0, "allow")
        .load(Size::W, R3, R0, 0)
        .jump_if(Cond::Eq, R3, 0, "refuse")
        .jump_if(Cond::Gt, R3, SUN_PATH as i32, "refuse")
        .mov(R1, R7)
        .mov(R2, R0)
        .add_imm(R2, 4)
        .kfunc(l.set_sun_path)
        .jump_if(Cond::Ne, R0, 0, "refuse")
        .label("allow")
        .mov_imm(R0, 1)
        .exit()
        .label("refuse")
        .mov_imm(R0, 0)
        .exit();
    a.finish()
}

/// `unix_stream_connect(sk, other, newsk)` (LSM hook or `fmod_ret`): a
/// marked socket that reached a target server's socket is refused.
fn guard_program(l: &Layout, flags: &OwnedFd, servers: &OwnedFd) -> Vec<u64> {
    // probe_read_kernel(fp + to, size, r3)
    fn read(a: &mut Asm, to: i16, size: i32) {
        a.mov(R1, FP)
            .add_imm(R1, to.into())
            .mov_imm(R2, size)
            .call(sys::PROBE_READ_KERNEL);
    }
    let mut a = Asm::default();
    a.mov(R6, R1)
        // An earlier program's verdict stands.
        .load(Size::DW, R0, R6, 24)
        .jump_if(Cond::Ne, R0, 0, "out")
        .store_imm(Size::DW, FP, -8, 0)
        .load(Size::DW, R3, R6, 0)
        .add_imm(R3, l.cookie);
    read(&mut a, -8, 8);
    a.load(Size::DW, R0, FP, -8)
        .jump_if(Cond::Eq, R0, 0, "pass")
        .map(R1, flags)
        .mov(R2, FP)
        .add_imm(R2, -8)
        .call(sys::MAP_LOOKUP)
        .jump_if(Cond::Eq, R0, 0, "pass")
        .map(R1, flags)
        .mov(R2, FP)
        .add_imm(R2, -8)
        .call(sys::MAP_DELETE)
        .store_imm(Size::DW, FP, -16, 0)
        .load(Size::DW, R3, R6, 8)
        .add_imm(R3, l.dentry);
    read(&mut a, -16, 8);
    a.load(Size::DW, R3, FP, -16)
        .jump_if(Cond::Eq, R3, 0, "pass")
        .add_imm(R3, l.inode);
    read(&mut a, -16, 8);
    a.load(Size::DW, R7, FP, -16)
        .jump_if(Cond::Eq, R7, 0, "pass")
        .store_imm(Size::DW, FP, -32, 0)
        .store_imm(Size::DW, FP, -24, 0)
        .mov(R3, R7)
        .add_imm(R3, l.ino);
    read(&mut a, -32, 8);
    a.store_imm(Size::DW, FP, -16, 0)
        .mov(R3, R7)
        .add_imm(R3, l.sb);
    read(&mut a, -16, 8);
    a.load(Size::DW, R3, FP, -16)
        .jump_if(Cond::Eq, R3, 0, "pass")
        .add_imm(R3, l.dev);
    read(&mut a, -24, 4);
    a.map(R1, servers)
        .mov(R2, FP)
        .add_imm(R2, -32)
        .call(sys::MAP_LOOKUP)
        .jump_if(Cond::Eq, R0, 0, "pass")
        .mov_imm(R0, -EPERM)
        .label("out")
        .exit()
        .label("pass")
        .mov_imm(R0, 0)
        .exit();
    a.finish()
}

impl Unix {
    /// Loads both programs with the maps pinned in `maps_dir` (created on
    /// first start), and attaches and pins the guard at `guard_pin` unless
    /// an earlier run did. Fails on kernels without `cgroup/connect_unix`.
    pub fn load(maps_dir: &Path, guard_pin: &Path) -> Result<Unix, UnixError> {
        let layout = Layout::read()?;
        let targets = pinned_map(maps_dir, TARGETS, sys::MAP_HASH, PATH_KEY, PATH_VALUE, 1024)?;
        let flags = pinned_map(maps_dir, FLAGS, sys::MAP_LRU_HASH, 8, 4, 65536)?;
        let servers = pinned_map(maps_dir, SERVERS, sys::MAP_HASH, INODE_KEY, 4, 1024)?;
        let mut unguarded = None;
        if !adopt(guard_pin) {
            match guard(&layout, &guard_program(&layout, &flags, &servers)) {
                Ok(link) => sys::obj_pin(&link, guard_pin)
                    .map_err(sys_err(format!("pinning {}", guard_pin.display())))?,
                Err(e) => unguarded = Some(e.to_string()),
            }
        }
        // Marks nobody reads would only fill the map.
        let marks = unguarded.is_none().then_some(&flags);
        let connect = sys::prog_load(
            &ProgSpec {
                kind: sys::PROG_CGROUP_SOCK_ADDR,
                attach: sys::ATTACH_CGROUP_UNIX_CONNECT,
                attach_btf_id: 0,
                name: CONNECT_UNIX,
            },
            &connect_program(&layout, &targets, marks),
        )
        .map_err(sys_err(format!(
            "loading {CONNECT_UNIX} (cgroup/connect_unix needs Linux 6.7+)"
        )))?;
        Ok(Unix {
            targets,
            servers,
            connect,
            unguarded,
        })
    }

    /// Attaches `icpt_connect_unix` to the cgroup `cg` and pins the link at
    /// `pin`, unless an earlier run did: whether it attached.
    pub fn attach(&self, cg: &fs::File, pin: &Path) -> Result<bool, UnixError> {
        if adopt(pin) {
            return Ok(false);
        }
        let link = sys::link_create(
            &self.connect,
            Some(cg.as_raw_fd()),
            sys::ATTACH_CGROUP_UNIX_CONNECT,
        )
        .map_err(sys_err(format!("attaching {CONNECT_UNIX}")))?;
        sys::obj_pin(&link, pin).map_err(sys_err(format!("pinning {}", pin.display())))?;
        Ok(true)
    }

    /// Brings the rewrite map to `routes` (a target path and the agent's
    /// socket for it): adds first, then removes the rest.
    pub fn set_routes(&self, routes: &[(PathBuf, PathBuf)]) -> Result<(), UnixError> {
        let mut wanted = Vec::new();
        for (from, to) in routes {
            let key = padded(from, PATH_KEY);
            let to = to.as_os_str().as_encoded_bytes();
            let mut value = vec![0u8; PATH_VALUE];
            value[..4].copy_from_slice(&(to.len() as u32).to_ne_bytes());
            value[4..4 + to.len()].copy_from_slice(to);
            sys::map_update(&self.targets, &key, &value).map_err(sys_err(TARGETS))?;
            wanted.push(key);
        }
        remove_others(&self.targets, PATH_KEY, &wanted)
    }

    /// Brings the guarded-servers map to the sockets now at `paths` (those
    /// that exist), each with its target's index.
    pub fn set_servers(&self, paths: &[(PathBuf, u32)]) -> Result<(), UnixError> {
        let mut wanted = Vec::new();
        for (path, target) in paths {
            let Ok(meta) = fs::metadata(path) else {
                continue; // no server there now
            };
            let key = inode_key(&meta);
            sys::map_update(&self.servers, &key, &target.to_ne_bytes())
                .map_err(sys_err(SERVERS))?;
            wanted.push(key.to_vec());
        }
        remove_others(&self.servers, INODE_KEY, &wanted)
    }
}

/// Loads and attaches the guard: as a BPF LSM program where BPF LSM is
/// active (`lsm=…,bpf`), else as `fmod_ret` on the security hook.
fn guard(layout: &Layout, code: &[u64]) -> Result<OwnedFd, UnixError> {
    let mut tried = Vec::new();
    let ways = [
        layout
            .lsm_hook
            .map(|id| (sys::PROG_LSM, sys::ATTACH_LSM_MAC, id, "BPF LSM")),
        Some((
            sys::PROG_TRACING,
            sys::ATTACH_MODIFY_RETURN,
            layout.security_hook,
            "fmod_ret",
        )),
    ];
    for (kind, attach, id, how) in ways.into_iter().flatten() {
        let spec = ProgSpec {
            kind,
            attach,
            attach_btf_id: id,
            name: GUARD,
        };
        match sys::prog_load(&spec, code).and_then(|p| sys::link_create(&p, None, attach)) {
            Ok(link) => return Ok(link),
            Err(e) => tried.push(format!("{how}: {e}")),
        }
    }
    Err(UnixError::Sys {
        what: format!("attaching {GUARD}"),
        source: io::Error::other(tried.join("; ")),
    })
}

/// Whether a usable link is pinned at `pin` (an unusable pin is removed).
fn adopt(pin: &Path) -> bool {
    if !pin.exists() {
        return false;
    }
    match sys::obj_get(pin) {
        Ok(_) => true,
        Err(e) => {
            warn!(pin = %pin.display(), error = %e, "unusable link pin; re-attaching");
            let _ = fs::remove_file(pin);
            false
        }
    }
}

fn remove_others(map: &OwnedFd, key_size: usize, wanted: &[Vec<u8>]) -> Result<(), UnixError> {
    for k in sys::map_keys(map, key_size).map_err(sys_err("listing a unix map"))? {
        if !wanted.contains(&k) {
            let _ = sys::map_delete(map, &k);
        }
    }
    Ok(())
}

fn padded(path: &Path, len: usize) -> Vec<u8> {
    let mut key = vec![0u8; len];
    let b = path.as_os_str().as_encoded_bytes();
    key[..b.len()].copy_from_slice(b);
    key
}

/// A socket file's identity as the kernel's `inode` has it: the inode
/// number and the super block's device number (`MKDEV`: major << 20 | minor).
fn inode_key(meta: &fs::Metadata) -> [u8; INODE_KEY] {
    let dev = meta.dev();
    let kdev = (libc::major(dev) << 20) | libc::minor(dev);
    let mut key = [0u8; INODE_KEY];
    key[..8].copy_from_slice(&meta.ino().to_ne_bytes());
    key[8..12].copy_from_slice(&kdev.to_ne_bytes());
    key
}

/// Why workload users could reach the sockets of `config`'s unix targets
/// around the agent, one reason per socket (see [`reachable_around`]).
pub fn targets_reachable_around(config: &crate::config::Config) -> Vec<String> {
    config
        .targets
        .iter()
        .flat_map(|t| &t.unix)
        .filter_map(|p| reachable_around(p))
        .collect()
}

/// Why a workload user could reach the socket at `path` by a way of its own
/// (a symlink, a hard link, a relative path, `/proc/<pid>/root/…`) when no
/// guard runs: no directory on the way denies others the search, or the
/// socket has another link. `None`: only its owners, the owners' groups
/// and root can, and only through this path.
pub fn reachable_around(path: &Path) -> Option<String> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        // No server now: nothing to reach; checked again each second.
        Err(_) => return None,
    };
    if meta.nlink() > 1 {
        return Some(format!(
            "{} has {} links: another name reaches the same socket",
            path.display(),
            meta.nlink()
        ));
    }
    let closed = path
        .ancestors()
        .skip(1)
        .any(|d| fs::metadata(d).is_ok_and(|m| m.is_dir() && m.mode() & 0o001 == 0));
    if closed {
        None
    } else {
        Some(format!(
            "every directory above {} lets others search it",
            path.display()
        ))
    }
}
