//! Starting a real proxy process (it drops root, so it must be its own process), network
//! namespaces with an echo server, and small blocking clients. Everything is cleaned up by
//! `Drop`, also when a test fails.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use slicer_api::ProxyAllowRule;
use slicer_proxy::control::{ProxyState, StateClient};
use slicer_proxy::server::UpOptions;

pub const TOKEN: &str = "spt_integration_token";
pub const CLIENT: &str = "c1";

static SEQ: AtomicU32 = AtomicU32::new(1);

pub fn seq() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Polls `f` until it is `Some` or `within` passes.
pub fn wait_for<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn rule(host: &str, ports: &[u16], passthrough: bool) -> ProxyAllowRule {
    ProxyAllowRule {
        host: host.into(),
        ports: ports.to_vec(),
        passthrough,
        ..Default::default()
    }
}

pub fn state(generation: u64, rules: Vec<ProxyAllowRule>) -> ProxyState {
    ProxyState {
        generation,
        clients: vec![StateClient {
            name: CLIENT.into(),
            token_sha256: vec![slicer_proxy::rules::token_hash(TOKEN)],
            rules,
        }],
        ..Default::default()
    }
}

/// A loopback address no other test of this process uses (all of 127/8 is on `lo`).
pub fn loopback_bind() -> IpAddr {
    let n = seq();
    IpAddr::V4(Ipv4Addr::new(127, 77, (std::process::id() % 250) as u8, n as u8))
}

/// A running proxy process.
pub struct Proxy {
    pub child: Child,
    pub bind: IpAddr,
    pub group: String,
    pub base: tempfile::TempDir,
    pub data: tempfile::TempDir,
    pub log: Arc<Mutex<Vec<String>>>,
}

pub struct Setup {
    pub opts: UpOptions,
    pub state: Option<ProxyState>,
    pub hosts: Vec<(String, IpAddr)>,
    pub base: tempfile::TempDir,
    pub data: tempfile::TempDir,
}

impl Setup {
    pub fn new(bind: &str) -> Setup {
        let base = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let group = format!("t{}x{}", std::process::id(), seq());
        slicer_proxy::ca::GroupCa::init(&slicer_proxy::ca::ca_dir(base.path(), &group), &group, false).unwrap();
        Setup {
            opts: UpOptions {
                group,
                bind: bind.into(),
                deny_cidrs: vec![],
                mode: Default::default(),
                data_dir: data.path().to_path_buf(),
                base_dir: base.path().to_path_buf(),
                hosts_file: None,
                upstream_ca: None,
                max_connections: 4096,
            },
            state: None,
            hosts: vec![],
            base,
            data,
        }
    }

    /// Writes the state file and hosts file, starts the proxy and waits until it answers.
    pub fn start(mut self) -> Proxy {
        if let Some(s) = &self.state {
            let dir = slicer_proxy::control::proxy_dir(self.data.path());
            slicer_proxy::ca::make_private_dir(&dir).unwrap();
            let path = slicer_proxy::control::state_file(self.data.path());
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .unwrap()
                .write_all(&serde_json::to_vec(s).unwrap())
                .unwrap();
        }
        if !self.hosts.is_empty() {
            let p = self.base.path().join("hosts");
            let text: String = self.hosts.iter().map(|(n, ip)| format!("{n} {ip}\n")).collect();
            std::fs::write(&p, text).unwrap();
            self.opts.hosts_file = Some(p);
        }
        let bind: IpAddr = self.opts.bind.split('/').next().unwrap().parse().unwrap();
        let (child, log) = spawn(&self.opts);
        let mut p = Proxy {
            child,
            bind,
            group: self.opts.group.clone(),
            base: self.base,
            data: self.data,
            log,
        };
        wait_for(Duration::from_secs(30), "the proxy to listen", || {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("proxy exited with {st}: {}", p.log.lock().unwrap().join("\n"));
            }
            p.log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(" listening on "))
                .then_some(())
        });
        wait_for(Duration::from_secs(10), "the proxy's port", || {
            TcpStream::connect_timeout(&SocketAddr::new(bind, 3128), Duration::from_secs(1)).ok()
        });
        p
    }
}

/// Starts the proxy program; its stderr lines are collected.
pub fn spawn(opts: &UpOptions) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_slicer-proxy-up"))
        .arg(serde_json::to_string(opts).unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let l = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("[proxy] {line}");
            l.lock().unwrap().push(line);
        }
    });
    (child, log)
}

impl Proxy {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.bind, port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line containing every one of `parts`.
    pub fn wait_log(&self, parts: &[&str]) -> String {
        wait_for(Duration::from_secs(15), &format!("a log line with {parts:?}"), || {
            self.log
                .lock()
                .unwrap()
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .cloned()
        })
    }

    pub fn status_field(&self, field: &str) -> String {
        proc_field(self.pid(), field)
    }
}

pub fn proc_field(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in status"))
        .trim()
        .to_string()
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn basic(token: &str) -> String {
    format!(
        "Proxy-Authorization: Basic {}\r\n",
        base64::engine::general_purpose::STANDARD.encode(format!("proxy:{token}"))
    )
}

pub fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Reads a response head (up to the blank line) from `s`.
pub fn read_head(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Sends `head` on a new connection and returns the answer's head.
pub fn ask(addr: SocketAddr, head: &str) -> String {
    let mut s = client(addr);
    s.write_all(head.as_bytes()).unwrap();
    read_head(&mut s)
}

pub fn connect_head(target: &str, token: Option<&str>) -> String {
    format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{}\r\n",
        token.map(basic).unwrap_or_default()
    )
}

/// A CONNECT through the proxy; the stream after the 200, or the answer when it is not 200.
pub fn tunnel(addr: SocketAddr, target: &str) -> Result<TcpStream, String> {
    let mut s = client(addr);
    s.write_all(connect_head(target, Some(TOKEN)).as_bytes()).unwrap();
    let head = read_head(&mut s);
    if head.starts_with("HTTP/1.1 200") {
        Ok(s)
    } else {
        Err(head)
    }
}

/// Writes `msg` and reads the same number of bytes back.
pub fn echo_roundtrip(s: &mut (impl Read + Write), msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A network namespace joined to the host by a veth pair: host side `10.201.N.1/24`, namespace
/// side `10.201.N.2/24`. Dropping it removes both.
pub struct Netns {
    pub name: String,
    pub veth: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

impl Netns {
    pub fn new() -> Netns {
        let n = seq();
        let tag = (std::process::id() % 10000) * 10 + n % 10;
        let third = ((std::process::id() * 7 + n * 13) % 250) as u8 + 1;
        let ns = Netns {
            name: format!("slpt{tag}"),
            veth: format!("slpv{tag}"),
            host_ip: Ipv4Addr::new(10, 201, third, 1),
            ns_ip: Ipv4Addr::new(10, 201, third, 2),
        };
        let _ = ip(&["netns", "del", &ns.name]);
        let _ = ip(&["link", "del", &ns.veth]);
        let peer = format!("{}p", ns.veth);
        for args in [
            vec!["netns", "add", &ns.name],
            vec!["link", "add", &ns.veth, "type", "veth", "peer", "name", &peer],
            vec!["link", "set", &peer, "netns", &ns.name],
        ] {
            ip(&args).unwrap();
        }
        let host_cidr = format!("{}/24", ns.host_ip);
        let ns_cidr = format!("{}/24", ns.ns_ip);
        ip(&["addr", "add", &host_cidr, "dev", &ns.veth]).unwrap();
        ip(&["link", "set", &ns.veth, "up"]).unwrap();
        ip(&["-n", &ns.name, "addr", "add", &ns_cidr, "dev", &peer]).unwrap();
        ip(&["-n", &ns.name, "link", "set", &peer, "up"]).unwrap();
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]).unwrap();
        ns
    }

    /// A TCP echo server inside the namespace (threads; they end with the test process).
    pub fn echo_server(&self) -> SocketAddr {
        let path = format!("/var/run/netns/{}", self.name);
        let ip = self.ns_ip;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only; the fd is valid.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let l = TcpListener::bind((ip, 0)).unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Removes the dummy link the proxy made for a bind address.
pub struct DummyLink(pub String);

impl Drop for DummyLink {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.0]);
    }
}

/// The daemon's side of the control socket, for tests.
pub struct Daemon {
    pub stream: std::os::unix::net::UnixStream,
    reader: BufReader<std::os::unix::net::UnixStream>,
}

impl Daemon {
    pub fn connect(p: &Proxy) -> Daemon {
        let path = slicer_proxy::control::control_socket(p.data.path(), &p.group);
        let stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Daemon { stream, reader }
    }

    pub fn next(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Reads until a message satisfies `f`.
    pub fn until(&mut self, mut f: impl FnMut(&serde_json::Value) -> bool) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            assert!(Instant::now() < end, "no such message from the proxy");
            let v = self.next();
            if f(&v) {
                return v;
            }
        }
    }

    pub fn push(&mut self, s: &ProxyState) {
        let msg = slicer_proxy::control::ToProxy::State { state: s.clone() };
        let mut line = serde_json::to_vec(&msg).unwrap();
        line.push(b'\n');
        self.stream.write_all(&line).unwrap();
        let g = s.generation;
        self.until(|v| v["type"] == "ack" && v["generation"] == g);
    }
}

pub fn data_dir_of(p: &Proxy) -> PathBuf {
    p.data.path().to_path_buf()
}
