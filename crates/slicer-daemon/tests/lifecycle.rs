//! Crashes, persistent disks, pause/resume and leaks, against a real daemon and real guests.

mod common;

use slicer_api::routes;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{no_qemu_for, TestDaemon};
use http::Method;
use serde_json::json;

fn cfg(group: &str, extra: &str, port: u16) -> String {
    format!(
        "config:\n  host_groups:\n  - name: {group}\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n{extra}  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
    )
}

fn qemu_pid(hostname: &str) -> Option<u32> {
    common::qemu_pid_of(hostname)
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_killed_vm_is_noticed_within_two_seconds() {
    let mut d =
        TestDaemon::start(|p| cfg("crash", "    network: {mode: isolated, range: 169.254.220.0/22}\n", p)).await;
    let eph = d.create_vm("crash", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let per = d.create_vm("crash", json!({"persistent": true})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    for (h, persistent) in [(&eph, false), (&per, true)] {
        let pid = qemu_pid(h).expect("QEMU running");
        // SAFETY: kill(2) on the VM's QEMU.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        let t0 = Instant::now();
        let vm_dir = d.dir.path().join("data/vms").join(h);
        let deadline = t0 + Duration::from_secs(2);
        loop {
            let (s, v) = d.get(&routes::vm(h)).await;
            let done = if persistent {
                s == 200 && v["status"] == "Stopped" && !netns_exists(&format!("slicer-{h}"))
            } else {
                s == 404 && !vm_dir.exists() && !netns_exists(&format!("slicer-{h}"))
            };
            if done {
                break;
            }
            assert!(Instant::now() < deadline, "{h} not reaped within 2 s: {s} {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if persistent {
            assert!(vm_dir.join("disk.qcow2").exists(), "the persistent disk must stay");
            assert!(vm_dir.join("console.log").exists(), "the log is kept");
        }
    }
    let (s, _) = d
        .send_json(Method::DELETE, &routes::group_node("crash", &per), "")
        .await;
    assert_eq!(s, 200);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn persistent_disk_survives_shutdown_and_relaunch_and_has_its_size() {
    let mut d = TestDaemon::start(|p| cfg("keep", "    storage_size: 2G\n    network: {mode: none}\n", p)).await;
    let h = d.create_vm("keep", json!({"persistent": true})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    // The root filesystem grows to storage_size in the background after boot.
    let deadline = Instant::now() + Duration::from_secs(60);
    let size = loop {
        let (_, v) = d.sh(&h, "df -B1 --output=size / | tail -1").await;
        let size: u64 = v["stdout"].as_str().unwrap().trim().parse().unwrap();
        if size > 1800 << 20 || Instant::now() > deadline {
            break size;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!((1800 << 20..=2 << 30).contains(&size), "df / reports {size} bytes");
    let (s, v) = d.sh(&h, "echo kept > /root/marker && sync").await;
    assert_eq!((s, v["exit_code"].as_i64()), (200, Some(0)));
    assert_eq!(
        d.send_json(Method::POST, &routes::vm_relaunch(&h), "").await.0,
        409,
        "running VMs do not relaunch"
    );
    let (s, _) = d
        .send_json(
            Method::POST,
            &format!("{}?action=shutdown", routes::vm_shutdown(&h)),
            "",
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(d.get(&routes::vm(&h)).await.1["status"], "Stopped");
    assert!(no_qemu_for(&h));
    let (s, v) = d.send_json(Method::POST, &routes::vm_relaunch(&h), "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["hostname"], h.as_str());
    let (_, v) = d.sh(&h, "cat /root/marker").await;
    assert_eq!(v["stdout"], "kept\n");
    // An ephemeral VM cannot be relaunched; an unknown one is 404.
    let e = d.create_vm("keep", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(d.send_json(Method::POST, &routes::vm_relaunch(&e), "").await.0, 409);
    assert_eq!(
        d.send_json(Method::POST, &routes::vm_relaunch("keep-99"), "").await.0,
        404
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn pause_blocks_guest_operations_until_resume() {
    let mut d = TestDaemon::start(|p| cfg("pz", "    network: {mode: none}\n", p)).await;
    let h = d.create_vm("pz", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, _) = d.send_json(Method::POST, &routes::vm_pause(&h), "").await;
    assert_eq!(s, 200);
    assert_eq!(d.get(&routes::vm(&h)).await.1["status"], "Paused");
    let (s, v) = d.sh(&h, "true").await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(d.get(&format!("{}?path=/etc/hostname", routes::vm_cp(&h))).await.0, 409);
    let (s, _) = d.send_json(Method::POST, &routes::vm_resume(&h), "").await;
    assert_eq!(s, 200);
    let (s, v) = d.sh(&h, "hostname").await;
    assert_eq!((s, v["stdout"].as_str()), (200, Some(format!("{h}\n").as_str())));
    assert_eq!(d.send_json(Method::POST, &routes::vm_pause("pz-99"), "").await.0, 404);
    d.stop().await;
}

/// cgroups of `cyc` VMs (in any hierarchy).
fn cgroups_of_cyc() -> usize {
    let Ok(h) = slicer_jail::Hierarchy::detect() else {
        return 0;
    };
    h.children("slicer").iter().filter(|n| n.starts_with("cyc-")).count()
}

fn count_ours() -> (usize, usize, usize, usize) {
    let out = |args: &[&str]| {
        String::from_utf8_lossy(&Command::new(args[0]).args(&args[1..]).output().unwrap().stdout).into_owned()
    };
    let qemus = slicer_testkit::qemu::named_like("slicer-cyc-").len();
    let netns = out(&["ip", "netns", "list"])
        .lines()
        .filter(|l| l.starts_with("slicer-cyc-"))
        .count();
    let links = out(&["ip", "-o", "link", "show"])
        .lines()
        .filter(|l| l.contains(": slh"))
        .count();
    let rules = out(&["nft", "list", "ruleset"])
        .lines()
        .filter(|l| l.contains("slicer-cyc-"))
        .count();
    (qemus, netns, links, rules)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn fifty_create_delete_cycles_leak_nothing() {
    let mut d = TestDaemon::start(|p| cfg("cyc", "    network: {mode: isolated, range: 169.254.228.0/22}\n", p)).await;
    let before = count_ours();
    let fds_before = std::fs::read_dir("/proc/self/fd").unwrap().count();
    for i in 0..50 {
        let v = d.create_vm("cyc", json!({"tags": [format!("i={i}")]})).await;
        let h = v["hostname"].as_str().unwrap().to_string();
        let (s, out) = d.sh(&h, "echo ok").await;
        assert_eq!((s, out["stdout"].as_str()), (200, Some("ok\n")));
        let (s, v) = d.send_json(Method::DELETE, &routes::group_node("cyc", &h), "").await;
        assert_eq!((s, v["disk_removed"].as_str()), (200, Some("true")));
    }
    let after = count_ours();
    assert_eq!(after.0, before.0, "QEMU processes");
    assert_eq!(after.1, before.1, "namespaces");
    assert_eq!(after.3, before.3, "nftables rules");
    // A cgroup goes a moment after its QEMU has been reaped.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while cgroups_of_cyc() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(cgroups_of_cyc(), 0, "cgroups");
    assert_eq!(
        std::fs::read_dir(d.dir.path().join("data/vms")).unwrap().count(),
        0,
        "VM files"
    );
    let fds_after = std::fs::read_dir("/proc/self/fd").unwrap().count();
    assert!(
        fds_after <= fds_before + 8,
        "file descriptors grew from {fds_before} to {fds_after}"
    );
    d.stop().await;
}
