//! The API's bearer token: generated once, stored 0600 under `<data_dir>/auth/token`.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use subtle::ConstantTimeEq;

pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("auth").join("token")
}

/// Reads the token, creating it (64 hex digits of OS randomness) on first use.
pub fn load_or_create(data_dir: &Path) -> Result<String> {
    let path = token_path(data_dir);
    let dir = path.parent().context("token path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => {
            // Tighten a token file someone loosened.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            return Ok(t.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(token)
}

/// Constant-time comparison of a presented token with the expected one.
pub fn token_matches(expected: &str, given: &str) -> bool {
    expected.len() == given.len() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_created_once_with_mode_0600() {
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create(d.path()).unwrap();
        let b = load_or_create(d.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        let mode = std::fs::metadata(token_path(d.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(token_matches(&a, &b));
        assert!(!token_matches(&a, "x"));
        assert!(!token_matches(&a, &a[..63]));
    }
}
