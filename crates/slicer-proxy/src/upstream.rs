//! Reaching upstreams safely: the proxy resolves names itself and connects only to an address it
//! checked (never loopback, link-local, the host's own addresses, the VM ranges or a
//! `--deny-cidr`), so neither a rule of `*` nor a name that resolves inside can reach them.
//! (Owned by the listener work; this is the interface `mitm` uses.)

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Why an upstream could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{host} resolves to {addr}, which the proxy may not reach ({why})")]
    Refused {
        host: String,
        addr: std::net::IpAddr,
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

/// How upstreams are reached.
#[derive(Default)]
pub struct Upstream {}

impl Upstream {
    /// Resolves `host`, checks every address, connects to the first allowed one that answers.
    pub async fn connect(&self, host: &str, port: u16) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        Err(UpstreamError::Resolve {
            host: format!("{host}:{port}"),
            reason: "not built yet".into(),
        })
    }
}
