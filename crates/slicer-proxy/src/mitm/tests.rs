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
