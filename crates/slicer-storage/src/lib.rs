//! Per-VM disks. The base image stays read-only and shared; each VM writes to its own qcow2
//! overlay (about 17 ms to create here, no reflink or device-mapper needed).

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Creates `overlay` as a qcow2 file backed by the raw `base`. `size` (bytes) sets the
/// virtual size the guest sees; `None` keeps the base's size.
pub async fn create_overlay(base: &Path, overlay: &Path, size: Option<u64>) -> Result<()> {
    if !base.is_file() {
        bail!("base image {} does not exist", base.display());
    }
    let base = base
        .canonicalize()
        .with_context(|| format!("resolving {}", base.display()))?;
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(overlay);
    if let Some(s) = size {
        cmd.arg(s.to_string());
    }
    let out = cmd.output().await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!("qemu-img not found: apt-get install -y qemu-utils")
        } else {
            anyhow::anyhow!("running qemu-img: {e}")
        }
    })?;
    if !out.status.success() {
        bail!(
            "qemu-img create {} failed: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlay_over_a_raw_base() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let ov = d.path().join("ov.qcow2");
        create_overlay(&base, &ov, Some(4 << 20)).await.unwrap();
        let head = std::fs::read(&ov).unwrap();
        assert_eq!(&head[..4], b"QFI\xfb");
        let err = create_overlay(&d.path().join("missing"), &ov, None).await.unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }
}
