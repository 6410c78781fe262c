//! Background execs: processes that outlive the request that started them. Each has its own
//! process group, stdin from /dev/null, and a bounded ring of output frames with monotonic
//! ids that readers replay and follow. A reaped exec id answers 410 afterwards.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use slicer_agent_proto::{BgFrame, BgInfo, BgKill, BgKilled, BgLogsQuery, BgStart, BgStarted, BgWait, ExitStatus};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::exec::now_ms;
use crate::server::{json, query, ApiError, Body, State};

pub const DEFAULT_RING: u64 = 1 << 20;
/// All rings together stay under this (503 beyond).
pub const RING_BUDGET: u64 = 256 << 20;
const MAX_RING: u64 = 64 << 20;
const CHUNK: usize = 32 * 1024;

struct Frame {
    id: u64,
    stderr: bool,
    data: Bytes,
    ts_ms: u64,
}

#[derive(Default)]
struct Ring {
    frames: VecDeque<Frame>,
    bytes: u64,
    next_id: u64,
    written: u64,
    dropped_bytes: u64,
    exit: Option<(ExitStatus, u64)>,
}

struct Bg {
    id: String,
    pid: u32,
    command: String,
    args: Vec<String>,
    cwd: Option<String>,
    uid: Option<u32>,
    started_at_ms: u64,
    ring_bytes: u64,
    ring: Mutex<Ring>,
    /// Bumped on every new frame and on exit.
    changed: watch::Sender<u64>,
}

impl Bg {
    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, stderr: bool, data: Bytes) {
        let mut r = self.ring();
        let id = r.next_id;
        r.next_id += 1;
        r.written += data.len() as u64;
        r.bytes += data.len() as u64;
        r.frames.push_back(Frame {
            id,
            stderr,
            data,
            ts_ms: now_ms(),
        });
        while r.bytes > self.ring_bytes && r.frames.len() > 1 {
            if let Some(old) = r.frames.pop_front() {
                r.bytes -= old.data.len() as u64;
                r.dropped_bytes += old.data.len() as u64;
            }
        }
        drop(r);
        self.changed.send_modify(|v| *v += 1);
    }

    fn info(&self) -> BgInfo {
        let r = self.ring();
        BgInfo {
            exec_id: self.id.clone(),
            pid: self.pid,
            command: self.command.clone(),
            args: self.args.clone(),
            cwd: self.cwd.clone(),
            uid: self.uid,
            started_at_ms: self.started_at_ms,
            running: r.exit.is_none(),
            exit_code: r.exit.as_ref().and_then(|(s, _)| s.code),
            signal: r.exit.as_ref().and_then(|(s, _)| s.signal),
            ended_at_ms: r.exit.as_ref().map(|(_, t)| *t),
            bytes_written: r.written,
            bytes_dropped: r.dropped_bytes,
            next_id: r.next_id,
            ring_bytes: self.ring_bytes,
        }
    }

    fn running(&self) -> bool {
        self.ring().exit.is_none()
    }
}

/// The agent's background execs.
#[derive(Default)]
pub struct Registry {
    execs: Mutex<HashMap<String, Arc<Bg>>>,
    reaped: Mutex<HashSet<String>>,
    budget: AtomicU64,
}

impl Registry {
    /// Takes `ring_bytes` from the budget of all rings, or refuses (the budget untouched).
    fn reserve(&self, ring_bytes: u64) -> Result<(), ApiError> {
        let used = self.budget.fetch_add(ring_bytes, Ordering::SeqCst);
        if used + ring_bytes > RING_BUDGET {
            self.budget.fetch_sub(ring_bytes, Ordering::SeqCst);
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "unavailable",
                message: format!("background exec rings would exceed {RING_BUDGET} bytes: reap finished execs"),
            });
        }
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Arc<Bg>, ApiError> {
        if let Some(b) = self.execs.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(b.clone());
        }
        if self.reaped.lock().unwrap_or_else(|p| p.into_inner()).contains(id) {
            return Err(ApiError {
                status: StatusCode::GONE,
                kind: "gone",
                message: format!("exec {id} was reaped"),
            });
        }
        Err(ApiError::not_found(format!("no exec {id}")))
    }
}

fn new_id() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    unsafe {
        libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0);
    }
    format!("ex_{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

async fn body_json<T: serde::de::DeserializeOwned + Default>(req: Request<Incoming>) -> Result<T, ApiError> {
    let raw = crate::server::body_bytes(req, 256 * 1024).await?;
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&raw).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

/// Routes under `/v1/bg`.
pub async fn route(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_start_matches("/v1/bg").to_string();
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let reg = &state.bg;
    match (req.method().clone(), parts.as_slice()) {
        (Method::POST, []) => start(req, state.clone()).await,
        (Method::GET, []) => {
            let mut list: Vec<BgInfo> = reg
                .execs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .map(|b| b.info())
                .collect();
            list.sort_by_key(|i| i.started_at_ms);
            Ok(json(StatusCode::OK, &list))
        }
        (Method::GET, [id]) => Ok(json(StatusCode::OK, &reg.get(id)?.info())),
        (Method::DELETE, [id]) => {
            let b = reg.get(id)?;
            reg.execs.lock().unwrap_or_else(|p| p.into_inner()).remove(*id);
            reg.reaped
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_string());
            reg.budget.fetch_sub(b.ring_bytes, Ordering::SeqCst);
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "exec_id": id, "reaped": true }),
            ))
        }
        (Method::GET, [id, "logs"]) => {
            let q: BgLogsQuery = query(&req)?;
            logs(reg.get(id)?, q)
        }
        (Method::POST, [id, "kill"]) => {
            let b = reg.get(id)?;
            let k: BgKill = body_json(req).await?;
            kill(b, k)
        }
        (Method::GET, [id, "wait-exit"]) => {
            #[derive(serde::Deserialize, Default)]
            struct Q {
                timeout: Option<u64>,
            }
            let q: Q = query(&req)?;
            let b = reg.get(id)?;
            let secs = q.timeout.unwrap_or(30).min(600);
            let mut rx = b.changed.subscribe();
            let exited = tokio::time::timeout(Duration::from_secs(secs), async {
                while b.running() {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
            let i = b.info();
            Ok(json(
                StatusCode::OK,
                &BgWait {
                    exec_id: i.exec_id,
                    running: i.running,
                    exit_code: i.exit_code,
                    signal: i.signal,
                    ended_at_ms: i.ended_at_ms,
                    timed_out: exited.is_err(),
                },
            ))
        }
        (m, _) => Err(ApiError::not_found(format!("no route {m} /v1/bg{path}"))),
    }
}

/// `POST /v1/bg`: starts a background exec whose output goes to a ring of its own.
async fn start(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, ApiError> {
    let s: BgStart = body_json(req).await?;
    s.spec.validate().map_err(ApiError::bad_request)?;
    if s.spec.stdin {
        return Err(ApiError::bad_request("a background exec has no stdin"));
    }
    let ring_bytes = s.ring_bytes.unwrap_or(DEFAULT_RING);
    if !(4096..=MAX_RING).contains(&ring_bytes) {
        return Err(ApiError::bad_request(format!(
            "ring_bytes must be between 4096 and {MAX_RING}"
        )));
    }
    let reg = &state.bg;
    reg.reserve(ring_bytes)?;
    let child = match crate::exec::spawn(&s.spec) {
        Ok(c) => c,
        Err(e) => {
            reg.budget.fetch_sub(ring_bytes, Ordering::SeqCst);
            return Err(e);
        }
    };
    let exit_rx = state.reaper.register(child.pid as i32);
    let (command, args) = match &s.spec.shell {
        Some(line) => (
            s.spec.shell_path.clone().unwrap_or_else(|| "/bin/sh".into()),
            vec!["-c".into(), line.clone()],
        ),
        None => (s.spec.argv[0].clone(), s.spec.argv[1..].to_vec()),
    };
    let (changed, _) = watch::channel(0);
    let b = Arc::new(Bg {
        id: new_id(),
        pid: child.pid,
        command,
        args,
        cwd: s.spec.cwd.clone(),
        uid: Some(child.uid),
        started_at_ms: now_ms(),
        ring_bytes,
        ring: Mutex::new(Ring::default()),
        changed,
    });
    reg.execs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(b.id.clone(), b.clone());
    follow(b.clone(), child.stdout, child.stderr, exit_rx);
    Ok(json(
        StatusCode::CREATED,
        &BgStarted {
            exec_id: b.id.clone(),
            pid: b.pid,
            started_at_ms: b.started_at_ms,
            ring_bytes,
        },
    ))
}

/// Reads the exec's output into its ring and, once it has exited (and its output is read,
/// or two seconds passed), records its status.
fn follow(
    b: Arc<Bg>,
    stdout: std::os::fd::OwnedFd,
    stderr: std::os::fd::OwnedFd,
    exit_rx: tokio::sync::oneshot::Receiver<ExitStatus>,
) {
    let readers: Vec<_> = [(stdout, false), (stderr, true)]
        .into_iter()
        .map(|(fd, stderr)| {
            let b = b.clone();
            tokio::spawn(async move {
                let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
                    return;
                };
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n) = rx.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    b.push(stderr, Bytes::copy_from_slice(&buf[..n]));
                }
            })
        })
        .collect();
    let waiter = b.clone();
    tokio::spawn(async move {
        let status = exit_rx.await.unwrap_or(ExitStatus {
            code: None,
            signal: Some(libc::SIGKILL),
        });
        // Output written just before the exit still belongs before the exit frame; descendants
        // that keep the pipes open do not hold the exit back for long.
        let _ = tokio::time::timeout(Duration::from_secs(2), futures_util::future::join_all(readers)).await;
        waiter.ring().exit = Some((status, now_ms()));
        waiter.changed.send_modify(|v| *v += 1);
    });
}

fn kill(b: Arc<Bg>, k: BgKill) -> Result<Response<Body>, ApiError> {
    use nix::sys::signal::Signal;
    let name = k
        .signal
        .as_deref()
        .unwrap_or("TERM")
        .trim_start_matches("SIG")
        .to_ascii_uppercase();
    let sig = match name.as_str() {
        "TERM" => Signal::SIGTERM,
        "KILL" => Signal::SIGKILL,
        "INT" => Signal::SIGINT,
        "HUP" => Signal::SIGHUP,
        "QUIT" => Signal::SIGQUIT,
        "USR1" => Signal::SIGUSR1,
        "USR2" => Signal::SIGUSR2,
        other => return Err(ApiError::bad_request(format!("unknown signal {other:?}"))),
    };
    let running = b.running();
    if running {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(b.pid as i32), sig);
        if sig == Signal::SIGTERM {
            let grace = Duration::from_millis(k.grace_ms.unwrap_or(5000));
            let b = b.clone();
            tokio::spawn(async move {
                let mut rx = b.changed.subscribe();
                let exited = tokio::time::timeout(grace, async {
                    while b.running() {
                        if rx.changed().await.is_err() {
                            break;
                        }
                    }
                })
                .await;
                if exited.is_err() {
                    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(b.pid as i32), Signal::SIGKILL);
                }
            });
        }
    }
    Ok(json(
        StatusCode::OK,
        &BgKilled {
            exec_id: b.id.clone(),
            pid: b.pid,
            running,
            signal_sent: if running { name } else { String::new() },
        },
    ))
}

fn line(f: &BgFrame) -> Bytes {
    let mut v = serde_json::to_vec(f).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Replays the ring from `from_id` (a `gap` first if some of it was dropped), then with
/// `follow` streams new frames until the exit frame.
fn logs(b: Arc<Bg>, q: BgLogsQuery) -> Result<Response<Body>, ApiError> {
    let (tx, body) = slicer_agent_proto::body::channel(16);
    tokio::spawn(async move {
        let mut rx = b.changed.subscribe();
        let mut cursor = q.from_id;
        loop {
            rx.borrow_and_update();
            let (batch, exit, next_id) = {
                let r = b.ring();
                let oldest = r.frames.front().map_or(r.next_id, |f| f.id);
                let mut batch = Vec::new();
                if cursor < oldest {
                    batch.push(BgFrame {
                        id: cursor,
                        kind: "gap".into(),
                        timestamp_ms: now_ms(),
                        dropped_frames: Some(oldest - cursor),
                        dropped_bytes: Some(r.dropped_bytes),
                        message: Some(format!(
                            "frames {cursor}..{oldest} were dropped from the ring ({} bytes dropped so far)",
                            r.dropped_bytes
                        )),
                        ..Default::default()
                    });
                    cursor = oldest;
                }
                for f in r.frames.iter().filter(|f| f.id >= cursor) {
                    batch.push(BgFrame {
                        id: f.id,
                        kind: if f.stderr { "stderr" } else { "stdout" }.into(),
                        data: Some(base64::engine::general_purpose::STANDARD.encode(&f.data)),
                        timestamp_ms: f.ts_ms,
                        ..Default::default()
                    });
                }
                (batch, r.exit, r.next_id)
            };
            for f in &batch {
                if tx.send(Ok(line(f))).await.is_err() {
                    return;
                }
            }
            cursor = cursor.max(next_id);
            if let Some((st, ended)) = exit {
                let _ = tx
                    .send(Ok(line(&BgFrame {
                        id: next_id,
                        kind: "exit".into(),
                        timestamp_ms: ended,
                        exit_code: st.code,
                        signal: st.signal,
                        ..Default::default()
                    })))
                    .await;
                return;
            }
            if !q.follow {
                return;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}
