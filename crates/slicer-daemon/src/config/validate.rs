//! Checks of the configuration's values: `File::settings`, images, addresses, sizes, SSH keys
//! and CA files.

use super::*;

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
pub(crate) fn check_image(i: &str) -> Result<String, String> {
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

pub(crate) fn valid_cidr(s: &str) -> bool {
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

/// Address ranges and interface names of the groups must not collide.
pub(crate) fn check_group_networks(groups: &[Group]) -> Result<()> {
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
pub(crate) fn insecure_registries(given: Option<&Insecure>, groups: &[Group]) -> Result<Vec<String>> {
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
pub(crate) const SSH_KEY_TYPES: &[&str] = &[
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
