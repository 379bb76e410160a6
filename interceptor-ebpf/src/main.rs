//! eBPF programs of interceptor.
//!
//! `connect4`/`connect6` send intercepted TCP connects of a workload cgroup to
//! the agent's proxy listener and remember the original destination and the
//! caller by socket cookie; `sock_ops` re-keys that by the connection's
//! 4-tuple once the local port is known, so the proxy can find it from the
//! accepted socket; `getpeername4`/`getpeername6` show the application the
//! peer it asked for. None of these programs may ever let an intercepted
//! connect go direct: when in doubt they refuse it.
//!
//! The proxy address is steered, not merely bound: `sk_lookup` hands every
//! connection for it to the agent's listener in `ICPT_LISTENERS`, and refuses
//! it when there is none, so no other process can answer for the agent, even
//! one bound to that address while the agent is down. The metadata of a
//! connection lives as long as its socket: the client socket's close removes
//! its 4-tuple entry, and once the agent's side of the connection exists
//! (`PASSIVE_ESTABLISHED`) the entry moves to that socket's cookie, which the
//! kernel never reuses.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {
    panic!("interceptor-ebpf only builds for the bpf target (the agent's build.rs does this)");
}

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{
            sk_action::{SK_DROP, SK_PASS},
            BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
            BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
        },
        helpers::{
            bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
            bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie,
            bpf_ktime_get_boot_ns,
        },
        macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
        maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap, SockMap},
        programs::{SkLookupContext, SockAddrContext, SockOpsContext},
        EbpfContext,
    };
    use aya_log_ebpf::{debug, warn};
    use interceptor_ebpf::{
        ConnMeta, ProxyConfig, SockKey, TargetKey, AF_INET, AF_INET6, LISTENER_V4, LISTENER_V6,
        TARGET_PORT_BITS,
    };

    /// Verdicts of cgroup sock_addr programs.
    const ALLOW: i32 = 1;
    const REFUSE: i32 = 0;
    const SOCK_STREAM: u32 = 1;
    const IPPROTO_TCP: u32 = 6;

    /// Sized for 10k+ concurrent connects with room; LRU so pressure evicts
    /// the oldest entries instead of failing new connects.
    const META_ENTRIES: u32 = 65536;

    #[map(name = "ICPT_CONFIG")]
    static CONFIG: Array<ProxyConfig> = Array::pinned(1, 0);

    #[map(name = "ICPT_TARGETS")]
    static TARGETS: LpmTrie<TargetKey, u32> = LpmTrie::pinned(4096, 0);

    /// Socket cookie -> metadata, for sock_ops and getpeername; removed on close.
    #[map(name = "ICPT_SOCK_META")]
    static SOCK_META: LruHashMap<u64, ConnMeta> = LruHashMap::pinned(META_ENTRIES, 0);

    /// 4-tuple -> metadata, from the client's connect until the agent's side
    /// of the connection exists (then moved to `ACCEPTED`) or the client
    /// socket closes (then removed).
    #[map(name = "ICPT_CONN_META")]
    static CONN_META: LruHashMap<SockKey, ConnMeta> = LruHashMap::pinned(META_ENTRIES, 0);

    /// Cookie of the agent's accepted socket -> metadata, taken (looked up and
    /// deleted) by the proxy on accept. Cookies are never reused, so an entry
    /// left by a dead agent can never describe another connection.
    #[map(name = "ICPT_ACCEPTED")]
    static ACCEPTED: LruHashMap<u64, ConnMeta> = LruHashMap::pinned(META_ENTRIES, 0);

    /// The agent's proxy listeners (`LISTENER_V4`, `LISTENER_V6`); a closed
    /// listener leaves the map by itself.
    #[map(name = "ICPT_LISTENERS")]
    static LISTENERS: SockMap = SockMap::pinned(2, 0);

    /// The agent's own connects: its process id *and* its cgroup, so a
    /// workload process that reuses a dead agent's pid is still intercepted.
    #[inline(always)]
    fn is_agent(cfg: &ProxyConfig) -> bool {
        (bpf_get_current_pid_tgid() >> 32) as u32 == cfg.agent_tgid
            // SAFETY: helper valid in cgroup/sock_addr programs.
            && unsafe { bpf_get_current_cgroup_id() } == cfg.agent_cgroup_id
    }

    #[inline(always)]
    fn is_v4_mapped(ip: &[u32; 4]) -> bool {
        ip[0] == 0 && ip[1] == 0 && u32::from_be(ip[2]) == 0xffff
    }

    #[inline(always)]
    fn intercepted(cfg: &ProxyConfig, addr: [u8; 16], port: u16) -> bool {
        if cfg.intercept_all != 0 {
            return true;
        }
        let full = TARGET_PORT_BITS + 128;
        let exact = Key::new(
            full,
            TargetKey {
                port: port.to_be_bytes(),
                addr,
            },
        );
        if TARGETS.get(&exact).is_some() {
            return true;
        }
        let any_port = Key::new(full, TargetKey { port: [0, 0], addr });
        TARGETS.get(&any_port).is_some()
    }

    #[inline(always)]
    fn mapped_bytes(ip4_be: u32) -> [u8; 16] {
        let b = ip4_be.to_ne_bytes();
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
        ]
    }

    #[inline(always)]
    fn v6_bytes(ip: &[u32; 4]) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let w = ip[i].to_ne_bytes();
            out[i * 4] = w[0];
            out[i * 4 + 1] = w[1];
            out[i * 4 + 2] = w[2];
            out[i * 4 + 3] = w[3];
            i += 1;
        }
        out
    }

    /// Fills a [`ConnMeta`] for the current task; the caller sets the destination.
    #[inline(always)]
    fn caller_meta(ctx: &SockAddrContext, sock_family: u16) -> ConnMeta {
        let pid_tgid = bpf_get_current_pid_tgid();
        let uid_gid = bpf_get_current_uid_gid();
        ConnMeta {
            tgid: (pid_tgid >> 32) as u32,
            tid: pid_tgid as u32,
            uid: uid_gid as u32,
            gid: (uid_gid >> 32) as u32,
            sock_family,
            // SAFETY: helpers valid in cgroup/sock_addr programs; ctx is the program's context.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
            ktime_ns: unsafe { bpf_ktime_get_boot_ns() },
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
            ..ConnMeta::default()
        }
    }

    /// Stores `meta` under the socket's cookie; false if it could not be stored.
    #[inline(always)]
    fn remember(ctx: &SockAddrContext, meta: &ConnMeta) -> bool {
        // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        SOCK_META.insert(&cookie, meta, 0).is_ok()
    }

    #[inline(always)]
    fn is_tcp(ctx: &SockAddrContext) -> bool {
        // SAFETY: the kernel hands us a valid bpf_sock_addr.
        let (ty, proto) = unsafe { ((*ctx.sock_addr).type_, (*ctx.sock_addr).protocol) };
        ty == SOCK_STREAM && (proto == IPPROTO_TCP || proto == 0)
    }

    /// The agent's settings for a connect that may be intercepted, or the
    /// verdict when it is not ours to touch (not TCP, the agent's own) or the
    /// agent never configured us (refused: fail closed).
    #[inline(always)]
    fn config_for(ctx: &SockAddrContext) -> Result<&'static ProxyConfig, i32> {
        if !is_tcp(ctx) {
            return Err(ALLOW);
        }
        match CONFIG.get(0) {
            Some(cfg) if cfg.proxy_port != 0 => {
                if is_agent(cfg) {
                    Err(ALLOW)
                } else {
                    Ok(cfg)
                }
            }
            _ => Err(REFUSE),
        }
    }

    #[cgroup_sock_addr(connect4)]
    pub fn icpt_connect4(ctx: SockAddrContext) -> i32 {
        let cfg = match config_for(&ctx) {
            Ok(cfg) => cfg,
            Err(verdict) => return verdict,
        };
        let sa = ctx.sock_addr;
        // SAFETY: valid context pointer for the program's lifetime.
        let (ip, port) = unsafe { ((*sa).user_ip4, u16::from_be((*sa).user_port as u16)) };
        if ip == cfg.proxy_ip4 && port == cfg.proxy_port {
            warn!(&ctx, "refused a connect aimed at the proxy listener itself");
            return REFUSE;
        }
        if !intercepted(cfg, mapped_bytes(ip), port) {
            return ALLOW;
        }
        let mut meta = caller_meta(&ctx, AF_INET);
        meta.orig_ip = [ip, 0, 0, 0];
        meta.orig_port = port;
        meta.orig_family = AF_INET;
        if !remember(&ctx, &meta) {
            warn!(&ctx, "socket metadata map full: refusing connect");
            return REFUSE;
        }
        // SAFETY: writes to user_ip4/user_port are allowed in connect4.
        unsafe {
            (*sa).user_ip4 = cfg.proxy_ip4;
            (*sa).user_port = u32::from(cfg.proxy_port.to_be());
        }
        debug!(
            &ctx,
            "redirected tgid {} to proxy from {:i}:{}",
            meta.tgid,
            u32::from_be(ip),
            port
        );
        ALLOW
    }

    #[cgroup_sock_addr(connect6)]
    pub fn icpt_connect6(ctx: SockAddrContext) -> i32 {
        let cfg = match config_for(&ctx) {
            Ok(cfg) => cfg,
            Err(verdict) => return verdict,
        };
        let sa = ctx.sock_addr;
        // SAFETY: valid context pointer for the program's lifetime.
        let (ip, port) = unsafe { ((*sa).user_ip6, u16::from_be((*sa).user_port as u16)) };
        let mapped = is_v4_mapped(&ip);
        let to_proxy = if mapped {
            ip[3] == cfg.proxy_ip4
        } else {
            ip == cfg.proxy_ip6
        };
        if to_proxy && port == cfg.proxy_port {
            warn!(&ctx, "refused a connect aimed at the proxy listener itself");
            return REFUSE;
        }
        let addr = if mapped {
            mapped_bytes(ip[3])
        } else {
            v6_bytes(&ip)
        };
        if !intercepted(cfg, addr, port) {
            return ALLOW;
        }
        let mut meta = caller_meta(&ctx, AF_INET6);
        meta.orig_port = port;
        if mapped {
            meta.orig_ip = [ip[3], 0, 0, 0];
            meta.orig_family = AF_INET;
        } else {
            meta.orig_ip = ip;
            meta.orig_family = AF_INET6;
        }
        if !remember(&ctx, &meta) {
            warn!(&ctx, "socket metadata map full: refusing connect");
            return REFUSE;
        }
        // SAFETY: writes to user_ip6 (word-wise) and user_port are allowed in connect6.
        unsafe {
            if mapped {
                (*sa).user_ip6[0] = 0;
                (*sa).user_ip6[1] = 0;
                (*sa).user_ip6[2] = 0xffffu32.to_be();
                (*sa).user_ip6[3] = cfg.proxy_ip4;
            } else {
                (*sa).user_ip6[0] = cfg.proxy_ip6[0];
                (*sa).user_ip6[1] = cfg.proxy_ip6[1];
                (*sa).user_ip6[2] = cfg.proxy_ip6[2];
                (*sa).user_ip6[3] = cfg.proxy_ip6[3];
            }
            (*sa).user_port = u32::from(cfg.proxy_port.to_be());
        }
        debug!(
            &ctx,
            "redirected tgid {} (ipv6 socket, mapped={}) to proxy, port {}",
            meta.tgid,
            mapped as u8,
            port
        );
        ALLOW
    }

    /// Shows the application the original peer of a redirected socket.
    #[inline(always)]
    fn restore_peer(ctx: &SockAddrContext, v6_socket: bool) -> i32 {
        // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: entries are written whole by connect4/6 and never mutated in place.
        let Some(meta) = (unsafe { SOCK_META.get(&cookie) }) else {
            return ALLOW;
        };
        let sa = ctx.sock_addr;
        // SAFETY: getpeername4/6 may rewrite user_ip4/user_ip6 and user_port.
        unsafe {
            if !v6_socket {
                if meta.orig_family != AF_INET {
                    return ALLOW;
                }
                (*sa).user_ip4 = meta.orig_ip[0];
            } else if meta.orig_family == AF_INET {
                (*sa).user_ip6[0] = 0;
                (*sa).user_ip6[1] = 0;
                (*sa).user_ip6[2] = 0xffffu32.to_be();
                (*sa).user_ip6[3] = meta.orig_ip[0];
            } else {
                (*sa).user_ip6[0] = meta.orig_ip[0];
                (*sa).user_ip6[1] = meta.orig_ip[1];
                (*sa).user_ip6[2] = meta.orig_ip[2];
                (*sa).user_ip6[3] = meta.orig_ip[3];
            }
            (*sa).user_port = u32::from(meta.orig_port.to_be());
        }
        ALLOW
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn icpt_getpeername4(ctx: SockAddrContext) -> i32 {
        restore_peer(&ctx, false)
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn icpt_getpeername6(ctx: SockAddrContext) -> i32 {
        restore_peer(&ctx, true)
    }

    /// Normalises a sock_ops address to the [`SockKey`] form.
    #[inline(always)]
    fn key_addr(family: u32, ip4: u32, ip6: [u32; 4]) -> [u32; 4] {
        if family == AF_INET as u32 {
            [ip4, 0, 0, 0]
        } else if is_v4_mapped(&ip6) {
            [ip6[3], 0, 0, 0]
        } else {
            ip6
        }
    }

    /// The [`SockKey`] of the connection of a sock_ops socket: `client_side`
    /// for the application's socket (its local end is the source), otherwise
    /// the agent's accepted socket (its remote end is the source).
    #[inline(always)]
    fn conn_key(ctx: &SockOpsContext, client_side: bool) -> SockKey {
        let family = ctx.family();
        let local = key_addr(family, ctx.local_ip4(), ctx.local_ip6());
        let remote = key_addr(family, ctx.remote_ip4(), ctx.remote_ip6());
        let v4 = family == AF_INET as u32 || is_v4_mapped(&ctx.local_ip6());
        let local_port = ctx.local_port() as u16;
        // remote_port holds the network-order port in its upper 16 bits (on
        // little-endian), so a 32-bit byte swap yields the port.
        let remote_port = u32::from_be(ctx.remote_port()) as u16;
        let family = if v4 { AF_INET as u32 } else { AF_INET6 as u32 };
        if client_side {
            SockKey {
                src_ip: local,
                dst_ip: remote,
                src_port: local_port,
                dst_port: remote_port,
                family,
            }
        } else {
            SockKey {
                src_ip: remote,
                dst_ip: local,
                src_port: remote_port,
                dst_port: local_port,
                family,
            }
        }
    }

    /// Whether a (normalised) destination is the proxy address.
    #[inline(always)]
    fn is_proxy(cfg: &ProxyConfig, key: &SockKey) -> bool {
        key.dst_port == cfg.proxy_port
            && cfg.proxy_port != 0
            && if key.family == AF_INET as u32 {
                key.dst_ip[0] == cfg.proxy_ip4
            } else {
                key.dst_ip == cfg.proxy_ip6
            }
    }

    #[sock_ops]
    pub fn icpt_sock_ops(ctx: SockOpsContext) -> u32 {
        let op = ctx.op();
        // SAFETY: bpf_get_socket_cookie accepts a sock_ops context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
            // SAFETY: entries are written whole and never mutated in place.
            let Some(meta) = (unsafe { SOCK_META.get(&cookie) }) else {
                return 1;
            };
            let key = conn_key(&ctx, true);
            if CONN_META.insert(&key, meta, 0).is_err() {
                warn!(&ctx, "connection metadata map insert failed");
            }
            // Ask for state changes so the entries go when the socket closes.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        } else if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
            // The agent's side of a connection to the proxy address now
            // exists: its metadata moves to this socket's cookie.
            let Some(cfg) = CONFIG.get(0) else {
                return 1;
            };
            let key = conn_key(&ctx, false);
            if !is_proxy(cfg, &key) {
                return 1;
            }
            // SAFETY: entries are written whole and never mutated in place.
            if let Some(meta) = unsafe { CONN_META.get(&key) } {
                if ACCEPTED.insert(&cookie, meta, 0).is_err() {
                    warn!(&ctx, "accepted-connection metadata map insert failed");
                }
                let _ = CONN_META.remove(&key);
            }
        } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
            let _ = SOCK_META.remove(&cookie);
            let _ = CONN_META.remove(&conn_key(&ctx, true));
        }
        1
    }

    /// Steers connections for the proxy address to the agent's listener, or
    /// refuses them when the agent has none: whoever else is bound there
    /// never sees a redirected connect.
    #[sk_lookup]
    pub fn icpt_sk_lookup(ctx: SkLookupContext) -> u32 {
        let Some(cfg) = CONFIG.get(0) else {
            return SK_PASS;
        };
        let l = ctx.lookup;
        // SAFETY: the kernel hands us a valid bpf_sk_lookup for the program's run.
        let (family, protocol, port) = unsafe { ((*l).family, (*l).protocol, (*l).local_port) };
        if protocol != IPPROTO_TCP || port != u32::from(cfg.proxy_port) || cfg.proxy_port == 0 {
            return SK_PASS;
        }
        // SAFETY: as above; the address fields of the packet's family are valid.
        let slot = if family == AF_INET as u32 && unsafe { (*l).local_ip4 } == cfg.proxy_ip4 {
            LISTENER_V4
        } else if family == AF_INET6 as u32 && unsafe { (*l).local_ip6 } == cfg.proxy_ip6 {
            LISTENER_V6
        } else {
            return SK_PASS;
        };
        match LISTENERS.redirect_sk_lookup(&ctx, slot, 0) {
            Ok(()) => SK_PASS,
            Err(_) => SK_DROP,
        }
    }

    /// GPL-compatible licence string the kernel checks for helper access.
    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
