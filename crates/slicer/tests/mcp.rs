//! The MCP server against the official MCP Python SDK (`mcp` from PyPI, pinned in
//! scripts/mcp-requirements.txt, in a virtualenv this test makes): over stdio (`slicer mcp`
//! spawned by the client) and over streamable HTTP (the daemon's `/mcp`), each with a real
//! daemon, a real VM and the real agent. The client (tests/mcp/client.py) initializes, lists
//! the tools and checks their schemas, creates a sandbox, runs `uname -a`, writes then reads a
//! file, runs a failing command, a command with 10 MiB of output (truncated with the marker)
//! and a background one, and deletes the sandbox. `/mcp` without the token is refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::Method;

const CONFIG: &str = "config:
  host_groups:
  - name: mcp
    count: 0
    vcpu: 1
    ram_mb: 256
    image: min
    network: {mode: none}
  graceful_shutdown: false
  api:
    port: PORT
    bind_address: 127.0.0.1
";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// target/mcp-venv with the pinned SDK, made (again) when scripts/mcp-requirements.txt differs
/// from what it was made from.
fn venv() -> PathBuf {
    let venv = repo().join("target/mcp-venv");
    let req = repo().join("scripts/mcp-requirements.txt");
    let want = std::fs::read(&req).unwrap();
    if std::fs::read(venv.join("requirements.txt")).ok().as_ref() != Some(&want) {
        let _ = std::fs::remove_dir_all(&venv);
        let st = Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 (scripts/setup.sh installs python3 and python3-venv)");
        assert!(st.success(), "python3 -m venv {}", venv.display());
        let st = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", "-r"])
            .arg(&req)
            .status()
            .unwrap();
        assert!(st.success(), "pip install -r {}", req.display());
        std::fs::write(venv.join("requirements.txt"), want).unwrap();
    }
    venv
}

/// Runs the Python client with `args` (its output in files of `dir`), killed after `limit`;
/// its JSON line.
fn client(venv: &Path, dir: &Path, args: &[&str], limit: Duration) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/client.py");
    let (out, err) = (dir.join("client.out"), dir.join("client.err"));
    let mut child = ChildGuard(
        Command::new(venv.join("bin/python"))
            .arg(&script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the MCP client did not finish within {limit:?}: {args:?}\n{}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (stdout, stderr) = (
        std::fs::read_to_string(&out).unwrap_or_default(),
        std::fs::read_to_string(&err).unwrap_or_default(),
    );
    assert!(
        status.success(),
        "MCP client {args:?}: {status}\nstdout: {stdout}\nstderr: {stderr}"
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// One request to `/mcp` on its own connection with the token and `Accept: application/json,
/// text/event-stream`; its status.
fn raw_status(port: u16, method: &str, content_type: &str, token: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "{method} /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n\
         Accept: application/json, text/event-stream\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before it read the whole body and close.
    let _ = s.write_all(body.as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer to {method} /mcp: {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU, built images and PyPI (scripts/test.sh runs it)"]
async fn the_official_mcp_client_uses_sandboxes_over_stdio_and_http() {
    let venv = venv();
    let dir = tempfile::Builder::new().prefix("slicer-mcp-").tempdir().unwrap();
    let (daemon, port, url, token) = up_config(dir.path(), CONFIG).await;
    let api = common::client(dir.path(), &url);
    let token_file = dir.path().join("data/auth/token");
    let mcp_url = format!("{url}/mcp");
    let limit = Duration::from_secs(600);
    let dir_path = dir.path().to_path_buf();

    // stdio: the client spawns `slicer mcp`, which talks to the daemon over REST.
    let stdio = tokio::task::spawn_blocking({
        let (venv, url, token_file, dir_path) = (venv.clone(), url.clone(), token_file.clone(), dir_path.clone());
        move || {
            client(
                &venv,
                &dir_path,
                &["stdio", SLICER, &url, token_file.to_str().unwrap(), "mcp", "legacy"],
                limit,
            )
        }
    })
    .await
    .unwrap();
    eprintln!("stdio: {stdio}");

    // Streamable HTTP at /mcp, with the initialize handshake and with the SDK's own choice.
    for mode in ["legacy", "auto"] {
        let http = tokio::task::spawn_blocking({
            let (venv, mcp_url, token, dir_path) = (venv.clone(), mcp_url.clone(), token.clone(), dir_path.clone());
            move || client(&venv, &dir_path, &["http", &mcp_url, &token, "mcp", mode], limit)
        })
        .await
        .unwrap();
        eprintln!("http ({mode}): {http}");
    }

    // Without the token: the SDK's client is refused, and so is a bare request, with our error.
    let refused = tokio::task::spawn_blocking({
        let (venv, mcp_url, dir_path) = (venv.clone(), mcp_url.clone(), dir_path.clone());
        move || client(&venv, &dir_path, &["http-no-token", &mcp_url], Duration::from_secs(60))
    })
    .await
    .unwrap();
    eprintln!("no token: {refused}");
    assert_eq!(refused["statuses"], serde_json::json!([401]), "{refused}");
    let anon = slicer_api::ApiClient::new(&url, None).unwrap();
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    for c in [&anon, &slicer_api::ApiClient::new(&url, Some("wrong".into())).unwrap()] {
        let err = c
            .json::<serde_json::Value>(Method::POST, "/mcp", Some(&serde_json::from_str(init).unwrap()))
            .await
            .unwrap_err();
        assert_eq!(err.status().map(|s| s.as_u16()), Some(401), "{err}");
    }
    // Malformed requests with the token, as the transport expects them otherwise (Accept
    // names JSON and SSE), get a 4xx: never a 5xx, a hang or a dropped connection.
    let big = " ".repeat(20 << 20);
    for (method, ct, body) in [
        ("POST", "application/json", "not json"),
        ("POST", "application/json", "{\"jsonrpc\":\"2.0\",\"id\":1}"),
        ("POST", "application/json", "[]"),
        ("POST", "application/json", "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"run_command\",\"arguments\":{\"sandbox\":\"../../x\"}}}"),
        ("POST", "text/plain", init),
        ("POST", "application/json", big.as_str()),
        ("GET", "application/json", ""),
        ("DELETE", "application/json", ""),
    ] {
        let what = format!("{method} /mcp {ct} {} bytes", body.len());
        let status = raw_status(port, method, ct, &token, body);
        eprintln!("{what}: {status}");
        assert!((400..500).contains(&status) || (status == 200 && body.contains("tools/call")), "{what}: {status}");
    }

    // Nothing is left: no VM (the client deleted its sandboxes), and the daemon still serves.
    let nodes: Vec<serde_json::Value> = api.json(Method::GET, "/nodes", None).await.unwrap();
    assert!(nodes.is_empty(), "{nodes:?}");
    drop(daemon);
}
