//! The capacity budget: what running and starting VMs hold of it (`Ledger`), reserved before
//! anything of a VM exists and given back when it stops.

use super::*;

/// What a running (or starting) VM holds of the host's capacity budget.
#[derive(Debug, Clone, Copy)]
pub(super) struct Hold {
    /// Guest RAM.
    ram: u64,
    /// Guest RAM plus QEMU's overhead: what the VM's cgroup allows it.
    host_ram: u64,
    vcpus: u32,
    /// Host memory its cgroup was last charged (see [`Manager::account_memory`]).
    measured: Option<u64>,
}

/// The capacity budget and what running and starting VMs hold of it, by hostname (or by a
/// claim while a new VM has no hostname yet).
pub(super) struct Ledger {
    budget: Capacity,
    /// Running VMs count by the memory they were last measured to use (else nominally).
    measured: bool,
    holds: HashMap<String, Hold>,
    /// Template and live-commit memory alive (loaded, or mapped by running clones): pages
    /// the daemon allocated, which no VM's cgroup is charged for.
    templates: u64,
}

impl Hold {
    pub(super) fn of(rec: &VmRecord) -> Hold {
        Hold {
            ram: rec.ram_bytes,
            host_ram: rec.ram_bytes + slicer_vmm::vm_overhead_bytes(rec.ram_bytes),
            vcpus: rec.cpus,
            measured: None,
        }
    }
}

impl Ledger {
    pub(super) fn new(budget: Capacity, measured: bool) -> Ledger {
        Ledger {
            budget,
            measured,
            holds: HashMap::new(),
            templates: 0,
        }
    }

    /// What is held now, except by `but`.
    pub(super) fn held(&self, but: Option<&str>) -> Capacity {
        let mut c = Capacity {
            ram_bytes: 0,
            vms: 0,
            vcpus: 0,
        };
        for (_, h) in self.holds.iter().filter(|(k, _)| Some(k.as_str()) != but) {
            c.ram_bytes += match (self.measured, h.measured) {
                // Never more than its cgroup allows.
                (true, Some(m)) => m.min(h.host_ram),
                _ => h.host_ram,
            };
            c.vms += 1;
            c.vcpus += h.vcpus;
        }
        c
    }

    /// RAM free for VMs: the budget less what VMs and template memory hold (but `but`).
    fn free_ram(&self, but: Option<&str>) -> u64 {
        let used = self.held(but).ram_bytes.saturating_add(self.templates);
        self.budget.ram_bytes.saturating_sub(used)
    }

    /// How much RAM is missing for `bytes` more.
    pub(super) fn ram_short_by(&self, bytes: u64) -> u64 {
        bytes.saturating_sub(self.free_ram(None))
    }

    /// Takes `hold` for `key` when it fits every budget; else says what is short
    /// ([`Error::Unavailable`]).
    pub(super) fn reserve(&mut self, key: &str, hold: Hold) -> Result<(), Error> {
        let used = self.held(Some(key));
        let b = self.budget;
        if used.vms >= b.vms {
            return Err(Error::unavailable(format!(
                "host capacity: no room for another VM: {} VMs are running or starting, the budget is {}",
                used.vms, b.vms
            )));
        }
        let free_ram = self.free_ram(Some(key));
        if hold.host_ram > free_ram {
            let templates = match self.templates {
                0 => String::new(),
                t => format!(" ({} of it held by template memory)", human_bytes(t)),
            };
            return Err(Error::unavailable(format!(
                "host capacity: {} of RAM requested ({} for the guest, {} for QEMU), {} free of a {} budget{templates}",
                human_bytes(hold.host_ram),
                human_bytes(hold.ram),
                human_bytes(hold.host_ram - hold.ram),
                human_bytes(free_ram),
                human_bytes(b.ram_bytes)
            )));
        }
        let free_vcpus = b.vcpus.saturating_sub(used.vcpus);
        if hold.vcpus > free_vcpus {
            return Err(Error::unavailable(format!(
                "host capacity: {} vCPUs requested, {free_vcpus} free of a budget of {}",
                hold.vcpus, b.vcpus
            )));
        }
        self.holds.insert(key.to_string(), hold);
        Ok(())
    }
}

impl Manager {
    pub(super) fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a VM's share of the capacity budget under `key`, or refuses (unavailable) saying what is
    /// short. Template memory no running VM maps is unloaded first when RAM is short.
    pub(super) fn reserve(&self, key: &str, rec: &VmRecord) -> Result<(), Error> {
        let hold = Hold::of(rec);
        let short = self.ram_short_by(hold.host_ram);
        if short > 0 && self.host.template_memory.evict_unused(short) > 0 {
            self.count_templates();
        }
        self.ledger().reserve(key, hold)
    }

    /// Updates the ledger's figure of template memory from the host's.
    fn count_templates(&self) -> slicer_vmm::MemoryUse {
        let used = self.host.template_memory.usage();
        self.ledger().templates = used.pinned_bytes;
        used
    }

    /// How much RAM the budget lacks for `bytes` more, template memory counted as it is now.
    pub(super) fn ram_short_by(&self, bytes: u64) -> u64 {
        self.count_templates();
        self.ledger().ram_short_by(bytes)
    }

    /// Gives a VM's share of the capacity budget back (nothing when it holds none).
    pub(super) fn release(&self, key: &str) {
        self.ledger().holds.remove(key);
    }

    /// Measures what each running VM's cgroup is charged (a counter read per VM) into the
    /// ledger, which then counts running VMs by it: idle clones of a template cost what they
    /// wrote, not their RAM. Nothing to do without cgroups or with nominal accounting.
    pub fn account_memory(&self) {
        let Some(jail) = &self.host.jail else { return };
        if !self.ledger().measured {
            return;
        }
        let names: Vec<String> = self.vms().keys().cloned().collect();
        let used: Vec<(String, Option<u64>)> = names
            .into_iter()
            .map(|n| {
                let m = jail.memory_used(&n);
                (n, m)
            })
            .collect();
        let mut l = self.ledger();
        for (n, m) in used {
            if let Some(h) = l.holds.get_mut(&n) {
                h.measured = m;
            }
        }
    }

    /// Runs [`Manager::account_memory`] every `every` while the manager lives.
    pub fn start_accounting(self: &Arc<Self>, every: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(m) = me.upgrade() else { return };
                m.account_memory();
            }
        });
    }

    /// The capacity held by running and starting VMs, and the budget.
    pub fn capacity(&self) -> (Capacity, Capacity) {
        let l = self.ledger();
        (l.held(None), l.budget)
    }

    /// Template and live-commit memory now (also counted into the ledger).
    pub fn template_memory(&self) -> slicer_vmm::MemoryUse {
        self.count_templates()
    }

    /// Distinct shapes with a template slot, and the bound.
    pub fn template_shape_count(&self) -> (usize, u32) {
        let n = self.template_shapes.lock().unwrap_or_else(|p| p.into_inner()).len();
        (n, self.settings.templates.shapes)
    }

    /// A new VM's share, taken under a claim, now held under its hostname.
    pub(super) fn move_share(&self, claim: &str, hostname: &str) {
        let mut ledger = self.ledger();
        if let Some(h) = ledger.holds.remove(claim) {
            ledger.holds.insert(hostname.to_string(), h);
        }
    }

    /// A VM's share, held even when it does not fit the budget (a VM adopted from an earlier
    /// daemon runs already).
    pub(super) fn hold_share(&self, hostname: &str, rec: &VmRecord) {
        self.ledger().holds.insert(hostname.to_string(), Hold::of(rec));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::VmStatus;

    fn rec(ram_mib: u64, cpus: u32) -> VmRecord {
        VmRecord {
            hostname: String::new(),
            host_group: "g".into(),
            cpus,
            ram_bytes: ram_mib << 20,
            persistent: false,
            protected: false,
            status: VmStatus::Running,
            created_at: String::new(),
            ip: String::new(),
            pid: None,
            image: "min".into(),
            storage_size: None,
            userdata: None,
            userdata_ran: false,
            userdata_exit_code: None,
            tags: Vec::new(),
            net_allow: None,
            net_drop: None,
            pid_start: None,
        }
    }

    #[test]
    fn the_ledger_refuses_what_does_not_fit_and_says_what_is_short() {
        let overhead = slicer_vmm::vm_overhead_bytes(256 << 20);
        let mut l = Ledger::new(
            Capacity {
                ram_bytes: 2 * ((256 << 20) + overhead),
                vms: 3,
                vcpus: 4,
            },
            true,
        );
        l.reserve("a", Hold::of(&rec(256, 1))).unwrap();
        l.reserve("b", Hold::of(&rec(256, 1))).unwrap();
        let e = l.reserve("c", Hold::of(&rec(256, 1))).unwrap_err().to_string();
        assert!(
            e.starts_with("host capacity: ") && e.contains("of RAM requested") && e.contains("0 MiB free"),
            "{e}"
        );
        // Taking again what one holds is no second share.
        l.reserve("a", Hold::of(&rec(256, 1))).unwrap();
        assert_eq!(l.held(None).vms, 2);
        l.holds.remove("b");
        let e = l.reserve("c", Hold::of(&rec(128, 4))).unwrap_err().to_string();
        assert!(e.contains("4 vCPUs requested, 3 free of a budget of 4"), "{e}");
        l.reserve("c", Hold::of(&rec(128, 3))).unwrap();
        l.budget.vms = 2;
        let e = l.reserve("d", Hold::of(&rec(128, 0))).unwrap_err().to_string();
        assert!(e.contains("2 VMs are running or starting, the budget is 2"), "{e}");
        assert_eq!(
            l.held(None),
            Capacity {
                ram_bytes: (384 << 20) + 2 * overhead,
                vms: 2,
                vcpus: 4
            }
        );
    }

    #[test]
    fn template_memory_counts_against_the_ram_budget() {
        let nominal = (256 << 20) + slicer_vmm::vm_overhead_bytes(256 << 20);
        let mut l = Ledger::new(
            Capacity {
                ram_bytes: 2 * nominal,
                vms: 100,
                vcpus: 100,
            },
            false,
        );
        l.reserve("a", Hold::of(&rec(256, 1))).unwrap();
        assert_eq!(l.ram_short_by(nominal), 0);
        l.templates = 300 << 20;
        assert_eq!(l.ram_short_by(nominal), 300 << 20);
        let e = l.reserve("b", Hold::of(&rec(256, 1))).unwrap_err().to_string();
        assert!(
            e.contains("of RAM requested") && e.contains("(300 MiB of it held by template memory)"),
            "{e}"
        );
        // Taking again what one holds still fits.
        l.templates = nominal;
        l.reserve("a", Hold::of(&rec(256, 1))).unwrap();
        l.templates = 0;
        l.reserve("b", Hold::of(&rec(256, 1))).unwrap();
    }

    #[test]
    fn measured_vms_count_what_they_use_and_never_more_than_their_limit() {
        let overhead = slicer_vmm::vm_overhead_bytes(256 << 20);
        let nominal = (256 << 20) + overhead;
        let budget = Capacity {
            ram_bytes: 3 * nominal,
            vms: 100,
            vcpus: 100,
        };
        for measured in [true, false] {
            let mut l = Ledger::new(budget, measured);
            for k in ["a", "b", "c"] {
                l.reserve(k, Hold::of(&rec(256, 1))).unwrap();
            }
            assert!(l.reserve("d", Hold::of(&rec(256, 1))).is_err());
            // Idle clones: 40 MiB each; one that grew past its cgroup's limit counts its limit.
            for (k, m) in [("a", 40 << 20), ("b", 40 << 20), ("c", 10 * nominal)] {
                l.holds.get_mut(k).unwrap().measured = Some(m);
            }
            let held = l.held(None).ram_bytes;
            if measured {
                assert_eq!(held, (80 << 20) + nominal);
                l.reserve("d", Hold::of(&rec(256, 1))).unwrap();
            } else {
                assert_eq!(held, 3 * nominal);
                assert!(l.reserve("d", Hold::of(&rec(256, 1))).is_err());
            }
        }
    }
}
