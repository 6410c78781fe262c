//! Giving up root once the privileged setup is done: an unused uid from the same pool (and lock
//! directory) as the VMs' uids, no supplementary groups, every capability gone (the bounding
//! set too), no new privileges, bounded descriptors, no core dumps, and a seccomp allowlist of
//! what a tokio network server with rustls and getaddrinfo needs. A syscall outside the list
//! fails with EPERM (so a missing one shows as an error, not a dead proxy); nothing that runs
//! programs, changes credentials, traces, mounts or loads code into the kernel is on it.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};
use slicer_jail::uid::{UidLease, UidPool};

use crate::error::{Error, Result};

/// Where the VMs' uid leases live (the daemon's `slicer-vmm` uses the same directory), so a
/// VM never gets the proxy's uid and the reverse.
pub const UID_LOCK_DIR: &str = "/run/slicer/uids";

/// Descriptors beyond two per tunnel: listeners, the control link, resolver sockets, files.
pub const FD_SLACK: usize = 256;

/// Chooses a uid that no process runs under and no VM holds, held until the lease is dropped
/// (the proxy keeps it for its lifetime).
pub fn choose_uid(group: &str) -> Result<UidLease> {
    UidPool::new(
        slicer_jail::uid::DEFAULT_START,
        slicer_jail::uid::DEFAULT_COUNT,
        UID_LOCK_DIR.into(),
    )
    .lease(&format!("slicer-proxy-{group}"))
    .map_err(|e| Error::os("choosing a uid for the proxy", std::io::Error::other(e.to_string())))
}

fn os(what: &str) -> Error {
    Error::os(what, std::io::Error::last_os_error())
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc < 0 {
        Err(os(what))
    } else {
        Ok(())
    }
}

/// Becomes `uid` (and gid `uid`) for good. Call with root, after every privileged step; the
/// caller applies [`seccomp`] afterwards.
pub fn drop_to(uid: u32, max_connections: usize) -> Result<()> {
    set_limits(max_connections)?;
    drop_capability_bounds()?;
    become_uid(uid)?;
    forbid_new_privileges()
}

/// The descriptor limit for `max_connections` (two descriptors each, plus slack; what the
/// hard limit allows where it cannot be raised), and no core dumps.
fn set_limits(max_connections: usize) -> Result<()> {
    let want = (max_connections.saturating_mul(2) + FD_SLACK) as libc::rlim_t;
    let lim = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        // Raising the hard limit needs CAP_SYS_RESOURCE, which a container may not give root:
        // use what the hard limit allows and say so.
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit into a valid struct.
        check(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) },
            "reading RLIMIT_NOFILE",
        )?;
        let lim = libc::rlimit {
            rlim_cur: cur.rlim_max,
            rlim_max: cur.rlim_max,
        };
        // SAFETY: as above.
        check(
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) },
            "setting RLIMIT_NOFILE",
        )?;
        eprintln!(
            "slicer-proxy: cannot raise the descriptor limit to {want} (hard limit {}); fewer than {max_connections} connections fit",
            cur.rlim_max
        );
    }
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    check(
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) },
        "setting RLIMIT_CORE",
    )?;
    Ok(())
}

/// Empties the capability bounding set (while CAP_SETPCAP is still held) and the ambient set,
/// and clears KEEPCAPS.
fn drop_capability_bounds() -> Result<()> {
    // The bounding set, while CAP_SETPCAP is still held.
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(63);
    for cap in 0..=last {
        // SAFETY: prctl with integer arguments; EINVAL past the kernel's last capability.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(os("dropping the capability bounding set"));
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    }
    // SAFETY: as above.
    check(
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) },
        "clearing KEEPCAPS",
    )?;
    Ok(())
}

/// Becomes `uid` (gid `uid`, no supplementary groups, no capabilities) and checks it did.
fn become_uid(uid: u32) -> Result<()> {
    // glibc applies these to every thread of the process.
    // SAFETY: setgroups with an empty list.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }, "setgroups([])")?;
    // SAFETY: plain id calls.
    check(unsafe { libc::setresgid(uid, uid, uid) }, "setresgid")?;
    // SAFETY: as above.
    check(unsafe { libc::setresuid(uid, uid, uid) }, "setresuid")?;
    // Leaving root cleared the permitted and effective sets; the inheritable one stays unless
    // cleared explicitly.
    clear_caps()?;
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != uid || unsafe { libc::geteuid() } != uid {
        return Err(Error::os(
            "dropping root",
            std::io::Error::other("the uid did not change"),
        ));
    }
    Ok(())
}

/// no_new_privs, and not dumpable: nothing of the proxy's uid (or a guest) may ptrace it or
/// read its memory.
fn forbid_new_privileges() -> Result<()> {
    // SAFETY: prctl with integer arguments.
    check(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "setting no_new_privs",
    )?;
    // Nothing of the proxy's uid (or a guest) may ptrace it or read its memory.
    // SAFETY: as above.
    check(
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) },
        "clearing dumpable",
    )?;
    Ok(())
}

/// capset(2) with empty sets (libc has no wrapper; the structs are the kernel's v3 ABI).
fn clear_caps() -> Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let d = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset with the v3 header and two data words, as the kernel expects.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) };
    if rc < 0 {
        return Err(os("clearing capabilities"));
    }
    Ok(())
}

/// Namespaces a `clone` may not create (an unprivileged user namespace would give back
/// capabilities inside it).
const CLONE_NS_FLAGS: u64 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u64;

/// The syscalls the proxy uses after dropping root, on every architecture.
const ALLOWED: &[i64] = &[
    // memory
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_membarrier,
    // threads and time
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    // descriptors and files (the resolver reads /etc; nothing is written)
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_openat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_ppoll,
    libc::SYS_pselect6,
    // network
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_shutdown,
    // tokio's signal driver (always built with the `process` feature) makes a socketpair
    libc::SYS_socketpair,
];

/// The older syscalls x86_64 still has beside their `*at`/newer forms.
#[cfg(target_arch = "x86_64")]
const ALLOWED_LEGACY: &[i64] = &[
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_readlink,
    libc::SYS_poll,
    libc::SYS_select,
    libc::SYS_epoll_wait,
    libc::SYS_accept,
    libc::SYS_dup2,
    libc::SYS_pipe,
    libc::SYS_arch_prctl,
    libc::SYS_time,
];
#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_LEGACY: &[i64] = &[];

/// The syscalls the proxy uses after dropping root (the filter's allowlist).
fn allowed() -> Vec<i64> {
    ALLOWED.iter().chain(ALLOWED_LEGACY).copied().collect()
}

/// Builds the two filters: the allowlist (EPERM for anything else), and one that answers
/// `clone3` with ENOSYS so glibc falls back to `clone`, whose flags the allowlist can check
/// (`clone3` passes them in memory a filter cannot read).
pub fn filters() -> Result<Vec<BpfProgram>> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| seccomp_err(e.to_string()))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed().into_iter().map(|s| (s, vec![])).collect();
    let cond = |arg: u8, op: SeccompCmpOp, val: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, val).map_err(|e| seccomp_err(e.to_string()))
    };
    let rule = |c: Vec<SeccompCondition>| SeccompRule::new(c).map_err(|e| seccomp_err(e.to_string()));
    // clone: threads only, never a new namespace.
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(0, SeccompCmpOp::MaskedEq(CLONE_NS_FLAGS), 0)?])?],
    );
    rules.insert(libc::SYS_clone3, vec![]);
    // prctl: naming threads only.
    rules.insert(
        libc::SYS_prctl,
        vec![
            rule(vec![cond(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?])?,
            rule(vec![cond(0, SeccompCmpOp::Eq, libc::PR_GET_NAME as u64)?])?,
        ],
    );
    let main = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| seccomp_err(e.to_string()))?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| seccomp_err(e.to_string()))?;
    // The allowlist goes last: it forbids the prctl that installing another filter makes.
    let mut out = Vec::new();
    for f in [clone3, main] {
        out.push(
            f.try_into()
                .map_err(|e: seccompiler::BackendError| seccomp_err(e.to_string()))?,
        );
    }
    Ok(out)
}

fn seccomp_err(s: String) -> Error {
    Error::os("building the seccomp filter", std::io::Error::other(s))
}

/// Installs [`filters`] on every thread of the process.
pub fn seccomp() -> Result<()> {
    for f in filters()? {
        seccompiler::apply_filter_all_threads(&f)
            .map_err(|e| Error::os("installing the seccomp filter", std::io::Error::other(e.to_string())))?;
    }
    Ok(())
}

/// Everything after the privileged setup: a uid lease, the drop, the filter. The lease must be
/// kept for the proxy's lifetime.
pub fn drop_privileges(group: &str, max_connections: usize) -> Result<UidLease> {
    let lease = choose_uid(group)?;
    drop_to(lease.uid, max_connections)?;
    seccomp()?;
    Ok(lease)
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_build() {
        let f = super::filters().unwrap();
        assert_eq!(f.len(), 2);
        let list = super::allowed();
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_setuid,
            libc::SYS_setresuid,
            libc::SYS_setgid,
            libc::SYS_setgroups,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_kexec_load,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_listen,
            libc::SYS_process_vm_readv,
            libc::SYS_capset,
            libc::SYS_chmod,
            libc::SYS_unlinkat,
        ] {
            assert!(!list.contains(&forbidden), "{forbidden} must not be allowed");
        }
    }
}
