use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
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
    /// List built images.
    List {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

pub fn run(cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Build {
            variant,
            agent,
            data_dir,
            mirror,
        } => {
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
        ImageCmd::List { data_dir } => {
            let store = ImageStore::new(&crate::data_dir(data_dir));
            println!("{:<10} {:<18} {:<18} ROOTFS", "NAME", "KERNEL", "KEY");
            for img in store.list()? {
                println!(
                    "{:<10} {:<18} {:<18} {}",
                    img.name,
                    img.kernel_release,
                    img.key,
                    img.rootfs.display()
                );
            }
            Ok(())
        }
    }
}
