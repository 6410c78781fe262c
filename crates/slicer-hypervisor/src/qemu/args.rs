//! QEMU's command line: the kernel's arguments and QEMU's own, from a [`QemuConfig`].

use std::path::Path;

use super::{QemuConfig, RamBacking, SANDBOX, TCG_TB_MIB};
use crate::accel::{host_tsc_khz, Accel};

/// Must match `slicer_agent_proto::AGENT_PORT_NAME` (kept here to avoid the dependency).
const AGENT_PORT_NAME: &str = "slicer.agent";

/// The descriptors of the listening sockets a QEMU inherits for its agent port, QMP and
/// serial console.
///
/// The caller binds them at their paths (in the VM's directory, which only root can write)
/// and QEMU only accepts on them: QEMU needs no directory it can write, and a path the daemon
/// connects to is never one the VM's uid could have replaced with a link (to another VM's
/// agent socket, say).
#[derive(Debug, Clone, Copy)]
pub struct SocketFds {
    pub agent: i32,
    pub qmp: i32,
    pub console: Option<i32>,
}

/// A path as one QEMU argument.
fn p(path: &Path) -> String {
    path.display().to_string()
}

impl QemuConfig {
    /// The full kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut c = vec![
            "console=ttyS0".to_string(),
            "reboot=t".into(),
            "panic=-1".into(),
            "quiet".into(),
            "root=/dev/vda".into(),
            "rw".into(),
        ];
        if self.accel == Accel::Tcg {
            // Under TCG the PIT calibration of TSC/LAPIC fails when the host is busy.
            if let Some(khz) = host_tsc_khz() {
                c.push(format!("tsc_early_khz={khz}"));
            }
            c.push("tsc=reliable".into());
            // The IO-APIC timer check counts PIT ticks in a busy loop; on a loaded host TCG
            // misses them and the kernel panics ("IO-APIC + timer doesn't work", seen in a
            // burst of 16 cold boots on 2 cores). The timer does work: skip the check.
            c.push("no_timer_check".into());
        }
        c.extend(self.cmdline.iter().cloned());
        c.join(" ")
    }

    /// The argument vector (without the binary). A restoring QEMU reads its state from
    /// descriptor 3 here; [`QemuProcess::spawn`](super::QemuProcess::spawn) passes the descriptor it actually hands over.
    pub fn args(&self) -> Vec<String> {
        self.args_with(
            3,
            Some(4),
            &SocketFds {
                agent: 5,
                qmp: 6,
                console: self.console_socket.as_ref().map(|_| 7),
            },
        )
    }

    /// `tap_fd`: the descriptor of an opened TAP (jailed QEMUs cannot open one themselves);
    /// `sockets`: the listening sockets the caller bound (see [`SocketFds`]).
    pub(super) fn args_with(&self, incoming_fd: i32, tap_fd: Option<i32>, sockets: &SocketFds) -> Vec<String> {
        let mut a = self.machine_args();
        a.extend(self.device_args(sockets));
        a.extend(self.net_args(tap_fd));
        a.extend(self.ram_args());
        a.extend(self.incoming_args(incoming_fd));
        if self.jail.is_some() {
            a.extend(["-sandbox".into(), SANDBOX.into()]);
        }
        a
    }

    /// The process name, machine type and accelerator (and the host's CPU model under KVM).
    fn machine_args(&self) -> Vec<String> {
        let machine = match &self.ram {
            Some(_) => "microvm,x-option-roms=off,acpi=off,memory-backend=slicer.ram",
            None => "microvm,x-option-roms=off,acpi=off",
        };
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("slicer-{}", self.name),
            "-M".into(),
            machine.into(),
            "-accel".into(),
            match self.accel {
                Accel::Tcg => format!("tcg,tb-size={TCG_TB_MIB}"),
                Accel::Kvm => "kvm".into(),
            },
        ];
        if self.accel == Accel::Kvm {
            a.extend(["-cpu".into(), "host".into()]);
        }
        a
    }

    /// Size, kernel, serial console, root disk, the agent's port, entropy and QMP.
    fn device_args(&self, sockets: &SocketFds) -> Vec<String> {
        vec![
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            p(&self.kernel),
            "-append".into(),
            self.kernel_cmdline(),
            "-chardev".into(),
            match sockets.console {
                Some(fd) => format!("socket,id=console,fd={fd},server=on,wait=off"),
                None => format!("file,id=console,path={},append=on", p(&self.console_log)),
            },
            "-serial".into(),
            "chardev:console".into(),
            "-drive".into(),
            // A full host disk fails the guest's write (ENOSPC/EIO in the guest) instead of
            // pausing the VM (QEMU's default), so one tenant filling it freezes nobody.
            format!(
                "id=root,file={},format=qcow2,if=none,discard=unmap,werror=report,rerror=report",
                p(&self.disk)
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-device".into(),
            "virtio-serial-device,max_ports=2".into(),
            "-chardev".into(),
            format!("socket,id=agent,fd={},server=on,wait=off", sockets.agent),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={}", AGENT_PORT_NAME),
            "-device".into(),
            "virtio-rng-device".into(),
            "-chardev".into(),
            format!("socket,id=qmp,fd={},server=on,wait=off", sockets.qmp),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]
    }

    /// The NIC and its backend, if the VM has a network.
    fn net_args(&self, tap_fd: Option<i32>) -> Vec<String> {
        let Some(n) = &self.net else { return Vec::new() };
        let backend = match (&n.tap, self.jail.is_some()) {
            (Some(_), true) => format!("tap,id=net0,fd={}", tap_fd.unwrap_or(-1)),
            (Some(tap), false) => format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
            (None, _) => "hubport,id=net0,hubid=0".to_string(),
        };
        vec![
            "-netdev".into(),
            backend,
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={}", n.mac),
        ]
    }

    /// The memory backend named `slicer.ram`, if RAM is not QEMU's own anonymous memory.
    fn ram_args(&self) -> Vec<String> {
        let Some(ram) = &self.ram else { return Vec::new() };
        let (path, share) = match ram {
            RamBacking::SharedFile(f) => (p(f), "on"),
            RamBacking::PrivateFd(fd) => (format!("/proc/self/fd/{fd}"), "off"),
            RamBacking::SharedFd(fd) => (format!("/proc/self/fd/{fd}"), "on,prealloc=on"),
            RamBacking::Anonymous => (String::new(), ""),
        };
        let object = if path.is_empty() {
            format!("memory-backend-ram,id=slicer.ram,size={}M", self.memory_mib)
        } else {
            format!(
                "memory-backend-file,id=slicer.ram,size={}M,mem-path={path},share={share}",
                self.memory_mib
            )
        };
        vec!["-object".into(), object]
    }

    /// Where a restore's state comes from (nothing for a boot).
    fn incoming_args(&self, incoming_fd: i32) -> Vec<String> {
        if self.loads_through_qmp() {
            // The caller sets the migration capabilities and hands the state over through QMP
            // (`Qmp::incoming`): capabilities must be set before loading.
            vec!["-incoming".into(), "defer".into()]
        } else if self.incoming.is_some() {
            // The state file is opened by `spawn` and inherited: QEMU reads the file directly
            // (through a `cat` pipe, loads took longer and varied more).
            vec!["-incoming".into(), format!("fd:{incoming_fd}")]
        } else {
            Vec::new()
        }
    }
}
