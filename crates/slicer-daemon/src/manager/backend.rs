//! The seam between the manager and the VMs it runs. The manager asks a [`Backend`] to start
//! VMs and holds what it gets as a [`Machine`]; `QemuBackend` (slicer-vmm's QEMU VMs) is the
//! one the daemon uses, and the manager's unit tests use a fake that needs no QEMU, root or
//! images. Futures are boxed so that both traits can be used as trait objects. Both fail with
//! the VM library's [`slicer_vmm::Error`], its causes kept for the manager to classify.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::guest::Guest;
use slicer_vmm::{Host, Shape, StartMode, Template, Vm, VmSpec};

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A started VM.
pub trait Machine: Send + Sync {
    fn name(&self) -> &str;
    /// Its guest: every guest operation goes through it.
    fn guest(&self) -> &dyn Guest;
    fn start_mode(&self) -> StartMode;
    /// Whether its process still runs.
    fn is_running(&self) -> bool;
    /// Whether its agent has answered.
    fn is_ready(&self) -> bool;
    /// The process (pid, start time in clock ticks) to record for a later daemon to adopt.
    fn process(&self) -> Option<(u32, u64)>;
    /// From its start to its agent's first answer.
    fn boot_time(&self) -> Duration;
    /// Until its agent answers, or `timeout`.
    fn wait_ready(&self, timeout: Duration) -> BoxFut<'_, slicer_vmm::Result<()>>;
    /// Until its process has exited.
    fn wait_exit(&self) -> BoxFut<'_, ()>;
    /// Stops it (power-off within `graceful`, then harder) and removes its files but the disk.
    fn stop(&self, graceful: Duration) -> BoxFut<'_, slicer_vmm::Result<()>>;
    /// Stops its process only (power-off within `graceful`, then harder).
    fn stop_process(&self, graceful: Duration) -> BoxFut<'_, ()>;
    /// Saves its memory and devices beside its disk and ends it.
    fn suspend(&self) -> BoxFut<'_, slicer_vmm::Result<()>>;
    /// Stops (`true`) or continues its vCPUs.
    fn set_paused(&self, paused: bool) -> BoxFut<'_, slicer_vmm::Result<()>>;
    /// Removes its runtime files (sockets, pid) after it stopped.
    fn cleanup(&self);
    /// Stops it and removes everything of it, its disk included (a start that failed).
    fn discard(&self) -> BoxFut<'_, ()>;
    /// The QEMU VM behind it, for what only QEMU can do (a live commit's capture).
    fn qemu(&self) -> Option<&Vm>;
}

/// What starts VMs.
pub trait Backend: Send + Sync {
    /// Boots a VM's disk (made from its image when new).
    fn start<'a>(&'a self, spec: &'a VmSpec) -> BoxFut<'a, slicer_vmm::Result<Box<dyn Machine>>>;
    /// A new VM continuing `template`'s guest.
    fn restore<'a>(
        &'a self,
        spec: &'a VmSpec,
        template: &'a Template,
    ) -> BoxFut<'a, slicer_vmm::Result<Box<dyn Machine>>>;
    /// A suspended VM, from its saved state.
    fn resume<'a>(&'a self, spec: &'a VmSpec) -> BoxFut<'a, slicer_vmm::Result<Box<dyn Machine>>>;
    /// A VM still running from an earlier daemon (same pid and start time).
    fn adopt<'a>(&'a self, spec: &'a VmSpec, pid: u32, start: u64) -> BoxFut<'a, slicer_vmm::Result<Box<dyn Machine>>>;
    /// The template of `shape`, built when missing.
    fn template<'a>(&'a self, shape: &'a Shape) -> BoxFut<'a, slicer_vmm::Result<Arc<Template>>>;
}

/// QEMU VMs of slicer-vmm on a [`Host`].
pub struct QemuBackend(pub Arc<Host>);

fn boxed(vm: Vm) -> Box<dyn Machine> {
    Box::new(vm)
}

impl Backend for QemuBackend {
    fn start<'a>(&'a self, spec: &'a VmSpec) -> BoxFut<'a, slicer_vmm::Result<Box<dyn Machine>>> {
        Box::pin(async move { Ok(boxed(Vm::start(&self.0, spec).await?)) })
    }
    fn restore<'a>(
        &'a self,
        spec: &'a VmSpec,
        template: &'a Template,
    ) -> BoxFut<'a, slicer_vmm::Result<Box<dyn Machine>>> {
        Box::pin(async move { Ok(boxed(Vm::restore(&self.0, spec, template).await?)) })
    }
    fn resume<'a>(&'a self, spec: &'a VmSpec) -> BoxFut<'a, slicer_vmm::Result<Box<dyn Machine>>> {
        Box::pin(async move { Ok(boxed(Vm::resume(&self.0, spec).await?)) })
    }
    fn adopt<'a>(&'a self, spec: &'a VmSpec, pid: u32, start: u64) -> BoxFut<'a, slicer_vmm::Result<Box<dyn Machine>>> {
        Box::pin(async move { Ok(boxed(Vm::adopt(&self.0, spec, pid, start).await?)) })
    }
    fn template<'a>(&'a self, shape: &'a Shape) -> BoxFut<'a, slicer_vmm::Result<Arc<Template>>> {
        Box::pin(self.0.template(shape))
    }
}

impl Machine for Vm {
    fn name(&self) -> &str {
        &self.name
    }
    fn guest(&self) -> &dyn Guest {
        Vm::agent(self)
    }
    fn start_mode(&self) -> StartMode {
        self.start_mode
    }
    fn is_running(&self) -> bool {
        Vm::is_running(self)
    }
    fn is_ready(&self) -> bool {
        Vm::is_ready(self)
    }
    fn process(&self) -> Option<(u32, u64)> {
        self.start_time().map(|t| (self.pid(), t))
    }
    fn boot_time(&self) -> Duration {
        Vm::boot_time(self)
    }
    fn wait_ready(&self, timeout: Duration) -> BoxFut<'_, slicer_vmm::Result<()>> {
        Box::pin(Vm::wait_ready(self, timeout))
    }
    fn wait_exit(&self) -> BoxFut<'_, ()> {
        Box::pin(Vm::wait_exit(self))
    }
    fn stop(&self, graceful: Duration) -> BoxFut<'_, slicer_vmm::Result<()>> {
        Box::pin(async move {
            Vm::stop(self, graceful).await?;
            Ok(())
        })
    }
    fn stop_process(&self, graceful: Duration) -> BoxFut<'_, ()> {
        Box::pin(async move {
            Vm::stop_process(self, graceful).await;
        })
    }
    fn suspend(&self) -> BoxFut<'_, slicer_vmm::Result<()>> {
        Box::pin(Vm::suspend(self))
    }
    fn set_paused(&self, paused: bool) -> BoxFut<'_, slicer_vmm::Result<()>> {
        Box::pin(async move {
            let qmp = self.qmp().await?;
            qmp.execute(if paused { "stop" } else { "cont" }, None).await?;
            Ok::<(), slicer_vmm::Error>(())
        })
    }
    fn cleanup(&self) {
        Vm::cleanup(self)
    }
    fn discard(&self) -> BoxFut<'_, ()> {
        Box::pin(Vm::discard(self))
    }
    fn qemu(&self) -> Option<&Vm> {
        Some(self)
    }
}
