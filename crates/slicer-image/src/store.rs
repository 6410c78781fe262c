//! The local image store under `<data_dir>/images`.
//!
//! ```text
//! images/kernels/<key>/{bzImage,vmlinux,config,release}
//! images/debootstrap/<key>/rootfs/...      cached debootstrap tree
//! images/debootstrap/<variant>-<key>/rootfs/...  cached package tree of a variant (no agent)
//! images/rootfs/<variant>-<key>/rootfs.ext4
//! images/<variant>.json                    manifest of the current image of that name
//! images/oci/<digest>-<agent>/{rootfs.ext4,image.json}   a pulled image (see `oci`)
//! images/refs/<key>.json                   a reference (`registry/repo:tag`) → the above
//! images/tmp/pull-<pid>-<random>/          scratch space of a pull in progress
//! ```

use std::path::{Path, PathBuf};

use crate::error::{fs, Error, IoContext, JsonContext, Result};
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
    /// The OCI reference it was pulled as (`None` for our own images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The manifest digest it was pulled at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// A reference's entry in `images/refs/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RefEntry {
    reference: String,
    id: String,
}

/// Our own image names (everything else is an OCI reference).
pub fn is_builtin(name: &str) -> bool {
    matches!(name, "min" | "systemd")
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

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where a pulled image lives.
    pub fn oci_dir(&self, id: &str) -> PathBuf {
        self.root.join("oci").join(id)
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(format!("{}.json", key_of(&[reference.as_bytes()])))
    }

    /// The image our kernel comes from (pulled images boot it too).
    pub fn kernel_image(&self) -> Result<Image> {
        self.builtin("min")
            .or_else(|_| self.builtin("systemd"))
            .map_err(|_| Error::NoKernel)
    }

    /// A stored pulled image by id.
    pub(crate) fn get_stored(&self, id: &str) -> Result<Image> {
        let path = self.oci_dir(id).join("image.json");
        let raw = fs::read(&path)?;
        let img: Image = serde_json::from_slice(&raw).json_context(|| format!("parsing {}", path.display()))?;
        if !img.rootfs.is_file() {
            return Err(Error::Missing { path: img.rootfs });
        }
        Ok(img)
    }

    /// Moves a finished pull's output into place as `id` (another pull that got there first wins).
    pub(crate) fn publish_stored(&self, id: &str, out: &Path) -> Result<()> {
        let dst = self.oci_dir(id);
        fs::create_dir_all(self.root.join("oci"))?;
        match std::fs::rename(out, &dst) {
            Ok(()) => Ok(()),
            Err(_) if self.get_stored(id).is_ok() => Ok(()),
            Err(e) => Err(Error::io(format!("moving the image into {}", dst.display()), e)),
        }
    }

    /// Points `reference` at the stored image `id` (atomically).
    pub(crate) fn set_ref(&self, reference: &str, id: &str) -> Result<()> {
        let path = self.ref_path(reference);
        fs::create_dir_all(self.root.join("refs"))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let entry = RefEntry {
            reference: reference.to_string(),
            id: id.to_string(),
        };
        let json = serde_json::to_vec(&entry).json_context(|| format!("encoding {}", path.display()))?;
        std::fs::write(&tmp, json).io_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).io_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// A pulled image with today's kernel and the name it was asked for.
    pub(crate) fn complete(&self, mut img: Image, name: &str, kernel: &Image) -> Image {
        img.name = name.to_string();
        img.kernel = kernel.kernel.clone();
        img.vmlinux = kernel.vmlinux.clone();
        img.kernel_release = kernel.kernel_release.clone();
        img
    }

    fn refs(&self) -> Vec<RefEntry> {
        let mut out = Vec::new();
        if let Ok(dir) = std::fs::read_dir(self.root.join("refs")) {
            for e in dir.flatten() {
                if e.path().extension().is_some_and(|x| x == "json") {
                    if let Some(r) = std::fs::read(e.path())
                        .ok()
                        .and_then(|b| serde_json::from_slice::<RefEntry>(&b).ok())
                    {
                        out.push(r);
                    }
                }
            }
        }
        out
    }

    /// A pulled image by reference, as stored (no registry is asked).
    fn pulled(&self, reference: &str) -> Result<Image> {
        let canonical = if reference.starts_with('/') {
            reference.to_string()
        } else {
            crate::oci::normalize(reference)?
        };
        let path = self.ref_path(&canonical);
        let raw = std::fs::read(&path).map_err(|_| Error::NotInStore {
            image: canonical.clone(),
            reference: Some(reference.to_string()),
        })?;
        let entry: RefEntry = serde_json::from_slice(&raw).json_context(|| format!("parsing {}", path.display()))?;
        let img = self.get_stored(&entry.id)?;
        Ok(self.complete(img, &canonical, &self.kernel_image()?))
    }

    /// A disk image file (raw ext4 or qcow2 without a backing file, e.g. from `slicer disk
    /// export`) as an image: converted into a raw base in the store, keyed by the file's
    /// identity (path, inode, size, mtime). It must be one of ours: how it boots is read from
    /// its `/etc/slicer/image.json` with `debugfs` (no mount).
    pub fn import_file(&self, path: &Path) -> Result<Image> {
        use std::os::unix::fs::MetadataExt;
        if !path.is_absolute() {
            return Err(Error::unusable(format!(
                "{}: a disk image is named by an absolute path",
                path.display()
            )));
        }
        let name = path.to_string_lossy().into_owned();
        let meta = std::fs::metadata(path).io_context(|| format!("reading {name}"))?;
        if !meta.is_file() {
            return Err(Error::unusable(format!("{name} is not a file")));
        }
        let id = format!(
            "file-{}",
            key_of(&[
                name.as_bytes(),
                &meta.ino().to_le_bytes(),
                &meta.len().to_le_bytes(),
                &meta.mtime().to_le_bytes(),
                &meta.mtime_nsec().to_le_bytes(),
            ])
        );
        let kernel = self.kernel_image()?;
        if let Ok(img) = self.get_stored(&id) {
            self.set_ref(&name, &id)?;
            return Ok(self.complete(img, &name, &kernel));
        }
        let format = crate::disk::probe(path)?;
        let scratch = self.scratch("import")?;
        let out = scratch.path().join("out");
        fs::create_dir(&out)?;
        let rootfs = out.join("rootfs.ext4");
        crate::disk::to_raw(path, format, &rootfs)?;
        let variant =
            crate::disk::variant_of(&rootfs).map_err(|e| e.context(format!("{name} is not a slicer disk")))?;
        let img = Image {
            name: name.clone(),
            variant,
            kernel: kernel.kernel.clone(),
            vmlinux: kernel.vmlinux.clone(),
            rootfs: self.oci_dir(&id).join("rootfs.ext4"),
            kernel_release: kernel.kernel_release.clone(),
            key: id.clone(),
            reference: Some(name.clone()),
            digest: None,
        };
        let json = serde_json::to_vec_pretty(&img).json_context(|| "encoding image.json")?;
        fs::write(out.join("image.json"), json)?;
        self.publish_stored(&id, &out)?;
        self.set_ref(&name, &id)?;
        Ok(self.complete(img, &name, &kernel))
    }

    /// A private (0700) scratch directory `tmp/<what>-<pid>-<n>`, removed when dropped. Those
    /// of processes that are gone (a killed pull or import) are swept first.
    pub(crate) fn scratch(&self, what: &str) -> Result<Scratch> {
        use std::os::unix::fs::DirBuilderExt;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = self.tmp_dir();
        fs::create_dir_all(&tmp)?;
        if let Ok(dir) = std::fs::read_dir(&tmp) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
                if pid.is_some_and(|p| !Path::new("/proc").join(p.to_string()).exists()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = tmp.join(format!("{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .io_context(|| format!("creating {}", p.display()))?;
        Ok(Scratch(p))
    }

    /// Removes a pulled image's reference, and its files when no other reference names them.
    /// Whether a VM still uses it is the caller's to check first (see [`Image::rootfs`]).
    pub fn remove(&self, reference: &str) -> Result<Image> {
        let img = self.pulled(reference)?;
        let canonical = img.name.clone();
        let id = self
            .refs()
            .into_iter()
            .find(|r| r.reference == canonical)
            .map(|r| r.id)
            .ok_or_else(|| Error::NotInStore {
                image: canonical.clone(),
                reference: None,
            })?;
        fs::remove_file(self.ref_path(&canonical))?;
        if !self.refs().iter().any(|r| r.id == id) {
            let dir = self.oci_dir(&id);
            // Rename first: a half-removed directory is never taken for an image.
            let doomed = self.tmp_dir().join(format!("remove-{}-{id}", std::process::id()));
            fs::create_dir_all(self.tmp_dir())?;
            std::fs::rename(&dir, &doomed).io_context(|| format!("removing {}", dir.display()))?;
            fs::remove_dir_all(&doomed)?;
            let _ = std::fs::remove_dir(self.tmp_dir());
        }
        Ok(img)
    }

    /// Looks up an image by name: ours (`min`, `systemd`) or a pulled OCI reference.
    pub fn get(&self, name: &str) -> Result<Image> {
        if !is_builtin(name) {
            return self.pulled(name);
        }
        self.builtin(name)
    }

    fn builtin(&self, name: &str) -> Result<Image> {
        let path = self.manifest(name);
        let raw = std::fs::read(&path).map_err(|source| Error::NotBuilt {
            name: name.to_string(),
            manifest: path.clone(),
            source,
        })?;
        let img: Image = serde_json::from_slice(&raw).json_context(|| format!("parsing {}", path.display()))?;
        for p in [&img.kernel, &img.rootfs] {
            if !p.exists() {
                return Err(Error::Incomplete {
                    name: name.to_string(),
                    missing: p.clone(),
                });
            }
        }
        Ok(img)
    }

    /// All images: ours, then pulled ones by reference.
    pub fn list(&self) -> Result<Vec<Image>> {
        let mut out = Vec::new();
        for name in ["min", "systemd"] {
            if let Ok(img) = self.builtin(name) {
                out.push(img);
            }
        }
        let mut pulled: Vec<Image> = self
            .refs()
            .iter()
            .filter_map(|r| self.pulled(&r.reference).ok())
            .collect();
        pulled.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(pulled);
        Ok(out)
    }

    pub(crate) fn publish(&self, img: &Image) -> Result<()> {
        let path = self.manifest(&img.name);
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(img).json_context(|| format!("encoding {}", path.display()))?;
        std::fs::write(&tmp, json).io_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).io_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// A private scratch directory, removed when dropped.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent); // only when empty
        }
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
    let mut f = std::fs::File::open(path).io_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).io_context(|| format!("reading {}", path.display()))?;
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
