//! Reading a client's first request head (bounded in size and time) and the HTTP proxy
//! protocol: `CONNECT host:port` and absolute-form requests.

use super::*;

pub(super) enum HeadError {
    TooLarge,
    Closed,
}

/// Where the head ends (after its blank line), searching from `from`.
pub(super) fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let mut i = start;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// Reads until the end of a request head (returned with any bytes after it).
pub(super) async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
    deadline: Instant,
) -> Result<(Vec<u8>, usize), HeadError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut scanned = 0;
    loop {
        if let Some(end) = head_end(&buf, scanned) {
            if end > MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            return Ok((buf, end));
        }
        scanned = buf.len();
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        if buf.len() == buf.capacity() {
            buf.reserve_exact(buf.len().min(MAX_HEAD - buf.len()).max(1024));
        }
        match timeout_at(deadline, s.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err(HeadError::Closed),
        }
    }
}

/// The parts of a head the listener uses.
pub(super) struct Head {
    method: String,
    target: String,
    proxy_authorization: Option<Vec<u8>>,
}

pub(super) enum ParseError {
    TooManyHeaders,
    Malformed,
}

pub(super) fn parse_head(head: &[u8]) -> Result<Head, ParseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Err(ParseError::TooManyHeaders),
        _ => return Err(ParseError::Malformed),
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(ParseError::Malformed);
    };
    let mut auth = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("proxy-authorization") {
            if auth.is_some() {
                // Two credentials: which one would count is ambiguous.
                return Err(ParseError::Malformed);
            }
            auth = Some(h.value.to_vec());
        }
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        proxy_authorization: auth,
    })
}

/// The token of a `Basic base64(user:token)` credential (the user is ignored; Slicer's is
/// `proxy`); none when it is empty.
pub fn basic_token(value: &[u8]) -> Option<String> {
    let v = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (_, token) = text.split_once(':')?;
    (!token.is_empty()).then(|| token.to_string())
}

/// `host:port` of a CONNECT (`[v6]:port` too), the host normalized.
pub fn parse_authority(target: &str) -> Option<(String, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return None;
    }
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = rules::normalize_host(host).ok()?;
    Some((host, port))
}

pub(super) fn scheme_for(port: u16) -> &'static str {
    match port {
        80 => "http",
        443 => "https",
        _ => "tcp",
    }
}

/// Writes a short answer with a deadline and closes the write side.
pub(super) async fn answer<S: AsyncWrite + Unpin>(s: &mut S, text: &[u8]) {
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, async {
        s.write_all(text).await?;
        s.flush().await?;
        s.shutdown().await
    })
    .await;
}

/// After answering an oversized head, reads (and drops) a little more so the client sees the
/// answer instead of a reset.
pub(super) async fn drain<S: AsyncRead + Unpin>(s: &mut S) {
    let mut left = 4usize << 20;
    let mut buf = vec![0u8; 16 << 10];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while left > 0 {
            match s.read(&mut buf).await {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    })
    .await;
}

pub(super) const R400: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
pub(super) const R403: &[u8] = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
pub(super) const R407: &[u8] = b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"slicer-proxy\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
pub(super) const R431: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
pub(super) const R502: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
pub(super) const R200: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

pub(super) async fn http_conn<S>(ctx: Arc<Ctx>, mut s: S, _peer: SocketAddr, deadline: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (buf, end) = match read_head(&mut s, deadline).await {
        Ok(h) => h,
        Err(HeadError::TooLarge) => {
            answer(&mut s, R431).await;
            drain(&mut s).await;
            return;
        }
        Err(HeadError::Closed) => return,
    };
    let head = match parse_head(&buf[..end]) {
        Ok(h) => h,
        Err(ParseError::TooManyHeaders) => {
            answer(&mut s, R431).await;
            return;
        }
        Err(ParseError::Malformed) => {
            answer(&mut s, R400).await;
            return;
        }
    };
    let plane = &ctx.plane;
    let is_connect = head.method == "CONNECT";
    let authority = if is_connect {
        parse_authority(&head.target)
    } else {
        absolute_authority(&head.target)
    };
    let policy = plane.policy.get();
    let token = head.proxy_authorization.as_deref().and_then(basic_token);
    let client = token.as_deref().and_then(|t| policy.client(t));
    let Some(client) = client else {
        let (host, port) = authority.clone().unwrap_or_default();
        plane.events.record(Decision {
            at: now(),
            method: crate::control::escape(&head.method),
            scheme: if is_connect { scheme_for(port) } else { "http" }.into(),
            host,
            port,
            allow: false,
            mode: Some(plane.mode),
            reason: if head.proxy_authorization.is_none() {
                "no-token"
            } else {
                "bad-token"
            }
            .into(),
            status: 407,
            ..Default::default()
        });
        answer(&mut s, R407).await;
        return;
    };
    let Some((host, port)) = authority else {
        answer(&mut s, R400).await;
        return;
    };
    let rest = buf[end..].to_vec();
    if !is_connect {
        // The interceptor reads the whole head again and decides each request itself.
        drop(rest);
        ctx.interceptor.serve_forward(plane.clone(), Replay::new(s, buf)).await;
        return;
    }
    drop(buf);
    tunnel(ctx, Proto::Http, s, rest, client, host, port).await;
}

/// `http://host[:port]/...` → host and port; anything else (origin form, https) is `None`.
pub(super) fn absolute_authority(target: &str) -> Option<(String, u16)> {
    let rest = target
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case("http://"))
        .map(|_| &target[7..])?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let auth = &rest[..end];
    if auth.contains('@') {
        return None;
    }
    match parse_authority(auth) {
        Some(hp) => Some(hp),
        None if !auth.ends_with(']') && auth.contains(':') => None,
        None => Some((rules::normalize_host(auth).ok()?, 80)),
    }
}
