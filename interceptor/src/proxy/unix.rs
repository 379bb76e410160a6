//! The agent's unix sockets: one per unix path of a target, in
//! `agent.unix_dir`, where the unix programs send workloads' connects (see
//! [`crate::redirect::unix`]); who connected; and the upstream connect made
//! as them.

use std::{
    fs, io,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use interceptor_ebpf::ConnMeta;

use crate::config::Config;

/// The agent's socket for unix path `path` of target `target`.
pub struct Listener {
    pub listener: tokio::net::UnixListener,
    pub target: usize,
    pub path: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("refusing agent.unix_dir {0}: {1}")]
    Unsafe(PathBuf, String),
}

/// Binds the agent's socket of every unix path of every target, in
/// `agent.unix_dir` (made 0755 if missing). The directory and each of its
/// parents must be root's and closed to others' writes (or sticky): the
/// sockets are where workloads' connects go, so nobody else may put one
/// there. Each socket is 0666: the unix programs send every workload
/// user's connects to it, and the agent checks the server socket's
/// permissions itself, as the caller ([`connect_as`]).
pub fn bind(config: &Config) -> Result<Vec<Listener>, BindError> {
    let mut out = Vec::new();
    if config.targets.iter().all(|t| t.unix.is_empty()) {
        return Ok(out);
    }
    let dir = &config.agent.unix_dir;
    own_dir(dir)?;
    for (ti, t) in config.targets.iter().enumerate() {
        for pi in 0..t.unix.len() {
            let path = t.unix_socket(dir, pi);
            let io = |e| BindError::Io(path.clone(), e);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
            let listener = tokio::net::UnixListener::bind(&path).map_err(io)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).map_err(io)?;
            out.push(Listener {
                listener,
                target: ti,
                path: pi,
            });
        }
    }
    Ok(out)
}

fn own_dir(dir: &Path) -> Result<(), BindError> {
    let unsafe_ = |why: String| BindError::Unsafe(dir.to_path_buf(), why);
    if !dir.is_absolute() {
        return Err(unsafe_("not an absolute path".into()));
    }
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| BindError::Io(dir.to_path_buf(), e))?;
    }
    let me = nix::unistd::geteuid().as_raw();
    for d in dir.ancestors() {
        let meta = fs::symlink_metadata(d).map_err(|e| BindError::Io(d.to_path_buf(), e))?;
        let mode = meta.mode();
        if !meta.is_dir() {
            return Err(unsafe_(format!(
                "{} is not a directory (a symlink is refused)",
                d.display()
            )));
        }
        if meta.uid() != me {
            return Err(unsafe_(format!(
                "{} belongs to uid {}, not to the agent's user",
                d.display(),
                meta.uid()
            )));
        }
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(unsafe_(format!(
                "others may write to {} (mode {:o}): they could put a socket where workloads' connects go",
                d.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// `SO_PEERPIDFD` (Linux 6.5), not yet in every libc.
const SO_PEERPIDFD: libc::c_int = 77;

/// Who is at the other end of an accepted unix connection, as the kernel
/// recorded it at connect time, with a pidfd that keeps their pid from
/// naming another process unnoticed.
pub struct Peer {
    pub pid: u32,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    pidfd: OwnedFd,
}

/// The user and groups an upstream connect is made as.
#[derive(Debug, Clone)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Peer {
    pub fn of(s: &impl AsFd) -> io::Result<Peer> {
        let fd = s.as_fd();
        let cred = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)?;
        let mut pidfd: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt(2) into a c_int whose size it is told.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERPIDFD,
                (&mut pidfd as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 || pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just gave us this new descriptor.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        Ok(Peer {
            pid: cred.pid() as u32,
            uid: cred.uid(),
            gid: cred.gid(),
            groups: peer_groups(fd.as_raw_fd())?,
            pidfd,
        })
    }

    /// Whether the process is still the one that connected (so what was
    /// read of it under its pid is its own).
    pub fn alive(&self) -> bool {
        // SAFETY: pidfd_send_signal(2) with signal 0 only checks.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        r == 0
    }

    /// What the identity resolver needs, as the TCP programs would have
    /// filed it: the process, its user, its cgroup and name now.
    pub fn meta(&self) -> ConnMeta {
        // The mount does not move while the agent runs: read once.
        static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
        let mount = MOUNT.get_or_init(|| crate::cgroup::cgroup2_mount().ok());
        let cgroup_id = mount
            .as_deref()
            .zip(crate::cgroup::proc_cgroup(self.pid).ok())
            .and_then(|(mount, rel)| {
                crate::cgroup::cgroup_id(&mount.join(rel.trim_start_matches('/'))).ok()
            })
            .unwrap_or(0);
        let mut comm = [0u8; 16];
        if let Ok(name) = fs::read(format!("/proc/{}/comm", self.pid)) {
            let name = name.strip_suffix(b"\n").unwrap_or(&name);
            let n = name.len().min(15);
            comm[..n].copy_from_slice(&name[..n]);
        }
        ConnMeta {
            tgid: self.pid,
            tid: self.pid,
            uid: self.uid,
            gid: self.gid,
            cgroup_id,
            comm,
            ktime_ns: boot_ns(),
            ..ConnMeta::default()
        }
    }

    pub fn creds(&self) -> Creds {
        Creds {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }
}

/// `SO_PEERGROUPS`: the peer's supplementary groups at connect time.
fn peer_groups(fd: libc::c_int) -> io::Result<Vec<u32>> {
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * 4) as libc::socklen_t;
        // SAFETY: getsockopt(2) into a u32 buffer whose byte size it is told.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            groups.truncate(len as usize / 4);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && groups.len() < 65536 {
            groups.resize(len as usize / 4 + 1, 0);
            continue;
        }
        return Err(e);
    }
}

/// Nanoseconds since boot (the clock of the TCP programs' `ktime_ns`).
fn boot_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(u64::MAX)
}

/// Connects to the server's socket at `path` as `who` (their user and
/// groups, on a thread of its own for the duration of the connect), so the
/// socket's own permissions are checked for them and the server's peer
/// credentials name them, as if they had connected directly. Directories
/// on the way are searched with `CAP_DAC_READ_SEARCH`: one closed to
/// workload users is what keeps them from reaching the socket around the
/// agent on kernels without the guard (see `redirect::unix`). A waiting
/// connect gives up after `timeout`.
pub async fn connect_as(
    path: PathBuf,
    who: Creds,
    timeout: Duration,
) -> io::Result<tokio::net::UnixStream> {
    let std = tokio::task::spawn_blocking(move || connect_blocking(&path, &who, timeout))
        .await
        .map_err(io::Error::other)??;
    std.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(std)
}

fn connect_blocking(
    path: &Path,
    who: &Creds,
    timeout: Duration,
) -> io::Result<std::os::unix::net::UnixStream> {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    let connect = || -> io::Result<std::os::unix::net::UnixStream> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
        socket::setsockopt(&fd, sockopt::SendTimeout, &tv)?;
        socket::connect(fd.as_raw_fd(), &addr)?;
        socket::setsockopt(
            &fd,
            sockopt::SendTimeout,
            &nix::sys::time::TimeVal::new(0, 0),
        )?;
        Ok(fd.into())
    };
    if who.uid == 0 {
        return connect();
    }
    let _as = ThreadCreds::become_(who)?;
    connect()
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_DAC_READ_SEARCH: u32 = 2;

/// This thread's effective user and groups switched to another's, with
/// `CAP_DAC_READ_SEARCH` alone effective, until dropped. Raw system calls: the C library's wrappers would change every
/// thread of the agent.
struct ThreadCreds {
    groups: Vec<libc::gid_t>,
}

impl ThreadCreds {
    fn become_(who: &Creds) -> io::Result<ThreadCreds> {
        // SAFETY: getgroups(2) with size 0 only counts.
        let count = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        if count < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut groups = vec![0 as libc::gid_t; count as usize];
        // SAFETY: getgroups(2) into a buffer of the size it is told.
        let n = unsafe { libc::getgroups(count, groups.as_mut_ptr()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        groups.truncate(n as usize);
        let saved = ThreadCreds { groups };
        // From here on, dropping `saved` restores whatever was changed.
        // SAFETY: raw set*id(2) calls with values and a buffer that live
        // across each call; they change only this thread.
        unsafe {
            check(libc::syscall(
                libc::SYS_setgroups,
                who.groups.len(),
                who.groups.as_ptr(),
            ))?;
            check(libc::syscall(libc::SYS_setresgid, -1i32, who.gid, -1i32))?;
            check(libc::syscall(libc::SYS_setresuid, -1i32, who.uid, -1i32))?;
            // Leaving uid 0 emptied the effective capabilities; the
            // permitted ones are kept (the real and saved ids are root's).
            let mut header = [LINUX_CAPABILITY_VERSION_3, 0];
            let mut data = [0u32; 6];
            check(libc::syscall(
                libc::SYS_capget,
                header.as_mut_ptr(),
                data.as_mut_ptr(),
            ))?;
            data[0] = 1 << CAP_DAC_READ_SEARCH;
            data[3] = 0;
            check(libc::syscall(
                libc::SYS_capset,
                header.as_mut_ptr(),
                data.as_ptr(),
            ))?;
        }
        Ok(saved)
    }
}

impl Drop for ThreadCreds {
    fn drop(&mut self) {
        // SAFETY: as in `become_`; the saved user id is still root's, so
        // each call is allowed.
        let restored = unsafe {
            check(libc::syscall(libc::SYS_setresuid, -1i32, 0, -1i32))
                .and_then(|_| check(libc::syscall(libc::SYS_setresgid, -1i32, 0, -1i32)))
                .and_then(|_| {
                    check(libc::syscall(
                        libc::SYS_setgroups,
                        self.groups.len(),
                        self.groups.as_ptr(),
                    ))
                })
        };
        if let Err(e) = restored {
            // A thread of the agent must never go on as a workload's user.
            tracing::error!(error = %e, "cannot restore the agent's credentials; aborting");
            std::process::abort();
        }
    }
}

fn check(r: libc::c_long) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn effective_caps() -> String {
        let status = fs::read_to_string("/proc/thread-self/status").unwrap();
        status
            .lines()
            .find(|l| l.starts_with("CapEff:"))
            .unwrap()
            .to_owned()
    }

    /// A connect made as another user is checked as theirs (the socket's
    /// own mode), through a directory they may not search, and the server
    /// sees them as its peer; the thread is root again afterwards.
    #[test]
    fn connects_as_the_caller() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test needs root (it switches a thread's user)");
        }
        let dir = std::env::temp_dir().join(format!("icpt-unix-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let open = dir.join("open.sock");
        let closed = dir.join("closed.sock");
        let _ = fs::remove_file(&open);
        let _ = fs::remove_file(&closed);
        let l_open = std::os::unix::net::UnixListener::bind(&open).unwrap();
        let _l_closed = std::os::unix::net::UnixListener::bind(&closed).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o666)).unwrap();
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o600)).unwrap();
        let caps_before = effective_caps();
        let nobody = Creds {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let t = Duration::from_secs(2);
        let e = connect_blocking(&closed, &nobody, t).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        let _c = connect_blocking(&open, &nobody, t).unwrap();
        let (s, _) = l_open.accept().unwrap();
        let cred =
            nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).unwrap();
        assert_eq!((cred.uid(), cred.gid()), (65534, 65534));
        assert!(nix::unistd::geteuid().is_root());
        assert_eq!(effective_caps(), caps_before, "capabilities not restored");
        assert!(connect_blocking(&closed, &Creds { uid: 0, ..nobody }, t).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A peer that is gone by the time it is looked at is never believed:
    /// either no pidfd is given for it, or the pidfd says it is gone.
    #[test]
    fn a_peer_that_exited_is_not_alive() {
        let dir = std::env::temp_dir().join(format!("icpt-peer-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let _ = fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let _us = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(Peer::of(&s).unwrap().alive(), "a live peer");
        let status = std::process::Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
            ])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let (gone, _) = l.accept().unwrap();
        assert!(!Peer::of(&gone).is_ok_and(|p| p.alive()));
        fs::remove_dir_all(&dir).unwrap();
    }
}
