//! The manager's guest paths against the in-memory guest: exec, files, secrets, SSH keys and
//! userdata, and how guest errors map to the manager's.

use slicer_agent_client::{AgentError, ExecEvent};
use slicer_agent_proto::{BgStart, ExecRequest, MkdirRequest};
use slicer_api::CreateNodeRequest;

use super::mem_guest::AUTHORIZED_KEYS;
use super::{fixture, request, Wait, T};
use crate::manager::{Error, ExecStart, Upload};

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGw2nbyvNQ5dTfTQ1vbiHyqL3QVGWczZ1fdQ1ZDfjVZq t@x";

fn upload(path: &str, mode: Option<u32>) -> Upload {
    Upload {
        tar: false,
        path: path.into(),
        placed: None,
        mode,
        owner: None,
    }
}

fn data(b: &'static [u8]) -> crate::manager::guest::port::GuestRead {
    Box::pin(std::io::Cursor::new(b))
}

#[tokio::test]
async fn exec_streams_the_output_and_exit_and_a_missing_program_does_not_start() {
    let f = fixture(2).await;
    let h = f.ready_vm(false).await.hostname;
    let ExecStart::Running(mut p) = f
        .manager
        .exec(&h, &ExecRequest::argv(["echo", "hi"]))
        .await
        .expect("exec")
    else {
        panic!("echo did not start");
    };
    assert_eq!(
        p.next_event().await.expect("an event"),
        Some(ExecEvent::Stdout("hi\n".into()))
    );
    match p.next_event().await.expect("an event") {
        Some(ExecEvent::Exit(st)) => assert_eq!(st.code, Some(0)),
        other => panic!("not an exit: {other:?}"),
    }
    match f
        .manager
        .exec(&h, &ExecRequest::argv(["nonesuch"]))
        .await
        .expect("exec")
    {
        ExecStart::NotStarted(msg) => assert!(msg.contains("not found"), "{msg}"),
        ExecStart::Running(_) => panic!("a missing program ran"),
    }
    assert!(matches!(
        f.manager.exec("nope", &ExecRequest::argv(["echo"])).await,
        Err(Error::NotFound(_))
    ));
    f.manager.set_paused(&h, true).await.expect("pause");
    assert!(matches!(
        f.manager.exec(&h, &ExecRequest::argv(["echo"])).await,
        Err(Error::Conflict(_))
    ));
}

#[tokio::test]
async fn files_go_in_come_out_and_are_listed_and_removed() {
    let f = fixture(2).await;
    let h = f.ready_vm(false).await.hostname;
    let m = &f.manager;
    let missing = m.copy_in(&h, &upload("/w/a.txt", None), data(b"x")).await;
    let err = missing.expect_err("no /w yet");
    assert!(matches!(&err, Error::Guest(e) if e.is_not_found()), "{err:?}");
    assert_eq!(
        crate::api::error::ApiErr::from(err).status,
        axum::http::StatusCode::NOT_FOUND
    );

    let dir = MkdirRequest {
        path: "/w".into(),
        recursive: true,
        mode: None,
    };
    assert_eq!(m.fs_mkdir(&h, &dir).await.expect("mkdir").kind, "directory");
    let w = m
        .copy_in(&h, &upload("/w/a.txt", Some(0o640)), data(b"hello"))
        .await
        .expect("upload");
    assert_eq!((w.path.as_str(), w.bytes), ("/w/a.txt", 5));
    let placed = Upload {
        placed: Some(("b.txt".into(), false)),
        ..upload("/w", None)
    };
    assert_eq!(
        m.copy_in(&h, &placed, data(b"b")).await.expect("upload").path,
        "/w/b.txt"
    );

    let names: Vec<String> = m
        .fs_readdir(&h, "/w")
        .await
        .expect("readdir")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["a.txt", "b.txt"]);
    let st = m.fs_stat(&h, "/w/a.txt").await.expect("stat");
    assert_eq!((st.size, st.mode), (5, 0o640));
    let out = m.copy_out(&h, "/w/a.txt", false).await.expect("download");
    assert_eq!(out.mode, Some(0o640));
    assert_eq!(out.bytes(1024).await.expect("its bytes"), b"hello");

    assert!(matches!(m.fs_remove(&h, "/w", false).await, Err(Error::Guest(_))));
    m.fs_remove(&h, "/w", true).await.expect("remove");
    assert!(matches!(m.fs_stat(&h, "/w/a.txt").await, Err(Error::Guest(e)) if e.is_not_found()));
}

#[tokio::test]
async fn guest_refusals_keep_their_meaning() {
    let f = fixture(2).await;
    let h = f.ready_vm(false).await.hostname;
    let start = BgStart {
        spec: ExecRequest::argv(["sleep", "1"]),
        ring_bytes: None,
    };
    // The agent's ring budget used up: the host's "not now", 503 with the guest's words.
    match f.manager.exec_background(&h, &start).await {
        Err(Error::Unavailable(m)) => assert!(m.contains("ring budget"), "{m}"),
        other => panic!("not unavailable: {:?}", other.map(|_| ())),
    }
    let e = f.manager.bg_info(&h, "x").await.expect_err("no such exec");
    assert_eq!(
        crate::api::error::ApiErr::from(e).status,
        axum::http::StatusCode::NOT_FOUND
    );
    let e = Error::Guest(AgentError::Protocol("broken".into()));
    assert_eq!(
        crate::api::error::ApiErr::from(e).status,
        axum::http::StatusCode::BAD_GATEWAY
    );
    assert_eq!(f.manager.guest_stats(&h).await.expect("stats").cpus, 2);
}

#[tokio::test]
async fn secrets_are_pushed_with_their_mode_and_owner_and_removed_with_them() {
    let f = fixture(2).await;
    let h = f.ready_vm(false).await.hostname;
    let info = slicer_api::SecretInfo {
        name: "token".into(),
        size: 3,
        permissions: "0640".into(),
        uid: 1000,
        gid: 1001,
        modified_at: String::new(),
    };
    let (_, pushes) = f.manager.create_secret(info, b"abc").await.expect("create the secret");
    crate::manager::settle_pushes(pushes, T).await;
    let guest = f.backend.guest(&h);
    let path = format!("{}/token", crate::secrets::GUEST_DIR);
    let file = guest.file(&path).expect("the secret in the guest");
    assert_eq!(file.data, b"abc");
    assert_eq!((file.mode, file.owner), (0o640, Some((1000, Some(1001)))));
    assert!(guest.entry_exists(crate::secrets::GUEST_DIR));

    // A VM created afterwards gets it at boot.
    let h2 = f.ready_vm(false).await.hostname;
    assert_eq!(f.backend.guest(&h2).file(&path).map(|f| f.data), Some(b"abc".to_vec()));

    let pushes = f.manager.delete_secret("token").await.expect("delete the secret");
    crate::manager::settle_pushes(pushes, T).await;
    assert!(guest.file(&path).is_none());
}

#[tokio::test]
async fn ssh_keys_of_the_request_are_authorized_once() {
    let f = fixture(2).await;
    let req = CreateNodeRequest {
        ssh_keys: vec![KEY.into()],
        ..request(false, &[])
    };
    let h = f
        .manager
        .create("t", req, Some(Wait::Agent), T)
        .await
        .expect("create")
        .hostname;
    let guest = f.backend.guest(&h);
    let keys = guest.file(AUTHORIZED_KEYS).expect("authorized_keys");
    assert_eq!(String::from_utf8_lossy(&keys.data), format!("{KEY}\n"));
    // The script runs as the default user, the keys on its stdin.
    let execs = guest.execs.lock().unwrap_or_else(|p| p.into_inner());
    let (req, stdin) = execs
        .iter()
        .find(|(r, _)| r.argv.iter().any(|a| a.contains("authorized_keys")))
        .expect("the key script ran");
    assert_eq!(req.uid, Some(slicer_agent_proto::DEFAULT_USER));
    assert_eq!(stdin.as_deref(), Some(format!("{KEY}\n").as_bytes()));
}

#[tokio::test]
async fn userdata_runs_once_as_root_and_a_failure_keeps_the_vm_with_its_log() {
    let f = fixture(3).await;
    let req = CreateNodeRequest {
        userdata: Some("#!/bin/sh\necho hi\n".into()),
        ..request(false, &[])
    };
    let h = f
        .manager
        .create("t", req, Some(Wait::Userdata), T)
        .await
        .expect("create")
        .hostname;
    let guest = f.backend.guest(&h);
    let script = guest.file("/etc/slicer/userdata.sh").expect("the script uploaded");
    assert_eq!(
        (script.mode, script.data.as_slice()),
        (0o700, b"#!/bin/sh\necho hi\n".as_slice())
    );
    let execs = guest.execs.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (run, _) = execs
        .iter()
        .find(|(r, _)| r.argv.iter().any(|a| a.contains("userdata-ran")))
        .expect("userdata ran");
    assert_eq!(run.uid, None, "as root");
    assert_eq!(run.env, vec![("TARGET_USER".to_string(), "ubuntu".to_string())]);
    assert_eq!(f.manager.record(&h).expect("record").userdata_exit_code, Some(0));

    let req = CreateNodeRequest {
        userdata: Some("#!/bin/sh\nexit 3\n".into()),
        ..request(false, &[])
    };
    match f.manager.create("t", req, Some(Wait::Userdata), T).await {
        Err(Error::UserdataFailed(m)) => {
            assert!(m.contains("exited with code 3"), "{m}");
            assert!(m.contains("userdata ran, exit 3"), "the log's tail: {m}");
        }
        other => panic!("not a userdata failure: {:?}", other.map(|c| c.hostname)),
    }
    assert_eq!(f.manager.records().expect("records").len(), 2, "the failed VM is kept");
}

#[tokio::test]
async fn the_groups_ca_is_installed_before_the_vm_is_ready() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let settings = super::ca_group_settings(dir.path());
    let bundle = settings.groups[0].ca_bundle().expect("a bundle");
    std::fs::create_dir_all(dir.path().join("data")).expect("the data directory");
    let backend = std::sync::Arc::new(super::FakeBackend::default());
    let m = super::manager_on(dir.path(), settings, backend.clone()).await;
    let h = m
        .create("t", request(false, &[]), Some(Wait::Agent), T)
        .await
        .expect("create")
        .hostname;
    let cas = backend.guest(&h).cas.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(cas, vec![bundle.to_string()]);
}
