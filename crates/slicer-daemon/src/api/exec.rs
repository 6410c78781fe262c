//! `POST /vm/{h}/exec`: NDJSON frames as the process produces output, or one buffered answer.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use bytes::Bytes;
use futures_util::TryStreamExt;
use slicer_agent_client::{AgentError, ExecEvent};
use slicer_agent_proto::ExecRequest;
use slicer_api::{BufferedExec, ExecFrame, FrameType};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{query_bool, query_one, query_pairs, Shared};
use crate::api::error::ApiErr;
use crate::api::time::now_rfc3339;
use crate::manager::{ExecStart, Process};

/// Quotes a word for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub(super) fn signal_name(sig: i32) -> String {
    nix_signal_name(sig).unwrap_or_else(|| format!("SIG{sig}"))
}

fn nix_signal_name(sig: i32) -> Option<String> {
    let names = [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGTERM, "SIGTERM"),
    ];
    names.iter().find(|(n, _)| *n == sig).map(|(_, s)| s.to_string())
}

/// Builds the agent request from the query (SlicerVM's parameters). A `background` command
/// runs directly unless `shell` is given, so that its info names the program and its args.
pub fn exec_request(pairs: &[(String, String)], background: bool) -> Result<ExecRequest, ApiErr> {
    let q = slicer_api::query::ExecQuery::from_pairs(pairs).map_err(ApiErr::bad_request)?;
    if q.cmd.is_empty() {
        return Err(ApiErr::bad_request("query cmd is required"));
    }
    let mut env = Vec::new();
    for kv in &q.env {
        let (k, v) = kv
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| ApiErr::bad_request(format!("query env: {kv:?} is not KEY=VALUE")))?;
        env.push((k.to_string(), v.to_string()));
    }
    if let Some(c) = &q.cwd {
        if c.split('/').any(|part| part == "..") {
            return Err(ApiErr::bad_request(format!("query cwd: {c:?} must not contain '..'")));
        }
        if !(c.starts_with('/') || c == "~" || c.starts_with("~/")) {
            return Err(ApiErr::bad_request(format!(
                "query cwd: {c:?} must be absolute, ~ or ~/..."
            )));
        }
    }
    let (uid, gid) = identity_of(q.uid, q.gid);
    // As SlicerVM: the command line goes through /bin/bash unless `shell` is given; an
    // explicitly empty `shell` runs the command directly. Background commands run directly
    // unless `shell` is given.
    let shell = match q.shell.as_deref() {
        None if background => None,
        None => Some("/bin/bash".to_string()),
        Some("") => None,
        Some(s) => Some(s.to_string()),
    };
    let mut req = match shell {
        Some(sh) => {
            let mut line = q.cmd.clone();
            for a in &q.args {
                line.push(' ');
                line.push_str(&shell_quote(a));
            }
            ExecRequest {
                shell: Some(line),
                shell_path: Some(sh),
                ..Default::default()
            }
        }
        None => {
            let mut argv = vec![q.cmd.clone()];
            argv.extend(q.args.iter().cloned());
            ExecRequest::argv(argv)
        }
    };
    req.env = env;
    req.cwd = q.cwd;
    req.uid = uid;
    req.gid = gid;
    req.stdin = q.stdin;
    req.validate().map_err(ApiErr::bad_request)?;
    Ok(req)
}

/// The `uid`/`gid` a request acts as: absent `uid` is the image's default non-root user
/// (the agent resolves it), `uid=0` root. `gid` absent or 0 (what SDKs send by default) is
/// the user's own group, except for root.
pub fn identity(pairs: &[(String, String)]) -> Result<(Option<u32>, Option<u32>), ApiErr> {
    let number = |k| slicer_api::query::number::<u32>(pairs, k).map_err(ApiErr::bad_request);
    Ok(identity_of(number("uid")?, number("gid")?))
}

fn identity_of(uid: Option<u32>, gid: Option<u32>) -> (Option<u32>, Option<u32>) {
    let uid = uid.unwrap_or(slicer_agent_proto::DEFAULT_USER);
    (Some(uid), gid.filter(|g| *g != 0 || uid == 0))
}

fn line(frame: &ExecFrame) -> Bytes {
    let mut v = serde_json::to_vec(frame).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn encode(data: &[u8], base64: bool) -> String {
    if base64 {
        base64::engine::general_purpose::STANDARD.encode(data)
    } else {
        String::from_utf8_lossy(data).into_owned()
    }
}

/// Most JSON one buffered answer holds for its output: stdout and stderr as they are sent
/// (escapes and base64 included), so a NUL (6 bytes as `\u0000`) counts 6. Past it the
/// command is killed and the answer keeps what fit, saying so in `error`.
pub const MAX_BUFFERED_JSON: usize = 16 << 20;
/// Most JSON all buffered answers hold together, from the first output byte collected until
/// the answer is sent (or its client goes away). A buffered exec that starts while less than
/// [`MIN_FREE`] of it is free answers 503; one that finds it used up while collecting is
/// killed and answers what it holds, saying so in `error`.
pub const BUFFERED_BUDGET: usize = 32 << 20;
/// Free budget a buffered exec needs to start.
const MIN_FREE: usize = 256 << 10;
/// Output is encoded this many raw bytes at a time (at most 6 times as many encoded).
const PIECE: usize = 4096;

/// The one budget of all buffered answers of this daemon.
static BUDGET: Budget = Budget::new(BUFFERED_BUDGET);

/// Bytes of buffered answers held, against a limit.
pub(super) struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    const fn new(limit: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    fn free(&self) -> usize {
        self.limit.saturating_sub(self.used.load(Ordering::Acquire))
    }

    /// Takes `n` bytes if they are free.
    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }
}

/// Bytes taken from a [`Budget`]; given back when dropped.
struct Held {
    budget: &'static Budget,
    n: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// Why collecting stopped early.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    /// This answer reached [`MAX_BUFFERED_JSON`].
    Answer,
    /// All buffered answers together reached the budget.
    Budget,
}

impl Cut {
    fn message(self, limit: usize, budget: usize) -> String {
        match self {
            Cut::Answer => format!(
                "the command's output exceeded {} MiB (stdout and stderr together, as encoded in this answer): it was killed and its output truncated",
                limit >> 20
            ),
            Cut::Budget => format!(
                "the daemon's memory for buffered exec answers ({} MiB for all at once) ran out: the command was killed and its output truncated; try again later or stream the output (buffered=false)",
                budget >> 20
            ),
        }
    }
}

/// One output stream as the body of a JSON string, encoded as it arrives.
#[derive(Default)]
struct Encoded {
    pieces: Vec<Bytes>,
    /// Raw bytes not encoded yet: an incomplete UTF-8 sequence (text) or the bytes past the
    /// last whole 3 (base64); at most 3.
    carry: Vec<u8>,
}

/// `s` escaped as serde_json writes a string's body.
fn escape_into(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => {
                out.extend_from_slice(&bytes[from..i]);
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
                from = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[from..i]);
        out.extend_from_slice(esc);
        from = i + 1;
    }
    out.extend_from_slice(&bytes[from..]);
}

impl Encoded {
    /// Encodes `raw` (with what was carried); `last` flushes the carry. Text is decoded as
    /// `String::from_utf8_lossy` does on the whole output; base64 as one encoding of it.
    fn encode(&mut self, raw: &[u8], base64: bool, last: bool) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(raw);
        let mut out = Vec::with_capacity(data.len() + data.len() / 4 + 8);
        if base64 {
            let whole = if last { data.len() } else { data.len() / 3 * 3 };
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&data[..whole])
                    .as_bytes(),
            );
            self.carry = data[whole..].to_vec();
            return out;
        }
        let mut input = &data[..];
        loop {
            match std::str::from_utf8(input) {
                Ok(text) => {
                    escape_into(text, &mut out);
                    break;
                }
                Err(e) => {
                    let (valid, rest) = input.split_at(e.valid_up_to());
                    escape_into(std::str::from_utf8(valid).unwrap_or_default(), &mut out);
                    match e.error_len() {
                        Some(n) => {
                            out.extend_from_slice("\u{fffd}".as_bytes());
                            input = &rest[n..];
                        }
                        None if last => {
                            out.extend_from_slice("\u{fffd}".as_bytes());
                            break;
                        }
                        None => {
                            self.carry = rest.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }
}

/// Output of a buffered exec collected as the JSON it is sent as, every byte held counted
/// against this answer's limit and the daemon's [`Budget`].
struct Collector {
    base64: bool,
    stdout: Encoded,
    stderr: Encoded,
    held: Held,
    limit: usize,
}

impl Collector {
    fn new(base64: bool, budget: &'static Budget, limit: usize) -> Collector {
        Collector {
            base64,
            stdout: Encoded::default(),
            stderr: Encoded::default(),
            held: Held { budget, n: 0 },
            limit,
        }
    }

    /// Adds one piece of encoded output if this answer and the budget have room for it.
    fn keep(&mut self, to_stdout: bool, mut piece: Vec<u8>) -> Result<(), Cut> {
        piece.shrink_to_fit();
        let n = piece.len();
        if n == 0 {
            return Ok(());
        }
        if self.held.n + n > self.limit {
            return Err(Cut::Answer);
        }
        if !self.held.budget.take(n) {
            return Err(Cut::Budget);
        }
        self.held.n += n;
        let out = if to_stdout { &mut self.stdout } else { &mut self.stderr };
        out.pieces.push(Bytes::from(piece));
        Ok(())
    }

    /// Encodes and keeps `raw`, a few KiB at a time.
    fn add(&mut self, to_stdout: bool, raw: &[u8]) -> Result<(), Cut> {
        for part in raw.chunks(PIECE) {
            let out = if to_stdout { &mut self.stdout } else { &mut self.stderr };
            let piece = out.encode(part, self.base64, false);
            self.keep(to_stdout, piece)?;
        }
        Ok(())
    }

    /// The whole answer: `{"stdout":"…","stderr":"…"` then the rest of `answer` (whose own
    /// stdout and stderr are empty), as serde_json would write it all.
    fn finish(mut self, answer: &BufferedExec) -> Result<BufferedBody, ApiErr> {
        for to_stdout in [true, false] {
            let out = if to_stdout { &mut self.stdout } else { &mut self.stderr };
            let piece = out.encode(&[], self.base64, true);
            // At most a few bytes: kept even past the limits.
            let n = piece.len();
            if n > 0 {
                self.held.budget.used.fetch_add(n, Ordering::AcqRel);
                self.held.n += n;
                out.pieces.push(Bytes::from(piece));
            }
        }
        let rest = serde_json::to_string(answer).map_err(ApiErr::internal)?;
        const EMPTY: &str = r#"{"stdout":"","stderr":"""#;
        let rest = rest.strip_prefix(EMPTY).ok_or_else(|| {
            ApiErr::internal(crate::manager::HostCause::msg(format!(
                "a buffered answer does not start with {EMPTY}: {rest}"
            )))
        })?;
        let mut pieces = std::collections::VecDeque::new();
        pieces.push_back(Bytes::from_static(br#"{"stdout":""#));
        pieces.extend(self.stdout.pieces.drain(..));
        pieces.push_back(Bytes::from_static(br#"","stderr":""#));
        pieces.extend(self.stderr.pieces.drain(..));
        pieces.push_back(Bytes::from(format!("\"{rest}")));
        let len = pieces.iter().map(|p| p.len() as u64).sum();
        Ok(BufferedBody {
            pending: Arc::new(Mutex::new(Some(Pending {
                pieces,
                _held: self.held,
            }))),
            len,
        })
    }
}

/// What of a buffered answer is not sent yet, and its share of the budget.
struct Pending {
    pieces: std::collections::VecDeque<Bytes>,
    _held: Held,
}

/// A buffered answer's body. Its memory (and budget) goes when it is sent, when its client
/// goes away, or [`SEND_DEADLINE`] after it is ready, whichever comes first: a client that
/// never reads its answer cannot keep the budget from others.
struct BufferedBody {
    pending: Arc<Mutex<Option<Pending>>>,
    /// Bytes not handed to hyper yet.
    len: u64,
}

/// Longest a buffered answer waits for its client to take it.
pub const SEND_DEADLINE: Duration = Duration::from_secs(60);

impl BufferedBody {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops what is not sent `after` from now, unless the body went first.
    fn expire_after(&self, after: Duration) {
        let pending = Arc::downgrade(&self.pending);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(p) = pending.upgrade() {
                p.lock().unwrap_or_else(|p| p.into_inner()).take();
            }
        });
    }
}

impl axum::body::HttpBody for BufferedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let next = match self.lock().as_mut() {
            Some(p) => Ok(p.pieces.pop_front()),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client did not take its buffered answer within {SEND_DEADLINE:?}"),
            )),
        };
        let next = match next {
            Ok(next) => next,
            Err(e) => return std::task::Poll::Ready(Some(Err(e))),
        };
        if let Some(p) = &next {
            self.len -= p.len() as u64;
        }
        std::task::Poll::Ready(next.map(|p| Ok(hyper::body::Frame::data(p))))
    }

    fn is_end_stream(&self) -> bool {
        self.len == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.len)
    }
}

/// Runs a buffered exec's command to its end (or its cut) and answers SlicerVM's shape.
async fn collect(
    mut proc: Process,
    mut c: Collector,
    mut answer: BufferedExec,
    hostname: &str,
) -> Result<Response, ApiErr> {
    let pid = proc.pid;
    proc.stdin = None;
    let cut = loop {
        let r = match proc.next_event().await {
            Ok(Some(ExecEvent::Stdout(b))) => c.add(true, &b),
            Ok(Some(ExecEvent::Stderr(b))) => c.add(false, &b),
            Ok(Some(ExecEvent::Exit(status))) => {
                answer.exit_code = status.shell_code();
                answer.signal = status.signal.map(signal_name).unwrap_or_default();
                break None;
            }
            Ok(None) => {
                return Err(ApiErr::agent(slicer_agent_client::AgentError::Protocol(
                    "exec stream ended without an exit status".into(),
                )))
            }
            Err(e) => return Err(ApiErr::agent(e)),
        };
        if let Err(cut) = r {
            break Some(cut);
        }
    };
    if let Some(cut) = cut {
        // Dropping the stream resets it: the agent kills the process group.
        drop(proc);
        answer.error = cut.message(c.limit, c.held.budget.limit);
        answer.exit_code = 128 + libc::SIGKILL;
        answer.signal = signal_name(libc::SIGKILL);
        tracing::info!("VM {hostname}: buffered exec of pid {pid}: {}", answer.error);
    }
    answer.ended_at = now_rfc3339();
    let body = c.finish(&answer)?;
    body.expire_after(SEND_DEADLINE);
    Ok(([(header::CONTENT_TYPE, "application/json")], Body::new(body)).into_response())
}

/// A frame of this kind, stamped now.
fn frame(kind: FrameType) -> ExecFrame {
    ExecFrame {
        r#type: Some(kind),
        timestamp: now_rfc3339(),
        ..Default::default()
    }
}

/// How an exec's stdout and stderr are written into frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stdio {
    Text,
    Base64,
}

impl Stdio {
    fn parse(pairs: &[(String, String)]) -> Result<Stdio, ApiErr> {
        match query_one(pairs, "stdio") {
            None | Some("") | Some("text") => Ok(Stdio::Text),
            Some("base64") => Ok(Stdio::Base64),
            Some(o) => Err(ApiErr::bad_request(format!("query stdio: {o:?} is not text or base64"))),
        }
    }

    fn is_base64(self) -> bool {
        self == Stdio::Base64
    }

    /// The frames' `encoding`: empty for text.
    fn encoding(self) -> String {
        match self {
            Stdio::Text => String::new(),
            Stdio::Base64 => "base64".to_string(),
        }
    }
}

pub async fn exec(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
    q: RawQuery,
    body: Body,
) -> Result<Response, ApiErr> {
    let pairs = query_pairs(&q.0);
    let spec = exec_request(&pairs, false)?;
    let buffered = query_bool(&pairs, "buffered")?;
    if buffered && spec.stdin {
        return Err(ApiErr::bad_request("stdin cannot be combined with buffered"));
    }
    let stdio = Stdio::parse(&pairs)?;
    if query_bool(&pairs, "background")? {
        return super::bg::start(&st, &hostname, &pairs).await;
    }
    st.manager.active(&hostname)?;
    if buffered && BUDGET.free() < MIN_FREE {
        return Err(ApiErr::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "buffered exec answers hold the daemon's {} MiB for them; try again later or stream the output (buffered=false)",
                BUFFERED_BUDGET >> 20
            ),
        ));
    }
    let mut proc = match st.manager.exec(&hostname, &spec).await? {
        ExecStart::Running(p) => p,
        // Could not start the program: one error frame, as SlicerVM answers.
        ExecStart::NotStarted(msg) if buffered => {
            return Ok(Json(BufferedExec {
                exit_code: 1,
                error: msg,
                ..Default::default()
            })
            .into_response())
        }
        ExecStart::NotStarted(msg) => {
            // A frame without a type, as SlicerVM's.
            let frame = ExecFrame {
                timestamp: now_rfc3339(),
                error: msg,
                exit_code: Some(1),
                ..Default::default()
            };
            return Ok(ndjson(Body::from(line(&frame))));
        }
    };
    let started_at = now_rfc3339();
    if let Some(stdin) = proc.stdin.take() {
        let mut data = body.into_data_stream();
        tokio::spawn(async move {
            while let Ok(Some(chunk)) = data.try_next().await {
                if stdin.write(chunk).await.is_err() {
                    break;
                }
            }
        });
    }
    if buffered {
        let answer = BufferedExec {
            encoding: stdio.encoding(),
            pid: Some(proc.pid),
            started_at,
            ..Default::default()
        };
        let c = Collector::new(stdio.is_base64(), &BUDGET, MAX_BUFFERED_JSON);
        return collect(proc, c, answer, &hostname).await;
    }
    Ok(ndjson(Body::new(stream(proc, started_at, stdio))))
}

/// The frame of one process event, and whether it ends the stream.
fn event_frame(ev: Result<Option<ExecEvent>, AgentError>, pid: u32, stdio: Stdio) -> Option<(ExecFrame, bool)> {
    let output = |kind: FrameType, b: &[u8]| {
        let data = encode(b, stdio.is_base64());
        let mut f = ExecFrame {
            encoding: stdio.encoding(),
            data: data.clone(),
            ..frame(kind)
        };
        match kind {
            FrameType::Stdout => f.stdout = data,
            _ => f.stderr = data,
        }
        f
    };
    Some(match ev {
        Ok(Some(ExecEvent::Stdout(b))) => (output(FrameType::Stdout, &b), false),
        Ok(Some(ExecEvent::Stderr(b))) => (output(FrameType::Stderr, &b), false),
        Ok(Some(ExecEvent::Exit(st))) => (
            ExecFrame {
                ended_at: now_rfc3339(),
                pid: Some(pid),
                exit_code: Some(st.shell_code()),
                signal: st.signal.map(signal_name).unwrap_or_default(),
                ..frame(FrameType::Exit)
            },
            true,
        ),
        Ok(None) => return None,
        // The agent stream broke.
        Err(e) => (
            ExecFrame {
                error: e.to_string(),
                exit_code: Some(1),
                ..frame(FrameType::Error)
            },
            true,
        ),
    })
}

/// A streaming exec's NDJSON frames: `started`, the output, then `exit` (or `error`).
fn stream(mut proc: Process, started_at: String, stdio: Stdio) -> slicer_agent_proto::body::ChannelBody {
    let (tx, rx) = slicer_agent_proto::body::channel(16);
    let pid = proc.pid;
    tokio::spawn(async move {
        let first = ExecFrame {
            timestamp: started_at.clone(),
            pid: Some(pid),
            started_at,
            ..frame(FrameType::Started)
        };
        if tx.send(Ok(line(&first))).await.is_err() {
            return;
        }
        loop {
            let Some((frame, last)) = event_frame(proc.next_event().await, pid, stdio) else {
                return;
            };
            // The client went away (dropping the process kills it in the guest), or the
            // stream ended.
            if tx.send(Ok(line(&frame))).await.is_err() || last {
                return;
            }
        }
    });
    rx
}

fn ndjson(body: Body) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests;
