//! Live capture: a running VM's disk, RAM and devices taken into a template's layout while
//! it pauses briefly, so that forks of it continue from that moment.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{check, Context, Result};
use crate::Error;
use slicer_hypervisor::{QemuConfig, QemuNet, QemuProcess, Qmp};
use slicer_image::Image;

use super::memory::{copy_extents, fill_holes, new_memfd, punch_zero_pages, seal};
use super::{cgroup_name_of, template_cmdline, KillOnDrop, Meta, Scratch, Shape, Template, SAVE_TIMEOUT, TEMPLATE_MAC};
use crate::{tail, Host, Vm};

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
        self.check_capturable(vm, shape, dest)?;
        let image = self.images.get(&shape.image)?;
        let parent = dest.parent().context("capture destination has no parent")?;
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let scratch = Scratch(parent.join(format!(".capture-{:08x}", rand::random::<u32>())));
        std::fs::create_dir(&scratch.0).with_context(|| format!("creating {}", scratch.0.display()))?;
        let s = &scratch.0;
        let source_disk = vm.dir().join("disk.qcow2");
        let disk_bytes = slicer_storage::virtual_size(&source_disk)?;
        let (cfg, mem, mem_len) = self.capture_config(vm, shape, &image, s, disk_bytes).await?;
        let cgroup_name = cgroup_name_of(s);
        let capture = self
            .spawn_qemu(&cfg, &cgroup_name, u64::from(shape.memory_mib) << 20)
            .await?;
        let _killer = KillOnDrop(&capture);
        let cap = Qmp::connect(&cfg.qmp_socket, Duration::from_secs(10)).await?;
        let frozen = s.join("disk.qcow2");
        let paused = move_source(vm, &cap, &capture, &cfg, &source_disk, &frozen).await?;
        save_capture(&cap, &capture, s, &frozen).await?;
        keep_memory(&mem, mem_len, s)?;
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

    /// Whether `vm` can be captured into `dest`: running, started by a daemon that names its
    /// RAM, `dest` not there yet, and a NIC only with jailed QEMUs.
    fn check_capturable(&self, vm: &Vm, shape: &Shape, dest: &Path) -> Result<()> {
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
        Ok(())
    }

    /// The capture QEMU in scratch directory `s`, loading a stream into RAM that is a memfd of
    /// ours (returned with its length). It never runs the guest: its drive only needs the
    /// source's size (`disk_bytes`).
    async fn capture_config(
        &self,
        vm: &Vm,
        shape: &Shape,
        image: &Image,
        s: &Path,
        disk_bytes: u64,
    ) -> Result<(QemuConfig, std::fs::File, u64)> {
        let mut cfg = self.qemu_config("capture", s, vm.accel, image, shape.cpus, shape.memory_mib);
        cfg.disk = s.join("capture.qcow2");
        slicer_storage::create_overlay(&image.rootfs, &cfg.disk, Some(disk_bytes)).await?;
        cfg.cmdline = template_cmdline(image);
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
        Ok((cfg, mem, mem_len))
    }
}

/// Pauses the source `vm`, copies its disk to `frozen` and streams its RAM into the capture
/// QEMU (`cap`, `capture`), then lets the source go on whatever happened; returns how long it
/// was paused. Its host session with the agent is closed first.
async fn move_source(
    vm: &Vm,
    cap: &Qmp,
    capture: &QemuProcess,
    cfg: &QemuConfig,
    source_disk: &Path,
    frozen: &Path,
) -> Result<Duration> {
    let (rd, wr) = slicer_hypervisor::qemu::pipe()?;
    let (rd, wr) = (std::fs::File::from(rd), std::fs::File::from(wr));
    cap.incoming(&rd, false).await?;
    drop(rd);

    vm.agent.reset().await;
    let src = vm.qmp().await?;
    src.execute("stop", None).await.context("pausing the source")?;
    let paused = Instant::now();
    let moved = async {
        // Stopped, QEMU has flushed the disk: a copy of the overlay is its state now.
        let (from, to) = (source_disk.to_path_buf(), frozen.to_path_buf());
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
    Ok(paused)
}

/// Saves the capture's devices alone (`x-ignore-shared`) to `state`, quits its QEMU and makes
/// the frozen disk root's and read-only.
async fn save_capture(cap: &Qmp, capture: &QemuProcess, s: &Path, frozen: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    cap.ignore_shared_ram().await?;
    let state_tmp = s.join("state.tmp");
    let state_file = crate::jail::private_file(&state_tmp)?;
    cap.save_state(&state_file, SAVE_TIMEOUT)
        .await
        .context("saving the captured devices")?;
    drop(state_file);
    crate::quit(cap, capture).await;
    std::fs::rename(&state_tmp, s.join("state"))?;
    for f in ["agent.sock", "qmp.sock", "console.sock", "capture.qcow2"] {
        let _ = std::fs::remove_file(s.join(f));
    }
    std::os::unix::fs::lchown(frozen, Some(0), Some(0))?;
    std::fs::set_permissions(frozen, std::fs::Permissions::from_mode(0o444))?;
    Ok(())
}

/// Keeps the capture's memory: on disk in `s` as `ram` without its zero pages (read by the
/// daemon only), then filled and sealed for forks (see [`fill_holes`]). The capture QEMU is
/// gone by then.
fn keep_memory(mem: &std::fs::File, mem_len: u64, s: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    punch_zero_pages(mem, mem_len)?;
    let ram = s.join("ram");
    let ram_file = crate::jail::private_file(&ram)?;
    ram_file.set_len(mem_len)?;
    copy_extents(mem, &ram_file, mem_len).context("writing the captured memory")?;
    drop(ram_file);
    fill_holes(mem, mem_len)?;
    seal(mem)?;
    std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o400))?;
    Ok(())
}

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
