//! Every QEMU runs jailed: its own uid, no capabilities, seccomp, no_new_privs, a root that
//! holds only its own files, and a cgroup with the VM's limits; the jail and the bounded
//! console cost nothing in function (exec, suspend/resume) and are gone with the VM.

mod common;

use std::time::{Duration, Instant};

use common::{boot, fixture, pid_alive};
use slicer_vmm::ExecRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn qemu_runs_jailed_with_its_own_uid_root_and_cgroup() {
    let f = fixture();
    // A descriptor some part of the daemon opened without close-on-exec: no QEMU inherits it.
    let marker = f.tmp.path().join("leaked-descriptor");
    std::fs::write(&marker, b"").unwrap();
    let c_marker = std::ffi::CString::new(marker.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: open(2) of a file we made; closed at the end of the test.
    let leaked = unsafe { libc::open(c_marker.as_ptr(), libc::O_RDONLY) };
    assert!(leaked >= 0);
    let a = boot(&f, "jail-a", "min").await;
    let b = boot(&f, "jail-b", "min").await;
    let jc = f.host.jail.as_ref().expect("tests run as root: VMs are jailed");
    for vm in [&a, &b] {
        let c = slicer_jail::inspect(vm.pid()).expect("QEMU runs");
        assert!(jc.pool.range().contains(&c.uid), "uid {} not from the pool", c.uid);
        assert_ne!(c.gid, 0);
        assert_eq!((c.cap_eff, c.cap_prm, c.cap_bnd), (0, 0, 0), "{c:?}");
        assert_eq!(c.seccomp, 2, "QEMU's seccomp filter is on");
        assert!(c.no_new_privs);
        assert!(c.own_mount_ns && c.own_net_ns, "{c:?}");
        // Its root: /usr and links into it, /dev, /etc (ld.so.cache) and the paths of its own files.
        let top = f
            .tmp
            .path()
            .components()
            .nth(1)
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        for e in &c.root_entries {
            assert!(
                ["usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32", "dev", "etc", "var", &top]
                    .contains(&e.as_str()),
                "unexpected {e:?} in the jail's root: {:?}",
                c.root_entries
            );
        }
        let root = std::path::PathBuf::from(format!("/proc/{}/root", vm.pid()));
        assert!(root
            .join(vm.dir().strip_prefix("/").unwrap())
            .join("disk.qcow2")
            .exists());
        assert!(!root.join("etc/passwd").exists() && !root.join("root").exists());
        // Of its directory it sees the disk alone (its sockets are inherited descriptors, its
        // logs the daemon's), and it can create nothing there.
        let seen: Vec<String> = std::fs::read_dir(root.join(vm.dir().strip_prefix("/").unwrap()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(seen, ["disk.qcow2"], "the jail's view of the VM directory");
        let m = std::fs::metadata(vm.dir()).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&m), 0, "the VM directory is root's");
        let held: Vec<std::path::PathBuf> = std::fs::read_dir(format!("/proc/{}/fd", vm.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .collect();
        assert!(
            !held.contains(&marker),
            "QEMU inherited a descriptor it was not given: {held:?}"
        );
        let other = if vm.name == "jail-a" { &b } else { &a };
        assert!(
            !root.join(other.dir().strip_prefix("/").unwrap()).exists(),
            "sees another VM's directory"
        );
        // Its cgroup carries the VM's limits.
        if let Some(h) = &jc.cgroups {
            let cg = jc.cgroup_of(&vm.name).expect("a cgroup per VM");
            assert!(cg.pids().contains(&vm.pid()));
            assert!(
                c.cgroups.iter().any(|p| p.ends_with(&format!("slicer/{}", vm.name))),
                "{c:?}"
            );
            let limit = cg.memory_stat(h, "memory.max", "memory.limit_in_bytes").unwrap();
            assert_eq!(limit, (256 << 20) + slicer_vmm::vm_overhead_bytes(256 << 20));
        }
    }
    let (ca, cb) = (
        slicer_jail::inspect(a.pid()).unwrap(),
        slicer_jail::inspect(b.pid()).unwrap(),
    );
    assert_ne!(ca.uid, cb.uid, "two running VMs never share a uid");

    // Works as before: exec, and a suspend/resume through descriptors.
    let out = a
        .agent()
        .exec_output(&ExecRequest::argv(["echo", "hi"]), None)
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hi\n");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(a.dir()).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);

    let (pid, cg) = (a.pid(), jc.cgroup_of("jail-a"));
    a.stop(Duration::ZERO).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (pid_alive(pid) || cg.as_ref().is_some_and(|c| c.exists())) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!pid_alive(pid));
    assert!(!cg.is_some_and(|c| c.exists()), "the cgroup goes with the VM");
    b.stop(Duration::ZERO).await.unwrap();
    assert!(jc.cgroup_of("jail-b").is_none());
    // SAFETY: the descriptor opened above.
    unsafe { libc::close(leaked) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn console_log_is_bounded_and_rotates() {
    let f = fixture();
    let vm = boot(&f, "jail-console", "min").await;
    // About 3 MiB onto the serial console, as fast as the guest can.
    let out = vm
        .agent()
        .exec_output(
            &ExecRequest::shell("head -c 3500000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo done"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(out.stdout, b"done\n");
    let log = vm.console_log().to_path_buf();
    let rotated = log.with_extension("log.1");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !rotated.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let b = std::fs::metadata(&rotated).map(|m| m.len()).unwrap_or(0);
    assert!(b > 0, "the console log rotated");
    assert!(
        a <= slicer_hypervisor::console::LOG_MAX && b <= slicer_hypervisor::console::LOG_MAX,
        "{a} {b}"
    );
    let cg = f.host.jail.as_ref().and_then(|j| j.cgroup_of("jail-console"));
    vm.stop(Duration::ZERO).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cg.as_ref().is_some_and(|c| c.exists()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!cg.is_some_and(|c| c.exists()), "the cgroup goes with the VM");
}
