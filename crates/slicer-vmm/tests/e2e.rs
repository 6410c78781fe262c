//! End to end: real guests under QEMU, the real agent, the real image store.
//! Needs the images built by `scripts/setup.sh` (or `slicer image build`).

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{boot, fixture, pid_alive};
use sha2::{Digest, Sha256};
use slicer_vmm::{ExecRequest, StopOutcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn min_image_runs_commands() {
    let f = fixture();
    let vm = boot(&f, "e2e-exec", "min").await;
    let agent = vm.agent();

    let health = agent.health().await.unwrap();
    assert!(health.pid1, "the min image runs the agent as PID 1");
    assert_eq!(health.hostname, "e2e-exec");

    let out = agent
        .exec_output(&ExecRequest::argv(["uname", "-r"]), None)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), vm.image.kernel_release);
    assert!(vm.image.kernel_release.ends_with("-slicer"));

    let out = agent
        .exec_output(&ExecRequest::shell("echo out; echo err >&2; exit 3"), None)
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert_eq!(out.status.code, Some(3));

    let data: Vec<u8> = (0..1 << 20).map(|_| rand::random::<u8>()).collect();
    let out = agent
        .exec_output(&ExecRequest::argv(["cat"]), Some(Bytes::from(data.clone())))
        .await
        .unwrap();
    assert!(out.stdout == data, "1 MiB through cat came back different");
    assert!(out.status.success());

    let out = agent
        .exec_output(&ExecRequest::shell("kill -KILL $$"), None)
        .await
        .unwrap();
    assert_eq!(out.status.signal, Some(libc::SIGKILL));
    assert_eq!(out.status.code, None);

    let t0 = Instant::now();
    let err = agent
        .exec(&ExecRequest::argv(["/usr/bin/does-not-exist"]))
        .await
        .err()
        .expect("a missing binary is an error");
    assert!(err.is_not_found(), "{err}");
    assert!(
        err.to_string()
            .contains("executable not found: /usr/bin/does-not-exist"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));

    // 8 execs at once on one VM.
    let vm = Arc::new(vm);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let vm = vm.clone();
        tasks.push(tokio::spawn(async move {
            let cmd = format!("for j in 1 2 3; do echo {i}-$j; done; head -c 100000 /dev/urandom | wc -c; exit {i}");
            let out = vm.agent().exec_output(&ExecRequest::shell(cmd), None).await.unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("{i}-1\n{i}-2\n{i}-3\n100000\n")
            );
            assert_eq!(out.status.code, Some(i));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let vm = Arc::try_unwrap(vm).ok().expect("all tasks done");
    let (pid, dir) = (vm.pid(), vm.dir().to_path_buf());
    assert_eq!(vm.stop(Duration::from_secs(10)).await.unwrap(), StopOutcome::Graceful);
    assert!(!pid_alive(pid), "QEMU {pid} still running after stop");
    assert!(!dir.exists(), "{} (overlay, sockets) left behind", dir.display());
}

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// (path, kind, mode, link target, content hash) of every entry of a tar.
fn tar_listing(tar: &[u8]) -> BTreeMap<String, (String, u32, String, String)> {
    let mut ar = tar::Archive::new(tar);
    let mut out = BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().trim_end_matches('/').to_string();
        let kind = format!("{:?}", e.header().entry_type());
        let mode = e.header().mode().unwrap() & 0o7777;
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        out.insert(path, (kind, mode, link, sha256(&content)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn min_image_moves_files() {
    let f = fixture();
    let vm = boot(&f, "e2e-files", "min").await;
    let agent = vm.agent();

    let data: Vec<u8> = (0..32 << 20).map(|_| rand::random::<u8>()).collect();
    let n = agent
        .upload_file("/root/big.bin", Some(0o600), None, std::io::Cursor::new(data.clone()))
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    let d = agent.download_file("/root/big.bin").await.unwrap();
    assert_eq!(d.mode, Some(0o600));
    let back = d.bytes(64 << 20).await.unwrap();
    assert_eq!(sha256(&back), sha256(&data));

    // A tree with modes and a symlink goes in and out as tar unchanged.
    let src = f.tmp.path().join("tree");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::create_dir_all(src.join("secret")).unwrap();
    std::fs::write(src.join("bin/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::write(src.join("secret/key"), b"k").unwrap();
    std::fs::write(src.join("readme"), b"hello").unwrap();
    std::fs::set_permissions(src.join("bin/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(src.join("secret/key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(src.join("secret"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink("bin/run.sh", src.join("link")).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    for rel in ["bin", "bin/run.sh", "link", "readme", "secret", "secret/key"] {
        b.append_path_with_name(src.join(rel), rel).unwrap();
    }
    let tar_in = b.into_inner().unwrap();
    agent
        .upload_tar("/srv/tree", None, std::io::Cursor::new(tar_in.clone()))
        .await
        .unwrap();
    let out = agent
        .exec_output(
            &ExecRequest::shell("/srv/tree/link && stat -c '%a %N' /srv/tree/secret /srv/tree/link"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi\n700 '/srv/tree/secret'\n777 '/srv/tree/link' -> 'bin/run.sh'\n"
    );
    let tar_out = agent
        .download_tar("/srv/tree")
        .await
        .unwrap()
        .bytes(16 << 20)
        .await
        .unwrap();
    assert_eq!(tar_listing(&tar_out), tar_listing(&tar_in));

    let err = agent.download_file("/srv/tree").await.err().unwrap();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let err = agent.download_file("/nope").await.err().unwrap();
    assert!(err.is_not_found(), "{err}");
    vm.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn systemd_image_runs_commands() {
    let f = fixture();
    let vm = boot(&f, "e2e-systemd", "systemd").await;
    let agent = vm.agent();
    let h = agent.health().await.unwrap();
    assert!(!h.pid1, "under systemd the agent is not PID 1");
    let out = agent
        .exec_output(&ExecRequest::shell("cat /proc/1/comm; hostname"), None)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "systemd\ne2e-systemd\n");
    let (pid, dir) = (vm.pid(), vm.dir().to_path_buf());
    let outcome = vm.stop(Duration::from_secs(30)).await.unwrap();
    assert_eq!(outcome, StopOutcome::Graceful);
    assert!(!pid_alive(pid));
    assert!(!dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn dropped_vm_leaves_nothing_behind() {
    let f = fixture();
    let vm = boot(&f, "e2e-drop", "min").await;
    let (pid, dir) = (vm.pid(), vm.dir().to_path_buf());
    assert!(dir.join("agent.sock").exists() && dir.join("disk.qcow2").exists());
    drop(vm); // as when a test panics
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!pid_alive(pid), "QEMU {pid} survived the drop");
    assert!(!dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn bad_specs_fail_before_anything_starts() {
    let f = fixture();
    let err = slicer_vmm::Vm::boot(&f.host, &slicer_vmm::VmSpec::new("Bad_Name", "min"))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("invalid VM name"), "{err}");
    let err = slicer_vmm::Vm::boot(&f.host, &slicer_vmm::VmSpec::new("ok", "nonexistent"))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("slicer image pull"), "{err}");
    assert_eq!(std::fs::read_dir(f.tmp.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn agent_channel_recovers_when_the_host_reconnects_mid_stream() {
    let f = fixture();
    let vm = boot(&f, "e2e-reconnect", "min").await;
    // Dropping the connection while the guest streams output into it stands for a daemon
    // that died; QEMU serves one client at a time, so the next connection is the new daemon.
    let agent = vm.agent();
    let mut p = agent
        .exec(&ExecRequest::shell("while true; do head -c 65536 /dev/zero; done"))
        .await
        .unwrap();
    let _ = p.next_event().await.unwrap();
    agent.reset().await;
    drop(p);
    let t0 = Instant::now();
    agent
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("the agent answers a new host session");
    eprintln!("reconnected in {:?}", t0.elapsed());
    let out = agent
        .exec_output(&ExecRequest::argv(["echo", "again"]), None)
        .await
        .unwrap();
    assert_eq!(out.stdout, b"again\n");
    vm.stop(Duration::from_secs(10)).await.unwrap();
}
