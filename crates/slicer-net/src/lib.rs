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
//! The group's VMs reach each other on the bridge; nothing else may open a connection to them,
//! and their traffic to the host and beyond is filtered as in isolated mode. A `bridge`
//! family table of the same name pins each TAP's MAC, ARP sender and IPv4 source to its VM's
//! ([`Port`]), so no VM can impersonate the gateway or a neighbour.
//!
//! Containment in both modes: cloud metadata addresses and link-local 169.254.0.0/16
//! ([`policy::GUARDED`]; fd00:ec2::254 with all IPv6) are dropped unless an allow entry names
//! them ([`policy::guard_metadata`]); each VM has at most [`CONNTRACK_PER_VM`] connections in
//! the host's connection tracking table; the host's addresses
//! answer a VM only where an entry names the one address ([`policy::host_input`]); a VM's IPv6
//! is dropped (there is no IPv6 configuration) and the host-side interfaces have IPv6 off; VM
//! address ranges never include 169.254.169.0/24.
//!
//! The `ip` and `nft` programs do the work: they are the reference tools for both, `nft -f`
//! replaces a whole table atomically, and no maintained Rust crate speaks nftables' netlink
//! protocol directly. Every object is named so that leftovers of an earlier run are found
//! and removed by name.

mod error;
pub mod policy;

use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

pub use error::{Error, Result};
pub use policy::{compile, Rule, Verdict};

/// Interface names are limited to 15 bytes.
pub const IFNAMSIZ_MAX: usize = 15;
const NETNS_PREFIX: &str = "slicer-";
const VETH_PREFIX: &str = "slh";
const TABLE_PREFIX: &str = "slicer-";

/// The cloud metadata service's IPv4 address (AWS, GCP, Azure, OpenStack, …).
pub const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The metadata service's IPv6 address (AWS).
pub const METADATA_V6: &str = "fd00:ec2::254";
/// The /24 around [`METADATA_V4`]: no VM is ever given an address in it.
pub const METADATA_BLOCK: Net = Net {
    addr: Ipv4Addr::new(169, 254, 169, 0),
    prefix: 24,
};

/// Connections a VM may have in the host's connection tracking table at once (new ones to the
/// host and through it: TCP, UDP, ICMP, ...; TCP connections already closed are not counted);
/// a new connection past it is dropped. One guest's SYN or UDP spray thus cannot fill the
/// table (`nf_conntrack_max`, 262,144 on a 24 GiB host) and break NAT for every other VM.
pub const CONNTRACK_PER_VM: u32 = 4096;

/// New connections a VM may open per second (the same burst on top); more are dropped before
/// they are counted against [`CONNTRACK_PER_VM`]. The kernel walks a VM's whole list of
/// connections for each new one it counts (about 100 µs at 4,096 on the project's machine), so
/// without this a spray at the limit would cost the host a core per ~10,000 packets/s.
pub const NEW_CONNECTIONS_PER_SEC: u32 = 1000;

/// The sets of a VM table counting new connections (rate and total) per VM source address
/// (one element per VM).
const CT_SETS: &str = "    set vmrate {
        type ipv4_addr; size 65536; flags dynamic;
    }
    set vmconns {
        type ipv4_addr; size 65536; flags dynamic;
    }
";

/// Rules dropping a new connection from `iif` past [`NEW_CONNECTIONS_PER_SEC`] or once its
/// source address has [`CONNTRACK_PER_VM`] connections tracked (the source address is pinned
/// before them).
fn conntrack_limit(iif: &str) -> String {
    let r = NEW_CONNECTIONS_PER_SEC;
    format!(
        "        {iif} ct state new add @vmrate {{ ip saddr limit rate over {r}/second burst {r} packets }} counter drop
        {iif} ct state new add @vmconns {{ ip saddr ct count over {CONNTRACK_PER_VM} }} counter drop\n"
    )
}

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
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        program: program.to_string(),
        package: if program == "nft" { "nftables" } else { "iproute2" },
        source,
    })?;
    if let (Some(text), Some(mut si)) = (stdin, child.stdin.take()) {
        si.write_all(text.as_bytes())
            .await
            .map_err(|e| Error::io(format!("writing to {program}"), e))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| Error::io(format!("waiting for {program}"), e))?;
    if !out.status.success() {
        return Err(Error::Command {
            program: program.to_string(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn ip(args: &[&str]) -> Result<String> {
    run("ip", args, None).await
}

async fn nft_script(script: &str) -> Result<()> {
    run("nft", &["-f", "-"], Some(script)).await.map(|_| ())
}

/// Turns IPv6 off on a host-side interface (before it is up, so it never gets a link-local
/// address). A host without IPv6 has nothing to turn off.
async fn disable_ipv6(ifname: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
        return Ok(());
    }
    tokio::fs::write(&path, "1")
        .await
        .map_err(|e| Error::io(format!("turning IPv6 off on {ifname}"), e))
}

async fn enable_forwarding() -> Result<()> {
    tokio::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .await
        .map_err(|e| Error::io("enabling IPv4 forwarding", e))
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
/// derived from the group's name inside 169.254.0.0/16, skipping 169.254.0.0/22,
/// 169.254.252.0/22, the block holding the metadata address (169.254.168.0/22) and blocks that
/// overlap `used` (the host's addresses as /32s, other groups' ranges).
pub fn derived_range(group: &str, used: &[Net]) -> Net {
    let block_net = |block: u32| Net {
        addr: Ipv4Addr::new(169, 254, (block * 4) as u8, 0),
        prefix: 22,
    };
    let h = Sha256::digest(group.as_bytes());
    let start = u16::from_be_bytes([h[0], h[1]]) as u32 % 62 + 1; // blocks 1..=62
    let candidates = (0..62)
        .map(|i| block_net((start - 1 + i) % 62 + 1))
        .filter(|net| !net.overlaps(&METADATA_BLOCK));
    let mut first = None;
    for net in candidates {
        if !used.iter().any(|u| net.overlaps(u)) {
            return net;
        }
        first.get_or_insert(net);
    }
    first.expect("61 candidate blocks")
}

/// The /30s of an isolated range in order, without those inside [`METADATA_BLOCK`].
pub fn vm_subnets(range: Net) -> impl Iterator<Item = Net> {
    (0..(range.size() / 4) as u32)
        .map(move |s| Net {
            addr: range.nth(4 * s),
            prefix: 30,
        })
        .filter(|n| !n.overlaps(&METADATA_BLOCK))
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
        let iif = format!("iifname \"{v}\"");
        format!(
            "table inet {t} {{
{CT_SETS}    chain forward {{
        type filter hook forward priority filter; policy accept;
{v6}        oifname \"{v}\" ct state established,related accept
        oifname \"{v}\" drop
        {iif} ip saddr != {ip} drop
{ct}        {iif} ct state established,related accept
        {iif} oifname \"{VETH_PREFIX}*\" drop
{fwd}    }}
    chain input {{
        type filter hook input priority filter; policy accept;
{input}    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {ip} oifname != \"{v}\" masquerade
    }}
}}
",
            t = self.table,
            v6 = ipv6_drop(&iif),
            ct = conntrack_limit(&iif),
            fwd = forward_rules(&iif, &self.allow, &self.drop),
            input = input_rules(&iif, &format!("ip saddr != {ip} drop"), &self.allow, &self.drop),
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
        disable_ipv6(v).await?;
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

/// Forward rules dropping a VM's IPv6 (`iif` matches the VM side): the metadata address is
/// named for when IPv6 becomes configurable; today every IPv6 packet is dropped.
fn ipv6_drop(iif: &str) -> String {
    format!("        {iif} ip6 daddr {METADATA_V6} counter drop\n        {iif} meta nfproto ipv6 counter drop\n")
}

/// The compiled allow/drop lists for forwarded traffic from `iif`, with the metadata guard.
fn forward_rules(iif: &str, allow: &[String], drop: &[String]) -> String {
    policy::guard_metadata(compile(allow, drop))
        .iter()
        .map(|r| format!("        {iif} {}\n", r.nft()))
        .collect()
}

/// The input chain's rules for traffic from `iif` to the host: no IPv6, `pin` (the source
/// address check), the connection limit, replies pass, then entries naming one host address,
/// then drop.
fn input_rules(iif: &str, pin: &str, allow: &[String], drop: &[String]) -> String {
    let mut s = format!(
        "        {iif} meta nfproto ipv6 counter drop\n        {iif} {pin}\n{ct}        {iif} ct state established,related accept\n",
        ct = conntrack_limit(iif)
    );
    for r in policy::host_input(allow, drop) {
        s.push_str(&format!("        {iif} {}\n", r.nft()));
    }
    s.push_str(&format!("        {iif} drop\n"));
    s
}

/// Whether `name` is safe to write into an nft script between quotes and is a possible
/// interface name: 1-15 of `A-Z a-z 0-9 . _ -`.
fn valid_ifname(name: &str) -> bool {
    (1..=IFNAMSIZ_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A MAC address in canonical form (`52:54:00:ab:cd:ef`, lowercase), if `mac` is one.
fn canonical_mac(mac: &str) -> Option<String> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| mac.to_ascii_lowercase())
}

/// Bridge mode of one host group.
#[derive(Debug, Clone, PartialEq)]
pub struct Bridge {
    pub group: String,
    pub bridge: String,
    /// Gateway address and subnet, e.g. 192.168.137.1/24.
    pub gateway: Ipv4Addr,
    pub subnet: Net,
    /// The name of both of the group's tables: `inet` (routing to the host and beyond) and
    /// `bridge` (what a VM may put on the bridge).
    pub table: String,
    /// The group's allow and drop lists, enforced on traffic from the bridge.
    pub allow: Vec<String>,
    pub drop: Vec<String>,
}

/// A VM's port on its group's bridge: the TAP and the one MAC and IPv4 address the frames
/// entering the bridge from it may carry (Ethernet source, ARP sender, IPv4 source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// The group's tables ([`Bridge::table`]).
    pub table: String,
    pub tap: String,
    pub mac: String,
    pub ip: Ipv4Addr,
}

impl Port {
    /// The port's elements of the bridge table's sets, in nft syntax.
    fn elements(&self) -> [(&'static str, String); 3] {
        let (t, m, a) = (&self.tap, &self.mac, self.ip);
        [
            ("vmports", format!("\"{t}\"")),
            ("vmip", format!("\"{t}\" . {m} . {a}")),
            ("vmarp", format!("\"{t}\" . {m} . {m} . {a}")),
        ]
    }

    /// Removes the TAP and the port's pinning; missing pieces are fine.
    pub async fn remove(&self) {
        for (set, e) in self.elements() {
            let _ = run(
                "nft",
                &["delete", "element", "bridge", &self.table, set, &format!("{{ {e} }}")],
                None,
            )
            .await;
        }
        let _ = ip(&["link", "del", &self.tap]).await;
    }
}

impl Bridge {
    pub fn new(group: &str, bridge: &str, gateway_cidr: &str, allow: Vec<String>, drop: Vec<String>) -> Result<Bridge> {
        let (gw, _) = gateway_cidr.split_once('/').unwrap_or((gateway_cidr, "24"));
        let invalid = || Error::InvalidGateway {
            gateway: gateway_cidr.to_string(),
        };
        let gateway: Ipv4Addr = gw.parse().map_err(|_| invalid())?;
        let subnet = Net::parse(gateway_cidr).ok_or_else(invalid)?;
        if !valid_ifname(bridge) {
            return Err(Error::InvalidName { name: bridge.into() });
        }
        Ok(Bridge {
            group: group.into(),
            bridge: bridge.into(),
            gateway,
            subnet,
            table: format!("{TABLE_PREFIX}br-{group}"),
            allow,
            drop,
        })
    }

    /// The port of a VM with `mac` and `ip` on TAP `tap`.
    pub fn port(&self, tap: &str, mac: &str, ip: Ipv4Addr) -> Result<Port> {
        if !valid_ifname(tap) {
            return Err(Error::InvalidName { name: tap.into() });
        }
        let mac = canonical_mac(mac).ok_or_else(|| Error::InvalidMac { mac: mac.into() })?;
        Ok(Port {
            table: self.table.clone(),
            tap: tap.into(),
            mac,
            ip,
        })
    }

    /// The group's tables, with `ports` pinned.
    ///
    /// `inet`: forward — VMs of this bridge reach each other (frames between them pass here
    /// only when br_netfilter hands bridged traffic to nftables); nothing else opens a
    /// connection to them (other groups' VMs, bridge or isolated, included); their traffic out
    /// is filtered like an isolated VM's, then accepted. Input: the host answers only replies
    /// and entries naming one of its addresses. Both count each VM's connections
    /// ([`CONNTRACK_PER_VM`]).
    ///
    /// `bridge`: a frame entering the bridge from a port passes only as IPv4 or ARP whose
    /// Ethernet source, ARP sender (hardware and protocol) and IPv4 source are that port's VM's
    /// (sets `vmip`, `vmarp`: one element each per [`Port`]); every other frame from a port of
    /// this bridge is dropped (forged MACs, ARP claims for the gateway's or a neighbour's
    /// address, IPv6, VLAN tags, other ether types; a port nobody registered).
    pub fn ruleset(&self, ports: &[Port]) -> String {
        let b = &self.bridge;
        let iif = format!("iifname \"{b}\"");
        let elements = |set: &str| -> String {
            let e: Vec<String> = ports
                .iter()
                .flat_map(|p| p.elements())
                .filter(|(s, _)| *s == set)
                .map(|(_, e)| e)
                .collect();
            match e.is_empty() {
                true => String::new(),
                false => format!("        elements = {{ {} }}\n", e.join(", ")),
            }
        };
        format!(
            "table inet {t} {{
{CT_SETS}    chain forward {{
        type filter hook forward priority filter; policy accept;
{v6}        {iif} ip saddr != {s} drop
{ct}        {iif} oifname \"{b}\" accept
        oifname \"{b}\" ct state established,related accept
        oifname \"{b}\" drop
        {iif} ct state established,related accept
{fwd}        {iif} accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
{input}    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {s} ip daddr != {s} masquerade
    }}
}}
table bridge {t} {{
    set vmports {{
        type ifname;
{vmports}    }}
    set vmip {{
        type ifname . ether_addr . ipv4_addr;
{vmip}    }}
    set vmarp {{
        type ifname . ether_addr . ether_addr . ipv4_addr;
{vmarp}    }}
    chain prerouting {{
        type filter hook prerouting priority filter; policy accept;
        iifname != @vmports accept
        iifname . ether saddr . ip saddr @vmip accept
        arp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . ether saddr . arp saddr ether . arp saddr ip @vmarp accept
        counter drop
    }}
}}
",
            t = self.table,
            s = self.subnet,
            v6 = ipv6_drop(&iif),
            ct = conntrack_limit(&iif),
            fwd = forward_rules(&iif, &self.allow, &self.drop),
            input = input_rules(&iif, &format!("ip saddr != {} drop", self.subnet), &self.allow, &self.drop),
            vmports = elements("vmports"),
            vmip = elements("vmip"),
            vmarp = elements("vmarp"),
        )
    }

    /// Creates the bridge (if missing) and (again) the group's tables, with `ports` (those of
    /// VMs that run on: adopted after a restart) pinned.
    pub async fn setup(&self, ports: &[Port]) -> Result<()> {
        enable_forwarding().await?;
        let b = self.bridge.as_str();
        if ip(&["link", "show", b]).await.is_err() {
            ip(&["link", "add", b, "type", "bridge"]).await?;
        }
        disable_ipv6(b).await?;
        let _ = ip(&[
            "addr",
            "replace",
            &format!("{}/{}", self.gateway, self.subnet.prefix),
            "dev",
            b,
        ])
        .await;
        ip(&["link", "set", b, "up"]).await?;
        self.delete_tables().await;
        nft_script(&self.ruleset(ports)).await
    }

    async fn delete_tables(&self) {
        for family in ["inet", "bridge"] {
            let _ = run("nft", &["delete", "table", family, &self.table], None).await;
        }
    }

    /// Pins the port's addresses, then creates its TAP on the bridge. Undone by
    /// [`Port::remove`], also after a partial failure.
    pub async fn add_port(&self, port: &Port) -> Result<()> {
        let r = self.add_port_inner(port).await;
        if r.is_err() {
            port.remove().await;
        }
        r
    }

    async fn add_port_inner(&self, port: &Port) -> Result<()> {
        let tap = port.tap.as_str();
        // A leftover TAP of this name goes, and so do its elements (they name the TAP).
        port.remove().await;
        let script: String = port
            .elements()
            .iter()
            .map(|(set, e)| format!("add element bridge {} {set} {{ {e} }}\n", port.table))
            .collect();
        nft_script(&script).await?;
        ip(&["tuntap", "add", "dev", tap, "mode", "tap"]).await?;
        disable_ipv6(tap).await?;
        ip(&["link", "set", tap, "master", &self.bridge]).await?;
        ip(&["link", "set", tap, "up"]).await?;
        Ok(())
    }

    pub async fn teardown(&self) {
        self.delete_tables().await;
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
mod tests;
