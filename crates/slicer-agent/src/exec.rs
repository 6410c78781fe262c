//! `POST /v1/exec`: run a process, stream stdin in and stdout/stderr out as frames.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use slicer_agent_proto::frame::{self, Kind, MAX_SPEC_LEN};
use slicer_agent_proto::{ExecRequest, ExitStatus, Exited, Started};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::server::{ApiError, Body, State};

/// How long output is still collected after the process exited, for pipes that a
/// daemonized grandchild keeps open.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
const CHUNK: usize = 64 * 1024;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads a request body as a byte stream.
pub fn body_reader(body: Incoming) -> impl AsyncRead + Unpin + Send {
    tokio_util::io::StreamReader::new(Box::pin(body.into_data_stream().map_err(io::Error::other)))
}

pub async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, ApiError> {
    let mut rd = body_reader(req.into_body());
    let len = rd
        .read_u32()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading exec spec length: {e}")))? as usize;
    if len > MAX_SPEC_LEN {
        return Err(ApiError::bad_request(format!(
            "exec spec of {len} bytes is over {MAX_SPEC_LEN}"
        )));
    }
    let mut raw = vec![0u8; len];
    rd.read_exact(&mut raw)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading exec spec: {e}")))?;
    let spec: ExecRequest =
        serde_json::from_slice(&raw).map_err(|e| ApiError::bad_request(format!("invalid exec spec: {e}")))?;
    spec.validate().map_err(ApiError::bad_request)?;

    let mut child = spawn(&spec)?;
    let pid = child.id();
    let exit_rx = state.reaper.register(pid as i32);
    let started_at_ms = now_ms();

    let (tx, body) = slicer_agent_proto::body::channel(16);
    let _ = tx
        .send(Ok(frame::encode_json(Kind::Started, &Started { pid, started_at_ms })))
        .await;

    if let Some(stdin) = child.stdin.take() {
        let mut pipe = tokio::net::unix::pipe::Sender::from_owned_fd(OwnedFd::from(stdin))
            .map_err(|e| ApiError::io("stdin pipe", &e))?;
        tokio::spawn(async move {
            // A process that exits without reading its stdin makes this fail: that is fine.
            let _ = tokio::io::copy(&mut rd, &mut pipe).await;
            let _ = pipe.shutdown().await;
        });
    }
    let out = pipe_task(child.stdout.take().map(OwnedFd::from), Kind::Stdout, tx.clone());
    let err = pipe_task(child.stderr.take().map(OwnedFd::from), Kind::Stderr, tx.clone());

    tokio::spawn(async move {
        let mut exit_rx = exit_rx;
        let status = tokio::select! {
            st = &mut exit_rx => st.ok(),
            _ = tx.closed() => {
                // The host went away: end the whole process group, then collect the status.
                kill_group(pid);
                exit_rx.await.ok()
            }
        };
        let drained = tokio::time::timeout(DRAIN_GRACE, async {
            let _ = out.await;
            let _ = err.await;
        })
        .await;
        if drained.is_err() {
            // Descendants still hold the pipes open: stop waiting for them.
            kill_group(pid);
        }
        let status = status.unwrap_or(ExitStatus {
            code: None,
            signal: Some(libc::SIGKILL),
        });
        let _ = tx
            .send(Ok(frame::encode_json(
                Kind::Exit,
                &Exited {
                    status,
                    ended_at_ms: now_ms(),
                },
            )))
            .await;
    });

    let mut resp = Response::new(BodyExt::boxed(body));
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

fn kill_group(pid: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn pipe_task(fd: Option<OwnedFd>, kind: Kind, tx: mpsc::Sender<io::Result<Bytes>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(fd) = fd else { return };
        let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
            return;
        };
        let mut buf = vec![0u8; CHUNK];
        loop {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(Ok(frame::encode(kind, &buf[..n]))).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// A user from /etc/passwd (read directly: the agent is static and avoids NSS).
pub struct User {
    pub name: String,
    pub gid: u32,
    pub home: String,
}

pub fn lookup_user(uid: u32) -> Option<User> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 7 && f[2].parse::<u32>().ok()? == uid {
            Some(User {
                name: f[0].to_string(),
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        } else {
            None
        }
    })
}

fn spawn(spec: &ExecRequest) -> Result<std::process::Child, ApiError> {
    let program = match &spec.shell {
        Some(_) => spec.shell_path.clone().unwrap_or_else(|| "/bin/sh".to_string()),
        None => spec.argv[0].clone(),
    };
    let mut cmd = Command::new(&program);
    match &spec.shell {
        Some(line) => {
            cmd.arg("-c").arg(line);
        }
        None => {
            cmd.args(&spec.argv[1..]);
        }
    }
    let uid = spec.uid.unwrap_or(0);
    let user = lookup_user(uid);
    let home = user.as_ref().map(|u| u.home.clone()).unwrap_or_else(|| "/".to_string());
    let gid = spec.gid.or(user.as_ref().map(|u| u.gid)).unwrap_or(uid);
    cmd.env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", &home)
        .env("LANG", "C.UTF-8");
    if let Some(u) = &user {
        cmd.env("USER", &u.name).env("LOGNAME", &u.name);
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let cwd = spec.cwd.clone().unwrap_or(home);
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(ApiError::bad_request(format!("cwd {cwd} is not a directory"))),
        Err(e) => return Err(ApiError::io(&format!("cwd {cwd}"), &e)),
    }
    cmd.current_dir(&cwd);
    if spec.uid.is_some() || spec.gid.is_some() {
        cmd.uid(uid).gid(gid);
    }
    cmd.stdin(if spec.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Own session and process group, so the whole tree can be signalled.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ApiError::not_found(format!("executable not found: {program}")),
        _ => ApiError::io(&format!("starting {program}"), &e),
    })
}
