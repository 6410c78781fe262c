//! Drop and allow lists → ordered nftables rules.
//!
//! Entries are CIDRs, addresses or `address:port`. The most specific entry wins: longer
//! prefixes first, an entry with a port before one without, and allow before drop on a tie.
//! Traffic that matches nothing is allowed, except when only an allow list is given (then
//! everything else is dropped), as SlicerVM documents.

use crate::Net;

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
    fn entries_parse() {
        assert_eq!(parse_entry("10.0.0.1:80").unwrap().1, Some(80));
        assert!(parse_entry("10.0.0.1:0").is_none());
        assert!(parse_entry("300.0.0.1").is_none());
        assert_eq!(parse_entry("10.0.0.0/8").unwrap().0.prefix, 8);
    }
}
