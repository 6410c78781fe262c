//! Host group CAs in real guests: `ca: {generate: true, files: [...]}` is installed before a VM
//! reports ready, on a cold boot (systemd image) and a template restore (min image); the
//! guest's curl trusts a server whose leaf the group's CA signed, and not one of another CA.

mod common;

use slicer_api::routes;
use std::path::{Path, PathBuf};

use common::{no_qemu_for, TestDaemon};
use http::Method;
use serde_json::json;
use slicer_api::client::empty;
use slicer_proxy::ca::{ca_dir, GroupCa};

/// Removes `<cwd>/.slicer/ca/<group>` (what the daemon made for `generate: true`) and the
/// parents it leaves empty, also when the test fails.
struct CaDirs(Vec<PathBuf>);

impl Drop for CaDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
            if let Some(ca) = d.parent() {
                let _ = std::fs::remove_dir(ca);
                if let Some(slicer) = ca.parent() {
                    let _ = std::fs::remove_dir(slicer);
                }
            }
        }
    }
}

/// The agent this tree builds, when it has been built (release, static).
fn worktree_agent() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/x86_64-unknown-linux-gnu/release/slicer-agent");
    p.is_file().then_some(p)
}

/// An image store whose `min` and `systemd` images carry this tree's agent: the shared store's
/// kernels and package trees, linked, and root filesystems built here (a copy and mkfs). Without
/// a built agent, the shared store.
fn store_with_this_agent() -> (Option<tempfile::TempDir>, PathBuf) {
    let Some(agent) = worktree_agent() else {
        return (None, common::images_dir());
    };
    let store = tempfile::Builder::new().prefix("slicer-ca-images-").tempdir().unwrap();
    let shared = common::images_dir();
    for d in ["kernels", "debootstrap"] {
        std::os::unix::fs::symlink(shared.join(d), store.path().join(d)).unwrap();
    }
    let images = slicer_image::ImageStore::at(store.path());
    for v in [slicer_image::Variant::Min, slicer_image::Variant::Systemd] {
        slicer_image::build_image(&images, &slicer_image::BuildOptions::new(v, agent.clone()))
            .unwrap_or_else(|e| panic!("building {v} with {}: {e}", agent.display()));
    }
    let path = store.path().to_path_buf();
    (Some(store), path)
}

async fn run(d: &TestDaemon, vm: &str, line: &str, uid: Option<u32>) -> (i64, String, String) {
    let (s, v) = d.sh_as(vm, line, uid).await;
    assert_eq!(s, 200, "{vm}: {line}: {v}");
    (
        v["exit_code"].as_i64().unwrap_or(-1),
        v["stdout"].as_str().unwrap_or_default().to_string(),
        v["stderr"].as_str().unwrap_or_default().to_string(),
    )
}

async fn stdout(d: &TestDaemon, vm: &str, line: &str) -> String {
    let (code, out, err) = run(d, vm, line, Some(0)).await;
    assert_eq!(code, 0, "{vm}: {line}: {out} {err}");
    out
}

/// Starts `openssl s_server` in the guest with `leaf` and asks the guest's curl for a page
/// (no -k): curl's exit code. The server is polled for until it accepts (curl exit 7), within
/// a deadline, then stopped.
async fn curl_exit(d: &TestDaemon, vm: &str, leaf: &slicer_proxy::ca::Leaf, port: u16) -> i64 {
    let line = format!(
        "set -u; printf '%s' '{crt}' > /tmp/leaf{port}.crt; printf '%s' '{key}' > /tmp/leaf{port}.key; \
         openssl s_server -quiet -accept {port} -cert /tmp/leaf{port}.crt -key /tmp/leaf{port}.key -www >/dev/null 2>&1 & pid=$!; \
         rc=7; i=0; while [ $rc -eq 7 ] && [ $i -lt 100 ]; do curl -sS -o /dev/null https://localhost:{port}/ 2>/tmp/curl{port}.err; rc=$?; i=$((i+1)); [ $rc -eq 7 ] && sleep 0.1; done; \
         kill $pid; cat /tmp/curl{port}.err >&2; exit $rc",
        crt = leaf.cert_pem,
        key = leaf.key_pem,
    );
    let (code, _, err) = run(d, vm, &line, Some(0)).await;
    eprintln!("{vm}: curl https://localhost:{port}/ -> {code} {err}");
    code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn group_cas_are_trusted_in_cold_and_restored_guests() {
    let cwd = std::env::current_dir().unwrap();
    let _dirs = CaDirs(vec![ca_dir(&cwd, "catsys"), ca_dir(&cwd, "catmin")]);
    let (_store, images) = tokio::task::spawn_blocking(store_with_this_agent).await.unwrap();

    let extra_dir = tempfile::tempdir().unwrap();
    let extra = GroupCa::init(&extra_dir.path().join("ca"), "extern-ca", false).unwrap();
    let extra_pem = extra_dir.path().join("extra.pem");
    std::fs::write(&extra_pem, extra.cert_pem()).unwrap();
    let groups = format!(
        "  - name: catmin\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    image: min\n    network: {{mode: none}}\n    ca:\n      generate: true\n      files: [{}]\n",
        extra_pem.display()
    );
    let mut d = TestDaemon::start_with_images(
        |port| {
            format!(
                "config:\n  host_groups:\n  - name: catsys\n    count: 0\n    vcpu: 1\n    ram_mb: 512\n    image: systemd\n    warm_start: false\n    network: {{mode: none}}\n    ca: {{generate: true}}\n{groups}  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
            )
        },
        &images,
    )
    .await;
    let sys_ca = GroupCa::load(&ca_dir(&cwd, "catsys")).expect("the daemon made catsys's CA in ./.slicer/ca/catsys");
    let min_ca = GroupCa::load(&ca_dir(&cwd, "catmin")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(ca_dir(&cwd, "catsys").join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);

    // A cold boot of the systemd image.
    let v = d.create_vm("catsys", json!({})).await;
    let sys = v["hostname"].as_str().unwrap().to_string();
    let bundle = stdout(&d, &sys, "cat /etc/ssl/certs/ca-certificates.crt").await;
    assert!(
        bundle.contains(sys_ca.cert_pem().trim()),
        "the system bundle holds the group's CA"
    );
    assert_eq!(bundle.matches(sys_ca.cert_pem().trim()).count(), 1);
    assert_eq!(
        stdout(&d, &sys, "cat /runner/ca.crt").await.trim(),
        sys_ca.cert_pem().trim()
    );
    for uid in [Some(0), None] {
        let (_, env, _) = run(&d, &sys, "env", uid).await;
        assert!(
            env.contains("SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt\n"),
            "{uid:?}: {env}"
        );
        assert!(
            env.contains("REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt\n"),
            "{env}"
        );
        assert!(env.contains("NODE_EXTRA_CA_CERTS=/runner/ca.crt\n"), "{env}");
    }
    // A login shell started with an empty environment gets them from the profile too.
    assert_eq!(
        stdout(
            &d,
            &sys,
            "env -i /bin/sh -lc 'echo $NODE_EXTRA_CA_CERTS $SSL_CERT_FILE'"
        )
        .await
        .trim(),
        "/runner/ca.crt /etc/ssl/certs/ca-certificates.crt"
    );
    assert!(stdout(&d, &sys, "cat /etc/environment")
        .await
        .contains("NODE_EXTRA_CA_CERTS=/runner/ca.crt"));

    // The strongest check: curl without -k trusts a leaf of the group's CA, not one of another.
    let trusted = sys_ca.issue(&["localhost".into()]).unwrap();
    assert_eq!(
        curl_exit(&d, &sys, &trusted, 8443).await,
        0,
        "curl trusts the group CA's leaf"
    );
    let stranger = extra.issue(&["localhost".into()]).unwrap();
    assert_eq!(
        curl_exit(&d, &sys, &stranger, 8444).await,
        60,
        "a leaf of a CA the group does not trust is refused"
    );

    // The agent's own listing.
    let listed: serde_json::Value =
        serde_json::from_str(&stdout(&d, &sys, "slicer-agent ca list --json").await).unwrap();
    let short = listed[0]["short"].as_str().unwrap().to_string();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert!(listed[0]["subject"].as_str().unwrap().contains("CN=catsys"), "{listed}");
    assert!(stdout(&d, &sys, "slicer-agent ca list").await.contains(&short));

    // A warm start (restored from the template): both of catmin's CAs, before it reports ready.
    let v = d.create_vm("catmin", json!({})).await;
    let min = v["hostname"].as_str().unwrap().to_string();
    let (_, info) = d.get(&routes::vm(&min)).await;
    assert_eq!(info["start_mode"], "template", "{info}");
    let bundle = stdout(&d, &min, "cat /etc/ssl/certs/ca-certificates.crt").await;
    assert!(bundle.contains(min_ca.cert_pem().trim()) && bundle.contains(extra.cert_pem().trim()));
    assert!(
        !bundle.contains(sys_ca.cert_pem().trim()),
        "another group's CA is not installed"
    );
    assert_eq!(
        stdout(&d, &min, "grep -c 'BEGIN CERTIFICATE' /runner/ca.crt")
            .await
            .trim(),
        "2"
    );
    // openssl (the min image has no curl) verifies a leaf of the generated CA with the bundle.
    let leaf = min_ca.issue(&["localhost".into()]).unwrap();
    let verified = stdout(
        &d,
        &min,
        &format!(
            "printf '%s' '{}' > /tmp/l.crt; openssl verify -CAfile /etc/ssl/certs/ca-certificates.crt /tmp/l.crt",
            leaf.cert_pem
        ),
    )
    .await;
    assert!(verified.contains("OK"), "{verified}");

    // Removing one in the guest: it goes from the bundle and /runner/ca.crt; the OS roots stay.
    let roots_before = stdout(
        &d,
        &min,
        "grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt",
    )
    .await;
    let extra_short = slicer_proxy::ca::pem_certs(extra.cert_pem())
        .first()
        .map(|der| {
            use sha2::Digest;
            hex::encode(&sha2::Sha256::digest(der)[..6])
        })
        .unwrap();
    stdout(&d, &min, &format!("slicer-agent ca remove {extra_short}")).await;
    let roots_after = stdout(
        &d,
        &min,
        "grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt",
    )
    .await;
    assert_eq!(
        roots_after.trim().parse::<u32>().unwrap() + 1,
        roots_before.trim().parse::<u32>().unwrap()
    );
    assert_eq!(
        stdout(&d, &min, "grep -c 'BEGIN CERTIFICATE' /runner/ca.crt")
            .await
            .trim(),
        "1"
    );

    // A resume installs again: the removed CA (still in the config) is back, and nothing is
    // there twice.
    let (s, b) = d
        .raw(&d.client(), Method::POST, &routes::vm_suspend(&min), None, empty())
        .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let (s, b) = d
        .raw(
            &d.client(),
            Method::POST,
            &format!("{}?wait=agent&timeout=120s", routes::vm_restore(&min)),
            None,
            empty(),
        )
        .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let (_, info) = d.get(&routes::vm(&min)).await;
    assert_eq!(info["start_mode"], "resume", "{info}");
    assert_eq!(
        stdout(&d, &min, "grep -c 'BEGIN CERTIFICATE' /runner/ca.crt")
            .await
            .trim(),
        "2"
    );
    let bundle = stdout(&d, &min, "cat /etc/ssl/certs/ca-certificates.crt").await;
    assert_eq!(bundle.matches(extra.cert_pem().trim()).count(), 1);
    assert_eq!(bundle.matches(min_ca.cert_pem().trim()).count(), 1);

    for (g, h) in [("catsys", &sys), ("catmin", &min)] {
        let (s, v) = d.send_json(Method::DELETE, &routes::group_node(g, h), "").await;
        assert_eq!(s, 200, "{v}");
        assert!(no_qemu_for(h));
    }
    d.stop().await;
}
