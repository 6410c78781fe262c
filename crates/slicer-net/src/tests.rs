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
    let host = Net {
        addr: a.nth(7),
        prefix: 32,
    };
    let b = derived_range("sandbox", &[host]);
    assert_ne!(a, b);
    // Another group's range counts as used too.
    let c = derived_range("sandbox", &[Net::parse("169.254.0.0/17").unwrap()]);
    assert!(c.addr.octets()[2] >= 128, "{c}");
}

#[test]
fn derived_ranges_never_hold_the_metadata_block() {
    let md = Net::parse("169.254.168.0/22").unwrap();
    // Every group name maps somewhere; none of them to the metadata block, even when all
    // other blocks are taken.
    for i in 0..2000 {
        let r = derived_range(&format!("g{i}"), &[]);
        assert!(!r.overlaps(&md), "g{i} got {r}");
        assert!(!r.contains(METADATA_V4));
    }
    let all_but_md: Vec<Net> = (1..=62u32)
        .filter(|b| *b != 42)
        .map(|b| Net {
            addr: Ipv4Addr::new(169, 254, (b * 4) as u8, 0),
            prefix: 22,
        })
        .collect();
    assert!(!derived_range("sandbox", &all_but_md).overlaps(&md));
}

#[test]
fn vm_subnets_skip_the_metadata_block() {
    let r = Net::parse("169.254.168.0/22").unwrap();
    let subnets: Vec<Net> = vm_subnets(r).collect();
    assert_eq!(subnets.len(), 256 - 64);
    assert!(subnets.iter().all(|n| !n.overlaps(&METADATA_BLOCK) && n.prefix == 30));
    assert_eq!(subnets[63].to_string(), "169.254.168.252/30");
    assert_eq!(subnets[64].to_string(), "169.254.170.0/30");
    assert_eq!(vm_subnets(Net::parse("169.254.169.0/24").unwrap()).count(), 0);
    assert_eq!(vm_subnets(Net::parse("169.254.169.128/28").unwrap()).count(), 0);
    let plain: Vec<String> = vm_subnets(Net::parse("169.254.200.0/28").unwrap())
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        plain,
        [
            "169.254.200.0/30",
            "169.254.200.4/30",
            "169.254.200.8/30",
            "169.254.200.12/30"
        ]
    );
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
fn bad_gateways_are_typed() {
    for bad in ["10.0.0/24", "10.0.0.1/40", "gw"] {
        let e = Bridge::new("g", "brg0", bad, vec![], vec![]).unwrap_err();
        assert!(matches!(e, Error::InvalidGateway { .. }), "{bad}: {e}");
        assert!(e.to_string().contains(bad));
    }
}

#[tokio::test]
async fn a_missing_program_is_a_spawn_error() {
    let e = run("slicer-no-such-program", &[], None).await.unwrap_err();
    assert!(e.is_not_installed(), "{e:#}");
    assert!(std::error::Error::source(&e).is_some());
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

/// The lines of one chain of a ruleset.
fn chain<'a>(r: &'a str, name: &str) -> Vec<&'a str> {
    let start = r.find(&format!("chain {name} {{")).unwrap();
    r[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.trim() != "}")
        .map(str::trim)
        .collect()
}

#[test]
fn isolated_ruleset_contains_metadata_host_and_ipv6() {
    let mk = |allow: &[&str]| {
        Isolated::new(
            "sb-1",
            Net::parse("169.254.8.0/30").unwrap(),
            allow.iter().map(|s| s.to_string()).collect(),
            vec![],
        )
    };
    let i = mk(&["0.0.0.0/0", "10.0.0.0/8", "10.1.2.3/32", "10.1.2.4:443"]);
    let v = format!("iifname \"{}\"", i.host_veth);
    let r = i.ruleset();
    let fwd = chain(&r, "forward");
    // IPv6 from the VM goes first; the metadata drop precedes every allow.
    assert_eq!(fwd[0], format!("{v} ip6 daddr fd00:ec2::254 counter drop"));
    assert_eq!(fwd[1], format!("{v} meta nfproto ipv6 counter drop"));
    let md = fwd
        .iter()
        .position(|l| *l == format!("{v} ip daddr 169.254.0.0/16 drop"))
        .expect("link-local drop");
    for (net, _) in policy::GUARDED {
        assert!(fwd.contains(&format!("{v} ip daddr {net} drop").as_str()), "{net}: {r}");
    }
    // The source is pinned, then new connections are counted, before anything accepts.
    let ct = format!("{v} ct state new add @vmconns {{ ip saddr ct count over {CONNTRACK_PER_VM} }} counter drop");
    let rate = format!(
            "{v} ct state new add @vmrate {{ ip saddr limit rate over {NEW_CONNECTIONS_PER_SEC}/second burst {NEW_CONNECTIONS_PER_SEC} packets }} counter drop"
        );
    assert_eq!(fwd[4], format!("{v} ip saddr != 169.254.8.2 drop"));
    assert_eq!(fwd[5], rate);
    assert_eq!(fwd[6], ct);
    assert!(r.contains("set vmconns {"), "{r}");
    let first_allow = fwd
        .iter()
        .position(|l| l.ends_with("accept") && l.contains("ip daddr"))
        .unwrap();
    assert!(md < first_allow, "{r}");
    // Input: only the single addresses open the host.
    let input = chain(&r, "input");
    assert_eq!(
        input,
        [
            format!("{v} meta nfproto ipv6 counter drop"),
            format!("{v} ip saddr != 169.254.8.2 drop"),
            rate.clone(),
            ct.clone(),
            format!("{v} ct state established,related accept"),
            format!("{v} ip daddr 10.1.2.4/32 meta l4proto {{ tcp, udp }} th dport 443 accept"),
            format!("{v} ip daddr 10.1.2.3/32 accept"),
            format!("{v} drop"),
        ]
    );
    // Naming the metadata address opens it: the drop sits after that entry.
    let r = mk(&["169.254.169.254/32"]).ruleset();
    let fwd = chain(&r, "forward");
    let allow = fwd
        .iter()
        .position(|l| l.ends_with("ip daddr 169.254.169.254/32 accept"))
        .unwrap();
    let md = fwd
        .iter()
        .position(|l| l.ends_with("ip daddr 169.254.0.0/16 drop"))
        .unwrap();
    assert!(allow < md, "{r}");
}

/// `nft -c` (check only, nothing is changed) accepts both rulesets.
#[tokio::test]
#[ignore = "full tier: needs root and nft (scripts/test.sh runs it)"]
async fn rulesets_pass_nft_check() {
    let i = Isolated::new(
        "sb-1",
        Net::parse("169.254.8.0/30").unwrap(),
        vec!["0.0.0.0/0".into(), "10.0.0.1:80".into(), "169.254.169.254/32".into()],
        vec!["192.168.1.0/24".into()],
    );
    let b = Bridge::new("g", "brg0", "198.19.77.1/24", vec!["10.0.0.1/32".into()], vec![]).unwrap();
    let ports = [
        b.port("gtap2", "52:54:00:AA:bb:01", Ipv4Addr::new(198, 19, 77, 2))
            .unwrap(),
        b.port("gtap3", "52:54:00:aa:bb:02", Ipv4Addr::new(198, 19, 77, 3))
            .unwrap(),
    ];
    for r in [i.ruleset(), b.ruleset(&[]), b.ruleset(&ports)] {
        run("nft", &["-c", "-f", "-"], Some(&r))
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{r}"));
    }
}

#[test]
fn bridge_ruleset_shuts_the_group_in() {
    let b = Bridge::new(
        "g",
        "brg0",
        "198.19.77.1/24",
        vec!["0.0.0.0/0".into()],
        vec!["192.168.1.0/24".into()],
    )
    .unwrap();
    assert_eq!(b.gateway, Ipv4Addr::new(198, 19, 77, 1));
    let port = b
        .port("gtap2", "52:54:00:AA:bb:01", Ipv4Addr::new(198, 19, 77, 2))
        .unwrap();
    assert_eq!(port.mac, "52:54:00:aa:bb:01");
    let r = b.ruleset(std::slice::from_ref(&port));
    let i = "iifname \"brg0\"";
    let ct = format!("{i} ct state new add @vmconns {{ ip saddr ct count over {CONNTRACK_PER_VM} }} counter drop");
    let rate = format!(
            "{i} ct state new add @vmrate {{ ip saddr limit rate over {NEW_CONNECTIONS_PER_SEC}/second burst {NEW_CONNECTIONS_PER_SEC} packets }} counter drop"
        );
    let guards: Vec<String> = policy::guard_metadata(vec![])
        .iter()
        .map(|r| format!("{i} {}", r.nft()))
        .collect();
    let mut want = vec![
        format!("{i} ip6 daddr fd00:ec2::254 counter drop"),
        format!("{i} meta nfproto ipv6 counter drop"),
        format!("{i} ip saddr != 198.19.77.0/24 drop"),
        rate.clone(),
        ct.clone(),
        format!("{i} oifname \"brg0\" accept"),
        "oifname \"brg0\" ct state established,related accept".to_string(),
        "oifname \"brg0\" drop".to_string(),
        format!("{i} ct state established,related accept"),
    ];
    want.extend(guards);
    want.extend([
        format!("{i} ip daddr 192.168.1.0/24 drop"),
        format!("{i} ip daddr 0.0.0.0/0 accept"),
        format!("{i} accept"),
    ]);
    assert_eq!(chain(&r, "forward"), want);
    assert_eq!(
        chain(&r, "input"),
        [
            format!("{i} meta nfproto ipv6 counter drop"),
            format!("{i} ip saddr != 198.19.77.0/24 drop"),
            rate,
            ct,
            format!("{i} ct state established,related accept"),
            format!("{i} drop"),
        ]
    );
    // The bridge table: only the port's own MAC and address pass, in IPv4 and ARP.
    assert_eq!(
            chain(&r, "prerouting"),
            [
                "iifname != @vmports accept",
                "iifname . ether saddr . ip saddr @vmip accept",
                "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . ether saddr . arp saddr ether . arp saddr ip @vmarp accept",
                "counter drop",
            ]
        );
    assert!(
        r.contains("elements = { \"gtap2\" . 52:54:00:aa:bb:01 . 198.19.77.2 }"),
        "{r}"
    );
    assert!(
        r.contains("elements = { \"gtap2\" . 52:54:00:aa:bb:01 . 52:54:00:aa:bb:01 . 198.19.77.2 }"),
        "{r}"
    );
    // Names and MACs that would not be safe in the script are refused.
    assert!(b.port("tap\"; flush ruleset", "52:54:00:00:00:01", port.ip).is_err());
    assert!(b.port("gtap3", "52:54:00:00:00:01 } ", port.ip).is_err());
    assert!(Bridge::new("g", "br g", "198.19.77.1/24", vec![], vec![]).is_err());
    assert!(r.contains("ip saddr 198.19.77.0/24 ip daddr != 198.19.77.0/24 masquerade"));
}
