//! Commands in the guest: buffered and streamed execs, and background execs by id.

use bytes::Bytes;
use std::time::Duration;

use http::{Method, Request};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use slicer_agent_proto::frame::{self, Decoder, Kind};
use slicer_agent_proto::{
    BgInfo, BgKill, BgKilled, BgLogsQuery, BgStart, BgStarted, BgWait, ErrorBody, ExecRequest, ExitStatus, Exited,
    Started,
};

use crate::{
    check, empty, full, parse_json_up_to, uri, within, AgentClient, AgentError, Download, Result, StdinWriter,
    CALL_DEADLINE, MAX_BUFFERED_OUTPUT, MAX_LISTING,
};

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

impl AgentClient {
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
