//! A user's session with the forms Slicer's docs and agent skills teach, typed into the real
//! `slicer` binary against a real daemon and guest: names, ready, exec by name, background
//! execs in their three forms, tags, secrets, shortcuts, version/info, and the failure forms.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{fails, ok, SLICER};

fn run(dir: &Path, url: &str, args: &[&str]) -> Output {
    common::slicer(dir, args, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root, QEMU and built images (scripts/test.sh runs it)"]
async fn a_session_with_slicers_forms() {
    let dir = tempfile::Builder::new().prefix("slicer-cli-").tempdir().unwrap();
    let d = dir.path();
    let (_daemon, url) = common::up_box(d).await;
    let url = url.as_str();

    // slicer new: Slicer's flags; what cannot work here says so
    let y = ok(
        d,
        url,
        &[
            "new",
            "web",
            "--socket",
            "/run/slicer-test.sock",
            "--no-dns",
            "--min",
            "--ssh-key",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1wKl4Rk5vPxfsJbXgDu2o3JxLM1pG1ZJc2GvQ8V5bB t@h",
        ],
    );
    assert!(
        y.contains("bind_address: /run/slicer-test.sock")
            && y.contains("dns_servers: []")
            && y.contains("image: min")
            && y.contains("ssh-ed25519"),
        "{y}"
    );
    // Any OCI reference is an image now (pulled by `slicer up`); a malformed one is refused.
    let cfg = ok(d, url, &["new", "web", "--image", "docker.io/library/ubuntu:24.04"]);
    assert!(cfg.contains("image: docker.io/library/ubuntu:24.04"), "{cfg}");
    fails(
        d,
        url,
        &["new", "web", "--image", "Not/An Image"],
        "not an image reference",
    );
    fails(d, url, &["new", "web", "--net", "macvtap"], "not available here");
    fails(d, url, &["new", "web", "--github", "alice"], "GitHub");
    std::fs::write(
        d.join("route.yaml"),
        ok(d, url, &["new", "r", "--cidr", "10.77.0.1/24"]),
    )
    .unwrap();
    let r = ok(d, url, &["vm", "route", "./route.yaml"]);
    assert!(r.starts_with("sudo ip route add 10.77.0.0/24 via "), "{r}");

    // version and info
    assert!(ok(d, url, &["version"]).starts_with("slicer "));
    let info = ok(d, url, &["info"]);
    assert!(
        info.contains("Client: slicer") && info.contains("Server: slicer"),
        "{info}"
    );

    // add with --name, --wait, --json; the CLI's default is persistent
    let v: serde_json::Value =
        serde_json::from_str(&ok(d, url, &["vm", "add", "box", "--name", "web", "--wait", "--json"])).unwrap();
    let host = v["hostname"].as_str().unwrap().to_string();
    assert_eq!(
        (host.as_str(), &v["persistent"]),
        ("box-1", &serde_json::json!(true)),
        "{v}"
    );
    let text = ok(d, url, &["vm", "launch", "-n", "api", "--persistent=false"]);
    assert!(
        text.contains("Hostname:") && text.contains("Persistent: false"),
        "{text}"
    );
    ok(
        d,
        url,
        &["vm", "ready", "web", "--agent", "--timeout", "2m", "--interval", "50ms"],
    );
    let list = ok(d, url, &["vm", "ls"]);
    assert!(list.contains("box-1") && list.contains("name=web"), "{list}");
    assert!(ok(d, url, &["ls"]).contains("box-2"));
    assert!(ok(d, url, &["vm", "l"]).contains("box-2"));

    // exec by name: a shell by default, --shell "" runs directly, --cwd and --env
    assert_eq!(ok(d, url, &["vm", "exec", "web", "--", "echo $((6*7))"]), "42\n");
    assert_eq!(
        ok(d, url, &["vm", "exec", "web", "--shell", "", "--", "echo", "$HOME"]),
        "$HOME\n"
    );
    assert_eq!(
        ok(
            d,
            url,
            &[
                "vm",
                "exec",
                "web",
                "--cwd",
                "/tmp",
                "--env",
                "A=b",
                "--",
                "pwd; echo $A"
            ]
        ),
        "/tmp\nb\n"
    );
    assert_eq!(
        ok(d, url, &["vm", "exec", "web", "--uid", "1000", "--", "id -un"]),
        "ubuntu\n"
    );
    // A child the command leaves in the background keeps running after the exec returns.
    let t = Instant::now();
    ok(d, url, &["vm", "exec", "web", "--", "sleep 300 & echo started"]);
    assert!(t.elapsed() < Duration::from_secs(20));
    ok(d, url, &["vm", "exec", "web", "--", "pgrep -x sleep"]);

    // background execs: the three forms, list, info, logs --follow, wait, kill, remove
    let id_of = |out: String| out.trim().strip_prefix("exec_id=").unwrap().to_string();
    let direct = id_of(ok(d, url, &["vm", "bg", "exec", "web", "--", "sleep", "600"]));
    let explicit = id_of(ok(
        d,
        url,
        &["vm", "bg", "exec", "web", "-c", "echo", "-a", "one", "-a", "-two"],
    ));
    let shell = id_of(ok(
        d,
        url,
        &["bg", "exec", "web", "-s", "/bin/bash", "--", "echo $((1+1)); exit 4"],
    ));
    let info: serde_json::Value = serde_json::from_str(&ok(d, url, &["vm", "bg", "info", "web", &direct])).unwrap();
    assert_eq!(
        (info["command"].as_str(), &info["args"]),
        (Some("sleep"), &serde_json::json!(["600"])),
        "{info}"
    );
    assert_eq!(
        ok(d, url, &["vm", "bg", "logs", "web", &explicit, "--follow"]),
        "one -two\n"
    );
    let out = run(d, url, &["vm", "bg", "wait", "web", &shell, "--timeout", "1m"]);
    assert_eq!(out.status.code(), Some(4));
    // logs exit with the exec's exit code
    let out = run(d, url, &["bg", "logs", "web", &shell]);
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stdout).trim()),
        (Some(4), "2")
    );
    let list = ok(d, url, &["vm", "bg", "list", "web"]);
    assert!(list.contains(&direct) && list.contains(&explicit), "{list}");
    ok(
        d,
        url,
        &["vm", "bg", "kill", "web", &direct, "--signal", "TERM", "--grace", "2s"],
    );
    let out = run(d, url, &["vm", "bg", "wait", "web", &direct, "--timeout", "30s"]);
    assert_ne!(out.status.code(), Some(124), "killed: it ends");
    ok(d, url, &["vm", "bg", "remove", "web", &direct]);

    // tags: list, add, remove, replace; name= stays
    ok(d, url, &["vm", "tag", "web", "--add", "team=a", "--add", "job=1"]);
    ok(d, url, &["vm", "tag", "web", "--remove", "job=1"]);
    let tags = ok(d, url, &["vm", "tag", "web"]);
    assert!(
        tags.contains("team=a") && !tags.contains("job=1") && tags.contains("name=web"),
        "{tags}"
    );
    ok(d, url, &["vm", "tag", "web", "--replace", "team=b"]);
    let tags = ok(d, url, &["vm", "tag", "web"]);
    assert!(
        tags.contains("team=b") && tags.contains("name=web") && !tags.contains("team=a"),
        "{tags}"
    );

    // secrets with --name/--value; shortcuts
    ok(d, url, &["secret", "create", "--name", "tok", "--value", "s3cret"]);
    ok(d, url, &["secret", "update", "--name", "tok", "--value", "s3cret2"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = run(d, url, &["vm", "exec", "web", "--", "cat /run/slicer/secrets/tok"]);
        if String::from_utf8_lossy(&out.stdout) == "s3cret2" {
            break;
        }
        assert!(Instant::now() < deadline, "secret not updated in the guest");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ok(d, url, &["secret", "remove", "tok"]);
    assert!(ok(d, url, &["logs", "web", "--lines", "5"]).lines().count() <= 6);
    assert!(ok(d, url, &["v", "health", "web"]).contains("box-1"));

    // cp -r both ways, with --exclude and the source's .slicerignore
    let src = d.join("proj");
    std::fs::create_dir_all(src.join("src/deep")).unwrap();
    std::fs::create_dir_all(src.join("target/debug")).unwrap();
    for (f, text) in [
        ("src/main.rs", "fn main() {}\n"),
        ("src/deep/a.txt", "a\n"),
        ("target/debug/big", "x\n"),
        ("notes.log", "l\n"),
        (".slicerignore", "target/\n"),
    ] {
        std::fs::write(src.join(f), text).unwrap();
    }
    ok(d, url, &["cp", "-r", "--exclude", "*.log", "./proj", "web:/tmp/proj"]);
    assert_eq!(
        ok(
            d,
            url,
            &["vm", "exec", "web", "--", "cd /tmp/proj && find . -type f | sort"]
        ),
        "./.slicerignore\n./src/deep/a.txt\n./src/main.rs\n"
    );
    ok(
        d,
        url,
        &["vm", "cp", "-r", "--exclude", "deep/", "web:/tmp/proj", "./back"],
    );
    assert_eq!(
        std::fs::read_to_string(d.join("back/src/main.rs")).unwrap(),
        "fn main() {}\n"
    );
    assert!(!d.join("back/src/deep").exists());

    // cp places as `cp` does (SlicerVM's cp-v1): into an existing directory under the source's
    // name, `dir/.` merges the contents, a directory copy replaces its target whole
    ok(
        d,
        url,
        &[
            "vm",
            "exec",
            "web",
            "--",
            "mkdir -p /tmp/into/proj && touch /tmp/into/proj/stale",
        ],
    );
    ok(d, url, &["cp", "./proj/notes.log", "web:/tmp/into"]);
    ok(d, url, &["cp", "-r", "./proj", "web:/tmp/into"]);
    ok(d, url, &["cp", "-r", "./proj/.", "web:/tmp/merged"]);
    assert_eq!(
        ok(d, url, &["vm", "exec", "web", "--", "cd /tmp && find into merged -type f | sort"]),
        "into/notes.log\ninto/proj/.slicerignore\ninto/proj/notes.log\ninto/proj/src/deep/a.txt\ninto/proj/src/main.rs\n\
         merged/.slicerignore\nmerged/notes.log\nmerged/src/deep/a.txt\nmerged/src/main.rs\n"
    );
    std::fs::create_dir_all(d.join("local")).unwrap();
    ok(d, url, &["cp", "web:/tmp/into/notes.log", "./local"]);
    assert_eq!(std::fs::read_to_string(d.join("local/notes.log")).unwrap(), "l\n");

    // shell with a bootstrap line (stdin is not a terminal here); top of one VM
    let out = run(
        d,
        url,
        &["vm", "shell", "web", "--bootstrap", "echo boot-$((2+3)); exit 3"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("boot-5"));
    let top = ok(d, url, &["vm", "top", "web"]);
    assert!(top.contains("box-1") && !top.contains("box-2"), "{top}");

    // failure forms: one line on stderr, non-zero exit
    fails(d, url, &["vm", "add", "--name", "web"], "taken by VM box-1");
    fails(d, url, &["vm", "add", "--name", "box-7"], "looks like a hostname");
    fails(d, url, &["vm", "add", "--name", "Bad_Name"], "lowercase DNS label");
    fails(d, url, &["vm", "add", "--name", "x", "--tag", "name=y"], "not both");
    fails(d, url, &["vm", "exec", "web", "--cwd", "../..", "--", "pwd"], "..");
    fails(d, url, &["vm", "exec", "nope", "--", "true"], "VM \"nope\" not found");
    fails(d, url, &["activate", "KEY"], "not available here");
    fails(d, url, &["relaunch", "api"], "");
    let t = Instant::now();
    let out = Command::new(SLICER)
        .args(["vm", "list", "--url", "http://127.0.0.1:1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success() && t.elapsed() < Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:1") && err.trim().lines().count() == 1, "{err}");

    // delete by name
    ok(d, url, &["vm", "delete", "web"]);
    ok(d, url, &["vm", "rm", "api"]);
    assert!(!ok(d, url, &["vm", "ls"]).contains("box-"));
}
