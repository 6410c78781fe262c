//! VMs from saved states: restored from a template, resumed after a suspend, and the suspend
//! itself (RAM and devices to a file beside the disk).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{check, fail, Context};
use slicer_hypervisor::Qmp;

use slicer_agent_proto::Identity;

use crate::{
    jail, new_machine_id, now_unix_ns, quit, tail, Error, Host, Result, Shape, StartMode, Template, Vm, VmNet, VmSpec,
    LOAD_TIMEOUT, RAM_NAMED, SUSPEND_FILE,
};

impl Vm {
    /// Starts the VM from `template`: a new overlay on the template's disk, QEMU loading the
    /// template's saved state, the disk grown to the spec's size; once the agent answers
    /// ([`Vm::wait_ready`]) it takes this VM's hostname, machine id, address, DNS, a fresh RNG
    /// seed and the host's clock. On failure nothing of the VM is left behind, so the caller
    /// can boot it cold instead.
    pub async fn restore(host: &Host, spec: &VmSpec, template: &Template) -> Result<Vm> {
        Vm::check_spec(spec)?;
        check!(
            Shape::of(spec) == template.shape,
            Template,
            "template {} is for {:?}, not {:?}",
            template.id,
            template.shape,
            Shape::of(spec)
        );
        let image = host.images.get(&spec.image)?;
        let accel = host.accel(&image.kernel).await?;
        let dir = host.vm_root.join(&spec.name);
        check!(!dir.exists(), State, "VM directory {} already exists", dir.display());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cfg = host.qemu_config(&spec.name, &dir, accel, &image, spec.cpus, spec.memory_mib);
        cfg.cmdline = template.cmdline.clone();
        cfg.net = spec.net.as_ref().map(VmNet::qemu);
        cfg.incoming = Some(template.state());
        // Held until QEMU has inherited its copy.
        let memory = match template.shared_ram {
            true => match host.load_template_memory(template) {
                Ok(m) => Some(m),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e.context(format!("restoring VM {} from template {}", spec.name, template.id)));
                }
            },
            false => None,
        };
        jail::private_file(&dir.join(RAM_NAMED))?;
        cfg.ram = Some(match &memory {
            Some(m) => slicer_hypervisor::qemu::RamBacking::PrivateFd(std::os::fd::AsRawFd::as_raw_fd(&**m)),
            None => slicer_hypervisor::qemu::RamBacking::Anonymous,
        });
        let started = Instant::now();
        let spawned = async {
            slicer_storage::create_overlay(&template.disk(), &cfg.disk, None).await?;
            Vm::spawn(host, &cfg).await
        };
        let qemu = match spawned.await {
            Ok(q) => q,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut vm = Vm::handle(spec, image, accel, dir, qemu, started, StartMode::Template);
        vm.template_memory = memory.clone();
        let grow = spec.disk_size.filter(|&s| s > template.disk_bytes);
        let shared_state = memory.is_some().then(|| template.state());
        if let Err(e) = vm.resume_incoming(grow, shared_state.as_deref()).await {
            vm.discard().await;
            return Err(e.context(format!("restoring VM {} from template {}", spec.name, template.id)));
        }
        *vm.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(Identity {
            rng_seed: rand::random::<[u8; 32]>()
                .into_iter()
                .chain(rand::random::<[u8; 32]>())
                .collect(),
            time_unix_ns: Some(now_unix_ns()),
            hostname: Some(spec.name.clone()),
            machine_id: Some(new_machine_id()),
            dns: (!spec.dns.is_empty()).then(|| spec.dns.clone()),
            net: spec.net.as_ref().map(VmNet::identity),
            disk_bytes: grow,
        });
        Ok(vm)
    }

    /// Starts a suspended VM (see [`Vm::suspend`]) from its saved state and disk. The saved
    /// state is removed once the guest runs again (its disk moves on from that point). Once
    /// the agent answers, the guest's clock is set and its RNG reseeded.
    pub async fn resume(host: &Host, spec: &VmSpec) -> Result<Vm> {
        Vm::check_spec(spec)?;
        let image = host.images.get(&spec.image)?;
        let accel = host.accel(&image.kernel).await?;
        let dir = host.vm_root.join(&spec.name);
        let state = dir.join(SUSPEND_FILE);
        check!(state.is_file(), State, "VM {} has no saved state to restore", spec.name);
        let mut cfg = host.qemu_config(&spec.name, &dir, accel, &image, spec.cpus, spec.memory_mib);
        cfg.net = spec.net.as_ref().map(VmNet::qemu);
        cfg.incoming = Some(state.clone());
        if dir.join(RAM_NAMED).exists() {
            cfg.ram = Some(slicer_hypervisor::qemu::RamBacking::Anonymous);
        }
        let started = Instant::now();
        let qemu = Vm::spawn(host, &cfg).await?;
        let vm = Vm::handle(spec, image, accel, dir, qemu, started, StartMode::Resume);
        if let Err(e) = vm.resume_incoming(None, None).await {
            vm.stop_inner(Duration::ZERO).await;
            vm.mark_cleaned();
            return Err(e.context(format!("restoring VM {}; its saved state is kept", spec.name)));
        }
        if let Err(e) = std::fs::remove_file(&state) {
            tracing::warn!("removing {}: {e}", state.display());
        }
        *vm.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(Identity {
            rng_seed: rand::random::<[u8; 32]>().to_vec(),
            time_unix_ns: Some(now_unix_ns()),
            ..Default::default()
        });
        Ok(vm)
    }

    /// Waits for an `-incoming` QEMU to load its state, grows the disk if asked, and resumes
    /// the vCPUs. Fails early if QEMU exits (e.g. a state it cannot load).
    /// `shared_state`: the state to load through QMP into a QEMU started with `-incoming
    /// defer` whose RAM is a template's (see `RamBacking::PrivateFd`).
    async fn resume_incoming(&self, grow_to: Option<u64>, shared_state: Option<&Path>) -> Result<()> {
        let steps = async {
            let qmp = Qmp::connect(&self.qmp_socket, Duration::from_secs(10)).await?;
            if let Some(state) = shared_state {
                let f = std::fs::File::open(state).with_context(|| format!("opening {}", state.display()))?;
                qmp.incoming_ignoring_shared(&f).await?;
            }
            qmp.wait_incoming(LOAD_TIMEOUT).await?;
            if shared_state.is_some() {
                qmp.set_ignore_shared(false).await?;
            }
            // The guest runs only once QEMU is inside its cgroup.
            self.qemu.joined().await?;
            qmp.execute("cont", None).await?;
            if let Some(size) = grow_to {
                // The guest learns of the new size from a config interrupt; its agent grows
                // the filesystem when told the size (see `Identity::disk_bytes`).
                qmp.execute(
                    "block_resize",
                    Some(serde_json::json!({ "device": "root", "size": size })),
                )
                .await
                .context("growing the disk")?;
            }
            Ok::<(), Error>(())
        };
        tokio::select! {
            r = steps => r,
            st = self.qemu.wait() => fail!(QemuExited,
                "QEMU exited ({}) while loading the saved state; QEMU said:\n{}",
                st.map(|s| s.to_string()).unwrap_or_default(),
                tail(&self.qemu_log, 10)
            ),
        }
    }

    /// Saves the running VM (RAM, devices) to `suspend.state` in its directory and ends its
    /// QEMU; [`Vm::resume`] continues it. The disk and files stay. If saving fails the VM
    /// keeps running and nothing is left behind. Afterwards the handle is spent: dropping it
    /// leaves the files.
    pub async fn suspend(&self) -> Result<()> {
        check!(self.is_running(), State, "VM {} is not running", self.name);
        // No host session inside the saved state.
        self.agent.reset().await;
        let qmp = self.qmp().await?;
        let tmp = self.dir.join(format!("{SUSPEND_FILE}.tmp"));
        let saved = async {
            let file = jail::private_file(&tmp)?;
            qmp.save_state(&file, Duration::from_secs(300)).await?;
            Ok::<(), Error>(())
        };
        if let Err(e) = saved.await {
            let _ = std::fs::remove_file(&tmp);
            let _ = qmp.execute("cont", None).await;
            return Err(e.context(format!("suspending VM {}", self.name)));
        }
        std::fs::rename(&tmp, self.dir.join(SUSPEND_FILE)).context("keeping the saved state")?;
        quit(&qmp, &self.qemu).await;
        // The files are the suspended VM now: dropping this handle must keep them.
        self.mark_cleaned();
        let _ = std::fs::remove_file(&self.qmp_socket);
        let _ = std::fs::remove_file(self.agent.socket_path());
        Ok(())
    }
}
