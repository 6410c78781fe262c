//! The proxy as `slicer proxy up` runs it (a process that drops root), driven over loopback,
//! with upstreams in a network namespace each test makes. Run as root.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use slicer_proxy::control::Mode;

#[test]
#[ignore = "full tier: needs root (network namespaces, an adapter, a uid of its own for the proxy)"]
fn drops_root_and_answers_407() {
    let p = Setup::new(&loopback_bind().to_string()).start();
    // Every thread: no uid 0, no capabilities (bounding set too), no new privileges, filtered.
    let tasks: Vec<u32> = std::fs::read_dir(format!("/proc/{}/task", p.pid()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    assert!(tasks.len() >= 2, "the runtime's threads: {tasks:?}");
    for t in tasks {
        let status = std::fs::read_to_string(format!("/proc/{}/task/{t}/status", p.pid())).unwrap();
        let field = |f: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{f}:")))
                .unwrap()
                .trim()
                .to_string()
        };
        for id in field("Uid").split_whitespace().chain(field("Gid").split_whitespace()) {
            let id: u32 = id.parse().unwrap();
            assert!(id >= slicer_jail_start(), "uid/gid {id} in {status}");
        }
        assert_eq!(field("Groups"), "");
        assert_eq!(field("CapEff"), "0000000000000000");
        assert_eq!(field("CapPrm"), "0000000000000000");
        assert_eq!(field("CapInh"), "0000000000000000");
        assert_eq!(field("CapBnd"), "0000000000000000");
        assert_eq!(field("CapAmb"), "0000000000000000");
        assert_eq!(field("NoNewPrivs"), "1");
        assert_eq!(field("Seccomp"), "2");
    }
    // The uid is nobody else's.
    let uid: u32 = p
        .status_field("Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let others = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != p.pid())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Uid:"))?
                        .split_whitespace()
                        .next()?
                        .parse::<u32>()
                        .ok()
                })
                == Some(uid)
        })
        .count();
    assert_eq!(others, 0, "another process runs as the proxy's uid {uid}");
    let limit = std::fs::read_to_string(format!("/proc/{}/limits", p.pid())).unwrap();
    assert!(
        limit
            .lines()
            .any(|l| l.starts_with("Max core file size") && l.contains(" 0 ")),
        "{limit}"
    );
    // It still works after all that (the resolver, the runtime, the TLS port).
    let head = ask(p.addr(3128), &connect_head("example.com:443", None));
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    assert!(
        head.contains("Proxy-Authenticate: Basic realm=\"slicer-proxy\""),
        "{head}"
    );
    p.wait_log(&[
        "deny",
        "method=CONNECT",
        "host=example.com",
        "reason=no-token",
        "status=407",
    ]);
}

fn slicer_jail_start() -> u32 {
    2_000_000_000
}

#[test]
#[ignore = "full tier: needs root (network namespaces, an adapter, a uid of its own for the proxy)"]
fn tokens_and_strict_deny() {
    let mut s = Setup::new(&loopback_bind().to_string());
    s.state = Some(state(1, vec![rule("allowed.example.com", &[], false)]));
    let p = s.start();
    for port in [3128, 3129] {
        let head = ask(p.addr(port), &connect_head("example.com:443", Some("spt_wrong")));
        assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    }
    p.wait_log(&["deny", "reason=bad-token", "status=407"]);
    let head = ask(p.addr(3128), &connect_head("denied.example.com:443", Some(TOKEN)));
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let line = p.wait_log(&["host=denied.example.com"]);
    assert_eq!(
        line,
        "deny client=c1 method=CONNECT scheme=https host=denied.example.com port=443 mode=strict reason=no-rule status=403"
    );
    // Over TLS on 3129 (the leaf for the bind address, signed by the group CA) the same.
    let mut tls = tls_client(&p);
    tls.write_all(connect_head("denied2.example.com:443", Some(TOKEN)).as_bytes())
        .unwrap();
    let head = read_head(&mut tls);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    p.wait_log(&["host=denied2.example.com", "reason=no-rule"]);
    assert!(
        !p.log.lock().unwrap().iter().any(|l| l.contains(TOKEN)),
        "a token was logged"
    );
}

/// A TLS connection to the proxy's port 3129 that trusts only the group's CA.
fn tls_client(p: &Proxy) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let ca_pem = std::fs::read_to_string(slicer_proxy::ca::ca_dir(p.base.path(), &p.group).join("ca.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for der in slicer_proxy::ca::pem_certs(&ca_pem) {
        roots.add(der.into()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(slicer_proxy::ca::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::IpAddress(p.bind.into());
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    rustls::StreamOwned::new(conn, client(p.addr(3129)))
}

fn socks_connect(addr: SocketAddr, token: &str, target: SocketAddr) -> Result<std::net::TcpStream, u8> {
    let mut s = client(addr);
    s.write_all(&[5, 1, 2]).unwrap();
    let mut two = [0u8; 2];
    s.read_exact(&mut two).unwrap();
    assert_eq!(two, [5, 2]);
    let mut auth = vec![1, 5];
    auth.extend_from_slice(b"proxy");
    auth.push(token.len() as u8);
    auth.extend_from_slice(token.as_bytes());
    s.write_all(&auth).unwrap();
    s.read_exact(&mut two).unwrap();
    if two != [1, 0] {
        return Err(0xff);
    }
    let IpAddr::V4(v4) = target.ip() else { panic!() };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.octets());
    req.extend_from_slice(&target.port().to_be_bytes());
    s.write_all(&req).unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).unwrap();
    if rep[1] == 0 {
        Ok(s)
    } else {
        Err(rep[1])
    }
}

#[test]
#[ignore = "full tier: needs root (network namespaces, an adapter, a uid of its own for the proxy)"]
fn passthrough_through_a_dummy_bind_address() {
    let ns = Netns::new();
    let echo = ns.echo_server();
    let third = ns.host_ip.octets()[2];
    let bind: std::net::Ipv4Addr = format!("10.202.{third}.1").parse().unwrap();
    let _link = DummyLink(slicer_proxy::adapter::link_name(bind));
    let mut s = Setup::new(&bind.to_string());
    s.state = Some(state(1, vec![rule(&echo.ip().to_string(), &[echo.port()], true)]));
    let p = s.start();
    assert_eq!(
        slicer_proxy::adapter::owner_of(IpAddr::V4(bind)).as_deref(),
        Some(slicer_proxy::adapter::link_name(bind).as_str())
    );
    let started = Instant::now();
    let mut t = tunnel(p.addr(3128), &echo.to_string()).unwrap();
    echo_roundtrip(&mut t, b"hello through the proxy");
    t.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let line = p.wait_log(&["allow", "scheme=tcp", &format!("port={}", echo.port())]);
    assert!(
        line.starts_with(&format!(
        "allow client=c1 method=CONNECT scheme=tcp host={} port={} mode=strict bytes_up=23 bytes_down=23 duration_ms=",
        echo.ip(),
        echo.port()
    )),
        "{line}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // SOCKS5 on either port.
    for port in [3128, 3129] {
        let mut t = socks_connect(p.addr(port), TOKEN, echo).unwrap();
        echo_roundtrip(&mut t, b"socks");
    }
    assert!(socks_connect(p.addr(3128), "spt_nope", echo).is_err());
    // CONNECT inside TLS on 3129; bytes the client sent right after the head reach upstream.
    let mut tls = tls_client(&p);
    let mut msg = connect_head(&echo.to_string(), Some(TOKEN)).into_bytes();
    msg.extend_from_slice(b"early");
    tls.write_all(&msg).unwrap();
    let head = read_head(&mut tls);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut back = [0u8; 5];
    tls.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"early");
    echo_roundtrip(&mut tls, b"inside tls");
    // A port the rule does not name is denied.
    let head = tunnel(p.addr(3128), &format!("{}:{}", echo.ip(), echo.port() + 1)).unwrap_err();
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}

#[test]
#[ignore = "full tier: needs root (network namespaces, an adapter, a uid of its own for the proxy)"]
fn upstream_safety_even_with_a_star_rule() {
    let ns = Netns::new();
    let echo = ns.echo_server();
    let own = slicer_proxy::upstream::host_addresses()
        .into_iter()
        .find(|a| matches!(a, IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_link_local()))
        .expect("a non-loopback address on the host");
    let mut s = Setup::new(&loopback_bind().to_string());
    s.opts.deny_cidrs = vec![format!("{}/32", echo.ip())];
    s.hosts = vec![
        ("metadata.test".into(), "169.254.169.254".parse().unwrap()),
        ("loop.test".into(), "::ffff:127.0.0.1".parse().unwrap()),
        ("echo.test".into(), echo.ip()),
    ];
    let mut st = state(1, vec![rule("*", &[80, 443, 22, echo.port()], true)]);
    st.vm_ranges = vec!["192.0.2.0/24".into()];
    s.state = Some(st);
    let p = s.start();
    let echo_port = echo.port();
    let targets = [
        "127.0.0.1:80".to_string(),
        "[::1]:80".into(),
        "[::ffff:127.0.0.1]:80".into(),
        "[::ffff:7f00:1]:443".into(),
        "0.0.0.0:80".into(),
        "[::]:80".into(),
        "169.254.169.254:80".into(),
        "[::ffff:169.254.169.254]:80".into(),
        "metadata.test:80".into(),
        "loop.test:80".into(),
        "localhost:80".into(),
        format!("{own}:22"),
        format!("{}:80", ns.host_ip),
        format!("{}:{echo_port}", p.bind),
        "192.0.2.7:443".into(),
        format!("{echo}"),
        format!("echo.test:{echo_port}"),
    ];
    for t in &targets {
        let head = tunnel(p.addr(3128), t).map(|_| "200".to_string()).unwrap_or_else(|h| h);
        assert!(head.starts_with("HTTP/1.1 403"), "{t}: {head}");
    }
    let n = p
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("deny client=c1") && l.contains("reason=upstream-refused"))
        .count();
    assert_eq!(n, targets.len());
    // SOCKS says "not allowed" for the same.
    assert_eq!(
        socks_connect(p.addr(3128), TOKEN, "169.254.169.254:80".parse().unwrap()).unwrap_err(),
        2
    );
}

#[test]
#[ignore = "full tier: needs root (network namespaces, an adapter, a uid of its own for the proxy)"]
fn hostile_heads() {
    let mut s = Setup::new(&loopback_bind().to_string());
    s.state = Some(state(1, vec![]));
    let p = s.start();
    let auth = basic(TOKEN);
    for bad in [
        format!("CONNECT foo HTTP/1.1\r\n{auth}\r\n"),
        format!("CONNECT foo:99999 HTTP/1.1\r\n{auth}\r\n"),
        format!("CONNECT :443 HTTP/1.1\r\n{auth}\r\n"),
        format!("CONNECT [zz]:1 HTTP/1.1\r\n{auth}\r\n"),
        format!("CONNECT a\"b:443 HTTP/1.1\r\n{auth}\r\n"),
        format!("GET /relative HTTP/1.1\r\n{auth}\r\n"),
        format!("CONNECT a:1 HTTP/1.1\r\n{auth}{auth}\r\n"),
        "GARBAGE\0\u{1}\r\n\r\n".to_string(),
        "CONNECT a:1 HTTP/1.1\r\nBad Header\r\n\r\n".to_string(),
    ] {
        let head = ask(p.addr(3128), &bad);
        assert!(head.starts_with("HTTP/1.1 400"), "{bad:?}: {head}");
    }
    // A 1 MiB header: 431, and the proxy still answers others.
    let mut big = client(p.addr(3128));
    let writer = {
        let mut w = big.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut msg = b"CONNECT a:443 HTTP/1.1\r\nX-Big: ".to_vec();
            msg.resize(1 << 20, b'a');
            let _ = w.write_all(&msg);
        })
    };
    let head = read_head(&mut big);
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    let _ = writer.join();
    let many: String = (0..150).map(|i| format!("X-{i}: y\r\n")).collect();
    let head = ask(p.addr(3128), &format!("CONNECT a:1 HTTP/1.1\r\n{many}\r\n"));
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    let head = ask(p.addr(3129), &connect_head("example.com:443", None));
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    // A head split over many writes still parses.
    let mut c = client(p.addr(3128));
    for b in connect_head("split.example.com:443", Some(TOKEN)).bytes() {
        c.write_all(&[b]).unwrap();
    }
    assert!(read_head(&mut c).starts_with("HTTP/1.1 403"));
}

fn rss_kib(pid: u32) -> u64 {
    proc_field(pid, "VmRSS").trim_end_matches(" kB").trim().parse().unwrap()
}

/// Raises this process's soft descriptor limit towards `n` (never its hard limit, which the
/// proxies this process starts inherit).
fn raise_nofile(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with valid structs.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = n.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

#[test]
#[ignore = "full tier: needs root (network namespaces, an adapter, a uid of its own for the proxy)"]
fn a_thousand_idle_connections() {
    raise_nofile(8192);
    let p = Setup::new(&loopback_bind().to_string()).start();
    let before = rss_kib(p.pid());
    let idle: Vec<_> = (0..1000).map(|_| client(p.addr(3128))).collect();
    // Each got a task (open_connections counts them once accepted).
    let mut d = Daemon::connect(&p);
    d.until(|v| v["type"] == "stats" && v["open_connections"].as_u64() >= Some(1000));
    let started = Instant::now();
    let head = ask(p.addr(3128), &connect_head("example.com:443", None));
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let rss = rss_kib(p.pid());
    eprintln!("RSS {before} KiB before, {rss} KiB with 1000 idle connections");
    assert!(rss < 64 * 1024, "RSS {rss} KiB");
    drop(idle);
}

#[test]
#[ignore = "full tier: needs root (network namespaces, an adapter, a uid of its own for the proxy)"]
fn caps_and_the_head_deadline() {
    let mut s = Setup::new(&loopback_bind().to_string());
    s.opts.max_connections = 8; // two per source address
    let p = s.start();
    let mut d = Daemon::connect(&p);
    // The start-up probe has gone.
    d.until(|v| v["type"] == "stats" && v["open_connections"] == 0);
    let mut a = client(p.addr(3128));
    let mut b = client(p.addr(3128));
    d.until(|v| v["type"] == "stats" && v["open_connections"] == 2);
    // The third from the same address is closed at once.
    let mut c = client(p.addr(3128));
    let mut one = [0u8; 1];
    assert!(matches!(c.read(&mut one), Ok(0) | Err(_)));
    d.until(|v| v["type"] == "stats" && v["refused_connections"].as_u64() >= Some(1));
    // Idle connections that never send a head are closed at the deadline (10 s).
    let started = Instant::now();
    for s in [&mut a, &mut b] {
        assert!(matches!(s.read(&mut one), Ok(0) | Err(_)));
    }
    let waited = started.elapsed();
    assert!(
        waited > Duration::from_secs(5) && waited < Duration::from_secs(14),
        "{waited:?}"
    );
    let head = ask(p.addr(3128), &connect_head("example.com:443", None));
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
}

#[test]
#[ignore = "full tier: needs root (network namespaces, an adapter, a uid of its own for the proxy)"]
fn a_client_that_stops_reading_blocks_nobody() {
    let ns = Netns::new();
    let echo = ns.echo_server();
    let mut s = Setup::new(&loopback_bind().to_string());
    s.state = Some(state(1, vec![rule(&echo.ip().to_string(), &[echo.port()], true)]));
    let p = s.start();
    let stuck = tunnel(p.addr(3128), &echo.to_string()).unwrap();
    let mut w = stuck.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    // Write until the buffers on the way (client, proxy, echo, back) are full.
    let chunk = vec![7u8; 64 << 10];
    let mut sent = 0usize;
    while w.write_all(&chunk).is_ok() {
        sent += chunk.len();
        assert!(sent < 1 << 30, "nothing pushed back");
    }
    // Others are served as usual meanwhile.
    for _ in 0..3 {
        let started = Instant::now();
        let mut t = tunnel(p.addr(3128), &echo.to_string()).unwrap();
        echo_roundtrip(&mut t, b"still fine");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    let head = ask(p.addr(3128), &connect_head("example.com:443", None));
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    drop(stuck);
}

#[test]
#[ignore = "full tier: needs root (network namespaces, an adapter, a uid of its own for the proxy)"]
fn rules_change_over_the_control_socket() {
    let ns = Netns::new();
    let echo = ns.echo_server();
    let p = Setup::new(&loopback_bind().to_string()).start();
    // No state file: nobody is a client yet.
    let head = ask(p.addr(3128), &connect_head(&echo.to_string(), Some(TOKEN)));
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");

    let mut d = Daemon::connect(&p);
    let hello = d.next();
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["group"], p.group.as_str());
    assert_eq!(hello["bind"], p.bind.to_string());
    assert_eq!(hello["mode"], "strict");
    assert_eq!(hello["pid"], p.pid());
    d.push(&state(2, vec![rule("nothing.example.com", &[], false)]));
    let head = tunnel(p.addr(3128), &echo.to_string()).unwrap_err();
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let dec = d.until(|v| v["type"] == "decision" && v["client"] == CLIENT && v["host"] == echo.ip().to_string());
    assert_eq!(dec["allow"], false);
    assert_eq!(dec["reason"], "no-rule");

    d.push(&state(3, vec![rule(&echo.ip().to_string(), &[echo.port()], true)]));
    let mut t = tunnel(p.addr(3128), &echo.to_string()).unwrap();
    echo_roundtrip(&mut t, b"now allowed");
    drop(t);
    let dec = d.until(|v| v["type"] == "decision" && v["allow"] == true);
    assert_eq!(dec["scheme"], "tcp");

    // A new daemon connection replaces the old one and can take rules away again.
    let mut d2 = Daemon::connect(&p);
    assert_eq!(d2.next()["type"], "hello");
    d2.push(&state(4, vec![]));
    let head = tunnel(p.addr(3128), &echo.to_string()).unwrap_err();
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let stats = d2.until(|v| v["type"] == "stats");
    assert!(stats["allowed"].as_u64() >= Some(1), "{stats}");

    // A second proxy of the group refuses to start.
    let s2 = Setup::new(&loopback_bind().to_string());
    let mut opts2 = s2.opts.clone();
    opts2.group = p.group.clone();
    opts2.data_dir = data_dir_of(&p);
    slicer_proxy::ca::GroupCa::init(&slicer_proxy::ca::ca_dir(&opts2.base_dir, &p.group), &p.group, false).unwrap();
    let (mut child, log) = spawn(&opts2);
    let status = wait_for(Duration::from_secs(20), "the second proxy to exit", || {
        child.try_wait().unwrap()
    });
    assert!(!status.success());
    wait_for(Duration::from_secs(5), "its error", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("another slicer proxy for host group"))
            .then_some(())
    });
    // The first still answers.
    let head = ask(p.addr(3128), &connect_head("example.com:443", None));
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
}

#[test]
#[ignore = "full tier: needs root (network namespaces, an adapter, a uid of its own for the proxy)"]
fn options_are_checked_and_name_the_flag() {
    let mut s = Setup::new("not-an-ip");
    s.opts.mode = Mode::Audit;
    let (mut child, log) = spawn(&s.opts);
    wait_for(Duration::from_secs(20), "exit", || child.try_wait().unwrap());
    wait_for(Duration::from_secs(5), "the error", || {
        log.lock().unwrap().iter().any(|l| l.contains("--bind")).then_some(())
    });
    let mut s = Setup::new(&loopback_bind().to_string());
    s.opts.deny_cidrs = vec!["10.0.0.0/99".into()];
    let (mut child, log) = spawn(&s.opts);
    wait_for(Duration::from_secs(20), "exit", || child.try_wait().unwrap());
    wait_for(Duration::from_secs(5), "the error", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("--deny-cidr"))
            .then_some(())
    });
    // No CA: says how to make one.
    let s = Setup::new(&loopback_bind().to_string());
    std::fs::remove_dir_all(slicer_proxy::ca::ca_dir(s.base.path(), &s.opts.group)).unwrap();
    let (mut child, log) = spawn(&s.opts);
    wait_for(Duration::from_secs(20), "exit", || child.try_wait().unwrap());
    wait_for(Duration::from_secs(5), "the error", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("slicer ca init --hostgroup"))
            .then_some(())
    });
}
