//! The SOCKS5 side of the proxy ports.

use super::*;

/// SOCKS5 (RFC 1928) with username/password (RFC 1929; the password is the token), CONNECT only.
pub(super) async fn socks(ctx: Arc<Ctx>, mut s: TcpStream, deadline: Instant) {
    let plane = ctx.plane.clone();
    let unauth = |reason: &str| {
        plane.events.record(Decision {
            at: now(),
            method: "CONNECT".into(),
            scheme: "tcp".into(),
            allow: false,
            mode: Some(plane.mode),
            reason: reason.into(),
            ..Default::default()
        })
    };
    let hs = timeout_at(deadline, async {
        let client = authenticate(&mut s, &plane, unauth).await?;
        let (host, port) = connect_request(&mut s).await?;
        Some((client, host, port))
    })
    .await;
    if let Ok(Some((client, host, port))) = hs {
        tunnel(ctx, Proto::Socks, s, Vec::new(), client, host, port).await;
    }
}

/// The greeting and username/password sub-negotiation: the client whose token is the
/// password, or `None` (refusals recorded through `unauth`, answered where the protocol has an
/// answer).
async fn authenticate(s: &mut TcpStream, plane: &Plane, unauth: impl Fn(&str)) -> Option<Arc<ClientPolicy>> {
    let mut two = [0u8; 2];
    s.read_exact(&mut two).await.ok()?;
    if two[0] != 5 {
        return None;
    }
    let mut methods = vec![0u8; usize::from(two[1])];
    s.read_exact(&mut methods).await.ok()?;
    if !methods.contains(&2) {
        let _ = s.write_all(&[5, 0xff]).await;
        unauth("no-token");
        return None;
    }
    s.write_all(&[5, 2]).await.ok()?;
    s.read_exact(&mut two).await.ok()?;
    if two[0] != 1 {
        return None;
    }
    let mut user = vec![0u8; usize::from(two[1])];
    s.read_exact(&mut user).await.ok()?;
    let mut plen = [0u8; 1];
    s.read_exact(&mut plen).await.ok()?;
    let mut pass = vec![0u8; usize::from(plen[0])];
    s.read_exact(&mut pass).await.ok()?;
    let client = std::str::from_utf8(&pass)
        .ok()
        .and_then(|t| plane.policy.get().client(t));
    let Some(client) = client else {
        let _ = s.write_all(&[1, 1]).await;
        unauth(if pass.is_empty() { "no-token" } else { "bad-token" });
        return None;
    };
    s.write_all(&[1, 0]).await.ok()?;
    Some(client)
}

/// The CONNECT request: its host (normalized; IPv6 in brackets) and non-zero port, or `None`
/// (answered with the SOCKS reply code where one fits).
async fn connect_request(s: &mut TcpStream) -> Option<(String, u16)> {
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await.ok()?;
    if req[0] != 5 {
        return None;
    }
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            s.read_exact(&mut a).await.ok()?;
            Some(std::net::Ipv4Addr::from(a).to_string())
        }
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l).await.ok()?;
            let mut name = vec![0u8; usize::from(l[0])];
            s.read_exact(&mut name).await.ok()?;
            String::from_utf8(name)
                .ok()
                .and_then(|n| rules::normalize_host(&n).ok())
        }
        4 => {
            let mut a = [0u8; 16];
            s.read_exact(&mut a).await.ok()?;
            Some(format!("[{}]", std::net::Ipv6Addr::from(a)))
        }
        _ => {
            let _ = s.write_all(&socks_reply(8)).await;
            return None;
        }
    };
    let mut p = [0u8; 2];
    s.read_exact(&mut p).await.ok()?;
    let port = u16::from_be_bytes(p);
    if req[1] != 1 {
        let _ = s.write_all(&socks_reply(7)).await;
        return None;
    }
    let (Some(host), true) = (host, port != 0) else {
        let _ = s.write_all(&socks_reply(1)).await;
        return None;
    };
    Some((host, port))
}
