//! Warm start through the API: sandboxes restored from a template snapshot, the group switch
//! that turns it off, the fallback to a cold boot, and suspend/restore.

mod common;

use slicer_api::routes;
use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{no_qemu_for, TestDaemon};
use http::Method;
use http_body_util::BodyExt;
use serde_json::json;
use slicer_api::client::{empty, full};

/// An isolated group `group` with its own range (tests run side by side), and more groups.
fn cfg(group: &str, range: &str, extra_groups: &str, port: u16) -> String {
    format!(
        "config:\n  host_groups:\n  - name: {group}\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network: {{mode: isolated, range: {range}}}\n{extra_groups}  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
    )
}

async fn stdout(d: &TestDaemon, vm: &str, line: &str) -> String {
    let (s, v) = d.sh(vm, line).await;
    assert_eq!(s, 200, "{vm}: {line}: {v}");
    assert_eq!(v["exit_code"], 0, "{vm}: {line}: {v}");
    v["stdout"].as_str().unwrap_or_default().to_string()
}

async fn start_mode(d: &TestDaemon, vm: &str) -> String {
    let (_, v) = d.get(&routes::vm(vm)).await;
    v["start_mode"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn ten_restored_sandboxes_have_their_own_identity() {
    let d = TestDaemon::start(|p| cfg("ten", "169.254.236.0/22", "", p)).await;
    let creates = (0..10).map(|_| d.create_vm("ten", json!({})));
    let vms: Vec<(String, String)> = futures_util::future::join_all(creates)
        .await
        .iter()
        .map(|v| {
            (
                v["hostname"].as_str().unwrap().to_string(),
                v["ip"].as_str().unwrap().split('/').next().unwrap().to_string(),
            )
        })
        .collect();
    let mut seen: [HashSet<String>; 4] = Default::default();
    let c = d.client();
    for (h, ip) in &vms {
        assert_eq!(start_mode(&d, h).await, "template", "{h}");
        let out = stdout(
            &d,
            h,
            "hostname; cat /etc/machine-id; ip -4 -o addr show dev eth0 | awk '{print $4}'; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; ip route show default | awk '{print $3}'",
        )
        .await;
        let l: Vec<&str> = out.lines().collect();
        assert_eq!(l.len(), 5, "{h}: {out}");
        assert_eq!(l[0], h);
        assert_eq!(l[2], format!("{ip}/30"), "{h}");
        for (set, v) in seen.iter_mut().zip([l[0], l[1], l[2], l[3]]) {
            assert!(set.insert(v.to_string()), "{h} repeats {v}");
        }
        assert!(!l[4].is_empty(), "{h} has no default route");

        // cp in and out through the API, and exec on what arrived.
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let (s, b) = d
            .raw(
                &c,
                Method::POST,
                &format!("{}?path=/root/in.bin", routes::vm_cp(h)),
                Some("application/octet-stream"),
                full(data.clone()),
            )
            .await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        assert_eq!(stdout(&d, h, "wc -c < /root/in.bin").await.trim(), "200000");
        let resp = c
            .send(
                Method::GET,
                &format!("{}?path=/root/in.bin", routes::vm_cp(h)),
                None,
                empty(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes().to_vec(), data);
    }
    for (h, _) in &vms {
        assert_eq!(
            d.send_json(Method::DELETE, &routes::group_node("ten", h), "").await.0,
            200
        );
        assert!(no_qemu_for(h));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn warm_start_can_be_turned_off_and_falls_back_to_a_cold_boot() {
    // A private image store (links to the shared kernels and root filesystems), so this test
    // can break its own template without touching anyone else's.
    let store = tempfile::tempdir().unwrap();
    let shared = common::images_dir();
    for e in std::fs::read_dir(&shared).unwrap().flatten() {
        let name = e.file_name();
        if name.to_string_lossy().ends_with(".json") {
            std::fs::copy(e.path(), store.path().join(&name)).unwrap();
        } else if name != "templates" && e.path().is_dir() {
            std::os::unix::fs::symlink(e.path(), store.path().join(&name)).unwrap();
        }
    }
    let cold = "  - name: cold\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    warm_start: false\n    network: {mode: none}\n";
    let d = TestDaemon::start_with_images(|p| cfg("fallback", "169.254.240.0/22", cold, p), store.path()).await;
    let c = d.create_vm("cold", json!({})).await;
    let c = c["hostname"].as_str().unwrap();
    assert_eq!(start_mode(&d, c).await, "cold");
    assert_eq!(stdout(&d, c, "hostname").await.trim(), c);

    let w = d.create_vm("fallback", json!({})).await;
    let w = w["hostname"].as_str().unwrap();
    assert_eq!(start_mode(&d, w).await, "template");

    // Break the template's saved state: the next create must still succeed, cold.
    let tdir = std::fs::read_dir(store.path().join("templates"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("meta.json").is_file())
        .expect("the warm group's template");
    std::fs::write(tdir.join("state"), b"not a QEMU state").unwrap();
    let v = d.create_vm("fallback", json!({})).await;
    let h = v["hostname"].as_str().unwrap();
    assert_eq!(
        start_mode(&d, h).await,
        "cold",
        "a broken template falls back to a cold boot"
    );
    let ip = v["ip"].as_str().unwrap().split('/').next().unwrap();
    assert_eq!(
        stdout(&d, h, "ip -4 -o addr show dev eth0 | awk '{print $4}'")
            .await
            .trim(),
        format!("{ip}/30")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn suspend_then_restore_keeps_processes_and_tmp() {
    let d = TestDaemon::start(|p| cfg("susp", "169.254.244.0/22", "", p)).await;
    let v = d.create_vm("susp", json!({})).await;
    let h = v["hostname"].as_str().unwrap().to_string();
    let pid = stdout(
        &d,
        &h,
        "echo still-here > /tmp/marker; setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!",
    )
    .await;
    let pid = pid.trim().to_string();

    // Failures first: nothing to restore yet, unknown VMs, bad query.
    assert_eq!(d.send_json(Method::POST, &routes::vm_restore(&h), "").await.0, 409);
    assert_eq!(
        d.send_json(Method::POST, &routes::vm_suspend("nope-1"), "").await.0,
        404
    );
    assert_eq!(
        d.send_json(Method::POST, &routes::vm_restore("nope-1"), "").await.0,
        404
    );
    assert_eq!(
        d.send_json(Method::POST, &format!("{}?wait=bogus", routes::vm_restore(&h)), "")
            .await
            .0,
        400
    );

    let t0 = Instant::now();
    let (s, b) = d
        .raw(&d.client(), Method::POST, &routes::vm_suspend(&h), None, empty())
        .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let suspended = t0.elapsed();
    assert!(no_qemu_for(&h), "QEMU ends on suspend");
    let (_, node) = d.get(&routes::vm(&h)).await;
    assert_eq!(node["status"], "Suspended");
    assert_eq!(d.sh(&h, "true").await.0, 409, "a suspended VM runs nothing");
    assert_eq!(d.send_json(Method::POST, &routes::vm_suspend(&h), "").await.0, 409);
    assert_eq!(d.send_json(Method::POST, &routes::vm_relaunch(&h), "").await.0, 409);

    let t0 = Instant::now();
    let (s, b) = d
        .raw(
            &d.client(),
            Method::POST,
            &format!("{}?wait=agent&timeout=60s", routes::vm_restore(&h)),
            None,
            empty(),
        )
        .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    eprintln!("suspend {suspended:?}, restore {:?}", t0.elapsed());
    assert_eq!(start_mode(&d, &h).await, "resume");
    let (_, node) = d.get(&routes::vm(&h)).await;
    assert_eq!(node["status"], "Running");
    assert_eq!(stdout(&d, &h, "cat /tmp/marker").await.trim(), "still-here");
    assert_eq!(stdout(&d, &h, &format!("cat /proc/{pid}/comm")).await.trim(), "sleep");
    // The clock was set from the host on restore.
    let guest: u64 = stdout(&d, &h, "date +%s").await.trim().parse().unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(guest.abs_diff(host) < 30, "guest {guest} host {host}");
    // The network came back with it.
    let ip = v["ip"].as_str().unwrap().split('/').next().unwrap();
    assert_eq!(
        stdout(&d, &h, "ip -4 -o addr show dev eth0 | awk '{print $4}'")
            .await
            .trim(),
        format!("{ip}/30")
    );
    assert_eq!(d.send_json(Method::POST, &routes::vm_restore(&h), "").await.0, 409);

    // A suspended VM can be deleted outright.
    assert_eq!(d.send_json(Method::POST, &routes::vm_suspend(&h), "").await.0, 200);
    assert_eq!(
        d.send_json(Method::DELETE, &routes::group_node("susp", &h), "").await.0,
        200
    );
    assert!(!d.dir.path().join("data/vms").join(&h).exists());
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/run/netns/slicer-{h}")).exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!std::path::Path::new(&format!("/run/netns/slicer-{h}")).exists());
}

/// Sizes of this process's (the daemon's) template memfds that are one of `sizes`: what the
/// daemon really holds of those templates' memory, whatever other tests of the process hold.
fn template_memfd_bytes(sizes: &[u64]) -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("slicer-template-ram")))
        .filter_map(|e| std::fs::metadata(e.path()).ok().map(|m| m.len()))
        .filter(|l| sizes.contains(l))
        .sum()
}

/// A sample of the daemon's /metrics.
async fn metric(d: &TestDaemon, name: &str) -> u64 {
    let (s, b) = d.raw(&d.client(), Method::GET, "/metrics", None, empty()).await;
    assert_eq!(s, 200);
    let text = String::from_utf8_lossy(&b).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in {text}"))
}

/// Creating and deleting VMs of more RAM shapes than the bounds allow: the daemon keeps at most
/// `template_memory_bytes` of template memory loaded (least recently used out), only
/// `template_shapes` shapes get a template (the next boots cold), and a VM of an evicted
/// shape is still restored from its template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn template_memory_and_shapes_stay_within_their_bounds() {
    const MIB: u64 = 1 << 20;
    let limit = 600 * MIB;
    let d = TestDaemon::start(|p| {
        format!(
            "config:\n  host_groups:\n  - name: tmem\n    count: 0\n    vcpu: 1\n    ram_mb: 264\n    network: {{mode: none}}\n  capacity:\n    template_memory_bytes: {limit}\n    template_shapes: 3\n  graceful_shutdown: false\n  api:\n    port: {p}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    // Shapes no other test uses: their memfds are this daemon's.
    let sizes: Vec<u64> = (261..=264).map(|m| m * MIB).collect();
    let held_within_limit = || async {
        // A deleted clone's handle goes with its tasks: polled.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let held = template_memfd_bytes(&sizes);
            if held <= limit {
                return held;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon holds {} MiB of template memory, over the {} MiB bound",
                held / MIB,
                limit / MIB
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // One VM of `mib` MiB (none: the group's 264): its start mode, after it ran and was deleted.
    let run = |mib: Option<u64>| {
        let d = &d;
        async move {
            let body = match mib {
                Some(m) => json!({"ram_bytes": m * MIB}),
                None => json!({}),
            };
            let h = d.create_vm("tmem", body).await["hostname"]
                .as_str()
                .unwrap()
                .to_string();
            let mode = start_mode(d, &h).await;
            assert_eq!(stdout(d, &h, "hostname").await.trim(), h);
            let mem: u64 = stdout(d, &h, "awk '/MemTotal/ {print $2}' /proc/meminfo")
                .await
                .trim()
                .parse()
                .unwrap();
            assert!(mem * 1024 <= mib.unwrap_or(264) * MIB, "{h}: MemTotal {mem} kB");
            let (s, v) = d.send_json(Method::DELETE, &routes::group_node("tmem", &h), "").await;
            assert_eq!(s, 200, "{v}");
            mode
        }
    };
    // Three shapes: 261 + 262 + 264 MiB loaded would be 787 MiB; the least recently used
    // (261) is unloaded.
    for mib in [Some(261), Some(262), None] {
        assert_eq!(run(mib).await, "template", "{mib:?} MiB");
    }
    let held = held_within_limit().await;
    assert_eq!(held, (262 + 264) * MIB, "261 MiB's memory went first");
    assert!(metric(&d, "slicer_template_memory_bytes{kind=\"loaded\"}").await <= limit);
    // A fourth shape gets no template.
    assert_eq!(run(Some(263)).await, "cold", "past template_shapes a VM boots cold");
    assert_eq!(metric(&d, "slicer_template_shapes_refused_total").await, 1);
    assert_eq!(metric(&d, "slicer_template_shapes{kind=\"used\"}").await, 3);
    // The evicted shape still restores: its memory loads again from disk.
    assert_eq!(run(Some(261)).await, "template", "an evicted shape is restored");
    let end = held_within_limit().await;
    let pinned = metric(&d, "slicer_template_memory_bytes{kind=\"pinned\"}").await;
    assert!(pinned <= limit, "pinned {} MiB", pinned / MIB);
    eprintln!(
        "template memfds held: {} MiB after shapes 261, 262, 264 MiB; {} MiB after 263 (cold) and 261 again; pinned {} MiB; bound {} MiB",
        held / MIB,
        end / MIB,
        pinned / MIB,
        limit / MIB
    );
}
