//! The real agent binary served on a UNIX socket on the host, driven by the real client.
//! Fast checks of the protocol and the operations; the guest end-to-end tests live in
//! `slicer-vmm/tests`.

use std::process::{Child, Command};
use std::time::Duration;

use bytes::Bytes;
use slicer_agent_client::{AgentClient, ExecEvent};
use slicer_agent_proto::ExecRequest;

struct Agent {
    child: Child,
    _dir: tempfile::TempDir,
    client: AgentClient,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start() -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_slicer-agent"))
        .arg("--listen-unix")
        .arg(&sock)
        .spawn()
        .unwrap();
    let client = AgentClient::new(&sock);
    client.wait_ready(Duration::from_secs(10)).await.unwrap();
    Agent {
        child,
        _dir: dir,
        client,
    }
}

/// Runs as the user running the tests, in `/`. A request without `uid` runs as root, which the
/// agent becomes with setuid: only root may, and the unit tier runs as any user, whose home
/// (the default cwd) may not exist (`nobody`'s is /nonexistent).
fn as_me(mut r: ExecRequest) -> ExecRequest {
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    r.uid = Some(uid);
    r.gid = Some(gid);
    r.cwd = Some("/".into());
    r
}

#[tokio::test]
async fn exec_streams_and_statuses() {
    let a = start().await;
    let out = a
        .client
        .exec_output(&as_me(ExecRequest::shell("echo out; echo err >&2; exit 3")), None)
        .await
        .unwrap();
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.code, Some(3));

    let out = a
        .client
        .exec_output(&as_me(ExecRequest::shell("kill -TERM $$")), None)
        .await
        .unwrap();
    assert_eq!(out.status.signal, Some(libc::SIGTERM));
    assert_eq!(out.status.code, None);

    let err = a
        .client
        .exec(&as_me(ExecRequest::argv(["/no/such/binary"])))
        .await
        .err()
        .expect("missing binary must fail");
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains("/no/such/binary"), "{err}");

    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let out = a
        .client
        .exec_output(&as_me(ExecRequest::argv(["cat"])), Some(Bytes::from(data.clone())))
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data);
}

#[tokio::test]
async fn output_arrives_before_exit() {
    let a = start().await;
    let mut p = a
        .client
        .exec(&as_me(ExecRequest::shell("echo first; sleep 1; echo second")))
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    let first = p.next_event().await.unwrap().unwrap();
    assert_eq!(first, ExecEvent::Stdout(Bytes::from_static(b"first\n")));
    assert!(t0.elapsed() < Duration::from_millis(800));
    let rest = p.output().await.unwrap();
    assert_eq!(rest.stdout, b"second\n");
}

#[tokio::test]
async fn files_and_tar_roundtrip() {
    let a = start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/f.bin");
    let data: Vec<u8> = (0..3_000_000).map(|_| rand::random::<u8>()).collect();
    let n = a
        .client
        .upload_file(
            path.to_str().unwrap(),
            Some(0o640),
            None,
            std::io::Cursor::new(data.clone()),
        )
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    let d = a.client.download_file(path.to_str().unwrap()).await.unwrap();
    assert_eq!(d.mode, Some(0o640));
    assert!(d.bytes(10 << 20).await.unwrap() == data);

    let err = a.client.download_file("/no/such/file").await.err().unwrap();
    assert!(err.is_not_found(), "{err}");
    let err = a
        .client
        .upload_file("relative/path", None, None, std::io::Cursor::new(vec![]))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("not absolute"), "{err}");

    let t = a.client.download_tar(dir.path().to_str().unwrap()).await.unwrap();
    let tar = t.bytes(10 << 20).await.unwrap();
    let dest = dir.path().join("copy");
    a.client
        .upload_tar(dest.to_str().unwrap(), None, std::io::Cursor::new(tar))
        .await
        .unwrap();
    assert!(std::fs::read(dest.join("sub/f.bin")).unwrap() == data);
}

#[tokio::test]
async fn concurrent_execs() {
    let a = std::sync::Arc::new(start().await);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let out = a
                .client
                .exec_output(&as_me(ExecRequest::shell(format!("echo {i}; exit {}", i % 5))), None)
                .await
                .unwrap();
            assert_eq!(out.stdout, format!("{i}\n").into_bytes());
            assert_eq!(out.status.code, Some(i % 5));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn reconnects_after_the_connection_drops() {
    let a = start().await;
    a.client.health().await.unwrap();
    a.client.reset().await;
    let h = a.client.health().await.unwrap();
    assert!(!h.pid1);
}

#[tokio::test]
async fn tar_without_directory_entries_unpacks() {
    let a = start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut tb = tar::Builder::new(Vec::new());
    let mut hdr = tar::Header::new_gnu();
    hdr.set_size(5);
    hdr.set_mode(0o755);
    hdr.set_cksum();
    tb.append_data(&mut hdr, "bin/tool", &b"#!/x\n"[..]).unwrap();
    let tar_in = tb.into_inner().unwrap();
    let dest = dir.path().join("app");
    a.client
        .upload_tar(dest.to_str().unwrap(), None, std::io::Cursor::new(tar_in))
        .await
        .unwrap();
    assert_eq!(std::fs::read(dest.join("bin/tool")).unwrap(), b"#!/x\n");
}
