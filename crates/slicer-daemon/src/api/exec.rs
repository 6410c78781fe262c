//! `POST /vm/{h}/exec`: NDJSON frames as the process produces output, or one buffered answer.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use bytes::Bytes;
use futures_util::TryStreamExt;
use slicer_agent_client::ExecEvent;
use slicer_agent_proto::ExecRequest;
use slicer_api::{BufferedExec, ExecFrame};

use super::{query_bool, query_one, query_pairs, Shared};
use crate::api::error::ApiErr;
use crate::manager::now_rfc3339;

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

/// As [`encode`], reusing `data`'s buffer for valid UTF-8 text (buffered output can be 16 MiB).
fn encode_owned(data: Vec<u8>, base64: bool) -> String {
    if base64 {
        return encode(&data, true);
    }
    String::from_utf8(data).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Length of `s` as a JSON string body (serde_json's escapes).
fn json_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// A buffered answer serialized into one buffer sized for it up front (a large output is not
/// copied through doubling growth).
fn buffered_json(answer: &BufferedExec) -> Response {
    let mut body = Vec::with_capacity(json_len(&answer.stdout) + json_len(&answer.stderr) + 1024);
    match serde_json::to_writer(&mut body, answer) {
        Ok(()) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ApiErr::internal(e).into_response(),
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
    let b64 = match query_one(&pairs, "stdio") {
        None | Some("") | Some("text") => false,
        Some("base64") => true,
        Some(o) => return Err(ApiErr::bad_request(format!("query stdio: {o:?} is not text or base64"))),
    };
    if query_bool(&pairs, "background")? {
        return super::bg::start(&st, &hostname, &pairs).await;
    }
    let running = st.manager.active(&hostname)?;
    let enc = if b64 { "base64".to_string() } else { String::new() };

    let mut proc = match running.vm.agent().exec(&spec).await {
        Ok(p) => p,
        Err(e) => {
            let msg = e.to_string();
            if let slicer_agent_client::AgentError::Remote { status, .. } = &e {
                if *status == 404 || *status == 403 {
                    // Could not start the program: one error frame, as SlicerVM answers.
                    if buffered {
                        return Ok(Json(BufferedExec {
                            exit_code: 1,
                            error: msg,
                            ..Default::default()
                        })
                        .into_response());
                    }
                    let frame = ExecFrame {
                        timestamp: now_rfc3339(),
                        error: msg,
                        exit_code: Some(1),
                        ..Default::default()
                    };
                    return Ok(ndjson(Body::from(line(&frame))));
                }
            }
            return Err(ApiErr::agent(e));
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
        let pid = proc.pid;
        // At most MAX_BUFFERED_OUTPUT: past it the command is killed and the answer keeps what
        // was read, with an error saying so.
        let (out, error) = match proc.output().await {
            Ok(out) => (out, String::new()),
            Err(e @ slicer_agent_client::AgentError::OutputLimit { .. }) => {
                let msg = e.to_string();
                let slicer_agent_client::AgentError::OutputLimit { output, .. } = e else {
                    unreachable!("matched above")
                };
                tracing::info!("VM {hostname}: buffered exec of pid {pid}: {msg}");
                (*output, msg)
            }
            Err(e) => return Err(ApiErr::agent(e)),
        };
        let answer = BufferedExec {
            signal: out.status.signal.map(signal_name).unwrap_or_default(),
            exit_code: out.status.shell_code(),
            stdout: encode_owned(out.stdout, b64),
            stderr: encode_owned(out.stderr, b64),
            encoding: enc,
            pid: Some(pid),
            started_at,
            ended_at: now_rfc3339(),
            error,
        };
        return Ok(buffered_json(&answer));
    }

    let (tx, rx) = slicer_agent_proto::body::channel(16);
    let pid = proc.pid;
    tokio::spawn(async move {
        let first = ExecFrame {
            r#type: "started".into(),
            timestamp: started_at.clone(),
            pid: Some(pid),
            started_at,
            ..Default::default()
        };
        if tx.send(Ok(line(&first))).await.is_err() {
            return;
        }
        loop {
            let frame = match proc.next_event().await {
                Ok(Some(ExecEvent::Stdout(b))) => {
                    let data = encode(&b, b64);
                    ExecFrame {
                        r#type: "stdout".into(),
                        timestamp: now_rfc3339(),
                        encoding: enc.clone(),
                        stdout: data.clone(),
                        data,
                        ..Default::default()
                    }
                }
                Ok(Some(ExecEvent::Stderr(b))) => {
                    let data = encode(&b, b64);
                    ExecFrame {
                        r#type: "stderr".into(),
                        timestamp: now_rfc3339(),
                        encoding: enc.clone(),
                        stderr: data.clone(),
                        data,
                        ..Default::default()
                    }
                }
                Ok(Some(ExecEvent::Exit(st))) => {
                    let f = ExecFrame {
                        r#type: "exit".into(),
                        timestamp: now_rfc3339(),
                        ended_at: now_rfc3339(),
                        pid: Some(pid),
                        exit_code: Some(st.shell_code()),
                        signal: st.signal.map(signal_name).unwrap_or_default(),
                        ..Default::default()
                    };
                    let _ = tx.send(Ok(line(&f))).await;
                    return;
                }
                Ok(None) => return,
                Err(e) => ExecFrame {
                    r#type: "error".into(),
                    timestamp: now_rfc3339(),
                    error: e.to_string(),
                    exit_code: Some(1),
                    ..Default::default()
                },
            };
            let is_error = frame.r#type == "error";
            if tx.send(Ok(line(&frame))).await.is_err() || is_error {
                // The client went away (dropping the process kills it in the guest), or the
                // agent stream broke.
                return;
            }
        }
    });
    Ok(ndjson(Body::new(rx)))
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
mod tests {
    use super::*;

    fn q(s: &str) -> Vec<(String, String)> {
        query_pairs(&Some(s.to_string()))
    }

    #[test]
    fn buffered_answers_are_sized_exactly() {
        let answer = BufferedExec {
            stdout: "y\n\"\\\u{1}é".repeat(1000),
            stderr: "\t\r\u{8}\u{c}\u{1f}".into(),
            ..Default::default()
        };
        let expected = serde_json::to_vec(&answer).unwrap();
        let string_bodies = json_len(&answer.stdout) + json_len(&answer.stderr);
        let plain = serde_json::to_vec(&BufferedExec::default()).unwrap();
        assert_eq!(expected.len(), plain.len() + string_bodies);
        assert_eq!(encode_owned(b"ok".to_vec(), false), "ok");
        assert_eq!(encode_owned(vec![0xff], false), "\u{fffd}");
        assert_eq!(encode_owned(b"ok".to_vec(), true), "b2s=");
    }

    #[test]
    fn query_maps_to_agent_requests() {
        let r = exec_request(&q("cmd=echo&args=a b&args=it's"), false).unwrap();
        assert_eq!(r.shell.as_deref(), Some("echo 'a b' 'it'\\''s'"));
        assert_eq!(r.shell_path.as_deref(), Some("/bin/bash"));
        assert_eq!((r.uid, r.gid), (Some(slicer_agent_proto::DEFAULT_USER), None));
        let r = exec_request(&q("cmd=ls&args=-la&shell="), false).unwrap();
        assert_eq!(r.argv, vec!["ls", "-la"]);
        let r = exec_request(&q("cmd=sleep&args=600"), true).unwrap();
        assert_eq!((r.argv, r.shell), (vec!["sleep".to_string(), "600".to_string()], None));
        let r = exec_request(&q("cmd=echo $HOME&shell=/bin/bash"), true).unwrap();
        assert_eq!(r.shell.as_deref(), Some("echo $HOME"));
        let r = exec_request(&q("cmd=id&uid=1000&gid=0&env=A=1&cwd=~/x&stdin=true"), false).unwrap();
        assert_eq!((r.uid, r.gid, r.stdin), (Some(1000), None, true));
        assert_eq!(r.cwd.as_deref(), Some("~/x"));
        assert_eq!(r.env, vec![("A".to_string(), "1".to_string())]);
        let r = exec_request(&q("cmd=id&uid=0&gid=0"), false).unwrap();
        assert_eq!((r.uid, r.gid), (Some(0), Some(0)));
        assert!(exec_request(&q("args=x"), false).is_err());
        assert!(exec_request(&q("cmd=x&env=novalue"), false).is_err());
        assert!(exec_request(&q("cmd=x&cwd=/a/../b"), false).is_err());
        assert!(exec_request(&q("cmd=x&cwd=../.."), false).is_err());
        assert!(exec_request(&q("cmd=x&cwd=rel"), false).is_err());
        assert!(exec_request(&q("cmd=x&stdin=maybe"), false).is_err());
    }
}
