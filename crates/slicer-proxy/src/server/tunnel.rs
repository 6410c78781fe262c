//! Tunnels once a target is allowed: to the MITM interceptor, straight through (passthrough),
//! and the splice that copies both ways with an idle bound.

use super::*;

/// How a tunnel's outcome is told to the client.
#[derive(Clone, Copy)]
pub(super) enum Proto {
    Http,
    Socks,
}

pub(super) enum Outcome {
    Established,
    Denied,
    Unreachable,
}

pub(super) fn socks_reply(rep: u8) -> [u8; 10] {
    [5, rep, 0, 1, 0, 0, 0, 0, 0, 0]
}

impl Proto {
    async fn tell<S: AsyncWrite + Unpin>(self, s: &mut S, o: Outcome) -> bool {
        let bytes: Vec<u8> = match (self, &o) {
            (Proto::Http, Outcome::Established) => R200.to_vec(),
            (Proto::Http, Outcome::Denied) => R403.to_vec(),
            (Proto::Http, Outcome::Unreachable) => R502.to_vec(),
            (Proto::Socks, Outcome::Established) => socks_reply(0).to_vec(),
            (Proto::Socks, Outcome::Denied) => socks_reply(2).to_vec(),
            (Proto::Socks, Outcome::Unreachable) => socks_reply(4).to_vec(),
        };
        if matches!(o, Outcome::Established) {
            matches!(
                tokio::time::timeout(ANSWER_TIMEOUT, async {
                    s.write_all(&bytes).await?;
                    s.flush().await
                })
                .await,
                Ok(Ok(()))
            )
        } else {
            answer(s, &bytes).await;
            false
        }
    }
}

/// Decides and carries out a CONNECT (HTTP or SOCKS) of an authenticated client.
pub(super) async fn tunnel<S>(
    ctx: Arc<Ctx>,
    proto: Proto,
    mut s: S,
    rest: Vec<u8>,
    client: Arc<ClientPolicy>,
    host: String,
    port: u16,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let plane = ctx.plane.clone();
    let decision = plane.policy.get().connect(&client, &host, port, now());
    let base = Decision {
        client: client.name.clone(),
        method: "CONNECT".into(),
        scheme: scheme_for(port).into(),
        host: host.clone(),
        port,
        ..Default::default()
    };
    match decision {
        ConnectDecision::Passthrough(_) => passthrough(plane, proto, s, rest, base).await,
        ConnectDecision::Intercept => {
            if proto.tell(&mut s, Outcome::Established).await {
                let t = Tunnel {
                    client,
                    host,
                    port,
                    audit_only: false,
                };
                ctx.interceptor.serve(plane, t, Replay::new(s, rest)).await;
            }
        }
        ConnectDecision::Deny(reason) => match plane.mode {
            Mode::Strict => {
                plane.events.record(Decision {
                    at: now(),
                    mode: Some(Mode::Strict),
                    reason: reason.as_str().into(),
                    status: match proto {
                        Proto::Http => 403,
                        Proto::Socks => 0,
                    },
                    ..base
                });
                proto.tell(&mut s, Outcome::Denied).await;
            }
            Mode::Audit => {
                if proto.tell(&mut s, Outcome::Established).await {
                    let t = Tunnel {
                        client,
                        host,
                        port,
                        audit_only: true,
                    };
                    ctx.interceptor.serve(plane, t, Replay::new(s, rest)).await;
                }
            }
        },
    }
}

pub(super) async fn passthrough<S>(plane: Arc<Plane>, proto: Proto, mut s: S, rest: Vec<u8>, base: Decision)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = std::time::Instant::now();
    let (mut up, _addr) = match plane.upstream.connect(&base.host, base.port).await {
        Ok(c) => c,
        Err(e) => {
            let (reason, outcome, status) = match e {
                UpstreamError::Refused { .. } => ("upstream-refused", Outcome::Denied, 403),
                _ => ("upstream-unreachable", Outcome::Unreachable, 502),
            };
            eprintln!("slicer-proxy: {}", control::escape(&e.to_string()));
            plane.events.record(Decision {
                at: now(),
                mode: Some(plane.mode),
                reason: reason.into(),
                status: match proto {
                    Proto::Http => status,
                    Proto::Socks => 0,
                },
                ..base
            });
            proto.tell(&mut s, outcome).await;
            return;
        }
    };
    let mut up_bytes = 0u64;
    let mut down_bytes = 0u64;
    if proto.tell(&mut s, Outcome::Established).await {
        let early = if rest.is_empty() {
            Ok(())
        } else {
            up.write_all(&rest).await
        };
        up_bytes = rest.len() as u64;
        drop(rest);
        if early.is_ok() {
            let (u, d) = splice(s, up, TUNNEL_IDLE).await;
            up_bytes += u;
            down_bytes = d;
        }
    }
    plane.events.record(Decision {
        at: now(),
        scheme: "tcp".into(),
        allow: true,
        mode: Some(plane.mode),
        bytes_up: up_bytes,
        bytes_down: down_bytes,
        duration_ms: (started.elapsed().as_millis() as u64).max(1),
        ..base
    });
}

/// Copies both ways until both sides finished (a half-close is passed on), either side fails,
/// or nothing moved for `idle`. Returns the bytes client→upstream and upstream→client.
pub async fn splice<A, B>(a: A, b: B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let both = async { tokio::try_join!(pump(ar, bw, &up, &last, start), pump(br, aw, &down, &last, start)) };
    let watch = async {
        loop {
            let seen = Duration::from_millis(last.load(Ordering::Relaxed));
            let until = start + seen + idle;
            if Instant::now() >= until {
                return;
            }
            tokio::time::sleep_until(until).await;
        }
    };
    tokio::select! {
        _ = both => {}
        _ = watch => {}
    }
    (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed))
}

pub(super) async fn pump<R, W>(
    mut r: R,
    mut w: W,
    count: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; SPLICE_BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        w.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        // A read that filled the buffer means bulk data: a larger buffer costs fewer syscalls
        // per byte (idle and interactive tunnels keep the small one).
        if n == buf.len() && buf.len() < SPLICE_BUF_BULK {
            buf.resize(SPLICE_BUF_BULK, 0);
        }
    }
}
