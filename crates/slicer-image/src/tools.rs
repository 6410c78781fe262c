//! Host programs slicer runs, each with the Debian package that provides it. These lists are
//! the audit of every program the daemon, the image build, the tests and the benchmarks run on
//! the host; `scripts/setup.sh` installs their packages and `tests/host_tools.rs` checks both
//! (so a fresh machine that lacks one fails early, naming the package).
//! Cargo and its subcommands are the toolchain, not host programs of slicer: CI's own
//! `cargo machete` is installed by `scripts/setup.sh --cargo-tools`, which `.ci/run` runs first.

use std::path::Path;

use crate::{Error, Result};

/// (program or file, Debian package)
pub const KERNEL_TOOLS: &[(&str, &str)] = &[
    ("make", "make"),
    ("gcc", "build-essential"),
    ("flex", "flex"),
    // also how openssl-sys finds libssl-dev when slicer itself is built
    ("pkg-config", "pkgconf"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("xz", "xz-utils"),
    ("/usr/include/libelf.h", "libelf-dev"),
    ("/usr/include/openssl/ssl.h", "libssl-dev"),
];
pub const ROOTFS_TOOLS: &[(&str, &str)] = &[
    ("debootstrap", "debootstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("chroot", "coreutils"),
];

/// What running VMs needs (`slicer up`, `slicer run`, the VM library).
pub const RUNTIME_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-img", "qemu-utils"),
    // pulled images are written with mkfs.ext4 -d; disk files are read with debugfs
    ("mkfs.ext4", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    // the agent is linked against nothing, but the registry client's TLS is the host's OpenSSL
    ("/usr/lib/x86_64-linux-gnu/libssl.so.3", "libssl3"),
];
/// What VM networking needs (isolated and bridge host groups).
pub const NETWORK_TOOLS: &[(&str, &str)] = &[("ip", "iproute2"), ("nft", "nftables")];
/// What the tests and benchmarks run on the host beyond the above.
pub const TEST_TOOLS: &[(&str, &str)] = &[
    ("date", "coreutils"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    // the registry images are pushed to and pulled from in tests/images.rs
    ("docker-registry", "docker-registry"),
    // tests/fuzz_api.rs runs schemathesis from a virtualenv scripts/test.sh makes (Debian 12's
    // python3 is 3.11; its venv module needs ensurepip from python3.11-venv)
    ("/usr/bin/python3", "python3"),
    ("/usr/lib/python3.11/ensurepip/__init__.py", "python3-venv"),
    // tests/hostile.rs acts as a VM's uid inside its QEMU's mount namespace and on the host
    ("nsenter", "util-linux"),
    ("setpriv", "util-linux"),
];

/// Every list above.
pub fn all() -> Vec<(&'static str, &'static str)> {
    [KERNEL_TOOLS, ROOTFS_TOOLS, RUNTIME_TOOLS, NETWORK_TOOLS, TEST_TOOLS]
        .concat()
        .into_iter()
        .chain([("tar", "tar"), ("mount", "mount"), ("cp", "coreutils")])
        .collect()
}

pub fn which(program: &str) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        return Path::new(program).exists().then(|| program.into());
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Fails with one message naming every missing tool and the apt packages to install.
pub fn require(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<_> = tools.iter().filter(|(t, _)| which(t).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let tools: Vec<String> = missing.iter().map(|(t, _)| t.to_string()).collect();
    let mut packages: Vec<String> = missing.iter().map(|(_, p)| p.to_string()).collect();
    packages.dedup();
    Err(Error::MissingTools { tools, packages })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_is_named_with_its_package() {
        let e = require(&[("sh", "dash"), ("slicer-no-such-program", "some-package")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("slicer-no-such-program") && e.contains("apt-get install -y some-package"),
            "{e}"
        );
        assert!(!e.contains("dash"), "{e}");
    }
}
