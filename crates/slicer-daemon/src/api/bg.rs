//! Background execs: `POST /vm/{h}/exec?background=true` and `/vm/{h}/exec[/{id}[/logs|kill|
//! wait-exit]]`, in SlicerVM's shapes. The process lives in the guest's agent; the daemon keeps
//! nothing, so execs survive API clients and daemon restarts alike.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use bytes::Bytes;
use slicer_agent_proto::{BgFrame, BgInfo, BgKill, BgLogsQuery, BgStart};

use super::exec::signal_name;
use super::{query_bool, query_one, JsonBody, Shared};
use crate::api::error::ApiErr;
use crate::api::time::rfc3339_ms;

use slicer_api::{ExecInfo as Info, ExecKillRequest, ExecKilled, ExecReaped, ExecStarted, ExecWaitExit};

fn info_of(i: BgInfo) -> Info {
    Info {
        exec_id: i.exec_id,
        pid: i.pid,
        command: i.command,
        args: i.args,
        cwd: i.cwd,
        uid: i.uid,
        started_at: rfc3339_ms(i.started_at_ms),
        running: i.running,
        exit_code: i.exit_code,
        signal: i.signal.map(signal_name),
        ended_at: i.ended_at_ms.map(rfc3339_ms),
        bytes_written: i.bytes_written,
        bytes_dropped: i.bytes_dropped,
        next_id: i.next_id,
        ring_bytes: i.ring_bytes,
    }
}

/// `POST /vm/{h}/exec?background=true`: 201 `{exec_id, pid, started_at, ring_bytes}`.
pub async fn start(st: &Shared, hostname: &str, pairs: &[(String, String)]) -> Result<Response, ApiErr> {
    let spec = super::exec::exec_request(pairs, true)?;
    if spec.stdin || query_bool(pairs, "buffered")? {
        return Err(ApiErr::bad_request(
            "background cannot be combined with stdin or buffered",
        ));
    }
    let ring_bytes = match query_one(pairs, "ring_bytes") {
        None | Some("") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiErr::bad_request(format!("query ring_bytes: {v:?} is not a number")))?,
        ),
    };
    let started = st
        .manager
        .exec_background(hostname, &BgStart { spec, ring_bytes })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(ExecStarted {
            exec_id: started.exec_id,
            pid: started.pid,
            started_at: rfc3339_ms(started.started_at_ms),
            ring_bytes: started.ring_bytes,
        }),
    )
        .into_response())
}

pub async fn list(State(st): State<Shared>, Path(hostname): Path<String>) -> Result<Json<Vec<Info>>, ApiErr> {
    let list = st.manager.bg_list(&hostname).await?;
    Ok(Json(list.into_iter().map(info_of).collect()))
}

pub async fn info(
    State(st): State<Shared>,
    Path((hostname, id)): Path<(String, String)>,
) -> Result<Json<Info>, ApiErr> {
    Ok(Json(info_of(st.manager.bg_info(&hostname, &id).await?)))
}

pub async fn reap(
    State(st): State<Shared>,
    Path((hostname, id)): Path<(String, String)>,
) -> Result<Json<ExecReaped>, ApiErr> {
    st.manager.bg_reap(&hostname, &id).await?;
    // The answer is ours, not the guest's.
    Ok(Json(ExecReaped {
        exec_id: id,
        reaped: true,
    }))
}

pub async fn kill(
    State(st): State<Shared>,
    Path((hostname, id)): Path<(String, String)>,
    JsonBody(k): JsonBody<ExecKillRequest>,
) -> Result<Json<ExecKilled>, ApiErr> {
    let k = BgKill {
        signal: k.signal,
        grace_ms: k.grace_ms,
    };
    let done = st.manager.bg_kill(&hostname, &id, &k).await?;
    Ok(Json(ExecKilled {
        exec_id: done.exec_id,
        pid: done.pid,
        running: done.running,
        signal_sent: done.signal_sent,
    }))
}

pub async fn wait_exit(
    State(st): State<Shared>,
    Path((hostname, id)): Path<(String, String)>,
    q: RawQuery,
) -> Result<Json<ExecWaitExit>, ApiErr> {
    let pairs = super::query_pairs(&q.0);
    let timeout = match query_one(&pairs, "timeout") {
        None | Some("") => 30,
        Some(v) => v
            .trim_end_matches('s')
            .parse::<u64>()
            .ok()
            .filter(|t| *t <= 600)
            .ok_or_else(|| ApiErr::bad_request(format!("query timeout: {v:?} is not 0-600 seconds")))?,
    };
    let w = st.manager.bg_wait(&hostname, &id, timeout).await?;
    Ok(Json(ExecWaitExit {
        exec_id: w.exec_id,
        running: w.running,
        exit_code: w.exit_code,
        signal: w.signal.map(signal_name),
        ended_at: w.ended_at_ms.map(rfc3339_ms),
        timed_out: w.timed_out,
    }))
}

/// A log frame as the SDKs read it.
fn frame_line(f: BgFrame, b64: bool) -> Bytes {
    let data = f.data.as_deref().map(|d| {
        if b64 {
            d.to_string()
        } else {
            let raw = base64::engine::general_purpose::STANDARD.decode(d).unwrap_or_default();
            String::from_utf8_lossy(&raw).into_owned()
        }
    });
    let exit = f.kind == "exit";
    let v = slicer_api::ExecFrame {
        id: Some(f.id),
        timestamp: rfc3339_ms(f.timestamp_ms),
        encoding: if b64 && data.is_some() {
            "base64".into()
        } else {
            String::new()
        },
        data: data.unwrap_or_default(),
        exit_code: exit.then(|| f.exit_code.unwrap_or(-1)),
        signal: if exit {
            f.signal.map(signal_name).unwrap_or_default()
        } else {
            String::new()
        },
        dropped_frames: f.dropped_frames,
        dropped_bytes: f.dropped_bytes,
        message: f.message.unwrap_or_default(),
        r#type: Some(slicer_api::FrameType::from_word(&f.kind)),
        ..Default::default()
    };
    let mut out = serde_json::to_vec(&v).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

/// Largest line accepted from the agent.
const MAX_LINE: usize = 1 << 20;

pub async fn logs(
    State(st): State<Shared>,
    Path((hostname, id)): Path<(String, String)>,
    q: RawQuery,
) -> Result<Response, ApiErr> {
    let pairs = super::query_pairs(&q.0);
    let follow = query_bool(&pairs, "follow")?;
    let from_id = match query_one(&pairs, "from_id") {
        None | Some("") => 0,
        Some(v) => v
            .parse()
            .map_err(|_| ApiErr::bad_request(format!("query from_id: {v:?} is not a number")))?,
    };
    let b64 = match query_one(&pairs, "stdio") {
        None | Some("") | Some("text") => false,
        Some("base64") => true,
        Some(o) => return Err(ApiErr::bad_request(format!("query stdio: {o:?} is not text or base64"))),
    };
    let mut dl = st
        .manager
        .bg_logs(&hostname, &id, &BgLogsQuery { follow, from_id })
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let mut skipped = 0u32;
        while let Ok(Some(line)) = dl.next_line(MAX_LINE).await {
            // A hostile guest gets its frames dropped, nothing more; lines already read come
            // back without an await, so a flood of bad ones gives the worker back now and then.
            let Ok(f) = serde_json::from_slice::<BgFrame>(&line) else {
                skipped += 1;
                if skipped.is_multiple_of(super::YIELD_EVERY) {
                    tokio::task::yield_now().await;
                }
                continue;
            };
            if tx.send(Ok(frame_line(f, b64))).await.is_err() {
                return;
            }
        }
    });
    let stream = super::receiver_stream(rx);
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}
