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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{check, fail, Context, Result};
use crate::Error;
use serde::{Deserialize, Serialize};
use slicer_agent_client::AgentClient;
use slicer_hypervisor::{Accel, QemuNet, QemuProcess, Qmp};
use slicer_image::Image;

use crate::{tail, Host, Vm, VmSpec};

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
struct Meta {
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
    /// from a sealed memfd the host loads (see [`Host::load_template_memory`]).
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
    /// [`fill_holes`]); 0 when its RAM is in its state.
    pub fn memory_bytes(&self) -> u64 {
        match self.shared_ram {
            true => u64::from(self.shape.memory_mib) << 20,
            false => 0,
        }
    }

    /// A template (or a live capture, see [`Host::capture`]) kept in `dir`.
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

/// Default bound of [`LoadedMemory`]: what a host keeps loaded unless told otherwise.
pub const DEFAULT_TEMPLATE_MEMORY: u64 = 2 << 30;

/// Template and capture memory a host keeps loaded for the next restores: sealed memfds (see
/// [`Host::load_template_memory`]) by template directory, at most `limit` bytes of them, the least
/// recently used going first (one no running clone maps before one that some clone does).
///
/// Evicting only closes the host's descriptor: a running clone maps the memfd, which keeps it
/// (and the `Vm` of that clone keeps a descriptor too, so it is still counted here); the next
/// restore of that template loads it from disk again. Every memfd made is counted in
/// [`MemoryUse::pinned_bytes`] until its last holder closes it.
pub struct LoadedMemory {
    inner: std::sync::Mutex<Loaded>,
}

struct Loaded {
    limit: u64,
    /// Oldest use first.
    cache: Vec<Entry>,
    /// Every memfd made, with its size, until the cache and every clone have dropped it.
    made: Vec<(std::sync::Weak<std::os::fd::OwnedFd>, u64)>,
}

struct Entry {
    dir: PathBuf,
    fd: Arc<std::os::fd::OwnedFd>,
    bytes: u64,
}

/// What template and capture memory holds now (see [`LoadedMemory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Kept loaded by the host for later restores.
    pub loaded_bytes: u64,
    /// How many templates and captures that is.
    pub loaded: usize,
    /// All template and capture memory alive: loaded, or held by running clones.
    pub pinned_bytes: u64,
    /// The bound on `loaded_bytes`.
    pub limit_bytes: u64,
}

impl LoadedMemory {
    pub fn new(limit: u64) -> LoadedMemory {
        LoadedMemory {
            inner: std::sync::Mutex::new(Loaded {
                limit,
                cache: Vec::new(),
                made: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bounds what is kept loaded to `limit` bytes (evicting now if over it).
    pub fn set_limit(&self, limit: u64) {
        let mut l = self.lock();
        l.limit = limit;
        l.trim();
    }

    /// The memory loaded for the template in `dir`, now the most recently used.
    pub fn get(&self, dir: &Path) -> Option<Arc<std::os::fd::OwnedFd>> {
        let mut l = self.lock();
        let i = l.cache.iter().position(|e| e.dir == dir)?;
        let e = l.cache.remove(i);
        let fd = e.fd.clone();
        l.cache.push(e);
        Some(fd)
    }

    /// Whether the memory of the template in `dir` is loaded.
    pub fn contains(&self, dir: &Path) -> bool {
        self.lock().cache.iter().any(|e| e.dir == dir)
    }

    /// Keeps `fd` (`bytes` long) as the memory of the template in `dir`, then evicts past the
    /// limit (this one too when it alone is over it: the caller's handle still works). When
    /// another caller loaded it meanwhile, that copy is kept and returned.
    pub fn insert(&self, dir: &Path, fd: Arc<std::os::fd::OwnedFd>, bytes: u64) -> Arc<std::os::fd::OwnedFd> {
        let mut l = self.lock();
        if let Some(e) = l.cache.iter().find(|e| e.dir == dir) {
            return e.fd.clone();
        }
        l.made.push((Arc::downgrade(&fd), bytes));
        l.cache.push(Entry {
            dir: dir.to_path_buf(),
            fd: fd.clone(),
            bytes,
        });
        l.trim();
        fd
    }

    /// Evicts loaded memory no running clone maps, least recently used first, until `need`
    /// bytes are freed or none is left; returns what was freed.
    pub fn evict_unused(&self, need: u64) -> u64 {
        let mut l = self.lock();
        let mut freed = 0;
        while freed < need {
            let Some(i) = l.cache.iter().position(|e| Arc::strong_count(&e.fd) == 1) else {
                break;
            };
            let e = l.cache.remove(i);
            tracing::info!(
                "unloaded the memory of {} ({} MiB) to make room",
                e.dir.display(),
                e.bytes >> 20
            );
            freed += e.bytes;
        }
        freed
    }

    /// Drops the memory of the template in `dir` (a removed commit).
    pub fn forget(&self, dir: &Path) {
        self.lock().cache.retain(|e| e.dir != dir);
    }

    /// What is loaded and alive now.
    pub fn usage(&self) -> MemoryUse {
        let mut l = self.lock();
        l.made.retain(|(w, _)| w.strong_count() > 0);
        MemoryUse {
            loaded_bytes: l.cache.iter().map(|e| e.bytes).sum(),
            loaded: l.cache.len(),
            pinned_bytes: l.made.iter().map(|(_, b)| b).sum(),
            limit_bytes: l.limit,
        }
    }
}

impl Loaded {
    /// Evicts the least recently used until the loaded memory fits the limit: first what no
    /// clone maps (that frees memory now), then the rest (freed when its clones end).
    fn trim(&mut self) {
        let mut total: u64 = self.cache.iter().map(|e| e.bytes).sum();
        for unused_only in [true, false] {
            while total > self.limit {
                let Some(i) = self
                    .cache
                    .iter()
                    .position(|e| !unused_only || Arc::strong_count(&e.fd) == 1)
                else {
                    break;
                };
                let e = self.cache.remove(i);
                tracing::info!(
                    "unloaded the memory of {} ({} MiB): template memory is bounded to {} MiB",
                    e.dir.display(),
                    e.bytes >> 20,
                    self.limit >> 20
                );
                total -= e.bytes;
            }
        }
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

impl Host {
    /// The RAM of `template` (with `shared_ram`) as a sealed memfd (no write, grow or shrink;
    /// seals sealed), loaded from its `ram` file unless the host's [`LoadedMemory`] holds it.
    /// Clones map it privately through `/proc/self/fd/N`: a memfd opens read-write for any
    /// uid (a file on disk would have to be writable by each VM's uid to be mapped that way),
    /// and its seals keep every clone from changing what the others see. Only the file's data
    /// extents are copied; the rest is allocated zeroed (see [`fill_holes`]), so a clone is
    /// charged only for what it writes.
    pub fn load_template_memory(&self, template: &Template) -> Result<Arc<std::os::fd::OwnedFd>> {
        if let Some(m) = self.template_memory.get(&template.dir) {
            return Ok(m);
        }
        let fd = sealed_copy(&template.ram()).with_context(|| format!("loading template {}'s memory", template.id))?;
        let bytes = std::fs::File::from(fd.try_clone()?).metadata()?.len();
        Ok(self.template_memory.insert(&template.dir, Arc::new(fd), bytes))
    }

    /// Where templates are kept: beside the images they are made from.
    pub fn templates_dir(&self) -> PathBuf {
        self.images.root().join("templates")
    }

    async fn qemu_version(&self) -> Result<String> {
        self.qemu_version
            .get_or_try_init(|| slicer_hypervisor::qemu::version(&self.qemu))
            .await
            .cloned()
            .map_err(Into::into)
    }

    /// The template for `shape`: from memory, from disk, or built now (one build per template at
    /// a time; concurrent callers wait for it). A failed build is remembered for
    /// [`RETRY_AFTER`], so callers fall back to cold boots without retrying each time.
    pub async fn template(&self, shape: &Shape) -> Result<Arc<Template>> {
        let image = self.images.get(&shape.image)?;
        let accel = self.accel(&image.kernel).await?;
        let qemu_version = self.qemu_version().await?;
        let cmdline = template_cmdline(&image);
        let mut probe = self.qemu_config("template", Path::new("/"), accel, &image, shape.cpus, shape.memory_mib);
        probe.cmdline = cmdline.clone();
        let id = slicer_image::key_of(&[
            &FORMAT.to_le_bytes(),
            image.key.as_bytes(),
            image.kernel.to_string_lossy().as_bytes(),
            image.rootfs.to_string_lossy().as_bytes(),
            qemu_version.as_bytes(),
            accel.as_str().as_bytes(),
            probe.kernel_cmdline().as_bytes(),
            &shape.cpus.to_le_bytes(),
            &shape.memory_mib.to_le_bytes(),
            &[shape.nic as u8],
            &[self.shared_template_ram as u8],
        ]);
        let slot = self
            .templates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.clone())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(t) = &slot.ready {
            return Ok(t.clone());
        }
        if let Some((at, why)) = &slot.failed {
            if at.elapsed() < RETRY_AFTER {
                fail!(
                    Template,
                    "the template for {shape:?} failed to build {}s ago: {why}",
                    at.elapsed().as_secs()
                );
            }
        }
        let dir = self.templates_dir().join(&id);
        let result = if dir.join("meta.json").is_file() {
            Template::open(&dir)
        } else {
            let meta = Meta {
                id: id.clone(),
                shape: shape.clone(),
                image_key: image.key.clone(),
                qemu_version,
                accel: accel.as_str().to_string(),
                cmdline,
                disk_bytes: 0,
                state_bytes: 0,
                boot_ms: 0,
                save_ms: 0,
                shared_ram: self.shared_template_ram,
            };
            match self.build_template(&image, accel, meta.clone(), &dir).await {
                Err(e) if meta.shared_ram => {
                    // Where QEMU cannot keep RAM in a file (or ignore it when saving), the
                    // template holds RAM in its state, as before.
                    tracing::warn!(
                        "template {} with RAM in a file failed ({:#}); building it with RAM in its state",
                        meta.id,
                        slicer_agent_client::GuestText(&e)
                    );
                    self.build_template(
                        &image,
                        accel,
                        Meta {
                            shared_ram: false,
                            ..meta
                        },
                        &dir,
                    )
                    .await
                }
                r => r,
            }
        };
        match result {
            Ok(t) => {
                let t = Arc::new(t);
                slot.ready = Some(t.clone());
                slot.failed = None;
                Ok(t)
            }
            Err(e) => {
                slot.failed = Some((Instant::now(), format!("{e:#}")));
                Err(e)
            }
        }
    }

    /// Builds left by a process that died (a daemon killed during a build): their QEMU, which
    /// runs in a process group of its own and so outlives the daemon, is killed, then their
    /// cgroup and scratch directory go. A live process's builds are left alone.
    async fn sweep_dead_builds(&self, root: &Path) {
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(".build-") else {
                continue;
            };
            let owner = rest.rsplit('-').nth(1).and_then(|p| p.parse::<i32>().ok());
            // SAFETY: kill(2) with signal 0 only asks whether the process exists.
            let alive = owner.is_some_and(|p| p > 0 && unsafe { libc::kill(p, 0) } == 0);
            if alive {
                continue;
            }
            let dir = e.path();
            let needle = dir.to_string_lossy().into_owned();
            let pids = slicer_hypervisor::qemu::processes_where(|args| {
                args.iter().any(|a| String::from_utf8_lossy(a).contains(&needle))
            });
            for pid in &pids {
                tracing::warn!("stopping QEMU {pid} of a template build whose daemon died ({name})");
                // SAFETY: kill(2) on a QEMU whose command line names the dead build's directory.
                unsafe {
                    libc::kill(*pid as i32, libc::SIGKILL);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while pids.iter().any(|p| Path::new(&format!("/proc/{p}")).exists()) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Some(cg) = self.jail.as_ref().and_then(|j| j.cgroup_of(&cgroup_name_of(&dir))) {
                let _ = cg.remove();
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// Boots the template guest in a scratch directory, saves it and moves it to `dir`.
    async fn build_template(&self, image: &Image, accel: Accel, mut meta: Meta, dir: &Path) -> Result<Template> {
        let root = self.templates_dir();
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        self.sweep_dead_builds(&root).await;
        let scratch = Scratch(root.join(format!(
            ".build-{}-{}-{:08x}",
            meta.id,
            std::process::id(),
            rand::random::<u32>()
        )));
        let _ = std::fs::remove_dir_all(&scratch.0);
        std::fs::create_dir(&scratch.0).with_context(|| format!("creating {}", scratch.0.display()))?;
        let s = &scratch.0;
        tracing::info!("building template {} for {:?}", meta.id, meta.shape);
        let disk = s.join("disk.qcow2");
        slicer_storage::create_overlay(&image.rootfs, &disk, None).await?;
        let mut cfg = self.qemu_config("template", s, accel, image, meta.shape.cpus, meta.shape.memory_mib);
        cfg.cmdline = meta.cmdline.clone();
        cfg.ram = Some(match meta.shared_ram {
            true => slicer_hypervisor::qemu::RamBacking::SharedFile(s.join("ram")),
            false => slicer_hypervisor::qemu::RamBacking::Anonymous,
        });
        cfg.net = meta.shape.nic.then(|| QemuNet {
            netns: None,
            tap: None,
            mac: TEMPLATE_MAC.into(),
            own_netns: false,
        });
        let started = Instant::now();
        let cgroup_name = cgroup_name_of(s);
        let qemu = self
            .spawn_qemu(&cfg, &cgroup_name, u64::from(meta.shape.memory_mib) << 20)
            .await?;
        let killer = KillOnDrop(&qemu);
        let agent = AgentClient::new(&cfg.agent_socket);
        tokio::select! {
            r = agent.wait_ready(BUILD_BOOT_TIMEOUT) => {
                r.with_context(|| format!("template guest did not become ready; console:\n{}", tail(&cfg.console_log, 30)))?;
            }
            _ = qemu.wait() => fail!(QemuExited,
                "QEMU exited while booting the template; QEMU said:\n{}\nconsole:\n{}",
                tail(&cfg.qemu_log, 10),
                tail(&cfg.console_log, 30)
            ),
        }
        // Under an init system the agent answers before the boot is over: let it finish, so
        // restored guests start idle and fully booted. Then clean disk pages, and no host
        // session inside the saved state: a restored guest's agent simply waits for its host.
        let settle = if image.init().is_none() {
            "systemctl is-system-running --wait >/dev/null 2>&1; sync"
        } else {
            "sync"
        };
        let synced = tokio::time::timeout(
            BUILD_BOOT_TIMEOUT,
            agent.exec_output(&slicer_agent_proto::ExecRequest::shell(settle), None),
        )
        .await
        .context("the template guest did not settle")?
        .context("syncing the template's disk")?;
        meta.boot_ms = started.elapsed().as_millis() as u64;
        check!(
            synced.status.success(),
            Guest,
            "sync in the template guest failed: {:?}",
            synced.status
        );
        agent.reset().await;
        drop(agent);
        let saved = Instant::now();
        let qmp = Qmp::connect(&cfg.qmp_socket, Duration::from_secs(5)).await?;
        if meta.shared_ram {
            qmp.ignore_shared_ram().await?;
        }
        let state_tmp = s.join("state.tmp");
        let state_file = crate::jail::private_file(&state_tmp)?;
        qmp.save_state(&state_file, SAVE_TIMEOUT)
            .await
            .context("saving the template")?;
        drop(state_file);
        meta.save_ms = saved.elapsed().as_millis() as u64;
        crate::quit(&qmp, &qemu).await;
        drop(killer);
        std::fs::rename(&state_tmp, s.join("state"))?;
        meta.state_bytes = std::fs::metadata(s.join("state"))?.len();
        meta.disk_bytes = std::fs::metadata(&image.rootfs)?.len();
        for f in ["agent.sock", "qmp.sock", "console.sock"] {
            let _ = std::fs::remove_file(s.join(f));
        }
        // Restored VMs' overlays read this disk: nothing may write it again.
        std::os::unix::fs::lchown(&disk, Some(0), Some(0))?;
        std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o444))?;
        if meta.shared_ram {
            // QEMU made it as the build's uid: the daemon's from now on, read by the daemon only.
            let ram = s.join("ram");
            std::os::unix::fs::chown(&ram, Some(0), Some(0))?;
            std::fs::set_permissions(&ram, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
        }
        std::fs::write(s.join("meta.json"), serde_json::to_vec_pretty(&meta)?)?;
        match std::fs::rename(s, dir) {
            Ok(()) => {}
            // Another process built the same template meanwhile: use theirs.
            Err(_) if dir.join("meta.json").is_file() => {}
            Err(e) => return Err(e).with_context(|| format!("moving the template to {}", dir.display())),
        }
        tracing::info!(
            "template {} ready: boot {} ms, save {} ms, {} MB of state",
            meta.id,
            meta.boot_ms,
            meta.save_ms,
            meta.state_bytes >> 20
        );
        Template::open(dir)
    }
}

/// How long a live capture paused its source, and took in all.
#[derive(Debug, Clone, Copy)]
pub struct CaptureTimes {
    pub paused: Duration,
    pub total: Duration,
}

impl Host {
    /// Captures the running `vm` (of `shape`) into `dest`, in a template's layout: its disk as
    /// it is now (`disk.qcow2`), its RAM (`ram`) and its devices (`state`). VMs restored from
    /// it ([`Vm::restore`]) continue from that moment, their RAM mapped copy-on-write from
    /// the capture.
    ///
    /// The source pauses while its disk is copied and its RAM streamed (through a pipe) into
    /// a capture QEMU started beforehand, whose RAM is a memfd of ours; then it continues. Its
    /// host session with the agent is closed first (a live fork must not inherit one), so
    /// open exec streams of the source end. The capture QEMU then saves its devices alone
    /// (`x-ignore-shared`) and quits; the memfd, its zero pages punched out and sealed, is the
    /// capture's memory, and is written to `ram` for later daemons. On failure the source
    /// continues and nothing is left.
    pub async fn capture(&self, vm: &Vm, shape: &Shape, dest: &Path) -> Result<(Template, CaptureTimes)> {
        let started = Instant::now();
        check!(vm.is_running(), State, "VM {} is not running", vm.name);
        check!(
            vm.dir().join(crate::RAM_NAMED).exists(),
            State,
            "VM {} was started by an older daemon and its memory cannot be captured; restart it first",
            vm.name
        );
        check!(!dest.exists(), State, "{} already exists", dest.display());
        check!(
            !shape.nic || self.jail.is_some(),
            Template,
            "capturing a VM with a NIC needs jailed QEMUs (the capture's TAP lives in its own network namespace)"
        );
        let image = self.images.get(&shape.image)?;
        let parent = dest.parent().context("capture destination has no parent")?;
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let scratch = Scratch(parent.join(format!(".capture-{:08x}", rand::random::<u32>())));
        std::fs::create_dir(&scratch.0).with_context(|| format!("creating {}", scratch.0.display()))?;
        let s = &scratch.0;
        let source_disk = vm.dir().join("disk.qcow2");
        let disk_bytes = slicer_storage::virtual_size(&source_disk)?;
        // The capture QEMU never runs the guest: its drive only needs the source's size.
        let mut cfg = self.qemu_config("capture", s, vm.accel, &image, shape.cpus, shape.memory_mib);
        cfg.disk = s.join("capture.qcow2");
        slicer_storage::create_overlay(&image.rootfs, &cfg.disk, Some(disk_bytes)).await?;
        cfg.cmdline = template_cmdline(&image);
        // RAM in a memfd, allocated before the source pauses: loading the stream then only
        // copies (no page faults, no filesystem work per page), and the memfd becomes the
        // capture's sealed memory as it is.
        let mem_len = u64::from(shape.memory_mib) << 20;
        let mem = new_memfd(mem_len)?;
        cfg.ram = Some(slicer_hypervisor::qemu::RamBacking::SharedFd(
            std::os::fd::AsRawFd::as_raw_fd(&mem),
        ));
        cfg.incoming = Some(s.join("state"));
        // A source on a TAP saved its NIC with the TAP's offloads (vnet_hdr), which only a TAP
        // can load: the capture gets one, alone in a network namespace of its own.
        cfg.net = shape.nic.then(|| QemuNet {
            netns: None,
            tap: Some("capture0".into()),
            mac: TEMPLATE_MAC.into(),
            own_netns: true,
        });
        let cgroup_name = cgroup_name_of(s);
        let capture = self
            .spawn_qemu(&cfg, &cgroup_name, u64::from(shape.memory_mib) << 20)
            .await?;
        let _killer = KillOnDrop(&capture);
        let cap = Qmp::connect(&cfg.qmp_socket, Duration::from_secs(10)).await?;
        let (rd, wr) = slicer_hypervisor::qemu::pipe()?;
        let (rd, wr) = (std::fs::File::from(rd), std::fs::File::from(wr));
        cap.incoming(&rd, false).await?;
        drop(rd);

        vm.agent.reset().await;
        let src = vm.qmp().await?;
        src.execute("stop", None).await.context("pausing the source")?;
        let paused = Instant::now();
        let frozen = s.join("disk.qcow2");
        let moved = async {
            // Stopped, QEMU has flushed the disk: a copy of the overlay is its state now.
            let (from, to) = (source_disk.clone(), frozen.clone());
            let copy = tokio::task::spawn_blocking(move || copy_disk(&from, &to));
            let ram = async {
                let r = src
                    .save_state(&wr, SAVE_TIMEOUT)
                    .await
                    .context("streaming the source's memory");
                drop(wr);
                r
            };
            let (copied, sent, loaded) = tokio::join!(copy, ram, cap.wait_incoming(SAVE_TIMEOUT));
            copied
                .context("copying the disk")?
                .with_context(|| format!("copying {}", source_disk.display()))?;
            sent?;
            loaded.context("loading the source's memory into the capture")?;
            Ok::<(), Error>(())
        };
        let moved = tokio::select! {
            r = moved => r,
            st = capture.wait() => Err(Error::QemuExited(format!(
                "the capture QEMU exited ({}); QEMU said:\n{}",
                st.map(|s| s.to_string()).unwrap_or_default(),
                tail(&cfg.qemu_log, 10)
            ))),
        };
        // The source goes on whatever happened (after a completed migration `cont` takes its
        // disk back).
        let resumed = src.execute("cont", None).await;
        let paused = paused.elapsed();
        if let Err(e) = moved {
            let _ = tokio::time::timeout(Duration::from_secs(2), capture.wait()).await;
            return Err(e).context(format!(
                "the capture failed; its QEMU said:\n{}",
                tail(&cfg.qemu_log, 10)
            ));
        }
        resumed.context("resuming the source")?;
        let _ = vm
            .agent
            .set_identity(&slicer_agent_proto::Identity {
                time_unix_ns: Some(crate::now_unix_ns()),
                ..Default::default()
            })
            .await;

        cap.ignore_shared_ram().await?;
        let state_tmp = s.join("state.tmp");
        let state_file = crate::jail::private_file(&state_tmp)?;
        cap.save_state(&state_file, SAVE_TIMEOUT)
            .await
            .context("saving the captured devices")?;
        drop(state_file);
        crate::quit(&cap, &capture).await;
        std::fs::rename(&state_tmp, s.join("state"))?;
        for f in ["agent.sock", "qmp.sock", "console.sock", "capture.qcow2"] {
            let _ = std::fs::remove_file(s.join(f));
        }
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::lchown(&frozen, Some(0), Some(0))?;
        std::fs::set_permissions(&frozen, std::fs::Permissions::from_mode(0o444))?;
        // The capture QEMU is gone: its memory is kept on disk for later daemons without its
        // zero pages (read by the daemon only), then filled and sealed for forks (see
        // `fill_holes`).
        punch_zero_pages(&mem, mem_len)?;
        let ram = s.join("ram");
        let ram_file = crate::jail::private_file(&ram)?;
        ram_file.set_len(mem_len)?;
        copy_extents(&mem, &ram_file, mem_len).context("writing the captured memory")?;
        drop(ram_file);
        fill_holes(&mem, mem_len)?;
        seal(&mem)?;
        std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o400))?;
        let meta = Meta {
            id: dest
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            shape: shape.clone(),
            image_key: image.key.clone(),
            qemu_version: self.qemu_version().await?,
            accel: vm.accel.as_str().to_string(),
            cmdline: cfg.cmdline.clone(),
            disk_bytes,
            state_bytes: std::fs::metadata(s.join("state"))?.len(),
            boot_ms: 0,
            save_ms: paused.as_millis() as u64,
            shared_ram: true,
        };
        std::fs::write(s.join("meta.json"), serde_json::to_vec_pretty(&meta)?)?;
        std::fs::rename(s, dest).with_context(|| format!("moving the capture to {}", dest.display()))?;
        let t = Template::open(dest)?;
        self.template_memory
            .insert(dest, Arc::new(std::os::fd::OwnedFd::from(mem)), mem_len);
        tracing::info!(
            vm = %vm.name,
            "captured live into {}: paused {} ms, {} ms in all",
            dest.display(),
            paused.as_millis(),
            started.elapsed().as_millis()
        );
        Ok((
            t,
            CaptureTimes {
                paused,
                total: started.elapsed(),
            },
        ))
    }
}

/// A new memfd of `len` bytes that can be sealed.
fn new_memfd(len: u64) -> Result<std::fs::File> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: a NUL-terminated name; the kernel returns a new descriptor or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"slicer-template-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(Error::Io {
            context: "memfd_create".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the kernel just gave us this descriptor.
    let mem = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    mem.set_len(len)?;
    Ok(mem)
}

/// Copies the data extents of `src` (its first `len` bytes) to the same offsets of `dst`:
/// holes (never-touched guest pages) stay holes.
/// Copies a VM's disk (in its root-only directory, never through a link at its name) to `to`
/// with its recorded chain: the copy has the same backing files.
fn copy_disk(from: &Path, to: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(from)?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    let n = std::io::copy(&mut src, &mut dst)?;
    let chain = slicer_storage::trusted_chain(from).map_err(std::io::Error::other)?;
    slicer_storage::write_chain(to, &chain).map_err(std::io::Error::other)?;
    Ok(n)
}

fn copy_extents(src: &std::fs::File, dst: &std::fs::File, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let raw = src.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a descriptor the caller owns.
        let data = unsafe { libc::lseek(raw, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after pos
        }
        // SAFETY: as above.
        let hole = (unsafe { libc::lseek(raw, data, libc::SEEK_HOLE) }.max(data) as u64).min(len);
        let mut at = data as u64;
        while at < hole {
            let n = ((hole - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        pos = hole as i64;
    }
    Ok(())
}

/// Punches out the all-zero pages of `mem` (a capture's memory, allocated in full): guest
/// pages never written then take no memory in it, nor in the copy on disk.
fn punch_zero_pages(mem: &std::fs::File, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    static ZERO_PAGE: [u8; PAGE] = [0; PAGE];
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    // A run of zero pages, punched in one call when it ends.
    let mut run: Option<u64> = None;
    let punch = |from: u64, to: u64| -> Result<()> {
        // SAFETY: fallocate on a descriptor the caller owns.
        let r = unsafe {
            libc::fallocate(
                mem.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                from as i64,
                (to - from) as i64,
            )
        };
        if r != 0 {
            return Err(Error::Io {
                context: "punching zero pages".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    };
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        mem.read_exact_at(&mut buf[..n], at)?;
        for (i, page) in buf[..n].chunks(PAGE).enumerate() {
            let off = at + (i * PAGE) as u64;
            // A slice comparison is one memcmp, fast in any build.
            match (page == &ZERO_PAGE[..page.len()], run) {
                (true, None) => run = Some(off),
                (false, Some(from)) => {
                    punch(from, off)?;
                    run = None;
                }
                _ => {}
            }
        }
        at += n as u64;
    }
    if let Some(from) = run {
        punch(from, len)?;
    }
    Ok(())
}

/// Allocates every page of `mem` that is a hole (a zero page the guest never wrote), so the
/// memfd holds the whole of the guest's RAM. Clones map it privately, and tmpfs, unlike a
/// disk file, allocates a page in the file itself on a fault in a hole, a write fault too
/// (the copy-on-write needs a source page): left sparse, a clone's cgroup would be charged
/// for that shared page as well as its private copy, up to twice its RAM, and the kernel kills
/// a guest that merely uses all of its memory. Filled here, the template's pages are the
/// daemon's, allocated once, and a clone is charged only for the pages it writes.
fn fill_holes(mem: &std::fs::File, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor the caller owns; mode 0 only allocates within the size.
    if unsafe { libc::fallocate(mem.as_raw_fd(), 0, 0, len as i64) } != 0 {
        return Err(Error::Io {
            context: "allocating the template memory".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Seals a memfd against write, grow, shrink and further seals (no shared writable mapping of
/// it may exist any more).
fn seal(mem: &std::fs::File) -> Result<()> {
    use std::os::fd::AsRawFd;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor the caller owns.
    if unsafe { libc::fcntl(mem.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(Error::Io {
            context: "sealing the template memory".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `path`'s data extents copied into a new memfd of the same size, then sealed.
fn sealed_copy(path: &Path) -> Result<std::os::fd::OwnedFd> {
    let src = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = src.metadata()?.len();
    let mem = new_memfd(len)?;
    copy_extents(&src, &mem, len)?;
    fill_holes(&mem, len)?;
    seal(&mem)?;
    Ok(std::os::fd::OwnedFd::from(mem))
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
