//! How this host jails its QEMUs (see the `slicer-jail` crate for the mechanics).
//!
//! Every QEMU runs under a uid of its own from [`slicer_jail::UidPool`], in a mount namespace
//! that holds its VM directory (read-write), its kernel and the read-only files behind its disk
//! (the qcow2 backing chain), `/usr` and a few device nodes, with no capabilities,
//! `no_new_privs`, rlimits and QEMU's seccomp sandbox; in a cgroup `slicer/<vm>` limited to the
//! VM's RAM plus [`crate::vm_overhead_bytes`] (no swap), its vCPUs plus half a core, 512 tasks
//! and an IO weight of 100. Everything that needs privilege (network namespace, TAP, the saved
//! state files) the daemon opens and hands over as descriptors.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Context, Result};
use slicer_hypervisor::{Accel, Jail, QemuConfig};
use slicer_jail::{Cgroup, Hierarchy, JailSpec, Limits, UidPool};

/// The cgroup every VM's cgroup lives in.
pub const CGROUP_PARENT: &str = "slicer";
/// Where each jail's root is mounted (in the jailed process's own mount namespace only).
pub const JAIL_ROOT: &str = "/run/slicer/jail";
/// Tasks (QEMU threads) per VM.
pub const PIDS_MAX: u64 = 512;
/// CPU beyond the vCPUs, for QEMU's device and I/O threads, in CFS microseconds per period.
pub const CPU_EXTRA_US: u64 = 50_000;
/// An empty VM cgroup older than this is a leftover (see `slicer_jail::cgroup::remove_stale`).
pub const STALE_CGROUP_AGE: std::time::Duration = std::time::Duration::from_secs(60);
/// Descriptors a QEMU may hold.
pub const NOFILE: u64 = 4096;

pub struct JailConfig {
    pub pool: UidPool,
    /// `None` where no cgroup hierarchy with memory, cpu and pids is mounted (logged once).
    pub cgroups: Option<Hierarchy>,
    pub root: PathBuf,
}

impl JailConfig {
    /// The jail this host can give: all of it when running as root (cgroups where mounted),
    /// nothing otherwise (an unprivileged caller cannot change uid or mount).
    pub fn for_host() -> Option<JailConfig> {
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let cgroups = match Hierarchy::detect() {
            Ok(h) => {
                let n = slicer_jail::cgroup::remove_stale(&h, CGROUP_PARENT, STALE_CGROUP_AGE);
                if n > 0 {
                    tracing::info!("removed {n} stale VM cgroups");
                }
                Some(h)
            }
            Err(e) => {
                tracing::warn!("VMs run without cgroup limits: {e}");
                None
            }
        };
        Some(JailConfig {
            pool: UidPool::new(
                slicer_jail::uid::DEFAULT_START,
                slicer_jail::uid::DEFAULT_COUNT,
                PathBuf::from("/run/slicer/uids"),
            ),
            cgroups,
            root: PathBuf::from(JAIL_ROOT),
        })
    }

    /// The cgroup limits of a VM with `memory_bytes` of RAM and `cpus` vCPUs.
    pub fn limits(memory_bytes: u64, cpus: u32) -> Limits {
        Limits {
            memory_bytes: memory_bytes + crate::vm_overhead_bytes(memory_bytes),
            cpu_quota_us: u64::from(cpus) * slicer_jail::cgroup::CPU_PERIOD_US + CPU_EXTRA_US,
            pids: PIDS_MAX,
            io_weight: 100,
        }
    }

    /// Host memory charged to VM `name`'s cgroup now (v2 `memory.current`, v1
    /// `memory.usage_in_bytes`): its private memory (written guest pages, QEMU's own) and page
    /// cache it caused; pages of a template's memory it only reads are charged to whoever
    /// loaded them, the daemon. A counter read, cheap enough to poll for hundreds of VMs.
    pub fn memory_used(&self, name: &str) -> Option<u64> {
        let h = self.cgroups.as_ref()?;
        Cgroup::at(h, CGROUP_PARENT, name).memory_stat(h, "memory.current", "memory.usage_in_bytes")
    }

    /// The cgroup of VM `name` if it exists (for an adopted VM).
    pub fn cgroup_of(&self, name: &str) -> Option<Cgroup> {
        let h = self.cgroups.as_ref()?;
        let cg = Cgroup::at(h, CGROUP_PARENT, name);
        cg.exists().then_some(cg)
    }

    /// Removes the cgroups of VMs that no longer run, for the names `ours` accepts (a daemon
    /// only touches its own host groups' VMs).
    pub fn remove_leftover_cgroups(&self, ours: impl Fn(&str) -> bool) {
        let Some(h) = &self.cgroups else { return };
        for name in h.children(CGROUP_PARENT).into_iter().filter(|n| ours(n)) {
            let cg = Cgroup::at(h, CGROUP_PARENT, &name);
            if cg.pids().is_empty() {
                if let Err(e) = cg.remove() {
                    tracing::warn!("removing a leftover cgroup: {e}");
                }
            }
        }
    }

    /// The jail for QEMU `cfg` under `uid`: prepares its files (the disk owned by the uid,
    /// 0600; the VM's directory root's, 0700, so nothing in it can be replaced by the VM's
    /// uid), its cgroup, and what it may see: the disk (read-write) and the files behind it as
    /// the daemon recorded them (never the header QEMU can rewrite), the kernel, no directory
    /// it could write. Its sockets are bound by the daemon and handed over as descriptors.
    pub fn jail_for(&self, cfg: &QemuConfig, name: &str, uid: u32, memory_bytes: u64) -> Result<Jail> {
        let dir = cfg
            .disk
            .parent()
            .context("the VM's disk has no directory")?
            .to_path_buf();
        root_only_dir(&dir)?;
        let mut rw_files = Vec::new();
        let mut ro_files = vec![cfg.kernel.clone()];
        if cfg.disk.exists() {
            give_file(&cfg.disk, uid)?;
            rw_files.push(cfg.disk.clone());
            ro_files.extend(slicer_storage::trusted_chain(&cfg.disk)?);
        }
        if let Some(slicer_hypervisor::qemu::RamBacking::SharedFile(ram)) = &cfg.ram {
            // A template build's RAM file: made here, so QEMU needs no writable directory.
            private_file(ram)?;
            give_file(ram, uid)?;
            rw_files.push(ram.clone());
        }
        if cfg.console_socket.is_none() {
            // A throwaway VM's console goes straight to its file (see `QemuConfig`).
            private_file(&cfg.console_log)?;
            give_file(&cfg.console_log, uid)?;
            rw_files.push(cfg.console_log.clone());
        }
        for f in &ro_files {
            world_readable(f)?;
        }
        let mut devices: Vec<PathBuf> = slicer_jail::jail::BASE_DEVICES.iter().map(PathBuf::from).collect();
        let mut groups = Vec::new();
        if cfg.accel == Accel::Kvm {
            devices.push("/dev/kvm".into());
            if let Ok(m) = std::fs::metadata("/dev/kvm") {
                groups.push(m.gid());
            }
        }
        let cgroup = match &self.cgroups {
            Some(h) => Some(Cgroup::create(
                h,
                CGROUP_PARENT,
                name,
                &Self::limits(memory_bytes, cfg.cpus),
            )?),
            None => None,
        };
        let spec = JailSpec {
            root: self.root.clone(),
            uid,
            gid: uid,
            groups,
            rw_dirs: Vec::new(),
            rw_files,
            ro_files,
            devices,
            new_netns: cfg.net.as_ref().and_then(|n| n.netns.as_ref()).is_none(),
            cgroup_procs: cgroup.as_ref().map(Cgroup::procs_files).unwrap_or_default(),
            rlimits: vec![
                (libc::RLIMIT_NOFILE, NOFILE),
                (libc::RLIMIT_CORE, 0),
                (libc::RLIMIT_NPROC, PIDS_MAX),
            ],
            proc: cfg
                .ram
                .as_ref()
                .and_then(slicer_hypervisor::qemu::RamBacking::inherited_fd)
                .is_some(),
        };
        Ok(Jail { spec, cgroup })
    }
}

/// Makes `dir` root's and 0700 (a directory of an older daemon was the VM uid's), without
/// following a link.
fn root_only_dir(dir: &Path) -> Result<()> {
    let m = std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !m.is_dir() {
        return Err(crate::Error::Io {
            context: format!("{} is not a directory", dir.display()),
            source: std::io::ErrorKind::InvalidData.into(),
        });
    }
    if m.uid() != 0 || m.gid() != 0 {
        std::os::unix::fs::lchown(dir, Some(0), Some(0)).with_context(|| format!("chown {}", dir.display()))?;
    }
    if m.mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod {}", dir.display()))?;
    }
    Ok(())
}

/// Gives the regular file `path` to `uid` (0600) through a descriptor opened without following
/// a link; a file with other hard links is refused (chown would hand over every name of it).
fn give_file(path: &Path, uid: u32) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let m = f.metadata().with_context(|| format!("reading {}", path.display()))?;
    if !m.is_file() || m.nlink() != 1 {
        return Err(crate::Error::Io {
            context: format!("{} is not a regular file with one name", path.display()),
            source: std::io::ErrorKind::InvalidData.into(),
        });
    }
    std::os::unix::fs::fchown(&f, Some(uid), Some(uid)).with_context(|| format!("chown {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))
}

/// The read-only images (kernel, base disks) are the same for every tenant and hold nothing
/// of theirs: every VM's uid may read them.
fn world_readable(path: &Path) -> Result<()> {
    let m = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if m.mode() & 0o004 == 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode((m.mode() & 0o7777) | 0o444))
            .with_context(|| format!("chmod {}", path.display()))?;
    }
    Ok(())
}

/// A new file only the daemon can read (0600), e.g. for a saved state.
pub fn private_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm() {
        let l = JailConfig::limits(256 << 20, 2);
        assert_eq!(l.memory_bytes, (256 << 20) + crate::vm_overhead_bytes(256 << 20));
        assert_eq!(l.cpu_quota_us, 250_000);
    }
}
