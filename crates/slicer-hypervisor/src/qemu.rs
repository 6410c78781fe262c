//! One QEMU `microvm` process per VM.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::{Error, Result};
use tokio::sync::watch;

use crate::accel::{host_tsc_khz, Accel};

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
    /// descriptor 3 here; [`QemuProcess::spawn`] passes the descriptor it actually hands over.
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

    /// Whether QEMU joins its cgroup after `exec` rather than before: for a restore, whose
    /// guest cannot run before QMP `cont`. Moving a process into a cgroup costs an RCU grace
    /// period (6-15 ms measured on cgroup v1, whichever hierarchy comes first), which then
    /// overlaps QEMU's start and state load instead of delaying them; `cont` waits for the move
    /// ([`QemuProcess::joined`]). Pages loaded before the move (at most the saved state, which
    /// no guest code has run on yet) stay charged to the daemon's cgroup.
    fn joins_cgroup_later(&self) -> bool {
        self.incoming.is_some() && self.jail.as_ref().is_some_and(|j| j.cgroup.is_some())
    }

    /// Whether an incoming QEMU starts with `-incoming defer` and is handed its state through
    /// QMP: when its RAM is an inherited descriptor (a template's clone maps one privately and
    /// sets `x-ignore-shared` first; a live capture loads a full stream into a shared one).
    fn loads_through_qmp(&self) -> bool {
        self.incoming.is_some() && self.ram.as_ref().and_then(RamBacking::inherited_fd).is_some()
    }

    /// `tap_fd`: the descriptor of an opened TAP (jailed QEMUs cannot open one themselves);
    /// `sockets`: the listening sockets the caller bound (see [`SocketFds`]).
    fn args_with(&self, incoming_fd: i32, tap_fd: Option<i32>, sockets: &SocketFds) -> Vec<String> {
        let p = |p: &Path| p.display().to_string();
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
        a.extend([
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
        ]);
        if let Some(n) = &self.net {
            let backend = match (&n.tap, self.jail.is_some()) {
                (Some(_), true) => format!("tap,id=net0,fd={}", tap_fd.unwrap_or(-1)),
                (Some(tap), false) => format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
                (None, _) => "hubport,id=net0,hubid=0".to_string(),
            };
            a.extend([
                "-netdev".into(),
                backend,
                "-device".into(),
                format!("virtio-net-device,netdev=net0,mac={}", n.mac),
            ]);
        }
        if let Some(ram) = &self.ram {
            let (path, share) = match ram {
                RamBacking::SharedFile(f) => (p(f), "on"),
                RamBacking::PrivateFd(fd) => (format!("/proc/self/fd/{fd}"), "off"),
                RamBacking::SharedFd(fd) => (format!("/proc/self/fd/{fd}"), "on,prealloc=on"),
                RamBacking::Anonymous => (String::new(), ""),
            };
            a.push("-object".into());
            a.push(if path.is_empty() {
                format!("memory-backend-ram,id=slicer.ram,size={}M", self.memory_mib)
            } else {
                format!(
                    "memory-backend-file,id=slicer.ram,size={}M,mem-path={path},share={share}",
                    self.memory_mib
                )
            });
        }
        if self.loads_through_qmp() {
            // The caller sets the migration capabilities and hands the state over through QMP
            // (`Qmp::incoming`): capabilities must be set before loading.
            a.extend(["-incoming".into(), "defer".into()]);
        } else if self.incoming.is_some() {
            // The state file is opened by `spawn` and inherited: QEMU reads the file directly
            // (through a `cat` pipe, loads took longer and varied more).
            a.extend(["-incoming".into(), format!("fd:{incoming_fd}")]);
        }
        if self.jail.is_some() {
            a.extend(["-sandbox".into(), SANDBOX.into()]);
        }
        a
    }
}

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

/// Binds a listening UNIX socket at `path` (close-on-exec), replacing a stale socket there.
fn listen_at(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => std::fs::remove_file(path).map_err(|e| Error::io(format!("removing {}", path.display()), e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    }
    std::os::unix::net::UnixListener::bind(path).map_err(|e| Error::io(format!("binding {}", path.display()), e))
}

/// Marks every descriptor but `keep` (sorted) close-on-exec, in a forked child. close_range(2)
/// with `CLOSE_RANGE_CLOEXEC` (Linux 5.11) does it in one call per gap; older kernels get a
/// loop up to the descriptor limit (at most 65536).
fn cloexec_all_but(keep: &[i32]) -> std::io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    let mut from: libc::c_uint = 0;
    let mark = |lo: libc::c_uint, hi: libc::c_uint| -> std::io::Result<()> {
        if lo > hi {
            return Ok(());
        }
        // SAFETY: close_range(2) on a range of our own descriptors.
        let r = unsafe { libc::syscall(libc::SYS_close_range, lo, hi, CLOSE_RANGE_CLOEXEC) };
        if r == 0 {
            return Ok(());
        }
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills a struct we own; fcntl on any number is harmless (EBADF).
        unsafe {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            let top = hi.min(lim.rlim_cur.min(65536) as libc::c_uint);
            for fd in lo..=top {
                libc::fcntl(fd as i32, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        Ok(())
    };
    for &k in keep {
        let k = k as libc::c_uint;
        if k > from {
            mark(from, k - 1)?;
        }
        from = k + 1;
    }
    mark(from, libc::c_uint::MAX)
}

/// Creates (or truncates) a log file without following a link at its name.
fn create_log(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))
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

/// A pipe, both ends close-on-exec (for QEMU's output; a live capture's migration stream).
pub fn pipe() -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors on success; each is then owned exactly once.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(Error::io("creating a pipe", std::io::Error::last_os_error()));
        }
        Ok((
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        ))
    }
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

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// A `struct ifreq` for TUNSETIFF: the TAP's name and the flags QEMU itself would use.
fn tun_request(name: &str) -> Result<[u8; 40]> {
    if name.is_empty() || name.len() >= 16 || name.contains('\0') {
        return Err(Error::InvalidTapName { name: name.to_string() });
    }
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    req[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    Ok(req)
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

/// Must match `slicer_agent_proto::AGENT_PORT_NAME` (kept here to avoid the dependency).
const AGENT_PORT_NAME: &str = "slicer.agent";

/// A running QEMU process.
pub struct QemuProcess {
    pub pid: u32,
    exited: watch::Receiver<Option<Exit>>,
    /// A restore's move into its cgroup (see [`QemuProcess::joined`]).
    deferred: std::sync::Mutex<Option<tokio::task::JoinHandle<std::io::Result<()>>>>,
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat): with the
/// pid, it identifies a process across pid reuse.
/// Pids of the processes whose argument list (`/proc/N/cmdline`) `matches` accepts.
pub fn processes_where(matches: impl Fn(&[&[u8]]) -> bool) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                matches(&args)
            })
        })
        .collect()
}

/// Whether an argument list names its QEMU `name` (`-name <name>`), or with `prefix` one
/// whose name starts with it.
pub fn args_name(args: &[&[u8]], name: &str, prefix: bool) -> bool {
    args.windows(2).any(|w| {
        w[0] == b"-name"
            && if prefix {
                w[1].starts_with(name.as_bytes())
            } else {
                w[1] == name.as_bytes()
            }
    })
}

pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
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

    /// Starts QEMU in its own process group, so signals for the caller's terminal do not reach
    /// it; with `cfg.jail`, jailed (see [`Jail`]): the TAP is opened here, in the VM's network
    /// namespace, and handed over as a descriptor. The cgroup is removed once QEMU has exited.
    pub async fn spawn(cfg: &QemuConfig) -> Result<QemuProcess> {
        use std::os::fd::AsRawFd;
        let log = create_log(&cfg.qemu_log)?;
        let agent_listener = listen_at(&cfg.agent_socket)?;
        let qmp_listener = listen_at(&cfg.qmp_socket)?;
        let console_listener = match &cfg.console_socket {
            Some(p) => Some(listen_at(p)?),
            None => None,
        };
        let sockets = SocketFds {
            agent: agent_listener.as_raw_fd(),
            qmp: qmp_listener.as_raw_fd(),
            console: console_listener.as_ref().map(AsRawFd::as_raw_fd),
        };
        let incoming = match &cfg.incoming {
            Some(path) if !cfg.loads_through_qmp() => {
                Some(std::fs::File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?)
            }
            _ => None,
        };
        let incoming_fd = incoming.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        // A descriptor number the child can put the TAP at: held open here (close-on-exec)
        // until the child has exec'd, so nothing else of the child's sits there.
        let tap_name = cfg.net.as_ref().and_then(|n| n.tap.clone());
        let tap_slot = match (&cfg.jail, &tap_name) {
            (Some(_), Some(_)) => {
                Some(std::fs::File::open("/dev/null").map_err(|e| Error::io("opening /dev/null", e))?)
            }
            _ => None,
        };
        let tap_fd = tap_slot.as_ref().map(AsRawFd::as_raw_fd);
        let binary = match &cfg.jail {
            // Inside the jail only /usr exists; resolve the program here.
            Some(_) => which(&cfg.binary).unwrap_or_else(|| cfg.binary.clone()),
            None => cfg.binary.clone(),
        };
        let mut cmd = tokio::process::Command::new(&binary);
        cmd.args(cfg.args_with(incoming_fd, tap_fd, &sockets))
            .stdin(Stdio::null())
            .process_group(0);
        // A bounded VM's QEMU output goes through a pipe into a bounded log (a guest can make
        // QEMU print warnings); a throwaway VM's straight into the file.
        let output = if cfg.console_socket.is_some() {
            drop(log);
            let (rd, wr) = pipe()?;
            let wr2 = wr
                .try_clone()
                .map_err(|e| Error::io("duplicating QEMU's output pipe", e))?;
            cmd.stdout(Stdio::from(wr2)).stderr(Stdio::from(wr));
            Some(rd)
        } else {
            let log2 = log
                .try_clone()
                .map_err(|e| Error::io(format!("duplicating {}", cfg.qemu_log.display()), e))?;
            cmd.stdout(log2).stderr(log);
            None
        };
        let netns = match cfg.net.as_ref().and_then(|n| n.netns.as_ref()) {
            Some(ns) => {
                let path = format!("/run/netns/{ns}");
                Some(
                    std::fs::File::open(&path)
                        .map_err(|e| Error::io(format!("opening network namespace {path}"), e))?,
                )
            }
            None => None,
        };
        if let Some(f) = &netns {
            let fd = f.as_raw_fd();
            // SAFETY: setns(2) is async-signal-safe; the file stays open in the parent until
            // spawn returns, so the child's copy of the descriptor is valid.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // What QEMU inherits: its listening sockets, the saved state it loads and the memory it
        // maps. Only the child's copies lose close-on-exec, so processes spawned meanwhile by
        // other threads do not inherit them.
        let mut passed: Vec<i32> = vec![sockets.agent, sockets.qmp];
        passed.extend(sockets.console);
        passed.extend(cfg.ram.as_ref().and_then(RamBacking::inherited_fd));
        if incoming.is_some() {
            passed.push(incoming_fd);
        }
        let inherited = passed.clone();
        // SAFETY: fcntl(2) is async-signal-safe; the listeners and the state file stay open here
        // until spawn returns, and the caller keeps the memory's descriptor open.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &inherited {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let own_netns = cfg.jail.is_some() && cfg.net.as_ref().is_some_and(|n| n.own_netns && n.netns.is_none());
        if own_netns {
            // SAFETY: unshare(2) is async-signal-safe. The jail then keeps this namespace
            // (it does not make another), so the TAP made next lives as long as QEMU.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::unshare(libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if let (Some(slot), Some(name)) = (tap_fd, &tap_name) {
            let req = tun_request(name)?;
            // SAFETY: open/ioctl/dup2/close are async-signal-safe and `req` was built before
            // the fork. This runs after setns, so the TAP is looked up in the VM's namespace.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::ioctl(fd, TUNSETIFF, req.as_ptr()) < 0 || libc::dup2(fd, slot) < 0 {
                        let e = std::io::Error::last_os_error();
                        libc::close(fd);
                        return Err(e);
                    }
                    libc::close(fd);
                    Ok(())
                });
            }
        }
        let join_later = cfg.joins_cgroup_later();
        let prepared = match &cfg.jail {
            Some(j) => {
                let spec = slicer_jail::JailSpec {
                    cgroup_procs: if join_later {
                        Vec::new()
                    } else {
                        j.spec.cgroup_procs.clone()
                    },
                    new_netns: j.spec.new_netns && !own_netns,
                    ..j.spec.clone()
                };
                Some(spec.prepare().map_err(|source| Error::Jail { source })?)
            }
            None => None,
        };
        if let Some(p) = prepared {
            // SAFETY: `Prepared::enter` only makes syscalls on data prepared before the fork.
            unsafe {
                cmd.pre_exec(move || p.enter());
            }
        }
        // Last: every descriptor QEMU is not meant to have closes at exec, whoever opened it
        // without close-on-exec (another thread, a library, the daemon's parent).
        let mut keep: Vec<i32> = vec![0, 1, 2];
        keep.extend(passed);
        keep.extend(tap_fd);
        keep.sort_unstable();
        keep.dedup();
        // SAFETY: close_range/fcntl are async-signal-safe; `keep` was built before the fork.
        unsafe {
            cmd.pre_exec(move || cloexec_all_but(&keep));
        }
        let spawned = cmd.spawn();
        // QEMU accepts on its copies; ours go (the daemon connects by path).
        drop((agent_listener, qmp_listener, console_listener));
        drop(netns);
        drop(incoming);
        drop(tap_slot);
        let cgroup = cfg.jail.as_ref().and_then(|j| j.cgroup.clone());
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    let _ = cg.remove();
                }
                if e.kind() == std::io::ErrorKind::NotFound {
                    return Err(Error::QemuNotFound {
                        binary: cfg.binary.clone(),
                    });
                }
                return Err(Error::Spawn {
                    binary: cfg.binary.clone(),
                    source: e,
                });
            }
        };
        let pid = child.id().ok_or(Error::ExitedAtStart)?;
        if let Some(rd) = output {
            let rd = tokio::net::unix::pipe::Receiver::from_owned_fd(rd)
                .map_err(|e| Error::io("reading QEMU's output", e))?;
            tokio::spawn(crate::console::copy_bounded(
                rd,
                cfg.qemu_log.clone(),
                crate::console::CONSOLE_RATE,
            ));
        }
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let st = match child.wait().await {
                Ok(st) => Exit::Status(st),
                Err(e) => {
                    tracing::warn!("waiting for QEMU {pid}: {e}");
                    Exit::Unknown
                }
            };
            remove_cgroup(cgroup).await;
            let _ = tx.send(Some(st));
        });
        let process = QemuProcess {
            pid,
            exited: rx,
            deferred: std::sync::Mutex::new(None),
        };
        if let (true, Some(j)) = (join_later, &cfg.jail) {
            let procs = j.spec.cgroup_procs.clone();
            let join =
                tokio::task::spawn_blocking(move || procs.iter().try_for_each(|f| std::fs::write(f, pid.to_string())));
            *process.deferred.lock().unwrap_or_else(|p| p.into_inner()) = Some(join);
        }
        if let Some(sock) = &cfg.console_socket {
            process.follow_console(sock.clone(), cfg.console_log.clone());
        }
        Ok(process)
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
