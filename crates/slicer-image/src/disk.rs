//! Disk image files: what format a file is, turning one into a raw base, and reading how an
//! ext4 disk of ours boots, with `qemu-img` and `debugfs` (no mount, no loop device).

use std::path::Path;
use std::process::Command;

use crate::error::{Error, JsonContext, Result};

use crate::Variant;

fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().map_err(|source| Error::Spawn {
        command: format!("{cmd:?}"),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// `raw` or `qcow2`. A qcow2 naming a backing file or a data file is refused: it would make
/// the daemon read whatever host file it names.
pub fn probe(path: &Path) -> Result<&'static str> {
    let out = output(Command::new("qemu-img").args(["info", "--output=json"]).arg(path))?;
    let info: serde_json::Value = serde_json::from_slice(&out).json_context(|| "reading qemu-img info")?;
    match info.get("format").and_then(|f| f.as_str()) {
        Some("raw") => Ok("raw"),
        Some("qcow2") => {
            if info.get("backing-filename").is_some() || info.pointer("/format-specific/data/data-file").is_some() {
                return Err(Error::unusable(format!(
                    "{} depends on another file (a qcow2 backing or data file); export a standalone disk (slicer disk export)",
                    path.display()
                )));
            }
            Ok("qcow2")
        }
        other => Err(Error::unusable(format!(
            "{}: unsupported disk format {:?}; use a raw ext4 or a qcow2 image",
            path.display(),
            other.unwrap_or("unknown")
        ))),
    }
}

/// Writes `src` (of `format`) as a sparse raw file at `dst`.
pub fn to_raw(src: &Path, format: &str, dst: &Path) -> Result<()> {
    output(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", format, "-O", "raw"])
            .arg(src)
            .arg(dst),
    )?;
    Ok(())
}

/// How the slicer disk in the raw ext4 file `raw` boots: read from its /etc/slicer/image.json.
pub fn variant_of(raw: &Path) -> Result<Variant> {
    let out = output(
        Command::new("debugfs")
            .args(["-R", "cat /etc/slicer/image.json"])
            .arg(raw)
            .stderr(std::process::Stdio::piped()),
    )?;
    #[derive(serde::Deserialize)]
    struct Meta {
        variant: Variant,
    }
    let meta: Meta = serde_json::from_slice(&out).json_context(|| {
        "no readable /etc/slicer/image.json on an ext4 file system (made by slicer image build, pull or disk export)"
    })?;
    let agent = output(
        Command::new("debugfs")
            .args(["-R", &format!("stat {}", crate::AGENT_GUEST_PATH)])
            .arg(raw),
    )?;
    if agent.is_empty() {
        return Err(Error::unusable(format!(
            "the disk has no {}: it would not answer",
            crate::AGENT_GUEST_PATH
        )));
    }
    Ok(meta.variant)
}
