//! Slicer Proxy's admin API and control channel against a real daemon (no VMs): every route's
//! statuses and shapes, a fake proxy (a UNIX listener at the control socket speaking the
//! control protocol) that receives the state after each change and whose acknowledgement the
//! change waits for, decisions turned into suggestions, state across a restart, file modes, and
//! a secret value in no answer and no log line.

mod common;

use slicer_api::routes;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{config_yaml, TestDaemon};
use http::Method;
use serde_json::{json, Value};
use slicer_proxy::control::{self, Decision, FromProxy, Mode, ProxyState, ToProxy};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const SECRET: &str = "sk-live-0123456789-very-secret";
/// The fake proxy acknowledges this long after it got a state.
const ACK_DELAY: Duration = Duration::from_millis(400);

/// Everything the daemon wrote while the test ran, at debug level.
fn log_capture() -> Arc<Mutex<Vec<u8>>> {
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let w = log.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
        .with_writer(move || Capture(w.clone()))
        .try_init();
    log
}

/// A fake proxy of `group`: says hello, keeps every state it gets, acknowledges each after
/// [`ACK_DELAY`], and sends what is put in `outbox`.
struct FakeProxy {
    states: Arc<Mutex<Vec<ProxyState>>>,
    outbox: tokio::sync::mpsc::Sender<FromProxy>,
    task: tokio::task::JoinHandle<()>,
    path: std::path::PathBuf,
}

impl FakeProxy {
    fn start(data_dir: &std::path::Path, group: &str) -> FakeProxy {
        FakeProxy::start_acking(data_dir, group, true)
    }

    /// As [`FakeProxy::start`]; `ack: false` is a proxy that never acknowledges.
    fn start_acking(data_dir: &std::path::Path, group: &str, ack: bool) -> FakeProxy {
        let path = control::control_socket(data_dir, group);
        let _ = std::fs::remove_file(&path);
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        let states = Arc::new(Mutex::new(Vec::new()));
        let (outbox, mut rx) = tokio::sync::mpsc::channel::<FromProxy>(64);
        let (st, group) = (states.clone(), group.to_string());
        let task = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (rd, mut wr) = s.into_split();
            let hello = FromProxy::Hello {
                group,
                bind: "192.168.222.1".into(),
                mode: Mode::Audit,
                pid: std::process::id(),
            };
            let line = |m: &FromProxy| format!("{}\n", serde_json::to_string(m).unwrap());
            wr.write_all(line(&hello).as_bytes()).await.unwrap();
            let mut lines = tokio::io::BufReader::new(rd).lines();
            loop {
                tokio::select! {
                    l = lines.next_line() => {
                        let Ok(Some(l)) = l else { return };
                        let ToProxy::State { state } = serde_json::from_str(&l).unwrap();
                        let g = state.generation;
                        st.lock().unwrap().push(state);
                        if !ack {
                            continue;
                        }
                        tokio::time::sleep(ACK_DELAY).await;
                        if wr.write_all(line(&FromProxy::Ack { generation: g }).as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    m = rx.recv() => {
                        let Some(m) = m else { return };
                        wr.write_all(line(&m).as_bytes()).await.unwrap();
                    }
                }
            }
        });
        FakeProxy {
            states,
            outbox,
            task,
            path,
        }
    }

    fn last(&self) -> Option<ProxyState> {
        self.states.lock().unwrap().last().cloned()
    }
}

impl Drop for FakeProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, limit: Duration, mut f: impl FnMut() -> F) {
    let t = Instant::now();
    while !f().await {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sha(t: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(t.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root and built images (scripts/test.sh runs it)"]
async fn admin_api_control_channel_and_restart() {
    let log = log_capture();
    let mut d = TestDaemon::start(|port| config_yaml("sb", "", port)).await;
    let data = d.dir.path().join("data");
    let mut answers = String::new();
    macro_rules! call {
        ($m:expr, $path:expr, $body:expr) => {{
            let (s, v) = d.send_json($m, $path, &$body.to_string()).await;
            answers.push_str(&v.to_string());
            (s, v)
        }};
    }

    // Clients.
    let (s, v) = call!(Method::POST, "/proxy/v1/clients", json!({"name": "reviewfn"}));
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("spt_") && token.len() >= 4 + 43, "{token}");
    assert!(v["created_at"].is_string() && v["name"] == "reviewfn");
    for (body, status) in [
        (json!({"name": "reviewfn"}), 409),
        (json!({"name": "x y"}), 400),
        (json!({"name": ""}), 400),
        (json!({"name": "lit", "token": "short"}), 400),
        (json!({"name": "lit", "token": "tok@evil-0123456789"}), 400),
        (json!({"name": "lit", "tok": "x"}), 400),
    ] {
        let (s, v) = call!(Method::POST, "/proxy/v1/clients", body);
        assert_eq!(s, status, "{body}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    let (s, _) = call!(
        Method::POST,
        "/proxy/v1/clients",
        json!({"name": "lit", "token": "literal-token-0123"})
    );
    assert_eq!(s, 201);
    let (s, v) = call!(
        Method::POST,
        "/proxy/v1/clients",
        json!({"name": "lit2", "token": "literal-token-0123"})
    );
    assert_eq!(s, 409, "a duplicate token: {v}");
    let (s, v) = d.get("/proxy/v1/clients").await;
    assert_eq!(s, 200);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["reviewfn", "lit"]);
    assert!(v[0].get("token").is_none(), "{v}");

    // A proxy-bound VM needs a known client, and a proxy of its group that said hello.
    let (s, v) = call!(
        Method::POST,
        &routes::group_nodes("sb"),
        json!({"proxy": {"client": "nobody"}})
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = call!(
        Method::POST,
        &routes::group_nodes("sb"),
        json!({"proxy": {"client": "reviewfn"}})
    );
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("slicer proxy up --hostgroup sb --bind"),
        "{v}"
    );

    // The proxy connects: it gets the state, then every change, and changes wait for its ack.
    let fake = FakeProxy::start(&data, "sb");
    wait_until("the daemon links to the proxy", Duration::from_secs(5), || async {
        fake.last().is_some()
    })
    .await;
    let first = fake.last().unwrap();
    let c = first.clients.iter().find(|c| c.name == "reviewfn").unwrap();
    assert_eq!(c.token_sha256, vec![sha(&token)], "hashes travel, never tokens");
    assert!(!serde_json::to_string(&first).unwrap().contains(&token));

    // Secrets.
    let t0 = Instant::now();
    let (s, v) = call!(
        Method::POST,
        "/proxy/v1/secrets",
        json!({"name": "openai", "host": "api.openai.com", "value": SECRET})
    );
    assert_eq!(s, 201, "{v}");
    assert!(
        t0.elapsed() >= ACK_DELAY,
        "the change answered before the proxy acknowledged it"
    );
    assert_eq!(v["type"], "bearer");
    assert!(v.get("value").is_none());
    let pushed = fake.last().unwrap();
    assert!(pushed.generation > first.generation);
    assert_eq!(pushed.secrets.len(), 1);
    assert_eq!(pushed.secrets[0].value, SECRET);
    for (body, status, words) in [
        (
            json!({"name": "openai", "host": "api.openai.com", "value": "v"}),
            409,
            "exists",
        ),
        (
            json!({"name": "o2", "host": "h.io", "type": "oauth-claude", "value": "v"}),
            400,
            "not supported",
        ),
        (
            json!({"name": "o2", "host": "h.io", "type": "magic", "value": "v"}),
            400,
            "unknown",
        ),
        (
            json!({"name": "o2", "host": "h.io", "type": "basic", "value": "nocolon"}),
            400,
            "user:password",
        ),
        (
            json!({"name": "o2", "host": "h.io", "value": "a\r\nX-Evil: 1"}),
            400,
            "control",
        ),
        (json!({"name": "o2", "host": "bad host", "value": "v"}), 400, "host"),
        (
            json!({"name": "o2", "host": "h.io", "value": "x".repeat(65 << 10)}),
            400,
            "value",
        ),
    ] {
        let (s, v) = call!(Method::POST, "/proxy/v1/secrets", body);
        assert_eq!(s, status, "{v}");
        assert!(v["error"].as_str().unwrap().contains(words), "{v}");
    }
    let (s, v) = call!(
        Method::POST,
        "/proxy/v1/secrets",
        json!({"name": "openai", "host": "api.openai.com", "value": SECRET, "force": true})
    );
    assert_eq!(s, 201, "{v}");
    assert!(v["updated_at"].is_string());
    let (s, _) = call!(
        Method::POST,
        "/proxy/v1/secrets",
        json!({"name": "gh", "host": "api.github.com", "type": "basic", "value": "u:p"})
    );
    assert_eq!(s, 201);
    let (s, v) = d.get("/proxy/v1/secrets").await;
    answers.push_str(&v.to_string());
    assert_eq!((s, v.as_array().unwrap().len()), (200, 2));

    // Rules.
    for (body, status) in [
        (json!({"client": "nobody", "host": "a.io"}), 400),
        (json!({"client": "reviewfn", "host": "a.io", "secret": "nope"}), 400),
        (
            json!({"client": "reviewfn", "host": "a.io", "passthrough": true, "methods": ["GET"]}),
            400,
        ),
        (json!({"client": "reviewfn", "host": "a.io", "paths": ["v1"]}), 400),
        (json!({"client": "reviewfn", "host": "a.io", "ports": [0]}), 400),
        (json!({"client": "reviewfn", "host": "a b"}), 400),
    ] {
        let (s, v) = call!(Method::POST, "/proxy/v1/allows", body);
        assert_eq!(s, status, "{body}: {v}");
        assert!(v["error"].is_string());
    }
    let (s, v) = call!(
        Method::POST,
        "/proxy/v1/allows",
        json!({"client": "reviewfn", "host": "api.openai.com", "secret": "openai", "methods": ["get", "POST"], "paths": ["/v1/*"]})
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["host"], "api.openai.com");
    let (s, v) = call!(
        Method::POST,
        "/proxy/v1/allows",
        json!({"client": "reviewfn", "host": "api.openai.com", "methods": ["POST", "GET"], "paths": ["/v1/*"]})
    );
    assert_eq!(s, 409, "same identity: {v}");
    let (s, v) = call!(
        Method::POST,
        "/proxy/v1/allows",
        json!({"client": "reviewfn", "host": "*.github.com", "ttl_seconds": 3600})
    );
    assert_eq!(s, 201);
    assert!(v["expires"].is_string(), "{v}");
    let (s, _) = call!(
        Method::POST,
        "/proxy/v1/allows",
        json!({"client": "reviewfn", "host": "db.internal", "ports": [5432], "passthrough": true})
    );
    assert_eq!(s, 201);
    let (s, v) = d.get(&routes::proxy_client("reviewfn")).await;
    assert_eq!(s, 200);
    let hosts: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["host"].as_str().unwrap())
        .collect();
    assert_eq!(
        hosts,
        ["api.openai.com", "*.github.com", "db.internal"],
        "declaration order"
    );
    assert_eq!(fake.last().unwrap().clients[1].rules.len(), 3, "{:?}", fake.last());
    assert_eq!(d.get(&routes::proxy_client("nobody")).await.0, 404);

    // Removal by host and by tuple.
    let (s, _) = call!(Method::DELETE, &routes::proxy_allow("reviewfn", "db.internal"), "");
    assert_eq!(s, 204);
    let (s, _) = call!(Method::DELETE, &routes::proxy_allow("reviewfn", "db.internal"), "");
    assert_eq!(s, 404);
    let (s, _) = call!(
        Method::POST,
        &routes::proxy_allows_revoke(),
        json!({"client": "reviewfn", "host": "*.github.com", "methods": ["GET"]})
    );
    assert_eq!(s, 404, "no rule with that identity");
    let (s, _) = call!(
        Method::POST,
        &routes::proxy_allows_revoke(),
        json!({"client": "reviewfn", "host": "*.github.com"})
    );
    assert_eq!(s, 204);
    assert_eq!(
        d.get(&routes::proxy_client("reviewfn"))
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Decisions become suggestions (what the rules still deny), and metrics.
    let deny = |method: &str, host: &str, path: &str| {
        FromProxy::Decision(Decision {
            client: "reviewfn".into(),
            method: method.into(),
            scheme: "https".into(),
            host: host.into(),
            port: 443,
            path: path.into(),
            reason: "no-rule".into(),
            ..Decision::default()
        })
    };
    for m in [
        deny("GET", "pypi.org", "/simple/requests/"),
        deny("GET", "pypi.org", "/simple/flask/"),
        deny("GET", "api.openai.com", "/v1/models"),
        deny("CONNECT", "strict.example", ""),
    ] {
        fake.outbox.send(m).await.unwrap();
    }
    let t = Instant::now();
    let got: Value = loop {
        let v = d.get(&routes::proxy_client_suggest("reviewfn")).await.1;
        if v.as_array().is_some_and(|a| a.len() == 2) {
            break v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the decisions did not reach suggest: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(got[0]["host"], "pypi.org");
    assert_eq!(got[0]["methods"], json!(["GET"]));
    assert_eq!(got[0]["paths"], json!(["/simple/flask/", "/simple/requests/"]));
    assert_eq!(
        got[1]["host"], "strict.example",
        "api.openai.com/v1/models is allowed now: {got}"
    );
    let metrics = d
        .raw(&d.client(), Method::GET, "/metrics", None, slicer_api::client::empty())
        .await
        .1;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(metrics.contains("slicer_proxies_connected 1"), "{metrics}");
    assert!(
        metrics.contains(r#"slicer_proxy_decisions_total{group="sb",decision="deny"} 4"#),
        "{metrics}"
    );

    // Files: the state file and the database are the daemon's alone.
    let sf = control::state_file(&data);
    let mode = std::fs::metadata(&sf).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let on_disk: ProxyState = serde_json::from_slice(&std::fs::read(&sf).unwrap()).unwrap();
    assert_eq!(on_disk, fake.last().unwrap());
    let db = data.join("state.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();

    // A restart keeps everything (and makes the database private again).
    drop(fake);
    d.stop().await;
    d.restart().await;
    assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600);
    let (_, v) = d.get("/proxy/v1/clients").await;
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(
        d.get(&routes::proxy_client("reviewfn"))
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(d.get("/proxy/v1/secrets").await.1.as_array().unwrap().len(), 2);
    assert_eq!(
        d.get(&routes::proxy_client_suggest("reviewfn"))
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let after: ProxyState = serde_json::from_slice(&std::fs::read(&sf).unwrap()).unwrap();
    assert!(
        after.generation > on_disk.generation,
        "generations grow across restarts"
    );

    // A proxy that never acknowledges holds a change up for at most 2 s, and does not fail it.
    let mute = FakeProxy::start_acking(&data, "sb", false);
    wait_until("the daemon links to the mute proxy", Duration::from_secs(5), || async {
        mute.last().is_some()
    })
    .await;
    let t0 = Instant::now();
    let (s, _) = call!(Method::DELETE, &routes::proxy_secret("gh"), "");
    assert_eq!(s, 204);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(mute.last().unwrap().secrets.iter().all(|s| s.name != "gh"));
    drop(mute);

    // Deletes.
    let (s, _) = call!(Method::DELETE, &routes::proxy_secret("gh"), "");
    assert_eq!(s, 404);
    let (s, _) = call!(Method::DELETE, &routes::proxy_client("reviewfn"), "");
    assert_eq!(s, 204);
    let (s, _) = call!(Method::DELETE, &routes::proxy_client("reviewfn"), "");
    assert_eq!(s, 404);
    assert_eq!(d.get(&routes::proxy_client("reviewfn")).await.0, 404);
    let after: ProxyState = serde_json::from_slice(&std::fs::read(&sf).unwrap()).unwrap();
    assert!(after.clients.iter().all(|c| c.name != "reviewfn"));

    d.stop().await;
    let log = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(log.contains("proxy secret stored"), "the capture works: {log}");
    assert!(!log.contains(SECRET), "a secret value was logged");
    assert!(!answers.contains(SECRET), "a secret value was answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_proxy_bound_vm_gets_its_own_token_in_its_login_environment() {
    let mut d = TestDaemon::start(|port| config_yaml("pv", "", port)).await;
    let data = d.dir.path().join("data");
    let (s, v) = d
        .send_json(Method::POST, "/proxy/v1/clients", r#"{"name": "agent"}"#)
        .await;
    assert_eq!(s, 201, "{v}");
    let fake = FakeProxy::start(&data, "pv");
    wait_until("the daemon links to the proxy", Duration::from_secs(5), || async {
        fake.last().is_some()
    })
    .await;
    let tokens = |f: &FakeProxy| {
        f.last()
            .and_then(|s| s.clients.into_iter().find(|c| c.name == "agent"))
            .map(|c| c.token_sha256)
            .unwrap_or_default()
    };
    assert_eq!(tokens(&fake).len(), 1);

    let v = d.create_vm("pv", json!({"proxy": {"client": "agent"}})).await;
    let h = v["hostname"].as_str().unwrap().to_string();
    // A login shell (profile.d) and PAM sessions (/etc/environment) see the proxy.
    let (s, v) = d
        .sh(
            &h,
            ". /etc/profile.d/slicer-proxy.sh; echo \"P=$HTTPS_PROXY\"; echo \"N=$no_proxy\"; grep -c PROXY= /etc/environment",
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let out = v["stdout"].as_str().unwrap().to_string();
    let url = out
        .lines()
        .find_map(|l| l.strip_prefix("P="))
        .unwrap_or_else(|| panic!("{out}"));
    let token = url
        .strip_prefix("http://proxy:")
        .and_then(|r| r.strip_suffix("@192.168.222.1:3128"))
        .unwrap_or_else(|| panic!("{url}"));
    assert!(out.contains("N=localhost,127.0.0.1\n"), "{out}");
    assert!(
        out.ends_with("3\n"),
        "HTTP_PROXY, HTTPS_PROXY, NO_PROXY in /etc/environment: {out}"
    );
    let hashes = tokens(&fake);
    assert_eq!(hashes.len(), 2, "the client's token and the VM's");
    assert!(hashes.contains(&sha(token)));

    // The VM's token goes with the VM.
    let (s, v) = d.send_json(Method::DELETE, &routes::group_node("pv", &h), "").await;
    assert_eq!(s, 200, "{v}");
    wait_until("the VM's token is withdrawn", Duration::from_secs(10), || async {
        tokens(&fake).len() == 1
    })
    .await;
    assert!(!tokens(&fake).contains(&sha(token)));
    d.stop().await;
}
