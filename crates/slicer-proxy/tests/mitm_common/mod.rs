//! Loopback fixtures for the interceptor: an upstream CA and HTTPS (or plain) upstreams that
//! record what they saw, a plane, and guest-side clients over an in-memory stream.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use slicer_api::ProxyAllowRule;
use slicer_proxy::ca::GroupCa;
use slicer_proxy::control::{Decision, Mode, ProxyState, SecretKind, StateClient, StateSecret};
use slicer_proxy::mitm::Interceptor;
use slicer_proxy::plane::{Events, Plane, PolicyCell, Tunnel};
use slicer_proxy::rules::{token_hash, Policy};
use slicer_proxy::upstream::{Upstream, UpstreamConfig};
use tokio::net::TcpListener;
use tokio::sync::mpsc::Receiver;

pub const TOKEN: &str = "spt_test_token";
pub const CLIENT: &str = "c1";
pub const SECRET_VALUE: &str = "sk-live-very-secret";

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    slicer_proxy::ca::crypto_provider()
}

/// A CA for upstreams (what an operator's extra bundle would hold).
pub struct TestCa {
    pub der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server configuration for `name` with these ALPN protocols.
    pub fn server_config(&self, name: &str, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }
}

/// What an upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub version: Version,
    pub host: Option<String>,
    pub authorization: Vec<String>,
    pub proxy_authorization: bool,
}

/// A loopback upstream: `/big?n=BYTES` streams zeros, `/echo` echoes the body, `/ws` upgrades
/// and echoes, anything else answers `hello`.
pub struct TestUpstream {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestUpstream {
    pub async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> TestUpstream {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (s, c) = (seen.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let seen = s.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let seen = seen.clone();
                        async move { Ok::<_, Infallible>(upstream_handle(req, seen)) }
                    });
                    let b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(cfg) => {
                            let Ok(t) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                                return;
                            };
                            let _ = b.serve_connection_with_upgrades(TokioIo::new(t), svc).await;
                        }
                        None => {
                            let _ = b.serve_connection_with_upgrades(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        TestUpstream {
            port,
            seen,
            connections,
            task,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

type UpBody = UnsyncBoxBody<Bytes, hyper::Error>;

fn upstream_handle(mut req: Request<Incoming>, seen: Arc<Mutex<Vec<Seen>>>) -> Response<UpBody> {
    let h = req.headers();
    seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        target: req.uri().to_string(),
        version: req.version(),
        host: h
            .get(http::header::HOST)
            .map(|v| v.to_str().unwrap().to_string())
            .or_else(|| req.uri().authority().map(|a| a.to_string())),
        authorization: h
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect(),
        proxy_authorization: h.contains_key(http::header::PROXY_AUTHORIZATION),
    });
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/big" => {
            let n: u64 = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Response::new(UnsyncBoxBody::new(
                Zeros { left: n }.map_err(|n: Infallible| match n {}),
            ))
        }
        "/echo" => Response::new(UnsyncBoxBody::new(req.into_body())),
        "/ws" => {
            let up = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(u) = up.await {
                    let mut io = TokioIo::new(u);
                    let (mut r, mut w) = tokio::io::split(&mut io);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(http::header::CONNECTION, "upgrade")
                .header(http::header::UPGRADE, "echo")
                .body(UnsyncBoxBody::new(Empty::new().map_err(|n: Infallible| match n {})))
                .unwrap()
        }
        _ => Response::new(UnsyncBoxBody::new(
            Full::new(Bytes::from_static(b"hello")).map_err(|n: Infallible| match n {}),
        )),
    }
}

/// `left` zero bytes in 64 KiB chunks, made as they are read.
pub struct Zeros {
    pub left: u64,
}

impl Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(64 << 10);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![0u8; n as usize])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

pub fn rule(host: &str, port: u16) -> ProxyAllowRule {
    ProxyAllowRule {
        host: host.into(),
        ports: vec![port],
        ..Default::default()
    }
}

pub fn secret(name: &str, host: &str, kind: SecretKind, value: &str) -> StateSecret {
    StateSecret {
        name: name.into(),
        host: host.into(),
        kind,
        value: value.into(),
    }
}

pub fn policy(rules: Vec<ProxyAllowRule>, secrets: Vec<StateSecret>) -> Policy {
    Policy::compile(&ProxyState {
        generation: 1,
        clients: vec![StateClient {
            name: CLIENT.into(),
            token_sha256: vec![token_hash(TOKEN)],
            rules,
        }],
        secrets,
        vm_ranges: vec![],
    })
}

pub struct Fixture {
    pub plane: Arc<Plane>,
    pub decisions: Receiver<Decision>,
    pub ix: Arc<Interceptor>,
    pub ca: Arc<GroupCa>,
    pub _dir: tempfile::TempDir,
}

/// A plane where `*.test` names resolve to 127.0.0.1, and an interceptor trusting `extra_roots`.
pub fn fixture(p: Policy, mode: Mode, extra_roots: Vec<Vec<u8>>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(GroupCa::init(&dir.path().join("ca"), "test", false).unwrap());
    let (events, decisions) = Events::new();
    let mut hosts = HashMap::new();
    for h in ["api.test", "bad.test", "plain.test"] {
        hosts.insert(h.to_string(), vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    }
    let plane = Arc::new(Plane {
        policy: PolicyCell::default(),
        events,
        upstream: Upstream::new(UpstreamConfig {
            hosts,
            allow_loopback_for_tests: true,
            ..Default::default()
        }),
        mode,
    });
    plane.policy.set(p);
    let ix = Arc::new(Interceptor::new(ca.clone(), extra_roots).unwrap());
    Fixture {
        plane,
        decisions,
        ix,
        ca,
        _dir: dir,
    }
}

impl Fixture {
    pub fn tunnel(&self, host: &str, port: u16, audit_only: bool) -> Tunnel {
        Tunnel {
            client: self.plane.policy.get().client(TOKEN).unwrap(),
            host: host.into(),
            port,
            audit_only,
        }
    }

    /// Hands one end of an in-memory stream to `Interceptor::serve`, returns the guest's end.
    pub fn open(&self, tunnel: Tunnel) -> tokio::io::DuplexStream {
        let (guest, proxy) = tokio::io::duplex(64 << 10);
        let (ix, plane) = (self.ix.clone(), self.plane.clone());
        tokio::spawn(async move { ix.serve(plane, tunnel, proxy).await });
        guest
    }

    /// A guest client speaking TLS (trusting the group CA) with `alpn` through a tunnel.
    pub async fn guest(&self, tunnel: Tunnel, alpn: &[&[u8]]) -> Guest {
        let host = tunnel.host.clone();
        let io = self.open(tunnel);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(self.ca.cert_der().to_vec())).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from(host).unwrap(), io)
            .await
            .unwrap();
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Guest::handshake(TokioIo::new(tls), h2).await
    }

    pub async fn decision(&mut self) -> Decision {
        tokio::time::timeout(Duration::from_secs(10), self.decisions.recv())
            .await
            .expect("a decision within 10 s")
            .expect("events open")
    }

    /// No decision arrives within `wait`.
    pub async fn no_decision(&mut self, wait: Duration) {
        if let Ok(Some(d)) = tokio::time::timeout(wait, self.decisions.recv()).await {
            panic!("unexpected decision {}", d.log_line());
        }
    }
}

pub type GuestBody = UnsyncBoxBody<Bytes, Infallible>;

pub fn body(b: &'static [u8]) -> GuestBody {
    UnsyncBoxBody::new(Full::new(Bytes::from_static(b)))
}

pub enum Guest {
    H1(hyper::client::conn::http1::SendRequest<GuestBody>),
    H2(hyper::client::conn::http2::SendRequest<GuestBody>),
}

impl Guest {
    pub async fn handshake<T>(io: T, h2: bool) -> Guest
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        if h2 {
            let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(c);
            Guest::H2(s)
        } else {
            let (s, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(c.with_upgrades());
            Guest::H1(s)
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, Guest::H2(_))
    }

    /// Sends `method https://host/path` (origin-form with a Host header on HTTP/1.1).
    pub async fn send(&mut self, mut req: Request<GuestBody>) -> hyper::Result<Response<Incoming>> {
        match self {
            Guest::H1(s) => {
                s.ready().await?;
                let pq = req.uri().path_and_query().unwrap().as_str().to_string();
                let auth = req.uri().authority().map(|a| a.to_string());
                *req.uri_mut() = pq.parse().unwrap();
                if let Some(a) = auth {
                    req.headers_mut()
                        .entry(http::header::HOST)
                        .or_insert(a.parse().unwrap());
                }
                s.send_request(req).await
            }
            Guest::H2(s) => {
                *req.version_mut() = Version::HTTP_2;
                s.send_request(req).await
            }
        }
    }

    pub async fn get(&mut self, url: &str) -> (StatusCode, Bytes) {
        let r = self.send(Request::get(url).body(body(b"")).unwrap()).await.unwrap();
        let status = r.status();
        (status, r.into_body().collect().await.unwrap().to_bytes())
    }
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}
