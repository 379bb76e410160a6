//! The relay's system calls: every `unsafe` of the byte path in one place.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

/// A write or splice out that moved nothing (it would spin): an error.
pub fn moved(n: usize) -> io::Result<usize> {
    if n == 0 {
        Err(io::ErrorKind::WriteZero.into())
    } else {
        Ok(n)
    }
}

/// `None` where the call would block: that ends a pump round (epoll is
/// edge-triggered, and the next edge resumes it).
pub fn ready(r: io::Result<usize>) -> io::Result<Option<usize>> {
    match r {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

// recv(2), send(2) and epoll_wait(2) are made as plain system calls: glibc's
// wrappers are cancellation points, which bracket every call with two more
// that switch the thread's cancellation state, paid on every message by a
// loop whose threads are never cancelled.

/// The result of a system call: a count, or the error it set.
fn syscall_result(n: libc::c_long) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// recv(2) into `len` bytes at `buf`.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes.
pub unsafe fn recv(fd: RawFd, buf: *mut u8, len: usize) -> io::Result<usize> {
    let none = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: the caller vouches for `buf`; no address is asked for.
    syscall_result(unsafe { libc::syscall(libc::SYS_recvfrom, fd, buf, len, 0, none, none) })
}

/// recv(2) into the free room of `buf`, which grows by what was read.
/// (Not read(2): on a socket that goes through the file layer first,
/// position lock and access notification included, which perf showed as a
/// visible share of the relay loop's time.)
pub fn recv_into(fd: RawFd, buf: &mut bytes::BytesMut) -> io::Result<usize> {
    let room = buf.spare_capacity_mut();
    // SAFETY: `room` is writable memory of `room.len()` bytes owned by
    // `buf`; recv(2) writes at most that many and reports how many.
    let n = unsafe { recv(fd, room.as_mut_ptr().cast(), room.len())? };
    // SAFETY: the kernel initialised the first `n` bytes of the free room.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// send(2) of `buf`, without SIGPIPE.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let none = std::ptr::null::<libc::c_void>();
    // SAFETY: `buf` is valid for reads of its length; no address is passed.
    syscall_result(unsafe {
        libc::syscall(
            libc::SYS_sendto,
            fd,
            buf.as_ptr(),
            buf.len(),
            libc::MSG_NOSIGNAL,
            none,
            0,
        )
    })
}

pub(crate) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call (owned by the
    // caller's Stream or Pipe); no offsets are passed.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    syscall_result(n as libc::c_long)
}

pub(crate) struct Epoll(OwnedFd);

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: plain epoll_create1(2); the fd is owned right below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and belongs to nobody else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn add(&self, fd: RawFd, token: u64, events: libc::c_int) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, events)
    }

    pub(crate) fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, events: libc::c_int) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: events as u32,
            u64: token,
        };
        // SAFETY: an epoll_ctl(2) on our epoll fd (a closed `fd` gives
        // EBADF); ev lives across the call.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1: forever) for events.
    pub(crate) fn wait(
        &self,
        events: &mut [libc::epoll_event],
        timeout_ms: libc::c_int,
    ) -> io::Result<usize> {
        loop {
            // SAFETY: events is a valid buffer of the length passed.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_epoll_wait,
                    self.0.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    timeout_ms,
                )
            };
            match syscall_result(n) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

/// A hop whose far end is on this host (the application's, always; the
/// server's, when it runs here) has no network to share: it uses reno, the
/// cheapest congestion control, whatever the node's default is (chosen for
/// its network paths). With BBR, the default of many distributions, its
/// per-ACK model was about 0.8% of the relay's CPU time at pgbench -S -c 8.
pub fn local_hop<S: AsFd>(s: &S, peer: SocketAddr) {
    if !peer.ip().is_loopback() {
        return;
    }
    let reno = b"reno";
    // SAFETY: setsockopt(2) on a live socket, reading `reno.len()` bytes.
    // Failure (no reno in this kernel) leaves the default: nothing to do.
    unsafe {
        libc::setsockopt(
            s.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            reno.as_ptr().cast(),
            reno.len() as libc::socklen_t,
        )
    };
}

/// Closes a socket with RST instead of FIN (SO_LINGER 0) when it is
/// dropped (a unix socket just closes).
pub fn reset<S: AsFd>(s: &S) {
    set_linger_zero(s.as_fd());
}

fn set_linger_zero(fd: BorrowedFd<'_>) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) on a live socket, reading a linger struct that
    // lives across the call; failure leaves an ordinary close.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Sends FIN; a peer that is already gone is not an error here.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: shutdown(2) on a descriptor the caller keeps open.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOTCONN) {
        Ok(())
    } else {
        Err(e)
    }
}
