//! Headers: hop-by-hop stripping, upgrades and the proxy's token.

use super::*;

pub(super) fn has_token(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// An HTTP/1.1 `Connection: upgrade` request with an `Upgrade` header (WebSocket and friends).
pub(super) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && has_token(req.headers(), header::CONNECTION, "upgrade")
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1) and the proxy's own, keeping `Connection:
/// upgrade` and `Upgrade` for an upgrade.
pub(super) fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
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
