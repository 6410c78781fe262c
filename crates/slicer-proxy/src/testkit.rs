//! Test and benchmark fixtures (feature `testkit`): upstream hosts in a network namespace the
//! caller creates, an HTTPS upstream with its own test CA that records the `Authorization` it
//! receives, a TCP echo server, a certificate a guest can pin. Nothing here is used by
//! `slicer proxy up`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;

use crate::ca::GroupCa;

fn ip(args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A network namespace `sltest-<name>` joined to the host by a veth: the host side holds
/// `<prefix>.1/24`, the namespace `<prefix>.2/24`. Removed on drop, with everything served in it.
pub struct TestNet {
    pub ns: String,
    veth: String,
    /// The namespace side's address (`<prefix>.2`).
    pub addr: IpAddr,
    /// The host side's address (`<prefix>.1`): one of the host's own addresses.
    pub host_addr: IpAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl TestNet {
    pub fn new(name: &str, prefix: &str) -> std::io::Result<TestNet> {
        let ns = format!("sltest-{name}");
        let veth = format!("slt-{name}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        let net = TestNet {
            ns: ns.clone(),
            veth: veth.clone(),
            addr: format!("{prefix}.2").parse().map_err(std::io::Error::other)?,
            host_addr: format!("{prefix}.1").parse().map_err(std::io::Error::other)?,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", &veth])?;
        ip(&["-n", &ns, "addr", "add", &format!("{prefix}.2/24"), "dev", "eth0"])?;
        ip(&["link", "set", &veth, "up"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "route", "add", "default", "via", &format!("{prefix}.1")])?;
        Ok(net)
    }

    /// Runs `serve(listener, stop)` on a thread inside the namespace, with its own runtime,
    /// listening on `port` of every address there.
    pub fn spawn<F, Fut>(&mut self, port: u16, serve: F) -> std::io::Result<()>
    where
        F: FnOnce(tokio::net::TcpListener, Arc<AtomicBool>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let ns = self.ns.clone();
        let stop = self.stop.clone();
        let (tx, rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        self.threads.push(std::thread::spawn(move || {
            let setup = (|| -> std::io::Result<(tokio::runtime::Runtime, std::net::TcpListener)> {
                let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
                // SAFETY: setns on this thread only; the descriptor is open.
                if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
                l.set_nonblocking(true)?;
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                Ok((rt, l))
            })();
            let (rt, l) = match setup {
                Ok(v) => v,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            rt.block_on(async move {
                let Ok(l) = tokio::net::TcpListener::from_std(l) else { return };
                let watch = stop.clone();
                tokio::select! {
                    _ = serve(l, stop) => {}
                    _ = async { while !watch.load(Ordering::SeqCst) { tokio::time::sleep(Duration::from_millis(50)).await } } => {}
                }
            });
        }));
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| std::io::Error::other("the namespace's server did not start"))?
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = Command::new("ip").args(["link", "del", &self.veth]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// What an upstream saw.
#[derive(Default)]
pub struct Seen {
    /// `METHOD PATH AUTHORIZATION` of each request (the header empty when absent).
    pub requests: Mutex<Vec<String>>,
    pub count: AtomicU64,
}

impl Seen {
    pub fn authorizations(&self) -> Vec<String> {
        self.requests
            .lock()
            .map(|r| {
                r.iter()
                    .map(|l| l.splitn(3, ' ').nth(2).unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A server TLS configuration for `names` signed by `ca`.
pub fn server_config(ca: &GroupCa, names: &[String]) -> crate::Result<Arc<rustls::ServerConfig>> {
    let leaf = ca.issue(names)?;
    server_config_from(leaf.cert_der, leaf.key_der)
}

/// A server TLS configuration from a DER certificate and PKCS#8 key.
pub fn server_config_from(cert: Vec<u8>, key: Vec<u8>) -> crate::Result<Arc<rustls::ServerConfig>> {
    let provider = crate::ca::crypto_provider();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::Error::Cert(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.into()], rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()))
        .map_err(|e| crate::Error::Cert(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves HTTP (TLS when `tls` is given; HTTP/1.1 and HTTP/2) on `l`: every request is recorded
/// in `seen`; `GET /bytes/N` streams N bytes; anything else answers `METHOD PATH` (never a
/// header: the guest must not learn an injected secret from the answer).
pub async fn serve_http(l: tokio::net::TcpListener, tls: Option<Arc<rustls::ServerConfig>>, seen: Arc<Seen>) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let Ok((s, _)) = l.accept().await else { continue };
        // As servers on the internet do: without it, HTTP/2's small frames wait for delayed ACKs.
        let _ = s.set_nodelay(true);
        let acceptor = acceptor.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let seen = seen.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(req, &seen)) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            match acceptor {
                Some(a) => {
                    if let Ok(t) = a.accept(s).await {
                        let _ = builder
                            .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(t), svc)
                            .await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                }
            }
        });
    }
}

type AnyBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn answer(req: hyper::Request<hyper::body::Incoming>, seen: &Seen) -> hyper::Response<AnyBody> {
    let auth = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let path = req.uri().path().to_string();
    if let Ok(mut r) = seen.requests.lock() {
        if r.len() < 100_000 {
            r.push(format!("{} {} {}", req.method(), path, auth));
        }
    }
    seen.count.fetch_add(1, Ordering::Relaxed);
    if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<u64>().ok()) {
        const CHUNK: usize = 64 << 10;
        let chunk = Bytes::from(vec![b'x'; CHUNK]);
        let frames = futures_util::stream::unfold(n, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let take = left.min(CHUNK as u64);
                Some((Ok(Frame::data(chunk.slice(..take as usize))), left - take))
            }
        });
        return hyper::Response::builder()
            .header(http::header::CONTENT_LENGTH, n)
            .body(StreamBody::new(frames).boxed())
            .unwrap_or_default();
    }
    hyper::Response::new(Full::new(Bytes::from(format!("{} {}\n", req.method(), path))).boxed())
}

/// Echoes every TCP connection on `l` back to itself.
pub async fn serve_echo(l: tokio::net::TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Writes a hosts file for `slicer proxy up --hosts-file`: one `NAME IP` per line.
pub fn write_hosts(path: &Path, entries: &[(&str, IpAddr)]) -> std::io::Result<()> {
    let text: String = entries.iter().map(|(n, a)| format!("{n} {a}\n")).collect();
    std::fs::write(path, text)
}

/// The address `addr:port`.
pub fn sock(addr: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(addr, port)
}
