//! Templates built on demand: the template for a shape, from memory, from disk or booted and
//! saved now; and the loading of a template's memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{check, fail, Context, Result};
use slicer_agent_client::AgentClient;
use slicer_hypervisor::{Accel, QemuConfig, QemuNet, QemuProcess, Qmp};
use slicer_image::Image;

use super::memory::sealed_copy;
use super::{
    cgroup_name_of, template_cmdline, KillOnDrop, Meta, Scratch, Shape, Template, BUILD_BOOT_TIMEOUT, FORMAT,
    RETRY_AFTER, SAVE_TIMEOUT, TEMPLATE_MAC,
};
use crate::{tail, Host};

impl Host {
    /// The RAM of `template` (with `shared_ram`) as a sealed memfd (no write, grow or shrink;
    /// seals sealed), loaded from its `ram` file unless the host's [`LoadedMemory`] holds it.
    /// Clones map it privately through `/proc/self/fd/N`: a memfd opens read-write for any
    /// uid (a file on disk would have to be writable by each VM's uid to be mapped that way),
    /// and its seals keep every clone from changing what the others see. Only the file's data
    /// extents are copied; the rest is allocated zeroed (see [`fill_holes`](super::memory::fill_holes)), so a clone is
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

    pub(super) async fn qemu_version(&self) -> Result<String> {
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
        let id = self.template_id(shape, &image, accel, &qemu_version, &cmdline);
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
            self.build_with_fallback(&image, accel, meta, &dir).await
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

    /// The id of the template for `shape`: a hash of everything its saved state depends on.
    fn template_id(
        &self,
        shape: &Shape,
        image: &Image,
        accel: Accel,
        qemu_version: &str,
        cmdline: &[String],
    ) -> String {
        let mut probe = self.qemu_config("template", Path::new("/"), accel, image, shape.cpus, shape.memory_mib);
        probe.cmdline = cmdline.to_vec();
        slicer_image::key_of(&[
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
        ])
    }

    /// Builds the template of `meta`; where one with RAM in a file fails, builds it with RAM
    /// in its state.
    async fn build_with_fallback(&self, image: &Image, accel: Accel, meta: Meta, dir: &Path) -> Result<Template> {
        match self.build_template(image, accel, meta.clone(), dir).await {
            Err(e) if meta.shared_ram => {
                // Where QEMU cannot keep RAM in a file (or ignore it when saving), the
                // template holds RAM in its state, as before.
                tracing::warn!(
                    "template {} with RAM in a file failed ({:#}); building it with RAM in its state",
                    meta.id,
                    slicer_agent_client::GuestText(&e)
                );
                self.build_template(
                    image,
                    accel,
                    Meta {
                        shared_ram: false,
                        ..meta
                    },
                    dir,
                )
                .await
            }
            r => r,
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
        let scratch = self.build_scratch(&meta.id).await?;
        let s = &scratch.0;
        tracing::info!("building template {} for {:?}", meta.id, meta.shape);
        let disk = s.join("disk.qcow2");
        slicer_storage::create_overlay(&image.rootfs, &disk, None).await?;
        let cfg = self.build_config(image, accel, &meta, s);
        let started = Instant::now();
        let cgroup_name = cgroup_name_of(s);
        let qemu = self
            .spawn_qemu(&cfg, &cgroup_name, u64::from(meta.shape.memory_mib) << 20)
            .await?;
        let killer = KillOnDrop(&qemu);
        meta.boot_ms = boot_and_settle(&qemu, &cfg, image, started).await?;
        let saved = Instant::now();
        let qmp = save_build_state(&cfg, s, meta.shared_ram).await?;
        meta.save_ms = saved.elapsed().as_millis() as u64;
        crate::quit(&qmp, &qemu).await;
        drop(killer);
        finish_build_dir(s, &disk, image, &mut meta)?;
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

    /// A new scratch directory for building template `id`, after sweeping dead builds.
    async fn build_scratch(&self, id: &str) -> Result<Scratch> {
        let root = self.templates_dir();
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        self.sweep_dead_builds(&root).await;
        let scratch = Scratch(root.join(format!(
            ".build-{}-{}-{:08x}",
            id,
            std::process::id(),
            rand::random::<u32>()
        )));
        let _ = std::fs::remove_dir_all(&scratch.0);
        std::fs::create_dir(&scratch.0).with_context(|| format!("creating {}", scratch.0.display()))?;
        Ok(scratch)
    }

    /// The QEMU of a template build in scratch directory `s`: RAM in the file `ram` (with
    /// `shared_ram`) and a NIC with nothing behind it (with a NIC).
    fn build_config(&self, image: &Image, accel: Accel, meta: &Meta, s: &Path) -> QemuConfig {
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
        cfg
    }
}

/// Waits for the template guest's agent, lets the guest settle and syncs its disk; returns the
/// boot time since `started`. The agent's host session is reset at the end.
async fn boot_and_settle(qemu: &QemuProcess, cfg: &QemuConfig, image: &Image, started: Instant) -> Result<u64> {
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
    let boot_ms = started.elapsed().as_millis() as u64;
    check!(
        synced.status.success(),
        Guest,
        "sync in the template guest failed: {:?}",
        synced.status
    );
    agent.reset().await;
    Ok(boot_ms)
}

/// Saves the build's state to `state.tmp` in `s` (devices only with `shared_ram`); returns
/// the QMP connection, to quit QEMU with.
async fn save_build_state(cfg: &QemuConfig, s: &Path, shared_ram: bool) -> Result<Qmp> {
    let qmp = Qmp::connect(&cfg.qmp_socket, Duration::from_secs(5)).await?;
    if shared_ram {
        qmp.ignore_shared_ram().await?;
    }
    let state_tmp = s.join("state.tmp");
    let state_file = crate::jail::private_file(&state_tmp)?;
    qmp.save_state(&state_file, SAVE_TIMEOUT)
        .await
        .context("saving the template")?;
    drop(state_file);
    Ok(qmp)
}

/// Once the build's QEMU is gone: the state in place, the sockets gone, the disk (and RAM
/// file) root's and read-only, and `meta.json` written with the sizes.
fn finish_build_dir(s: &Path, disk: &Path, image: &Image, meta: &mut Meta) -> Result<()> {
    std::fs::rename(s.join("state.tmp"), s.join("state"))?;
    meta.state_bytes = std::fs::metadata(s.join("state"))?.len();
    meta.disk_bytes = std::fs::metadata(&image.rootfs)?.len();
    for f in ["agent.sock", "qmp.sock", "console.sock"] {
        let _ = std::fs::remove_file(s.join(f));
    }
    // Restored VMs' overlays read this disk: nothing may write it again.
    std::os::unix::fs::lchown(disk, Some(0), Some(0))?;
    std::fs::set_permissions(disk, std::os::unix::fs::PermissionsExt::from_mode(0o444))?;
    if meta.shared_ram {
        // QEMU made it as the build's uid: the daemon's from now on, read by the daemon only.
        let ram = s.join("ram");
        std::os::unix::fs::chown(&ram, Some(0), Some(0))?;
        std::fs::set_permissions(&ram, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
    }
    std::fs::write(s.join("meta.json"), serde_json::to_vec_pretty(&meta)?)?;
    Ok(())
}
