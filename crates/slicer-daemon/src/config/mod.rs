//! The YAML configuration (`slicer up ./x.yaml`), compatible with SlicerVM's schema.
//! Unknown keys and bad values are errors that name the field.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use slicer_api::NetworkMode;

mod capacity;
mod group;
mod host;
mod render;
mod schema;
mod settings;
mod validate;

pub use capacity::*;
use group::group_settings;
pub use host::*;
pub use render::*;
pub use schema::*;
pub use settings::*;
pub use validate::*;

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
config:
  host_groups:
  - name: sandbox
    count: 0
    vcpu: 2
    ram_gb: 4
    storage: image
    storage_size: 25G
    network:
      mode: "isolated"
      drop: ["192.168.1.0/24"]
      allow: ["0.0.0.0/0"]
  image: "ghcr.io/openfaasltd/slicer-systemd:6.1.90-x86_64-latest"
  hypervisor: qemu
  graceful_shutdown: false
  api:
    port: 8080
    bind_address: "127.0.0.1"
    auth:
      enabled: true
"#;

    #[test]
    fn seed_style_config_parses() {
        let s = File::parse(SEED).unwrap().settings(Path::new(".")).unwrap();
        let g = &s.groups[0];
        assert_eq!(
            (g.name.as_str(), g.count, g.cpus, g.ram_bytes),
            ("sandbox", 0, 2, 4 << 30)
        );
        assert_eq!(g.drop, vec!["192.168.1.0/24"]);
        assert_eq!(g.image, "ghcr.io/openfaasltd/slicer-systemd:6.1.90-x86_64-latest");
        assert_eq!(slicer_fallback(&g.image), Some("systemd"));
        assert_eq!(s.listen, Listen::Tcp("127.0.0.1:8080".into()));
        assert!(s.auth && !s.graceful_shutdown);
    }

    #[test]
    fn errors_name_the_field() {
        let err = |yaml: &str| {
            format!(
                "{:#}",
                File::parse(yaml).and_then(|f| f.settings(Path::new("."))).unwrap_err()
            )
        };
        let e = err("config:\n  host_groups:\n  - name: a\n    cpu: 2\n");
        assert!(e.contains("host_groups[0]") && e.contains("unknown field `cpu`"), "{e}");
        let e = err("config:\n  host_groups:\n  - name: a\n    vcpu: lots\n");
        assert!(e.contains("host_groups[0].vcpu"), "{e}");
        let e = err("config:\n  host_groups:\n  - name: a\n    storage_size: big\n");
        assert!(e.contains("storage_size"), "{e}");
        let e = err("config:\n  kernel_file: /boot/vmlinux\n  host_groups:\n  - name: a\n");
        assert!(e.contains("config.kernel_file: not supported"), "{e}");
        let e = err("config:\n  kernel_image: ghcr.io/x/k:1\n  host_groups:\n  - name: a\n");
        assert!(e.contains("config.kernel_image: not supported"), "{e}");
        let e = err("config:\n  hypervisor: firecracker\n  host_groups:\n  - name: a\n");
        assert!(e.contains("config.hypervisor") && e.contains("hypervisor: qemu"), "{e}");
        let e = err("config:\n  host_groups:\n  - name: a\n    network: {mode: isolated, drop: [\"300.1.1.0/24\"]}\n");
        assert!(e.contains("network.drop"), "{e}");
        let e = err("config:\n  host_groups:\n  - name: Bad\n");
        assert!(e.contains("host_groups[0].name"), "{e}");
        let e = err("config:\n  host_groups:\n  - name: a\n    network: {mode: isolated, range: 169.254.100.0/22}\n  - name: b\n    network: {mode: isolated, range: 169.254.101.0/24}\n");
        assert!(e.contains("overlap"), "{e}");
        let e = err("config:\n  host_groups:\n  - name: a\n    network: {mode: isolated, range: 169.254.100.0/33}\n");
        assert!(e.contains("network.range"), "{e}");
        let e =
            err("config:\n  host_groups:\n  - name: a\n    network: {mode: bridge, bridge: a-very-long-bridge-name}\n");
        assert!(e.contains("network.bridge"), "{e}");
        let e =
            err("config:\n  host_groups:\n  - name: a\n    network: {mode: bridge, tap_prefix: waytoolongprefix}\n");
        assert!(e.contains("network.tap_prefix"), "{e}");
        let e = err("config:\n  capacity: {vms: 0}\n  host_groups:\n  - name: a\n");
        assert!(e.contains("config.capacity.vms"), "{e}");
        let e = err("config:\n  capacity: {vcpus: 0}\n  host_groups:\n  - name: a\n");
        assert!(e.contains("config.capacity.vcpus"), "{e}");
        let e = err("config:\n  capacity: {ram_bytes: 1000}\n  host_groups:\n  - name: a\n");
        assert!(e.contains("config.capacity.ram_bytes"), "{e}");
        let e = err("config:\n  capacity: {ram_bytes: lots}\n  host_groups:\n  - name: a\n");
        assert!(e.contains("capacity.ram_bytes"), "{e}");
        let e = err("config:\n  capacity: {memory_bytes: 1}\n  host_groups:\n  - name: a\n");
        assert!(
            e.contains("capacity") && e.contains("unknown field `memory_bytes`"),
            "{e}"
        );
        let e = err("config:\n  capacity: {memory: 1}\n  host_groups:\n  - name: a\n");
        assert!(
            e.contains("config.capacity.memory") && e.contains("`measured` or `nominal`"),
            "{e}"
        );
        let e = err("config:\n  capacity: {vms: 2}\n  host_groups:\n  - name: a\n    count: 3\n");
        assert!(
            e.contains("config.capacity.vms") && e.contains("count VMs are 3"),
            "{e}"
        );
        let e = err(
            "config:\n  capacity: {ram_bytes: 2147483648}\n  host_groups:\n  - name: a\n    count: 2\n    ram_gb: 1\n",
        );
        assert!(e.contains("config.capacity.ram_bytes") && e.contains("2.5 GiB"), "{e}");
        let e = err("config:\n  capacity: {vcpus: 3}\n  host_groups:\n  - name: a\n    count: 2\n    vcpu: 2\n");
        assert!(e.contains("config.capacity.vcpus"), "{e}");
        let e = err("config:\n  capacity: {ram_bytes: 1073741824, template_memory_bytes: 2147483648}\n  host_groups:\n  - name: a\n    count: 0\n");
        assert!(
            e.contains("config.capacity.template_memory_bytes") && e.contains("more than the RAM budget of 1 GiB"),
            "{e}"
        );
        let e = err("config:\n  capacity: {template_shapes: 65}\n  host_groups:\n  - name: a\n    count: 0\n");
        assert!(
            e.contains("config.capacity.template_shapes") && e.contains("at most 64"),
            "{e}"
        );
        let e = err("config:\n  capacity: {template_shapes: -1}\n  host_groups:\n  - name: a\n    count: 0\n");
        assert!(e.contains("template_shapes"), "{e}");
    }

    #[test]
    fn template_bounds_default_from_the_budget() {
        const GIB: u64 = 1 << 30;
        let b = |c: Option<&CapacityConfig>, ram| TemplateBounds::resolve(c, ram).unwrap();
        assert_eq!(
            b(None, 4 * GIB),
            TemplateBounds {
                memory_bytes: GIB,
                shapes: 8
            }
        );
        assert_eq!(b(None, 20 * GIB).memory_bytes, 2 * GIB);
        let given = CapacityConfig {
            template_memory_bytes: Some(0),
            template_shapes: Some(0),
            ..Default::default()
        };
        assert_eq!(
            b(Some(&given), GIB),
            TemplateBounds {
                memory_bytes: 0,
                shapes: 0
            }
        );
        let s = File::parse("config:\n  capacity: {ram_bytes: 4294967296, template_memory_bytes: 629145600, template_shapes: 3}\n  host_groups:\n  - name: a\n    count: 0\n")
            .unwrap()
            .settings(Path::new("."))
            .unwrap();
        assert_eq!(
            s.templates,
            TemplateBounds {
                memory_bytes: 600 << 20,
                shapes: 3
            }
        );
    }

    #[test]
    fn capacity_defaults_come_from_the_host() {
        const GIB: u64 = 1 << 30;
        // The reserve is 10% of the host's memory, at least 1 GiB.
        let c = Capacity::resolve(None, 32 * GIB, 4).unwrap();
        assert_eq!(c.ram_bytes, 32 * GIB - 32 * GIB / 10);
        assert_eq!((c.vms, c.vcpus), (DEFAULT_CAPACITY_VMS, 64));
        assert_eq!(Capacity::resolve(None, 4 * GIB, 1).unwrap().ram_bytes, 3 * GIB);
        assert!(Capacity::resolve(None, GIB, 1).is_err());
        let given = CapacityConfig {
            ram_bytes: Some(2 * GIB),
            vms: Some(2),
            vcpus: Some(3),
            memory: None,
            template_memory_bytes: None,
            template_shapes: None,
        };
        assert_eq!(
            Capacity::resolve(Some(&given), 0, 8).unwrap(),
            Capacity {
                ram_bytes: 2 * GIB,
                vms: 2,
                vcpus: 3
            }
        );
        let s = File::parse("config:\n  capacity: {vms: 2}\n  host_groups:\n  - name: a\n    count: 0\n")
            .unwrap()
            .settings(Path::new("."))
            .unwrap();
        assert_eq!(s.capacity.vms, 2);
        assert_eq!(s.memory_accounting, MemoryAccounting::Measured);
        let err = File::parse("config:\n  capacity: {memory: guessed}\n  host_groups:\n  - name: a\n    count: 0\n")
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("memory") && err.contains("nominal"), "{err}");
        assert!(s.capacity.ram_bytes > 0 && s.capacity.vcpus >= DEFAULT_VCPUS_PER_CORE);
        assert!(host_memory_bytes().unwrap() > s.capacity.ram_bytes);
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(20 * GIB), "20 GiB");
        assert_eq!(human_bytes(GIB + GIB / 2), "1.5 GiB");
    }

    #[test]
    fn new_renders_loadable_yaml_with_allow_all_for_drops() {
        let o = NewOptions {
            name: "sandbox".into(),
            count: 0,
            vcpu: 2,
            ram_gb: 4,
            storage: "image".into(),
            storage_size: "25G".into(),
            image: "min".into(),
            net: "isolated".into(),
            drop: vec!["192.168.1.0/24".into()],
            api_bind: "127.0.0.1".into(),
            api_port: 8080,
            graceful_shutdown: false,
            hypervisor: "qemu".into(),
            ..Default::default()
        };
        let y = render_new(&o).unwrap();
        let s = File::parse(&y).unwrap().settings(Path::new(".")).unwrap();
        assert_eq!(s.groups[0].allow, vec!["0.0.0.0/0"]);
        assert_eq!(s.groups[0].network_mode, NetworkMode::Isolated);
    }

    #[test]
    fn sizes_and_rules() {
        assert_eq!(parse_size("25G"), Some(25 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("x"), None);
        assert!(valid_rule("192.168.1.0/24") && valid_rule("10.0.0.1:3128") && valid_rule("0.0.0.0/0"));
        assert!(!valid_rule("10.0.0.1:0") && !valid_rule("10.0.0.0/33") && !valid_rule("nope"));
    }

    #[test]
    fn images_are_ours_references_or_disk_files_and_insecure_registries_are_named() {
        let y = |image: &str, insecure: &str| {
            format!("config:\n  image: {image}\n{insecure}  host_groups:\n  - name: a\n    count: 0\n")
        };
        let settings = |t: String| File::parse(&t).and_then(|f| f.settings(Path::new(".")));
        let s = settings(y("127.0.0.1:5000/team/ci:v1", "  insecure_registry: true\n")).unwrap();
        assert_eq!(s.groups[0].image, "127.0.0.1:5000/team/ci:v1");
        assert_eq!(s.insecure_registries, vec!["127.0.0.1:5000".to_string()]);
        let s = settings(y("alpine", "  insecure_registry: [\"10.0.0.5:5000\"]\n")).unwrap();
        assert_eq!(s.insecure_registries, vec!["10.0.0.5:5000".to_string()]);
        let s = settings(y("/srv/disks/builder.qcow2", "")).unwrap();
        assert_eq!(s.groups[0].image, "/srv/disks/builder.qcow2");
        assert!(s.insecure_registries.is_empty());
        let e = format!("{:#}", settings(y("\"Not A Ref\"", "")).unwrap_err());
        assert!(
            e.contains("config.image") && e.contains("not an image reference"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            settings(y("min", "  insecure_registry: [\"a/b\"]\n")).unwrap_err()
        );
        assert!(e.contains("config.insecure_registry"), "{e}");
        assert_eq!(
            slicer_fallback("ghcr.io/openfaasltd/slicer-systemd-min:6.1"),
            Some("min")
        );
        assert_eq!(slicer_fallback("docker.io/library/debian:12"), None);
    }

    /// A config of one group `g` with `ca_yaml` as its `ca:`.
    fn with_ca(ca_yaml: &str) -> String {
        format!("config:\n  host_groups:\n  - name: g\n    count: 0\n    network: {{mode: none}}\n    ca: {ca_yaml}\n  capacity: {{ram_bytes: 8589934592}}\n")
    }

    #[test]
    fn ca_files_are_checked_and_their_certificates_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = slicer_proxy::ca::GroupCa::init(&dir.path().join("a"), "a", false).unwrap();
        let other = slicer_proxy::ca::GroupCa::init(&dir.path().join("b"), "b", false).unwrap();
        let two = dir.path().join("two.pem");
        std::fs::write(&two, format!("{}{}", ca.cert_pem(), other.cert_pem())).unwrap();
        let one = dir.path().join("one.pem");
        std::fs::write(&one, ca.cert_pem()).unwrap();
        // Relative to the working directory given, or absolute; a certificate is kept once.
        let certs = ca_file_certs(
            "config.host_groups[0]",
            &["two.pem".into(), one.to_string_lossy().into_owned()],
            dir.path(),
        )
        .unwrap();
        assert_eq!(certs, vec![ca.cert_der().to_vec(), other.cert_der().to_vec()]);

        let err = |name: &str| {
            let files = vec!["one.pem".to_string(), name.to_string()];
            format!(
                "{:#}",
                ca_file_certs("config.host_groups[0]", &files, dir.path()).unwrap_err()
            )
        };
        std::fs::write(
            dir.path().join("key.pem"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = err("key.pem");
        assert!(
            e.starts_with("config.host_groups[0].ca.files[1]: ") && e.contains("no CERTIFICATE block"),
            "{e}"
        );
        std::fs::write(dir.path().join("text.pem"), "hello").unwrap();
        assert!(err("text.pem").contains("no CERTIFICATE block"));
        std::fs::write(
            dir.path().join("junk.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = err("junk.pem");
        assert!(e.contains("ca.files[1]") && e.contains("not a valid X.509"), "{e}");
        let e = err("missing.pem");
        assert!(e.contains("ca.files[1]") && e.contains("No such file"), "{e}");
        std::os::unix::fs::symlink(&one, dir.path().join("link.pem")).unwrap();
        let e = err("link.pem");
        assert!(e.contains("ca.files[1]") && e.contains("symbolic link"), "{e}");
        let big = std::fs::File::create(dir.path().join("big.pem")).unwrap();
        big.set_len(slicer_proxy::ca::MAX_PEM_BYTES + 1).unwrap();
        let e = err("big.pem");
        assert!(e.contains("ca.files[1]") && e.contains("larger than"), "{e}");
        let e = err(dir.path().to_str().unwrap());
        assert!(e.contains("ca.files[1]"), "{e}");
        let fifo = std::ffi::CString::new(dir.path().join("fifo.pem").to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = err("fifo.pem");
        assert!(e.contains("ca.files[1]") && e.contains("not a regular file"), "{e}");
        assert!(err("").contains("ca.files[1]: an empty path"));
    }

    #[test]
    fn ca_config_parses_generate_and_rejects_unknown_keys() {
        let s = File::parse(&with_ca("{generate: true}"))
            .unwrap()
            .settings(Path::new("."))
            .unwrap();
        assert!(s.groups[0].ca_generate && s.groups[0].ca_certs.is_empty());
        assert_eq!(s.groups[0].ca_bundle(), None);
        let e = format!("{:#}", File::parse(&with_ca("{generate: true, path: x}")).unwrap_err());
        assert!(
            e.contains("host_groups[0].ca") && e.contains("unknown field `path`"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            File::parse(&with_ca("{files: [/nonexistent/slicer-ca.pem]}"))
                .and_then(|f| f.settings(Path::new(".")))
                .unwrap_err()
        );
        assert!(
            e.contains("config.host_groups[0].ca.files[0]: /nonexistent/slicer-ca.pem"),
            "{e}"
        );

        // The generated CA is made in <cwd>/.slicer/ca/<group>/, comes first, and is kept.
        let dir = tempfile::tempdir().unwrap();
        let extra = slicer_proxy::ca::GroupCa::init(&dir.path().join("x"), "x", false).unwrap();
        let pem = dir.path().join("extra.pem");
        std::fs::write(&pem, extra.cert_pem()).unwrap();
        let yaml = with_ca(&format!("{{generate: true, files: [{}]}}", pem.display()));
        let mut s = File::parse(&yaml).unwrap().settings(Path::new(".")).unwrap();
        s.load_group_cas(dir.path()).unwrap();
        let made = slicer_proxy::ca::GroupCa::load(&slicer_proxy::ca::ca_dir(dir.path(), "g")).unwrap();
        assert_eq!(
            s.groups[0].ca_certs,
            vec![made.cert_der().to_vec(), extra.cert_der().to_vec()]
        );
        let bundle = s.groups[0].ca_bundle().unwrap();
        assert_eq!(slicer_proxy::ca::pem_certs(&bundle), s.groups[0].ca_certs);
        use std::os::unix::fs::PermissionsExt;
        let key = slicer_proxy::ca::ca_dir(dir.path(), "g").join("ca.key");
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let mut again = File::parse(&yaml).unwrap().settings(Path::new(".")).unwrap();
        again.load_group_cas(dir.path()).unwrap();
        assert_eq!(again.groups[0].ca_certs, s.groups[0].ca_certs, "a restart keeps the CA");
    }

    #[test]
    fn slicer_new_with_ca_generates() {
        let text = render_new(&NewOptions {
            name: "demo".into(),
            count: 0,
            vcpu: 1,
            ram_gb: 1,
            storage: "image".into(),
            storage_size: "5G".into(),
            image: "min".into(),
            net: "isolated".into(),
            api_bind: "127.0.0.1".into(),
            api_port: 8080,
            hypervisor: "qemu".into(),
            ca: true,
            ..Default::default()
        })
        .unwrap();
        assert!(text.contains("ca:\n      generate: true\n"), "{text}");
    }
}
