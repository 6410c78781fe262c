//! Host side of the agent protocol (see `slicer_agent_proto`).
//!
//! One [`AgentClient`] per VM holds one HTTP/2 connection over the VM's agent socket and
//! reconnects (with a fresh resync handshake) when it breaks. Everything the guest sends is
//! untrusted: bodies are read with limits and frames are decoded with bounds, buffered exec
//! output stops at [`MAX_BUFFERED_OUTPUT`], and every request that is not a user's stream has a
//! deadline (see [`HEALTH_DEADLINE`], [`CALL_DEADLINE`]), so a guest whose agent stops
//! answering cannot hold a caller for ever.
//!
//! Here: the connection and the small calls (health, power, stats, CA, identity). `exec`:
//! commands and background execs; `files`: uploads, downloads and filesystem calls; `streams`:
//! forwards, shells, watches and the stream halves ([`Download`], [`StdinWriter`]).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use slicer_agent_proto::{h2, sync, ErrorBody, GuestStats, Health, Identity, PathQuery, PowerAction, PowerRequest};
use tokio::sync::Mutex;

mod exec;
mod files;
mod guest_text;
mod streams;
pub use exec::{ExecEvent, ExecProcess, Output};
pub use guest_text::GuestText;
pub use streams::{Chunks, Download, StdinWriter};

pub type ReqBody = BoxBody<Bytes, io::Error>;

/// Largest JSON answer (health, errors, results) accepted from a guest.
const MAX_JSON: usize = 64 * 1024;
/// Longest one connection attempt of `wait_ready` waits for the agent's handshake.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest directory listing accepted (the agent lists at most 100,000 entries).
const MAX_LISTING: usize = 32 << 20;
const UPLOAD_CHUNK: usize = 256 * 1024;

/// Most output (stdout and stderr together) [`ExecProcess::output`] collects. Past it the
/// command is killed (its stream is dropped: the agent kills its process group) and the call
/// fails with [`AgentError::OutputLimit`], which keeps what was read.
pub const MAX_BUFFERED_OUTPUT: usize = 16 << 20;
/// Deadline of a health check.
pub const HEALTH_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline of every other request that is not a user's stream (filesystem calls, identity,
/// background exec calls, stats, the answer to an upload once its body is sent), and of the
/// start of a stream (until its first answer). Streams themselves are not cut.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// Deadline of a power request (the agent answers before it acts).
pub const POWER_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the agent at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("agent did not become ready within {0:?}")]
    Timeout(Duration),
    /// The agent took too long to answer a request that has a deadline.
    #[error("the agent did not answer {what} within {after:?}")]
    Deadline { what: &'static str, after: Duration },
    /// A buffered exec produced more than its limit; `output` holds what was read (up to the
    /// limit) and the kill as its status.
    #[error(
        "the command's output exceeded {} MiB (stdout and stderr together): it was killed and its output truncated",
        limit >> 20
    )]
    OutputLimit { limit: usize, output: Box<Output> },
    #[error("agent protocol error: {0}")]
    Protocol(String),
    #[error("agent connection failed: {0}")]
    Http(#[from] hyper::Error),
    /// The agent answered with an error.
    #[error("{message}")]
    Remote { status: u16, kind: String, message: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl AgentError {
    /// The agent said the path or program does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, AgentError::Remote { status: 404, .. })
    }
}

pub type Result<T> = std::result::Result<T, AgentError>;

/// Runs `fut`, failing with [`AgentError::Deadline`] after `after`.
async fn within<T>(
    what: &'static str,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(after, fut)
        .await
        .unwrap_or(Err(AgentError::Deadline { what, after }))
}

pub struct AgentClient {
    path: PathBuf,
    conn: Mutex<Option<SendRequest<ReqBody>>>,
    handshake_timeout: Duration,
}

fn empty() -> ReqBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

async fn read_limited(body: Incoming, limit: usize) -> Result<Bytes> {
    let b = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| AgentError::Protocol(format!("reading agent answer: {e}")))?;
    Ok(b.to_bytes())
}

async fn parse_json<T: serde::de::DeserializeOwned>(body: Incoming) -> Result<T> {
    parse_json_up_to(body, MAX_JSON).await
}

async fn parse_json_up_to<T: serde::de::DeserializeOwned>(body: Incoming, limit: usize) -> Result<T> {
    let raw = read_limited(body, limit).await?;
    serde_json::from_slice(&raw).map_err(|e| AgentError::Protocol(format!("invalid JSON from agent: {e}")))
}

/// Turns a non-2xx answer into [`AgentError::Remote`].
async fn check(resp: http::Response<Incoming>) -> Result<http::Response<Incoming>> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let raw = read_limited(resp.into_body(), MAX_JSON).await.unwrap_or_default();
    let (kind, message) = match serde_json::from_slice::<ErrorBody>(&raw) {
        Ok(e) => (e.kind, e.error),
        Err(_) => ("unknown".into(), format!("agent answered {status}")),
    };
    Err(AgentError::Remote { status, kind, message })
}

fn uri(path: &str, q: Option<&PathQuery>) -> String {
    match q {
        Some(q) => format!(
            "http://agent{path}?{}",
            serde_urlencoded::to_string(q).unwrap_or_default()
        ),
        None => format!("http://agent{path}"),
    }
}

impl AgentClient {
    /// A client for the agent behind the UNIX socket `path` (QEMU's chardev for the port).
    pub fn new(path: impl Into<PathBuf>) -> AgentClient {
        AgentClient {
            path: path.into(),
            conn: Mutex::new(None),
            handshake_timeout: Duration::from_secs(10),
        }
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    async fn connect(&self, timeout: Duration) -> Result<SendRequest<ReqBody>> {
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|source| AgentError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let nonce: sync::Nonce = rand::random();
        let io = sync::host_handshake(stream, nonce, Duration::from_millis(100), timeout)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::TimedOut => AgentError::Timeout(timeout),
                _ => AgentError::Io(e),
            })?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(h2::INITIAL_STREAM_WINDOW)
            .initial_connection_window_size(h2::INITIAL_CONN_WINDOW)
            .max_frame_size(h2::MAX_FRAME_SIZE)
            .max_header_list_size(h2::MAX_HEADER_LIST_SIZE)
            .handshake(TokioIo::new(io))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("agent connection ended: {}", GuestText(&e));
            }
        });
        Ok(sender)
    }

    async fn sender(&self) -> Result<SendRequest<ReqBody>> {
        let mut guard = self.conn.lock().await;
        if let Some(s) = guard.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let s = self.connect(self.handshake_timeout).await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// Drops the current connection; the next request reconnects with a new handshake.
    pub async fn reset(&self) {
        *self.conn.lock().await = None;
    }

    async fn send(&self, req: Request<ReqBody>) -> Result<http::Response<Incoming>> {
        let mut s = self.sender().await?;
        s.ready().await?;
        Ok(s.send_request(req).await?)
    }

    /// Waits until the agent answers health, polling the socket until `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Health> {
        self.wait_then(timeout, || self.health()).await
    }

    /// Waits until a session with the agent is up (polling the socket until `timeout`), then
    /// makes `first` its first request. An error answer of the agent ends the wait; transport
    /// errors (the guest not there yet) are retried.
    pub async fn wait_then<T, F, Fut>(&self, timeout: Duration, first: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout(timeout));
            }
            let attempt = async {
                let mut guard = self.conn.lock().await;
                // QEMU serves one client at a time: an open connection would keep the new one
                // waiting in the socket's backlog.
                *guard = None;
                // A handshake that gets no answer is retried on a new connection: each connect
                // makes QEMU tell the guest a host arrived, which also recovers a guest that
                // missed an earlier hang-up (seen once after a suspend/restore under load).
                let s = self.connect(left.min(ATTEMPT_TIMEOUT)).await?;
                *guard = Some(s);
                drop(guard);
                first().await
            };
            match tokio::time::timeout(left, attempt).await {
                Ok(Ok(h)) => return Ok(h),
                Ok(Err(e @ AgentError::Remote { .. })) => return Err(e),
                Ok(Err(AgentError::Connect { .. })) => {
                    // QEMU has not created the socket yet.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!("agent not ready yet: {}", GuestText(&e));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => return Err(AgentError::Timeout(timeout)),
            }
        }
    }

    /// The agent's health, within [`HEALTH_DEADLINE`].
    pub async fn health(&self) -> Result<Health> {
        let req = Request::get(uri("/v1/health", None))
            .body(empty())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        within("a health check", HEALTH_DEADLINE, async {
            let resp = check(self.send(req).await?).await?;
            parse_json(resp.into_body()).await
        })
        .await
    }

    /// Asks the guest to power off or reboot. Both end the VM process (no ACPI: see the agent).
    pub async fn power(&self, action: PowerAction) -> Result<()> {
        let body = serde_json::to_vec(&PowerRequest { action }).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(uri("/v1/power", None))
            .body(full(body))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        within("a power request", POWER_DEADLINE, async {
            let resp = self.send(req).await?;
            if resp.status() != StatusCode::ACCEPTED {
                check(resp).await?;
            }
            Ok(())
        })
        .await
    }

    /// A resource snapshot measured in the guest.
    pub async fn stats(&self) -> Result<GuestStats> {
        let req = Request::get(uri("/v1/stats", None))
            .body(empty())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        within("a stats request", CALL_DEADLINE, async {
            let resp = check(self.send(req).await?).await?;
            parse_json(resp.into_body()).await
        })
        .await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, route: &str, path: &str, limit: usize) -> Result<T> {
        let q = PathQuery {
            path: path.into(),
            ..Default::default()
        };
        let req = Request::get(uri(route, Some(&q)))
            .body(empty())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        within("a filesystem request", CALL_DEADLINE, async {
            let resp = check(self.send(req).await?).await?;
            parse_json_up_to(resp.into_body(), limit).await
        })
        .await
    }

    /// POSTs `body` as JSON to `path` and parses the JSON answer, within [`CALL_DEADLINE`].
    async fn post_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let body = serde_json::to_vec(body).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(uri(path, None))
            .body(full(body))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        within(what, CALL_DEADLINE, async {
            let resp = check(self.send(req).await?).await?;
            parse_json(resp.into_body()).await
        })
        .await
    }

    /// Adds the CA certificates of `pem` (CERTIFICATE blocks) to the guest's trust stores;
    /// idempotent. Answers what the guest has installed.
    pub async fn install_ca(&self, pem: &str) -> Result<slicer_agent_proto::CaInstalled> {
        let req = Request::builder()
            .method(Method::PUT)
            .uri(uri("/v1/ca", None))
            .body(full(pem.as_bytes().to_vec()))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        within("a CA installation", CALL_DEADLINE, async {
            let resp = check(self.send(req).await?).await?;
            parse_json(resp.into_body()).await
        })
        .await
    }

    /// The CA certificates slicer installed in the guest.
    pub async fn list_ca(&self) -> Result<slicer_agent_proto::CaInstalled> {
        let req = Request::get(uri("/v1/ca", None))
            .body(empty())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        within("a CA listing", CALL_DEADLINE, async {
            let resp = check(self.send(req).await?).await?;
            parse_json(resp.into_body()).await
        })
        .await
    }

    /// Gives a restored guest its own identity (see [`Identity`]); answers what was applied.
    pub async fn set_identity(&self, id: &Identity) -> Result<Identity> {
        self.post_json("an identity request", "/v1/identity", id).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;
    use slicer_agent_proto::frame::{self, Kind};
    use slicer_agent_proto::{ExecRequest, Started};

    type Handler =
        Arc<dyn Fn(Request<Incoming>) -> http::Response<slicer_agent_proto::body::ChannelBody> + Send + Sync>;

    /// A fake agent on a UNIX socket: the real handshake, then HTTP/2 answered by `handler`.
    fn fake_agent(dir: &Path, handler: Handler) -> PathBuf {
        let path = dir.join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let handler = handler.clone();
                tokio::spawn(async move {
                    let Ok((io, _)) = sync::agent_handshake(stream).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let resp = handler(req);
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(io), svc)
                        .await;
                });
            }
        });
        path
    }

    #[tokio::test]
    async fn a_silent_agent_fails_health_within_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        // Answers a head, then never finishes the body (its sender is kept alive).
        let keep = Arc::new(std::sync::Mutex::new(Vec::new()));
        let k = keep.clone();
        let path = fake_agent(
            dir.path(),
            Arc::new(move |_req| {
                let (tx, body) = slicer_agent_proto::body::channel(1);
                k.lock().unwrap().push(tx);
                http::Response::new(body)
            }),
        );
        let c = AgentClient::new(path);
        let t0 = std::time::Instant::now();
        let err = c.health().await.unwrap_err();
        let took = t0.elapsed();
        assert!(
            matches!(err, AgentError::Deadline { after, .. } if after == HEALTH_DEADLINE),
            "{err}"
        );
        assert!(
            err.to_string().contains("did not answer a health check within 5s"),
            "{err}"
        );
        assert!(
            took >= HEALTH_DEADLINE && took < HEALTH_DEADLINE + Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn buffered_output_stops_at_its_limit_and_resets_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let reset = Arc::new(AtomicBool::new(false));
        let r = reset.clone();
        let path = fake_agent(
            dir.path(),
            Arc::new(move |_req| {
                let (tx, body) = slicer_agent_proto::body::channel(4);
                let r = r.clone();
                tokio::spawn(async move {
                    let started = frame::encode_json(
                        Kind::Started,
                        &Started {
                            pid: 7,
                            started_at_ms: 1,
                        },
                    );
                    if tx.send(Ok(started)).await.is_err() {
                        return;
                    }
                    // A command that prints for ever, on both streams.
                    let chunk = vec![b'y'; 64 * 1024];
                    for i in 0u64.. {
                        let kind = if i % 4 == 3 { Kind::Stderr } else { Kind::Stdout };
                        if tx.send(Ok(frame::encode(kind, &chunk))).await.is_err() {
                            break;
                        }
                    }
                    // What the agent takes as "the host went away": it kills the process group.
                    r.store(true, Ordering::SeqCst);
                });
                http::Response::new(body)
            }),
        );
        let c = AgentClient::new(path);
        let limit = 1 << 20;
        let p = c.exec(&ExecRequest::argv(["yes"])).await.unwrap();
        assert_eq!(p.pid, 7);
        let err = p.output_up_to(limit).await.unwrap_err();
        assert!(err.to_string().contains("output exceeded 1 MiB"), "{err}");
        let AgentError::OutputLimit { output, .. } = err else {
            panic!("not an output limit error")
        };
        assert_eq!(output.stdout.len() + output.stderr.len(), limit);
        assert!(!output.stderr.is_empty());
        assert_eq!(output.status.signal, Some(9));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !reset.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent never saw the stream end"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The connection still serves other requests.
        let p = c.exec(&ExecRequest::argv(["yes"])).await.unwrap();
        assert!(matches!(p.output_up_to(10).await, Err(AgentError::OutputLimit { .. })));
    }
}
