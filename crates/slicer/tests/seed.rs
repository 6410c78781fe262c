//! The seed workflow, as a user runs it: `slicer new`, `slicer up`, then curl-style calls and
//! the `slicer` client, against the real binary, real guests and a temporary data directory.

use slicer_api::routes;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use http_body_util::BodyExt;
use slicer_api::client::full;
use slicer_api::ApiClient;

mod common;

use common::{free_port, slicer, ChildGuard, SLICER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn seed_workflow() {
    let dir = tempfile::Builder::new().prefix("slicer-seed-").tempdir().unwrap();
    let out = Command::new(SLICER)
        .args([
            "new",
            "sandbox",
            "--net=isolated",
            "--count=0",
            "--graceful-shutdown=false",
            "--drop",
            "192.168.1.0/24",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(
        yaml.contains("mode: isolated") && yaml.contains("192.168.1.0/24") && yaml.contains("0.0.0.0/0"),
        "{yaml}"
    );
    // The one change to the seed: a free port instead of 8080.
    let port = free_port();
    std::fs::write(
        dir.path().join("sandbox.yaml"),
        yaml.replace("port: 8080", &format!("port: {port}")),
    )
    .unwrap();

    let (daemon, url) = common::up(dir.path(), "./sandbox.yaml", port).await;
    let token_path = dir.path().join("data/auth/token");
    let token = std::fs::read_to_string(&token_path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let c = ApiClient::new(&url, Some(token.trim().to_string())).unwrap();

    let resp = c
        .send(
            Method::POST,
            &routes::group_nodes("sandbox"),
            Some("application/json"),
            full(r#"{"tags":["user=alice","job=convert-video-123"]}"#),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let created: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(created["hostname"], "sandbox-1");
    let nodes: serde_json::Value = c.json(Method::GET, "/nodes", None).await.unwrap();
    assert_eq!(nodes[0]["hostname"], "sandbox-1");
    assert_eq!(
        nodes[0]["tags"],
        serde_json::json!(["user=alice", "job=convert-video-123"])
    );
    assert_eq!(nodes[0]["status"], "Running");

    // The client: list, exec (waits for the agent by retrying like a user would), cp.
    let out = slicer(dir.path(), &["ls"], &url);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("sandbox-1") && table.contains("user=alice"),
        "{table}"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let out = loop {
        let out = slicer(
            dir.path(),
            &["vm", "exec", "sandbox-1", "--", "sh", "-c", "echo hello; exit 4"],
            &url,
        );
        if out.status.code() == Some(4) || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    std::fs::write(dir.path().join("in.txt"), "payload").unwrap();
    assert!(
        slicer(dir.path(), &["vm", "cp", "./in.txt", "sandbox-1:/tmp/in.txt"], &url)
            .status
            .success()
    );
    assert!(
        slicer(dir.path(), &["vm", "cp", "sandbox-1:/tmp/in.txt", "./out.txt"], &url)
            .status
            .success()
    );
    assert_eq!(std::fs::read_to_string(dir.path().join("out.txt")).unwrap(), "payload");
    let out = slicer(dir.path(), &["vm", "exec", "nope", "--", "true"], &url);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    // Suspend and restore from the client keep /tmp; restoring a running VM is refused.
    for args in [
        &["vm", "suspend", "sandbox-1"][..],
        &["vm", "restore", "sandbox-1", "--wait", "agent"][..],
        &["vm", "pause", "sandbox-1"][..],
        &["vm", "resume", "sandbox-1"][..],
    ] {
        let out = slicer(dir.path(), args, &url);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = slicer(
        dir.path(),
        &["vm", "exec", "sandbox-1", "--", "cat", "/tmp/in.txt"],
        &url,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "payload");
    let out = slicer(dir.path(), &["vm", "restore", "sandbox-1"], &url);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Background exec, top and secrets from the client.
    let out = slicer(
        dir.path(),
        &[
            "vm",
            "bg",
            "exec",
            "sandbox-1",
            "-s",
            "/bin/sh",
            "--",
            "echo bg-out; exit 5",
        ],
        &url,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().strip_prefix("exec_id=").unwrap_or_default().to_string();
    assert!(id.starts_with("ex_"), "{id}");
    let out = slicer(dir.path(), &["vm", "bg", "wait", "sandbox-1", &id], &url);
    assert_eq!(out.status.code(), Some(5));
    let out = slicer(dir.path(), &["vm", "bg", "logs", "sandbox-1", &id], &url);
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()),
        (Some(5), "bg-out\n")
    );
    assert!(slicer(dir.path(), &["vm", "bg", "rm", "sandbox-1", &id], &url)
        .status
        .success());
    let out = slicer(dir.path(), &["vm", "top"], &url);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("sandbox-1") && table.contains("MEM_USED"),
        "{table}"
    );
    let out = slicer(dir.path(), &["secret", "create", "token", "--value", "abc"], &url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = slicer(dir.path(), &["secret", "ls"], &url);
    assert!(String::from_utf8_lossy(&out.stdout).contains("token"));
    let out = slicer(
        dir.path(),
        &["vm", "exec", "sandbox-1", "--", "cat", "/run/slicer/secrets/token"],
        &url,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "abc");
    let out = slicer(dir.path(), &["secret", "create", "token", "--value", "x"], &url);
    assert_eq!(out.status.code(), Some(1), "a duplicate is refused");
    assert!(slicer(dir.path(), &["secret", "rm", "token"], &url).status.success());

    // vm shell with piped input runs it on a PTY and exits with the shell's code.
    let mut sh = Command::new(SLICER)
        .args(["vm", "--url", &url, "shell", "sandbox-1"])
        .env("SLICER_TOKEN_FILE", dir.path().join("data/auth/token"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sh.stdin.take().unwrap().write_all(b"tty; exit 3\n").unwrap();
    let out = sh.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("/dev/pts/"));

    // vm forward: a local port reaches an echo server inside the guest.
    let echo = "perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalAddr=>\"127.0.0.1:7000\",Listen=>5,ReuseAddr=>1) or die; while($c=$s->accept){while(<$c>){print $c \"echo:$_\"; $c->flush}}'";
    assert!(slicer(
        dir.path(),
        &["vm", "bg", "exec", "sandbox-1", "--shell", "/bin/sh", "--", echo],
        &url
    )
    .status
    .success());
    let port = free_port();
    let spec = format!("127.0.0.1:{port}:127.0.0.1:7000");
    let fwd = ChildGuard(
        Command::new(SLICER)
            .args(["vm", "--url", &url, "forward", "sandbox-1", "-L", &spec])
            .env("SLICER_TOKEN_FILE", dir.path().join("data/auth/token"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"hi\n")?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })();
        match attempt {
            Ok(a) if a == "echo:hi\n" => break a,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("forward never answered: {other:?}"),
        }
    };
    assert_eq!(answer, "echo:hi\n");
    drop(fwd);

    // SIGTERM stops the daemon and its ephemeral VM.
    let mut daemon = daemon;
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(daemon.0.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success());
    assert_eq!(std::fs::read_dir(dir.path().join("data/vms")).unwrap().count(), 0);
}
