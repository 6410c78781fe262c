//! Secrets kept on the host (`<data_dir>/secrets`, 0700; values and metadata 0600) and copied
//! into guests as `/run/slicer/secrets/<name>` (a tmpfs) with their mode and owner. Values are
//! never returned by the API.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::manager::Error;

/// What the secret store can fail with: the host's files, each with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}")]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// `context` above an I/O error.
fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// Largest secret value.
pub const MAX_SECRET: usize = 512 * 1024;
/// Where secrets appear in a guest.
pub const GUEST_DIR: &str = "/run/slicer/secrets";

/// What `GET /secrets` shows of a secret.
pub use slicer_api::SecretInfo;

pub struct SecretStore {
    dir: PathBuf,
}

/// Names become file names here and in guests: letters, digits, `.`, `_`, `-`; not starting
/// with `.`; at most 128 bytes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

pub fn parse_permissions(p: &str) -> Result<String, Error> {
    u32::from_str_radix(p.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .map(|m| format!("{m:04o}"))
        .ok_or_else(|| Error::invalid(format!("permissions: {p:?} is not octal such as 0600")))
}

/// Writes `data` to `path` atomically with mode 0600. The temporary file's name starts with a
/// dot, which no secret's name may (so writing `k` never touches a secret named `k.tmp`).
fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{:08x}.tmp", rand::random::<u32>()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(format!("writing {}", tmp.display())))?;
    let written = f
        .write_all(data)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(format!("writing {}", path.display()))(e));
    }
    Ok(())
}

impl SecretStore {
    pub fn open(data_dir: &Path) -> Result<SecretStore> {
        let dir = data_dir.join("secrets");
        for d in [dir.clone(), dir.join("values"), dir.join("meta")] {
            std::fs::create_dir_all(&d).map_err(io(format!("creating {}", d.display())))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
                .map_err(io(format!("making {} private", d.display())))?;
        }
        Ok(SecretStore { dir })
    }

    fn value_path(&self, name: &str) -> PathBuf {
        self.dir.join("values").join(name)
    }

    fn meta_path(&self, name: &str) -> PathBuf {
        self.dir.join("meta").join(format!("{name}.json"))
    }

    pub fn info(&self, name: &str) -> Result<Option<SecretInfo>> {
        match std::fs::read(self.meta_path(name)) {
            Ok(raw) => Ok(Some(serde_json::from_slice(&raw).map_err(|source| {
                StoreError::Json {
                    context: format!("parsing secret {name}'s metadata"),
                    source,
                }
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(format!("reading secret {name}'s metadata"))(e)),
        }
    }

    pub fn list(&self) -> Result<Vec<SecretInfo>> {
        let mut out = Vec::new();
        let listing = || io("listing the secrets");
        for e in std::fs::read_dir(self.dir.join("meta")).map_err(listing())? {
            let name = e.map_err(listing())?.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(".json") {
                if let Some(i) = self.info(n)? {
                    out.push(i);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn value(&self, name: &str) -> Result<Vec<u8>> {
        std::fs::read(self.value_path(name)).map_err(io(format!("reading secret {name}")))
    }

    /// Writes a secret's value and metadata (create or update).
    pub fn put(&self, info: &SecretInfo, value: &[u8]) -> Result<()> {
        write_private(&self.value_path(&info.name), value)?;
        let meta = serde_json::to_vec(info).map_err(|source| StoreError::Json {
            context: format!("encoding secret {}'s metadata", info.name),
            source,
        })?;
        write_private(&self.meta_path(&info.name), &meta)
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.meta_path(name)).map_err(io(format!("removing secret {name}")))?;
        std::fs::remove_file(self.value_path(name)).map_err(io(format!("removing secret {name}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_keeps_values_private() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::open(d.path()).unwrap();
        let info = SecretInfo {
            name: "api-key".into(),
            size: 3,
            permissions: "0640".into(),
            uid: 1000,
            gid: 1000,
            modified_at: "2026-01-01T00:00:00Z".into(),
        };
        s.put(&info, b"abc").unwrap();
        assert_eq!(s.list().unwrap(), vec![info.clone()]);
        assert_eq!(s.value("api-key").unwrap(), b"abc");
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(d.path().join("secrets")), 0o700);
        assert_eq!(mode(d.path().join("secrets/values/api-key")), 0o600);
        assert_eq!(mode(d.path().join("secrets/meta/api-key.json")), 0o600);
        s.remove("api-key").unwrap();
        assert!(s.list().unwrap().is_empty());
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(129)] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(parse_permissions("600").unwrap(), "0600");
        assert!(parse_permissions("0999").is_err());
    }

    #[test]
    fn writing_a_secret_leaves_one_named_like_its_temporary_file_alone() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::open(d.path()).unwrap();
        let info = |name: &str| SecretInfo {
            name: name.into(),
            size: 1,
            permissions: "0600".into(),
            uid: 0,
            gid: 0,
            modified_at: "2026-01-01T00:00:00Z".into(),
        };
        s.put(&info("k.tmp"), b"A").unwrap();
        s.put(&info("k"), b"B").unwrap();
        s.put(&info("k"), b"C").unwrap();
        assert_eq!(s.value("k.tmp").unwrap(), b"A");
        assert_eq!(s.value("k").unwrap(), b"C");
        let names = |sub: &str| {
            let mut v: Vec<String> = std::fs::read_dir(d.path().join("secrets").join(sub))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names("values"), ["k", "k.tmp"]);
        assert_eq!(names("meta"), ["k.json", "k.tmp.json"]);
    }
}
