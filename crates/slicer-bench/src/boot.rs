//! `slicer-bench boot` (the default suite): boot-to-agent against a raw QEMU boot of the same
//! kernel and root filesystem, exec round trip, and transfer throughput, measured side by side
//! in one run.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use slicer_hypervisor::QemuProcess;
use slicer_vmm::{ExecRequest, Host, Vm, VmSpec};

use crate::{median, record, Args};

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

/// Boot times in ms, one per boot of each kind, interleaved so that noise hits all kinds alike.
struct Boots {
    /// Raw QEMU to the init marker.
    raw: Vec<f64>,
    /// Slicer VM to agent ready.
    ours: Vec<f64>,
    /// Raw QEMU with `--compare-kernel` (empty without it).
    other: Vec<f64>,
}

async fn boots(host: &Host, image: &slicer_image::Image, tmp: &Path, args: &Args) -> Result<Boots> {
    let mut b = Boots {
        raw: Vec::new(),
        ours: Vec::new(),
        other: Vec::new(),
    };
    for i in 0..args.boots {
        let t = raw_boot(host, image, &tmp.join(format!("raw-{i}")), args).await?;
        b.raw.push(t.as_secs_f64() * 1000.0);
        if let Some(k) = &args.compare_kernel {
            let mut img = image.clone();
            img.kernel = k.clone();
            let t = raw_boot(host, &img, &tmp.join(format!("other-{i}")), args).await?;
            b.other.push(t.as_secs_f64() * 1000.0);
        }
        let vm = Vm::boot(host, &spec(format!("bench-{i}"), args)).await?;
        b.ours.push(vm.boot_time().as_secs_f64() * 1000.0);
        vm.stop(Duration::ZERO).await?;
        eprintln!("boot {i}: raw {:.0} ms, slicer {:.0} ms", b.raw[i], b.ours[i]);
    }
    Ok(b)
}

/// What one running VM measures: round trips (ms), the in-guest floor (ms), transfers (MB/s).
struct Io {
    health: Vec<f64>,
    rtt: Vec<f64>,
    floor_ms: f64,
    up: f64,
    down: f64,
    reconnect: Vec<f64>,
}

/// Health and exec round trips, `n` of each, in ms.
async fn round_trips(agent: &slicer_vmm::agent::AgentClient, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut health = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        agent.health().await?;
        health.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut rtt = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let out = agent.exec_output(&ExecRequest::argv(["true"]), None).await?;
        rtt.push(t.elapsed().as_secs_f64() * 1000.0);
        if !out.status.success() {
            bail!("true failed: {:?}", out.status);
        }
    }
    Ok((health, rtt))
}

/// The floor: the guest's own cost of starting /bin/true, timed inside the guest by bash (ms).
async fn floor_ms(agent: &slicer_vmm::agent::AgentClient, n: usize) -> Result<f64> {
    let floor_cmd =
        format!("s=$(date +%s%N); for i in $(seq {n}); do /bin/true; done; e=$(date +%s%N); echo $(( (e - s) / {n} ))");
    let out = agent
        .exec_output(&ExecRequest::argv(["bash", "-c", &floor_cmd]), None)
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .context("floor output")?
        / 1e6)
}

/// Upload then download of `--transfer-mib` random bytes: (up, down) in MB/s.
async fn transfers(agent: &slicer_vmm::agent::AgentClient, args: &Args) -> Result<(f64, f64)> {
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
    Ok((up, down))
}

/// Boots one VM and takes the [`Io`] measures on it.
async fn io(host: &Host, args: &Args) -> Result<Io> {
    let vm = Vm::boot(host, &spec("bench-io".into(), args)).await?;
    let agent = vm.agent();
    let (health, rtt) = round_trips(agent, args.execs).await?;
    let floor_ms = floor_ms(agent, args.execs).await?;
    let (up, down) = transfers(agent, args).await?;
    let reconnect = reconnects(agent, args.reconnects).await?;
    vm.stop(Duration::ZERO).await?;
    Ok(Io {
        health,
        rtt,
        floor_ms,
        up,
        down,
        reconnect,
    })
}

/// Runs the boot suite: prints its table and records it unless `--no-record`.
pub async fn run(args: &Args, data_dir: &Path) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("slicer-bench-").tempdir()?;
    let host = Host::new(data_dir, tmp.path());
    let image = host.images.get(&args.image)?;
    let accel = host.accel(&image.kernel).await?;
    let b = boots(&host, &image, tmp.path(), args).await?;
    let io = io(&host, args).await?;
    let mut table = table(args, accel.as_str(), &b, io);
    if let Some(k) = &args.compare_kernel {
        table.push_str(&compared_kernel_row(k, &image.kernel, &b));
    }
    println!("{table}");
    if !args.no_record {
        record(&args.record, &format!("boot-{}-{}cpu", args.image, args.cpus), &table)?;
    }
    Ok(())
}

/// The suite's table (without the compared kernel's row).
fn table(args: &Args, accel: &str, b: &Boots, io: Io) -> String {
    let (raw_m, ours_m) = (median(b.raw.clone()), median(b.ours.clone()));
    format!(
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
        accel,
        args.cpus,
        args.memory,
        args.boots,
        raw_m,
        ours_m,
        ours_m / raw_m,
        args.execs,
        median(io.health),
        io.reconnect.len(),
        median(io.reconnect),
        args.execs,
        median(io.rtt),
        args.execs,
        io.floor_ms,
        args.transfer_mib,
        io.up,
        args.transfer_mib,
        io.down
    )
}

/// The row of raw boots with `--compare-kernel` `k` against this image's `kernel`.
fn compared_kernel_row(k: &Path, kernel: &Path, b: &Boots) -> String {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() >> 10).unwrap_or(0);
    let (raw_m, other_m) = (median(b.raw.clone()), median(b.other.clone()));
    format!(
        "| raw QEMU boot with the compared kernel ({} KiB; this image's: {} KiB), median | {:.0} ms | this kernel / compared: {:.2}× |\n",
        size(k),
        size(kernel),
        other_m,
        raw_m / other_m
    )
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
