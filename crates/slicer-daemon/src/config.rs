//! The YAML configuration (`slicer up ./x.yaml`), compatible with SlicerVM's schema.
//! Unknown keys and bad values are errors that name the field.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use slicer_api::NetworkMode;

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

/// A host group after validation, with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub name: String,
    pub count: u32,
    pub cpus: u32,
    pub ram_bytes: u64,
    pub storage_size: Option<u64>,
    pub persistent: bool,
    pub userdata: Option<String>,
    pub dns: Vec<String>,
    pub image: String,
    pub network_mode: NetworkMode,
    pub allow: Vec<String>,
    pub drop: Vec<String>,
    /// Bridge mode: the bridge, TAP name prefix and gateway (address/prefix).
    pub bridge: String,
    pub tap_prefix: String,
    pub gateway: String,
    /// Isolated mode: the range the /30s come from (derived from the name when absent).
    pub range: Option<String>,
    /// New VMs start from a template snapshot (falling back to a cold boot).
    pub warm_start: bool,
    /// `ca.generate`: the group's own CA is made or loaded when the daemon starts
    /// ([`Settings::load_group_cas`]) and comes first in `ca_certs`.
    pub ca_generate: bool,
    /// The CA certificates (DER, each once) guests of the group trust: `ca.files`' at
    /// validation, the generated one added when the daemon starts.
    pub ca_certs: Vec<Vec<u8>>,
}

impl Group {
    /// The PEM bundle installed in the group's guests; `None` when it trusts no extra CA.
    pub fn ca_bundle(&self) -> Option<String> {
        use base64::Engine;
        if self.ca_certs.is_empty() {
            return None;
        }
        let mut out = String::new();
        for der in &self.ca_certs {
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            for chunk in b64.as_bytes().chunks(64) {
                out.push_str(&String::from_utf8_lossy(chunk));
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
        }
        Some(out)
    }
}

/// `{at}.ca.files`: every file's certificates (DER, each once, in order). A path is absolute
/// or relative to `cwd`; each file is a regular file (a link is refused) of at most
/// `slicer_proxy::ca::MAX_PEM_BYTES` with at least one CERTIFICATE block, each an X.509
/// certificate.
pub fn ca_file_certs(at: &str, files: &[String], cwd: &Path) -> Result<Vec<Vec<u8>>> {
    /// More files than any use needs; each is read at every start.
    const MAX_FILES: usize = 32;
    if files.len() > MAX_FILES {
        bail!("{at}.ca.files: at most {MAX_FILES} files, got {}", files.len());
    }
    let mut out: Vec<Vec<u8>> = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let field = format!("{at}.ca.files[{i}]");
        if f.is_empty() || f.contains('\0') {
            bail!("{field}: an empty path");
        }
        let path = cwd.join(f);
        let text = slicer_proxy::ca::read_pem(&path).map_err(|e| match e {
            slicer_proxy::Error::Io { source, .. } if source.raw_os_error() == Some(libc::ELOOP) => {
                anyhow::anyhow!(
                    "{field}: {} is a symbolic link; name the file it points to",
                    path.display()
                )
            }
            e => anyhow::anyhow!("{field}: {e}"),
        })?;
        let certs = slicer_proxy::ca::pem_certs(&text);
        if certs.is_empty() {
            bail!(
                "{field}: {} has no CERTIFICATE block (a PEM file of CA certificates is needed)",
                path.display()
            );
        }
        for (n, der) in certs.into_iter().enumerate() {
            if x509_parser::parse_x509_certificate(&der).is_err() {
                bail!(
                    "{field}: {}: certificate {} is not a valid X.509 certificate",
                    path.display(),
                    n + 1
                );
            }
            if !out.contains(&der) {
                out.push(der);
            }
        }
    }
    if out.len() > slicer_agent_proto::MAX_CA_CERTS {
        bail!(
            "{at}.ca.files: {} certificates, more than the {} a guest takes",
            out.len(),
            slicer_agent_proto::MAX_CA_CERTS
        );
    }
    Ok(out)
}

/// The whole validated configuration.
/// `insecure_registry`: SlicerVM's boolean, or a list of registries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Insecure {
    All(bool),
    Hosts(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub groups: Vec<Group>,
    /// Registries pulls may reach over plain HTTP.
    pub insecure_registries: Vec<String>,
    pub graceful_shutdown: bool,
    pub acceleration: slicer_hypervisor::AccelChoice,
    pub listen: Listen,
    pub auth: bool,
    pub capacity: Capacity,
    pub memory_accounting: MemoryAccounting,
    /// What warm starts and live forks may keep (`config.capacity.template_*`).
    pub templates: TemplateBounds,
    /// `config.ssh_keys`: authorized in every VM.
    pub ssh_keys: Vec<String>,
}

impl Settings {
    /// The CAs of groups with `ca.generate`: loaded from `<cwd>/.slicer/ca/<group>/`, or made
    /// there (key 0600 in a 0700 directory) when missing or about to end. Each comes first in
    /// its group's `ca_certs`.
    pub fn load_group_cas(&mut self, cwd: &Path) -> Result<()> {
        for (i, g) in self.groups.iter_mut().enumerate() {
            if !g.ca_generate {
                continue;
            }
            let dir = slicer_proxy::ca::ca_dir(cwd, &g.name);
            let ca = slicer_proxy::ca::GroupCa::load_or_create(&dir, &g.name).map_err(|e| {
                anyhow::anyhow!("config.host_groups[{i}].ca.generate: the CA in {}: {e}", dir.display())
            })?;
            let der = ca.cert_der().to_vec();
            g.ca_certs.retain(|c| c != &der);
            g.ca_certs.insert(0, der);
        }
        Ok(())
    }
}

/// The host's budget for running VMs (validated, defaults applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub ram_bytes: u64,
    pub vms: u32,
    pub vcpus: u32,
}

/// How much templates may hold (validated, defaults applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateBounds {
    /// Template and capture memory kept loaded, at most.
    pub memory_bytes: u64,
    /// Distinct shapes that get a template, at most.
    pub shapes: u32,
}

/// Default bound on distinct template shapes.
pub const DEFAULT_TEMPLATE_SHAPES: u32 = 8;
/// Most template shapes a config may allow (each is a template on disk and up to its RAM
/// loaded).
pub const MAX_TEMPLATE_SHAPES: u32 = 64;

impl TemplateBounds {
    /// The bounds from `config.capacity` within the RAM budget `ram_bytes`.
    pub fn resolve(c: Option<&CapacityConfig>, ram_bytes: u64) -> Result<TemplateBounds> {
        let c = c.cloned().unwrap_or_default();
        let memory_bytes = match c.template_memory_bytes {
            Some(m) if m > ram_bytes => bail!(
                "config.capacity.template_memory_bytes: {} is more than the RAM budget of {} (config.capacity.ram_bytes)",
                human_bytes(m),
                human_bytes(ram_bytes)
            ),
            Some(m) => m,
            None => (ram_bytes / 4).min(slicer_vmm::DEFAULT_TEMPLATE_MEMORY),
        };
        let shapes = match c.template_shapes {
            Some(s) if s > MAX_TEMPLATE_SHAPES => {
                bail!("config.capacity.template_shapes: at most {MAX_TEMPLATE_SHAPES}, got {s}")
            }
            Some(s) => s,
            None => DEFAULT_TEMPLATE_SHAPES,
        };
        Ok(TemplateBounds { memory_bytes, shapes })
    }
}

/// Default number of VMs that may run at once.
pub const DEFAULT_CAPACITY_VMS: u32 = 256;
/// Default vCPUs per host core (guests idle most of the time, so vCPUs are overcommitted).
pub const DEFAULT_VCPUS_PER_CORE: u32 = 16;

impl Capacity {
    /// The budget from `config.capacity` and the host's memory and cores: RAM defaults to
    /// MemTotal less a reserve for the host (the larger of 1 GiB and 10%), VMs to 256,
    /// vCPUs to 16 per core.
    pub fn resolve(c: Option<&CapacityConfig>, mem_total: u64, cores: u32) -> Result<Capacity> {
        let c = c.cloned().unwrap_or_default();
        let ram_bytes = match c.ram_bytes {
            Some(r) if r < 128 << 20 => {
                bail!("config.capacity.ram_bytes: at least 128 MiB (134217728) is needed, got {r}")
            }
            Some(r) => r,
            None => {
                let reserve = (mem_total / 10).max(1 << 30);
                let ram = mem_total.saturating_sub(reserve);
                if ram == 0 {
                    bail!(
                        "config.capacity.ram_bytes: the host has {} MiB of memory, too little to keep 1 GiB for itself; set the budget explicitly",
                        mem_total >> 20
                    );
                }
                ram
            }
        };
        let vms = match c.vms {
            Some(0) => bail!("config.capacity.vms: at least 1 is needed"),
            Some(v) => v,
            None => DEFAULT_CAPACITY_VMS,
        };
        let vcpus = match c.vcpus {
            Some(0) => bail!("config.capacity.vcpus: at least 1 is needed"),
            Some(v) => v,
            None => DEFAULT_VCPUS_PER_CORE.saturating_mul(cores.max(1)),
        };
        Ok(Capacity { ram_bytes, vms, vcpus })
    }

    /// The `count` VMs of all host groups (started with the daemon) must fit the budget.
    fn check_count_vms(&self, groups: &[Group], given: Option<&CapacityConfig>) -> Result<()> {
        let hint = |field: &str, set: bool| {
            if set {
                String::new()
            } else {
                format!(" (the default; set config.capacity.{field} to change it)")
            }
        };
        let given = given.cloned().unwrap_or_default();
        let vms: u64 = groups.iter().map(|g| u64::from(g.count)).sum();
        if vms > u64::from(self.vms) {
            bail!(
                "config.capacity.vms: the host groups' count VMs are {vms}, more than the budget of {}{}",
                self.vms,
                hint("vms", given.vms.is_some())
            );
        }
        let ram: u64 = groups
            .iter()
            .map(|g| u64::from(g.count) * (g.ram_bytes + slicer_vmm::vm_overhead_bytes(g.ram_bytes)))
            .sum();
        if ram > self.ram_bytes {
            bail!(
                "config.capacity.ram_bytes: the host groups' count VMs need {} of host memory (their RAM plus QEMU's overhead), more than the budget of {}{}",
                human_bytes(ram),
                human_bytes(self.ram_bytes),
                hint("ram_bytes", given.ram_bytes.is_some())
            );
        }
        let vcpus: u64 = groups.iter().map(|g| u64::from(g.count) * u64::from(g.cpus)).sum();
        if vcpus > u64::from(self.vcpus) {
            bail!(
                "config.capacity.vcpus: the host groups' count VMs have {vcpus} vCPUs, more than the budget of {}{}",
                self.vcpus,
                hint("vcpus", given.vcpus.is_some())
            );
        }
        Ok(())
    }
}

/// A size for people: `512 MiB`, `20 GiB`, `21.3 GiB`.
pub fn human_bytes(b: u64) -> String {
    const GIB: u64 = 1 << 30;
    if b >= GIB && b.is_multiple_of(GIB) {
        format!("{} GiB", b / GIB)
    } else if b >= GIB {
        format!("{:.1} GiB", b as f64 / GIB as f64)
    } else {
        format!("{} MiB", b >> 20)
    }
}

/// The host's memory (MemTotal of /proc/meminfo) in bytes.
pub fn host_memory_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|l| {
            let kib = l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim();
            kib.parse::<u64>().ok()
        })
        .map(|kib| kib << 10)
        .context("no MemTotal in /proc/meminfo")
}

/// The host's cores available to the daemon (and so to its VMs).
pub fn host_cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

#[derive(Debug, Clone, PartialEq)]
pub enum Listen {
    Tcp(String),
    Unix(PathBuf),
}

/// Parses sizes such as `25G`, `512M`, `2GiB`, `1024` (bytes).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &t[digits.len()..];
    let n: u64 = digits.trim().parse().ok()?;
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Our image that stands in for one of SlicerVM's own (`ghcr.io/openfaasltd/slicer-systemd…`)
/// when its registry cannot be reached: `…slicer-systemd-min…` → `min`, `…slicer-systemd…` →
/// `systemd`.
pub fn slicer_fallback(s: &str) -> Option<&'static str> {
    if !s.contains("openfaasltd/slicer") {
        return None;
    }
    if s.contains("systemd-min") || s.contains("-min:") || s.ends_with("-min") {
        Some("min")
    } else if s.contains("systemd") {
        Some("systemd")
    } else {
        None
    }
}

/// An image setting: ours (`min`, `systemd`), a disk image file (absolute path), or an OCI
/// reference (pulled when the daemon starts, unless already in the store).
fn check_image(i: &str) -> Result<String, String> {
    if slicer_image::is_builtin(i) {
        return Ok(i.to_string());
    }
    if i.starts_with('/') {
        return Ok(i.to_string());
    }
    slicer_image::oci::normalize(i)
        .map_err(|e| format!("{e}; use min, systemd, an OCI reference or an absolute path to a disk image"))?;
    Ok(i.to_string())
}

fn valid_cidr(s: &str) -> bool {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, p.parse::<u8>().ok().filter(|p| *p <= 32)),
        None => (s, Some(32)),
    };
    prefix.is_some() && addr.parse::<Ipv4Addr>().is_ok()
}

/// An allow/drop entry: a CIDR, an address, or `address:port`.
pub fn valid_rule(s: &str) -> bool {
    if let Some((addr, port)) = s.rsplit_once(':') {
        return port.parse::<u16>().is_ok_and(|p| p > 0) && valid_cidr(addr);
    }
    valid_cidr(s)
}

impl File {
    pub fn parse(text: &str) -> Result<File> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            anyhow::anyhow!("invalid config at `{path}`: {}", e.into_inner())
        })
    }

    pub fn load(path: &Path) -> Result<File> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading config {}: create one with `slicer new NAME > {}`",
                path.display(),
                path.display()
            )
        })?;
        File::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Checks every value and applies defaults. `base_dir` resolves `userdata_file`.
    pub fn settings(&self, base_dir: &Path) -> Result<Settings> {
        let c = &self.config;
        match c.hypervisor.as_deref() {
            None | Some("qemu") => {}
            Some("firecracker") => bail!(
                "config.hypervisor: firecracker is not available on this host (slicer runs VMs with QEMU here); set `hypervisor: qemu` or remove the line"
            ),
            Some(other) => bail!("config.hypervisor: unsupported hypervisor {other:?}; use qemu"),
        }
        let acceleration = match c.acceleration.as_deref() {
            None => slicer_hypervisor::AccelChoice::Auto,
            Some(a) => a.parse().map_err(|e| anyhow::anyhow!("config.acceleration: {e}"))?,
        };
        let default_image = match &c.image {
            None => "min".to_string(),
            Some(i) => check_image(i).map_err(|e| anyhow::anyhow!("config.image: {e}"))?,
        };
        for (field, given) in [("kernel_image", &c.kernel_image), ("kernel_file", &c.kernel_file)] {
            if given.is_some() {
                bail!(
                    "config.{field}: not supported; VMs boot the kernel scripts/setup.sh builds for the image store (remove the line)"
                );
            }
        }
        if c.github_user.is_some() {
            bail!(
                "config.github_user: importing keys from GitHub is not supported (the daemon does not fetch keys from the internet); list the public keys in config.ssh_keys instead"
            );
        }
        check_ssh_keys("config.ssh_keys", &c.ssh_keys).map_err(anyhow::Error::msg)?;
        if c.host_groups.is_empty() {
            bail!("config.host_groups: at least one host group is needed");
        }
        let mut groups: Vec<Group> = Vec::new();
        for (i, g) in c.host_groups.iter().enumerate() {
            let group = group_settings(&format!("config.host_groups[{i}]"), g, &default_image, base_dir)?;
            if groups.iter().any(|o| o.name == group.name) {
                bail!("config.host_groups[{i}].name: host group {:?} is defined twice", g.name);
            }
            groups.push(group);
        }
        check_group_networks(&groups)?;
        let bind = c.api.bind_address.trim();
        let listen =
            if bind.starts_with('/') || bind.starts_with("./") || bind.starts_with("../") || bind.ends_with(".sock") {
                Listen::Unix(base_dir.join(bind))
            } else {
                let ip: std::net::IpAddr = bind.parse().map_err(|_| {
                    anyhow::anyhow!("config.api.bind_address: {bind:?} is neither an IP address nor a socket path")
                })?;
                Listen::Tcp(std::net::SocketAddr::new(ip, c.api.port).to_string())
            };
        let auth = match (&c.api.auth, &listen) {
            (Some(a), _) => a.enabled,
            (None, Listen::Tcp(_)) => true,
            (None, Listen::Unix(_)) => false,
        };
        let mem_total = match c.capacity.as_ref().and_then(|c| c.ram_bytes) {
            Some(_) => 0, // not needed
            None => host_memory_bytes().context("config.capacity.ram_bytes: no default")?,
        };
        let capacity = Capacity::resolve(c.capacity.as_ref(), mem_total, host_cores())?;
        capacity.check_count_vms(&groups, c.capacity.as_ref())?;
        let templates = TemplateBounds::resolve(c.capacity.as_ref(), capacity.ram_bytes)?;
        let insecure_registries = insecure_registries(c.insecure_registry.as_ref(), &groups)?;
        Ok(Settings {
            groups,
            insecure_registries,
            graceful_shutdown: c.graceful_shutdown,
            acceleration,
            listen,
            auth,
            capacity,
            memory_accounting: c.capacity.as_ref().and_then(|c| c.memory).unwrap_or_default(),
            templates,
            ssh_keys: c.ssh_keys.clone(),
        })
    }
}

/// One host group's settings: every value checked (errors name the field under `at`),
/// defaults applied. `base_dir` resolves `userdata_file`.
fn group_settings(at: &str, g: &HostGroup, default_image: &str, base_dir: &Path) -> Result<Group> {
    let name_ok = !g.name.is_empty()
        && g.name.len() <= 20
        && g.name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !g.name.starts_with('-')
        && !g.name.ends_with('-');
    if !name_ok {
        bail!("{at}.name: {:?} must be 1-20 lowercase letters, digits or '-'", g.name);
    }
    if g.vcpu == 0 || g.vcpu > 64 {
        bail!("{at}.vcpu: must be between 1 and 64, got {}", g.vcpu);
    }
    let rams = [g.ram_gb.map(|v| v << 30), g.ram_mb.map(|v| v << 20), g.ram_bytes];
    let given: Vec<u64> = rams.iter().flatten().copied().collect();
    if given.len() > 1 {
        bail!("{at}: give only one of ram_gb, ram_mb and ram_bytes");
    }
    let ram_bytes = given.first().copied().unwrap_or(4 << 30);
    if ram_bytes < 128 << 20 {
        bail!("{at}.ram: at least 128 MiB is needed, got {ram_bytes} bytes");
    }
    if g.storage != "image" {
        bail!(
            "{at}.storage: {:?} is not supported here; use `image` (a qcow2 overlay per VM)",
            g.storage
        );
    }
    let storage_size = match &g.storage_size {
        None => None,
        Some(s) => Some(
            parse_size(s)
                .filter(|v| *v >= 1 << 30)
                .ok_or_else(|| anyhow::anyhow!("{at}.storage_size: {s:?} is not a size of at least 1G (e.g. 25G)"))?,
        ),
    };
    let userdata = match (&g.userdata, &g.userdata_file) {
        (Some(_), Some(_)) => bail!("{at}: give userdata or userdata_file, not both"),
        (Some(u), None) => Some(u.clone()),
        (None, Some(f)) => {
            let p = base_dir.join(f);
            Some(std::fs::read_to_string(&p).with_context(|| format!("{at}.userdata_file: reading {}", p.display()))?)
        }
        (None, None) => None,
    };
    let dns = g
        .dns_servers
        .clone()
        .unwrap_or_else(|| vec!["8.8.8.8".into(), "1.1.1.1".into()]);
    for d in &dns {
        if d.parse::<std::net::IpAddr>().is_err() {
            bail!("{at}.dns_servers: {d:?} is not an IP address");
        }
    }
    let image = match &g.image {
        None => default_image.to_string(),
        Some(i) => check_image(i).map_err(|e| anyhow::anyhow!("{at}.image: {e}"))?,
    };
    let net = g.network.clone().unwrap_or_default();
    let text = net.mode.as_deref().unwrap_or("bridge");
    // `none` (no NIC at all) is a slicer extension.
    let Some(mode) = NetworkMode::parse(text) else {
        bail!("{at}.network.mode: {text:?} is not supported; use bridge, isolated or none");
    };
    for (field, list) in [("drop", &net.drop), ("allow", &net.allow)] {
        if !list.is_empty() && mode == NetworkMode::None {
            bail!("{at}.network.{field}: only applies to isolated and bridge mode");
        }
        for r in list {
            if !valid_rule(r) {
                bail!("{at}.network.{field}: {r:?} is not a CIDR, an address or address:port");
            }
        }
    }
    let short: String = g.name.chars().filter(|c| *c != '-').take(8).collect();
    let tap_prefix = net.tap_prefix.clone().unwrap_or_else(|| format!("{short}tap"));
    if tap_prefix.is_empty() || tap_prefix.len() > 12 {
        bail!("{at}.network.tap_prefix: {tap_prefix:?} must be 1-12 characters (interface names are at most 15)");
    }
    let bridge = net.bridge.clone().unwrap_or_else(|| format!("br{short}0"));
    if bridge.is_empty() || bridge.len() > 15 {
        bail!("{at}.network.bridge: {bridge:?} must be 1-15 characters");
    }
    let gateway = net.gateway.clone().unwrap_or_else(|| "192.168.137.1/24".into());
    if mode == NetworkMode::Bridge {
        let ok = gateway.split_once('/').is_some_and(|(a, p)| {
            a.parse::<Ipv4Addr>().is_ok() && p.parse::<u8>().is_ok_and(|p| (8..=30).contains(&p))
        });
        if !ok {
            bail!("{at}.network.gateway: {gateway:?} is not an address with a prefix such as 192.168.137.1/24");
        }
    }
    if let Some(r) = &net.range {
        if mode == NetworkMode::Isolated {
            let ok = r.split_once('/').is_some_and(|(a, p)| {
                a.parse::<Ipv4Addr>().is_ok() && p.parse::<u8>().is_ok_and(|p| (16..=28).contains(&p))
            });
            if !ok {
                bail!("{at}.network.range: {r:?} is not a CIDR from /16 to /28 such as 169.254.100.0/22");
            }
        }
    }
    let ca = g.ca.clone().unwrap_or_default();
    let cwd = std::env::current_dir().with_context(|| format!("{at}.ca.files: the working directory"))?;
    let ca_certs = match ca.files.is_empty() {
        true => Vec::new(),
        false => ca_file_certs(at, &ca.files, &cwd)?,
    };
    Ok(Group {
        ca_generate: ca.generate,
        ca_certs,
        name: g.name.clone(),
        count: g.count,
        cpus: g.vcpu,
        ram_bytes,
        storage_size,
        persistent: g.persistent,
        userdata,
        dns,
        image,
        range: if mode == NetworkMode::Isolated {
            net.range.clone()
        } else {
            None
        },
        warm_start: g.warm_start.unwrap_or(true),
        network_mode: mode,
        allow: net.allow.clone(),
        drop: net.drop.clone(),
        bridge,
        tap_prefix,
        gateway,
    })
}

/// Address ranges and interface names of the groups must not collide.
fn check_group_networks(groups: &[Group]) -> Result<()> {
    // Address ranges and interface names of the groups must not collide.
    let nets: Vec<(String, slicer_net::Net)> = groups
        .iter()
        .filter_map(|g| {
            let cidr = if g.network_mode == NetworkMode::Bridge {
                Some(g.gateway.as_str())
            } else {
                g.range.as_deref()
            };
            cidr.and_then(slicer_net::Net::parse).map(|n| (g.name.clone(), n))
        })
        .collect();
    for (i, (a, na)) in nets.iter().enumerate() {
        for (b, nb) in &nets[i + 1..] {
            if na.overlaps(nb) {
                bail!("config.host_groups: the networks of {a:?} ({na}) and {b:?} ({nb}) overlap");
            }
        }
    }
    for (i, a) in groups.iter().enumerate() {
        for b in &groups[i + 1..] {
            if a.network_mode == NetworkMode::Bridge
                && b.network_mode == NetworkMode::Bridge
                && (a.bridge == b.bridge || a.tap_prefix == b.tap_prefix)
            {
                bail!(
                    "config.host_groups: {:?} and {:?} use the same bridge or tap_prefix",
                    a.name,
                    b.name
                );
            }
        }
    }
    Ok(())
}

/// `config.insecure_registry`: `true` means the registries of the groups' OCI images.
fn insecure_registries(given: Option<&Insecure>, groups: &[Group]) -> Result<Vec<String>> {
    Ok(match given {
        None | Some(Insecure::All(false)) => Vec::new(),
        Some(Insecure::All(true)) => {
            let mut r: Vec<String> = groups
                .iter()
                .filter(|g| !slicer_image::is_builtin(&g.image))
                .filter_map(|g| slicer_image::oci::registry_of(&g.image))
                .collect();
            r.sort();
            r.dedup();
            r
        }
        Some(Insecure::Hosts(h)) => {
            for r in h {
                if r.is_empty() || r.contains('/') || r.chars().any(char::is_whitespace) {
                    bail!("config.insecure_registry: {r:?} is not a registry host[:port]");
                }
            }
            h.clone()
        }
    })
}

/// At most this many SSH keys in a config or a create request, each at most 16 KiB.
pub const MAX_SSH_KEYS: usize = 64;
const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Checks public keys for authorized_keys: one line each, `<type> <base64> [comment]`. A key
/// with options (`command=...`) or a newline could give more than the key it claims.
pub fn check_ssh_keys(field: &str, keys: &[String]) -> Result<(), String> {
    if keys.len() > MAX_SSH_KEYS {
        return Err(format!("{field}: at most {MAX_SSH_KEYS} keys, got {}", keys.len()));
    }
    for (i, k) in keys.iter().enumerate() {
        let mut parts = k.split(' ');
        let ty = parts.next().unwrap_or_default();
        let body = parts.next().unwrap_or_default();
        let ok = k.len() <= 16 * 1024
            && !k.chars().any(char::is_control)
            && SSH_KEY_TYPES.contains(&ty)
            && body.len() >= 16
            && body.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
        if !ok {
            return Err(format!(
                "{field}[{i}]: not an SSH public key (expected one line such as \"ssh-ed25519 AAAA... you@host\")"
            ));
        }
    }
    Ok(())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
config:
  host_groups:
  - name: sandbox
    count: 0
    vcpu: 2
    ram_gb: 4
    storage: image
    storage_size: 25G
    network:
      mode: "isolated"
      drop: ["192.168.1.0/24"]
      allow: ["0.0.0.0/0"]
  image: "ghcr.io/openfaasltd/slicer-systemd:6.1.90-x86_64-latest"
  hypervisor: qemu
  graceful_shutdown: false
  api:
    port: 8080
    bind_address: "127.0.0.1"
    auth:
      enabled: true
"#;

    #[test]
    fn seed_style_config_parses() {
        let s = File::parse(SEED).unwrap().settings(Path::new(".")).unwrap();
        let g = &s.groups[0];
        assert_eq!(
            (g.name.as_str(), g.count, g.cpus, g.ram_bytes),
            ("sandbox", 0, 2, 4 << 30)
        );
        assert_eq!(g.drop, vec!["192.168.1.0/24"]);
        assert_eq!(g.image, "ghcr.io/openfaasltd/slicer-systemd:6.1.90-x86_64-latest");
        assert_eq!(slicer_fallback(&g.image), Some("systemd"));
        assert_eq!(s.listen, Listen::Tcp("127.0.0.1:8080".into()));
        assert!(s.auth && !s.graceful_shutdown);
    }

    #[test]
    fn errors_name_the_field() {
        let err = |yaml: &str| {
            format!(
                "{:#}",
                File::parse(yaml).and_then(|f| f.settings(Path::new("."))).unwrap_err()
            )
        };
        let e = err("config:\n  host_groups:\n  - name: a\n    cpu: 2\n");
        assert!(e.contains("host_groups[0]") && e.contains("unknown field `cpu`"), "{e}");
        let e = err("config:\n  host_groups:\n  - name: a\n    vcpu: lots\n");
        assert!(e.contains("host_groups[0].vcpu"), "{e}");
        let e = err("config:\n  host_groups:\n  - name: a\n    storage_size: big\n");
        assert!(e.contains("storage_size"), "{e}");
        let e = err("config:\n  kernel_file: /boot/vmlinux\n  host_groups:\n  - name: a\n");
        assert!(e.contains("config.kernel_file: not supported"), "{e}");
        let e = err("config:\n  kernel_image: ghcr.io/x/k:1\n  host_groups:\n  - name: a\n");
        assert!(e.contains("config.kernel_image: not supported"), "{e}");
        let e = err("config:\n  hypervisor: firecracker\n  host_groups:\n  - name: a\n");
        assert!(e.contains("config.hypervisor") && e.contains("hypervisor: qemu"), "{e}");
        let e = err("config:\n  host_groups:\n  - name: a\n    network: {mode: isolated, drop: [\"300.1.1.0/24\"]}\n");
        assert!(e.contains("network.drop"), "{e}");
        let e = err("config:\n  host_groups:\n  - name: Bad\n");
        assert!(e.contains("host_groups[0].name"), "{e}");
        let e = err("config:\n  host_groups:\n  - name: a\n    network: {mode: isolated, range: 169.254.100.0/22}\n  - name: b\n    network: {mode: isolated, range: 169.254.101.0/24}\n");
        assert!(e.contains("overlap"), "{e}");
        let e = err("config:\n  host_groups:\n  - name: a\n    network: {mode: isolated, range: 169.254.100.0/33}\n");
        assert!(e.contains("network.range"), "{e}");
        let e =
            err("config:\n  host_groups:\n  - name: a\n    network: {mode: bridge, bridge: a-very-long-bridge-name}\n");
        assert!(e.contains("network.bridge"), "{e}");
        let e =
            err("config:\n  host_groups:\n  - name: a\n    network: {mode: bridge, tap_prefix: waytoolongprefix}\n");
        assert!(e.contains("network.tap_prefix"), "{e}");
        let e = err("config:\n  capacity: {vms: 0}\n  host_groups:\n  - name: a\n");
        assert!(e.contains("config.capacity.vms"), "{e}");
        let e = err("config:\n  capacity: {vcpus: 0}\n  host_groups:\n  - name: a\n");
        assert!(e.contains("config.capacity.vcpus"), "{e}");
        let e = err("config:\n  capacity: {ram_bytes: 1000}\n  host_groups:\n  - name: a\n");
        assert!(e.contains("config.capacity.ram_bytes"), "{e}");
        let e = err("config:\n  capacity: {ram_bytes: lots}\n  host_groups:\n  - name: a\n");
        assert!(e.contains("capacity.ram_bytes"), "{e}");
        let e = err("config:\n  capacity: {memory_bytes: 1}\n  host_groups:\n  - name: a\n");
        assert!(
            e.contains("capacity") && e.contains("unknown field `memory_bytes`"),
            "{e}"
        );
        let e = err("config:\n  capacity: {memory: 1}\n  host_groups:\n  - name: a\n");
        assert!(
            e.contains("config.capacity.memory") && e.contains("`measured` or `nominal`"),
            "{e}"
        );
        let e = err("config:\n  capacity: {vms: 2}\n  host_groups:\n  - name: a\n    count: 3\n");
        assert!(
            e.contains("config.capacity.vms") && e.contains("count VMs are 3"),
            "{e}"
        );
        let e = err(
            "config:\n  capacity: {ram_bytes: 2147483648}\n  host_groups:\n  - name: a\n    count: 2\n    ram_gb: 1\n",
        );
        assert!(e.contains("config.capacity.ram_bytes") && e.contains("2.5 GiB"), "{e}");
        let e = err("config:\n  capacity: {vcpus: 3}\n  host_groups:\n  - name: a\n    count: 2\n    vcpu: 2\n");
        assert!(e.contains("config.capacity.vcpus"), "{e}");
        let e = err("config:\n  capacity: {ram_bytes: 1073741824, template_memory_bytes: 2147483648}\n  host_groups:\n  - name: a\n    count: 0\n");
        assert!(
            e.contains("config.capacity.template_memory_bytes") && e.contains("more than the RAM budget of 1 GiB"),
            "{e}"
        );
        let e = err("config:\n  capacity: {template_shapes: 65}\n  host_groups:\n  - name: a\n    count: 0\n");
        assert!(
            e.contains("config.capacity.template_shapes") && e.contains("at most 64"),
            "{e}"
        );
        let e = err("config:\n  capacity: {template_shapes: -1}\n  host_groups:\n  - name: a\n    count: 0\n");
        assert!(e.contains("template_shapes"), "{e}");
    }

    #[test]
    fn template_bounds_default_from_the_budget() {
        const GIB: u64 = 1 << 30;
        let b = |c: Option<&CapacityConfig>, ram| TemplateBounds::resolve(c, ram).unwrap();
        assert_eq!(
            b(None, 4 * GIB),
            TemplateBounds {
                memory_bytes: GIB,
                shapes: 8
            }
        );
        assert_eq!(b(None, 20 * GIB).memory_bytes, 2 * GIB);
        let given = CapacityConfig {
            template_memory_bytes: Some(0),
            template_shapes: Some(0),
            ..Default::default()
        };
        assert_eq!(
            b(Some(&given), GIB),
            TemplateBounds {
                memory_bytes: 0,
                shapes: 0
            }
        );
        let s = File::parse("config:\n  capacity: {ram_bytes: 4294967296, template_memory_bytes: 629145600, template_shapes: 3}\n  host_groups:\n  - name: a\n    count: 0\n")
            .unwrap()
            .settings(Path::new("."))
            .unwrap();
        assert_eq!(
            s.templates,
            TemplateBounds {
                memory_bytes: 600 << 20,
                shapes: 3
            }
        );
    }

    #[test]
    fn capacity_defaults_come_from_the_host() {
        const GIB: u64 = 1 << 30;
        // The reserve is 10% of the host's memory, at least 1 GiB.
        let c = Capacity::resolve(None, 32 * GIB, 4).unwrap();
        assert_eq!(c.ram_bytes, 32 * GIB - 32 * GIB / 10);
        assert_eq!((c.vms, c.vcpus), (DEFAULT_CAPACITY_VMS, 64));
        assert_eq!(Capacity::resolve(None, 4 * GIB, 1).unwrap().ram_bytes, 3 * GIB);
        assert!(Capacity::resolve(None, GIB, 1).is_err());
        let given = CapacityConfig {
            ram_bytes: Some(2 * GIB),
            vms: Some(2),
            vcpus: Some(3),
            memory: None,
            template_memory_bytes: None,
            template_shapes: None,
        };
        assert_eq!(
            Capacity::resolve(Some(&given), 0, 8).unwrap(),
            Capacity {
                ram_bytes: 2 * GIB,
                vms: 2,
                vcpus: 3
            }
        );
        let s = File::parse("config:\n  capacity: {vms: 2}\n  host_groups:\n  - name: a\n    count: 0\n")
            .unwrap()
            .settings(Path::new("."))
            .unwrap();
        assert_eq!(s.capacity.vms, 2);
        assert_eq!(s.memory_accounting, MemoryAccounting::Measured);
        let err = File::parse("config:\n  capacity: {memory: guessed}\n  host_groups:\n  - name: a\n    count: 0\n")
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("memory") && err.contains("nominal"), "{err}");
        assert!(s.capacity.ram_bytes > 0 && s.capacity.vcpus >= DEFAULT_VCPUS_PER_CORE);
        assert!(host_memory_bytes().unwrap() > s.capacity.ram_bytes);
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(20 * GIB), "20 GiB");
        assert_eq!(human_bytes(GIB + GIB / 2), "1.5 GiB");
    }

    #[test]
    fn new_renders_loadable_yaml_with_allow_all_for_drops() {
        let o = NewOptions {
            name: "sandbox".into(),
            count: 0,
            vcpu: 2,
            ram_gb: 4,
            storage: "image".into(),
            storage_size: "25G".into(),
            image: "min".into(),
            net: "isolated".into(),
            drop: vec!["192.168.1.0/24".into()],
            api_bind: "127.0.0.1".into(),
            api_port: 8080,
            graceful_shutdown: false,
            hypervisor: "qemu".into(),
            ..Default::default()
        };
        let y = render_new(&o).unwrap();
        let s = File::parse(&y).unwrap().settings(Path::new(".")).unwrap();
        assert_eq!(s.groups[0].allow, vec!["0.0.0.0/0"]);
        assert_eq!(s.groups[0].network_mode, NetworkMode::Isolated);
    }

    #[test]
    fn sizes_and_rules() {
        assert_eq!(parse_size("25G"), Some(25 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("x"), None);
        assert!(valid_rule("192.168.1.0/24") && valid_rule("10.0.0.1:3128") && valid_rule("0.0.0.0/0"));
        assert!(!valid_rule("10.0.0.1:0") && !valid_rule("10.0.0.0/33") && !valid_rule("nope"));
    }

    #[test]
    fn images_are_ours_references_or_disk_files_and_insecure_registries_are_named() {
        let y = |image: &str, insecure: &str| {
            format!("config:\n  image: {image}\n{insecure}  host_groups:\n  - name: a\n    count: 0\n")
        };
        let settings = |t: String| File::parse(&t).and_then(|f| f.settings(Path::new(".")));
        let s = settings(y("127.0.0.1:5000/team/ci:v1", "  insecure_registry: true\n")).unwrap();
        assert_eq!(s.groups[0].image, "127.0.0.1:5000/team/ci:v1");
        assert_eq!(s.insecure_registries, vec!["127.0.0.1:5000".to_string()]);
        let s = settings(y("alpine", "  insecure_registry: [\"10.0.0.5:5000\"]\n")).unwrap();
        assert_eq!(s.insecure_registries, vec!["10.0.0.5:5000".to_string()]);
        let s = settings(y("/srv/disks/builder.qcow2", "")).unwrap();
        assert_eq!(s.groups[0].image, "/srv/disks/builder.qcow2");
        assert!(s.insecure_registries.is_empty());
        let e = format!("{:#}", settings(y("\"Not A Ref\"", "")).unwrap_err());
        assert!(
            e.contains("config.image") && e.contains("not an image reference"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            settings(y("min", "  insecure_registry: [\"a/b\"]\n")).unwrap_err()
        );
        assert!(e.contains("config.insecure_registry"), "{e}");
        assert_eq!(
            slicer_fallback("ghcr.io/openfaasltd/slicer-systemd-min:6.1"),
            Some("min")
        );
        assert_eq!(slicer_fallback("docker.io/library/debian:12"), None);
    }

    /// A config of one group `g` with `ca_yaml` as its `ca:`.
    fn with_ca(ca_yaml: &str) -> String {
        format!("config:\n  host_groups:\n  - name: g\n    count: 0\n    network: {{mode: none}}\n    ca: {ca_yaml}\n  capacity: {{ram_bytes: 8589934592}}\n")
    }

    #[test]
    fn ca_files_are_checked_and_their_certificates_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = slicer_proxy::ca::GroupCa::init(&dir.path().join("a"), "a", false).unwrap();
        let other = slicer_proxy::ca::GroupCa::init(&dir.path().join("b"), "b", false).unwrap();
        let two = dir.path().join("two.pem");
        std::fs::write(&two, format!("{}{}", ca.cert_pem(), other.cert_pem())).unwrap();
        let one = dir.path().join("one.pem");
        std::fs::write(&one, ca.cert_pem()).unwrap();
        // Relative to the working directory given, or absolute; a certificate is kept once.
        let certs = ca_file_certs(
            "config.host_groups[0]",
            &["two.pem".into(), one.to_string_lossy().into_owned()],
            dir.path(),
        )
        .unwrap();
        assert_eq!(certs, vec![ca.cert_der().to_vec(), other.cert_der().to_vec()]);

        let err = |name: &str| {
            let files = vec!["one.pem".to_string(), name.to_string()];
            format!(
                "{:#}",
                ca_file_certs("config.host_groups[0]", &files, dir.path()).unwrap_err()
            )
        };
        std::fs::write(
            dir.path().join("key.pem"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = err("key.pem");
        assert!(
            e.starts_with("config.host_groups[0].ca.files[1]: ") && e.contains("no CERTIFICATE block"),
            "{e}"
        );
        std::fs::write(dir.path().join("text.pem"), "hello").unwrap();
        assert!(err("text.pem").contains("no CERTIFICATE block"));
        std::fs::write(
            dir.path().join("junk.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = err("junk.pem");
        assert!(e.contains("ca.files[1]") && e.contains("not a valid X.509"), "{e}");
        let e = err("missing.pem");
        assert!(e.contains("ca.files[1]") && e.contains("No such file"), "{e}");
        std::os::unix::fs::symlink(&one, dir.path().join("link.pem")).unwrap();
        let e = err("link.pem");
        assert!(e.contains("ca.files[1]") && e.contains("symbolic link"), "{e}");
        let big = std::fs::File::create(dir.path().join("big.pem")).unwrap();
        big.set_len(slicer_proxy::ca::MAX_PEM_BYTES + 1).unwrap();
        let e = err("big.pem");
        assert!(e.contains("ca.files[1]") && e.contains("larger than"), "{e}");
        let e = err(dir.path().to_str().unwrap());
        assert!(e.contains("ca.files[1]"), "{e}");
        let fifo = std::ffi::CString::new(dir.path().join("fifo.pem").to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = err("fifo.pem");
        assert!(e.contains("ca.files[1]") && e.contains("not a regular file"), "{e}");
        assert!(err("").contains("ca.files[1]: an empty path"));
    }

    #[test]
    fn ca_config_parses_generate_and_rejects_unknown_keys() {
        let s = File::parse(&with_ca("{generate: true}"))
            .unwrap()
            .settings(Path::new("."))
            .unwrap();
        assert!(s.groups[0].ca_generate && s.groups[0].ca_certs.is_empty());
        assert_eq!(s.groups[0].ca_bundle(), None);
        let e = format!("{:#}", File::parse(&with_ca("{generate: true, path: x}")).unwrap_err());
        assert!(
            e.contains("host_groups[0].ca") && e.contains("unknown field `path`"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            File::parse(&with_ca("{files: [/nonexistent/slicer-ca.pem]}"))
                .and_then(|f| f.settings(Path::new(".")))
                .unwrap_err()
        );
        assert!(
            e.contains("config.host_groups[0].ca.files[0]: /nonexistent/slicer-ca.pem"),
            "{e}"
        );

        // The generated CA is made in <cwd>/.slicer/ca/<group>/, comes first, and is kept.
        let dir = tempfile::tempdir().unwrap();
        let extra = slicer_proxy::ca::GroupCa::init(&dir.path().join("x"), "x", false).unwrap();
        let pem = dir.path().join("extra.pem");
        std::fs::write(&pem, extra.cert_pem()).unwrap();
        let yaml = with_ca(&format!("{{generate: true, files: [{}]}}", pem.display()));
        let mut s = File::parse(&yaml).unwrap().settings(Path::new(".")).unwrap();
        s.load_group_cas(dir.path()).unwrap();
        let made = slicer_proxy::ca::GroupCa::load(&slicer_proxy::ca::ca_dir(dir.path(), "g")).unwrap();
        assert_eq!(
            s.groups[0].ca_certs,
            vec![made.cert_der().to_vec(), extra.cert_der().to_vec()]
        );
        let bundle = s.groups[0].ca_bundle().unwrap();
        assert_eq!(slicer_proxy::ca::pem_certs(&bundle), s.groups[0].ca_certs);
        use std::os::unix::fs::PermissionsExt;
        let key = slicer_proxy::ca::ca_dir(dir.path(), "g").join("ca.key");
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let mut again = File::parse(&yaml).unwrap().settings(Path::new(".")).unwrap();
        again.load_group_cas(dir.path()).unwrap();
        assert_eq!(again.groups[0].ca_certs, s.groups[0].ca_certs, "a restart keeps the CA");
    }

    #[test]
    fn slicer_new_with_ca_generates() {
        let text = render_new(&NewOptions {
            name: "demo".into(),
            count: 0,
            vcpu: 1,
            ram_gb: 1,
            storage: "image".into(),
            storage_size: "5G".into(),
            image: "min".into(),
            net: "isolated".into(),
            api_bind: "127.0.0.1".into(),
            api_port: 8080,
            hypervisor: "qemu".into(),
            ca: true,
            ..Default::default()
        })
        .unwrap();
        assert!(text.contains("ca:\n      generate: true\n"), "{text}");
    }
}
