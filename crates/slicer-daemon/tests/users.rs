//! Guests people can work in, through the API against real guests of both images: the
//! default user `ubuntu` (uid 1000, passwordless sudo), `~` and `..` in paths, userdata as
//! root once per disk with its exit code, background execs run directly, and containers
//! inside a sandbox (namespaces, overlayfs, veth on a bridge, nft masquerade).

mod common;

use slicer_api::routes;
use std::time::{Duration, Instant};

use common::{config_yaml, TestDaemon};
use http::Method;
use http_body_util::BodyExt;
use serde_json::json;
use slicer_api::client::{empty, full, query};

fn stdout(v: &serde_json::Value) -> String {
    v["stdout"].as_str().unwrap_or_default().to_string()
}

/// Asserts a buffered exec exited 0 and returns its stdout.
async fn ok(d: &TestDaemon, h: &str, line: &str, uid: Option<u32>) -> String {
    let (s, v) = d.sh_as(h, line, uid).await;
    assert_eq!((s, v["exit_code"].as_i64()), (200, Some(0)), "{line}: {v}");
    stdout(&v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn the_default_user_in_both_images() {
    for image in ["min", "systemd"] {
        let group = format!("u{image}");
        let mut d = TestDaemon::start(|p| config_yaml(&group, &format!("    image: {image}\n"), p)).await;
        let h = d.create_vm(&group, json!({})).await["hostname"]
            .as_str()
            .unwrap()
            .to_string();

        // Without uid: the default user, with a login's environment and sudo.
        assert_eq!(
            ok(&d, &h, "id -un; id -u; echo $HOME", None).await,
            "ubuntu\n1000\n/home/ubuntu\n"
        );
        let env = ok(&d, &h, "echo $USER $LOGNAME; echo $PATH; pwd", None).await;
        assert!(env.starts_with("ubuntu ubuntu\n/usr/local/bin:"), "{image}: {env}");
        assert!(env.ends_with("/home/ubuntu\n"), "{image}: {env}");
        assert_eq!(
            ok(&d, &h, "sudo -n true && sudo -n id -u", None).await,
            "0\n",
            "{image}"
        );
        assert!(ok(&d, &h, "id -Gn", None).await.split_whitespace().any(|g| g == "sudo"));
        // uid=0 is root.
        assert_eq!(ok(&d, &h, "id -un; echo $HOME", Some(0)).await, "root\n/root\n");

        // cp without uid: files (and the directories it makes) belong to the default user.
        let (s, _) = d
            .raw(
                &d.client(),
                Method::POST,
                &format!("{}?path=~/new/dir/f.txt", routes::vm_cp(&h)),
                Some("application/octet-stream"),
                full("data"),
            )
            .await;
        assert_eq!(s, 200, "{image}");
        assert_eq!(
            ok(&d, &h, "stat -c %U:%G ~/new/dir/f.txt ~/new/dir ~/new", None).await,
            "ubuntu:ubuntu\n".repeat(3),
            "{image}"
        );
        let (s, _) = d
            .raw(
                &d.client(),
                Method::POST,
                &format!("{}?path=/tmp/root.txt&uid=0", routes::vm_cp(&h)),
                Some("application/octet-stream"),
                full("data"),
            )
            .await;
        assert_eq!(s, 200);
        assert_eq!(ok(&d, &h, "stat -c %U /tmp/root.txt", None).await, "root\n");
        let (s, b) = d
            .raw(
                &d.client(),
                Method::GET,
                &format!("{}?path=~/new/dir/f.txt", routes::vm_cp(&h)),
                None,
                empty(),
            )
            .await;
        assert_eq!((s, b.as_slice()), (200, b"data".as_slice()), "{image}");

        // cwd: ~ and ~/x resolve in the user's home; climbing out is refused.
        let q = query(&[
            ("cmd", "pwd".into()),
            ("cwd", "~/new".into()),
            ("buffered", "true".into()),
        ]);
        let (s, v) = d
            .send_json(Method::POST, &format!("{}?{q}", routes::vm_exec(&h)), "")
            .await;
        assert_eq!((s, stdout(&v).as_str()), (200, "/home/ubuntu/new\n"), "{v}");
        for bad in ["../..", "~/../../etc", "/tmp/../etc"] {
            let q = query(&[("cmd", "pwd".into()), ("cwd", bad.into()), ("buffered", "true".into())]);
            let (s, v) = d
                .send_json(Method::POST, &format!("{}?{q}", routes::vm_exec(&h)), "")
                .await;
            assert_eq!(s, 400, "{bad}: {v}");
            assert!(v["error"].as_str().unwrap().contains(".."), "{v}");
        }
        let (s, _) = d.get(&format!("{}?path=~/../../etc/shadow", routes::vm_cp(&h))).await;
        assert_eq!(s, 400);
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn background_execs_run_directly_unless_a_shell_is_given() {
    let d = TestDaemon::start(|p| config_yaml("bgd", "", p)).await;
    let h = d.create_vm("bgd", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let q = query(&[
        ("cmd", "sleep".into()),
        ("args", "600".into()),
        ("background", "true".into()),
    ]);
    let (s, v) = d
        .send_json(Method::POST, &format!("{}?{q}", routes::vm_exec(&h)), "")
        .await;
    assert_eq!(s, 201, "{v}");
    let id = v["exec_id"].as_str().unwrap();
    let (_, info) = d.get(&routes::vm_exec_id(&h, id)).await;
    assert_eq!(
        (info["command"].as_str(), &info["args"]),
        (Some("sleep"), &json!(["600"])),
        "{info}"
    );
    assert_eq!(
        (info["running"].as_bool(), info["uid"].as_u64()),
        (Some(true), Some(1000)),
        "{info}"
    );
    let (s, _) = d
        .send_json(Method::POST, &routes::vm_exec_kill(&h, id), r#"{"signal":"KILL"}"#)
        .await;
    assert_eq!(s, 200);

    let q = query(&[
        ("cmd", "echo $HOME-$((1+2))".into()),
        ("background", "true".into()),
        ("shell", "/bin/bash".into()),
    ]);
    let (s, v) = d
        .send_json(Method::POST, &format!("{}?{q}", routes::vm_exec(&h)), "")
        .await;
    assert_eq!(s, 201, "{v}");
    let id = v["exec_id"].as_str().unwrap();
    let (_, w) = d
        .get(&format!("{}?timeout=30", routes::vm_exec_wait_exit(&h, id)))
        .await;
    assert_eq!(w["exit_code"].as_i64(), Some(0), "{w}");
    let (_, b) = d
        .raw(&d.client(), Method::GET, &routes::vm_exec_logs(&h, id), None, empty())
        .await;
    let text = String::from_utf8_lossy(&b);
    assert!(text.contains("/home/ubuntu-3"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn userdata_runs_as_root_once_and_reports_its_exit_code() {
    let d = TestDaemon::start(|p| config_yaml("ud", "    persistent: true\n", p)).await;

    // Slicer SDK's fswatch example: userdata hands a directory to ubuntu, a build running as
    // uid 1000 writes there, a watch sees the files.
    let userdata = "#!/bin/sh\nmkdir -p /tmp/build-out\nchown -R ubuntu:ubuntu /tmp/build-out\necho \"$(id -un) $TARGET_USER\" > /root/ran\n";
    let (s, v) = d
        .send_json(
            Method::POST,
            &format!("{}?wait=userdata&timeout=3m", routes::group_nodes("ud")),
            &json!({ "userdata": userdata }).to_string(),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let h = v["hostname"].as_str().unwrap().to_string();
    assert_eq!(
        ok(&d, &h, "cat /root/ran; cat /etc/slicer/userdata-ran", Some(0)).await,
        "root ubuntu\n0\n"
    );
    let resp = d
        .client()
        .send(
            Method::GET,
            &format!(
                "{}?paths=/tmp/build-out&events=create&max_events=2",
                routes::vm_fs_watch(&h)
            ),
            None,
            empty(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    ok(&d, &h, "touch /tmp/build-out/a.o /tmp/build-out/app", Some(1000)).await;
    let mut body = resp.into_body();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(text.contains("/tmp/build-out/a.o") && text.contains("/tmp/build-out/app")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, body.frame()).await {
            Ok(Some(Ok(f))) => text.push_str(&String::from_utf8_lossy(&f.into_data().unwrap_or_default())),
            other => panic!("watch ended early ({:?}): {text}", other.map(|o| o.is_some())),
        }
    }

    // Once per disk: a restart of the persistent VM does not run it again.
    ok(&d, &h, "rm /root/ran", Some(0)).await;
    let (s, v) = d
        .send_json(
            Method::POST,
            &format!("{}?action=shutdown", routes::vm_shutdown(&h)),
            "",
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = d.get(&routes::vm(&h)).await;
        if v["status"] == "Stopped" {
            break;
        }
        assert!(Instant::now() < deadline, "not stopped: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, v) = d.send_json(Method::POST, &routes::vm_relaunch(&h), "").await;
    assert!(s == 200 || s == 201, "{v}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (s, v) = d.get(&routes::vm_health(&h)).await;
        if s == 200 && v["userdata_ran"] == true {
            assert_eq!(v["userdata_exit_code"], 0, "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        ok(&d, &h, "test -e /root/ran || echo not-again", Some(0)).await,
        "not-again\n"
    );

    // A failing script: health says so and wait=userdata answers with the code and the log.
    let (s, v) = d
        .send_json(
            Method::POST,
            &format!("{}?wait=userdata&timeout=3m", routes::group_nodes("ud")),
            &json!({ "userdata": "#!/bin/sh\necho about to fail\nexit 3\n" }).to_string(),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("exited with code 3") && msg.contains("about to fail"),
        "{msg}"
    );
    let bad = d
        .get("/nodes")
        .await
        .1
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["hostname"].as_str().unwrap().to_string())
        .find(|n| *n != h)
        .expect("the VM is kept");
    assert!(msg.contains(&bad), "{msg}");
    let (s, v) = d.get(&routes::vm_health(&bad)).await;
    assert_eq!(
        (s, v["userdata_ran"].as_bool(), v["userdata_exit_code"].as_i64()),
        (200, Some(true), Some(3)),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn containers_run_inside_a_sandbox() {
    let d = TestDaemon::start(|p| config_yaml("ctr", "    image: systemd\n", p)).await;
    let h = d.create_vm("ctr", json!({})).await["hostname"]
        .as_str()
        .unwrap()
        .to_string();
    let root = Some(0);
    // Every namespace kind, and a cgroup v2 hierarchy with controllers to delegate.
    ok(
        &d,
        &h,
        "unshare --user --pid --net --mount --ipc --uts --cgroup --fork --mount-proc true",
        root,
    )
    .await;
    let ctl = ok(&d, &h, "cat /sys/fs/cgroup/cgroup.controllers", root).await;
    for c in ["cpu", "memory", "pids"] {
        assert!(ctl.split_whitespace().any(|x| x == c), "{c}: {ctl}");
    }
    // As an unprivileged user too (rootless containers).
    ok(
        &d,
        &h,
        "unshare --user --map-root-user --pid --fork --mount-proc true",
        None,
    )
    .await;
    // overlayfs, as container image layers use it.
    ok(
        &d,
        &h,
        "cd /tmp && mkdir -p lo up wk m && echo low > lo/f && mount -t overlay overlay -o lowerdir=lo,upperdir=up,workdir=wk m && echo top > m/g && cat m/f && test -f up/g && umount m",
        root,
    )
    .await;
    // A container network: a veth pair on a bridge, and NAT out through an nft masquerade rule;
    // the iptables-nft front end works too.
    ok(
        &d,
        &h,
        "set -e; ip netns add c1; ip link add br9 type bridge; ip addr add 10.99.0.1/24 dev br9; ip link set br9 up; \
         ip link add v9 type veth peer name eth0 netns c1; ip link set v9 master br9 up; \
         ip -n c1 addr add 10.99.0.2/24 dev eth0; ip -n c1 link set eth0 up; ip -n c1 link set lo up; \
         ip -n c1 route add default via 10.99.0.1; \
         nft add table ip ctest; nft 'add chain ip ctest post { type nat hook postrouting priority 100; }'; \
         nft add rule ip ctest post ip saddr 10.99.0.0/24 oifname != br9 masquerade; \
         ip netns exec c1 ping -c1 -W5 10.99.0.1; \
         iptables -t nat -A POSTROUTING -s 10.98.0.0/24 -j MASQUERADE; iptables -t nat -S POSTROUTING | grep -q MASQUERADE; \
         sysctl -q net.bridge.bridge-nf-call-iptables=1",
        root,
    )
    .await;
    // seccomp filters (container runtimes install one per container).
    let status = ok(&d, &h, "grep Seccomp_filters: /proc/self/status", root).await;
    assert!(status.starts_with("Seccomp_filters:"), "{status}");
}
