//! Bring your own image: OCI images built here, pushed to Debian's `docker-registry` on
//! 127.0.0.1 (started by the test, stopped after), pulled by `slicer image pull`, booted by the
//! daemon. Nothing comes from the internet.

mod common;

use slicer_api::routes;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;
use http::Method;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use slicer_testkit::Registry;

/// A `docker-registry` on a free loopback port, its storage in `dir`; with `htpasswd` (user,
/// password) it asks for basic auth.
fn start_registry(dir: &Path, htpasswd: Option<(&str, &str)>) -> Registry {
    let lines = htpasswd.map(|(user, pass)| format!("{user}:{}\n", bcrypt::hash(pass, 4).unwrap()));
    Registry::start(dir, lines.as_deref()).unwrap_or_else(|e| panic!("{e}"))
}

/// The newest complete package tree of one of our variants (no agent in it).
fn variant_tree(variant: &str) -> PathBuf {
    let dir = Path::new(&images_dir()).join("debootstrap");
    let mut trees: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{variant}-")))
        .filter(|e| e.path().join("complete").exists())
        .collect();
    trees.sort_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    trees
        .last()
        .expect("a built variant tree (scripts/setup.sh)")
        .path()
        .join("rootfs")
}

/// A tar of a host directory as it is (owners, modes, symlinks, devices).
fn tar_dir(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

/// The test's upper layers: layer 2 adds things, layer 3 deletes and replaces them.
fn upper_layers() -> (Vec<u8>, Vec<u8>) {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, p: &str| {
        let mut h = header(tar::EntryType::Directory, 0o755, 0, 0);
        b.append_data(&mut h, p, &[][..]).unwrap();
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, p: &str, data: &[u8], mode: u32, uid: u64| {
        let mut h = header(tar::EntryType::Regular, mode, uid, data.len() as u64);
        b.append_data(&mut h, p, data).unwrap();
    };
    dir(&mut b, "opt/");
    dir(&mut b, "opt/app/");
    file(&mut b, "opt/app/old.txt", b"old\n", 0o644, 0);
    file(&mut b, "etc/doomed.conf", b"delete me\n", 0o644, 0);
    dir(&mut b, "srv/");
    file(&mut b, "srv/data.txt", b"owned by 1000\n", 0o640, 1000);
    let two = b.into_inner().unwrap();

    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "opt/app/");
    file(&mut b, "opt/app/.wh..wh..opq", b"", 0o644, 0);
    file(&mut b, "opt/app/new.txt", b"new\n", 0o644, 0);
    file(&mut b, "etc/.wh.doomed.conf", b"", 0o644, 0);
    // A setuid copy of id, a hardlink to it and a symlink.
    let id = std::fs::read("/usr/bin/id").unwrap();
    file(&mut b, "usr/local/bin/suid-id", &id, 0o4755, 0);
    let mut h = header(tar::EntryType::Link, 0o755, 0, 0);
    b.append_link(&mut h, "usr/local/bin/hard-id", "usr/local/bin/suid-id")
        .unwrap();
    let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
    b.append_link(&mut h, "usr/local/bin/soft-id", "suid-id").unwrap();
    let three = b.into_inner().unwrap();
    (two, three)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Pushes layers (uncompressed tars; all but the first gzipped) as `reference`.
async fn push(reference: &str, tars: &[Vec<u8>], auth: &RegistryAuth) -> String {
    push_for(reference, tars, auth, "amd64").await
}

/// As [`push`], for the architecture `arch`.
async fn push_for(reference: &str, tars: &[Vec<u8>], auth: &RegistryAuth, arch: &str) -> String {
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let r: Reference = reference.parse().unwrap();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, t) in tars.iter().enumerate() {
        diff_ids.push(sha(t));
        layers.push(if i == 0 {
            ImageLayer::oci_v1(t.clone(), None)
        } else {
            ImageLayer::oci_v1_gzip(gzip(t), None)
        });
    }
    let config = serde_json::json!({
        "architecture": arch, "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = Config::oci_v1(serde_json::to_vec(&config).unwrap(), None);
    let resp = client.push(&r, &layers, config, auth, None).await.unwrap();
    resp.manifest_url
}

/// Runs `slicer image …` with the data directory `data`.
fn image_cmd(dir: &Path, data: &Path, args: &[&str]) -> std::process::Output {
    let mut a: Vec<&str> = vec!["image"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--data-dir", data.to_str().unwrap()]);
    slicer(dir, &a, "http://127.0.0.1:1")
}

/// A data directory whose store knows our kernel (and images) but holds no pulled image.
fn fresh_data(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let images = data.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for m in ["min.json", "systemd.json"] {
        std::fs::copy(Path::new(&images_dir()).join(m), images.join(m)).unwrap();
    }
    data
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What the store holds beyond our own images' manifests (file names, recursively).
fn store_listing(data: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(p: &Path, base: &Path, out: &mut Vec<String>) {
        if let Ok(d) = std::fs::read_dir(p) {
            for e in d.flatten() {
                out.push(e.path().strip_prefix(base).unwrap().display().to_string());
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), base, out);
                }
            }
        }
    }
    walk(&data.join("images"), &data.join("images"), &mut out);
    out.retain(|p| !p.starts_with("templates"));
    out.sort();
    out
}

/// Runs `cmd` in the VM as root through the CLI; returns its stdout.
fn exec(dir: &Path, url: &str, vm: &str, cmd: &str) -> String {
    ok(&slicer(dir, &["vm", "exec", vm, "--", cmd], url))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn pulled_images_boot_with_their_layers_and_systemd() {
    let tmp = tempfile::Builder::new().prefix("slicer-images-").tempdir().unwrap();
    let dir = tmp.path();
    let reg = start_registry(dir, None);
    let data = fresh_data(dir);

    // A min tree without our agent (the pull must inject it), then the test's layers.
    let min_tree = variant_tree("min");
    let (two, three) = upper_layers();
    let min_ref = format!("{}/byoi/plain:v1", reg.addr);
    push(
        &min_ref,
        &[tar_dir(&min_tree), two.clone(), three.clone()],
        &RegistryAuth::Anonymous,
    )
    .await;
    let sd_ref = format!("{}/byoi/systemd:v1", reg.addr);
    push(
        &sd_ref,
        &[tar_dir(&variant_tree("systemd")), two, three],
        &RegistryAuth::Anonymous,
    )
    .await;

    let t = Instant::now();
    let out = ok(&image_cmd(dir, &data, &["pull", "--insecure", &min_ref]));
    assert!(
        out.contains("min"),
        "a tree without systemd boots the agent as PID 1: {out}"
    );
    let first = t.elapsed();
    let out = ok(&image_cmd(dir, &data, &["pull", "--insecure", &sd_ref]));
    assert!(out.contains("systemd"), "{out}");
    // Again: the digest is in the store, nothing is downloaded or converted.
    let before = store_listing(&data);
    let t = Instant::now();
    let again = image_cmd(dir, &data, &["pull", "--insecure", &min_ref]);
    ok(&again);
    assert!(t.elapsed() < first, "a second pull of the same digest does no work");
    assert_eq!(store_listing(&data), before);
    let list = ok(&image_cmd(dir, &data, &["list", "--json"]));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert!(
        names.contains(&min_ref.as_str()) && names.contains(&sd_ref.as_str()),
        "{names:?}"
    );

    // The daemon boots them: the min one from a template (warm start), systemd cold.
    let port = free_port();
    let config = format!(
        "config:\n  insecure_registry: true\n  host_groups:\n  - name: plain\n    count: 0\n    vcpu: 1\n    ram_gb: 1\n    image: {min_ref}\n    network: {{mode: none}}\n  - name: sd\n    count: 0\n    vcpu: 1\n    ram_gb: 1\n    image: {sd_ref}\n    warm_start: false\n    network: {{mode: none}}\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
    );
    std::fs::write(dir.join("c.yaml"), config).unwrap();
    let (daemon, url) = up_with(
        dir,
        "c.yaml",
        port,
        &[("SLICER_IMAGES_DIR", data.join("images").to_str().unwrap())],
    )
    .await;
    let api = client(dir, &url);
    for group in ["plain", "sd"] {
        let vm = create_vm(&api, group, serde_json::json!({})).await;
        let desc: serde_json::Value = api.json(Method::GET, &routes::vm(&vm), None).await.unwrap();
        if group == "plain" {
            assert_eq!(desc["start_mode"], "template", "pulled images start warm too: {desc}");
        }
        let out = exec(
            dir,
            &url,
            &vm,
            "test ! -e /etc/doomed.conf && echo whiteout-ok; ls /opt/app; \
             stat -c '%a %u %g' /usr/local/bin/suid-id /srv/data.txt; \
             test $(stat -c %i /usr/local/bin/hard-id) = $(stat -c %i /usr/local/bin/suid-id) && echo hardlink-ok; \
             readlink /usr/local/bin/soft-id; cat /proc/1/comm",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            &lines[..7],
            &[
                "whiteout-ok",
                "new.txt",
                "4755 0 0",
                "640 1000 1000",
                "hardlink-ok",
                "suid-id",
                if group == "sd" { "systemd" } else { "slicer-agent" }
            ],
            "{out}"
        );
        // An image a VM uses cannot be removed.
        let r = if group == "sd" { &sd_ref } else { &min_ref };
        let err = failed(&image_cmd(dir, &data, &["remove", r]));
        assert!(err.contains("in use"), "{err}");
        let _: serde_json::Value = api
            .json(Method::DELETE, &routes::group_node(group, &vm), None)
            .await
            .unwrap();
    }
    let info: serde_json::Value = api.json(Method::GET, "/nodes", None).await.unwrap();
    assert_eq!(info.as_array().map(|a| a.len()), Some(0));
    drop(daemon);
    // No VM left: the systemd image goes (no template was made of it); the other has a template.
    ok(&image_cmd(dir, &data, &["remove", &sd_ref]));
    let err = failed(&image_cmd(dir, &data, &["remove", &min_ref]));
    assert!(
        err.contains("templates/") && err.contains("with the daemon stopped"),
        "{err}"
    );
    std::fs::remove_dir_all(data.join("images/templates")).unwrap();
    ok(&image_cmd(dir, &data, &["remove", &min_ref]));
    assert_eq!(std::fs::read_dir(data.join("images/oci")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(data.join("images/refs")).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn bad_pulls_fail_clearly_and_change_nothing() {
    let tmp = tempfile::Builder::new().prefix("slicer-images-bad-").tempdir().unwrap();
    let dir = tmp.path();
    let reg = start_registry(dir, None);
    let private = start_registry(dir, Some(("alice", "s3cret")));
    let data = fresh_data(dir);
    let empty_store = store_listing(&data);

    let small = |tag: &str| {
        let mut b = tar::Builder::new(Vec::new());
        let body = format!("{tag}\n");
        let mut h = header(tar::EntryType::Regular, 0o644, 0, body.len() as u64);
        b.append_data(&mut h, "hello.txt", body.as_bytes()).unwrap();
        b.into_inner().unwrap()
    };
    let blobs = reg.storage.join("docker/registry/v2/blobs/sha256");
    let blob = |digest: &str| {
        let hex = digest.strip_prefix("sha256:").unwrap();
        blobs.join(&hex[..2]).join(hex).join("data")
    };

    // A layer whose bytes do not match its digest.
    let layer = small("corrupt-layer");
    let bad_layer = format!("{}/bad/layer:v1", reg.addr);
    push(&bad_layer, std::slice::from_ref(&layer), &RegistryAuth::Anonymous).await;
    std::fs::write(blob(&sha(&layer)), b"not the layer").unwrap();
    let err = failed(&image_cmd(dir, &data, &["pull", "--insecure", &bad_layer]));
    assert!(err.contains("does not match its digest"), "{err}");

    // A manifest whose bytes do not match its digest.
    let bad_manifest = format!("{}/bad/manifest:v1", reg.addr);
    let url = push(&bad_manifest, &[small("corrupt-manifest")], &RegistryAuth::Anonymous).await;
    let _ = url;
    let tag_link = reg
        .storage
        .join("docker/registry/v2/repositories/bad/manifest/_manifests/tags/v1/current/link");
    let mdigest = std::fs::read_to_string(&tag_link).unwrap();
    let mpath = blob(mdigest.trim());
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["annotations"] = serde_json::json!({"tampered": "yes"});
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    let err = failed(&image_cmd(dir, &data, &["pull", "--insecure", &bad_manifest]));
    assert!(err.contains("digest"), "{err}");

    // A blob the registry no longer has.
    let gone = small("missing-blob");
    let missing = format!("{}/bad/missing:v1", reg.addr);
    push(&missing, std::slice::from_ref(&gone), &RegistryAuth::Anonymous).await;
    std::fs::remove_dir_all(blob(&sha(&gone)).parent().unwrap()).unwrap();
    let err = failed(&image_cmd(dir, &data, &["pull", "--insecure", &missing]));
    assert!(err.contains("not found") || err.contains("layer"), "{err}");

    // An image for another architecture.
    let arm = format!("{}/other/arm:v1", reg.addr);
    push_for(&arm, &[small("arm")], &RegistryAuth::Anonymous, "arm64").await;
    let err = failed(&image_cmd(dir, &data, &["pull", "--insecure", &arm]));
    assert!(err.contains("linux/arm64") && err.contains("linux/amd64"), "{err}");

    // A registry nobody listens on.
    let closed = format!("127.0.0.1:{}/x/y:v1", free_port());
    let err = failed(&image_cmd(dir, &data, &["pull", "--insecure", &closed]));
    assert!(err.contains("cannot be reached"), "{err}");

    // A private registry: refused without credentials, pulled with them.
    let auth = RegistryAuth::Basic("alice".into(), "s3cret".into());
    let secret = format!("{}/team/private:v1", private.addr);
    push(&secret, &[small("private")], &auth).await;
    let nocreds = dir.join("empty-docker.json");
    std::fs::write(&nocreds, "{}").unwrap();
    let err = failed(&image_cmd(
        dir,
        &data,
        &[
            "pull",
            "--insecure",
            "--docker-config",
            nocreds.to_str().unwrap(),
            &secret,
        ],
    ));
    assert!(err.contains("refused access") && err.contains("docker login"), "{err}");
    assert_eq!(
        store_listing(&data),
        empty_store,
        "failed pulls leave nothing in the store"
    );

    let creds = dir.join("docker.json");
    let b64 = base64_encode(b"alice:s3cret");
    std::fs::write(
        &creds,
        format!(r#"{{"auths":{{"{}":{{"auth":"{b64}"}}}}}}"#, private.addr),
    )
    .unwrap();
    ok(&image_cmd(
        dir,
        &data,
        &[
            "pull",
            "--insecure",
            "--docker-config",
            creds.to_str().unwrap(),
            &secret,
        ],
    ));
    // Plain HTTP is only spoken to registries marked insecure.
    let err = failed(&image_cmd(dir, &data, &["pull", &format!("{}/bad/layer:v1", reg.addr)]));
    assert!(
        err.contains("cannot be reached") || err.contains("tls") || err.contains("TLS") || err.contains("SSL"),
        "{err}"
    );
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// SlicerVM's own image names map to ours when their registry cannot be reached (here: a
/// loopback port nobody listens on), so their configs run unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn slicer_image_names_fall_back_to_ours() {
    let tmp = tempfile::Builder::new().prefix("slicer-images-fb-").tempdir().unwrap();
    let dir = tmp.path();
    let port = free_port();
    let image = format!(
        "127.0.0.1:{}/openfaasltd/slicer-systemd-min:6.1.90-x86_64-latest",
        free_port()
    );
    let config = format!(
        "config:\n  image: {image}\n  insecure_registry: true\n  host_groups:\n  - name: fb\n    count: 0\n    vcpu: 1\n    ram_gb: 1\n    warm_start: false\n    network: {{mode: none}}\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
    );
    std::fs::write(dir.join("c.yaml"), config).unwrap();
    let (_daemon, url) = up(dir, "c.yaml", port).await;
    let api = client(dir, &url);
    let vm = &create_vm(&api, "fb", serde_json::json!({})).await;
    let desc: serde_json::Value = api.json(Method::GET, &routes::vm(vm), None).await.unwrap();
    assert_eq!(desc["image"], "min", "{desc}");
    assert_eq!(exec(dir, &url, vm, "cat /proc/1/comm"), "slicer-agent\n");
}
