//! Types shared between the eBPF programs and the agent.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding, and is used as a
//! map key or value on both sides of the kernel boundary. Changing a layout is
//! a breaking change for pinned maps: bump [`ABI_VERSION`] when you do, so a
//! restarted agent refuses to adopt maps of another layout.
#![no_std]

/// Layout version of the pinned maps below; the agent stores it beside its pins.
pub const ABI_VERSION: u32 = 2;

/// `AF_INET` as the kernel reports it in `bpf_sock_addr` / `bpf_sock_ops`.
pub const AF_INET: u16 = 2;
/// `AF_INET6` as the kernel reports it.
pub const AF_INET6: u16 = 10;

/// Names of the maps, as the agent finds them in the object and in bpffs.
pub mod map_names {
    pub const CONFIG: &str = "ICPT_CONFIG";
    pub const TARGETS: &str = "ICPT_TARGETS";
    pub const SOCK_META: &str = "ICPT_SOCK_META";
    pub const CONN_META: &str = "ICPT_CONN_META";
    pub const ACCEPTED: &str = "ICPT_ACCEPTED";
    pub const LISTENERS: &str = "ICPT_LISTENERS";
}

/// Slots of the agent's listeners in `ICPT_LISTENERS`.
pub const LISTENER_V4: u32 = 0;
pub const LISTENER_V6: u32 = 1;

/// Names of the programs in the object.
pub mod program_names {
    pub const CONNECT4: &str = "icpt_connect4";
    pub const CONNECT6: &str = "icpt_connect6";
    pub const GETPEERNAME4: &str = "icpt_getpeername4";
    pub const GETPEERNAME6: &str = "icpt_getpeername6";
    pub const SOCK_OPS: &str = "icpt_sock_ops";
    pub const SK_LOOKUP: &str = "icpt_sk_lookup";
}

/// Agent settings the programs read on every connect (single-entry array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// cgroup v2 id of the running agent; checked together with `agent_tgid`.
    pub agent_cgroup_id: u64,
    /// IPv4 address of the proxy listener, network byte order.
    pub proxy_ip4: u32,
    /// IPv6 address of the proxy listener, network byte order words.
    pub proxy_ip6: [u32; 4],
    /// Proxy listener port, host byte order.
    pub proxy_port: u16,
    /// 1: every TCP destination is intercepted; 0: only those in the targets map.
    pub intercept_all: u8,
    pub _pad: u8,
    /// Process id of the running agent (0 when none); its own connects are
    /// never redirected.
    pub agent_tgid: u32,
    pub _pad2: u32,
}

/// What `connect4`/`connect6` learned about a connect: where it was going and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnMeta {
    /// Original destination, network byte order words. IPv4 (and IPv4-mapped
    /// IPv6) destinations keep the IPv4 address in word 0, the rest zero.
    pub orig_ip: [u32; 4],
    /// Original destination port, host byte order.
    pub orig_port: u16,
    /// Address family of the destination (`AF_INET` also for IPv4-mapped).
    pub orig_family: u16,
    /// Process (thread group) id of the caller.
    pub tgid: u32,
    /// Thread id of the caller.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Family of the application's socket (`AF_INET6` for IPv4-mapped connects).
    pub sock_family: u16,
    pub _pad: u16,
    /// cgroup v2 id (inode number of the cgroup directory) of the caller.
    pub cgroup_id: u64,
    /// Network namespace cookie of the socket.
    pub netns_cookie: u64,
    /// `bpf_ktime_get_boot_ns()` at connect (CLOCK_BOOTTIME, the clock of
    /// process start times in /proc).
    pub ktime_ns: u64,
    /// `comm` of the calling thread, NUL padded.
    pub comm: [u8; 16],
}

/// A TCP connection as the proxy sees it from the accepted socket: the
/// application's (source) and the proxy's (destination) address. Addresses
/// are normalised: IPv4 and IPv4-mapped IPv6 both use `AF_INET` with the IPv4
/// address in word 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub src_ip: [u32; 4],
    pub dst_ip: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub family: u32,
}

/// Data part of an LPM-trie key for intercepted destinations: port first,
/// then the address as IPv6 (IPv4 as `::ffff:a.b.c.d`). A prefix length of
/// 16 + 96 + n matches an IPv4 /n; port 0 stands for every port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetKey {
    pub port: [u8; 2],
    pub addr: [u8; 16],
}

/// Bits of a prefix: the port part of a [`TargetKey`].
pub const TARGET_PORT_BITS: u32 = 16;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data: repr(C), every field an integer or integer
    // array, no implicit padding (explicit `_pad` fields instead).
    unsafe impl aya::Pod for super::ProxyConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnMeta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TargetKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<ProxyConfig>(), 8 + 4 + 16 + 2 + 1 + 1 + 4 + 4);
        assert_eq!(
            size_of::<ConnMeta>(),
            16 + 2 + 2 + 4 * 4 + 2 + 2 + 8 * 3 + 16
        );
        assert_eq!(size_of::<SockKey>(), 16 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<TargetKey>(), 18);
    }
}
