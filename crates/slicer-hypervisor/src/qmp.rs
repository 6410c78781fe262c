//! A minimal QMP client: the handful of commands slicer sends (quit, stop, cont, migrate,
//! query-status). Events are skipped; replies are matched by id.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

/// Largest QMP line accepted (QEMU's own answers are small).
const MAX_LINE: usize = 1 << 20;

pub struct Qmp {
    io: Mutex<(BufReader<OwnedReadHalf>, OwnedWriteHalf)>,
    next_id: std::sync::atomic::AtomicU64,
}

async fn read_json(rd: &mut BufReader<OwnedReadHalf>) -> Result<Value> {
    let mut line = String::new();
    let n = rd.read_line(&mut line).await.context("reading QMP")?;
    if n == 0 {
        bail!("QMP connection closed");
    }
    if line.len() > MAX_LINE {
        bail!("QMP line too long");
    }
    serde_json::from_str(&line).context("parsing QMP")
}

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
                Err(e) => return Err(e).with_context(|| format!("connecting to QMP at {}", path.display())),
            }
        };
        let (r, w) = stream.into_split();
        let mut rd = BufReader::new(r);
        let greeting = read_json(&mut rd).await?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting: {greeting}");
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
        let mut line = serde_json::to_vec(&msg)?;
        line.push(b'\n');
        io.1.write_all(&line).await.context("writing QMP")?;
        loop {
            let v = read_json(&mut io.0).await?;
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // an event, or a reply to an abandoned command
            }
            if let Some(err) = v.get("error") {
                bail!(
                    "QMP {cmd} failed: {}",
                    err.get("desc").and_then(Value::as_str).unwrap_or("unknown error")
                );
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Saves the paused VM's state (RAM and devices) to `path`: `stop`, then `migrate` into a
    /// file, polled until done. The VM stays paused; its disks are flushed and left to the caller.
    pub async fn save_state(&self, path: &Path, timeout: Duration) -> Result<()> {
        self.execute("stop", None).await?;
        let uri = format!("exec:cat > '{}'", path.display().to_string().replace('\'', r"'\''"));
        self.execute("migrate", Some(json!({ "uri": uri }))).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.execute("query-migrate", None).await?;
            match v.get("status").and_then(Value::as_str).unwrap_or("none") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => bail!(
                    "saving the VM state failed: {}",
                    v.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given")
                ),
                _ if tokio::time::Instant::now() > deadline => {
                    let _ = self.execute("migrate_cancel", None).await;
                    bail!("saving the VM state took longer than {timeout:?}");
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Waits until an `-incoming` QEMU has loaded its state, then resumes the vCPUs.
    pub async fn resume_incoming(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.status().await?.as_str() {
                "inmigrate" if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                "inmigrate" => bail!("loading the VM state took longer than {timeout:?}"),
                "paused" | "postmigrate" | "prelaunch" | "running" => break,
                other => {
                    let v = self.execute("query-migrate", None).await.unwrap_or_default();
                    bail!(
                        "loading the VM state failed (status {other}): {}",
                        v.get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("see the QEMU log")
                    );
                }
            }
        }
        self.execute("cont", None).await?;
        Ok(())
    }

    /// `query-status`'s status string (running, paused, inmigrate, ...).
    pub async fn status(&self) -> Result<String> {
        let v = self.execute("query-status", None).await?;
        Ok(v.get("status").and_then(Value::as_str).unwrap_or("unknown").to_string())
    }
}
