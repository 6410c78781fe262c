use super::*;

/// A new self-signed CA certificate named `cn`.
fn test_cert(cn: &str) -> Cert {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    Cert::from_der(cert.der().to_vec()).unwrap()
}

const OS_ROOT: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

fn debian_root() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("etc/ssl/certs")).unwrap();
    let b = t.path().join("etc/ssl/certs/ca-certificates.crt");
    std::fs::write(&b, OS_ROOT).unwrap();
    std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::write(t.path().join("etc/environment"), "PATH=/bin\nSSL_CERT_FILE=/old\n").unwrap();
    t
}

fn read(t: &tempfile::TempDir, p: &str) -> String {
    std::fs::read_to_string(t.path().join(p.trim_start_matches('/'))).unwrap()
}

#[test]
fn parse_accepts_certificates_only() {
    let a = test_cert("a");
    let b = test_cert("b");
    let two = format!("# comment\n{}\n{}{}", a.pem(), b.pem(), a.pem());
    let certs = parse_bundle(two.as_bytes()).unwrap();
    assert_eq!(certs.len(), 2, "a duplicate is installed once");
    assert_eq!(certs[0].info.subject, "CN=a");
    assert_eq!(certs[0].info.short.len(), 12);
    for bad in [
        String::new(),
        "just text".to_string(),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_string(),
        "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n".to_string(),
        OS_ROOT.to_string(),
        a.pem().replace("-----END CERTIFICATE-----\n", ""),
    ] {
        assert!(parse_bundle(bad.as_bytes()).is_err(), "{bad:?}");
    }
    assert!(parse_bundle(&[0xff, 0xfe]).is_err());
    assert!(parse_bundle(&vec![b'a'; MAX_CA_BUNDLE + 1]).is_err());
    let many: String = (0..=MAX_CA_CERTS).map(|_| a.pem()).collect();
    assert!(parse_bundle(many.as_bytes()).is_err());
}

#[test]
fn install_is_idempotent_and_append_only() {
    let t = debian_root();
    let root = Root::at(t.path());
    let a = test_cert("a");
    let done = install(&root, std::slice::from_ref(&a)).unwrap();
    assert_eq!(done.added, vec![a.info.short.clone()]);
    assert_eq!(done.bundles, vec!["/etc/ssl/certs/ca-certificates.crt"]);
    let bundle = read(&t, "/etc/ssl/certs/ca-certificates.crt");
    assert!(bundle.starts_with(OS_ROOT) && bundle.ends_with(&a.pem()), "{bundle}");
    let md = std::fs::metadata(t.path().join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o640, "the bundle keeps its mode");
    assert_eq!(read(&t, &format!("/{CA_DIR}/{}.crt", a.info.short)), a.pem());
    assert_eq!(read(&t, RUNNER_CA), a.pem());
    let env = read(&t, ENVIRONMENT);
    assert!(env.starts_with("PATH=/bin\n"), "{env}");
    assert!(!env.contains("/old"), "{env}");
    assert!(env.contains("SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt\n"));
    assert!(env.contains("NODE_EXTRA_CA_CERTS=/runner/ca.crt\n"));
    assert!(read(&t, PROFILE).contains("export REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt\n"));
    assert_eq!(env_vars(&root).len(), 3);

    // The same bundle again changes nothing.
    let snapshot = |t: &tempfile::TempDir| {
        ["/etc/ssl/certs/ca-certificates.crt", RUNNER_CA, ENVIRONMENT, PROFILE].map(|p| read(t, p))
    };
    let before = snapshot(&t);
    let again = install(&root, std::slice::from_ref(&a)).unwrap();
    assert!(again.added.is_empty());
    assert_eq!(snapshot(&t), before);

    // Another CA is added beside the first; the first stays (append-only).
    let b = test_cert("b");
    let done = install(&root, std::slice::from_ref(&b)).unwrap();
    assert_eq!(done.certs.len(), 2);
    let bundle = read(&t, "/etc/ssl/certs/ca-certificates.crt");
    assert!(bundle.contains(&a.pem()) && bundle.contains(&b.pem()));
    assert_eq!(read(&t, RUNNER_CA).matches("BEGIN CERTIFICATE").count(), 2);

    // remove takes one out of everything; wipe the rest, leaving the OS roots.
    remove(&root, &a.info.short).unwrap();
    let bundle = read(&t, "/etc/ssl/certs/ca-certificates.crt");
    assert!(!bundle.contains(&a.pem()) && bundle.contains(&b.pem()));
    assert!(remove(&root, &a.info.short).is_err());
    assert!(remove(&root, "../../etc/x").is_err());
    assert_eq!(wipe(&root).unwrap(), 1);
    assert_eq!(read(&t, "/etc/ssl/certs/ca-certificates.crt"), OS_ROOT);
    assert!(!t.path().join("runner/ca.crt").exists());
    assert!(!t.path().join(PROFILE.trim_start_matches('/')).exists());
    assert_eq!(read(&t, ENVIRONMENT), "PATH=/bin\n");
    assert!(env_vars(&root).is_empty());
}

#[test]
fn fedora_link_is_followed_within_etc_and_no_bundle_still_installs() {
    let t = tempfile::tempdir().unwrap();
    let root = Root::at(t.path());
    let real = t.path().join("etc/pki/ca-trust/extracted/pem");
    std::fs::create_dir_all(&real).unwrap();
    std::fs::write(real.join("tls-ca-bundle.pem"), OS_ROOT).unwrap();
    std::fs::create_dir_all(t.path().join("etc/pki/tls/certs")).unwrap();
    std::os::unix::fs::symlink(
        "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
        t.path().join("etc/pki/tls/certs/ca-bundle.crt"),
    )
    .unwrap();
    // SUSE's name is a link out of /etc: not used.
    std::fs::write(t.path().join("outside.pem"), OS_ROOT).unwrap();
    std::fs::create_dir_all(t.path().join("etc/ssl")).unwrap();
    std::os::unix::fs::symlink("../../outside.pem", t.path().join("etc/ssl/ca-bundle.pem")).unwrap();
    let anchors = t.path().join("etc/pki/ca-trust/source/anchors");
    std::fs::create_dir_all(&anchors).unwrap();
    let a = test_cert("a");
    let done = install(&root, std::slice::from_ref(&a)).unwrap();
    assert_eq!(done.bundles, vec!["/etc/pki/tls/certs/ca-bundle.crt"]);
    let anchor = anchors.join(format!("slicer-{}.crt", a.info.short));
    assert_eq!(
        std::fs::read_to_string(&anchor).unwrap(),
        a.pem(),
        "update-ca-trust keeps it"
    );
    assert!(std::fs::read_to_string(real.join("tls-ca-bundle.pem"))
        .unwrap()
        .contains(&a.pem()));
    assert!(
        std::fs::symlink_metadata(t.path().join("etc/pki/tls/certs/ca-bundle.crt"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_to_string(t.path().join("outside.pem")).unwrap(), OS_ROOT);
    assert!(read(&t, ENVIRONMENT).contains("SSL_CERT_FILE=/etc/pki/tls/certs/ca-bundle.crt"));
    remove(&root, &a.info.short).unwrap();
    assert!(!anchor.exists());
    assert_eq!(
        std::fs::read_to_string(real.join("tls-ca-bundle.pem")).unwrap(),
        OS_ROOT
    );

    // An image with no bundle at all: the files and /runner/ca.crt, which the env names.
    let bare = tempfile::tempdir().unwrap();
    let done = install(&Root::at(bare.path()), std::slice::from_ref(&a)).unwrap();
    assert!(done.bundles.is_empty());
    assert_eq!(read(&bare, RUNNER_CA), a.pem());
    assert!(read(&bare, ENVIRONMENT).contains("SSL_CERT_FILE=/runner/ca.crt"));
}

#[test]
fn links_at_written_paths_are_refused() {
    let t = debian_root();
    let root = Root::at(t.path());
    let victim = t.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    std::fs::create_dir_all(t.path().join("runner")).unwrap();
    std::os::unix::fs::symlink(&victim, t.path().join("runner/ca.crt")).unwrap();
    let a = test_cert("a");
    let err = install(&root, std::slice::from_ref(&a)).unwrap_err();
    assert!(err.to_string().contains("link"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    // A link where a certificate's file goes is refused too.
    std::fs::remove_file(t.path().join("runner/ca.crt")).unwrap();
    let b = test_cert("b");
    std::os::unix::fs::symlink(&victim, t.path().join(format!("{CA_DIR}/{}.crt", b.info.short))).unwrap();
    assert!(install(&root, std::slice::from_ref(&b)).is_err());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    // The slicer directory itself as a link is refused.
    let t2 = debian_root();
    std::fs::create_dir_all(t2.path().join("usr/local/share/ca-certificates")).unwrap();
    std::os::unix::fs::symlink(t2.path().join("etc"), t2.path().join(CA_DIR)).unwrap();
    assert!(install(&Root::at(t2.path()), &[a]).is_err());
}
