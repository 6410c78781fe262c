//! The clap arguments of `slicer vm ...`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use slicer_api::query::ExecQuery;

use super::expand_home;

/// Who a command runs as in the guest, and where (`vm exec`, `vm bg exec`).
#[derive(Args, Clone, Debug)]
pub struct RunAs {
    /// User to act as: root by default, as with SlicerVM's CLI (the API's default is the
    /// image's non-root user; 1000 is `ubuntu`).
    #[arg(long, default_value_t = 0)]
    pub uid: u32,
    #[arg(long)]
    pub gid: Option<u32>,
    /// Working directory in the guest: absolute, ~ or ~/x.
    #[arg(long)]
    pub cwd: Option<String>,
    /// KEY=VALUE (repeatable).
    #[arg(long)]
    pub env: Vec<String>,
}

impl RunAs {
    /// `q` acting as this user, there, with this environment.
    pub fn apply(self, q: ExecQuery) -> ExecQuery {
        ExecQuery {
            uid: Some(self.uid),
            gid: self.gid,
            cwd: self.cwd,
            env: self.env,
            ..q
        }
    }
}

/// An `--ssh-key` value: a public key as given, or the key in the file it names.
pub fn ssh_key_arg(k: &str) -> Result<String> {
    match std::fs::read_to_string(expand_home(Path::new(k))) {
        Ok(text) => Ok(text.trim().to_string()),
        Err(_) if k.contains(' ') => Ok(k.to_string()),
        Err(e) => bail!("--ssh-key {k}: not a key, and reading it as a file: {e}"),
    }
}

#[derive(Subcommand)]
pub enum CommitCmd {
    /// Commits, newest last.
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        cache_key: Option<String>,
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Delete a commit (refused while VMs or commits sit on it).
    #[command(alias = "rm")]
    Delete { id: String },
}

// `vm add` (a plain comment: a doc comment would become the help text).
#[derive(Args)]
pub struct AddArgs {
    pub(super) group: Option<String>,
    /// The VM's name: sugar for the immutable tag name=NAME (a lowercase DNS label, unique);
    /// every command that takes a VM accepts it.
    #[arg(short = 'n', long)]
    pub(super) name: Option<String>,
    #[arg(long)]
    pub(super) cpus: Option<u32>,
    #[arg(long)]
    pub(super) ram_gb: Option<u64>,
    #[arg(long)]
    pub(super) ram_mb: Option<u64>,
    #[arg(long)]
    pub(super) ram_bytes: Option<u64>,
    /// key=value (repeatable).
    #[arg(long)]
    pub(super) tag: Vec<String>,
    #[arg(long)]
    pub(super) userdata: Option<String>,
    #[arg(long)]
    pub(super) userdata_file: Option<PathBuf>,
    /// Secrets the VM gets (comma-separated; default all).
    #[arg(long, alias = "secret", value_delimiter = ',')]
    pub(super) secrets: Option<Vec<String>>,
    /// A public key, or a file holding one (repeatable).
    #[arg(long = "ssh-key")]
    pub(super) ssh_keys: Vec<String>,
    /// Keep the VM and its disk when it stops (the CLI's default; the API's is false).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub(super) persistent: bool,
    /// Open a shell in the VM once it is ready.
    #[arg(long)]
    pub(super) shell: bool,
    /// Wait for the agent (or with --wait-userdata, for userdata) before returning.
    #[arg(long)]
    pub(super) wait: bool,
    #[arg(long)]
    pub(super) wait_userdata: bool,
    #[arg(long, default_value = "5m")]
    pub(super) timeout: String,
}

// `vm fork`.
#[derive(Args)]
pub struct ForkArgs {
    pub(super) commit: String,
    /// Tag of the new VM, after the commit's (repeat).
    #[arg(long = "tag")]
    pub(super) tags: Vec<String>,
    /// The new VM's name (a name= tag).
    #[arg(long)]
    pub(super) name: Option<String>,
    /// Return once the agent answers (default); --wait=false returns at once.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    pub(super) wait: bool,
    /// Allow egress to this CIDR or address[:port] (isolated groups; repeat).
    #[arg(long)]
    pub(super) allow: Vec<String>,
    /// Clear the allow list the fork would inherit.
    #[arg(long)]
    pub(super) no_allow: bool,
    /// Drop egress to this CIDR (isolated groups; repeat).
    #[arg(long)]
    pub(super) drop: Vec<String>,
    /// Make this many forks at once (1-32; one line, or one JSON object, each).
    #[arg(long)]
    pub(super) count: Option<u32>,
}

// How `vm cp` copies.
#[derive(Args)]
pub struct CpOpts {
    /// binary (one file) or tar (a directory).
    #[arg(long)]
    pub(super) mode: Option<String>,
    #[arg(short = 'r', long)]
    pub(super) recursive: bool,
    /// User to act as: root by default, as with SlicerVM's CLI (the API's default is the
    /// image's non-root user; 1000 is `ubuntu`).
    #[arg(long, default_value_t = 0)]
    pub(super) uid: u32,
    #[arg(long)]
    pub(super) gid: Option<u32>,
    #[arg(long)]
    pub(super) permissions: Option<String>,
    /// Leave out paths matching this gitignore-style pattern (repeatable); an upload of a
    /// directory also honours its .slicerignore.
    #[arg(long)]
    pub(super) exclude: Vec<String>,
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// List VMs.
    #[command(alias = "ls", alias = "l")]
    List {
        #[arg(long)]
        tag: Option<String>,
        #[arg(long)]
        tag_prefix: Option<String>,
    },
    /// Create a VM in a host group (the only group when omitted).
    #[command(alias = "launch")]
    Add(AddArgs),
    /// Wait until a VM's agent answers (or, with --userdata, its userdata ran).
    Ready {
        name: String,
        /// Wait for the agent (the default; accepted for Slicer's form).
        #[arg(long)]
        agent: bool,
        #[arg(long)]
        userdata: bool,
        #[arg(long, default_value = "5m")]
        timeout: String,
        #[arg(long, default_value = "100ms")]
        interval: String,
    },
    /// Delete a VM and its disk.
    #[command(alias = "rm")]
    Delete { name: String, group: Option<String> },
    /// Run a command; streams its output and exits with its exit code.
    Exec {
        name: String,
        #[command(flatten)]
        run_as: RunAs,
        /// Shell for the command line; "" runs the command directly.
        #[arg(long)]
        shell: Option<String>,
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Copy a file or directory: `./f NAME:/path` or `NAME:/path ./f`.
    Cp {
        src: String,
        dst: String,
        #[command(flatten)]
        opts: CpOpts,
    },
    /// Serial console of a VM.
    Logs {
        name: String,
        #[arg(long, default_value_t = 20)]
        lines: usize,
    },
    /// Agent health of a VM.
    Health { name: String },
    /// Show or change tags (name= stays).
    #[command(alias = "tag")]
    Tags {
        name: String,
        #[arg(long)]
        add: Vec<String>,
        #[arg(long)]
        remove: Vec<String>,
        #[arg(long)]
        replace: Vec<String>,
    },
    /// Host groups.
    Group,
    /// Power a VM off (ephemeral VMs are then removed), or reboot it with --reboot.
    Shutdown {
        name: String,
        #[arg(long)]
        reboot: bool,
    },
    /// Freeze a VM's vCPUs (memory kept).
    Pause { name: String },
    /// Unfreeze a paused VM.
    Resume { name: String },
    /// Save a VM's memory and devices to disk and stop it; `vm restore` continues it.
    Suspend { name: String },
    /// Continue a suspended VM where it stopped.
    Restore {
        name: String,
        /// `agent`: return once the VM's agent answers.
        #[arg(long)]
        wait: Option<String>,
        #[arg(long, default_value = "5m")]
        timeout: String,
    },
    /// Boot a stopped persistent VM again from its disk.
    Relaunch { name: String },
    /// Commit a stopped persistent VM's disk under a new id (`commit list`, `commit delete ID`).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Commit {
        #[command(subcommand)]
        sub: Option<CommitCmd>,
        /// The VM to commit.
        #[arg(required = true)]
        name: Option<String>,
        /// Cache key: one source VM's commits; find them with `commit list --cache-key`.
        #[arg(long)]
        cache_key: Option<String>,
        /// Tag of the commit (repeat).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Commit the running VM with its memory and devices (it pauses briefly and
        /// continues); forks continue from that moment.
        #[arg(long)]
        live: bool,
    },
    /// Fork a commit into a new persistent VM of its host group (named by the allocator).
    Fork(ForkArgs),
    /// Write a stopped VM's disk as a standalone qcow2 image (`slicer disk export`).
    #[command(hide = true)]
    ExportDisk { name: String, output: PathBuf },
    /// Background execs: start, list, logs, kill, wait, rm.
    Bg {
        #[command(subcommand)]
        cmd: crate::guest::BgCmd,
    },
    /// Load, memory and disk of every VM (or of one), measured in the guests.
    Top { name: Option<String> },
    /// An interactive shell on a PTY in the VM (exits with the shell's exit code; Ctrl-]
    /// detaches).
    Shell {
        name: String,
        /// User to act as: root by default, as with SlicerVM's CLI (the API's default is the
        /// image's non-root user; 1000 is `ubuntu`).
        #[arg(long, default_value_t = 0)]
        uid: u32,
        #[arg(long)]
        gid: Option<u32>,
        /// Absolute path of the shell (default bash, else sh).
        #[arg(long)]
        shell: Option<String>,
        #[arg(long)]
        cwd: Option<String>,
        /// A command line typed into the shell first.
        #[arg(long)]
        bootstrap: Option<String>,
    },
    /// Print the commands another machine runs to reach this host's bridge-mode VMs.
    Route {
        /// The daemon's config (slicer.yaml).
        config: PathBuf,
        /// linux or darwin.
        #[arg(long, default_value = "linux")]
        os: String,
    },
    /// Forward local ports or sockets to the VM: -L [ADDR:]PORT:HOST:PORT, -L PORT:/remote.sock,
    /// -L /local.sock:/remote.sock, -L HOST:PORT (repeatable). Runs until interrupted.
    Forward {
        name: String,
        #[arg(short = 'L', required = true)]
        spec: Vec<String>,
    },
}

impl VmCmd {
    /// The VM the command acts on, to resolve from a name.
    pub(super) fn vm_arg(&mut self) -> Option<&mut String> {
        match self {
            VmCmd::Delete { name, .. }
            | VmCmd::Exec { name, .. }
            | VmCmd::Logs { name, .. }
            | VmCmd::Health { name }
            | VmCmd::Tags { name, .. }
            | VmCmd::Ready { name, .. }
            | VmCmd::Shutdown { name, .. }
            | VmCmd::Pause { name }
            | VmCmd::Resume { name }
            | VmCmd::Suspend { name }
            | VmCmd::Restore { name, .. }
            | VmCmd::Relaunch { name }
            | VmCmd::Shell { name, .. }
            | VmCmd::Forward { name, .. } => Some(name),
            VmCmd::Bg { cmd } => Some(cmd.vm_arg()),
            VmCmd::Commit {
                sub: None,
                name: Some(name),
                ..
            } => Some(name),
            VmCmd::ExportDisk { name, .. } => Some(name),
            VmCmd::Top { name: Some(name) } => Some(name),
            _ => None,
        }
    }
}
