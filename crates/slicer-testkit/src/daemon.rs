//! The daemon library (what `slicer up` runs) in this process, on a free port with a
//! temporary data directory; images come from the store of [`crate::images_dir`]. Stopped (its
//! VMs with it) when dropped, even when the test failed.

use std::path::PathBuf;

use http::Method;
use http_body_util::BodyExt;
use slicer_api::client::{empty, full, Body};
use slicer_api::ApiClient;
use slicer_daemon::{Daemon, UpOptions};

use crate::{free_port, images_dir};

/// A running daemon and what a test needs to talk to it.
pub struct TestDaemon {
    /// The daemon, `None` between [`TestDaemon::stop`] and [`TestDaemon::restart`].
    pub daemon: Option<Daemon>,
    /// Holds the config and the data directory (`data`).
    pub dir: tempfile::TempDir,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// The bearer token the daemon made.
    pub token: String,
    /// The config file.
    pub config: PathBuf,
    /// The image store it uses.
    pub images: PathBuf,
}

/// A config with one host group `group`, the given extra group keys and API port.
pub fn config_yaml(group: &str, extra: &str, port: u16) -> String {
    format!(
        "config:\n  host_groups:\n  - name: {group}\n    count: 0\n    vcpu: 2\n    ram_gb: 1\n    network: {{mode: none}}\n{extra}  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
    )
}

impl TestDaemon {
    /// Starts a daemon with the config `yaml_for_port` gives for its (free) port.
    pub async fn start(yaml_for_port: impl Fn(u16) -> String) -> TestDaemon {
        TestDaemon::start_with_images(yaml_for_port, &images_dir()).await
    }

    /// As [`TestDaemon::start`], with the image store at `images`.
    pub async fn start_with_images(yaml_for_port: impl Fn(u16) -> String, images: &std::path::Path) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("slicer-daemon-test-")
            .tempdir()
            .expect("a temporary directory");
        let port = free_port();
        let config = dir.path().join("slicer.yaml");
        std::fs::write(&config, yaml_for_port(port)).expect("writing the config");
        let mut t = TestDaemon {
            daemon: None,
            dir,
            url: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            config,
            images: images.to_path_buf(),
        };
        t.restart().await;
        t
    }

    /// Starts the daemon (again) on the same data directory.
    pub async fn restart(&mut self) {
        let d = slicer_daemon::start(&UpOptions {
            config: self.config.clone(),
            data_dir: self.dir.path().join("data"),
            images_dir: Some(self.images.clone()),
            agent: None,
        })
        .await
        .unwrap_or_else(|e| panic!("starting the daemon: {e:#}"));
        self.token = d.token.clone().unwrap_or_default();
        self.daemon = Some(d);
    }

    pub async fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop().await;
        }
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::new(&self.url, Some(self.token.clone())).expect("an API client")
    }

    pub fn anon(&self) -> ApiClient {
        ApiClient::new(&self.url, None).expect("an API client")
    }

    /// A raw request: (status, body bytes).
    pub async fn raw(&self, c: &ApiClient, m: Method, path: &str, ct: Option<&str>, body: Body) -> (u16, Vec<u8>) {
        let resp = c
            .send(m, path, ct, body)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e:#}"));
        let status = resp.status().as_u16();
        let b = resp
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{path}: reading the answer: {e:#}"))
            .to_bytes()
            .to_vec();
        (status, b)
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let (s, b) = self.raw(&self.client(), Method::GET, path, None, empty()).await;
        (s, serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null))
    }

    pub async fn send_json(&self, m: Method, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (s, b) = self
            .raw(
                &self.client(),
                m,
                path,
                Some("application/json"),
                full(body.to_string()),
            )
            .await;
        (s, serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null))
    }
}

impl TestDaemon {
    /// Creates a VM with `wait=agent`, asserting 201; returns the answer.
    pub async fn create_vm(&self, group: &str, body: serde_json::Value) -> serde_json::Value {
        let path = format!("{}?wait=agent", slicer_api::routes::group_nodes(group));
        let (s, v) = self.send_json(Method::POST, &path, &body.to_string()).await;
        assert_eq!(s, 201, "{v}");
        v
    }

    /// Runs a shell line in a VM as root with `buffered=true`: (status, answer).
    pub async fn sh(&self, vm: &str, line: &str) -> (u16, serde_json::Value) {
        self.sh_as(vm, line, Some(0)).await
    }

    /// As [`TestDaemon::sh`], as `uid` (none: the image's default user).
    pub async fn sh_as(&self, vm: &str, line: &str, uid: Option<u32>) -> (u16, serde_json::Value) {
        let mut q = vec![("cmd", line.to_string()), ("buffered", "true".into())];
        q.extend(uid.map(|u| ("uid", u.to_string())));
        let q = slicer_api::client::query(&q);
        self.send_json(Method::POST, &format!("{}?{q}", slicer_api::routes::vm_exec(vm)), "")
            .await
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        // A failed test must not leave VMs: stop them on a fresh runtime.
        if let Some(d) = self.daemon.take() {
            std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Runtime::new() {
                    rt.block_on(d.stop());
                }
            })
            .join()
            .ok();
        }
    }
}

/// The daemon's log of this test binary from the first call on (warnings and errors), written
/// as `slicer up` writes it: `tracing_subscriber::fmt` (see crates/slicer/src/main.rs) through
/// `slicer_daemon::log::OneLine`.
pub fn daemon_log() -> String {
    use std::sync::{Arc, Mutex, OnceLock};
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let w = log.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_writer(move || slicer_daemon::log::OneLine(Capture(w.clone())))
            .try_init();
        log
    });
    String::from_utf8_lossy(&log.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}
