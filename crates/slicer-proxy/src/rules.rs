//! Allow rules: validation (the daemon's admin API and the proxy both run it) and matching.
//!
//! A client's rules are tried in declaration order and the first that matches wins; no match is
//! a deny. A CONNECT is decided on host and port alone ([`Policy::connect`]): a passthrough rule
//! splices, any other candidate means the proxy terminates TLS and decides each inner request on
//! method and path too ([`Policy::request`]).

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use sha2::{Digest, Sha256};
use slicer_api::{AddProxyAllowRequest, ProxyAllowRule};

use crate::control::{ProxyState, SecretKind, StateSecret};
use crate::error::{Error, Result};

/// Ports a rule without `ports` covers.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];
/// Bounds on one rule (a rule is tenant input).
pub const MAX_HOST_LEN: usize = 253;
pub const MAX_METHODS: usize = 32;
pub const MAX_PATHS: usize = 64;
pub const MAX_PATH_LEN: usize = 2048;
pub const MAX_PORTS: usize = 64;
pub const MAX_NAME_LEN: usize = 128;
/// Longest TTL (ten years).
pub const MAX_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;

/// A rule's host: exact, `*.suffix` (strictly under the suffix) or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    /// `.example.com` for `*.example.com`.
    Suffix(String),
    Exact(String),
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<HostPattern> {
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(rest) = s.strip_prefix("*.") {
            let name = normalize_host(rest).map_err(|r| Error::invalid("host", r))?;
            return Ok(HostPattern::Suffix(format!(".{name}")));
        }
        Ok(HostPattern::Exact(
            normalize_host(s).map_err(|r| Error::invalid("host", r))?,
        ))
    }

    /// `host` must already be normalized ([`normalize_host`]).
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            HostPattern::Exact(h) => h == host,
        }
    }
}

/// Lower-cases a host name or IP literal and checks its characters: letters, digits, `-`, `.`,
/// `_` (and `:` inside brackets for IPv6); a trailing dot is dropped.
pub fn normalize_host(s: &str) -> std::result::Result<String, String> {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.len() > MAX_HOST_LEN {
        return Err(format!("is longer than {MAX_HOST_LEN} bytes"));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner
            .parse::<std::net::Ipv6Addr>()
            .map(|a| format!("[{a}]"))
            .map_err(|_| format!("{s:?} is not an IPv6 address"));
    }
    if let Ok(a) = s.parse::<std::net::Ipv6Addr>() {
        return Ok(format!("[{a}]"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(format!(
            "{:?} has a character a host name cannot have (letters, digits, '-', '.', '_'; '*' only as '*' or a leading '*.')",
            s.escape_debug().to_string()
        ));
    }
    if s.split('.').any(str::is_empty) {
        return Err(format!("{s:?} has an empty label"));
    }
    Ok(s.to_ascii_lowercase())
}

/// A rule's path: exact, `*`, or `prefix/*` (anything strictly under `prefix/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Any,
    Exact(String),
    /// `/system/` for `/system/*`.
    Under(String),
}

impl PathPattern {
    pub fn parse(s: &str) -> Result<PathPattern> {
        if s == "*" {
            return Ok(PathPattern::Any);
        }
        if s.len() > MAX_PATH_LEN {
            return Err(Error::invalid(
                "paths",
                format!("a path is longer than {MAX_PATH_LEN} bytes"),
            ));
        }
        if !s.starts_with('/') {
            return Err(Error::invalid(
                "paths",
                format!("{:?} must start with '/' (or be '*')", s.escape_debug().to_string()),
            ));
        }
        if s.bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#')
        {
            return Err(Error::invalid(
                "paths",
                format!(
                    "{:?} has a space, '?', '#' or a control character",
                    s.escape_debug().to_string()
                ),
            ));
        }
        let (body, under) = match s.strip_suffix("/*") {
            Some(prefix) => (prefix, true),
            None => (s, false),
        };
        if body.contains('*') {
            return Err(Error::invalid(
                "paths",
                format!("{s:?}: '*' may only be the whole path or a trailing '/*'"),
            ));
        }
        if !path_is_plain(if body.is_empty() { "/" } else { body }) {
            return Err(Error::invalid(
                "paths",
                format!("{s:?} has '.' or '..' segments, '//', '\\' or an encoded '.', '/' or '\\'"),
            ));
        }
        Ok(if under {
            PathPattern::Under(format!("{body}/"))
        } else {
            PathPattern::Exact(s.to_string())
        })
    }

    /// `path` is a request's path without its query, already checked by [`path_is_plain`].
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Any => true,
            PathPattern::Exact(p) => p == path,
            PathPattern::Under(p) => path.len() > p.len() && path.starts_with(p.as_str()),
        }
    }

    pub fn text(&self) -> String {
        match self {
            PathPattern::Any => "*".into(),
            PathPattern::Exact(p) => p.clone(),
            PathPattern::Under(p) => format!("{p}*"),
        }
    }
}

/// True when a request path means the same to every server: it starts with `/`, has no `.` or
/// `..` segment, no `//`, no `\`, and no percent-encoded `.`, `/` or `\` (each of which some
/// upstream would normalize into another path than the one a rule allowed).
pub fn path_is_plain(path: &str) -> bool {
    if !path.starts_with('/') || path.contains("//") || path.contains('\\') {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2e") || lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") {
        return false;
    }
    !path.split('/').any(|seg| seg == "." || seg == "..")
}

/// The path part of a request target (`/a/b?x=1` → `/a/b`).
pub fn path_of(target: &str) -> &str {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    &target[..end]
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub host: HostPattern,
    pub secret: Option<String>,
    /// Upper case; empty = any.
    pub methods: Vec<String>,
    /// Empty = any.
    pub paths: Vec<PathPattern>,
    /// Empty = 80 and 443.
    pub ports: Vec<u16>,
    /// Unix seconds; `None` = never.
    pub expires: Option<i64>,
    pub passthrough: bool,
    /// The rule as the API spelled it (for listing and logs).
    pub wire: ProxyAllowRule,
}

impl Rule {
    /// Validates an add request into a rule, its TTL counted from `now` (unix seconds).
    pub fn from_request(req: &AddProxyAllowRequest, now: i64) -> Result<Rule> {
        if req.ttl_seconds > MAX_TTL_SECONDS {
            return Err(Error::invalid(
                "ttl_seconds",
                format!("must be at most {MAX_TTL_SECONDS}"),
            ));
        }
        let expires = (req.ttl_seconds > 0).then(|| now + req.ttl_seconds as i64);
        let wire = ProxyAllowRule {
            host: req.host.clone(),
            secret: req.secret.clone(),
            methods: req.methods.clone(),
            paths: req.paths.clone(),
            ports: req.ports.clone(),
            expires: expires.map(rfc3339),
            passthrough: req.passthrough,
        };
        Rule::from_wire(&wire)
    }

    /// Validates a stored or pushed rule.
    pub fn from_wire(w: &ProxyAllowRule) -> Result<Rule> {
        let host = HostPattern::parse(&w.host)?;
        if w.passthrough && (!w.secret.is_empty() || !w.methods.is_empty() || !w.paths.is_empty()) {
            return Err(Error::invalid(
                "passthrough",
                "a passthrough rule splices TCP without looking inside, so it cannot have secret, methods or paths",
            ));
        }
        if !w.secret.is_empty() {
            check_name("secret", &w.secret)?;
        }
        if w.methods.len() > MAX_METHODS {
            return Err(Error::invalid("methods", format!("at most {MAX_METHODS}")));
        }
        let mut methods = Vec::with_capacity(w.methods.len());
        for m in &w.methods {
            if m.is_empty() || m.len() > 32 || !m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_') {
                return Err(Error::invalid(
                    "methods",
                    format!("{:?} is not an HTTP method", m.escape_debug().to_string()),
                ));
            }
            methods.push(m.to_ascii_uppercase());
        }
        if w.paths.len() > MAX_PATHS {
            return Err(Error::invalid("paths", format!("at most {MAX_PATHS}")));
        }
        let paths = w
            .paths
            .iter()
            .map(|p| PathPattern::parse(p))
            .collect::<Result<Vec<_>>>()?;
        if w.ports.len() > MAX_PORTS {
            return Err(Error::invalid("ports", format!("at most {MAX_PORTS}")));
        }
        if w.ports.contains(&0) {
            return Err(Error::invalid("ports", "0 is not a port"));
        }
        let expires = match &w.expires {
            None => None,
            Some(t) => Some(
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| Error::invalid("expires", format!("{t:?}: {e}")))?
                    .unix_timestamp(),
            ),
        };
        Ok(Rule {
            host,
            secret: (!w.secret.is_empty()).then(|| w.secret.clone()),
            methods,
            paths,
            ports: w.ports.clone(),
            expires,
            passthrough: w.passthrough,
            wire: w.clone(),
        })
    }

    pub fn expired(&self, now: i64) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }

    pub fn port_matches(&self, port: u16) -> bool {
        if self.ports.is_empty() {
            DEFAULT_PORTS.contains(&port)
        } else {
            self.ports.contains(&port)
        }
    }

    fn request_matches(&self, method: &str, path: &str) -> bool {
        let method_ok = self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method));
        let path_ok = self.paths.is_empty() || (path_is_plain(path) && self.paths.iter().any(|p| p.matches(path)));
        method_ok && path_ok
    }

    /// Two rules are the same rule when host, methods, paths, ports and passthrough agree
    /// (secret and expiry are not part of identity).
    pub fn same_identity(&self, other: &Rule) -> bool {
        self.host == other.host
            && sorted(&self.methods) == sorted(&other.methods)
            && sorted(&self.wire.paths) == sorted(&other.wire.paths)
            && sorted(&self.ports) == sorted(&other.ports)
            && self.passthrough == other.passthrough
    }
}

fn sorted<T: Ord + Clone>(v: &[T]) -> Vec<T> {
    let mut v = v.to_vec();
    v.sort();
    v
}

/// Client and secret names: 1–128 of letters, digits, `-`, `_`, `.`, not starting with `.`.
pub fn check_name(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(field, format!("must be 1 to {MAX_NAME_LEN} characters")));
    }
    if name.starts_with('.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(Error::invalid(
            field,
            format!(
                "{:?} may only have letters, digits, '-', '_' and '.' (not first)",
                name.escape_debug().to_string()
            ),
        ));
    }
    Ok(())
}

/// RFC 3339 of unix seconds.
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// SHA-256 of a client token, hex: what the state holds instead of the token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The header an injected secret becomes.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// The whole `Authorization` value.
    pub authorization: String,
    /// The secret's name (for logs; never its value).
    pub secret: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

fn credential(s: &StateSecret) -> Credential {
    let authorization = match s.kind {
        SecretKind::Bearer => format!("Bearer {}", s.value),
        SecretKind::Basic => format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s.value.as_bytes())
        ),
    };
    Credential {
        authorization,
        secret: s.name.clone(),
    }
}

/// One client's compiled rules.
#[derive(Debug)]
pub struct ClientPolicy {
    pub name: String,
    pub rules: Vec<Rule>,
}

/// What to do with a CONNECT (or the host and port of a plain request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectDecision {
    /// Splice TCP both ways (the index of the matching rule).
    Passthrough(usize),
    /// Terminate TLS and decide each request.
    Intercept,
    Deny(DenyReason),
}

/// What to do with one request inside an intercepted tunnel (or a plain HTTP request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestDecision {
    Allow { rule: usize, inject: Option<Credential> },
    Deny(DenyReason),
}

/// Why a decision denied (the `reason=` of a log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// No rule of the client covers this host and port (or every one that did expired).
    NoRule,
    /// Rules cover the host and port but none this method and path.
    NoMatch,
    /// A passthrough rule covers only raw TCP: requests inside are not for it.
    Passthrough,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NoRule => "no-rule",
            DenyReason::NoMatch => "no-match",
            DenyReason::Passthrough => "passthrough-only",
        }
    }
}

/// Everything the proxy decides with: clients by token hash, their rules, the secrets.
#[derive(Debug, Default)]
pub struct Policy {
    pub generation: u64,
    by_token: HashMap<[u8; 32], Arc<ClientPolicy>>,
    by_name: HashMap<String, Arc<ClientPolicy>>,
    secrets: HashMap<String, StateSecret>,
    /// Rules that did not validate when compiled (client, error): logged, never applied.
    pub rejected: Vec<(String, String)>,
}

impl Policy {
    /// Compiles a pushed state. Rules that do not validate are left out (and listed in
    /// `rejected`), so one bad record cannot open more than it says.
    pub fn compile(state: &ProxyState) -> Policy {
        let mut p = Policy {
            generation: state.generation,
            ..Policy::default()
        };
        for s in &state.secrets {
            p.secrets.insert(s.name.clone(), s.clone());
        }
        for c in &state.clients {
            let mut rules = Vec::with_capacity(c.rules.len());
            for w in &c.rules {
                match Rule::from_wire(w) {
                    Ok(r) => rules.push(r),
                    Err(e) => p.rejected.push((c.name.clone(), e.to_string())),
                }
            }
            let cp = Arc::new(ClientPolicy {
                name: c.name.clone(),
                rules,
            });
            p.by_name.insert(c.name.clone(), cp.clone());
            for h in &c.token_sha256 {
                if let Ok(bytes) = hex::decode(h) {
                    if let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) {
                        p.by_token.insert(key, cp.clone());
                    }
                }
            }
        }
        p
    }

    /// The client a proxy token belongs to.
    pub fn client(&self, token: &str) -> Option<Arc<ClientPolicy>> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_token.get(&key).cloned()
    }

    /// A client by name: a tunnel decides each inner request against the policy in force now,
    /// so a rule removed (or a client deleted) stops the next request of an open tunnel.
    pub fn client_by_name(&self, name: &str) -> Option<Arc<ClientPolicy>> {
        self.by_name.get(name).cloned()
    }

    /// Whether rule `r` can act for `host`: not expired, its port, and (with a secret) the secret
    /// exists and is meant for this host.
    fn usable(&self, r: &Rule, host: &str, port: u16, now: i64) -> bool {
        if r.expired(now) || !r.port_matches(port) || !r.host.matches(host) {
            return false;
        }
        match &r.secret {
            None => true,
            Some(name) => self
                .secrets
                .get(name)
                .is_some_and(|s| HostPattern::parse(&s.host).is_ok_and(|h| h.matches(host))),
        }
    }

    /// Decides a CONNECT to `host:port` (`host` normalized).
    pub fn connect(&self, client: &ClientPolicy, host: &str, port: u16, now: i64) -> ConnectDecision {
        match client
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| self.usable(r, host, port, now))
        {
            None => ConnectDecision::Deny(DenyReason::NoRule),
            Some((i, r)) if r.passthrough => ConnectDecision::Passthrough(i),
            Some(_) => ConnectDecision::Intercept,
        }
    }

    /// Decides one request (`path` without its query) to `host:port`.
    pub fn request(
        &self,
        client: &ClientPolicy,
        host: &str,
        port: u16,
        method: &str,
        path: &str,
        now: i64,
    ) -> RequestDecision {
        let mut saw_host = false;
        for (i, r) in client.rules.iter().enumerate() {
            if !self.usable(r, host, port, now) {
                continue;
            }
            saw_host = true;
            if r.passthrough {
                continue;
            }
            if r.request_matches(method, path) {
                let inject = r.secret.as_ref().and_then(|n| self.secrets.get(n)).map(credential);
                return RequestDecision::Allow { rule: i, inject };
            }
        }
        RequestDecision::Deny(if saw_host {
            DenyReason::NoMatch
        } else {
            DenyReason::NoRule
        })
    }

    /// Every secret value (the proxy never logs a line containing one).
    pub fn secret_values(&self) -> impl Iterator<Item = &str> {
        self.secrets.values().map(|s| s.value.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::StateClient;

    fn rule(host: &str) -> ProxyAllowRule {
        ProxyAllowRule {
            host: host.into(),
            ..Default::default()
        }
    }

    fn policy(rules: Vec<ProxyAllowRule>, secrets: Vec<StateSecret>) -> (Policy, Arc<ClientPolicy>) {
        let state = ProxyState {
            generation: 1,
            clients: vec![StateClient {
                name: "c1".into(),
                token_sha256: vec![token_hash("spt_x")],
                rules,
            }],
            secrets,
            vm_ranges: vec![],
        };
        let p = Policy::compile(&state);
        let c = p.client("spt_x").unwrap();
        (p, c)
    }

    #[test]
    fn hosts() {
        assert_eq!(
            HostPattern::parse("API.Example.com.").unwrap(),
            HostPattern::Exact("api.example.com".into())
        );
        let s = HostPattern::parse("*.example.com").unwrap();
        assert!(s.matches("a.example.com") && s.matches("a.b.example.com"));
        assert!(!s.matches("example.com") && !s.matches("badexample.com"));
        for bad in ["", "a b", "a\0b", "*x.com", "a..b", "a/b", "a:80", "*.*.x"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(normalize_host("::1").unwrap(), "[::1]");
    }

    #[test]
    fn paths() {
        let u = PathPattern::parse("/system/*").unwrap();
        assert!(u.matches("/system/info") && !u.matches("/system") && !u.matches("/systemx/a"));
        assert!(PathPattern::parse("/a*b").is_err());
        assert!(PathPattern::parse("a").is_err());
        assert!(PathPattern::parse("/a/../b").is_err());
        for p in [
            "/system/../admin",
            "/system/%2e%2e/admin",
            "/system//x",
            "/system/%2fx",
            "/a\\b",
        ] {
            assert!(!path_is_plain(p), "{p}");
        }
        assert_eq!(path_of("/a/b?x=/c"), "/a/b");
    }

    #[test]
    fn first_match_and_filters() {
        let mut admin = rule("api.example.com");
        admin.paths = vec!["/system/*".into()];
        admin.methods = vec!["get".into()];
        admin.secret = "admin".into();
        let open = rule("*.example.com");
        let secrets = vec![StateSecret {
            name: "admin".into(),
            host: "api.example.com".into(),
            kind: SecretKind::Basic,
            value: "u:p".into(),
        }];
        let (p, c) = policy(vec![admin, open], secrets);
        assert_eq!(p.connect(&c, "api.example.com", 443, 0), ConnectDecision::Intercept);
        assert_eq!(
            p.connect(&c, "api.example.com", 22, 0),
            ConnectDecision::Deny(DenyReason::NoRule)
        );
        assert_eq!(
            p.connect(&c, "other.org", 443, 0),
            ConnectDecision::Deny(DenyReason::NoRule)
        );
        match p.request(&c, "api.example.com", 443, "GET", "/system/info", 0) {
            RequestDecision::Allow {
                rule: 0,
                inject: Some(cred),
            } => assert_eq!(cred.authorization, "Basic dTpw"),
            d => panic!("{d:?}"),
        }
        // The secret's rule does not cover POST or a path outside; the open rule does, without it.
        assert_eq!(
            p.request(&c, "api.example.com", 443, "POST", "/system/info", 0),
            RequestDecision::Allow { rule: 1, inject: None }
        );
        assert_eq!(
            p.request(&c, "api.example.com", 443, "GET", "/system/../x", 0),
            RequestDecision::Allow { rule: 1, inject: None }
        );
    }

    #[test]
    fn ttl_ports_passthrough_secret_host() {
        let mut ssh = rule("git.example.com");
        ssh.ports = vec![22];
        ssh.passthrough = true;
        let mut ttl = rule("pypi.org");
        ttl.expires = Some(rfc3339(100));
        let mut wrong = rule("*");
        wrong.secret = "k".into();
        let secrets = vec![StateSecret {
            name: "k".into(),
            host: "api.example.com".into(),
            kind: SecretKind::Bearer,
            value: "v".into(),
        }];
        let (p, c) = policy(vec![ssh, ttl, wrong], secrets);
        assert_eq!(p.connect(&c, "git.example.com", 22, 0), ConnectDecision::Passthrough(0));
        assert_eq!(p.connect(&c, "pypi.org", 443, 99), ConnectDecision::Intercept);
        assert_eq!(
            p.connect(&c, "pypi.org", 443, 100),
            ConnectDecision::Deny(DenyReason::NoRule)
        );
        // `*` with a secret for another host never sends it elsewhere.
        assert_eq!(
            p.connect(&c, "evil.org", 443, 0),
            ConnectDecision::Deny(DenyReason::NoRule)
        );
        assert!(matches!(
            p.request(&c, "api.example.com", 443, "GET", "/", 0),
            RequestDecision::Allow { inject: Some(_), .. }
        ));
    }

    #[test]
    fn validation_names_the_field() {
        let mut r = AddProxyAllowRequest {
            client: "c".into(),
            host: "x.org".into(),
            passthrough: true,
            secret: "s".into(),
            ..Default::default()
        };
        assert!(matches!(
            Rule::from_request(&r, 0),
            Err(Error::Invalid {
                field: "passthrough",
                ..
            })
        ));
        r.passthrough = false;
        r.methods = vec!["G ET".into()];
        assert!(matches!(
            Rule::from_request(&r, 0),
            Err(Error::Invalid { field: "methods", .. })
        ));
        r.methods.clear();
        r.ports = vec![0];
        assert!(matches!(
            Rule::from_request(&r, 0),
            Err(Error::Invalid { field: "ports", .. })
        ));
        r.ports.clear();
        r.ttl_seconds = 60;
        let ok = Rule::from_request(&r, 1000).unwrap();
        assert_eq!(ok.expires, Some(1060));
        assert!(check_name("client", "a\0").is_err());
    }

    #[test]
    fn unknown_token_and_missing_secret() {
        let mut r = rule("x.org");
        r.secret = "gone".into();
        let (p, c) = policy(vec![r], vec![]);
        assert!(p.client("spt_y").is_none());
        assert_eq!(p.client_by_name("c1").map(|c| c.name.clone()).as_deref(), Some("c1"));
        assert!(p.client_by_name("c2").is_none());
        assert_eq!(
            p.connect(&c, "x.org", 443, 0),
            ConnectDecision::Deny(DenyReason::NoRule)
        );
    }
}
