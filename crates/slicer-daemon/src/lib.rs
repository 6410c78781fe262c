//! The slicer daemon: `slicer up` loads a YAML config, serves the REST API and manages VMs.

pub mod api;
pub mod auth;
pub mod config;
pub mod log;
pub mod manager;
pub mod metrics;
pub mod proxy;
pub mod secrets;
pub mod serve;
pub mod state;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
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

pub use serve::{HEADER_DEADLINE, MAX_CONNECTIONS, MAX_PER_PEER};

/// Mode of the UNIX API socket: its owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// Loads and validates the config, prepares images, state and VMs, and starts serving.
///
/// Everything the daemon creates is private to its user: the process umask becomes 0077 (the
/// data directory, `state.db`, VM directories, suspend state, templates), the data directory
/// is made 0700, and a UNIX API socket gets [`SOCKET_MODE`]. (The QEMU jail lays out its
/// mount tree with its own umask.)
pub async fn start(opts: &UpOptions) -> Result<Daemon> {
    // SAFETY: umask only sets the process's file creation mask.
    unsafe { libc::umask(0o077) };
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
    std::fs::set_permissions(&opts.data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (0700)", opts.data_dir.display()))?;
    let images = ImageStore::at(&opts.images_dir.clone().unwrap_or_else(|| opts.data_dir.join("images")));
    let mut settings = settings;
    // Slicer keeps a group's generated CA in `./.slicer/ca/<group>/` of `slicer up`'s
    // working directory (`slicer ca init|issue` and `slicer proxy up` find it there).
    let cwd = std::env::current_dir().context("the working directory (for the host groups' CAs)")?;
    settings.load_group_cas(&cwd)?;
    prepare_images(&images, &mut settings, opts.agent.as_deref()).await?;
    let mut host = Host::with_images(images, &opts.data_dir, &opts.data_dir.join("vms"));
    host.accel_choice = settings.acceleration;
    let token = if settings.auth {
        Some(auth::load_or_create(&opts.data_dir)?)
    } else {
        None
    };
    let listen = settings.listen.clone();
    let manager = Manager::new(settings, host, &opts.data_dir).await?;
    manager.start_accounting(std::time::Duration::from_secs(2));
    manager.proxy().start();
    manager.recover().await?;
    manager.setup_networks().await?;
    let app = api::router(Arc::new(api::AppState {
        manager: manager.clone(),
        token: token.clone(),
    }));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let limits = serve::Limits::default();
    let server = match &listen {
        Listen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the API to {addr} (config.api.bind_address/port)"))?;
            tokio::spawn(serve::serve(l, app, limits, rx))
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("binding the API to {} (config.api.bind_address)", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
                .with_context(|| format!("setting the mode of {}", path.display()))?;
            tokio::spawn(serve::serve(l, app, limits, rx))
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
    let nofile = slicer_vmm::raise_nofile_limit();
    tracing::debug!("open files limit {nofile}");
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

/// Makes every group's image ready before any VM starts: ours are built if missing, OCI
/// references pulled if not in the store yet (a stored one is used as it is, so a restart needs
/// no registry), disk files imported. SlicerVM's own images stand in as ours when their
/// registry cannot be reached, and the log says so.
async fn prepare_images(images: &ImageStore, settings: &mut Settings, agent: Option<&Path>) -> Result<()> {
    let mut done: std::collections::HashMap<String, String> = Default::default();
    let insecure = settings.insecure_registries.clone();
    for g in settings.groups.iter_mut() {
        if let Some(r) = done.get(&g.image) {
            g.image = r.clone();
            continue;
        }
        let wanted = g.image.clone();
        let resolved = if slicer_image::is_builtin(&wanted) {
            build_builtin(images, &wanted, agent).await?;
            wanted.clone()
        } else if wanted.starts_with('/') {
            let store = images.clone();
            let path = PathBuf::from(&wanted);
            tokio::task::spawn_blocking(move || store.import_file(&path))
                .await?
                .with_context(|| format!("host group {}: image {wanted}", g.name))?
                .name
        } else if let Ok(img) = images.get(&wanted) {
            img.name
        } else {
            let agent = agent.with_context(|| {
                format!("image {wanted:?} is not in the store and no agent binary is at hand: run `slicer image pull {wanted}`")
            })?;
            let mut o = slicer_image::oci::PullOptions::new(agent.to_path_buf());
            o.insecure = insecure.clone();
            match slicer_image::oci::pull(images, &wanted, &o).await {
                Ok(img) => img.name,
                Err(e) => match config::slicer_fallback(&wanted) {
                    Some(ours) => {
                        tracing::warn!(
                            image = %wanted,
                            instead = ours,
                            "SlicerVM's image could not be pulled ({}); host group {} runs our {ours} image instead",
                            slicer_agent_client::GuestText(&e),
                            g.name
                        );
                        build_builtin(images, ours, Some(agent)).await?;
                        ours.to_string()
                    }
                    None => return Err(anyhow::Error::new(e).context(format!("host group {}", g.name))),
                },
            }
        };
        done.insert(wanted, resolved.clone());
        g.image = resolved;
    }
    Ok(())
}

async fn build_builtin(images: &ImageStore, name: &str, agent: Option<&Path>) -> Result<()> {
    if images.get(name).is_ok() {
        return Ok(());
    }
    let agent = agent.map(Path::to_path_buf).with_context(|| {
        format!("image {name:?} is not built and no agent binary is at hand: run `slicer image build --variant {name}`")
    })?;
    let variant = name.parse().map_err(anyhow::Error::msg)?;
    let store = images.clone();
    tokio::task::spawn_blocking(move || {
        slicer_image::build_image(&store, &slicer_image::BuildOptions::new(variant, agent))
    })
    .await??;
    Ok(())
}
