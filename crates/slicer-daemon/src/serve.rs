//! The API's accept loop: hyper's HTTP/1 server on each connection, with a deadline for
//! request heads, a cap per listener and per peer, and room kept for authenticated clients.
//!
//! - Every connection must send a complete request head within [`HEADER_DEADLINE`] of opening
//!   and of its previous answer (hyper's `header_read_timeout`): a silent or trickling client
//!   (slowloris) is closed then, and so is a keep-alive connection left idle. A request being
//!   answered, an exec's NDJSON, an SSE watch and an upgraded WebSocket are never cut by it.
//! - A listener serves at most [`MAX_CONNECTIONS`] at once, a peer (source IP) at most
//!   [`MAX_PER_PEER`]. A connection is *trusted* once one of its requests carried the valid
//!   token (any request to a route behind the token when auth is off). A new connection over
//!   a cap displaces the oldest untrusted connection (of that peer, for the peer's cap), so
//!   sockets that send nothing or only unauthenticated requests can never keep a client with
//!   the token, or `/healthz`, out. When every slot is trusted, a new connection waits in the
//!   kernel's backlog (listener) or is closed (peer).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};

/// Most connections one API listener serves at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most connections one peer (source IP) holds on a TCP listener.
pub const MAX_PER_PEER: usize = 256;
/// Longest a connection may take to send a request head, from its opening or its previous
/// answer.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(10);

/// The bounds one listener applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max: usize,
    pub per_peer: usize,
    pub header_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max: MAX_CONNECTIONS,
            per_peer: MAX_PER_PEER,
            header_deadline: HEADER_DEADLINE,
        }
    }
}

/// In each request's extensions: the connection it came on. The token check calls
/// [`ConnMark::trust`] when the token was valid.
#[derive(Debug, Clone, Default)]
pub struct ConnMark(Arc<AtomicBool>);

impl ConnMark {
    pub fn trust(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn trusted(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The peer's address, when it has one that caps apply to.
pub trait PeerIp {
    fn peer_ip(&self) -> Option<IpAddr>;
}

impl PeerIp for std::net::SocketAddr {
    fn peer_ip(&self) -> Option<IpAddr> {
        Some(self.ip().to_canonical())
    }
}

impl PeerIp for tokio::net::unix::SocketAddr {
    fn peer_ip(&self) -> Option<IpAddr> {
        None
    }
}

struct Entry {
    peer: Option<IpAddr>,
    mark: ConnMark,
    evict: Arc<Notify>,
}

/// The connections of one listener, oldest first.
struct Conns {
    limits: Limits,
    table: Mutex<Table>,
    /// Signalled whenever a connection goes.
    changed: Notify,
}

#[derive(Default)]
struct Table {
    next: u64,
    entries: BTreeMap<u64, Entry>,
}

impl Table {
    /// The oldest untrusted connection (of `peer` when given).
    fn oldest_untrusted(&self, peer: Option<IpAddr>) -> Option<u64> {
        self.entries
            .iter()
            .find(|(_, e)| !e.mark.trusted() && (peer.is_none() || e.peer == peer))
            .map(|(id, _)| *id)
    }

    fn evict(&mut self, id: u64) {
        if let Some(e) = self.entries.remove(&id) {
            e.evict.notify_one();
        }
    }
}

impl Conns {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding this lock leaves a consistent table (every change is one call).
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection may be taken in: below the cap, or someone can be displaced.
    fn has_room(&self) -> bool {
        let t = self.table();
        t.entries.len() < self.limits.max || t.oldest_untrusted(None).is_some()
    }

    fn is_empty(&self) -> bool {
        self.table().entries.is_empty()
    }

    /// Takes a new connection from `peer` in, displacing the oldest untrusted one over a cap;
    /// `None` when it must be closed.
    fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Option<Slot> {
        let mut t = self.table();
        if let Some(ip) = peer {
            let of_peer = t.entries.values().filter(|e| e.peer == Some(ip)).count();
            if of_peer >= self.limits.per_peer {
                let id = t.oldest_untrusted(Some(ip))?;
                t.evict(id);
            }
        }
        if t.entries.len() >= self.limits.max {
            let id = t.oldest_untrusted(None)?;
            t.evict(id);
        }
        let id = t.next;
        t.next += 1;
        let (mark, evict) = (ConnMark::default(), Arc::new(Notify::new()));
        t.entries.insert(
            id,
            Entry {
                peer,
                mark: mark.clone(),
                evict: evict.clone(),
            },
        );
        Some(Slot {
            conns: self.clone(),
            id,
            mark,
            evict,
        })
    }
}

/// A connection's place in its listener's table, freed when dropped (an upgraded WebSocket
/// keeps it, inside its I/O).
struct Slot {
    conns: Arc<Conns>,
    id: u64,
    mark: ConnMark,
    evict: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.table().entries.remove(&self.id);
        self.conns.changed.notify_waiters();
    }
}

/// A connection's I/O holding its [`Slot`].
struct SlotIo<I> {
    io: I,
    _slot: Slot,
}

impl<I: AsyncRead + Unpin> AsyncRead for SlotIo<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for SlotIo<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves `app` on `listener` within `limits` until `stop` turns true (or its sender goes);
/// then asks every connection to finish its request and returns once all are gone.
pub async fn serve<L>(mut listener: L, app: Router, limits: Limits, mut stop: watch::Receiver<bool>)
where
    L: axum::serve::Listener,
    L::Addr: PeerIp,
{
    let conns = Arc::new(Conns {
        limits,
        table: Mutex::new(Table::default()),
        changed: Notify::new(),
    });
    'accept: loop {
        // Full of trusted connections: leave new ones in the backlog until one goes.
        loop {
            let changed = conns.changed.notified();
            if conns.has_room() {
                break;
            }
            tokio::select! {
                _ = changed => {}
                _ = stop.wait_for(|v| *v) => break 'accept,
            }
        }
        let (io, addr) = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|v| *v) => break,
        };
        let Some(slot) = conns.admit(addr.peer_ip()) else {
            // Over its peer's cap with only trusted connections: closed.
            continue;
        };
        tokio::spawn(connection(io, slot, app.clone(), limits.header_deadline, stop.clone()));
    }
    loop {
        let changed = conns.changed.notified();
        if conns.is_empty() {
            return;
        }
        changed.await;
    }
}

/// One connection: HTTP/1.1 with upgrades, until it closes, is displaced or the server stops.
async fn connection<I>(io: I, slot: Slot, app: Router, header_deadline: Duration, mut stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mark, evict) = (slot.mark.clone(), slot.evict.clone());
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(mark.clone());
        let mut app = app.clone();
        async move { tower_service::Service::call(&mut app, req).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_deadline);
    let conn = builder
        .serve_connection(TokioIo::new(SlotIo { io, _slot: slot }), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = evict.notified() => return,
        _ = stop.wait_for(|v| *v) => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn => {}
        _ = evict.notified() => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::extract::Request;
    use axum::middleware::Next;
    use axum::response::{IntoResponse, Response};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// `/healthz` open to all, `/secret` behind `Authorization: t` (trusting the connection).
    fn app() -> Router {
        async fn auth(req: Request, next: Next) -> Response {
            if req.headers().get("authorization").is_none_or(|v| v != "t") {
                return (axum::http::StatusCode::UNAUTHORIZED, "no").into_response();
            }
            if let Some(m) = req.extensions().get::<ConnMark>() {
                m.trust();
            }
            next.run(req).await
        }
        let secret = Router::new()
            .route("/secret", axum::routing::get(|| async { "secret" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    // A stream that sends a line every 100 ms for 1 s.
                    let s = futures_util::stream::unfold(0, |i| async move {
                        if i == 10 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Some((Ok::<_, std::convert::Infallible>(format!("{i}\n")), i + 1))
                    });
                    axum::body::Body::from_stream(s)
                }),
            )
            .route_layer(axum::middleware::from_fn(auth));
        Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .merge(secret)
    }

    async fn start(limits: Limits) -> (std::net::SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let server = tokio::spawn(serve(l, app(), limits, rx));
        (addr, tx, server)
    }

    /// Sends a GET on `c` and reads the answer's first line (`None` if nothing comes in `wait`
    /// or the connection was closed).
    async fn get(c: &mut TcpStream, path: &str, token: bool, wait: Duration) -> Option<String> {
        let auth = if token { "Authorization: t\r\n" } else { "" };
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(wait, c.read(&mut buf)).await.ok()?.ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        text.lines().next().map(str::to_string)
    }

    /// The peer closed `c` (EOF or reset) within `wait`.
    async fn closed(c: &mut TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(wait, c.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    const OK: Option<&str> = Some("HTTP/1.1 200 OK");

    #[tokio::test]
    async fn silent_sockets_never_keep_healthz_or_a_client_with_the_token_out() {
        let limits = Limits {
            max: 8,
            per_peer: 8,
            header_deadline: Duration::from_secs(30),
        };
        let (addr, _stop, server) = start(limits).await;
        // A trusted connection, then the rest of the cap and more filled with silent sockets.
        let mut trusted = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            get(&mut trusted, "/secret", true, Duration::from_secs(5))
                .await
                .as_deref(),
            OK
        );
        let mut idle = Vec::new();
        for _ in 0..20 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let t0 = Instant::now();
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            get(&mut c, "/healthz", false, Duration::from_secs(5)).await.as_deref(),
            OK
        );
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            get(&mut c, "/secret", true, Duration::from_secs(5)).await.as_deref(),
            OK
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // The oldest silent ones were closed to make room; the trusted one still serves.
        assert!(closed(&mut idle[0], Duration::from_secs(2)).await);
        assert_eq!(
            get(&mut trusted, "/secret", true, Duration::from_secs(5))
                .await
                .as_deref(),
            OK
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_peer_over_its_cap_displaces_its_own_untrusted_sockets_only() {
        let limits = Limits {
            max: 64,
            per_peer: 3,
            header_deadline: Duration::from_secs(30),
        };
        let (addr, _stop, server) = start(limits).await;
        let mut trusted = Vec::new();
        for _ in 0..3 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            assert_eq!(
                get(&mut c, "/secret", true, Duration::from_secs(5)).await.as_deref(),
                OK
            );
            trusted.push(c);
        }
        // Every slot of 127.0.0.1 is trusted: a fourth connection is closed at once.
        let mut extra = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut extra, Duration::from_secs(2)).await);
        drop(trusted.pop());
        // One untrusted (healthz only) and one silent, then a new one displaces the older.
        let mut anon = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            get(&mut anon, "/healthz", false, Duration::from_secs(5))
                .await
                .as_deref(),
            OK
        );
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            get(&mut c, "/healthz", false, Duration::from_secs(5)).await.as_deref(),
            OK
        );
        assert!(closed(&mut anon, Duration::from_secs(2)).await);
        for t in &mut trusted {
            assert_eq!(get(t, "/secret", true, Duration::from_secs(5)).await.as_deref(), OK);
        }
        server.abort();
    }

    #[tokio::test]
    async fn heads_have_a_deadline_and_streams_do_not() {
        let deadline = Duration::from_millis(600);
        let limits = Limits {
            max: 64,
            per_peer: 64,
            header_deadline: deadline,
        };
        let (addr, _stop, server) = start(limits).await;
        let t0 = Instant::now();
        // Silent: closed at the deadline.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        // Slowloris: one byte of a head every 100 ms, for ever.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let trickle = tokio::spawn(async move {
            for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: "
                .iter()
                .chain(std::iter::repeat(&b'a'))
            {
                if slow.write_all(&[*b]).await.is_err() {
                    return Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            unreachable!()
        });
        // A stream that lasts longer than the deadline is not cut.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nAuthorization: t\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"9\n\r\n0\r\n\r\n") {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "the stream was cut: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(t0.elapsed() > deadline);
        assert!(closed(&mut silent, Duration::from_secs(2)).await);
        let cut = tokio::time::timeout(Duration::from_secs(5), trickle)
            .await
            .unwrap()
            .unwrap();
        let after = cut - t0;
        assert!(after >= deadline && after < deadline * 3, "{after:?}");
        // The kept-alive streaming connection is idle now: it goes at the deadline too.
        let idle_from = Instant::now();
        assert!(closed(&mut stream, Duration::from_secs(5)).await);
        assert!(idle_from.elapsed() < deadline * 2, "{:?}", idle_from.elapsed());
        server.abort();
    }

    #[tokio::test]
    async fn stopping_finishes_requests_and_returns() {
        let (addr, stop, server) = start(Limits::default()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nAuthorization: t\r\n\r\n")
            .await
            .unwrap();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        // The answer has begun: stop now.
        let mut got = vec![0u8; 12];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HTTP/1.1 200");
        stop.send(true).unwrap();
        c.read_to_end(&mut got).await.unwrap();
        assert!(got.ends_with(b"9\n\r\n0\r\n\r\n"), "{}", String::from_utf8_lossy(&got));
        assert!(closed(&mut idle, Duration::from_secs(2)).await);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
