//! `slicer-bench`: benchmarks against real guests, one suite a run (`--suite`; `boot`, the
//! default, is [`boot`]). Each prints a Markdown table and records it in docs/benchmarks.md.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use http_body_util::BodyExt;
use slicer_api::query::ExecQuery;
use slicer_api::{ApiClient, CreateNodeRequest};

mod ab;
mod boot;
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

/// The suite a run measures (`--suite`; the names are the command line's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    Boot,
    Daemon,
    Warm,
    Net,
    Jail,
    Images,
    Density,
    Livefork,
    Hold,
    Soak,
    Ab,
    Proxy,
}

// The command line: the suite and every suite's settings. (No doc comment: clap would print it
// in --help.)
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
    #[arg(long, value_enum, default_value = "boot", hide_possible_values = true)]
    suite: Suite,
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

    /// Where `--record` goes: nowhere with `--no-record`.
    fn record_to(&self) -> Option<PathBuf> {
        (!self.no_record).then(|| self.record.clone())
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| std::env::var_os("SLICER_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/lib/slicer"));
    match args.suite {
        Suite::Boot => boot::run(&args, &data_dir).await,
        Suite::Jail | Suite::Livefork | Suite::Hold | Suite::Density | Suite::Net => {
            run_vm_suite(&args, &data_dir).await
        }
        Suite::Daemon | Suite::Warm | Suite::Soak | Suite::Images | Suite::Ab | Suite::Proxy => {
            run_daemon_suite(&args, &data_dir).await
        }
    }
}

/// The suites that drive VMs through the VM library (and `net`, which also starts a daemon).
async fn run_vm_suite(args: &Args, data_dir: &Path) -> Result<()> {
    let (image, record_to) = (args.image.clone(), args.record_to());
    match args.suite {
        Suite::Net => net::run(&args.image, args.boots, data_dir.join("images"), record_to).await,
        Suite::Jail => {
            jail::run(jail::JailArgs {
                image,
                boots: args.boots,
                execs: args.execs,
                data_dir: data_dir.to_path_buf(),
                record_to,
            })
            .await
        }
        Suite::Livefork => {
            livefork::run(livefork::LiveForkArgs {
                image,
                memory_mib: args.memory,
                runs: args.boots.min(5),
                data_dir: data_dir.to_path_buf(),
                record_to,
            })
            .await
        }
        Suite::Hold => {
            slicer_vmm::raise_nofile_limit();
            hold::run(hold::HoldArgs {
                image,
                memory_mib: args.memory,
                max: args.vms,
                data_dir: data_dir.to_path_buf(),
                record_to,
            })
            .await
        }
        _ => {
            density::run(density::DensityArgs {
                image,
                vms: args.vms,
                memory_mib: args.memory,
                data_dir: data_dir.to_path_buf(),
                record_to,
            })
            .await
        }
    }
}

/// The suites that measure a daemon (in this process, or `slicer` binaries for `ab` and
/// `proxy`).
async fn run_daemon_suite(args: &Args, data_dir: &Path) -> Result<()> {
    let (image, images_dir, record_to) = (args.image.clone(), data_dir.join("images"), args.record_to());
    match args.suite {
        Suite::Ab => {
            let old = args
                .old
                .clone()
                .context("--suite ab needs --old (the slicer binary to compare against)")?;
            let (new, rounds, execs) = (args.new.clone(), args.boots, args.execs);
            ab::run(ab::AbArgs {
                old,
                new,
                image,
                rounds,
                execs,
                images_dir,
                record_to,
            })
            .await
        }
        Suite::Proxy => proxy::run(&args.new, args.transfer_mib, args.execs, record_to.as_deref()).await,
        Suite::Warm => {
            let (creates, burst, memory_mib) = (args.boots, args.burst, args.memory);
            warm::run(warm::WarmArgs {
                image,
                creates,
                burst,
                memory_mib,
                images_dir,
                record_to,
            })
            .await
        }
        Suite::Soak => {
            let (secs, clients) = (args.secs, args.clients);
            soak::run(soak::SoakArgs {
                image,
                secs,
                clients,
                images_dir,
                record_to,
            })
            .await
        }
        Suite::Images => {
            let agent = args
                .agent
                .clone()
                .or_else(|| std::env::var_os("SLICER_AGENT").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("/usr/local/lib/slicer/slicer-agent"));
            let runs = args.boots.min(5);
            images::run(images::ImagesArgs {
                runs,
                images_dir,
                agent,
                record_to,
            })
            .await
        }
        _ => {
            let (creates, burst) = (args.boots, args.burst);
            daemon::run(daemon::DaemonArgs {
                image,
                creates,
                burst,
                images_dir,
                record_to,
            })
            .await
        }
    }
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

/// The query of a create that answers once the VM's agent is up (within `timeout`, e.g. "5m",
/// when given).
pub fn wait_agent(timeout: Option<&str>) -> Vec<(&'static str, String)> {
    let mut q = vec![("wait", "agent".to_string())];
    q.extend(timeout.map(|t| ("timeout", t.to_string())));
    q
}

/// Creates a VM in `group` (the group's defaults) and waits for its agent: its hostname.
pub async fn create_vm(c: &ApiClient, group: &str, timeout: Option<&str>) -> Result<String> {
    let r = c
        .create_node(group, &CreateNodeRequest::default(), &wait_agent(timeout))
        .await?;
    Ok(r.hostname)
}

/// Runs `q` on `h` buffered (`buffered=true`): the daemon's JSON answer (exit code and output).
pub async fn exec_buffered(c: &ApiClient, h: &str, q: ExecQuery) -> Result<serde_json::Value> {
    let q = ExecQuery { buffered: true, ..q };
    let r = c.vm_exec(h, &q, slicer_api::client::empty()).await?;
    let body = r.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

/// The exec query of a command line `cmd` (run as the daemon runs a bare `cmd`).
pub fn cmd(cmd: &str) -> ExecQuery {
    ExecQuery {
        cmd: cmd.to_string(),
        ..Default::default()
    }
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
