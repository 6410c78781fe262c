//! What a running process is confined to, read from /proc: for tests and for operators
//! checking a host (`/proc/<pid>/status`, `/proc/<pid>/root`, `/proc/<pid>/cgroup`).

use std::path::PathBuf;

/// The confinement of one process as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    pub uid: u32,
    pub gid: u32,
    /// `CapEff`, `CapPrm`, `CapBnd` as numbers.
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub cap_bnd: u64,
    /// 0 none, 1 strict, 2 filter.
    pub seccomp: u8,
    pub no_new_privs: bool,
    /// Top-level names in the process's root directory.
    pub root_entries: Vec<String>,
    /// Its cgroup path per hierarchy line of `/proc/<pid>/cgroup`.
    pub cgroups: Vec<String>,
    /// Whether its mount namespace differs from ours.
    pub own_mount_ns: bool,
    pub own_net_ns: bool,
}

fn field(status: &str, name: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// Reads the confinement of `pid`; `None` if it is gone.
pub fn inspect(pid: u32) -> Option<Confinement> {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(base.join("status")).ok()?;
    let hex = |n: &str| {
        field(&status, n)
            .and_then(|v| u64::from_str_radix(&v, 16).ok())
            .unwrap_or(u64::MAX)
    };
    let first = |n: &str| {
        field(&status, n)
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(u32::MAX)
    };
    let mut root_entries: Vec<String> = std::fs::read_dir(base.join("root"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    root_entries.sort();
    let ns = |kind: &str| {
        let theirs = std::fs::read_link(base.join("ns").join(kind)).ok();
        let ours = std::fs::read_link(PathBuf::from("/proc/self/ns").join(kind)).ok();
        theirs.is_some() && theirs != ours
    };
    Some(Confinement {
        uid: first("Uid"),
        gid: first("Gid"),
        cap_eff: hex("CapEff"),
        cap_prm: hex("CapPrm"),
        cap_bnd: hex("CapBnd"),
        seccomp: field(&status, "Seccomp").and_then(|v| v.parse().ok()).unwrap_or(0),
        no_new_privs: field(&status, "NoNewPrivs").as_deref() == Some("1"),
        root_entries,
        cgroups: std::fs::read_to_string(base.join("cgroup"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.splitn(3, ':').nth(2).map(str::to_string))
            .collect(),
        own_mount_ns: ns("mnt"),
        own_net_ns: ns("net"),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn we_are_not_confined() {
        let me = super::inspect(std::process::id()).unwrap();
        assert!(!me.own_mount_ns);
        assert!(!me.root_entries.is_empty());
    }
}
