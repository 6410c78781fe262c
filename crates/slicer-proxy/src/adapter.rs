//! The `--bind` address: an IP the host already owns is used as it is; otherwise a dummy link
//! with a stable name per IP (`slp` + the IPv4 in hex) holds it (`/32`, or the prefix of a CIDR
//! `--bind`) and is brought up. The link outlives the proxy (the next start finds it), as in
//! Slicer. Uses the `ip` program, like `slicer-net`. (On a kernel without the dummy driver the
//! link is an empty bridge.)

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use crate::error::{Error, Result};

/// A parsed `--bind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind {
    pub ip: IpAddr,
    /// `Some` when `--bind` was a CIDR.
    pub prefix: Option<u8>,
}

impl Bind {
    /// `192.168.222.1` or `192.168.222.1/24` (an IPv6 address only when the host owns it).
    pub fn parse(s: &str) -> Result<Bind> {
        let bad = |r: &str| Error::invalid("--bind", format!("{s:?}: {r}"));
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = a.parse().map_err(|_| bad("not an IP address or CIDR"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => None,
            Some(p) => Some(
                p.parse::<u8>()
                    .ok()
                    .filter(|p| (1..=max).contains(p))
                    .ok_or_else(|| bad("the prefix length is out of range"))?,
            ),
        };
        if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Err(bad("the proxy needs one concrete address"));
        }
        Ok(Bind { ip, prefix })
    }
}

/// The dummy link's name for `ip`: `slp` + 8 hex digits (15 characters at most, as Linux wants).
pub fn link_name(ip: Ipv4Addr) -> String {
    format!("slp{:08x}", u32::from(ip))
}

/// The interface that holds `ip`, if any (all of 127.0.0.0/8 is `lo`'s).
pub fn owner_of(ip: IpAddr) -> Option<String> {
    if ip.is_loopback() {
        return Some("lo".into());
    }
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs {
        let Some(sa) = a.address else { continue };
        let found = match ip {
            IpAddr::V4(v4) => sa.as_sockaddr_in().is_some_and(|s| s.ip() == v4),
            IpAddr::V6(v6) => sa.as_sockaddr_in6().is_some_and(|s| s.ip() == v6),
        };
        if found {
            return Some(a.interface_name);
        }
    }
    None
}

fn ip_cmd(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Error::os(format!("running ip {}", args.join(" ")), e))?;
    if !out.status.success() {
        return Err(Error::os(
            format!("ip {}", args.join(" ")),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What [`ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adapter {
    /// Another interface already holds the address; networking was left alone.
    Existing(String),
    /// The dummy link (created or updated).
    Dummy(String),
}

/// Makes sure the host owns `bind.ip` (see the module comment). Needs CAP_NET_ADMIN when it has
/// to create the link.
pub fn ensure(bind: &Bind) -> Result<Adapter> {
    let v4 = match bind.ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => {
            return owner_of(bind.ip).map(Adapter::Existing).ok_or_else(|| {
                Error::invalid(
                    "--bind",
                    format!("{v6} is not an address of this host (a dummy adapter is made only for IPv4)"),
                )
            })
        }
    };
    let name = link_name(v4);
    let prefix = bind.prefix.unwrap_or(32);
    match owner_of(bind.ip) {
        Some(owner) if owner != name => return Ok(Adapter::Existing(owner)),
        Some(_) if bind.prefix.is_none() => {
            ip_cmd(&["link", "set", &name, "up"])?;
            return Ok(Adapter::Dummy(name));
        }
        _ => {}
    }
    if ip_cmd(&["link", "show", "dev", &name]).is_err() {
        if let Err(e) = ip_cmd(&["link", "add", &name, "type", "dummy"]) {
            // A kernel built without the dummy driver (no modules to load it from): an empty
            // bridge holds a local address the same way.
            ip_cmd(&["link", "add", &name, "type", "bridge"]).map_err(|_| e)?;
            eprintln!("slicer-proxy: no dummy link type in this kernel; {name} is an empty bridge");
        }
    }
    // Updating: the link holds exactly this address with this prefix.
    ip_cmd(&["addr", "flush", "dev", &name])?;
    ip_cmd(&["addr", "add", &format!("{v4}/{prefix}"), "dev", &name])?;
    ip_cmd(&["link", "set", &name, "up"])?;
    Ok(Adapter::Dummy(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_parsing_names_the_flag() {
        assert_eq!(
            Bind::parse("192.168.222.1").unwrap(),
            Bind {
                ip: "192.168.222.1".parse().unwrap(),
                prefix: None
            }
        );
        assert_eq!(Bind::parse("192.168.222.1/24").unwrap().prefix, Some(24));
        for bad in [
            "",
            "x",
            "192.168.222.1/33",
            "192.168.222.1/0",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "1.2.3.4/x",
        ] {
            let e = Bind::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("--bind"), "{e}");
        }
        assert_eq!(link_name("192.168.222.1".parse().unwrap()), "slpc0a8de01");
        assert!(owner_of("127.0.0.1".parse().unwrap()).is_some());
    }
}
