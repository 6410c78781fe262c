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
//!
//! Here: the interceptor and a guest connection's requests. `leaf`: the leaf cache; `pool`:
//! upstream connections; `body`: metered bodies and answers; `headers`: hop-by-hop handling;
//! `activity`: idleness.

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

mod activity;
mod body;
mod headers;
mod leaf;
mod pool;

pub use headers::proxy_token;

use activity::*;
use body::*;
use headers::*;
use leaf::*;
use pool::*;

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

#[cfg(test)]
mod tests;
