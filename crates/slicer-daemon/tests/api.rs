//! The REST API against a real daemon, real QEMU guests, the real agent and SQLite.

mod common;

use slicer_api::routes;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{config_yaml, no_qemu_for, TestDaemon};
use http::Method;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use slicer_api::client::{empty, full};

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    k.sort();
    k
}

fn sorted(k: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = k.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

const NODE_KEYS: &[&str] = &[
    "hostname",
    "hostgroup",
    "ip",
    "ram_bytes",
    "cpus",
    "created_at",
    "arch",
    "tags",
    "status",
    "persistent",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn every_route_succeeds_and_fails_as_documented() {
    let mut d = TestDaemon::start(|port| config_yaml("sb", "", port)).await;
    let c = d.client();

    // healthz needs no token; info does.
    let (s, b) = d.raw(&d.anon(), Method::GET, "/healthz", None, empty()).await;
    assert_eq!(
        (s, serde_json::from_slice::<Value>(&b).unwrap()),
        (200, json!({"status": "ok"}))
    );
    let (s, _) = d.raw(&d.anon(), Method::HEAD, "/healthz", None, empty()).await;
    assert_eq!(s, 200);
    let (s, v) = d.get("/info").await;
    assert_eq!(s, 200);
    assert_eq!(keys(&v), sorted(&["version", "git_commit", "platform", "arch"]));
    let (s, b) = d.raw(&d.anon(), Method::GET, "/info", None, empty()).await;
    assert_eq!(s, 401);
    assert!(serde_json::from_slice::<Value>(&b).unwrap()["error"].is_string());

    let (s, v) = d.get("/hostgroup").await;
    assert_eq!(s, 200);
    // SlicerVM's keys, and `image` (a slicer extension: MCP's create_sandbox picks a group by it).
    assert_eq!(
        keys(&v[0]),
        sorted(&["name", "count", "ram_bytes", "cpus", "arch", "gpu_count", "image"])
    );
    assert_eq!((v[0]["name"].as_str(), v[0]["cpus"].as_u64()), (Some("sb"), Some(2)));
    assert!(v[0]["image"].as_str().is_some_and(|i| !i.is_empty()), "{v}");

    // Creating: failures first, nothing is created by them.
    for (path, body, status) in [
        (&routes::group_nodes("nope"), "{}", 404),
        (&routes::group_nodes("sb"), "{\"cpus\": 3}", 400),
        (&routes::group_nodes("sb"), "{\"ram_bytes\": 9999999999999}", 400),
        (&routes::group_nodes("sb"), "{\"tags\": [", 400),
        (&routes::group_nodes("sb"), "{\"cpu\": 1}", 400),
        (&format!("{}?wait=forever", routes::group_nodes("sb")), "{}", 400),
        (
            &format!("{}?wait=agent&timeout=soon", routes::group_nodes("sb")),
            "{}",
            400,
        ),
    ] {
        let (s, v) = d.send_json(Method::POST, path, body).await;
        assert_eq!(s, status, "{path} {body}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    let big = format!("{{\"userdata\": \"{}\"}}", "x".repeat(2 << 20));
    let (s, _) = d.send_json(Method::POST, &routes::group_nodes("sb"), &big).await;
    assert_eq!(s, 413);
    assert_eq!(d.get("/nodes").await, (200, json!([])));

    let (s, v) = d
        .send_json(
            Method::POST,
            &format!("{}?wait=agent&timeout=3m", routes::group_nodes("sb")),
            r#"{"tags":["user=alice","job=convert-video-123"],"cpus":1,"ram_bytes":536870912}"#,
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        keys(&v),
        sorted(&["hostname", "hostgroup", "ip", "created_at", "arch", "persistent"])
    );
    let h = v["hostname"].as_str().unwrap().to_string();
    assert_eq!(h, "sb-1");
    // A VM's arch is GOARCH's name wherever it appears, as SlicerVM's create answer writes it.
    assert_eq!(v["arch"], "amd64");
    assert!(time::OffsetDateTime::parse(
        v["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339
    )
    .is_ok());

    // Listing and filters.
    let (s, v) = d.get("/nodes").await;
    assert_eq!(s, 200);
    assert_eq!(keys(&v[0]), sorted(NODE_KEYS));
    assert_eq!(v[0]["status"], "Running");
    assert_eq!(v[0]["arch"], "amd64", "the list's arch is the create answer's");
    assert_eq!(v[0]["tags"], json!(["user=alice", "job=convert-video-123"]));
    assert_eq!(
        (v[0]["cpus"].as_u64(), v[0]["ram_bytes"].as_u64()),
        (Some(1), Some(536870912))
    );
    assert_eq!(d.get("/nodes?tag=user=alice").await.1.as_array().unwrap().len(), 1);
    assert_eq!(d.get("/nodes?tag=user=bob").await.1, json!([]));
    assert_eq!(d.get("/nodes?tag_prefix=job=").await.1.as_array().unwrap().len(), 1);
    assert_eq!(d.get("/nodes?tag=a&tag_prefix=b").await.0, 400);
    assert_eq!(d.get(&routes::group_nodes("sb")).await.1.as_array().unwrap().len(), 1);
    assert_eq!(d.get(&routes::group_nodes("nope")).await.0, 404);

    let (s, v) = d.get(&routes::vm(&h)).await;
    assert_eq!(s, 200);
    assert!(keys(&v).iter().any(|k| k == "network") && v["hostname"] == h.as_str());
    assert_eq!(d.get(&routes::vm("sb-99")).await.0, 404);

    // Tags.
    assert_eq!(
        d.get(&routes::vm_tags(&h)).await.1,
        json!({"hostname": h, "tags": ["user=alice", "job=convert-video-123"]})
    );
    let (s, v) = d
        .send_json(
            Method::PATCH,
            &routes::vm_tags(&h),
            r#"{"add":["x=1"],"remove":["user=alice"]}"#,
        )
        .await;
    assert_eq!((s, v["tags"].clone()), (200, json!(["job=convert-video-123", "x=1"])));
    let (s, v) = d
        .send_json(Method::PATCH, &routes::vm_tags(&h), r#"{"replace":["only=1"]}"#)
        .await;
    assert_eq!((s, v["tags"].clone()), (200, json!(["only=1"])));
    assert_eq!(
        d.send_json(Method::PATCH, &routes::vm_tags(&h), r#"{"replace":[],"add":["a"]}"#)
            .await
            .0,
        400
    );
    assert_eq!(
        d.send_json(Method::PATCH, &routes::vm_tags("sb-99"), r#"{"add":["a"]}"#)
            .await
            .0,
        404
    );

    // Exec: streaming, buffered, stdin, failures.
    let (s, b) = d
        .raw(
            &c,
            Method::POST,
            &format!(
                "{}?cmd=sh&args=-c&args=echo%20out;%20echo%20err%20%3E%262;%20exit%203&shell=",
                routes::vm_exec(&h)
            ),
            None,
            empty(),
        )
        .await;
    assert_eq!(s, 200);
    let frames: Vec<Value> = b
        .split(|x| *x == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(frames.first().unwrap()["type"], "started");
    let last = frames.last().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["exit_code"].as_i64()),
        (Some("exit"), Some(3))
    );
    let text = |t: &str| {
        frames
            .iter()
            .filter(|f| f["type"] == t)
            .map(|f| f["data"].as_str().unwrap().to_string())
            .collect::<String>()
    };
    assert_eq!(
        (text("stdout"), text("stderr")),
        ("out\n".to_string(), "err\n".to_string())
    );
    let (s, v) = d
        .send_json(
            Method::POST,
            &format!("{}?cmd=echo%20hi%20$HOME&buffered=true", routes::vm_exec(&h)),
            "",
        )
        .await;
    assert_eq!(
        (s, v["stdout"].as_str(), v["exit_code"].as_i64()),
        (200, Some("hi /home/ubuntu\n"), Some(0))
    );
    let (s, b) = d
        .raw(
            &c,
            Method::POST,
            &format!("{}?cmd=wc&args=-c&stdin=true&shell=&stdio=base64", routes::vm_exec(&h)),
            None,
            full("12345"),
        )
        .await;
    assert_eq!(s, 200);
    assert!(
        String::from_utf8_lossy(&b).contains("\"data\":\"NQo=\""),
        "{}",
        String::from_utf8_lossy(&b)
    );
    let (s, b) = d
        .raw(
            &c,
            Method::POST,
            &format!("{}?cmd=/nope&shell=", routes::vm_exec(&h)),
            None,
            empty(),
        )
        .await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_slice(b.split(|x| *x == b'\n').next().unwrap()).unwrap();
    assert!(v["error"].as_str().unwrap().contains("executable not found"), "{v}");
    assert_eq!(v["exit_code"], 1);
    assert_eq!(d.send_json(Method::POST, &routes::vm_exec(&h), "").await.0, 400);
    assert_eq!(
        d.send_json(Method::POST, &format!("{}?cmd=true&stdio=hex", routes::vm_exec(&h)), "")
            .await
            .0,
        400
    );
    assert_eq!(
        d.send_json(Method::POST, &format!("{}?cmd=true", routes::vm_exec("sb-99")), "")
            .await
            .0,
        404
    );

    // cp: 32 MiB both ways, tar for a directory, failures.
    let data: Vec<u8> = (0..32 << 20).map(|_| rand::random::<u8>()).collect();
    let (s, v) = d
        .raw(
            &c,
            Method::POST,
            &format!("{}?path=/root/big.bin&permissions=0640", routes::vm_cp(&h)),
            Some("application/octet-stream"),
            full(data.clone()),
        )
        .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&v));
    let resp = c
        .send(
            Method::GET,
            &format!("{}?path=/root/big.bin", routes::vm_cp(&h)),
            None,
            empty(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-slicer-file-mode"], "0640");
    let back = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(hex::encode(Sha256::digest(&back)), hex::encode(Sha256::digest(&data)));
    let mut tb = tar::Builder::new(Vec::new());
    let mut hdr = tar::Header::new_gnu();
    hdr.set_size(5);
    hdr.set_mode(0o755);
    hdr.set_cksum();
    tb.append_data(&mut hdr, "bin/tool", &b"#!/x\n"[..]).unwrap();
    let tar_in = tb.into_inner().unwrap();
    let (s, b) = d
        .raw(
            &c,
            Method::POST,
            &format!("{}?path=/opt/app&mode=tar", routes::vm_cp(&h)),
            Some("application/x-tar"),
            full(tar_in),
        )
        .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let (s, tar_out) = d
        .raw(
            &c,
            Method::GET,
            &format!("{}?path=/opt/app&mode=tar", routes::vm_cp(&h)),
            None,
            empty(),
        )
        .await;
    assert_eq!(s, 200);
    let mut names: Vec<(String, u32)> = tar::Archive::new(tar_out.as_slice())
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path().unwrap().to_string_lossy().trim_end_matches('/').to_string(),
                e.header().mode().unwrap() & 0o777,
            )
        })
        .collect();
    names.sort();
    assert_eq!(names.last().unwrap(), &("bin/tool".to_string(), 0o755));
    assert_eq!(d.get(&format!("{}?path=/nope", routes::vm_cp(&h))).await.0, 404);
    assert_eq!(d.get(&routes::vm_cp(&h)).await.0, 400);
    assert_eq!(d.get(&format!("{}?path=/tmp&mode=zip", routes::vm_cp(&h))).await.0, 400);

    // Logs and health.
    let (s, v) = d.get(&format!("{}?lines=5", routes::vm_logs(&h))).await;
    assert_eq!(s, 200);
    assert_eq!(keys(&v), sorted(&["hostname", "lines", "content"]));
    assert!(v["content"].as_str().unwrap().contains("slicer-agent"), "{v}");
    assert_eq!(d.get(&format!("{}?lines=many", routes::vm_logs(&h))).await.0, 400);
    let (s, v) = d.get(&routes::vm_health(&h)).await;
    assert_eq!(s, 200);
    assert!(
        v["agent_uptime"].as_i64().unwrap() > 0 && v["userdata_ran"] == true,
        "{v}"
    );
    assert_eq!(
        d.raw(&c, Method::HEAD, &routes::vm_health(&h), None, empty()).await.0,
        200
    );
    assert_eq!(d.get(&routes::vm_health("sb-99")).await.0, 404);

    // Every route but /healthz needs the token.
    for (m, p) in slicer_daemon::api::methods() {
        if p == "/healthz" {
            continue;
        }
        let path = p.replace("{group}", "sb").replace("{hostname}", &h);
        for client in [
            d.anon(),
            slicer_api::ApiClient::new(&d.url, Some("wrong".into())).unwrap(),
        ] {
            let (s, _) = d.raw(&client, m.clone(), &path, None, empty()).await;
            assert_eq!(s, 401, "{m} {path}");
        }
    }
    let tf = d.dir.path().join("data/auth/token");
    assert_eq!(std::fs::metadata(&tf).unwrap().permissions().mode() & 0o777, 0o600);

    // Shutdown and delete.
    assert_eq!(
        d.send_json(Method::POST, &format!("{}?action=halt", routes::vm_shutdown(&h)), "")
            .await
            .0,
        400
    );
    assert_eq!(
        d.send_json(Method::POST, &routes::vm_shutdown("sb-99"), "").await.0,
        404
    );
    assert_eq!(
        d.send_json(Method::DELETE, &routes::group_node("other", &h), "")
            .await
            .0,
        404
    );
    let (s, v) = d.send_json(Method::DELETE, &routes::group_node("sb", &h), "").await;
    assert_eq!(
        (s, v.clone()),
        (
            200,
            json!({"message": "VM deleted successfully", "disk_removed": "true", "error": ""})
        )
    );
    assert_eq!(
        d.send_json(Method::DELETE, &routes::group_node("sb", &h), "").await.0,
        404
    );
    assert!(no_qemu_for(&h));
    assert!(!d.dir.path().join("data/vms").join(&h).exists());

    // An ephemeral VM shut down from the API is gone.
    let (_, v) = d
        .send_json(Method::POST, &format!("{}?wait=agent", routes::group_nodes("sb")), "{}")
        .await;
    let h2 = v["hostname"].as_str().unwrap().to_string();
    assert_eq!(h2, "sb-2", "hostnames are never reused");
    let (s, _) = d
        .send_json(
            Method::POST,
            &format!("{}?action=shutdown", routes::vm_shutdown(&h2)),
            "",
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(d.get("/nodes").await.1, json!([]));
    assert!(no_qemu_for(&h2));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn ten_concurrent_creates_get_distinct_hostnames() {
    let mut d = TestDaemon::start(|port| config_yaml("burst", "", port)).await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let c = d.client();
        tasks.push(tokio::spawn(async move {
            let v: Value = c
                .json(
                    Method::POST,
                    &format!("{}?wait=agent&timeout=5m", routes::group_nodes("burst")),
                    Some(&json!({"tags": [format!("n={i}")], "ram_bytes": 268435456, "cpus": 1})),
                )
                .await
                .unwrap();
            v["hostname"].as_str().unwrap().to_string()
        }));
    }
    let mut names = Vec::new();
    for t in tasks {
        names.push(t.await.unwrap());
    }
    let mut uniq = names.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 10, "{names:?}");
    let (_, v) = d.get("/nodes").await;
    let nodes = v.as_array().unwrap();
    assert_eq!(nodes.len(), 10);
    assert!(nodes.iter().all(|n| n["status"] == "Running"));
    for n in &names {
        let (s, v) = d.send_json(Method::DELETE, &routes::group_node("burst", n), "").await;
        assert_eq!((s, v["disk_removed"].as_str()), (200, Some("true")));
        assert!(no_qemu_for(n));
    }
    assert_eq!(d.get("/nodes").await.1, json!([]));
    assert_eq!(std::fs::read_dir(d.dir.path().join("data/vms")).unwrap().count(), 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn exec_output_streams_before_the_exit() {
    let mut d = TestDaemon::start(|port| config_yaml("st", "", port)).await;
    let (_, v) = d
        .send_json(Method::POST, &format!("{}?wait=agent", routes::group_nodes("st")), "{}")
        .await;
    let h = v["hostname"].as_str().unwrap().to_string();
    let c = d.client();
    let t0 = Instant::now();
    let resp = c
        .send(
            Method::POST,
            &format!(
                "{}?cmd=for%20i%20in%201%202%203%204%205%206%207%208%209%2010;%20do%20echo%20$i;%20sleep%200.2;%20done",
                routes::vm_exec(&h)
            ),
            None,
            empty(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let (mut first_stdout, mut exit) = (None, None);
    let mut buf = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(data) = f.unwrap().into_data() {
            buf.extend_from_slice(&data);
        }
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let v: Value = serde_json::from_slice(&line).unwrap();
            match v["type"].as_str() {
                Some("stdout") if first_stdout.is_none() => first_stdout = Some(t0.elapsed()),
                Some("exit") => exit = Some(t0.elapsed()),
                _ => {}
            }
        }
    }
    let (first, exit) = (first_stdout.unwrap(), exit.unwrap());
    assert!(exit >= Duration::from_millis(1800), "{exit:?}");
    assert!(
        first + Duration::from_millis(1200) < exit,
        "first stdout at {first:?}, exit at {exit:?}"
    );
    d.stop().await;
    assert!(no_qemu_for(&h));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn restart_keeps_persistent_vms_and_tags() {
    let mut d = TestDaemon::start(|port| {
        format!(
            "config:\n  host_groups:\n  - name: keep\n    count: 1\n    vcpu: 1\n    ram_mb: 256\n    network: {{mode: none}}\n  graceful_shutdown: true\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    // The count VM is protected.
    let (s, _) = d
        .send_json(Method::DELETE, &routes::group_node("keep", "keep-1"), "")
        .await;
    assert_eq!(s, 403);
    let (s, v) = d
        .send_json(
            Method::POST,
            &format!("{}?wait=agent", routes::group_nodes("keep")),
            r#"{"persistent":true,"tags":["owner=team-a"]}"#,
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let p = v["hostname"].as_str().unwrap().to_string();
    let (_, v) = d
        .send_json(
            Method::POST,
            &format!("{}?wait=agent", routes::group_nodes("keep")),
            r#"{"tags":["tmp"]}"#,
        )
        .await;
    let e = v["hostname"].as_str().unwrap().to_string();
    let c = d.client();
    let (s, _) = d
        .raw(
            &c,
            Method::POST,
            &format!("{}?path=/root/note", routes::vm_cp(&p)),
            None,
            full("kept"),
        )
        .await;
    assert_eq!(s, 200);

    d.stop().await;
    assert!(no_qemu_for(&p) && no_qemu_for(&e) && no_qemu_for("keep-1"));
    d.restart().await;

    let (_, v) = d.get("/nodes").await;
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["hostname"].as_str().unwrap())
        .collect();
    assert!(names.contains(&p.as_str()) && names.contains(&"keep-1"), "{names:?}");
    assert!(
        !names.contains(&e.as_str()),
        "ephemeral VMs go with the daemon: {names:?}"
    );
    let pv = v
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["hostname"] == p.as_str())
        .unwrap();
    assert_eq!(pv["tags"], json!(["owner=team-a"]));
    assert_eq!(pv["status"], "Stopped");
    assert!(d.dir.path().join("data/vms").join(&p).join("disk.qcow2").exists());
    // The count VM came back.
    let kv = v
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["hostname"] == "keep-1")
        .unwrap();
    assert_eq!(kv["status"], "Running");
    let (s, v) = d.send_json(Method::DELETE, &routes::group_node("keep", &p), "").await;
    assert_eq!((s, v["disk_removed"].as_str()), (200, Some("true")));
    d.stop().await;
    assert!(no_qemu_for("keep-1"));
}
