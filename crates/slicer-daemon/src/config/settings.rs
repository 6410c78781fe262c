//! The validated configuration: what the daemon runs from.

use super::*;

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

/// The whole validated configuration.
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

/// Where the API listens.
#[derive(Debug, Clone, PartialEq)]
pub enum Listen {
    Tcp(String),
    Unix(PathBuf),
}
