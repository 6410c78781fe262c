//! The YAML `slicer new` prints.

use super::*;

/// Options of `slicer new`.
#[derive(Debug, Clone, Default)]
pub struct NewOptions {
    pub name: String,
    pub count: u32,
    pub vcpu: u32,
    pub ram_gb: u64,
    pub storage: String,
    pub storage_size: String,
    pub persistent: bool,
    pub image: String,
    pub net: String,
    pub cidr: Option<String>,
    pub tap_prefix: Option<String>,
    pub isolated_range: Option<String>,
    pub drop: Vec<String>,
    pub allow: Vec<String>,
    pub userdata: Option<String>,
    pub userdata_file: Option<String>,
    pub ssh_keys: Vec<String>,
    /// No `dns_servers`: guests keep the image's resolver settings.
    pub no_dns: bool,
    pub api_bind: String,
    pub api_port: u16,
    pub api_auth: Option<bool>,
    pub graceful_shutdown: bool,
    pub hypervisor: String,
    /// `ca: {generate: true}`: the group gets its own CA.
    pub ca: bool,
}

/// Renders the YAML `slicer new` prints.
pub fn render_new(o: &NewOptions) -> Result<String> {
    let mut allow = o.allow.clone();
    if o.net == "isolated" && !o.drop.is_empty() && allow.is_empty() {
        // As SlicerVM does: dropping some ranges in isolated mode allows the rest.
        allow.push("0.0.0.0/0".into());
    }
    let network = match o.net.as_str() {
        "isolated" => Network {
            mode: Some("isolated".into()),
            range: o.isolated_range.clone(),
            drop: o.drop.clone(),
            allow,
            ..Default::default()
        },
        "bridge" => Network {
            mode: Some("bridge".into()),
            bridge: Some(format!("br{}0", o.name.chars().take(8).collect::<String>())),
            tap_prefix: Some(
                o.tap_prefix
                    .clone()
                    .unwrap_or_else(|| format!("{}tap", o.name.chars().take(6).collect::<String>())),
            ),
            gateway: Some(o.cidr.clone().unwrap_or_else(|| "192.168.137.1/24".into())),
            ..Default::default()
        },
        other => bail!("--net: {other:?} is not supported; use bridge or isolated"),
    };
    let file = File {
        config: Config {
            host_groups: vec![HostGroup {
                name: o.name.clone(),
                count: o.count,
                vcpu: o.vcpu,
                ram_gb: Some(o.ram_gb),
                ram_mb: None,
                ram_bytes: None,
                storage: o.storage.clone(),
                storage_size: Some(o.storage_size.clone()),
                persistent: o.persistent,
                userdata: o.userdata.clone(),
                userdata_file: o.userdata_file.clone(),
                dns_servers: o.no_dns.then(Vec::new),
                gpu_count: None,
                image: None,
                network: Some(network),
                warm_start: None,
                ca: o.ca.then(|| CaConfig {
                    generate: true,
                    files: Vec::new(),
                }),
            }],
            image: Some(o.image.clone()),
            kernel_image: None,
            kernel_file: None,
            hypervisor: Some(o.hypervisor.clone()),
            acceleration: None,
            graceful_shutdown: o.graceful_shutdown,
            ssh_keys: o.ssh_keys.clone(),
            github_user: None,
            insecure_registry: None,
            api: Api {
                port: o.api_port,
                bind_address: o.api_bind.clone(),
                auth: Some(Auth {
                    enabled: o
                        .api_auth
                        .unwrap_or(!(o.api_bind.starts_with('/') || o.api_bind.ends_with(".sock"))),
                }),
            },
            capacity: None,
        },
    };
    // What we print must load.
    let text = serde_yaml_ng::to_string(&file)?;
    File::parse(&text)?.settings(Path::new("."))?;
    Ok(text)
}
