//! `slicer new NAME [flags] > x.yaml`: prints a config.

use anyhow::{bail, Result};
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
    /// systemd (the everyday image, Slicer's default) or min (agent as PID 1, fastest; = --min).
    #[arg(long, default_value = "systemd")]
    image: String,
    /// The min image (= --image min).
    #[arg(long)]
    min: bool,
    /// bridge or isolated (macvtap is not available here).
    #[arg(long, default_value = "bridge")]
    net: String,
    /// macvtap only: not available here.
    #[arg(long, hide = true)]
    range: Option<String>,
    /// macvtap only: not available here.
    #[arg(long, hide = true)]
    address: Vec<String>,
    /// macvtap only: not available here.
    #[arg(long, hide = true)]
    parent: Option<String>,
    /// No dns_servers in the config (the guest keeps the image's resolver settings).
    #[arg(long)]
    no_dns: bool,
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
    /// A public key, or a file holding one (repeatable).
    #[arg(long = "ssh-key", alias = "ssh-keys")]
    ssh_keys: Vec<String>,
    /// Add the public keys found in ~/.ssh/*.pub.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "true", action = clap::ArgAction::Set)]
    find_ssh_keys: bool,
    /// Import keys from a GitHub user: refused (the daemon fetches nothing from the internet).
    #[arg(long = "github", alias = "import-user", alias = "github-user")]
    github: Option<String>,
    /// API bind address: an IP or a UNIX socket path.
    #[arg(long, default_value = "127.0.0.1")]
    api_bind: String,
    /// Serve the API on this UNIX socket (= --api-bind PATH).
    #[arg(long)]
    socket: Option<String>,
    /// Slicer's SOS SSH console port: only 0 (none) here.
    #[arg(long, default_value_t = 0)]
    ssh_port: u16,
    /// Give the group its own CA (`ca: {generate: true}`), trusted by its VMs; `slicer up`
    /// keeps it in ./.slicer/ca/NAME/.
    #[arg(long)]
    ca: bool,
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

/// Public keys: each `--ssh-key` as given or read from its file, then ~/.ssh/*.pub.
fn ssh_keys(given: &[String], find: bool) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    for k in given {
        keys.push(crate::vm::ssh_key_arg(k)?);
    }
    if let (true, Some(home)) = (find, std::env::var_os("HOME")) {
        let dir = std::path::Path::new(&home).join(".ssh");
        let mut found: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "pub"))
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        for p in found {
            let k = std::fs::read_to_string(&p).unwrap_or_default().trim().to_string();
            // Only what the daemon will accept: a file that is no key is skipped.
            if slicer_daemon::config::check_ssh_keys("ssh_keys", std::slice::from_ref(&k)).is_ok() && !keys.contains(&k)
            {
                keys.push(k);
            }
        }
    }
    Ok(keys)
}

pub fn run(a: NewArgs) -> Result<()> {
    if a.net == "macvtap" || a.range.is_some() || !a.address.is_empty() || a.parent.is_some() {
        bail!("--net macvtap (and --range, --address, --parent) is not available here: use --net bridge or --net isolated");
    }
    if let Some(u) = &a.github {
        bail!("--github {u}: importing keys from GitHub is not supported (the daemon fetches nothing from the internet); pass --ssh-key KEY|FILE");
    }
    if a.ssh_port != 0 {
        bail!("--ssh-port: Slicer's SSH console is not available here; reach VMs with `slicer vm shell` or `slicer vm forward -L PORT:127.0.0.1:22`");
    }
    let image = if a.min { "min".to_string() } else { a.image };
    let api_bind = a.socket.unwrap_or(a.api_bind);
    let ssh_keys = ssh_keys(&a.ssh_keys, a.find_ssh_keys)?;
    let yaml = render_new(&NewOptions {
        name: a.name,
        count: a.count,
        vcpu: a.cpu,
        ram_gb: a.ram,
        storage: a.storage,
        storage_size: a.storage_size,
        persistent: a.persistent,
        image,
        net: a.net,
        cidr: a.cidr,
        tap_prefix: a.tap_prefix,
        isolated_range: a.isolated_range,
        drop: a.drop,
        allow: a.allow,
        userdata: a.userdata,
        userdata_file: a.userdata_file,
        ssh_keys,
        no_dns: a.no_dns,
        api_bind,
        api_port: a.api_port,
        api_auth: a.api_auth,
        graceful_shutdown: a.graceful_shutdown,
        hypervisor: a.hypervisor,
        ca: a.ca,
    })?;
    print!("{yaml}");
    Ok(())
}
