//! The guest surface beyond exec and cp, through the API against a real daemon and guest:
//! the filesystem routes and the metrics.

mod common;

use common::{config_yaml, TestDaemon};
use http::Method;
use serde_json::json;
use slicer_api::client::full;
use slicer_api::routes;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn filesystem_routes() {
    let d = TestDaemon::start(|p| config_yaml("fsg", "", p)).await;
    let h = d.create_vm("fsg", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();

    let (s, v) = d
        .send_json(
            Method::POST,
            &routes::vm_fs_mkdir(&h),
            r#"{"path": "/srv/a/b", "recursive": true, "mode": "0750"}"#,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["name"].as_str(), v["type"].as_str(), v["mode"].as_str()),
        (Some("b"), Some("directory"), Some("0750"))
    );
    let (s, v) = d
        .send_json(Method::POST, &routes::vm_fs_mkdir(&h), r#"{"path": "/srv/a/b"}"#)
        .await;
    assert_eq!(s, 409, "exists: {v}");
    let (s, _) = d
        .send_json(Method::POST, &routes::vm_fs_mkdir(&h), r#"{"path": "/srv/x/y"}"#)
        .await;
    assert_eq!(s, 404, "missing parent without recursive");
    let (s, v) = d
        .send_json(
            Method::POST,
            &routes::vm_fs_mkdir(&h),
            r#"{"path": "/srv/z", "mode": "99"}"#,
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = d
        .send_json(
            Method::POST,
            &routes::vm_fs_mkdir(&h),
            r#"{"path": "/srv/z", "bogus": 1}"#,
        )
        .await;
    assert_eq!(s, 400, "{v}");

    let (s, _) = d
        .raw(
            &d.client(),
            Method::POST,
            &format!("{}?path=/srv/a/b/f.txt", routes::vm_cp(&h)),
            Some("application/octet-stream"),
            full("hello"),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = d.get(&format!("{}?path=/srv/a/b", routes::vm_fs_readdir(&h))).await;
    assert_eq!(s, 200, "{v}");
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["name"], "f.txt");
    assert_eq!(list[0]["type"], "file");
    assert_eq!(list[0]["size"], 5);
    let mtime = list[0]["mtime"].as_str().unwrap();
    let t = time::OffsetDateTime::parse(mtime, &time::format_description::well_known::Rfc3339).expect("RFC 3339 mtime");
    assert!(
        (time::OffsetDateTime::now_utc() - t).whole_seconds().abs() < 120,
        "{mtime}"
    );

    let (s, v) = d.get(&format!("{}?path=/srv/a", routes::vm_fs_stat(&h))).await;
    assert_eq!((s, v["type"].as_str()), (200, Some("directory")), "{v}");
    assert_eq!(
        d.get(&format!("{}?path=/srv/nope", routes::vm_fs_stat(&h))).await.0,
        404
    );
    assert_eq!(d.get(&format!("{}?path=relative", routes::vm_fs_stat(&h))).await.0, 400);
    assert_eq!(d.get(&routes::vm_fs_readdir(&h)).await.0, 400);
    assert_eq!(
        d.get(&format!("{}?path=/srv/a/b/f.txt", routes::vm_fs_readdir(&h)))
            .await
            .0,
        400
    );
    assert_eq!(
        d.get(&format!("{}?path=/", routes::vm_fs_readdir("nope-9"))).await.0,
        404
    );

    let (s, v) = d
        .send_json(Method::DELETE, &format!("{}?path=/srv/a", routes::vm_fs_remove(&h)), "")
        .await;
    assert_eq!(s, 409, "not empty: {v}");
    assert!(v["error"].as_str().unwrap().contains("recursive"), "{v}");
    assert_eq!(
        d.send_json(
            Method::DELETE,
            &format!("{}?path=/srv/a&recursive=yes", routes::vm_fs_remove(&h)),
            ""
        )
        .await
        .0,
        400
    );
    assert_eq!(
        d.send_json(Method::DELETE, &format!("{}?path=/", routes::vm_fs_remove(&h)), "")
            .await
            .0,
        400
    );
    let (s, v) = d
        .send_json(
            Method::DELETE,
            &format!("{}?path=/srv/a&recursive=true", routes::vm_fs_remove(&h)),
            "",
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(d.get(&format!("{}?path=/srv/a", routes::vm_fs_stat(&h))).await.0, 404);
    assert_eq!(
        d.send_json(Method::DELETE, &format!("{}?path=/srv/a", routes::vm_fs_remove(&h)), "")
            .await
            .0,
        404
    );

    // Paused: 409 until resumed.
    assert_eq!(d.send_json(Method::POST, &routes::vm_pause(&h), "").await.0, 200);
    assert_eq!(d.get(&format!("{}?path=/", routes::vm_fs_readdir(&h))).await.0, 409);
    assert_eq!(d.send_json(Method::POST, &routes::vm_resume(&h), "").await.0, 200);
    assert_eq!(d.get(&format!("{}?path=/", routes::vm_fs_readdir(&h))).await.0, 200);
}

/// The value of the sample `name` (with its labels, as exposed) in a metrics text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn metrics_move_when_vms_are_created() {
    let d = TestDaemon::start(|p| config_yaml("mtr", "", p)).await;
    let text = async |d: &TestDaemon| {
        let (s, b) = d
            .raw(&d.client(), Method::GET, "/metrics", None, slicer_api::client::empty())
            .await;
        assert_eq!(s, 200);
        String::from_utf8(b).unwrap()
    };
    let before = text(&d).await;
    assert_eq!(
        sample(&before, r#"slicer_vms_running{group="mtr"}"#),
        Some(0.0),
        "{before}"
    );
    assert_eq!(
        sample(&before, r#"slicer_vm_launches_total{group="mtr",mode="template"}"#),
        None
    );
    let h = d.create_vm("mtr", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let after = text(&d).await;
    assert_eq!(
        sample(&after, r#"slicer_vm_launches_total{group="mtr",mode="template"}"#),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, r#"slicer_vms_running{group="mtr"}"#),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"slicer_http_requests_total{method="POST",route="/hostgroup/{group}/nodes",status="201"}"#
        ),
        Some(1.0),
        "{after}"
    );
    assert!(
        after.contains(r#"slicer_vm_ready_duration_seconds_count{mode="template"} 1"#),
        "{after}"
    );
    // The route template is the label, never the path.
    assert!(!after.contains(&h), "{after}");
    assert_eq!(
        d.send_json(Method::DELETE, &routes::group_node("mtr", &h), "").await.0,
        200
    );
    let gone = text(&d).await;
    assert_eq!(sample(&gone, r#"slicer_vms_running{group="mtr"}"#), Some(0.0), "{gone}");
    // Without the token: 401, counted too.
    let (s, _) = d
        .raw(&d.anon(), Method::GET, "/metrics", None, slicer_api::client::empty())
        .await;
    assert_eq!(s, 401);
    let last = text(&d).await;
    assert_eq!(
        sample(
            &last,
            r#"slicer_http_requests_total{method="GET",route="/metrics",status="401"}"#
        ),
        Some(1.0),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn stats_are_measured_in_the_guest() {
    let d = TestDaemon::start(|p| config_yaml("sts", "", p)).await;
    let h = d.create_vm("sts", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = d.get(&routes::node_stats(&h)).await;
    assert_eq!(s, 200, "{v}");
    let one = &v.as_array().expect("an array")[0];
    assert_eq!(one["hostname"], h.as_str());
    assert_eq!(one["error"], "", "{v}");
    let snap = &one["snapshot"];
    assert_eq!(snap["hostname"], h.as_str());
    assert_eq!(snap["totalCpus"], 2, "{snap}");
    let mem = snap["totalMemory"].as_u64().unwrap();
    assert!(mem > 512 << 20 && mem <= 1 << 30, "{snap}");
    assert!(snap["memoryUsed"].as_u64().unwrap() > 0, "{snap}");
    assert!(snap["diskSpaceTotal"].as_u64().unwrap() > 500 << 20, "{snap}");
    assert!(snap["uptime"].as_str().unwrap().ends_with('s'), "{snap}");
    assert!(snap["timestamp"].as_str().unwrap().starts_with("20"), "{snap}");
    for k in [
        "loadAvg1",
        "diskReadTotal",
        "networkReadTotal",
        "diskIOInflight",
        "openFiles",
        "entropy",
    ] {
        assert!(snap.get(k).is_some(), "{k} missing: {snap}");
    }

    let (s, v) = d.get("/nodes/stats").await;
    assert_eq!(s, 200);
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["hostname"] == h.as_str() && n["snapshot"].is_object()));
    assert_eq!(d.get(&routes::node_stats("Bad_Name")).await.0, 400);
    assert_eq!(d.get(&routes::node_stats("nope-1")).await.0, 404);

    // A paused VM reports why it has no snapshot.
    assert_eq!(d.send_json(Method::POST, &routes::vm_pause(&h), "").await.0, 200);
    let (_, v) = d.get(&routes::node_stats(&h)).await;
    assert!(
        v[0]["snapshot"].is_null() && v[0]["error"].as_str().unwrap().contains("paused"),
        "{v}"
    );
    assert_eq!(d.send_json(Method::POST, &routes::vm_resume(&h), "").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn secrets_reach_the_guests_allowed_to_have_them() {
    use base64::Engine;
    use std::os::unix::fs::PermissionsExt;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let d = TestDaemon::start(|p| config_yaml("sec", "", p)).await;
    let body = json!({"name": "db-pass", "data": b64("s3cret"), "permissions": "0640", "uid": 1000, "gid": 1000});
    let (s, v) = d.send_json(Method::POST, "/secrets", &body.to_string()).await;
    assert_eq!(s, 201, "{v}");
    assert!(v.get("data").is_none());
    assert_eq!(d.send_json(Method::POST, "/secrets", &body.to_string()).await.0, 409);
    let bad = [
        json!({"name": "x", "data": "not base64!"}),
        json!({"name": "../x", "data": b64("a")}),
        json!({"name": "x", "data": b64("a"), "permissions": "9"}),
        json!({"name": "x", "data": b64("a"), "bogus": 1}),
    ];
    for b in bad {
        assert_eq!(
            d.send_json(Method::POST, "/secrets", &b.to_string()).await.0,
            400,
            "{b}"
        );
    }
    let (s, v) = d.get("/secrets").await;
    assert_eq!(s, 200);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(
        (v[0]["name"].as_str(), v[0]["size"].as_u64()),
        (Some("db-pass"), Some(6))
    );
    assert!(!v.to_string().contains("s3cret"));
    let mode = |p: &str| std::fs::metadata(d.dir.path().join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("data/secrets"), 0o700);
    assert_eq!(mode("data/secrets/values/db-pass"), 0o600);

    let all = d.create_vm("sec", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let none = d.create_vm("sec", json!({"secrets": ["other"]})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let show = "stat -c '%a %u %g' /run/slicer/secrets/db-pass && cat /run/slicer/secrets/db-pass";
    let out = |v: serde_json::Value| v["stdout"].as_str().unwrap_or_default().to_string();
    assert_eq!(out(d.sh(&all, show).await.1), "640 1000 1000\ns3cret");
    assert_ne!(
        d.sh(&none, show).await.1["exit_code"],
        0,
        "restricted VM has no db-pass"
    );

    // An update reaches the running VM; the restricted one still has nothing.
    let (s, v) = d
        .send_json(
            Method::PATCH,
            &routes::secret("db-pass"),
            &json!({"data": b64("n3w"), "permissions": "0600"}).to_string(),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(out(d.sh(&all, show).await.1), "600 1000 1000\nn3w");
    assert_ne!(d.sh(&none, show).await.1["exit_code"], 0);
    assert_eq!(
        d.send_json(Method::PATCH, &routes::secret("nope"), r#"{"data": ""}"#)
            .await
            .0,
        404
    );

    assert_eq!(d.send_json(Method::DELETE, &routes::secret("db-pass"), "").await.0, 200);
    assert_ne!(d.sh(&all, show).await.1["exit_code"], 0, "deleted from the guest");
    assert_eq!(d.send_json(Method::DELETE, &routes::secret("db-pass"), "").await.0, 404);
    assert_eq!(d.get("/secrets").await.1.as_array().unwrap().len(), 0);
}

/// A live fork continues its source's memory, /run/slicer/secrets included: before it reports
/// ready it holds only what its own scope allows (none for `"secrets": []`, the subset for a
/// list).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_live_fork_keeps_only_the_secrets_of_its_scope() {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let d = TestDaemon::start(|p| config_yaml("lfsec", "", p)).await;
    for name in ["a-key", "b-key"] {
        let body = json!({"name": name, "data": b64(name)});
        let (s, v) = d.send_json(Method::POST, "/secrets", &body.to_string()).await;
        assert_eq!(s, 201, "{v}");
    }
    let src = d.create_vm("lfsec", json!({"ram_bytes": 256u64 << 20})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let list = "ls /run/slicer/secrets 2>/dev/null | tr '\\n' ' '";
    let listed = |v: serde_json::Value| v["stdout"].as_str().unwrap_or_default().trim().to_string();
    assert_eq!(listed(d.sh(&src, list).await.1), "a-key b-key");
    let (s, c) = d
        .send_json(Method::POST, &routes::vm_commit(&src), r#"{"live": true}"#)
        .await;
    assert_eq!(s, 201, "{c}");
    let id = c["commit_id"].as_str().unwrap().to_string();
    let mut forks = Vec::new();
    for (scope, want) in [(json!([]), ""), (json!(["b-key"]), "b-key")] {
        let body = json!({"secrets": scope}).to_string();
        let (s, f) = d
            .send_json(
                Method::POST,
                &format!("{}?wait=agent&timeout=120s", routes::commit_fork(&id)),
                &body,
            )
            .await;
        assert_eq!(s, 201, "{f}");
        assert_eq!(f["mode"], "live", "{f}");
        let h = f["hostname"].as_str().unwrap().to_string();
        // At once: the answer came when the fork reported ready.
        assert_eq!(listed(d.sh(&h, list).await.1), want, "fork {h} with secrets {scope}");
        forks.push(h);
    }
    assert_eq!(
        listed(d.sh(&src, list).await.1),
        "a-key b-key",
        "the source keeps its own"
    );
    for h in forks.iter().chain([&src]) {
        let (s, v) = d.send_json(Method::DELETE, &routes::group_node("lfsec", h), "").await;
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = d.send_json(Method::DELETE, &routes::commit(&id), "").await;
    assert_eq!(s, 200, "{v}");
}

/// NDJSON lines of a finished logs answer.
async fn ndjson(d: &TestDaemon, path: &str) -> (u16, Vec<serde_json::Value>) {
    let (s, b) = d
        .raw(&d.client(), Method::GET, path, None, slicer_api::client::empty())
        .await;
    let lines = String::from_utf8_lossy(&b)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (s, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn background_exec_outlives_its_clients() {
    use http_body_util::BodyExt;
    let d = TestDaemon::start(|p| config_yaml("bgx", "", p)).await;
    let h = d.create_vm("bgx", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let q = slicer_api::client::query(&[
        (
            "cmd",
            "for i in 1 2 3 4 5 6; do echo line$i; sleep 0.3; done; echo oops >&2; exit 3".to_string(),
        ),
        ("background", "true".into()),
        ("shell", "/bin/bash".into()),
    ]);
    let (s, v) = d
        .send_json(Method::POST, &format!("{}?{q}", routes::vm_exec(&h)), "")
        .await;
    assert_eq!(s, 201, "{v}");
    let id = v["exec_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("ex_") && v["pid"].as_u64().unwrap() > 0, "{v}");
    assert!(v["started_at"].as_str().unwrap().starts_with("20"));

    // A follower that goes away after the first frame does not stop the process.
    let resp = d
        .client()
        .send(
            Method::GET,
            &format!("{}?follow=true", routes::vm_exec_logs(&h, &id)),
            None,
            slicer_api::client::empty(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("line1"), "{first:?}");
    drop(body);
    let (_, info) = d.get(&routes::vm_exec_id(&h, &id)).await;
    assert_eq!(info["running"], true, "{info}");

    let (s, w) = d
        .get(&format!("{}?timeout=30", routes::vm_exec_wait_exit(&h, &id)))
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        (
            w["running"].as_bool(),
            w["exit_code"].as_i64(),
            w["timed_out"].as_bool()
        ),
        (Some(false), Some(3), Some(false)),
        "{w}"
    );

    // Replay from an id: the rest of the output, then the exit.
    let (s, frames) = ndjson(&d, &format!("{}?from_id=2", routes::vm_exec_logs(&h, &id))).await;
    assert_eq!(s, 200);
    assert_eq!(frames.first().unwrap()["id"], 2);
    let text: String = frames
        .iter()
        .filter(|f| f["type"] == "stdout")
        .map(|f| f["data"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, "line3\nline4\nline5\nline6\n");
    assert!(frames.iter().any(|f| f["type"] == "stderr" && f["data"] == "oops\n"));
    let last = frames.last().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["exit_code"].as_i64()),
        (Some("exit"), Some(3)),
        "{last}"
    );
    let (_, b64) = ndjson(&d, &format!("{}?stdio=base64", routes::vm_exec_logs(&h, &id))).await;
    assert_eq!(b64[0]["encoding"], "base64");
    assert_eq!(b64[0]["data"], "bGluZTEK");

    let (_, list) = d.get(&routes::vm_exec(&h)).await;
    assert!(list.as_array().unwrap().iter().any(|e| e["exec_id"] == id.as_str()));

    // Reaped: 410 from then on.
    let (s, v) = d.send_json(Method::DELETE, &routes::vm_exec_id(&h, &id), "").await;
    assert_eq!((s, v["reaped"].as_bool()), (200, Some(true)), "{v}");
    assert_eq!(d.get(&routes::vm_exec_id(&h, &id)).await.0, 410);
    assert_eq!(d.get(&routes::vm_exec_logs(&h, &id)).await.0, 410);
    assert_eq!(d.get(&routes::vm_exec_wait_exit(&h, "ex_0000")).await.0, 404);
    assert_eq!(
        d.send_json(Method::DELETE, &routes::vm_exec_id(&h, &id), "").await.0,
        410
    );
    assert_eq!(d.get(&routes::vm_exec("nope-1")).await.0, 404);
    assert_eq!(d.get(&routes::vm_exec_id(&h, "../x")).await.0, 404);

    // Kill: TERM reaches the process group.
    let q = slicer_api::client::query(&[
        ("cmd", "sleep".to_string()),
        ("args", "300".into()),
        ("background", "true".into()),
    ]);
    let (_, v) = d
        .send_json(Method::POST, &format!("{}?{q}", routes::vm_exec(&h)), "")
        .await;
    let id = v["exec_id"].as_str().unwrap().to_string();
    let (s, _) = d
        .send_json(Method::POST, &routes::vm_exec_kill(&h, &id), r#"{"signal": "BOGUS"}"#)
        .await;
    assert_eq!(s, 400);
    let (s, k) = d
        .send_json(
            Method::POST,
            &routes::vm_exec_kill(&h, &id),
            r#"{"signal": "TERM", "grace_ms": 2000}"#,
        )
        .await;
    assert_eq!(
        (s, k["signal_sent"].as_str(), k["running"].as_bool()),
        (200, Some("TERM"), Some(true)),
        "{k}"
    );
    let (_, w) = d
        .get(&format!("{}?timeout=10", routes::vm_exec_wait_exit(&h, &id)))
        .await;
    assert_eq!(
        (w["running"].as_bool(), w["signal"].as_str()),
        (Some(false), Some("SIGTERM")),
        "{w}"
    );

    // A small ring drops the oldest output and says so.
    let q = slicer_api::client::query(&[
        ("cmd", "head -c 40000 /dev/zero | tr '\\0' a".to_string()),
        ("background", "true".into()),
        ("shell", "/bin/sh".into()),
        ("ring_bytes", "4096".into()),
    ]);
    let (s, v) = d
        .send_json(Method::POST, &format!("{}?{q}", routes::vm_exec(&h)), "")
        .await;
    assert_eq!(s, 201, "{v}");
    let id = v["exec_id"].as_str().unwrap().to_string();
    d.get(&format!("{}?timeout=30", routes::vm_exec_wait_exit(&h, &id)))
        .await;
    let (_, frames) = ndjson(&d, &routes::vm_exec_logs(&h, &id)).await;
    assert_eq!(frames[0]["type"], "gap", "{:?}", frames.first());
    assert!(frames[0]["dropped_frames"].as_u64().unwrap() > 0);
    assert_eq!(frames.last().unwrap()["type"], "exit");

    // Bad combinations.
    let q = slicer_api::client::query(&[
        ("cmd", "true".to_string()),
        ("background", "true".into()),
        ("buffered", "true".into()),
    ]);
    assert_eq!(
        d.send_json(Method::POST, &format!("{}?{q}", routes::vm_exec(&h)), "")
            .await
            .0,
        400
    );
    let q = slicer_api::client::query(&[
        ("cmd", "true".to_string()),
        ("background", "true".into()),
        ("ring_bytes", "1".into()),
    ]);
    assert_eq!(
        d.send_json(Method::POST, &format!("{}?{q}", routes::vm_exec(&h)), "")
            .await
            .0,
        400
    );
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to the daemon: the socket, or the HTTP status it answered instead.
async fn ws(d: &TestDaemon, path: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}{path}", d.url.replace("http://", "ws://"));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", d.token).parse().unwrap());
    for (k, v) in headers {
        let name = http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((s, _)) => Ok(s),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("websocket {path}: {e}"),
    }
}

fn shell_frame(kind: u8, payload: &[u8]) -> tokio_tungstenite::tungstenite::Message {
    let mut v = vec![kind];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    tokio_tungstenite::tungstenite::Message::Binary(v.into())
}

/// Reads shell output until `want` appears (or the deadline); the output so far.
async fn shell_until(s: &mut Ws, want: &str) -> String {
    use futures_util::StreamExt;
    let mut out = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !out.contains(want) {
        let msg = tokio::time::timeout_at(deadline, s.next())
            .await
            .unwrap_or_else(|_| panic!("no {want:?} in {out:?}"))
            .expect("session open")
            .expect("message");
        let b = msg.into_data();
        if b.len() >= 5 && b[0] == 0x01 {
            out.push_str(&String::from_utf8_lossy(&b[5..]));
        } else if b.first() == Some(&0x05) {
            out.push_str("<closed>");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn shell_is_a_real_pty_and_forward_reaches_guest_sockets() {
    use futures_util::{SinkExt, StreamExt};
    let d = TestDaemon::start(|p| config_yaml("wsk", "", p)).await;
    let h = d.create_vm("wsk", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();

    // Shell: a PTY, resizable, ends with a close frame. (Markers are computed so that the
    // terminal's echo of the typed line does not match them.)
    let mut s = ws(&d, &routes::vm_shell(&h), &[]).await.expect("shell upgrade");
    let size = |c: u32, r: u32| {
        let mut p = c.to_be_bytes().to_vec();
        p.extend_from_slice(&r.to_be_bytes());
        shell_frame(0x02, &p)
    };
    s.send(size(80, 24)).await.unwrap();
    s.send(shell_frame(0x01, b"tty; stty size; echo READY$((0+1))\n"))
        .await
        .unwrap();
    let out = shell_until(&mut s, "READY1\r\n").await;
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("24 80"), "{out}");
    s.send(size(132, 43)).await.unwrap();
    s.send(shell_frame(0x01, b"stty size; echo READY$((1+1))\n"))
        .await
        .unwrap();
    let out = shell_until(&mut s, "READY2\r\n").await;
    assert!(out.contains("43 132"), "{out}");
    s.send(shell_frame(0x01, b"exit 7\n")).await.unwrap();
    shell_until(&mut s, "<closed>").await;
    assert_eq!(ws(&d, &routes::vm_shell("nope-1"), &[]).await.err(), Some(404));
    assert_eq!(
        ws(&d, &format!("{}?shell=bash", routes::vm_shell(&h)), &[]).await.err(),
        Some(400)
    );

    // Forward: an echo server on TCP and one on a UNIX socket in the guest.
    let server = |listen: &str| {
        format!(
            "perl -MIO::Socket::INET -MIO::Socket::UNIX -e '$s={listen} or die $!; while($c=$s->accept){{while(<$c>){{print $c \"echo:$_\"; $c->flush}} close $c}}'"
        )
    };
    for (listen, target) in [
        (
            r#"IO::Socket::INET->new(LocalAddr=>"127.0.0.1:7000",Listen=>5,ReuseAddr=>1)"#,
            "127.0.0.1:7000",
        ),
        (
            r#"IO::Socket::UNIX->new(Local=>"/tmp/echo.sock",Listen=>5)"#,
            "unix:/tmp/echo.sock",
        ),
    ] {
        let q = slicer_api::client::query(&[
            ("cmd", server(listen)),
            ("background", "true".into()),
            ("shell", "/bin/sh".into()),
        ]);
        let (st, v) = d
            .send_json(Method::POST, &format!("{}?{q}", routes::vm_exec(&h)), "")
            .await;
        assert_eq!(st, 201, "{v}");
        // Until the server listens the agent answers 502.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut sock = loop {
            match ws(&d, &routes::vm_forward(&h), &[("x-inlets-upstream", target)]).await {
                Ok(s) => break s,
                Err(502) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
                Err(e) => panic!("forward to {target}: {e}"),
            }
        };
        sock.send(tokio_tungstenite::tungstenite::Message::Binary(
            b"hello\n".to_vec().into(),
        ))
        .await
        .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"\n") {
            let m = tokio::time::timeout(std::time::Duration::from_secs(10), sock.next())
                .await
                .expect("an answer")
                .unwrap()
                .unwrap();
            got.extend_from_slice(&m.into_data());
        }
        assert_eq!(got, b"echo:hello\n", "{target}");
    }
    assert_eq!(ws(&d, &routes::vm_forward(&h), &[]).await.err(), Some(400));
    assert_eq!(
        ws(&d, &routes::vm_forward(&h), &[("x-inlets-upstream", "127.0.0.1:1")])
            .await
            .err(),
        Some(502)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn watch_reports_changes_as_server_sent_events() {
    use http_body_util::BodyExt;
    let d = TestDaemon::start(|p| config_yaml("wch", "", p)).await;
    let h = d.create_vm("wch", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(d.sh(&h, "mkdir -p /tmp/w/sub").await.0, 200);
    assert_eq!(d.get(&routes::vm_fs_watch(&h)).await.0, 400, "paths is required");
    assert_eq!(
        d.get(&format!("{}?paths=/tmp/w&events=bogus", routes::vm_fs_watch(&h)))
            .await
            .0,
        400
    );
    assert_eq!(
        d.get(&format!("{}?paths=/tmp/nope", routes::vm_fs_watch(&h))).await.0,
        404
    );
    // A timeout past what the clock holds is no deadline (it overflowed a handler once).
    let far = d
        .client()
        .send(
            Method::GET,
            &format!("{}?paths=/tmp/w&timeout=9000000000000000000s", routes::vm_fs_watch(&h)),
            None,
            slicer_api::client::empty(),
        )
        .await
        .unwrap();
    assert_eq!(far.status(), 200);
    drop(far);

    let resp = d
        .client()
        .send(
            Method::GET,
            // A 5 s debounce: `: >` (close) and `echo >` (truncate, write, close) each report
            // writes, which the default 200 ms merges only when the guest is not slowed down.
            &format!(
                "{}?paths=/tmp/w&recursive=true&patterns=*.txt&max_events=3&debounce=5s",
                routes::vm_fs_watch(&h)
            ),
            None,
            slicer_api::client::empty(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut pending = String::new();
    let mut next_event = async || -> serde_json::Value {
        loop {
            if let Some(end) = pending.find("\n\n") {
                let block: String = pending.drain(..end + 2).collect();
                if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                    assert!(block.contains("event: watch"), "{block}");
                    return serde_json::from_str(data).unwrap();
                }
                continue; // a heartbeat
            }
            let f = tokio::time::timeout(std::time::Duration::from_secs(1), body.frame())
                .await
                .expect("an event within 1 s")
                .expect("stream open")
                .unwrap();
            if let Ok(b) = f.into_data() {
                pending.push_str(&String::from_utf8_lossy(&b));
            }
        }
    };
    // Not a .txt: filtered out. Then create, write and remove of a .txt in a subdirectory.
    d.sh(&h, "touch /tmp/w/skip.log; : > /tmp/w/sub/a.txt").await;
    let e = next_event().await;
    assert_eq!(
        (e["type"].as_str(), e["path"].as_str()),
        (Some("create"), Some("/tmp/w/sub/a.txt")),
        "{e}"
    );
    assert_eq!(e["isDir"], false);
    assert!(e["timestamp"].as_str().unwrap().starts_with("20"));
    d.sh(&h, "echo hello > /tmp/w/sub/a.txt").await;
    let e = next_event().await;
    assert_eq!(
        (e["type"].as_str(), e["path"].as_str()),
        (Some("write"), Some("/tmp/w/sub/a.txt")),
        "{e}"
    );
    d.sh(&h, "rm /tmp/w/sub/a.txt").await;
    let e = next_event().await;
    assert_eq!((e["type"].as_str(), e["id"].as_u64()), (Some("remove"), Some(3)), "{e}");
    // max_events=3: the stream ends.
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
        .await
        .unwrap();
    assert!(end.is_none(), "the stream ends after max_events");
}
