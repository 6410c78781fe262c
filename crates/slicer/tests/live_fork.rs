//! Live fork through the CLI: `vm commit --live` captures a running VM (memory, devices,
//! disk) and `vm fork --count N` continues it N times; the source keeps running. Sources from
//! a template (isolated network) and from a cold boot (no network) are both captured.

mod common;

use slicer_api::routes;
use std::collections::HashSet;
use std::path::Path;

use common::*;
use http::Method;

const CONFIG: &str = "config:\n  host_groups:\n  - name: lf\n    count: 0\n    vcpu: 1\n    ram_gb: 1\n    network:\n      mode: isolated\n      drop: [\"0.0.0.0/0\"]\n  - name: cold\n    count: 0\n    vcpu: 1\n    ram_gb: 1\n    warm_start: false\n    network: {mode: none}\n  graceful_shutdown: false\n  api:\n    port: PORT\n    bind_address: 127.0.0.1\n";

/// Every JSON value the CLI printed (`--json` prints one per VM).
fn values(out: &str) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_str(out)
        .into_iter::<serde_json::Value>()
        .map(|v| v.unwrap_or_else(|e| panic!("{e}: {out}")))
        .collect()
}

/// Starts what a fork must continue: a counter in a shell's memory written to tmpfs every
/// 50 ms, a `sleep` holding a tmpfs file open that is then unlinked, a file on disk. Returns
/// the sleep's pid.
fn start_work(d: &Path, url: &str, vm: &str) -> String {
    ok(d, url, &["vm", "exec", vm, "--", slicer_testkit::guest::LIVE_STATE]);
    let pid = ok(d, url, &["vm", "exec", vm, "--", "cat /dev/shm/holder"])
        .trim()
        .to_string();
    assert!(!pid.is_empty(), "no sleep in {vm}");
    pid
}

/// (hostname, machine-id, the held file, the disk file, the counter, the counter once it moved
/// on (5 s at most), eth0's IPv4 address or "-").
fn probe(d: &Path, url: &str, vm: &str, pid: &str) -> Vec<String> {
    let out = ok(
        d,
        url,
        &[
            "vm",
            "exec",
            vm,
            "--",
            &format!(
                "hostname; cat /etc/machine-id; cat /proc/{pid}/fd/3; cat /root/on-disk; a=$(cat /dev/shm/count); echo $a; for i in $(seq 500); do b=$(cat /dev/shm/count); [ \"$b\" != \"$a\" ] && break; sleep 0.01; done; echo $b; \
                 ip -4 -o addr show eth0 2>/dev/null | awk '{{print $4}}' | grep . || echo -"
            ),
        ],
    );
    let l: Vec<String> = out.lines().map(str::to_string).collect();
    assert_eq!(l.len(), 7, "{vm}: {out}");
    l
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn live_forks_continue_the_running_source() {
    let tmp = tempfile::Builder::new().prefix("slicer-live-").tempdir().unwrap();
    let d = tmp.path();
    let port = free_port();
    std::fs::write(d.join("c.yaml"), CONFIG.replace("PORT", &port.to_string())).unwrap();
    let (daemon, url) = up(d, "c.yaml", port).await;
    let api = client(d, &url);

    for (group, count) in [("lf", 3), ("cold", 1)] {
        let src = create_vm(&api, group, serde_json::json!({})).await;
        let pid = start_work(d, &url, &src);

        let before: u64 = ok(d, &url, &["vm", "exec", &src, "--", "cat /dev/shm/count"])
            .trim()
            .parse()
            .unwrap();
        let c = values(&ok(
            d,
            &url,
            &["vm", "--json", "commit", &src, "--live", "--tag", "kind=live"],
        ));
        assert_eq!(c[0]["mode"], "live", "{c:?}");
        assert_eq!(c[0]["parent_status"], "running");
        let commit = c[0]["commit_id"].as_str().unwrap().to_string();
        let listed = values(&ok(d, &url, &["vm", "--json", "commit", "list", "--tag", "kind=live"]));
        assert!(
            listed[0]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["commit_id"] == commit.as_str() && c["mode"] == "live"),
            "{listed:?}"
        );

        let forks: Vec<String> = values(&ok(
            d,
            &url,
            &["vm", "--json", "fork", &commit, "--count", &count.to_string()],
        ))
        .iter()
        .map(|f| {
            assert_eq!(f["mode"], "live", "{f}");
            assert_eq!(f["child_status"], "running", "{f}");
            f["hostname"].as_str().unwrap().to_string()
        })
        .collect();
        assert_eq!(forks.len(), count);

        let (mut ids, mut ips) = (HashSet::new(), HashSet::new());
        for vm in forks.iter().chain(std::iter::once(&src)) {
            let l = probe(d, &url, vm, &pid);
            assert_eq!(&l[0], vm, "hostname");
            assert!(ids.insert(l[1].clone()), "{vm} repeats machine-id {}", l[1]);
            assert_eq!(l[2], "held", "{vm}: the sleep's tmpfs file");
            assert_eq!(l[3], "disk", "{vm}: the file on disk");
            let (a, b): (u64, u64) = (l[4].parse().unwrap(), l[5].parse().unwrap());
            assert!(b > a, "{vm}: the counter stands still ({a}, {b})");
            if vm != &src {
                assert!(
                    a >= before,
                    "{vm}: counter {a} restarted (was {before} before the commit)"
                );
            }
            if group == "lf" {
                let rec: serde_json::Value = api.json(Method::GET, &routes::vm(vm), None).await.unwrap();
                let addr = l[6].split('/').next().unwrap_or_default();
                assert_eq!(addr, rec["ip"].as_str().unwrap(), "{vm}: eth0 has the VM's own address");
                assert!(ips.insert(l[6].clone()), "{vm} repeats address {}", l[6]);
                if vm != &src {
                    assert_eq!(rec["parent_commit_id"], commit.as_str());
                }
            }
        }
        // A write in one fork stays there.
        ok(
            d,
            &url,
            &[
                "vm",
                "exec",
                &forks[0],
                "--",
                "echo x > /dev/shm/only; echo x > /root/only",
            ],
        );
        for vm in forks.iter().skip(1).chain(std::iter::once(&src)) {
            let n = ok(
                d,
                &url,
                &[
                    "vm",
                    "exec",
                    vm,
                    "--",
                    "ls /dev/shm/only /root/only 2>/dev/null | wc -l",
                ],
            );
            assert_eq!(n.trim(), "0", "{vm} sees another fork's writes");
        }

        // Refusals change nothing.
        fails(
            d,
            &url,
            &["vm", "fork", &commit, "--count", "2", "--name", "x"],
            "--count",
        );
        let e = api
            .json::<serde_json::Value>(
                Method::POST,
                &routes::commit_fork(&commit),
                Some(&serde_json::json!({"vcpu": 2})),
            )
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("leave vcpu and ram_bytes out"), "{e:#}");
        fails(d, &url, &["vm", "fork", &commit, "--count", "33"], "count");
        fails(d, &url, &["vm", "commit", "delete", &commit], "in use by");
        for f in &forks {
            ok(d, &url, &["vm", "delete", f]);
        }
        ok(d, &url, &["vm", "commit", "delete", &commit]);
        ok(d, &url, &["vm", "delete", &src]);
    }
    // A live commit needs a running VM.
    let stopped = create_vm(&api, "cold", serde_json::json!({"persistent": true})).await;
    ok(d, &url, &["vm", "shutdown", &stopped]);
    wait_stopped(&api, &stopped).await;
    fails(d, &url, &["vm", "commit", &stopped, "--live"], "needs a running VM");
    let left = values(&ok(d, &url, &["vm", "--json", "commit", "list"]));
    assert_eq!(left[0].as_array().map(Vec::len), Some(0), "{left:?}");
    ok(d, &url, &["vm", "delete", &stopped]);
    drop(daemon);
}
