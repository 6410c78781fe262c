//! `slicer-bench --suite net`: what an isolated network adds to a create, and the round trip
//! from a VM to a test host in a namespace this benchmark creates (198.18.9.0/24).

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{cmd, create_vm, exec_buffered, median, record};

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

struct TestHost;

impl TestHost {
    fn new() -> Result<TestHost> {
        let _ = TestHost::remove();
        ip(&["netns", "add", "slbench-host"])?;
        ip(&[
            "link",
            "add",
            "slb-host",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            "slbench-host",
        ])?;
        ip(&["addr", "add", "198.18.9.1/24", "dev", "slb-host"])?;
        ip(&["link", "set", "slb-host", "up"])?;
        ip(&["-n", "slbench-host", "addr", "add", "198.18.9.2/24", "dev", "eth0"])?;
        ip(&["-n", "slbench-host", "link", "set", "eth0", "up"])?;
        Ok(TestHost)
    }
    fn remove() -> Result<()> {
        let _ = Command::new("ip").args(["link", "del", "slb-host"]).output();
        let _ = Command::new("ip").args(["netns", "del", "slbench-host"]).output();
        Ok(())
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = TestHost::remove();
    }
}

pub async fn run(
    image: &str,
    n: usize,
    images_dir: std::path::PathBuf,
    record_to: Option<std::path::PathBuf>,
) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("slicer-bench-net-").tempdir()?;
    let groups = format!(
        "  - name: plain\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    image: {image}\n    network: {{mode: none}}\n  - name: iso\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    image: {image}\n    network: {{mode: isolated, range: 169.254.240.0/22}}\n"
    );
    let (d, c) = crate::bench_daemon(tmp.path(), &groups, &images_dir).await?;
    let create = |group: &'static str| {
        let c = c.clone();
        async move {
            let t = Instant::now();
            let h = create_vm(&c, group, None).await?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            Ok::<_, anyhow::Error>((ms, h))
        }
    };
    let (mut plain, mut iso) = (Vec::new(), Vec::new());
    for i in 0..n {
        for (group, out) in [("plain", &mut plain), ("iso", &mut iso)] {
            let (ms, h) = create(group).await?;
            out.push(ms);
            c.delete_node(group, &h).await?;
        }
        eprintln!("create {i}: none {:.0} ms, isolated {:.0} ms", plain[i], iso[i]);
    }

    let host = TestHost::new()?;
    let (_, h) = create("iso").await?;
    let v = exec_buffered(&c, &h, cmd("ping -q -c 20 -i 0.2 198.18.9.2")).await?;
    let out = v["stdout"].as_str().unwrap_or_default();
    // rtt min/avg/max/mdev = 0.512/0.873/1.900/0.300 ms
    let avg: f64 = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("ping output: {out}"))?;
    c.delete_node("iso", &h).await?;
    drop(host);
    let accel = crate::daemon_accel(&d, image).await?;
    d.stop().await;

    let (p, i) = (median(plain), median(iso));
    let table = format!(
        "| measure ({image} image, {accel}, 1 vCPU, 256 MiB) | value |\n|---|---|\n\
         | create?wait=agent (template restore), no network, median of {n} | {p:.0} ms |\n\
         | create?wait=agent (template restore), isolated network, median of {n} | {i:.0} ms |\n\
         | added by the isolated network (netns, veth, TAP, nftables table) | {:.0} ms ({:.2}×) |\n\
         | VM → test host round trip (ping, mean of 20, through TAP, bridge, veth, nftables, NAT) | {avg:.2} ms |\n",
        i - p,
        i / p
    );
    println!("{table}");
    if let Some(path) = record_to {
        record(&path, &format!("net-{image}"), &table)?;
    }
    Ok(())
}
