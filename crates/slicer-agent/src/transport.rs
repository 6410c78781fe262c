//! Byte streams the agent serves on: the virtio-serial port (reconnecting across host
//! sessions) and, for host-side tests, a UNIX socket.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::server::{self, State};

/// Finds `/dev/vportNpM` whose virtio-serial port name is `name`, waiting for it to appear.
pub async fn find_port(name: &str) -> Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(dir) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in dir.flatten() {
                let n = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if n.trim() == name {
                    let dev = format!("/dev/{}", entry.file_name().to_string_lossy());
                    if std::path::Path::new(&dev).exists() {
                        return Ok(dev);
                    }
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("no virtio-serial port named {name:?} appeared in /sys/class/virtio-ports");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A character device (the virtio-serial port) driven through epoll.
pub struct CharDev {
    fd: Arc<AsyncFd<OwnedFd>>,
}

impl CharDev {
    fn open(path: &str) -> io::Result<CharDev> {
        let fd = nix::fcntl::open(
            path,
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        // SAFETY: `open` just returned this descriptor and nothing else owns it.
        let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for its
        // whole lifetime.
        let fd = unsafe { AsyncFd::register(owned) }?;
        Ok(CharDev { fd: Arc::new(fd) })
    }

    fn handle(&self) -> CharDev {
        CharDev { fd: self.fd.clone() }
    }
}

impl AsyncRead for CharDev {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let res = guard.try_io(|fd| {
                let n = nix::unistd::read(fd.as_raw_fd(), unfilled).map_err(io::Error::from)?;
                Ok(n)
            });
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for CharDev {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd, data).map_err(io::Error::from)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Serves host sessions on the port for ever. A session ends when the host disconnects
/// (reads return 0), or on a protocol error; the next one starts with a fresh handshake.
pub async fn serve_port(path: &str, state: Arc<State>) -> Result<()> {
    let mut announced = false;
    loop {
        // A fresh descriptor for every session: once the host hangs up, epoll reports HUP and
        // tokio keeps that "closed" readiness for the life of the registration, which would
        // make every later read spin instead of waiting.
        let dev = match CharDev::open(path) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("opening agent port {path}")),
        };
        if !announced {
            announced = true;
            eprintln!(
                "slicer-agent {} ready on {path} ({} ms after start)",
                slicer_agent_proto::VERSION,
                state.started.elapsed().as_millis()
            );
        }
        match slicer_agent_proto::sync::agent_handshake(dev.handle()).await {
            Ok((io, _nonce)) => {
                if let Err(e) = server::serve_session(io, state.clone()).await {
                    eprintln!("slicer-agent: session ended: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                // No host connected: the port reads EOF until one connects.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => {
                eprintln!("slicer-agent: handshake failed: {e}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        drop(dev);
    }
}

/// Serves each connection of a UNIX socket as one session (host-side tests).
pub async fn serve_unix(path: &str, state: Arc<State>) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("binding {path}"))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            if let Ok((io, _)) = slicer_agent_proto::sync::agent_handshake(stream).await {
                let _ = server::serve_session(io, state).await;
            }
        });
    }
}
