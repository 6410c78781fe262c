//! Starting a QEMU: what it inherits from the parent, and the steps its child takes between
//! fork and exec (network namespace, inherited descriptors, TAP, jail), in that order.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Stdio;

use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::{remove_cgroup, which, Exit, QemuConfig, QemuProcess, RamBacking, SocketFds};
use crate::{Error, Result};

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

/// What the parent opens for one QEMU before the fork, held open until the child has
/// exec'd: the listening sockets, the saved state it loads and the slot for its TAP.
struct Handover {
    agent: UnixListener,
    qmp: UnixListener,
    console: Option<UnixListener>,
    sockets: SocketFds,
    /// The state file QEMU reads (`-incoming fd:N`), unless it loads through QMP.
    incoming: Option<std::fs::File>,
    incoming_fd: i32,
    tap_name: Option<String>,
    /// A descriptor number the child can put the TAP at: held open here (close-on-exec)
    /// until the child has exec'd, so nothing else of the child's sits there.
    tap_slot: Option<std::fs::File>,
    tap_fd: Option<i32>,
}

impl Handover {
    /// Binds the sockets, opens the state file and reserves the TAP's slot.
    fn open(cfg: &QemuConfig) -> Result<Handover> {
        let agent = listen_at(&cfg.agent_socket)?;
        let qmp = listen_at(&cfg.qmp_socket)?;
        let console = match &cfg.console_socket {
            Some(p) => Some(listen_at(p)?),
            None => None,
        };
        let sockets = SocketFds {
            agent: agent.as_raw_fd(),
            qmp: qmp.as_raw_fd(),
            console: console.as_ref().map(AsRawFd::as_raw_fd),
        };
        let incoming = match &cfg.incoming {
            Some(path) if !cfg.loads_through_qmp() => {
                Some(std::fs::File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?)
            }
            _ => None,
        };
        let incoming_fd = incoming.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        let tap_name = cfg.net.as_ref().and_then(|n| n.tap.clone());
        let tap_slot = match (&cfg.jail, &tap_name) {
            (Some(_), Some(_)) => {
                Some(std::fs::File::open("/dev/null").map_err(|e| Error::io("opening /dev/null", e))?)
            }
            _ => None,
        };
        let tap_fd = tap_slot.as_ref().map(AsRawFd::as_raw_fd);
        Ok(Handover {
            agent,
            qmp,
            console,
            sockets,
            incoming,
            incoming_fd,
            tap_name,
            tap_slot,
            tap_fd,
        })
    }

    /// What QEMU inherits: its listening sockets, the saved state it loads and the memory it
    /// maps (the caller keeps the memory's descriptor open).
    fn passed(&self, cfg: &QemuConfig) -> Vec<i32> {
        let mut passed: Vec<i32> = vec![self.sockets.agent, self.sockets.qmp];
        passed.extend(self.sockets.console);
        passed.extend(cfg.ram.as_ref().and_then(RamBacking::inherited_fd));
        if self.incoming.is_some() {
            passed.push(self.incoming_fd);
        }
        passed
    }
}

/// The command for QEMU, in its own process group, with its argument vector.
fn command(cfg: &QemuConfig, h: &Handover) -> Command {
    let binary = match &cfg.jail {
        // Inside the jail only /usr exists; resolve the program here.
        Some(_) => which(&cfg.binary).unwrap_or_else(|| cfg.binary.clone()),
        None => cfg.binary.clone(),
    };
    let mut cmd = Command::new(&binary);
    cmd.args(cfg.args_with(h.incoming_fd, h.tap_fd, &h.sockets))
        .stdin(Stdio::null())
        .process_group(0);
    cmd
}

/// Sends QEMU's output somewhere: a bounded VM's through a pipe into a bounded log (a guest
/// can make QEMU print warnings; the read end is returned), a throwaway VM's straight into
/// the file.
fn route_output(cmd: &mut Command, cfg: &QemuConfig, log: std::fs::File) -> Result<Option<OwnedFd>> {
    if cfg.console_socket.is_some() {
        drop(log);
        let (rd, wr) = pipe()?;
        let wr2 = wr
            .try_clone()
            .map_err(|e| Error::io("duplicating QEMU's output pipe", e))?;
        cmd.stdout(Stdio::from(wr2)).stderr(Stdio::from(wr));
        Ok(Some(rd))
    } else {
        let log2 = log
            .try_clone()
            .map_err(|e| Error::io(format!("duplicating {}", cfg.qemu_log.display()), e))?;
        cmd.stdout(log2).stderr(log);
        Ok(None)
    }
}

/// Opens the VM's named network namespace, if it has one.
fn open_netns(cfg: &QemuConfig) -> Result<Option<std::fs::File>> {
    match cfg.net.as_ref().and_then(|n| n.netns.as_ref()) {
        Some(ns) => {
            let path = format!("/run/netns/{ns}");
            Ok(Some(std::fs::File::open(&path).map_err(|e| {
                Error::io(format!("opening network namespace {path}"), e)
            })?))
        }
        None => Ok(None),
    }
}

/// In the child: joins the network namespace open at `fd`.
fn setns_at_exec(cmd: &mut Command, fd: i32) {
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

/// In the child: clears close-on-exec on the descriptors QEMU inherits. Only the child's
/// copies lose it, so processes spawned meanwhile by other threads do not inherit them.
fn inherit_at_exec(cmd: &mut Command, inherited: Vec<i32>) {
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
}

/// In the child: a new, empty network namespace of the VM's own.
fn unshare_netns_at_exec(cmd: &mut Command) {
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

/// In the child: opens the TAP `req` names and puts it at descriptor `slot`.
fn open_tap_at_exec(cmd: &mut Command, slot: i32, req: [u8; 40]) {
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

/// Prepares the jail (if any) and enters it in the child. A restore that joins its cgroup
/// later does not join it here; a VM in a network namespace of its own keeps that one.
fn jail_at_exec(cmd: &mut Command, cfg: &QemuConfig, join_later: bool, own_netns: bool) -> Result<()> {
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
    Ok(())
}

/// Last in the child: every descriptor QEMU is not meant to have closes at exec, whoever
/// opened it without close-on-exec (another thread, a library, the daemon's parent).
fn close_others_at_exec(cmd: &mut Command, passed: Vec<i32>, tap_fd: Option<i32>) {
    let mut keep: Vec<i32> = vec![0, 1, 2];
    keep.extend(passed);
    keep.extend(tap_fd);
    keep.sort_unstable();
    keep.dedup();
    // SAFETY: close_range/fcntl are async-signal-safe; `keep` was built before the fork.
    unsafe {
        cmd.pre_exec(move || cloexec_all_but(&keep));
    }
}

/// The error for a QEMU that did not start; its cgroup is removed.
fn spawn_failed(cfg: &QemuConfig, cgroup: Option<&slicer_jail::Cgroup>, e: std::io::Error) -> Error {
    if let Some(cg) = cgroup {
        let _ = cg.remove();
    }
    if e.kind() == std::io::ErrorKind::NotFound {
        return Error::QemuNotFound {
            binary: cfg.binary.clone(),
        };
    }
    Error::Spawn {
        binary: cfg.binary.clone(),
        source: e,
    }
}

/// Waits for the child in the background; its cgroup is removed once it has exited, then
/// its exit is published.
fn watch_exit(mut child: Child, pid: u32, cgroup: Option<slicer_jail::Cgroup>) -> watch::Receiver<Option<Exit>> {
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
    rx
}

impl QemuProcess {
    /// Starts QEMU in its own process group, so signals for the caller's terminal do not reach
    /// it; with `cfg.jail`, jailed (see [`Jail`](super::Jail)): the TAP is opened here, in the
    /// VM's network namespace, and handed over as a descriptor. The cgroup is removed once
    /// QEMU has exited.
    pub async fn spawn(cfg: &QemuConfig) -> Result<QemuProcess> {
        let log = create_log(&cfg.qemu_log)?;
        let h = Handover::open(cfg)?;
        let mut cmd = command(cfg, &h);
        let output = route_output(&mut cmd, cfg, log)?;
        let netns = open_netns(cfg)?;
        if let Some(f) = &netns {
            setns_at_exec(&mut cmd, f.as_raw_fd());
        }
        let passed = h.passed(cfg);
        inherit_at_exec(&mut cmd, passed.clone());
        let own_netns = cfg.jail.is_some() && cfg.net.as_ref().is_some_and(|n| n.own_netns && n.netns.is_none());
        if own_netns {
            unshare_netns_at_exec(&mut cmd);
        }
        if let (Some(slot), Some(name)) = (h.tap_fd, &h.tap_name) {
            open_tap_at_exec(&mut cmd, slot, tun_request(name)?);
        }
        let join_later = cfg.joins_cgroup_later();
        jail_at_exec(&mut cmd, cfg, join_later, own_netns)?;
        close_others_at_exec(&mut cmd, passed, h.tap_fd);
        let spawned = cmd.spawn();
        // QEMU accepts on its copies; ours go (the daemon connects by path).
        drop((h.agent, h.qmp, h.console));
        drop(netns);
        drop(h.incoming);
        drop(h.tap_slot);
        let cgroup = cfg.jail.as_ref().and_then(|j| j.cgroup.clone());
        let child = spawned.map_err(|e| spawn_failed(cfg, cgroup.as_ref(), e))?;
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
        let process = QemuProcess {
            pid,
            exited: watch_exit(child, pid, cgroup),
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
}
