//! One place that waits for children. As PID 1 (or a subreaper) the agent inherits orphans;
//! reaping with `waitpid(-1)` would steal exit statuses from per-child waiters, so all statuses
//! go through here and are handed to whoever registered the pid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use slicer_agent_proto::ExitStatus;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

#[derive(Default)]
struct Inner {
    waiting: HashMap<i32, oneshot::Sender<ExitStatus>>,
    /// Statuses reaped before their pid was registered (or of orphans), kept briefly.
    unclaimed: HashMap<i32, (ExitStatus, Instant)>,
}

pub struct Reaper {
    inner: Mutex<Inner>,
}

const UNCLAIMED_TTL: Duration = Duration::from_secs(30);

impl Reaper {
    /// Installs the SIGCHLD handler and the reaping task. Must run before any child is spawned.
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        // As a subreaper the agent also collects orphaned grandchildren under an init system.
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes a plain integer argument.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Reaper {
            inner: Mutex::new(Inner::default()),
        });
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                // Every SIGCHLD reaps all that exited; the sweep (once per TTL, so an idle
                // guest is not woken every second) only expires statuses nobody claimed.
                let _ = tokio::time::timeout(UNCLAIMED_TTL, sigchld.recv()).await;
                r.reap_all();
            }
        });
        Ok(reaper)
    }

    fn reap_all(&self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (
                    pid,
                    ExitStatus {
                        code: Some(code),
                        signal: None,
                    },
                ),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (
                    pid,
                    ExitStatus {
                        code: None,
                        signal: Some(sig as i32),
                    },
                ),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            };
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let (pid, st) = status;
            if let Some(tx) = inner.waiting.remove(&pid.as_raw()) {
                let _ = tx.send(st);
            } else {
                inner.unclaimed.insert(pid.as_raw(), (st, Instant::now()));
            }
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.unclaimed.retain(|_, (_, at)| at.elapsed() < UNCLAIMED_TTL);
    }

    /// Returns a receiver for the exit status of `pid`, a child spawned by the caller.
    pub fn register(&self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((st, _)) = inner.unclaimed.remove(&pid) {
            let _ = tx.send(st);
        } else {
            inner.waiting.insert(pid, tx);
        }
        rx
    }
}
