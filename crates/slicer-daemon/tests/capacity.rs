//! The host's capacity budget, one operation at a time per VM, and secrets that a stuck guest
//! cannot hold up: against a real daemon and real guests.

mod common;

use slicer_api::routes;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{no_qemu_for, TestDaemon};
use http::Method;
use serde_json::json;

/// An isolated host group `group` in `range` with `extra` group keys, and `top` config keys.
fn cfg(group: &str, range: &str, extra: &str, top: &str, port: u16) -> String {
    format!(
        "config:\n  host_groups:\n  - name: {group}\n    count: 0\n    vcpu: 1\n    ram_mb: 512\n    network: {{mode: isolated, range: {range}{extra}}}\n{top}  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
    )
}

fn out(args: &[&str]) -> String {
    String::from_utf8_lossy(&Command::new(args[0]).args(&args[1..]).output().unwrap().stdout).into_owned()
}

/// Network namespaces and nftables tables of the VMs of `group`.
fn net_objects(group: &str) -> Vec<String> {
    let prefix = format!("slicer-{group}-");
    let mut v: Vec<String> = out(&["ip", "netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(|n| format!("netns {n}"))
        .collect();
    v.extend(
        out(&["nft", "list", "tables"])
            .lines()
            .filter_map(|l| l.strip_prefix("table inet "))
            .filter(|t| t.starts_with(&prefix))
            .map(|t| format!("table {t}")),
    );
    v.sort();
    v
}

/// QEMU processes of VM `hostname` (by `-name slicer-<hostname>`).
fn qemus_of(hostname: &str) -> usize {
    slicer_testkit::qemu::of(hostname).len()
}

/// What is left of VM `hostname` in `group`: its QEMU, namespace, table, directory, record.
async fn left_of(d: &TestDaemon, group: &str, hostname: &str) -> Vec<String> {
    let mut left = Vec::new();
    if !no_qemu_for(hostname) {
        left.push("QEMU".to_string());
    }
    let ns = format!("slicer-{hostname}");
    left.extend(
        net_objects(group)
            .into_iter()
            .filter(|o| o.ends_with(&format!(" {ns}"))),
    );
    if d.dir.path().join("data/vms").join(hostname).exists() {
        left.push("VM directory".into());
    }
    let (s, v) = d.get(&routes::vm(hostname)).await;
    if s != 404 {
        left.push(format!("record ({s} {v})"));
    }
    left
}

/// Waits until nothing of `hostname` is left (10 s at most).
async fn assert_gone(d: &TestDaemon, group: &str, hostname: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = left_of(d, group, hostname).await;
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{hostname}: left behind: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(d: &TestDaemon) -> String {
    let (s, b) = d
        .raw(&d.client(), Method::GET, "/metrics", None, slicer_api::client::empty())
        .await;
    assert_eq!(s, 200);
    String::from_utf8(b).unwrap()
}

/// The value of sample `name` (labels included, as exposed).
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

async fn create(d: &TestDaemon, group: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    d.send_json(
        Method::POST,
        &format!("{}?wait=agent", routes::group_nodes(group)),
        &body.to_string(),
    )
    .await
}

async fn echo_ok(d: &TestDaemon, vm: &str) {
    let (s, v) = d.sh(vm, "echo ok").await;
    assert_eq!((s, v["stdout"].as_str()), (200, Some("ok\n")), "exec in {vm}: {v}");
}

const MIB: u64 = 1 << 20;

/// With measured accounting (the default) running VMs count what their cgroups are charged:
/// a budget that holds two idle 256 MiB VMs nominally (and their template's memory, which the
/// daemon holds) admits a third once they are measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn measured_vms_leave_room_for_more() {
    let nominal = 256 * MIB + slicer_vmm::vm_overhead_bytes(256 * MIB);
    let template = 256 * MIB;
    let budget = 2 * nominal + template + 64 * MIB;
    let top = format!("  capacity: {{ram_bytes: {budget}, vms: 8, vcpus: 8}}\n");
    let mut d = TestDaemon::start(|p| cfg("mea", "169.254.224.0/22", "", &top, p)).await;
    let small = json!({"ram_bytes": 256 * MIB});
    let mut made = Vec::new();
    for _ in 0..2 {
        let (s, v) = create(&d, "mea", small.clone()).await;
        assert_eq!(s, 201, "{v}");
        made.push(v["hostname"].as_str().unwrap().to_string());
    }
    // Polled: the ledger measures every 2 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let reserved = loop {
        let text = metrics(&d).await;
        let r = sample(&text, r#"slicer_capacity_ram_bytes{kind="reserved"}"#).unwrap_or(u64::MAX);
        if r < nominal {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "still counted nominally: {text}");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert!(reserved > 2 * MIB, "two running VMs use some memory: {reserved}");
    let (s, v) = create(&d, "mea", small).await;
    assert_eq!(s, 201, "a third idle VM fits by use: {v}");
    made.push(v["hostname"].as_str().unwrap().to_string());
    for h in &made {
        echo_ok(&d, h).await;
        let (s, _) = d.send_json(Method::DELETE, &routes::group_node("mea", h), "").await;
        assert_eq!(s, 200);
        assert_gone(&d, "mea", h).await;
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn creates_past_the_budget_get_503_and_leave_nothing() {
    // Two 256 MiB VMs (each 256 MiB + QEMU's overhead) and their template's memory (loaded
    // by the first restore) fit; VMs are capped at two. Counted nominally here (exact
    // figures); `measured_vms_leave_room_for_more` counts use.
    let overhead = slicer_vmm::vm_overhead_bytes(256 * MIB);
    let template = 256 * MIB;
    let budget = 2 * (256 * MIB + overhead) + template + 64 * MIB;
    let top = format!("  capacity: {{ram_bytes: {budget}, vms: 2, vcpus: 8, memory: nominal}}\n");
    let mut d = TestDaemon::start(|p| cfg("cap", "169.254.236.0/22", "", &top, p)).await;
    let text = metrics(&d).await;
    assert_eq!(
        sample(&text, r#"slicer_capacity_ram_bytes{kind="budget"}"#),
        Some(budget),
        "{text}"
    );
    assert_eq!(sample(&text, r#"slicer_capacity_vms{kind="budget"}"#), Some(2));
    assert_eq!(sample(&text, r#"slicer_capacity_vcpus{kind="budget"}"#), Some(8));
    assert_eq!(sample(&text, r#"slicer_capacity_vms{kind="reserved"}"#), Some(0));

    let small = json!({"ram_bytes": 256 * MIB});
    let (s, a) = create(&d, "cap", small.clone()).await;
    assert_eq!(s, 201, "{a}");
    let (s, b) = create(&d, "cap", small.clone()).await;
    assert_eq!(s, 201, "{b}");
    let (a, b) = (a["hostname"].as_str().unwrap(), b["hostname"].as_str().unwrap());
    assert_eq!((a, b), ("cap-1", "cap-2"));
    let text = metrics(&d).await;
    assert_eq!(
        sample(&text, r#"slicer_capacity_vms{kind="reserved"}"#),
        Some(2),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"slicer_capacity_ram_bytes{kind="reserved"}"#),
        Some(2 * (256 * MIB + overhead))
    );
    assert_eq!(sample(&text, r#"slicer_capacity_vcpus{kind="reserved"}"#), Some(2));
    let nets = net_objects("cap");
    assert_eq!(nets.len(), 4, "{nets:?}");

    // A third VM: no room, said clearly, and nothing made for it.
    let (s, v) = create(&d, "cap", small.clone()).await;
    assert_eq!(s, 503, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.starts_with("host capacity: ") && msg.contains("budget is 2"),
        "{msg}"
    );
    let (_, nodes) = d.get("/nodes").await;
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
    assert_eq!(std::fs::read_dir(d.dir.path().join("data/vms")).unwrap().count(), 2);
    assert_eq!(net_objects("cap"), nets);
    echo_ok(&d, a).await;
    echo_ok(&d, b).await;

    // After a delete there is room for a 256 MiB VM, not for a 512 MiB one.
    let (s, _) = d
        .send_json(Method::DELETE, &routes::group_node("cap", "cap-1"), "")
        .await;
    assert_eq!(s, 200);
    assert_gone(&d, "cap", "cap-1").await;
    let text = metrics(&d).await;
    assert_eq!(
        sample(&text, r#"slicer_capacity_vms{kind="reserved"}"#),
        Some(1),
        "{text}"
    );
    let (s, v) = create(&d, "cap", json!({"ram_bytes": 512 * MIB})).await;
    assert_eq!(s, 503, "{v}");
    let msg = v["error"].as_str().unwrap();
    let want = format!(
        "host capacity: {} MiB of RAM requested (512 MiB for the guest, {} MiB for QEMU), {} MiB free of a",
        (512 * MIB + slicer_vmm::vm_overhead_bytes(512 * MIB)) / MIB,
        slicer_vmm::vm_overhead_bytes(512 * MIB) / MIB,
        (budget - 256 * MIB - overhead - template) / MIB
    );
    assert!(msg.starts_with(&want), "{msg}\nwanted: {want}");
    assert_eq!(d.get("/nodes").await.1.as_array().unwrap().len(), 1);
    // The refused creates allocated no hostname: the next VM is cap-3.
    let (s, v) = create(&d, "cap", small).await;
    assert_eq!((s, v["hostname"].as_str()), (201, Some("cap-3")), "{v}");
    echo_ok(&d, "cap-3").await;
    echo_ok(&d, b).await;
    let text = metrics(&d).await;
    assert_eq!(
        sample(&text, r#"slicer_capacity_vms{kind="reserved"}"#),
        Some(2),
        "{text}"
    );

    for h in [b, "cap-3"] {
        let (s, _) = d.send_json(Method::DELETE, &routes::group_node("cap", h), "").await;
        assert_eq!(s, 200);
        assert_gone(&d, "cap", h).await;
    }
    let text = metrics(&d).await;
    assert_eq!(
        sample(&text, r#"slicer_capacity_vms{kind="reserved"}"#),
        Some(0),
        "{text}"
    );
    assert_eq!(sample(&text, r#"slicer_capacity_ram_bytes{kind="reserved"}"#), Some(0));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_delete_racing_a_launch_leaves_nothing() {
    let mut d = TestDaemon::start(|p| cfg("race", "169.254.240.0/22", "", "", p)).await;
    // Hostnames are allocated in order: the n-th create of the group is race-n. The delete
    // is sent as soon as the record exists (it answers 404 before).
    let nodes = routes::group_nodes("race");
    for n in 1..=3 {
        let h = format!("race-{n}");
        let create = d.send_json(Method::POST, &nodes, "{}");
        let delete = async {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let (s, v) = d.send_json(Method::DELETE, &routes::group_node("race", &h), "").await;
                if s != 404 {
                    return (s, v);
                }
                assert!(Instant::now() < deadline, "{h} never appeared");
                tokio::time::sleep(Duration::from_millis(n * 2)).await;
            }
        };
        let ((cs, cv), (ds, dv)) = tokio::join!(create, delete);
        assert_eq!(ds, 200, "delete of {h}: {dv}");
        // The create either finished first (and the delete removed its VM) or found its
        // record gone before it launched anything.
        assert!(cs == 201 || cs == 409, "create of {h}: {cs} {cv}");
        if cs == 201 {
            assert_eq!(cv["hostname"], h.as_str());
        }
        assert_gone(&d, "race", &h).await;
    }
    assert!(net_objects("race").is_empty(), "{:?}", net_objects("race"));
    assert_eq!(std::fs::read_dir(d.dir.path().join("data/vms")).unwrap().count(), 0);
    let text = metrics(&d).await;
    assert_eq!(
        sample(&text, r#"slicer_capacity_vms{kind="reserved"}"#),
        Some(0),
        "{text}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn racing_relaunches_start_one_qemu_with_a_working_network() {
    // The guest may reach one port of its gateway (the host), where a test server answers.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        loop {
            if let Ok((mut s, _)) = listener.accept().await {
                let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"hello\n").await;
            }
        }
    });
    let allow = format!(", allow: [\"169.254.244.1:{port}\"]");
    let mut d = TestDaemon::start(|p| cfg("rel", "169.254.244.0/22", &allow, "", p)).await;
    let (s, v) = create(&d, "rel", json!({"persistent": true})).await;
    assert_eq!((s, v["ip"].as_str()), (201, Some("169.254.244.2/30")), "{v}");
    let h = "rel-1";
    let reaches_host = format!("timeout 3 bash -c 'exec 3<>/dev/tcp/169.254.244.1/{port}; head -n1 <&3'");
    let (_, v) = d.sh(h, &reaches_host).await;
    assert_eq!(v["stdout"], "hello\n", "before: {v}");
    let (s, _) = d
        .send_json(Method::POST, &format!("{}?action=shutdown", routes::vm_shutdown(h)), "")
        .await;
    assert_eq!(s, 200);
    assert_eq!(d.get(&routes::vm(h)).await.1["status"], "Stopped");
    assert_eq!(qemus_of(h), 0);

    let path = routes::vm_relaunch(h);
    let relaunch = || d.send_json(Method::POST, &path, "");
    let ((s1, v1), (s2, v2)) = tokio::join!(relaunch(), relaunch());
    let mut codes = [s1, s2];
    codes.sort();
    assert_eq!(codes, [200, 409], "{v1} {v2}");
    assert_eq!(qemus_of(h), 1, "one QEMU for {h}");
    assert_eq!(d.get(&routes::vm(h)).await.1["status"], "Running");
    let nets = net_objects("rel");
    assert_eq!(nets, vec![format!("netns slicer-{h}"), format!("table slicer-{h}")]);
    echo_ok(&d, h).await;
    let (_, v) = d.sh(h, &reaches_host).await;
    assert_eq!(v["stdout"], "hello\n", "after the relaunches: {v}");
    let text = metrics(&d).await;
    assert_eq!(
        sample(&text, r#"slicer_capacity_vms{kind="reserved"}"#),
        Some(1),
        "{text}"
    );

    let (s, _) = d.send_json(Method::DELETE, &routes::group_node("rel", h), "").await;
    assert_eq!(s, 200);
    assert_gone(&d, "rel", h).await;
    assert_eq!(qemus_of(h), 0);
    server.abort();
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_stuck_guest_does_not_hold_up_secrets() {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    // A: systemd (its agent is a unit that can be stopped); B: min.
    let mut d = TestDaemon::start(|p| {
        format!(
            "config:\n  host_groups:\n  - name: stuck\n    count: 0\n    vcpu: 1\n    ram_mb: 512\n    image: systemd\n    network: {{mode: none}}\n  - name: fine\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    image: min\n    network: {{mode: none}}\n  graceful_shutdown: false\n  api:\n    port: {p}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    let a = d.create_vm("stuck", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let b = d.create_vm("fine", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    // The agent stops itself half a second after this exec has answered.
    let (s, v) = d
        .sh(
            &a,
            "setsid sh -c 'sleep 0.5; kill -STOP $(pidof slicer-agent)' >/dev/null 2>&1 &",
        )
        .await;
    assert_eq!((s, v["exit_code"].as_i64()), (200, Some(0)), "{v}");
    // Until A answers no more.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::time::timeout(Duration::from_secs(1), d.sh(&a, "true"))
            .await
            .is_err()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the agent of {a} still answers");
    }

    let show = "cat /run/slicer/secrets/token";
    let sees = async |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, v) = d.sh(&b, show).await;
            if v["stdout"] == want {
                return;
            }
            assert!(Instant::now() < deadline, "{b} does not see {want:?}: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let t0 = Instant::now();
    let (s, v) = d
        .send_json(
            Method::POST,
            "/secrets",
            &json!({"name": "token", "data": b64("one")}).to_string(),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert!(t0.elapsed() < Duration::from_secs(2), "create took {:?}", t0.elapsed());
    sees("one").await;
    for value in ["two", "three"] {
        let t0 = Instant::now();
        let (s, v) = d
            .send_json(
                Method::PATCH,
                &routes::secret("token"),
                &json!({"data": b64(value)}).to_string(),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert!(t0.elapsed() < Duration::from_secs(2), "update took {:?}", t0.elapsed());
        sees(value).await;
    }
    let t0 = Instant::now();
    assert_eq!(d.send_json(Method::DELETE, &routes::secret("token"), "").await.0, 200);
    assert!(t0.elapsed() < Duration::from_secs(2), "delete took {:?}", t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.sh(&b, show).await.1["exit_code"] == 0 {
        assert!(Instant::now() < deadline, "{b} still has the deleted secret");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A stuck guest is still deleted at once.
    let t0 = Instant::now();
    assert_eq!(
        d.send_json(Method::DELETE, &routes::group_node("stuck", &a), "")
            .await
            .0,
        200
    );
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "delete of {a} took {:?}",
        t0.elapsed()
    );
    assert!(no_qemu_for(&a));
    d.stop().await;
}
