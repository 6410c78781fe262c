//! The VM library: a [`Host`] knows where images, VM directories and QEMU are; [`Vm::boot`]
//! assembles one microVM from an image and a [`VmSpec`] (per-VM overlay disk, sockets, console
//! log, kernel command line), starts QEMU and waits for the agent; the [`Vm`] handle runs
//! commands and moves files through the agent, and stops the VM in escalating steps.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use slicer_agent_client::AgentClient;
use slicer_agent_proto::PowerAction;
use slicer_hypervisor::{Accel, AccelChoice, QemuConfig, QemuProcess, Qmp};
use slicer_image::{Image, ImageStore};
use tokio::sync::OnceCell;

pub use slicer_agent_client as agent;
pub use slicer_agent_proto::ExecRequest;

/// Where things live on this host and how VMs are accelerated.
pub struct Host {
    pub images: ImageStore,
    /// Per-VM directories (disk overlay, sockets, logs) go below this.
    pub vm_root: PathBuf,
    pub qemu: PathBuf,
    pub accel_choice: AccelChoice,
    cache_dir: PathBuf,
    accel: OnceCell<Accel>,
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
        }
    }

    /// KVM or TCG, resolved once (see `slicer_hypervisor::accel`).
    pub async fn accel(&self, kernel: &Path) -> Result<Accel> {
        self.accel
            .get_or_try_init(|| {
                slicer_hypervisor::accel::resolve(self.accel_choice, &self.qemu, kernel, &self.cache_dir)
            })
            .await
            .copied()
    }
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
            cmdline: Vec::new(),
            net: None,
            boot_timeout: Duration::from_secs(60),
        }
    }
}

/// A VM's NIC: a TAP device (in `netns`, if given) and the kernel's `ip=` argument.
#[derive(Debug, Clone)]
pub struct VmNet {
    pub netns: Option<String>,
    pub tap: String,
    pub mac: String,
    /// e.g. `ip=169.254.8.2::169.254.8.1:255.255.255.252::eth0:off`
    pub kernel_ip: String,
}

/// Checks a VM name: a DNS label, since it becomes the hostname and part of paths.
pub fn validate_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-'),
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
    /// From spawning QEMU to the agent's first health answer, in ns (0 until ready).
    boot_time_ns: std::sync::atomic::AtomicU64,
    started: Instant,
    dir: PathBuf,
    qmp_socket: PathBuf,
    console_log: PathBuf,
    qemu_log: PathBuf,
    qemu: QemuProcess,
    agent: AgentClient,
    cleaned: std::sync::atomic::AtomicBool,
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

impl Vm {
    /// Starts a VM and waits until its agent answers.
    pub async fn boot(host: &Host, spec: &VmSpec) -> Result<Vm> {
        let vm = Vm::start(host, spec).await?;
        vm.wait_ready(spec.boot_timeout).await?;
        Ok(vm)
    }

    /// Assembles and spawns the VM without waiting for its agent.
    pub async fn start(host: &Host, spec: &VmSpec) -> Result<Vm> {
        validate_name(&spec.name)?;
        ensure!(
            (1..=64).contains(&spec.cpus),
            "cpus must be between 1 and 64, got {}",
            spec.cpus
        );
        ensure!(
            spec.memory_mib >= 64,
            "memory must be at least 64 MiB, got {}",
            spec.memory_mib
        );
        let image = host.images.get(&spec.image)?;
        let accel = host.accel(&image.kernel).await?;
        let dir = host.vm_root.join(&spec.name);
        let disk = dir.join("disk.qcow2");
        let reuse = spec.persistent && disk.exists();
        if !reuse {
            ensure!(!dir.exists(), "VM directory {} already exists", dir.display());
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if !reuse {
            if let Err(e) = slicer_storage::create_overlay(&image.rootfs, &disk, spec.disk_size).await {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        }
        let mut cmdline = Vec::new();
        if let Some(init) = image.init() {
            cmdline.push(format!("init={init}"));
        }
        cmdline.push(format!("slicer.hostname={}", spec.name));
        if !spec.dns.is_empty() {
            cmdline.push(format!("slicer.dns={}", spec.dns.join(",")));
        }
        if let Some(n) = &spec.net {
            cmdline.push(n.kernel_ip.clone());
        }
        cmdline.extend(spec.cmdline.iter().cloned());
        let cfg = QemuConfig {
            binary: host.qemu.clone(),
            name: spec.name.clone(),
            accel,
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            kernel: image.kernel.clone(),
            cmdline,
            disk,
            agent_socket: dir.join("agent.sock"),
            qmp_socket: dir.join("qmp.sock"),
            console_log: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            net: spec.net.as_ref().map(|n| slicer_hypervisor::QemuNet {
                netns: n.netns.clone(),
                tap: n.tap.clone(),
                mac: n.mac.clone(),
            }),
        };
        for stale in [&cfg.agent_socket, &cfg.qmp_socket] {
            let _ = std::fs::remove_file(stale);
        }
        let started = Instant::now();
        let qemu = match QemuProcess::spawn(&cfg).await {
            Ok(q) => q,
            Err(e) => {
                if !reuse {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Err(e);
            }
        };
        Ok(Vm::handle(spec, image, accel, dir, qemu, started))
    }

    /// Takes over a VM whose QEMU an earlier process started (after a daemon restart). The
    /// process must be the one recorded: same pid and start time.
    pub async fn adopt(host: &Host, spec: &VmSpec, pid: u32, start_time: u64) -> Result<Vm> {
        validate_name(&spec.name)?;
        let image = host.images.get(&spec.image)?;
        let accel = host.accel(&image.kernel).await?;
        let dir = host.vm_root.join(&spec.name);
        let qemu = QemuProcess::adopt(pid, start_time)?;
        Ok(Vm::handle(spec, image, accel, dir, qemu, Instant::now()))
    }

    /// The handle of a VM whose files live in `dir` (the same layout [`Vm::start`] creates).
    fn handle(spec: &VmSpec, image: Image, accel: Accel, dir: PathBuf, qemu: QemuProcess, started: Instant) -> Vm {
        Vm {
            name: spec.name.clone(),
            image,
            accel,
            persistent: spec.persistent,
            boot_time_ns: 0.into(),
            started,
            qmp_socket: dir.join("qmp.sock"),
            console_log: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            agent: AgentClient::new(dir.join("agent.sock")),
            dir,
            qemu,
            cleaned: false.into(),
        }
    }

    /// Start time of the QEMU process (with the pid, it identifies the process).
    pub fn start_time(&self) -> Option<u64> {
        self.qemu.start_time()
    }

    /// Waits for the agent's first health answer; fails early if QEMU exits.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        tokio::select! {
            r = self.agent.wait_ready(timeout) => {
                r.with_context(|| format!(
                    "VM {} did not become ready; console:\n{}", self.name, tail(&self.console_log, 30)
                ))?;
            }
            st = self.qemu.wait() => {
                bail!(
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
        Qmp::connect(&self.qmp_socket, Duration::from_secs(2)).await
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
            ["agent.sock", "qmp.sock", "qemu.log"]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        validate_name("sandbox-1").unwrap();
        for bad in ["", "-a", "a-", "A", "a_b", "a/b", "..", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
