//! Sandboxes as tools for AI agents: an MCP server (the `rmcp` SDK) whose tools are calls to
//! the slicer daemon's REST API. `slicer mcp` serves it over stdio with the CLI's connection
//! settings; the daemon serves it at `/mcp` (streamable HTTP) behind its bearer token, calling
//! its own router in-process. Either way a tool can do what the REST API lets its token do,
//! no more: the daemon checks every call.
//!
//! Every failure (an unknown sandbox, a bad argument, a daemon error) is a tool result with
//! `isError: true` and the daemon's message; the server itself never fails a call. Output is
//! bounded: a command's stdout and stderr, a file and a background command's logs are cut at a
//! stated size with a marker ([`output::MARKER`]), and what is past it is counted, not kept.

mod args;
mod exec;
mod files;
pub mod output;
mod sandboxes;
mod tools;

use rmcp::model::{CallToolResult, ContentBlock};
use rmcp::ErrorData;
use serde_json::Value;
use slicer_api::{ApiClient, ApiError};

pub use args::{
    CreateArgs, DirArgs, ExecIdArgs, ListArgs, LogsArgs, ReadArgs, RunArgs, SandboxArg, Signal, StartArgs, StopArgs,
    Wait, WriteArgs,
};
pub use output::MARKER;

/// Output a command may return by default (stdout and stderr each), and at most.
pub const DEFAULT_OUTPUT_BYTES: usize = 64 << 10;
pub const MAX_OUTPUT_BYTES: usize = 4 << 20;
/// How long a command may run by default, and at most.
pub const DEFAULT_TIMEOUT_SECS: u64 = 120;
pub const MAX_TIMEOUT_SECS: u64 = 3600;
/// A file read returns at most this much by default, and at most.
pub const DEFAULT_READ_BYTES: usize = 1 << 20;
pub const MAX_READ_BYTES: usize = 8 << 20;
/// The largest file `write_file` takes (its content arrives inside one JSON-RPC message).
pub const MAX_WRITE_BYTES: usize = 8 << 20;
/// Longest NDJSON line accepted from the daemon (its frames are at most a few hundred KiB).
const MAX_LINE: usize = 8 << 20;

/// The MCP server: one per client connection (stdio) or per request (HTTP); it holds only a
/// client for the daemon.
#[derive(Clone)]
pub struct Sandboxes {
    api: ApiClient,
}

impl Sandboxes {
    pub fn new(api: ApiClient) -> Sandboxes {
        Sandboxes { api }
    }
}

/// A tool's failure, shown to the agent as the tool's result.
struct Fail(String);

impl From<ApiError> for Fail {
    fn from(e: ApiError) -> Fail {
        Fail(e.to_string())
    }
}

impl From<String> for Fail {
    fn from(e: String) -> Fail {
        Fail(e)
    }
}

impl From<&str> for Fail {
    fn from(e: &str) -> Fail {
        Fail(e.to_string())
    }
}

/// What a tool answers: its result, or an error of the protocol (never used for a failed call).
type Outcome = Result<CallToolResult, ErrorData>;

/// A tool's answer: JSON (structured content and its text) or the failure as a tool error.
fn answer(r: Result<Value, Fail>) -> Outcome {
    Ok(match r {
        Ok(v) => CallToolResult::structured(v),
        Err(Fail(msg)) => CallToolResult::error(vec![ContentBlock::text(msg)]),
    })
}

/// A wire value as a tool's JSON answer.
fn to_json(v: impl serde::Serialize) -> Result<Value, Fail> {
    serde_json::to_value(v).map_err(|e| Fail(e.to_string()))
}

/// Serves MCP on stdin/stdout until the client closes it.
pub async fn serve_stdio(api: ApiClient) -> Result<(), Error> {
    use rmcp::ServiceExt;
    let running = Sandboxes::new(api)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| Error::Serve(e.to_string()))?;
    running.waiting().await.map_err(|e| Error::Serve(e.to_string()))?;
    Ok(())
}

/// The streamable-HTTP transport as a tower service (the daemon nests it at `/mcp`, behind its
/// bearer token). Stateless and answering JSON: the server keeps nothing per client between
/// requests, so clients cannot grow it. `check_host`: refuse Host headers that are not
/// loopback names (DNS rebinding), for a daemon that runs without a token.
pub fn http_service(
    api: ApiClient,
    check_host: bool,
) -> rmcp::transport::StreamableHttpService<
    Sandboxes,
    rmcp::transport::streamable_http_server::session::local::LocalSessionManager,
> {
    let mut config = rmcp::transport::StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_max_request_body_bytes(MAX_WRITE_BYTES * 2 + (1 << 20));
    if !check_host {
        config = config.disable_allowed_hosts();
    }
    rmcp::transport::StreamableHttpService::new(move || Ok(Sandboxes::new(api.clone())), Default::default(), config)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("MCP server: {0}")]
    Serve(String),
}
