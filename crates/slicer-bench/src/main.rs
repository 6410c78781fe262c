//! `slicer-bench boot`: boot-to-agent against a raw QEMU boot of the same kernel and root
//! filesystem, exec round trip, and transfer throughput, measured side by side in one run.
//! Prints a Markdown table and records it in docs/benchmarks.md.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use slicer_hypervisor::QemuProcess;
use slicer_vmm::{ExecRequest, Host, Vm, VmSpec};

mod ab;
mod daemon;
mod density;
mod hold;
mod images;
mod jail;
mod livefork;
mod net;
mod proxy;
mod soak;
mod warm;

#[derive(Parser)]
pub struct Args {
    /// `boot` (VM library: boot, exec, transfers), `daemon` (REST API: creates, list), `warm`
    /// (cold boot against template restore), `net` (isolated networking), `jail` (jailed
    /// and cgroup-limited QEMUs against plain ones), `images` (OCI pull and convert; fork
    /// against template create) or `density` (idle restored VMs: PSS, CPU, restore time, with
    /// the template's RAM shared and not), `livefork` (live commit and fork against a template
    /// create), `hold` (idle VMs added until latency, memory or `--vms` stops it) or `soak`
    /// (clients creating, using and deleting sandboxes for `--secs`; leaks, RSS, percentiles),
    /// `ab` (two `slicer` builds, `--old` and `--new`, side by side: creates and exec), `proxy`
    /// (Slicer Proxy against direct: downloads of `--transfer-mib`, `--execs` request
    /// latencies, connection rate, RSS with 1,000 tunnels; the proxy is `--new`'s).
    #[arg(long, default_value = "boot")]
    suite: String,
    /// Concurrent creates in the daemon suite.
    #[arg(long, default_value_t = 16)]
    burst: usize,
    /// Image to measure.
    #[arg(long, default_value = "min")]
    image: String,
    /// Boots of each kind (medians are reported).
    #[arg(long, default_value_t = 10)]
    boots: usize,
    /// Exec round trips.
    #[arg(long, default_value_t = 100)]
    execs: usize,
    /// Boot suite: agent reconnects (a new session, as after a daemon restart).
    #[arg(long, default_value_t = 10)]
    reconnects: usize,
    /// Transfer size in MiB.
    #[arg(long, default_value_t = 64)]
    transfer_mib: usize,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Markdown file to update (the section between the bench markers).
    #[arg(long, default_value = "docs/benchmarks.md")]
    record: PathBuf,
    #[arg(long)]
    no_record: bool,
    /// vCPUs and memory (MiB) of the guests.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Guest file the transfers write and read.
    #[arg(long, default_value = "/root/bench.bin")]
    transfer_path: String,
    /// Boot suite: also boot raw QEMU with this kernel (e.g. a build of an older config),
    /// interleaved, to compare kernels side by side.
    #[arg(long)]
    compare_kernel: Option<PathBuf>,
    /// Density suite: idle VMs of each kind; hold suite: the most VMs to add.
    #[arg(long, default_value_t = 20)]
    vms: usize,
    /// Soak suite: seconds to run after the first round, and concurrent clients.
    #[arg(long, default_value_t = 1200)]
    secs: u64,
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Images suite: the static agent pulled images get (default: setup's install).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Ab suite: the `slicer` binary of the build before a change.
    #[arg(long)]
    old: Option<PathBuf>,
    /// Ab suite: the `slicer` binary of the build after it (default: this build's).
    #[arg(long, default_value = "target/release/slicer")]
    new: PathBuf,
}

impl Args {
    /// The raw-boot settings the daemon suite compares against (1 vCPU, 256 MiB).
    pub fn for_daemon(image: &str) -> Args {
        let mut a = Args::parse_from(["slicer-bench"]);
        a.image = image.to_string();
        a
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

const MARKER: &str = "@@RAW-INIT@@";

/// QEMU with the same machine, devices, kernel and disk as a slicer VM, but `/bin/sh` as init
/// printing a marker as its prompt: the time from spawn to the marker on the console.
fn spec(name: String, args: &Args) -> VmSpec {
    let mut s = VmSpec::new(name, &args.image);
    s.cpus = args.cpus;
    s.memory_mib = args.memory;
    s
}

pub async fn raw_boot(host: &Host, image: &slicer_image::Image, dir: &Path, args: &Args) -> Result<Duration> {
    let accel = host.accel(&image.kernel).await?;
    std::fs::create_dir_all(dir)?;
    let mut cfg = host.qemu_config("raw", dir, accel, image, args.cpus, args.memory);
    // Raw: the console straight into a file, not jailed.
    cfg.console_socket = None;
    slicer_storage::create_overlay(&image.rootfs, &cfg.disk, None).await?;
    // The kernel hands unknown `k=v` parameters to init as environment: the interactive shell
    // on the console prints PS1 once it is up. (Arguments after `--` would swallow the
    // virtio_mmio.device= parameters QEMU appends.)
    cfg.cmdline = vec!["init=/bin/sh".into(), format!("PS1={MARKER}")];
    let t0 = Instant::now();
    let q = QemuProcess::spawn(&cfg).await?;
    let deadline = t0 + Duration::from_secs(60);
    let took = loop {
        if std::fs::read_to_string(&cfg.console_log)
            .unwrap_or_default()
            .contains(MARKER)
        {
            break t0.elapsed();
        }
        if Instant::now() > deadline || q.try_status().is_some() {
            q.kill();
            bail!(
                "raw boot did not print its marker; console: {}",
                std::fs::read_to_string(&cfg.console_log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    q.kill();
    q.wait().await;
    std::fs::remove_dir_all(dir)?;
    Ok(took)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| std::env::var_os("SLICER_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/lib/slicer"));
    if args.suite == "ab" {
        return ab::run(ab::AbArgs {
            old: args
                .old
                .clone()
                .context("--suite ab needs --old (the slicer binary to compare against)")?,
            new: args.new.clone(),
            image: args.image.clone(),
            rounds: args.boots,
            execs: args.execs,
            images_dir: data_dir.join("images"),
            record_to: (!args.no_record).then(|| args.record.clone()),
        })
        .await;
    }
    if args.suite == "proxy" {
        let record_to = (!args.no_record).then_some(args.record.as_path());
        return proxy::run(&args.new, args.transfer_mib, args.execs, record_to).await;
    }
    if args.suite == "net" {
        return net::run(
            &args.image,
            args.boots,
            data_dir.join("images"),
            (!args.no_record).then(|| args.record.clone()),
        )
        .await;
    }
    if args.suite == "jail" {
        return jail::run(jail::JailArgs {
            image: args.image.clone(),
            boots: args.boots,
            execs: args.execs,
            data_dir: data_dir.clone(),
            record_to: (!args.no_record).then(|| args.record.clone()),
        })
        .await;
    }
    if args.suite == "warm" {
        return warm::run(warm::WarmArgs {
            image: args.image.clone(),
            creates: args.boots,
            burst: args.burst,
            memory_mib: args.memory,
            images_dir: data_dir.join("images"),
            record_to: (!args.no_record).then(|| args.record.clone()),
        })
        .await;
    }
    if args.suite == "livefork" {
        return livefork::run(livefork::LiveForkArgs {
            image: args.image.clone(),
            memory_mib: args.memory,
            runs: args.boots.min(5),
            data_dir: data_dir.clone(),
            record_to: (!args.no_record).then(|| args.record.clone()),
        })
        .await;
    }
    if args.suite == "soak" {
        return soak::run(soak::SoakArgs {
            image: args.image.clone(),
            secs: args.secs,
            clients: args.clients,
            images_dir: data_dir.join("images"),
            record_to: (!args.no_record).then(|| args.record.clone()),
        })
        .await;
    }
    if args.suite == "hold" {
        slicer_vmm::raise_nofile_limit();
        return hold::run(hold::HoldArgs {
            image: args.image.clone(),
            memory_mib: args.memory,
            max: args.vms,
            data_dir: data_dir.clone(),
            record_to: (!args.no_record).then(|| args.record.clone()),
        })
        .await;
    }
    if args.suite == "density" {
        return density::run(density::DensityArgs {
            image: args.image.clone(),
            vms: args.vms,
            memory_mib: args.memory,
            data_dir: data_dir.clone(),
            record_to: (!args.no_record).then(|| args.record.clone()),
        })
        .await;
    }
    if args.suite == "images" {
        let agent = args
            .agent
            .clone()
            .or_else(|| std::env::var_os("SLICER_AGENT").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/usr/local/lib/slicer/slicer-agent"));
        return images::run(images::ImagesArgs {
            runs: args.boots.min(5),
            images_dir: data_dir.join("images"),
            agent,
            record_to: (!args.no_record).then(|| args.record.clone()),
        })
        .await;
    }
    if args.suite == "daemon" {
        return daemon::run(daemon::DaemonArgs {
            image: args.image.clone(),
            creates: args.boots,
            burst: args.burst,
            images_dir: data_dir.join("images"),
            record_to: (!args.no_record).then(|| args.record.clone()),
        })
        .await;
    }
    let tmp = tempfile::Builder::new().prefix("slicer-bench-").tempdir()?;
    let host = Host::new(&data_dir, tmp.path());
    let image = host.images.get(&args.image)?;
    let accel = host.accel(&image.kernel).await?;

    // Boots, interleaved so that noise hits both kinds alike.
    let (mut raw, mut ours, mut other) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.boots {
        raw.push(
            raw_boot(&host, &image, &tmp.path().join(format!("raw-{i}")), &args)
                .await?
                .as_secs_f64()
                * 1000.0,
        );
        if let Some(k) = &args.compare_kernel {
            let mut img = image.clone();
            img.kernel = k.clone();
            let t = raw_boot(&host, &img, &tmp.path().join(format!("other-{i}")), &args).await?;
            other.push(t.as_secs_f64() * 1000.0);
        }
        let vm = Vm::boot(&host, &spec(format!("bench-{i}"), &args)).await?;
        ours.push(vm.boot_time().as_secs_f64() * 1000.0);
        vm.stop(Duration::ZERO).await?;
        eprintln!("boot {i}: raw {:.0} ms, slicer {:.0} ms", raw[i], ours[i]);
    }

    let vm = Vm::boot(&host, &spec("bench-io".into(), &args)).await?;
    let agent = vm.agent();
    let mut health = Vec::new();
    for _ in 0..args.execs {
        let t = Instant::now();
        agent.health().await?;
        health.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut rtt = Vec::new();
    for _ in 0..args.execs {
        let t = Instant::now();
        let out = agent.exec_output(&ExecRequest::argv(["true"]), None).await?;
        rtt.push(t.elapsed().as_secs_f64() * 1000.0);
        if !out.status.success() {
            bail!("true failed: {:?}", out.status);
        }
    }
    // The floor: the guest's own cost of starting /bin/true, timed inside the guest by bash.
    let floor_cmd = format!(
        "s=$(date +%s%N); for i in $(seq {n}); do /bin/true; done; e=$(date +%s%N); echo $(( (e - s) / {n} ))",
        n = args.execs
    );
    let out = agent
        .exec_output(&ExecRequest::argv(["bash", "-c", &floor_cmd]), None)
        .await?;
    let floor_ms: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .context("floor output")?
        / 1e6;
    let size = args.transfer_mib << 20;
    let data: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
    let t = Instant::now();
    agent
        .upload_file(&args.transfer_path, None, None, std::io::Cursor::new(data))
        .await
        .context("upload")?;
    let up = size as f64 / 1e6 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut d = agent.download_file(&args.transfer_path).await?;
    let mut sink = tokio::io::sink();
    let n = d.copy_to(&mut sink).await?;
    let down = n as f64 / 1e6 / t.elapsed().as_secs_f64();
    // Nothing of the session may stay open: QEMU serves one client at a time.
    drop(d);
    let reconnect = reconnects(agent, args.reconnects).await?;
    vm.stop(Duration::ZERO).await?;

    let (raw_m, ours_m) = (median(raw), median(ours));
    let table = format!(
        "| measure ({} image, {}, {} vCPU, {} MiB, {} boots) | value | target |\n|---|---|---|\n\
         | raw QEMU boot to init marker, median | {:.0} ms | — |\n\
         | slicer boot to agent ready (overlay + QEMU + agent handshake + health), median | {:.0} ms | — |\n\
         | ratio slicer / raw | {:.2}× | ≤ 1.25× |\n\
         | agent health round trip (no process), median of {} | {:.2} ms | — |\n\
         | agent reconnect: new session (handshake) + health, as after a daemon restart, median of {} | {:.1} ms | — |\n\
         | exec `true` round trip, median of {} | {:.1} ms | ≤ 25 ms |\n\
         | in-guest floor: bash starting `/bin/true`, mean of {} | {:.1} ms | — |\n\
         | upload {} MiB | {:.0} MB/s | ≥ 50 MB/s |\n\
         | download {} MiB | {:.0} MB/s | ≥ 50 MB/s |\n",
        args.image,
        accel.as_str(),
        args.cpus,
        args.memory,
        args.boots,
        raw_m,
        ours_m,
        ours_m / raw_m,
        args.execs,
        median(health),
        reconnect.len(),
        median(reconnect),
        args.execs,
        median(rtt),
        args.execs,
        floor_ms,
        args.transfer_mib,
        up,
        args.transfer_mib,
        down
    );
    let mut table = table;
    if let Some(k) = &args.compare_kernel {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() >> 10).unwrap_or(0);
        table.push_str(&format!(
            "| raw QEMU boot with the compared kernel ({} KiB; this image's: {} KiB), median | {:.0} ms | this kernel / compared: {:.2}× |\n",
            size(k),
            size(&image.kernel),
            median(other.clone()),
            raw_m / median(other)
        ));
    }
    println!("{table}");
    if !args.no_record {
        record(&args.record, &format!("boot-{}-{}cpu", args.image, args.cpus), &table)?;
    }
    Ok(())
}

/// Milliseconds from a new client's first request to its answer, `n` times, on a guest whose
/// agent had a session: what a restarted daemon waits for once it adopts a running VM (the
/// previous session closed, then the resync handshake, the HTTP/2 handshake and a health
/// round trip); at least once. `agent` is closed first and reconnects when next used.
async fn reconnects(agent: &slicer_vmm::agent::AgentClient, n: usize) -> Result<Vec<f64>> {
    let mut took = Vec::new();
    agent.reset().await;
    for i in 0..n.max(1) {
        // The previous session is gone before the clock starts, as the old daemon's is.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let fresh = slicer_vmm::agent::AgentClient::new(agent.socket_path());
        let t = Instant::now();
        // As a restarted daemon does (`wait_ready`): connect, handshake, health, retried
        // until the guest answers.
        fresh
            .wait_ready(Duration::from_secs(15))
            .await
            .with_context(|| format!("health on reconnect {i}"))?;
        took.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(took)
}

/// A daemon in this process on a free loopback port, with the host groups `groups` (YAML list
/// items under `host_groups`) and its data in `dir/data`; and a client with its token.
pub async fn bench_daemon(
    dir: &Path,
    groups: &str,
    images_dir: &Path,
) -> Result<(slicer_daemon::Daemon, slicer_api::ApiClient)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = dir.join("slicer.yaml");
    std::fs::write(
        &config,
        format!(
            "config:\n  host_groups:\n{groups}  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
        ),
    )?;
    let d = slicer_daemon::start(&slicer_daemon::UpOptions {
        config,
        data_dir: dir.join("data"),
        images_dir: Some(images_dir.to_path_buf()),
        agent: None,
    })
    .await?;
    let c = slicer_api::ApiClient::new(&format!("http://127.0.0.1:{port}"), d.token.clone())?;
    Ok((d, c))
}

/// What the in-process daemon `d` runs `image`'s VMs with, `kvm` or `tcg` (resolved once per
/// host: this is what its VMs used), for the tables.
pub async fn daemon_accel(d: &slicer_daemon::Daemon, image: &str) -> Result<&'static str> {
    Ok(d.manager.accelerator(image).await?.as_str())
}

/// Replaces the section between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`, or appends it.
pub fn record(path: &Path, name: &str, table: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let (open, close) = (format!("<!-- bench:{name} -->"), format!("<!-- /bench:{name} -->"));
    let when = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let block = format!("{open}\nRecorded {when} by `scripts/bench.sh`.\n\n{table}{close}");
    let new = match (text.find(&open), text.find(&close)) {
        (Some(a), Some(b)) if b > a => format!("{}{}{}", &text[..a], block, &text[b + close.len()..]),
        _ => format!("{}\n{}\n", text.trim_end(), block),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}
