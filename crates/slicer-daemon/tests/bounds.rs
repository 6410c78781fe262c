//! What the daemon holds for a tenant is bounded: a buffered exec that prints for ever is cut at
//! 16 MiB of JSON (the command killed, the daemon's memory barely moving), ten at once share a
//! 32 MiB budget, a guest whose agent stops answering makes health and filesystem calls fail
//! within their deadlines, and 1,100 silent sockets keep nobody from the API. The connection
//! caps and the request timeout have unit tests in the crate (serve.rs, api/mod.rs).

mod common;

use slicer_api::routes;
use std::time::{Duration, Instant};

use common::{no_qemu_for, TestDaemon};
use http::Method;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use slicer_api::client::{empty, query};

/// The tests here measure the process's memory and time calls: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cfg(group: &str, image: &str, port: u16) -> String {
    common::config_yaml(group, &format!("    image: {image}\n    warm_start: false\n"), port)
}

/// Resident memory of this process (the daemon runs in it, see common::TestDaemon), in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// The `-accel` argument of the QEMU running `hostname` (for the numbers printed).
fn accel_of(hostname: &str) -> String {
    common::qemu_pid_of(hostname)
        .map(slicer_testkit::qemu::args_of)
        .and_then(|args| args.iter().skip_while(|a| *a != "-accel").nth(1).cloned())
        .unwrap_or_else(|| "?".into())
}

/// Deletes the VM, asserting its QEMU is gone.
async fn delete(d: &TestDaemon, group: &str, h: &str) {
    let (s, v) = d.send_json(Method::DELETE, &routes::group_node(group, h), "").await;
    assert_eq!(s, 200, "{v}");
    assert!(no_qemu_for(h), "QEMU of {h} still runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn buffered_exec_of_endless_output_is_cut_and_killed() {
    let _serial = SERIAL.lock().await;
    let d = TestDaemon::start(|p| cfg("yes", "min", p)).await;
    let h = d.create_vm("yes", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();

    // Sample the process's memory while the request runs.
    let before = rss();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut peak = rss();
        loop {
            tokio::select! {
                _ = &mut stop_rx => return peak,
                _ = tokio::time::sleep(Duration::from_millis(10)) => peak = peak.max(rss()),
            }
        }
    });

    let t0 = Instant::now();
    let q = query(&[("cmd", "yes".into()), ("buffered", "true".into())]);
    let resp = d
        .client()
        .send(Method::POST, &format!("{}?{q}", routes::vm_exec(&h)), None, empty())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Read the answer without keeping it (the client shares this process's memory): its
    // length, its start and its last 64 KiB.
    let (mut len, mut head, mut tail) = (0usize, Vec::new(), Vec::new());
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.unwrap().into_data() else { continue };
        len += data.len();
        if head.len() < 64 {
            head.extend_from_slice(&data[..data.len().min(64 - head.len())]);
        }
        tail.extend_from_slice(&data);
        if tail.len() > 128 << 10 {
            tail.drain(..tail.len() - (64 << 10));
        }
    }
    let took = t0.elapsed();
    let _ = stop_tx.send(());
    let peak = sampler.await.unwrap();
    let growth = peak.saturating_sub(before);
    eprintln!(
        "buffered `yes` ({}): answered in {took:?}, {len} bytes; RSS {} MiB before, peak {} MiB (+{} MiB)",
        accel_of(&h),
        before >> 20,
        peak >> 20,
        growth >> 20
    );
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert!(growth < 64 << 20, "RSS grew by {} MiB", growth >> 20);

    // SlicerVM's buffered shape with the first 16 MiB of output ("y\n" is 3 bytes in JSON).
    assert!(
        head.starts_with(br#"{"stdout":"y\ny\ny\n"#),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // 16 MiB as sent (escapes count), give or take the last piece.
    let limit = slicer_daemon::api::MAX_BUFFERED_JSON;
    assert!(len > limit - (64 << 10) && len < limit + 4096, "{len}");
    let text = String::from_utf8_lossy(&tail);
    let rest = &text[text.rfind(r#","stderr":"#).expect("a stderr field")..];
    let v: Value = serde_json::from_str(&format!("{{{}", &rest[1..])).unwrap();
    assert_eq!(v["exit_code"], 137, "{v}");
    assert_eq!(v["signal"], "SIGKILL", "{v}");
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains("output exceeded 16 MiB") && err.contains("killed"), "{v}");

    // The command is gone from the guest.
    let answered = Instant::now();
    let deadline = answered + Duration::from_secs(20);
    loop {
        let (s, v) = d.sh(&h, "pgrep -x yes; echo rc=$?").await;
        assert_eq!(s, 200, "{v}");
        if v["stdout"] == "rc=1\n" {
            eprintln!("no `yes` in the guest {:?} after the answer", answered.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "yes still runs in the guest: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the daemon still serves the VM.
    let (s, v) = d.sh(&h, "echo ok").await;
    assert_eq!((s, v["stdout"].as_str()), (200, Some("ok\n")), "{v}");
    delete(&d, "yes", &h).await;
}

/// A buffered answer read without keeping it (the client shares this process's memory):
/// status, length, and the JSON of its fields after stdout and stderr (or the whole of a
/// short answer).
async fn read_buffered(resp: http::Response<hyper::body::Incoming>) -> (u16, usize, Value) {
    let status = resp.status().as_u16();
    let (mut len, mut tail) = (0usize, Vec::new());
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.unwrap().into_data() else { continue };
        len += data.len();
        tail.extend_from_slice(&data);
        if tail.len() > 128 << 10 {
            tail.drain(..tail.len() - (64 << 10));
        }
    }
    let text = String::from_utf8_lossy(&tail);
    let v = match serde_json::from_str::<Value>(&text) {
        Ok(v) => v,
        Err(_) => {
            let rest = &text[text.rfind(r#","stderr":"#).expect("a stderr field")..];
            serde_json::from_str(&format!("{{{}", &rest[1..])).unwrap()
        }
    };
    (status, len, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn ten_buffered_execs_of_zeros_at_once_stay_within_the_budget() {
    let _serial = SERIAL.lock().await;
    let d = TestDaemon::start(|p| cfg("zero", "min", p)).await;
    let h = d.create_vm("zero", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    // Warm the paths once (first-use allocations are not what is measured).
    let (s, v) = d.sh(&h, "head -c 1000 /dev/zero").await;
    assert_eq!(s, 200, "{v}");

    let before = rss();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut peak = rss();
        loop {
            tokio::select! {
                _ = &mut stop_rx => return peak,
                _ = tokio::time::sleep(Duration::from_millis(10)) => peak = peak.max(rss()),
            }
        }
    });
    // NULs are 6 bytes each in JSON; the last one sends every control byte (and no UTF-8).
    let mut lines = vec!["head -c 400000000 /dev/zero"; 10];
    lines.push(r"head -c 400000000 /dev/urandom | tr '\200-\377' '\000-\177'");
    let t0 = Instant::now();
    let runs = lines.into_iter().map(|line| {
        let (c, h) = (d.client(), h.clone());
        async move {
            let q = query(&[("cmd", line.into()), ("buffered", "true".into()), ("uid", "0".into())]);
            let resp = c
                .send(Method::POST, &format!("{}?{q}", routes::vm_exec(&h)), None, empty())
                .await
                .unwrap();
            read_buffered(resp).await
        }
    });
    let answers = futures_util::future::join_all(runs).await;
    let took = t0.elapsed();
    let _ = stop_tx.send(());
    let peak = sampler.await.unwrap();
    let growth = peak.saturating_sub(before);
    eprintln!(
        "11 buffered execs of 400 MB ({}): statuses {:?}, lengths {:?}, in {took:?}; RSS {} MiB before, peak {} MiB (+{} MiB)",
        accel_of(&h),
        answers.iter().map(|a| a.0).collect::<Vec<_>>(),
        answers.iter().map(|a| a.1).collect::<Vec<_>>(),
        before >> 20,
        peak >> 20,
        growth >> 20
    );
    let (mut cut, mut busy) = (0, 0);
    for (status, len, v) in &answers {
        let err = v["error"].as_str().unwrap_or_default();
        match status {
            200 => {
                assert!(
                    err.contains("output exceeded 16 MiB") || err.contains("ran out"),
                    "{len} bytes: {v}"
                );
                assert!(err.contains("killed"), "{v}");
                assert_eq!((&v["exit_code"], &v["signal"]), (&json!(137), &json!("SIGKILL")), "{v}");
                assert!(*len <= slicer_daemon::api::MAX_BUFFERED_JSON + 4096, "{len}");
                cut += 1;
            }
            503 => {
                assert!(err.contains("try again later"), "{v}");
                busy += 1;
            }
            s => panic!("{s}: {v}"),
        }
    }
    assert!(growth < 64 << 20, "RSS grew by {} MiB", growth >> 20);
    assert!(cut >= 2, "{cut} cut, {busy} busy");

    // The budget is whole again and the daemon serves as before.
    let (s, v) = d
        .sh(&h, "head -c 3000000 /dev/zero | wc -c; pgrep -x head; echo rc=$?")
        .await;
    assert_eq!((s, v["stdout"].as_str()), (200, Some("3000000\nrc=1\n")), "{v}");
    delete(&d, "zero", &h).await;
}

/// Opens `n` TCP connections to `url`'s port that send nothing.
async fn silent_sockets(url: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let addr = url.trim_start_matches("http://").to_string();
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    v
}

/// The peer closed `c` (EOF or reset) by `deadline`.
async fn closed_by(c: &mut tokio::net::TcpStream, deadline: Instant) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    let wait = deadline.saturating_duration_since(Instant::now());
    matches!(
        tokio::time::timeout(wait, c.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root and built images (scripts/test.sh runs it)"]
async fn silent_and_trickling_sockets_keep_nobody_from_the_api() {
    use tokio::io::AsyncWriteExt;
    let _serial = SERIAL.lock().await;
    let nofile = slicer_vmm::raise_nofile_limit();
    assert!(nofile >= 4096, "RLIMIT_NOFILE {nofile}");
    let d = TestDaemon::start(|p| cfg("idle", "min", p)).await;
    let deadline = slicer_daemon::HEADER_DEADLINE;

    // More silent sockets than a listener's cap, all from 127.0.0.1.
    let opened = Instant::now();
    let mut idle = silent_sockets(&d.url, slicer_daemon::MAX_CONNECTIONS + 76).await;
    eprintln!("{} silent sockets opened in {:?}", idle.len(), opened.elapsed());

    // A slowloris from another address: one byte of a request head a second, for ever.
    let addr: std::net::SocketAddr = d.url.trim_start_matches("http://").parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut slow = sock.connect(addr).await.unwrap();
    let slow_from = Instant::now();
    let trickle = tokio::spawn(async move {
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .chain(std::iter::repeat(&b'a'))
        {
            if slow.write_all(&[*b]).await.is_err() {
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        unreachable!("an endless header")
    });

    let t0 = Instant::now();
    let (s, v) = tokio::time::timeout(
        Duration::from_secs(5),
        d.raw(&d.anon(), Method::GET, "/healthz", None, empty()),
    )
    .await
    .expect("/healthz answers within 5 s");
    let healthz = t0.elapsed();
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&v));
    let t1 = Instant::now();
    let (s, v) = tokio::time::timeout(Duration::from_secs(5), d.get("/hostgroup"))
        .await
        .expect("an authenticated GET answers within 5 s");
    let authed = t1.elapsed();
    assert_eq!(s, 200, "{v}");
    eprintln!(
        "with {} silent sockets: /healthz in {healthz:?}, GET /hostgroup with the token in {authed:?}",
        idle.len()
    );

    // Every silent socket is closed by the header deadline (the oldest earlier, displaced).
    let last = idle.len() - 1;
    let by = Instant::now() + deadline + Duration::from_secs(3);
    for (i, c) in idle.iter_mut().enumerate() {
        assert!(closed_by(c, by).await, "silent socket {i} still open");
    }
    let last_closed = opened.elapsed();
    eprintln!("all silent sockets closed {last_closed:?} after the first was opened (socket {last} last)");
    assert!(last_closed >= deadline - Duration::from_secs(1), "{last_closed:?}");

    // The slowloris was cut at the deadline.
    let cut = tokio::time::timeout(deadline + Duration::from_secs(5), trickle)
        .await
        .expect("the trickling socket is cut")
        .unwrap();
    let after = cut - slow_from;
    eprintln!("a head trickled at 1 byte/s was cut after {after:?}");
    assert!(
        after >= deadline && after < deadline + Duration::from_secs(3),
        "{after:?}"
    );
    let (s, _) = d.get("/hostgroup").await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_stopped_agent_fails_health_and_fs_calls_within_their_deadlines() {
    let _serial = SERIAL.lock().await;
    let d = TestDaemon::start(|p| cfg("stk", "systemd", p)).await;
    let h = d.create_vm("stk", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = d.get(&routes::vm_health(&h)).await;
    assert_eq!(s, 200, "{v}");

    // The agent is a systemd unit here: stop it from a process of its own that outlives the
    // exec (PID 1 of the min image could not be stopped from inside).
    let (s, v) = d
        .sh(
            &h,
            "setsid sh -c 'sleep 0.5; kill -STOP $(pidof slicer-agent || pgrep -x slicer-agent)' </dev/null >/dev/null 2>&1 &",
        )
        .await;
    assert_eq!((s, &v["exit_code"]), (200, &json!(0)), "{v}");

    // Health answers until the stop lands, then fails within its 5 s deadline.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, err, took) = loop {
        let t0 = Instant::now();
        let (s, v) = d.get(&routes::vm_health(&h)).await;
        if s != 200 {
            break (s, v, t0.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "health still answers after the agent was stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "health of a stopped agent ({}): {status} after {took:?}: {err}",
        accel_of(&h)
    );
    assert!(status >= 500, "{status} {err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap_or_default()
            .contains("did not answer a health check within 5s"),
        "{err}"
    );
    assert!(took < Duration::from_secs(7), "{took:?}");

    // A filesystem call fails within its 30 s deadline.
    let t0 = Instant::now();
    let (s, v) = d.get(&format!("{}?path=/", routes::vm_fs_readdir(&h))).await;
    let took = t0.elapsed();
    eprintln!("readdir of a stopped agent: {s} after {took:?}: {v}");
    assert!(s >= 500, "{s} {v}");
    assert!(v["error"].as_str().unwrap_or_default().contains("within 30s"), "{v}");
    assert!(
        took >= Duration::from_secs(29) && took < Duration::from_secs(35),
        "{took:?}"
    );

    // Deleting does not need the agent (no graceful shutdown in this config).
    delete(&d, "stk", &h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn the_data_directory_and_the_api_socket_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = TestDaemon::start(|_| {
        "config:\n  host_groups:\n  - name: prv\n    count: 0\n    vcpu: 1\n    ram_gb: 1\n    network: {mode: none}\n  graceful_shutdown: false\n  api:\n    bind_address: ./api.sock\n".to_string()
    })
    .await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.dir.path().join("data")), 0o700);
    // Created under umask 0077.
    assert_eq!(mode(&d.dir.path().join("data/state.db")), 0o600);
    let sock = d.dir.path().join("api.sock");
    assert_eq!(mode(&sock), slicer_daemon::SOCKET_MODE);
    d.stop().await;
    assert!(!sock.exists());
}
