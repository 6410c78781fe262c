//! WebSockets: `GET /vm/{h}/forward` (raw bytes to a TCP or UNIX socket in the guest, one
//! connection per WebSocket, as the inlets-style SDK client expects) and `GET /vm/{h}/shell`
//! (a PTY session in 5-byte frames). Both ride one full-duplex agent stream; the target is
//! dialled (and errors answered as HTTP) before the upgrade.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use slicer_agent_proto::shell as sh;

use super::{query_one, query_pairs, Shared};
use crate::api::error::ApiErr;
use crate::manager::{GuestInput, GuestStream};

/// A request that is not a WebSocket handshake gets our JSON error (axum's is plain text),
/// after the VM was checked, before anything is dialled in the guest.
fn upgrade(ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>) -> Result<WebSocketUpgrade, ApiErr> {
    ws.map_err(|e| {
        ApiErr::bad_request(format!(
            "this route is a WebSocket: send GET with Connection: upgrade, Upgrade: websocket, \
             Sec-WebSocket-Version: 13 and a Sec-WebSocket-Key ({e})"
        ))
    })
}

/// `host:port` or `unix:/absolute/path`.
fn valid_target(t: &str) -> bool {
    if let Some(p) = t.strip_prefix("unix:") {
        return p.starts_with('/') && !p.contains('\0');
    }
    match t.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && host.len() <= 253 && port.parse::<u16>().is_ok_and(|p| p > 0) && !host.contains('/')
        }
        None => false,
    }
}

pub async fn forward(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiErr> {
    let target = headers
        .get("x-inlets-upstream")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    if !valid_target(&target) {
        return Err(ApiErr::bad_request(format!(
            "header X-Inlets-Upstream: {target:?} is not host:port or unix:/path"
        )));
    }
    st.manager.active(&hostname)?;
    let ws = upgrade(ws)?;
    let (tx, rx) = st.manager.forward(&hostname, &target).await?;
    Ok(ws.on_upgrade(move |socket| bridge_raw(socket, tx, rx)))
}

/// Raw bytes both ways until either side ends.
async fn bridge_raw(mut socket: WebSocket, tx: Box<dyn GuestInput>, mut rx: GuestStream) {
    loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if tx.write(b).await.is_err() { break }
                }
                Some(Ok(Message::Text(t))) => {
                    if tx.write(Bytes::copy_from_slice(t.as_bytes())).await.is_err() { break }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            chunk = rx.chunk() => match chunk {
                Ok(Some(b)) => {
                    if socket.send(Message::Binary(b)).await.is_err() { break }
                }
                _ => break,
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

pub async fn shell(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
    q: RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiErr> {
    let pairs = query_pairs(&q.0);
    let (uid, gid) = super::exec::identity(&pairs)?;
    let sq = sh::ShellQuery {
        uid,
        gid,
        shell: query_one(&pairs, "shell").filter(|s| !s.is_empty()).map(str::to_string),
        cwd: query_one(&pairs, "cwd").filter(|s| !s.is_empty()).map(str::to_string),
        term: None,
        cols: None,
        rows: None,
    };
    if let Some(s) = &sq.shell {
        if !s.starts_with('/') {
            return Err(ApiErr::bad_request(format!(
                "query shell: {s:?} must be an absolute path"
            )));
        }
    }
    st.manager.active(&hostname)?;
    let ws = upgrade(ws)?;
    let (tx, rx) = st.manager.shell(&hostname, &sq).await?;
    Ok(ws.on_upgrade(move |socket| bridge_shell(socket, tx, rx)))
}

/// Client frames go to the agent as they are (it checks them); the agent's byte stream is cut
/// back into frames, one per message. The session-close frame ends the WebSocket.
async fn bridge_shell(mut socket: WebSocket, tx: Box<dyn GuestInput>, mut rx: GuestStream) {
    let mut pending = BytesMut::new();
    'session: loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if tx.write(b).await.is_err() { break }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    let _ = tx.write(sh::frame(sh::SHUTDOWN, &[])).await;
                    break;
                }
                Some(Ok(_)) => {}
            },
            chunk = rx.chunk() => match chunk {
                Ok(Some(b)) => {
                    pending.extend_from_slice(&b);
                    while let Some((kind, payload)) = sh::take_frame(&mut pending) {
                        if socket.send(Message::Binary(sh::frame(kind, &payload))).await.is_err() {
                            break 'session;
                        }
                        if kind == sh::SESSION_CLOSE {
                            break 'session;
                        }
                    }
                    if pending.len() > sh::MAX_FRAME + 5 {
                        break;
                    }
                }
                _ => break,
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn targets() {
        for ok in [
            "127.0.0.1:8080",
            "localhost:22",
            "unix:/var/run/docker.sock",
            "[::1]:80",
        ] {
            assert!(super::valid_target(ok), "{ok}");
        }
        for bad in ["", "8080", "host:0", "host:99999", "unix:relative", "a/b:80"] {
            assert!(!super::valid_target(bad), "{bad}");
        }
    }
}
