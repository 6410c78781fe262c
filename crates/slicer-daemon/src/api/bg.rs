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
use serde::Serialize;
use slicer_agent_proto::{BgFrame, BgInfo, BgKill, BgLogsQuery, BgStart};

use super::exec::signal_name;
use super::{query_bool, query_one, JsonBody, Shared};
use crate::error::ApiErr;
use crate::manager::rfc3339_ms;

#[derive(Debug, Serialize)]
pub struct Info {
    exec_id: String,
    pid: u32,
    command: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    args: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cwd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    started_at: String,
    running: bool,
    exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signal: Option<String>,
    ended_at: Option<String>,
    bytes_written: u64,
    bytes_dropped: u64,
    next_id: u64,
    ring_bytes: u64,
}

impl From<BgInfo> for Info {
    fn from(i: BgInfo) -> Info {
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
    let r = st.manager.active(hostname)?;
    let started =
        r.vm.agent()
            .bg_start(&BgStart { spec, ring_bytes })
            .await
            .map_err(agent_err)?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "exec_id": started.exec_id,
            "pid": started.pid,
            "started_at": rfc3339_ms(started.started_at_ms),
            "ring_bytes": started.ring_bytes,
        })),
    )
        .into_response())
}

/// The agent's 410 (reaped) and 503 (ring budget) pass through as such.
fn agent_err(e: slicer_agent_client::AgentError) -> ApiErr {
    match &e {
        slicer_agent_client::AgentError::Remote {
            status: 503, message, ..
        } => ApiErr::new(StatusCode::SERVICE_UNAVAILABLE, message.clone()),
        _ => ApiErr::agent(e),
    }
}

pub async fn list(State(st): State<Shared>, Path(hostname): Path<String>) -> Result<Json<Vec<Info>>, ApiErr> {
    let r = st.manager.active(&hostname)?;
    let list = r.vm.agent().bg_list().await.map_err(agent_err)?;
    Ok(Json(list.into_iter().map(Info::from).collect()))
}

pub async fn info(
    State(st): State<Shared>,
    Path((hostname, id)): Path<(String, String)>,
) -> Result<Json<Info>, ApiErr> {
    let r = st.manager.active(&hostname)?;
    Ok(Json(r.vm.agent().bg_info(&id).await.map_err(agent_err)?.into()))
}

pub async fn reap(
    State(st): State<Shared>,
    Path((hostname, id)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiErr> {
    let r = st.manager.active(&hostname)?;
    Ok(Json(r.vm.agent().bg_reap(&id).await.map_err(agent_err)?))
}

pub async fn kill(
    State(st): State<Shared>,
    Path((hostname, id)): Path<(String, String)>,
    JsonBody(k): JsonBody<BgKill>,
) -> Result<Json<slicer_agent_proto::BgKilled>, ApiErr> {
    let r = st.manager.active(&hostname)?;
    Ok(Json(r.vm.agent().bg_kill(&id, &k).await.map_err(agent_err)?))
}

pub async fn wait_exit(
    State(st): State<Shared>,
    Path((hostname, id)): Path<(String, String)>,
    q: RawQuery,
) -> Result<Json<serde_json::Value>, ApiErr> {
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
    let r = st.manager.active(&hostname)?;
    let w = r.vm.agent().bg_wait(&id, timeout).await.map_err(agent_err)?;
    Ok(Json(serde_json::json!({
        "exec_id": w.exec_id,
        "running": w.running,
        "exit_code": w.exit_code,
        "signal": w.signal.map(signal_name),
        "ended_at": w.ended_at_ms.map(rfc3339_ms),
        "timed_out": w.timed_out,
    })))
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
    let mut v = serde_json::json!({
        "id": f.id,
        "type": f.kind,
        "timestamp": rfc3339_ms(f.timestamp_ms),
    });
    if let Some(d) = data {
        v["data"] = d.into();
        if b64 {
            v["encoding"] = "base64".into();
        }
    }
    if f.kind == "exit" {
        v["exit_code"] = f.exit_code.unwrap_or(-1).into();
        if let Some(s) = f.signal {
            v["signal"] = signal_name(s).into();
        }
    }
    for (k, val) in [("dropped_frames", f.dropped_frames), ("dropped_bytes", f.dropped_bytes)] {
        if let Some(n) = val {
            v[k] = n.into();
        }
    }
    if let Some(m) = f.message {
        v["message"] = m.into();
    }
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
    let r = st.manager.active(&hostname)?;
    let mut dl =
        r.vm.agent()
            .bg_logs(&id, &BgLogsQuery { follow, from_id })
            .await
            .map_err(agent_err)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        while let Ok(Some(line)) = dl.next_line(MAX_LINE).await {
            // A hostile guest gets its frames dropped, nothing more.
            let Ok(f) = serde_json::from_slice::<BgFrame>(&line) else {
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
