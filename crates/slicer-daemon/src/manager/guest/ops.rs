//! The manager's guest operations: what the API asks of a running VM's guest (exec,
//! background exec, files, watch, shell, stats). Each finds the VM, asks its [`Guest`] and maps
//! the guest's errors to [`Error`] here, in one place.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use slicer_agent_client::AgentError;
use slicer_agent_proto::{
    shell::ShellQuery, BgInfo, BgKill, BgKilled, BgLogsQuery, BgStart, BgStarted, BgWait, ExecRequest, FileWritten,
    FsEntry, GuestStats, Health, MkdirRequest, WatchRequest,
};

use super::port::{Chunks, Duplex, GuestRead, GuestResult, GuestStream, Process, Upload};
use crate::manager::{BoxFut, Error, Manager, Running};

/// Longest a guest gets to answer a stats request.
pub const STATS_TIMEOUT: Duration = Duration::from_secs(5);

/// How an exec began.
pub enum ExecStart {
    /// The command runs.
    Running(Process),
    /// The guest could not start the program (missing, not executable, or not allowed): the
    /// guest's message. SlicerVM answers it as an exit of 1, not as an error.
    NotStarted(String),
}

/// A guest failure as the manager's: the guest's own refusals keep their status (see
/// `api::error`).
fn guest_error(e: AgentError) -> Error {
    Error::Guest(e)
}

/// A background exec's failure: the agent's 503 (its ring budget is used up) is the host's
/// "not now"; the rest as [`guest_error`].
fn bg_error(e: AgentError) -> Error {
    match e {
        AgentError::Remote {
            status: 503, message, ..
        } => Error::Unavailable(message),
        e => guest_error(e),
    }
}

/// A stream that keeps its VM's record alive while it is read.
struct Held {
    inner: GuestStream,
    _running: Arc<Running>,
}

impl Chunks for Held {
    fn chunk(&mut self) -> BoxFut<'_, GuestResult<Option<Bytes>>> {
        Box::pin(self.inner.chunk())
    }
}

impl Manager {
    /// The guest's agent health.
    pub async fn guest_health(&self, hostname: &str) -> Result<Health, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().health().await.map_err(guest_error)
    }

    /// Starts `req` in the guest (its output streams as the process's events).
    pub async fn exec(&self, hostname: &str, req: &ExecRequest) -> Result<ExecStart, Error> {
        let r = self.active(hostname)?;
        match r.vm.guest().exec(req).await {
            Ok(p) => Ok(ExecStart::Running(p)),
            Err(e @ AgentError::Remote { status: 403 | 404, .. }) => Ok(ExecStart::NotStarted(e.to_string())),
            Err(e) => Err(guest_error(e)),
        }
    }

    /// Starts a background exec (kept by the guest's agent; it outlives API clients).
    pub async fn exec_background(&self, hostname: &str, start: &BgStart) -> Result<BgStarted, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().bg_start(start).await.map_err(bg_error)
    }

    pub async fn bg_list(&self, hostname: &str) -> Result<Vec<BgInfo>, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().bg_list().await.map_err(bg_error)
    }

    pub async fn bg_info(&self, hostname: &str, id: &str) -> Result<BgInfo, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().bg_info(id).await.map_err(bg_error)
    }

    pub async fn bg_kill(&self, hostname: &str, id: &str, k: &BgKill) -> Result<BgKilled, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().bg_kill(id, k).await.map_err(bg_error)
    }

    /// Waits up to `timeout_secs` for a background exec to end.
    pub async fn bg_wait(&self, hostname: &str, id: &str, timeout_secs: u64) -> Result<BgWait, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().bg_wait(id, timeout_secs).await.map_err(bg_error)
    }

    /// Forgets an ended background exec.
    pub async fn bg_reap(&self, hostname: &str, id: &str) -> Result<(), Error> {
        let r = self.active(hostname)?;
        r.vm.guest().bg_reap(id).await.map_err(bg_error)
    }

    /// A background exec's output frames, one JSON line each.
    pub async fn bg_logs(&self, hostname: &str, id: &str, q: &BgLogsQuery) -> Result<GuestStream, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().bg_logs(id, q).await.map_err(bg_error)
    }

    /// Writes `data` (a file's bytes or a tar stream) into the guest as `up` says.
    pub async fn copy_in(&self, hostname: &str, up: &Upload, data: GuestRead) -> Result<FileWritten, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().upload(up, data).await.map_err(guest_error)
    }

    /// A guest file's bytes, or (`tar`) a directory as a tar stream.
    pub async fn copy_out(&self, hostname: &str, path: &str, tar: bool) -> Result<GuestStream, Error> {
        let r = self.active(hostname)?;
        let guest = r.vm.guest();
        let s = match tar {
            true => guest.download_tar(path).await,
            false => guest.download_file(path).await,
        }
        .map_err(guest_error)?;
        let mode = s.mode;
        Ok(GuestStream::new(
            mode,
            Box::new(Held {
                inner: s,
                _running: r.clone(),
            }),
        ))
    }

    pub async fn fs_readdir(&self, hostname: &str, path: &str) -> Result<Vec<FsEntry>, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().readdir(path).await.map_err(guest_error)
    }

    pub async fn fs_stat(&self, hostname: &str, path: &str) -> Result<FsEntry, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().stat(path).await.map_err(guest_error)
    }

    pub async fn fs_mkdir(&self, hostname: &str, req: &MkdirRequest) -> Result<FsEntry, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().mkdir(req).await.map_err(guest_error)
    }

    pub async fn fs_remove(&self, hostname: &str, path: &str, recursive: bool) -> Result<(), Error> {
        let r = self.active(hostname)?;
        r.vm.guest().remove(path, recursive).await.map_err(guest_error)
    }

    /// File system events in the guest, one JSON line each.
    pub async fn watch(&self, hostname: &str, req: &WatchRequest) -> Result<GuestStream, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().watch(req).await.map_err(guest_error)
    }

    /// A PTY shell session in the guest.
    pub async fn shell(&self, hostname: &str, q: &ShellQuery) -> Result<Duplex, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().shell(q).await.map_err(guest_error)
    }

    /// A byte stream to `target` (host:port or unix:/path) as seen from the guest.
    pub async fn forward(&self, hostname: &str, target: &str) -> Result<Duplex, Error> {
        let r = self.active(hostname)?;
        r.vm.guest().forward(target).await.map_err(guest_error)
    }

    /// The guest's resource use, within [`STATS_TIMEOUT`].
    pub async fn guest_stats(&self, hostname: &str) -> Result<GuestStats, Error> {
        let r = self.active(hostname)?;
        match tokio::time::timeout(STATS_TIMEOUT, r.vm.guest().stats()).await {
            Ok(s) => s.map_err(guest_error),
            Err(_) => Err(Error::timeout(format!(
                "the guest did not answer within {STATS_TIMEOUT:?}"
            ))),
        }
    }
}
