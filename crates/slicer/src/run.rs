//! `slicer run`: one command in a throwaway VM, streamed, exiting with the command's code.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use slicer_hypervisor::AccelChoice;
use slicer_vmm::agent::ExecEvent;
use slicer_vmm::{ExecRequest, Host, Vm, VmSpec};

#[derive(Args)]
pub struct RunArgs {
    /// Image to boot (min, systemd, or a reference pulled with `slicer image pull`).
    #[arg(long, default_value = "min")]
    image: String,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// auto (KVM where it can boot our guest, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: AccelChoice,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

pub fn run(args: RunArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let code = rt.block_on(async move {
        let data_dir = crate::data_dir(args.data_dir);
        let vm_root = data_dir.join("run");
        let mut host = Host::new(&data_dir, &vm_root);
        host.accel_choice = args.accel;
        let name = format!("run-{}", std::process::id());
        let mut spec = VmSpec::new(name, &args.image);
        spec.cpus = args.cpus;
        spec.memory_mib = args.memory;
        let vm = Vm::boot(&host, &spec).await?;
        eprintln!(
            "booted {} ({}, {}) in {} ms",
            vm.name,
            vm.image.name,
            vm.accel.as_str(),
            vm.boot_time().as_millis()
        );
        let result = async {
            let mut p = vm.agent().exec(&ExecRequest::argv(args.command.clone())).await?;
            loop {
                match p.next_event().await? {
                    Some(ExecEvent::Stdout(b)) => std::io::stdout().write_all(&b)?,
                    Some(ExecEvent::Stderr(b)) => std::io::stderr().write_all(&b)?,
                    Some(ExecEvent::Exit(st)) => return Ok::<i32, anyhow::Error>(st.shell_code()),
                    None => anyhow::bail!("the command's output ended without an exit status"),
                }
            }
        }
        .await;
        vm.stop(Duration::from_secs(10)).await?;
        result
    })?;
    std::process::exit(code)
}
