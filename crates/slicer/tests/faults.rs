//! Fault injection against the real `slicer up`: kill -9 of QEMU during restore, suspend and a
//! template build; kill -9 of the daemon during create, delete and a template build; the data
//! directory's file system full during create, cp and suspend; a read-only image store; the
//! state database locked by another process. Each must end in a clear error or a recovery:
//! never a corrupt database, a lost persistent VM, a VM running without its network rules, or
//! a leak; and a restart converges. docs/RELIABILITY.md lists what each ended in.

mod common;

use slicer_api::routes;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use http_body_util::BodyExt;
use slicer_api::ApiClient;

// --- what a test leaves must be nothing ------------------------------------------------------

/// Kills QEMUs, removes network namespaces, nftables tables and mounts of one test, however it
/// ends.
struct Cleanup {
    group: &'static str,
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    template_mib: Option<u32>,
}

impl Cleanup {
    fn new(group: &'static str) -> Cleanup {
        Cleanup {
            group,
            mounts: Vec::new(),
            loops: Vec::new(),
            template_mib: None,
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in qemus(&format!("slicer-{}-", self.group)) {
            kill9(pid);
        }
        let prefix = format!("slicer-{}-", self.group);
        let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        for l in String::from_utf8_lossy(&ns.stdout).lines() {
            if let Some(n) = l.split_whitespace().next().filter(|n| n.starts_with(&prefix)) {
                let _ = Command::new("ip").args(["netns", "del", n]).output();
            }
        }
        for (family, t) in nft_tables().into_iter().filter(|(_, t)| t.starts_with(&prefix)) {
            let _ = Command::new("nft").args(["delete", "table", &family, &t]).output();
        }
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).output();
        }
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).output();
        }
        if let Some(mib) = self.template_mib {
            remove_templates_of(mib);
        }
    }
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) on a pid this test found (its QEMU or its daemon).
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// QEMUs whose `-name` starts with `prefix` (`slicer-<hostname>`).
fn qemus(prefix: &str) -> Vec<u32> {
    slicer_testkit::qemu::named_like(prefix)
}

/// QEMUs building a template of `mib` MiB guests (their files are in a `.build-` scratch
/// directory).
fn template_builds(mib: u32) -> Vec<u32> {
    let mib = mib.to_string();
    slicer_hypervisor::qemu::processes_where(|args| {
        let text: Vec<String> = args.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        text.first().is_some_and(|a| a.contains("qemu-system"))
            && text.iter().any(|a| a.contains("/templates/.build-"))
            && text.windows(2).any(|w| w[0] == "-m" && w[1] == mib)
    })
}

fn nft_tables() -> Vec<(String, String)> {
    let t = Command::new("nft").args(["list", "tables"]).output().unwrap();
    String::from_utf8_lossy(&t.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 3).then(|| (w[1].to_string(), w[2].to_string()))
        })
        .collect()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Templates of `mib` MiB guests in the shared image store go (the tests build them anew).
fn remove_templates_of(mib: u32) {
    let dir = PathBuf::from(images_dir()).join("templates");
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let meta = std::fs::read_to_string(e.path().join("meta.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&meta).unwrap_or_default();
        if v["shape"]["memory_mib"] == mib {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Template build directories of daemon `pid` (named `.build-<id>-<pid>-<random>`).
fn scratch_dirs(pid: u32) -> Vec<String> {
    let dir = PathBuf::from(images_dir()).join("templates");
    std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".build-") && n.contains(&format!("-{pid}-")))
        .collect()
}

async fn poll<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn get(api: &ApiClient, path: &str) -> serde_json::Value {
    api.json(Method::GET, path, None)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
}

/// (status, body) of a request that may fail.
async fn call(api: &ApiClient, m: Method, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let (ct, b) = match body {
        Some(v) => (Some("application/json"), slicer_api::client::full(v.to_string())),
        None => (None, slicer_api::client::empty()),
    };
    // A request the test kills the daemon under ends without an answer: status 0.
    let r = match api.send(m, path, ct, b).await {
        Ok(r) => r,
        Err(e) => return (0, serde_json::Value::String(format!("{e:#}"))),
    };
    let s = r.status().as_u16();
    let Ok(bytes) = r.into_body().collect().await.map(|b| b.to_bytes()) else {
        return (0, serde_json::Value::Null);
    };
    (
        s,
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into())),
    )
}

async fn sh(api: &ApiClient, vm: &str, line: &str) -> String {
    let q = slicer_api::client::query(&[
        ("cmd", line.to_string()),
        ("buffered", "true".into()),
        ("uid", "0".into()),
    ]);
    let v: serde_json::Value = api
        .json(Method::POST, &format!("{}?{q}", routes::vm_exec(vm)), None)
        .await
        .unwrap_or_else(|e| panic!("{vm}: {line}: {e:#}"));
    assert_eq!(v["exit_code"], 0, "{vm}: {line}: {v}");
    v["stdout"].as_str().unwrap_or_default().to_string()
}

/// `Err` with the message unless `cond` (a check of [`divergence`]).
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// The first way the daemon's records and what runs differ, if any. They agree when every
/// Running VM has one QEMU and (in an isolated group) its namespace and table, nothing of the
/// group runs or stays without a record, and the database is intact.
async fn divergence(api: &ApiClient, data: &Path, group: &str, isolated: bool) -> Result<(), String> {
    let nodes: Vec<serde_json::Value> = api.json(Method::GET, "/nodes", None).await.unwrap();
    let running: Vec<String> = nodes
        .iter()
        .filter(|n| n["status"] == "Running")
        .map(|n| n["hostname"].as_str().unwrap().to_string())
        .collect();
    let known: Vec<String> = nodes
        .iter()
        .map(|n| n["hostname"].as_str().unwrap().to_string())
        .collect();
    for h in &running {
        let name = format!("slicer-{h}");
        let own =
            slicer_hypervisor::qemu::processes_where(|args| slicer_hypervisor::qemu::args_name(args, &name, false));
        ensure!(own.len() == 1, "{h}: one QEMU");
        if isolated {
            ensure!(
                netns_exists(&format!("slicer-{h}")),
                "{h} runs without its network namespace"
            );
            ensure!(
                nft_tables().iter().any(|(_, t)| *t == format!("slicer-{h}")),
                "{h} runs without its firewall table"
            );
        }
    }
    let prefix = format!("slicer-{group}-");
    for (_, name) in slicer_testkit::qemu::hostnames_like(&format!("{group}-")) {
        ensure!(
            running.contains(&name),
            "a QEMU for {name} runs without a running record"
        );
    }
    for (_, t) in nft_tables().into_iter().filter(|(_, t)| t.starts_with(&prefix)) {
        let h = t.trim_start_matches("slicer-");
        ensure!(running.iter().any(|r| r == h), "firewall table {t} left behind");
    }
    for e in std::fs::read_dir(data.join("vms")).into_iter().flatten().flatten() {
        let h = e.file_name().to_string_lossy().into_owned();
        ensure!(known.contains(&h), "the directory of {h} stays without a record");
    }
    let ok = rusqlite::Connection::open(data.join("state.db"))
        .and_then(|c| c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0)))
        .unwrap();
    ensure!(ok == "ok", "state.db integrity");
    Ok(())
}

/// [`divergence`] comes to nothing within 10 s: a VM seen Stopped (its QEMU gone) may still
/// be having its network objects removed by its exit watcher.
async fn converged(api: &ApiClient, data: &Path, group: &str, isolated: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match divergence(api, data, group, isolated).await {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// One group `group` of 256 MiB VMs, then the groups in `extra_groups` (YAML list items).
fn config(group: &str, extra_groups: &str, network: &str, port: u16) -> String {
    format!(
        "config:\n  host_groups:\n  - name: {group}\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network: {network}\n{extra_groups}  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
    )
}

// --- kill -9 of QEMU ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn qemu_killed_during_suspend_restore_and_template_build() {
    const G: &str = "fq";
    let mut cleanup = Cleanup::new(G);
    cleanup.template_mib = Some(352);
    remove_templates_of(352);
    let dir = tempfile::Builder::new().prefix("slicer-faults-").tempdir().unwrap();
    let port = free_port();
    let net = "{mode: isolated, range: 169.254.244.0/22}";
    // A second group of a shape nobody built yet, so its template build can be killed.
    let extra = "  - name: fqt\n    count: 0\n    vcpu: 1\n    ram_mb: 352\n    network: {mode: none}\n";
    std::fs::write(dir.path().join("slicer.yaml"), config(G, extra, net, port)).unwrap();
    let (daemon, url) = up(dir.path(), "slicer.yaml", port).await;
    let api = client(dir.path(), &url);
    let data = dir.path().join("data");

    // The template build starts with the daemon: kill its QEMU, then the fallback's.
    let mut killed = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while killed < 2 && Instant::now() < deadline {
        if let Some(pid) = template_builds(352).first() {
            kill9(*pid);
            killed += 1;
            poll("the killed build QEMU to go", 30, || {
                (!template_builds(352).contains(pid)).then_some(())
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        killed, 2,
        "two template builds (shared RAM, then the fallback) were killed"
    );
    let v = create_vm(&api, "fqt", serde_json::json!({})).await;
    let d = get(&api, &routes::vm(&v)).await;
    assert_eq!(d["start_mode"], "cold", "no template: the VM boots cold: {d}");
    assert_eq!(sh(&api, &v, "echo ok").await, "ok\n");
    let ours = scratch_dirs(daemon.0.id());
    assert!(ours.is_empty(), "scratch directories left: {ours:?}");
    let _: serde_json::Value = api
        .json(Method::DELETE, &routes::group_node("fqt", &v), None)
        .await
        .unwrap();

    let vm = create_vm(&api, G, serde_json::json!({"persistent": true})).await;
    sh(&api, &vm, "echo disk > /root/mark && echo mem > /dev/shm/mark && sync").await;
    let vm_dir = data.join("vms").join(&vm);

    // Suspend, with QEMU killed while it writes the state.
    let mut landed = false;
    for _ in 0..3 {
        let (a, h) = (api.clone(), vm.clone());
        let req = tokio::spawn(async move { call(&a, Method::POST, &routes::vm_suspend(&h), None).await });
        let tmp = vm_dir.join("suspend.state.tmp");
        let pid = qemus(&format!("slicer-{vm}"))[0];
        let seen = poll("the suspend to start", 60, || {
            (tmp.exists() || req.is_finished()).then_some(tmp.exists())
        })
        .await;
        if seen {
            kill9(pid);
        }
        let (s, v) = req.await.unwrap();
        if s == 200 {
            // Finished before the kill landed: restore and try again.
            let (s, v) = call(
                &api,
                Method::POST,
                &format!("{}?wait=agent", routes::vm_restore(&vm)),
                None,
            )
            .await;
            assert_eq!(s, 200, "{v}");
            continue;
        }
        eprintln!("fault: QEMU killed during suspend -> {s} {v}");
        assert_eq!(s, 500, "{v}");
        assert!(v["error"].as_str().unwrap().contains("suspending"), "{v}");
        landed = true;
        break;
    }
    assert!(landed, "QEMU was never killed while suspending");
    // The suspend may answer before the VM's exit watcher has seen QEMU go.
    wait_stopped(&api, &vm).await;
    let d = get(&api, &routes::vm(&vm)).await;
    assert_eq!(
        d["status"], "Stopped",
        "a persistent VM whose QEMU died is stopped, not lost: {d}"
    );
    assert!(!vm_dir.join("suspend.state").exists() && !vm_dir.join("suspend.state.tmp").exists());
    converged(&api, &data, G, true).await;
    let (s, v) = call(&api, Method::POST, &routes::vm_relaunch(&vm), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(sh(&api, &vm, "cat /root/mark").await, "disk\n");

    // Restore, with QEMU killed while it loads the state: the state is kept, a retry works.
    sh(&api, &vm, "echo mem > /dev/shm/mark").await;
    let mut landed = false;
    for _ in 0..3 {
        let (s, v) = call(&api, Method::POST, &routes::vm_suspend(&vm), None).await;
        assert_eq!(s, 200, "{v}");
        let (a, h) = (api.clone(), vm.clone());
        let req = tokio::spawn(async move {
            call(
                &a,
                Method::POST,
                &format!("{}?wait=agent", routes::vm_restore(&h)),
                None,
            )
            .await
        });
        let pid = poll("the restore's QEMU", 60, || {
            qemus(&format!("slicer-{vm}")).first().copied()
        })
        .await;
        kill9(pid);
        let (s, v) = req.await.unwrap();
        if s == 200 {
            // Restored before the kill landed: the VM died running; bring it back and retry.
            wait_stopped(&api, &vm).await;
            let (s, v) = call(&api, Method::POST, &routes::vm_relaunch(&vm), None).await;
            assert_eq!(s, 200, "{v}");
            sh(&api, &vm, "echo mem > /dev/shm/mark").await;
            continue;
        }
        eprintln!("fault: QEMU killed during restore -> {s} {v}");
        assert!(s >= 500, "{s} {v}");
        landed = true;
        break;
    }
    assert!(landed, "QEMU was never killed while restoring");
    let d = get(&api, &routes::vm(&vm)).await;
    assert_eq!(d["status"], "Suspended", "{d}");
    assert!(vm_dir.join("suspend.state").exists(), "the saved state is kept");
    converged(&api, &data, G, true).await;
    let (s, v) = call(
        &api,
        Method::POST,
        &format!("{}?wait=agent", routes::vm_restore(&vm)),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(sh(&api, &vm, "cat /dev/shm/mark /root/mark").await, "mem\ndisk\n");
    converged(&api, &data, G, true).await;
    drop(daemon);
}

// --- kill -9 of the daemon ---------------------------------------------------------------------

fn kill_daemon(d: &mut Daemon) {
    kill9(d.0.id());
    let _ = d.0.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn daemon_killed_during_create_delete_and_template_build() {
    const G: &str = "fd";
    let mut cleanup = Cleanup::new(G);
    cleanup.template_mib = Some(368);
    remove_templates_of(368);
    let dir = tempfile::Builder::new().prefix("slicer-faults-").tempdir().unwrap();
    let port = free_port();
    let net = "{mode: isolated, range: 169.254.248.0/22}";
    std::fs::write(dir.path().join("slicer.yaml"), config(G, "", net, port)).unwrap();
    let data = dir.path().join("data");
    let (mut daemon, url) = up(dir.path(), "slicer.yaml", port).await;
    let api = client(dir.path(), &url);
    let keep = create_vm(&api, G, serde_json::json!({"persistent": true, "tags": ["keep"]})).await;
    sh(&api, &keep, "echo kept > /root/mark && sync").await;

    // During a create: killed once the new VM's QEMU runs.
    let a = api.clone();
    let req = tokio::spawn(async move {
        call(
            &a,
            Method::POST,
            &format!("{}?wait=agent", routes::group_nodes(G)),
            Some(serde_json::json!({})),
        )
        .await
    });
    poll("the new VM's QEMU", 120, || {
        (qemus(&format!("slicer-{G}-")).len() >= 2).then_some(())
    })
    .await;
    kill_daemon(&mut daemon);
    let _ = req.await;
    let (d, _) = up(dir.path(), "slicer.yaml", port).await;
    daemon = d;
    converged(&api, &data, G, true).await;
    assert_eq!(sh(&api, &keep, "cat /root/mark").await, "kept\n");

    // During a delete: killed once the VM's QEMU is gone, before the rest is undone.
    let vm = create_vm(&api, G, serde_json::json!({})).await;
    let pid = qemus(&format!("slicer-{vm}"))[0];
    let (a, h) = (api.clone(), vm.clone());
    let req = tokio::spawn(async move { call(&a, Method::DELETE, &routes::group_node(G, &h), None).await });
    poll("the VM's QEMU to end", 60, || {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    })
    .await;
    kill_daemon(&mut daemon);
    let _ = req.await;
    let (d, _) = up(dir.path(), "slicer.yaml", port).await;
    daemon = d;
    converged(&api, &data, G, true).await;
    let (s, _) = call(&api, Method::GET, &routes::vm(&vm), None).await;
    assert_eq!(s, 404, "the deleted VM is gone after the restart");

    // During a template build: a group of a new shape builds one at start.
    drop(daemon);
    let extra = "  - name: fdt\n    count: 0\n    vcpu: 1\n    ram_mb: 368\n    network: {mode: none}\n";
    std::fs::write(dir.path().join("slicer.yaml"), config(G, extra, net, port)).unwrap();
    let (mut d, _) = up(dir.path(), "slicer.yaml", port).await;
    let build = poll("the template build's QEMU", 120, || {
        template_builds(368).first().copied()
    })
    .await;
    let killed = d.0.id();
    kill_daemon(&mut d);
    let (d, _) = up(dir.path(), "slicer.yaml", port).await;
    let daemon = d;
    poll("the orphaned build QEMU to be stopped", 60, || {
        (!Path::new(&format!("/proc/{build}")).exists()).then_some(())
    })
    .await;
    // The template gets built again; a VM of the group then starts from it.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let v = create_vm(&api, "fdt", serde_json::json!({})).await;
        let d = get(&api, &routes::vm(&v)).await;
        let _: serde_json::Value = api
            .json(Method::DELETE, &routes::group_node("fdt", &v), None)
            .await
            .unwrap();
        if d["start_mode"] == "template" {
            break;
        }
        assert!(Instant::now() < deadline, "the template was never rebuilt");
        poll("the rebuild", 600, || template_builds(368).is_empty().then_some(())).await;
    }
    let left = scratch_dirs(killed);
    assert!(left.is_empty(), "the killed daemon's build directory stays: {left:?}");
    converged(&api, &data, G, true).await;
    // The persistent VM was stopped with the daemon before the config changed: it relaunches
    // with its disk.
    assert_eq!(get(&api, &routes::vm(&keep)).await["status"], "Stopped");
    let (s, v) = call(&api, Method::POST, &routes::vm_relaunch(&keep), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(sh(&api, &keep, "cat /root/mark").await, "kept\n");
    drop(daemon);
}

// --- a full disk, a read-only image store, a busy database -------------------------------------

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Fills the file system of `dir` until a write fails; the filler file.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    let small = vec![0x5au8; 4096];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_full_data_disk_fails_cleanly_and_recovers() {
    const G: &str = "ff";
    // Declared before the cleanup, so it is removed after the mount is gone.
    let dir = tempfile::Builder::new().prefix("slicer-faults-").tempdir().unwrap();
    let mut cleanup = Cleanup::new(G);
    let img = dir.path().join("fs.img");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::File::create(&img).unwrap().set_len(1 << 30).unwrap();
    run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
    let lo = run("losetup", &["--find", "--show", img.to_str().unwrap()]);
    cleanup.loops.push(lo.clone());
    run("mount", &[&lo, data.to_str().unwrap()]);
    cleanup.mounts.push(data.clone());

    let port = free_port();
    std::fs::write(dir.path().join("slicer.yaml"), config(G, "", "{mode: none}", port)).unwrap();
    let (daemon, url) = up(dir.path(), "slicer.yaml", port).await;
    let api = client(dir.path(), &url);
    let vm = create_vm(&api, G, serde_json::json!({"persistent": true})).await;
    sh(&api, &vm, "echo before > /root/mark && sync").await;
    let before: serde_json::Value = get(&api, "/nodes").await;
    let filler = fill(&data);

    // Create: a clear error, nothing made.
    let (s, v) = call(
        &api,
        Method::POST,
        &format!("{}?wait=agent", routes::group_nodes(G)),
        Some(serde_json::json!({})),
    )
    .await;
    eprintln!("fault: create on a full data disk -> {s} {v}");
    assert!(s >= 500 && s != 502, "{s} {v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("space") || e.contains("full")),
        "{v}"
    );
    assert_eq!(get(&api, "/nodes").await, before);
    assert_eq!(qemus(&format!("slicer-{G}-")).len(), 1);

    // cp of 32 MiB into the guest: its disk cannot grow; the guest sees the error, the cp fails.
    let blob: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let q = slicer_api::client::query(&[
        ("path", "/root/blob".to_string()),
        ("mode", "binary".into()),
        ("uid", "0".into()),
    ]);
    let r = api
        .send(
            Method::POST,
            &format!("{}?{q}", routes::vm_cp(&vm)),
            Some("application/octet-stream"),
            slicer_api::client::full(blob.clone()),
        )
        .await
        .unwrap();
    let cp_status = r.status().as_u16();
    let cp_answer =
        String::from_utf8_lossy(&r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default()).into_owned();
    // The guest may keep the file in its page cache; a sync must then fail.
    let q = slicer_api::client::query(&[
        ("cmd", "sync /root/blob".to_string()),
        ("buffered", "true".into()),
        ("uid", "0".into()),
    ]);
    let synced: serde_json::Value = api
        .json(Method::POST, &format!("{}?{q}", routes::vm_exec(&vm)), None)
        .await
        .unwrap();
    eprintln!(
        "fault: cp of 32 MiB onto a full data disk -> {cp_status} {cp_answer}; sync in the guest -> exit {} {}",
        synced["exit_code"], synced["stderr"]
    );
    assert!(
        cp_status >= 400 || synced["exit_code"] != 0,
        "a 32 MiB copy onto a full disk neither failed nor failed to sync: {synced}"
    );
    let d = get(&api, &routes::vm(&vm)).await;
    assert_eq!(d["status"], "Running", "the guest is not paused by the full disk: {d}");

    // Suspend: a clear error; the VM keeps running.
    let (s, v) = call(&api, Method::POST, &routes::vm_suspend(&vm), None).await;
    eprintln!("fault: suspend on a full data disk -> {s} {v}");
    assert!(s >= 500, "{s} {v}");
    assert_eq!(get(&api, &routes::vm(&vm)).await["status"], "Running");
    assert_eq!(sh(&api, &vm, "cat /root/mark").await, "before\n");

    // Room again: everything works, and nothing was lost.
    std::fs::remove_file(&filler).unwrap();
    let v2 = create_vm(&api, G, serde_json::json!({})).await;
    let _: serde_json::Value = api
        .json(Method::DELETE, &routes::group_node(G, &v2), None)
        .await
        .unwrap();
    // The guest met write errors (reported to it, not a paused VM): its ext4 may have gone
    // read-only (errors=remount-ro). A restart of the guest brings it back with what it synced.
    let (s, v) = call(&api, Method::POST, &routes::vm_shutdown(&vm), None).await;
    assert_eq!(s, 200, "{v}");
    wait_stopped(&api, &vm).await;
    let (s, v) = call(&api, Method::POST, &routes::vm_relaunch(&vm), None).await;
    assert_eq!(s, 200, "{v}");
    sh(&api, &vm, "rm -f /root/blob; echo after > /root/mark2 && sync").await;
    let (s, v) = call(&api, Method::POST, &routes::vm_suspend(&vm), None).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(
        &api,
        Method::POST,
        &format!("{}?wait=agent", routes::vm_restore(&vm)),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(sh(&api, &vm, "cat /root/mark /root/mark2").await, "before\nafter\n");
    converged(&api, &data, G, false).await;
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_read_only_image_store_and_a_busy_database() {
    const G: &str = "fr";
    // Declared before the cleanup, so it is removed after the bind mount of the image store
    // is gone (never through it).
    let dir = tempfile::Builder::new().prefix("slicer-faults-").tempdir().unwrap();
    let mut cleanup = Cleanup::new(G);
    cleanup.template_mib = Some(336);
    remove_templates_of(336);
    let ro = dir.path().join("images-ro");
    std::fs::create_dir(&ro).unwrap();
    run("mount", &["--bind", &images_dir(), ro.to_str().unwrap()]);
    cleanup.mounts.push(ro.clone());
    run("mount", &["-o", "remount,bind,ro", ro.to_str().unwrap()]);

    // A shape with no template: the build cannot write to the store, so VMs boot cold.
    let port = free_port();
    let cfg = config(G, "", "{mode: none}", port).replace("ram_mb: 256", "ram_mb: 336");
    std::fs::write(dir.path().join("slicer.yaml"), cfg).unwrap();
    let (daemon, url) = up_with(
        dir.path(),
        "slicer.yaml",
        port,
        &[("SLICER_IMAGES_DIR", ro.to_str().unwrap())],
    )
    .await;
    let api = client(dir.path(), &url);
    let vm = create_vm(&api, G, serde_json::json!({"persistent": true})).await;
    assert_eq!(get(&api, &routes::vm(&vm)).await["start_mode"], "cold");
    assert_eq!(sh(&api, &vm, "echo ok").await, "ok\n");

    // The state database locked by another process: a clear error within the busy timeout,
    // nothing made; once it is free, the same request works.
    let data = dir.path().join("data");
    let before: serde_json::Value = get(&api, "/nodes").await;
    let lock = rusqlite::Connection::open(data.join("state.db")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let t = Instant::now();
    let (s, v) = call(
        &api,
        Method::POST,
        &format!("{}?wait=agent", routes::group_nodes(G)),
        Some(serde_json::json!({})),
    )
    .await;
    eprintln!(
        "fault: create with the state database locked -> {s} {v} after {:?}",
        t.elapsed()
    );
    assert_eq!(s, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("busy"), "{v}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let (s, v) = call(
        &api,
        Method::PATCH,
        &routes::vm_tags(&vm),
        Some(serde_json::json!({"add": ["x"]})),
    )
    .await;
    assert_eq!(s, 503, "{v}");
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    assert_eq!(get(&api, "/nodes").await, before);
    assert_eq!(qemus(&format!("slicer-{G}-")).len(), 1);
    let v2 = create_vm(&api, G, serde_json::json!({})).await;
    let _: serde_json::Value = api
        .json(Method::DELETE, &routes::group_node(G, &v2), None)
        .await
        .unwrap();
    converged(&api, &data, G, false).await;
    drop(daemon);
}
