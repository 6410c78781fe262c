//! The proxy state file and the privacy of the files and directories the daemon shares with proxies.

use super::*;

/// Makes the database file and its WAL companions 0600 if they are not (they hold secret
/// values). Symbolic links are left alone (SQLite itself opened the path).
pub(super) fn secure_db_file(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            if m.file_type().is_file() && m.mode() & 0o077 != 0 {
                if let Err(e) = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
                    tracing::warn!("making {} private (0600): {e}", p.display());
                }
            }
        }
    }
}

/// `dir` is a real directory (not a link) of ours that nobody else can write: what the root
/// daemon may create files in and connect to sockets of.
pub(super) fn private_dir(dir: &Path) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_dir() && m.uid() == me && m.mode() & 0o022 == 0)
}

/// Writes the state to `<data dir>/proxy/state.json`: 0600, `O_NOFOLLOW`, whole or not at all.
pub fn write_state_file(data_dir: &Path, state: &ProxyState) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let dir = control::proxy_dir(data_dir);
    if std::fs::symlink_metadata(&dir).is_err() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    anyhow::ensure!(
        private_dir(&dir),
        "{} is not a directory of the daemon's user that only it can write",
        dir.display()
    );
    let path = control::state_file(data_dir);
    let tmp = dir.join(".state.json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let json = serde_json::to_vec(state)?;
    f.write_all(&json)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(())
}
