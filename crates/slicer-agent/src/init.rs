//! What the agent does as PID 1 of the `min` image, and power handling in both modes.
//!
//! The guest has no ACPI (QEMU microvm with `acpi=off`, like Firecracker), so "power off" is a
//! reboot: QEMU runs with `-no-reboot` and the kernel with `reboot=t`, so the VM process exits.

use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use slicer_agent_proto::PowerAction;

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    if let Err(e) = mount(Some(source), target, Some(fstype), flags, data) {
        if e != nix::errno::Errno::EBUSY {
            eprintln!("slicer-agent: mount {fstype} on {target}: {e}");
        }
    }
}

/// Mounts, identity and loopback, before anything else runs.
pub fn early_setup() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nosuid, None);
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None);
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"));
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    );
    mount_fs(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, None);
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    configure_identity();
    loopback_up();
}

/// Boot parameters slicer passes on the kernel command line.
#[derive(Default, Debug, PartialEq)]
pub struct BootParams {
    pub hostname: Option<String>,
    pub dns: Vec<String>,
    /// `systemd.machine_id=` (systemd reads it too; as PID 1 the agent writes it).
    pub machine_id: Option<String>,
}

pub fn parse_cmdline(cmdline: &str) -> BootParams {
    let mut p = BootParams::default();
    for word in cmdline.split_whitespace() {
        if let Some(h) = word.strip_prefix("slicer.hostname=") {
            p.hostname = Some(h.to_string());
        } else if let Some(m) = word.strip_prefix("systemd.machine_id=") {
            p.machine_id = Some(m.to_string());
        } else if let Some(d) = word.strip_prefix("slicer.dns=") {
            p.dns = d.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
        }
    }
    p
}

/// Grows the root filesystem to its disk: a VM's disk may be larger than the image
/// (`storage_size`). ext4 grows online; a no-op when the sizes already match.
pub async fn grow_root(reaper: std::sync::Arc<crate::reaper::Reaper>) {
    let Ok(sectors) = std::fs::read_to_string("/sys/block/vda/size") else {
        return;
    };
    let Ok(sectors) = sectors.trim().parse::<u64>() else {
        return;
    };
    let Ok(st) = nix::sys::statvfs::statvfs("/") else {
        return;
    };
    let fs_bytes = st.blocks() * st.fragment_size();
    if sectors * 512 <= fs_bytes + (64 << 20) {
        return;
    }
    // The reaper collects every child, so wait through it rather than with std's wait.
    let child = std::process::Command::new("resize2fs")
        .arg("/dev/vda")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match child {
        Ok(c) => match reaper.register(c.id() as i32).await {
            Ok(st) if st.success() => eprintln!("slicer-agent: grew / to {} MiB", (sectors * 512) >> 20),
            Ok(st) => eprintln!("slicer-agent: resize2fs /dev/vda failed: {st:?}"),
            Err(_) => {}
        },
        Err(e) => eprintln!("slicer-agent: resize2fs: {e}"),
    }
}

/// Hostname, machine-id and DNS from the kernel command line (both modes).
pub fn configure_identity() {
    if std::path::Path::new(crate::identity::APPLIED).exists() {
        return; // a restored VM: its identity came through the agent, not the command line
    }
    let params = parse_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if let Some(h) = &params.hostname {
        if let Err(e) = crate::identity::set_hostname(h) {
            eprintln!("slicer-agent: hostname {h}: {e}");
        }
    }
    if let Some(m) = params.machine_id.filter(|m| slicer_agent_proto::valid_machine_id(m)) {
        // Under systemd, PID 1 has already taken it from the command line.
        if std::fs::read_to_string("/etc/machine-id")
            .map(|c| c.trim() != m)
            .unwrap_or(true)
        {
            if let Err(e) = std::fs::write("/etc/machine-id", format!("{m}\n")) {
                eprintln!("slicer-agent: /etc/machine-id: {e}");
            }
        }
    }
    if !params.dns.is_empty() {
        if let Err(e) = crate::identity::set_dns(&params.dns) {
            eprintln!("slicer-agent: /etc/resolv.conf: {e}");
        }
    }
}

fn loopback_up() {
    // SAFETY: plain ioctls on a socket we own, with a zeroed and NUL-terminated ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return;
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut ifr) == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr);
        }
        libc::close(fd);
    }
}

/// As PID 1: SIGTERM, SIGINT (ctrl-alt-del) and SIGPWR power the guest off.
pub fn spawn_signal_handlers() {
    use tokio::signal::unix::{signal, SignalKind};
    for kind in [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::from_raw(libc::SIGPWR),
    ] {
        if let Ok(mut s) = signal(kind) {
            tokio::spawn(async move {
                if s.recv().await.is_some() {
                    power(PowerAction::Poweroff, true).await;
                }
            });
        }
    }
}

fn other_processes_alive() -> bool {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.chars().all(|c| c.is_ascii_digit())
                    && name != me
                    // kernel threads have an empty cmdline
                    && std::fs::read(e.path().join("cmdline")).map(|c| !c.is_empty()).unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

/// Shuts the guest down. As PID 1: TERM everyone, wait briefly, KILL, sync, remount read-only,
/// reboot. Under an init system: ask it to reboot.
pub async fn power(action: PowerAction, pid1: bool) {
    eprintln!("slicer-agent: {action:?} requested");
    if !pid1 {
        let ok = tokio::process::Command::new("systemctl")
            .arg("reboot")
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = tokio::process::Command::new("reboot").arg("-f").status().await;
        }
        return;
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while other_processes_alive() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    halt_forever();
}

/// Syncs, remounts root read-only and reboots (which ends the VM). Never returns.
pub fn halt_forever() -> ! {
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Not PID 1 or not permitted: nothing else to do.
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_params() {
        let p = parse_cmdline("console=ttyS0 slicer.hostname=vm-1 quiet slicer.dns=1.1.1.1,8.8.8.8");
        assert_eq!(p.hostname.as_deref(), Some("vm-1"));
        assert_eq!(p.dns, vec!["1.1.1.1", "8.8.8.8"]);
        let m = parse_cmdline("systemd.machine_id=0123456789abcdef0123456789abcdef");
        assert_eq!(m.machine_id.as_deref(), Some("0123456789abcdef0123456789abcdef"));
        assert_eq!(parse_cmdline("quiet"), BootParams::default());
    }
}
