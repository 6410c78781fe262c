//! The real `slicer` binary as a user runs it: a daemon (`slicer up`) in a temporary
//! directory, killed however a test ends, and the client against it.

#![allow(dead_code, unused_imports)]

use slicer_api::routes;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use slicer_api::ApiClient;

pub const SLICER: &str = env!("CARGO_BIN_EXE_slicer");

pub use slicer_testkit::{free_port, wait_healthy, ChildGuard, DaemonProcess as Daemon};

/// The image store, as text (for arguments and `Path::new`).
pub fn images_dir() -> String {
    slicer_testkit::images_dir().to_string_lossy().into_owned()
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
    let url = format!("http://127.0.0.1:{port}");
    let daemon = Daemon::up(Path::new(SLICER), dir, config, &url, env).await;
    (daemon, url)
}

/// `slicer up` in `dir` with `config` (its `PORT` replaced by a free port) as `slicer.yaml`:
/// the daemon, its port, its URL and the token it wrote.
pub async fn up_config(dir: &Path, config: &str) -> (Daemon, u16, String, String) {
    let port = free_port();
    std::fs::write(dir.join("slicer.yaml"), config.replace("PORT", &port.to_string())).expect("writing slicer.yaml");
    let (daemon, url) = up(dir, "slicer.yaml", port).await;
    let token = std::fs::read_to_string(dir.join("data/auth/token")).expect("the daemon's token");
    (daemon, port, url, token.trim().to_string())
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
