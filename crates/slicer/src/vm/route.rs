//! `slicer vm route`: reads the daemon's config, not its API.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// `vm route`: one route per bridge group, via this host's address on its default route.
pub(super) fn route(config: &Path, os: &str) -> Result<i32> {
    let settings = slicer_daemon::config::File::load(config)?.settings(config.parent().unwrap_or(Path::new(".")))?;
    // connect() on a UDP socket picks the source address of the default route and sends nothing.
    let host = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("198.51.100.1:9").and_then(|()| s.local_addr()))
        .map(|a| a.ip().to_string())
        .context("finding this host's address (no default route?)")?;
    for g in &settings.groups {
        if g.network_mode != slicer_api::NetworkMode::Bridge {
            println!(
                "# {}: {} network, not reachable from other machines",
                g.name, g.network_mode
            );
            continue;
        }
        let (addr, prefix) = g.gateway.split_once('/').unwrap_or((&g.gateway, "24"));
        let (addr, prefix): (std::net::Ipv4Addr, u32) = (addr.parse()?, prefix.parse()?);
        let mask = u32::MAX.checked_shl(32 - prefix.min(32)).unwrap_or(0);
        let net = std::net::Ipv4Addr::from(u32::from(addr) & mask);
        match os {
            "linux" => println!("sudo ip route add {net}/{prefix} via {host}"),
            "darwin" => println!("sudo route -n add -net {net}/{prefix} {host}"),
            other => bail!("--os {other:?}: use linux or darwin"),
        }
    }
    Ok(0)
}
