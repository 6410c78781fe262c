//! Child processes a test starts: killed however the test ends. [`DaemonProcess`] is
//! `slicer up` as a user runs it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use slicer_api::client::empty;
use slicer_api::ApiClient;

/// A child process killed (SIGKILL) when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `slicer up` process: when dropped, SIGTERM (the daemon stops its VMs), then SIGKILL
/// after 30 s.
pub struct DaemonProcess(pub Child);

impl DaemonProcess {
    /// Runs `binary up <config> --data-dir <dir>/data` in `dir` with the image store of
    /// [`crate::images_dir`] and `env` on top, and waits until `url` answers /healthz.
    pub async fn up(binary: &Path, dir: &Path, config: &str, url: &str, env: &[(&str, &str)]) -> DaemonProcess {
        let mut cmd = Command::new(binary);
        cmd.args(["up", config, "--data-dir"])
            .arg(dir.join("data"))
            .current_dir(dir)
            .env("SLICER_IMAGES_DIR", crate::images_dir())
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let daemon = DaemonProcess(child);
        wait_healthy(url).await;
        daemon
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (60 s at most) until the daemon at `url` answers /healthz with 200.
pub async fn wait_healthy(url: &str) {
    let anon = ApiClient::new(url, None).expect("an API client");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = anon.send(Method::GET, "/healthz", None, empty()).await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "daemon did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
