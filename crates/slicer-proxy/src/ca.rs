//! A host group's certificate authority: `./.slicer/ca/<group>/ca.{crt,key}` (Slicer's layout),
//! made by `slicer ca init`, by a daemon whose group says `ca: {generate: true}`, and loaded by
//! `slicer proxy up` to sign the leaves it presents to guests. The key never leaves the host:
//! its directory is root's 0700 and the key file 0600, both written and read without following
//! links.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::error::{Error, Result};

/// How long a generated CA is valid (Slicer: three years).
pub const CA_VALIDITY: Duration = Duration::days(3 * 365);
/// A CA this close to its end is replaced by `load_or_create` (Slicer: seven days).
pub const RENEW_BEFORE: Duration = Duration::days(7);
/// Leaves the proxy mints live this long (clients see a fresh one after a restart).
pub const LEAF_VALIDITY: Duration = Duration::days(30);
/// Largest PEM file read from disk (a CA, a key, an extra bundle).
pub const MAX_PEM_BYTES: u64 = 4 << 20;

/// `<base>/.slicer/ca/<group>`.
pub fn ca_dir(base: &Path, group: &str) -> PathBuf {
    base.join(".slicer").join("ca").join(group)
}

/// A loaded CA: its certificate and what signs with its key.
pub struct GroupCa {
    cert_pem: String,
    cert_der: Vec<u8>,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for GroupCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCa")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A leaf certificate and its private key, both DER.
pub struct Leaf {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl GroupCa {
    /// Makes a new CA for `group` and writes it to `dir` (replacing what is there only with `force`).
    pub fn init(dir: &Path, group: &str, force: bool) -> Result<GroupCa> {
        let key = KeyPair::generate().map_err(|e| Error::Cert(format!("generating the CA key: {e}")))?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, group);
        dn.push(DnType::OrganizationalUnitName, "Slicer CA");
        dn.push(DnType::OrganizationName, "slicer");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(|e| Error::Cert(format!("signing the CA certificate: {e}")))?;
        make_private_dir(dir)?;
        write_new(&dir.join("ca.key"), key.serialize_pem().as_bytes(), 0o600, force)?;
        write_new(&dir.join("ca.crt"), cert.pem().as_bytes(), 0o644, force)?;
        Ok(GroupCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads the CA in `dir`.
    pub fn load(dir: &Path) -> Result<GroupCa> {
        let cert_pem = read_pem(&dir.join("ca.crt"))?;
        let key_pem = read_pem(&dir.join("ca.key"))?;
        let key =
            KeyPair::from_pem(&key_pem).map_err(|e| Error::Cert(format!("{}: {e}", dir.join("ca.key").display())))?;
        let der = pem_certs(&cert_pem)
            .into_iter()
            .next()
            .ok_or_else(|| Error::Cert(format!("{}: no CERTIFICATE block", dir.join("ca.crt").display())))?;
        let not_after = not_after(&der)
            .ok_or_else(|| Error::Cert(format!("{}: unreadable validity", dir.join("ca.crt").display())))?;
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key)
            .map_err(|e| Error::Cert(format!("{}: {e}", dir.join("ca.crt").display())))?;
        Ok(GroupCa {
            cert_pem,
            cert_der: der,
            not_after,
            issuer,
        })
    }

    /// Loads the CA in `dir`, or makes one when there is none or it ends within [`RENEW_BEFORE`].
    pub fn load_or_create(dir: &Path, group: &str) -> Result<GroupCa> {
        match GroupCa::load(dir) {
            Ok(ca) if ca.not_after - OffsetDateTime::now_utc() > RENEW_BEFORE => Ok(ca),
            Ok(_) => GroupCa::init(dir, group, true),
            Err(Error::Io { ref source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                GroupCa::init(dir, group, false)
            }
            Err(e) => Err(e),
        }
    }

    /// The CA certificate, PEM (what guests install).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Mints a server leaf for `names` (DNS names or IP literals) signed by this CA.
    pub fn issue(&self, names: &[String]) -> Result<Leaf> {
        let key = KeyPair::generate().map_err(|e| Error::Cert(format!("generating a leaf key: {e}")))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => crate::rules::normalize_host(n)
                    .map_err(|e| Error::Cert(format!("leaf name: {e}")))?
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e| Error::Cert(format!("leaf name {n:?}: {e}"))),
            })
            .collect::<Result<_>>()?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map(String::as_str).unwrap_or("slicer-proxy"),
        );
        params.distinguished_name = dn;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = (now + LEAF_VALIDITY).min(self.not_after);
        params.serial_number = Some(random_serial());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| Error::Cert(format!("signing a leaf for {names:?}: {e}")))?;
        Ok(Leaf {
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The TLS crypto provider every proxy connection uses: *ring* (rustls deprecates its ring
/// provider for lacking post-quantum key exchange; aws-lc-rs would add a cmake/clang build to a
/// fresh machine's setup, so until the proxy needs hybrid key exchange, ring it is).
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

fn random_serial() -> rcgen::SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    rcgen::SerialNumber::from_slice(&b)
}

/// Every CERTIFICATE block of a PEM text, DER.
pub fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(|c| c.ok())
        .map(|c| c.to_vec())
        .collect()
}

fn not_after(der: &[u8]) -> Option<OffsetDateTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).ok()
}

/// Reads a PEM file of at most [`MAX_PEM_BYTES`] without following a link.
pub fn read_pem(path: &Path) -> Result<String> {
    use std::io::Read;
    // O_NONBLOCK: a FIFO in the file's place must not hang the reader (it is refused below).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    if !file.metadata().map_err(|e| Error::io(path, e))?.is_file() {
        return Err(Error::Cert(format!("{}: not a regular file", path.display())));
    }
    let mut text = String::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    if text.len() as u64 > MAX_PEM_BYTES {
        return Err(Error::Cert(format!(
            "{}: larger than {MAX_PEM_BYTES} bytes",
            path.display()
        )));
    }
    Ok(text)
}

/// Creates `dir` (and its parents) and makes it root's 0700; refuses a link.
pub fn make_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::Cert(format!("{} is not a directory", dir.display())));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(dir, e))
}

/// Writes `bytes` to `path` with `mode` through a temporary file and a rename; without `replace`
/// an existing file is an error.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32, replace: bool) -> Result<()> {
    if !replace && std::fs::symlink_metadata(path).is_ok() {
        return Err(Error::Exists(path.to_path_buf()));
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_load_issue() {
        let dir = tempfile::tempdir().unwrap();
        let d = ca_dir(dir.path(), "sbox");
        let ca = GroupCa::init(&d, "sbox", false).unwrap();
        assert!(matches!(GroupCa::init(&d, "sbox", false), Err(Error::Exists(_))));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(d.join("ca.key")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        let again = GroupCa::load_or_create(&d, "sbox").unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        let leaf = again
            .issue(&["api.example.com".into(), "192.168.222.1".into()])
            .unwrap();
        assert!(!leaf.cert_der.is_empty());
        assert!(again.issue(&["bad name\n".into()]).is_err());
    }
}
