//! The local image store under `<data_dir>/images`.
//!
//! ```text
//! images/kernels/<key>/{bzImage,vmlinux,config,release}
//! images/debootstrap/<key>/rootfs/...      cached debootstrap tree
//! images/debootstrap/<variant>-<key>/rootfs/...  cached package tree of a variant (no agent)
//! images/rootfs/<variant>-<key>/rootfs.ext4
//! images/<variant>.json                    manifest of the current image of that name
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::Variant;

/// A built image: what a VM boots.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Image {
    pub name: String,
    pub variant: Variant,
    /// Compressed kernel for QEMU.
    pub kernel: PathBuf,
    /// Uncompressed ELF kernel (Firecracker).
    pub vmlinux: PathBuf,
    /// Read-only base root filesystem (raw ext4).
    pub rootfs: PathBuf,
    /// `uname -r` of the kernel.
    pub kernel_release: String,
    /// Hash of everything the image was built from.
    pub key: String,
}

impl Image {
    /// The `init=` argument, when the variant needs one.
    pub fn init(&self) -> Option<&'static str> {
        self.variant.init()
    }
}

#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// The store of a data directory: `<data_dir>/images`.
    pub fn new(data_dir: &Path) -> ImageStore {
        ImageStore::at(&data_dir.join("images"))
    }

    /// A store rooted at `root`.
    pub fn at(root: &Path) -> ImageStore {
        ImageStore {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn kernel_dir(&self, key: &str) -> PathBuf {
        self.root.join("kernels").join(key)
    }

    pub fn debootstrap_dir(&self, key: &str) -> PathBuf {
        self.root.join("debootstrap").join(key)
    }

    pub fn rootfs_dir(&self, variant: Variant, key: &str) -> PathBuf {
        self.root.join("rootfs").join(format!("{variant}-{key}"))
    }

    pub fn build_dir(&self) -> PathBuf {
        self.root.join("build")
    }

    fn manifest(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.json"))
    }

    /// Looks up an image by name (`min`, `systemd`).
    pub fn get(&self, name: &str) -> Result<Image> {
        let path = self.manifest(name);
        let raw = std::fs::read(&path).with_context(|| {
            format!(
                "image {name:?} is not built (no {}): run `slicer image build --variant {name}`",
                path.display()
            )
        })?;
        let img: Image = serde_json::from_slice(&raw).with_context(|| format!("parsing {}", path.display()))?;
        for p in [&img.kernel, &img.rootfs] {
            anyhow::ensure!(
                p.exists(),
                "image {name:?} is incomplete: {} is missing; run `slicer image build --variant {name}`",
                p.display()
            );
        }
        Ok(img)
    }

    /// All images with a manifest.
    pub fn list(&self) -> Result<Vec<Image>> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return Ok(out);
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".json") {
                if let Ok(img) = self.get(stem) {
                    out.push(img);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub(crate) fn publish(&self, img: &Image) -> Result<()> {
        let path = self.manifest(&img.name);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(img)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// Hex sha256 of a list of input parts; 16 hex digits are plenty for a cache key.
pub fn key_of(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..8])
}

/// Hex sha256 of a file's contents.
pub fn file_sha256(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_every_part_and_its_boundaries() {
        assert_ne!(key_of(&[b"ab", b"c"]), key_of(&[b"a", b"bc"]));
        assert_eq!(key_of(&[b"x"]), key_of(&[b"x"]));
        assert_eq!(key_of(&[b"x"]).len(), 16);
    }

    #[test]
    fn missing_image_says_how_to_build_it() {
        let d = tempfile::tempdir().unwrap();
        let err = ImageStore::new(d.path()).get("min").unwrap_err().to_string();
        assert!(err.contains("slicer image build --variant min"), "{err}");
    }
}
