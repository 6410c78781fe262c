//! Host side of the agent protocol (see `slicer_agent_proto`).
//!
//! One [`AgentClient`] per VM holds one HTTP/2 connection over the VM's agent socket and
//! reconnects (with a fresh resync handshake) when it breaks. Everything the guest sends is
//! untrusted: bodies are read with limits and frames are decoded with bounds, buffered exec
//! output stops at [`MAX_BUFFERED_OUTPUT`], and every request that is not a user's stream has a
//! deadline (see [`HEALTH_DEADLINE`], [`CALL_DEADLINE`]), so a guest whose agent stops
//! answering cannot hold a caller for ever.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use slicer_agent_proto::frame::{self, Decoder, Kind};
use slicer_agent_proto::{
    h2, sync, BgInfo, BgKill, BgKilled, BgLogsQuery, BgStart, BgStarted, BgWait, ErrorBody, ExecRequest, ExitStatus,
    Exited, FileWritten, FsEntry, GuestStats, Health, Identity, MkdirRequest, PathQuery, PowerAction, PowerRequest,
    RemoveQuery, Started, HEADER_MODE,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot, Mutex};

mod guest_text;
pub use guest_text::GuestText;

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

/// Streams an `AsyncRead` as a request body, 256 KiB at a time; `sent` is dropped once all of
/// it is queued (or reading failed, or the request went away).
fn reader_body<R: AsyncRead + Send + Unpin + 'static>(mut rd: R, sent: oneshot::Sender<()>) -> ReqBody {
    let (tx, body) = slicer_agent_proto::body::channel(4);
    tokio::spawn(async move {
        let _sent = sent;
        loop {
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            match rd.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    body.boxed()
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

/// An exec id as a path segment: `ex_` and hex digits only.
fn bg_id(id: &str) -> Result<&str> {
    if id.len() <= 64 && id.starts_with("ex_") && id[3..].bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(id)
    } else {
        Err(AgentError::Remote {
            status: 404,
            kind: "not_found".into(),
            message: format!("no exec {id:?}"),
        })
    }
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

    /// Starts a process. With `spec.stdin`, write to [`ExecProcess::stdin`]; dropping it closes stdin.
    pub async fn exec(&self, spec: &ExecRequest) -> Result<ExecProcess> {
        let prefix = frame::encode_spec(spec);
        let (stdin, body) = if spec.stdin {
            let (tx, body) = slicer_agent_proto::body::channel(4);
            let prefix_tx = tx.clone();
            prefix_tx
                .send(Ok(prefix))
                .await
                .map_err(|_| AgentError::Protocol("stdin channel closed".into()))?;
            (Some(StdinWriter { tx }), body.boxed())
        } else {
            (None, full(prefix))
        };
        let req = Request::post(uri("/v1/exec", None))
            .body(body)
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        // Only the start has a deadline: the process then runs as long as it likes.
        within("an exec start", CALL_DEADLINE, async {
            let resp = check(self.send(req).await?).await?;
            let mut p = ExecProcess {
                pid: 0,
                started_at_ms: 0,
                stdin,
                body: resp.into_body(),
                decoder: Decoder::default(),
                done: false,
            };
            match p.next_frame().await? {
                Some(f) if f.kind == Kind::Started => {
                    let s: Started = serde_json::from_slice(&f.payload)
                        .map_err(|e| AgentError::Protocol(format!("invalid started frame: {e}")))?;
                    p.pid = s.pid;
                    p.started_at_ms = s.started_at_ms;
                    Ok(p)
                }
                other => Err(AgentError::Protocol(format!(
                    "expected a started frame, got {:?}",
                    other.map(|f| f.kind)
                ))),
            }
        })
        .await
    }

    /// Runs a process to completion with the given stdin, collecting its output (at most
    /// [`MAX_BUFFERED_OUTPUT`]: see [`ExecProcess::output`]).
    pub async fn exec_output(&self, spec: &ExecRequest, stdin: Option<Bytes>) -> Result<Output> {
        let mut spec = spec.clone();
        spec.stdin = stdin.is_some();
        let mut p = self.exec(&spec).await?;
        if let (Some(w), Some(data)) = (p.stdin.take(), stdin) {
            tokio::spawn(async move {
                let _ = w.write(data).await;
            });
        }
        p.output().await
    }

    /// Writes `data` to the file `path` in the guest (atomically replaced).
    pub async fn upload_file<R: AsyncRead + Send + Unpin + 'static>(
        &self,
        path: &str,
        mode: Option<u32>,
        owner: Option<(u32, Option<u32>)>,
        data: R,
    ) -> Result<u64> {
        let q = PathQuery {
            path: path.into(),
            mode: mode.map(|m| format!("{m:o}")),
            uid: owner.map(|o| o.0),
            gid: owner.and_then(|o| o.1),
            ..Default::default()
        };
        Ok(self.upload("/v1/file", &q, data).await?.bytes)
    }

    /// SlicerVM's cp-v1 upload: a file (`tar` false) or a directory's tar to `path`, placed
    /// inside `path` as `source_name` when it is a directory (its contents merged into it with
    /// `copy_contents`); a directory replaces its target whole. Answers where it went.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_placed<R: AsyncRead + Send + Unpin + 'static>(
        &self,
        tar: bool,
        path: &str,
        source_name: &str,
        copy_contents: bool,
        mode: Option<u32>,
        owner: Option<(u32, Option<u32>)>,
        data: R,
    ) -> Result<FileWritten> {
        let q = PathQuery {
            path: path.into(),
            mode: mode.map(|m| format!("{m:o}")),
            uid: owner.map(|o| o.0),
            gid: owner.and_then(|o| o.1),
            source_name: Some(source_name.into()),
            copy_contents,
        };
        self.upload(if tar { "/v1/tar" } else { "/v1/file" }, &q, data).await
    }

    /// PUTs `data` to `route`. Sending the body takes as long as the source needs (cp streams
    /// a user's upload); the answer after it has [`CALL_DEADLINE`].
    async fn upload<R: AsyncRead + Send + Unpin + 'static>(
        &self,
        route: &str,
        q: &PathQuery,
        data: R,
    ) -> Result<FileWritten> {
        let (sent_tx, sent) = oneshot::channel();
        let req = Request::put(uri(route, Some(q)))
            .body(reader_body(data, sent_tx))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let answer = async {
            let resp = check(self.send(req).await?).await?;
            let w: FileWritten = parse_json(resp.into_body()).await?;
            Ok(w)
        };
        tokio::pin!(answer);
        tokio::select! {
            r = &mut answer => r,
            _ = sent => within("an upload", CALL_DEADLINE, answer).await,
        }
    }

    /// Reads the file `path` from the guest as a stream.
    pub async fn download_file(&self, path: &str) -> Result<Download> {
        let q = PathQuery {
            path: path.into(),
            ..Default::default()
        };
        let req = Request::get(uri("/v1/file", Some(&q)))
            .body(empty())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let resp = within("a download's start", CALL_DEADLINE, async {
            check(self.send(req).await?).await
        })
        .await?;
        let mode = resp
            .headers()
            .get(HEADER_MODE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| u32::from_str_radix(v, 8).ok())
            .map(|m| m & 0o7777);
        Ok(Download {
            mode,
            body: resp.into_body(),
            pending: slicer_agent_proto::lines::LineBuf::default(),
        })
    }

    /// Unpacks a tar stream into directory `dir` in the guest.
    pub async fn upload_tar<R: AsyncRead + Send + Unpin + 'static>(
        &self,
        dir: &str,
        owner: Option<(u32, Option<u32>)>,
        tar: R,
    ) -> Result<u64> {
        let q = PathQuery {
            path: dir.into(),
            mode: None,
            uid: owner.map(|o| o.0),
            gid: owner.and_then(|o| o.1),
            ..Default::default()
        };
        Ok(self.upload("/v1/tar", &q, tar).await?.bytes)
    }

    /// Streams directory `dir` of the guest as a tar. The archive comes from the guest: never
    /// unpack it on the host without path checks.
    pub async fn download_tar(&self, dir: &str) -> Result<Download> {
        let q = PathQuery {
            path: dir.into(),
            ..Default::default()
        };
        let req = Request::get(uri("/v1/tar", Some(&q)))
            .body(empty())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        self.stream(req).await
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

    async fn bg_call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        deadline: Duration,
    ) -> Result<T> {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://agent/v1/bg{path}"))
            .body(body.map(full).unwrap_or_else(empty))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        within("a background exec request", deadline, async {
            let resp = check(self.send(req).await?).await?;
            parse_json_up_to(resp.into_body(), MAX_LISTING).await
        })
        .await
    }

    /// Starts a background exec.
    pub async fn bg_start(&self, start: &BgStart) -> Result<BgStarted> {
        let body = serde_json::to_vec(start).map_err(|e| AgentError::Protocol(e.to_string()))?;
        self.bg_call(Method::POST, "", Some(body), CALL_DEADLINE).await
    }

    pub async fn bg_list(&self) -> Result<Vec<BgInfo>> {
        self.bg_call(Method::GET, "", None, CALL_DEADLINE).await
    }

    pub async fn bg_info(&self, id: &str) -> Result<BgInfo> {
        self.bg_call(Method::GET, &format!("/{}", bg_id(id)?), None, CALL_DEADLINE)
            .await
    }

    pub async fn bg_kill(&self, id: &str, k: &BgKill) -> Result<BgKilled> {
        let body = serde_json::to_vec(k).map_err(|e| AgentError::Protocol(e.to_string()))?;
        self.bg_call(
            Method::POST,
            &format!("/{}/kill", bg_id(id)?),
            Some(body),
            CALL_DEADLINE,
        )
        .await
    }

    /// Waits up to `timeout_secs` (the agent caps it at 600) for the exec to exit; the call's
    /// deadline is that plus [`CALL_DEADLINE`].
    pub async fn bg_wait(&self, id: &str, timeout_secs: u64) -> Result<BgWait> {
        let timeout_secs = timeout_secs.min(600);
        self.bg_call(
            Method::GET,
            &format!("/{}/wait-exit?timeout={timeout_secs}", bg_id(id)?),
            None,
            Duration::from_secs(timeout_secs) + CALL_DEADLINE,
        )
        .await
    }

    /// Forgets a background exec (the process is not killed).
    pub async fn bg_reap(&self, id: &str) -> Result<serde_json::Value> {
        self.bg_call(Method::DELETE, &format!("/{}", bg_id(id)?), None, CALL_DEADLINE)
            .await
    }

    /// The exec's output frames as NDJSON ([`slicer_agent_proto::BgFrame`] lines).
    pub async fn bg_logs(&self, id: &str, q: &BgLogsQuery) -> Result<Download> {
        let req = Request::get(format!(
            "http://agent/v1/bg/{}/logs?{}",
            bg_id(id)?,
            serde_urlencoded::to_string(q).unwrap_or_default()
        ))
        .body(empty())
        .map_err(|e| AgentError::Protocol(e.to_string()))?;
        self.stream(req).await
    }

    /// A full-duplex stream: what is written to the [`StdinWriter`] is the request body, the
    /// [`Download`] is the response body. The first answer (or error) comes before it returns.
    async fn duplex(&self, uri: String) -> Result<(StdinWriter, Download)> {
        let (tx, body) = slicer_agent_proto::body::channel(8);
        let req = Request::post(uri)
            .body(body.boxed())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let resp = within("a stream's start", CALL_DEADLINE, async {
            check(self.send(req).await?).await
        })
        .await?;
        Ok((
            StdinWriter { tx },
            Download {
                mode: None,
                body: resp.into_body(),
                pending: slicer_agent_proto::lines::LineBuf::default(),
            },
        ))
    }

    /// Connects to `target` inside the guest (`host:port` or `unix:/path`): bytes both ways.
    pub async fn forward(&self, target: &str) -> Result<(StdinWriter, Download)> {
        let q = serde_urlencoded::to_string([("target", target)]).unwrap_or_default();
        self.duplex(format!("http://agent/v1/forward?{q}")).await
    }

    /// A login shell on a PTY; both directions carry [`slicer_agent_proto::shell`] frames.
    pub async fn shell(&self, q: &slicer_agent_proto::shell::ShellQuery) -> Result<(StdinWriter, Download)> {
        let q = serde_urlencoded::to_string(q).unwrap_or_default();
        self.duplex(format!("http://agent/v1/shell?{q}")).await
    }

    /// Watches paths in the guest: NDJSON [`slicer_agent_proto::WatchEvent`] lines until dropped.
    pub async fn watch(&self, w: &slicer_agent_proto::WatchRequest) -> Result<Download> {
        let body = serde_json::to_vec(w).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let req = Request::post(uri("/v1/fs/watch", None))
            .body(full(body))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        self.stream(req).await
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

    /// Lists directory `path` (entries sorted by name; symlinks not followed).
    pub async fn readdir(&self, path: &str) -> Result<Vec<FsEntry>> {
        self.get_json("/v1/fs/readdir", path, MAX_LISTING).await
    }

    /// Describes `path` (a symlink itself, not its target).
    pub async fn stat(&self, path: &str) -> Result<FsEntry> {
        self.get_json("/v1/fs/stat", path, MAX_JSON).await
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

    /// Makes a directory; answers its entry.
    pub async fn mkdir(&self, r: &MkdirRequest) -> Result<FsEntry> {
        self.post_json("a filesystem request", "/v1/fs/mkdir", r).await
    }

    /// Removes a file, a link or a directory (a non-empty one only with `recursive`).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        let q = RemoveQuery {
            path: path.into(),
            recursive,
        };
        let req = Request::builder()
            .method(Method::DELETE)
            .uri(format!(
                "http://agent/v1/fs/remove?{}",
                serde_urlencoded::to_string(&q).unwrap_or_default()
            ))
            .body(empty())
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        within("a filesystem request", CALL_DEADLINE, async {
            check(self.send(req).await?).await?;
            Ok(())
        })
        .await
    }

    /// Sends `req` and hands back the answer's body as a stream; the answer's head has
    /// [`CALL_DEADLINE`], the stream none.
    async fn stream(&self, req: Request<ReqBody>) -> Result<Download> {
        let resp = within("a stream's start", CALL_DEADLINE, async {
            check(self.send(req).await?).await
        })
        .await?;
        Ok(Download {
            mode: None,
            body: resp.into_body(),
            pending: slicer_agent_proto::lines::LineBuf::default(),
        })
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

/// Writes stdin of a running process; dropping it closes the process's stdin.
pub struct StdinWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
}

impl StdinWriter {
    pub async fn write(&self, data: Bytes) -> Result<()> {
        self.tx
            .send(Ok(data))
            .await
            .map_err(|_| AgentError::Protocol("the process's stdin is closed".into()))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitStatus),
}

/// Output of a finished process.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// A running process in the guest.
pub struct ExecProcess {
    pub pid: u32,
    pub started_at_ms: u64,
    pub stdin: Option<StdinWriter>,
    body: Incoming,
    decoder: Decoder,
    done: bool,
}

impl ExecProcess {
    async fn next_frame(&mut self) -> Result<Option<frame::Frame>> {
        loop {
            if let Some(f) = self
                .decoder
                .next_frame()
                .map_err(|e| AgentError::Protocol(e.to_string()))?
            {
                return Ok(Some(f));
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.decoder.push(&data);
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => {
                    self.decoder.finish().map_err(|e| AgentError::Protocol(e.to_string()))?;
                    return Ok(None);
                }
            }
        }
    }

    /// The next output chunk or the exit status; `None` after the exit.
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>> {
        if self.done {
            return Ok(None);
        }
        let Some(f) = self.next_frame().await? else {
            return Err(AgentError::Protocol("exec stream ended without an exit status".into()));
        };
        Ok(Some(match f.kind {
            Kind::Stdout => ExecEvent::Stdout(f.payload),
            Kind::Stderr => ExecEvent::Stderr(f.payload),
            Kind::Exit => {
                let e: Exited = serde_json::from_slice(&f.payload)
                    .map_err(|e| AgentError::Protocol(format!("invalid exit frame: {e}")))?;
                self.done = true;
                ExecEvent::Exit(e.status)
            }
            Kind::Error => {
                let e: ErrorBody = serde_json::from_slice(&f.payload)
                    .map_err(|e| AgentError::Protocol(format!("invalid error frame: {e}")))?;
                return Err(AgentError::Remote {
                    status: 500,
                    kind: e.kind,
                    message: e.error,
                });
            }
            Kind::Started => return Err(AgentError::Protocol("second started frame".into())),
        }))
    }

    /// Collects the output until the process exits, at most [`MAX_BUFFERED_OUTPUT`] bytes of
    /// stdout and stderr together (see [`ExecProcess::output_up_to`]).
    pub async fn output(self) -> Result<Output> {
        self.output_up_to(MAX_BUFFERED_OUTPUT).await
    }

    /// Collects the output until the process exits. Past `limit` bytes (stdout and stderr
    /// together) it stops reading and drops the stream, which makes the agent kill the
    /// process group, and fails with [`AgentError::OutputLimit`] holding the first `limit`
    /// bytes.
    pub async fn output_up_to(mut self, limit: usize) -> Result<Output> {
        self.stdin = None;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            let (is_stdout, chunk) = match self.next_event().await? {
                Some(ExecEvent::Stdout(b)) => (true, b),
                Some(ExecEvent::Stderr(b)) => (false, b),
                Some(ExecEvent::Exit(status)) => return Ok(Output { stdout, stderr, status }),
                None => return Err(AgentError::Protocol("exec stream ended without an exit status".into())),
            };
            let room = limit.saturating_sub(stdout.len() + stderr.len());
            let out = if is_stdout { &mut stdout } else { &mut stderr };
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if chunk.len() > room {
                // Dropping the response stream resets it: the agent kills the process group.
                drop(self);
                return Err(AgentError::OutputLimit {
                    limit,
                    output: Box::new(Output {
                        stdout,
                        stderr,
                        status: ExitStatus {
                            code: None,
                            signal: Some(SIGKILL),
                        },
                    }),
                });
            }
        }
    }
}

/// SIGKILL's number on Linux: the status of a command killed for its output.
const SIGKILL: i32 = 9;

/// A file or tar stream coming from the guest.
pub struct Download {
    /// Mode bits of a downloaded file.
    pub mode: Option<u32>,
    body: Incoming,
    /// Bytes read past the last line handed out by [`Download::next_line`].
    pending: slicer_agent_proto::lines::LineBuf,
}

impl Download {
    /// The next chunk; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        loop {
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        return Ok(Some(d));
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(None),
            }
        }
    }

    /// The next `\n`-terminated line of a line-oriented stream (NDJSON), `None` at its end. A
    /// line longer than `max` (what a hostile guest could send) is an error. Cancelling the call
    /// loses nothing: what was read stays for the next call.
    pub async fn next_line(&mut self, max: usize) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(line) = self.pending.next_line() {
                return Ok(Some(line.to_vec()));
            }
            if self.pending.pending() > max {
                return Err(AgentError::Protocol(format!(
                    "a line from the agent is over {max} bytes"
                )));
            }
            match self.chunk().await? {
                Some(c) => self.pending.push(&c),
                None => return Ok(None),
            }
        }
    }

    /// Copies the whole stream into `w`, returning the byte count.
    pub async fn copy_to<W: tokio::io::AsyncWrite + Unpin>(&mut self, w: &mut W) -> Result<u64> {
        use tokio::io::AsyncWriteExt;
        let mut n = 0u64;
        while let Some(c) = self.chunk().await? {
            w.write_all(&c).await?;
            n += c.len() as u64;
        }
        w.flush().await?;
        Ok(n)
    }

    /// Reads everything into memory, failing beyond `limit` bytes.
    pub async fn bytes(mut self, limit: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(c) = self.chunk().await? {
            if out.len() + c.len() > limit {
                return Err(AgentError::Protocol(format!("download larger than {limit} bytes")));
            }
            out.extend_from_slice(&c);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

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
