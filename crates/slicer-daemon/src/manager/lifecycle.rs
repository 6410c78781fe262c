//! A VM's life after its create: pause, suspend and restore, relaunch, shutdown, delete, and
//! the daemon's own stop.

use super::*;

impl Manager {
    /// Pauses or resumes a VM's vCPUs (QMP stop and cont). A resumed VM gets its secrets
    /// again: changes made while it was paused passed it by.
    pub async fn set_paused(self: &Arc<Self>, hostname: &str, pause: bool) -> Result<(), Error> {
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move {
            let _op = me.lock_vm(&h).await;
            let r = me.running(&h)?;
            r.vm.set_paused(pause).await.map_err(Error::host)?;
            let was_paused = r.paused.swap(pause, Ordering::SeqCst);
            let status = if pause { VmStatus::Paused } else { VmStatus::Running };
            me.db.set_status(&h, status, r.vm.process()).map_err(Error::host)?;
            if was_paused && !pause {
                me.resync_secrets(&h, &r);
            }
            Ok(())
        })
        .await
    }

    /// Suspends a VM: saves its memory and devices beside its disk and ends its
    /// QEMU; the record stays (status Suspended) until it is restored or deleted. A suspended
    /// VM holds no share of the capacity budget.
    pub async fn suspend(self: &Arc<Self>, hostname: &str) -> Result<(), Error> {
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move {
            let _op = me.lock_vm(&h).await;
            let r = me.running(&h)?;
            r.stopping.store(true, Ordering::SeqCst);
            if let Err(e) = r.vm.suspend().await {
                if r.vm.is_running() {
                    r.stopping.store(false, Ordering::SeqCst);
                } else {
                    // Its exit watcher saw `stopping` and left it to us.
                    me.reap(&h, &r).await;
                }
                return Err(Error::host(e));
            }
            me.forget(&h, &r);
            if let Some(n) = &r.net {
                n.teardown().await;
            }
            me.release(&h);
            me.db.set_status(&h, VmStatus::Suspended, None).map_err(Error::host)?;
            Ok(())
        })
        .await
    }

    /// Restores a suspended VM: it continues where it was, with its network set up
    /// again; with `wait`, answers once its agent does (or after `timeout`).
    pub async fn restore(self: &Arc<Self>, hostname: &str, wait: bool, timeout: Duration) -> Result<(), Error> {
        let (me, h) = (self.clone(), hostname.to_string());
        let r = detached(async move { me.restore_locked(&h).await }).await?;
        if wait {
            match tokio::time::timeout(timeout, self.wait_for(&r, Wait::Agent)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    return Err(Error::timeout(format!(
                        "VM {hostname} did not answer within {timeout:?} of its restore"
                    )))
                }
            }
        }
        Ok(())
    }

    /// [`Manager::restore`] up to the start of QEMU, under the VM's operation lock.
    pub(super) async fn restore_locked(self: &Arc<Self>, hostname: &str) -> Result<Arc<Running>, Error> {
        let _op = self.lock_vm(hostname).await;
        let rec = self.record(hostname)?;
        if self.running(hostname).is_ok() {
            return Err(Error::conflict(format!("VM {hostname} is running")));
        }
        if rec.status != VmStatus::Suspended {
            return Err(Error::conflict(format!(
                "VM {hostname} is not suspended (status {}); suspend it first",
                rec.status
            )));
        }
        self.reserve(hostname, &rec)?;
        let resumed = self.resume_vm(&rec).await;
        if resumed.is_err() {
            self.release(hostname);
        }
        resumed
    }

    /// Starts a suspended VM from its saved state, with its network set up again.
    pub(super) async fn resume_vm(self: &Arc<Self>, rec: &VmRecord) -> Result<Arc<Running>, Error> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(Error::unavailable("the daemon is stopping"));
        }
        let mut spec = self.spec(rec);
        let net = match self.setup_net(rec).await? {
            Some((h, n)) => {
                spec.net = Some(n);
                Some(h)
            }
            None => None,
        };
        let recorded = match self.backend.resume(&spec).await {
            Ok(vm) => self
                .db
                .set_status(&rec.hostname, VmStatus::Running, vm.process())
                .map(|()| vm)
                .map_err(Error::host),
            Err(e) => Err(Error::host(e)),
        };
        let vm = match recorded {
            Ok(vm) => vm,
            Err(e) => {
                if let Some(n) = &net {
                    n.teardown().await;
                }
                return Err(Error::host(e));
            }
        };
        self.count_launch(&rec.host_group, Some(vm.start_mode()));
        Ok(self.track(rec, vm, net, false, BootPlan::default()))
    }

    /// Relaunches a stopped persistent VM: boots it again from its disk. Of two at once, the
    /// second finds it running (a conflict).
    pub async fn relaunch(self: &Arc<Self>, hostname: &str) -> Result<Created, Error> {
        let (me, h) = (self.clone(), hostname.to_string());
        let (rec, r) = detached(async move {
            let _op = me.lock_vm(&h).await;
            let rec = me.record(&h)?;
            if me.running(&h).is_ok() {
                return Err(Error::conflict(format!("VM {h} is running")));
            }
            if rec.status == VmStatus::Suspended {
                return Err(Error::conflict(format!(
                    "VM {h} is suspended: restore it (POST /vm/{h}/restore) or delete it"
                )));
            }
            if !rec.persistent && !rec.protected {
                return Err(Error::invalid(format!("VM {h} is not persistent")));
            }
            me.reap_exited(&h).await;
            me.reserve(&h, &rec)?;
            match me.launch(&rec, LaunchPlan::default()).await {
                Ok(r) => Ok((rec, r)),
                Err(e) => {
                    me.release(&h);
                    Err(e)
                }
            }
        })
        .await?;
        self.wait_for(&r, Wait::Agent).await?;
        Ok(Created::of(&rec))
    }

    /// Stops and removes a VM with its disk. `force` skips the protection of count VMs. Waits
    /// for an operation in progress on the VM (a launch) and then removes what it made.
    pub async fn delete(self: &Arc<Self>, hostname: &str, force: bool) -> Result<Deleted, Error> {
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move { me.delete_locked(&h, force).await }).await
    }

    pub(super) async fn delete_locked(&self, hostname: &str, force: bool) -> Result<Deleted, Error> {
        let _op = self.lock_vm(hostname).await;
        let rec = self.record(hostname)?;
        if rec.protected && !force {
            return Err(Error::forbidden(format!(
                "VM {hostname} belongs to the config's count for host group {}; change the config instead",
                rec.host_group
            )));
        }
        let running = self.vms().remove(hostname);
        if let Some(r) = running {
            r.stopping.store(true, Ordering::SeqCst);
            let _ = r.vm.stop(Duration::ZERO).await;
            if let Some(n) = &r.net {
                n.teardown().await;
            }
        }
        self.release(hostname);
        let dir = self.vm_dir(hostname);
        let disk_removed = match std::fs::remove_dir_all(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                tracing::warn!("removing {}: {e}", dir.display());
                false
            }
        };
        self.db.delete(hostname).map_err(Error::host)?;
        Ok(Deleted { disk_removed })
    }

    /// Shuts a VM down: power off (ephemeral VMs are then removed) or reboot. A reboot
    /// keeps the VM's share of the capacity budget.
    pub async fn shutdown(self: &Arc<Self>, hostname: &str, reboot: bool) -> Result<(), Error> {
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move {
            let _op = me.lock_vm(&h).await;
            let r = me.running(&h)?;
            r.stopping.store(true, Ordering::SeqCst);
            r.vm.stop_process(GRACEFUL_TIMEOUT).await;
            if !reboot {
                me.reap(&h, &r).await;
                return Ok(());
            }
            me.forget(&h, &r);
            r.vm.cleanup();
            if let Some(n) = &r.net {
                n.teardown().await;
            }
            let relaunched = match me.record(&h) {
                Ok(rec) => me.launch(&rec, LaunchPlan::default()).await.map(drop),
                Err(e) => Err(e),
            };
            if relaunched.is_err() {
                me.release(&h);
                me.settle_record(&h);
            }
            relaunched
        })
        .await
    }

    /// Daemon stop: guests power off (bounded) or stop at once, per `graceful_shutdown`.
    /// Ephemeral VMs are removed; persistent ones are kept as Stopped. Operations in progress
    /// finish first; no VM starts afterwards.
    pub async fn shutdown_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.proxy.stop();
        let mut names: HashSet<String> = self.vms().keys().cloned().collect();
        names.extend(self.op_map().keys().cloned());
        let graceful = if self.settings.graceful_shutdown {
            GRACEFUL_TIMEOUT
        } else {
            Duration::ZERO
        };
        let stops = names.iter().map(|h| async move {
            let _op = self.lock_vm(h).await;
            let running = self.vms().remove(h);
            if let Some(r) = running {
                r.stopping.store(true, Ordering::SeqCst);
                let _ = r.vm.stop(graceful).await;
                self.reap(h, &r).await;
            }
        });
        futures_util::future::join_all(stops).await;
        self.teardown_networks().await;
    }
}
