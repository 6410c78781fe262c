//! `slicer new NAME [flags] > x.yaml`: prints a config.

use anyhow::Result;
use clap::Args;
use slicer_daemon::config::{render_new, NewOptions};

#[derive(Args)]
pub struct NewArgs {
    /// Host group name (VMs are called NAME-1, NAME-2, ...).
    name: String,
    /// VMs started with the daemon (0: API-launched only).
    #[arg(long, default_value_t = 1)]
    count: u32,
    #[arg(long = "cpu", alias = "vcpu", default_value_t = 2)]
    cpu: u32,
    /// RAM in GiB.
    #[arg(long, alias = "ram_gb", default_value_t = 4)]
    ram: u64,
    #[arg(long, default_value = "image")]
    storage: String,
    #[arg(long, default_value = "25G")]
    storage_size: String,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    persistent: bool,
    /// min (agent as PID 1, fastest) or systemd.
    #[arg(long, default_value = "min")]
    image: String,
    /// bridge or isolated.
    #[arg(long, default_value = "bridge")]
    net: String,
    /// Bridge subnet with the gateway address, e.g. 192.168.137.1/24.
    #[arg(long)]
    cidr: Option<String>,
    #[arg(long)]
    tap_prefix: Option<String>,
    /// Isolated mode: the /22 to carve per-VM /30s from.
    #[arg(long)]
    isolated_range: Option<String>,
    /// Isolated mode: CIDR to block (repeatable).
    #[arg(long)]
    drop: Vec<String>,
    /// Isolated mode: CIDR or IP:port to allow (repeatable).
    #[arg(long)]
    allow: Vec<String>,
    #[arg(long)]
    userdata: Option<String>,
    #[arg(long)]
    userdata_file: Option<String>,
    #[arg(long = "ssh-key")]
    ssh_keys: Vec<String>,
    /// API bind address: an IP or a UNIX socket path.
    #[arg(long, default_value = "127.0.0.1")]
    api_bind: String,
    #[arg(long, default_value_t = 8080)]
    api_port: u16,
    /// Bearer-token auth (default: on for TCP, off for a UNIX socket).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    api_auth: Option<bool>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    graceful_shutdown: bool,
    /// qemu (the only hypervisor on this host).
    #[arg(long, default_value = "qemu")]
    hypervisor: String,
}

pub fn run(a: NewArgs) -> Result<()> {
    let yaml = render_new(&NewOptions {
        name: a.name,
        count: a.count,
        vcpu: a.cpu,
        ram_gb: a.ram,
        storage: a.storage,
        storage_size: a.storage_size,
        persistent: a.persistent,
        image: a.image,
        net: a.net,
        cidr: a.cidr,
        tap_prefix: a.tap_prefix,
        isolated_range: a.isolated_range,
        drop: a.drop,
        allow: a.allow,
        userdata: a.userdata,
        userdata_file: a.userdata_file,
        ssh_keys: a.ssh_keys,
        api_bind: a.api_bind,
        api_port: a.api_port,
        api_auth: a.api_auth,
        graceful_shutdown: a.graceful_shutdown,
        hypervisor: a.hypervisor,
    })?;
    print!("{yaml}");
    Ok(())
}
