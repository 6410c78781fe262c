//! SSH into a sandbox as a user does: a key in the create request (and one in the config),
//! `slicer vm forward -L PORT:127.0.0.1:22` through the agent, and the host's ssh client.

mod common;

use slicer_api::routes;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, slicer, up, ChildGuard, SLICER};
use http::Method;

fn keygen(dir: &Path, name: &str) -> String {
    let key = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read_to_string(key.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string()
}

/// `ssh -i key -p port ubuntu@127.0.0.1 <cmd>`, retried until `deadline` while the forward and
/// the guest's sshd come up.
fn ssh(key: &Path, port: u16, cmd: &str, deadline: Instant) -> String {
    loop {
        let out = Command::new("ssh")
            .arg("-i")
            .arg(key)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=30",
                "-p",
                &port.to_string(),
                "ubuntu@127.0.0.1",
                cmd,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "ssh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn ssh_with_a_key_through_a_forward() {
    let dir = tempfile::Builder::new().prefix("slicer-ssh-").tempdir().unwrap();
    let request_key = keygen(dir.path(), "request");
    let config_key = keygen(dir.path(), "config");
    let port = free_port();
    let yaml = format!(
        "config:\n  host_groups:\n  - name: ssh\n    count: 0\n    vcpu: 1\n    ram_gb: 1\n    image: systemd\n    network: {{mode: none}}\n  ssh_keys:\n  - {config_key}\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
    );
    std::fs::write(dir.path().join("ssh.yaml"), yaml).unwrap();
    let (_daemon, url) = up(dir.path(), "./ssh.yaml", port).await;
    let c = common::client(dir.path(), &url);

    // import_user would need GitHub: refused, clearly, and nothing is created.
    let err = c
        .json::<serde_json::Value>(
            Method::POST,
            &routes::group_nodes("ssh"),
            Some(&serde_json::json!({"import_user": "alice"})),
        )
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("import_user"), "{err:#}");
    let err = c
        .json::<serde_json::Value>(
            Method::POST,
            &routes::group_nodes("ssh"),
            Some(&serde_json::json!({"ssh_keys": ["command=\"sh\" ssh-ed25519 AAAA"]})),
        )
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("ssh_keys[0]"), "{err:#}");
    let nodes: serde_json::Value = c.json(Method::GET, "/nodes", None).await.unwrap();
    assert_eq!(nodes, serde_json::json!([]));

    let created: serde_json::Value = c
        .json(
            Method::POST,
            &format!("{}?wait=agent", routes::group_nodes("ssh")),
            Some(&serde_json::json!({"ssh_keys": [request_key]})),
        )
        .await
        .unwrap();
    let h = created["hostname"].as_str().unwrap().to_string();
    let fwd = free_port();
    let _forward = ChildGuard(
        Command::new(SLICER)
            .args(["vm", "forward", &h, "-L", &format!("{fwd}:127.0.0.1:22")])
            .current_dir(dir.path())
            .env("SLICER_URL", &url)
            .env("SLICER_TOKEN_FILE", dir.path().join("data/auth/token"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let out = ssh(&dir.path().join("request"), fwd, "id -un; sudo -n id -un", deadline);
    assert_eq!(out, "ubuntu\nroot\n");
    let out = ssh(
        &dir.path().join("config"),
        fwd,
        "wc -l < ~/.ssh/authorized_keys",
        deadline,
    );
    assert_eq!(out.trim(), "2");

    // The host key was made in this VM: the image ships none.
    let out = slicer(
        dir.path(),
        &["vm", "exec", &h, "--", "sh", "-c", "ls /etc/ssh/ssh_host_*"],
        &url,
    );
    let keys = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        keys.trim(),
        "/etc/ssh/ssh_host_ed25519_key\n/etc/ssh/ssh_host_ed25519_key.pub",
        "{keys}"
    );
}
