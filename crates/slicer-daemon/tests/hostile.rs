//! A hostile tenant against a real daemon, real QEMU guests and the real agent: every QEMU
//! is jailed and limited by its cgroup, and one guest that fork-bombs, spins every vCPU,
//! floods its console and fills its disk does not hurt the host or the other tenants.

mod common;

use slicer_api::routes;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::TestDaemon;
use serde_json::json;

/// The tests here measure the host: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb << 10
}

fn free_bytes(path: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs fills the struct it is given.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}

fn qemu_pid(hostname: &str) -> u32 {
    common::qemu_pid_of(hostname).unwrap_or_else(|| panic!("no QEMU for {hostname}"))
}

/// Asserts the jail of a running VM's QEMU: not root, no capabilities, seccomp filter,
/// no_new_privs, its own mount namespace whose root holds none of the host's files, its own
/// cgroup with the VM's memory limit.
fn assert_jailed(hostname: &str, ram_bytes: u64) {
    let pid = qemu_pid(hostname);
    let c = slicer_jail::inspect(pid).unwrap();
    assert_ne!(c.uid, 0, "{hostname}: QEMU runs as root");
    assert_eq!((c.cap_eff, c.cap_prm, c.cap_bnd), (0, 0, 0), "{hostname}: {c:?}");
    assert_eq!(c.seccomp, 2, "{hostname}: no seccomp filter");
    assert!(c.no_new_privs, "{hostname}");
    assert!(c.own_mount_ns, "{hostname}: shares the host's mounts");
    for host_only in ["root", "home", "boot", "sys", "run"] {
        assert!(
            !c.root_entries.iter().any(|e| e == host_only),
            "{hostname}: jail root has {host_only}: {:?}",
            c.root_entries
        );
    }
    if c.root_entries.iter().any(|e| e == "proc") {
        // A clone of a template with shared RAM opens it through /proc/self/fd: its own
        // procfs shows it only itself (its uid is its own) and only process directories.
        let mi = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let line = mi
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some("/proc"))
            .unwrap_or_else(|| panic!("{hostname}: /proc in the jail root but no proc mount"));
        assert!(
            line.contains("hidepid=invisible") && line.contains("subset=pid") && line.contains(" proc "),
            "{hostname}: {line}"
        );
    }
    let cg = c
        .cgroups
        .iter()
        .find(|p| p.ends_with(&format!("/slicer/{hostname}")))
        .unwrap_or_else(|| panic!("{hostname}: not in its own cgroup: {:?}", c.cgroups));
    let h = slicer_jail::Hierarchy::detect().unwrap();
    let limit_file = match &h {
        slicer_jail::Hierarchy::V2 { root } => root.join(cg.trim_start_matches('/')).join("memory.max"),
        slicer_jail::Hierarchy::V1 { memory, .. } => {
            memory.join(cg.trim_start_matches('/')).join("memory.limit_in_bytes")
        }
    };
    let limit: u64 = std::fs::read_to_string(&limit_file).unwrap().trim().parse().unwrap();
    assert_eq!(
        limit,
        ram_bytes + slicer_vmm::vm_overhead_bytes(ram_bytes),
        "{}",
        limit_file.display()
    );
}

async fn delete(d: &TestDaemon, group: &str, h: &str) {
    let (s, v) = d
        .send_json(http::Method::DELETE, &routes::group_node(group, h), "")
        .await;
    assert_eq!(s, 200, "deleting {h}: {v}");
}

/// Create (wait=agent) + one exec on a fresh VM, and its time.
async fn create_and_exec(d: &TestDaemon, group: &str) -> (String, Duration) {
    let t = Instant::now();
    let v = d.create_vm(group, json!({})).await;
    let h = v["hostname"].as_str().unwrap().to_string();
    let (s, out) = d.sh(&h, "echo ok").await;
    assert_eq!((s, out["stdout"].as_str()), (200, Some("ok\n")), "{out}");
    (h, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_hostile_guest_does_not_hurt_the_host_or_other_tenants() {
    let _one = ONE_AT_A_TIME.lock().await;
    let d = TestDaemon::start(|p| {
        format!(
            "config:\n  host_groups:\n  - name: evil\n    count: 0\n    vcpu: 2\n    ram_gb: 1\n    network: {{mode: isolated}}\n  - name: calm\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network: {{mode: isolated}}\n  graceful_shutdown: false\n  api:\n    port: {p}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    let data = d.dir.path().join("data");

    // Quiet: how long a create + exec takes with nothing else going on (the first one also
    // builds the template).
    let (first, _) = create_and_exec(&d, "calm").await;
    let (second, quiet_a) = create_and_exec(&d, "calm").await;
    // Two quiet samples, the slower kept: one sample's luck should not set the bar (restores
    // from a shared-RAM template are mostly CPU, so under attack they approach the fair share).
    let (third, quiet_b) = create_and_exec(&d, "calm").await;
    let quiet = quiet_a.max(quiet_b);
    for h in [&first, &second, &third] {
        delete(&d, "calm", h).await;
    }

    let evil = d.create_vm("evil", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    assert_jailed(&evil, 1 << 30);
    let rss_before = rss_bytes();
    let free_before = free_bytes(&data);

    // Every vCPU busy, the console flooded, the disk filled, then a fork bomb; all detached
    // so the exec returns.
    let attack = "for i in $(seq $(nproc)); do setsid sh -c 'while :; do :; done' >/dev/null 2>&1 & done; \
        setsid sh -c 'while :; do cat /proc/cpuinfo; done > /dev/ttyS0' >/dev/null 2>&1 & \
        setsid sh -c 'dd if=/dev/zero of=/fill bs=1M' >/dev/null 2>&1 & \
        setsid sh -c 'sleep 1; f() { f | f & }; f' >/dev/null 2>&1 & echo started";
    let (s, out) = d.sh(&evil, attack).await;
    assert_eq!((s, out["stdout"].as_str()), (200, Some("started\n")), "{out}");

    let attack_ends = Instant::now() + Duration::from_secs(30);
    let console = data.join("vms").join(&evil).join("console.log");
    let mut worst_health = Duration::ZERO;
    let mut under_attack = Vec::new();
    while Instant::now() < attack_ends {
        let t = Instant::now();
        let (s, _) = d.get("/healthz").await;
        assert_eq!(s, 200);
        worst_health = worst_health.max(t.elapsed());
        if under_attack.len() < 2 {
            let (h, took) = create_and_exec(&d, "calm").await;
            under_attack.push(took);
            assert_jailed(&h, 256 << 20);
            delete(&d, "calm", &h).await;
        }
        let log = std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0)
            + std::fs::metadata(console.with_extension("log.1"))
                .map(|m| m.len())
                .unwrap_or(0);
        assert!(
            log <= 2 * slicer_hypervisor::console::LOG_MAX,
            "console log {log} bytes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rss_growth = rss_bytes().saturating_sub(rss_before);
    let disk_used = free_before.saturating_sub(free_bytes(&data));
    eprintln!(
        "quiet create+exec {quiet:?}; under attack {under_attack:?}; worst /healthz {worst_health:?}; \
         daemon RSS +{} KiB; host disk used by the filler {} MiB",
        rss_growth >> 10,
        disk_used >> 20
    );
    for took in &under_attack {
        assert!(
            *took <= 2 * quiet,
            "create + exec took {took:?} under attack, {quiet:?} quiet"
        );
    }
    assert!(worst_health < Duration::from_secs(1), "/healthz took {worst_health:?}");
    assert!(rss_growth < 64 << 20, "daemon RSS grew by {rss_growth} bytes");
    // The filler can use at most its disk's virtual size (the image's size here, sparse 2 GiB)
    // plus qcow2 metadata: how far it gets in 30 s depends on the host's disk and CPU.
    let virtual_size = slicer_storage::virtual_size(&data.join("vms").join(&evil).join("disk.qcow2")).unwrap();
    assert!(
        disk_used < virtual_size + (64 << 20),
        "host disk use grew by {disk_used} bytes, past the disk's {virtual_size}"
    );
    assert_jailed(&evil, 1 << 30);

    // The tenant's VM still goes away cleanly.
    let t = Instant::now();
    delete(&d, "evil", &evil).await;
    assert!(t.elapsed() < Duration::from_secs(15));
    assert!(common::no_qemu_for(&evil));
    assert!(!data.join("vms").join(&evil).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_guest_using_all_its_memory_keeps_running() {
    let _one = ONE_AT_A_TIME.lock().await;
    let d = TestDaemon::start(|p| {
        format!(
            "config:\n  host_groups:\n  - name: big\n    count: 0\n    vcpu: 1\n    ram_mb: 512\n    network: {{mode: isolated}}\n  graceful_shutdown: false\n  api:\n    port: {p}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    // A clone of the group's template (shared RAM), whose guest then touches every page it
    // has: `tail` keeps a line that never ends until the guest's OOM killer stops it. Only
    // the guest's own process may die for that, never its QEMU.
    let h = d.create_vm("big", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let pid = qemu_pid(&h);
    let (s, out) = d
        .sh(&h, "head -c 2G /dev/zero | tail >/dev/null; echo filled; free -m")
        .await;
    assert_eq!(s, 200, "{out}");
    assert!(out["stdout"].as_str().unwrap_or("").starts_with("filled\n"), "{out}");
    assert_eq!(common::qemu_pid_of(&h), Some(pid), "the VM's QEMU was killed");
    let (s, out) = d.sh(&h, "echo ok").await;
    assert_eq!((s, out["stdout"].as_str()), (200, Some("ok\n")), "{out}");
    assert_jailed(&h, 512 << 20);
    delete(&d, "big", &h).await;
    assert!(common::no_qemu_for(&h));
}

/// Every file and directory below `dir`, with its mode.
fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, u32)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let Ok(m) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        out.push((e.path(), m.permissions().mode()));
        if m.is_dir() {
            walk(&e.path(), out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn every_file_the_daemon_writes_is_private() {
    let _one = ONE_AT_A_TIME.lock().await;
    let d = TestDaemon::start(|p| common::config_yaml("modes", "", p)).await;
    let data = d.dir.path().join("data");
    let body = json!({"name": "k", "data": "c2VjcmV0", "permissions": "0600"});
    assert_eq!(
        d.send_json(http::Method::POST, "/secrets", &body.to_string()).await.0,
        201
    );
    let h = d
        .create_vm("modes", json!({"persistent": true, "userdata": "echo hi"}))
        .await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, _) = d.sh(&h, "echo hello > /dev/ttyS0").await;
    assert_eq!(s, 200);
    let (s, v) = d.send_json(http::Method::POST, &routes::vm_suspend(&h), "").await;
    assert_eq!(s, 200, "{v}");
    let vm_dir = data.join("vms").join(&h);
    assert!(vm_dir.join("suspend.state").is_file());

    assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
    let mut all = Vec::new();
    walk(&data, &mut all);
    for name in [
        "state.db",
        "auth/token",
        "secrets",
        "vms",
        &format!("vms/{h}/suspend.state"),
        &format!("vms/{h}/console.log"),
    ] {
        assert!(
            all.iter().any(|(p, _)| p == &data.join(name)),
            "{name} was not written: {all:?}"
        );
    }
    for (path, mode) in &all {
        assert_eq!(mode & 0o077, 0, "{} is mode {:o}", path.display(), mode & 0o7777);
    }
    // A VM directory is root's: the VM's uid owns its disk in it and nothing else, so it can
    // neither create nor replace a name the daemon uses there.
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&vm_dir).unwrap());
    assert_eq!(owner, 0, "VM directory owned by {owner}");
    let disk_owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(vm_dir.join("disk.qcow2")).unwrap());
    assert!(
        disk_owner >= slicer_jail::uid::DEFAULT_START,
        "the disk is owned by {disk_owner}"
    );
    // The template's saved state (guest RAM) is the daemon's alone too.
    let mut templates = Vec::new();
    walk(&d.images.join("templates"), &mut templates);
    for (path, mode) in templates
        .iter()
        .filter(|(p, _)| p.file_name().is_some_and(|n| n == "state"))
    {
        assert_eq!(mode & 0o077, 0, "{} is mode {:o}", path.display(), mode & 0o7777);
    }
    delete(&d, "modes", &h).await;
}

/// Every name the daemon (or slicer-vmm) opens, writes, renames or connects to in a VM's
/// directory.
const DAEMON_NAMES: &[&str] = &[
    "console.log",
    "console.log.1",
    "qemu.log",
    "qemu.log.1",
    "suspend.state",
    "suspend.state.tmp",
    "state.tmp",
    "ram",
    "ram-named",
    "disk.qcow2.chain",
    "disk.qcow2.chain.tmp",
    "agent.sock",
    "qmp.sock",
    "console.sock",
    "export-000000000000.qcow2",
];

/// Runs `script` with `sh -c` as `uid` (gid the same, no other groups) inside the mount
/// namespace and root of QEMU `pid`: what a guest that escaped into its QEMU is.
fn in_jail_as(pid: u32, uid: u32, script: &str) -> String {
    let (p, u) = (pid.to_string(), uid.to_string());
    let out = std::process::Command::new("nsenter")
        .args([
            "-t", &p, "-m", "-r", "-w", "-S", &u, "-G", &u, "--", "/bin/sh", "-c", script,
        ])
        .output()
        .expect("nsenter runs (util-linux)");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Runs `script` as `uid` on the host (the same uid outside the jail, e.g. a process of it
/// that got out of the mount namespace).
fn on_host_as(uid: u32, script: &str) -> String {
    let u = uid.to_string();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            &u,
            "--regid",
            &u,
            "--clear-groups",
            "--",
            "/bin/sh",
            "-c",
            script,
        ])
        .output()
        .expect("setpriv runs (util-linux)");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A shell script that tries to plant, in each of `dirs`, a link to `target` and a plain file
/// at every daemon name, printing `PLANTED <path>` for each that worked.
fn plant_script(dirs: &[String], target: &str) -> String {
    let mut s = String::new();
    for d in dirs {
        for n in DAEMON_NAMES {
            s += &format!(
                "rm -f '{d}/{n}' 2>/dev/null; ln -s '{target}' '{d}/{n}' 2>/dev/null && echo 'PLANTED {d}/{n}'; \
                 ( : > '{d}/{n}.x' ) 2>/dev/null && echo 'PLANTED {d}/{n}.x'; "
            );
        }
    }
    s + "echo done"
}

fn planted(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("PLANTED")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_compromised_qemu_cannot_make_the_daemon_follow_its_files() {
    let _one = ONE_AT_A_TIME.lock().await;
    let d = TestDaemon::start(|p| {
        format!(
            "config:\n  host_groups:\n  - name: esc\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    image: min\n    persistent: true\n    network: {{mode: none}}\n  graceful_shutdown: false\n  api:\n    port: {p}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    let data = d.dir.path().join("data");
    let token_path = data.join("auth").join("token");
    let token = std::fs::read_to_string(&token_path).unwrap().trim().to_string();
    assert!(token.len() >= 16);
    let token_mode = || std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o7777;
    let no_token = |what: &str, body: &[u8]| {
        assert!(
            !body.windows(token.len()).any(|w| w == token.as_bytes()),
            "{what} holds the API token"
        );
    };
    // Where a followed link would write: nothing may appear here.
    let sink = tempfile::Builder::new().prefix("slicer-sink-").tempdir().unwrap();
    std::fs::set_permissions(sink.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let sink_file = sink.path().join("appended");

    let h = d.create_vm("esc", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let vm_dir = data.join("vms").join(&h);
    let pid = qemu_pid(&h);
    let uid = slicer_jail::inspect(pid).unwrap().uid;

    // Every directory the QEMU can name (its jail shows the disk at the host path), inside
    // its namespace and out: no name can be planted anywhere.
    let dirs: Vec<String> = [
        vm_dir.clone(),
        data.join("vms"),
        "/".into(),
        "/tmp".into(),
        "/run".into(),
    ]
    .iter()
    .map(|p| p.display().to_string())
    .collect();
    for target in [token_path.display().to_string(), sink_file.display().to_string()] {
        let inside = in_jail_as(pid, uid, &plant_script(&dirs, &target));
        assert!(inside.contains("done"), "{inside}");
        assert!(planted(&inside).is_empty(), "inside the jail: {inside}");
        let outside = on_host_as(uid, &plant_script(&dirs[..2], &target));
        assert!(outside.contains("done"), "{outside}");
        assert!(planted(&outside).is_empty(), "on the host: {outside}");
    }

    let m = std::fs::metadata(&vm_dir).unwrap();
    assert_eq!(
        (m.uid(), m.mode() & 0o7777),
        (0, 0o700),
        "the VM directory is root's alone"
    );

    // Drive everything that touches those names: console output and its rotation, logs,
    // suspend and restore.
    let (s, _) = d
        .sh(&h, "head -c 2500000 /dev/zero | tr '\\0' 'x' > /dev/ttyS0; echo")
        .await;
    assert_eq!(s, 200);
    let (s, logs) = d
        .raw(
            &d.client(),
            http::Method::GET,
            &format!("{}?lines=0", routes::vm_logs(&h)),
            None,
            slicer_api::client::empty(),
        )
        .await;
    assert_eq!(s, 200);
    no_token("the console log", &logs);
    let (s, v) = d.send_json(http::Method::POST, &routes::vm_suspend(&h), "").await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = d
        .send_json(
            http::Method::POST,
            &format!("{}?wait=agent", routes::vm_restore(&h)),
            "",
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, out) = d.sh(&h, "echo back").await;
    assert_eq!((s, out["stdout"].as_str()), (200, Some("back\n")), "{out}");

    // The QEMU owns its disk: it rewrites the header's backing name to the daemon's token (a
    // raw file), then dies without closing the image cleanly.
    let pid = qemu_pid(&h);
    let uid = slicer_jail::inspect(pid).unwrap().uid;
    let disk = vm_dir.join("disk.qcow2");
    let tamper = format!(
        "python3 -c 'import struct; f=open(\"{}\",\"r+b\"); n=b\"{}\"; f.seek(8192); f.write(n); f.seek(8); f.write(struct.pack(\">QI\",8192,len(n))); f.close(); print(\"tampered\")'",
        disk.display(),
        token_path.display()
    );
    let out = in_jail_as(pid, uid, &tamper);
    assert!(out.contains("tampered"), "{out}");
    // SAFETY: kill(2) of the VM's QEMU.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.get(&routes::vm(&h)).await.1["status"] != "Stopped" {
        assert!(Instant::now() < deadline, "the killed VM was not marked Stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Export, relaunch, commit and fork all read that disk: none may reach the token.
    let (s, body) = d
        .raw(
            &d.client(),
            http::Method::GET,
            &routes::vm_disk(&h),
            None,
            slicer_api::client::empty(),
        )
        .await;
    no_token(&format!("the exported disk ({s})"), &body);
    assert_eq!(token_mode(), 0o600, "the token was made readable");
    let (_, v) = d.send_json(http::Method::POST, &routes::vm_relaunch(&h), "").await;
    no_token("the relaunch answer", v.to_string().as_bytes());
    assert_eq!(token_mode(), 0o600, "the token was made readable");
    if d.get(&routes::vm(&h)).await.1["status"] == "Running" {
        let (_, v) = d.send_json(http::Method::POST, &routes::vm_shutdown(&h), "").await;
        no_token("the shutdown answer", v.to_string().as_bytes());
    }
    let (s, c) = d.send_json(http::Method::POST, &routes::vm_commit(&h), "{}").await;
    assert_eq!(s, 201, "{c}");
    let commit = c["commit_id"].as_str().unwrap().to_string();
    let (_, f) = d
        .send_json(http::Method::POST, &routes::commit_fork(&commit), "{}")
        .await;
    no_token("the fork answer", f.to_string().as_bytes());
    assert_eq!(token_mode(), 0o600, "the token was made readable");
    if let Some(fork) = f["hostname"].as_str() {
        if let Some(fpid) = common::qemu_pid_of(fork) {
            let jail = slicer_jail::inspect(fpid).unwrap();
            assert!(!jail.root_entries.is_empty());
            let seen = in_jail_as(fpid, jail.uid, &format!("cat '{}' 2>&1; echo", token_path.display()));
            no_token("the fork's jail", seen.as_bytes());
        }
        delete(&d, "esc", fork).await;
    }
    let (s, body) = d
        .raw(
            &d.client(),
            http::Method::GET,
            &routes::vm_disk(&h),
            None,
            slicer_api::client::empty(),
        )
        .await;
    no_token(&format!("the exported disk after the commit ({s})"), &body);
    assert!(!sink_file.exists(), "a file appeared where a planted link pointed");
    delete(&d, "esc", &h).await;
    let (s, v) = d.send_json(http::Method::DELETE, &routes::commit(&commit), "").await;
    assert_eq!(s, 200, "{v}");
    assert!(common::no_qemu_for(&h));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_guest_cannot_forge_lines_in_the_daemons_log() {
    let _one = ONE_AT_A_TIME.lock().await;
    common::daemon_log();
    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGw2nbyvNQ5dTfTQ1vbiHyqL3QVGWczZ1fdQ1ZDfjVZq t@x";
    const FORGED: &str = "2026-12-07T00:00:00Z INFO forged";
    let d = TestDaemon::start(|p| common::config_yaml("logs", &format!("  ssh_keys:\n  - {KEY}\n"), p)).await;
    let h = d.create_vm("logs", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    // The guest's `touch` (which the daemon's SSH key installation runs) now fails with a
    // message that carries a line of its own, an ESC and a CR.
    let fake = format!("#!/bin/sh\nprintf 'denied\\n{FORGED} by {h}\\r\\033[2J\\n' >&2\nexit 1\n");
    let (s, v) = d
        .sh(
            &h,
            &format!("cat > /tmp/touch <<'EOF'\n{fake}EOF\nchmod 755 /tmp/touch && mv /tmp/touch /usr/bin/touch"),
        )
        .await;
    assert_eq!((s, v["exit_code"].as_i64()), (200, Some(0)), "{v}");
    // A restored VM gets the keys again: the installation fails and the daemon logs why.
    let (s, v) = d.send_json(http::Method::POST, &routes::vm_suspend(&h), "").await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = d
        .send_json(
            http::Method::POST,
            &format!("{}?wait=agent", routes::vm_restore(&h)),
            "",
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let log = common::daemon_log();
    let ours: Vec<&str> = log.lines().filter(|l| l.contains(&h)).collect();
    assert!(
        ours.iter().any(|l| l.contains(&format!(
            "installing SSH keys: exit Some(1): denied\\n{FORGED} by {h}\\r"
        ))),
        "the failure was not logged on one line: {ours:#?}"
    );
    for line in log.lines() {
        assert!(!line.starts_with(FORGED), "a forged line: {line:?}");
        assert!(!line.contains('\r'), "a CR: {line:?}");
    }
    assert!(!log.contains("\x1b[2J"), "an ESC sequence reached the log");
    delete(&d, "logs", &h).await;
}
