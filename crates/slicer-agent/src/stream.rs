//! Full-duplex streams over one HTTP/2 request: the request body flows in, the response body
//! flows out. `POST /v1/forward?target=` bridges to a TCP or UNIX socket in the guest;
//! `POST /v1/shell` runs a login shell on a PTY, with 5-byte framed messages both ways
//! (`slicer_agent_proto::shell`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use slicer_agent_proto::shell::{self as sh, ShellQuery};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::server::{query, ApiError, Body, State};

const CHUNK: usize = 32 * 1024;

#[derive(serde::Deserialize)]
struct ForwardQuery {
    target: String,
}

/// Copies the request body into `w` until either side ends.
fn pump_in<W: AsyncWrite + Unpin + Send + 'static>(mut body: Incoming, mut w: W) {
    tokio::spawn(async move {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                if w.write_all(&data).await.is_err() {
                    return;
                }
            }
        }
        let _ = w.shutdown().await;
    });
}

/// The response body: whatever `r` yields until EOF.
fn pump_out<R: AsyncRead + Unpin + Send + 'static>(mut r: R) -> Body {
    let (tx, body) = slicer_agent_proto::body::channel(8);
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(Ok(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    BodyExt::boxed(body)
}

pub async fn forward(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let q: ForwardQuery = query(&req)?;
    let dial = async {
        if let Some(path) = q.target.strip_prefix("unix:") {
            let s = tokio::net::UnixStream::connect(path).await?;
            let (r, w) = s.into_split();
            Ok::<_, std::io::Error>((pump_out(r), Box::new(w) as Box<dyn AsyncWrite + Unpin + Send>))
        } else {
            let s = tokio::net::TcpStream::connect(q.target.as_str()).await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((pump_out(r), Box::new(w) as Box<dyn AsyncWrite + Unpin + Send>))
        }
    };
    let (out, w) = match tokio::time::timeout(Duration::from_secs(10), dial).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            return Err(ApiError {
                status: StatusCode::BAD_GATEWAY,
                kind: "unreachable",
                message: format!("cannot reach {} in the guest: {e}", q.target),
            })
        }
        Err(_) => {
            return Err(ApiError {
                status: StatusCode::GATEWAY_TIMEOUT,
                kind: "unreachable",
                message: format!("{} did not answer within 10 s", q.target),
            })
        }
    };
    pump_in(req.into_body(), w);
    Ok(Response::new(out))
}

/// The PTY master, driven through epoll.
struct Master(AsyncFd<OwnedFd>);

impl Master {
    async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut g = self.0.readable().await?;
            match g.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(std::io::Error::from)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut g = self.0.writable().await?;
            match g.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    fn resize(&self, cols: u16, rows: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer; the fd is the PTY master.
        unsafe {
            libc::ioctl(self.0.as_raw_fd(), libc::TIOCSWINSZ, &ws);
        }
    }
}

/// `POST /v1/shell`: a login shell on a new PTY, its terminal streamed both ways in shell
/// frames (see `slicer_agent_proto::shell`) until it exits.
pub async fn shell(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, ApiError> {
    let q: ShellQuery = query(&req)?;
    let pty = nix::pty::openpty(None, None).map_err(|e| ApiError::io("opening a PTY", &e.into()))?;
    let pid = spawn_shell(&q, pty.slave)?;
    let exit_rx = state.reaper.register(pid as i32);

    nix::fcntl::fcntl(
        pty.master.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|e| ApiError::io("PTY", &e.into()))?;
    // SAFETY: the AsyncFd owns the master descriptor for its whole life.
    let master = Arc::new(Master(
        unsafe { AsyncFd::register(pty.master) }
            .map_err(|e| ApiError::io("PTY", &std::io::Error::other(e.to_string())))?,
    ));
    if let (Some(c), Some(r)) = (q.cols, q.rows) {
        master.resize(c, r);
    }
    let (tx, body) = slicer_agent_proto::body::channel(8);
    tokio::spawn(host_to_shell(master.clone(), req.into_body(), pid));
    tokio::spawn(shell_to_host(master.clone(), tx, exit_rx, pid));
    Ok(Response::new(BodyExt::boxed(body)))
}

/// Starts the login shell `q` asks for (the account's, else `/bin/sh`) as the account, in its
/// own session with the PTY `slave` as its controlling terminal; returns its pid (the agent's
/// reaper collects it).
fn spawn_shell(q: &ShellQuery, slave: OwnedFd) -> Result<u32, ApiError> {
    let account = crate::user::resolve(q.uid, q.gid);
    let program = q.shell.clone().unwrap_or_else(|| {
        if std::path::Path::new(&account.shell).exists() {
            account.shell.clone()
        } else {
            "/bin/sh".into()
        }
    });
    let cwd = match &q.cwd {
        Some(c) => account.expand(c)?,
        None => account.home.clone(),
    };
    let mut cmd = std::process::Command::new(&program);
    cmd.arg("-l")
        .env_clear()
        .envs(account.login_env())
        .env("TERM", q.term.as_deref().unwrap_or("xterm-256color"))
        .current_dir(&cwd);
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| ApiError::io("PTY", &e));
    cmd.stdin(dup(&slave)?).stdout(dup(&slave)?).stderr(dup(&slave)?);
    let change = account.differs_from_self();
    // SAFETY: only async-signal-safe calls (setsid, ioctl, setgroups/setgid/setuid) between
    // fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if change {
                account.become_in_child()?;
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| ApiError::io(&format!("starting {program}"), &e))?;
    drop(slave);
    let pid = child.id();
    // The agent's reaper collects the shell; the std handle must not wait for it.
    std::mem::forget(child);
    Ok(pid)
}

/// Host → shell: data and window sizes; shutdown (or the host leaving) hangs the shell up.
async fn host_to_shell(input: Arc<Master>, mut req_body: Incoming, pid: u32) {
    let mut buf = BytesMut::new();
    'outer: while let Some(Ok(frame)) = req_body.frame().await {
        let Ok(data) = frame.into_data() else { continue };
        buf.extend_from_slice(&data);
        while let Some((kind, payload)) = sh::take_frame(&mut buf) {
            let go_on = match kind {
                sh::DATA => input.write_all(&payload).await.is_ok(),
                sh::WINDOW_SIZE => {
                    if let Some((c, r)) = sh::parse_window_size(&payload) {
                        input.resize(c, r);
                    }
                    true
                }
                sh::SHUTDOWN => false,
                _ => true, // heartbeats
            };
            if !go_on {
                break 'outer;
            }
        }
        if buf.len() > sh::MAX_FRAME + 5 {
            break;
        }
    }
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGHUP);
}

/// Shell → host: output frames, then a close frame with the exit status.
async fn shell_to_host(
    output: Arc<Master>,
    tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
    exit_rx: tokio::sync::oneshot::Receiver<slicer_agent_proto::ExitStatus>,
    pid: u32,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match output.read(&mut buf).await {
            // EIO: the shell and everything on the terminal are gone.
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send(Ok(sh::frame(sh::DATA, &buf[..n]))).await.is_err() {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGHUP,
                    );
                    break;
                }
            }
        }
    }
    let code = match exit_rx.await {
        Ok(st) => st.code.unwrap_or(128 + st.signal.unwrap_or(0)),
        Err(_) => -1,
    };
    let _ = tx.send(Ok(sh::frame(sh::SESSION_CLOSE, &code.to_be_bytes()))).await;
}
