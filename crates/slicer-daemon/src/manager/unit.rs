//! The manager's lifecycle logic against a fake backend: records, the capacity ledger, state
//! changes and clean-up, with no QEMU, root or images (the unit tier).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slicer_agent_client::AgentClient;
use slicer_api::{CreateNodeRequest, VmStatus};
use slicer_vmm::{Host, Shape, StartMode, Template, Vm, VmSpec};
use tokio::sync::watch;

use super::{Backend, BoxFut, Error, Guest, Machine, Manager, Wait};

mod guest_ops;
mod mem_guest;
use mem_guest::MemGuest;

/// A fake VM's guest: in memory, or a real agent client on a socket the test serves.
enum FakeGuest {
    Mem(Arc<MemGuest>),
    Agent(AgentClient),
}

/// One fake VM: no process, a guest in memory (or an agent socket), an exit the test can cause.
struct FakeVm {
    name: String,
    guest: FakeGuest,
    mode: StartMode,
    running: AtomicBool,
    exited: watch::Sender<bool>,
}

impl FakeVm {
    fn exit(&self) {
        self.running.store(false, std::sync::atomic::Ordering::SeqCst);
        self.exited.send_replace(true);
    }
}

/// A handle on a [`FakeVm`] the manager holds.
struct FakeMachine(Arc<FakeVm>);

impl Machine for FakeMachine {
    fn name(&self) -> &str {
        &self.0.name
    }
    fn guest(&self) -> &dyn Guest {
        match &self.0.guest {
            FakeGuest::Mem(g) => g.as_ref(),
            FakeGuest::Agent(a) => a,
        }
    }
    fn start_mode(&self) -> StartMode {
        self.0.mode
    }
    fn is_running(&self) -> bool {
        self.0.running.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn is_ready(&self) -> bool {
        self.is_running()
    }
    fn process(&self) -> Option<(u32, u64)> {
        None
    }
    fn boot_time(&self) -> Duration {
        Duration::ZERO
    }
    fn wait_ready(&self, _timeout: Duration) -> BoxFut<'_, slicer_vmm::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn wait_exit(&self) -> BoxFut<'_, ()> {
        let mut rx = self.0.exited.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|e| *e).await;
        })
    }
    fn stop(&self, _graceful: Duration) -> BoxFut<'_, slicer_vmm::Result<()>> {
        self.0.exit();
        Box::pin(async { Ok(()) })
    }
    fn stop_process(&self, _graceful: Duration) -> BoxFut<'_, ()> {
        self.0.exit();
        Box::pin(async {})
    }
    fn suspend(&self) -> BoxFut<'_, slicer_vmm::Result<()>> {
        self.0.exit();
        Box::pin(async { Ok(()) })
    }
    fn set_paused(&self, _paused: bool) -> BoxFut<'_, slicer_vmm::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn cleanup(&self) {}
    fn discard(&self) -> BoxFut<'_, ()> {
        self.0.exit();
        Box::pin(async {})
    }
    fn qemu(&self) -> Option<&Vm> {
        None
    }
}

#[derive(Default)]
struct FakeBackend {
    vms: Mutex<Vec<Arc<FakeVm>>>,
    /// The next start fails (as a QEMU that cannot start would).
    fail_next: AtomicBool,
    /// The shapes templates were asked for, in order.
    templates_asked: Mutex<Vec<Shape>>,
    /// The agent socket of the VMs started from now on (by default their guests are in memory).
    agent: Mutex<Option<std::path::PathBuf>>,
}

impl FakeBackend {
    fn make(&self, spec: &VmSpec, mode: StartMode) -> slicer_vmm::Result<Box<dyn Machine>> {
        if self.fail_next.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(slicer_vmm::Error::QemuExited("fake: QEMU did not start".into()));
        }
        let vm = Arc::new(FakeVm {
            name: spec.name.clone(),
            guest: match self.agent.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                Some(socket) => FakeGuest::Agent(AgentClient::new(socket)),
                None => FakeGuest::Mem(Arc::new(MemGuest::new())),
            },
            mode,
            running: AtomicBool::new(true),
            exited: watch::channel(false).0,
        });
        self.vms.lock().unwrap_or_else(|p| p.into_inner()).push(vm.clone());
        Ok(Box::new(FakeMachine(vm)))
    }

    /// The newest fake VM of that name.
    fn vm(&self, name: &str) -> Arc<FakeVm> {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        vms.iter()
            .rev()
            .find(|v| v.name == name)
            .cloned()
            .expect("a fake VM of that name")
    }

    /// The in-memory guest of the newest fake VM of that name.
    fn guest(&self, name: &str) -> Arc<MemGuest> {
        match &self.vm(name).guest {
            FakeGuest::Mem(g) => g.clone(),
            FakeGuest::Agent(_) => panic!("VM {name} has an agent socket, not an in-memory guest"),
        }
    }
}

impl Backend for FakeBackend {
    fn start<'a>(&'a self, spec: &'a VmSpec) -> BoxFut<'a, slicer_vmm::Result<Box<dyn Machine>>> {
        Box::pin(async move { self.make(spec, StartMode::Cold) })
    }
    fn restore<'a>(&'a self, spec: &'a VmSpec, _t: &'a Template) -> BoxFut<'a, slicer_vmm::Result<Box<dyn Machine>>> {
        Box::pin(async move { self.make(spec, StartMode::Template) })
    }
    fn resume<'a>(&'a self, spec: &'a VmSpec) -> BoxFut<'a, slicer_vmm::Result<Box<dyn Machine>>> {
        Box::pin(async move { self.make(spec, StartMode::Resume) })
    }
    fn adopt<'a>(
        &'a self,
        spec: &'a VmSpec,
        _pid: u32,
        _start: u64,
    ) -> BoxFut<'a, slicer_vmm::Result<Box<dyn Machine>>> {
        Box::pin(async move { self.make(spec, StartMode::Adopted) })
    }
    fn template<'a>(&'a self, shape: &'a Shape) -> BoxFut<'a, slicer_vmm::Result<Arc<Template>>> {
        self.templates_asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(shape.clone());
        Box::pin(async { Err(slicer_vmm::Error::Template("fake: no templates".into())) })
    }
}

struct Fixture {
    manager: Arc<Manager>,
    backend: Arc<FakeBackend>,
    dir: tempfile::TempDir,
}

/// A manager with one host group `t` (2 vCPUs, 512 MiB, no network, warm start off) and a
/// budget of `vms` VMs.
async fn fixture(vms: u32) -> Fixture {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let yaml = format!(
        "config:\n  host_groups:\n  - name: t\n    count: 0\n    vcpu: 2\n    ram_mb: 512\n    warm_start: false\n    network: {{mode: none}}\n  capacity:\n    vms: {vms}\n    ram_bytes: 17179869184\n"
    );
    let settings = crate::config::File::parse(&yaml)
        .and_then(|f| f.settings(dir.path()))
        .expect("the test config is valid");
    std::fs::create_dir_all(dir.path().join("data")).expect("the data directory");
    let backend = Arc::new(FakeBackend::default());
    let manager = manager_on(dir.path(), settings, backend.clone()).await;
    Fixture { manager, backend, dir }
}

/// A manager keeping its state and VM directories under `dir` (as a daemon restarted on the
/// same data directory would).
async fn manager_on(
    dir: &std::path::Path,
    settings: crate::config::Settings,
    backend: Arc<FakeBackend>,
) -> Arc<Manager> {
    let host = Arc::new(Host::new(dir, &dir.join("vms")));
    Manager::with_backend(settings, host, backend, &dir.join("data"))
        .await
        .expect("a manager")
}

impl Fixture {
    /// A VM of group `t`, its agent answering.
    async fn ready_vm(&self, persistent: bool) -> super::Created {
        self.manager
            .create("t", request(persistent, &[]), Some(Wait::Agent), T)
            .await
            .expect("create")
    }
}

fn request(persistent: bool, tags: &[&str]) -> CreateNodeRequest {
    CreateNodeRequest {
        persistent: Some(persistent),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

const T: Duration = Duration::from_secs(10);

/// Polls `cond` every 10 ms for up to 10 s.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn create_records_a_running_vm_and_delete_removes_it_all() {
    let f = fixture(4).await;
    let m = &f.manager;
    let made = m
        .create("t", request(false, &["user=a"]), Some(Wait::Agent), T)
        .await
        .expect("create");
    assert_eq!(made.group, "t");
    let nodes = m.list(None).expect("list");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].status, VmStatus::Running);
    assert_eq!(nodes[0].tags, vec!["user=a".to_string()]);
    assert_eq!(m.capacity().0.vms, 1);
    assert_eq!(m.start_mode(&made.hostname), Some(slicer_vmm::StartMode::Cold));

    m.delete(&made.hostname, false).await.expect("delete");
    assert!(m.records().expect("records").is_empty());
    assert_eq!(m.capacity().0.vms, 0);
    assert!(!f
        .backend
        .vm(&made.hostname)
        .running
        .load(std::sync::atomic::Ordering::SeqCst));
    assert!(matches!(m.record(&made.hostname), Err(Error::NotFound(_))));
}

/// Only `config.capacity.template_shapes` distinct shapes get a template (the warm group's own
/// first); a VM of any other shape boots cold without one being built, and says so in the
/// metrics.
#[tokio::test]
async fn shapes_past_the_template_bound_boot_cold_without_a_template() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let yaml = "config:\n  host_groups:\n  - name: w\n    count: 0\n    vcpu: 2\n    ram_mb: 512\n    network: {mode: none}\n  capacity:\n    ram_bytes: 17179869184\n    template_shapes: 2\n";
    let settings = crate::config::File::parse(yaml)
        .and_then(|f| f.settings(dir.path()))
        .expect("the test config is valid");
    std::fs::create_dir_all(dir.path().join("data")).expect("the data directory");
    let backend = Arc::new(FakeBackend::default());
    let m = manager_on(dir.path(), settings, backend.clone()).await;
    let shape = |mib: u32| Shape {
        image: "min".into(),
        cpus: 2,
        memory_mib: mib,
        nic: false,
    };
    assert_eq!(
        m.template_shapes(),
        vec![shape(512)],
        "the group's shape has a slot from the start"
    );
    let mut made = Vec::new();
    // The group's shape, a second one (the last slot), a third (none), the second again.
    for mib in [512u64, 256, 384, 256, 384] {
        let req = CreateNodeRequest {
            ram_bytes: Some(mib << 20),
            ..request(false, &[])
        };
        let v = m.create("w", req, Some(Wait::Agent), T).await.expect("create");
        assert_eq!(m.start_mode(&v.hostname), Some(slicer_vmm::StartMode::Cold));
        made.push(v.hostname);
    }
    let asked = backend
        .templates_asked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    assert_eq!(
        asked,
        vec![shape(512), shape(256), shape(256)],
        "384 MiB asked for no template"
    );
    assert_eq!(m.template_shape_count(), (2, 2));
    let text = m.metrics_text();
    for line in [
        "slicer_template_shapes_refused_total 2",
        "slicer_template_shapes{kind=\"used\"} 2",
        "slicer_template_shapes{kind=\"limit\"} 2",
        "slicer_template_memory_bytes{kind=\"pinned\"} 0",
    ] {
        assert!(text.contains(line), "{line} missing in {text}");
    }
    for h in made {
        m.delete(&h, false).await.expect("delete");
    }
}

#[tokio::test]
async fn a_start_that_fails_leaves_no_record_and_no_share() {
    let f = fixture(4).await;
    f.backend.fail_next.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = f
        .manager
        .create("t", request(true, &[]), Some(Wait::Agent), T)
        .await
        .expect_err("the start fails");
    assert!(
        matches!(&e, Error::Host { fault: super::HostFault::Other, .. } if e.to_string().contains("QEMU did not start")),
        "{e:?}"
    );
    // The backend's error is kept, by type, under the manager's.
    assert!(
        matches!(
            e.host_cause().and_then(|c| c.find::<slicer_vmm::Error>()),
            Some(slicer_vmm::Error::QemuExited(_))
        ),
        "no slicer_vmm::Error::QemuExited in {e:?}"
    );
    assert!(f.manager.records().expect("records").is_empty());
    assert_eq!(f.manager.capacity().0.vms, 0);
}

#[tokio::test]
async fn the_budget_refuses_more_vms_and_records_nothing() {
    let f = fixture(1).await;
    let m = &f.manager;
    m.create("t", request(false, &[]), None, T)
        .await
        .expect("the first fits");
    let e = m.create("t", request(false, &[]), None, T).await.expect_err("no room");
    assert!(
        matches!(e, Error::Unavailable(ref s) if s.contains("no room for another VM")),
        "{e:?}"
    );
    assert_eq!(m.records().expect("records").len(), 1);
}

#[tokio::test]
async fn bad_requests_are_refused_before_anything_exists() {
    let f = fixture(4).await;
    let m = &f.manager;
    let too_many = CreateNodeRequest {
        cpus: Some(3),
        ..Default::default()
    };
    assert!(matches!(m.create("t", too_many, None, T).await, Err(Error::Invalid(_))));
    for ignored in [
        CreateNodeRequest {
            ip: Some("10.0.0.9".into()),
            ..Default::default()
        },
        CreateNodeRequest {
            disk_image: Some("other".into()),
            ..Default::default()
        },
    ] {
        assert!(matches!(m.create("t", ignored, None, T).await, Err(Error::Invalid(_))));
    }
    assert!(matches!(
        m.create("nope", request(false, &[]), None, T).await,
        Err(Error::NotFound(_))
    ));
    m.create("t", request(false, &["name=web"]), None, T)
        .await
        .expect("named");
    assert!(matches!(
        m.create("t", request(false, &["name=web"]), None, T).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(m.records().expect("records").len(), 1);
}

#[tokio::test]
async fn an_unexpected_exit_stops_a_persistent_vm_and_removes_an_ephemeral_one() {
    let f = fixture(4).await;
    let m = &f.manager;
    let kept = f.ready_vm(true).await;
    let gone = f.ready_vm(false).await;
    f.backend.vm(&kept.hostname).exit();
    f.backend.vm(&gone.hostname).exit();
    eventually("the exits are reaped", || m.capacity().0.vms == 0).await;
    eventually("the ephemeral record goes", || m.records().is_ok_and(|r| r.len() == 1)).await;
    let rec = m.record(&kept.hostname).expect("the persistent VM stays");
    assert_eq!(rec.status, VmStatus::Stopped);
    assert!(matches!(m.record(&gone.hostname), Err(Error::NotFound(_))));

    // A stopped persistent VM starts again; a running one cannot be relaunched.
    m.relaunch(&kept.hostname).await.expect("relaunch");
    assert_eq!(m.record(&kept.hostname).expect("record").status, VmStatus::Running);
    assert!(matches!(m.relaunch(&kept.hostname).await, Err(Error::Conflict(_))));
}

#[tokio::test]
async fn suspend_gives_the_share_back_and_restore_takes_it_again() {
    let f = fixture(4).await;
    let m = &f.manager;
    let vm = f.ready_vm(true).await;
    m.suspend(&vm.hostname).await.expect("suspend");
    assert_eq!(m.record(&vm.hostname).expect("record").status, VmStatus::Suspended);
    assert_eq!(m.capacity().0.vms, 0);
    assert!(matches!(m.relaunch(&vm.hostname).await, Err(Error::Conflict(_))));
    m.restore(&vm.hostname, true, T).await.expect("restore");
    assert_eq!(m.record(&vm.hostname).expect("record").status, VmStatus::Running);
    assert_eq!(m.start_mode(&vm.hostname), Some(slicer_vmm::StartMode::Resume));
    assert_eq!(m.capacity().0.vms, 1);
    assert!(matches!(
        m.restore(&vm.hostname, false, T).await,
        Err(Error::Conflict(_))
    ));
}

#[tokio::test]
async fn pause_is_recorded_and_blocks_guest_operations() {
    let f = fixture(4).await;
    let m = &f.manager;
    let vm = f.ready_vm(false).await;
    m.set_paused(&vm.hostname, true).await.expect("pause");
    assert_eq!(m.list(None).expect("list")[0].status, VmStatus::Paused);
    assert!(matches!(m.active(&vm.hostname), Err(Error::Conflict(_))));
    m.set_paused(&vm.hostname, false).await.expect("resume");
    assert!(m.active(&vm.hostname).is_ok());
}

#[tokio::test]
async fn recovery_stops_persistent_records_and_drops_ephemeral_ones_of_a_dead_daemon() {
    let f = fixture(4).await;
    let m = &f.manager;
    let kept = f.ready_vm(true).await;
    let gone = f.ready_vm(false).await;
    // A second manager on the same data, as a restarted daemon would be (the fakes have no
    // process to adopt).
    let again = manager_on(f.dir.path(), m.settings.clone(), Arc::new(FakeBackend::default())).await;
    again.recover().await.expect("recover");
    assert_eq!(again.record(&kept.hostname).expect("kept").status, VmStatus::Stopped);
    assert!(matches!(again.record(&gone.hostname), Err(Error::NotFound(_))));
}

/// A stuck guest's agent on a UNIX socket under `dir`: the real handshake, then an upload is
/// answered, and every other request gets a body that never ends (an exec says it started,
/// then nothing more).
fn stuck_agent(dir: &std::path::Path) -> std::path::PathBuf {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let path = dir.join("stuck-agent.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("a socket");
    // The senders of the bodies, kept so that no body ever ends.
    let kept = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let Ok((io, _)) = slicer_agent_proto::sync::agent_handshake(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (tx, body) = slicer_agent_proto::body::channel(4);
                    if req.method() == http::Method::PUT {
                        let _ = tx.try_send(Ok(bytes::Bytes::from_static(br#"{"path":"/f","bytes":1}"#)));
                        return std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(body)));
                    }
                    if req.uri().path().contains("exec") {
                        let started = slicer_agent_proto::frame::encode_json(
                            slicer_agent_proto::frame::Kind::Started,
                            &slicer_agent_proto::Started {
                                pid: 7,
                                started_at_ms: 1,
                            },
                        );
                        let _ = tx.try_send(Ok(started));
                    }
                    kept.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
                    std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(body)))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    path
}

// The daemon's own calls into a guest end by their deadlines (30 s; the userdata 1 h) when the
// guest's agent starts a command that never ends. Time is paused: tokio moves the clock on
// whenever every task waits, so the deadlines pass at once.
#[tokio::test(start_paused = true)]
async fn a_stuck_guest_cannot_hold_the_ssh_key_installation() {
    let f = fixture(4).await;
    *f.backend.agent.lock().unwrap_or_else(|p| p.into_inner()) = Some(stuck_agent(f.dir.path()));
    let req = CreateNodeRequest {
        ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGw2nbyvNQ5dTfTQ1vbiHyqL3QVGWczZ1fdQ1ZDfjVZq t@x".into()],
        ..request(false, &[])
    };
    let t0 = tokio::time::Instant::now();
    let made = f
        .manager
        .create("t", req, Some(Wait::Agent), Duration::from_secs(600))
        .await
        .expect("ready once the key installation gave up");
    let took = t0.elapsed();
    assert!(
        took >= super::GUEST_CALL_DEADLINE && took < super::GUEST_CALL_DEADLINE + Duration::from_secs(5),
        "{took:?}"
    );
    f.manager.delete(&made.hostname, true).await.expect("delete");
}

#[tokio::test(start_paused = true)]
async fn a_stuck_guest_cannot_hold_its_userdata_for_ever() {
    let f = fixture(4).await;
    *f.backend.agent.lock().unwrap_or_else(|p| p.into_inner()) = Some(stuck_agent(f.dir.path()));
    let req = CreateNodeRequest {
        userdata: Some("#!/bin/sh\nsleep infinity\n".into()),
        ..request(false, &[])
    };
    let t0 = tokio::time::Instant::now();
    let e = f
        .manager
        .create("t", req, Some(Wait::Userdata), Duration::from_secs(3 * 3600))
        .await
        .expect_err("the userdata fails");
    let took = t0.elapsed();
    // Who the default user is (30 s), the script (1 h), its log's tail (30 s).
    assert!(
        matches!(&e, Error::UserdataFailed(m) if m.contains("exited with code 124")),
        "{e:?}"
    );
    let expected = super::USERDATA_DEADLINE + 2 * super::GUEST_CALL_DEADLINE;
    assert!(took >= expected && took < expected + Duration::from_secs(5), "{took:?}");
    f.manager.delete(&e_host(&f), true).await.expect("delete");
}

/// The one VM of a fixture.
fn e_host(f: &Fixture) -> String {
    f.manager.records().expect("records")[0].hostname.clone()
}

/// Settings of one group `t` that trusts a CA made under `dir` (and `<dir>/data` to run in).
fn ca_group_settings(dir: &std::path::Path) -> crate::config::Settings {
    let ca = slicer_proxy::ca::GroupCa::init(&dir.join("ca"), "t", false).expect("a CA");
    let pem = dir.join("ca.pem");
    std::fs::write(&pem, ca.cert_pem()).expect("the CA file");
    let yaml = format!(
        "config:\n  host_groups:\n  - name: t\n    count: 0\n    vcpu: 2\n    ram_mb: 512\n    warm_start: false\n    network: {{mode: none}}\n    ca: {{files: [{}]}}\n  capacity:\n    vms: 4\n    ram_bytes: 17179869184\n",
        pem.display()
    );
    std::fs::create_dir_all(dir.join("data")).expect("the data directory");
    crate::config::File::parse(&yaml)
        .and_then(|f| f.settings(dir))
        .expect("the test config is valid")
}

/// A group trusting a CA: a guest whose agent cannot install it (here it answers nonsense)
/// fails the create with a clear error, and nothing of the VM is left.
#[tokio::test]
async fn a_guest_that_cannot_take_the_groups_ca_fails_its_create() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let settings = ca_group_settings(dir.path());
    assert!(settings.groups[0].ca_bundle().is_some());
    std::fs::create_dir_all(dir.path().join("data")).expect("the data directory");
    let backend = Arc::new(FakeBackend::default());
    *backend.agent.lock().unwrap_or_else(|p| p.into_inner()) = Some(stuck_agent(dir.path()));
    let m = manager_on(dir.path(), settings, backend.clone()).await;
    let e = m
        .create("t", request(false, &[]), Some(Wait::Agent), T)
        .await
        .expect_err("the create fails");
    assert!(
        e.to_string().contains("installing the host group's CA certificates"),
        "{e}"
    );
    assert!(m.records().expect("records").is_empty());
    eventually("the share is released", || m.capacity().0.vms == 0).await;
}
