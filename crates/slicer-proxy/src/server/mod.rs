//! `slicer proxy up`: the privileged setup, the drop to an unprivileged uid, and the listeners.
//!
//! Both ports (3128 and 3129) speak the same protocols, chosen by the first byte a client
//! sends: `0x16` is a TLS handshake (the proxy's leaf, then an HTTP proxy inside), `0x05` is
//! SOCKS5 (username/password, the password is the token; CONNECT only), anything else is an
//! HTTP proxy request (`CONNECT host:port` or an absolute-form `GET http://...`).
//!
//! Memory per connection: a connection waiting for its first byte holds its task (a few hundred
//! bytes: the head-reading state is boxed only once bytes arrive) and its socket, about 1 KiB of
//! user memory; reading a head it holds a buffer that starts at 1 KiB and grows to at most 64
//! KiB; a spliced tunnel holds two 8 KiB buffers. The kernel's socket buffers are not counted.
//!
//! Here: setup, the accept loop and connection admission. `head`: a client's first request
//! head and the HTTP proxy protocol; `socks`: SOCKS5; `tunnel`: what an allowed tunnel becomes
//! (interception, passthrough, splice); `tls`: the proxy port's own certificate.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

// A stream that first yields bytes already read from it (the agent protocol's, shared).
use slicer_agent_proto::sync::Rewind as Replay;

use crate::ca::{self, GroupCa};
use crate::control::{self, Decision, Mode, ProxyState};
use crate::error::{Error, Result};
use crate::mitm::Interceptor;
use crate::plane::{now, Events, Plane, PolicyCell, Tunnel};
use crate::rules::{self, ClientPolicy, ConnectDecision, Policy};
use crate::upstream::{self, Upstream, UpstreamConfig, UpstreamError};
use crate::{adapter, control_link, privs};

mod head;
mod socks;
mod tls;
mod tunnel;

pub use head::{basic_token, parse_authority};
pub use tls::proxy_tls;
pub use tunnel::splice;

use head::*;
use socks::*;
use tunnel::*;

/// The HTTP proxy port.
pub const HTTP_PORT: u16 = 3128;
/// The HTTPS proxy port.
pub const HTTPS_PORT: u16 = 3129;
/// Default cap on open client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Largest `max_connections` accepted.
pub const MAX_MAX_CONNECTIONS: usize = 1 << 20;
/// A client has this long from accept to a complete request head (TLS handshake included).
pub const HEAD_DEADLINE: Duration = Duration::from_secs(10);
/// Largest request head; more is answered 431.
pub const MAX_HEAD: usize = 64 << 10;
/// Most header lines in a head.
pub const MAX_HEADERS: usize = 100;
/// A spliced tunnel with no bytes either way for this long is closed.
pub const TUNNEL_IDLE: Duration = Duration::from_secs(600);
/// How long a short answer (407, 403, ...) may take to write.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Splice buffer per direction.
const SPLICE_BUF: usize = 8 << 10;
/// What a direction's buffer grows to once a read fills it.
const SPLICE_BUF_BULK: usize = 128 << 10;
/// Largest hosts file.
const MAX_HOSTS_FILE: u64 = 1 << 20;

/// `slicer proxy up`'s options.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UpOptions {
    /// `--hostgroup`.
    pub group: String,
    /// `--bind`: an IP, or a CIDR whose prefix the dummy adapter gets.
    pub bind: String,
    /// `--deny-cidr`.
    pub deny_cidrs: Vec<String>,
    /// `--mode`.
    pub mode: Mode,
    /// The daemon's data directory (control socket and state file under `proxy/`).
    pub data_dir: PathBuf,
    /// The working folder: the CA at `ca::ca_dir(base_dir, group)`, `proxy.cert`/`proxy.key`.
    pub base_dir: PathBuf,
    /// Test only: lines `NAME IP` answered without DNS.
    pub hosts_file: Option<PathBuf>,
    /// Extra PEM bundle trusted for upstreams.
    pub upstream_ca: Option<PathBuf>,
    /// Cap on open client connections (a quarter of it per source address).
    pub max_connections: usize,
}

/// Everything the privileged setup produced.
pub struct Prepared {
    pub plane: Arc<Plane>,
    pub events: tokio::sync::mpsc::Receiver<Decision>,
    pub interceptor: Arc<Interceptor>,
    pub tls: Arc<rustls::ServerConfig>,
    pub listeners: Vec<std::net::TcpListener>,
    pub control: std::os::unix::net::UnixListener,
    pub hello: control::FromProxy,
    pub max_connections: usize,
    /// The flock on `<group>.lock`, held while the proxy runs.
    pub _lock: std::fs::File,
}

/// Runs the proxy until it fails: the privileged setup, the drop, then the listeners. Call it as
/// root from the process's main thread, outside any tokio runtime and before other threads start
/// (the uid change and the seccomp filter reach every thread; the bounding set is per thread).
pub fn run(opts: UpOptions) -> Result<()> {
    let prepared = prepare(&opts)?;
    let lease = privs::drop_privileges(&opts.group, opts.max_connections)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Error::os("starting the runtime", e))?;
    eprintln!(
        "slicer-proxy: host group {} listening on {}:{HTTP_PORT} and {}:{HTTPS_PORT}, mode {}, uid {}",
        opts.group,
        prepared.hello_bind(),
        prepared.hello_bind(),
        opts.mode.as_str(),
        lease.uid
    );
    let r = rt.block_on(serve(prepared));
    drop(lease);
    r
}

impl Prepared {
    fn hello_bind(&self) -> String {
        match &self.hello {
            control::FromProxy::Hello { bind, .. } => bind.clone(),
            _ => String::new(),
        }
    }
}

/// The checked options.
struct Checked {
    bind: adapter::Bind,
    deny: Vec<(IpAddr, u8)>,
}

fn validate(opts: &UpOptions) -> Result<Checked> {
    rules::check_name("--hostgroup", &opts.group)?;
    let bind = adapter::Bind::parse(&opts.bind)?;
    let mut deny = Vec::with_capacity(opts.deny_cidrs.len());
    for c in &opts.deny_cidrs {
        deny.push(
            upstream::parse_cidr(c)
                .ok_or_else(|| Error::invalid("--deny-cidr", format!("{c:?} is not an IP address or CIDR")))?,
        );
    }
    if opts.max_connections == 0 || opts.max_connections > MAX_MAX_CONNECTIONS {
        return Err(Error::invalid(
            "--max-connections",
            format!("must be 1 to {MAX_MAX_CONNECTIONS}"),
        ));
    }
    Ok(Checked { bind, deny })
}

/// Everything that needs root, in order (see the module comment of `privs` for what follows).
pub fn prepare(opts: &UpOptions) -> Result<Prepared> {
    let checked = validate(opts)?;
    let bind_ip = checked.bind.ip;
    match adapter::ensure(&checked.bind)? {
        adapter::Adapter::Dummy(name) => eprintln!("slicer-proxy: {bind_ip} is on dummy link {name}"),
        adapter::Adapter::Existing(name) => eprintln!("slicer-proxy: {bind_ip} is on {name}"),
    }
    let ca_dir = ca::ca_dir(&opts.base_dir, &opts.group);
    let ca = Arc::new(GroupCa::load(&ca_dir).map_err(|e| match e {
        Error::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => Error::Cert(format!(
            "no CA for host group {g} in {d}: run `slicer ca init --hostgroup {g}` or set `ca: {{generate: true}}` on the host group",
            g = opts.group,
            d = ca_dir.display()
        )),
        e => e,
    })?);
    let tls = Arc::new(proxy_tls(&opts.base_dir, &ca, bind_ip)?);
    let mut hosts: HashMap<String, Vec<IpAddr>> = HashMap::new();
    if let Some(p) = &opts.hosts_file {
        hosts = read_hosts(p)?;
    }
    let mut extra_roots = Vec::new();
    if let Some(p) = &opts.upstream_ca {
        extra_roots = ca::pem_certs(&ca::read_pem(p)?);
        if extra_roots.is_empty() {
            return Err(Error::invalid(
                "--upstream-ca",
                format!("{} holds no CERTIFICATE block", p.display()),
            ));
        }
    }
    // The interceptor reads the host's roots (rustls-native-certs) now, while files are readable.
    let interceptor = Arc::new(Interceptor::new(ca.clone(), extra_roots)?);

    let mut listeners = Vec::new();
    for port in [HTTP_PORT, HTTPS_PORT] {
        listeners.push(listen_tcp(SocketAddr::new(bind_ip, port))?);
    }
    let (control, lock) = bind_control(&opts.data_dir, &opts.group)?;
    let state = read_state(&control::state_file(&opts.data_dir))?;

    let upstream = Upstream::new(UpstreamConfig {
        deny_cidrs: checked.deny,
        hosts,
        allow_loopback_for_tests: false,
    });
    upstream.set_vm_ranges(&state.vm_ranges);
    let policy = PolicyCell::default();
    let compiled = Policy::compile(&state);
    control_link::report_rejected(&compiled);
    policy.set(compiled);
    let (events, rx) = Events::new();
    let plane = Arc::new(Plane {
        policy,
        events,
        upstream,
        mode: opts.mode,
    });
    Ok(Prepared {
        plane,
        events: rx,
        interceptor,
        tls,
        listeners,
        control,
        hello: control::FromProxy::Hello {
            group: opts.group.clone(),
            bind: bind_ip.to_string(),
            mode: opts.mode,
            pid: std::process::id(),
        },
        max_connections: opts.max_connections,
        _lock: lock,
    })
}

/// A TCP listener with SO_REUSEADDR and a backlog sized for bursts.
fn listen_tcp(addr: SocketAddr) -> Result<std::net::TcpListener> {
    use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
    let what = || format!("listening on {addr}");
    let errno = |e: nix::Error| Error::os(what(), std::io::Error::from(e));
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(errno)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(errno)?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(errno)?;
    socket::listen(&fd, Backlog::new(1024).map_err(errno)?).map_err(errno)?;
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true).map_err(|e| Error::os(what(), e))?;
    Ok(l)
}

/// Binds the control socket in root's 0700 `<data dir>/proxy`, after taking the group's lock
/// (so a second proxy of the group refuses instead of stealing the socket).
pub fn bind_control(data_dir: &Path, group: &str) -> Result<(std::os::unix::net::UnixListener, std::fs::File)> {
    let dir = control::proxy_dir(data_dir);
    ca::make_private_dir(&dir)?;
    let lock_path = dir.join(format!("{group}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&lock_path)
        .map_err(|e| Error::io(&lock_path, e))?;
    // SAFETY: flock on a descriptor we own; never blocks.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Control(format!(
            "another slicer proxy for host group {group} is running (it holds {})",
            lock_path.display()
        )));
    }
    let sock = control::control_socket(data_dir, group);
    match std::fs::symlink_metadata(&sock) {
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(Error::Control(format!("{} exists and is not a socket", sock.display())));
            }
            std::fs::remove_file(&sock).map_err(|e| Error::io(&sock, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&sock, e)),
    }
    let l = std::os::unix::net::UnixListener::bind(&sock).map_err(|e| Error::io(&sock, e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).map_err(|e| Error::io(&sock, e))?;
    l.set_nonblocking(true).map_err(|e| Error::io(&sock, e))?;
    Ok((l, lock))
}

/// Reads the daemon's last state: root's regular file, not a link, not writable by others,
/// at most [`control::MAX_STATE_LINE`] bytes. No file is an empty state (everything denied).
pub fn read_state(path: &Path) -> Result<ProxyState> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ProxyState::default()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let bad = |r: &str| Error::Control(format!("{}: {r}", path.display()));
    if !meta.is_file() {
        return Err(bad("not a regular file"));
    }
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(bad("must be root's and writable only by root"));
    }
    if meta.len() > control::MAX_STATE_LINE as u64 {
        return Err(bad("too large"));
    }
    let mut text = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, control::MAX_STATE_LINE as u64 + 1),
        &mut text,
    )
    .map_err(|e| Error::io(path, e))?;
    if text.len() > control::MAX_STATE_LINE {
        return Err(bad("too large"));
    }
    if let Ok(s) = serde_json::from_slice::<ProxyState>(&text) {
        return Ok(s);
    }
    match serde_json::from_slice::<control::ToProxy>(&text) {
        Ok(control::ToProxy::State { state }) => Ok(state),
        Err(e) => Err(bad(&format!("not a proxy state: {e}"))),
    }
}

/// The hosts option: `NAME IP` per line, `#` comments; a name may have several lines.
pub fn read_hosts(path: &Path) -> Result<HashMap<String, Vec<IpAddr>>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_HOSTS_FILE + 1), &mut text)
        .map_err(|e| Error::io(path, e))?;
    if text.len() as u64 > MAX_HOSTS_FILE {
        return Err(Error::invalid(
            "hosts_file",
            format!("{} is larger than 1 MiB", path.display()),
        ));
    }
    let text = String::from_utf8(text).map_err(|_| Error::invalid("hosts_file", "not UTF-8"))?;
    let mut out: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(name), Some(ip), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::invalid(
                "hosts_file",
                format!("line {}: expected NAME IP", n + 1),
            ));
        };
        let name =
            rules::normalize_host(name).map_err(|r| Error::invalid("hosts_file", format!("line {}: {r}", n + 1)))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| Error::invalid("hosts_file", format!("line {}: {ip:?} is not an IP address", n + 1)))?;
        out.entry(name).or_default().push(ip);
    }
    Ok(out)
}

/// Open connections in total and per source address.
pub struct ConnTable {
    max: usize,
    per_ip: usize,
    total: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; leaving drops its count.
pub struct ConnGuard {
    table: Arc<ConnTable>,
    plane: Arc<Plane>,
    ip: IpAddr,
}

impl ConnTable {
    pub fn new(max: usize) -> Arc<ConnTable> {
        Arc::new(ConnTable {
            max,
            per_ip: (max / 4).max(1),
            total: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a connection from `ip`, or `None` when a cap is reached (counted as refused).
    pub fn admit(self: &Arc<ConnTable>, plane: &Arc<Plane>, ip: IpAddr) -> Option<ConnGuard> {
        let counters = &plane.events.counters;
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = by_ip.get(&ip).copied().unwrap_or(0);
        if self.total.load(Ordering::Relaxed) >= self.max || n >= self.per_ip {
            counters.refused_connections.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        by_ip.insert(ip, n + 1);
        self.total.fetch_add(1, Ordering::Relaxed);
        counters.open_connections.fetch_add(1, Ordering::Relaxed);
        Some(ConnGuard {
            table: self.clone(),
            plane: plane.clone(),
            ip,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut by_ip = self.table.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                by_ip.remove(&self.ip);
            }
        }
        self.table.total.fetch_sub(1, Ordering::Relaxed);
        self.plane
            .events
            .counters
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// What connection handlers share.
pub struct Ctx {
    pub plane: Arc<Plane>,
    pub interceptor: Arc<Interceptor>,
    pub tls: tokio_rustls::TlsAcceptor,
    pub conns: Arc<ConnTable>,
}

/// Serves the listeners and the control socket (inside a runtime).
pub async fn serve(p: Prepared) -> Result<()> {
    let ctx = Arc::new(Ctx {
        plane: p.plane.clone(),
        interceptor: p.interceptor,
        tls: tokio_rustls::TlsAcceptor::from(p.tls),
        conns: ConnTable::new(p.max_connections),
    });
    let control = tokio::net::UnixListener::from_std(p.control).map_err(|e| Error::os("control socket", e))?;
    let link = tokio::spawn(control_link::serve(control, p.plane.clone(), p.events, p.hello));
    let mut tasks = vec![link];
    for l in p.listeners {
        let l = tokio::net::TcpListener::from_std(l).map_err(|e| Error::os("listener", e))?;
        tasks.push(tokio::spawn(accept_loop(ctx.clone(), l)));
    }
    // None of these ends on its own.
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

async fn accept_loop(ctx: Arc<Ctx>, l: tokio::net::TcpListener) {
    let mut last_err_log: Option<Instant> = None;
    loop {
        match l.accept().await {
            Ok((s, peer)) => {
                let Some(guard) = ctx.conns.admit(&ctx.plane, peer.ip()) else {
                    drop(s);
                    continue;
                };
                tokio::spawn(handle(ctx.clone(), s, peer, guard));
            }
            Err(e) => {
                // Out of descriptors or memory: say so now and then, and give what holds them a
                // moment instead of spinning on the same error.
                if last_err_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    eprintln!("slicer-proxy: accept: {e}");
                    last_err_log = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(ctx: Arc<Ctx>, s: TcpStream, peer: SocketAddr, _guard: ConnGuard) {
    let deadline = Instant::now() + HEAD_DEADLINE;
    let _ = s.set_nodelay(true);
    let mut first = [0u8; 1];
    match timeout_at(deadline, s.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    match first[0] {
        0x16 => {
            let accepted = Box::pin(timeout_at(deadline, ctx.tls.accept(s))).await;
            if let Ok(Ok(tls)) = accepted {
                Box::pin(http_conn(ctx, tls, peer, deadline)).await
            }
        }
        0x05 => Box::pin(socks(ctx, s, deadline)).await,
        _ => Box::pin(http_conn(ctx, s, peer, deadline)).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_and_tokens() {
        assert_eq!(parse_authority("Example.com:443"), Some(("example.com".into(), 443)));
        assert_eq!(parse_authority("[::1]:22"), Some(("[::1]".into(), 22)));
        for bad in [
            "example.com",
            ":443",
            "a:0",
            "a:65536",
            "a:+1",
            "::1:22",
            "a b:1",
            "a:1x",
            "[zz]:1",
            "a:",
        ] {
            assert_eq!(parse_authority(bad), None, "{bad}");
        }
        let v = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("proxy:spt_x:y")
        );
        assert_eq!(basic_token(v.as_bytes()).as_deref(), Some("spt_x:y"));
        assert_eq!(basic_token(b"Bearer abc"), None);
        assert_eq!(basic_token(b"Basic !!!"), None);
        assert_eq!(
            absolute_authority("http://Example.com/x"),
            Some(("example.com".into(), 80))
        );
        assert_eq!(
            absolute_authority("http://example.com:8080?q"),
            Some(("example.com".into(), 8080))
        );
        assert_eq!(absolute_authority("https://example.com/"), None);
        assert_eq!(absolute_authority("http://u@example.com/"), None);
        assert_eq!(absolute_authority("/x"), None);
    }

    #[test]
    fn head_end_found_across_reads() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest", 0), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nrest", 0), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\n", 16), Some(18));
    }

    #[tokio::test]
    async fn splice_counts_and_passes_half_close() {
        let (a, mut a_peer) = tokio::io::duplex(64);
        let (b, mut b_peer) = tokio::io::duplex(64);
        let t = tokio::spawn(splice(a, b, Duration::from_secs(5)));
        a_peer.write_all(b"ping").await.unwrap();
        a_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        b_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        b_peer.write_all(b"pong!").await.unwrap();
        b_peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        a_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong!");
        assert_eq!(t.await.unwrap(), (4, 5));
    }

    #[tokio::test]
    async fn splice_ends_when_idle() {
        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let r = tokio::time::timeout(Duration::from_secs(5), splice(a, b, Duration::from_millis(100))).await;
        assert_eq!(r.unwrap(), (0, 0));
    }
}
