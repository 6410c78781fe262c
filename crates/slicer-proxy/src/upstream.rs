//! Reaching upstreams safely: the proxy resolves names itself and connects only to an address it
//! checked (never loopback, link-local, the host's own addresses, the VM ranges or a
//! `--deny-cidr`), so neither a rule of `*` nor a name that resolves inside can reach them.
//! (Owned by the listener work; the stub below is the interface `mitm` uses, with a naive body.)

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpStream;

/// Why an upstream could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{host} resolves to {addr}, which the proxy may not reach ({why})")]
    Refused {
        host: String,
        addr: IpAddr,
        why: &'static str,
    },
    #[error("resolving {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the proxy may not reach, and names it resolves itself.
#[derive(Debug, Clone, Default)]
pub struct UpstreamConfig {
    /// `--deny-cidr` ranges: (network address, prefix length).
    pub deny_cidrs: Vec<(IpAddr, u8)>,
    /// The test-only hosts option: names answered without DNS.
    pub hosts: HashMap<String, Vec<IpAddr>>,
    /// Tests of the interceptor run their upstreams on loopback; `slicer proxy up` never sets this.
    pub allow_loopback_for_tests: bool,
}

/// How upstreams are reached.
#[derive(Default)]
pub struct Upstream {
    config: UpstreamConfig,
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Upstream {
        Upstream { config }
    }

    /// Replaces the VM ranges (pushed by the daemon with each state).
    pub fn set_vm_ranges(&self, _ranges: &[String]) {}

    /// Resolves `host`, checks every address, connects to the first allowed one that answers.
    pub async fn connect(&self, host: &str, port: u16) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let addrs: Vec<SocketAddr> = match self.config.hosts.get(host) {
            Some(ips) => ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect(),
            None => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| UpstreamError::Resolve {
                    host: host.into(),
                    reason: e.to_string(),
                })?
                .collect(),
        };
        let addr = *addrs.first().ok_or_else(|| UpstreamError::Resolve {
            host: host.into(),
            reason: "no address".into(),
        })?;
        let s = TcpStream::connect(addr)
            .await
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        Ok((s, addr))
    }
}
