//! A small client for the daemon: HTTP/1.1 over TCP or a UNIX socket, bearer token.

use std::path::PathBuf;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
/// The body of the daemon's answers.
pub use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Why a call to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The daemon answered with an error status.
    #[error("{status}: {message}")]
    Status { status: StatusCode, message: String },
    /// No connection to the daemon. The I/O error is part of the message and not a
    /// `source()`: an error chain printer would otherwise print it twice.
    #[error("cannot reach the slicer API at {url}: {cause}")]
    Connect { url: String, cause: std::io::Error },
    /// Anything else (a malformed request or answer, a broken connection).
    #[error("{0}")]
    Other(String),
}

impl ApiError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How long a TCP connect to the daemon may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A byte stream to the daemon.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Opens a byte stream to the daemon: how an in-process caller (the daemon's own MCP
/// endpoint) reaches its router without a socket.
pub type Connector = std::sync::Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Box<dyn Io>>> + Send>> + Send + Sync,
>;

#[derive(Clone)]
enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
    Connector(Connector),
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "Tcp({a:?})"),
            Endpoint::Unix(p) => write!(f, "Unix({p:?})"),
            Endpoint::Connector(_) => f.write_str("Connector"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiClient {
    endpoint: Endpoint,
    url: String,
    token: Option<String>,
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

impl ApiClient {
    /// `url` is `http://host:port`, or a UNIX socket: a path (`/x.sock`, `./x.sock`) or `unix:///x.sock`.
    pub fn new(url: &str, token: Option<String>) -> Result<ApiClient, ApiError> {
        let endpoint = if let Some(p) = url.strip_prefix("unix://") {
            Endpoint::Unix(p.into())
        } else if url.starts_with('/') || url.starts_with("./") || url.starts_with("../") || url.ends_with(".sock") {
            Endpoint::Unix(url.into())
        } else {
            let rest = url.strip_prefix("http://").ok_or_else(|| {
                ApiError::Other(format!(
                    "unsupported API URL {url:?}: use http://HOST:PORT or a socket path"
                ))
            })?;
            Endpoint::Tcp(rest.trim_end_matches('/').to_string())
        };
        Ok(ApiClient {
            endpoint,
            url: url.to_string(),
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// A client whose connections `connect` opens (`name` stands for the URL in errors).
    pub fn with_connector(name: &str, token: Option<String>, connect: Connector) -> ApiClient {
        ApiClient {
            endpoint: Endpoint::Connector(connect),
            url: name.to_string(),
            token: token.filter(|t| !t.is_empty()),
        }
    }

    /// A fresh connection to the daemon (for protocols other than plain HTTP, e.g. WebSockets).
    pub async fn connect(&self) -> Result<Box<dyn Io>, ApiError> {
        let err = |cause| ApiError::Connect {
            url: self.url.clone(),
            cause,
        };
        Ok(match &self.endpoint {
            Endpoint::Tcp(addr) => {
                // An address that drops packets would otherwise hang for minutes.
                let s = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| {
                        err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no answer within 10 s",
                        ))
                    })?
                    .map_err(err)?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Endpoint::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await.map_err(err)?),
            Endpoint::Connector(c) => c().await.map_err(err)?,
        })
    }

    /// `ws://host:port` (or `ws://localhost` over a UNIX socket) for WebSocket requests.
    pub fn ws_base(&self) -> String {
        match &self.endpoint {
            Endpoint::Tcp(addr) => format!("ws://{addr}"),
            Endpoint::Unix(_) | Endpoint::Connector(_) => "ws://localhost".into(),
        }
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Sends one request and returns the response, whatever its status.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        content_type: Option<&str>,
        body: Body,
    ) -> Result<http::Response<Incoming>, ApiError> {
        let host = match &self.endpoint {
            Endpoint::Tcp(h) => h.clone(),
            Endpoint::Unix(_) | Endpoint::Connector(_) => "unix".to_string(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, host)
            .header(
                http::header::USER_AGENT,
                concat!("slicer-cli/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(ct) = content_type {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        let req = req.body(body).map_err(|e| ApiError::Other(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(self.connect().await?))
            .await
            .map_err(|e| ApiError::Other(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender
            .send_request(req)
            .await
            .map_err(|e| ApiError::Other(e.to_string()))
    }

    /// Sends a request and fails on a non-2xx status with the server's error message.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        content_type: Option<&str>,
        body: Body,
    ) -> Result<http::Response<Incoming>, ApiError> {
        let resp = self.send(method, path_and_query, content_type, body).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let raw = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<crate::ErrorResponse>(&raw)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&raw).trim().to_string());
        Err(ApiError::Status { status, message })
    }

    /// A JSON call: serializes `body` (if any) and parses the answer.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, ApiError> {
        let (ct, b) = match body {
            Some(v) => (
                Some("application/json"),
                full(serde_json::to_vec(v).map_err(|e| ApiError::Other(e.to_string()))?),
            ),
            None => (None, empty()),
        };
        let resp = self.call(method, path_and_query, ct, b).await?;
        let raw = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ApiError::Other(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&raw).map_err(|e| ApiError::Other(format!("invalid JSON from the API: {e}")))
    }
}

/// Percent-encodes a query from pairs.
pub fn query(pairs: &[(&str, String)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}
