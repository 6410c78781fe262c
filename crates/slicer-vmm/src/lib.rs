//! The VM library: a [`Host`] knows where images, VM directories and QEMU are; [`Vm::boot`]
//! assembles one microVM from an image and a [`VmSpec`] (per-VM overlay disk, sockets, console
//! log, kernel command line), starts QEMU and waits for the agent; [`Vm::restore`] starts one
//! from a [`Template`] instead; the [`Vm`] handle runs commands and moves files through the
//! agent, suspends the VM to a file (`saved`: restores, resumes and suspends), and stops it in
//! escalating steps.

pub mod jail;
pub mod template;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod error;
mod saved;
use error::{check, fail, Context};
pub use error::{Error, Result};
use slicer_agent_client::AgentClient;
use slicer_agent_proto::{Identity, NetIdentity, PowerAction};
use slicer_hypervisor::{Accel, AccelChoice, QemuConfig, QemuProcess, Qmp};
use slicer_image::{Image, ImageStore};
use tokio::sync::OnceCell;

pub use slicer_agent_client as agent;
pub use slicer_agent_proto::ExecRequest;
pub use template::{LoadedMemory, MemoryUse, Shape, Template, DEFAULT_TEMPLATE_MEMORY};

/// Longest an incoming QEMU may take to load a saved state.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// The saved state of a suspended VM, in its directory.
pub const SUSPEND_FILE: &str = "suspend.state";
/// Present in a VM's directory while its QEMU's RAM block is named `slicer.ram` (every VM this
/// library starts; not those of older daemons): a saved state of it loads only into that name,
/// and only such a VM can be captured live (see [`Host::capture`]).
const RAM_NAMED: &str = "ram-named";

/// Where things live on this host and how VMs are accelerated.
pub struct Host {
    pub images: ImageStore,
    /// Per-VM directories (disk overlay, sockets, logs) go below this.
    pub vm_root: PathBuf,
    pub qemu: PathBuf,
    pub accel_choice: AccelChoice,
    cache_dir: PathBuf,
    accel: OnceCell<Accel>,
    qemu_version: OnceCell<String>,
    /// How QEMUs are jailed; `None` runs them as the caller (see [`jail`]).
    pub jail: Option<jail::JailConfig>,
    templates: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<template::Slot>>>>,
    /// New templates keep guest RAM in a file that restored VMs map copy-on-write (default);
    /// `false` keeps RAM in the saved state and every restore loads its own copy.
    pub shared_template_ram: bool,
    /// Template and capture memory kept loaded, bounded (see [`LoadedMemory`]).
    pub template_memory: LoadedMemory,
}

impl Host {
    pub fn new(data_dir: &Path, vm_root: &Path) -> Host {
        Host::with_images(ImageStore::new(data_dir), data_dir, vm_root)
    }

    /// A host whose images come from `images` (e.g. a shared store) and whose caches live
    /// under `data_dir`.
    pub fn with_images(images: ImageStore, data_dir: &Path, vm_root: &Path) -> Host {
        Host {
            images,
            vm_root: vm_root.to_path_buf(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel_choice: AccelChoice::Auto,
            cache_dir: data_dir.join("cache"),
            accel: OnceCell::new(),
            qemu_version: OnceCell::new(),
            templates: Default::default(),
            jail: jail::JailConfig::for_host(),
            shared_template_ram: true,
            template_memory: LoadedMemory::new(template::DEFAULT_TEMPLATE_MEMORY),
        }
    }

    /// The QEMU configuration of a VM living in `dir`, before its kernel arguments, NIC and
    /// saved state are chosen.
    pub fn qemu_config(
        &self,
        name: &str,
        dir: &Path,
        accel: Accel,
        image: &Image,
        cpus: u32,
        memory_mib: u32,
    ) -> QemuConfig {
        QemuConfig {
            binary: self.qemu.clone(),
            name: name.to_string(),
            accel,
            cpus,
            memory_mib,
            kernel: image.kernel.clone(),
            cmdline: Vec::new(),
            disk: dir.join("disk.qcow2"),
            agent_socket: dir.join("agent.sock"),
            qmp_socket: dir.join("qmp.sock"),
            console_log: dir.join("console.log"),
            console_socket: Some(dir.join("console.sock")),
            qemu_log: dir.join("qemu.log"),
            net: None,
            incoming: None,
            ram: None,
            jail: None,
        }
    }

    /// Starts QEMU for `cfg`, jailed when this host jails VMs (see [`jail`]); `cgroup_name`
    /// names its cgroup (unique among running VMs: the VM's or build directory's name).
    pub async fn spawn_qemu(&self, cfg: &QemuConfig, cgroup_name: &str, memory_bytes: u64) -> Result<QemuProcess> {
        for stale in [&cfg.agent_socket, &cfg.qmp_socket] {
            let _ = std::fs::remove_file(stale);
        }
        if let Some(sock) = &cfg.console_socket {
            let _ = std::fs::remove_file(sock);
        }
        let Some(jc) = &self.jail else {
            return Ok(QemuProcess::spawn(cfg).await?);
        };
        let lease = jc.pool.lease(cgroup_name)?;
        let mut cfg = cfg.clone();
        cfg.jail = Some(jc.jail_for(&cfg, cgroup_name, lease.uid, memory_bytes)?);
        let spawned = QemuProcess::spawn(&cfg).await;
        drop(lease);
        Ok(spawned?)
    }

    /// Writes `disk` (a stopped VM's) and the files behind it as one standalone qcow2 file into
    /// `out` (open and empty). `qemu-img` runs under a uid of the VM pool when this host jails
    /// VMs, never as root, and reads only descriptors it inherits (see
    /// `slicer_storage::convert_standalone`).
    pub async fn export_disk(&self, disk: &Path, out: &std::fs::File) -> Result<()> {
        let hint = format!(
            "export-{}",
            disk.parent()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let lease = match &self.jail {
            Some(jc) => Some(jc.pool.lease(&hint)?),
            None => None,
        };
        let user = lease
            .as_ref()
            .map(|l| slicer_storage::Unprivileged { uid: l.uid, gid: l.uid });
        let r = slicer_storage::convert_standalone(disk, out, user).await;
        drop(lease);
        Ok(r?)
    }

    /// KVM or TCG, resolved once (see `slicer_hypervisor::accel`).
    pub async fn accel(&self, kernel: &Path) -> Result<Accel> {
        self.accel
            .get_or_try_init(|| {
                slicer_hypervisor::accel::resolve(self.accel_choice, &self.qemu, kernel, &self.cache_dir)
            })
            .await
            .copied()
            .map_err(Into::into)
    }
}

/// Raises this process's soft limit of open files to its hard limit: each running VM holds a
/// few descriptors here (agent, QMP and console sockets, QEMU's output pipe), so the usual soft
/// limit of 1024 would cap a host at a couple of hundred VMs. Returns the new limit.
pub fn raise_nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit fill and read a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    r.rlim_cur
}

/// Host memory a running VM may use beyond its guest RAM (QEMU itself, its TCG translation
/// buffer, device queues). Its cgroup's memory limit is `ram + vm_overhead_bytes(ram)`, and the
/// daemon's capacity budget reserves the same amount per running VM.
pub fn vm_overhead_bytes(_ram_bytes: u64) -> u64 {
    256 << 20
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Unique name; also the guest's hostname.
    pub name: String,
    /// Image name in the store (`min`, `systemd`).
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Virtual size of the root disk in bytes (default: the base image's size).
    pub disk_size: Option<u64>,
    pub dns: Vec<String>,
    /// Keep the disk when the VM stops, and boot from an existing disk if there is one.
    pub persistent: bool,
    /// Give an existing disk a new machine id on this boot (a fork's first boot).
    pub new_identity: bool,
    /// Extra kernel arguments.
    pub cmdline: Vec<String>,
    /// A NIC: the TAP (set up by the caller) and the guest's `ip=` kernel argument.
    pub net: Option<VmNet>,
    pub boot_timeout: Duration,
}

impl VmSpec {
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> VmSpec {
        VmSpec {
            name: name.into(),
            image: image.into(),
            cpus: 1,
            memory_mib: 256,
            disk_size: None,
            dns: Vec::new(),
            persistent: false,
            new_identity: false,
            cmdline: Vec::new(),
            net: None,
            boot_timeout: Duration::from_secs(60),
        }
    }
}

/// A VM's NIC: a TAP device (in `netns`, if given) and the guest's address on it.
#[derive(Debug, Clone)]
pub struct VmNet {
    pub netns: Option<String>,
    pub tap: String,
    pub mac: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

impl VmNet {
    /// The kernel's `ip=` argument, e.g. `ip=169.254.8.2::169.254.8.1:255.255.255.252::eth0:off`.
    pub fn kernel_ip_arg(&self) -> String {
        let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0));
        format!("ip={}::{}:{mask}::eth0:off", self.address, self.gateway)
    }

    /// QEMU's NIC on this VM's TAP.
    fn qemu(&self) -> slicer_hypervisor::QemuNet {
        slicer_hypervisor::QemuNet {
            own_netns: false,
            netns: self.netns.clone(),
            tap: Some(self.tap.clone()),
            mac: self.mac.clone(),
        }
    }

    fn identity(&self) -> NetIdentity {
        NetIdentity {
            mac: self.mac.clone(),
            address: self.address,
            prefix: self.prefix,
            gateway: self.gateway,
        }
    }
}

/// A fresh random machine id (32 hex digits).
fn new_machine_id() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// How a VM came to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Booted its kernel.
    Cold,
    /// Restored from a template.
    Template,
    /// Restored from its own suspended state.
    Resume,
    /// Taken over from an earlier daemon.
    Adopted,
}

impl StartMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StartMode::Cold => "cold",
            StartMode::Template => "template",
            StartMode::Resume => "resume",
            StartMode::Adopted => "adopted",
        }
    }
}

/// Whether `name` is a lowercase DNS label: 1-63 of `a-z 0-9 -`, not starting or ending with
/// `-`. The one check for VM names (hostnames, `name=` tags).
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Checks a VM name: a DNS label, since it becomes the hostname and part of paths.
pub fn validate_name(name: &str) -> Result<()> {
    check!(
        is_dns_label(name),
        InvalidSpec,
        "invalid VM name {name:?}: use 1-63 lowercase letters, digits and '-', not starting or ending with '-'"
    );
    Ok(())
}

/// How a VM ended when stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest powered off when asked.
    Graceful,
    /// QMP `quit` ended QEMU.
    Quit,
    /// SIGKILL.
    Killed,
    /// It had already exited.
    AlreadyExited,
}

/// A running VM. Dropping it kills QEMU and removes its files (all of them for an
/// ephemeral VM, all but the disk and console log for a persistent one); call [`Vm::stop`]
/// for a clean shutdown.
pub struct Vm {
    pub name: String,
    pub image: Image,
    pub accel: Accel,
    pub persistent: bool,
    pub start_mode: StartMode,
    /// From spawning QEMU to the agent's first health answer, in ns (0 until ready).
    boot_time_ns: std::sync::atomic::AtomicU64,
    started: Instant,
    dir: PathBuf,
    qmp_socket: PathBuf,
    console_log: PathBuf,
    qemu_log: PathBuf,
    qemu: QemuProcess,
    agent: AgentClient,
    /// Identity fix-ups the agent gets once it answers (restored VMs).
    pending: std::sync::Mutex<Option<Identity>>,
    cleaned: std::sync::atomic::AtomicBool,
    /// The template memory this VM's RAM maps (a clone's): held while the VM lives, so the
    /// host counts it as pinned (see [`LoadedMemory`]) even after evicting it.
    template_memory: Option<Arc<std::os::fd::OwnedFd>>,
}

/// Ends a QEMU whose state was saved: QMP `quit` (2 s), then SIGKILL if it has not exited
/// within 5 s.
pub(crate) async fn quit(qmp: &Qmp, qemu: &QemuProcess) {
    let _ = tokio::time::timeout(Duration::from_secs(2), qmp.execute("quit", None)).await;
    if tokio::time::timeout(Duration::from_secs(5), qemu.wait()).await.is_err() {
        qemu.kill();
        qemu.wait().await;
    }
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    slicer_hypervisor::console::tail(path, lines)
}

impl Vm {
    /// Starts a VM and waits until its agent answers.
    pub async fn boot(host: &Host, spec: &VmSpec) -> Result<Vm> {
        let vm = Vm::start(host, spec).await?;
        vm.wait_ready(spec.boot_timeout).await?;
        Ok(vm)
    }

    fn check_spec(spec: &VmSpec) -> Result<()> {
        validate_name(&spec.name)?;
        check!(
            (1..=64).contains(&spec.cpus),
            InvalidSpec,
            "cpus must be between 1 and 64, got {}",
            spec.cpus
        );
        check!(
            spec.memory_mib >= 64,
            InvalidSpec,
            "memory must be at least 64 MiB, got {}",
            spec.memory_mib
        );
        Ok(())
    }

    /// Assembles and spawns the VM (a cold boot of its kernel) without waiting for its agent.
    pub async fn start(host: &Host, spec: &VmSpec) -> Result<Vm> {
        Vm::check_spec(spec)?;
        let image = host.images.get(&spec.image)?;
        let accel = host.accel(&image.kernel).await?;
        let dir = host.vm_root.join(&spec.name);
        let disk = dir.join("disk.qcow2");
        let reuse = spec.persistent && disk.exists();
        if !reuse {
            check!(!dir.exists(), State, "VM directory {} already exists", dir.display());
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // RAM is one named block, whatever started the VM: its saved states load anywhere
        // (resume, a live capture) into a QEMU that names it the same.
        jail::private_file(&dir.join(RAM_NAMED))?;
        if !reuse {
            if let Err(e) = slicer_storage::create_overlay(&image.rootfs, &disk, spec.disk_size).await {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        }
        let mut cmdline = Vec::new();
        if let Some(init) = image.init() {
            cmdline.push(format!("init={init}"));
        }
        cmdline.push(format!("slicer.hostname={}", spec.name));
        if !reuse || spec.new_identity {
            // A first boot gets a machine id of its own; later boots keep the one on disk.
            cmdline.push(format!("systemd.machine_id={}", new_machine_id()));
        }
        if !spec.dns.is_empty() {
            cmdline.push(format!("slicer.dns={}", spec.dns.join(",")));
        }
        if let Some(n) = &spec.net {
            cmdline.push(n.kernel_ip_arg());
        }
        cmdline.extend(spec.cmdline.iter().cloned());
        let mut cfg = host.qemu_config(&spec.name, &dir, accel, &image, spec.cpus, spec.memory_mib);
        cfg.cmdline = cmdline;
        cfg.net = spec.net.as_ref().map(VmNet::qemu);
        cfg.ram = Some(slicer_hypervisor::qemu::RamBacking::Anonymous);
        let started = Instant::now();
        let qemu = match Vm::spawn(host, &cfg).await {
            Ok(q) => q,
            Err(e) => {
                if !reuse {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Err(e);
            }
        };
        Ok(Vm::handle(spec, image, accel, dir, qemu, started, StartMode::Cold))
    }

    async fn spawn(host: &Host, cfg: &QemuConfig) -> Result<QemuProcess> {
        host.spawn_qemu(cfg, &cfg.name, u64::from(cfg.memory_mib) << 20).await
    }

    /// process must be the one recorded: same pid and start time.
    pub async fn adopt(host: &Host, spec: &VmSpec, pid: u32, start_time: u64) -> Result<Vm> {
        validate_name(&spec.name)?;
        let image = host.images.get(&spec.image)?;
        let accel = host.accel(&image.kernel).await?;
        let dir = host.vm_root.join(&spec.name);
        let cgroup = host.jail.as_ref().and_then(|j| j.cgroup_of(&spec.name));
        let qemu = QemuProcess::adopt(pid, start_time, cgroup)?;
        qemu.follow_console(dir.join("console.sock"), dir.join("console.log"));
        Ok(Vm::handle(
            spec,
            image,
            accel,
            dir,
            qemu,
            Instant::now(),
            StartMode::Adopted,
        ))
    }

    /// The handle of a VM whose files live in `dir` (the same layout [`Vm::start`] creates).
    fn handle(
        spec: &VmSpec,
        image: Image,
        accel: Accel,
        dir: PathBuf,
        qemu: QemuProcess,
        started: Instant,
        start_mode: StartMode,
    ) -> Vm {
        Vm {
            name: spec.name.clone(),
            image,
            accel,
            persistent: spec.persistent,
            start_mode,
            boot_time_ns: 0.into(),
            started,
            qmp_socket: dir.join("qmp.sock"),
            console_log: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            agent: AgentClient::new(dir.join("agent.sock")),
            dir,
            qemu,
            pending: std::sync::Mutex::new(None),
            cleaned: false.into(),
            template_memory: None,
        }
    }

    /// Kills QEMU and removes every file of the VM, its disk too.
    /// Kills QEMU and removes every file of the VM, its disk too; returns once QEMU is gone
    /// (and with it its cgroup).
    pub async fn discard(&self) {
        self.mark_cleaned();
        self.qemu.kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.qemu.wait()).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// From now on dropping the handle leaves the VM's files alone.
    fn mark_cleaned(&self) {
        self.cleaned.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Start time of the QEMU process (with the pid, it identifies the process).
    pub fn start_time(&self) -> Option<u64> {
        self.qemu.start_time()
    }

    /// Waits for the agent's first answer (for a restored VM: to its identity fix-ups, its
    /// first request; else health); fails early if QEMU exits.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner()).take();
        let first = async {
            match &pending {
                Some(id) => self
                    .agent
                    .wait_then(timeout, || self.agent.set_identity(id))
                    .await
                    .map(drop),
                None => self.agent.wait_ready(timeout).await.map(drop),
            }
        };
        tokio::select! {
            r = first => {
                if let Err(e) = r {
                    // What QEMU says of the guest tells a stalled guest from a silent agent.
                    let status = match tokio::time::timeout(Duration::from_secs(2), self.qmp()).await {
                        Ok(Ok(q)) => q.status().await.unwrap_or_else(|e| format!("unknown ({e})")),
                        _ => "unknown (QMP did not answer)".into(),
                    };
                    fail!(NotReady,
                        "VM {} did not become ready ({e}; QEMU reports the VM {status}); console:\n{}",
                        self.name,
                        tail(&self.console_log, 30)
                    );
                }
            }
            st = self.qemu.wait() => {
                fail!(QemuExited,
                    "QEMU for VM {} exited ({}) before the agent was ready; QEMU said:\n{}\nconsole:\n{}",
                    self.name,
                    st.map(|s| s.to_string()).unwrap_or_default(),
                    tail(&self.qemu_log, 10),
                    tail(&self.console_log, 30)
                );
            }
        }
        self.boot_time_ns.store(
            self.started.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    /// Whether [`Vm::wait_ready`] has succeeded.
    pub fn is_ready(&self) -> bool {
        self.boot_time_ns.load(std::sync::atomic::Ordering::Relaxed) != 0
    }

    /// From spawning QEMU to the agent's first health answer (zero until ready).
    pub fn boot_time(&self) -> Duration {
        Duration::from_nanos(self.boot_time_ns.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Stops QEMU (as [`Vm::stop`]) but leaves every file in place, e.g. to boot the same
    /// disk again.
    pub async fn stop_process(&self, graceful: Duration) -> StopOutcome {
        self.stop_inner(graceful).await
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    pub fn pid(&self) -> u32 {
        self.qemu.pid
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// Whether QEMU is still running.
    pub fn is_running(&self) -> bool {
        self.qemu.try_status().is_none()
    }

    /// Waits until QEMU exits, for whatever reason.
    pub async fn wait_exit(&self) {
        self.qemu.wait().await;
    }

    /// Connects to QEMU's monitor.
    pub async fn qmp(&self) -> Result<Qmp> {
        Ok(Qmp::connect(&self.qmp_socket, Duration::from_secs(2)).await?)
    }

    /// Stops the VM: ask the guest to power off (up to `graceful`), then QMP `quit` (2 s),
    /// then SIGKILL. Then removes its files (keeping a persistent VM's disk and log).
    pub async fn stop(&self, graceful: Duration) -> Result<StopOutcome> {
        let outcome = self.stop_inner(graceful).await;
        self.cleanup();
        Ok(outcome)
    }

    async fn stop_inner(&self, graceful: Duration) -> StopOutcome {
        if !self.is_running() {
            return StopOutcome::AlreadyExited;
        }
        if !graceful.is_zero() {
            let asked = tokio::time::timeout(graceful, self.agent.power(PowerAction::Poweroff)).await;
            if matches!(asked, Ok(Ok(()))) && tokio::time::timeout(graceful, self.qemu.wait()).await.is_ok() {
                return StopOutcome::Graceful;
            }
        }
        if let Ok(Ok(qmp)) = tokio::time::timeout(
            Duration::from_secs(1),
            Qmp::connect(&self.qmp_socket, Duration::from_secs(1)),
        )
        .await
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), qmp.execute("quit", None)).await;
            if tokio::time::timeout(Duration::from_secs(2), self.qemu.wait())
                .await
                .is_ok()
            {
                return StopOutcome::Quit;
            }
        }
        self.qemu.kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.qemu.wait()).await;
        StopOutcome::Killed
    }

    /// Kills QEMU if needed and removes the VM's files.
    pub fn cleanup(&self) {
        if self.cleaned.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        self.qemu.kill();
        let result = if self.persistent {
            ["agent.sock", "qmp.sock", "console.sock", "qemu.log", "qemu.log.1"]
                .iter()
                .map(|f| std::fs::remove_file(self.dir.join(f)))
                .find(|r| r.as_ref().is_err_and(|e| e.kind() != std::io::ErrorKind::NotFound))
                .unwrap_or(Ok(()))
        } else {
            std::fs::remove_dir_all(&self.dir)
        };
        if let Err(e) = result {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing files of VM {}: {e}", self.name);
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.cleanup();
    }
}

pub(crate) fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Who uses the base file `file`: every `disk.qcow2` one level below each of `dirs` (VM
/// directories, templates, commits) whose backing chain reaches it, named `<dir name>/<entry>`.
pub fn disk_users(file: &Path, dirs: &[PathBuf]) -> Vec<String> {
    let Ok(target) = file.canonicalize() else {
        return Vec::new();
    };
    let mut users = Vec::new();
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(d) else { continue };
        for e in entries.flatten() {
            let disk = e.path().join("disk.qcow2");
            let Ok(chain) = slicer_storage::trusted_chain(&disk) else {
                continue;
            };
            if chain.iter().any(|p| p.canonicalize().is_ok_and(|p| p == target)) {
                let kind = d
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                users.push(format!("{kind}/{}", e.file_name().to_string_lossy()));
            }
        }
    }
    users.sort();
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_ip_argument() {
        let n = VmNet {
            netns: None,
            tap: "t".into(),
            mac: "02:00:00:00:00:02".into(),
            address: Ipv4Addr::new(169, 254, 100, 6),
            prefix: 30,
            gateway: Ipv4Addr::new(169, 254, 100, 5),
        };
        assert_eq!(
            n.kernel_ip_arg(),
            "ip=169.254.100.6::169.254.100.5:255.255.255.252::eth0:off"
        );
        assert_eq!(new_machine_id().len(), 32);
        assert_ne!(new_machine_id(), new_machine_id());
    }

    #[test]
    fn names_are_dns_labels() {
        validate_name("sandbox-1").unwrap();
        for bad in ["", "-a", "a-", "A", "a_b", "a/b", "..", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
