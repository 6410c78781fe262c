//! `slicer up [FILE]`: the daemon.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct UpArgs {
    /// Config file (from `slicer new`).
    #[arg(default_value = "./slicer.yaml")]
    config: PathBuf,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Image store (default: <data-dir>/images).
    #[arg(long, env = "SLICER_IMAGES_DIR")]
    images_dir: Option<PathBuf>,
    /// Static agent for building a missing image.
    #[arg(long)]
    agent: Option<PathBuf>,
}

pub fn run(a: UpArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(slicer_daemon::run(slicer_daemon::UpOptions {
        config: a.config,
        data_dir: crate::data_dir(a.data_dir),
        images_dir: a.images_dir,
        agent: crate::agent_path(a.agent).ok(),
    }))
}
