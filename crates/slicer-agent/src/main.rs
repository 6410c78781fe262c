//! slicer-agent: the guest side of slicer.
//!
//! As PID 1 (the `min` image) it first does an init's job: mounts, hostname, loopback, DNS,
//! reaping orphans and a clean poweroff. Under another init (the `systemd` image) it only
//! serves. Either way it serves the agent protocol (see `slicer_agent_proto`) on the
//! virtio-serial port named `slicer.agent`, or on a UNIX socket with `--listen-unix PATH`
//! (used by tests on the host).

mod bg;
mod ca;
mod exec;
mod files;
mod fs;
mod identity;
mod init;
mod reaper;
mod server;
mod stats;
mod stream;
mod transport;
mod user;
mod watch;

use std::sync::Arc;
use std::time::Instant;

fn usage() -> ! {
    eprintln!("usage: slicer-agent [--port-name NAME | --port-path PATH | --listen-unix PATH]");
    eprintln!("       slicer-agent ca list [--json] | ca show SHORT | ca remove SHORT | ca wipe");
    std::process::exit(2)
}

enum Listen {
    PortName(String),
    PortPath(String),
    Unix(String),
}

fn main() {
    let started = Instant::now();
    let pid1 = std::process::id() == 1;
    // `slicer-agent ca …`: a command run in the guest, not the agent.
    let argv: Vec<String> = std::env::args().collect();
    if !pid1 && argv.get(1).map(String::as_str) == Some("ca") {
        std::process::exit(ca::cli(&argv[2..]));
    }
    if pid1 {
        init::early_setup();
    } else {
        // Under an init system: still take the identity slicer gave this VM.
        init::configure_identity();
    }
    let mut listen = Listen::PortName(slicer_agent_proto::AGENT_PORT_NAME.to_string());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port-name" => listen = Listen::PortName(args.next().unwrap_or_else(|| usage())),
            "--port-path" => listen = Listen::PortPath(args.next().unwrap_or_else(|| usage())),
            "--listen-unix" => listen = Listen::Unix(args.next().unwrap_or_else(|| usage())),
            "--version" => {
                println!("slicer-agent {}", slicer_agent_proto::VERSION);
                return;
            }
            // The kernel passes unknown boot parameters to init as arguments: ignore them as PID 1.
            _ if pid1 => {}
            _ => usage(),
        }
    }
    // One worker per vCPU: on a 1-vCPU guest extra workers only add cross-thread wakeups.
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(64)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("slicer-agent: cannot start runtime: {e}");
            if pid1 {
                init::halt_forever();
            }
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async move {
        let reaper = reaper::Reaper::start()?;
        let state = Arc::new(server::State::new(started, pid1, reaper));
        // Off the boot path: the agent answers while the filesystem grows. Only in a VM (a
        // virtio port): on a host (`--listen-unix`, the protocol tests) /dev/vda is the
        // host's own disk.
        if !matches!(listen, Listen::Unix(_)) {
            tokio::spawn(init::grow_root(state.reaper.clone()));
        }
        if pid1 {
            init::spawn_signal_handlers();
        }
        match listen {
            Listen::Unix(path) => transport::serve_unix(&path, state).await,
            Listen::PortPath(path) => transport::serve_port(&path, state).await,
            Listen::PortName(name) => {
                let path = transport::find_port(&name).await?;
                transport::serve_port(&path, state).await
            }
        }
    });
    if let Err(e) = result {
        eprintln!("slicer-agent: {e:#}");
        if pid1 {
            init::halt_forever();
        }
        std::process::exit(1);
    }
}
