//! `config.capacity`: the host's budget for running VMs and what templates may hold.

use super::*;

/// The host's budget for running VMs (validated, defaults applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub ram_bytes: u64,
    pub vms: u32,
    pub vcpus: u32,
}

/// How much templates may hold (validated, defaults applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateBounds {
    /// Template and capture memory kept loaded, at most.
    pub memory_bytes: u64,
    /// Distinct shapes that get a template, at most.
    pub shapes: u32,
}

/// Default bound on distinct template shapes.
pub const DEFAULT_TEMPLATE_SHAPES: u32 = 8;
/// Most template shapes a config may allow (each is a template on disk and up to its RAM
/// loaded).
pub const MAX_TEMPLATE_SHAPES: u32 = 64;

impl TemplateBounds {
    /// The bounds from `config.capacity` within the RAM budget `ram_bytes`.
    pub fn resolve(c: Option<&CapacityConfig>, ram_bytes: u64) -> Result<TemplateBounds> {
        let c = c.cloned().unwrap_or_default();
        let memory_bytes = match c.template_memory_bytes {
            Some(m) if m > ram_bytes => bail!(
                "config.capacity.template_memory_bytes: {} is more than the RAM budget of {} (config.capacity.ram_bytes)",
                human_bytes(m),
                human_bytes(ram_bytes)
            ),
            Some(m) => m,
            None => (ram_bytes / 4).min(slicer_vmm::DEFAULT_TEMPLATE_MEMORY),
        };
        let shapes = match c.template_shapes {
            Some(s) if s > MAX_TEMPLATE_SHAPES => {
                bail!("config.capacity.template_shapes: at most {MAX_TEMPLATE_SHAPES}, got {s}")
            }
            Some(s) => s,
            None => DEFAULT_TEMPLATE_SHAPES,
        };
        Ok(TemplateBounds { memory_bytes, shapes })
    }
}

/// Default number of VMs that may run at once.
pub const DEFAULT_CAPACITY_VMS: u32 = 256;
/// Default vCPUs per host core (guests idle most of the time, so vCPUs are overcommitted).
pub const DEFAULT_VCPUS_PER_CORE: u32 = 16;

impl Capacity {
    /// The budget from `config.capacity` and the host's memory and cores: RAM defaults to
    /// MemTotal less a reserve for the host (the larger of 1 GiB and 10%), VMs to 256,
    /// vCPUs to 16 per core.
    pub fn resolve(c: Option<&CapacityConfig>, mem_total: u64, cores: u32) -> Result<Capacity> {
        let c = c.cloned().unwrap_or_default();
        let ram_bytes = match c.ram_bytes {
            Some(r) if r < 128 << 20 => {
                bail!("config.capacity.ram_bytes: at least 128 MiB (134217728) is needed, got {r}")
            }
            Some(r) => r,
            None => {
                let reserve = (mem_total / 10).max(1 << 30);
                let ram = mem_total.saturating_sub(reserve);
                if ram == 0 {
                    bail!(
                        "config.capacity.ram_bytes: the host has {} MiB of memory, too little to keep 1 GiB for itself; set the budget explicitly",
                        mem_total >> 20
                    );
                }
                ram
            }
        };
        let vms = match c.vms {
            Some(0) => bail!("config.capacity.vms: at least 1 is needed"),
            Some(v) => v,
            None => DEFAULT_CAPACITY_VMS,
        };
        let vcpus = match c.vcpus {
            Some(0) => bail!("config.capacity.vcpus: at least 1 is needed"),
            Some(v) => v,
            None => DEFAULT_VCPUS_PER_CORE.saturating_mul(cores.max(1)),
        };
        Ok(Capacity { ram_bytes, vms, vcpus })
    }

    /// The `count` VMs of all host groups (started with the daemon) must fit the budget.
    pub(super) fn check_count_vms(&self, groups: &[Group], given: Option<&CapacityConfig>) -> Result<()> {
        let hint = |field: &str, set: bool| {
            if set {
                String::new()
            } else {
                format!(" (the default; set config.capacity.{field} to change it)")
            }
        };
        let given = given.cloned().unwrap_or_default();
        let vms: u64 = groups.iter().map(|g| u64::from(g.count)).sum();
        if vms > u64::from(self.vms) {
            bail!(
                "config.capacity.vms: the host groups' count VMs are {vms}, more than the budget of {}{}",
                self.vms,
                hint("vms", given.vms.is_some())
            );
        }
        let ram: u64 = groups
            .iter()
            .map(|g| u64::from(g.count) * (g.ram_bytes + slicer_vmm::vm_overhead_bytes(g.ram_bytes)))
            .sum();
        if ram > self.ram_bytes {
            bail!(
                "config.capacity.ram_bytes: the host groups' count VMs need {} of host memory (their RAM plus QEMU's overhead), more than the budget of {}{}",
                human_bytes(ram),
                human_bytes(self.ram_bytes),
                hint("ram_bytes", given.ram_bytes.is_some())
            );
        }
        let vcpus: u64 = groups.iter().map(|g| u64::from(g.count) * u64::from(g.cpus)).sum();
        if vcpus > u64::from(self.vcpus) {
            bail!(
                "config.capacity.vcpus: the host groups' count VMs have {vcpus} vCPUs, more than the budget of {}{}",
                self.vcpus,
                hint("vcpus", given.vcpus.is_some())
            );
        }
        Ok(())
    }
}
