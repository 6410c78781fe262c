//! A minimal QMP client: the handful of commands slicer sends (quit, stop, cont, migrate,
//! query-status). Events are skipped; replies are matched by id.

use std::path::Path;
use std::time::Duration;

use crate::{Error, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

/// One `sendmsg` of `data` with `fd` attached (SCM_RIGHTS). Hand-written: tokio has no
/// descriptor passing, and this is the only place that needs it.
fn send_with_fd(sock: std::os::fd::RawFd, data: &[u8], fd: std::os::fd::RawFd) -> std::io::Result<usize> {
    // SAFETY: the iovec and control buffer live on this stack frame for the call; CMSG_* are
    // used as documented in cmsg(3) on a buffer of CMSG_SPACE(sizeof(int)) bytes.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let space = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
        let mut cbuf = vec![0u8; space];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
        std::ptr::copy_nonoverlapping(
            &fd as *const libc::c_int as *const u8,
            libc::CMSG_DATA(c),
            std::mem::size_of::<libc::c_int>(),
        );
        let n = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Largest QMP line accepted (QEMU's own answers are small).
const MAX_LINE: usize = 1 << 20;

pub struct Qmp {
    io: Mutex<(BufReader<OwnedReadHalf>, OwnedWriteHalf)>,
    next_id: std::sync::atomic::AtomicU64,
}

async fn read_json(rd: &mut BufReader<OwnedReadHalf>) -> Result<Value> {
    let mut line = String::new();
    // A jailed QEMU is not trusted either: never read more than MAX_LINE for one line.
    let n = tokio::io::AsyncReadExt::take(&mut *rd, MAX_LINE as u64 + 1)
        .read_line(&mut line)
        .await
        .map_err(|e| Error::io("reading QMP", e))?;
    if n == 0 {
        return Err(Error::QmpClosed);
    }
    if line.len() > MAX_LINE {
        return Err(Error::QmpProtocol {
            message: "QMP line too long".into(),
        });
    }
    serde_json::from_str(&line).map_err(|source| Error::Json {
        context: "parsing QMP",
        source,
    })
}

fn encoding(source: serde_json::Error) -> Error {
    Error::Json {
        context: "encoding a QMP command",
        source,
    }
}

/// Bytes per second a saved state may be written at: no cap in practice (1 TiB/s).
const MAX_BANDWIDTH: u64 = 1 << 40;

impl Qmp {
    /// Connects, polling until `timeout` for QEMU to create the socket, and negotiates.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::trace!("QMP not up yet: {e}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(Error::io(format!("connecting to QMP at {}", path.display()), e)),
            }
        };
        let (r, w) = stream.into_split();
        let mut rd = BufReader::new(r);
        let greeting = read_json(&mut rd).await?;
        if greeting.get("QMP").is_none() {
            return Err(Error::QmpProtocol {
                message: format!("unexpected QMP greeting: {greeting}"),
            });
        }
        let qmp = Qmp {
            io: Mutex::new((rd, w)),
            next_id: 1.into(),
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&self, cmd: &str, args: Option<Value>) -> Result<Value> {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut msg = json!({ "execute": cmd, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut io = self.io.lock().await;
        let mut line = serde_json::to_vec(&msg).map_err(encoding)?;
        line.push(b'\n');
        io.1.write_all(&line).await.map_err(|e| Error::io("writing QMP", e))?;
        loop {
            let v = read_json(&mut io.0).await?;
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // an event, or a reply to an abandoned command
            }
            if let Some(err) = v.get("error") {
                return Err(Error::QmpCommand {
                    command: cmd.to_string(),
                    desc: err
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                        .to_string(),
                });
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Saves the paused VM's state (RAM and devices) to `file`: `stop`, then `migrate` into
    /// the file, handed to QEMU as a descriptor (a jailed QEMU can neither open host paths
    /// nor spawn a helper), polled until done. The VM stays paused; its disks are flushed and
    /// left to the caller.
    pub async fn save_state(&self, file: &std::fs::File, timeout: Duration) -> Result<()> {
        self.execute("stop", None).await?;
        // QEMU caps a migration at 128 MiB/s unless told otherwise, a cap meant for live
        // migration over a network: a paused VM saved into a local file or pipe would spend
        // ~0.3 s per 40 MiB of guest memory waiting on it. Uncapped, the first pass completes.
        self.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": MAX_BANDWIDTH })),
        )
        .await
        .map_err(|e| e.context("lifting the migration bandwidth cap"))?;
        self.send_fd("slicer-state", file).await?;
        self.execute("migrate", Some(json!({ "uri": "fd:slicer-state" })))
            .await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.execute("query-migrate", None).await?;
            match v.get("status").and_then(Value::as_str).unwrap_or("none") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(Error::SaveFailed {
                        reason: v
                            .get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("no reason given")
                            .to_string(),
                    })
                }
                _ if tokio::time::Instant::now() > deadline => {
                    let _ = self.execute("migrate_cancel", None).await;
                    return Err(Error::SaveTimeout { timeout });
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Migrations leave RAM that lives in a shared file out of the stream (`x-ignore-shared`):
    /// set on both sides of a template's save and restore.
    pub async fn ignore_shared_ram(&self) -> Result<()> {
        self.set_ignore_shared(true).await
    }

    /// Sets `x-ignore-shared`. A clone turns it off once loaded: a later save of it (suspend)
    /// must carry its RAM, and a stream records the capability its loader must match.
    pub async fn set_ignore_shared(&self, on: bool) -> Result<()> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": on }] })),
        )
        .await
        .map_err(|e| e.context("setting x-ignore-shared"))?;
        Ok(())
    }

    /// Starts loading a saved state into a QEMU started with `-incoming defer`, from `file`
    /// (handed over with `getfd`), RAM that lives in a file left as it is mapped.
    pub async fn incoming_ignoring_shared(&self, file: &std::fs::File) -> Result<()> {
        self.incoming(file, true).await
    }

    /// Starts loading a saved state into a QEMU started with `-incoming defer`, from `file`
    /// (handed over with `getfd`); `ignore_shared`: RAM that lives in a file is not in the
    /// stream (a template's clone), else the stream carries all RAM (a live capture).
    pub async fn incoming(&self, file: &std::fs::File, ignore_shared: bool) -> Result<()> {
        self.send_fd("slicer-incoming", file).await?;
        if ignore_shared {
            self.ignore_shared_ram().await?;
        }
        self.execute("migrate-incoming", Some(json!({ "uri": "fd:slicer-incoming" })))
            .await
            .map_err(|e| e.context("starting to load the saved state"))?;
        Ok(())
    }

    /// Hands `file` to QEMU under `name` (QMP `getfd`, the descriptor attached with SCM_RIGHTS).
    pub async fn send_fd(&self, name: &str, file: &std::fs::File) -> Result<()> {
        use std::os::fd::AsRawFd;
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut line = serde_json::to_vec(&json!({ "execute": "getfd", "arguments": { "fdname": name }, "id": id }))
            .map_err(encoding)?;
        line.push(b'\n');
        let mut io = self.io.lock().await;
        let fd = file.as_raw_fd();
        let sock: &UnixStream = io.1.as_ref();
        loop {
            sock.writable().await.map_err(|e| Error::io("writing QMP", e))?;
            match sock.try_io(tokio::io::Interest::WRITABLE, || {
                send_with_fd(sock.as_raw_fd(), &line, fd)
            }) {
                Ok(n) if n == line.len() => break,
                Ok(_) => {
                    return Err(Error::QmpProtocol {
                        message: "QMP getfd: short write".into(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Error::io("passing a descriptor to QEMU", e)),
            }
        }
        loop {
            let v = read_json(&mut io.0).await?;
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(err) = v.get("error") {
                return Err(Error::QmpCommand {
                    command: "getfd".into(),
                    desc: err
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                        .to_string(),
                });
            }
            return Ok(());
        }
    }

    /// Waits until an `-incoming` QEMU has loaded its state (it stays paused).
    pub async fn wait_incoming(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.status().await?.as_str() {
                "inmigrate" if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                "inmigrate" => return Err(Error::LoadTimeout { timeout }),
                "paused" | "postmigrate" | "prelaunch" | "running" => break,
                other => {
                    let v = self.execute("query-migrate", None).await.unwrap_or_default();
                    return Err(Error::LoadFailed {
                        status: other.to_string(),
                        reason: v
                            .get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("see the QEMU log")
                            .to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// `query-status`'s status string (running, paused, inmigrate, ...).
    pub async fn status(&self) -> Result<String> {
        let v = self.execute("query-status", None).await?;
        Ok(v.get("status").and_then(Value::as_str).unwrap_or("unknown").to_string())
    }
}
