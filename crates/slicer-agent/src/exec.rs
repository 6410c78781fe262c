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

/// Reads the exec spec that leads the request body (a big-endian length, then that much
/// JSON, at most `MAX_SPEC_LEN`) and validates it; the rest of the body is the stdin.
async fn read_spec(rd: &mut (impl AsyncRead + Unpin)) -> Result<ExecRequest, ApiError> {
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
    Ok(spec)
}

/// `POST /v1/exec`: starts a process and streams its output frames, then its exit, until it
/// ends (the host going away kills its process group).
pub async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, ApiError> {
    let mut rd = body_reader(req.into_body());
    let spec = read_spec(&mut rd).await?;

    let child = spawn(&spec)?;
    let pid = child.pid;
    let exit_rx = state.reaper.register(pid as i32);
    let started_at_ms = now_ms();

    let (tx, body) = slicer_agent_proto::body::channel(16);
    let _ = tx
        .send(Ok(frame::encode_json(Kind::Started, &Started { pid, started_at_ms })))
        .await;

    if let Some(stdin) = child.stdin {
        let mut pipe =
            tokio::net::unix::pipe::Sender::from_owned_fd(stdin).map_err(|e| ApiError::io("stdin pipe", &e))?;
        tokio::spawn(async move {
            // A process that exits without reading its stdin makes this fail: that is fine.
            let _ = tokio::io::copy(&mut rd, &mut pipe).await;
            let _ = pipe.shutdown().await;
        });
    }
    let out = pipe_task(Some(child.stdout), Kind::Stdout, tx.clone());
    let err = pipe_task(Some(child.stderr), Kind::Stderr, tx.clone());
    let readers = [out.abort_handle(), err.abort_handle()];

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
            // Descendants still hold the pipes (`server &`): they keep running, as after a
            // terminal's shell returns; the exec ends with its own process and our read ends
            // close (so the stream ends).
            readers.iter().for_each(|r| r.abort());
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

/// Finds `program` on `path` the way execvp would, so the child can be started with
/// posix_spawn (std only uses it for an absolute program when PATH is set for the child).
fn resolve_program(program: &str, path: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Some(program.to_string());
    }
    path.split(':').filter(|d| !d.is_empty()).find_map(|dir| {
        let candidate = format!("{dir}/{program}");
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Some(candidate),
            _ => None,
        }
    })
}

/// A started child: its pid and our ends of its pipes.
pub struct Spawned {
    pub pid: u32,
    /// The uid it runs as (a request's `DEFAULT_USER` resolved).
    pub uid: u32,
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The resolved form of an exec request.
struct Plan {
    program: String,
    resolved: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: String,
    uid: u32,
    identity: Option<crate::user::Account>,
    stdin: bool,
}

pub fn spawn(spec: &ExecRequest) -> Result<Spawned, ApiError> {
    let account = crate::user::resolve(spec.uid, spec.gid);
    let mut env = account.login_env();
    for (k, v) in &spec.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    let program = match &spec.shell {
        Some(_) => spec.shell_path.clone().unwrap_or_else(|| "/bin/sh".to_string()),
        None => spec.argv[0].clone(),
    };
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let resolved = resolve_program(&program, path_var)
        .ok_or_else(|| ApiError::not_found(format!("executable not found: {program}")))?;
    let args = match &spec.shell {
        Some(line) => vec!["-c".to_string(), line.clone()],
        None => spec.argv[1..].to_vec(),
    };
    let cwd = match &spec.cwd {
        Some(c) => account.expand(c)?,
        None => account.home.clone(),
    };
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(ApiError::bad_request(format!("cwd {cwd} is not a directory"))),
        Err(e) => return Err(ApiError::io(&format!("cwd {cwd}"), &e)),
    }
    let plan = Plan {
        program,
        resolved,
        args,
        env,
        cwd,
        uid: account.uid,
        identity: account.differs_from_self().then_some(account),
        stdin: spec.stdin,
    };
    let result = match plan.identity {
        // posix_spawn (vfork-like) is several ms cheaper than fork under TCG, but cannot
        // change identity.
        None => posix_spawn(&plan),
        Some(_) => fork_spawn(&plan),
    };
    result.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ApiError::not_found(format!("executable not found: {}", plan.program)),
        _ => ApiError::io(&format!("starting {}", plan.program), &e),
    })
}

fn fork_spawn(plan: &Plan) -> io::Result<Spawned> {
    let mut cmd = Command::new(&plan.resolved);
    cmd.arg0(&plan.program)
        .args(&plan.args)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&plan.cwd)
        .stdin(if plan.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group, so the whole tree can be signalled.
        .process_group(0);
    if let Some(account) = plan.identity.clone() {
        // SAFETY: become_in_child makes only syscalls (setgroups/setgid/setuid); std's own
        // uid()/gid() would drop the supplementary groups (sudo, docker, ...).
        unsafe {
            cmd.pre_exec(move || account.become_in_child());
        }
    }
    let mut child = cmd.spawn()?;
    let missing = || io::Error::other("child pipe missing");
    Ok(Spawned {
        pid: child.id(),
        uid: plan.uid,
        stdin: child.stdin.take().map(OwnedFd::from),
        stdout: OwnedFd::from(child.stdout.take().ok_or_else(missing)?),
        stderr: OwnedFd::from(child.stderr.take().ok_or_else(missing)?),
    })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((r, w))
}

fn cstr(s: &str) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string contains NUL"))
}

/// The C strings a spawn hands to libc: the program's path, its argument and environment
/// vectors, its working directory and `/dev/null` (a stdin that is not a pipe).
struct CStrings {
    path: std::ffi::CString,
    argv_c: Vec<std::ffi::CString>,
    env_c: Vec<std::ffi::CString>,
    cwd: std::ffi::CString,
    devnull: std::ffi::CString,
}

impl CStrings {
    fn of(plan: &Plan) -> io::Result<CStrings> {
        let path = cstr(&plan.resolved)?;
        let mut argv_c = vec![cstr(&plan.program)?];
        for a in &plan.args {
            argv_c.push(cstr(a)?);
        }
        let env_c = plan
            .env
            .iter()
            .map(|(k, v)| cstr(&format!("{k}={v}")))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(CStrings {
            path,
            argv_c,
            env_c,
            cwd: cstr(&plan.cwd)?,
            devnull: cstr("/dev/null")?,
        })
    }
}

/// A posix_spawn* return code as a result (they return the error number, not -1).
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Starts the child with glibc's posix_spawn: new process group, default signal handling,
/// empty signal mask, pipes on 0/1/2, working directory.
fn posix_spawn(plan: &Plan) -> io::Result<Spawned> {
    use std::os::fd::AsRawFd;
    let (in_r, in_w) = if plan.stdin {
        pipe().map(|(r, w)| (Some(r), Some(w)))?
    } else {
        (None, None)
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let CStrings {
        path,
        argv_c,
        env_c,
        cwd,
        devnull,
    } = CStrings::of(plan)?;
    let mut argv: Vec<*mut libc::c_char> = argv_c.iter().map(|c| c.as_ptr() as *mut _).collect();
    argv.push(std::ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> = env_c.iter().map(|c| c.as_ptr() as *mut _).collect();
    envp.push(std::ptr::null_mut());
    // SAFETY: every pointer handed to libc points into a live CString/Vec above; the
    // attribute and file-action objects are initialised before use and destroyed after.
    unsafe {
        let mut fa: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        check(libc::posix_spawn_file_actions_init(&mut fa))?;
        if let Err(e) = check(libc::posix_spawnattr_init(&mut attr)) {
            libc::posix_spawn_file_actions_destroy(&mut fa);
            return Err(e);
        }
        let result = (|| -> io::Result<libc::pid_t> {
            match &in_r {
                Some(r) => check(libc::posix_spawn_file_actions_adddup2(&mut fa, r.as_raw_fd(), 0))?,
                None => check(libc::posix_spawn_file_actions_addopen(
                    &mut fa,
                    0,
                    devnull.as_ptr(),
                    libc::O_RDONLY,
                    0,
                ))?,
            }
            check(libc::posix_spawn_file_actions_adddup2(&mut fa, out_w.as_raw_fd(), 1))?;
            check(libc::posix_spawn_file_actions_adddup2(&mut fa, err_w.as_raw_fd(), 2))?;
            check(posix_spawn_file_actions_addchdir_np(&mut fa, cwd.as_ptr()))?;
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            check(libc::posix_spawnattr_setsigmask(&mut attr, &empty))?;
            check(libc::posix_spawnattr_setsigdefault(&mut attr, &all))?;
            check(libc::posix_spawnattr_setpgroup(&mut attr, 0))?;
            let flags = libc::POSIX_SPAWN_SETPGROUP | libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
            check(libc::posix_spawnattr_setflags(&mut attr, flags as libc::c_short))?;
            let mut pid: libc::pid_t = 0;
            check(libc::posix_spawn(
                &mut pid,
                path.as_ptr(),
                &fa,
                &attr,
                argv.as_ptr(),
                envp.as_ptr(),
            ))?;
            Ok(pid)
        })();
        libc::posix_spawn_file_actions_destroy(&mut fa);
        libc::posix_spawnattr_destroy(&mut attr);
        let pid = result?;
        Ok(Spawned {
            pid: pid as u32,
            uid: plan.uid,
            stdin: in_w,
            stdout: out_r,
            stderr: err_r,
        })
    }
}

extern "C" {
    // glibc >= 2.29; not exported by the libc crate for gnu targets.
    fn posix_spawn_file_actions_addchdir_np(
        actions: *mut libc::posix_spawn_file_actions_t,
        path: *const libc::c_char,
    ) -> libc::c_int;
}
