//! The YAML schema (SlicerVM's): what `slicer up` reads, field by field, unknown keys refused.

use super::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub config: Config,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub host_groups: Vec<HostGroup>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    /// slicer extension: auto (default), kvm or tcg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acceleration: Option<String>,
    #[serde(default = "yes")]
    pub graceful_shutdown: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_user: Option<String>,
    /// `true`: the registries of this file's images may be reached over plain HTTP; or a list
    /// of such registries (`host[:port]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_registry: Option<Insecure>,
    #[serde(default)]
    pub api: Api,
    /// slicer extension: what the host lends to VMs at most (defaults from the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<CapacityConfig>,
}

/// `config.capacity`: the host's budget for running VMs. Every field is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    /// Host memory for VMs: each running VM takes its RAM plus its QEMU overhead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_bytes: Option<u64>,
    /// VMs running (or starting) at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<u32>,
    /// vCPUs of all running VMs together (an overcommit of the host's cores is fine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// How running VMs count against `ram_bytes`: `measured` (default), the memory their
    /// cgroup is charged now (private memory: pages shared from a template count once, for
    /// the daemon), or `nominal`, their RAM plus QEMU's overhead. A new VM needs its nominal
    /// share free either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryAccounting>,
    /// Template and live-commit memory the daemon keeps loaded for warm starts and live
    /// forks, at most (the least recently used is unloaded past it). Counted in `ram_bytes`.
    /// Default: a quarter of `ram_bytes`, at most 2 GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_memory_bytes: Option<u64>,
    /// Distinct VM shapes (image, vCPUs, RAM, NIC) that get a template, at most; VMs of
    /// other shapes boot cold. The warm host groups' own shapes come first. Default 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_shapes: Option<u32>,
}

/// `config.capacity.memory`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryAccounting {
    #[default]
    Measured,
    Nominal,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Api {
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_bind")]
    pub bind_address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            port: default_port(),
            bind_address: default_bind(),
            auth: None,
        }
    }
}

fn default_port() -> u16 {
    8080
}
fn default_bind() -> String {
    "127.0.0.1".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub enabled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostGroup {
    pub name: String,
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default = "two", alias = "cpus")]
    pub vcpu: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_gb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_bytes: Option<u64>,
    #[serde(default = "default_storage")]
    pub storage: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_size: Option<String>,
    #[serde(default)]
    pub persistent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userdata: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userdata_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// Start new VMs from a template snapshot (slicer extension; default on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_start: Option<bool>,
    /// CA certificates the group's VMs trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaConfig>,
}

/// `host_groups[].ca`: the CAs a group's VMs trust, installed in each guest before it reports
/// ready.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// The group's own CA, `./.slicer/ca/<group>/` of the daemon's working directory (made
    /// when missing or within a week of its end).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub generate: bool,
    /// PEM files of more CAs: absolute, or relative to the daemon's working directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
}

fn one() -> u32 {
    1
}
fn two() -> u32 {
    2
}
fn default_storage() -> String {
    "image".into()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
}

/// `insecure_registry`: SlicerVM's boolean, or a list of registries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Insecure {
    All(bool),
    Hosts(Vec<String>),
}
