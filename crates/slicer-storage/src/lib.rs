//! Per-VM disks. The base image stays read-only and shared; each VM writes to its own qcow2
//! overlay (about 17 ms to create here, no reflink or device-mapper needed).

use std::path::{Path, PathBuf};

mod error;

pub use error::{Error, Result};

/// The format of an image file: `qcow2` by its magic, else `raw`.
pub fn format_of(path: &Path) -> Result<&'static str> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let n = f
        .read(&mut magic)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    Ok(if n == 4 && &magic == b"QFI\xfb" { "qcow2" } else { "raw" })
}

/// The virtual size (bytes) of a qcow2 file, read from its header (big-endian at offset 24,
/// after the magic and version): no process needed on a VM's hot path.
pub fn virtual_size(path: &Path) -> Result<u64> {
    use std::io::Read;
    let mut h = [0u8; 32];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut h))
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if &h[..4] != b"QFI\xfb" {
        return Err(Error::NotQcow2 {
            path: path.to_path_buf(),
        });
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&h[24..32]);
    Ok(u64::from_be_bytes(size))
}

/// The file beside a disk that lists its backing chain, nearest first, one absolute path a
/// line: `<disk>.chain`. Written by the daemon when it makes the overlay, in a directory only
/// root can write, and read instead of the qcow2 header's backing name, which the VM's QEMU
/// (owning the disk) can rewrite to any path.
pub fn chain_file(disk: &Path) -> PathBuf {
    let mut p = disk.as_os_str().to_owned();
    p.push(".chain");
    PathBuf::from(p)
}

/// Longest backing chain a disk may have (commits of commits; the daemon refuses far fewer).
pub const MAX_CHAIN: usize = 16;

/// The files behind `disk`, nearest first, as the daemon recorded them ([`chain_file`]). A
/// disk made before chains were recorded falls back to its qcow2 headers, accepting only
/// names that cannot have been planted: absolute plain paths (no `json:` or protocol
/// prefixes) of regular root-owned files that everyone may already read (the public images
/// and commits), never a link; the chain found is then recorded. A raw file has no chain.
pub fn trusted_chain(disk: &Path) -> Result<Vec<PathBuf>> {
    let listed = chain_file(disk);
    match read_nofollow(&listed, 64 << 10) {
        Ok(text) => {
            let text = String::from_utf8(text).map_err(|_| Error::UntrustedBacking {
                disk: disk.to_path_buf(),
                reason: format!("{} is not UTF-8", listed.display()),
            })?;
            let chain: Vec<PathBuf> = text.lines().filter(|l| !l.is_empty()).map(PathBuf::from).collect();
            if chain.len() > MAX_CHAIN || chain.iter().any(|p| !p.is_absolute()) {
                return Err(Error::UntrustedBacking {
                    disk: disk.to_path_buf(),
                    reason: format!("{} lists a relative path or too many files", listed.display()),
                });
            }
            Ok(chain)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if format_of(disk)? != "qcow2" {
                return Ok(Vec::new());
            }
            let chain = legacy_chain(disk)?;
            // Best effort: a read-only store keeps working from the headers.
            let _ = write_chain(disk, &chain);
            Ok(chain)
        }
        Err(e) => Err(Error::io(format!("reading {}", listed.display()), e)),
    }
}

/// Reads at most `max` bytes of a regular file, never through a symbolic link.
fn read_nofollow(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Records `chain` as `disk`'s backing chain ([`chain_file`]), replacing any earlier record
/// atomically.
pub fn write_chain(disk: &Path, chain: &[PathBuf]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let listed = chain_file(disk);
    let mut tmp = listed.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut text = String::new();
    for p in chain {
        let s = p
            .to_str()
            .filter(|s| !s.contains('\n'))
            .ok_or_else(|| Error::UntrustedBacking {
                disk: disk.to_path_buf(),
                reason: format!("backing path {} is not a plain UTF-8 line", p.display()),
            })?;
        text.push_str(s);
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, &listed).map_err(|e| Error::io(format!("writing {}", listed.display()), e))
}

/// Moves `from` (a disk) and its chain record to `to`.
pub fn rename_disk(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| Error::io(format!("moving {} to {}", from.display(), to.display()), e))?;
    match std::fs::rename(chain_file(from), chain_file(to)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("moving the chain record of {}", from.display()), e)),
    }
}

/// The chain read from the qcow2 headers of a disk made before chains were recorded (see
/// [`trusted_chain`] for what it accepts).
fn legacy_chain(disk: &Path) -> Result<Vec<PathBuf>> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    let untrusted = |reason: String| Error::UntrustedBacking {
        disk: disk.to_path_buf(),
        reason,
    };
    let mut chain = Vec::new();
    let mut cur = disk.to_path_buf();
    loop {
        let mut hdr = [0u8; 20];
        let mut f = std::fs::File::open(&cur).map_err(|e| Error::io(format!("opening {}", cur.display()), e))?;
        if f.read_exact(&mut hdr).is_err() || hdr[..4] != *b"QFI\xfb" {
            return Ok(chain);
        }
        let off = u64::from_be_bytes(hdr[8..16].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap_or_default()) as usize;
        if off == 0 || len == 0 {
            return Ok(chain);
        }
        if len > 1023 || chain.len() >= MAX_CHAIN {
            return Err(untrusted("backing name too long or chain too deep".into()));
        }
        let mut name = vec![0u8; len];
        f.seek(SeekFrom::Start(off))
            .and_then(|_| f.read_exact(&mut name))
            .map_err(|e| Error::io(format!("reading the backing name of {}", cur.display()), e))?;
        let name = String::from_utf8(name).map_err(|_| untrusted("backing name is not UTF-8".into()))?;
        if name.starts_with("json:") || name.split('/').next().is_some_and(|p| p.contains(':')) {
            return Err(untrusted(format!("backing name {name:?} is not a plain file name")));
        }
        let next = match Path::new(&name).is_absolute() {
            true => PathBuf::from(&name),
            false => cur.parent().unwrap_or(Path::new("/")).join(&name),
        };
        if next.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(untrusted(format!("backing name {name:?} has '..'")));
        }
        let m = std::fs::symlink_metadata(&next).map_err(|e| Error::io(format!("reading {}", next.display()), e))?;
        if !m.is_file() || m.uid() != 0 || m.mode() & 0o004 == 0 || m.mode() & 0o022 != 0 {
            return Err(untrusted(format!(
                "backing file {} is not a root-owned, world-readable regular file",
                next.display()
            )));
        }
        chain.push(next.clone());
        cur = next;
    }
}

/// Creates `overlay` as a qcow2 file backed by `base` (a raw base image, or a qcow2 such as a
/// template's disk or a commit) and records its chain ([`chain_file`]): `base`, then `base`'s
/// own. `size` (bytes) sets the virtual size the guest sees; `None` keeps the base's size.
/// `qemu-img` never opens `base` (`-u`): a base written by a VM's QEMU is parsed by no
/// process of root's.
pub async fn create_overlay(base: &Path, overlay: &Path, size: Option<u64>) -> Result<()> {
    if !base.is_file() {
        return Err(Error::MissingBase {
            path: base.to_path_buf(),
        });
    }
    let base = base
        .canonicalize()
        .map_err(|e| Error::io(format!("resolving {}", base.display()), e))?;
    let mut chain = vec![base.clone()];
    chain.extend(trusted_chain(&base)?);
    if chain.len() > MAX_CHAIN {
        return Err(Error::UntrustedBacking {
            disk: overlay.to_path_buf(),
            reason: format!("a chain of more than {MAX_CHAIN} files"),
        });
    }
    // The base is read once for its format and, if needed, its size: a qcow2's from its
    // header, a raw file's length.
    let format = format_of(&base)?;
    let size = match size {
        Some(s) => s,
        None if format == "qcow2" => virtual_size(&base)?,
        None => std::fs::metadata(&base)
            .map(|m| m.len())
            .map_err(|e| Error::io(format!("reading {}", base.display()), e))?,
    };
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-u", "-f", "qcow2", "-F", format, "-b"])
        .arg(&base)
        .arg(overlay)
        .arg(size.to_string());
    let out = cmd.output().await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::QemuImgNotFound
        } else {
            Error::QemuImgSpawn { source: e }
        }
    })?;
    if !out.status.success() {
        return Err(Error::QemuImg {
            overlay: overlay.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    if let Err(e) = write_chain(overlay, &chain) {
        let _ = std::fs::remove_file(overlay);
        return Err(e);
    }
    Ok(())
}

/// QEMU's block options for `disk` with the backing chain given explicitly (`chain`, nearest
/// first), as a `json:` file name: whatever backing name the disk's header holds is never
/// opened.
pub fn explicit_chain_json(disk: &Path, chain: &[PathBuf]) -> Result<String> {
    explicit_chain_json_with(disk, chain, |i| match i {
        None => format_of(disk),
        Some(i) => format_of(&chain[i]),
    })
}

/// [`explicit_chain_json`] with the format of the disk (`None`) and of each chain file
/// (`Some(index)`) given by `format`.
fn explicit_chain_json_with(
    disk: &Path,
    chain: &[PathBuf],
    format: impl Fn(Option<usize>) -> Result<&'static str>,
) -> Result<String> {
    let node = |path: &Path, fmt: &str| -> Result<String> {
        let name = path.to_str().ok_or_else(|| Error::UntrustedBacking {
            disk: disk.to_path_buf(),
            reason: format!("{} is not UTF-8", path.display()),
        })?;
        Ok(format!(
            r#""driver":"{fmt}","file":{{"driver":"file","filename":{}}}"#,
            json_string(name)
        ))
    };
    // Innermost first: each level wraps the one behind it.
    let mut inner: Option<String> = None;
    for (i, p) in chain.iter().enumerate().rev() {
        let fmt = format(Some(i))?;
        let backing = match (&inner, fmt == "qcow2") {
            (Some(b), _) => format!(r#","backing":{{{b}}}"#),
            (None, true) => r#","backing":null"#.to_string(),
            (None, false) => String::new(),
        };
        inner = Some(format!("{}{backing}", node(p, fmt)?));
    }
    let fmt = format(None)?;
    let top_backing = match (inner, fmt == "qcow2") {
        (Some(b), _) => format!(r#","backing":{{{b}}}"#),
        (None, true) => r#","backing":null"#.to_string(),
        (None, false) => String::new(),
    };
    Ok(format!("json:{{{}{top_backing}}}", node(disk, fmt)?))
}

/// A JSON string literal (paths here are UTF-8 without control characters, but quote fully).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Who runs a `qemu-img` that reads a tenant's disk: never root.
#[derive(Debug, Clone, Copy)]
pub struct Unprivileged {
    pub uid: u32,
    pub gid: u32,
}

/// Converts `disk` with its recorded chain into one standalone qcow2 file written to `out`
/// (an open, empty file), running `qemu-img` as `user` when given (with no supplementary
/// groups and `no_new_privs`): the disk was written by a VM, and a parser bug reached through
/// it must not run as root.
///
/// `qemu-img` reaches nothing by a path of ours: the disk, every file of its chain and `out`
/// are opened here and inherited, named `/proc/self/fd/N` in an explicit chain
/// ([`explicit_chain_json`]), so the header's own backing name is never opened and `user`
/// needs no way into the daemon's directories. The disk and `out` are given to `user`
/// (the chain files are public images, already world-readable).
pub async fn convert_standalone(disk: &Path, out: &std::fs::File, user: Option<Unprivileged>) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
            .map_err(|e| Error::io(format!("opening {}", p.display()), e))
    };
    let chain = trusted_chain(disk)?;
    let disk_file = open(disk)?;
    let chain_files = chain.iter().map(|p| open(p)).collect::<Result<Vec<_>>>()?;
    if let Some(u) = user {
        if u.uid == 0 || u.gid == 0 {
            return Err(Error::io(
                "running qemu-img on a VM's disk",
                std::io::Error::new(std::io::ErrorKind::PermissionDenied, "never as root"),
            ));
        }
        for f in [&disk_file, out] {
            std::os::unix::fs::fchown(f, Some(u.uid), Some(u.gid))
                .map_err(|e| Error::io(format!("giving {} to the converting user", disk.display()), e))?;
        }
    }
    let fd_path = |f: &std::fs::File| PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
    let fd_chain: Vec<PathBuf> = chain_files.iter().map(fd_path).collect();
    // Formats come from the files themselves, read here through the same descriptors.
    let source = explicit_chain_json_with(&fd_path(&disk_file), &fd_chain, |i| match i {
        None => format_of(disk),
        Some(i) => format_of(&chain[i]),
    })?;
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["convert", "-q", "-O", "qcow2"])
        .arg(&source)
        .arg(fd_path(out));
    let inherited: Vec<i32> = std::iter::once(&disk_file)
        .chain(&chain_files)
        .chain(std::iter::once(out))
        .map(AsRawFd::as_raw_fd)
        .collect();
    // SAFETY: fcntl/setgroups/setresgid/setresuid/prctl are async-signal-safe syscalls on
    // integers; the files stay open here until the child has exec'd.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &inherited {
                if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            match user {
                Some(u) => drop_to(u.uid, u.gid),
                None => Ok(()),
            }
        });
    }
    let output = cmd.output().await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::QemuImgNotFound
        } else {
            Error::QemuImgSpawn { source: e }
        }
    })?;
    drop((disk_file, chain_files));
    if !output.status.success() {
        return Err(Error::QemuImg {
            overlay: disk.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// In a forked child: no groups, `gid`, `uid` (all capabilities go), `no_new_privs`.
fn drop_to(uid: u32, gid: u32) -> std::io::Result<()> {
    let ok = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: async-signal-safe syscalls with plain integer arguments.
    unsafe {
        ok(libc::setgroups(0, std::ptr::null()))?;
        ok(libc::setresgid(gid, gid, gid))?;
        ok(libc::setresuid(uid, uid, uid))?;
        ok(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    #[ignore = "full tier: needs qemu-img (scripts/test.sh runs it)"]
    async fn virtual_size_is_read_from_the_header() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let ov = d.path().join("ov.qcow2");
        create_overlay(&base, &ov, Some(3 << 30)).await.unwrap();
        assert_eq!(virtual_size(&ov).unwrap(), 3 << 30);
        assert!(virtual_size(&base).is_err());
    }

    #[tokio::test]
    #[ignore = "full tier: needs qemu-img (scripts/test.sh runs it)"]
    async fn overlay_over_a_raw_base() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let ov = d.path().join("ov.qcow2");
        create_overlay(&base, &ov, Some(4 << 20)).await.unwrap();
        let head = std::fs::read(&ov).unwrap();
        assert_eq!(&head[..4], b"QFI\xfb");
        assert_eq!(format_of(&ov).unwrap(), "qcow2");
        assert_eq!(format_of(&base).unwrap(), "raw");
        let ov2 = d.path().join("ov2.qcow2");
        create_overlay(&ov, &ov2, None).await.unwrap();
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&ov2)
            .output()
            .unwrap();
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(info.contains(r#""backing-filename-format": "qcow2""#), "{info}");
        assert!(info.contains(r#""virtual-size": 4194304"#), "{info}");
        let err = create_overlay(&d.path().join("missing"), &ov, None).await.unwrap_err();
        assert!(err.to_string().contains("does not exist"));
        assert!(matches!(err, Error::MissingBase { .. }));
    }

    #[test]
    fn io_errors_keep_their_source() {
        let err = virtual_size(Path::new("/nonexistent/slicer-storage-test")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        let io = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(io.map(|e| e.kind()), Some(std::io::ErrorKind::NotFound));
        assert!(!format!("{err}").contains("No such file"));
        assert!(format!("{err:#}").contains("No such file"));
        let full = Error::io("writing x", std::io::Error::from_raw_os_error(28));
        assert!(full.is_no_space());
        assert!(format!("{full:#}").contains("No space left on device"));
    }

    /// Points `disk`'s qcow2 header at `name` as a VM's QEMU (owning the disk) could.
    fn tamper(disk: &Path, name: &str) {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
        f.seek(SeekFrom::Start(8192)).unwrap();
        f.write_all(name.as_bytes()).unwrap();
        f.seek(SeekFrom::Start(8)).unwrap();
        f.write_all(&8192u64.to_be_bytes()).unwrap();
        f.write_all(&(name.len() as u32).to_be_bytes()).unwrap();
    }

    #[tokio::test]
    #[ignore = "full tier: needs qemu-img and root (scripts/test.sh runs it)"]
    async fn the_recorded_chain_wins_over_a_rewritten_header() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let base = d.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o644)).unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, b"TOP-SECRET-TOKEN").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ov = d.path().join("ov.qcow2");
        create_overlay(&base, &ov, None).await.unwrap();
        assert_eq!(trusted_chain(&ov).unwrap(), vec![base.canonicalize().unwrap()]);
        let ov2 = d.path().join("ov2.qcow2");
        create_overlay(&ov, &ov2, None).await.unwrap();
        assert_eq!(trusted_chain(&ov2).unwrap().len(), 2);
        tamper(&ov, secret.to_str().unwrap());
        // The record is what counts; the header is not read.
        assert_eq!(trusted_chain(&ov).unwrap(), vec![base.canonicalize().unwrap()]);
        // Without a record, the header is taken only for a public file.
        std::fs::remove_file(chain_file(&ov)).unwrap();
        let e = trusted_chain(&ov).unwrap_err();
        assert!(matches!(e, Error::UntrustedBacking { .. }), "{e}");
        tamper(
            &ov,
            "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"/etc/shadow\"}}",
        );
        assert!(matches!(
            trusted_chain(&ov).unwrap_err(),
            Error::UntrustedBacking { .. }
        ));
        tamper(&ov, base.to_str().unwrap());
        assert_eq!(trusted_chain(&ov).unwrap(), vec![base.clone()]);
        assert!(chain_file(&ov).is_file(), "the chain found is recorded");
        // An export reads the recorded chain only, as an unprivileged user.
        tamper(&ov, secret.to_str().unwrap());
        let out_path = d.path().join("out.qcow2");
        let out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&out_path)
            .unwrap();
        convert_standalone(&ov, &out, Some(Unprivileged { uid: 65534, gid: 65534 }))
            .await
            .unwrap();
        let raw = d.path().join("out.raw");
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&out_path)
            .arg(&raw)
            .status()
            .unwrap();
        assert!(st.success());
        let data = std::fs::read(&raw).unwrap();
        assert_eq!(data, vec![7u8; 1 << 20], "the export is the base's data");
        assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(convert_standalone(&ov, &out, Some(Unprivileged { uid: 0, gid: 0 }))
            .await
            .is_err());
    }

    #[test]
    fn an_explicit_chain_names_every_file() {
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("b\"ase.raw");
        std::fs::write(&raw, b"raw").unwrap();
        let mut q = vec![0u8; 64];
        q[..4].copy_from_slice(b"QFI\xfb");
        let mid = d.path().join("mid.qcow2");
        std::fs::write(&mid, &q).unwrap();
        let top = d.path().join("top.qcow2");
        std::fs::write(&top, &q).unwrap();
        let j = explicit_chain_json(&top, &[mid.clone(), raw.clone()]).unwrap();
        assert!(j.starts_with("json:{\"driver\":\"qcow2\""), "{j}");
        assert_eq!(j.matches("\"backing\":").count(), 2, "{j}");
        assert!(j.contains("b\\\"ase.raw"), "{j}");
        assert!(j.ends_with("\"}}}}"), "{j}");
        // A qcow2 at the end of the chain gets no backing of its own.
        assert!(explicit_chain_json(&top, &[mid]).unwrap().contains("\"backing\":null"));
    }
}
