//! A started VM followed: its boot (CAs, proxy environment, secrets, SSH keys, userdata)
//! and its exit (its files, network and record settled).

use super::*;

impl Manager {
    /// Registers a started or adopted VM and the tasks that follow its boot and its exit.
    pub(super) fn track(
        self: &Arc<Self>,
        rec: &VmRecord,
        vm: Box<dyn Machine>,
        net: Option<NetHandle>,
        paused: bool,
        plan: BootPlan,
    ) -> Arc<Running> {
        let (ready_tx, ready_rx) = watch::channel(None);
        let (ud_tx, ud_rx) = watch::channel(if rec.userdata.is_none() || rec.userdata_ran {
            Some(rec.userdata_exit_code.unwrap_or(0))
        } else {
            None
        });
        let running = Arc::new(Running {
            vm,
            group: rec.host_group.clone(),
            net,
            paused: AtomicBool::new(paused),
            stopping: AtomicBool::new(false),
            ready: ready_rx,
            userdata: ud_rx,
            secrets_turn: tokio::sync::Mutex::new(()),
            secrets_pending: Mutex::new(HashSet::new()),
        });
        self.vms().insert(rec.hostname.clone(), running.clone());

        let (me, r, hostname) = (self.clone(), running.clone(), rec.hostname.clone());
        let userdata = if rec.userdata_ran { None } else { rec.userdata.clone() };
        let ca_bundle = self
            .settings
            .groups
            .iter()
            .find(|g| g.name == rec.host_group)
            .and_then(Group::ca_bundle);
        tokio::spawn(async move {
            let result = me.boot(&hostname, &r, ca_bundle, plan).await;
            let ok = result.is_ok();
            let _ = ready_tx.send(Some(result));
            if let (true, Some(script)) = (ok, userdata) {
                let code = run_userdata(r.vm.as_ref(), &script).await;
                let _ = me.db.set_userdata_result(&hostname, code);
                let _ = ud_tx.send(Some(code));
            }
        });
        self.watch_exit(&rec.hostname, &running);
        running
    }

    /// A started VM's way to ready: its agent answers, the group's CAs and a proxy-bound VM's
    /// environment are in; then (not for an adopted VM) its secrets and SSH keys, before
    /// userdata so that it can use them. The error is the reason its start failed.
    async fn boot(
        &self,
        hostname: &str,
        r: &Running,
        ca_bundle: Option<String>,
        plan: BootPlan,
    ) -> Result<(), NotReady> {
        let mut result = if r.paused.load(Ordering::SeqCst) || r.vm.is_ready() {
            Ok(())
        } else {
            r.vm.wait_ready(BOOT_TIMEOUT)
                .await
                .map_err(|e| NotReady(format!("{e:#}")))
        };
        let adopted = r.vm.start_mode() == slicer_vmm::StartMode::Adopted;
        // The group's CAs, before the VM reports ready, on every start (the agent keeps
        // what a guest has). A new guest that cannot take them fails its start; an
        // adopted one (the daemon restarted) keeps running with a warning.
        if let (Ok(()), Some(pem), false) = (&result, &ca_bundle, r.paused.load(Ordering::SeqCst)) {
            if let Err(e) = install_ca(r.vm.as_ref(), pem).await {
                let e = GuestText(&e);
                if adopted {
                    tracing::warn!("VM {hostname}: installing the host group's CA certificates: {e:#}");
                } else {
                    result = Err(NotReady(format!(
                        "installing the host group's CA certificates (host_groups[].ca) in the guest: {e:#}"
                    )));
                }
            }
        }
        // A proxy-bound VM is not ready until its environment names the proxy.
        if let (Ok(()), Some(env)) = (&result, &plan.proxy_env) {
            if let Err(e) = write_proxy_env(r.vm.as_ref(), env).await {
                result = Err(NotReady(format!(
                    "writing the proxy environment: {}",
                    GuestText(&slicer_error::chain_string(&e))
                )));
            }
        }
        if result.is_ok() && r.vm.is_ready() && !adopted {
            self.metrics
                .ready_seconds
                .get_or_create(&crate::metrics::ModeLabels {
                    mode: r.vm.start_mode().as_str().to_string(),
                })
                .observe(r.vm.boot_time().as_secs_f64());
        }
        if result.is_ok() && !adopted {
            self.provision(hostname, r, plan).await;
        }
        result
    }

    /// A new start's secrets and SSH keys (failures are logged: the VM runs without them).
    async fn provision(&self, hostname: &str, r: &Running, plan: BootPlan) {
        // A guest that continues from saved memory holding secrets (a resume; a live fork,
        // whose memory is its source's) keeps files its scope may not allow: pruned before it
        // reports ready. A cold boot starts with an empty /run, and a template's guest never
        // had any (pruning it would cost every warm create an agent round trip).
        let prune = plan.restored_live || r.vm.start_mode() == slicer_vmm::StartMode::Resume;
        if let Err(e) = self.sync_secrets(hostname, r, prune).await {
            tracing::warn!("VM {hostname}: syncing secrets: {:#}", GuestText(&e));
        }
        let mut keys = self.settings.ssh_keys.clone();
        keys.extend(plan.ssh_keys);
        if !keys.is_empty() {
            if let Err(e) = authorize_ssh_keys(r.vm.as_ref(), &keys).await {
                tracing::warn!(
                    "VM {hostname}: installing SSH keys: {}",
                    GuestText(&slicer_error::chain_string(&e))
                );
            }
        }
    }

    /// The task that reaps a VM whose QEMU exits when no operation stopped it.
    fn watch_exit(self: &Arc<Self>, hostname: &str, running: &Arc<Running>) {
        let (me, r, hostname) = (self.clone(), running.clone(), hostname.to_string());
        tokio::spawn(async move {
            r.vm.wait_exit().await;
            if r.stopping.load(Ordering::SeqCst) {
                return;
            }
            // An operation in progress (delete, relaunch, …) goes first; one that stopped or
            // replaced this VM set `stopping` and cleaned up after it.
            let _op = me.lock_vm(&hostname).await;
            if r.stopping.load(Ordering::SeqCst) {
                return;
            }
            tracing::warn!("VM {hostname} exited unexpectedly");
            me.reap(&hostname, &r).await;
        });
    }

    /// After a VM stopped: its files, network objects and share of the capacity budget go;
    /// ephemeral VMs vanish, persistent ones become Stopped. Callers hold the VM's lock.
    pub(super) async fn reap(&self, hostname: &str, r: &Arc<Running>) {
        r.vm.cleanup();
        if let Some(n) = &r.net {
            n.teardown().await;
        }
        self.forget(hostname, r);
        self.release(hostname);
        self.settle_record(hostname);
    }

    /// Under the VM's lock: a VM whose QEMU exited but whose exit watcher has not reaped it
    /// yet is reaped now, so that what starts next does not share (and then lose) its network
    /// objects.
    pub(super) async fn reap_exited(&self, hostname: &str) {
        let exited = self.vms().get(hostname).filter(|r| !r.vm.is_running()).cloned();
        if let Some(r) = exited {
            r.stopping.store(true, Ordering::SeqCst);
            self.reap(hostname, &r).await;
        }
    }

    /// Removes `r` from the running VMs if it is still the one there.
    pub(super) fn forget(&self, hostname: &str, r: &Arc<Running>) {
        let mut vms = self.vms();
        if vms.get(hostname).is_some_and(|cur| Arc::ptr_eq(cur, r)) {
            vms.remove(hostname);
        }
    }

    /// The record of a VM that stopped: ephemeral VMs vanish, persistent ones become Stopped.
    pub(super) fn settle_record(&self, hostname: &str) {
        match self.db.get(hostname) {
            Ok(Some(rec)) if rec.persistent || rec.protected => {
                let _ = self.db.set_status(hostname, VmStatus::Stopped, None);
            }
            Ok(Some(_)) => {
                let _ = std::fs::remove_dir_all(self.vm_dir(hostname));
                let _ = self.db.delete(hostname);
            }
            _ => {}
        }
    }
}
