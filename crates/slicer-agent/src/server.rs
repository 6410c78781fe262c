//! HTTP/2 service of one host session: routing, errors, health and power.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use slicer_agent_proto::{h2, ErrorBody, Health, PowerRequest};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::reaper::Reaper;

pub type Body = BoxBody<Bytes, std::io::Error>;

pub struct State {
    pub started: Instant,
    pub pid1: bool,
    pub reaper: Arc<Reaper>,
    pub bg: crate::bg::Registry,
}

impl State {
    pub fn new(started: Instant, pid1: bool, reaper: Arc<Reaper>) -> State {
        State {
            started,
            pid1,
            reaper,
            bg: Default::default(),
        }
    }
}

/// An error answered to the host as `ErrorBody` JSON with a status code.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "bad_request",
            message: msg.into(),
        }
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "not_found",
            message: msg.into(),
        }
    }
    pub fn conflict(msg: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::CONFLICT,
            kind: "conflict",
            message: msg.into(),
        }
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "internal",
            message: msg.into(),
        }
    }
    /// Maps an OS error on `what` to the matching status.
    pub fn io(what: &str, e: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        let (status, kind) = match e.kind() {
            NotFound => (StatusCode::NOT_FOUND, "not_found"),
            PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
            AlreadyExists => (StatusCode::CONFLICT, "conflict"),
            InvalidInput | InvalidData => (StatusCode::BAD_REQUEST, "bad_request"),
            _ if e.raw_os_error() == Some(libc::EISDIR) || e.raw_os_error() == Some(libc::ENOTDIR) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        // Include the causes (tar wraps the OS error it hit).
        let message = format!("{what}: {}", slicer_error::chain_string(e));
        ApiError { status, kind, message }
    }

    fn into_response(self) -> Response<Body> {
        let body = serde_json::to_vec(&ErrorBody {
            kind: self.kind.to_string(),
            error: self.message,
        })
        .unwrap_or_default();
        let mut r = Response::new(full(body));
        *r.status_mut() = self.status;
        r
    }
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// A request body of at most `limit` bytes.
pub async fn body_bytes(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    Ok(http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading body: {e}")))?
        .to_bytes())
}

/// A JSON request body of at most `limit` bytes; `what` names it in the error.
pub async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
    what: &str,
) -> Result<T, ApiError> {
    let raw = body_bytes(req, limit).await?;
    serde_json::from_slice(&raw).map_err(|e| ApiError::bad_request(format!("invalid {what}: {e}")))
}

pub fn query<T: serde::de::DeserializeOwned>(req: &Request<Incoming>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(req.uri().query().unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))
}

/// Serves one HTTP/2 session until the host goes away.
pub async fn serve_session<IO>(io: IO, state: Arc<State>) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(req, state).await.unwrap_or_else(ApiError::into_response)) }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(h2::INITIAL_STREAM_WINDOW)
        .initial_connection_window_size(h2::INITIAL_CONN_WINDOW)
        .max_frame_size(h2::MAX_FRAME_SIZE)
        .max_concurrent_streams(h2::MAX_CONCURRENT_STREAMS)
        .max_header_list_size(h2::MAX_HEADER_LIST_SIZE)
        .serve_connection(TokioIo::new(io), svc)
        .await
}

async fn route(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, ApiError> {
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/v1/health") => Ok(json(StatusCode::OK, &health(&state))),
        (Method::POST, "/v1/exec") => crate::exec::handle(req, state).await,
        (Method::PUT, "/v1/file") => crate::files::put_file(req).await,
        (Method::GET, "/v1/file") => crate::files::get_file(req).await,
        (Method::PUT, "/v1/tar") => crate::files::put_tar(req).await,
        (Method::GET, "/v1/tar") => crate::files::get_tar(req).await,
        (Method::POST, "/v1/power") => power(req, state).await,
        (Method::POST, "/v1/identity") => crate::identity::handle(req, state).await,
        (Method::PUT, "/v1/ca") => crate::ca::put(req).await,
        (Method::GET, "/v1/ca") => crate::ca::get().await,
        (Method::GET, "/v1/stats") => crate::stats::handle().await,
        (Method::POST, "/v1/forward") => crate::stream::forward(req).await,
        (Method::POST, "/v1/shell") => crate::stream::shell(req, state).await,
        (_, p) if p == "/v1/bg" || p.starts_with("/v1/bg/") => crate::bg::route(req, state).await,
        (Method::GET, "/v1/fs/readdir") => crate::fs::readdir(req).await,
        (Method::POST, "/v1/fs/watch") => crate::watch::handle(req).await,
        (Method::GET, "/v1/fs/stat") => crate::fs::stat(req).await,
        (Method::POST, "/v1/fs/mkdir") => crate::fs::mkdir(req).await,
        (Method::DELETE, "/v1/fs/remove") => crate::fs::remove(req).await,
        (_, path) => Err(ApiError::not_found(format!("no route {} {path}", req.method()))),
    }
}

fn health(state: &State) -> Health {
    let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0);
    Health {
        agent_version: slicer_agent_proto::VERSION.to_string(),
        agent_uptime_ns: state.started.elapsed().as_nanos() as u64,
        system_uptime_ns: boot,
        pid1: state.pid1,
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

async fn power(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, ApiError> {
    let p: PowerRequest = json_body(req, 4096, "power request").await?;
    // Answer first; the shutdown runs after the response is on its way.
    tokio::spawn(crate::init::power(p.action, state.pid1));
    Ok(json(StatusCode::ACCEPTED, &serde_json::json!({ "action": p.action })))
}
