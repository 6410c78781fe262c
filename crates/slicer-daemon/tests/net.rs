//! Networking against real guests. Test hosts live in network namespaces this test creates
//! (198.18.0.0/15, the benchmarking range; a stand-in for the cloud metadata service at
//! 169.254.169.254; IPv6 hosts in fdec:18::/48); no traffic goes anywhere else.

mod common;

use slicer_api::routes;
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

/// A thread answering "hello" to every TCP connection on `port` (0: any free port) of all
/// addresses, in network namespace `ns` (`None`: the host's); returns the port.
fn serve_hello(
    ns: Option<String>,
    port: u16,
    stop: Arc<AtomicBool>,
    threads: &mut Vec<std::thread::JoinHandle<()>>,
) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    threads.push(std::thread::spawn(move || {
        if let Some(ns) = ns {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            // SAFETY: setns on this thread only; the file is open.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0);
        }
        // [::] takes IPv4 too (v4-mapped); a namespace without IPv6 has 0.0.0.0 only.
        let l = std::net::TcpListener::bind(("::", port))
            .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", port)))
            .unwrap();
        l.set_nonblocking(true).unwrap();
        tx.send(l.local_addr().unwrap().port()).unwrap();
        while !stop.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(b"hello\n");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }));
    rx.recv_timeout(Duration::from_secs(5)).expect("listener up")
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
        TestHost::with_addrs(
            name,
            (&format!("{prefix}.1/24"), &format!("{prefix}.2/24")),
            None,
            ports,
        )
    }

    /// A test host with the given (host side, namespace side) IPv4 addresses and, optionally,
    /// IPv6 ones (the namespace routes IPv6 back through the host side).
    fn with_addrs(name: &str, v4: (&str, &str), v6: Option<(&str, &str)>, ports: &[u16]) -> TestHost {
        let ns = format!("sltest-{name}");
        let veth = format!("slt-{name}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        let stop = Arc::new(AtomicBool::new(false));
        // From here on, Drop removes what exists.
        let mut host = TestHost {
            ns: ns.clone(),
            veth: veth.clone(),
            stop: stop.clone(),
            threads: Vec::new(),
        };
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", v4.0, "dev", &veth]);
        ip(&["-n", &ns, "addr", "add", v4.1, "dev", "eth0"]);
        if let Some((h, n)) = v6 {
            ip(&["-6", "addr", "add", h, "dev", &veth, "nodad"]);
            ip(&["-n", &ns, "-6", "addr", "add", n, "dev", "eth0", "nodad"]);
        }
        ip(&["link", "set", &veth, "up"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        if let Some((h, _)) = v6 {
            let via = h.split('/').next().unwrap();
            ip(&["-n", &ns, "-6", "route", "add", "default", "via", via, "dev", "eth0"]);
        }
        for &port in ports {
            serve_hello(Some(ns.clone()), port, stop.clone(), &mut host.threads);
        }
        host
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

/// A "hello" listener on every address of the host itself (its own namespace).
struct HostListener {
    port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HostListener {
    fn new() -> HostListener {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let port = serve_hello(None, 0, stop.clone(), &mut threads);
        HostListener { port, stop, threads }
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Whether the host (not a VM) gets "hello" from `addr` ("ip:port", "[ip6]:port") within 3 s.
fn host_gets_hello(addr: &str) -> bool {
    use std::io::Read;
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).is_ok() && &buf == b"hello\n"
}

/// Whether the host reaches a guest at `ip`: a TCP connection to a closed port is refused by the
/// guest's kernel (the host has no `ping`; nothing in our rules rejects, they drop).
fn host_reaches(ip: &str) -> bool {
    let addr = std::net::SocketAddr::new(ip.parse().unwrap(), 9);
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
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
    let (_, desc) = d.get(&routes::vm(&hostname)).await;
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
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
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
    let (_, v) = d.get(&routes::vm(&a)).await;
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
    let (_, v) = d.get(&routes::vm(&c)).await;
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
            &routes::group_nodes("iso"),
            r#"{"network":{"drop":["10.0.0.0/99"]}}"#,
        )
        .await;
    assert_eq!(s, 400);

    for h in [&a, &b, &c, &e] {
        let (s, _) = d.send_json(Method::DELETE, &routes::group_node("iso", h), "").await;
        assert_eq!(s, 200);
    }
    d.stop().await;
    assert_eq!(ours_left("iso", &[&a, &b, &c, &e], &[]), Vec::<String>::new());
    drop((lan, inet));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn bridge_mode_vms_reach_each_other_but_not_the_host() {
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
    assert!(pings(&d, &b, &a_ip).await, "bridge VMs should reach each other");
    assert!(
        !pings(&d, &b, "198.19.77.1").await,
        "a bridge VM reached its gateway on the host"
    );
    let host = HostListener::new();
    assert!(
        !reaches(&d, &a, "198.19.77.1", host.port).await,
        "a bridge VM opened a TCP connection to the host"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ok = false;
    while !ok && Instant::now() < deadline {
        ok = host_reaches(&a_ip);
    }
    assert!(ok, "the host should reach a bridge VM");
    d.stop().await;
    assert_eq!(
        ours_left("nett", &[], &["brnett0", "netttap2", "netttap3"]),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
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

/// The host side of an isolated VM's /30: the address before the guest's.
fn gateway_of(guest_ip: &str) -> String {
    let ip: std::net::Ipv4Addr = guest_ip.parse().unwrap();
    std::net::Ipv4Addr::from(u32::from(ip) - 1).to_string()
}

/// Deletes the VMs (each answer 200).
async fn delete_all(d: &TestDaemon, vms: &[(&str, &str)]) {
    for (group, h) in vms {
        let (s, v) = d.send_json(Method::DELETE, &routes::group_node(group, h), "").await;
        assert_eq!(s, 200, "deleting {h}: {v}");
    }
}

/// Which of `targets` ("addr:port") answer "hello" to the VM, tried at once (3 s each).
async fn reached(d: &TestDaemon, vm: &str, targets: &[&str]) -> Vec<String> {
    let tries: String = targets
        .iter()
        .map(|t| {
            let (addr, port) = t.split_once(':').unwrap();
            format!(
                "(timeout 3 bash -c 'exec 3<>/dev/tcp/{addr}/{port}; head -n1 <&3' 2>/dev/null | grep -q hello && echo {t}) & "
            )
        })
        .collect();
    let (_, out) = sh(d, vm, &format!("{tries}wait")).await;
    let mut r: Vec<String> = out.split_whitespace().map(str::to_string).collect();
    r.sort();
    r
}

/// Cloud metadata stand-ins at their real addresses, each in a namespace of its own (host side,
/// namespace side): AWS/GCP/Azure/... 169.254.169.254, Alibaba 100.100.100.200, the Azure wire
/// server 168.63.129.16, Tencent 169.254.0.23, ECS task metadata 169.254.170.2.
const METADATA_HOSTS: [(&str, &str, &str); 5] = [
    ("md", "169.254.169.253/30", "169.254.169.254/30"),
    ("mdali", "100.100.100.201/31", "100.100.100.200/31"),
    ("mdazw", "168.63.129.17/31", "168.63.129.16/31"),
    ("mdtcn", "169.254.0.22/31", "169.254.0.23/31"),
    ("mdecs", "169.254.170.3/31", "169.254.170.2/31"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn metadata_address_is_unreachable_unless_an_allow_entry_names_it() {
    // Stand-ins for the metadata services, routed from the host like any test host.
    let hosts: Vec<TestHost> = METADATA_HOSTS
        .iter()
        .map(|(name, h, n)| TestHost::with_addrs(name, (h, n), None, &[80]))
        .collect();
    let targets: Vec<String> = METADATA_HOSTS
        .iter()
        .map(|(_, _, n)| format!("{}:80", n.split('/').next().unwrap()))
        .collect();
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let web = TestHost::new("mdweb", "198.18.3", &[8080]);
    let mut d = TestDaemon::start(|port| {
        format!(
            "config:\n  host_groups:\n  - name: mdiso\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: isolated\n      range: 169.254.208.0/22\n      allow: [\"0.0.0.0/0\"]\n  - name: mdbr\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: bridge\n      bridge: brmd0\n      tap_prefix: mdtap\n      gateway: 198.19.80.1/24\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    // The host itself reaches every stand-in: the routes are right.
    for t in &targets {
        assert!(host_gets_hello(t), "the host cannot reach {t}");
    }

    // allow: 0.0.0.0/0 (the isolated group's) opens none of them, no list (the bridge group)
    // neither.
    let (a, _) = create(&d, "mdiso", json!({})).await;
    let (b, _) = create(&d, "mdbr", json!({})).await;
    for vm in [&a, &b] {
        assert!(
            reaches(&d, vm, "198.18.3.2", 8080).await,
            "{vm}: the test host is unreachable"
        );
        assert_eq!(
            reached(&d, vm, &targets).await,
            Vec::<String>::new(),
            "{vm} reached metadata"
        );
        assert!(
            !pings(&d, vm, "169.254.169.254").await,
            "{vm} pinged the metadata address"
        );
    }
    // An allow entry naming one opens that one (isolated mode's per-VM override), not the others.
    let (c, _) = create(
        &d,
        "mdiso",
        json!({"network": {"allow": ["0.0.0.0/0", "169.254.169.254/32", "100.100.100.200:80"]}}),
    )
    .await;
    assert_eq!(
        reached(&d, &c, &targets).await,
        ["100.100.100.200:80", "169.254.169.254:80"],
        "explicit allow entries did not open exactly their addresses"
    );
    assert!(reaches(&d, &c, "198.18.3.2", 8080).await);

    delete_all(&d, &[("mdiso", &a), ("mdbr", &b), ("mdiso", &c)]).await;
    d.stop().await;
    assert_eq!(ours_left("mdiso", &[&a, &c], &[]), Vec::<String>::new());
    assert_eq!(ours_left("mdbr", &[], &["brmd0", "mdtap2"]), Vec::<String>::new());
    drop((hosts, web));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn no_host_address_answers_a_vm_unless_named() {
    let host = HostListener::new();
    // The host gets 198.18.4.1 on this test host's link: "a host address on another interface".
    let other = TestHost::new("hostad", "198.18.4", &[8080]);
    // Broad allow entries that contain host addresses must not open the host (isolated mode;
    // the config takes no lists for bridge groups, whose VMs must not reach the host either).
    let mut d = TestDaemon::start(|port| {
        format!(
            "config:\n  host_groups:\n  - name: hiso\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: isolated\n      range: 169.254.212.0/22\n      allow: [\"0.0.0.0/0\", \"198.18.0.0/15\", \"169.254.0.0/16\"]\n  - name: hbr\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: bridge\n      bridge: brhb0\n      tap_prefix: hbtap\n      gateway: 198.19.81.1/24\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    let p = host.port;
    let (a, a_ip) = create(&d, "hiso", json!({})).await;
    let (b, b_ip) = create(&d, "hbr", json!({})).await;
    let a_gw = gateway_of(&a_ip);
    assert_eq!(a_gw, "169.254.212.1");
    for (vm, gw) in [(&a, a_gw.as_str()), (&b, "198.19.81.1")] {
        assert!(
            reaches(&d, vm, "198.18.4.2", 8080).await,
            "{vm}: the test host is unreachable"
        );
        for addr in [gw, "198.18.4.1"] {
            assert!(
                !reaches(&d, vm, addr, p).await,
                "{vm} opened a TCP connection to {addr}"
            );
            assert!(!pings(&d, vm, addr).await, "{vm} pinged the host at {addr}");
        }
    }
    // The host still reaches a bridge VM (its own connections; the replies pass).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ok = false;
    while !ok && Instant::now() < deadline {
        ok = host_reaches(&b_ip);
    }
    assert!(ok, "the host should reach a bridge VM");

    // An entry naming one host address opens that address, and only it.
    let (c, c_ip) = create(&d, "hiso", json!({"network": {"allow": ["198.18.4.1/32"]}})).await;
    assert!(
        reaches(&d, &c, "198.18.4.1", p).await,
        "an allow entry for 198.18.4.1 did not open it"
    );
    let c_gw = gateway_of(&c_ip);
    assert!(!reaches(&d, &c, &c_gw, p).await, "{c} reached its gateway {c_gw}");
    assert!(
        !reaches(&d, &c, "198.18.4.2", 8080).await,
        "only-allow lists drop the rest"
    );

    delete_all(&d, &[("hiso", &a), ("hbr", &b), ("hiso", &c)]).await;
    d.stop().await;
    assert_eq!(ours_left("hiso", &[&a, &c], &[]), Vec::<String>::new());
    assert_eq!(ours_left("hbr", &[], &["brhb0", "hbtap2"]), Vec::<String>::new());
    drop(other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn bridge_vms_cannot_reach_other_groups_vms() {
    let lan = TestHost::new("brlan", "198.18.5", &[8080]);
    let mut d = TestDaemon::start(|port| {
        format!(
            "config:\n  host_groups:\n  - name: bra\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: bridge\n      bridge: brbra0\n      tap_prefix: bratap\n      gateway: 198.19.82.1/24\n  - name: brb\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: bridge\n      bridge: brbrb0\n      tap_prefix: brbtap\n      gateway: 198.19.83.1/24\n  - name: bri\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: isolated\n      range: 169.254.216.0/22\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    let (a1, a1_ip) = create(&d, "bra", json!({})).await;
    let (a2, a2_ip) = create(&d, "bra", json!({})).await;
    let (b1, b1_ip) = create(&d, "brb", json!({})).await;
    let (i1, i1_ip) = create(&d, "bri", json!({})).await;
    assert_eq!((a1_ip.as_str(), b1_ip.as_str()), ("198.19.82.2", "198.19.83.2"));

    // The same group: reachable.
    assert!(
        pings(&d, &a1, &a2_ip).await,
        "VMs of one bridge group should reach each other"
    );
    // Other groups, bridge or isolated, in both directions: not.
    for (from, to) in [
        (&a1, &b1_ip),
        (&b1, &a1_ip),
        (&a1, &i1_ip),
        (&i1, &a1_ip),
        (&b1, &i1_ip),
        (&i1, &b1_ip),
    ] {
        assert!(!pings(&d, from, to).await, "{from} reached {to} of another group");
    }
    // Shut in, not cut off: all of them still reach a test host through NAT.
    for vm in [&a1, &b1, &i1] {
        assert!(
            reaches(&d, vm, "198.18.5.2", 8080).await,
            "{vm} cannot reach the test host"
        );
    }

    delete_all(&d, &[("bra", &a1), ("bra", &a2), ("brb", &b1), ("bri", &i1)]).await;
    d.stop().await;
    assert_eq!(
        ours_left("bra", &[], &["brbra0", "bratap2", "bratap3"]),
        Vec::<String>::new()
    );
    assert_eq!(ours_left("brb", &[], &["brbrb0", "brbtap2"]), Vec::<String>::new());
    assert_eq!(ours_left("bri", &[&i1], &[]), Vec::<String>::new());
    drop(lan);
}

/// Turns the host's IPv6 forwarding on while it lives (so a guest's IPv6 would be forwarded
/// if nftables let it), restoring the previous value after.
struct Ipv6Forwarding(String);

const V6_FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

impl Ipv6Forwarding {
    fn on() -> Ipv6Forwarding {
        let prev = std::fs::read_to_string(V6_FORWARDING).unwrap();
        std::fs::write(V6_FORWARDING, "1").unwrap();
        Ipv6Forwarding(prev.trim().to_string())
    }
}

impl Drop for Ipv6Forwarding {
    fn drop(&mut self) {
        let _ = std::fs::write(V6_FORWARDING, &self.0);
    }
}

fn sysctl_v6(ifname: &str, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{ifname}/{key}"))
        .unwrap()
        .trim()
        .to_string()
}

/// The packet count of the first rule of `chain` in `table` containing `needle`.
fn nft_counter(table: &str, chain: &str, needle: &str) -> u64 {
    let out = Command::new("nft")
        .args(["list", "chain", "inet", table, chain])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(needle) && l.contains("counter packets"))
        .unwrap_or_else(|| panic!("no rule with {needle:?} in {table} {chain}:\n{text}"));
    line.split("counter packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// Gives a host-side interface IPv6 again (the daemon turned it off) with `addr`, and the
/// guest `vm` an address in the same /64 with static neighbours for the interface's addresses,
/// so that the guest really sends IPv6 to the host: then only nftables stands in the way.
/// Returns the interface's link-local address.
async fn open_ipv6_path(d: &TestDaemon, vm: &str, ifname: &str, host_addr: &str, guest_addr: &str) -> String {
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad"), "0").unwrap();
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"), "0").unwrap();
    ip(&["-6", "addr", "add", &format!("{host_addr}/64"), "dev", ifname, "nodad"]);
    let mac = std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))
        .unwrap()
        .trim()
        .to_string();
    let out = Command::new("ip")
        .args(["-6", "-o", "addr", "show", "dev", ifname, "scope", "link"])
        .output()
        .unwrap();
    let ll = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{ifname} has no link-local address"));
    let (code, out) = sh(
        d,
        vm,
        &format!(
            "ip -6 addr add {guest_addr}/64 dev eth0 nodad && \
             ip -6 neigh replace {host_addr} lladdr {mac} dev eth0 nud permanent && \
             ip -6 neigh replace {ll} lladdr {mac} dev eth0 nud permanent && \
             ip -6 route replace default via {host_addr} dev eth0 && ip -6 addr show dev eth0"
        ),
    )
    .await;
    assert_eq!(code, 0, "configuring IPv6 in {vm}: {out}");
    ll
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn guest_ipv6_is_dropped() {
    let v6host = TestHost::with_addrs(
        "v6",
        ("198.18.6.1/24", "198.18.6.2/24"),
        Some(("fdec:18:6::1/64", "fdec:18:6::2/64")),
        &[8080],
    );
    let _fwd = Ipv6Forwarding::on();
    let mut d = TestDaemon::start(|port| {
        format!(
            "config:\n  host_groups:\n  - name: v6iso\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: isolated\n      range: 169.254.220.0/22\n      allow: [\"0.0.0.0/0\"]\n  - name: v6br\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: bridge\n      bridge: brv6b0\n      tap_prefix: v6btap\n      gateway: 198.19.84.1/24\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    // The IPv6 test host answers the host itself.
    assert!(host_gets_hello("[fdec:18:6::2]:8080"));

    let (a, _) = create(&d, "v6iso", json!({})).await;
    let (b, _) = create(&d, "v6br", json!({})).await;
    let veth = format!("slh{}", slicer_net::short_id(&a));
    // IPv6 is off on the host side of both VMs' links: no address there at all.
    for ifname in [veth.as_str(), "brv6b0", "v6btap2"] {
        assert_eq!(sysctl_v6(ifname, "disable_ipv6"), "1", "IPv6 is on on {ifname}");
    }
    let out = Command::new("ip")
        .args(["-6", "addr", "show", "dev", &veth])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "{veth} has IPv6 addresses"
    );
    // IPv4 still works.
    assert!(pings(&d, &a, "198.18.6.2").await);
    assert!(pings(&d, &b, "198.18.6.2").await);

    // Even with IPv6 turned back on at the host side and the guests sending IPv6 straight to
    // it, nftables drops it: to the test host (forward), to the host's address and to the
    // host side's link-local one (input). A bridge VM's frames go no further than the bridge
    // table, which passes only IPv4 and ARP.
    let cases = [
        (&a, veth.clone(), format!("slicer-{a}"), "fdec:18:7::1", "fdec:18:7::2"),
        (
            &b,
            "brv6b0".to_string(),
            "slicer-br-v6br".to_string(),
            "fdec:18:8::1",
            "fdec:18:8::2",
        ),
    ];
    for (vm, ifname, table, host_addr, guest_addr) in cases {
        let ll = open_ipv6_path(&d, vm, &ifname, host_addr, guest_addr).await;
        let bridged = vm == &b;
        let bridge_drops = || nft_counter_in("bridge", &table, "prerouting", "drop");
        let br_before = if bridged { bridge_drops() } else { 0 };
        let fwd_before = nft_counter(&table, "forward", "meta nfproto ipv6");
        let in_before = nft_counter(&table, "input", "meta nfproto ipv6");
        assert!(!pings(&d, vm, "-6 fdec:18:6::2").await, "{vm} sent IPv6 out");
        assert!(
            !pings(&d, vm, &format!("-6 {host_addr}")).await,
            "{vm} reached the host over IPv6"
        );
        assert!(
            !pings(&d, vm, &format!("-6 {ll}%eth0")).await,
            "{vm} reached {ifname}'s link-local"
        );
        let fwd_after = nft_counter(&table, "forward", "meta nfproto ipv6");
        let in_after = nft_counter(&table, "input", "meta nfproto ipv6");
        if bridged {
            let seen = bridge_drops() - br_before;
            assert!(seen >= 3, "{vm}: the bridge table dropped {seen} frames");
            assert_eq!(
                (fwd_after, in_after),
                (fwd_before, in_before),
                "{vm}: IPv6 got past the bridge"
            );
            continue;
        }
        assert!(fwd_after > fwd_before, "{vm}: the forward IPv6 drop saw nothing");
        assert!(
            in_after >= in_before + 2,
            "{vm}: the input IPv6 drop saw {}",
            in_after - in_before
        );
    }

    delete_all(&d, &[("v6iso", &a), ("v6br", &b)]).await;
    d.stop().await;
    assert_eq!(ours_left("v6iso", &[&a], &[]), Vec::<String>::new());
    assert_eq!(ours_left("v6br", &[], &["brv6b0", "v6btap2"]), Vec::<String>::new());
    drop(v6host);
}

/// Writes `text` to `path` in the VM (a heredoc; `text` must not hold the line `SLICER_EOF`).
async fn write_file(d: &TestDaemon, vm: &str, path: &str, text: &str) {
    let (code, out) = sh(d, vm, &format!("cat > {path} <<'SLICER_EOF'\n{text}\nSLICER_EOF")).await;
    assert_eq!(code, 0, "writing {path} in {vm}: {out}");
}

/// A guest-side raw frame receiver (perl, which every image has): counts frames on eth0 that
/// carry `SLFORGE` or `SLLEGIT` until one carries `SLEND` or 30 s pass; writes
/// `forge=N legit=M end=E` to /tmp/rx.out. /tmp/rx.ready appears once it listens.
const RX_PL: &str = r#"use strict;
my $idx = `cat /sys/class/net/eth0/ifindex`; chomp $idx;
socket(my $s, 17, 3, unpack("S", pack("n", 3))) or die "socket: $!";
bind($s, pack("S n i S C C a8", 17, 3, $idx, 0, 0, 0, "")) or die "bind: $!";
open(my $r, ">", "/tmp/rx.ready"); close $r;
my ($forge, $legit, $end) = (0, 0, 0);
my $deadline = time + 30;
while (!$end && time < $deadline) {
    my $rin = ""; vec($rin, fileno($s), 1) = 1;
    next unless select(my $rout = $rin, undef, undef, 0.5);
    defined(recv($s, my $buf, 4096, 0)) or next;
    $forge++ if index($buf, "SLFORGE") >= 0;
    $legit++ if index($buf, "SLLEGIT") >= 0;
    $end = 1 if index($buf, "SLEND") >= 0;
}
open(my $o, ">", "/tmp/rx.tmp"); print $o "forge=$forge legit=$legit end=$end\n"; close $o;
rename "/tmp/rx.tmp", "/tmp/rx.out";
"#;

/// A guest-side raw frame sender: `perl tx.pl MYMAC MYIP GATEWAY NEIGHBOUR` sends, from eth0,
/// 20 frames of each forgery (marked `SLFORGE`), then legitimate ones (`SLLEGIT`), then `SLEND`.
const TX_PL: &str = r#"use strict;
my ($me, $myip, $gw, $nb) = @ARGV;
my $idx = `cat /sys/class/net/eth0/ifindex`; chomp $idx;
socket(my $s, 17, 3, 0) or die "socket: $!";
sub mac { pack("H12", join("", split(/:/, $_[0]))) }
sub ip4 { pack("C4", split(/\./, $_[0])) }
my $bc = "ff:ff:ff:ff:ff:ff";
my $fake = "02:5e:ed:00:00:01";
sub send_frame {
    my ($type, $frame) = @_;
    my $to = pack("S n i S C C a8", 17, $type, $idx, 1, 0, 6, mac($bc));
    send($s, $frame, 0, $to) or die "send: $!";
}
# An ARP reply (gratuitous: target = sender) from Ethernet source $esrc claiming $spa is at $sha.
sub arp {
    my ($esrc, $sha, $spa, $mark) = @_;
    send_frame(0x0806, mac($bc) . mac($esrc) . pack("n", 0x0806)
        . pack("n n C C n", 1, 0x0800, 6, 4, 2) . mac($sha) . ip4($spa) . mac($bc) . ip4($spa) . $mark);
}
sub csum {
    my $sum = 0;
    $sum += $_ for unpack("n*", $_[0]);
    $sum = ($sum & 0xffff) + ($sum >> 16) while $sum >> 16;
    return ~$sum & 0xffff;
}
# A UDP datagram to $dst:9 from Ethernet source $esrc and IPv4 source $src.
sub udp {
    my ($esrc, $src, $dst, $mark) = @_;
    my $udp = pack("n n n n", 40000, 9, 8 + length($mark), 0) . $mark;
    my $h = pack("C C n n n C C n", 0x45, 0, 20 + length($udp), 1, 0, 64, 17, 0) . ip4($src) . ip4($dst);
    substr($h, 10, 2) = pack("n", csum($h));
    send_frame(0x0800, mac($bc) . mac($esrc) . pack("n", 0x0800) . $h . $udp);
}
for (1 .. 20) {
    arp($fake, $fake, $gw, "SLFORGE");   # a forged MAC claiming the gateway's address
    arp($me, $me, $gw, "SLFORGE");       # the VM's own MAC claiming the gateway's address
    arp($me, $me, $nb, "SLFORGE");       # ... claiming the neighbour's address
    arp($fake, $me, $myip, "SLFORGE");   # a forged Ethernet source
    arp($me, $fake, $myip, "SLFORGE");   # a forged ARP sender MAC
    udp($fake, $myip, $nb, "SLFORGE");   # IPv4 from a forged MAC
    udp($me, $gw, $nb, "SLFORGE");       # IPv4 from the gateway's address
    udp($me, $nb, $nb, "SLFORGE");       # ... from the neighbour's
}
for (1 .. 5) {
    arp($me, $me, $myip, "SLLEGIT");
    udp($me, $myip, $nb, "SLLEGIT");
}
select(undef, undef, undef, 0.2);
udp($me, $myip, $nb, "SLEND") for 1 .. 3;
print "sent\n";
"#;

/// The packet count of the first rule of `chain` in the `family` table `table` containing
/// `needle`.
fn nft_counter_in(family: &str, table: &str, chain: &str, needle: &str) -> u64 {
    let out = Command::new("nft")
        .args(["list", "chain", family, table, chain])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(needle) && l.contains("counter packets"))
        .unwrap_or_else(|| panic!("no rule with {needle:?} in {family} {table} {chain}:\n{text}"));
    line.split("counter packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// Polls a shell line in the VM until it exits 0 (deadline `secs`); its last output.
async fn wait_in(d: &TestDaemon, vm: &str, line: &str, secs: u64) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (code, out) = sh(d, vm, line).await;
        if code == 0 {
            return Some(out);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn bridge_vms_cannot_forge_mac_arp_or_source_address() {
    let mut d = TestDaemon::start(|port| {
        format!(
            "config:\n  host_groups:\n  - name: spf\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: bridge\n      bridge: brspf0\n      tap_prefix: spftap\n      gateway: 198.19.85.1/24\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    let (a, a_ip) = create(&d, "spf", json!({})).await;
    let (b, b_ip) = create(&d, "spf", json!({})).await;
    let a_mac = slicer_net::mac_for(&a);
    let b_mac = slicer_net::mac_for(&b);
    // Restored VMs carry the MAC their identity gave them: the one pinned.
    let (_, out) = sh(&d, &a, "cat /sys/class/net/eth0/address").await;
    assert_eq!(out.trim(), a_mac);
    // The host learns B's real MAC.
    assert!(pings(&d, &b, &a_ip).await, "bridge VMs should reach each other");

    write_file(&d, &b, "/tmp/rx.pl", RX_PL).await;
    write_file(&d, &a, "/tmp/tx.pl", TX_PL).await;
    let (code, out) = sh(
        &d,
        &b,
        "rm -f /tmp/rx.ready /tmp/rx.out; setsid perl /tmp/rx.pl </dev/null >/tmp/rx.log 2>&1 &",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        wait_in(&d, &b, "test -e /tmp/rx.ready", 15).await.is_some(),
        "the receiver did not start"
    );
    let (code, out) = sh(
        &d,
        &a,
        &format!("perl /tmp/tx.pl {a_mac} {a_ip} 198.19.85.1 {b_ip} 2>&1"),
    )
    .await;
    assert_eq!((code, out.trim()), (0, "sent"));
    let rx = wait_in(&d, &b, "cat /tmp/rx.out", 40)
        .await
        .unwrap_or_else(|| panic!("no result from the receiver"));
    eprintln!("neighbour received: {}", rx.trim());
    // The legitimate frames arrive (the receiver works), the 160 forged ones do not.
    assert!(rx.contains(" end=1") && !rx.contains("legit=0"), "{rx}");
    assert!(rx.starts_with("forge=0 "), "the neighbour received forged frames: {rx}");
    let dropped = nft_counter_in("bridge", "slicer-br-spf", "prerouting", "drop");
    eprintln!("bridge table drops: {dropped}");
    assert!(dropped >= 160, "{dropped}");
    // The host's neighbour entry for B still names B's MAC (if it has one).
    let out = Command::new("ip")
        .args(["neigh", "show", &b_ip, "dev", "brspf0"])
        .output()
        .unwrap();
    let neigh = String::from_utf8_lossy(&out.stdout);
    assert!(!neigh.contains(&a_mac) && !neigh.contains("02:5e:ed"), "{neigh}");
    if neigh.contains("lladdr") {
        assert!(neigh.contains(&b_mac), "{neigh}");
    }
    // And the group still works.
    assert!(pings(&d, &a, &b_ip).await, "bridge VMs should reach each other");

    delete_all(&d, &[("spf", &a), ("spf", &b)]).await;
    d.stop().await;
    assert_eq!(
        ours_left("spf", &[], &["brspf0", "spftap2", "spftap3"]),
        Vec::<String>::new()
    );
}

/// Entries of the host's connection tracking table whose original source is `ip`.
fn conntrack_from(ip: &str) -> usize {
    let text = std::fs::read_to_string("/proc/net/nf_conntrack").unwrap_or_default();
    let want = format!("src={ip}");
    // The original direction's source is the first src= of a line.
    text.lines()
        .filter(|l| l.split_whitespace().find(|w| w.starts_with("src=")) == Some(want.as_str()))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn one_vm_cannot_fill_the_hosts_connection_table() {
    let target = TestHost::new("ct", "198.18.9", &[8080]);
    let mut d = TestDaemon::start(|port| {
        format!(
            "config:\n  host_groups:\n  - name: ctiso\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: isolated\n      range: 169.254.228.0/22\n  - name: ctbr\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    network:\n      mode: bridge\n      bridge: brct0\n      tap_prefix: cttap\n      gateway: 198.19.86.1/24\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
        )
    })
    .await;
    let (i1, i1_ip) = create(&d, "ctiso", json!({})).await;
    let (i2, _) = create(&d, "ctiso", json!({})).await;
    let (b1, b1_ip) = create(&d, "ctbr", json!({})).await;
    let (b2, _) = create(&d, "ctbr", json!({})).await;
    let limit = slicer_net::CONNTRACK_PER_VM as usize;
    // Each sprayer sends one UDP datagram to each of `flows` ports of the test host (a flow
    // each), 150 every 0.1 s: paced past the new-connection rate limit, so that more than the
    // limit get counted.
    let flows = 90 * 150;
    let spray = "ping -c1 -W2 198.18.9.2 >/dev/null; perl -MSocket -e 'socket(S, PF_INET, SOCK_DGRAM, 0) or die; \
         my $a = inet_aton(\"198.18.9.2\"); my $n = 0; \
         for my $b (0 .. 89) { for my $p (1 .. 150) { $n++ if send(S, \"x\", 0, pack_sockaddr_in(10000 + 150 * $b + $p, $a)) } \
         select(undef, undef, undef, 0.1) } print \"$n\\n\"'";
    let (r1, r2) = tokio::join!(sh(&d, &i1, spray), sh(&d, &b1, spray));
    for (vm, (code, out)) in [(&i1, r1), (&b1, r2)] {
        assert_eq!((code, out.trim()), (0, flows.to_string().as_str()), "{vm} spraying");
    }
    // What the host tracks for each sprayer stays at the limit (the UDP flows stay for 30 s).
    for (vm, ip, table) in [
        (&i1, &i1_ip, format!("slicer-{i1}")),
        (&b1, &b1_ip, "slicer-br-ctbr".to_string()),
    ] {
        let tracked = conntrack_from(ip);
        eprintln!("{vm}: {flows} flows sent, {tracked} tracked");
        assert!(tracked <= limit + 16, "{vm}: {tracked} connections tracked");
        let rated = nft_counter_in("inet", &table, "forward", "limit rate over");
        let counted = nft_counter_in("inet", &table, "forward", "ct count over");
        eprintln!("{vm}: dropped {rated} by the rate limit, {counted} by the count");
        assert!(counted > 0, "{vm}: the spray never reached the limit");
    }
    // The other VMs, of the same bridge group too, still open new connections.
    for vm in [&i2, &b2] {
        assert!(
            reaches(&d, vm, "198.18.9.2", 8080).await,
            "{vm} cannot open a connection while a neighbour sprays"
        );
    }

    delete_all(&d, &[("ctiso", &i1), ("ctiso", &i2), ("ctbr", &b1), ("ctbr", &b2)]).await;
    d.stop().await;
    assert_eq!(ours_left("ctiso", &[&i1, &i2], &[]), Vec::<String>::new());
    assert_eq!(
        ours_left("ctbr", &[], &["brct0", "cttap2", "cttap3"]),
        Vec::<String>::new()
    );
    drop(target);
}
