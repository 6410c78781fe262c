//! The TLS of the proxy's own port: a leaf for the proxy's address, signed by the group CA,
//! kept on disk while it is still usable.

use super::*;

/// The TLS configuration of the proxy's own port: `proxy.cert`/`proxy.key` in `base` when
/// they are the CA's, name `ip` and have a week left; otherwise a new leaf is minted and written.
pub fn proxy_tls(base: &Path, ca: &GroupCa, ip: IpAddr) -> Result<rustls::ServerConfig> {
    let cert_path = base.join("proxy.cert");
    let key_path = base.join("proxy.key");
    if let (Ok(cert), Ok(key)) = (ca::read_pem(&cert_path), ca::read_pem(&key_path)) {
        if let Some(der) = ca::pem_certs(&cert).into_iter().next() {
            if leaf_usable(&der, ca, ip) {
                if let Ok(cfg) = tls_config(der, &key, ca) {
                    return Ok(cfg);
                }
            }
        }
    }
    let leaf = ca.issue(&[ip.to_string()])?;
    ca::write_new(&key_path, leaf.key_pem.as_bytes(), 0o600, true)?;
    ca::write_new(&cert_path, leaf.cert_pem.as_bytes(), 0o644, true)?;
    tls_config(leaf.cert_der, &leaf.key_pem, ca)
}

fn leaf_usable(der: &[u8], ca: &GroupCa, ip: IpAddr) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let Ok((_, ca_cert)) = x509_parser::parse_x509_certificate(ca.cert_der()) else {
        return false;
    };
    if cert.issuer().as_raw() != ca_cert.subject().as_raw() {
        return false;
    }
    if cert.validity().not_after.timestamp() - now() < 7 * 24 * 3600 {
        return false;
    }
    let names_ip = cert.subject_alternative_name().ok().flatten().is_some_and(|san| {
        san.value.general_names.iter().any(|n| match n {
            x509_parser::extensions::GeneralName::IPAddress(b) => match ip {
                IpAddr::V4(v4) => *b == v4.octets().as_slice(),
                IpAddr::V6(v6) => *b == v6.octets().as_slice(),
            },
            _ => false,
        })
    });
    // Made by this CA's key (not only one with its name: a re-made CA keeps the name): the
    // leaf's authority key identifier is the CA's subject key identifier.
    names_ip && key_id(&cert, true).is_some_and(|k| Some(k) == key_id(&ca_cert, false))
}

fn key_id<'a>(cert: &'a x509_parser::certificate::X509Certificate<'_>, authority: bool) -> Option<&'a [u8]> {
    use x509_parser::extensions::ParsedExtension;
    cert.extensions().iter().find_map(|e| match e.parsed_extension() {
        ParsedExtension::AuthorityKeyIdentifier(a) if authority => a.key_identifier.as_ref().map(|k| k.0),
        ParsedExtension::SubjectKeyIdentifier(k) if !authority => Some(k.0),
        _ => None,
    })
}

fn tls_config(leaf_der: Vec<u8>, key_pem: &str, ca: &GroupCa) -> Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| Error::Cert(format!("proxy.key: {e}")))?;
    let chain = vec![
        CertificateDer::from(leaf_der),
        CertificateDer::from(ca.cert_der().to_vec()),
    ];
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::ca::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Cert(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| Error::Cert(format!("proxy.cert/proxy.key: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}
