//! The proxy's side of the control channel (see `control`): one daemon at a time (a new
//! connection replaces the old one), `Hello` first, then states in and acknowledgements,
//! decisions and counters out. The data plane never waits for the daemon: decisions queue in a
//! bounded channel that drops when full, and only this task writes to the socket.

use std::sync::Arc;
use std::time::Duration;

use slicer_agent_proto::lines::LineBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Mutex};

use crate::control::{self, Decision, FromProxy, ToProxy};
use crate::plane::Plane;
use crate::rules::Policy;

/// How often counters go to the daemon.
pub const STATS_EVERY: Duration = Duration::from_secs(1);
/// A write to the daemon that takes longer ends the session (the daemon reconnects).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Says on stderr which rules of a compiled state were left out.
pub fn report_rejected(p: &Policy) {
    for (client, err) in &p.rejected {
        eprintln!(
            "slicer-proxy: generation {}: a rule of client {} does not validate and is not applied: {}",
            p.generation,
            control::escape(client),
            control::escape(err)
        );
    }
}

/// Accepts daemons on `listener` forever.
pub async fn serve(listener: UnixListener, plane: Arc<Plane>, events: mpsc::Receiver<Decision>, hello: FromProxy) {
    let events = Arc::new(Mutex::new(events));
    let mut current: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("slicer-proxy: control socket: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // Only root may steer the proxy (the socket's directory already says so).
        match stream.peer_cred() {
            Ok(c) if c.uid() == 0 => {}
            _ => continue,
        }
        if let Some(old) = current.take() {
            old.abort();
            let _ = old.await;
        }
        current = Some(tokio::spawn(session(
            stream,
            plane.clone(),
            events.clone(),
            hello.clone(),
        )));
    }
}

fn line(m: &FromProxy) -> Vec<u8> {
    let mut v = serde_json::to_vec(m).unwrap_or_default();
    v.push(b'\n');
    v
}

async fn session(
    stream: UnixStream,
    plane: Arc<Plane>,
    events: Arc<Mutex<mpsc::Receiver<Decision>>>,
    hello: FromProxy,
) {
    let (mut rd, mut wr) = stream.into_split();
    let (ack_tx, mut ack_rx) = mpsc::channel::<u64>(16);
    let reader = {
        let plane = plane.clone();
        async move {
            let mut lines = LineBuf::new();
            let mut chunk = vec![0u8; 64 << 10];
            loop {
                let n = match rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                lines.push(&chunk[..n]);
                while let Some(l) = lines.next_line() {
                    match serde_json::from_slice::<ToProxy>(l) {
                        Ok(ToProxy::State { state }) => {
                            let compiled = Policy::compile(&state);
                            report_rejected(&compiled);
                            plane.upstream.set_vm_ranges(&state.vm_ranges);
                            plane.policy.set(compiled);
                            eprintln!("slicer-proxy: generation {} in force", state.generation);
                            if ack_tx.send(state.generation).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            eprintln!("slicer-proxy: control channel: ignoring a line: {e}");
                        }
                    }
                }
                if lines.pending() > control::MAX_STATE_LINE {
                    eprintln!(
                        "slicer-proxy: control channel: a line longer than {} bytes; closing",
                        control::MAX_STATE_LINE
                    );
                    return;
                }
            }
        }
    };
    let writer = async move {
        let mut events = events.lock().await;
        let mut tick = tokio::time::interval(STATS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = line(&hello);
        loop {
            if !out.is_empty() {
                match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out)).await {
                    Ok(Ok(())) => out.clear(),
                    _ => return,
                }
            }
            tokio::select! {
                g = ack_rx.recv() => match g {
                    Some(generation) => out = line(&FromProxy::Ack { generation }),
                    None => return,
                },
                d = events.recv() => match d {
                    Some(d) => out = line(&FromProxy::Decision(d)),
                    None => return,
                },
                _ = tick.tick() => out = line(&FromProxy::Stats(plane.events.counters.snapshot())),
            }
        }
    };
    // Either side ending ends the session.
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}
