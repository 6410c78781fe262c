//! The slicer daemon: `slicer up` loads a YAML config, serves the REST API and manages VMs.

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod manager;
pub mod metrics;
pub mod secrets;
pub mod state;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use slicer_image::ImageStore;
use slicer_vmm::Host;

use crate::config::{Listen, Settings};
use crate::manager::Manager;

pub struct UpOptions {
    pub config: PathBuf,
    pub data_dir: PathBuf,
    /// Image store; default `<data_dir>/images`.
    pub images_dir: Option<PathBuf>,
    /// Static agent used to build a missing image; `None` makes a missing image an error.
    pub agent: Option<PathBuf>,
}

/// A started daemon: its API address and the manager, for tests and the CLI.
pub struct Daemon {
    pub manager: Arc<Manager>,
    pub listen: Listen,
    pub token: Option<String>,
    shutdown: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

/// Loads and validates the config, prepares images, state and VMs, and starts serving.
pub async fn start(opts: &UpOptions) -> Result<Daemon> {
    let file = config::File::load(&opts.config)?;
    let base = opts
        .config
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .unwrap_or_else(|| PathBuf::from("."));
    let settings: Settings = file
        .settings(&base)
        .with_context(|| format!("in {}", opts.config.display()))?;
    std::fs::create_dir_all(&opts.data_dir).with_context(|| format!("creating {}", opts.data_dir.display()))?;
    let images = ImageStore::at(&opts.images_dir.clone().unwrap_or_else(|| opts.data_dir.join("images")));
    let mut wanted: Vec<&str> = settings.groups.iter().map(|g| g.image.as_str()).collect();
    wanted.dedup();
    for name in wanted {
        if images.get(name).is_err() {
            let agent = opts.agent.clone().with_context(|| {
                format!("image {name:?} is not built and no agent binary is at hand: run `slicer image build --variant {name}`")
            })?;
            let variant = name.parse().map_err(anyhow::Error::msg)?;
            let store = images.clone();
            tokio::task::spawn_blocking(move || {
                slicer_image::build_image(&store, &slicer_image::BuildOptions::new(variant, agent))
            })
            .await??;
        }
    }
    let mut host = Host::with_images(images, &opts.data_dir, &opts.data_dir.join("vms"));
    host.accel_choice = settings.acceleration;
    let token = if settings.auth {
        Some(auth::load_or_create(&opts.data_dir)?)
    } else {
        None
    };
    let listen = settings.listen.clone();
    let manager = Manager::new(settings, host, &opts.data_dir).await?;
    manager.recover().await?;
    manager.setup_networks().await?;
    let app = api::router(Arc::new(api::AppState {
        manager: manager.clone(),
        token: token.clone(),
    }));
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let stop = async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let server = match &listen {
        Listen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the API to {addr} (config.api.bind_address/port)"))?;
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stop).await {
                    tracing::error!("API server: {e}");
                }
            })
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("binding the API to {} (config.api.bind_address)", path.display()))?;
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stop).await {
                    tracing::error!("API server: {e}");
                }
            })
        }
    };
    manager.start_count_vms().await?;
    // Templates of warm-starting groups, off the start path: the first create waits for its
    // template if it is still being built.
    let m = manager.clone();
    tokio::spawn(async move { m.prepare_templates().await });
    Ok(Daemon {
        manager,
        listen,
        token,
        shutdown: tx,
        server,
    })
}

impl Daemon {
    /// Stops serving, then stops the VMs (per `graceful_shutdown`).
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.server).await;
        self.manager.shutdown_all().await;
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `slicer up`: runs until SIGINT or SIGTERM.
pub async fn run(opts: UpOptions) -> Result<()> {
    let d = start(&opts).await?;
    match &d.listen {
        Listen::Tcp(a) => eprintln!(
            "slicer API on http://{a}{}",
            if d.token.is_some() {
                format!(" (bearer token in {})", auth::token_path(&opts.data_dir).display())
            } else {
                String::new()
            }
        ),
        Listen::Unix(p) => eprintln!("slicer API on {}", p.display()),
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("stopping: {} VMs", d.manager.list(None).map(|l| l.len()).unwrap_or(0));
    d.stop().await;
    Ok(())
}
