//! The channel between the daemon (which owns clients, secrets and rules) and a running proxy.
//!
//! The proxy binds `<data dir>/proxy/<group>.sock` (root's 0700 directory) before it gives up
//! root and accepts on it afterwards; the daemon connects as root. Each side writes one JSON
//! object per line. The daemon sends the whole [`ProxyState`] on connect and after every change;
//! the proxy answers with [`FromProxy::Ack`] once the state is in force, and sends its decisions
//! and counters. The daemon also keeps the last state in `<data dir>/proxy/state.json` (root,
//! 0600), which a proxy reads at start while it is still root, so a restarted proxy enforces
//! every rule before the daemon reconnects. Token hashes travel, never tokens.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use slicer_api::ProxyAllowRule;

/// Longest line the proxy accepts from the daemon (a state with many rules and secrets).
pub const MAX_STATE_LINE: usize = 64 << 20;
/// Longest line the daemon accepts from a proxy (a decision or a counter set).
pub const MAX_EVENT_LINE: usize = 64 << 10;

/// `<data dir>/proxy`.
pub fn proxy_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("proxy")
}

/// Where the proxy of `group` listens for its daemon.
pub fn control_socket(data_dir: &Path, group: &str) -> PathBuf {
    proxy_dir(data_dir).join(format!("{group}.sock"))
}

/// The daemon's last pushed state.
pub fn state_file(data_dir: &Path) -> PathBuf {
    proxy_dir(data_dir).join("state.json")
}

/// How a secret is put on the inner request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretKind {
    /// `Authorization: Bearer <value>`.
    Bearer,
    /// `Authorization: Basic base64(<value>)`, the value `user:pass`.
    Basic,
}

impl SecretKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretKind::Bearer => "bearer",
            SecretKind::Basic => "basic",
        }
    }
}

/// A secret with its value (only ever on the control channel and in the 0600 state file).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSecret {
    pub name: String,
    pub host: String,
    pub kind: SecretKind,
    pub value: String,
}

impl std::fmt::Debug for StateSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateSecret")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A client: its name, the SHA-256 (hex) of each token it may present, its rules in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateClient {
    pub name: String,
    pub token_sha256: Vec<String>,
    pub rules: Vec<ProxyAllowRule>,
}

/// Everything a proxy enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyState {
    /// Grows with every change the daemon makes.
    pub generation: u64,
    pub clients: Vec<StateClient>,
    pub secrets: Vec<StateSecret>,
    /// Every host group's VM range (CIDR): the proxy never connects into one.
    #[serde(default)]
    pub vm_ranges: Vec<String>,
}

/// Daemon → proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToProxy {
    State { state: ProxyState },
}

/// Proxy → daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromProxy {
    /// First line after connect.
    Hello {
        group: String,
        /// The address guests reach the proxy at (ports 3128 and 3129).
        bind: String,
        mode: Mode,
        pid: u32,
    },
    /// `generation` is in force.
    Ack {
        generation: u64,
    },
    Decision(Decision),
    /// Totals since the proxy started.
    Stats(Stats),
}

/// `--mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Strict,
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Strict => "strict",
            Mode::Audit => "audit",
        }
    }
}

/// One decision: what the proxy logs, counts and the daemon keeps for `slicer proxy suggest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Unix seconds.
    pub at: i64,
    /// Client name, or empty when the token was missing or unknown.
    pub client: String,
    /// `CONNECT` for a tunnel decided at CONNECT time.
    pub method: String,
    /// `https`, `http` or `tcp` (passthrough).
    pub scheme: String,
    pub host: String,
    pub port: u16,
    /// Path without the query; empty when unknown (strict deny at CONNECT, passthrough).
    pub path: String,
    pub allow: bool,
    pub mode: Option<Mode>,
    /// Deny reason (`no-rule`, `no-match`, `no-token`, `upstream-refused`, ...), or the secret
    /// injected on an allow (`secret=NAME` in the log line).
    pub reason: String,
    pub secret: String,
    /// The status answered to the client (0 for a spliced tunnel).
    pub status: u16,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
}

impl Decision {
    /// Slicer's log line: `deny client=C method=GET scheme=https host=H port=443 path=/p mode=audit reason=no-rule`,
    /// with `status`, `bytes` and `secret` added. Every value is escaped: a byte outside
    /// printable ASCII, a space, `"` or `%` becomes `%XX`, so a hostile path cannot forge fields.
    pub fn log_line(&self) -> String {
        let mut s = String::from(if self.allow { "allow" } else { "deny" });
        let mut field = |k: &str, v: &str| {
            if !v.is_empty() {
                s.push(' ');
                s.push_str(k);
                s.push('=');
                s.push_str(&escape(v));
            }
        };
        field("client", &self.client);
        field("method", &self.method);
        field("scheme", &self.scheme);
        field("host", &self.host);
        field("port", &self.port.to_string());
        field("path", &self.path);
        if let Some(m) = self.mode {
            field("mode", m.as_str());
        }
        field("reason", &self.reason);
        field("secret", &self.secret);
        if self.status != 0 {
            field("status", &self.status.to_string());
        }
        if self.bytes_up != 0 || self.bytes_down != 0 {
            field("bytes_up", &self.bytes_up.to_string());
            field("bytes_down", &self.bytes_down.to_string());
        }
        if self.duration_ms != 0 {
            field("duration_ms", &self.duration_ms.to_string());
        }
        s
    }
}

/// Percent-escapes what could break a `key=value` log line.
pub fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_graphic() && b != b'"' && b != b'%' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A proxy's totals since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub allowed: u64,
    pub denied: u64,
    /// Requests without a valid token (answered 407).
    pub unauthenticated: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub open_connections: u64,
    /// Connections refused because a cap was reached.
    pub refused_connections: u64,
    /// Decisions dropped because the daemon read too slowly.
    pub dropped_events: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_line_is_slicers_and_cannot_be_forged() {
        let d = Decision {
            client: "reviewfn".into(),
            method: "GET".into(),
            scheme: "https".into(),
            host: "api.example.com".into(),
            port: 443,
            path: "/v1/models".into(),
            mode: Some(Mode::Audit),
            reason: "no-rule".into(),
            ..Default::default()
        };
        assert_eq!(
            d.log_line(),
            "deny client=reviewfn method=GET scheme=https host=api.example.com port=443 path=/v1/models mode=audit reason=no-rule"
        );
        let evil = Decision {
            path: "/x reason=ok\nallow client=root".into(),
            ..d
        };
        let line = evil.log_line();
        assert!(!line.contains('\n') && !line.contains(" reason=ok"), "{line}");
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let s = StateSecret {
            name: "n".into(),
            host: "h".into(),
            kind: SecretKind::Bearer,
            value: "sk-very-secret".into(),
        };
        assert!(!format!("{s:?}").contains("sk-very"));
    }
}
