//! The `slicer` command line: a thin layer over the library crates.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod ca;
mod guest;
mod image;
mod new;
mod proxy;
mod run;
mod term;
mod untar;
mod up;
mod vm;
mod ws;

/// Default data directory: images, VM disks, state.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/slicer";

/// Slicer commands this implementation does not serve, with what to do instead.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("activate", "there is no license to activate: slicer runs without one"),
    (
        "update",
        "update slicer by pulling its repository and running ./scripts/setup.sh",
    ),
    (
        "install",
        "tools are installed by ./scripts/setup.sh (host) or by userdata and apt-get (guests)",
    ),
    (
        "service",
        "run `slicer up ./slicer.yaml` under your own systemd unit; `service generate` is not available",
    ),
    ("pci", "PCI passthrough is not available on this host"),
    (
        "workspace",
        "the agent workspace wrappers are not available; use `slicer vm add` and `slicer vm shell`",
    ),
    ("worktree", "worktree sync is not available; use `slicer vm cp -r`"),
    ("wt", "worktree sync is not available; use `slicer vm cp -r`"),
];

/// Slicer's shortcuts: `slicer cp|shell|bg|logs|relaunch ...` is `slicer vm ...`.
const SHORTCUTS: &[&str] = &["cp", "shell", "bg", "logs", "relaunch"];

#[derive(Parser)]
#[command(
    name = "slicer",
    version,
    about = "microVM sandboxes on a Linux host",
    after_help = "Shortcuts: `slicer ls` = `slicer vm list`; `slicer cp|shell|bg|logs|relaunch ...` = `slicer vm ...`; `slicer v` = `slicer vm`."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum DiskCmd {
    /// Write a stopped VM's disk as a standalone qcow2 file, usable as a host group's `image:`.
    Export {
        name: String,
        #[arg(long, short)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a config for a host group: `slicer new NAME [flags] > slicer.yaml`.
    New(new::NewArgs),
    /// Run the daemon: VMs and the REST API.
    Up(up::UpArgs),
    /// Talk to the daemon's API.
    #[command(alias = "v")]
    Vm {
        #[command(flatten)]
        conn: vm::Conn,
        #[command(subcommand)]
        cmd: vm::VmCmd,
    },
    /// List VMs (`slicer vm list`).
    #[command(alias = "l")]
    Ls {
        #[command(flatten)]
        conn: vm::Conn,
    },
    /// Secrets the daemon copies into its VMs (/run/slicer/secrets/NAME).
    Secret {
        #[command(flatten)]
        conn: vm::Conn,
        #[command(subcommand)]
        cmd: guest::SecretCmd,
    },
    /// VM disks: `slicer disk export NAME --output FILE`.
    Disk {
        #[command(flatten)]
        conn: vm::Conn,
        #[command(subcommand)]
        cmd: DiskCmd,
    },
    /// Boot a throwaway sandbox, run one command in it, print its output and delete it.
    Run(run::RunArgs),
    /// A host group's CA (`ca: {generate: true}`): `ca init`, `ca issue` (run where `slicer up` runs).
    Ca {
        #[command(subcommand)]
        cmd: ca::CaCmd,
    },
    /// Build and list guest images.
    Image {
        #[command(subcommand)]
        cmd: image::ImageCmd,
    },
    /// Serve the daemon's sandboxes as MCP tools on stdin/stdout (for AI agents' MCP clients).
    Mcp {
        #[command(flatten)]
        conn: vm::Conn,
    },
    /// Slicer Proxy: `up` runs a host group's egress proxy; clients, secrets and allow rules
    /// are kept by the daemon.
    Proxy {
        #[command(flatten)]
        conn: vm::Conn,
        #[command(subcommand)]
        cmd: proxy::ProxyCmd,
    },
    /// Print the client's version.
    Version,
    /// The client's and the daemon's versions (`GET /info`).
    Info {
        #[command(flatten)]
        conn: vm::Conn,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SLICER_LOG").unwrap_or_else(|_| "warn".into()))
        // One event, one line: what a guest wrote cannot start a line of its own.
        .with_writer(slicer_daemon::log::stderr)
        .init();
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some((cmd, why)) = args
        .get(1)
        .and_then(|a| a.to_str())
        .and_then(|a| UNSUPPORTED.iter().find(|(c, _)| *c == a))
    {
        eprintln!("error: `slicer {cmd}` is not available here: {why}");
        std::process::exit(2);
    }
    if args.get(1).and_then(|a| a.to_str()) == Some("disk")
        && args
            .get(2)
            .and_then(|a| a.to_str())
            .is_some_and(|a| matches!(a, "list" | "archive" | "sparsify" | "transfer"))
    {
        eprintln!(
            "error: `slicer disk {}` is not available here: only `slicer disk export NAME --output FILE` is",
            args[2].to_string_lossy()
        );
        std::process::exit(2);
    }
    if args
        .get(1)
        .and_then(|a| a.to_str())
        .is_some_and(|a| SHORTCUTS.contains(&a))
    {
        args.insert(1, "vm".into());
    }
    let cli = Cli::parse_from(args);
    let result = match cli.cmd {
        Cmd::Image { cmd } => image::run(cmd),
        Cmd::Ca { cmd } => ca::run(cmd),
        Cmd::Run(args) => run::run(args),
        Cmd::New(args) => new::run(args),
        Cmd::Up(args) => up::run(args),
        Cmd::Vm { conn, cmd } => vm::run(cmd, conn),
        Cmd::Secret { conn, cmd } => vm::run_secret(cmd, conn),
        Cmd::Disk {
            conn,
            cmd: DiskCmd::Export { name, output },
        } => vm::run(vm::VmCmd::ExportDisk { name, output }, conn),
        Cmd::Version => {
            println!("slicer {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Cmd::Info { conn } => vm::run_info(conn),
        Cmd::Proxy { conn, cmd } => proxy::run(cmd, conn),
        Cmd::Mcp { conn } => vm::run_mcp(conn),
        Cmd::Ls { conn } => vm::run(
            vm::VmCmd::List {
                tag: None,
                tag_prefix: None,
            },
            conn,
        ),
    };
    if let Err(e) = result {
        // Errors may quote the guest (agent messages, exec errors).
        eprintln!("error: {}", term::stderr_text(&format!("{e:#}")));
        std::process::exit(1);
    }
}

/// The data directory from `--data-dir`, `SLICER_DATA_DIR` or the default.
pub fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("SLICER_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
}

/// The static agent: `--agent`, `SLICER_AGENT`, beside this binary, or the workspace build.
pub fn agent_path(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = flag.or_else(|| std::env::var_os("SLICER_AGENT").map(PathBuf::from)) {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the slicer binary")?;
    let mut candidates = vec![];
    if let Some(dir) = exe.parent() {
        // scripts/setup.sh installs /usr/local/bin/slicer and /usr/local/lib/slicer/slicer-agent
        candidates.push(dir.join("../lib/slicer/slicer-agent"));
        // target/<profile>/slicer -> target/x86_64-unknown-linux-gnu/release/slicer-agent
        if let Some(target) = dir.parent() {
            candidates.push(target.join("x86_64-unknown-linux-gnu/release/slicer-agent"));
        }
    }
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "no static slicer-agent found (looked at {}); build it with scripts/setup.sh or pass --agent",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}
