//! kill -9 of the daemon: the VMs keep running and the next daemon adopts them.

use slicer_api::routes;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use http_body_util::BodyExt;
use slicer_api::client::empty;
use slicer_api::ApiClient;

mod common;

const SLICER: &str = env!("CARGO_BIN_EXE_slicer");
const GROUP: &str = "adopt";

use common::images_dir;
use slicer_testkit::qemu::hostnames_like as qemu_pids;

/// Whatever happens, nothing of this test outlives it.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (pid, _) in qemu_pids(&format!("{GROUP}-")) {
            // SAFETY: kill(2) on a QEMU of this test's host group.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        for l in String::from_utf8_lossy(&ns.stdout).lines() {
            if let Some(n) = l
                .split_whitespace()
                .next()
                .filter(|n| n.starts_with(&format!("slicer-{GROUP}-")))
            {
                let _ = Command::new("ip").args(["netns", "del", n]).output();
            }
        }
        let t = Command::new("nft").args(["list", "tables"]).output().unwrap();
        for l in String::from_utf8_lossy(&t.stdout).lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.len() == 3 && w[2].starts_with(&format!("slicer-{GROUP}-")) {
                let _ = Command::new("nft").args(["delete", "table", w[1], w[2]]).output();
            }
        }
    }
}

fn start(dir: &Path) -> Child {
    Command::new(SLICER)
        .args(["up", "./slicer.yaml", "--data-dir"])
        .arg(dir.join("data"))
        .current_dir(dir)
        .env("SLICER_IMAGES_DIR", images_dir())
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_up(url: &str) {
    common::wait_healthy(url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn kill_9_of_the_daemon_loses_nothing() {
    let _cleanup = Cleanup;
    let dir = tempfile::Builder::new().prefix("slicer-restart-").tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.path().join("slicer.yaml"),
        format!(
            "config:\n  host_groups:\n  - name: {GROUP}\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network: {{mode: isolated, range: 169.254.232.0/22}}\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
        ),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mut daemon = start(dir.path());
    wait_up(&url).await;
    let token = std::fs::read_to_string(dir.path().join("data/auth/token")).unwrap();
    let c = ApiClient::new(&url, Some(token.trim().to_string())).unwrap();

    let mut before = Vec::new();
    for i in 0..3 {
        let v: serde_json::Value = c
            .json(
                Method::POST,
                &format!("{}?wait=agent", routes::group_nodes(GROUP)),
                Some(&serde_json::json!({"tags": [format!("job={i}")]})),
            )
            .await
            .unwrap();
        before.push(v);
    }
    let nodes_before: serde_json::Value = c.json(Method::GET, "/nodes", None).await.unwrap();

    // An exec streams while the daemon dies.
    let h0 = before[0]["hostname"].as_str().unwrap().to_string();
    let resp = c
        .send(
            Method::POST,
            &format!(
                "{}?cmd=for%20i%20in%20$(seq%20100);%20do%20echo%20$i;%20sleep%200.1;%20done",
                routes::vm_exec(&h0)
            ),
            None,
            empty(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(daemon.id() as i32, libc::SIGKILL);
    }
    daemon.wait().unwrap();
    drop(body);
    assert_eq!(qemu_pids(&format!("{GROUP}-")).len(), 3, "the VMs outlive the daemon");

    let mut daemon = start(dir.path());
    wait_up(&url).await;
    let nodes_after: serde_json::Value = c.json(Method::GET, "/nodes", None).await.unwrap();
    let key = |v: &serde_json::Value| {
        let mut k: Vec<(String, String, String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["hostname"].to_string(),
                    n["tags"].to_string(),
                    n["ip"].to_string(),
                    n["status"].to_string(),
                )
            })
            .collect();
        k.sort();
        k
    };
    assert_eq!(key(&nodes_after), key(&nodes_before));
    for v in &before {
        let h = v["hostname"].as_str().unwrap();
        let q = slicer_api::client::query(&[("cmd", "hostname".to_string()), ("buffered", "true".into())]);
        let out: serde_json::Value = c
            .json(Method::POST, &format!("{}?{q}", routes::vm_exec(h)), None)
            .await
            .unwrap();
        assert_eq!(out["stdout"], format!("{h}\n"));
    }
    let pids = qemu_pids(&format!("{GROUP}-"));
    assert_eq!(pids.len(), 3, "no duplicate QEMU: {pids:?}");

    // A clean stop ends the ephemeral VMs.
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(daemon.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "daemon did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(qemu_pids(&format!("{GROUP}-")).is_empty());
}
