//! Choosing between KVM and TCG.
//!
//! `auto` must pick KVM only where KVM can boot our guest. Some hosts expose a `/dev/kvm` that
//! cannot (nested "PVM" KVM: no vmx/svm, a stock kernel dies in the instruction emulator), so
//! `auto` checks, in order and cheaply first: `/dev/kvm` opens read-write; the CPU advertises
//! vmx or svm; then a bounded probe boot of our kernel under KVM must reach the point where it
//! looks for a root filesystem. The probe's answer is cached per host kernel, QEMU and guest
//! kernel.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            o => Err(format!("unknown acceleration {o:?}: expected auto, kvm or tcg")),
        }
    }
}

/// What a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Why KVM is not usable, if it is not, from cheap checks only.
pub fn kvm_quick_check() -> std::result::Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").map_err(|e| format!("/proc/cpuinfo: {e}"))?;
    let has_hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !has_hw_virt {
        return Err(
            "the CPU advertises neither vmx nor svm (a paravirtual /dev/kvm such as PVM cannot boot a stock guest)"
                .into(),
        );
    }
    Ok(())
}

/// TSC frequency in kHz for `tsc_early_khz=` (TCG's PIT calibration fails under load).
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

#[derive(Serialize, Deserialize)]
struct ProbeCache {
    key: String,
    kvm_boots: bool,
}

/// Boots `kernel` under KVM without a root disk and reports whether it got as far as
/// mounting root (a panic about the root filesystem means the whole kernel init ran).
pub async fn probe_kvm_boot(qemu: &Path, kernel: &Path, timeout: Duration) -> Result<bool> {
    let mut child = tokio::process::Command::new(qemu)
        .args([
            "-M",
            "microvm,x-option-roms=off,acpi=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
        ])
        .args([
            "-m",
            "128",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 reboot=t panic=-1"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Spawn {
            binary: qemu.to_path_buf(),
            source,
        })?;
    let mut out = child.stdout.take().ok_or_else(|| Error::Probe {
        reason: "no stdout of the probe's QEMU".into(),
    })?;
    let read = async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = out.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return false;
            }
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen);
            if text.contains("VFS: Unable to mount root") || text.contains("Kernel panic") {
                return true;
            }
            if seen.len() > 1 << 20 {
                seen.drain(..seen.len() - 4096);
            }
        }
    };
    let ok = tokio::time::timeout(timeout, read).await.unwrap_or(false);
    let _ = child.kill().await;
    Ok(ok)
}

/// Resolves `choice` to what VMs run with. `cache_dir` keeps the probe's answer.
pub async fn resolve(choice: AccelChoice, qemu: &Path, kernel: &Path, cache_dir: &Path) -> Result<Accel> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => {
            if let Err(why) = kvm_quick_check() {
                return Err(Error::KvmUnusable { reason: why });
            }
            Ok(Accel::Kvm)
        }
        AccelChoice::Auto => {
            if let Err(why) = kvm_quick_check() {
                tracing::info!("using TCG: {why}");
                return Ok(Accel::Tcg);
            }
            let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            let kmeta = std::fs::metadata(kernel).map_err(|e| Error::io(format!("kernel {}", kernel.display()), e))?;
            let key = format!(
                "{}|{}|{}|{}|{:?}",
                host.trim(),
                qemu.display(),
                kernel.display(),
                kmeta.len(),
                kmeta.modified().ok()
            );
            let cache = cache_dir.join("accel-probe.json");
            if let Ok(raw) = std::fs::read(&cache) {
                if let Ok(c) = serde_json::from_slice::<ProbeCache>(&raw) {
                    if c.key == key {
                        return Ok(if c.kvm_boots { Accel::Kvm } else { Accel::Tcg });
                    }
                }
            }
            let kvm_boots = probe_kvm_boot(qemu, kernel, Duration::from_secs(5)).await?;
            tracing::info!("KVM probe boot: {}", if kvm_boots { "ok" } else { "failed, using TCG" });
            let _ = std::fs::create_dir_all(cache_dir);
            let cached = serde_json::to_vec(&ProbeCache { key, kvm_boots }).map_err(|source| Error::Json {
                context: "encoding the KVM probe's cache",
                source,
            })?;
            let _ = std::fs::write(&cache, cached);
            Ok(if kvm_boots { Accel::Kvm } else { Accel::Tcg })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_choices() {
        assert_eq!("auto".parse::<AccelChoice>(), Ok(AccelChoice::Auto));
        assert!("xen".parse::<AccelChoice>().unwrap_err().contains("auto, kvm or tcg"));
    }

    #[test]
    fn tsc_is_read_from_cpuinfo() {
        let khz = host_tsc_khz().expect("cpu MHz in /proc/cpuinfo");
        assert!(khz > 100_000, "{khz}");
    }
}
