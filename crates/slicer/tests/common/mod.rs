//! The real `slicer` binary as a user runs it: a daemon (`slicer up`) in a temporary
//! directory, killed however a test ends, and the client against it.

#![allow(dead_code)]

use slicer_api::routes;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use slicer_api::client::empty;
use slicer_api::ApiClient;

pub const SLICER: &str = env!("CARGO_BIN_EXE_slicer");

/// A `slicer up` process: SIGTERM (the daemon stops its VMs), then SIGKILL after 30 s.
pub struct Daemon(pub Child);

/// A client process killed when the test ends, however it ends.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn images_dir() -> String {
    std::env::var("SLICER_IMAGES_DIR")
        .or_else(|_| std::env::var("SLICER_DATA_DIR").map(|d| format!("{d}/images")))
        .unwrap_or_else(|_| "/var/lib/slicer/images".into())
}

/// Runs the client in `dir` against `url` with the daemon's token.
pub fn slicer(dir: &Path, args: &[&str], url: &str) -> std::process::Output {
    Command::new(SLICER)
        .args(args)
        .current_dir(dir)
        .env("SLICER_URL", url)
        .env("SLICER_TOKEN_FILE", dir.join("data/auth/token"))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs and asserts success; returns stdout.
pub fn ok(dir: &Path, url: &str, args: &[&str]) -> String {
    let out = slicer(dir, args, url);
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs and asserts failure with one readable line on stderr that contains `want`.
pub fn fails(dir: &Path, url: &str, args: &[&str], want: &str) {
    let out = slicer(dir, args, url);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains(want), "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
}

/// Starts `slicer up ./<config>` in `dir` (data in `dir/data`) and waits for /healthz.
pub async fn up(dir: &Path, config: &str, port: u16) -> (Daemon, String) {
    up_with(dir, config, port, &[]).await
}

/// As [`up`], with extra environment (e.g. another `SLICER_IMAGES_DIR`).
pub async fn up_with(dir: &Path, config: &str, port: u16, env: &[(&str, &str)]) -> (Daemon, String) {
    let mut cmd = Command::new(SLICER);
    cmd.args(["up", config, "--data-dir"])
        .arg(dir.join("data"))
        .current_dir(dir)
        .env("SLICER_IMAGES_DIR", images_dir())
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let daemon = Daemon(child);
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&url).await;
    (daemon, url)
}

/// A daemon in `dir` with one host group `box` (1 vCPU, 1 GiB, no network, no VMs yet).
pub async fn up_box(dir: &Path) -> (Daemon, String) {
    let port = free_port();
    let yaml = format!(
        "config:\n  host_groups:\n  - name: box\n    count: 0\n    vcpu: 1\n    ram_gb: 1\n    network: {{mode: none}}\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
    );
    std::fs::write(dir.join("box.yaml"), yaml).unwrap();
    up(dir, "./box.yaml", port).await
}

/// Waits (60 s at most) until the daemon at `url` answers /healthz.
pub async fn wait_healthy(url: &str) {
    let anon = ApiClient::new(url, None).unwrap();
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

/// The API client with the token `slicer up` wrote.
pub fn client(dir: &Path, url: &str) -> ApiClient {
    let token = std::fs::read_to_string(dir.join("data/auth/token")).unwrap();
    ApiClient::new(url, Some(token.trim().to_string())).unwrap()
}

/// Creates a VM in `group` with `body` and waits for its agent; its hostname.
pub async fn create_vm(api: &ApiClient, group: &str, body: serde_json::Value) -> String {
    let v: serde_json::Value = api
        .json(
            Method::POST,
            &format!("{}?wait=agent", routes::group_nodes(group)),
            Some(&body),
        )
        .await
        .unwrap_or_else(|e| panic!("creating a VM in {group}: {e:#}"));
    v["hostname"]
        .as_str()
        .unwrap_or_else(|| panic!("no hostname in {v}"))
        .to_string()
}

/// Waits (60 s at most) until VM `vm` is stopped.
pub async fn wait_stopped(api: &ApiClient, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: serde_json::Value = api.json(Method::GET, &routes::vm(vm), None).await.unwrap();
        if v["status"] == "Stopped" {
            return;
        }
        assert!(Instant::now() < deadline, "{vm} did not stop: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
