//! A local OCI registry: Debian's `docker-registry` on a free loopback port, its storage in a
//! directory of the caller's, stopped when dropped.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, ChildGuard};

/// A running `docker-registry`.
pub struct Registry {
    _child: ChildGuard,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// Where it keeps blobs and manifests.
    pub storage: PathBuf,
}

impl Registry {
    /// Starts one with its files in `dir/registry-<port>`; with `htpasswd` (lines
    /// `user:bcrypt-hash`) it asks for basic auth. Returns once it listens (20 s at most).
    pub fn start(dir: &Path, htpasswd: Option<&str>) -> io::Result<Registry> {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let root = dir.join(format!("registry-{port}"));
        std::fs::create_dir_all(&root)?;
        let mut auth = String::new();
        if let Some(lines) = htpasswd {
            let file = root.join("htpasswd");
            std::fs::write(&file, lines)?;
            auth = format!(
                "auth:\n  htpasswd:\n    realm: slicer-test\n    path: {}\n",
                file.display()
            );
        }
        let storage = root.join("data");
        let cfg = root.join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{auth}",
                storage.display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("starting docker-registry (apt-get install docker-registry; scripts/setup.sh does): {e}"),
                )
            })?;
        let child = ChildGuard(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("docker-registry did not listen on {addr}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Registry {
            _child: child,
            addr,
            storage,
        })
    }
}
