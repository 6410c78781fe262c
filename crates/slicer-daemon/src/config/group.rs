//! One host group's settings: every value of `host_groups[i]` checked (errors name the field),
//! defaults applied.

use super::*;

/// One host group's settings: every value checked (errors name the field under `at`),
/// defaults applied. `base_dir` resolves `userdata_file`.
pub(super) fn group_settings(at: &str, g: &HostGroup, default_image: &str, base_dir: &Path) -> Result<Group> {
    check_group_name(at, &g.name)?;
    if g.vcpu == 0 || g.vcpu > 64 {
        bail!("{at}.vcpu: must be between 1 and 64, got {}", g.vcpu);
    }
    let ram_bytes = ram_of(at, g)?;
    let storage_size = storage_of(at, g)?;
    let userdata = userdata_of(at, g, base_dir)?;
    let dns = g
        .dns_servers
        .clone()
        .unwrap_or_else(|| vec!["8.8.8.8".into(), "1.1.1.1".into()]);
    for d in &dns {
        if d.parse::<std::net::IpAddr>().is_err() {
            bail!("{at}.dns_servers: {d:?} is not an IP address");
        }
    }
    let image = match &g.image {
        None => default_image.to_string(),
        Some(i) => check_image(i).map_err(|e| anyhow::anyhow!("{at}.image: {e}"))?,
    };
    let net = group_network(at, g)?;
    let ca = g.ca.clone().unwrap_or_default();
    let cwd = std::env::current_dir().with_context(|| format!("{at}.ca.files: the working directory"))?;
    let ca_certs = match ca.files.is_empty() {
        true => Vec::new(),
        false => ca_file_certs(at, &ca.files, &cwd)?,
    };
    Ok(Group {
        ca_generate: ca.generate,
        ca_certs,
        name: g.name.clone(),
        count: g.count,
        cpus: g.vcpu,
        ram_bytes,
        storage_size,
        persistent: g.persistent,
        userdata,
        dns,
        image,
        range: net.range,
        warm_start: g.warm_start.unwrap_or(true),
        network_mode: net.mode,
        allow: net.allow,
        drop: net.drop,
        bridge: net.bridge,
        tap_prefix: net.tap_prefix,
        gateway: net.gateway,
    })
}

/// `{at}.name`: 1-20 lowercase letters, digits or '-', not starting or ending with '-'.
fn check_group_name(at: &str, name: &str) -> Result<()> {
    let name_ok = !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !name_ok {
        bail!("{at}.name: {name:?} must be 1-20 lowercase letters, digits or '-'");
    }
    Ok(())
}

/// The group's RAM: one of `ram_gb`, `ram_mb` and `ram_bytes` (4 GiB when none), at least 128 MiB.
fn ram_of(at: &str, g: &HostGroup) -> Result<u64> {
    let rams = [g.ram_gb.map(|v| v << 30), g.ram_mb.map(|v| v << 20), g.ram_bytes];
    let given: Vec<u64> = rams.iter().flatten().copied().collect();
    if given.len() > 1 {
        bail!("{at}: give only one of ram_gb, ram_mb and ram_bytes");
    }
    let ram_bytes = given.first().copied().unwrap_or(4 << 30);
    if ram_bytes < 128 << 20 {
        bail!("{at}.ram: at least 128 MiB is needed, got {ram_bytes} bytes");
    }
    Ok(ram_bytes)
}

/// `storage` (only `image`) and `storage_size` (at least 1G when given).
fn storage_of(at: &str, g: &HostGroup) -> Result<Option<u64>> {
    if g.storage != "image" {
        bail!(
            "{at}.storage: {:?} is not supported here; use `image` (a qcow2 overlay per VM)",
            g.storage
        );
    }
    Ok(match &g.storage_size {
        None => None,
        Some(s) => Some(
            parse_size(s)
                .filter(|v| *v >= 1 << 30)
                .ok_or_else(|| anyhow::anyhow!("{at}.storage_size: {s:?} is not a size of at least 1G (e.g. 25G)"))?,
        ),
    })
}

/// `userdata`, or the text of `userdata_file` (relative to `base_dir`); not both.
fn userdata_of(at: &str, g: &HostGroup, base_dir: &Path) -> Result<Option<String>> {
    Ok(match (&g.userdata, &g.userdata_file) {
        (Some(_), Some(_)) => bail!("{at}: give userdata or userdata_file, not both"),
        (Some(u), None) => Some(u.clone()),
        (None, Some(f)) => {
            let p = base_dir.join(f);
            Some(std::fs::read_to_string(&p).with_context(|| format!("{at}.userdata_file: reading {}", p.display()))?)
        }
        (None, None) => None,
    })
}

/// A group's `network` after validation, with defaults applied.
struct GroupNetwork {
    mode: NetworkMode,
    allow: Vec<String>,
    drop: Vec<String>,
    bridge: String,
    tap_prefix: String,
    gateway: String,
    /// Isolated mode only.
    range: Option<String>,
}

/// `{at}.network`: the mode, its rules, and the interface names and addresses it needs.
fn group_network(at: &str, g: &HostGroup) -> Result<GroupNetwork> {
    let net = g.network.clone().unwrap_or_default();
    let text = net.mode.as_deref().unwrap_or("bridge");
    // `none` (no NIC at all) is a slicer extension.
    let Some(mode) = NetworkMode::parse(text) else {
        bail!("{at}.network.mode: {text:?} is not supported; use bridge, isolated or none");
    };
    for (field, list) in [("drop", &net.drop), ("allow", &net.allow)] {
        if !list.is_empty() && mode == NetworkMode::None {
            bail!("{at}.network.{field}: only applies to isolated and bridge mode");
        }
        for r in list {
            if !valid_rule(r) {
                bail!("{at}.network.{field}: {r:?} is not a CIDR, an address or address:port");
            }
        }
    }
    let short: String = g.name.chars().filter(|c| *c != '-').take(8).collect();
    let tap_prefix = net.tap_prefix.clone().unwrap_or_else(|| format!("{short}tap"));
    if tap_prefix.is_empty() || tap_prefix.len() > 12 {
        bail!("{at}.network.tap_prefix: {tap_prefix:?} must be 1-12 characters (interface names are at most 15)");
    }
    let bridge = net.bridge.clone().unwrap_or_else(|| format!("br{short}0"));
    if bridge.is_empty() || bridge.len() > 15 {
        bail!("{at}.network.bridge: {bridge:?} must be 1-15 characters");
    }
    let gateway = net.gateway.clone().unwrap_or_else(|| "192.168.137.1/24".into());
    if mode == NetworkMode::Bridge && !is_prefixed_v4(&gateway, 8..=30) {
        bail!("{at}.network.gateway: {gateway:?} is not an address with a prefix such as 192.168.137.1/24");
    }
    if let Some(r) = &net.range {
        if mode == NetworkMode::Isolated && !is_prefixed_v4(r, 16..=28) {
            bail!("{at}.network.range: {r:?} is not a CIDR from /16 to /28 such as 169.254.100.0/22");
        }
    }
    Ok(GroupNetwork {
        range: if mode == NetworkMode::Isolated {
            net.range.clone()
        } else {
            None
        },
        mode,
        allow: net.allow,
        drop: net.drop,
        bridge,
        tap_prefix,
        gateway,
    })
}

/// `a.b.c.d/p` with `p` in `prefixes`.
fn is_prefixed_v4(s: &str, prefixes: std::ops::RangeInclusive<u8>) -> bool {
    s.split_once('/')
        .is_some_and(|(a, p)| a.parse::<Ipv4Addr>().is_ok() && p.parse::<u8>().is_ok_and(|p| prefixes.contains(&p)))
}
