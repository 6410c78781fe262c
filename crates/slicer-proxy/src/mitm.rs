//! Terminating a guest's TLS (a leaf per host signed by the group CA), deciding each inner
//! request, injecting credentials, and forwarding over TLS verified against the host's roots
//! plus an operator's bundle.
//!
//! The leaf presented is always for the tunnel's CONNECT host (what the policy decided on),
//! never for whatever SNI the guest sends. Leaves are minted on a blocking thread and kept per
//! host (as a ready `ServerConfig`) in a bounded LRU; concurrent first tunnels to one host wait
//! for one mint (a `OnceCell` per entry). Each inner request is decided against the policy in
//! force at that moment, so a rule removed stops the next request of an open tunnel. Bodies
//! stream both ways through a counting wrapper (hyper's backpressure and h2 flow control bound
//! what is buffered); one decision is recorded per request when its response body ends.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OnceCell};

use crate::ca::GroupCa;
use crate::control::{Decision, Mode};
use crate::error::{Error, Result};
use crate::plane::{self, Plane, Tunnel};
use crate::rules::{self, ClientPolicy, Credential, DenyReason, Policy, RequestDecision};
use crate::upstream::UpstreamError;

/// Hosts whose leaf (and TLS configuration) is kept.
pub const LEAF_CACHE: usize = 1024;
/// Largest request head (HTTP/1.1 read buffer, HTTP/2 header list) a guest may send.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// Concurrent HTTP/2 streams per guest connection.
pub const MAX_H2_STREAMS: u32 = 100;
/// Largest response head accepted from an upstream.
const MAX_UPSTREAM_HEADER_BYTES: usize = 256 << 10;
/// Idle upstream connections kept per guest connection.
const MAX_IDLE_UPSTREAM: usize = 8;
/// Sessions kept for resumption per host.
const SESSIONS_PER_HOST: usize = 32;
/// Longest path echoed in a 403 body.
const MAX_ECHO_PATH: usize = 256;

/// Time limits of a guest connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The guest's first byte, its TLS handshake, the upstream's TLS handshake.
    pub handshake: Duration,
    /// A request head (HTTP/1.1; also how long an idle keep-alive connection waits).
    pub header_read: Duration,
    /// A connection with no request in flight and no byte either way is closed after this.
    pub idle: Duration,
    /// Resolving and connecting to an upstream.
    pub upstream_connect: Duration,
    /// HTTP/2 pings (both sides) to find dead peers.
    pub h2_keep_alive: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(30),
            idle: Duration::from_secs(120),
            upstream_connect: Duration::from_secs(30),
            h2_keep_alive: Duration::from_secs(30),
        }
    }
}

type ResBody = UnsyncBoxBody<Bytes, hyper::Error>;
type ReqBody = Counted<Incoming>;
type Key = (String, u16);

/// Polls a guest connection until it ends, closing it gracefully when asked (`ctx.close`) or
/// when idle, and dropping it when a graceful close takes too long.
macro_rules! drive {
    ($conn:expr, $ctx:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        let idle = $ctx.limits.idle;
        let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut closing: Option<Instant> = None;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("guest connection: {e}");
                    }
                    break;
                }
                _ = $ctx.close.notified(), if closing.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
                _ = tokio::time::sleep(tick) => match closing {
                    Some(t) if t.elapsed() > $ctx.limits.handshake => break,
                    Some(_) => {}
                    None => if $ctx.act.idle_for() >= idle {
                        conn.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    },
                },
            }
        }
    }};
}

/// Leaf cache, TLS configurations, the HTTP client to upstreams.
pub struct Interceptor {
    shared: Arc<Shared>,
    limits: Limits,
}

struct Shared {
    ca: Arc<GroupCa>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    leaves: Mutex<LeafCache>,
    /// Upstream TLS offering h2 and http/1.1.
    client_alpn: Arc<rustls::ClientConfig>,
    /// Upstream TLS offering only http/1.1 (an `Upgrade` request).
    client_h1: Arc<rustls::ClientConfig>,
}

impl Interceptor {
    /// `extra_roots`: DER certificates trusted for upstreams besides the host's store.
    pub fn new(ca: Arc<GroupCa>, extra_roots: Vec<Vec<u8>>) -> Result<Interceptor> {
        let provider = crate::ca::crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!("loading the host's CA certificates: {e}");
        }
        roots.add_parsable_certificates(native.certs);
        for (i, der) in extra_roots.into_iter().enumerate() {
            roots
                .add(CertificateDer::from(der))
                .map_err(|e| Error::Cert(format!("extra upstream root #{}: {e}", i + 1)))?;
        }
        if roots.is_empty() {
            tracing::warn!("no CA certificate to verify upstreams with: every upstream TLS connection will fail");
        }
        let client = |alpn: &[&[u8]]| -> Result<Arc<rustls::ClientConfig>> {
            let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Cert(format!("upstream TLS: {e}")))?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(c))
        };
        Ok(Interceptor {
            shared: Arc::new(Shared {
                ca,
                client_alpn: client(&[b"h2", b"http/1.1"])?,
                client_h1: client(&[b"http/1.1"])?,
                provider,
                leaves: Mutex::new(LeafCache::default()),
            }),
            limits: Limits::default(),
        })
    }

    /// Replaces the time limits (tests shorten them).
    pub fn with_limits(mut self, limits: Limits) -> Interceptor {
        self.limits = limits;
        self
    }

    /// Serves an intercepted tunnel. `guest` is the guest's side after the proxy answered the
    /// CONNECT with 200; it may speak TLS (the usual) or plain HTTP (a CONNECT to port 80).
    pub async fn serve<S>(&self, plane: Arc<Plane>, tunnel: Tunnel, guest: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let act = Activity::new();
        let mut io = Tracked {
            inner: guest,
            first: None,
            act: act.clone(),
        };
        let first = match tokio::time::timeout(self.limits.handshake, io.read_first()).await {
            Ok(Ok(Some(b))) => b,
            _ => return,
        };
        let tls = first == 0x16;
        let host = tunnel.host.clone();
        let ctx = Arc::new(ConnCtx::new(
            plane,
            self.shared.clone(),
            self.limits,
            act,
            Kind::Tunnel { tunnel, tls },
        ));
        if !tls {
            ctx.run_auto(io).await;
            return;
        }
        let cfg = match self.shared.server_config(&host).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(host = %host, "minting a leaf: {e}");
                return;
            }
        };
        let accept = tokio_rustls::TlsAcceptor::from(cfg).accept(io);
        match tokio::time::timeout(self.limits.handshake, accept).await {
            Ok(Ok(stream)) => ctx.run_auto(stream).await,
            Ok(Err(e)) => ctx.handshake_failed(&e.to_string()),
            Err(_) => ctx.handshake_failed("timed out"),
        }
    }

    /// Serves a plain HTTP forward-proxy connection (`GET http://host/path` on port 3128) whose
    /// first request head the listener already authenticated; `guest` replays the bytes the
    /// listener read. Every request on it is authenticated and decided again.
    pub async fn serve_forward<S>(&self, plane: Arc<Plane>, guest: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let act = Activity::new();
        let io = Tracked {
            inner: guest,
            first: None,
            act: act.clone(),
        };
        let ctx = Arc::new(ConnCtx::new(
            plane,
            self.shared.clone(),
            self.limits,
            act,
            Kind::Forward,
        ));
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read)
            .max_buf_size(MAX_HEADER_BYTES)
            .keep_alive(true);
        let c = ctx.clone();
        let svc = service_fn(move |req| {
            let c = c.clone();
            async move { Ok::<_, Infallible>(c.handle(req).await) }
        });
        let conn = b.serve_connection(TokioIo::new(io), svc).with_upgrades();
        drive!(conn, ctx);
    }
}

// ---------------------------------------------------------------------------------------------
// Leaves

/// Host → its TLS configuration, least recently used evicted. Hand-written: a map with a use
/// counter; eviction scans at most `LEAF_CACHE` entries, far cheaper than the mint it follows.
type LeafCell = Arc<OnceCell<Arc<rustls::ServerConfig>>>;

#[derive(Default)]
struct LeafCache {
    /// Host → (its configuration once minted, when last used).
    map: HashMap<String, (LeafCell, u64)>,
    tick: u64,
}

impl LeafCache {
    fn entry(&mut self, host: &str) -> LeafCell {
        self.tick += 1;
        let tick = self.tick;
        if let Some((cell, used)) = self.map.get_mut(host) {
            *used = tick;
            return cell.clone();
        }
        if self.map.len() >= LEAF_CACHE {
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(h, _)| h.clone())
            {
                self.map.remove(&oldest);
            }
        }
        let cell = Arc::new(OnceCell::new());
        self.map.insert(host.to_string(), (cell.clone(), tick));
        cell
    }
}

impl Shared {
    /// The guest-facing TLS configuration for `host` (normalized), minted once.
    async fn server_config(&self, host: &str) -> std::result::Result<Arc<rustls::ServerConfig>, String> {
        let cell = lock(&self.leaves).entry(host);
        cell.get_or_try_init(|| async {
            let ca = self.ca.clone();
            let provider = self.provider.clone();
            let name = host.trim_start_matches('[').trim_end_matches(']').to_string();
            tokio::task::spawn_blocking(move || mint(&ca, provider, &name))
                .await
                .map_err(|e| e.to_string())?
        })
        .await
        .cloned()
    }
}

fn mint(
    ca: &GroupCa,
    provider: Arc<rustls::crypto::CryptoProvider>,
    name: &str,
) -> std::result::Result<Arc<rustls::ServerConfig>, String> {
    let leaf = ca.issue(&[name.to_string()]).map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(leaf.cert_der)], key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSIONS_PER_HOST);
    Ok(Arc::new(cfg))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// A guest connection

enum Kind {
    /// Inside a CONNECT; `tls` when the guest spoke TLS (else plain HTTP, the port 80 case).
    Tunnel { tunnel: Tunnel, tls: bool },
    /// The plain forward proxy (absolute-form requests).
    Forward,
}

struct ConnCtx {
    plane: Arc<Plane>,
    shared: Arc<Shared>,
    limits: Limits,
    act: Arc<Activity>,
    kind: Kind,
    pool: Arc<Mutex<Pool>>,
    audit_logged: AtomicBool,
    close: Notify,
}

/// Where a request goes.
struct Target {
    host: String,
    port: u16,
    tls: bool,
}

impl Target {
    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// `host` or `host:port` when the port is not the scheme's.
    fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn key(&self) -> Key {
        (self.host.clone(), self.port)
    }
}

/// Why a request was not forwarded after the policy allowed it.
struct Fail {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

impl Fail {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Fail {
        Fail {
            status,
            reason,
            message: message.into(),
        }
    }
}

impl ConnCtx {
    fn new(plane: Arc<Plane>, shared: Arc<Shared>, limits: Limits, act: Arc<Activity>, kind: Kind) -> ConnCtx {
        ConnCtx {
            plane,
            shared,
            limits,
            act,
            kind,
            pool: Arc::new(Mutex::new(Pool::default())),
            audit_logged: AtomicBool::new(false),
            close: Notify::new(),
        }
    }

    async fn run_auto<I>(self: Arc<Self>, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read)
            .max_buf_size(MAX_HEADER_BYTES)
            .keep_alive(true);
        b.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_H2_STREAMS)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .keep_alive_interval(self.limits.h2_keep_alive)
            .keep_alive_timeout(self.limits.h2_keep_alive);
        let c = self.clone();
        let svc = service_fn(move |req| {
            let c = c.clone();
            async move { Ok::<_, Infallible>(c.handle(req).await) }
        });
        let conn = b.serve_connection_with_upgrades(TokioIo::new(io), svc);
        drive!(conn, self);
    }

    /// The guest's TLS handshake failed: the guest does not trust the group CA, pins, or is not
    /// speaking TLS. In audit mode this is the only trace of a denied host, so it is a decision.
    fn handshake_failed(&self, why: &str) {
        let Kind::Tunnel { tunnel, .. } = &self.kind else {
            return;
        };
        tracing::info!(client = %tunnel.client.name, host = %tunnel.host, port = tunnel.port, "guest TLS handshake failed: {why}");
        if tunnel.audit_only {
            self.plane.events.record(Decision {
                at: plane::now(),
                client: tunnel.client.name.clone(),
                method: "CONNECT".into(),
                scheme: "https".into(),
                host: tunnel.host.clone(),
                port: tunnel.port,
                mode: Some(Mode::Audit),
                reason: "tls-handshake".into(),
                ..Default::default()
            });
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResBody> {
        let start = Instant::now();
        let busy = self.act.begin();
        match &self.kind {
            Kind::Tunnel { tunnel, tls } => {
                let target = Target {
                    host: tunnel.host.clone(),
                    port: tunnel.port,
                    tls: *tls,
                };
                if tunnel.audit_only {
                    return self.audit_only(tunnel, &target, &req);
                }
                let policy = self.plane.policy.get();
                let client = policy.client_by_name(&tunnel.client.name);
                self.decide(&policy, &tunnel.client.name, client, target, req, start, busy)
                    .await
            }
            Kind::Forward => self.forward_request(req, start, busy).await,
        }
    }

    fn audit_only(&self, tunnel: &Tunnel, target: &Target, req: &Request<Incoming>) -> Response<ResBody> {
        let mut d = self.decision(&tunnel.client.name, target, req);
        if !self.audit_logged.swap(true, Ordering::SeqCst) {
            d.mode = Some(Mode::Audit);
            d.reason = DenyReason::NoRule.as_str().into();
            d.status = 403;
            self.plane.events.record(d.clone());
        }
        self.close.notify_one();
        let mut r = text(StatusCode::FORBIDDEN, deny_text(&d, DenyReason::NoRule.as_str()));
        if req.version() < Version::HTTP_2 {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }

    fn decision(&self, client: &str, target: &Target, req: &Request<Incoming>) -> Decision {
        Decision {
            at: plane::now(),
            client: client.to_string(),
            method: req.method().as_str().to_string(),
            scheme: target.scheme().into(),
            host: target.host.clone(),
            port: target.port,
            path: rules::path_of(req.uri().path()).to_string(),
            ..Default::default()
        }
    }

    /// Records a deny and answers it.
    fn deny(
        &self,
        mut d: Decision,
        status: StatusCode,
        reason: &str,
        body: String,
        start: Instant,
    ) -> Response<ResBody> {
        d.allow = false;
        d.mode = Some(self.plane.mode);
        d.reason = reason.to_string();
        d.status = status.as_u16();
        d.duration_ms = start.elapsed().as_millis() as u64;
        self.plane.events.record(d);
        text(status, body)
    }

    async fn forward_request(
        self: &Arc<Self>,
        req: Request<Incoming>,
        start: Instant,
        busy: Busy,
    ) -> Response<ResBody> {
        let policy = self.plane.policy.get();
        let uri = req.uri();
        let (Some("http"), Some(auth)) = (uri.scheme_str(), uri.authority()) else {
            return text(
                StatusCode::BAD_REQUEST,
                "slicer-proxy: send absolute-form http:// requests here; use CONNECT for https\n".into(),
            );
        };
        let Ok(host) = rules::normalize_host(auth.host()) else {
            return text(StatusCode::BAD_REQUEST, "slicer-proxy: invalid host\n".into());
        };
        let target = Target {
            host,
            port: auth.port_u16().unwrap_or(80),
            tls: false,
        };
        let (client, reason) = match proxy_token(req.headers()) {
            None => (None, "no-token"),
            Some(t) => (policy.client(&t), "bad-token"),
        };
        let Some(client) = client else {
            let d = self.decision("", &target, &req);
            let mut r = self.deny(
                d,
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                reason,
                "slicer-proxy: proxy authentication required\n".into(),
                start,
            );
            r.headers_mut().insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"slicer-proxy\""),
            );
            return r;
        };
        let name = client.name.clone();
        self.decide(&policy, &name, Some(client), target, req, start, busy)
            .await
    }

    /// Decides one request against `policy` and forwards it when allowed.
    #[allow(clippy::too_many_arguments)]
    async fn decide(
        self: &Arc<Self>,
        policy: &Policy,
        client_name: &str,
        client: Option<Arc<ClientPolicy>>,
        target: Target,
        req: Request<Incoming>,
        start: Instant,
        busy: Busy,
    ) -> Response<ResBody> {
        let d = self.decision(client_name, &target, &req);
        let decision = match &client {
            // A client deleted since the CONNECT has no rule any more.
            None => RequestDecision::Deny(DenyReason::NoRule),
            // A CONNECT inside a tunnel or through the forward proxy is not a request to forward.
            Some(_) if req.method() == Method::CONNECT => RequestDecision::Deny(DenyReason::NoMatch),
            Some(c) => policy.request(c, &target.host, target.port, &d.method, &d.path, plane::now()),
        };
        match decision {
            RequestDecision::Deny(r) => {
                let body = deny_text(&d, r.as_str());
                self.deny(d, StatusCode::FORBIDDEN, r.as_str(), body, start)
            }
            RequestDecision::Allow { inject, .. } => self.forward(d, target, inject, req, start, busy).await,
        }
    }

    async fn forward(
        self: &Arc<Self>,
        mut d: Decision,
        target: Target,
        inject: Option<Credential>,
        mut req: Request<Incoming>,
        start: Instant,
        busy: Busy,
    ) -> Response<ResBody> {
        let upgrade = is_upgrade(&req);
        let guest_version = req.version();
        let guest_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        if let Some(cred) = &inject {
            parts.headers.remove(header::AUTHORIZATION);
            let Ok(mut v) = HeaderValue::from_str(&cred.authorization) else {
                let body = format!("slicer-proxy: secret {} cannot be sent as a header\n", cred.secret);
                return self.deny(d, StatusCode::INTERNAL_SERVER_ERROR, "secret-invalid", body, start);
            };
            v.set_sensitive(true);
            parts.headers.insert(header::AUTHORIZATION, v);
            d.secret = cred.secret.clone();
        }
        parts.extensions = http::Extensions::new();
        let meter = Arc::new(Meter::default());
        let req = Request::from_parts(parts, Counted::new(body, meter.clone(), false));
        let (mut resp, sender) = match self.send(&target, req, upgrade).await {
            Ok(r) => r,
            Err(f) => {
                let body = format!("slicer-proxy: {}\n", f.message);
                return self.deny(d, f.status, f.reason, body, start);
            }
        };
        d.allow = true;
        d.status = resp.status().as_u16();
        let mut finish = Finish {
            plane: self.plane.clone(),
            d,
            meter: meter.clone(),
            start,
            _busy: busy,
            pool_return: None,
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(guest_upgrade) = guest_upgrade {
                let up_upgrade = hyper::upgrade::on(&mut resp);
                let (mut parts, _) = resp.into_parts();
                parts.extensions = http::Extensions::new();
                parts.version = guest_version;
                tokio::spawn(splice(guest_upgrade, up_upgrade, finish));
                return Response::from_parts(parts, empty());
            }
        }
        if let Some(Sender::H1(s)) = sender {
            finish.pool_return = Some((self.pool.clone(), target.key(), Sender::H1(s)));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        parts.extensions = http::Extensions::new();
        parts.version = guest_version;
        let mut body = Counted::new(body, meter, true);
        body.finish = Some(finish);
        Response::from_parts(parts, UnsyncBoxBody::new(body))
    }

    /// Sends `req` on a pooled upstream connection or a new one. Returns the response and, for
    /// HTTP/1.1, the connection to pool again once the response body ended.
    async fn send(
        &self,
        target: &Target,
        mut req: Request<ReqBody>,
        upgrade: bool,
    ) -> std::result::Result<(Response<Incoming>, Option<Sender>), Fail> {
        let key = target.key();
        if !upgrade {
            let pooled = lock(&self.pool).take(&key);
            if let Some(mut s) = pooled {
                let ready = match &mut s {
                    Sender::H1(h) => tokio::time::timeout(Duration::from_secs(1), h.ready())
                        .await
                        .is_ok_and(|r| r.is_ok()),
                    Sender::H2(h) => h.ready().await.is_ok(),
                };
                if ready {
                    shape(&mut req, &s, target)?;
                    match s.send(req).await {
                        Ok(resp) => return Ok((resp, s.keep(&self.pool, key))),
                        // Not sent (the connection closed meanwhile): try a new connection.
                        Err(SendErr::Retry(r)) => req = *r,
                        Err(SendErr::Failed(e)) => return Err(upstream_error(e)),
                    }
                }
            }
        }
        let mut s = self.connect(target, upgrade).await?;
        shape(&mut req, &s, target)?;
        match s.send(req).await {
            Ok(resp) if upgrade => Ok((resp, None)),
            Ok(resp) => Ok((resp, s.keep(&self.pool, key))),
            Err(SendErr::Retry(_)) => Err(Fail::new(
                StatusCode::BAD_GATEWAY,
                "upstream-error",
                "the upstream closed the connection",
            )),
            Err(SendErr::Failed(e)) => Err(upstream_error(e)),
        }
    }

    async fn connect(&self, target: &Target, h1_only: bool) -> std::result::Result<Sender, Fail> {
        let (tcp, _addr) = tokio::time::timeout(
            self.limits.upstream_connect,
            self.plane.upstream.connect(&target.host, target.port),
        )
        .await
        .map_err(|_| {
            Fail::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream-timeout",
                format!("connecting to {} timed out", target.host),
            )
        })?
        .map_err(|e| match e {
            UpstreamError::Refused { .. } => Fail::new(
                StatusCode::FORBIDDEN,
                "upstream-refused",
                format!("{} resolves to an address the proxy may not reach", target.host),
            ),
            e => Fail::new(StatusCode::BAD_GATEWAY, "upstream-connect", e.to_string()),
        })?;
        let _ = tcp.set_nodelay(true);
        let (io, h2): (Box<dyn Io>, bool) = if target.tls {
            let bare = target.host.trim_start_matches('[').trim_end_matches(']').to_string();
            let name = ServerName::try_from(bare)
                .map_err(|e| Fail::new(StatusCode::BAD_GATEWAY, "upstream-tls", format!("{}: {e}", target.host)))?;
            let cfg = if h1_only {
                self.shared.client_h1.clone()
            } else {
                self.shared.client_alpn.clone()
            };
            let tls_fail = |why: String| {
                Fail::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream-tls",
                    format!("TLS to {}: {why}", target.host),
                )
            };
            let s = tokio::time::timeout(
                self.limits.handshake,
                tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
            )
            .await
            .map_err(|_| tls_fail("timed out".into()))?
            .map_err(|e| tls_fail(e.to_string()))?;
            let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
            (Box::new(s), h2)
        } else {
            (Box::new(tcp), false)
        };
        let io = TokioIo::new(io);
        if h2 {
            let (s, conn) = client2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(self.limits.h2_keep_alive)
                .keep_alive_timeout(self.limits.h2_keep_alive)
                .max_header_list_size(MAX_UPSTREAM_HEADER_BYTES as u32)
                .handshake(io)
                .await
                .map_err(upstream_error)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("upstream h2 connection: {e}");
                }
            });
            Ok(Sender::H2(s))
        } else {
            let (s, conn) = client1::Builder::new()
                .max_buf_size(MAX_UPSTREAM_HEADER_BYTES)
                .handshake(io)
                .await
                .map_err(upstream_error)?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!("upstream connection: {e}");
                }
            });
            Ok(Sender::H1(s))
        }
    }
}

fn upstream_error(e: hyper::Error) -> Fail {
    Fail::new(StatusCode::BAD_GATEWAY, "upstream-error", format!("upstream: {e}"))
}

/// Sets the target form, version and `Host`/`:authority` for the upstream's protocol. The
/// authority is always the tunnel's (or the absolute URI's) host: what the policy decided on.
fn shape(req: &mut Request<ReqBody>, s: &Sender, target: &Target) -> std::result::Result<(), Fail> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .filter(|p| p.starts_with('/'))
        .unwrap_or_else(|| "/".into());
    let authority = target.authority();
    let bad = |_| Fail::new(StatusCode::BAD_REQUEST, "bad-request", "invalid request target");
    match s {
        Sender::H2(_) => {
            *req.uri_mut() = Uri::try_from(format!("{}://{authority}{pq}", target.scheme())).map_err(bad)?;
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(header::HOST);
        }
        Sender::H1(_) => {
            *req.uri_mut() = Uri::try_from(pq).map_err(bad)?;
            *req.version_mut() = Version::HTTP_11;
            let host = HeaderValue::from_str(&authority)
                .map_err(|_| Fail::new(StatusCode::BAD_REQUEST, "bad-request", "invalid host"))?;
            req.headers_mut().insert(header::HOST, host);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Upstream connections

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum Sender {
    H1(client1::SendRequest<ReqBody>),
    H2(client2::SendRequest<ReqBody>),
}

enum SendErr {
    /// Not sent; the request is back.
    Retry(Box<Request<ReqBody>>),
    Failed(hyper::Error),
}

impl Sender {
    async fn send(&mut self, req: Request<ReqBody>) -> std::result::Result<Response<Incoming>, SendErr> {
        let r = match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => s.try_send_request(req).await,
        };
        r.map_err(|mut e| match e.take_message() {
            Some(req) => SendErr::Retry(Box::new(req)),
            None => SendErr::Failed(e.into_error()),
        })
    }

    /// An h2 connection goes back to the pool at once (it multiplexes); an HTTP/1.1 one is
    /// returned, to be pooled when the response body ended.
    fn keep(self, pool: &Mutex<Pool>, key: Key) -> Option<Sender> {
        match self {
            Sender::H2(s) => {
                lock(pool).put(key, Sender::H2(s));
                None
            }
            s => Some(s),
        }
    }
}

/// A guest connection's idle upstream connections (several keys only for the forward proxy).
#[derive(Default)]
struct Pool {
    h2: Vec<(Key, client2::SendRequest<ReqBody>)>,
    h1: Vec<(Key, client1::SendRequest<ReqBody>)>,
}

impl Pool {
    fn take(&mut self, key: &Key) -> Option<Sender> {
        self.h2.retain(|(_, s)| !s.is_closed());
        if let Some((_, s)) = self.h2.iter().find(|(k, _)| k == key) {
            return Some(Sender::H2(s.clone()));
        }
        self.h1.retain(|(_, s)| !s.is_closed());
        let i = self.h1.iter().rposition(|(k, _)| k == key)?;
        Some(Sender::H1(self.h1.swap_remove(i).1))
    }

    fn put(&mut self, key: Key, s: Sender) {
        match s {
            Sender::H2(s) => {
                if self.h2.iter().any(|(k, _)| *k == key) {
                    return;
                }
                if self.h2.len() >= MAX_IDLE_UPSTREAM {
                    self.h2.remove(0);
                }
                self.h2.push((key, s));
            }
            Sender::H1(s) => {
                if s.is_closed() {
                    return;
                }
                if self.h1.len() >= MAX_IDLE_UPSTREAM {
                    self.h1.remove(0);
                }
                self.h1.push((key, s));
            }
        }
    }
}

async fn splice(guest: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade, finish: Finish) {
    let (g, u) = tokio::join!(guest, up);
    if let (Ok(g), Ok(u)) = (g, u) {
        let mut g = Metered {
            inner: TokioIo::new(g),
            meter: finish.meter.clone(),
            down: false,
        };
        let mut u = Metered {
            inner: TokioIo::new(u),
            meter: finish.meter.clone(),
            down: true,
        };
        if let Err(e) = tokio::io::copy_bidirectional(&mut g, &mut u).await {
            tracing::debug!("upgraded connection: {e}");
        }
    }
    finish.done(false);
}

// ---------------------------------------------------------------------------------------------
// Bodies and decisions

#[derive(Default)]
struct Meter {
    up: AtomicU64,
    down: AtomicU64,
}

impl Meter {
    fn add(&self, down: bool, n: u64) {
        if down {
            self.down.fetch_add(n, Ordering::Relaxed);
        } else {
            self.up.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// An upgraded stream counting the bytes read from it (guest side: up, upstream side: down),
/// so a splice that ends with a reset still reports what it moved.
struct Metered<T> {
    inner: T,
    meter: Arc<Meter>,
    down: bool,
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.meter.add(self.down, n);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What is recorded when a forwarded request's response ends.
struct Finish {
    plane: Arc<Plane>,
    d: Decision,
    meter: Arc<Meter>,
    start: Instant,
    _busy: Busy,
    /// An HTTP/1.1 upstream connection to pool again when the body ended cleanly.
    pool_return: Option<(Arc<Mutex<Pool>>, Key, Sender)>,
}

impl Finish {
    fn done(mut self, clean: bool) {
        if clean {
            if let Some((pool, key, s)) = self.pool_return.take() {
                lock(&pool).put(key, s);
            }
        }
        let mut d = std::mem::take(&mut self.d);
        d.bytes_up = self.meter.up.load(Ordering::Relaxed);
        d.bytes_down = self.meter.down.load(Ordering::Relaxed);
        d.duration_ms = self.start.elapsed().as_millis() as u64;
        self.plane.events.record(d);
    }
}

/// A body passed through while its data bytes are counted; the response side records the
/// decision when it ends (or is dropped: a guest that went away mid-download).
struct Counted<B> {
    inner: B,
    meter: Arc<Meter>,
    down: bool,
    finish: Option<Finish>,
}

impl<B> Counted<B> {
    fn new(inner: B, meter: Arc<Meter>, down: bool) -> Counted<B> {
        Counted {
            inner,
            meter,
            down,
            finish: None,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(data) = f.data_ref() {
                    self.meter.add(self.down, data.len() as u64);
                }
                // hyper stops polling a body that says it ended (a known length read whole).
                if self.inner.is_end_stream() {
                    if let Some(f) = self.finish.take() {
                        f.done(true);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = self.finish.take() {
                    f.done(true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = self.finish.take() {
                    f.done(false);
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            f.done(false);
        }
    }
}

fn empty() -> ResBody {
    UnsyncBoxBody::new(Empty::new().map_err(|n: Infallible| match n {}))
}

fn text(status: StatusCode, body: String) -> Response<ResBody> {
    let mut r = Response::new(UnsyncBoxBody::new(
        Full::new(Bytes::from(body)).map_err(|n: Infallible| match n {}),
    ));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The 403 body: which rule is missing (no secret, no token).
fn deny_text(d: &Decision, reason: &str) -> String {
    let mut path: String = d.path.chars().take(MAX_ECHO_PATH).collect();
    if path.len() < d.path.len() {
        path.push_str("...");
    }
    let what = if reason == DenyReason::NoMatch.as_str() {
        "no rule for this method and path"
    } else {
        "no rule for this host and port"
    };
    format!(
        "slicer-proxy: denied ({reason}): {what}: client {:?} {} {}://{}:{}{}\n",
        d.client,
        d.method,
        d.scheme,
        d.host,
        d.port,
        path.escape_debug()
    )
}

// ---------------------------------------------------------------------------------------------
// Headers

fn has_token(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// An HTTP/1.1 `Connection: upgrade` request with an `Upgrade` header (WebSocket and friends).
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && has_token(req.headers(), header::CONNECTION, "upgrade")
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1) and the proxy's own, keeping `Connection:
/// upgrade` and `Upgrade` for an upgrade.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(keep_upgrade && n == header::UPGRADE) {
            h.remove(n);
        }
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        if !(keep_upgrade && n == header::UPGRADE) {
            h.remove(n);
        }
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // `TE: trailers` is the one TE value HTTP/2 allows (gRPC needs it).
    if h.get_all(header::TE)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        h.remove(header::TE);
    }
}

/// The token of `Proxy-Authorization: Basic base64(user:token)` (parsed as the listener does).
pub fn proxy_token(h: &HeaderMap) -> Option<String> {
    crate::server::basic_token(h.get(header::PROXY_AUTHORIZATION)?.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Idleness

/// When a guest connection last moved a byte, and how many requests it has in flight.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// How long nothing happened (zero while a request is in flight).
    fn idle_for(&self) -> Duration {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A request in flight (until its response body ended).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// The guest's stream, noting activity, with the first byte (read to tell TLS from plain
/// HTTP) put back in front. Hand-written: tokio's `chain` is read-only.
struct Tracked<S> {
    inner: S,
    first: Option<u8>,
    act: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> Tracked<S> {
    async fn read_first(&mut self) -> io::Result<Option<u8>> {
        let mut b = [0u8; 1];
        let n = self.inner.read(&mut b).await?;
        self.act.touch();
        if n == 0 {
            return Ok(None);
        }
        self.first = Some(b[0]);
        Ok(Some(b[0]))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() > 0 {
            if let Some(b) = self.first.take() {
                buf.put_slice(&[b]);
                return Poll::Ready(Ok(()));
            }
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.act.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.act.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.act.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret-Hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic eA=="));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
    }

    #[test]
    fn proxy_tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(proxy_token(&h), None);
        let v = format!(
            "Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "proxy:spt_abc")
        );
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_str(&v).unwrap());
        assert_eq!(proxy_token(&h).as_deref(), Some("spt_abc"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Bearer spt_abc"));
        assert_eq!(proxy_token(&h), None);
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(proxy_token(&h), None);
    }

    #[test]
    fn leaf_cache_is_bounded_lru() {
        let mut c = LeafCache::default();
        let first = c.entry("h0");
        for i in 1..LEAF_CACHE {
            c.entry(&format!("h{i}"));
        }
        // h0 used again: h1 is now the oldest.
        assert!(Arc::ptr_eq(&first, &c.entry("h0")));
        c.entry("new");
        assert_eq!(c.map.len(), LEAF_CACHE);
        assert!(c.map.contains_key("h0") && !c.map.contains_key("h1"));
    }

    #[test]
    fn deny_text_has_no_control_characters() {
        let d = Decision {
            client: "c".into(),
            method: "GET".into(),
            scheme: "https".into(),
            host: "h".into(),
            port: 443,
            path: "/a\r\nX: y".into(),
            ..Default::default()
        };
        let t = deny_text(&d, "no-match");
        assert_eq!(t.matches('\n').count(), 1, "{t}");
    }
}
