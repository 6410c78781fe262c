//! Create and launch: a request checked into a record, the VM's share of the capacity budget
//! taken, its record written and its VM started with what the first start needs (a
//! [`LaunchPlan`]).

use super::*;

impl Manager {
    /// Checks a VM name (its `name=` tag): a lowercase DNS label that is no VM's hostname,
    /// not in a host group's `<group>-<n>` namespace and no other VM's name. `own` is the VM
    /// the name is for, when it exists.
    pub fn check_name(&self, name: &str, own: Option<&str>) -> Result<(), Error> {
        if !slicer_vmm::is_dns_label(name) {
            return Err(Error::invalid(format!(
                "name {name:?}: use a lowercase DNS label (a-z, 0-9 and '-', at most 63, not starting or ending with '-')"
            )));
        }
        for g in &self.settings.groups {
            let n = name.strip_prefix(&g.name).and_then(|r| r.strip_prefix('-'));
            if n.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
                return Err(Error::invalid(format!(
                    "name {name:?} looks like a hostname of host group {} ({}-<n>): choose another",
                    g.name, g.name
                )));
            }
        }
        let tag = format!("name={name}");
        for r in self.db.list().map_err(Error::host)? {
            if r.hostname == name {
                return Err(Error::conflict(format!("name {name:?} is the hostname of a VM")));
            }
            if Some(r.hostname.as_str()) != own && r.tags.contains(&tag) {
                return Err(Error::conflict(format!("name {name:?} is taken by VM {}", r.hostname)));
            }
        }
        Ok(())
    }

    pub(super) fn new_record(&self, g: &Group, req: &CreateNodeRequest) -> Result<VmRecord, Error> {
        let cpus = req.cpus.unwrap_or(g.cpus);
        if cpus == 0 || cpus > g.cpus {
            return Err(Error::invalid(format!(
                "cpus {cpus} is outside 1..={} allowed by host group {}",
                g.cpus, g.name
            )));
        }
        let ram_bytes = req.ram_bytes.unwrap_or(g.ram_bytes);
        if ram_bytes < 128 << 20 || ram_bytes > g.ram_bytes {
            return Err(Error::invalid(format!(
                "ram_bytes {ram_bytes} is outside 128 MiB..={} allowed by host group {}",
                g.ram_bytes, g.name
            )));
        }
        if req.gpu_count.unwrap_or(0) > 0 {
            return Err(Error::invalid("gpu_count: this host has no GPUs to pass through"));
        }
        // Fields of SlicerVM's create body this daemon cannot honour are refused, not ignored.
        if req.disk_image.as_deref().is_some_and(|d| !d.is_empty()) {
            return Err(Error::invalid(
                "disk_image: not supported; a VM's disk comes from its host group's image (the config's image)",
            ));
        }
        if req.ip.as_deref().is_some_and(|ip| !ip.is_empty()) {
            return Err(Error::invalid(
                "ip: addresses are allocated by the daemon (the lowest free one of the host group); leave ip out",
            ));
        }
        for t in &req.tags {
            if t.is_empty() || t.len() > 256 || t.chars().any(char::is_control) {
                return Err(Error::invalid(format!("invalid tag {t:?}: 1-256 printable characters")));
            }
        }
        if req.tags.len() > 64 {
            return Err(Error::invalid("at most 64 tags"));
        }
        if req.hostname.is_some() {
            return Err(Error::invalid("hostname: hostnames are allocated by the daemon"));
        }
        Ok(VmRecord {
            hostname: String::new(),
            host_group: g.name.clone(),
            cpus,
            ram_bytes,
            persistent: req.persistent.unwrap_or(g.persistent),
            protected: false,
            status: VmStatus::Running,
            created_at: stamp(),
            ip: String::new(),
            pid: None,
            image: g.image.clone(),
            storage_size: g.storage_size,
            userdata: req.userdata.clone().or_else(|| g.userdata.clone()),
            userdata_ran: false,
            userdata_exit_code: None,
            tags: req.tags.clone(),
            net_allow: None,
            net_drop: None,
            pid_start: None,
        })
    }

    /// Creates a VM in host group `group`; with `wait`, answers once it is ready (or its
    /// userdata ran), deleting it if that does not happen within `timeout`.
    pub async fn create(
        self: &Arc<Self>,
        group: &str,
        req: CreateNodeRequest,
        wait: Option<Wait>,
        timeout: Duration,
    ) -> Result<Created, Error> {
        let g = self.group(group)?.clone();
        let mut rec = self.new_record(&g, &req)?;
        if let Some(n) = &req.network {
            self.check_override(&g, n)?;
            rec.net_allow = n.allow.clone();
            rec.net_drop = n.drop.clone();
        }
        if let Some(names) = &req.secrets {
            if let Some(bad) = names.iter().find(|n| !crate::secrets::valid_name(n)) {
                return Err(Error::invalid(format!("secrets: {bad:?} is not a secret name")));
            }
        }
        if req.import_user.as_deref().is_some_and(|u| !u.is_empty()) {
            return Err(Error::invalid(
                "import_user: importing keys from GitHub is not supported (the daemon does not fetch keys from the internet); pass the public keys in ssh_keys",
            ));
        }
        crate::config::check_ssh_keys("ssh_keys", &req.ssh_keys).map_err(Error::invalid)?;
        if req.tags.iter().filter(|t| t.starts_with("name=")).count() > 1 {
            return Err(Error::invalid("tags: at most one name= tag"));
        }
        if let Some(name) = vm_name(&req.tags) {
            self.check_name(name, None)?;
        }
        let proxy = match &req.proxy {
            Some(p) => Some(ProxyBinding {
                client: p.client.clone(),
                host: self.proxy.check_binding(&g.name, &p.client)?,
            }),
            None => None,
        };
        let new = NewVm {
            secrets: req.secrets,
            ssh_keys: req.ssh_keys,
            fork: None,
            proxy,
        };
        let me = self.clone();
        let (rec, running) = detached(async move { me.record_and_launch(rec, new).await }).await?;
        if let Some(w) = wait {
            let waited = tokio::time::timeout(timeout, self.wait_for(&running, w)).await;
            let failure = match waited {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.into()),
                Err(_) => Some(Error::timeout(format!(
                    "VM {} was not ready within {timeout:?}; it was deleted",
                    rec.hostname
                ))),
            };
            if let Some(err) = failure {
                let _ = self.delete(&rec.hostname, true).await;
                return Err(err);
            }
            if let Wait::Userdata = w {
                let code = (*running.userdata.borrow()).unwrap_or(0);
                if code != 0 {
                    // The VM stays, for its owner to look into (or delete): it booted, and
                    // what failed is the tenant's own script.
                    let tail = userdata_log_tail(running.vm.as_ref()).await;
                    return Err(Error::UserdataFailed(format!(
                        "VM {} was created, but its userdata exited with code {code}; the VM is kept \
                             (delete it with DELETE /hostgroup/{}/nodes/{}). Last lines of {USERDATA_LOG}:\n{tail}",
                        rec.hostname, rec.host_group, rec.hostname
                    )));
                }
            }
        }
        Ok(Created::of(&rec))
    }

    /// The part of a create (or fork) that runs to its end: takes the VM's share of the
    /// capacity budget (before anything exists), records the VM and starts it under its
    /// operation lock. A proxy-bound VM gets a token of its client once its record exists (it
    /// goes with the record), and its login environment is written before it reports ready.
    pub(super) async fn record_and_launch(
        self: &Arc<Self>,
        mut rec: VmRecord,
        new: NewVm,
    ) -> Result<(VmRecord, Arc<Running>), Error> {
        let claim = format!("#new-{}", self.claims.fetch_add(1, Ordering::Relaxed));
        self.reserve(&claim, &rec)?;
        if let Err(e) = self.allocate_and_record(&mut rec, None).await {
            self.release(&claim);
            return Err(e);
        }
        let hostname = rec.hostname.clone();
        self.move_share(&claim, &hostname);
        let _op = self.lock_vm(&hostname).await;
        // A delete may have come first: it removed the record and released the share.
        match self.db.get(&hostname) {
            Ok(Some(_)) => {}
            Ok(None) => {
                self.release(&hostname);
                return Err(Error::conflict(format!(
                    "VM {hostname} was deleted while it was being created"
                )));
            }
            Err(e) => {
                self.abandon(&hostname);
                return Err(Error::host(e));
            }
        }
        match self.prepare_launch(&rec, new).await {
            Ok(plan) => match self.launch(&rec, plan).await {
                Ok(r) => Ok((rec, r)),
                Err(e) => {
                    self.abandon(&hostname);
                    Err(e)
                }
            },
            Err(e) => {
                self.abandon(&hostname);
                Err(e)
            }
        }
    }

    /// What a recorded new VM needs before its start: its secrets' scope, its proxy token and
    /// environment, its fork's disk; gathered into its [`LaunchPlan`].
    async fn prepare_launch(&self, rec: &VmRecord, new: NewVm) -> Result<LaunchPlan, Error> {
        let hostname = &rec.hostname;
        if let Some(names) = &new.secrets {
            self.db.set_secret_scope(hostname, names).map_err(Error::host)?;
        }
        let mut plan = LaunchPlan {
            ssh_keys: new.ssh_keys,
            ..LaunchPlan::default()
        };
        if let Some(p) = &new.proxy {
            let token = self.proxy.mint_vm_token(&p.client, hostname).await?;
            plan.proxy_env = Some(crate::proxy::proxy_env(&p.host, &token));
        }
        if let Some(f) = new.fork {
            self.prepare_fork(rec, &f).await?;
            // A live fork is restored from its commit's capture; a disk fork boots its overlay.
            plan.new_identity = f.live.is_none() && f.new_machine_id;
            plan.live = f.live;
        }
        Ok(plan)
    }

    /// Undoes a create that did not start: the record, the directory and the share go.
    pub(super) fn abandon(&self, hostname: &str) {
        let _ = self.db.delete(hostname);
        let _ = std::fs::remove_dir_all(self.vm_dir(hostname));
        self.release(hostname);
    }

    /// Waits until `r` is ready (and with [`Wait::Userdata`], its userdata ran).
    pub(super) async fn wait_for(&self, r: &Running, w: Wait) -> Result<(), NotReady> {
        let mut ready = r.ready.clone();
        let state = ready
            .wait_for(|s| s.is_some())
            .await
            .map_err(|_| NotReady("VM stopped while booting".into()))?
            .clone();
        state.unwrap_or(Ok(()))?;
        if let Wait::Userdata = w {
            let mut ud = r.userdata.clone();
            ud.wait_for(|s| s.is_some())
                .await
                .map_err(|_| NotReady("VM stopped while running userdata".into()))?;
        }
        Ok(())
    }

    pub(super) fn spec(&self, rec: &VmRecord) -> VmSpec {
        let g = self.settings.groups.iter().find(|g| g.name == rec.host_group);
        let mut spec = VmSpec::new(&rec.hostname, &rec.image);
        spec.cpus = rec.cpus;
        spec.memory_mib = (rec.ram_bytes >> 20) as u32;
        spec.disk_size = rec.storage_size;
        spec.dns = g.map(|g| g.dns.clone()).unwrap_or_default();
        // The manager decides when a disk is removed.
        spec.persistent = true;
        spec.boot_timeout = BOOT_TIMEOUT;
        spec
    }

    /// Starts the VM of a record, and the tasks that follow its boot and its exit. A live fork
    /// is restored from its commit's capture; a new VM of a warm-starting group from its
    /// template; any other start boots its disk.
    pub(super) async fn launch(self: &Arc<Self>, rec: &VmRecord, plan: LaunchPlan) -> Result<Arc<Running>, Error> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(Error::host_msg("the daemon is stopping"));
        }
        let mut spec = self.spec(rec);
        spec.new_identity = plan.new_identity;
        let (net, vmnet) = match self.setup_net(rec).await? {
            Some((h, n)) => (Some(h), Some(n)),
            None => (None, None),
        };
        spec.net = vmnet;
        let fresh = !self.vm_dir(&rec.hostname).exists();
        let restored_live = plan.live.is_some();
        let started = match &plan.live {
            // A live fork continues its commit's guest; booting its disk cold instead would
            // lose what the commit holds, so it fails instead.
            Some(capture) => self.restore_ready(&spec, capture).await,
            None => {
                let warm = match fresh && self.warm(&rec.host_group) {
                    true => self.start_warm(&spec).await,
                    false => None,
                };
                match warm {
                    Some(vm) => Ok(vm),
                    None => self.backend.start(&spec).await.map_err(Error::host),
                }
            }
        };
        let vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                if let Some(n) = &net {
                    n.teardown().await;
                }
                self.count_launch(&rec.host_group, None);
                return Err(e);
            }
        };
        self.count_launch(&rec.host_group, Some(vm.start_mode()));
        self.db
            .set_status(&rec.hostname, VmStatus::Running, vm.process())
            .map_err(Error::host)?;
        let boot = BootPlan {
            ssh_keys: plan.ssh_keys,
            proxy_env: plan.proxy_env,
            restored_live,
        };
        Ok(self.track(rec, vm, net, false, boot))
    }
}

/// What a new VM's start needs beyond its record, handed from create (or fork) to launch; a
/// relaunch, a reboot or a count VM's start needs none of it.
#[derive(Default)]
pub(super) struct LaunchPlan {
    /// SSH keys of the create request, installed by the first boot.
    pub ssh_keys: Vec<String>,
    /// The login environment of a proxy-bound VM, written before it reports ready.
    pub proxy_env: Option<String>,
    /// A disk fork whose first boot gives it a new machine id.
    pub new_identity: bool,
    /// A live fork: restored from its commit's capture.
    pub live: Option<Arc<slicer_vmm::Template>>,
}

/// What the boot task of a started VM does beyond what every start does.
#[derive(Default)]
pub(super) struct BootPlan {
    /// SSH keys of the create request, installed beside the config's.
    pub ssh_keys: Vec<String>,
    /// The login environment of a proxy-bound VM.
    pub proxy_env: Option<String>,
    /// Restored from a live commit's capture: its memory is its source's, secrets included,
    /// so its secrets are pruned to its own scope before it reports ready.
    pub restored_live: bool,
}

/// A new VM as a create or fork asks for it, beyond its record.
pub(super) struct NewVm {
    /// The secrets it may read (`None`: all).
    pub secrets: Option<Vec<String>>,
    /// SSH keys for its default user, beside the config's.
    pub ssh_keys: Vec<String>,
    /// The commit its disk comes from.
    pub fork: Option<commits::ForkFrom>,
    /// The proxy it is bound to.
    pub proxy: Option<ProxyBinding>,
}

/// A VM's binding to Slicer Proxy: its client, and the proxy's host as the VM reaches it.
pub(super) struct ProxyBinding {
    pub client: String,
    pub host: String,
}
