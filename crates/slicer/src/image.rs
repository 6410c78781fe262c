use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use slicer_image::oci::{pull, PullOptions};
use slicer_image::{build_image, BuildOptions, ImageStore, Variant};

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build (or verify the cache of) a guest image: kernel, root filesystem and agent.
    Build {
        /// min: slicer-agent is PID 1 (fast boot); systemd: systemd runs the agent.
        #[arg(long, default_value = "min")]
        variant: Variant,
        /// Static slicer-agent binary to install in the image.
        #[arg(long)]
        agent: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Debian mirror for debootstrap (default: the host's apt mirror).
        #[arg(long)]
        mirror: Option<String>,
    },
    /// Pull an OCI or Docker image (REF: name[:tag] or name@sha256:…; short names are Docker
    /// Hub's) and turn it into a bootable disk; a digest already in the store is not fetched.
    Pull {
        reference: String,
        /// The registry may be reached over plain HTTP (like `insecure_registry`).
        #[arg(long)]
        insecure: bool,
        /// Docker config.json with credentials (default: $DOCKER_CONFIG or ~/.docker).
        #[arg(long)]
        docker_config: Option<PathBuf>,
        #[arg(long)]
        agent: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// List images: ours and pulled ones, with how they boot, digests and sizes.
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Remove a pulled image (refused while a VM, template or commit uses it).
    #[command(alias = "rm")]
    Remove {
        reference: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

pub fn run(cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Build {
            variant,
            agent,
            data_dir,
            mirror,
        } => build(variant, agent, data_dir, mirror),
        ImageCmd::Pull {
            reference,
            insecure,
            docker_config,
            agent,
            data_dir,
        } => pull_image(&reference, insecure, docker_config, agent, data_dir),
        ImageCmd::List { json, data_dir } => list(json, data_dir),
        ImageCmd::Remove { reference, data_dir } => remove(&reference, data_dir),
    }
}

/// `image build`.
fn build(variant: Variant, agent: Option<PathBuf>, data_dir: Option<PathBuf>, mirror: Option<String>) -> Result<()> {
    let store = ImageStore::new(&crate::data_dir(data_dir));
    let mut opts = BuildOptions::new(variant, crate::agent_path(agent)?);
    if let Some(m) = mirror {
        opts.mirror = m;
    }
    let img = build_image(&store, &opts)?;
    println!(
        "image {} ready: kernel {} ({}), rootfs {}",
        img.name,
        img.kernel_release,
        img.kernel.display(),
        img.rootfs.display()
    );
    Ok(())
}

/// `image pull`.
fn pull_image(
    reference: &str,
    insecure: bool,
    docker_config: Option<PathBuf>,
    agent: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> Result<()> {
    let store = ImageStore::new(&crate::data_dir(data_dir));
    let mut opts = PullOptions::new(crate::agent_path(agent)?);
    if insecure {
        opts.insecure = slicer_image::oci::registry_of(reference).into_iter().collect();
    }
    if docker_config.is_some() {
        opts.docker_config = docker_config;
    }
    opts.progress = true;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let img = rt.block_on(pull(&store, reference, &opts))?;
    println!("{} {} {}", img.name, img.digest.as_deref().unwrap_or(""), img.variant);
    Ok(())
}

/// `image list`.
fn list(json: bool, data_dir: Option<PathBuf>) -> Result<()> {
    let store = ImageStore::new(&crate::data_dir(data_dir));
    let images = store.list()?;
    if json {
        let v: Vec<_> = images
            .iter()
            .map(|i| {
                serde_json::json!({
                    "name": i.name,
                    "init": if i.init().is_some() { "agent" } else { "systemd" },
                    "variant": i.variant,
                    "digest": i.digest,
                    "size_bytes": allocated(&i.rootfs),
                    "rootfs": i.rootfs,
                    "kernel_release": i.kernel_release,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
    println!("{:<48} {:<8} {:<19} {:>9}", "NAME", "INIT", "DIGEST", "SIZE");
    for i in images {
        let digest = i
            .digest
            .as_deref()
            .map(|d| {
                d.strip_prefix("sha256:")
                    .unwrap_or(d)
                    .chars()
                    .take(12)
                    .collect::<String>()
            })
            .unwrap_or_else(|| "-".into());
        // Both come from the store's files: cut by characters, never inside one.
        let name = if tty && i.name.chars().count() > 48 {
            format!("{}…", i.name.chars().take(47).collect::<String>())
        } else {
            i.name.clone()
        };
        println!(
            "{:<48} {:<8} {:<19} {:>6} MiB",
            name,
            if i.init().is_some() { "agent" } else { "systemd" },
            digest,
            allocated(&i.rootfs) >> 20
        );
    }
    Ok(())
}

/// `image remove`: refused for slicer's own images and while VMs, commits or templates use it.
fn remove(reference: &str, data_dir: Option<PathBuf>) -> Result<()> {
    let data_dir = crate::data_dir(data_dir);
    let store = ImageStore::new(&data_dir);
    anyhow::ensure!(
        !slicer_image::is_builtin(reference),
        "{reference} is one of slicer's own images; they are rebuilt by `slicer image build`, not removed"
    );
    let img = store.get(reference)?;
    let users = slicer_vmm::disk_users(
        &img.rootfs,
        &[
            data_dir.join("vms"),
            store.root().join("templates"),
            data_dir.join("commits"),
        ],
    );
    if !users.is_empty() {
        let templates: Vec<_> = users.iter().filter(|u| u.starts_with("templates/")).collect();
        let mut msg = format!("{} is in use by {}", img.name, users.join(", "));
        if templates.len() < users.len() {
            msg.push_str("; delete those VMs (slicer vm delete) and commits (slicer vm commit delete) first");
        }
        if !templates.is_empty() {
            msg.push_str(&format!(
                "; a template is the daemon's warm-start snapshot of this image: with the daemon stopped, remove {}",
                templates
                    .iter()
                    .map(|t| store.root().join(t).display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        anyhow::bail!(msg);
    }
    let removed = store.remove(reference)?;
    println!("removed {}", removed.name);
    Ok(())
}
