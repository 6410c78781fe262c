//! Drop and allow lists → ordered nftables rules.
//!
//! Entries are CIDRs, addresses or `address:port`. The most specific entry wins: longer
//! prefixes first, an entry with a port before one without, and allow before drop on a tie.
//! Traffic that matches nothing is allowed, except when only an allow list is given (then
//! everything else is dropped), as SlicerVM documents.
//!
//! Two containment rules sit on top of the lists: cloud metadata addresses and link-local
//! 169.254.0.0/16 ([`GUARDED`]) are dropped unless an entry of /16 or longer names them
//! ([`guard_metadata`]), and a host address is reachable only through an entry naming that one
//! address ([`host_input`]).

use crate::Net;
#[cfg(test)]
use crate::METADATA_V4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub net: Net,
    pub port: Option<u16>,
    pub verdict: Verdict,
}

impl Rule {
    /// The match and verdict in nft syntax.
    pub fn nft(&self) -> String {
        let v = match self.verdict {
            Verdict::Accept => "accept",
            Verdict::Drop => "drop",
        };
        match self.port {
            Some(p) => format!("ip daddr {} meta l4proto {{ tcp, udp }} th dport {p} {v}", self.net),
            None => format!("ip daddr {} {v}", self.net),
        }
    }
}

/// Parses one entry; `None` when malformed.
pub fn parse_entry(s: &str) -> Option<(Net, Option<u16>)> {
    if let Some((addr, port)) = s.rsplit_once(':') {
        let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
        return Some((Net::parse(addr)?, Some(port)));
    }
    Some((Net::parse(s)?, None))
}

/// Orders the lists into first-match rules (malformed entries are skipped: the config and
/// the API validate them first).
pub fn compile(allow: &[String], drop: &[String]) -> Vec<Rule> {
    let mut rules: Vec<Rule> = Vec::new();
    for (list, verdict) in [(allow, Verdict::Accept), (drop, Verdict::Drop)] {
        for e in list {
            if let Some((net, port)) = parse_entry(e) {
                rules.push(Rule { net, port, verdict });
            }
        }
    }
    rules.sort_by_key(|r| {
        (
            std::cmp::Reverse(r.net.prefix),
            r.port.is_none(),
            r.verdict == Verdict::Drop,
        )
    });
    rules.dedup();
    if !allow.is_empty() && drop.is_empty() {
        rules.push(Rule {
            net: Net::parse("0.0.0.0/0").expect("literal"),
            port: None,
            verdict: Verdict::Drop,
        });
    }
    rules
}

/// Destinations no VM reaches unless an entry names them (see [`guard_metadata`]): cloud
/// metadata services and the link-local range they live in. Shown in docs/ARCHITECTURE.md.
pub const GUARDED: &[(&str, &str)] = &[
    (
        "169.254.0.0/16",
        "link-local: metadata at 169.254.169.254 (AWS, GCP, Azure, OCI, OpenStack, DigitalOcean, ...), \
         AWS ECS task metadata 169.254.170.2, EKS pod identity 169.254.170.23, Tencent 169.254.0.23, \
         Scaleway 169.254.42.42, AWS DNS and NTP 169.254.169.253/.123",
    ),
    (
        "100.100.100.200/32",
        "Alibaba Cloud metadata (in the CGNAT range 100.64.0.0/10)",
    ),
    ("168.63.129.16/32", "Azure wire server (and Azure's DNS)"),
    ("192.0.0.192/32", "Oracle Cloud's legacy metadata"),
];

/// The [`GUARDED`] networks.
pub fn guarded() -> Vec<Net> {
    GUARDED
        .iter()
        .map(|(n, _)| Net::parse(n).expect("a valid literal"))
        .collect()
}

/// Whether an entry names a guarded network: a prefix of /16 or longer that overlaps it
/// (`0.0.0.0/0`, `100.64.0.0/10` or `169.0.0.0/8` do not).
fn names(entry: &Net, guarded: &Net) -> bool {
    entry.prefix >= 16 && entry.overlaps(guarded)
}

/// `rules` with a drop of each [`GUARDED`] network (the metadata addresses and link-local
/// 169.254.0.0/16) inserted right after the last rule that names it (see [`names`]): only such
/// entries decide its fate, broad ones never open it; an entry naming one address of it opens
/// that address only. With no such entry, the drop comes first.
pub fn guard_metadata(mut rules: Vec<Rule>) -> Vec<Rule> {
    for net in guarded() {
        let at = rules.iter().rposition(|r| names(&r.net, &net)).map_or(0, |i| i + 1);
        rules.insert(
            at,
            Rule {
                net,
                port: None,
                verdict: Verdict::Drop,
            },
        );
    }
    rules
}

/// The rules for traffic from a VM to the host's own addresses, before a final drop: only
/// entries naming one address (a /32 or `address:port`) count, so `10.0.0.0/8` in an allow
/// list does not open the host's 10.x addresses.
pub fn host_input(allow: &[String], drop: &[String]) -> Vec<Rule> {
    compile(allow, drop)
        .into_iter()
        .filter(|r| r.net.prefix == 32)
        .collect()
}

/// The verdict the rules give `dst:port` (the same first-match the kernel applies).
pub fn decide(rules: &[Rule], dst: std::net::Ipv4Addr, port: u16) -> Verdict {
    rules
        .iter()
        .find(|r| r.net.contains(dst) && r.port.is_none_or(|p| p == port))
        .map(|r| r.verdict)
        .unwrap_or(Verdict::Accept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn most_specific_wins_and_allow_wins_ties() {
        // LAN blocked, everything else allowed.
        let r = compile(&v(&["0.0.0.0/0"]), &v(&["192.168.1.0/24"]));
        assert_eq!(decide(&r, "192.168.1.5".parse().unwrap(), 80), Verdict::Drop);
        assert_eq!(decide(&r, "8.8.8.8".parse().unwrap(), 53), Verdict::Accept);
        // Everything blocked but a proxy port.
        let r = compile(&v(&["10.0.0.1:3128"]), &v(&["0.0.0.0/0"]));
        assert_eq!(decide(&r, "10.0.0.1".parse().unwrap(), 3128), Verdict::Accept);
        assert_eq!(decide(&r, "10.0.0.1".parse().unwrap(), 22), Verdict::Drop);
        assert_eq!(decide(&r, "1.1.1.1".parse().unwrap(), 3128), Verdict::Drop);
        // A tie: allow wins.
        let r = compile(&v(&["10.1.0.0/16"]), &v(&["10.1.0.0/16"]));
        assert_eq!(decide(&r, "10.1.2.3".parse().unwrap(), 1), Verdict::Accept);
        // Only an allow list: the rest is dropped. Neither: all allowed.
        let r = compile(&v(&["10.2.0.0/16"]), &[]);
        assert_eq!(decide(&r, "10.3.0.1".parse().unwrap(), 1), Verdict::Drop);
        assert!(compile(&[], &[]).is_empty());
    }

    #[test]
    fn metadata_is_opened_only_by_entries_naming_it() {
        let md = METADATA_V4;
        // Broad allows do not open it; other destinations keep their verdicts.
        for allow in [&["0.0.0.0/0"][..], &["128.0.0.0/1"], &["169.0.0.0/8"]] {
            let r = guard_metadata(compile(&v(allow), &[]));
            assert_eq!(decide(&r, md, 80), Verdict::Drop, "{allow:?}");
        }
        let r = guard_metadata(compile(&v(&["0.0.0.0/0"]), &v(&["192.168.1.0/24"])));
        let mut firsts: Vec<String> = r[..GUARDED.len()].iter().map(|r| r.net.to_string()).collect();
        let mut all: Vec<&str> = GUARDED.iter().map(|(n, _)| *n).collect();
        firsts.sort();
        all.sort();
        assert_eq!(firsts, all);
        assert!(r[..GUARDED.len()].iter().all(|r| r.verdict == Verdict::Drop));
        assert_eq!(decide(&r, "8.8.8.8".parse().unwrap(), 53), Verdict::Accept);
        assert_eq!(decide(&r, "192.168.1.1".parse().unwrap(), 53), Verdict::Drop);
        // Every cloud's metadata and the rest of link-local too.
        for a in [
            "169.254.169.253",
            "169.254.0.23",
            "169.254.170.2",
            "169.254.8.1",
            "100.100.100.200",
            "168.63.129.16",
            "192.0.0.192",
        ] {
            assert_eq!(decide(&r, a.parse().unwrap(), 80), Verdict::Drop, "{a}");
        }
        // Their neighbours are not guarded: CGNAT space and the rest stay the lists' business.
        for a in ["100.100.100.100", "100.64.0.1", "168.63.129.17", "192.0.0.193"] {
            assert_eq!(decide(&r, a.parse().unwrap(), 80), Verdict::Accept, "{a}");
        }
        // A broad CGNAT allow does not open Alibaba's address; a /16 does.
        let r = guard_metadata(compile(&v(&["100.64.0.0/10"]), &[]));
        assert_eq!(decide(&r, "100.100.100.200".parse().unwrap(), 80), Verdict::Drop);
        assert_eq!(decide(&r, "100.100.100.100".parse().unwrap(), 80), Verdict::Accept);
        let r = guard_metadata(compile(&v(&["100.100.0.0/16"]), &[]));
        assert_eq!(decide(&r, "100.100.100.200".parse().unwrap(), 80), Verdict::Accept);
        // No lists at all: still dropped.
        assert_eq!(decide(&guard_metadata(compile(&[], &[])), md, 80), Verdict::Drop);
        // Entries of /16 or longer that contain it open it.
        for allow in ["169.254.169.254/32", "169.254.169.254", "169.254.0.0/16"] {
            let r = guard_metadata(compile(&v(&["0.0.0.0/0", allow]), &[]));
            assert_eq!(decide(&r, md, 80), Verdict::Accept, "{allow}");
        }
        // A port entry opens that port only, even beside 0.0.0.0/0.
        let r = guard_metadata(compile(&v(&["0.0.0.0/0", "169.254.169.254:80"]), &[]));
        assert_eq!(decide(&r, md, 80), Verdict::Accept);
        assert_eq!(decide(&r, md, 22), Verdict::Drop);
        assert_eq!(decide(&r, "8.8.8.8".parse().unwrap(), 22), Verdict::Accept);
        // A more specific drop still wins over the allow that names it.
        let r = guard_metadata(compile(&v(&["169.254.0.0/16"]), &v(&["169.254.169.0/24"])));
        assert_eq!(decide(&r, md, 80), Verdict::Drop);
        assert_eq!(decide(&r, "169.254.0.23".parse().unwrap(), 80), Verdict::Accept);
        // Naming one address of link-local opens that one, not the rest.
        let r = guard_metadata(compile(&v(&["0.0.0.0/0", "169.254.170.2/32"]), &[]));
        assert_eq!(decide(&r, "169.254.170.2".parse().unwrap(), 80), Verdict::Accept);
        assert_eq!(decide(&r, md, 80), Verdict::Drop);
        assert_eq!(decide(&r, "169.254.0.23".parse().unwrap(), 80), Verdict::Drop);
        for allow in ["168.63.129.16/32", "192.0.0.192:80", "168.63.0.0/16"] {
            let r = guard_metadata(compile(&v(&["0.0.0.0/0", allow]), &[]));
            let (addr, _) = parse_entry(allow).unwrap();
            let addr = if addr.prefix == 16 {
                "168.63.129.16".parse().unwrap()
            } else {
                addr.addr
            };
            assert_eq!(decide(&r, addr, 80), Verdict::Accept, "{allow}");
            assert_eq!(decide(&r, md, 80), Verdict::Drop, "{allow}");
        }
    }

    #[test]
    fn guarded_networks_do_not_overlap() {
        let g = guarded();
        for (i, a) in g.iter().enumerate() {
            for b in &g[i + 1..] {
                assert!(!a.overlaps(b), "{a} {b}");
            }
        }
        assert!(g.iter().any(|n| n.contains(METADATA_V4)));
    }

    #[test]
    fn only_single_address_entries_open_the_host() {
        let r = host_input(&v(&["10.0.0.0/8", "0.0.0.0/0", "192.168.1.0/24"]), &[]);
        assert!(r.is_empty(), "{r:?}");
        let r = host_input(
            &v(&["10.0.0.1/32", "10.0.0.2:8080", "10.0.0.0/8"]),
            &v(&["10.0.0.1:22"]),
        );
        let nets: Vec<String> = r.iter().map(|r| r.nft()).collect();
        assert_eq!(
            nets,
            [
                "ip daddr 10.0.0.2/32 meta l4proto { tcp, udp } th dport 8080 accept",
                "ip daddr 10.0.0.1/32 meta l4proto { tcp, udp } th dport 22 drop",
                "ip daddr 10.0.0.1/32 accept",
            ]
        );
    }

    #[test]
    fn entries_parse() {
        assert_eq!(parse_entry("10.0.0.1:80").unwrap().1, Some(80));
        assert!(parse_entry("10.0.0.1:0").is_none());
        assert!(parse_entry("300.0.0.1").is_none());
        assert_eq!(parse_entry("10.0.0.0/8").unwrap().0.prefix, 8);
    }
}
