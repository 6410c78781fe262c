//! The [`Guest`] capability of a [`super::Machine`]: what the daemon asks of a guest (exec,
//! background exec, files, watch, shell, stats, CA certificates), in the agent protocol's
//! types. A QEMU VM answers through its agent's [`AgentClient`]; the manager's unit tests use
//! an in-memory guest. Streams cross as [`GuestStream`] and [`Process`], which either can
//! make.

use std::pin::Pin;

use bytes::Bytes;
use slicer_agent_client::{AgentClient, AgentError, Download, ExecEvent, ExecProcess, Output, StdinWriter};
use slicer_agent_proto::{
    shell::ShellQuery, BgInfo, BgKill, BgKilled, BgLogsQuery, BgStart, BgStarted, BgWait, CaInstalled, ExecRequest,
    FileWritten, FsEntry, GuestStats, Health, MkdirRequest, WatchRequest,
};
use tokio::io::AsyncRead;

use super::super::BoxFut;

/// What a guest call fails with: the agent protocol's error (unreachable, timed out, or the
/// guest's own refusal with its status).
pub type GuestResult<T> = Result<T, AgentError>;

/// A byte stream going into the guest (an upload's body).
pub type GuestRead = Pin<Box<dyn AsyncRead + Send>>;

/// Where an upload goes and how it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// A tar stream unpacked into directory `path` (else one file's bytes).
    pub tar: bool,
    /// The guest path (a file, or the directory a tar or a placed file goes into).
    pub path: String,
    /// cp-v1 placement: the source's name and whether only its contents go into `path`.
    pub placed: Option<(String, bool)>,
    /// Mode bits of a file.
    pub mode: Option<u32>,
    /// Owner (uid, gid) of what is written.
    pub owner: Option<(u32, Option<u32>)>,
}

/// A file, tar or event stream coming from the guest: the agent client's [`Download`], whose
/// chunks come from the agent's answer or, in the unit tests' guest, from memory.
pub type GuestStream = Download;

/// One chunk source of a [`GuestStream`].
pub use slicer_agent_client::Chunks;

/// Writes a guest process's (or a shell's, a forward's) input; dropping it closes it.
pub trait GuestInput: Send + Sync {
    fn write(&self, data: Bytes) -> BoxFut<'_, GuestResult<()>>;
}

impl GuestInput for StdinWriter {
    fn write(&self, data: Bytes) -> BoxFut<'_, GuestResult<()>> {
        Box::pin(StdinWriter::write(self, data))
    }
}

impl GuestInput for tokio::sync::mpsc::Sender<Bytes> {
    fn write(&self, data: Bytes) -> BoxFut<'_, GuestResult<()>> {
        Box::pin(async move {
            self.send(data)
                .await
                .map_err(|_| AgentError::Protocol("the process's stdin is closed".into()))
        })
    }
}

/// The events of a running guest process.
pub trait Events: Send {
    /// The next output chunk or the exit status; `None` after the exit.
    fn next_event(&mut self) -> BoxFut<'_, GuestResult<Option<ExecEvent>>>;
}

impl Events for ExecProcess {
    fn next_event(&mut self) -> BoxFut<'_, GuestResult<Option<ExecEvent>>> {
        Box::pin(ExecProcess::next_event(self))
    }
}

impl Events for std::collections::VecDeque<ExecEvent> {
    fn next_event(&mut self) -> BoxFut<'_, GuestResult<Option<ExecEvent>>> {
        let next = self.pop_front();
        Box::pin(async move { Ok(next) })
    }
}

/// A process running in the guest. Dropping it (its event stream) makes the guest kill the
/// process group.
pub struct Process {
    pub pid: u32,
    pub started_at_ms: u64,
    /// Its stdin, when the request asked for one.
    pub stdin: Option<Box<dyn GuestInput>>,
    events: Box<dyn Events>,
}

impl Process {
    pub fn new(pid: u32, started_at_ms: u64, stdin: Option<Box<dyn GuestInput>>, events: Box<dyn Events>) -> Process {
        Process {
            pid,
            started_at_ms,
            stdin,
            events,
        }
    }

    /// The next output chunk or the exit status; `None` after the exit.
    pub async fn next_event(&mut self) -> GuestResult<Option<ExecEvent>> {
        self.events.next_event().await
    }
}

impl From<ExecProcess> for Process {
    fn from(mut p: ExecProcess) -> Process {
        let stdin = p.stdin.take().map(|s| Box::new(s) as Box<dyn GuestInput>);
        Process::new(p.pid, p.started_at_ms, stdin, Box::new(p))
    }
}

/// A full-duplex guest stream (a shell, a port forward): its input and its output.
pub type Duplex = (Box<dyn GuestInput>, GuestStream);

/// What the daemon asks of a guest.
pub trait Guest: Send + Sync {
    fn health(&self) -> BoxFut<'_, GuestResult<Health>>;
    /// Starts a command; its output and exit come as the process's events.
    fn exec<'a>(&'a self, req: &'a ExecRequest) -> BoxFut<'a, GuestResult<Process>>;
    /// A command's whole output (stdin given at once), up to the client's buffered limit.
    fn exec_output<'a>(&'a self, req: &'a ExecRequest, stdin: Option<Bytes>) -> BoxFut<'a, GuestResult<Output>>;
    fn upload<'a>(&'a self, up: &'a Upload, data: GuestRead) -> BoxFut<'a, GuestResult<FileWritten>>;
    fn download_file<'a>(&'a self, path: &'a str) -> BoxFut<'a, GuestResult<GuestStream>>;
    fn download_tar<'a>(&'a self, dir: &'a str) -> BoxFut<'a, GuestResult<GuestStream>>;
    fn readdir<'a>(&'a self, path: &'a str) -> BoxFut<'a, GuestResult<Vec<FsEntry>>>;
    fn stat<'a>(&'a self, path: &'a str) -> BoxFut<'a, GuestResult<FsEntry>>;
    fn mkdir<'a>(&'a self, req: &'a MkdirRequest) -> BoxFut<'a, GuestResult<FsEntry>>;
    fn remove<'a>(&'a self, path: &'a str, recursive: bool) -> BoxFut<'a, GuestResult<()>>;
    /// File system events under a path, one JSON line each.
    fn watch<'a>(&'a self, req: &'a WatchRequest) -> BoxFut<'a, GuestResult<GuestStream>>;
    fn shell<'a>(&'a self, q: &'a ShellQuery) -> BoxFut<'a, GuestResult<Duplex>>;
    fn forward<'a>(&'a self, target: &'a str) -> BoxFut<'a, GuestResult<Duplex>>;
    fn stats(&self) -> BoxFut<'_, GuestResult<GuestStats>>;
    fn install_ca<'a>(&'a self, pem: &'a str) -> BoxFut<'a, GuestResult<CaInstalled>>;
    fn bg_start<'a>(&'a self, start: &'a BgStart) -> BoxFut<'a, GuestResult<BgStarted>>;
    fn bg_list(&self) -> BoxFut<'_, GuestResult<Vec<BgInfo>>>;
    fn bg_info<'a>(&'a self, id: &'a str) -> BoxFut<'a, GuestResult<BgInfo>>;
    fn bg_kill<'a>(&'a self, id: &'a str, k: &'a BgKill) -> BoxFut<'a, GuestResult<BgKilled>>;
    fn bg_wait<'a>(&'a self, id: &'a str, timeout_secs: u64) -> BoxFut<'a, GuestResult<BgWait>>;
    fn bg_reap<'a>(&'a self, id: &'a str) -> BoxFut<'a, GuestResult<()>>;
    fn bg_logs<'a>(&'a self, id: &'a str, q: &'a BgLogsQuery) -> BoxFut<'a, GuestResult<GuestStream>>;
}

fn duplex((tx, rx): (StdinWriter, Download)) -> Duplex {
    (Box::new(tx), rx)
}

impl Guest for AgentClient {
    fn health(&self) -> BoxFut<'_, GuestResult<Health>> {
        Box::pin(AgentClient::health(self))
    }
    fn exec<'a>(&'a self, req: &'a ExecRequest) -> BoxFut<'a, GuestResult<Process>> {
        Box::pin(async move { AgentClient::exec(self, req).await.map(Process::from) })
    }
    fn exec_output<'a>(&'a self, req: &'a ExecRequest, stdin: Option<Bytes>) -> BoxFut<'a, GuestResult<Output>> {
        Box::pin(AgentClient::exec_output(self, req, stdin))
    }
    fn upload<'a>(&'a self, up: &'a Upload, data: GuestRead) -> BoxFut<'a, GuestResult<FileWritten>> {
        Box::pin(async move {
            let path = up.path.clone();
            let bytes = match (&up.placed, up.tar) {
                (Some((name, contents)), tar) => {
                    return self
                        .upload_placed(tar, &up.path, name, *contents, up.mode, up.owner, data)
                        .await
                }
                (None, true) => self.upload_tar(&up.path, up.owner, data).await?,
                (None, false) => self.upload_file(&up.path, up.mode, up.owner, data).await?,
            };
            Ok(FileWritten { path, bytes })
        })
    }
    fn download_file<'a>(&'a self, path: &'a str) -> BoxFut<'a, GuestResult<GuestStream>> {
        Box::pin(async move { AgentClient::download_file(self, path).await })
    }
    fn download_tar<'a>(&'a self, dir: &'a str) -> BoxFut<'a, GuestResult<GuestStream>> {
        Box::pin(async move { AgentClient::download_tar(self, dir).await })
    }
    fn readdir<'a>(&'a self, path: &'a str) -> BoxFut<'a, GuestResult<Vec<FsEntry>>> {
        Box::pin(AgentClient::readdir(self, path))
    }
    fn stat<'a>(&'a self, path: &'a str) -> BoxFut<'a, GuestResult<FsEntry>> {
        Box::pin(AgentClient::stat(self, path))
    }
    fn mkdir<'a>(&'a self, req: &'a MkdirRequest) -> BoxFut<'a, GuestResult<FsEntry>> {
        Box::pin(AgentClient::mkdir(self, req))
    }
    fn remove<'a>(&'a self, path: &'a str, recursive: bool) -> BoxFut<'a, GuestResult<()>> {
        Box::pin(AgentClient::remove(self, path, recursive))
    }
    fn watch<'a>(&'a self, req: &'a WatchRequest) -> BoxFut<'a, GuestResult<GuestStream>> {
        Box::pin(async move { AgentClient::watch(self, req).await })
    }
    fn shell<'a>(&'a self, q: &'a ShellQuery) -> BoxFut<'a, GuestResult<Duplex>> {
        Box::pin(async move { AgentClient::shell(self, q).await.map(duplex) })
    }
    fn forward<'a>(&'a self, target: &'a str) -> BoxFut<'a, GuestResult<Duplex>> {
        Box::pin(async move { AgentClient::forward(self, target).await.map(duplex) })
    }
    fn stats(&self) -> BoxFut<'_, GuestResult<GuestStats>> {
        Box::pin(AgentClient::stats(self))
    }
    fn install_ca<'a>(&'a self, pem: &'a str) -> BoxFut<'a, GuestResult<CaInstalled>> {
        Box::pin(AgentClient::install_ca(self, pem))
    }
    fn bg_start<'a>(&'a self, start: &'a BgStart) -> BoxFut<'a, GuestResult<BgStarted>> {
        Box::pin(AgentClient::bg_start(self, start))
    }
    fn bg_list(&self) -> BoxFut<'_, GuestResult<Vec<BgInfo>>> {
        Box::pin(AgentClient::bg_list(self))
    }
    fn bg_info<'a>(&'a self, id: &'a str) -> BoxFut<'a, GuestResult<BgInfo>> {
        Box::pin(AgentClient::bg_info(self, id))
    }
    fn bg_kill<'a>(&'a self, id: &'a str, k: &'a BgKill) -> BoxFut<'a, GuestResult<BgKilled>> {
        Box::pin(AgentClient::bg_kill(self, id, k))
    }
    fn bg_wait<'a>(&'a self, id: &'a str, timeout_secs: u64) -> BoxFut<'a, GuestResult<BgWait>> {
        Box::pin(AgentClient::bg_wait(self, id, timeout_secs))
    }
    fn bg_reap<'a>(&'a self, id: &'a str) -> BoxFut<'a, GuestResult<()>> {
        Box::pin(async move { AgentClient::bg_reap(self, id).await.map(|_| ()) })
    }
    fn bg_logs<'a>(&'a self, id: &'a str, q: &'a BgLogsQuery) -> BoxFut<'a, GuestResult<GuestStream>> {
        Box::pin(async move { AgentClient::bg_logs(self, id, q).await })
    }
}
