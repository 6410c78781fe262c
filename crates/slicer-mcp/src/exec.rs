//! The command tools: a command run to its end, and background commands started, inspected,
//! read and stopped. Output comes as NDJSON exec frames, kept up to a limit per stream.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::TryStreamExt;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use slicer_api::client::empty;
use slicer_api::query::ExecQuery;
use slicer_api::{ExecFrame, ExecKillRequest, FrameType};

use crate::args::{ExecIdArgs, LogsArgs, RunArgs, StartArgs, StopArgs};
use crate::{output, to_json, Fail, Sandboxes};
use crate::{DEFAULT_OUTPUT_BYTES, DEFAULT_TIMEOUT_SECS, MAX_LINE, MAX_OUTPUT_BYTES, MAX_TIMEOUT_SECS};

/// `KEY=VALUE` pairs for the exec query.
pub(crate) fn env_pairs(env: &BTreeMap<String, String>) -> Result<Vec<String>, Fail> {
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
pub(crate) fn exec_query(
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
    resp: slicer_api::Streamed,
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

/// What a command run to its end left: its streams (each kept up to a limit) and its exit.
struct RunOutput {
    out: output::Capped,
    err: output::Capped,
    /// Exit code and signal name, once the exit frame came.
    exit: Option<(i32, String)>,
}

impl Sandboxes {
    /// Runs a command to its end (or its timeout), keeping at most `limit` bytes of each stream.
    pub(crate) async fn run(&self, a: RunArgs) -> Result<Value, Fail> {
        let limit = a.max_output_bytes.unwrap_or(DEFAULT_OUTPUT_BYTES).min(MAX_OUTPUT_BYTES);
        let timeout = Duration::from_secs(
            a.timeout_secs
                .unwrap_or(DEFAULT_TIMEOUT_SECS)
                .clamp(1, MAX_TIMEOUT_SECS),
        );
        let q = exec_query(a.command, a.argv, a.cwd, &a.env, a.uid, false)?;
        let mut o = RunOutput {
            out: output::Capped::new(limit),
            err: output::Capped::new(limit),
            exit: None,
        };
        // Past the timeout the request is dropped, which kills the command in the guest.
        let timed_out = match tokio::time::timeout(timeout, self.collect(&a.sandbox, &q, &mut o)).await {
            Ok(r) => {
                r?;
                false
            }
            Err(_) => true,
        };
        let (exit_code, signal) = match o.exit {
            Some((c, s)) => (Some(c), s),
            None => (None, String::new()),
        };
        Ok(json!({
            "exit_code": exit_code,
            "signal": if signal.is_empty() { Value::Null } else { Value::from(signal) },
            "timed_out": timed_out,
            "stdout": o.out.text(),
            "stderr": o.err.text(),
            "stdout_bytes": o.out.total(),
            "stderr_bytes": o.err.total(),
            "truncated": o.out.truncated() || o.err.truncated(),
        }))
    }

    /// Starts the exec `q` in `sandbox` and reads its frames into `o` until it ends.
    async fn collect(&self, sandbox: &str, q: &ExecQuery, o: &mut RunOutput) -> Result<(), Fail> {
        let resp = self.api.vm_exec(sandbox, q, empty()).await?;
        for_each_frame(resp, "the output", |f| {
            if !f.error.is_empty() {
                return Err(Fail(f.error));
            }
            match f.r#type {
                Some(FrameType::Stdout) => o.out.push(&payload(&f)),
                Some(FrameType::Stderr) => o.err.push(&payload(&f)),
                Some(FrameType::Exit) => o.exit = Some((f.exit_code.unwrap_or(0), f.signal.clone())),
                _ => {}
            }
            Ok(())
        })
        .await
    }

    pub(crate) async fn start(&self, a: StartArgs) -> Result<Value, Fail> {
        let q = exec_query(a.command, a.argv, a.cwd, &a.env, a.uid, true)?;
        let s = self.api.vm_exec_background(&a.sandbox, &q).await?;
        Ok(json!({ "exec_id": s.exec_id, "pid": s.pid, "started_at": s.started_at }))
    }

    pub(crate) async fn inspect(&self, a: ExecIdArgs) -> Result<Value, Fail> {
        to_json(self.api.exec_info(&a.sandbox, &a.exec_id).await?)
    }

    pub(crate) async fn logs(&self, a: LogsArgs) -> Result<Value, Fail> {
        let limit = a.max_bytes.unwrap_or(DEFAULT_OUTPUT_BYTES).min(MAX_OUTPUT_BYTES);
        let mut q = vec![("stdio", "base64".to_string())];
        q.extend(a.from_id.map(|i| ("from_id", i.to_string())));
        let resp = self.api.exec_logs(&a.sandbox, &a.exec_id, &q).await?;
        let (mut out, mut err) = (output::Capped::new(limit), output::Capped::new(limit));
        let mut next = a.from_id;
        let mut dropped = 0u64;
        let mut exit: Option<i32> = None;
        for_each_frame(resp, "the logs", |f| {
            if let Some(id) = f.id {
                next = Some(id + 1);
            }
            match f.r#type {
                Some(FrameType::Stdout) => out.push(&payload(&f)),
                Some(FrameType::Stderr) => err.push(&payload(&f)),
                Some(FrameType::Gap) => dropped += f.dropped_bytes.unwrap_or(0),
                Some(FrameType::Exit) => exit = f.exit_code,
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

    pub(crate) async fn stop(&self, a: StopArgs) -> Result<Value, Fail> {
        let body = ExecKillRequest {
            signal: a.signal.map(|s| format!("{s:?}")),
            grace_ms: a.grace_ms,
        };
        to_json(self.api.kill_exec(&a.sandbox, &a.exec_id, &body).await?)
    }
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
}
