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

pub mod output;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use futures_util::TryStreamExt;
use http::Method;
use http_body_util::BodyExt;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ListResourceTemplatesResult, PaginatedRequestParams,
    ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, ResourceContents, ResourceTemplate,
    ServerCapabilities, ServerConfig,
};
use rmcp::schemars::{self, JsonSchema};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;
use serde_json::{json, Value};
use slicer_api::client::{empty, full, query};
use slicer_api::query::{CopyQuery, ExecQuery};
use slicer_api::{
    ApiClient, ApiError, CopyResponse, CreateNodeRequest, CreateNodeResponse, ExecFrame, ExecInfo, ExecKillRequest,
    ExecKilled, ExecStarted, FsEntry, HostGroupInfo, Node, VmDescription,
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

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateArgs {
    /// Host group to create the sandbox in (list_groups shows them). Optional when there is
    /// only one group, or when `image` picks one.
    #[serde(default)]
    pub group: Option<String>,
    /// Guest image (e.g. "min" or "systemd"): picks the first group built on it, or must match
    /// the given group's image.
    #[serde(default)]
    pub image: Option<String>,
    /// Tags to find the sandbox by later, e.g. "user=alice" or "job=42".
    #[serde(default)]
    pub tags: Vec<String>,
    /// vCPUs (default: the group's).
    #[serde(default)]
    #[schemars(range(min = 1, max = 64))]
    pub cpus: Option<u32>,
    /// Guest RAM in MiB (default: the group's).
    #[serde(default)]
    #[schemars(range(min = 64, max = 1048576))]
    pub ram_mb: Option<u64>,
    /// What to wait for before answering: "agent" (default: commands can run), "userdata" (the
    /// userdata script finished) or "none".
    #[serde(default)]
    pub wait: Option<Wait>,
    /// A shell script run as root on first boot.
    #[serde(default)]
    pub userdata: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Wait {
    Agent,
    Userdata,
    None,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListArgs {
    /// Only sandboxes of this host group.
    #[serde(default)]
    pub group: Option<String>,
    /// Only sandboxes with exactly this tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// Only sandboxes with a tag that starts with this (e.g. "user=").
    #[serde(default)]
    pub tag_prefix: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxArg {
    /// The sandbox's hostname, as create_sandbox or list_sandboxes gave it.
    pub sandbox: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// A shell command line, run with /bin/bash -c. Give this or `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// A program and its arguments, run directly (no shell). Give this or `command`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Working directory: absolute, or ~/... in the user's home (default: the home).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run as this uid (0 is root; default: the image's default user).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Seconds before the command is killed (default 120, at most 3600).
    #[serde(default)]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_secs: Option<u64>,
    /// Bytes of stdout, and of stderr, returned (default 65536, at most 4194304); the rest is
    /// cut and replaced by a line starting "[slicer: output truncated".
    #[serde(default)]
    #[schemars(range(min = 0, max = 4194304))]
    pub max_output_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// A shell command line, run with /bin/bash -c. Give this or `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// A program and its arguments, run directly. Give this or `command`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Working directory: absolute, or ~/... (default: the home).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run as this uid (0 is root; default: the image's default user).
    #[serde(default)]
    pub uid: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecIdArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// The id start_background returned.
    pub exec_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogsArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// The id start_background returned.
    pub exec_id: String,
    /// Continue from this frame id (the previous call's next_from_id); default: the oldest kept.
    #[serde(default)]
    pub from_id: Option<u64>,
    /// Bytes of stdout, and of stderr, returned (default 65536, at most 4194304).
    #[serde(default)]
    #[schemars(range(min = 0, max = 4194304))]
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// The id start_background returned.
    pub exec_id: String,
    /// TERM (default; KILL follows after grace_ms), KILL, INT, HUP, QUIT, USR1 or USR2.
    #[serde(default)]
    pub signal: Option<Signal>,
    /// With TERM: milliseconds before KILL follows (default 5000).
    #[serde(default)]
    pub grace_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[allow(clippy::upper_case_acronyms)]
pub enum Signal {
    TERM,
    KILL,
    INT,
    HUP,
    QUIT,
    USR1,
    USR2,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// The file: absolute, or ~/... in the default user's home.
    pub path: String,
    /// Bytes returned at most (default 1048576, at most 8388608); longer files are cut with a
    /// marker.
    #[serde(default)]
    #[schemars(range(min = 0, max = 8388608))]
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// The file: absolute, or ~/... in the default user's home; missing directories are made.
    pub path: String,
    /// The file's content (at most 8 MiB): text, or base64 when `base64` is true.
    pub content: String,
    /// `content` is base64 (for binary files).
    #[serde(default)]
    pub base64: bool,
    /// Octal mode, e.g. "0755" (default 0644).
    #[serde(default)]
    pub permissions: Option<String>,
    /// Owner uid (0 is root; default: the image's default user).
    #[serde(default)]
    pub uid: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DirArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// The directory: absolute, or ~/... in the default user's home.
    pub path: String,
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

type Outcome = Result<CallToolResult, ErrorData>;

/// A tool's answer: JSON (structured content and its text) or the failure as a tool error.
fn answer(r: Result<Value, Fail>) -> Outcome {
    Ok(match r {
        Ok(v) => CallToolResult::structured(v),
        Err(Fail(msg)) => CallToolResult::error(vec![ContentBlock::text(msg)]),
    })
}

/// A hostname, group or exec id as one path segment: refused if it could change the path.
fn segment<'a>(what: &str, s: &'a str) -> Result<&'a str, Fail> {
    if s.is_empty()
        || s.len() > 253
        || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        || s.starts_with('.')
    {
        return Err(Fail(format!("{what} {s:?} is not a valid name")));
    }
    Ok(s)
}

/// `/vm/{sandbox}/exec/{exec_id}`, both names checked.
fn exec_path(sandbox: &str, exec_id: &str) -> Result<String, Fail> {
    Ok(format!(
        "/vm/{}/exec/{}",
        segment("sandbox", sandbox)?,
        segment("exec_id", exec_id)?
    ))
}

/// `KEY=VALUE` pairs for the exec query.
fn env_pairs(env: &BTreeMap<String, String>) -> Result<Vec<String>, Fail> {
    env.iter()
        .map(|(k, v)| {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                Err(Fail(format!("env: {k:?} is not a valid variable name")))
            } else {
                Ok(format!("{k}={v}"))
            }
        })
        .collect()
}

/// The exec query for a command line or an argv.
fn exec_query(
    command: Option<String>,
    argv: Option<Vec<String>>,
    cwd: Option<String>,
    env: &BTreeMap<String, String>,
    uid: Option<u32>,
    background: bool,
) -> Result<ExecQuery, Fail> {
    let mut q = ExecQuery {
        env: env_pairs(env)?,
        uid,
        cwd: cwd.filter(|c| !c.is_empty()),
        background,
        stdio: Some("base64".into()),
        ..Default::default()
    };
    match (command, argv) {
        (Some(c), None) if !c.trim().is_empty() => {
            q.cmd = c;
            q.shell = Some("/bin/bash".into());
        }
        (None, Some(a)) if a.first().is_some_and(|p| !p.is_empty()) => {
            q.cmd = a[0].clone();
            q.args = a[1..].to_vec();
            q.shell = Some(String::new());
        }
        (Some(_), Some(_)) => return Err("give command or argv, not both".into()),
        _ => return Err("give command (a non-empty shell line) or argv (a program and its arguments)".into()),
    }
    Ok(q)
}

/// Reads an NDJSON answer of exec frames (`what` names it in errors), one frame at a time, in
/// lines of at most [`MAX_LINE`] bytes.
async fn for_each_frame(
    resp: http::Response<slicer_api::client::Incoming>,
    what: &str,
    mut each: impl FnMut(ExecFrame) -> Result<(), Fail>,
) -> Result<(), Fail> {
    let mut body = resp.into_body().into_data_stream();
    let mut lines = output::Lines::new(MAX_LINE);
    while let Some(chunk) = body
        .try_next()
        .await
        .map_err(|e| Fail(format!("reading {what}: {e}")))?
    {
        for line in lines.push(&chunk)? {
            let f: ExecFrame =
                serde_json::from_slice(&line).map_err(|e| Fail(format!("invalid frame in {what}: {e}")))?;
            each(f)?;
        }
    }
    Ok(())
}

/// A frame's payload, decoded (as sent, should it not be base64).
fn payload(f: &ExecFrame) -> Vec<u8> {
    f.payload().unwrap_or_else(|_| f.payload_text().as_bytes().to_vec())
}

impl Sandboxes {
    pub fn new(api: ApiClient) -> Sandboxes {
        Sandboxes { api }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, Fail> {
        Ok(self.api.json(Method::GET, path, None).await?)
    }

    async fn group_of(&self, sandbox: &str) -> Result<String, Fail> {
        let d: VmDescription = self.get(&format!("/vm/{}", segment("sandbox", sandbox)?)).await?;
        Ok(d.node.hostgroup)
    }

    /// The group a create goes to: the one given, else the one `image` picks, else the only one.
    async fn pick_group(&self, group: Option<&str>, image: Option<&str>) -> Result<String, Fail> {
        let groups: Vec<HostGroupInfo> = self.get("/hostgroup").await?;
        let names = || groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>().join(", ");
        match (group, image) {
            (Some(g), image) => {
                let info = groups
                    .iter()
                    .find(|x| x.name == g)
                    .ok_or_else(|| Fail(format!("no host group {g:?}; the groups are: {}", names())))?;
                if let Some(i) = image.filter(|i| *i != info.image) {
                    return Err(Fail(format!(
                        "host group {g:?} runs image {:?}, not {i:?}; give another group or leave out image",
                        info.image
                    )));
                }
                Ok(g.to_string())
            }
            (None, Some(i)) => groups
                .iter()
                .find(|x| x.image == i)
                .map(|x| x.name.clone())
                .ok_or_else(|| Fail(format!("no host group runs image {i:?}; the groups are: {}", names()))),
            (None, None) => match groups.as_slice() {
                [one] => Ok(one.name.clone()),
                [] => Err("the daemon has no host groups".into()),
                _ => Err(Fail(format!("give group: the daemon has several ({})", names()))),
            },
        }
    }

    async fn create(&self, a: CreateArgs) -> Result<Value, Fail> {
        let group = self.pick_group(a.group.as_deref(), a.image.as_deref()).await?;
        let body = CreateNodeRequest {
            ram_bytes: a.ram_mb.map(|m| m << 20),
            cpus: a.cpus,
            tags: a.tags,
            userdata: a.userdata,
            ..Default::default()
        };
        let wait = match a.wait.unwrap_or(Wait::Agent) {
            Wait::Agent => "agent",
            Wait::Userdata => "userdata",
            Wait::None => "",
        };
        let body = serde_json::to_value(&body).map_err(|e| Fail(e.to_string()))?;
        let r: CreateNodeResponse = self
            .api
            .json(
                Method::POST,
                &format!(
                    "/hostgroup/{}/nodes?{}",
                    segment("group", &group)?,
                    query(&[("wait", wait.into())])
                ),
                Some(&body),
            )
            .await?;
        Ok(json!({
            "sandbox": r.hostname,
            "group": r.hostgroup,
            "ip": r.ip,
            "created_at": r.created_at,
        }))
    }

    async fn list(&self, a: ListArgs) -> Result<Value, Fail> {
        let mut q = Vec::new();
        q.extend(a.tag.map(|t| ("tag", t)));
        q.extend(a.tag_prefix.map(|t| ("tag_prefix", t)));
        let path = match &a.group {
            Some(g) => format!("/hostgroup/{}/nodes", segment("group", g)?),
            None => "/nodes".to_string(),
        };
        let nodes: Vec<Node> = self.get(&format!("{path}?{}", query(&q))).await?;
        Ok(json!({ "sandboxes": nodes }))
    }

    /// Runs a command to its end (or its timeout), keeping at most `limit` bytes of each stream.
    async fn run(&self, a: RunArgs) -> Result<Value, Fail> {
        let sandbox = segment("sandbox", &a.sandbox)?.to_string();
        let limit = a.max_output_bytes.unwrap_or(DEFAULT_OUTPUT_BYTES).min(MAX_OUTPUT_BYTES);
        let timeout = Duration::from_secs(
            a.timeout_secs
                .unwrap_or(DEFAULT_TIMEOUT_SECS)
                .clamp(1, MAX_TIMEOUT_SECS),
        );
        let q = exec_query(a.command, a.argv, a.cwd, &a.env, a.uid, false)?;
        let (mut out, mut err) = (output::Capped::new(limit), output::Capped::new(limit));
        let mut exit: Option<(i32, String)> = None;
        let collect = async {
            let resp = self
                .api
                .call(
                    Method::POST,
                    &format!("/vm/{sandbox}/exec?{}", query(&q.to_pairs())),
                    Some("application/octet-stream"),
                    empty(),
                )
                .await?;
            for_each_frame(resp, "the output", |f| {
                if !f.error.is_empty() {
                    return Err(Fail(f.error));
                }
                match f.r#type.as_str() {
                    "stdout" => out.push(&payload(&f)),
                    "stderr" => err.push(&payload(&f)),
                    "exit" => exit = Some((f.exit_code.unwrap_or(0), f.signal.clone())),
                    _ => {}
                }
                Ok(())
            })
            .await
        };
        // Past the timeout the request is dropped, which kills the command in the guest.
        let timed_out = match tokio::time::timeout(timeout, collect).await {
            Ok(r) => {
                r?;
                false
            }
            Err(_) => true,
        };
        let (exit_code, signal) = match exit {
            Some((c, s)) => (Some(c), s),
            None => (None, String::new()),
        };
        Ok(json!({
            "exit_code": exit_code,
            "signal": if signal.is_empty() { Value::Null } else { Value::from(signal) },
            "timed_out": timed_out,
            "stdout": out.text(),
            "stderr": err.text(),
            "stdout_bytes": out.total(),
            "stderr_bytes": err.total(),
            "truncated": out.truncated() || err.truncated(),
        }))
    }

    async fn start(&self, a: StartArgs) -> Result<Value, Fail> {
        let sandbox = segment("sandbox", &a.sandbox)?;
        let q = exec_query(a.command, a.argv, a.cwd, &a.env, a.uid, true)?;
        let s: ExecStarted = self
            .api
            .json(
                Method::POST,
                &format!("/vm/{sandbox}/exec?{}", query(&q.to_pairs())),
                None,
            )
            .await?;
        Ok(json!({ "exec_id": s.exec_id, "pid": s.pid, "started_at": s.started_at }))
    }

    async fn inspect(&self, a: ExecIdArgs) -> Result<Value, Fail> {
        let i: ExecInfo = self.get(&exec_path(&a.sandbox, &a.exec_id)?).await?;
        serde_json::to_value(i).map_err(|e| Fail(e.to_string()))
    }

    async fn logs(&self, a: LogsArgs) -> Result<Value, Fail> {
        let limit = a.max_bytes.unwrap_or(DEFAULT_OUTPUT_BYTES).min(MAX_OUTPUT_BYTES);
        let mut q = vec![("stdio", "base64".to_string())];
        q.extend(a.from_id.map(|i| ("from_id", i.to_string())));
        let resp = self
            .api
            .call(
                Method::GET,
                &format!("{}/logs?{}", exec_path(&a.sandbox, &a.exec_id)?, query(&q)),
                None,
                empty(),
            )
            .await?;
        let (mut out, mut err) = (output::Capped::new(limit), output::Capped::new(limit));
        let mut next = a.from_id;
        let mut dropped = 0u64;
        let mut exit: Option<i32> = None;
        for_each_frame(resp, "the logs", |f| {
            if let Some(id) = f.id {
                next = Some(id + 1);
            }
            match f.r#type.as_str() {
                "stdout" => out.push(&payload(&f)),
                "stderr" => err.push(&payload(&f)),
                "gap" => dropped += f.dropped_bytes.unwrap_or(0),
                "exit" => exit = f.exit_code,
                _ => {}
            }
            Ok(())
        })
        .await?;
        Ok(json!({
            "stdout": out.text(),
            "stderr": err.text(),
            "truncated": out.truncated() || err.truncated(),
            "dropped_bytes": dropped,
            "exit_code": exit,
            "next_from_id": next,
        }))
    }

    async fn stop(&self, a: StopArgs) -> Result<Value, Fail> {
        let body = ExecKillRequest {
            signal: a.signal.map(|s| format!("{s:?}")),
            grace_ms: a.grace_ms,
        };
        let body = serde_json::to_value(&body).map_err(|e| Fail(e.to_string()))?;
        let k: ExecKilled = self
            .api
            .json(
                Method::POST,
                &format!("{}/kill", exec_path(&a.sandbox, &a.exec_id)?),
                Some(&body),
            )
            .await?;
        serde_json::to_value(k).map_err(|e| Fail(e.to_string()))
    }

    async fn read(&self, a: ReadArgs) -> Result<Value, Fail> {
        let limit = a.max_bytes.unwrap_or(DEFAULT_READ_BYTES).min(MAX_READ_BYTES);
        let q = CopyQuery {
            path: a.path.clone(),
            mode: Some("binary".into()),
            ..Default::default()
        };
        let resp = self
            .api
            .call(
                Method::GET,
                &format!("/vm/{}/cp?{}", segment("sandbox", &a.sandbox)?, query(&q.to_pairs())),
                None,
                empty(),
            )
            .await?;
        let mut kept = output::Capped::new(limit);
        let mut body = resp.into_body().into_data_stream();
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| Fail(format!("reading {}: {e}", a.path)))?
        {
            kept.push(&chunk);
            // Past the limit the rest is not read: dropping the body ends the transfer.
            if kept.truncated() {
                break;
            }
        }
        let bytes = kept.kept();
        Ok(match std::str::from_utf8(bytes) {
            Ok(text) => json!({
                "path": a.path,
                "encoding": "utf-8",
                "content": text,
                "truncated": kept.truncated(),
                "bytes_returned": bytes.len(),
            }),
            Err(_) => json!({
                "path": a.path,
                "encoding": "base64",
                "content": base64::engine::general_purpose::STANDARD.encode(bytes),
                "truncated": kept.truncated(),
                "bytes_returned": bytes.len(),
            }),
        })
    }

    async fn write(&self, a: WriteArgs) -> Result<Value, Fail> {
        let data = if a.base64 {
            base64::engine::general_purpose::STANDARD
                .decode(a.content.trim())
                .map_err(|e| Fail(format!("content is not base64: {e}")))?
        } else {
            a.content.into_bytes()
        };
        if data.len() > MAX_WRITE_BYTES {
            return Err(Fail(format!(
                "content is {} bytes; write_file takes at most {MAX_WRITE_BYTES}",
                data.len()
            )));
        }
        let q = CopyQuery {
            path: a.path,
            mode: Some("binary".into()),
            uid: a.uid,
            permissions: a.permissions,
            ..Default::default()
        };
        let resp = self
            .api
            .call(
                Method::POST,
                &format!("/vm/{}/cp?{}", segment("sandbox", &a.sandbox)?, query(&q.to_pairs())),
                Some("application/octet-stream"),
                full(data),
            )
            .await?;
        let raw = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Fail(e.to_string()))?
            .to_bytes();
        let c: CopyResponse =
            serde_json::from_slice(&raw).map_err(|e| Fail(format!("invalid answer from the daemon: {e}")))?;
        Ok(json!({ "path": c.path, "bytes": c.bytes }))
    }

    async fn list_dir(&self, a: DirArgs) -> Result<Value, Fail> {
        let entries: Vec<FsEntry> = self
            .get(&format!(
                "/vm/{}/fs/readdir?{}",
                segment("sandbox", &a.sandbox)?,
                query(&[("path", a.path.clone())])
            ))
            .await?;
        Ok(json!({ "path": a.path, "entries": entries }))
    }

    async fn delete(&self, a: SandboxArg) -> Result<Value, Fail> {
        let group = self.group_of(&a.sandbox).await?;
        let r: slicer_api::DeleteResponse = self
            .api
            .json(
                Method::DELETE,
                &format!(
                    "/hostgroup/{}/nodes/{}",
                    segment("group", &group)?,
                    segment("sandbox", &a.sandbox)?
                ),
                None,
            )
            .await?;
        Ok(json!({ "sandbox": a.sandbox, "deleted": true, "message": r.message }))
    }
}

#[tool_router]
impl Sandboxes {
    #[tool(
        description = "List the host groups sandboxes can be created in: name, image, default vCPUs and RAM.",
        annotations(read_only_hint = true)
    )]
    async fn list_groups(&self) -> Outcome {
        answer(
            self.get::<Vec<HostGroupInfo>>("/hostgroup")
                .await
                .map(|g| json!({ "groups": g })),
        )
    }

    #[tool(
        description = "Create a sandbox (a Linux microVM) and wait until commands can run in it. Returns its \
        hostname, the `sandbox` argument of every other tool. Tag it (e.g. user=alice) to find it again."
    )]
    async fn create_sandbox(&self, Parameters(a): Parameters<CreateArgs>) -> Outcome {
        answer(self.create(a).await)
    }

    #[tool(
        description = "List sandboxes, optionally only those of a group or with a tag (exact, or by prefix): \
        hostname, group, status, tags, IP, vCPUs, RAM.",
        annotations(read_only_hint = true)
    )]
    async fn list_sandboxes(&self, Parameters(a): Parameters<ListArgs>) -> Outcome {
        answer(self.list(a).await)
    }

    #[tool(
        description = "Describe one sandbox: status, group, image, tags, network, resources.",
        annotations(read_only_hint = true)
    )]
    async fn get_sandbox(&self, Parameters(a): Parameters<SandboxArg>) -> Outcome {
        let r = async {
            let d: VmDescription = self.get(&format!("/vm/{}", segment("sandbox", &a.sandbox)?)).await?;
            serde_json::to_value(d).map_err(|e| Fail(e.to_string()))
        };
        answer(r.await)
    }

    #[tool(
        description = "Run a command in a sandbox and wait for it to end. Returns exit_code (null if it was \
        killed by the timeout: timed_out is then true), signal, stdout and stderr. Each stream is cut at \
        max_output_bytes (default 65536); a cut stream ends with a line starting \"[slicer: output truncated\" \
        that gives the full size. A non-zero exit code is a normal result, not a tool error. For servers and \
        long jobs use start_background."
    )]
    async fn run_command(&self, Parameters(a): Parameters<RunArgs>) -> Outcome {
        answer(self.run(a).await)
    }

    #[tool(
        description = "Start a command in the background in a sandbox (a server, a long job). Returns its \
        exec_id for inspect_background, read_background_logs and stop_background. Its output is kept in a \
        1 MiB ring."
    )]
    async fn start_background(&self, Parameters(a): Parameters<StartArgs>) -> Outcome {
        answer(self.start(a).await)
    }

    #[tool(
        description = "State of a background command: running, exit_code, signal, bytes written and dropped.",
        annotations(read_only_hint = true)
    )]
    async fn inspect_background(&self, Parameters(a): Parameters<ExecIdArgs>) -> Outcome {
        answer(self.inspect(a).await)
    }

    #[tool(
        description = "Output of a background command so far (stdout and stderr, each cut at max_bytes). Pass \
        next_from_id back as from_id to read only what came after.",
        annotations(read_only_hint = true)
    )]
    async fn read_background_logs(&self, Parameters(a): Parameters<LogsArgs>) -> Outcome {
        answer(self.logs(a).await)
    }

    #[tool(
        description = "Stop a background command: TERM, then KILL after grace_ms if it still runs (or the \
        signal given)."
    )]
    async fn stop_background(&self, Parameters(a): Parameters<StopArgs>) -> Outcome {
        answer(self.stop(a).await)
    }

    #[tool(
        description = "Read a file from a sandbox. Text comes back as is (encoding utf-8), other bytes as base64 \
        (encoding base64); at most max_bytes (default 1 MiB), with truncated true when the file is longer.",
        annotations(read_only_hint = true)
    )]
    async fn read_file(&self, Parameters(a): Parameters<ReadArgs>) -> Outcome {
        answer(self.read(a).await)
    }

    #[tool(
        description = "Write a file in a sandbox (replacing it; missing directories are made), owned by the \
        default user unless uid is given. content is text, or base64 with base64: true; at most 8 MiB."
    )]
    async fn write_file(&self, Parameters(a): Parameters<WriteArgs>) -> Outcome {
        answer(self.write(a).await)
    }

    #[tool(
        description = "List a directory in a sandbox: name, type (file, directory, symlink), size, mode, mtime.",
        annotations(read_only_hint = true)
    )]
    async fn list_directory(&self, Parameters(a): Parameters<DirArgs>) -> Outcome {
        answer(self.list_dir(a).await)
    }

    #[tool(
        description = "Delete a sandbox: its VM stops and its disk is removed.",
        annotations(destructive_hint = true)
    )]
    async fn delete_sandbox(&self, Parameters(a): Parameters<SandboxArg>) -> Outcome {
        answer(self.delete(a).await)
    }
}

/// What the server tells a client about itself on connecting.
const INSTRUCTIONS: &str = "Slicer sandboxes are Linux microVMs with their own kernel. Create one \
(create_sandbox), run commands in it (run_command; start_background for servers and long jobs), \
move files with write_file/read_file/list_directory, and delete it when done (delete_sandbox). \
Commands run as the image's default non-root user with passwordless sudo unless uid is given. \
Tag sandboxes (tags) to find them again with list_sandboxes.";

/// The console log resource: a sandbox's kernel and boot messages.
const CONSOLE_TEMPLATE: &str = "slicer://sandbox/{sandbox}/console";
/// The end of the console log a resource read returns.
const CONSOLE_BYTES: usize = 256 << 10;

#[tool_handler]
impl ServerHandler for Sandboxes {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().enable_resources().build())
            .with_server_info(Implementation::new("slicer", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        let mut t = ResourceTemplate::new(CONSOLE_TEMPLATE, "console");
        t.description = Some(format!(
            "A sandbox's serial console (kernel and boot messages), its last {} KiB",
            CONSOLE_BYTES >> 10
        ));
        t.mime_type = Some("text/plain".into());
        Ok(ListResourceTemplatesResult::with_all_items(vec![t]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let uri = request.uri;
        let sandbox = uri
            .strip_prefix("slicer://sandbox/")
            .and_then(|r| r.strip_suffix("/console"))
            .ok_or_else(|| {
                ErrorData::resource_not_found(format!("no resource {uri:?}; the console is {CONSOLE_TEMPLATE}"), None)
            })?;
        let sandbox = segment("sandbox", sandbox).map_err(|Fail(m)| ErrorData::resource_not_found(m, None))?;
        let logs: slicer_api::LogsResponse = self
            .get(&format!("/vm/{sandbox}/logs?lines=0"))
            .await
            .map_err(|Fail(m)| ErrorData::resource_not_found(m, None))?;
        Ok(ReadResourceResult::new(vec![ResourceContents::text(console_tail(&logs.content), uri)]).into())
    }
}

/// The last [`CONSOLE_BYTES`] of a console log, cut at a line, with a marker when cut.
fn console_tail(log: &str) -> String {
    if log.len() <= CONSOLE_BYTES {
        return log.to_string();
    }
    let mut from = log.len() - CONSOLE_BYTES;
    while !log.is_char_boundary(from) {
        from += 1;
    }
    let rest = &log[from..];
    let rest = rest.find('\n').map(|n| &rest[n + 1..]).unwrap_or(rest);
    format!(
        "[slicer: console log truncated: its last {} of {} bytes]\n{rest}",
        rest.len(),
        log.len()
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_or_an_argv_but_not_both() {
        let env = BTreeMap::new();
        let q = exec_query(Some("uname -a".into()), None, None, &env, None, false).unwrap_or_else(|_| panic!());
        assert_eq!((q.cmd.as_str(), q.shell.as_deref()), ("uname -a", Some("/bin/bash")));
        let q = exec_query(None, Some(vec!["ls".into(), "-l".into()]), None, &env, Some(0), false)
            .unwrap_or_else(|_| panic!());
        assert_eq!(
            (q.cmd.as_str(), q.args.as_slice(), q.shell.as_deref()),
            ("ls", &["-l".to_string()][..], Some(""))
        );
        assert!(exec_query(Some("x".into()), Some(vec!["x".into()]), None, &env, None, false).is_err());
        assert!(exec_query(None, None, None, &env, None, false).is_err());
        assert!(exec_query(Some("  ".into()), None, None, &env, None, false).is_err());
        assert!(exec_query(None, Some(vec![]), None, &env, None, false).is_err());
    }

    #[test]
    fn env_names_are_checked() {
        let mut env = BTreeMap::new();
        env.insert("A".to_string(), "1=2".to_string());
        assert_eq!(env_pairs(&env).unwrap_or_else(|_| panic!()), vec!["A=1=2".to_string()]);
        env.insert("B=C".to_string(), "x".to_string());
        assert!(env_pairs(&env).is_err());
    }

    #[test]
    fn a_long_console_log_keeps_its_end_from_a_line_start() {
        let log = format!("{}\nlast line\n", "x".repeat(CONSOLE_BYTES + 10));
        let t = console_tail(&log);
        assert!(t.starts_with("[slicer: console log truncated"), "{}", &t[..80]);
        assert!(t.ends_with("\nlast line\n"));
        assert_eq!(console_tail("short\n"), "short\n");
    }

    #[test]
    fn names_cannot_change_the_path() {
        assert!(segment("sandbox", "vm-1").is_ok());
        for bad in ["", "..", "a/b", "a?b", "a b", ".x", "a%2fb"] {
            assert!(segment("sandbox", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_tool_has_an_object_schema_and_a_description() {
        let tools = Sandboxes::tool_router().list_all();
        assert_eq!(tools.len(), 13);
        for t in tools {
            assert!(t.description.as_deref().is_some_and(|d| d.len() > 20), "{}", t.name);
            assert_eq!(
                t.input_schema.get("type").and_then(|v| v.as_str()),
                Some("object"),
                "{}",
                t.name
            );
        }
    }
}
