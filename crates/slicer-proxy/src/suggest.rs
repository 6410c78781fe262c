//! `slicer proxy suggest CLIENT`: the smallest set of allow rules covering what the audit log saw.
//!
//! Only denials a rule can fix count (no rule, no match, passthrough only); the others (no
//! token, an upstream the proxy may never reach) are left out. One rule per host and kind:
//! passthrough for what was spliced as raw TCP, else an HTTP rule with the methods seen and the
//! paths seen (exact when few, else their longest common `prefix/*`, else any path). A host seen
//! only at CONNECT time (strict mode denies before any request is read) gets a host and port
//! rule. Ports are given only when one outside 80 and 443 was seen.

use slicer_api::AddProxyAllowRequest;

use crate::control::Decision;
use crate::rules::{normalize_host, PathPattern, Rule, DEFAULT_PORTS};

/// Up to this many distinct paths are listed one by one.
pub const MAX_EXACT_PATHS: usize = 5;

/// Denial reasons a rule can fix.
fn fixable(reason: &str) -> bool {
    matches!(reason, "" | "no-rule" | "no-match" | "passthrough-only")
}

#[derive(Default)]
struct Seen {
    client: String,
    host: String,
    passthrough: bool,
    ports: Vec<u16>,
    methods: Vec<String>,
    paths: Vec<String>,
    /// A path that is not plain (never allowed by a path rule).
    odd_path: bool,
    /// A method that is not an HTTP token.
    odd_method: bool,
    /// Only CONNECTs (no inner request) were seen.
    requests: bool,
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

/// The rules that would have allowed every fixable denial in `decisions`, first-seen host first.
pub fn suggest(decisions: &[Decision]) -> Vec<AddProxyAllowRequest> {
    let mut seen: Vec<Seen> = Vec::new();
    for d in decisions {
        if d.allow || d.client.is_empty() || !fixable(&d.reason) {
            continue;
        }
        let Ok(host) = normalize_host(&d.host) else { continue };
        let passthrough = d.scheme == "tcp";
        let i = match seen.iter().position(|s| s.host == host && s.passthrough == passthrough) {
            Some(i) => i,
            None => {
                seen.push(Seen {
                    client: d.client.clone(),
                    host: host.clone(),
                    passthrough,
                    ..Seen::default()
                });
                seen.len() - 1
            }
        };
        let s = &mut seen[i];
        if d.port != 0 {
            push_unique(&mut s.ports, d.port);
        }
        if passthrough || d.method.eq_ignore_ascii_case("CONNECT") {
            continue;
        }
        s.requests = true;
        let method = d.method.to_ascii_uppercase();
        if method.is_empty()
            || method.len() > 32
            || !method
                .bytes()
                .all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')
        {
            s.odd_method = true;
        } else {
            push_unique(&mut s.methods, method);
        }
        match PathPattern::parse(&d.path) {
            Ok(PathPattern::Exact(p)) => push_unique(&mut s.paths, p),
            _ => s.odd_path = true,
        }
    }
    seen.into_iter().filter_map(rule_for).collect()
}

fn rule_for(s: Seen) -> Option<AddProxyAllowRequest> {
    let mut ports = s.ports;
    ports.sort_unstable();
    if ports.iter().all(|p| DEFAULT_PORTS.contains(p)) {
        ports.clear();
    }
    let mut req = AddProxyAllowRequest {
        client: s.client,
        host: s.host,
        ports,
        passthrough: s.passthrough,
        ..AddProxyAllowRequest::default()
    };
    if !s.passthrough && s.requests {
        if !s.odd_method {
            let mut m = s.methods;
            m.sort();
            req.methods = m;
        }
        if !s.odd_path {
            req.paths = covering_paths(s.paths);
        }
    }
    // What the daemon would refuse is suggested without the part it refuses.
    if Rule::from_request(&req, 0).is_err() {
        req.methods.clear();
        req.paths.clear();
        Rule::from_request(&req, 0).ok()?;
    }
    Some(req)
}

/// Exact paths when few, else `prefix/*` over their longest common directory, else none (any).
fn covering_paths(mut paths: Vec<String>) -> Vec<String> {
    if paths.is_empty() {
        return paths;
    }
    if paths.len() <= MAX_EXACT_PATHS {
        paths.sort();
        return paths;
    }
    // The directory segments of each path (all but the last); their common front.
    let dirs: Vec<Vec<&str>> = paths
        .iter()
        .map(|p| {
            let segs: Vec<&str> = p.split('/').skip(1).collect();
            segs[..segs.len().saturating_sub(1)].to_vec()
        })
        .collect();
    let mut common: Vec<&str> = dirs[0].clone();
    for d in &dirs[1..] {
        let n = common.iter().zip(d).take_while(|(a, b)| a == b).count();
        common.truncate(n);
    }
    if common.is_empty() {
        return Vec::new();
    }
    vec![format!("/{}/*", common.join("/"))]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny(method: &str, scheme: &str, host: &str, port: u16, path: &str) -> Decision {
        Decision {
            client: "c".into(),
            method: method.into(),
            scheme: scheme.into(),
            host: host.into(),
            port,
            path: path.into(),
            reason: "no-rule".into(),
            ..Decision::default()
        }
    }

    #[test]
    fn one_rule_per_host_with_the_methods_and_paths_seen() {
        let got = suggest(&[
            deny("GET", "https", "API.example.com", 443, "/v1/models"),
            deny("post", "https", "api.example.com", 443, "/v1/chat"),
            deny("GET", "https", "api.example.com", 443, "/v1/models"),
            deny("GET", "http", "other.org", 8080, "/x"),
        ]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].host, "api.example.com");
        assert_eq!(got[0].methods, vec!["GET", "POST"]);
        assert_eq!(got[0].paths, vec!["/v1/chat", "/v1/models"]);
        assert!(got[0].ports.is_empty(), "443 is a default port");
        assert_eq!(
            (got[1].host.as_str(), got[1].ports.as_slice()),
            ("other.org", &[8080][..])
        );
        for r in &got {
            assert!(Rule::from_request(r, 0).is_ok(), "{r:?}");
        }
    }

    #[test]
    fn many_paths_become_their_common_prefix_or_none() {
        let many: Vec<Decision> = (0..8)
            .map(|i| deny("GET", "https", "h.io", 443, &format!("/repos/o/r{i}/issues")))
            .collect();
        assert_eq!(suggest(&many)[0].paths, vec!["/repos/o/*"]);
        let scattered: Vec<Decision> = (0..8)
            .map(|i| deny("GET", "https", "h.io", 443, &format!("/p{i}/x")))
            .collect();
        assert!(suggest(&scattered)[0].paths.is_empty());
        // A prefix always covers what it came from.
        let r = Rule::from_request(&suggest(&many)[0], 0).unwrap();
        assert!(r.paths[0].matches("/repos/o/r3/issues"));
    }

    #[test]
    fn connect_only_passthrough_and_unfixable() {
        let mut no_token = deny("GET", "https", "x.io", 443, "/a");
        no_token.reason = "no-token".into();
        let mut allowed = deny("GET", "https", "y.io", 443, "/a");
        allowed.allow = true;
        let got = suggest(&[
            deny("CONNECT", "https", "strict.io", 443, ""),
            deny("CONNECT", "tcp", "db.internal", 5432, ""),
            no_token,
            allowed,
            deny("GET", "https", "bad host!", 443, "/"),
        ]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].host, "strict.io");
        assert!(got[0].methods.is_empty() && got[0].paths.is_empty() && !got[0].passthrough);
        assert_eq!(got[1].host, "db.internal");
        assert!(got[1].passthrough);
        assert_eq!(got[1].ports, vec![5432]);
    }

    #[test]
    fn odd_paths_give_no_path_filter() {
        let got = suggest(&[
            deny("GET", "https", "h.io", 443, "/a/../b"),
            deny("GET", "https", "h.io", 443, "/ok"),
        ]);
        assert!(got[0].paths.is_empty());
        assert_eq!(got[0].methods, vec!["GET"]);
    }
}
