//! Networking against real guests. Test hosts live in network namespaces this test creates
//! (198.18.0.0/15, the benchmarking range); no traffic goes anywhere else.

mod common;

use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestDaemon;
use http::Method;
use serde_json::{json, Value};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A host in its own namespace at `<prefix>.2/24`, reached from the host through `<prefix>.1`,
/// answering "hello" on each TCP port given.
struct TestHost {
    ns: String,
    veth: String,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl TestHost {
    fn new(name: &str, prefix: &str, ports: &[u16]) -> TestHost {
        let ns = format!("sltest-{name}");
        let veth = format!("slt-{name}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{prefix}.2/24"), "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in ports {
            let (ns, stop) = (ns.clone(), stop.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || {
                let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
                // SAFETY: setns on this thread only; the file is open.
                let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0);
                let l = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
                l.set_nonblocking(true).unwrap();
                tx.send(()).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.write_all(b"hello\n");
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
            rx.recv_timeout(Duration::from_secs(5)).expect("listener up");
        }
        TestHost {
            ns,
            veth,
            stop,
            threads,
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = Command::new("ip").args(["link", "del", &self.veth]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// Runs a shell line in the VM: (exit code, stdout).
async fn sh(d: &TestDaemon, vm: &str, line: &str) -> (i64, String) {
    let (s, v) = d.sh(vm, line).await;
    assert_eq!(s, 200, "{v}");
    (
        v["exit_code"].as_i64().unwrap(),
        v["stdout"].as_str().unwrap_or_default().to_string(),
    )
}

/// Whether the VM gets "hello" from addr:port within 3 s.
async fn reaches(d: &TestDaemon, vm: &str, addr: &str, port: u16) -> bool {
    let (code, out) = sh(
        d,
        vm,
        &format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{addr}/{port}; head -n1 <&3'"),
    )
    .await;
    code == 0 && out.trim() == "hello"
}

async fn pings(d: &TestDaemon, vm: &str, addr: &str) -> bool {
    sh(d, vm, &format!("ping -c1 -W2 {addr}")).await.0 == 0
}

/// Creates a VM; warm start is on by default, so every VM here is restored from its group's
/// template snapshot: the network must work after a restore.
async fn create(d: &TestDaemon, group: &str, body: Value) -> (String, String) {
    let v = d.create_vm(group, body).await;
    let ip = v["ip"].as_str().unwrap().split('/').next().unwrap().to_string();
    let hostname = v["hostname"].as_str().unwrap().to_string();
    let (_, desc) = d.get(&format!("/vm/{hostname}")).await;
    assert_eq!(desc["start_mode"], "template", "{hostname} was not restored: {desc}");
    (hostname, ip)
}

/// Namespaces, links and tables of `group` (and the VMs `hosts`) still present.
fn ours_left(group: &str, hosts: &[&str], links: &[&str]) -> Vec<String> {
    let out = |args: &[&str]| {
        String::from_utf8_lossy(&Command::new(args[0]).args(&args[1..]).output().unwrap().stdout).into_owned()
    };
    let prefix = format!("slicer-{group}-");
    let mut names: Vec<String> = hosts
        .iter()
        .map(|h| format!("slh{}", slicer_net::short_id(h)))
        .collect();
    names.extend(links.iter().map(|l| l.to_string()));
    let mut left: Vec<String> = out(&["ip", "netns", "list"])
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    left.extend(
        out(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| {
                l.split(':')
                    .nth(1)
                    .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            })
            .filter(|n| names.contains(n)),
    );
    left.extend(
        out(&["nft", "list", "tables"])
            .lines()
            .filter(|l| l.contains(&prefix) || l.ends_with(&format!("slicer-br-{group}")))
            .map(str::to_string),
    );
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_mode_enforces_drop_and_allow_outside_the_guest() {
    let lan = TestHost::new("lan", "198.18.1", &[8080]);
    let inet = TestHost::new("inet", "198.18.2", &[8080, 8081]);
    let mut d = TestDaemon::start(|port| {
        format!(
            "config:\n  host_groups:\n  - name: iso\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: isolated\n      range: 169.254.200.0/22\n      drop: [\"198.18.1.0/24\"]\n      allow: [\"0.0.0.0/0\"]\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    let (a, a_ip) = create(&d, "iso", json!({})).await;
    let (b, b_ip) = create(&d, "iso", json!({})).await;
    assert_eq!(a_ip, "169.254.200.2");
    assert_eq!(b_ip, "169.254.200.6");

    // The allowed "internet" host answers; the dropped "LAN" host does not.
    assert!(reaches(&d, &a, "198.18.2.2", 8080).await, "allowed host unreachable");
    assert!(!reaches(&d, &a, "198.18.1.2", 8080).await, "dropped host reachable");
    // VMs cannot reach each other, nor any address of the host.
    assert!(
        pings(&d, &a, "198.18.2.2").await,
        "ICMP to the allowed host should pass"
    );
    assert!(!pings(&d, &a, &b_ip).await, "VM A reached VM B");
    assert!(!pings(&d, &b, &a_ip).await, "VM B reached VM A");
    assert!(
        !pings(&d, &a, "169.254.200.1").await,
        "VM reached its gateway on the host"
    );
    assert!(!pings(&d, &a, "198.18.2.1").await, "VM reached a host address");
    let host_listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();
    let (code, _) = sh(
        &d,
        &a,
        &format!("timeout 3 bash -c 'exec 3<>/dev/tcp/169.254.200.1/{host_port}'"),
    )
    .await;
    assert_ne!(code, 0, "VM opened a TCP connection to the host");

    // The description reports mode and effective lists.
    let (_, v) = d.get(&format!("/vm/{a}")).await;
    assert_eq!(v["network"]["mode"], "isolated");
    assert_eq!(
        v["network"]["effective"],
        json!({"allow": ["0.0.0.0/0"], "drop": ["198.18.1.0/24"]})
    );

    // A per-VM override: everything dropped but one host port.
    let (c, _) = create(
        &d,
        "iso",
        json!({"network": {"drop": ["0.0.0.0/0"], "allow": ["198.18.2.2:8080"]}}),
    )
    .await;
    assert!(
        reaches(&d, &c, "198.18.2.2", 8080).await,
        "the allowed port is unreachable"
    );
    assert!(!reaches(&d, &c, "198.18.2.2", 8081).await, "another port answered");
    assert!(!reaches(&d, &c, "198.18.1.2", 8080).await);
    let (_, v) = d.get(&format!("/vm/{c}")).await;
    assert_eq!(v["network"]["policy_source"], "override");
    assert_eq!(
        v["network"]["effective"],
        json!({"allow": ["198.18.2.2:8080"], "drop": ["0.0.0.0/0"]})
    );
    // [] clears an inherited list: no drop left, so the LAN host answers this VM.
    let (e, _) = create(&d, "iso", json!({"network": {"drop": []}})).await;
    assert!(
        reaches(&d, &e, "198.18.1.2", 8080).await,
        "drop: [] did not clear the group's drop list"
    );
    let (s, _) = d
        .send_json(
            Method::POST,
            "/hostgroup/iso/nodes",
            r#"{"network":{"drop":["10.0.0.0/99"]}}"#,
        )
        .await;
    assert_eq!(s, 400);

    for h in [&a, &b, &c, &e] {
        let (s, _) = d
            .send_json(Method::DELETE, &format!("/hostgroup/iso/nodes/{h}"), "")
            .await;
        assert_eq!(s, 200);
    }
    d.stop().await;
    assert_eq!(ours_left("iso", &[&a, &b, &c, &e], &[]), Vec::<String>::new());
    drop((lan, inet));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_mode_vms_reach_each_other_and_the_host() {
    let mut d = TestDaemon::start(|port| {
        format!(
            "config:\n  host_groups:\n  - name: nett\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: bridge\n      bridge: brnett0\n      tap_prefix: netttap\n      gateway: 198.19.77.1/24\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    let (a, a_ip) = create(&d, "nett", json!({})).await;
    let (b, b_ip) = create(&d, "nett", json!({})).await;
    assert_eq!((a_ip.as_str(), b_ip.as_str()), ("198.19.77.2", "198.19.77.3"));
    assert!(pings(&d, &a, &b_ip).await, "bridge VMs should reach each other");
    assert!(pings(&d, &b, "198.19.77.1").await, "bridge VMs should reach the host");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ok = false;
    while !ok && Instant::now() < deadline {
        ok = Command::new("ping")
            .args(["-c1", "-W1", &a_ip])
            .output()
            .unwrap()
            .status
            .success();
    }
    assert!(ok, "the host should reach a bridge VM");
    d.stop().await;
    assert_eq!(
        ours_left("nett", &[], &["brnett0", "netttap2", "netttap3"]),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_network_config_fails_at_start() {
    for (net, want) in [
        ("{mode: isolated, range: 169.254.100.0/22}\n  - name: two\n    network: {mode: isolated, range: 169.254.102.0/24}", "overlap"),
        ("{mode: isolated, drop: [\"192.168.1.0/33\"]}", "network.drop"),
        ("{mode: bridge, bridge: bridge-name-too-long}", "network.bridge"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("x.yaml");
        std::fs::write(&cfg, format!("config:\n  host_groups:\n  - name: one\n    network: {net}\n")).unwrap();
        let err = slicer_daemon::start(&slicer_daemon::UpOptions {
            config: cfg,
            data_dir: dir.path().join("data"),
            images_dir: Some(common::images_dir()),
            agent: None,
        })
        .await
        .err()
        .expect("bad config must fail");
        assert!(format!("{err:#}").contains(want), "{err:#}");
        assert!(!dir.path().join("data").exists(), "nothing is created for a bad config");
    }
}
