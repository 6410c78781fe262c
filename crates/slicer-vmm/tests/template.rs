//! Warm start end to end: VMs restored from a template snapshot, suspend and resume.
//! Needs the images built by `scripts/setup.sh`; the template is built on first use and kept
//! in the image store.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{fixture, pid_alive};
use slicer_vmm::{ExecRequest, Shape, StartMode, Vm, VmSpec};

async fn sh(vm: &Vm, script: &str) -> String {
    let out = vm
        .agent()
        .exec_output(&ExecRequest::shell(script), None)
        .await
        .unwrap_or_else(|e| panic!("{}: {script}: {e}", vm.name));
    assert!(
        out.status.success(),
        "{}: {script}: {:?} {}",
        vm.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn shape() -> Shape {
    Shape {
        image: "min".into(),
        cpus: 1,
        memory_mib: 256,
        nic: false,
    }
}

async fn restore(f: &common::Fixture, name: &str, disk_size: Option<u64>) -> Vm {
    let tpl = f.host.template(&shape()).await.expect("template");
    let mut spec = VmSpec::new(name, "min");
    spec.disk_size = disk_size;
    let vm = Vm::restore(&f.host, &spec, &tpl)
        .await
        .unwrap_or_else(|e| panic!("restoring {name}: {e:#}"));
    vm.wait_ready(Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{name} after restore: {e:#}"));
    assert_eq!(vm.start_mode, StartMode::Template);
    vm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn ten_restored_vms_are_distinct_and_work() {
    let f = fixture();
    let tpl = f.host.template(&shape()).await.expect("template");
    assert!(tpl.disk().is_file() && tpl.state().is_file());
    let names: Vec<String> = (0..10).map(|i| format!("warm-{i}")).collect();
    let vms = futures_util::future::join_all(names.iter().map(|n| restore(&f, n, None))).await;
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut seen = [HashSet::new(), HashSet::new(), HashSet::new()];
    for vm in &vms {
        let out = sh(
            vm,
            "hostname; cat /etc/hostname; cat /etc/machine-id; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s",
        )
        .await;
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert_eq!(lines[0], vm.name);
        assert_eq!(lines[1], vm.name);
        for (i, v) in [lines[0], lines[2], lines[3]].into_iter().enumerate() {
            assert!(seen[i].insert(v.to_string()), "{} repeats {v}", vm.name);
        }
        assert_eq!(lines[2].len(), 32, "machine-id {}", lines[2]);
        let guest_now: u64 = lines[4].parse().unwrap();
        assert!(
            guest_now.abs_diff(host_now) < 60,
            "guest clock {guest_now} vs host {host_now}"
        );

        // cp both ways, and exec on what was copied.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        vm.agent()
            .upload_file("/tmp/in.bin", Some(0o600), None, std::io::Cursor::new(data.clone()))
            .await
            .unwrap();
        let back = vm.agent().download_file("/tmp/in.bin").await.unwrap();
        assert_eq!(back.bytes(1 << 20).await.unwrap(), data, "{}", vm.name);
        assert_eq!(sh(vm, "wc -c < /tmp/in.bin").await.trim(), "300000");
    }
    for vm in &vms {
        vm.stop(Duration::ZERO).await.unwrap();
    }
    assert_eq!(std::fs::read_dir(f.tmp.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_restored_vm_grows_its_disk() {
    let f = fixture();
    let vm = restore(&f, "warm-big", Some(2 << 30)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let kb: u64 = sh(&vm, "df -k --output=size / | tail -1").await.trim().parse().unwrap();
        if kb > 1_900_000 {
            break;
        }
        assert!(Instant::now() < deadline, "root is still {kb} KiB");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    vm.stop(Duration::ZERO).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn suspend_and_resume_keep_processes_and_files() {
    let f = fixture();
    let vm = restore(&f, "warm-suspend", None).await;
    let pid = sh(
        &vm,
        "echo kept > /tmp/marker; setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!",
    )
    .await;
    let pid = pid.trim().to_string();
    let qemu = vm.pid();
    vm.suspend().await.expect("suspend");
    assert!(!vm.is_running() && !pid_alive(qemu));
    let state = vm.dir().join(slicer_vmm::SUSPEND_FILE);
    assert!(state.is_file());
    let spec = VmSpec::new("warm-suspend", "min");
    // The spent handle leaves the files the resume needs.
    let dir = vm.dir().to_path_buf();
    drop(vm);
    assert!(state.is_file());
    let vm = match Vm::resume(&f.host, &spec).await {
        Ok(vm) => vm,
        Err(e) => panic!(
            "resume: {e:#}\nQEMU: {}",
            std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
        ),
    };
    vm.wait_ready(Duration::from_secs(60))
        .await
        .expect("ready after resume");
    assert_eq!(vm.start_mode, StartMode::Resume);
    assert!(!state.exists(), "the saved state is spent once the guest runs");
    assert_eq!(sh(&vm, "cat /tmp/marker").await.trim(), "kept");
    assert_eq!(sh(&vm, &format!("cat /proc/{pid}/comm")).await.trim(), "sleep");
    // A second resume has nothing to start from.
    vm.stop(Duration::ZERO).await.unwrap();
    assert!(!dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_broken_template_fails_cleanly() {
    let f = fixture();
    let good = f.host.template(&shape()).await.expect("template");
    let bad_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(good.disk(), bad_dir.path().join("disk.qcow2")).unwrap();
    if good.shared_ram {
        std::os::unix::fs::symlink(good.ram(), bad_dir.path().join("ram")).unwrap();
    }
    let state = std::fs::read(good.state()).unwrap();
    std::fs::write(bad_dir.path().join("state"), &state[..state.len() / 3]).unwrap();
    let mut bad = (*good).clone();
    bad.dir = bad_dir.path().to_path_buf();
    let err = Vm::restore(&f.host, &VmSpec::new("warm-bad", "min"), &bad)
        .await
        .err()
        .expect("a truncated state must not restore");
    assert!(format!("{err:#}").contains("warm-bad"), "{err:#}");
    assert!(!f.tmp.path().join("warm-bad").exists(), "nothing is left behind");
    // The wrong shape is refused before anything starts.
    let mut spec = VmSpec::new("warm-shape", "min");
    spec.cpus = 2;
    let err = Vm::restore(&f.host, &spec, &good).await.err().unwrap();
    assert!(err.to_string().contains("is for"), "{err}");
}

/// A process's proportional set size in KiB.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 20 clones of one template share its RAM copy-on-write: they still run exec and cp, none
/// sees another's writes (in RAM or on disk), and each costs well below a clone that loads
/// its own RAM from the state (the fallback, measured side by side here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn twenty_clones_share_the_template_memory() {
    let f = fixture();
    let tpl = f.host.template(&shape()).await.expect("template");
    assert!(tpl.shared_ram, "templates keep RAM in a file on this host");
    assert!(
        tpl.state_bytes < 4 << 20,
        "the saved state holds devices only: {} bytes",
        tpl.state_bytes
    );
    let mut vms = Vec::new();
    for i in 0..20 {
        vms.push(restore(&f, &format!("cow-{i}"), None).await);
    }
    for (i, vm) in vms.iter().enumerate() {
        vm.agent()
            .upload_file(
                "/root/mine",
                Some(0o600),
                None,
                std::io::Cursor::new(format!("{i}\n").into_bytes()),
            )
            .await
            .unwrap();
        // tmpfs lives in guest RAM: the shared pages must not leak between clones either.
        sh(vm, &format!("echo {i} > /dev/shm/mine; sync")).await;
    }
    for (i, vm) in vms.iter().enumerate() {
        assert_eq!(
            sh(vm, "cat /root/mine /dev/shm/mine").await,
            format!("{i}\n{i}\n"),
            "{}",
            vm.name
        );
    }
    let shared = vms.iter().map(|v| pss_kib(v.pid())).sum::<u64>() as f64 / 1024.0 / vms.len() as f64;
    for vm in &vms {
        vm.stop(Duration::ZERO).await.unwrap();
    }

    // The fallback, the same work on 5 clones.
    let mut f2 = fixture();
    f2.host.shared_template_ram = false;
    let tpl2 = f2.host.template(&shape()).await.expect("template");
    assert!(!tpl2.shared_ram && tpl2.state_bytes > 16 << 20, "{tpl2:?}");
    let mut private = Vec::new();
    for i in 0..5 {
        private.push(restore(&f2, &format!("private-{i}"), None).await);
    }
    for (i, vm) in private.iter().enumerate() {
        sh(vm, &format!("echo {i} > /root/mine; echo {i} > /dev/shm/mine; sync")).await;
    }
    for (i, vm) in private.iter().enumerate() {
        assert_eq!(sh(vm, "cat /root/mine /dev/shm/mine").await, format!("{i}\n{i}\n"));
    }
    let own = private.iter().map(|v| pss_kib(v.pid())).sum::<u64>() as f64 / 1024.0 / private.len() as f64;
    for vm in &private {
        vm.stop(Duration::ZERO).await.unwrap();
    }
    eprintln!(
        "PSS per clone: {shared:.1} MiB with the template's RAM shared, {own:.1} MiB with RAM loaded from the state"
    );
    assert!(
        shared < 0.75 * own && shared < 64.0,
        "PSS per clone {shared:.1} MiB shared against {own:.1} MiB"
    );
    assert_eq!(std::fs::read_dir(f.tmp.path()).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(f2.tmp.path()).unwrap().count(), 0);
}

/// A live capture: processes, tmpfs and memory of a running VM continue in each VM restored
/// from it (a live fork), each with its own identity, while the source keeps running. Both a
/// template clone and a cold-booted VM are captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn live_captures_continue_in_every_fork() {
    let f = fixture();
    let warm = restore(&f, "live-src", None).await;
    let cold = common::boot(&f, "live-cold", "min").await;
    for (n, src) in [warm, cold].into_iter().enumerate() {
        // A counter in a shell's memory, a file on tmpfs held open by a sleep and then
        // unlinked (it lives on only through that descriptor), a write on disk.
        sh(&src, slicer_testkit::guest::LIVE_STATE).await;
        let sleep_pid = sh(&src, "cat /dev/shm/holder").await.trim().to_string();
        assert!(!sleep_pid.is_empty());
        let dest = f.tmp.path().join(format!("capture-{n}"));
        let before: u64 = sh(&src, "cat /dev/shm/count").await.trim().parse().unwrap();
        let (cap, times) = f.host.capture(&src, &shape(), &dest).await.expect("capture");
        eprintln!("capture {n}: paused {:?}, {:?} in all", times.paused, times.total);
        assert!(cap.shared_ram && cap.state().is_file());
        let mut forks = Vec::new();
        for i in 0..2 {
            let spec = VmSpec::new(format!("live-{n}-fork-{i}"), "min");
            let vm = Vm::restore(&f.host, &spec, &cap).await.expect("live fork");
            vm.wait_ready(Duration::from_secs(120)).await.expect("live fork ready");
            forks.push(vm);
        }
        let mut ids = HashSet::new();
        for vm in forks.iter().chain(std::iter::once(&src)) {
            let out = sh(
                vm,
                &format!("hostname; cat /etc/machine-id; cat /proc/{sleep_pid}/fd/3; cat /root/on-disk; a=$(cat /dev/shm/count); for i in $(seq 500); do b=$(cat /dev/shm/count); [ \"$b\" != \"$a\" ] && break; sleep 0.01; done; echo $a $b"),
            )
            .await;
            let l: Vec<&str> = out.lines().collect();
            assert_eq!(l.len(), 5, "{}: {out}", vm.name);
            assert_eq!(l[0], vm.name);
            assert!(ids.insert(l[1].to_string()), "{} repeats machine-id {}", vm.name, l[1]);
            assert_eq!(l[2], "held", "{}", vm.name);
            assert_eq!(l[3], "disk", "{}", vm.name);
            let c: Vec<u64> = l[4].split(' ').map(|v| v.parse().unwrap()).collect();
            assert!(c[1] > c[0], "{}: the counter stands still: {out}", vm.name);
            if vm.name != src.name {
                // It continued from the captured value, not from zero.
                assert!(
                    c[0] >= before,
                    "{}: counter {} restarted (was {before} before the capture)",
                    vm.name,
                    c[0]
                );
            }
        }
        // Writes stay where they are made.
        sh(&forks[0], "echo mine > /dev/shm/only; echo mine > /root/only; sync").await;
        for vm in [&forks[1], &src] {
            assert_eq!(
                sh(vm, "ls /dev/shm/only /root/only 2>/dev/null | wc -l").await.trim(),
                "0"
            );
        }
        for vm in forks.into_iter().chain([src]) {
            vm.stop(Duration::from_secs(10)).await.unwrap();
        }
    }
}
