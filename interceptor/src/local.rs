//! This host's own addresses. A server on this host is reached through any
//! of them, not only the one a target names: a listener bound to the
//! wildcard answers on `127.0.0.2`, on the host's LAN address and on `::1`,
//! and a connect to `0.0.0.0` or `::` goes to loopback. So a target with a
//! local address claims its port on every local address (see
//! [`crate::config::Config::target_for_on`]), and the eBPF programs
//! intercept those addresses too.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;

use crate::config::canonical_ip;

/// How often the host's addresses are read again.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Addresses local whatever the interfaces say: loopback and unspecified,
/// as (network, prefix length).
pub const ALWAYS: [(IpAddr, u8); 4] = [
    (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
    (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 32),
    (IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
    (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 128),
];

/// The addresses of this host's interfaces, as last read.
#[derive(Default)]
pub struct HostAddrs {
    now: ArcSwap<Vec<IpAddr>>,
}

impl HostAddrs {
    /// Reads them now.
    pub fn read() -> io::Result<Arc<HostAddrs>> {
        let h = Arc::new(HostAddrs::default());
        h.refresh()?;
        Ok(h)
    }

    /// Reads them again; true if they changed.
    pub fn refresh(&self) -> io::Result<bool> {
        let mut addrs: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .map_err(io::Error::from)?
            .filter_map(|i| {
                let a = i.address?;
                a.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            })
            .map(canonical_ip)
            .collect();
        addrs.sort();
        addrs.dedup();
        let changed = **self.now.load() != addrs;
        if changed {
            self.now.store(Arc::new(addrs));
        }
        Ok(changed)
    }

    pub fn get(&self) -> Arc<Vec<IpAddr>> {
        self.now.load_full()
    }
}

/// Whether a connect to `ip` stays on this host, given its addresses.
pub fn is_local(ip: IpAddr, host: &[IpAddr]) -> bool {
    let ip = canonical_ip(ip);
    ip.is_loopback() || ip.is_unspecified() || host.contains(&ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_unspecified_and_interface_addresses_are_local() {
        let host = HostAddrs::read().unwrap().get();
        assert!(host.iter().any(|a| a.is_loopback()), "{host:?}");
        for ip in ["127.0.0.2", "0.0.0.0", "::", "::1", "::ffff:127.0.0.9"] {
            assert!(is_local(ip.parse().unwrap(), &host), "{ip}");
        }
        for ip in ["10.255.255.254", "fd00::1234:5678", "8.8.8.8"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(is_local(ip, &host), host.contains(&ip), "{ip}");
        }
    }
}
