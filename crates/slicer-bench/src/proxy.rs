//! `slicer-bench --suite proxy`: Slicer Proxy against going direct, side by side in one run, on
//! the host (no VM: the numbers are the proxy's, not TCG's). An HTTPS upstream and a TCP echo
//! live in a namespace this benchmark creates (198.18.63.0/24); `slicer proxy up` (the `--new`
//! binary) binds 198.18.64.1 with a client whose rules splice `pt.test` (passthrough) and
//! terminate TLS for `inj.test` (a bearer secret injected). Measured: a download direct, through
//! a passthrough tunnel and through the injecting one; the latency of keep-alive HTTPS requests
//! direct and through the injecting tunnel; new connections per second (connect, TLS, one
//! request, close); the proxy's RSS idle and with 1,000 open tunnels.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use slicer_proxy::ca::GroupCa;
use slicer_proxy::control::{ProxyState, StateClient, StateSecret};
use slicer_proxy::testkit::{self, Seen, TestNet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::record;

const BIND: &str = "198.18.64.1";
const TOKEN: &str = "spt_benchmark_token_0123456789abcdef";

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct ProxyChild(std::process::Child);

impl Drop for ProxyChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        remove_adapter();
    }
}

fn remove_adapter() {
    if let Ok(out) = Command::new("ip").args(["-o", "-4", "addr", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.contains(&format!("inet {BIND}/")) {
                if let Some(dev) = line.split_whitespace().nth(1) {
                    let _ = Command::new("ip").args(["link", "del", dev]).output();
                }
            }
        }
    }
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_secs(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = s.rsplit_once(')').map(|(_, r)| r).context("no ) in stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).context("utime")?
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).context("stime")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// Everything one measurement needs to open connections.
struct Rig {
    upstream: SocketAddr,
    proxy: SocketAddr,
    /// Trusts the upstream's test CA (direct and passthrough).
    direct_tls: tokio_rustls::TlsConnector,
    /// Trusts the proxy's group CA (the injecting tunnel's leaf).
    proxied_tls: tokio_rustls::TlsConnector,
}

fn connector(roots_pem: &[&str]) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in roots_pem {
        for der in slicer_proxy::ca::pem_certs(pem) {
            roots.add(der.into())?;
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(slicer_proxy::ca::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

impl Rig {
    /// A TCP stream to `host:443` (direct) or a tunnel to it through the proxy.
    async fn tcp(&self, host: &str, port: u16, via_proxy: bool) -> Result<Box<dyn Io>> {
        if !via_proxy {
            let s = TcpStream::connect(self.upstream).await?;
            s.set_nodelay(true)?;
            return Ok(Box::new(s));
        }
        let mut s = TcpStream::connect(self.proxy).await?;
        s.set_nodelay(true)?;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("proxy:{TOKEN}"));
        s.write_all(
            format!(
                "CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await? == 0 || head.len() > 8192 {
                bail!("the proxy closed the CONNECT");
            }
            head.push(b[0]);
        }
        if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
            bail!("CONNECT {host}: {}", String::from_utf8_lossy(&head));
        }
        Ok(Box::new(s))
    }

    /// An HTTP/1.1 client over TLS to `host`.
    async fn http(&self, host: &str, via_proxy: bool) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
        let tcp = self.tcp(host, 443, via_proxy).await?;
        let tls = if via_proxy && host == "inj.test" {
            &self.proxied_tls
        } else {
            &self.direct_tls
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
        let t = tls.connect(name, tcp).await?;
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(t)).await?;
        tokio::spawn(conn);
        Ok(send)
    }
}

async fn get(send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>, host: &str, path: &str) -> Result<u64> {
    send.ready().await?;
    let req = hyper::Request::get(path).header("host", host).body(Empty::new())?;
    let resp = send.send_request(req).await?;
    if resp.status() != 200 {
        bail!("GET {host}{path}: {}", resp.status());
    }
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f?.into_data() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// What the suite measured, for its table.
struct Measures {
    mib: usize,
    requests: usize,
    /// Download rates (MiB/s), direct, passthrough, injected: one per run.
    rates: [Vec<f64>; 3],
    /// The proxy's MiB moved per CPU second, same order.
    per_cpu: [Vec<f64>; 3],
    /// Keep-alive request latencies (ms), direct and through the injecting tunnel.
    direct_ms: Vec<f64>,
    proxied_ms: Vec<f64>,
    /// New connections per second: direct, TLS terminated, passthrough.
    cps: (f64, f64, f64),
    /// The proxy's RSS (KiB) idle and with 1,000 open tunnels.
    rss: (u64, u64),
}

pub async fn run(slicer: &Path, mib: usize, requests: usize, record_to: Option<&Path>) -> Result<()> {
    // The proxy runs in a directory of its own: the binary's path must not be relative.
    let slicer = &std::fs::canonicalize(slicer).with_context(|| format!("{}", slicer.display()))?;
    raise_nofile()?;
    let tmp = tempfile::Builder::new().prefix("slicer-bench-proxy-").tempdir()?;
    let dir = tmp.path();
    let (net, upstream_ca) = upstreams(dir)?;
    let group_ca = GroupCa::init(&slicer_proxy::ca::ca_dir(dir, "bench"), "bench", false)?;
    testkit::write_hosts(
        &dir.join("hosts"),
        &[("pt.test", net.addr), ("inj.test", net.addr), ("echo.test", net.addr)],
    )?;
    let data = dir.join("data");
    write_state(&data)?;
    remove_adapter();
    let proxy_child = start_proxy(slicer, dir, &data)?;
    let pid = proxy_child.0.id();
    let rig = Rig {
        upstream: SocketAddr::new(net.addr, 443),
        proxy: format!("{BIND}:3128").parse()?,
        direct_tls: connector(&[upstream_ca.cert_pem()])?,
        proxied_tls: connector(&[group_ca.cert_pem()])?,
    };
    wait_listening(rig.proxy).await?;

    let (rates, per_cpu) = downloads(&rig, pid, mib).await?;
    let (direct_ms, proxied_ms) = latencies(&rig, requests).await?;
    let cps = connection_rates(&rig, requests).await?;
    let rss = tunnels_rss(&rig, pid).await?;
    drop(proxy_child);
    drop(net);

    let t = table(Measures {
        mib,
        requests,
        rates,
        per_cpu,
        direct_ms,
        proxied_ms,
        cps,
        rss,
    });
    println!("{t}");
    if let Some(p) = record_to {
        record(p, "proxy", &t)?;
    }
    Ok(())
}

/// 1,000 tunnels and their upstream sides need more than the usual 1,024 descriptors.
fn raise_nofile() -> Result<()> {
    let lim = libc::rlimit {
        rlim_cur: 8192,
        rlim_max: 8192,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!("raising RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The namespace with the HTTPS upstream (its CA made in `dir`) and the TCP echo.
fn upstreams(dir: &Path) -> Result<(TestNet, GroupCa)> {
    let mut net = TestNet::new("pxbench", "198.18.63")?;
    let upstream_ca = GroupCa::init(&dir.join("upstream-ca"), "bench-upstream", false)?;
    let names: Vec<String> = ["direct.test", "pt.test", "inj.test"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let tls = testkit::server_config(&upstream_ca, &names)?;
    let seen = Arc::new(Seen::default());
    net.spawn(443, move |l, _| testkit::serve_http(l, Some(tls), seen))?;
    net.spawn(5432, |l, _| testkit::serve_echo(l))?;
    Ok((net, upstream_ca))
}

/// The rules, as the daemon would have left them for a restarting proxy, in `data`.
fn write_state(data: &Path) -> Result<()> {
    let rule = |host: &str, ports: Vec<u16>, passthrough: bool, secret: &str| slicer_api::ProxyAllowRule {
        host: host.into(),
        ports,
        passthrough,
        secret: secret.into(),
        ..Default::default()
    };
    let state = ProxyState {
        generation: 1,
        clients: vec![StateClient {
            name: "bench".into(),
            token_sha256: vec![slicer_proxy::rules::token_hash(TOKEN)],
            rules: vec![
                rule("pt.test", vec![], true, ""),
                rule("echo.test", vec![5432], true, ""),
                rule("inj.test", vec![], false, "k"),
            ],
        }],
        secrets: vec![StateSecret {
            name: "k".into(),
            host: "inj.test".into(),
            kind: slicer_proxy::control::SecretKind::Bearer,
            value: "bench-secret".into(),
        }],
        vm_ranges: vec![],
    };
    slicer_proxy::ca::make_private_dir(&slicer_proxy::control::proxy_dir(data))?;
    slicer_proxy::ca::write_new(
        &slicer_proxy::control::state_file(data),
        &serde_json::to_vec(&state)?,
        0o600,
        true,
    )?;
    Ok(())
}

/// `slicer proxy up` of the `slicer` binary, on [`BIND`], with its state in `data`.
fn start_proxy(slicer: &Path, dir: &Path, data: &Path) -> Result<ProxyChild> {
    let child = Command::new(slicer)
        .args(["proxy", "up", "--hostgroup", "bench", "--bind", BIND, "--data-dir"])
        .arg(data)
        .arg("--hosts-file")
        .arg(dir.join("hosts"))
        .arg("--upstream-ca")
        .arg(dir.join("upstream-ca/ca.crt"))
        .arg("--max-connections")
        .arg("8192")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} proxy up", slicer.display()))?;
    Ok(ProxyChild(child))
}

/// Waits (up to 30 s) until the proxy accepts connections.
async fn wait_listening(proxy: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(proxy).await.is_err() {
        if Instant::now() > deadline {
            bail!("the proxy did not listen on {proxy}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Downloads of `mib` MiB, interleaved, three each (direct, passthrough, injected): MiB/s, and
/// the proxy's own cost: MiB it moves per CPU second it spends (what bounds it on a host whose
/// clients and upstreams are elsewhere; here all three share two cores).
async fn downloads(rig: &Rig, pid: u32, mib: usize) -> Result<([Vec<f64>; 3], [Vec<f64>; 3])> {
    let bytes = (mib as u64) << 20;
    let path = format!("/bytes/{bytes}");
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut per_cpu: [Vec<f64>; 3] = Default::default();
    for _ in 0..3 {
        for (i, (host, via)) in [("direct.test", false), ("pt.test", true), ("inj.test", true)]
            .iter()
            .enumerate()
        {
            let mut c = rig.http(host, *via).await?;
            let cpu = cpu_secs(pid)?;
            let t = Instant::now();
            let n = get(&mut c, host, &path).await?;
            if n != bytes {
                bail!("{host}: {n} of {bytes} bytes");
            }
            let mib = bytes as f64 / (1 << 20) as f64;
            rates[i].push(mib / t.elapsed().as_secs_f64());
            per_cpu[i].push(mib / (cpu_secs(pid)? - cpu).max(0.001));
        }
    }
    Ok((rates, per_cpu))
}

/// Keep-alive request latency (ms), direct and through the injecting tunnel, interleaved.
async fn latencies(rig: &Rig, requests: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut direct = rig.http("direct.test", false).await?;
    let mut proxied = rig.http("inj.test", true).await?;
    let (mut ld, mut lp) = (Vec::new(), Vec::new());
    for _ in 0..requests {
        let t = Instant::now();
        get(&mut direct, "direct.test", "/small").await?;
        ld.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        get(&mut proxied, "inj.test", "/small").await?;
        lp.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((ld, lp))
}

/// New connections per second (connect, TLS, one request, close): direct, TLS terminated,
/// passthrough.
async fn connection_rates(rig: &Rig, requests: usize) -> Result<(f64, f64, f64)> {
    let per_second = |via: bool, host: &'static str| async move {
        let n = (requests / 4).max(20);
        let t = Instant::now();
        for _ in 0..n {
            let mut c = rig.http(host, via).await?;
            get(&mut c, host, "/c").await?;
        }
        Ok::<f64, anyhow::Error>(n as f64 / t.elapsed().as_secs_f64())
    };
    let direct = per_second(false, "direct.test").await?;
    let proxied = per_second(true, "inj.test").await?;
    let passthrough = per_second(true, "pt.test").await?;
    Ok((direct, proxied, passthrough))
}

/// The proxy's RSS (KiB) idle, then with 1,000 open passthrough tunnels (each echoed once).
async fn tunnels_rss(rig: &Rig, pid: u32) -> Result<(u64, u64)> {
    let idle = rss_kib(pid)?;
    let mut tunnels = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut t = rig.tcp("echo.test", 5432, true).await?;
        t.write_all(b"x").await?;
        let mut b = [0u8; 1];
        t.read_exact(&mut b).await?;
        tunnels.push(t);
    }
    let open = rss_kib(pid)?;
    drop(tunnels);
    Ok((idle, open))
}

/// The suite's table.
fn table(mut m: Measures) -> String {
    let (mib, requests) = (m.mib, m.requests);
    let rate = |i: usize| crate::median(m.rates[i].clone());
    let capacity = |i: usize| crate::median(m.per_cpu[i].clone());
    let mut t = String::new();
    t.push_str("| measure | direct | through the proxy | ratio |\n|---|---|---|---|\n");
    t.push_str(&format!(
        "| download {mib} MiB, passthrough (MiB/s, median of 3) | {:.0} | {:.0} | {:.2}x |\n",
        rate(0),
        rate(1),
        rate(1) / rate(0)
    ));
    t.push_str(&format!(
        "| download {mib} MiB, TLS terminated + bearer injected (MiB/s) | {:.0} | {:.0} | {:.2}x |\n",
        rate(0),
        rate(2),
        rate(2) / rate(0)
    ));
    t.push_str(&format!(
        "| the proxy's own cost: MiB moved per CPU second it used, passthrough / injected | | {:.0} / {:.0} | |\n",
        capacity(1),
        capacity(2)
    ));
    let (d50, d99, p50, p99) = (
        pct(&mut m.direct_ms, 0.5),
        pct(&mut m.direct_ms, 0.99),
        pct(&mut m.proxied_ms, 0.5),
        pct(&mut m.proxied_ms, 0.99),
    );
    t.push_str(&format!(
        "| keep-alive HTTPS request p50 (ms, {requests} each) | {d50:.2} | {p50:.2} | +{:.2} ms |\n",
        p50 - d50
    ));
    t.push_str(&format!(
        "| keep-alive HTTPS request p99 (ms) | {d99:.2} | {p99:.2} | +{:.2} ms |\n",
        p99 - d99
    ));
    let (cps_direct, cps_proxy, cps_pt) = m.cps;
    t.push_str(&format!(
        "| new connections/s, TLS terminated (connect, TLS, 1 request) | {cps_direct:.0} | {cps_proxy:.0} | {:.2}x |\n",
        cps_proxy / cps_direct
    ));
    t.push_str(&format!(
        "| new connections/s, passthrough | {cps_direct:.0} | {cps_pt:.0} | {:.2}x |\n",
        cps_pt / cps_direct
    ));
    let (idle, open) = m.rss;
    t.push_str(&format!(
        "| proxy RSS idle / with 1,000 open tunnels (MiB) | | {:.1} / {:.1} | {:.1} KiB per tunnel |\n",
        idle as f64 / 1024.0,
        open as f64 / 1024.0,
        (open.saturating_sub(idle)) as f64 / 1000.0
    ));
    t
}
