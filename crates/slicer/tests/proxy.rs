//! Slicer Proxy end to end, as a user runs it: `slicer up` with an isolated group that may reach
//! nothing but the proxy's two ports, `slicer proxy up` beside it (same working directory), rules
//! made with the CLI, and real guests (the systemd image: curl, python3) going through it to
//! upstreams that live in network namespaces these tests create (198.18.61.0/24, 198.18.62.0/24), with their
//! own test CA (the proxy's extra bundle) and names the proxy resolves through its test-only
//! hosts option. The proxy listens on 198.18.60.1, a dummy adapter it makes itself.

mod common;

use slicer_api::routes;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, free_port, ok, up};
use http::Method;
use serde_json::{json, Value};
use slicer_api::ApiClient;
use slicer_proxy::ca::GroupCa;
use slicer_proxy::testkit::{self, Seen, TestNet};

const BIND: &str = "198.18.60.1";
const GROUP: &str = "px";

fn config(port: u16) -> String {
    format!(
        "config:\n  host_groups:\n  - name: {GROUP}\n    count: 0\n    vcpu: 1\n    ram_gb: 1\n    image: systemd\n    ca:\n      generate: true\n    network:\n      mode: isolated\n      drop: [\"0.0.0.0/0\"]\n      allow: [\"{BIND}:3128\", \"{BIND}:3129\"]\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
    )
}

/// `slicer proxy up` in `dir`, its stderr (the decision log) in `dir/proxy.log`.
struct Proxy {
    child: Option<Child>,
    log: PathBuf,
}

impl Proxy {
    fn start(dir: &Path, mode: &str) -> Proxy {
        let log = dir.join("proxy.log");
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(common::SLICER)
            .args([
                "proxy",
                "up",
                "--hostgroup",
                GROUP,
                "--bind",
                BIND,
                "--mode",
                mode,
                "--data-dir",
            ])
            .arg(dir.join("data"))
            .arg("--hosts-file")
            .arg(dir.join("hosts"))
            .arg("--upstream-ca")
            .arg(dir.join("upstream-ca/ca.crt"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        let mut p = Proxy {
            child: Some(child),
            log,
        };
        p.wait_listening();
        p
    }

    /// Waits until the proxy has given up root and accepts (it binds its ports while still root).
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = format!("/proc/{}/status", self.pid());
        self.poll(deadline, "drop root", || {
            std::fs::read_to_string(&status)
                .is_ok_and(|s| s.lines().any(|l| l.starts_with("Seccomp:") && l.ends_with('2')))
        });
        let addr = format!("{BIND}:3128").parse().unwrap();
        self.poll(deadline, "listen", || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
    }

    /// Polls `ready` until `deadline`, failing at once if the proxy exits.
    fn poll(&mut self, deadline: Instant, what: &str, mut ready: impl FnMut() -> bool) {
        while !ready() {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("slicer proxy up exited ({st}): {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not {what}: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (10 s) for a log line containing every one of `parts`.
    fn wait_line(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.log_text().lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Removes the dummy adapter the proxy made for BIND (whatever its name), however the test ends.
struct AdapterGuard;

impl Drop for AdapterGuard {
    fn drop(&mut self) {
        remove_adapter_of(BIND);
    }
}

/// Upstreams in their namespace: HTTPS on 443 and 8444 (test CA), HTTP on 80, TCP echo on 5432,
/// HTTPS on 8443 with a certificate from another CA (the one the guest pins).
struct Upstreams {
    net: TestNet,
    seen: Arc<Seen>,
    pinned_ca: String,
}

fn upstreams(dir: &Path, name: &str, prefix: &str) -> Upstreams {
    let mut net = TestNet::new(name, prefix).unwrap();
    let ca = GroupCa::init(&dir.join("upstream-ca"), "upstream-test", false).unwrap();
    let names: Vec<String> = ["api.test", "basic.test", "other.test", "wikipedia.org", "echo.test"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let tls = testkit::server_config(&ca, &names).unwrap();
    let pin = GroupCa::init(&dir.join("pinned-ca"), "pinned-test", false).unwrap();
    let pinned = testkit::server_config(&pin, &["pinned.test".to_string()]).unwrap();
    let seen = Arc::new(Seen::default());
    for (port, cfg) in [
        (443, Some(tls.clone())),
        (8444, Some(tls)),
        (80, None),
        (8443, Some(pinned)),
    ] {
        let seen = seen.clone();
        net.spawn(port, move |l, _| testkit::serve_http(l, cfg, seen)).unwrap();
    }
    net.spawn(5432, |l, _| testkit::serve_echo(l)).unwrap();
    Upstreams {
        net,
        seen,
        pinned_ca: pin.cert_pem().to_string(),
    }
}

/// Runs a shell line in the VM as root: (exit code, stdout, stderr).
async fn sh(api: &ApiClient, vm: &str, line: &str) -> (i64, String, String) {
    let q = slicer_api::client::query(&[
        ("cmd", line.to_string()),
        ("buffered", "true".into()),
        ("uid", "0".into()),
    ]);
    let v: Value = api
        .json(Method::POST, &format!("{}?{q}", routes::vm_exec(vm)), None)
        .await
        .unwrap_or_else(|e| panic!("exec {line:?}: {e:#}"));
    (
        v["exit_code"].as_i64().unwrap_or(-1),
        v["stdout"].as_str().unwrap_or_default().to_string(),
        v["stderr"].as_str().unwrap_or_default().to_string(),
    )
}

/// `curl` in the guest through the proxy with `token` (none: no credentials):
/// "<CONNECT status> <status> <body>".
async fn curl(api: &ApiClient, vm: &str, token: Option<&str>, extra: &str, url: &str) -> String {
    let proxy = match token {
        Some(t) => format!("http://proxy:{t}@{BIND}:3128"),
        None => format!("http://{BIND}:3128"),
    };
    let (_, out, _) = sh(
        api,
        vm,
        &format!("curl -sS --max-time 20 -x '{proxy}' {extra} -o /tmp/body -w '%{{http_connect}} %{{http_code}}' '{url}'; echo \" $(cat /tmp/body 2>/dev/null | head -c 200)\""),
    )
    .await;
    out.trim().to_string()
}

fn proxy_cli(dir: &Path, url: &str, args: &[&str]) -> String {
    let mut all = vec!["proxy"];
    all.extend_from_slice(args);
    ok(dir, url, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn egress_goes_only_through_the_proxys_rules() {
    let tmp = tempfile::Builder::new().prefix("slicer-proxy-").tempdir().unwrap();
    let dir = tmp.path();
    let _adapter = AdapterGuard;
    let up_hosts = upstreams(dir, "pxup", "198.18.61");
    let upstream: IpAddr = up_hosts.net.addr;
    let port = free_port();
    std::fs::write(dir.join("slicer.yaml"), config(port)).unwrap();
    let (_daemon, url) = up(dir, "./slicer.yaml", port).await;
    let api = client(dir, &url);
    // Names the proxy resolves itself: the test upstreams, and names that point where it must never go.
    let a = create_vm(&api).await;
    let b = create_vm(&api).await;
    let b_ip = vm_ip(&api, &b).await;
    let mut hosts: Vec<(&str, IpAddr)> = ["api.test", "basic.test", "other.test", "echo.test", "pinned.test"]
        .iter()
        .map(|n| (*n, upstream))
        .collect();
    hosts.push(("meta.test", "169.254.169.254".parse().unwrap()));
    hosts.push(("loop.test", "127.0.0.1".parse().unwrap()));
    hosts.push(("self.test", up_hosts.net.host_addr));
    hosts.push(("vm.test", b_ip));
    testkit::write_hosts(&dir.join("hosts"), &hosts).unwrap();
    let mut proxy = Proxy::start(dir, "strict");
    // It parses hostile traffic as nobody in particular: not root, no capabilities, no new
    // privileges, a seccomp filter.
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert!(!field("Uid:").starts_with("0 "), "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("CapBnd:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");

    // Direct egress is dropped outside the guest.
    let (code, _, _) = sh(&api, &a, &format!("curl -sk --max-time 5 https://{upstream}/")).await;
    assert_ne!(code, 0, "direct egress worked");

    // No credentials: 407. Unknown token: 407.
    assert!(curl(&api, &a, None, "", "https://api.test/x").await.starts_with("407"));
    assert!(curl(&api, &a, Some("spt_nope"), "", "https://api.test/x")
        .await
        .starts_with("407"));

    // A client without rules: 403 at CONNECT and a deny line.
    let token = proxy_cli(dir, &url, &["client", "create", "c1"]).trim().to_string();
    assert!(token.starts_with("spt_"), "{token}");
    assert!(curl(&api, &a, Some(&token), "", "https://api.test/x")
        .await
        .starts_with("403"));
    proxy.wait_line(&["deny", "client=c1", "host=api.test", "port=443", "reason=no-rule"]);

    // A host rule: 200 (TLS terminated with a leaf the guest trusts through the group's CA).
    proxy_cli(dir, &url, &["allow", "c1", "--host", "api.test"]);
    let r = curl(&api, &a, Some(&token), "", "https://api.test/hello").await;
    assert_eq!(r, "200 200 GET /hello", "{r}");
    proxy.wait_line(&["allow", "client=c1", "host=api.test", "path=/hello", "status=200"]);
    // Through the HTTPS proxy port as Slicer's docs spell it.
    let (code, out, err) = sh(
        &api,
        &a,
        &format!("curl -sS --max-time 20 -x 'https://proxy:{token}@{BIND}:3129' https://api.test/tls-proxy"),
    )
    .await;
    assert_eq!((code, out.trim()), (0, "GET /tls-proxy"), "{err}");
    // Plain HTTP through 3128.
    let r = curl(&api, &a, Some(&token), "", "http://api.test/plain").await;
    assert!(r.ends_with("200 GET /plain"), "{r}");

    // Path, method and port filters.
    proxy_cli(dir, &url, &["revoke", "c1", "--host", "api.test"]);
    proxy_cli(
        dir,
        &url,
        &[
            "allow", "c1", "--host", "api.test", "--path", "/v1/*", "--method", "GET", "--port", "443",
        ],
    );
    assert!(curl(&api, &a, Some(&token), "", "https://api.test/v1/models")
        .await
        .ends_with("200 GET /v1/models"));
    assert!(curl(&api, &a, Some(&token), "-X POST", "https://api.test/v1/models")
        .await
        .starts_with("200 403"));
    assert!(curl(&api, &a, Some(&token), "", "https://api.test/v2")
        .await
        .starts_with("200 403"));
    assert!(
        curl(&api, &a, Some(&token), "--path-as-is", "https://api.test/v1/../admin")
            .await
            .contains("403")
    );
    assert!(curl(&api, &a, Some(&token), "", "https://api.test:8444/v1/x")
        .await
        .starts_with("403"));
    proxy_cli(dir, &url, &["allow", "c1", "--host", "api.test", "--port", "8444"]);
    assert!(curl(&api, &a, Some(&token), "", "https://api.test:8444/v1/x")
        .await
        .ends_with("200 GET /v1/x"));

    // A TTL: allowed now, denied once it passes (polled, not slept).
    proxy_cli(dir, &url, &["allow", "c1", "--host", "other.test", "--ttl", "3s"]);
    assert!(curl(&api, &a, Some(&token), "", "https://other.test/t")
        .await
        .ends_with("200 GET /t"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !curl(&api, &a, Some(&token), "", "https://other.test/t")
        .await
        .starts_with("403")
    {
        assert!(Instant::now() < deadline, "the TTL rule kept matching");
    }
    // A removed rule stops at once.
    proxy_cli(dir, &url, &["revoke", "c1", "--host", "api.test"]);
    assert!(curl(&api, &a, Some(&token), "", "https://api.test/v1/models")
        .await
        .starts_with("403"));

    // Secrets: injected on the host, the guest's own header replaced.
    let bearer = format!("sk-e2e-{}", hex::encode(rand_bytes()));
    let basic_pw = format!("pw-e2e-{}", hex::encode(rand_bytes()));
    std::fs::write(dir.join("bearer"), format!("{bearer}\n")).unwrap();
    proxy_cli(
        dir,
        &url,
        &[
            "secret",
            "create",
            "k1",
            "--host",
            "api.test",
            "--type",
            "bearer",
            "--value-file",
            "bearer",
        ],
    );
    std::fs::remove_file(dir.join("bearer")).unwrap();
    proxy_cli(
        dir,
        &url,
        &[
            "secret",
            "create",
            "k2",
            "--host",
            "basic.test",
            "--type",
            "basic",
            "--value",
            &format!("user:{basic_pw}"),
        ],
    );
    proxy_cli(dir, &url, &["allow", "c1", "--host", "api.test", "--secret", "k1"]);
    proxy_cli(dir, &url, &["allow", "c1", "--host", "basic.test", "--secret", "k2"]);
    let r = curl(
        &api,
        &a,
        Some(&token),
        "-H 'Authorization: Bearer guest-own'",
        "https://api.test/auth",
    )
    .await;
    assert!(r.ends_with("200 GET /auth"), "{r}");
    let r = curl(&api, &a, Some(&token), "", "https://basic.test/auth").await;
    assert!(r.ends_with("200 GET /auth"), "{r}");
    let auths = up_hosts.seen.authorizations();
    assert!(auths.contains(&format!("Bearer {bearer}")), "{auths:?}");
    assert!(!auths.iter().any(|a| a.contains("guest-own")), "{auths:?}");
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("user:{basic_pw}"));
    assert!(auths.contains(&format!("Basic {b64}")), "{auths:?}");
    let list = proxy_cli(dir, &url, &["secret", "list"]);
    assert!(list.contains("k1") && !list.contains(&bearer), "{list}");
    assert!(!proxy.log_text().contains(&bearer), "the proxy logged a secret");

    // The values are nowhere in the guest: no process environment, no file (searched by a
    // pattern, so the search itself never carries a value into the guest) ...
    for (what, pattern) in [("bearer", "sk-e2e-[0-9a-f]{32}"), ("basic", "pw-e2e-[0-9a-f]{32}")] {
        let (_, env_hits, _) = sh(
            &api,
            &a,
            &format!("grep -lE '{pattern}' /proc/[0-9]*/environ 2>/dev/null"),
        )
        .await;
        assert_eq!(env_hits.trim(), "", "{what} in a process environment");
        let (_, file_hits, _) = sh(
            &api,
            &a,
            &format!("timeout 600 grep -rlIE '{pattern}' / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev 2>/dev/null"),
        )
        .await;
        assert_eq!(file_hits.trim(), "", "{what} in a guest file");
    }
    // ... and not in its memory: a live capture searched on the host.
    let c: Value = api
        .json(Method::POST, &routes::vm_commit(&a), Some(&json!({"live": true})))
        .await
        .unwrap();
    let commit = c["commit_id"].as_str().unwrap_or_else(|| panic!("{c}")).to_string();
    let captured = dir.join("data/commits").join(&commit);
    for value in [bearer.as_bytes(), basic_pw.as_bytes()] {
        let searched = search_dir(&captured, value);
        assert!(searched > 256 << 20, "the capture held only {searched} bytes");
    }

    // Passthrough: a TCP echo and an HTTPS server the guest pins (no CA of ours involved).
    proxy_cli(
        dir,
        &url,
        &["allow", "c1", "--host", "echo.test", "--port", "5432", "--passthrough"],
    );
    let echo = format!(
        "python3 - <<'EOF'\nimport socket,base64\ns=socket.create_connection(('{BIND}',3128),timeout=20)\nauth=base64.b64encode(b'proxy:{token}').decode()\ns.sendall(('CONNECT echo.test:5432 HTTP/1.1\\r\\nHost: echo.test:5432\\r\\nProxy-Authorization: Basic '+auth+'\\r\\n\\r\\n').encode())\nh=b''\nwhile b'\\r\\n\\r\\n' not in h:\n    h+=s.recv(1)\nprint(h.split(b' ')[1].decode())\ns.sendall(b'ping-through')\nd=b''\nwhile len(d)<12:\n    d+=s.recv(64)\nprint(d.decode())\nEOF"
    );
    let (_, out, err) = sh(&api, &a, &echo).await;
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["200", "ping-through"],
        "{err}"
    );
    proxy.wait_line(&["allow", "client=c1", "scheme=tcp", "host=echo.test", "port=5432"]);
    sh(
        &api,
        &a,
        &format!("cat > /tmp/pin.pem <<'EOF'\n{}EOF", up_hosts.pinned_ca),
    )
    .await;
    let r = curl(
        &api,
        &a,
        Some(&token),
        "--cacert /tmp/pin.pem",
        "https://pinned.test:8443/pinned",
    )
    .await;
    assert!(r.starts_with("403"), "{r}");
    proxy_cli(
        dir,
        &url,
        &[
            "allow",
            "c1",
            "--host",
            "pinned.test",
            "--port",
            "8443",
            "--passthrough",
        ],
    );
    let r = curl(
        &api,
        &a,
        Some(&token),
        "--cacert /tmp/pin.pem",
        "https://pinned.test:8443/pinned",
    )
    .await;
    assert!(r.ends_with("200 GET /pinned"), "{r}");

    // `*` never reaches loopback, metadata, the host or another VM, by address or by name.
    let host_seen = HostListener::new();
    proxy_cli(
        dir,
        &url,
        &["allow", "c1", "--host", "*", "--port", "443", "--port", "80"],
    );
    let ports = host_seen.port.to_string();
    proxy_cli(
        dir,
        &url,
        &["allow", "c1", "--host", "*", "--port", &ports, "--passthrough"],
    );
    let before = up_hosts.seen.count.load(std::sync::atomic::Ordering::Relaxed);
    for target in [
        "https://127.0.0.1/".to_string(),
        "https://loop.test/".to_string(),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://meta.test/latest/meta-data/".to_string(),
        format!("https://{}/", up_hosts.net.host_addr),
        "https://self.test/".to_string(),
        format!("https://{b_ip}/"),
        "https://vm.test/".to_string(),
        format!("https://127.0.0.1:{ports}/"),
        format!("https://{}:{ports}/", up_hosts.net.host_addr),
        format!("https://self.test:{ports}/"),
    ] {
        let r = curl(&api, &a, Some(&token), "-k", &target).await;
        assert!(r.contains("403"), "{target}: {r}");
    }
    assert_eq!(host_seen.accepted(), 0, "the proxy connected to the host");
    assert_eq!(up_hosts.seen.count.load(std::sync::atomic::Ordering::Relaxed), before);

    // kill -9 of the proxy: the VMs run on; a restart restores every rule before anyone pushes.
    proxy.kill9();
    let (code, _, _) = sh(&api, &a, "true").await;
    assert_eq!(code, 0);
    let v: Value = api.json(Method::GET, &routes::vm(&a), None).await.unwrap();
    assert_eq!(v["status"], "Running");
    let mut proxy = Proxy::start(dir, "strict");
    let r = curl(&api, &a, Some(&token), "", "https://basic.test/again").await;
    assert!(r.ends_with("200 GET /again"), "{r}");
    proxy.kill9();

    // Audit mode: a denied request is logged with its method and path, the upstream untouched;
    // `slicer proxy suggest` turns what it saw into rules.
    proxy_cli(dir, &url, &["revoke", "c1", "--host", "*"]);
    let proxy = Proxy::start(dir, "audit");
    let before = up_hosts.seen.count.load(std::sync::atomic::Ordering::Relaxed);
    let r = curl(&api, &a, Some(&token), "", "https://other.test/v1/models").await;
    assert!(r.starts_with("200 403"), "{r}");
    proxy.wait_line(&[
        "deny",
        "client=c1",
        "method=GET",
        "host=other.test",
        "path=/v1/models",
        "mode=audit",
        "reason=no-rule",
    ]);
    assert_eq!(up_hosts.seen.count.load(std::sync::atomic::Ordering::Relaxed), before);
    // The decision reaches the daemon over the proxy's control socket, which the daemon
    // reconnects to after the restart: polled.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let suggestion = proxy_cli(dir, &url, &["suggest", "c1"]);
        if suggestion
            .lines()
            .any(|l| l.contains("--host other.test") && l.contains("/v1/models"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no suggestion for other.test /v1/models: {suggestion}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A VM bound to a client gets the proxy in its login environment: no token typed anywhere.
    let c: Value = api
        .json(
            Method::POST,
            &format!("{}?wait=agent", routes::group_nodes(GROUP)),
            Some(&json!({"proxy": {"client": "c1"}})),
        )
        .await
        .unwrap();
    let vm_c = c["hostname"].as_str().unwrap().to_string();
    let (code, out, err) = sh(&api, &vm_c, "curl -sS --max-time 20 https://basic.test/env").await;
    assert_eq!((code, out.trim()), (0, "GET /env"), "{err}");

    drop(proxy);
}

async fn create_vm(api: &ApiClient) -> String {
    common::create_vm(api, GROUP, json!({})).await
}

async fn vm_ip(api: &ApiClient, vm: &str) -> IpAddr {
    let v: Value = api.json(Method::GET, &routes::vm(vm), None).await.unwrap();
    v["ip"]
        .as_str()
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no ip in {v}"))
}

fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut b).unwrap();
    b
}

/// Asserts `needle` is in no file under `dir`; the bytes searched.
fn search_dir(dir: &Path, needle: &[u8]) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            total += search_dir(&p, needle);
            continue;
        }
        let mut f = std::fs::File::open(&p).unwrap();
        let mut buf = vec![0u8; 8 << 20];
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
            carry.extend_from_slice(&buf[..n]);
            assert!(
                !carry.windows(needle.len()).any(|w| w == needle),
                "a secret value is in {}",
                p.display()
            );
            let keep = carry.len().saturating_sub(needle.len());
            carry.drain(..keep);
        }
    }
    total
}

/// A listener on the host's own addresses counting what connects (nothing may); it lives as
/// long as the test process.
struct HostListener {
    port: u16,
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl HostListener {
    fn new() -> HostListener {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = count.clone();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nhost\n");
            }
        });
        HostListener { port, count }
    }

    fn accepted(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Removes whatever link holds `addr` (the dummy adapter `slicer proxy up --bind` made).
fn remove_adapter_of(addr: &str) {
    let Ok(out) = Command::new("ip").args(["-o", "-4", "addr", "show"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.contains(&format!("inet {addr}/")) {
            if let Some(dev) = line.split_whitespace().nth(1) {
                let _ = Command::new("ip").args(["link", "del", dev]).output();
            }
        }
    }
}

/// Removes the walk-through's adapter however the test ends.
struct WalkthroughGuard;

impl Drop for WalkthroughGuard {
    fn drop(&mut self) {
        remove_adapter_of("192.168.222.1");
    }
}

#[test]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
fn slicers_linux_walkthrough_runs_as_written() {
    let tmp = tempfile::Builder::new().prefix("slicer-proxy-md-").tempdir().unwrap();
    let dir = tmp.path();
    let _guard = WalkthroughGuard;
    // wikipedia.org is a test upstream here; `sudo` passes through (the tests run as root).
    let net = upstreams(dir, "pxmd", "198.18.62");
    testkit::write_hosts(&dir.join("hosts"), &[("wikipedia.org", net.net.addr)]).unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(common::SLICER, bin.join("slicer")).unwrap();
    std::fs::write(bin.join("sudo"), "#!/bin/sh\nexec \"$@\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("sudo"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/proxy/linux-md.sh");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(dir)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()),
        )
        .env("SLICER_DATA_DIR", dir.join("data"))
        .env("SLICER_IMAGES_DIR", common::images_dir())
        .env_remove("SLICER_URL")
        .env_remove("SLICER_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n{}\nproxy.log:\n{}\ndaemon.log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log("proxy.log"),
        log("daemon.log")
    );
}
