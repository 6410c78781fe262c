//! After a daemon start: records brought in line with what runs (VMs of an earlier run adopted
//! or stopped, nothing running without a record), then the config's `count` VMs started.

use super::*;

pub(super) fn pid_is_our_qemu(pid: u32, hostname: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
        slicer_hypervisor::qemu::args_name(&args, &format!("slicer-{hostname}"), false)
    })
}

/// Every QEMU whose `-name` is this VM's.
pub(super) fn qemus_named(hostname: &str) -> Vec<u32> {
    let name = format!("slicer-{hostname}");
    slicer_hypervisor::qemu::processes_where(|args| slicer_hypervisor::qemu::args_name(args, &name, false))
}

impl Manager {
    /// Brings the records in line with reality after a start: no VM process of an earlier run
    /// is left running, ephemeral VMs are gone, persistent ones are Stopped.
    pub async fn recover(self: &Arc<Self>) -> Result<(), Error> {
        for rec in self.db.list().map_err(Error::host)? {
            if let Some(pid) = rec.pid {
                let ours = pid_is_our_qemu(pid, &rec.hostname);
                let same = rec.pid_start.is_some() && slicer_hypervisor::qemu::process_start_time(pid) == rec.pid_start;
                if ours && same && self.group(&rec.host_group).is_ok() {
                    match self.adopt(&rec, pid, rec.pid_start.unwrap_or_default()).await {
                        Ok(()) => {
                            tracing::info!("adopted VM {} (pid {pid})", rec.hostname);
                            continue;
                        }
                        Err(e) => tracing::warn!("cannot adopt VM {}: {:#}", rec.hostname, GuestText(&e)),
                    }
                }
                if ours {
                    tracing::warn!("stopping VM process {pid} of {} left by an earlier run", rec.hostname);
                    // SAFETY: plain kill(2) on a pid whose command line names this VM.
                    unsafe {
                        libc::kill(pid as i32, libc::SIGKILL);
                    }
                }
            }
            // A QEMU the record does not name (a daemon killed between starting it and
            // recording its pid) is not adopted either: nothing may run without a record.
            for pid in qemus_named(&rec.hostname) {
                tracing::warn!(
                    "stopping unrecorded VM process {pid} of {} left by an earlier run",
                    rec.hostname
                );
                // SAFETY: plain kill(2) on a pid whose command line names this VM.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
            if rec.status == VmStatus::Suspended && self.vm_dir(&rec.hostname).join(slicer_vmm::SUSPEND_FILE).is_file()
            {
                continue; // waits for POST /vm/{h}/restore
            }
            if rec.persistent || rec.protected {
                self.db
                    .set_status(&rec.hostname, VmStatus::Stopped, None)
                    .map_err(Error::host)?;
            } else {
                let _ = std::fs::remove_dir_all(self.vm_dir(&rec.hostname));
                self.db.delete(&rec.hostname).map_err(Error::host)?;
            }
        }
        Ok(())
    }

    /// Takes over a VM still running from an earlier daemon (same pid and start time).
    pub(super) async fn adopt(self: &Arc<Self>, rec: &VmRecord, pid: u32, start: u64) -> Result<(), Error> {
        let spec = self.spec(rec);
        let vm = self.backend.adopt(&spec, pid, start).await.map_err(Error::host)?;
        let net = self.net_handle(rec);
        let paused = rec.status == VmStatus::Paused;
        // Its share of the capacity budget, even if that is over budget now (before its exit
        // watcher may give it back).
        self.hold_share(&rec.hostname, rec);
        self.track(rec, vm, net, paused, BootPlan::default());
        Ok(())
    }

    /// Starts (or restarts, with their disks) the `count` VMs of each host group. One that does
    /// not fit the capacity budget (VMs adopted from an earlier run may hold it) is not
    /// started, and the log says why.
    pub async fn start_count_vms(self: &Arc<Self>) -> Result<(), Error> {
        for g in self.settings.groups.clone() {
            for n in 1..=g.count {
                let hostname = format!("{}-{n}", g.name);
                let _op = self.lock_vm(&hostname).await;
                if self.running(&hostname).is_ok() {
                    continue; // adopted
                }
                let existing = self.db.get(&hostname).map_err(Error::host)?;
                let mut rec = match &existing {
                    Some(r) => r.clone(),
                    None => {
                        let mut r = self
                            .new_record(&g, &CreateNodeRequest::default())
                            .map_err(|e| Error::invalid(format!("host group {}: {e}", g.name)))?;
                        r.protected = true;
                        r.persistent = true;
                        r
                    }
                };
                if let Err(e) = self.reserve(&hostname, &rec) {
                    tracing::error!(
                        "count VM {hostname} of host group {} not started: {}",
                        g.name,
                        GuestText(&e)
                    );
                    continue;
                }
                let started = match existing {
                    Some(_) => Ok(()),
                    None => self.allocate_and_record(&mut rec, Some(n)).await,
                };
                let launched = match started {
                    Ok(()) => self.launch(&rec, LaunchPlan::default()).await.map(drop),
                    Err(e) => Err(e),
                };
                if let Err(e) = launched {
                    self.release(&hostname);
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}
