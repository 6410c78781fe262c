//! The interceptor end to end on loopback: a guest client through `Interceptor::serve` (and
//! `serve_forward`) to HTTPS and plain upstreams.

#[path = "mitm_common/mod.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use slicer_proxy::control::{Mode, SecretKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2"];
const BOTH: &[&[u8]] = &[b"h2", b"http/1.1"];

/// An HTTPS upstream for api.test (h2 and HTTP/1.1, its own CA) and a strict plane whose one
/// rule allows it.
async fn api_test_allowed() -> (TestCa, TestUpstream, Fixture) {
    let up_ca = TestCa::new();
    let up = TestUpstream::start(Some(up_ca.server_config("api.test", BOTH))).await;
    let f = fixture(
        policy(vec![rule("api.test", up.port)], vec![]),
        Mode::Strict,
        vec![up_ca.der.clone()],
    );
    (up_ca, up, f)
}

#[tokio::test]
async fn bearer_injected_over_every_protocol_pair() {
    let up_ca = TestCa::new();
    for (guest_alpn, up_alpn) in [(H1, H1), (H1, BOTH), (H2, H1), (H2, BOTH)] {
        let up = TestUpstream::start(Some(up_ca.server_config("api.test", up_alpn))).await;
        let mut r = rule("api.test", up.port);
        r.secret = "openai".into();
        let p = policy(
            vec![r],
            vec![secret("openai", "api.test", SecretKind::Bearer, SECRET_VALUE)],
        );
        let mut f = fixture(p, Mode::Strict, vec![up_ca.der.clone()]);
        let mut g = f.guest(f.tunnel("api.test", up.port, false), guest_alpn).await;
        assert_eq!(g.is_h2(), guest_alpn == H2);
        for i in 0..3 {
            let req = Request::get(format!("https://api.test:{}/v1/models?x={i}", up.port))
                .header("authorization", "Bearer guest-own-fake")
                .header("proxy-authorization", "Basic eDp5")
                .body(body(b""))
                .unwrap();
            let resp = g.send(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"hello");
            let d = f.decision().await;
            assert!(d.allow, "{}", d.log_line());
            assert_eq!(
                (d.method.as_str(), d.path.as_str(), d.secret.as_str(), d.status),
                ("GET", "/v1/models", "openai", 200)
            );
            assert_eq!(d.bytes_down, 5);
            assert!(!d.log_line().contains(SECRET_VALUE));
        }
        let seen = up.seen();
        assert_eq!(seen.len(), 3);
        for s in &seen {
            assert_eq!(s.authorization, vec![format!("Bearer {SECRET_VALUE}")], "{s:?}");
            assert!(!s.proxy_authorization);
            assert_eq!(s.host.as_deref(), Some(format!("api.test:{}", up.port).as_str()));
            assert_eq!(s.version == Version::HTTP_2, up_alpn == BOTH, "{s:?}");
        }
        // Keep-alive: the three requests shared one upstream connection.
        assert_eq!(up.connections.load(Ordering::SeqCst), 1, "{guest_alpn:?} {up_alpn:?}");
    }
}

#[tokio::test]
async fn basic_secret_and_filters() {
    let up_ca = TestCa::new();
    let up = TestUpstream::start(Some(up_ca.server_config("api.test", BOTH))).await;
    let mut r = rule("api.test", up.port);
    r.secret = "admin".into();
    r.methods = vec!["GET".into()];
    r.paths = vec!["/system/*".into()];
    let p = policy(
        vec![r],
        vec![secret("admin", "api.test", SecretKind::Basic, "user:pa ss")],
    );
    let mut f = fixture(p, Mode::Strict, vec![up_ca.der.clone()]);
    let mut g = f.guest(f.tunnel("api.test", up.port, false), BOTH).await;
    let base = format!("https://api.test:{}", up.port);
    let (s, _) = g.get(&format!("{base}/system/info")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(f.decision().await.allow);
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("user:pa ss")
    );
    assert_eq!(up.seen()[0].authorization, vec![want]);

    for (method, path) in [
        ("POST", "/system/info"),
        ("GET", "/other"),
        ("GET", "/system/%2e%2e/admin"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .body(body(b"x"))
            .unwrap();
        let resp = g.send(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{method} {path}");
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains("no-match") && !text.contains("pa ss"), "{text}");
        let d = f.decision().await;
        assert!(!d.allow);
        assert_eq!(
            (d.method.as_str(), d.reason.as_str(), d.status),
            (method, "no-match", 403)
        );
        assert_eq!(d.mode, Some(Mode::Strict));
    }
    assert_eq!(up.seen().len(), 1, "denied requests never reach the upstream");
}

#[tokio::test]
async fn removed_rule_stops_the_next_request_of_an_open_tunnel() {
    let (_up_ca, up, mut f) = api_test_allowed().await;
    for alpn in [H1, H2] {
        f.plane.policy.set(policy(vec![rule("api.test", up.port)], vec![]));
        let mut g = f.guest(f.tunnel("api.test", up.port, false), alpn).await;
        let url = format!("https://api.test:{}/a", up.port);
        assert_eq!(g.get(&url).await.0, StatusCode::OK);
        assert!(f.decision().await.allow);
        f.plane.policy.set(policy(vec![], vec![]));
        assert_eq!(g.get(&url).await.0, StatusCode::FORBIDDEN);
        let d = f.decision().await;
        assert_eq!((d.allow, d.reason.as_str()), (false, "no-rule"));
    }
}

#[tokio::test]
async fn audit_only_logs_the_first_request_and_never_connects() {
    let up_ca = TestCa::new();
    let up = TestUpstream::start(Some(up_ca.server_config("api.test", BOTH))).await;
    let mut f = fixture(policy(vec![], vec![]), Mode::Audit, vec![up_ca.der.clone()]);
    for alpn in [H1, H2] {
        let mut g = f.guest(f.tunnel("api.test", up.port, true), alpn).await;
        let (s, _) = g.get(&format!("https://api.test:{}/v1/models?k=v", up.port)).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let d = f.decision().await;
        assert_eq!(
            d.log_line(),
            format!(
                "deny client={CLIENT} method=GET scheme=https host=api.test port={} path=/v1/models mode=audit reason=no-rule status=403",
                up.port
            )
        );
    }
    f.no_decision(Duration::from_millis(200)).await;
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn upstream_with_an_untrusted_certificate_is_502() {
    let trusted = TestCa::new();
    let other = TestCa::new();
    let up = TestUpstream::start(Some(other.server_config("bad.test", BOTH))).await;
    let mut f = fixture(
        policy(vec![rule("bad.test", up.port)], vec![]),
        Mode::Strict,
        vec![trusted.der.clone()],
    );
    let mut g = f.guest(f.tunnel("bad.test", up.port, false), BOTH).await;
    let (s, text) = g.get(&format!("https://bad.test:{}/", up.port)).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{text:?}");
    let d = f.decision().await;
    assert_eq!((d.allow, d.reason.as_str(), d.status), (false, "upstream-tls", 502));
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn websocket_style_upgrade_is_spliced() {
    let (_up_ca, up, mut f) = api_test_allowed().await;
    let mut g = f.guest(f.tunnel("api.test", up.port, false), H1).await;
    let req = Request::get(format!("https://api.test:{}/ws", up.port))
        .header("connection", "Upgrade")
        .header("upgrade", "echo")
        .body(body(b""))
        .unwrap();
    let resp = g.send(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    for msg in [&b"ping"[..], b"pong pong"] {
        io.write_all(msg).await.unwrap();
        let mut buf = vec![0; msg.len()];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
    }
    drop(io);
    let d = f.decision().await;
    assert_eq!((d.allow, d.status, d.path.as_str()), (true, 101, "/ws"));
    assert_eq!((d.bytes_up, d.bytes_down), (13, 13));
    assert_eq!(up.seen()[0].version, Version::HTTP_11);
}

#[tokio::test]
async fn request_bodies_stream_up() {
    let (_up_ca, up, mut f) = api_test_allowed().await;
    for alpn in [H1, H2] {
        let mut g = f.guest(f.tunnel("api.test", up.port, false), alpn).await;
        let req = Request::post(format!("https://api.test:{}/echo", up.port))
            .body(body(b"hello upstream"))
            .unwrap();
        let resp = g.send(req).await.unwrap();
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello upstream");
        let d = f.decision().await;
        assert_eq!((d.bytes_up, d.bytes_down), (14, 14));
    }
}

#[tokio::test]
async fn plain_http_inside_connect() {
    let up = TestUpstream::start(None).await;
    let mut r = rule("plain.test", up.port);
    r.secret = "k".into();
    let mut f = fixture(
        policy(vec![r], vec![secret("k", "plain.test", SecretKind::Bearer, "v1")]),
        Mode::Strict,
        vec![],
    );
    let io = f.open(f.tunnel("plain.test", up.port, false));
    let mut g = Guest::handshake(TokioIo::new(io), false).await;
    let (s, b) = g.get(&format!("http://plain.test:{}/p", up.port)).await;
    assert_eq!((s, &b[..]), (StatusCode::OK, &b"hello"[..]));
    let d = f.decision().await;
    assert_eq!((d.allow, d.scheme.as_str()), (true, "http"));
    assert_eq!(up.seen()[0].authorization, vec!["Bearer v1".to_string()]);
}

#[tokio::test]
async fn forward_proxy_authenticates_every_request() {
    let up = TestUpstream::start(None).await;
    let mut r = rule("plain.test", up.port);
    r.paths = vec!["/ok".into()];
    let mut f = fixture(policy(vec![r], vec![]), Mode::Strict, vec![]);
    let (guest, proxy) = tokio::io::duplex(64 << 10);
    let (ix, plane) = (f.ix.clone(), f.plane.clone());
    tokio::spawn(async move { ix.serve_forward(plane, proxy).await });
    let mut g = Guest::handshake(TokioIo::new(guest), false).await;
    let auth = |tok: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("proxy:{tok}"))
        )
    };
    let url = format!("http://plain.test:{}/ok?q=1", up.port);
    let send = |g: &mut Guest, url: String, auth: Option<String>| {
        let mut b = Request::get(url);
        if let Some(a) = auth {
            b = b.header("proxy-authorization", a);
        }
        let req = b.body(body(b"")).unwrap();
        let Guest::H1(s) = g else { unreachable!() };
        // Absolute-form, as a client of a forward proxy sends it.
        let fut = s.send_request(req);
        async move {
            let r = fut.await.unwrap();
            let st = r.status();
            let h = r.headers().clone();
            let _ = r.into_body().collect().await.unwrap();
            (st, h)
        }
    };
    let (s, h) = send(&mut g, url.clone(), None).await;
    assert_eq!(s, StatusCode::PROXY_AUTHENTICATION_REQUIRED);
    assert_eq!(h["proxy-authenticate"], "Basic realm=\"slicer-proxy\"");
    assert_eq!(f.decision().await.reason, "no-token");
    let (s, _) = send(&mut g, url.clone(), Some(auth("wrong"))).await;
    assert_eq!(s, StatusCode::PROXY_AUTHENTICATION_REQUIRED);
    let d = f.decision().await;
    assert_eq!((d.reason.as_str(), d.client.as_str()), ("bad-token", ""));
    let (s, _) = send(&mut g, url.clone(), Some(auth(TOKEN))).await;
    assert_eq!(s, StatusCode::OK);
    let d = f.decision().await;
    assert_eq!((d.allow, d.client.as_str(), d.path.as_str()), (true, CLIENT, "/ok"));
    let (s, _) = send(&mut g, format!("http://plain.test:{}/no", up.port), Some(auth(TOKEN))).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(f.decision().await.reason, "no-match");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/ok?q=1", "origin-form upstream");
    assert_eq!(
        seen[0].host.as_deref(),
        Some(format!("plain.test:{}", up.port).as_str())
    );
    assert!(!seen[0].proxy_authorization);
}

#[tokio::test]
async fn concurrent_first_tunnels_share_one_leaf() {
    let up_ca = TestCa::new();
    let up = TestUpstream::start(Some(up_ca.server_config("api.test", BOTH))).await;
    let f = std::sync::Arc::new(fixture(
        policy(vec![rule("api.test", up.port)], vec![]),
        Mode::Strict,
        vec![up_ca.der.clone()],
    ));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let f = f.clone();
        let port = up.port;
        tasks.push(tokio::spawn(async move {
            let mut g = f.guest(f.tunnel("api.test", port, false), BOTH).await;
            g.get(&format!("https://api.test:{port}/")).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
}

/// Added latency of a keep-alive HTTPS request through the interceptor (guest over loopback
/// TCP) against the same request straight to the upstream. Prints p50/p99.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn latency_added_by_interception() {
    const N: usize = 2000;
    let up_ca = TestCa::new();
    let up = TestUpstream::start(Some(up_ca.server_config("api.test", H1))).await;
    let f = fixture(
        policy(vec![rule("api.test", up.port)], vec![]),
        Mode::Strict,
        vec![up_ca.der.clone()],
    );
    let url = format!("https://api.test:{}/", up.port);
    async fn measure(g: &mut Guest, url: &str) -> Vec<Duration> {
        let mut v = Vec::with_capacity(N);
        for _ in 0..N {
            let t = Instant::now();
            let (s, _) = g.get(url).await;
            assert_eq!(s, StatusCode::OK);
            v.push(t.elapsed());
        }
        v.sort();
        v
    }
    // Direct: TLS to the upstream with the test CA.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(up_ca.der.clone()))
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(local(up.port)).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect("api.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut direct = Guest::handshake(TokioIo::new(tls), false).await;
    measure(&mut direct, &url).await;
    let d = measure(&mut direct, &url).await;
    // Through the interceptor: the guest over a loopback TCP connection handed to `serve`.
    let l = tokio::net::TcpListener::bind(local(0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (ix, plane, tunnel) = (f.ix.clone(), f.plane.clone(), f.tunnel("api.test", up.port, false));
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        ix.serve(plane, tunnel, s).await;
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(f.ca.cert_der().to_vec()))
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect("api.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut via = Guest::handshake(TokioIo::new(tls), false).await;
    measure(&mut via, &url).await;
    let v = measure(&mut via, &url).await;
    let pct = |s: &[Duration], p: usize| s[(s.len() * p / 100).min(s.len() - 1)];
    println!(
        "direct p50 {:?} p99 {:?}; via interceptor p50 {:?} p99 {:?}; added p50 {:?} p99 {:?}",
        pct(&d, 50),
        pct(&d, 99),
        pct(&v, 50),
        pct(&v, 99),
        pct(&v, 50).saturating_sub(pct(&d, 50)),
        pct(&v, 99).saturating_sub(pct(&d, 99)),
    );
    let _ = Bytes::new();
}

#[tokio::test]
async fn idle_connections_close_and_huge_heads_are_refused() {
    use slicer_proxy::mitm::{Interceptor, Limits};
    let (up_ca, up, mut f) = api_test_allowed().await;
    let limits = Limits {
        idle: Duration::from_millis(300),
        ..Limits::default()
    };
    f.ix = std::sync::Arc::new(
        Interceptor::new(f.ca.clone(), vec![up_ca.der.clone()])
            .unwrap()
            .with_limits(limits),
    );
    for alpn in [H1, H2] {
        let mut g = f.guest(f.tunnel("api.test", up.port, false), alpn).await;
        assert_eq!(g.get(&format!("https://api.test:{}/", up.port)).await.0, StatusCode::OK);
        f.decision().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let closed = match &g {
                Guest::H1(s) => s.is_closed(),
                Guest::H2(s) => s.is_closed(),
            };
            if closed {
                break;
            }
            assert!(Instant::now() < deadline, "{alpn:?}: idle connection still open");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A 100 KiB header: HTTP/1.1 answers 431 (or closes), HTTP/2 refuses the stream.
    for alpn in [H1, H2] {
        let mut g = f.guest(f.tunnel("api.test", up.port, false), alpn).await;
        let req = Request::get(format!("https://api.test:{}/", up.port))
            .header("x-big", "a".repeat(100 << 10))
            .body(body(b""))
            .unwrap();
        if let Ok(r) = g.send(req).await {
            assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "{alpn:?}");
        }
    }
    f.no_decision(Duration::from_millis(200)).await;
    assert_eq!(up.seen().len(), 2);
}
