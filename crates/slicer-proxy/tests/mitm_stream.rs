//! A 64 MiB download through the interceptor runs in bounded memory (alone in its binary so
//! the peak RSS it reads is its own).

#[path = "mitm_common/mod.rs"]
mod common;

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use slicer_proxy::control::Mode;

const SIZE: u64 = 64 << 20;

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_streams_in_bounded_memory() {
    let up_ca = TestCa::new();
    let up = TestUpstream::start(Some(up_ca.server_config("api.test", &[b"h2", b"http/1.1"]))).await;
    let mut f = fixture(
        policy(vec![rule("api.test", up.port)], vec![]),
        Mode::Strict,
        vec![up_ca.der.clone()],
    );
    for alpn in [&[&b"http/1.1"[..]][..], &[b"h2"]] {
        let mut g = f.guest(f.tunnel("api.test", up.port, false), alpn).await;
        // Reset the peak RSS, then download reading chunk by chunk, slowly at first so a
        // proxy that buffered would have the whole body in memory.
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let base = status_kib("VmRSS:");
        let req = Request::get(format!("https://api.test:{}/big?n={SIZE}", up.port))
            .body(body(b""))
            .unwrap();
        let resp = g.send(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut b = resp.into_body();
        let mut got = 0u64;
        let mut frames = 0u32;
        while let Some(fr) = b.frame().await {
            if let Ok(d) = fr.unwrap().into_data() {
                got += d.len() as u64;
            }
            frames += 1;
            if frames == 4 {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        }
        assert_eq!(got, SIZE);
        let peak = status_kib("VmHWM:");
        let grew = peak.saturating_sub(base);
        println!(
            "{:?}: peak RSS grew {grew} KiB over {base} KiB for a {SIZE}-byte download",
            String::from_utf8_lossy(alpn[0])
        );
        assert!(grew < 24 << 10, "peak RSS grew {grew} KiB");
        let d = f.decision().await;
        assert_eq!((d.allow, d.bytes_down), (true, SIZE));
    }
}
