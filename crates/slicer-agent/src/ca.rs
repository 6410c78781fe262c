//! The host group's CA certificates in the guest's trust stores (`PUT /v1/ca`, and the
//! `slicer-agent ca list|show|remove|wipe` commands).
//!
//! Each certificate is kept as `/usr/local/share/ca-certificates/slicer/<short>.crt` (`short`:
//! the first 12 hex digits of the SHA-256 of its DER; Debian's and Alpine's
//! `update-ca-certificates` pick these files up again on their own runs), appended to every
//! system bundle the image has, and all of them together are `/runner/ca.crt` (for
//! `NODE_EXTRA_CA_CERTS`). Logins (`/etc/environment`, `/etc/profile.d/slicer-ca.sh`) and the
//! agent's own execs get `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE` and `NODE_EXTRA_CA_CERTS`.
//!
//! What the host sends is PEM text only, never a path: every file written is one of the fixed
//! paths below, through a temporary file and a rename, refusing a link at the final component.
//! Installing is idempotent and append-only (a certificate already present is not added again,
//! and none is removed but by `ca remove`/`ca wipe`).

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use slicer_agent_proto::{CaCert, CaInstalled, MAX_CA_BUNDLE, MAX_CA_CERTS};

use crate::server::{body_bytes, json, ApiError, Body};

/// Where the certificates are kept, one file each.
const CA_DIR: &str = "usr/local/share/ca-certificates/slicer";
/// All of them in one file (Slicer's path for `NODE_EXTRA_CA_CERTS`).
pub const RUNNER_CA: &str = "/runner/ca.crt";
/// System bundles, in order of preference: Debian/Ubuntu/Alpine, Fedora/RHEL, SUSE.
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
];
/// Where Fedora/RHEL's `update-ca-trust` and SUSE's `update-ca-certificates` take local CAs
/// from: a copy there (`slicer-<short>.crt`, when the directory exists) keeps a CA in the
/// bundle those tools regenerate. (Debian's and Alpine's read the files in [`CA_DIR`].)
const ANCHOR_DIRS: [&str; 2] = ["/etc/pki/ca-trust/source/anchors", "/etc/pki/trust/anchors"];
const ENVIRONMENT: &str = "/etc/environment";
const PROFILE: &str = "/etc/profile.d/slicer-ca.sh";
const ENV_KEYS: [&str; 3] = ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"];
/// Largest system bundle or environment file read (Debian's bundle is about 200 KiB).
const MAX_SYSTEM_FILE: u64 = 32 << 20;

/// One change at a time: installs, removals and wipes rewrite the same files.
static LOCK: Mutex<()> = Mutex::new(());

/// The filesystem the paths above are in: `/` in a guest, a temporary directory in tests.
#[derive(Debug, Clone)]
pub struct Root(PathBuf);

impl Root {
    pub fn system() -> Root {
        Root(PathBuf::from("/"))
    }

    #[cfg(test)]
    pub fn at(p: &Path) -> Root {
        Root(p.to_path_buf())
    }

    /// `abs` (a path of the guest) under this root.
    fn at_path(&self, abs: &str) -> PathBuf {
        self.0.join(abs.trim_start_matches('/'))
    }
}

/// A parsed CA certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct Cert {
    pub der: Vec<u8>,
    pub info: CaCert,
}

impl Cert {
    pub fn from_der(der: Vec<u8>) -> Result<Cert, String> {
        let (rest, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        if !rest.is_empty() {
            return Err("trailing bytes after the certificate".into());
        }
        let info = CaCert {
            short: short_of(&der),
            subject: cert.subject().to_string(),
            not_after: cert.validity().not_after.to_datetime().date().to_string(),
        };
        Ok(Cert { der, info })
    }

    pub fn pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.der);
        let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
        out
    }
}

/// The first 12 hex digits of the SHA-256 of `der`.
pub fn short_of(der: &[u8]) -> String {
    Sha256::digest(der)[..6].iter().map(|b| format!("{b:02x}")).collect()
}

fn valid_short(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A PEM block of a text: its label, where it is (bytes, its lines included) and its decoded
/// contents (`None` when it is not base64 or has no end line).
///
/// Hand-written rather than a PEM crate's parser: removing a certificate from a system bundle
/// needs each block's place in the text, so that everything else stays byte for byte.
struct Block {
    label: String,
    range: std::ops::Range<usize>,
    der: Option<Vec<u8>>,
}

fn pem_blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<(String, usize, String)> = None;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let start = pos;
        pos += line.len();
        let t = line.trim();
        match &mut open {
            None => {
                if let Some(label) = t.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")) {
                    open = Some((label.to_string(), start, String::new()));
                }
            }
            Some((label, begin, body)) => {
                if t.strip_prefix("-----END ").and_then(|l| l.strip_suffix("-----")) == Some(label.as_str()) {
                    let der = base64::engine::general_purpose::STANDARD.decode(body.as_bytes()).ok();
                    out.push(Block {
                        label: std::mem::take(label),
                        range: *begin..pos,
                        der,
                    });
                    open = None;
                } else if t.starts_with("-----") {
                    // A header of another block inside this one: this one is broken.
                    out.push(Block {
                        label: std::mem::take(label),
                        range: *begin..start,
                        der: None,
                    });
                    open = None;
                } else {
                    body.push_str(t);
                }
            }
        }
    }
    if let Some((label, begin, _)) = open {
        out.push(Block {
            label,
            range: begin..text.len(),
            der: None,
        });
    }
    out
}

/// The certificates of a bundle the host sent: CERTIFICATE blocks only (other text between
/// them is ignored), each an X.509 certificate, at most [`MAX_CA_CERTS`]; duplicates once.
pub fn parse_bundle(bytes: &[u8]) -> Result<Vec<Cert>, String> {
    if bytes.len() > MAX_CA_BUNDLE {
        return Err(format!("the bundle is larger than {MAX_CA_BUNDLE} bytes"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "the bundle is not UTF-8 PEM text".to_string())?;
    let blocks = pem_blocks(text);
    if blocks.is_empty() {
        return Err("no CERTIFICATE block in the bundle".into());
    }
    if blocks.len() > MAX_CA_CERTS {
        return Err(format!("more than {MAX_CA_CERTS} certificates in the bundle"));
    }
    let mut out: Vec<Cert> = Vec::new();
    for (i, b) in blocks.into_iter().enumerate() {
        if b.label != "CERTIFICATE" {
            return Err(format!(
                "block {}: a {:?} block; only CERTIFICATE blocks are accepted",
                i + 1,
                b.label.chars().take(40).collect::<String>()
            ));
        }
        let der = b
            .der
            .ok_or_else(|| format!("block {}: not terminated or not base64", i + 1))?;
        let cert = Cert::from_der(der).map_err(|e| format!("block {}: {e}", i + 1))?;
        if !out.iter().any(|c| c.info.short == cert.info.short) {
            out.push(cert);
        }
    }
    Ok(out)
}

fn io_err(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn other(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

/// Reads a regular file of at most `limit` bytes without following a link; `None` when there
/// is none.
fn read_file(path: &Path, limit: u64) -> std::io::Result<Option<(Vec<u8>, std::fs::Metadata)>> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(other(format!("{}: is a link; refusing it", path.display())))
        }
        Err(e) => return Err(io_err(path, e)),
    };
    let md = f.metadata().map_err(|e| io_err(path, e))?;
    if !md.is_file() {
        return Err(other(format!("{}: not a regular file", path.display())));
    }
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).map_err(|e| io_err(path, e))?;
    if buf.len() as u64 > limit {
        return Err(other(format!("{}: larger than {limit} bytes", path.display())));
    }
    Ok(Some((buf, md)))
}

/// Replaces `path` with `bytes` (mode `mode`, owner `owner`) through a temporary file beside it
/// and a rename; a link at `path` is refused.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_symlink() {
            return Err(other(format!("{}: is a link; refusing to replace it", path.display())));
        }
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(other(format!("{}: no parent directory", path.display())));
    };
    let tmp = dir.join(format!(".{}.slicer-tmp{}", name.to_string_lossy(), std::process::id()));
    // A leftover of an interrupted write (remove_file does not follow a link).
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| io_err(path, e))
}

/// Makes directory `dir` (and its parents) when missing; refuses a link or a non-directory.
fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| io_err(dir, e))?;
    let md = std::fs::symlink_metadata(dir).map_err(|e| io_err(dir, e))?;
    if !md.is_dir() {
        return Err(other(format!("{}: not a directory", dir.display())));
    }
    Ok(())
}

/// A lexically normal path: `.` and `..` resolved without touching the filesystem.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// A system bundle of the image: `(its name, the regular file it is)`. A link (Fedora's
/// ca-bundle.crt points into /etc/pki/ca-trust) is followed once, to a regular file under
/// /etc; anything else is not used.
fn system_bundle(root: &Root, name: &str) -> Option<PathBuf> {
    let path = root.at_path(name);
    let md = std::fs::symlink_metadata(&path).ok()?;
    if md.is_file() {
        return Some(path);
    }
    if !md.file_type().is_symlink() {
        return None;
    }
    let target = std::fs::read_link(&path).ok()?;
    let target = match target.strip_prefix("/") {
        Ok(rel) => root.0.join(rel),
        Err(_) => path.parent()?.join(target),
    };
    let target = normalize(&target);
    let etc = normalize(&root.at_path("/etc"));
    let md = std::fs::symlink_metadata(&target).ok()?;
    (target.starts_with(&etc) && md.is_file()).then_some(target)
}

/// The anchor directories the image has (directories, not links).
fn anchor_dirs(root: &Root) -> Vec<PathBuf> {
    ANCHOR_DIRS
        .iter()
        .map(|d| root.at_path(d))
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()))
        .collect()
}

/// The system bundles the image has: `(name, file)`.
fn system_bundles(root: &Root) -> Vec<(&'static str, PathBuf)> {
    SYSTEM_BUNDLES
        .iter()
        .filter_map(|n| system_bundle(root, n).map(|p| (*n, p)))
        .collect()
}

/// The environment logins and execs get while slicer's CAs are installed: empty when none is.
pub fn env_vars(root: &Root) -> Vec<(String, String)> {
    match std::fs::symlink_metadata(root.at_path(RUNNER_CA)) {
        Ok(md) if md.is_file() => {}
        _ => return Vec::new(),
    }
    let bundle = SYSTEM_BUNDLES
        .iter()
        .find(|n| system_bundle(root, n).is_some())
        .copied()
        .unwrap_or(RUNNER_CA);
    vec![
        ("SSL_CERT_FILE".into(), bundle.into()),
        ("REQUESTS_CA_BUNDLE".into(), bundle.into()),
        ("NODE_EXTRA_CA_CERTS".into(), RUNNER_CA.into()),
    ]
}

/// Every certificate slicer installed, sorted by `short`.
pub fn list(root: &Root) -> std::io::Result<Vec<Cert>> {
    let dir = root.at_path(CA_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir, e)),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(short) = name.strip_suffix(".crt").filter(|s| valid_short(s)) else {
            continue;
        };
        // Not a regular file (a link, say): not ours, skipped; writing its name is refused.
        let Ok(Some((bytes, _))) = read_file(&e.path(), MAX_CA_BUNDLE as u64) else {
            continue;
        };
        // A file edited into something else is skipped, not fatal.
        if let Ok(certs) = parse_bundle(&bytes) {
            out.extend(certs.into_iter().filter(|c| c.info.short == short).take(1));
        }
        if out.len() > 4 * MAX_CA_CERTS {
            break;
        }
    }
    out.sort_by(|a, b| a.info.short.cmp(&b.info.short));
    Ok(out)
}

/// The bundle's text with `certs` added after what is there (those it holds already not).
fn appended(text: &str, certs: &[Cert]) -> Option<String> {
    let present: Vec<String> = pem_blocks(text)
        .into_iter()
        .filter(|b| b.label == "CERTIFICATE")
        .filter_map(|b| b.der.map(|d| short_of(&d)))
        .collect();
    let missing: Vec<&Cert> = certs.iter().filter(|c| !present.contains(&c.info.short)).collect();
    if missing.is_empty() {
        return None;
    }
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    for c in missing {
        out.push_str(&c.pem());
    }
    Some(out)
}

/// The bundle's text without the certificates whose short is in `shorts`.
fn without(text: &str, shorts: &[String]) -> Option<String> {
    let drop: Vec<std::ops::Range<usize>> = pem_blocks(text)
        .into_iter()
        .filter(|b| b.label == "CERTIFICATE")
        .filter(|b| b.der.as_ref().is_some_and(|d| shorts.contains(&short_of(d))))
        .map(|b| b.range)
        .collect();
    if drop.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for r in drop {
        out.push_str(&text[at..r.start]);
        at = r.end;
    }
    out.push_str(&text[at..]);
    Some(out)
}

/// Rewrites a file whose text `change` transforms (keeping its mode and owner); `None` from
/// `change` leaves it alone.
fn rewrite(path: &Path, change: impl FnOnce(&str) -> Option<String>) -> std::io::Result<bool> {
    let Some((bytes, md)) = read_file(path, MAX_SYSTEM_FILE)? else {
        return Ok(false);
    };
    let text = String::from_utf8_lossy(&bytes);
    match change(&text) {
        Some(new) => {
            write_atomic(path, new.as_bytes(), md.mode() & 0o7777, Some((md.uid(), md.gid())))?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Writes `path` (0644, root's) unless it holds `text` already.
fn write_if_changed(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some((bytes, _)) = read_file(path, MAX_SYSTEM_FILE)? {
        if bytes == text.as_bytes() {
            return Ok(());
        }
    }
    write_atomic(path, text.as_bytes(), 0o644, None)
}

/// `/runner/ca.crt`, `/etc/environment` and the profile script after the set of installed
/// certificates changed: all of them, or nothing when none is left.
fn refresh_derived(root: &Root) -> std::io::Result<()> {
    let all = list(root)?;
    let runner = root.at_path(RUNNER_CA);
    let profile = root.at_path(PROFILE);
    let env_path = root.at_path(ENVIRONMENT);
    let drop_ours = |text: &str| -> String {
        text.lines()
            .filter(|l| !ENV_KEYS.iter().any(|k| l.trim_start().starts_with(&format!("{k}="))))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    if all.is_empty() {
        for p in [&runner, &profile] {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(p, e)),
            }
        }
        rewrite(&env_path, |t| Some(drop_ours(t)).filter(|n| n != t))?;
        return Ok(());
    }
    ensure_dir(&root.at_path("/runner"))?;
    let text: String = all.iter().map(Cert::pem).collect();
    write_if_changed(&runner, &text)?;
    let vars = env_vars(root);
    let mut script =
        String::from("# Written by slicer-agent: trust the host group's CAs (see `slicer-agent ca list`).\n");
    for (k, v) in &vars {
        script.push_str(&format!("export {k}={v}\n"));
    }
    ensure_dir(&root.at_path("/etc/profile.d"))?;
    write_if_changed(&profile, &script)?;
    let mut ours = String::new();
    for (k, v) in &vars {
        ours.push_str(&format!("{k}={v}\n"));
    }
    match read_file(&env_path, MAX_SYSTEM_FILE)? {
        Some(_) => {
            rewrite(&env_path, |t| Some(drop_ours(t) + &ours).filter(|n| n != t))?;
        }
        None => write_atomic(&env_path, ours.as_bytes(), 0o644, None)?,
    }
    Ok(())
}

/// Installs `certs`: their files, the system bundles, `/runner/ca.crt` and the environment.
pub fn install(root: &Root, certs: &[Cert]) -> std::io::Result<CaInstalled> {
    let _one = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = root.at_path(CA_DIR);
    ensure_dir(&dir)?;
    let mut added = Vec::new();
    for c in certs {
        let path = dir.join(format!("{}.crt", c.info.short));
        let pem = c.pem();
        let same = read_file(&path, MAX_CA_BUNDLE as u64)?.is_some_and(|(b, _)| b == pem.as_bytes());
        if !same {
            write_atomic(&path, pem.as_bytes(), 0o644, None)?;
            added.push(c.info.short.clone());
        }
    }
    for dir in anchor_dirs(root) {
        for c in certs {
            write_if_changed(&dir.join(format!("slicer-{}.crt", c.info.short)), &c.pem())?;
        }
    }
    let bundles = system_bundles(root);
    for (_, file) in &bundles {
        rewrite(file, |t| appended(t, certs))?;
    }
    refresh_derived(root)?;
    Ok(CaInstalled {
        certs: list(root)?.into_iter().map(|c| c.info).collect(),
        added,
        bundles: bundles.into_iter().map(|(n, _)| n.to_string()).collect(),
    })
}

/// Removes the certificates `shorts` from everywhere slicer put them.
fn remove_shorts(root: &Root, shorts: &[String]) -> std::io::Result<()> {
    for (_, file) in system_bundles(root) {
        rewrite(&file, |t| without(t, shorts))?;
    }
    let dir = root.at_path(CA_DIR);
    let mut files: Vec<PathBuf> = shorts.iter().map(|s| dir.join(format!("{s}.crt"))).collect();
    for a in anchor_dirs(root) {
        files.extend(shorts.iter().map(|s| a.join(format!("slicer-{s}.crt"))));
    }
    for p in files {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&p, e)),
        }
    }
    refresh_derived(root)
}

/// `ca remove SHORT`.
pub fn remove(root: &Root, short: &str) -> std::io::Result<()> {
    let _one = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if !valid_short(short) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{short:?} is not a short id (12 hex digits, see `ca list`)"),
        ));
    }
    if !list(root)?.iter().any(|c| c.info.short == short) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no CA {short} is installed (see `ca list`)"),
        ));
    }
    remove_shorts(root, &[short.to_string()])
}

/// `ca wipe`: every CA slicer installed (the image's own roots stay).
pub fn wipe(root: &Root) -> std::io::Result<usize> {
    let _one = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let shorts: Vec<String> = list(root)?.into_iter().map(|c| c.info.short).collect();
    remove_shorts(root, &shorts)?;
    Ok(shorts.len())
}

/// `PUT /v1/ca`.
pub async fn put(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body = body_bytes(req, MAX_CA_BUNDLE).await?;
    let certs = parse_bundle(&body).map_err(ApiError::bad_request)?;
    let done = tokio::task::spawn_blocking(move || install(&Root::system(), &certs))
        .await
        .map_err(|e| ApiError::internal(format!("worker failed: {e}")))?
        .map_err(|e| ApiError::io("installing the CA certificates", &e))?;
    Ok(json(StatusCode::OK, &done))
}

/// `GET /v1/ca`.
pub async fn get() -> Result<Response<Body>, ApiError> {
    let root = Root::system();
    let done = tokio::task::spawn_blocking(move || {
        let certs = list(&root)?;
        Ok::<_, std::io::Error>(CaInstalled {
            certs: certs.into_iter().map(|c| c.info).collect(),
            added: Vec::new(),
            bundles: system_bundles(&root).into_iter().map(|(n, _)| n.to_string()).collect(),
        })
    })
    .await
    .map_err(|e| ApiError::internal(format!("worker failed: {e}")))?
    .map_err(|e| ApiError::io("listing the CA certificates", &e))?;
    Ok(json(StatusCode::OK, &done))
}

const CLI_USAGE: &str = "usage: slicer-agent ca list [--json] | ca show SHORT | ca remove SHORT | ca wipe";

/// `slicer-agent ca …` in a guest; returns the exit code.
pub fn cli(args: &[String]) -> i32 {
    let root = Root::system();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result: Result<(), String> = match args.as_slice() {
        ["list"] | ["list", "--json"] => list(&root).map_err(|e| e.to_string()).map(|certs| {
            if args.len() == 2 {
                let infos: Vec<&CaCert> = certs.iter().map(|c| &c.info).collect();
                println!("{}", serde_json::to_string_pretty(&infos).unwrap_or_default());
            } else {
                println!("{:<14}{:<56}NOT_AFTER", "SHORT", "SUBJECT");
                for c in &certs {
                    println!("{:<14}{:<56}{}", c.info.short, c.info.subject, c.info.not_after);
                }
            }
        }),
        ["show", short] => list(&root).map_err(|e| e.to_string()).and_then(|certs| {
            match certs.into_iter().find(|c| c.info.short == *short) {
                Some(c) => {
                    println!("short:     {}", c.info.short);
                    println!("subject:   {}", c.info.subject);
                    println!("not_after: {}", c.info.not_after);
                    print!("{}", c.pem());
                    Ok(())
                }
                None => Err(format!("no CA {short} is installed (see `ca list`)")),
            }
        }),
        ["remove", short] => remove(&root, short).map_err(|e| e.to_string()).map(|()| {
            println!("removed {short}");
        }),
        ["wipe"] => wipe(&root).map_err(|e| e.to_string()).map(|n| {
            println!("removed {n} CA certificate(s)");
        }),
        _ => {
            eprintln!("{CLI_USAGE}");
            return 2;
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("slicer-agent ca: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests;
