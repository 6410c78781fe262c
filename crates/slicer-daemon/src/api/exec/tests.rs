use super::*;

fn q(s: &str) -> Vec<(String, String)> {
    query_pairs(&Some(s.to_string()))
}

/// The body a collector sends, read whole.
fn body_of(b: BufferedBody) -> (Vec<u8>, u64) {
    let len = b.len;
    let p = b.lock().take().unwrap();
    (p.pieces.iter().flat_map(|p| p.iter().copied()).collect(), len)
}

fn leak(limit: usize) -> &'static Budget {
    Box::leak(Box::new(Budget::new(limit)))
}

#[test]
fn buffered_answers_are_what_serde_json_writes_however_output_is_cut() {
    // Every control byte, quotes, backslashes, multi-byte characters, invalid UTF-8 and a
    // trailing incomplete sequence; cut at every size from 1 byte.
    let mut out: Vec<u8> = (0u8..0x80).collect();
    out.extend_from_slice("é€😀\"\\".as_bytes());
    out.extend_from_slice(&[0xff, 0xe2, 0x82, b'x', 0xf0, 0x9f]);
    let err = b"\x00\x01 stderr \xe2\x82\xac".to_vec();
    for base64 in [false, true] {
        for cut in 1..=out.len() {
            let budget = leak(1 << 20);
            let mut c = Collector::new(base64, budget, 1 << 20);
            for (i, part) in out.chunks(cut).enumerate() {
                c.add(true, part).unwrap();
                if i == 0 {
                    c.add(false, &err).unwrap();
                }
            }
            let answer = BufferedExec {
                encoding: if base64 { "base64".into() } else { String::new() },
                pid: Some(7),
                started_at: "t0".into(),
                exit_code: 3,
                ..Default::default()
            };
            let (body, len) = body_of(c.finish(&answer).unwrap());
            let whole = BufferedExec {
                stdout: encode(&out, base64),
                stderr: encode(&err, base64),
                ..answer
            };
            let expected = serde_json::to_vec(&whole).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&body),
                String::from_utf8_lossy(&expected),
                "base64 {base64}, cut {cut}"
            );
            assert_eq!(len, body.len() as u64);
            assert_eq!(budget.used.load(Ordering::SeqCst), 0, "the body was dropped");
        }
    }
}

#[tokio::test]
async fn buffered_output_stops_at_its_encoded_limit_and_at_the_budget() {
    // NULs are 6 bytes each in JSON: the limit counts those.
    let budget = leak(1 << 20);
    let mut c = Collector::new(false, budget, 64 << 10);
    let zeros = vec![0u8; 1 << 20];
    assert_eq!(c.add(true, &zeros), Err(Cut::Answer));
    assert!(
        c.held.n <= 64 << 10 && c.held.n > (64 << 10) - 6 * PIECE,
        "{}",
        c.held.n
    );
    assert_eq!(budget.used.load(Ordering::SeqCst), c.held.n);
    // A second answer shares the budget: it runs out.
    let mut d = Collector::new(false, budget, 16 << 20);
    assert_eq!(d.add(false, &vec![0u8; 4 << 20]), Err(Cut::Budget));
    assert!(budget.free() < 6 * PIECE, "{}", budget.free());
    let (body, _) = body_of(d.finish(&BufferedExec::default()).unwrap());
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["stderr"].as_str().unwrap().chars().all(|ch| ch == '\0'));
    // Everything goes back once the answers are gone.
    drop(c);
    assert_eq!(budget.used.load(Ordering::SeqCst), 0);
    assert!(Cut::Budget.message(1, 32 << 20).contains("32 MiB for all at once"));

    // An answer nobody takes gives its memory and budget back at its deadline.
    let mut e = Collector::new(false, budget, 1 << 20);
    e.add(true, b"abc").unwrap();
    let body = e.finish(&BufferedExec::default()).unwrap();
    assert!(budget.used.load(Ordering::SeqCst) > 0);
    body.expire_after(Duration::from_millis(50));
    let t0 = std::time::Instant::now();
    while budget.used.load(Ordering::SeqCst) != 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "the answer was kept");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut body = std::pin::pin!(body);
    let frame = std::future::poll_fn(|cx| axum::body::HttpBody::poll_frame(body.as_mut(), cx)).await;
    assert!(frame
        .unwrap()
        .unwrap_err()
        .to_string()
        .contains("did not take its buffered answer"));
    assert!(Cut::Answer
        .message(16 << 20, 1)
        .contains("output exceeded 16 MiB (stdout and stderr together, as encoded in this answer): it was killed"));
}

#[test]
fn query_maps_to_agent_requests() {
    let r = exec_request(&q("cmd=echo&args=a b&args=it's"), false).unwrap();
    assert_eq!(r.shell.as_deref(), Some("echo 'a b' 'it'\\''s'"));
    assert_eq!(r.shell_path.as_deref(), Some("/bin/bash"));
    assert_eq!((r.uid, r.gid), (Some(slicer_agent_proto::DEFAULT_USER), None));
    let r = exec_request(&q("cmd=ls&args=-la&shell="), false).unwrap();
    assert_eq!(r.argv, vec!["ls", "-la"]);
    let r = exec_request(&q("cmd=sleep&args=600"), true).unwrap();
    assert_eq!((r.argv, r.shell), (vec!["sleep".to_string(), "600".to_string()], None));
    let r = exec_request(&q("cmd=echo $HOME&shell=/bin/bash"), true).unwrap();
    assert_eq!(r.shell.as_deref(), Some("echo $HOME"));
    let r = exec_request(&q("cmd=id&uid=1000&gid=0&env=A=1&cwd=~/x&stdin=true"), false).unwrap();
    assert_eq!((r.uid, r.gid, r.stdin), (Some(1000), None, true));
    assert_eq!(r.cwd.as_deref(), Some("~/x"));
    assert_eq!(r.env, vec![("A".to_string(), "1".to_string())]);
    let r = exec_request(&q("cmd=id&uid=0&gid=0"), false).unwrap();
    assert_eq!((r.uid, r.gid), (Some(0), Some(0)));
    assert!(exec_request(&q("args=x"), false).is_err());
    assert!(exec_request(&q("cmd=x&env=novalue"), false).is_err());
    assert!(exec_request(&q("cmd=x&cwd=/a/../b"), false).is_err());
    assert!(exec_request(&q("cmd=x&cwd=../.."), false).is_err());
    assert!(exec_request(&q("cmd=x&cwd=rel"), false).is_err());
    assert!(exec_request(&q("cmd=x&stdin=maybe"), false).is_err());
}
