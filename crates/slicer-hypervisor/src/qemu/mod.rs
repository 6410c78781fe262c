//! One QEMU `microvm` process per VM: its configuration here, its command line in `args`,
//! its start in `spawn`, the /proc scans that find QEMUs in `procfs`.

mod args;
mod procfs;
mod spawn;

use std::path::{Path, PathBuf};

use crate::{Error, Result};
use tokio::sync::watch;

use crate::accel::Accel;
pub use args::SocketFds;
pub use procfs::{args_name, process_start_time, processes_where};
pub use spawn::pipe;

/// Everything a QEMU microvm needs; built by the VM manager from a VM's resources.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub binary: PathBuf,
    pub name: String,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    /// Kernel arguments beyond the ones every slicer guest gets.
    pub cmdline: Vec<String>,
    /// The VM's qcow2 root disk.
    pub disk: PathBuf,
    pub agent_socket: PathBuf,
    pub qmp_socket: PathBuf,
    pub console_log: PathBuf,
    /// Where the serial console goes: `None` appends it to `console_log` (QEMU writes the file,
    /// unbounded: for throwaway VMs), `Some(socket)` serves it on a UNIX socket that the VM
    /// library reads into a bounded log (see `slicer_vmm::console`).
    pub console_socket: Option<PathBuf>,
    /// QEMU's own stderr.
    pub qemu_log: PathBuf,
    /// A NIC on a TAP device, if the VM has a network.
    pub net: Option<QemuNet>,
    /// Start from a saved state (`-incoming`) instead of booting: QEMU loads the file and
    /// stays paused until QMP `cont`.
    pub incoming: Option<PathBuf>,
    /// Run QEMU jailed: unprivileged, in its own mount namespace and cgroup, with QEMU's
    /// seccomp sandbox (see the `slicer-jail` crate). `None` runs it as the caller.
    pub jail: Option<Jail>,
    /// Where guest RAM lives; `None`: anonymous memory of QEMU's own.
    pub ram: Option<RamBacking>,
}

/// Guest RAM in a file (`memory-backend-file`), for templates whose clones share it. Both
/// sides migrate with `x-ignore-shared` (set through QMP): a saved state then holds devices,
/// not RAM, and a restore starts with `-incoming defer`.
#[derive(Debug, Clone, PartialEq)]
pub enum RamBacking {
    /// RAM is this file, mapped shared: what the guest writes lands in it (a template build;
    /// the file is the template's memory once it is saved).
    SharedFile(PathBuf),
    /// RAM is mapped privately (copy-on-write) from this inherited descriptor, opened through
    /// `/proc/self/fd/N`: a template's sealed memory, shared by every clone until written.
    PrivateFd(i32),
    /// RAM is this inherited descriptor (a memfd the caller keeps), mapped shared through
    /// `/proc/self/fd/N` and allocated up front (`prealloc`): a live capture, which then loads
    /// a stream into memory already there, and whose memory outlives its QEMU in the caller.
    SharedFd(i32),
    /// Anonymous RAM under the same name (`slicer.ram`), so that a suspended clone's state,
    /// whose RAM block carries that name, loads into it.
    Anonymous,
}

impl RamBacking {
    /// The descriptor QEMU inherits and opens through `/proc/self/fd/N`, if any (its jail then
    /// needs a procfs, and an incoming state comes through QMP).
    pub fn inherited_fd(&self) -> Option<i32> {
        match self {
            RamBacking::PrivateFd(fd) | RamBacking::SharedFd(fd) => Some(*fd),
            RamBacking::SharedFile(_) | RamBacking::Anonymous => None,
        }
    }
}

/// The jail of one QEMU: what it may see and be, and the cgroup it runs in.
#[derive(Debug, Clone)]
pub struct Jail {
    pub spec: slicer_jail::JailSpec,
    pub cgroup: Option<slicer_jail::Cgroup>,
}

/// QEMU's seccomp filter for jailed VMs: no obsolete syscalls, no privilege changes, no new
/// processes, no scheduler or resource changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// TCG's translation buffer in MiB: QEMU's default reserves 1 GiB that a busy guest can fill;
/// this bounds QEMU's memory beside guest RAM (see `slicer_vmm::vm_overhead_bytes`).
pub const TCG_TB_MIB: u32 = 128;

/// A virtio-net NIC backed by a TAP device, optionally inside a network namespace (QEMU then
/// runs in that namespace; its UNIX sockets still work, they live in the filesystem).
#[derive(Debug, Clone)]
pub struct QemuNet {
    pub netns: Option<String>,
    /// The TAP behind the NIC; `None` gives a NIC with nothing behind it (an otherwise empty
    /// hub port), as a template has: the device is what a saved state must match, not its backend.
    pub tap: Option<String>,
    pub mac: String,
    /// Jailed QEMUs with `netns: None` only: make the TAP in a new, empty network namespace of
    /// the VM's own (a NIC wired to nothing that still has a TAP's offloads, as a saved state
    /// of a VM on a TAP requires) instead of opening an existing one in the host's.
    pub own_netns: bool,
}

impl QemuConfig {
    /// Whether QEMU joins its cgroup after `exec` rather than before: for a restore, whose
    /// guest cannot run before QMP `cont`. Moving a process into a cgroup costs an RCU grace
    /// period (6-15 ms measured on cgroup v1, whichever hierarchy comes first), which then
    /// overlaps QEMU's start and state load instead of delaying them; `cont` waits for the move
    /// ([`QemuProcess::joined`]). Pages loaded before the move (at most the saved state, which
    /// no guest code has run on yet) stay charged to the daemon's cgroup.
    pub(super) fn joins_cgroup_later(&self) -> bool {
        self.incoming.is_some() && self.jail.as_ref().is_some_and(|j| j.cgroup.is_some())
    }

    /// Whether an incoming QEMU starts with `-incoming defer` and is handed its state through
    /// QMP: when its RAM is an inherited descriptor (a template's clone maps one privately and
    /// sets `x-ignore-shared` first; a live capture loads a full stream into a shared one).
    pub(super) fn loads_through_qmp(&self) -> bool {
        self.incoming.is_some() && self.ram.as_ref().and_then(RamBacking::inherited_fd).is_some()
    }
}

/// QEMU's version line (`QEMU emulator version 7.2.x ...`): saved states are only restored
/// by the version that wrote them.
pub async fn version(binary: &Path) -> Result<String> {
    let out = tokio::process::Command::new(binary)
        .arg("--version")
        .output()
        .await
        .map_err(|e| Error::io(format!("running {} --version", binary.display()), e))?;
    if !out.status.success() {
        return Err(Error::Version {
            binary: binary.to_path_buf(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Removes a VM's cgroup after its QEMU exited (a moment later, the kernel may still be
/// tearing the process down).
async fn remove_cgroup(cgroup: Option<slicer_jail::Cgroup>) {
    if let Some(cg) = cgroup {
        match tokio::task::spawn_blocking(move || cg.remove()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(e) => tracing::warn!("removing a cgroup: {e}"),
        }
    }
}

/// The absolute path of `program` on PATH (or the standard directories).
pub fn which(program: &Path) -> Option<PathBuf> {
    if program.is_absolute() {
        return Some(program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A running QEMU process.
pub struct QemuProcess {
    pub pid: u32,
    exited: watch::Receiver<Option<Exit>>,
    /// A restore's move into its cgroup (see [`QemuProcess::joined`]).
    deferred: std::sync::Mutex<Option<tokio::task::JoinHandle<std::io::Result<()>>>>,
}

/// How a QEMU process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Its exit status (it was our child).
    Status(std::process::ExitStatus),
    /// It ended, how is not known: it was adopted from an earlier daemon (not our child, so
    /// its status goes to its new parent), or waiting for it failed.
    Unknown,
}

impl Exit {
    /// Whether it exited with status 0 (`false` when unknown).
    pub fn success(&self) -> bool {
        matches!(self, Exit::Status(s) if s.success())
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Status(s) => write!(f, "{s}"),
            Exit::Unknown => f.write_str("exit status unknown"),
        }
    }
}

impl QemuProcess {
    /// Takes over a QEMU that an earlier daemon started (not our child): its exit is watched
    /// through a pidfd. `start_time` must match, so a reused pid is never adopted.
    pub fn adopt(pid: u32, start_time: u64, cgroup: Option<slicer_jail::Cgroup>) -> Result<QemuProcess> {
        if process_start_time(pid) != Some(start_time) {
            return Err(Error::NotTheRecordedProcess { pid });
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(Error::io(format!("pidfd_open({pid})"), std::io::Error::last_os_error()));
        }
        // SAFETY: the descriptor was just returned by pidfd_open and is owned by nobody else.
        let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        // SAFETY: the AsyncFd owns the descriptor for its whole life.
        let afd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
            .map_err(|e| Error::io(format!("watching process {pid}"), e.into()))?;
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            // A pidfd becomes readable when the process exits.
            let _ = afd.readable().await;
            remove_cgroup(cgroup).await;
            // Not our child: how it ended cannot be read (only a parent can wait for it).
            let _ = tx.send(Some(Exit::Unknown));
        });
        Ok(QemuProcess {
            pid,
            exited: rx,
            deferred: std::sync::Mutex::new(None),
        })
    }

    /// Reads the console socket into the bounded console log until QEMU exits.
    pub fn follow_console(&self, socket: PathBuf, log: PathBuf) {
        let mut exited = self.exited.clone();
        crate::console::follow_console(socket, log, async move {
            let _ = exited.wait_for(|s| s.is_some()).await;
        });
    }

    /// For a restore: waits until QEMU is in its cgroup (call before the guest may run, i.e.
    /// before QMP `cont`); on failure QEMU is killed. A no-op otherwise.
    pub async fn joined(&self) -> Result<()> {
        let deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(join) = deferred else { return Ok(()) };
        let joined = join.await.map_err(std::io::Error::other).and_then(|r| r);
        if let Err(source) = joined {
            self.kill();
            return Err(Error::CgroupJoin { source });
        }
        Ok(())
    }

    /// This process's start time (see [`process_start_time`]).
    pub fn start_time(&self) -> Option<u64> {
        process_start_time(self.pid)
    }

    /// How QEMU ended, once it has.
    pub fn try_status(&self) -> Option<Exit> {
        *self.exited.borrow()
    }

    /// Waits until QEMU exits.
    pub async fn wait(&self) -> Option<Exit> {
        let mut rx = self.exited.clone();
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return Some(s);
            }
            if rx.changed().await.is_err() {
                return *rx.borrow();
            }
        }
    }

    pub fn kill(&self) {
        if self.try_status().is_none() {
            // SAFETY: kill(2) with our child's pid; it has not been reaped (no status yet).
            unsafe {
                libc::kill(self.pid as i32, libc::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_adopted_process_ends_with_an_unknown_status_not_success() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .expect("sleep runs");
        let start = process_start_time(child.id()).expect("its start time");
        let adopted = QemuProcess::adopt(child.id(), start, None).expect("adopted");
        let exit = tokio::time::timeout(std::time::Duration::from_secs(10), adopted.wait())
            .await
            .expect("the exit is seen");
        assert_eq!(exit, Some(Exit::Unknown));
        assert!(!Exit::Unknown.success());
        let _ = child.wait();
    }

    fn cfg(accel: Accel) -> QemuConfig {
        QemuConfig {
            binary: "qemu-system-x86_64".into(),
            name: "t-1".into(),
            accel,
            cpus: 1,
            memory_mib: 256,
            kernel: "/k".into(),
            cmdline: vec!["init=/x".into()],
            disk: "/d.qcow2".into(),
            agent_socket: "/a.sock".into(),
            qmp_socket: "/q.sock".into(),
            console_log: "/c.log".into(),
            console_socket: None,
            qemu_log: "/q.log".into(),
            net: None,
            incoming: None,
            ram: None,
            jail: None,
        }
    }

    #[test]
    fn tcg_gets_tsc_parameters_and_kvm_gets_host_cpu() {
        let t = cfg(Accel::Tcg);
        assert!(t.kernel_cmdline().contains("tsc=reliable"));
        assert!(t.kernel_cmdline().contains("no_timer_check"));
        assert!(t.kernel_cmdline().ends_with("init=/x"));
        assert!(!t.args().contains(&"host".to_string()));
        let k = cfg(Accel::Kvm);
        assert!(!k.kernel_cmdline().contains("tsc="));
        assert!(k.args().windows(2).any(|w| w == ["-cpu", "host"]));
        assert!(k.args().iter().any(|a| a.contains("acpi=off")));
    }

    #[test]
    fn templates_get_a_detached_nic_and_restores_an_incoming_state() {
        let mut c = cfg(Accel::Tcg);
        c.net = Some(QemuNet {
            own_netns: false,
            netns: None,
            tap: None,
            mac: "02:00:00:00:00:01".into(),
        });
        c.incoming = Some("/data/state".into());
        let a = c.args();
        assert!(a.windows(2).any(|w| w == ["-netdev", "hubport,id=net0,hubid=0"]));
        assert!(a.windows(2).any(|w| w == ["-incoming", "fd:3"]));
        // Sockets are inherited descriptors, never paths QEMU creates.
        assert!(a.iter().any(|x| x == "socket,id=agent,fd=5,server=on,wait=off"));
        assert!(a.windows(2).any(|w| w == ["-mon", "chardev=qmp,mode=control"]));
        assert!(!a.iter().any(|x| x.contains("path=/a.sock") || x.contains("/q.sock")));
    }
}
