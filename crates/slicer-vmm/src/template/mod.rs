//! Templates: a guest booted once to agent-ready and saved (RAM and device state plus its
//! disk), from which VMs of the same shape start in a fraction of a cold boot.
//!
//! A template lives in `<images>/templates/<id>/` beside the images: `disk.qcow2` (read-only
//! from then on; each restored VM gets a qcow2 overlay on it), `state` (QEMU's migration
//! stream) and `meta.json`. The id hashes everything the saved state depends on (the image and
//! kernel builds, the QEMU version, the accelerator, the kernel command line, vCPUs, RAM and
//! whether there is a NIC) and the template format, so a change to any of them makes a new template rather than
//! restoring a stale one. Builds go to a scratch directory renamed into place, so a crash or a
//! second daemon building the same template never leaves a half-written one.
//!
//! Here: what a template is. `build`: finding or building one; `capture`: a live capture of a
//! running VM into a template's layout; `memory`: the sealed memfds restores map, and the
//! cache of them.

mod build;
mod capture;
mod memory;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{check, Context, Result};
use serde::{Deserialize, Serialize};
use slicer_hypervisor::QemuProcess;
use slicer_image::Image;

use crate::VmSpec;
pub use capture::CaptureTimes;
pub use memory::{LoadedMemory, MemoryUse, DEFAULT_TEMPLATE_MEMORY};

/// Bumped when the way templates are made changes, so older ones are not used.
const FORMAT: u32 = 4;
/// The MAC of a template's NIC; each restored VM's agent sets the VM's own.
const TEMPLATE_MAC: &str = "02:00:00:00:00:01";
/// Longest a template build may take to boot its guest.
const BUILD_BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest a saved state may take to write.
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);
/// After a failed build, creates boot cold (and say why) for this long before trying again.
pub const RETRY_AFTER: Duration = Duration::from_secs(300);

/// What a template is made for. A saved state restores only into the same devices, vCPUs and
/// RAM, so VMs of a shape share the shape's template.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shape {
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u32,
    /// A virtio-net device.
    pub nic: bool,
}

impl Shape {
    pub fn of(spec: &VmSpec) -> Shape {
        Shape {
            image: spec.image.clone(),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            nic: spec.net.is_some(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Meta {
    id: String,
    shape: Shape,
    image_key: String,
    qemu_version: String,
    accel: String,
    /// Kernel arguments the template booted with (restores pass the same).
    cmdline: Vec<String>,
    disk_bytes: u64,
    state_bytes: u64,
    boot_ms: u64,
    save_ms: u64,
    /// Guest RAM is the file `ram` (the state holds devices only); else RAM is in `state`.
    #[serde(default)]
    shared_ram: bool,
}

/// A built template.
#[derive(Debug, Clone)]
pub struct Template {
    pub id: String,
    pub dir: PathBuf,
    pub shape: Shape,
    pub cmdline: Vec<String>,
    /// Virtual size of the template's disk; restored VMs grow from it.
    pub disk_bytes: u64,
    /// Size of the saved state.
    pub state_bytes: u64,
    /// Guest RAM kept apart from the state (the file `ram`): restores map it copy-on-write
    /// from a sealed memfd the host loads (see [`Host::load_template_memory`](crate::Host::load_template_memory)).
    pub shared_ram: bool,
}

impl Template {
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn ram(&self) -> PathBuf {
        self.dir.join("ram")
    }

    /// Bytes of guest RAM a loaded copy of this template's memory holds (all of it: see
    /// [`fill_holes`](memory::fill_holes)); 0 when its RAM is in its state.
    pub fn memory_bytes(&self) -> u64 {
        match self.shared_ram {
            true => u64::from(self.shape.memory_mib) << 20,
            false => 0,
        }
    }

    /// A template (or a live capture, see [`Host::capture`](crate::Host::capture)) kept in `dir`.
    pub fn open(dir: &Path) -> Result<Template> {
        let path = dir.join("meta.json");
        let meta: Meta =
            serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
                .with_context(|| format!("parsing {}", path.display()))?;
        let t = Template {
            id: meta.id,
            dir: dir.to_path_buf(),
            shape: meta.shape,
            cmdline: meta.cmdline,
            disk_bytes: meta.disk_bytes,
            state_bytes: meta.state_bytes,
            shared_ram: meta.shared_ram,
        };
        let mut files = vec![t.disk(), t.state()];
        if t.shared_ram {
            files.push(t.ram());
        }
        for f in files {
            check!(f.is_file(), Template, "template {} lacks {}", t.id, f.display());
        }
        // Older daemons left the disk owned by the build's uid; it is read-only to every VM
        // and root's from now on (best effort: a read-only store still serves).
        let disk = t.disk();
        if std::fs::symlink_metadata(&disk).is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) != 0) {
            let _ = std::os::unix::fs::lchown(&disk, Some(0), Some(0));
        }
        Ok(t)
    }
}

/// Per template id: the template once known, or the last failure.
#[derive(Default)]
pub(crate) struct Slot {
    ready: Option<Arc<Template>>,
    failed: Option<(Instant, String)>,
}

/// Kernel arguments of a template (and of every VM restored from it): no hostname, address or
/// DNS, since restores get their own through the agent.
fn template_cmdline(image: &Image) -> Vec<String> {
    let mut c = Vec::new();
    if let Some(init) = image.init() {
        c.push(format!("init={init}"));
    }
    c.push("slicer.hostname=template".into());
    c
}

/// The cgroup of a QEMU run in scratch directory `dir` (a template build, a capture): the
/// directory's name without its leading dot.
fn cgroup_name_of(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().trim_start_matches('.').to_string())
        .unwrap_or_default()
}

/// A build directory, removed unless the build completes.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills a QEMU when a build step fails.
struct KillOnDrop<'a>(&'a QemuProcess);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        self.0.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Host;

    /// A template directory whose `ram` file is `mib` MiB (the rest of a template's files are
    /// empty: loading memory reads only `ram`).
    fn template(root: &Path, name: &str, mib: u32) -> Template {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let meta = Meta {
            id: name.into(),
            shape: Shape {
                image: "min".into(),
                cpus: 1,
                memory_mib: mib,
                nic: false,
            },
            image_key: String::new(),
            qemu_version: String::new(),
            accel: "tcg".into(),
            cmdline: Vec::new(),
            disk_bytes: 0,
            state_bytes: 0,
            boot_ms: 0,
            save_ms: 0,
            shared_ram: true,
        };
        std::fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        for f in ["disk.qcow2", "state"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        let ram = std::fs::File::create(dir.join("ram")).unwrap();
        ram.set_len(u64::from(mib) << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&ram, b"guest data", 4096).unwrap();
        Template::open(&dir).unwrap()
    }

    /// Memfds of this process of `bytes` each (what the loaded memory really holds).
    fn memfds_of(sizes: &[u64]) -> u64 {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("slicer-template-ram")))
            .filter_map(|e| std::fs::metadata(e.path()).ok().map(|m| m.len()))
            .filter(|l| sizes.contains(l))
            .sum()
    }

    #[test]
    fn loaded_memory_stays_within_its_limit_least_recently_used_out() {
        let tmp = tempfile::tempdir().unwrap();
        let host = Host::new(tmp.path(), &tmp.path().join("vms"));
        const MIB: u64 = 1 << 20;
        // Sizes no other test of this process uses.
        let (a, b, c) = (
            template(tmp.path(), "a", 3),
            template(tmp.path(), "b", 5),
            template(tmp.path(), "c", 7),
        );
        let sizes = [3 * MIB, 5 * MIB, 7 * MIB];
        host.template_memory.set_limit(12 * MIB);
        let ma = host.load_template_memory(&a).unwrap();
        // The copy holds the file's data.
        let mut buf = [0u8; 10];
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::from(ma.try_clone().unwrap()), &mut buf, 4096)
            .unwrap();
        assert_eq!(&buf, b"guest data");
        drop(host.load_template_memory(&b).unwrap());
        // `a` is used again (a clone holds it): `b` is the least recently used.
        assert!(Arc::ptr_eq(&host.load_template_memory(&a).unwrap(), &ma));
        drop(host.load_template_memory(&c).unwrap());
        let u = host.template_memory.usage();
        assert_eq!((u.loaded, u.loaded_bytes), (2, 10 * MIB), "{u:?}");
        assert!(host.template_memory.contains(&a.dir) && !host.template_memory.contains(&b.dir));
        assert_eq!(memfds_of(&sizes), 10 * MIB);

        // Over the limit, what no clone holds goes first: `c`, although `a` is older.
        host.template_memory.set_limit(4 * MIB);
        assert!(host.template_memory.contains(&a.dir) && !host.template_memory.contains(&c.dir));
        host.template_memory.set_limit(2 * MIB);
        // `a` is evicted but still held by its "clone": pinned, not loaded.
        let u = host.template_memory.usage();
        assert_eq!((u.loaded_bytes, u.pinned_bytes), (0, 3 * MIB), "{u:?}");
        assert_eq!(memfds_of(&sizes), 3 * MIB);
        drop(ma);
        assert_eq!(host.template_memory.usage().pinned_bytes, 0);
        assert_eq!(memfds_of(&sizes), 0);

        // Making room unloads only what no clone maps.
        host.template_memory.set_limit(100 * MIB);
        let held = host.load_template_memory(&b).unwrap();
        drop(host.load_template_memory(&c).unwrap());
        assert_eq!(host.template_memory.evict_unused(100 * MIB), 7 * MIB);
        assert!(host.template_memory.contains(&b.dir));
        host.template_memory.forget(&b.dir);
        assert_eq!(host.template_memory.usage().loaded, 0);
        // A restore after eviction loads it again from disk.
        assert!(!Arc::ptr_eq(&host.load_template_memory(&b).unwrap(), &held));
    }
}
