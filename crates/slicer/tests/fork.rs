//! Cold fork as Slicer's agent docs teach it, through the CLI: prepare a persistent builder,
//! shut it down, `vm commit --cache-key`, `vm fork` clean runners; then `disk export` and a
//! host group booting the exported file.

mod common;

use slicer_api::routes;
use std::path::Path;

use common::*;
use http::Method;

fn json(dir: &Path, url: &str, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["vm", "--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(dir, url, &a)).unwrap()
}

const CONFIG: &str = "config:\n  host_groups:\n  - name: fk\n    count: 0\n    vcpu: 1\n    ram_gb: 1\n    persistent: true\n    network:\n      mode: isolated\n      drop: [\"0.0.0.0/0\"]\n  - name: plain\n    count: 0\n    vcpu: 1\n    ram_gb: 1\n    persistent: true\n    warm_start: false\n    network: {mode: none}\n  graceful_shutdown: false\n  api:\n    port: PORT\n    bind_address: 127.0.0.1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn commit_fork_and_export_like_slicer() {
    let tmp = tempfile::Builder::new().prefix("slicer-fork-").tempdir().unwrap();
    let d = tmp.path();
    let port = free_port();
    std::fs::write(d.join("c.yaml"), CONFIG.replace("PORT", &port.to_string())).unwrap();
    let (daemon, url) = up(d, "c.yaml", port).await;
    let api = client(d, &url);

    // The builder: prepared once, shut down.
    let builder = create_vm(&api, "fk", serde_json::json!({})).await;
    ok(
        d,
        &url,
        &["vm", "exec", &builder, "--", "echo toolchain > /root/built.txt && sync"],
    );
    fails(d, &url, &["vm", "commit", &builder], "shut it down first");
    ok(d, &url, &["vm", "shutdown", &builder]);
    wait_stopped(&api, &builder).await;

    let c = json(
        d,
        &url,
        &["commit", &builder, "--cache-key", "k1", "--tag", "kind=runner"],
    );
    let commit = c["commit_id"].as_str().unwrap().to_string();
    assert_eq!(c["status"], "committed");
    let listed = json(d, &url, &["commit", "list", "--cache-key", "k1"]);
    assert_eq!(listed[0]["commit_id"], commit.as_str());
    assert_eq!(listed[0]["source_hostname"], builder.as_str());

    // Another VM cannot take the key.
    let other = create_vm(&api, "plain", serde_json::json!({})).await;
    ok(d, &url, &["vm", "shutdown", &other]);
    wait_stopped(&api, &other).await;
    fails(
        d,
        &url,
        &["vm", "commit", &other, "--cache-key", "k1"],
        "belongs to commits of VM",
    );
    // Per-fork network overrides are for isolated groups only.
    let c2 = json(d, &url, &["commit", &other, "--cache-key", "k2"]);
    fails(
        d,
        &url,
        &["vm", "fork", c2["commit_id"].as_str().unwrap(), "--allow", "10.0.0.1"],
        "isolated host group",
    );

    // Three runners: each has the builder's file, its own hostname, machine id and address.
    let mut forks = Vec::new();
    for i in 0..3 {
        let mut args = vec!["fork", commit.as_str(), "--tag", "job=ci"];
        let name = format!("runner{i}");
        if i == 0 {
            args.extend_from_slice(&["--name", &name, "--no-allow", "--drop", "10.0.0.0/8"]);
        }
        let f = json(d, &url, &args);
        assert_eq!(f["status"], "forked");
        assert_eq!(f["child_status"], "running");
        forks.push(f["hostname"].as_str().unwrap().to_string());
    }
    let mut ids = std::collections::HashSet::new();
    let mut ips = std::collections::HashSet::new();
    for f in &forks {
        let out = ok(
            d,
            &url,
            &[
                "vm",
                "exec",
                f,
                "--",
                "cat /root/built.txt; hostname; cat /etc/machine-id",
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "toolchain", "{out}");
        assert_eq!(lines[1], f.as_str());
        assert!(ids.insert(lines[2].to_string()), "machine ids repeat: {out}");
        let v: serde_json::Value = api.json(Method::GET, &routes::vm(f), None).await.unwrap();
        assert!(ips.insert(v["ip"].as_str().unwrap().to_string()), "{v}");
        assert_eq!(v["parent_commit_id"], commit.as_str());
        assert!(v["tags"].as_array().unwrap().iter().any(|t| t == "kind=runner"), "{v}");
    }
    let first: serde_json::Value = api
        .json(Method::GET, &routes::vm(forks[0].as_str()), None)
        .await
        .unwrap();
    assert_eq!(first["network"]["override"]["drop"][0], "10.0.0.0/8", "{first}");
    assert_eq!(
        first["network"]["effective"]["allow"].as_array().map(Vec::len),
        Some(0),
        "{first}"
    );
    assert_eq!(
        ok(d, &url, &["vm", "exec", "runner0", "--", "hostname"]).trim(),
        forks[0]
    );

    // Copy-on-write: one fork's write is seen by no other, nor by a new fork.
    ok(
        d,
        &url,
        &["vm", "exec", &forks[0], "--", "echo mine > /root/built.txt && sync"],
    );
    for f in &forks[1..] {
        assert_eq!(
            ok(d, &url, &["vm", "exec", f, "--", "cat /root/built.txt"]),
            "toolchain\n"
        );
    }
    let late = json(d, &url, &["fork", &commit]);
    let late = late["hostname"].as_str().unwrap().to_string();
    assert_eq!(
        ok(d, &url, &["vm", "exec", &late, "--", "cat /root/built.txt"]),
        "toolchain\n"
    );

    // A commit others sit on stays.
    fails(d, &url, &["vm", "commit", "delete", &commit], "in use by");
    fails(d, &url, &["vm", "commit", "delete", "../x"], "not a commit id");

    // A commit with no VM on it goes: the other VM's commit, once that VM is deleted.
    let c2 = c2["commit_id"].as_str().unwrap().to_string();
    fails(d, &url, &["vm", "commit", "delete", &c2], "in use by");
    ok(d, &url, &["vm", "delete", &other]);
    ok(d, &url, &["vm", "commit", "delete", &c2]);
    assert!(!d.join("data/commits").join(&c2).exists());

    // The builder runs on over its commit: its files are there, its writes are its own.
    ok(d, &url, &["vm", "relaunch", &builder]);
    ok(
        d,
        &url,
        &[
            "vm",
            "exec",
            &builder,
            "--",
            "test -s /root/built.txt && echo v2 > /root/built.txt && sync",
        ],
    );
    assert_eq!(
        ok(d, &url, &["vm", "exec", &forks[1], "--", "cat /root/built.txt"]),
        "toolchain\n"
    );
    fails(
        d,
        &url,
        &["disk", "export", &builder, "--output", "x.qcow2"],
        "shut it down first",
    );
    ok(d, &url, &["vm", "shutdown", &builder]);
    wait_stopped(&api, &builder).await;

    // Export the builder's disk; a host group of another daemon boots the file.
    let export = d.join("builder.qcow2");
    ok(
        d,
        &url,
        &["disk", "export", &builder, "--output", export.to_str().unwrap()],
    );
    drop(daemon);

    let d2 = d.join("second");
    std::fs::create_dir_all(d2.join("data/images")).unwrap();
    for m in ["min.json", "systemd.json"] {
        std::fs::copy(Path::new(&images_dir()).join(m), d2.join("data/images").join(m)).unwrap();
    }
    let port2 = free_port();
    std::fs::write(
        d2.join("c.yaml"),
        format!(
            "config:\n  host_groups:\n  - name: ex\n    count: 0\n    vcpu: 1\n    ram_gb: 1\n    image: {}\n    warm_start: false\n    network: {{mode: none}}\n  graceful_shutdown: false\n  api:\n    port: {port2}\n    bind_address: 127.0.0.1\n",
            export.display()
        ),
    )
    .unwrap();
    let images = d2.join("data/images");
    let (_daemon2, url2) = up_with(&d2, "c.yaml", port2, &[("SLICER_IMAGES_DIR", images.to_str().unwrap())]).await;
    let api2 = client(&d2, &url2);
    let vm = &create_vm(&api2, "ex", serde_json::json!({})).await;
    assert_eq!(
        ok(&d2, &url2, &["vm", "exec", vm, "--", "cat /root/built.txt"]),
        "v2\n",
        "the export holds the builder's disk as it was last"
    );
}
