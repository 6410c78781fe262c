//! Which QEMU processes of ours run, found by their `-name slicer-<hostname>` argument (the
//! scan itself is `slicer_hypervisor::qemu::processes_where`).

use slicer_hypervisor::qemu::{args_name, processes_where};

/// The pids of QEMUs whose `-name` starts with `prefix` (e.g. `slicer-fz-`).
pub fn named_like(prefix: &str) -> Vec<u32> {
    processes_where(|args| args_name(args, prefix, true))
}

/// The QEMUs whose VM hostname starts with `prefix`: (pid, hostname), from their
/// `-name slicer-<hostname>`.
pub fn hostnames_like(prefix: &str) -> Vec<(u32, String)> {
    named_like(&format!("slicer-{prefix}"))
        .into_iter()
        .filter_map(|pid| {
            let args = args_of(pid);
            let name = args.windows(2).find(|w| w[0] == "-name")?[1]
                .strip_prefix("slicer-")?
                .to_string();
            Some((pid, name))
        })
        .collect()
}

/// The pids of QEMUs of VM `hostname` (`-name slicer-<hostname>`): one, or none once it ended.
pub fn of(hostname: &str) -> Vec<u32> {
    let name = format!("slicer-{hostname}");
    processes_where(|args| args_name(args, &name, false))
}

/// The pid of the QEMU of VM `hostname`, if one runs.
pub fn pid_of(hostname: &str) -> Option<u32> {
    of(hostname).into_iter().next()
}

/// The arguments of process `pid` (lossy UTF-8), empty once it ended.
pub fn args_of(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a process with this pid exists.
pub fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A field of `/proc/<pid>/status` (e.g. `VmRSS`), its value trimmed.
pub fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// Resident memory of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS")?.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_seen() {
        let me = std::process::id();
        assert!(pid_alive(me));
        assert!(!args_of(me).is_empty());
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        assert!(pid_of("no-such-vm-of-the-testkit").is_none());
    }
}
