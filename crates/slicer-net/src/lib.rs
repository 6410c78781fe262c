//! VM networking.
//!
//! Isolated mode: each VM gets a network namespace `slicer-<hostname>` holding a bridge that
//! joins QEMU's TAP (`tap0`) and one end of a veth pair; the other end (`slh<id>`, in the
//! host's namespace) carries the VM's /30 gateway address. The guest sits at `.2` of its /30,
//! the host at `.1`. Policy lives in one nftables table per VM (`inet slicer-<id>`) in the
//! host's namespace, where the guest cannot reach it: VM→VM and VM→host are dropped, drop and
//! allow lists are enforced on forwarded traffic, nothing from outside may open a connection
//! to the VM, and the VM's egress is masqueraded.
//!
//! Bridge mode: one Linux bridge per host group with the gateway address, a TAP per VM in the
//! host's namespace, forwarding and masquerade for the subnet (table `inet slicer-br-<group>`).
//!
//! The `ip` and `nft` programs do the work: they are the reference tools for both, `nft -f`
//! replaces a whole table atomically, and no maintained Rust crate speaks nftables' netlink
//! protocol directly. Every object is named so that leftovers of an earlier run are found
//! and removed by name.

pub mod policy;

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub use policy::{compile, Rule, Verdict};

/// Interface names are limited to 15 bytes.
pub const IFNAMSIZ_MAX: usize = 15;
const NETNS_PREFIX: &str = "slicer-";
const VETH_PREFIX: &str = "slh";
const TABLE_PREFIX: &str = "slicer-";

/// A short stable id for a name: 8 hex digits.
pub fn short_id(name: &str) -> String {
    hex::encode(&Sha256::digest(name.as_bytes())[..4])
}

/// A stable locally administered MAC for a VM.
pub fn mac_for(hostname: &str) -> String {
    let h = Sha256::digest(hostname.as_bytes());
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}

async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        let pkg = if program == "nft" { "nftables" } else { "iproute2" };
        anyhow::anyhow!("running {program}: {e} (apt-get install -y {pkg})")
    })?;
    if let (Some(text), Some(mut si)) = (stdin, child.stdin.take()) {
        si.write_all(text.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn ip(args: &[&str]) -> Result<String> {
    run("ip", args, None).await
}

async fn nft_script(script: &str) -> Result<()> {
    run("nft", &["-f", "-"], Some(script)).await.map(|_| ())
}

async fn enable_forwarding() -> Result<()> {
    tokio::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .await
        .context("enabling IPv4 forwarding")
}

/// An IPv4 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Net {
    pub fn parse(s: &str) -> Option<Net> {
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let prefix: u8 = p.parse().ok().filter(|p| *p <= 32)?;
        let addr: Ipv4Addr = a.parse().ok()?;
        Some(Net { addr, prefix }.normalized())
    }
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }
    pub fn normalized(self) -> Net {
        Net {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            prefix: self.prefix,
        }
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }
    pub fn overlaps(&self, o: &Net) -> bool {
        self.contains(o.addr) || o.contains(self.addr)
    }
    /// The n-th address of the network.
    pub fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr).wrapping_add(n))
    }
    pub fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The /22 an isolated host group carves its /30s from when the config gives no `range`:
/// derived from the group's name inside 169.254.0.0/16 (skipping 169.254.0.0/22 and
/// 169.254.252.0/22, and blocks already used by the host's interfaces).
pub fn derived_range(group: &str, host_addrs: &[Ipv4Addr]) -> Net {
    let h = Sha256::digest(group.as_bytes());
    let start = u16::from_be_bytes([h[0], h[1]]) as u32 % 62 + 1; // blocks 1..=62
    for i in 0..62 {
        let block = (start - 1 + i) % 62 + 1;
        let net = Net {
            addr: Ipv4Addr::new(169, 254, (block * 4) as u8, 0),
            prefix: 22,
        };
        if !host_addrs.iter().any(|a| net.contains(*a)) {
            return net;
        }
    }
    Net {
        addr: Ipv4Addr::new(169, 254, (start * 4) as u8, 0),
        prefix: 22,
    }
}

/// IPv4 addresses on the host's interfaces.
pub async fn host_addresses() -> Vec<Ipv4Addr> {
    let out = ip(&["-4", "-o", "addr", "show"]).await.unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|t| *t == "inet")?;
            w.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// The networking of one isolated VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Isolated {
    pub hostname: String,
    pub netns: String,
    pub host_veth: String,
    pub table: String,
    pub tap: String,
    /// The VM's /30.
    pub subnet: Net,
    pub allow: Vec<String>,
    pub drop: Vec<String>,
}

impl Isolated {
    /// Names and addresses for `hostname` in the /30 `subnet`.
    pub fn new(hostname: &str, subnet: Net, allow: Vec<String>, drop: Vec<String>) -> Isolated {
        let id = short_id(hostname);
        Isolated {
            hostname: hostname.to_string(),
            netns: format!("{NETNS_PREFIX}{hostname}"),
            host_veth: format!("{VETH_PREFIX}{id}"),
            table: format!("{TABLE_PREFIX}{hostname}"),
            tap: "tap0".into(),
            subnet,
            allow,
            drop,
        }
    }
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.nth(1)
    }
    pub fn guest_ip(&self) -> Ipv4Addr {
        self.subnet.nth(2)
    }
    /// The nftables table of this VM.
    pub fn ruleset(&self) -> String {
        let v = &self.host_veth;
        let ip = self.guest_ip();
        let mut fwd = String::new();
        for r in compile(&self.allow, &self.drop) {
            fwd.push_str(&format!("        iifname \"{v}\" {}\n", r.nft()));
        }
        let mut input_allow = String::new();
        for r in compile(&self.allow, &[])
            .into_iter()
            .filter(|r| r.verdict == Verdict::Accept && r.net.prefix > 0)
        {
            input_allow.push_str(&format!("        iifname \"{v}\" {}\n", r.nft()));
        }
        format!(
            "table inet {t} {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        oifname \"{v}\" ct state established,related accept
        oifname \"{v}\" drop
        iifname \"{v}\" ip saddr != {ip} drop
        iifname \"{v}\" ct state established,related accept
        iifname \"{v}\" oifname \"{VETH_PREFIX}*\" drop
{fwd}    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname \"{v}\" ct state established,related accept
{input_allow}        iifname \"{v}\" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {ip} oifname != \"{v}\" masquerade
    }}
}}
",
            t = self.table
        )
    }

    /// Creates the namespace, links and table. Undone by [`Isolated::teardown`], also after
    /// a partial failure.
    pub async fn setup(&self) -> Result<()> {
        let r = self.setup_inner().await;
        if r.is_err() {
            self.teardown().await;
        }
        r
    }

    async fn setup_inner(&self) -> Result<()> {
        let ns = self.netns.as_str();
        let v = self.host_veth.as_str();
        enable_forwarding().await?;
        ip(&["netns", "add", ns]).await?;
        ip(&["link", "add", v, "type", "veth", "peer", "name", "veth0", "netns", ns]).await?;
        ip(&["addr", "add", &format!("{}/30", self.gateway()), "dev", v]).await?;
        ip(&["link", "set", v, "up"]).await?;
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "add", "br0", "type", "bridge"],
            &["link", "set", "veth0", "master", "br0"],
            &["tuntap", "add", "dev", "tap0", "mode", "tap"],
            &["link", "set", "tap0", "master", "br0"],
            &["link", "set", "veth0", "up"],
            &["link", "set", "tap0", "up"],
            &["link", "set", "br0", "up"],
        ] {
            let mut a = vec!["-n", ns];
            a.extend_from_slice(args);
            ip(&a).await?;
        }
        nft_script(&self.ruleset()).await?;
        Ok(())
    }

    /// Removes everything of this VM; missing pieces are fine.
    pub async fn teardown(&self) {
        let _ = run("nft", &["delete", "table", "inet", &self.table], None).await;
        let _ = ip(&["link", "del", &self.host_veth]).await;
        let _ = ip(&["netns", "del", &self.netns]).await;
    }
}

/// Bridge mode of one host group.
#[derive(Debug, Clone, PartialEq)]
pub struct Bridge {
    pub group: String,
    pub bridge: String,
    /// Gateway address and subnet, e.g. 192.168.137.1/24.
    pub gateway: Ipv4Addr,
    pub subnet: Net,
    pub table: String,
}

impl Bridge {
    pub fn new(group: &str, bridge: &str, gateway_cidr: &str) -> Result<Bridge> {
        let (gw, _) = gateway_cidr.split_once('/').unwrap_or((gateway_cidr, "24"));
        let gateway: Ipv4Addr = gw
            .parse()
            .with_context(|| format!("gateway {gateway_cidr:?} is not an IPv4 address with a prefix"))?;
        let subnet = Net::parse(gateway_cidr).context("gateway is not a CIDR")?;
        Ok(Bridge {
            group: group.into(),
            bridge: bridge.into(),
            gateway,
            subnet,
            table: format!("{TABLE_PREFIX}br-{group}"),
        })
    }

    pub fn ruleset(&self) -> String {
        format!(
            "table inet {t} {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname \"{b}\" accept
        oifname \"{b}\" accept
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {s} ip daddr != {s} masquerade
    }}
}}
",
            t = self.table,
            b = self.bridge,
            s = self.subnet
        )
    }

    pub async fn setup(&self) -> Result<()> {
        enable_forwarding().await?;
        let b = self.bridge.as_str();
        if ip(&["link", "show", b]).await.is_err() {
            ip(&["link", "add", b, "type", "bridge"]).await?;
        }
        let _ = ip(&[
            "addr",
            "replace",
            &format!("{}/{}", self.gateway, self.subnet.prefix),
            "dev",
            b,
        ])
        .await;
        ip(&["link", "set", b, "up"]).await?;
        let _ = run("nft", &["delete", "table", "inet", &self.table], None).await;
        nft_script(&self.ruleset()).await
    }

    pub async fn add_tap(&self, tap: &str) -> Result<()> {
        let _ = ip(&["link", "del", tap]).await;
        ip(&["tuntap", "add", "dev", tap, "mode", "tap"]).await?;
        ip(&["link", "set", tap, "master", &self.bridge]).await?;
        ip(&["link", "set", tap, "up"]).await?;
        Ok(())
    }

    pub async fn del_tap(tap: &str) {
        let _ = ip(&["link", "del", tap]).await;
    }

    pub async fn teardown(&self) {
        let _ = run("nft", &["delete", "table", "inet", &self.table], None).await;
        let _ = ip(&["link", "del", &self.bridge]).await;
    }
}

/// Whether `name` is `<prefix><group>-<digits>` for one of `groups`.
fn is_vm_object(name: &str, prefix: &str, groups: &[String]) -> bool {
    let Some(rest) = name.strip_prefix(prefix) else {
        return false;
    };
    groups.iter().any(|g| {
        rest.strip_prefix(g.as_str())
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Removes what an earlier run of a daemon with these host groups left behind: VM
/// namespaces (their veths go with them), VM and bridge tables, and TAPs with the groups'
/// prefixes. Objects of other daemons (other groups) are left alone.
pub async fn remove_leftovers(groups: &[String], tap_prefixes: &[String], keep: &[String]) {
    if let Ok(out) = ip(&["netns", "list"]).await {
        for ns in out.lines().filter_map(|l| l.split_whitespace().next()) {
            if is_vm_object(ns, NETNS_PREFIX, groups) && !keep.iter().any(|k| k == ns) {
                let _ = ip(&["netns", "del", ns]).await;
            }
        }
    }
    if let Ok(out) = ip(&["-o", "link", "show"]).await {
        for l in out.lines() {
            let Some(name) = l
                .split(':')
                .nth(1)
                .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            else {
                continue;
            };
            let is_tap = tap_prefixes.iter().any(|p| {
                name.strip_prefix(p.as_str())
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            });
            if is_tap && !keep.contains(&name) {
                let _ = ip(&["link", "del", &name]).await;
            }
        }
    }
    if let Ok(out) = run("nft", &["list", "tables"], None).await {
        for l in out.lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.len() == 3 && w[0] == "table" {
                let bridge = groups.iter().any(|g| w[2] == format!("{TABLE_PREFIX}br-{g}"));
                if bridge || (is_vm_object(w[2], TABLE_PREFIX, groups) && !keep.iter().any(|k| k == w[2])) {
                    let _ = run("nft", &["delete", "table", w[1], w[2]], None).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interface_limits() {
        let i = Isolated::new(
            "a-very-long-host-group-name-123",
            Net::parse("169.254.100.4/30").unwrap(),
            vec![],
            vec![],
        );
        assert!(i.host_veth.len() <= IFNAMSIZ_MAX);
        assert_eq!(i.gateway(), Ipv4Addr::new(169, 254, 100, 5));
        assert_eq!(i.guest_ip(), Ipv4Addr::new(169, 254, 100, 6));
    }

    #[test]
    fn derived_ranges_are_stable_and_skip_used_blocks() {
        let a = derived_range("sandbox", &[]);
        assert_eq!(a, derived_range("sandbox", &[]));
        assert_eq!(a.prefix, 22);
        assert!(Net::parse("169.254.0.0/16").unwrap().contains(a.addr));
        let b = derived_range("sandbox", &[a.nth(7)]);
        assert_ne!(a, b);
    }

    #[test]
    fn leftovers_are_matched_by_group_exactly() {
        let g = vec!["a".to_string()];
        assert!(is_vm_object("slicer-a-12", "slicer-", &g));
        assert!(!is_vm_object("slicer-a-b-1", "slicer-", &g));
        assert!(!is_vm_object("slicer-a-", "slicer-", &g));
        assert!(!is_vm_object("slicer-ab-1", "slicer-", &g));
    }

    #[test]
    fn nets() {
        let n = Net::parse("192.168.1.77/24").unwrap();
        assert_eq!(n.to_string(), "192.168.1.0/24");
        assert!(n.contains("192.168.1.3".parse().unwrap()));
        assert!(n.overlaps(&Net::parse("192.168.0.0/16").unwrap()));
        assert!(!n.overlaps(&Net::parse("192.168.2.0/24").unwrap()));
        assert_eq!(Net::parse("0.0.0.0/0").unwrap().mask(), 0);
        assert!(Net::parse("1.2.3.4/33").is_none());
    }

    #[test]
    fn ruleset_blocks_other_vms_and_the_host() {
        let i = Isolated::new(
            "sb-1",
            Net::parse("169.254.8.0/30").unwrap(),
            vec!["0.0.0.0/0".into()],
            vec!["192.168.1.0/24".into()],
        );
        let r = i.ruleset();
        assert!(r.contains(&format!("iifname \"{}\" oifname \"slh*\" drop", i.host_veth)));
        assert!(r.contains(&format!("iifname \"{}\" drop", i.host_veth)));
        let drop_at = r.find("ip daddr 192.168.1.0/24 drop").unwrap();
        let allow_at = r.find("ip daddr 0.0.0.0/0 accept").unwrap();
        assert!(drop_at < allow_at, "the more specific drop comes first:\n{r}");
    }
}
