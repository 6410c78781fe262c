//! The VM manager: creates, tracks and removes VMs, keeping SQLite in step.
//!
//! Every VM is started with a disk the VM library never removes (`persistent` at that
//! level); the manager decides when a disk goes: on delete, or when an ephemeral VM stops.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slicer_api::{CreateNodeRequest, CreateNodeResponse, DeleteResponse, Node, STATUS_RUNNING, STATUS_STOPPED};
use slicer_vmm::{ExecRequest, Host, Vm, VmSpec};
use tokio::sync::watch;

use crate::config::{Group, Settings};
use crate::error::ApiErr;
use crate::state::{Db, VmRecord};

/// Longest a VM may take to answer its first health check.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest a guest gets to power off on `graceful_shutdown` or a shutdown request.
pub const GRACEFUL_TIMEOUT: Duration = Duration::from_secs(30);

/// Boot progress of a VM: `None` while booting, then ready or the reason it failed.
pub type Ready = Option<Result<(), String>>;

pub struct Running {
    pub vm: Vm,
    /// Set before an intentional stop, so the exit watcher does not treat it as a crash.
    stopping: AtomicBool,
    pub ready: watch::Receiver<Ready>,
    /// Exit code of userdata once it ran (`None` while it has not).
    pub userdata: watch::Receiver<Option<i32>>,
}

pub struct Manager {
    pub settings: Settings,
    pub host: Host,
    pub db: Db,
    pub data_dir: PathBuf,
    vms: Mutex<HashMap<String, Arc<Running>>>,
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn pid_is_our_qemu(pid: u32, hostname: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"-name" && w[1] == format!("slicer-{hostname}").as_bytes())
        })
        .unwrap_or(false)
}

pub enum Wait {
    Agent,
    Userdata,
}

impl Manager {
    pub fn new(settings: Settings, host: Host, data_dir: PathBuf) -> anyhow::Result<Arc<Manager>> {
        std::fs::create_dir_all(&host.vm_root)?;
        let db = Db::open(&data_dir.join("state.db"))?;
        Ok(Arc::new(Manager {
            settings,
            host,
            db,
            data_dir,
            vms: Mutex::new(HashMap::new()),
        }))
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Running>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn group(&self, name: &str) -> Result<&Group, ApiErr> {
        self.settings
            .groups
            .iter()
            .find(|g| g.name == name)
            .ok_or_else(|| ApiErr::not_found(format!("host group {name:?} not found")))
    }

    fn vm_dir(&self, hostname: &str) -> PathBuf {
        self.host.vm_root.join(hostname)
    }

    /// Brings the records in line with reality after a start: no VM process of an earlier run
    /// is left running, ephemeral VMs are gone, persistent ones are Stopped.
    pub async fn recover(&self) -> anyhow::Result<()> {
        for rec in self.db.list()? {
            if let Some(pid) = rec.pid {
                if pid_is_our_qemu(pid, &rec.hostname) {
                    tracing::warn!("stopping VM process {pid} of {} left by an earlier run", rec.hostname);
                    // SAFETY: plain kill(2) on a pid whose command line names this VM.
                    unsafe {
                        libc::kill(pid as i32, libc::SIGKILL);
                    }
                }
            }
            if rec.persistent || rec.protected {
                self.db.set_status(&rec.hostname, STATUS_STOPPED, None)?;
            } else {
                let _ = std::fs::remove_dir_all(self.vm_dir(&rec.hostname));
                self.db.delete(&rec.hostname)?;
            }
        }
        Ok(())
    }

    /// Starts (or restarts, with their disks) the `count` VMs of each host group.
    pub async fn start_count_vms(self: &Arc<Self>) -> anyhow::Result<()> {
        for g in self.settings.groups.clone() {
            for n in 1..=g.count {
                let hostname = format!("{}-{n}", g.name);
                let rec = match self.db.get(&hostname)? {
                    Some(r) => r,
                    None => {
                        let mut r = self
                            .new_record(&g, &CreateNodeRequest::default(), true)
                            .map_err(|e| anyhow::anyhow!("host group {}: {}", g.name, e.message))?;
                        r.protected = true;
                        r.persistent = true;
                        self.db.create(&mut r, Some(n))?;
                        r
                    }
                };
                self.launch(&rec).await?;
            }
        }
        Ok(())
    }

    fn new_record(&self, g: &Group, req: &CreateNodeRequest, _count: bool) -> Result<VmRecord, ApiErr> {
        let cpus = req.cpus.unwrap_or(g.cpus);
        if cpus == 0 || cpus > g.cpus {
            return Err(ApiErr::bad_request(format!(
                "cpus {cpus} is outside 1..={} allowed by host group {}",
                g.cpus, g.name
            )));
        }
        let ram_bytes = req.ram_bytes.unwrap_or(g.ram_bytes);
        if ram_bytes < 128 << 20 || ram_bytes > g.ram_bytes {
            return Err(ApiErr::bad_request(format!(
                "ram_bytes {ram_bytes} is outside 128 MiB..={} allowed by host group {}",
                g.ram_bytes, g.name
            )));
        }
        if req.gpu_count.unwrap_or(0) > 0 {
            return Err(ApiErr::bad_request("gpu_count: this host has no GPUs to pass through"));
        }
        for t in &req.tags {
            if t.is_empty() || t.len() > 256 || t.chars().any(char::is_control) {
                return Err(ApiErr::bad_request(format!(
                    "invalid tag {t:?}: 1-256 printable characters"
                )));
            }
        }
        if req.tags.len() > 64 {
            return Err(ApiErr::bad_request("at most 64 tags"));
        }
        if req.hostname.is_some() {
            return Err(ApiErr::bad_request("hostname: hostnames are allocated by the daemon"));
        }
        Ok(VmRecord {
            hostname: String::new(),
            host_group: g.name.clone(),
            cpus,
            ram_bytes,
            persistent: req.persistent.unwrap_or(g.persistent),
            protected: false,
            status: STATUS_RUNNING.into(),
            created_at: now_rfc3339(),
            ip: String::new(),
            pid: None,
            image: g.image.clone(),
            storage_size: g.storage_size,
            userdata: req.userdata.clone().or_else(|| g.userdata.clone()),
            userdata_ran: false,
            userdata_exit_code: None,
            tags: req.tags.clone(),
        })
    }

    /// `POST /hostgroup/{g}/nodes`.
    pub async fn create(
        self: &Arc<Self>,
        group: &str,
        req: CreateNodeRequest,
        wait: Option<Wait>,
        timeout: Duration,
    ) -> Result<CreateNodeResponse, ApiErr> {
        let g = self.group(group)?.clone();
        let mut rec = self.new_record(&g, &req, false)?;
        self.db.create(&mut rec, None).map_err(ApiErr::internal)?;
        let running = match self.launch(&rec).await {
            Ok(r) => r,
            Err(e) => {
                let _ = self.db.delete(&rec.hostname);
                let _ = std::fs::remove_dir_all(self.vm_dir(&rec.hostname));
                return Err(ApiErr::internal(e));
            }
        };
        if let Some(w) = wait {
            let waited = tokio::time::timeout(timeout, self.wait_for(&running, w)).await;
            let failure = match waited {
                Ok(Ok(())) => None,
                Ok(Err(msg)) => Some(ApiErr::internal(msg)),
                Err(_) => Some(ApiErr::timeout(format!(
                    "VM {} was not ready within {timeout:?}; it was deleted",
                    rec.hostname
                ))),
            };
            if let Some(err) = failure {
                let _ = self.delete(&rec.hostname, true).await;
                return Err(err);
            }
        }
        Ok(CreateNodeResponse {
            hostname: rec.hostname.clone(),
            hostgroup: rec.host_group.clone(),
            ip: rec.ip.clone(),
            created_at: rec.created_at.clone(),
            arch: "amd64".into(),
            persistent: rec.persistent,
        })
    }

    async fn wait_for(&self, r: &Running, w: Wait) -> Result<(), String> {
        let mut ready = r.ready.clone();
        let state = ready
            .wait_for(|s| s.is_some())
            .await
            .map_err(|_| "VM stopped while booting".to_string())?
            .clone();
        state.unwrap_or(Ok(()))?;
        if let Wait::Userdata = w {
            let mut ud = r.userdata.clone();
            ud.wait_for(|s| s.is_some())
                .await
                .map_err(|_| "VM stopped while running userdata".to_string())?;
        }
        Ok(())
    }

    fn spec(&self, rec: &VmRecord) -> VmSpec {
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

    /// Starts the VM of a record, and the tasks that follow its boot and its exit.
    async fn launch(self: &Arc<Self>, rec: &VmRecord) -> anyhow::Result<Arc<Running>> {
        let vm = Vm::start(&self.host, &self.spec(rec)).await?;
        self.db.set_status(&rec.hostname, STATUS_RUNNING, Some(vm.pid()))?;
        let (ready_tx, ready_rx) = watch::channel(None);
        let (ud_tx, ud_rx) = watch::channel(if rec.userdata.is_none() || rec.userdata_ran {
            Some(rec.userdata_exit_code.unwrap_or(0))
        } else {
            None
        });
        let running = Arc::new(Running {
            vm,
            stopping: AtomicBool::new(false),
            ready: ready_rx,
            userdata: ud_rx,
        });
        self.vms().insert(rec.hostname.clone(), running.clone());

        let (me, r, hostname) = (self.clone(), running.clone(), rec.hostname.clone());
        let userdata = if rec.userdata_ran { None } else { rec.userdata.clone() };
        tokio::spawn(async move {
            let result = r.vm.wait_ready(BOOT_TIMEOUT).await.map_err(|e| format!("{e:#}"));
            let ok = result.is_ok();
            let _ = ready_tx.send(Some(result));
            if let (true, Some(script)) = (ok, userdata) {
                let code = run_userdata(&r.vm, &script).await;
                let _ = me.db.set_userdata_result(&hostname, code);
                let _ = ud_tx.send(Some(code));
            }
        });

        let (me, r, hostname) = (self.clone(), running.clone(), rec.hostname.clone());
        tokio::spawn(async move {
            r.vm.wait_exit().await;
            if r.stopping.load(Ordering::SeqCst) {
                return;
            }
            tracing::warn!("VM {hostname} exited unexpectedly");
            me.reap(&hostname, &r);
        });
        Ok(running)
    }

    /// After a VM stopped on its own: ephemeral VMs vanish, persistent ones become Stopped.
    fn reap(&self, hostname: &str, r: &Arc<Running>) {
        r.vm.cleanup();
        {
            let mut vms = self.vms();
            if vms.get(hostname).is_some_and(|cur| Arc::ptr_eq(cur, r)) {
                vms.remove(hostname);
            }
        }
        match self.db.get(hostname) {
            Ok(Some(rec)) if rec.persistent || rec.protected => {
                let _ = self.db.set_status(hostname, STATUS_STOPPED, None);
            }
            Ok(Some(_)) => {
                let _ = std::fs::remove_dir_all(self.vm_dir(hostname));
                let _ = self.db.delete(hostname);
            }
            _ => {}
        }
    }

    pub fn record(&self, hostname: &str) -> Result<VmRecord, ApiErr> {
        self.db
            .get(hostname)
            .map_err(ApiErr::internal)?
            .ok_or_else(|| ApiErr::not_found(format!("VM {hostname:?} not found")))
    }

    pub fn node(&self, rec: &VmRecord) -> Node {
        let status = match self.vms().get(&rec.hostname) {
            Some(r) if r.vm.is_running() => STATUS_RUNNING,
            _ => STATUS_STOPPED,
        };
        Node {
            hostname: rec.hostname.clone(),
            hostgroup: rec.host_group.clone(),
            ip: rec.ip.split('/').next().unwrap_or_default().to_string(),
            ram_bytes: rec.ram_bytes,
            cpus: rec.cpus,
            created_at: rec.created_at.clone(),
            arch: "x86_64".into(),
            tags: rec.tags.clone(),
            status: status.into(),
            persistent: rec.persistent,
        }
    }

    pub fn list(&self, group: Option<&str>) -> Result<Vec<Node>, ApiErr> {
        let recs = self.db.list().map_err(ApiErr::internal)?;
        Ok(recs
            .iter()
            .filter(|r| group.is_none_or(|g| r.host_group == g))
            .map(|r| self.node(r))
            .collect())
    }

    /// The running VM of `hostname`: 404 if unknown, 409 if it is not running.
    pub fn running(&self, hostname: &str) -> Result<Arc<Running>, ApiErr> {
        if let Some(r) = self.vms().get(hostname) {
            if r.vm.is_running() {
                return Ok(r.clone());
            }
        }
        self.record(hostname)?;
        Err(ApiErr::conflict(format!("VM {hostname} is not running")))
    }

    /// Stops and removes a VM with its disk. `force` skips the protection of count VMs.
    pub async fn delete(&self, hostname: &str, force: bool) -> Result<DeleteResponse, ApiErr> {
        let rec = self.record(hostname)?;
        if rec.protected && !force {
            return Err(ApiErr::forbidden(format!(
                "VM {hostname} belongs to the config's count for host group {}; change the config instead",
                rec.host_group
            )));
        }
        let running = self.vms().remove(hostname);
        if let Some(r) = running {
            r.stopping.store(true, Ordering::SeqCst);
            let _ = r.vm.stop(Duration::ZERO).await;
        }
        let dir = self.vm_dir(hostname);
        let disk_removed = match std::fs::remove_dir_all(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                tracing::warn!("removing {}: {e}", dir.display());
                false
            }
        };
        self.db.delete(hostname).map_err(ApiErr::internal)?;
        Ok(DeleteResponse {
            message: "VM deleted successfully".into(),
            disk_removed: disk_removed.to_string(),
            error: String::new(),
        })
    }

    /// `POST /vm/{h}/shutdown`: power off (ephemeral VMs are then removed) or reboot.
    pub async fn shutdown(self: &Arc<Self>, hostname: &str, reboot: bool) -> Result<(), ApiErr> {
        let r = self.running(hostname)?;
        r.stopping.store(true, Ordering::SeqCst);
        r.vm.stop_process(GRACEFUL_TIMEOUT).await;
        if reboot {
            self.vms().remove(hostname);
            r.vm.cleanup();
            let rec = self.record(hostname)?;
            self.launch(&rec).await.map_err(ApiErr::internal)?;
        } else {
            self.reap(hostname, &r);
        }
        Ok(())
    }

    /// Daemon stop: guests power off (bounded) or stop at once, per `graceful_shutdown`.
    /// Ephemeral VMs are removed; persistent ones are kept as Stopped.
    pub async fn shutdown_all(&self) {
        let all: Vec<(String, Arc<Running>)> = self.vms().drain().collect();
        let graceful = if self.settings.graceful_shutdown {
            GRACEFUL_TIMEOUT
        } else {
            Duration::ZERO
        };
        let stops = all.iter().map(|(h, r)| async move {
            r.stopping.store(true, Ordering::SeqCst);
            let _ = r.vm.stop(graceful).await;
            self.reap(h, r);
        });
        futures_util::future::join_all(stops).await;
    }
}

/// Runs userdata once as root, logging to /var/log/slicer-userdata.log in the guest.
async fn run_userdata(vm: &Vm, script: &str) -> i32 {
    let agent = vm.agent();
    let path = "/etc/slicer/userdata.sh";
    if let Err(e) = agent
        .upload_file(
            path,
            Some(0o700),
            None,
            std::io::Cursor::new(script.as_bytes().to_vec()),
        )
        .await
    {
        tracing::warn!("uploading userdata to {}: {e}", vm.name);
        return -1;
    }
    let cmd =
        format!("{path} > /var/log/slicer-userdata.log 2>&1; rc=$?; echo $rc > /etc/slicer/userdata-ran; exit $rc");
    match agent
        .exec_output(&ExecRequest::argv(["/bin/sh", "-c", &cmd]), None)
        .await
    {
        Ok(out) => out.status.code.unwrap_or(128 + out.status.signal.unwrap_or(0)),
        Err(e) => {
            tracing::warn!("running userdata in {}: {e}", vm.name);
            -1
        }
    }
}
