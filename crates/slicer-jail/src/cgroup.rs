//! One cgroup per VM, below a parent the daemon owns, on cgroup v2 or v1.
//!
//! v2: `<mount>/slicer/<vm>` with `memory.max`, `memory.swap.max` 0, `cpu.max`, `pids.max`,
//! `io.weight` (controllers enabled in the parents' `cgroup.subtree_control`).
//! v1: the same directory in each controller's hierarchy (`memory`, `cpu`, `pids`, `blkio`)
//! with `memory.limit_in_bytes` (+ `memory.memsw.limit_in_bytes` when swap accounting is on,
//! `memory.swappiness` 0), `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `pids.max`, `blkio.weight`.
//! v2 is used when its hierarchy has the memory, cpu and pids controllers; else v1. A file a
//! kernel lacks (IO weight without BFQ, memsw without swap accounting) is skipped: the others
//! still bound the VM.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{io_err, Error, Result};

/// CFS period for CPU quotas.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The limits of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Hard memory limit; no swap on top.
    pub memory_bytes: u64,
    /// CPU time per [`CPU_PERIOD_US`] (e.g. 150_000 = one and a half cores).
    pub cpu_quota_us: u64,
    /// Tasks (QEMU's threads).
    pub pids: u64,
    /// Relative IO weight (10..=1000, default 100).
    pub io_weight: u16,
}

/// Where the controllers are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    V2 {
        root: PathBuf,
    },
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        pids: PathBuf,
        blkio: Option<PathBuf>,
    },
}

impl Hierarchy {
    /// The hierarchy this host offers (see the module docs for the choice).
    pub fn detect() -> Result<Hierarchy> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(io_err("reading /proc/self/mounts"))?;
        Hierarchy::from_mounts(&mounts, |p| std::fs::read_to_string(p).ok()).ok_or(Error::NoCgroups)
    }

    fn from_mounts(mounts: &str, read: impl Fn(&Path) -> Option<String>) -> Option<Hierarchy> {
        let mut v1 = std::collections::HashMap::new();
        let mut v2 = None;
        for l in mounts.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            match f[2] {
                "cgroup2" => {
                    let root = PathBuf::from(f[1]);
                    let ctl = read(&root.join("cgroup.controllers")).unwrap_or_default();
                    let have: Vec<&str> = ctl.split_whitespace().collect();
                    if ["memory", "cpu", "pids"].iter().all(|c| have.contains(c)) {
                        v2 = Some(root);
                    }
                }
                "cgroup" => {
                    for opt in f[3].split(',') {
                        if ["memory", "cpu", "pids", "blkio"].contains(&opt) {
                            v1.entry(opt.to_string()).or_insert_with(|| PathBuf::from(f[1]));
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(root) = v2 {
            return Some(Hierarchy::V2 { root });
        }
        Some(Hierarchy::V1 {
            memory: v1.get("memory")?.clone(),
            cpu: v1.get("cpu")?.clone(),
            pids: v1.get("pids")?.clone(),
            blkio: v1.get("blkio").cloned(),
        })
    }

    pub fn version(&self) -> u8 {
        match self {
            Hierarchy::V2 { .. } => 2,
            Hierarchy::V1 { .. } => 1,
        }
    }

    /// The directories `parent` has in this hierarchy (one for v2, one per controller for v1).
    fn dirs(&self, parent: &str) -> Vec<PathBuf> {
        match self {
            Hierarchy::V2 { root } => vec![root.join(parent)],
            Hierarchy::V1 {
                memory,
                cpu,
                pids,
                blkio,
            } => {
                let mut d = vec![memory.join(parent), cpu.join(parent), pids.join(parent)];
                d.extend(blkio.iter().map(|b| b.join(parent)));
                d
            }
        }
    }

    /// Creates `parent` (e.g. `slicer`) and, on v2, enables the controllers for its children.
    pub fn ensure_parent(&self, parent: &str) -> Result<()> {
        if let Hierarchy::V2 { root } = self {
            enable_controllers(root);
        }
        for d in self.dirs(parent) {
            std::fs::create_dir_all(&d).map_err(io_err(format!("creating cgroup {}", d.display())))?;
            if self.version() == 2 {
                enable_controllers(&d);
            }
        }
        Ok(())
    }

    /// Names of the VM cgroups below `parent` (for leftover removal).
    pub fn children(&self, parent: &str) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for d in self.dirs(parent) {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
            }
        }
        names
    }
}

/// Removes the cgroups below `parent` that have no tasks and were made more than `min_age`
/// ago: what a VM process that was never waited for left behind (its owner crashed or shut
/// down without reaping it). A cgroup in use always has its QEMU inside, and one being set up
/// is younger than any sensible `min_age`, so this is safe while other daemons run.
pub fn remove_stale(h: &Hierarchy, parent: &str, min_age: Duration) -> usize {
    let mut removed = 0;
    for name in h.children(parent) {
        let cg = Cgroup::at(h, parent, &name);
        let old = cg
            .dirs
            .iter()
            .filter_map(|d| std::fs::metadata(d).ok()?.modified().ok())
            .all(|t| t.elapsed().is_ok_and(|e| e >= min_age));
        if old && cg.pids().is_empty() && cg.remove().is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Enables memory, cpu, pids and io for the children of `dir` (v2); each on its own, so a
/// controller the kernel lacks does not stop the others.
fn enable_controllers(dir: &Path) {
    let file = dir.join("cgroup.subtree_control");
    let have = std::fs::read_to_string(&file).unwrap_or_default();
    for c in ["memory", "cpu", "pids", "io"] {
        if !have.split_whitespace().any(|h| h == c) {
            if let Err(e) = std::fs::write(&file, format!("+{c}")) {
                tracing::debug!("enabling the {c} controller in {}: {e}", file.display());
            }
        }
    }
}

/// One VM's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// The cgroup `<parent>/<name>` as it exists (or would) in `h`.
    pub fn at(h: &Hierarchy, parent: &str, name: &str) -> Cgroup {
        Cgroup {
            dirs: h.dirs(&format!("{parent}/{name}")),
        }
    }

    /// Creates `<parent>/<name>` with `limits`. A leftover of the same name without tasks is
    /// replaced; one with tasks is an error.
    pub fn create(h: &Hierarchy, parent: &str, name: &str, limits: &Limits) -> Result<Cgroup> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(Error::Invalid(format!("invalid cgroup name {name:?}")));
        }
        let cg = Cgroup::at(h, parent, name);
        if cg.exists() {
            if !cg.pids().is_empty() {
                return Err(Error::Invalid(format!(
                    "cgroup {parent}/{name} still has running tasks (another VM of that name?)"
                )));
            }
            cg.remove()?;
        }
        // The parent goes when its last VM goes (see `remove`): another daemon may remove it
        // between our `ensure_parent` and `create_dir`, so that pair is retried.
        for attempt in 0..3 {
            h.ensure_parent(parent)?;
            match cg.dirs.iter().try_for_each(std::fs::create_dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt < 2 => {
                    let _ = cg.remove_dirs();
                }
                Err(e) => {
                    let _ = cg.remove_dirs();
                    return Err(io_err(format!("creating cgroup {parent}/{name}"))(e));
                }
            }
        }
        if let Err(e) = cg.apply(h, limits) {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn apply(&self, h: &Hierarchy, l: &Limits) -> Result<()> {
        let w = |dir: &Path, file: &str, value: String| -> Result<()> {
            std::fs::write(dir.join(file), &value)
                .map_err(io_err(format!("writing {value} to {}", dir.join(file).display())))
        };
        // Optional files: absent on some kernels (see the module docs).
        let opt = |dir: &Path, file: &str, value: String| {
            let p = dir.join(file);
            if p.exists() {
                if let Err(e) = std::fs::write(&p, &value) {
                    tracing::debug!("writing {value} to {}: {e}", p.display());
                }
            }
        };
        match h {
            Hierarchy::V2 { .. } => {
                let d = &self.dirs[0];
                w(d, "memory.max", l.memory_bytes.to_string())?;
                opt(d, "memory.swap.max", "0".into());
                w(d, "cpu.max", format!("{} {CPU_PERIOD_US}", l.cpu_quota_us))?;
                w(d, "pids.max", l.pids.to_string())?;
                opt(d, "io.weight", format!("default {}", l.io_weight));
                opt(d, "io.bfq.weight", format!("default {}", l.io_weight));
            }
            Hierarchy::V1 { blkio, .. } => {
                let (mem, cpu, pids) = (&self.dirs[0], &self.dirs[1], &self.dirs[2]);
                w(mem, "memory.limit_in_bytes", l.memory_bytes.to_string())?;
                opt(mem, "memory.memsw.limit_in_bytes", l.memory_bytes.to_string());
                opt(mem, "memory.swappiness", "0".into());
                w(cpu, "cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
                w(cpu, "cpu.cfs_quota_us", l.cpu_quota_us.to_string())?;
                w(pids, "pids.max", l.pids.to_string())?;
                if blkio.is_some() {
                    let b = &self.dirs[3];
                    opt(b, "blkio.weight", l.io_weight.to_string());
                    opt(b, "blkio.bfq.weight", l.io_weight.to_string());
                }
            }
        }
        Ok(())
    }

    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|d| d.is_dir())
    }

    /// The `cgroup.procs` files a process writes `0` into to join (one per hierarchy).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The directory of each hierarchy (memory first on v1).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Processes in the cgroup (any hierarchy).
    pub fn pids(&self) -> Vec<u32> {
        let mut all = Vec::new();
        for d in &self.dirs {
            let text = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            for p in text.lines().filter_map(|l| l.trim().parse().ok()) {
                if !all.contains(&p) {
                    all.push(p);
                }
            }
        }
        all
    }

    /// Removes the cgroup; its tasks must have exited (a just-reaped process may linger for a
    /// moment, so `EBUSY` is retried for up to a second). Missing directories are fine. The
    /// parent (`slicer`) goes too once it has no other VM, so nothing is left on the host.
    pub fn remove(&self) -> Result<()> {
        self.remove_dirs()?;
        for p in self.dirs.iter().filter_map(|d| d.parent()) {
            // Fails (EBUSY) while other VMs' cgroups are in it: then it stays.
            let _ = std::fs::remove_dir(p);
        }
        Ok(())
    }

    fn remove_dirs(&self) -> Result<()> {
        for d in &self.dirs {
            let deadline = Instant::now() + Duration::from_secs(1);
            loop {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(io_err(format!("removing cgroup {}", d.display()))(e)),
                }
            }
        }
        Ok(())
    }

    /// A memory figure of the cgroup: v2 `memory.<file>`, v1 `memory.<v1_file>`.
    pub fn memory_stat(&self, h: &Hierarchy, v2_file: &str, v1_file: &str) -> Option<u64> {
        let file = match h {
            Hierarchy::V2 { .. } => v2_file,
            Hierarchy::V1 { .. } => v1_file,
        };
        std::fs::read_to_string(self.dirs[0].join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,nosuid,nodev,noexec,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0
cgroup /sys/fs/cgroup/blkio cgroup rw,blkio 0 0
";

    #[test]
    fn v1_is_used_when_v2_has_no_controllers() {
        let h = Hierarchy::from_mounts(V1, |_| Some("hugetlb\n".into())).unwrap();
        assert_eq!(
            h,
            Hierarchy::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                cpu: "/sys/fs/cgroup/cpu".into(),
                pids: "/sys/fs/cgroup/pids".into(),
                blkio: Some("/sys/fs/cgroup/blkio".into()),
            }
        );
        assert_eq!(h.dirs("slicer/a").len(), 4);
    }

    #[test]
    fn v2_is_preferred_when_it_has_the_controllers() {
        let m = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        let h = Hierarchy::from_mounts(m, |_| Some("cpuset cpu io memory pids\n".into())).unwrap();
        assert_eq!(
            h,
            Hierarchy::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );
        assert_eq!(h.dirs("slicer/a"), vec![PathBuf::from("/sys/fs/cgroup/slicer/a")]);
        // Co-mounted v1 controllers ("cpu,cpuacct") are found by their options.
        let co = "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0
";
        let h = Hierarchy::from_mounts(co, |_| None).unwrap();
        assert!(
            matches!(h, Hierarchy::V1 { ref cpu, blkio: None, .. } if cpu == Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert!(Hierarchy::from_mounts("", |_| None).is_none());
    }

    #[test]
    #[ignore = "full tier: needs root and a cgroup hierarchy (scripts/test.sh runs it)"]
    fn a_cgroup_is_created_limited_and_removed() {
        let h = Hierarchy::detect().expect("a cgroup hierarchy with memory, cpu and pids");
        let l = Limits {
            memory_bytes: 64 << 20,
            cpu_quota_us: 50_000,
            pids: 16,
            io_weight: 100,
        };
        let name = format!("unit-{}", std::process::id());
        let cg = Cgroup::create(&h, "slicer-test", &name, &l).unwrap();
        assert!(cg.exists());
        assert_eq!(
            cg.memory_stat(&h, "memory.max", "memory.limit_in_bytes"),
            Some(64 << 20)
        );
        let pids = std::fs::read_to_string(match &h {
            Hierarchy::V2 { .. } => cg.dirs()[0].join("pids.max"),
            Hierarchy::V1 { .. } => cg.dirs()[2].join("pids.max"),
        })
        .unwrap();
        assert_eq!(pids.trim(), "16");
        assert!(cg.pids().is_empty());
        cg.remove().unwrap();
        assert!(!cg.exists());
        for d in h.dirs("slicer-test") {
            let _ = std::fs::remove_dir(d);
        }
    }
}
