//! Reaching upstreams safely: the proxy resolves names itself and connects only to an address it
//! checked (never loopback, link-local, the host's own addresses, the VM ranges or a
//! `--deny-cidr`), so neither a rule of `*` nor a name that resolves inside can reach them.
//!
//! Every address is first reduced to its canonical form: an IPv4-mapped (`::ffff:a.b.c.d`),
//! IPv4-compatible (`::a.b.c.d`) or NAT64 (`64:ff9b::a.b.c.d`) IPv6 address is checked as the
//! IPv4 address it carries, so `[::ffff:127.0.0.1]` is loopback.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a name may take to resolve.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The host's own addresses are read again at most this often.
pub const LOCAL_REFRESH: Duration = Duration::from_secs(3);
/// Addresses tried per name (a hostile resolver could answer hundreds).
pub const MAX_ADDRS: usize = 16;

/// Why an upstream could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{host} resolves to {addr}, which the proxy may not reach ({why})")]
    Refused {
        host: String,
        addr: IpAddr,
        why: &'static str,
    },
    #[error("resolving {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the proxy may not reach, and names it resolves itself.
#[derive(Debug, Clone, Default)]
pub struct UpstreamConfig {
    /// `--deny-cidr` ranges: (network address, prefix length).
    pub deny_cidrs: Vec<(IpAddr, u8)>,
    /// The test-only hosts option: names answered without DNS.
    pub hosts: HashMap<String, Vec<IpAddr>>,
    /// Tests of the interceptor run their upstreams on loopback; `slicer proxy up` never sets this.
    pub allow_loopback_for_tests: bool,
}

/// The host's own addresses and when they were read.
struct LocalAddrs {
    read_at: Option<Instant>,
    addrs: Arc<HashSet<IpAddr>>,
}

/// How upstreams are reached.
pub struct Upstream {
    config: UpstreamConfig,
    vm_ranges: RwLock<Arc<Vec<(IpAddr, u8)>>>,
    local: Mutex<LocalAddrs>,
}

impl Default for Upstream {
    fn default() -> Upstream {
        Upstream::new(UpstreamConfig::default())
    }
}

/// Parses `a.b.c.d/n`, `a:b::/n` or a bare address (a host route) into its network address and
/// prefix length (host bits cleared).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, p) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let ip: IpAddr = a.trim().parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = match p {
        Some(p) => p.trim().parse().ok().filter(|p| *p <= max)?,
        None => max,
    };
    Some((mask(ip, prefix), prefix))
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// Whether `ip` (canonical) is in the network `(net, prefix)`; a v4 network never holds a v6
/// address and the reverse, which is why addresses are canonicalized first.
pub fn in_cidr(ip: IpAddr, net: (IpAddr, u8)) -> bool {
    let (n, p) = net;
    match (ip, canonical(n)) {
        (IpAddr::V4(_), IpAddr::V4(_)) if p <= 32 => mask(ip, p) == canonical(n),
        (IpAddr::V6(_), IpAddr::V6(_)) => mask(ip, p) == n,
        // A v4 range written in mapped form (`::ffff:10.0.0.0/104`).
        (IpAddr::V4(a), IpAddr::V4(_)) if p >= 96 => {
            let mapped = IpAddr::V6(a.to_ipv6_mapped());
            mask(mapped, p) == mask(n, p)
        }
        _ => false,
    }
}

/// The address an IPv6 form of an IPv4 address stands for, else `ip` itself.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(a) => {
            let s = a.segments();
            let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
            // ::ffff:a.b.c.d (mapped)
            if s[..5] == [0, 0, 0, 0, 0] && s[5] == 0xffff {
                return IpAddr::V4(low);
            }
            // ::a.b.c.d (compatible; not :: and ::1, which are checked as IPv6)
            if s[..6] == [0, 0, 0, 0, 0, 0] && u32::from(low) > 1 {
                return IpAddr::V4(low);
            }
            // 64:ff9b::a.b.c.d (NAT64 well-known prefix) and ::ffff:0:a.b.c.d (SIIT)
            if (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]) || (s[..6] == [0, 0, 0, 0, 0xffff, 0]) {
                return IpAddr::V4(low);
            }
            ip
        }
    }
}

/// Why an address is never reachable through the proxy (independent of configuration), or
/// `None`. `ip` must be canonical.
pub fn always_refused(ip: IpAddr, allow_loopback: bool) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            if a.is_loopback() {
                (!allow_loopback).then_some("loopback")
            } else if o[0] == 0 {
                Some("unspecified")
            } else if a.is_link_local() {
                Some("link-local")
            } else if a.is_multicast() {
                Some("multicast")
            } else if a.is_broadcast() || o[0] >= 240 {
                Some("broadcast or reserved")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if a.is_loopback() {
                (!allow_loopback).then_some("loopback")
            } else if a.is_unspecified() {
                Some("unspecified")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if a.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// Every address of every interface of the host (canonical).
pub fn host_addresses() -> HashSet<IpAddr> {
    let mut set = HashSet::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(sa) = a.address else { continue };
            if let Some(v4) = sa.as_sockaddr_in() {
                set.insert(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                set.insert(canonical(IpAddr::V6(v6.ip())));
            }
        }
    }
    set
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Upstream {
        Upstream {
            config,
            vm_ranges: RwLock::new(Arc::new(Vec::new())),
            local: Mutex::new(LocalAddrs {
                read_at: None,
                addrs: Arc::new(HashSet::new()),
            }),
        }
    }

    /// Replaces the VM ranges (pushed by the daemon with each state). A range that does not
    /// parse is skipped (and said on stderr).
    pub fn set_vm_ranges(&self, ranges: &[String]) {
        let mut v = Vec::with_capacity(ranges.len());
        for r in ranges {
            match parse_cidr(r) {
                Some(n) => v.push(n),
                None => eprintln!(
                    "slicer-proxy: ignoring VM range {:?} (not a CIDR)",
                    crate::control::escape(r)
                ),
            }
        }
        *self.vm_ranges.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
    }

    fn local_addrs(&self) -> Arc<HashSet<IpAddr>> {
        let mut l = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if l.read_at.is_none_or(|t| t.elapsed() >= LOCAL_REFRESH) {
            l.addrs = Arc::new(host_addresses());
            l.read_at = Some(Instant::now());
        }
        l.addrs.clone()
    }

    /// Why the proxy may not connect to `ip`, or `None` when it may.
    pub fn check(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = canonical(ip);
        if let Some(why) = always_refused(ip, self.config.allow_loopback_for_tests) {
            return Some(why);
        }
        if self.config.deny_cidrs.iter().any(|n| in_cidr(ip, *n)) {
            return Some("--deny-cidr");
        }
        let vm = self.vm_ranges.read().unwrap_or_else(|e| e.into_inner()).clone();
        if vm.iter().any(|n| in_cidr(ip, *n)) {
            return Some("a VM range");
        }
        if self.local_addrs().contains(&ip) && !(self.config.allow_loopback_for_tests && ip.is_loopback()) {
            return Some("an address of this host");
        }
        None
    }

    /// The addresses `host` stands for: an IP literal (`[v6]` too), the hosts option, else DNS.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, UpstreamError> {
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(ips) = self.config.hosts.get(host) {
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| UpstreamError::Resolve {
                host: host.into(),
                reason: "timed out".into(),
            })?
            .map_err(|e| UpstreamError::Resolve {
                host: host.into(),
                reason: e.to_string(),
            })?;
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in found {
            if !out.contains(&a) {
                out.push(a);
            }
            if out.len() >= MAX_ADDRS {
                break;
            }
        }
        Ok(out)
    }

    /// Resolves `host`, checks every address, connects to the first allowed one that answers.
    pub async fn connect(&self, host: &str, port: u16) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let addrs = self.resolve(host, port).await?;
        if addrs.is_empty() {
            return Err(UpstreamError::Resolve {
                host: host.into(),
                reason: "no address".into(),
            });
        }
        let mut refused = None;
        let mut last_err = None;
        for addr in addrs {
            if let Some(why) = self.check(addr.ip()) {
                refused.get_or_insert((addr.ip(), why));
                continue;
            }
            // Connect to the canonical form (a mapped address reaches the v4 host anyway).
            let target = SocketAddr::new(canonical(addr.ip()), port);
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok((s, target));
                }
                Ok(Err(source)) => last_err = Some(UpstreamError::Connect { addr: target, source }),
                Err(_) => {
                    last_err = Some(UpstreamError::Connect {
                        addr: target,
                        source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
                    })
                }
            }
        }
        match (last_err, refused) {
            (Some(e), _) => Err(e),
            (None, Some((addr, why))) => Err(UpstreamError::Refused {
                host: host.into(),
                addr,
                why,
            }),
            (None, None) => Err(UpstreamError::Resolve {
                host: host.into(),
                reason: "no address".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(config: UpstreamConfig) -> Upstream {
        Upstream::new(config)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn worst_addresses_are_refused() {
        let u = up(UpstreamConfig::default());
        for a in [
            "127.0.0.1",
            "127.255.0.9",
            "::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "::ffff:0.0.0.0",
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "::ffff:a9fe:a9fe",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "240.0.0.1",
        ] {
            assert!(u.check(ip(a)).is_some(), "{a} must be refused");
        }
        assert_eq!(u.check(ip("93.184.215.14")), None);
        assert_eq!(u.check(ip("2606:4700::1111")), None);
        assert_eq!(u.check(ip("::ffff:93.184.215.14")), None);
    }

    #[test]
    fn loopback_relaxed_only_for_tests() {
        let u = up(UpstreamConfig {
            allow_loopback_for_tests: true,
            ..Default::default()
        });
        assert_eq!(u.check(ip("127.0.0.1")), None);
        assert_eq!(u.check(ip("::ffff:127.0.0.1")), None);
        assert!(u.check(ip("169.254.169.254")).is_some());
        assert!(u.check(ip("0.0.0.0")).is_some());
    }

    #[test]
    fn deny_cidrs_vm_ranges_and_host_addresses() {
        let u = up(UpstreamConfig {
            deny_cidrs: vec![parse_cidr("192.168.1.0/24").unwrap(), parse_cidr("fd00::/8").unwrap()],
            ..Default::default()
        });
        assert_eq!(u.check(ip("192.168.1.77")), Some("--deny-cidr"));
        assert_eq!(u.check(ip("::ffff:192.168.1.77")), Some("--deny-cidr"));
        assert_eq!(u.check(ip("fd12::1")), Some("--deny-cidr"));
        assert_eq!(u.check(ip("192.168.2.1")), None);
        u.set_vm_ranges(&["192.168.222.0/24".into(), "not a cidr".into()]);
        assert_eq!(u.check(ip("192.168.222.5")), Some("a VM range"));
        u.set_vm_ranges(&[]);
        assert_eq!(u.check(ip("192.168.222.5")), None);
        for a in host_addresses() {
            assert!(u.check(a).is_some(), "the host's own {a} must be refused");
        }
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(parse_cidr("10.1.2.3/8"), Some((ip("10.0.0.0"), 8)));
        assert_eq!(parse_cidr("10.1.2.3"), Some((ip("10.1.2.3"), 32)));
        assert_eq!(parse_cidr("0.0.0.0/0"), Some((ip("0.0.0.0"), 0)));
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr("x/8"), None);
        assert!(in_cidr(ip("1.2.3.4"), parse_cidr("0.0.0.0/0").unwrap()));
        assert!(in_cidr(ip("10.0.0.1"), parse_cidr("::ffff:10.0.0.0/104").unwrap()));
        assert!(!in_cidr(ip("2001:db8::1"), parse_cidr("0.0.0.0/0").unwrap()));
    }

    #[tokio::test]
    async fn names_resolving_inside_are_refused() {
        let mut hosts = HashMap::new();
        hosts.insert("metadata.test".to_string(), vec![ip("169.254.169.254")]);
        hosts.insert("mixed.test".to_string(), vec![ip("::ffff:127.0.0.1"), ip("0.0.0.0")]);
        let u = up(UpstreamConfig {
            hosts,
            ..Default::default()
        });
        for h in [
            "metadata.test",
            "mixed.test",
            "[::]",
            "0.0.0.0",
            "[::ffff:127.0.0.1]",
            "localhost",
        ] {
            match u.connect(h, 80).await {
                Err(UpstreamError::Refused { .. }) => {}
                Err(e) => panic!("{h}: {e}"),
                Ok((_, a)) => panic!("{h} reached {a}"),
            }
        }
    }
}
