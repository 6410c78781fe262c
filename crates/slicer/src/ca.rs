//! `slicer ca init|issue`: a host group's CA in `./.slicer/ca/<group>/` (where `slicer up` run
//! from the same directory finds it for `ca: {generate: true}`), and leaf certificates it signs
//! for services the group's VMs reach.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use slicer_proxy::ca::{ca_dir, GroupCa};

#[derive(Subcommand)]
pub enum CaCmd {
    /// Make the group's CA: ./.slicer/ca/GROUP/ca.{crt,key} (key 0600, directory 0700).
    Init {
        #[arg(long = "hostgroup", alias = "host-group")]
        hostgroup: String,
        /// Replace a CA that is there (VMs that trust the old one keep trusting it).
        #[arg(long)]
        force: bool,
    },
    /// Issue a server certificate signed by the group's CA: PREFIX.crt and PREFIX.key (0600).
    Issue {
        #[arg(long = "hostgroup", alias = "host-group")]
        hostgroup: String,
        /// A DNS name or an IP address the certificate is for (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Where to write: PREFIX.crt and PREFIX.key.
        #[arg(long)]
        out: PathBuf,
    },
}

/// A host group's name as the config takes it.
fn check_group(g: &str) -> Result<()> {
    let ok = !g.is_empty()
        && g.len() <= 20
        && g.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !g.starts_with('-')
        && !g.ends_with('-');
    if !ok {
        bail!("--hostgroup: {g:?} is not a host group name (1-20 lowercase letters, digits or '-')");
    }
    Ok(())
}

pub fn run(cmd: CaCmd) -> Result<()> {
    let cwd = std::env::current_dir().context("the working directory")?;
    match cmd {
        CaCmd::Init { hostgroup, force } => {
            let dir = init(&cwd, &hostgroup, force)?;
            println!("CA for host group {hostgroup} written to {}", dir.display());
            println!("  certificate: {}", dir.join("ca.crt").display());
            println!(
                "  key:         {} (0600; it never leaves this host)",
                dir.join("ca.key").display()
            );
            Ok(())
        }
        CaCmd::Issue { hostgroup, hosts, out } => {
            let (crt, key) = issue(&cwd, &hostgroup, &hosts, &out)?;
            println!("{}\n{}", crt.display(), key.display());
            Ok(())
        }
    }
}

/// `ca init`: the CA's directory.
pub fn init(cwd: &Path, group: &str, force: bool) -> Result<PathBuf> {
    check_group(group)?;
    let dir = ca_dir(cwd, group);
    GroupCa::init(&dir, group, force).map_err(|e| match e {
        slicer_proxy::Error::Exists(p) => anyhow::anyhow!(
            "{} exists: host group {group} has a CA already (pass --force to replace it; VMs keep trusting the old one)",
            p.display()
        ),
        e => anyhow::anyhow!("making the CA in {}: {e}", dir.display()),
    })?;
    Ok(dir)
}

/// `ca issue`: the certificate's and the key's paths.
pub fn issue(cwd: &Path, group: &str, hosts: &[String], out: &Path) -> Result<(PathBuf, PathBuf)> {
    check_group(group)?;
    let dir = ca_dir(cwd, group);
    let ca = GroupCa::load(&dir).map_err(|e| {
        anyhow::anyhow!(
            "loading the CA of host group {group} from {}: {e} (make it with `slicer ca init --hostgroup {group}`, or `ca: {{generate: true}}` and `slicer up`)",
            dir.display()
        )
    })?;
    let leaf = ca.issue(hosts).map_err(|e| anyhow::anyhow!("--host: {e}"))?;
    let with_ext = |ext: &str| {
        let mut s = out.as_os_str().to_os_string();
        s.push(ext);
        PathBuf::from(s)
    };
    let (crt, key) = (with_ext(".crt"), with_ext(".key"));
    // The key first, private from its creation; neither replaces a link.
    write_file(&key, leaf.key_pem.as_bytes(), 0o600)?;
    let mut chain = leaf.cert_pem.clone();
    chain.push_str(ca.cert_pem());
    write_file(&crt, chain.as_bytes(), 0o644)?;
    Ok((crt, key))
}

/// Writes `path` (replacing a file, refusing a link) with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!("{} is a symbolic link; refusing to write through it", path.display());
    }
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_refuses_to_overwrite_and_issue_signs_with_the_groups_ca() {
        let d = tempfile::tempdir().unwrap();
        let dir = init(d.path(), "demo", false).unwrap();
        assert_eq!(dir, d.path().join(".slicer/ca/demo"));
        let first = std::fs::read(dir.join("ca.crt")).unwrap();
        let e = init(d.path(), "demo", false).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        assert_eq!(std::fs::read(dir.join("ca.crt")).unwrap(), first);
        init(d.path(), "demo", true).unwrap();
        assert_ne!(std::fs::read(dir.join("ca.crt")).unwrap(), first);
        assert!(init(d.path(), "../x", false).is_err());

        let out = d.path().join("server");
        let (crt, key) = issue(d.path(), "demo", &["192.168.137.1".into(), "api.internal".into()], &out).unwrap();
        assert_eq!(crt, d.path().join("server.crt"));
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let ca = GroupCa::load(&dir).unwrap();
        let certs = slicer_proxy::ca::pem_certs(&std::fs::read_to_string(&crt).unwrap());
        assert_eq!(certs.len(), 2, "the leaf, then its CA");
        assert_eq!(certs[1], ca.cert_der());
        // The leaf verifies against the CA as a server certificate for the names given.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().to_vec().into()).unwrap();
        use rustls::client::danger::ServerCertVerifier;
        // ring is the provider the workspace builds rustls with (only signature checks here).
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(std::sync::Arc::new(roots), provider.into())
                .build()
                .unwrap();
        let leaf = rustls::pki_types::CertificateDer::from(certs[0].clone());
        for name in ["api.internal", "192.168.137.1"] {
            verifier
                .verify_server_cert(
                    &leaf,
                    &[],
                    &rustls::pki_types::ServerName::try_from(name).unwrap(),
                    &[],
                    rustls::pki_types::UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(issue(d.path(), "other", &["x".into()], &out)
            .unwrap_err()
            .to_string()
            .contains("ca init"));
        // A link at PREFIX.key is not written through.
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("l.key")).unwrap();
        assert!(issue(d.path(), "demo", &["x".into()], &d.path().join("l")).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    }
}
