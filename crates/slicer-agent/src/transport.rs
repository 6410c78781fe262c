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
    /// Registers a descriptor of the port with the runtime.
    fn new(fd: OwnedFd) -> io::Result<CharDev> {
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for its
        // whole lifetime.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(CharDev { fd: Arc::new(fd) })
    }

    fn handle(&self) -> CharDev {
        CharDev { fd: self.fd.clone() }
    }
}

fn open_port(path: &str) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Whether a host is connected to the port: the driver reports POLLHUP while none is.
fn host_connected(fd: &OwnedFd) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    if unsafe { libc::poll(&mut p, 1, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents & libc::POLLHUP == 0)
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
///
/// The port stays open the whole time. Closing it between sessions would race with a host
/// connecting: QEMU stops reading the host socket while the guest has the port closed, and
/// nothing makes it look again when the guest reopens an idle port, so the host's handshake
/// can sit unread for ever (seen after snapshot restores). Each session instead gets a fresh
/// epoll registration on a duplicate descriptor: after a hang-up, tokio keeps the "closed"
/// readiness for the life of a registration, which would make later reads spin.
pub async fn serve_port(path: &str, state: Arc<State>) -> Result<()> {
    let port = loop {
        match open_port(path) {
            Ok(fd) => break fd,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => return Err(e).with_context(|| format!("opening agent port {path}")),
        }
    };
    eprintln!(
        "slicer-agent {} ready on {path} ({} ms after start)",
        slicer_agent_proto::VERSION,
        state.started.elapsed().as_millis()
    );
    loop {
        if !host_connected(&port).with_context(|| format!("polling agent port {path}"))? {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let dev = CharDev::new(port.try_clone().context("duplicating the port descriptor")?)
            .context("registering the agent port")?;
        match slicer_agent_proto::sync::agent_handshake(dev.handle()).await {
            Ok((io, _nonce)) => {
                if let Err(e) = server::serve_session(io, state.clone()).await {
                    eprintln!("slicer-agent: session ended: {e}");
                }
            }
            // The host left before the handshake finished.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
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
