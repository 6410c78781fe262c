//! `vm shell` (an interactive PTY session over the shell WebSocket, raw terminal, window
//! resizes) and `vm forward -L` (local TCP or UNIX listeners, one forward WebSocket per
//! accepted connection).

use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use slicer_agent_proto::shell;
use slicer_api::ApiClient;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<Box<dyn slicer_api::client::Io>>;

async fn open(c: &ApiClient, path: &str, headers: &[(&str, String)]) -> Result<Ws> {
    let mut req = format!("{}{path}", c.ws_base()).into_client_request()?;
    if let Some(t) = c.token() {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse()?);
    }
    for (k, v) in headers {
        req.headers_mut()
            .insert(http::HeaderName::from_bytes(k.as_bytes())?, v.parse()?);
    }
    let io = c.connect().await?;
    match tokio_tungstenite::client_async(req, io).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body = r.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            let msg = serde_json::from_str::<slicer_api::ErrorResponse>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| body.to_string());
            bail!("{} ({})", msg.trim(), r.status())
        }
        Err(e) => Err(e).context("opening the WebSocket"),
    }
}

/// One shell message (the codec is the protocol crate's: the daemon passes frames through).
fn frame(kind: u8, payload: &[u8]) -> Message {
    Message::Binary(shell::frame(kind, payload))
}

fn window_size() -> Option<(u32, u32)> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills the winsize on a terminal descriptor.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_col > 0).then_some((u32::from(ws.ws_col), u32::from(ws.ws_row)))
}

/// Puts the terminal in raw mode until dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enable() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(orig) = nix::sys::termios::tcgetattr(stdin.as_fd()) else {
            return RawMode(None); // not a terminal
        };
        let mut raw = orig.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        let _ = nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSANOW, &raw);
        RawMode(Some(orig))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(std::io::stdin().as_fd(), nix::sys::termios::SetArg::TCSANOW, t);
        }
    }
}

/// An interactive shell; returns the shell's exit code.
/// Ctrl-] on a terminal: leave the shell (it ends in the guest), as with telnet.
const DETACH: u8 = 0x1d;

/// An interactive shell; `bootstrap` is typed into it first (a line, e.g. `cd /app && ls`).
pub async fn shell(c: &ApiClient, name: &str, query: slicer_api::Pairs<'_>, bootstrap: Option<&str>) -> Result<i32> {
    let path = slicer_api::routes::with_query(slicer_api::routes::vm_shell(name), query);
    let mut ws = open(c, &path, &[]).await?;
    let raw = RawMode::enable();
    if let Some((cols, rows)) = window_size() {
        ws.send(Message::Binary(shell::window_size(cols, rows))).await?;
    }
    if let Some(line) = bootstrap {
        ws.send(frame(shell::DATA, format!("{line}\n").as_bytes())).await?;
    }
    let detachable = raw.0.is_some();
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut heartbeat = tokio::time::interval(std::time::Duration::from_secs(30));
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut buf = vec![0u8; 8192];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => match n {
                Ok(0) | Err(_) => {
                    // End of input (piped stdin): an EOF character, so the shell ends after
                    // running what it was given.
                    stdin_open = false;
                    ws.send(frame(shell::DATA, &[0x04])).await?;
                }
                Ok(n) if detachable && buf[..n].contains(&DETACH) => {
                    let before = buf[..n].split(|b| *b == DETACH).next().unwrap_or_default();
                    if !before.is_empty() {
                        ws.send(frame(shell::DATA, before)).await?;
                    }
                    ws.send(frame(shell::SHUTDOWN, &[])).await?;
                    drop(raw);
                    eprintln!("\r\n[detached]");
                    return Ok(0);
                }
                Ok(n) => ws.send(frame(shell::DATA, &buf[..n])).await?,
            },
            _ = winch.recv() => {
                if let Some((cols, rows)) = window_size() {
                    ws.send(Message::Binary(shell::window_size(cols, rows))).await?;
                }
            }
            _ = heartbeat.tick() => ws.send(frame(shell::HEARTBEAT, &[])).await?,
            msg = ws.next() => {
                let Some(msg) = msg else { return Ok(0) };
                let b = match msg? {
                    Message::Binary(b) => b,
                    Message::Close(_) => return Ok(0),
                    _ => continue,
                };
                if b.len() < 5 {
                    continue;
                }
                match b[0] {
                    shell::DATA => {
                        stdout.write_all(&b[5..]).await?;
                        stdout.flush().await?;
                    }
                    shell::SESSION_CLOSE => {
                        let code = b.get(5..9).and_then(|c| <[u8; 4]>::try_from(c).ok()).map(i32::from_be_bytes);
                        return Ok(code.unwrap_or(0));
                    }
                    shell::SHUTDOWN => return Ok(0),
                    _ => {}
                }
            }
        }
    }
}

/// Where a forward listens and what it reaches in the guest.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub listen: Listen,
    /// `host:port` or `unix:/path` inside the guest.
    pub target: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Listen {
    Tcp(String),
    Unix(PathBuf),
}

fn is_port(s: &str) -> bool {
    s.parse::<u16>().is_ok()
}

/// `-L` forms: `127.0.0.1:9000`, `9001:127.0.0.1:9000` (listens on all addresses),
/// `0:…` (any free port), `0.0.0.0:9000:127.0.0.1:9000`, `127.0.0.1:9000:/var/run/x.sock`,
/// `9000:/var/run/x.sock`, `/tmp/local.sock:/var/run/x.sock`.
pub fn parse_spec(s: &str) -> Result<Spec> {
    let bad = || {
        anyhow::anyhow!("-L {s:?}: use [LOCAL_ADDR:]LOCAL_PORT:REMOTE_HOST:REMOTE_PORT, LOCAL:/remote.sock, /local.sock:/remote.sock or HOST:PORT")
    };
    // A remote UNIX socket is everything after the first ":/".
    if let Some(i) = s.find(":/") {
        let (local, remote) = (&s[..i], &s[i + 1..]);
        let listen = if local.starts_with('/') || local.starts_with('.') {
            Listen::Unix(local.into())
        } else if is_port(local) {
            Listen::Tcp(format!("0.0.0.0:{local}"))
        } else if let Some((a, p)) = local.rsplit_once(':') {
            if !is_port(p) || a.is_empty() {
                return Err(bad());
            }
            Listen::Tcp(local.to_string())
        } else {
            return Err(bad());
        };
        return Ok(Spec {
            listen,
            target: format!("unix:{remote}"),
        });
    }
    let parts: Vec<&str> = s.split(':').collect();
    let (listen, target) = match parts.as_slice() {
        [host, port] if is_port(port) => (format!("{host}:{port}"), format!("{host}:{port}")),
        [lport, host, port] if is_port(lport) && is_port(port) => {
            (format!("0.0.0.0:{lport}"), format!("{host}:{port}"))
        }
        [laddr, lport, host, port] if is_port(lport) && is_port(port) => {
            (format!("{laddr}:{lport}"), format!("{host}:{port}"))
        }
        _ => return Err(bad()),
    };
    Ok(Spec {
        listen: Listen::Tcp(listen),
        target,
    })
}

/// Copies bytes between a local connection and a forward WebSocket until either ends.
async fn bridge<S: AsyncRead + AsyncWrite + Unpin>(mut local: S, mut ws: Ws) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            n = local.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => if ws.send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).await.is_err() { break },
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => if local.write_all(&b).await.is_err() { break },
                Some(Ok(Message::Text(t))) => if local.write_all(t.as_bytes()).await.is_err() { break },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = ws.close(None).await;
}

/// A local listener of either kind.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    async fn bind(spec: &Listen) -> Result<(Listener, String)> {
        Ok(match spec {
            Listen::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?;
                let shown = l.local_addr()?.to_string();
                (Listener::Tcp(l), shown)
            }
            Listen::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = tokio::net::UnixListener::bind(p).with_context(|| format!("listening on {}", p.display()))?;
                std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o660))?;
                (Listener::Unix(l), p.display().to_string())
            }
        })
    }

    async fn accept(&self) -> std::io::Result<Box<dyn slicer_api::client::Io>> {
        Ok(match self {
            Listener::Tcp(l) => Box::new(l.accept().await?.0),
            Listener::Unix(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// Listens on every spec and forwards each accepted connection, until interrupted.
pub async fn forward(c: &ApiClient, name: &str, specs: Vec<Spec>) -> Result<i32> {
    let client_id = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tasks = tokio::task::JoinSet::new();
    for spec in specs {
        let headers = vec![
            ("x-inlets-upstream", spec.target.clone()),
            ("x-inlets-mode", "local".to_string()),
            ("x-inlets-client-id", client_id.clone()),
            ("user-agent", "slicer-forward/1.0".to_string()),
        ];
        let path = slicer_api::routes::vm_forward(name);
        let c = c.clone();
        let (listener, shown) = Listener::bind(&spec.listen).await?;
        eprintln!("forwarding {shown} -> {name}:{}", spec.target);
        tasks.spawn(async move {
            while let Ok(s) = listener.accept().await {
                let (c, path, headers) = (c.clone(), path.clone(), headers.clone());
                tokio::spawn(async move {
                    match open(&c, &path, &headers).await {
                        Ok(ws) => bridge(s, ws).await,
                        Err(e) => eprintln!("forward: {}", crate::term::stderr_text(&format!("{e:#}"))),
                    }
                });
            }
        });
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = tasks.join_next() => {}
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(l: &str, t: &str) -> Spec {
        Spec {
            listen: Listen::Tcp(l.into()),
            target: t.into(),
        }
    }

    #[test]
    fn spec_forms() {
        assert_eq!(
            parse_spec("127.0.0.1:9000").unwrap(),
            tcp("127.0.0.1:9000", "127.0.0.1:9000")
        );
        assert_eq!(
            parse_spec("9001:127.0.0.1:9000").unwrap(),
            tcp("0.0.0.0:9001", "127.0.0.1:9000")
        );
        assert_eq!(parse_spec("0:127.0.0.1:80").unwrap(), tcp("0.0.0.0:0", "127.0.0.1:80"));
        assert_eq!(
            parse_spec("0.0.0.0:9000:127.0.0.1:9000").unwrap(),
            tcp("0.0.0.0:9000", "127.0.0.1:9000")
        );
        assert_eq!(
            parse_spec("127.0.0.1:9000:/var/run/docker.sock").unwrap(),
            tcp("127.0.0.1:9000", "unix:/var/run/docker.sock")
        );
        assert_eq!(
            parse_spec("9000:/var/run/docker.sock").unwrap(),
            tcp("0.0.0.0:9000", "unix:/var/run/docker.sock")
        );
        assert_eq!(
            parse_spec("/tmp/d.sock:/var/run/docker.sock").unwrap(),
            Spec {
                listen: Listen::Unix("/tmp/d.sock".into()),
                target: "unix:/var/run/docker.sock".into()
            }
        );
        for bad in ["", "abc", "1:2:3:4:5", "x:/y", "99999:127.0.0.1:80"] {
            assert!(parse_spec(bad).is_err(), "{bad}");
        }
    }
}
