//! Building kernels and root filesystems into the store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{fs, Error, IoContext, Result};

use crate::progress::Step;
use crate::store::{file_sha256, key_of, Image, ImageStore};
use crate::{tools, Variant, AGENT_GUEST_PATH, KERNEL_FRAGMENT};

/// Bump when the build steps change in a way the inputs do not show.
const BUILDER_VERSION: &str = "2";
/// Packages added to debootstrap's minbase in every variant (`min` stays this lean).
const BASE_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "procps",
    "ca-certificates",
    "e2fsprogs",
    "sudo",
];
/// Packages added for the systemd variant, the everyday image: what people expect to find in a
/// Linux sandbox (fetching, version control, Python, SSH, debugging, archives, and the
/// nftables/iptables-nft tools that container runtimes call).
const SYSTEMD_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "dbus",
    "curl",
    "wget",
    "git",
    "openssh-client",
    "openssh-server",
    "python3",
    "python3-pip",
    "python3-venv",
    "dnsutils",
    "netcat-openbsd",
    "less",
    "jq",
    "tmux",
    "nano",
    "vim-tiny",
    "htop",
    "lsof",
    "strace",
    "psmisc",
    "file",
    "rsync",
    "make",
    "gnupg",
    "xz-utils",
    "zstd",
    "bzip2",
    "unzip",
    "zip",
    "nftables",
    "iptables",
    "uidmap",
    "bash-completion",
];
/// Size of the ext4 base image (sparse; VMs get their own size through their overlay).
const ROOTFS_SIZE: &str = "2G";
/// The default non-root user of every image. The images are Debian; the name is Slicer's, so
/// scripts written for Slicer's images (`--uid 1000`, `/home/ubuntu/...`, `sudo ...`) run
/// unchanged.
pub const DEFAULT_USER: &str = "ubuntu";
const DEFAULT_UID: u32 = 1000;

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub variant: Variant,
    /// The static slicer-agent binary to install.
    pub agent: PathBuf,
    /// Debian's kernel source tarball.
    pub linux_source: PathBuf,
    pub mirror: String,
    pub suite: String,
    /// Parallel kernel build jobs.
    pub jobs: usize,
}

impl BuildOptions {
    pub fn new(variant: Variant, agent: PathBuf) -> BuildOptions {
        BuildOptions {
            variant,
            agent,
            linux_source: PathBuf::from("/usr/src/linux-source-6.1.tar.xz"),
            mirror: default_mirror(),
            suite: "bookworm".into(),
            jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        }
    }
}

/// The Debian mirror the host itself uses (so builds work wherever apt works).
fn default_mirror() -> String {
    let mut texts = vec![fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(d) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in d.flatten() {
            texts.push(fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    for t in texts {
        for line in t.lines() {
            let line = line.trim();
            let url = line.strip_prefix("URIs:").map(str::trim).or_else(|| {
                line.strip_prefix("deb ")
                    .and_then(|r| r.split_whitespace().find(|w| w.starts_with("http")))
            });
            if let Some(u) = url {
                if u.ends_with("/debian") || u.ends_with("/debian/") {
                    return u.trim_end_matches('/').to_string();
                }
            }
        }
    }
    "http://deb.debian.org/debian".into()
}

/// Runs a command with its output going to `log`; on failure the error shows the log's tail.
fn run(cmd: &mut Command, log: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .io_context(|| format!("opening log {}", log.display()))?;
    let desc = format!("{cmd:?}");
    let out = f.try_clone().io_context(|| format!("opening log {}", log.display()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(f)
        .status()
        .map_err(|source| Error::Spawn {
            command: desc.clone(),
            source,
        })?;
    if !status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(Error::BuildStep {
            command: desc,
            status: status.to_string(),
            log: log.to_path_buf(),
            tail: tail.join("\n"),
        });
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether an ELF file has no program interpreter (statically linked).
pub fn is_static_elf(path: &Path) -> Result<bool> {
    let data = fs::read(path)?;
    if !(data.len() > 64 && &data[..4] == b"\x7fELF" && data[4] == 2) {
        return Err(Error::unusable(format!("{} is not a 64-bit ELF file", path.display())));
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&data[0x20..0x28]);
    let phoff = u64::from_le_bytes(phoff) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let end = phoff.checked_add(i * phentsize).and_then(|o| o.checked_add(4));
        let Some(end) = end.filter(|e| *e <= data.len()) else {
            return Err(Error::unusable(format!(
                "{} has a truncated program header",
                path.display()
            )));
        };
        let o = end - 4;
        if u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]) == 3 {
            return Ok(false); // PT_INTERP
        }
    }
    Ok(true)
}

/// Builds (or finds in the store) the kernel and root filesystem of `opts.variant`.
pub fn build_image(store: &ImageStore, opts: &BuildOptions) -> Result<Image> {
    if !is_root() {
        return Err(Error::NeedsRoot);
    }
    if !opts.agent.is_file() {
        return Err(Error::Agent { message: format!(
            "slicer-agent binary {} not found: build it with `cargo build --release -p slicer-agent --target x86_64-unknown-linux-gnu` (see scripts/setup.sh) or pass --agent",
            opts.agent.display()
        ) });
    }
    if !is_static_elf(&opts.agent)? {
        return Err(Error::Agent { message: format!(
            "{} is dynamically linked; the guest needs a static agent (RUSTFLAGS='-C target-feature=+crt-static', see scripts/setup.sh)",
            opts.agent.display()
        ) });
    }
    fs::create_dir_all(store.build_dir())?;
    let (kernel_dir, release) = build_kernel(store, opts)?;
    let rootfs = build_rootfs(store, opts)?;
    let agent_hash = file_sha256(&opts.agent)?;
    let img = Image {
        name: opts.variant.to_string(),
        variant: opts.variant,
        kernel: kernel_dir.join("bzImage"),
        vmlinux: kernel_dir.join("vmlinux"),
        rootfs,
        kernel_release: release,
        key: key_of(&[kernel_dir.to_string_lossy().as_bytes(), agent_hash.as_bytes()]),
        reference: None,
        digest: None,
    };
    store.publish(&img)?;
    Ok(img)
}

fn kernel_key(opts: &BuildOptions) -> Result<String> {
    let meta = std::fs::metadata(&opts.linux_source).io_context(|| {
        format!(
            "kernel source {} not found: apt-get install -y linux-source-6.1",
            opts.linux_source.display()
        )
    })?;
    let ident = format!(
        "{}:{}:{:?}",
        opts.linux_source.display(),
        meta.len(),
        meta.modified().ok()
    );
    Ok(key_of(&[
        BUILDER_VERSION.as_bytes(),
        KERNEL_FRAGMENT.as_bytes(),
        ident.as_bytes(),
    ]))
}

/// Parses `CONFIG_X=v` and `# CONFIG_X is not set` lines.
fn parse_config(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# ").and_then(|l| l.strip_suffix(" is not set")) {
            m.insert(rest.to_string(), "n".to_string());
        } else if let Some((k, v)) = line.split_once('=') {
            if k.starts_with("CONFIG_") {
                m.insert(k.to_string(), v.to_string());
            }
        }
    }
    m
}

/// Options of the fragment that the final config does not carry as asked.
fn config_mismatches(fragment: &str, final_config: &str) -> Vec<String> {
    let have = parse_config(final_config);
    parse_config(fragment)
        .into_iter()
        .filter(|(k, v)| have.get(k).map(String::as_str).unwrap_or("n") != v)
        .map(|(k, v)| format!("{k}={v} (got {})", have.get(&k).map(String::as_str).unwrap_or("n")))
        .collect()
}

fn build_kernel(store: &ImageStore, opts: &BuildOptions) -> Result<(PathBuf, String)> {
    let key = kernel_key(opts)?;
    let dir = store.kernel_dir(&key);
    if dir.join("bzImage").exists() && dir.join("vmlinux").exists() && dir.join("release").exists() {
        let release = fs::read_to_string(dir.join("release"))?.trim().to_string();
        eprintln!("kernel {release} is up to date ({})", dir.display());
        return Ok((dir, release));
    }
    tools::require(tools::KERNEL_TOOLS)?;
    let work = store.build_dir().join(format!("kernel-{key}"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let log = work.with_extension("log");
    let _ = fs::remove_file(&log);

    let step = Step::start("unpacking linux-source");
    run(
        Command::new("tar")
            .arg("-xf")
            .arg(&opts.linux_source)
            .arg("-C")
            .arg(&work)
            .arg("--strip-components=1"),
        &log,
    )?;
    step.done();

    let step = Step::start("configuring the kernel");
    let fragment = work.join("slicer.config");
    fs::write(&fragment, KERNEL_FRAGMENT)?;
    run(Command::new("make").arg("-C").arg(&work).arg("tinyconfig"), &log)?;
    run(
        Command::new(work.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&work)
            .args(["-m", ".config", "slicer.config"]),
        &log,
    )?;
    run(Command::new("make").arg("-C").arg(&work).arg("olddefconfig"), &log)?;
    let final_config = fs::read_to_string(work.join(".config"))?;
    let bad = config_mismatches(KERNEL_FRAGMENT, &final_config);
    if !bad.is_empty() {
        return Err(Error::KernelConfig {
            rejected: bad.iter().map(|b| b.to_string()).collect(),
        });
    }
    step.done();

    let step = Step::start(&format!(
        "building the kernel (make -j{} bzImage; minutes on 2 cores, logged to {})",
        opts.jobs,
        log.display()
    ));
    run(
        Command::new("make")
            .arg("-C")
            .arg(&work)
            .arg(format!("-j{}", opts.jobs))
            .arg("bzImage"),
        &log,
    )?;
    step.done();

    let release = fs::read_to_string(work.join("include/config/kernel.release"))?
        .trim()
        .to_string();
    let tmp = dir.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    fs::copy(work.join("arch/x86/boot/bzImage"), tmp.join("bzImage"))?;
    fs::copy(work.join("vmlinux"), tmp.join("vmlinux"))?;
    fs::write(tmp.join("config"), &final_config)?;
    fs::write(tmp.join("release"), format!("{release}\n"))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&tmp, &dir)?;
    fs::remove_dir_all(&work)?;
    Ok((dir, release))
}

fn debootstrap_base(store: &ImageStore, opts: &BuildOptions) -> Result<PathBuf> {
    let key = key_of(&[
        BUILDER_VERSION.as_bytes(),
        opts.suite.as_bytes(),
        opts.mirror.as_bytes(),
        BASE_PACKAGES.join(",").as_bytes(),
    ]);
    let dir = store.debootstrap_dir(&key);
    let tree = dir.join("rootfs");
    if dir.join("complete").exists() {
        return Ok(tree);
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let log = dir.join("debootstrap.log");
    let step = Step::start(&format!(
        "debootstrap --variant=minbase {} ({})",
        opts.suite, opts.mirror
    ));
    run(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", BASE_PACKAGES.join(",")))
            .arg(&opts.suite)
            .arg(&tree)
            .arg(&opts.mirror),
        &log,
    )?;
    fs::write(dir.join("complete"), b"")?;
    step.done();
    Ok(tree)
}

/// Runs `apt-get install` inside a root tree with /proc, /sys and /dev bound in, always unmounting.
fn chroot_install(tree: &Path, packages: &[&str], log: &Path) -> Result<()> {
    let mounts = ["proc", "sys", "dev"];
    let mut mounted = Vec::new();
    let result = (|| -> Result<()> {
        for m in mounts {
            let target = tree.join(m);
            fs::create_dir_all(&target)?;
            run(
                Command::new("mount").arg("--bind").arg(format!("/{m}")).arg(&target),
                log,
            )?;
            mounted.push(target);
        }
        let mut cmd = Command::new("chroot");
        cmd.arg(tree)
            .args(["apt-get", "install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd, log)
    })();
    for target in mounted.iter().rev() {
        let _ = Command::new("umount").arg("-l").arg(target).status();
    }
    result
}

fn install_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(p) = path.parent() {
        fs::create_dir_all(p)?;
    }
    fs::write(path, contents)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .io_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(())
}

fn symlink_force(target: &str, link: &Path) -> Result<()> {
    if let Some(p) = link.parent() {
        fs::create_dir_all(p)?;
    }
    let _ = fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).io_context(|| format!("linking {}", link.display()))
}

/// Units masked in systemd guests: without udev in a microVM the serial gettys would wait
/// 90 s for their device.
pub(crate) const MASKED_UNITS: &[&str] = &["serial-getty@ttyS0.service", "getty@tty1.service", "getty.target"];

/// The agent's systemd unit (our `systemd` image and pulled images with systemd).
pub(crate) const AGENT_UNIT: &str = "[Unit]
Description=slicer guest agent
DefaultDependencies=no
After=local-fs.target

[Service]
ExecStart=/usr/local/bin/slicer-agent
Restart=always
RestartSec=100ms

[Install]
WantedBy=sysinit.target
";

/// sshd is socket-activated, one `sshd -i` per connection: no daemon in an idle sandbox, and
/// host keys are read per connection, so a clone whose keys were removed gets new ones. Only
/// an ed25519 host key: made on the first connection in milliseconds (RSA takes seconds under
/// TCG), under a lock so that two first connections do not race. (Debian's own ssh.socket
/// triggers the long-running ssh.service, which is masked.)
const SSH_SOCKET: &str = "[Unit]
Description=OpenSSH server socket, one sshd per connection (slicer)
Before=sockets.target

[Socket]
ListenStream=22
Accept=yes

[Install]
WantedBy=sockets.target
";
const SSH_SERVICE: &str = "[Unit]
Description=OpenSSH per-connection server (slicer)

[Service]
ExecStartPre=/usr/bin/flock /etc/ssh/.host-keygen.lock /bin/sh -c 'test -s /etc/ssh/ssh_host_ed25519_key || /usr/bin/ssh-keygen -q -t ed25519 -N \"\" -f /etc/ssh/ssh_host_ed25519_key'
ExecStart=-/usr/sbin/sshd -i
StandardInput=socket
RuntimeDirectory=sshd
RuntimeDirectoryPreserve=yes
";
const SSHD_CONFIG: &str = "# slicer: one ed25519 host key (made per VM); keys only, no passwords.
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
";

fn setup_sshd(stage: &Path) -> Result<()> {
    // Every VM made from the image would share the keys the package generated.
    let ssh = stage.join("etc/ssh");
    for e in std::fs::read_dir(&ssh)
        .io_context(|| format!("reading {}", ssh.display()))?
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("ssh_host_") {
            fs::remove_file(e.path())?;
        }
    }
    install_file(
        &stage.join("etc/ssh/sshd_config.d/slicer.conf"),
        SSHD_CONFIG.as_bytes(),
        0o644,
    )?;
    let units = stage.join("etc/systemd/system");
    install_file(&units.join("slicer-ssh.socket"), SSH_SOCKET.as_bytes(), 0o644)?;
    install_file(&units.join("slicer-ssh@.service"), SSH_SERVICE.as_bytes(), 0o644)?;
    for link in [
        "multi-user.target.wants/ssh.service",
        "sshd.service",
        "sockets.target.wants/ssh.socket",
    ] {
        let _ = fs::remove_file(units.join(link));
    }
    for unit in ["ssh.service", "ssh.socket"] {
        symlink_force("/dev/null", &units.join(unit))?;
    }
    symlink_force(
        "/etc/systemd/system/slicer-ssh.socket",
        &units.join("sockets.target.wants/slicer-ssh.socket"),
    )
}

/// Adds the default user (uid/gid 1000, bash, passwordless sudo). Its password is `*`: no
/// password login, but not "locked", which sshd would refuse for key logins too.
fn add_default_user(stage: &Path, log: &Path) -> Result<()> {
    run(
        Command::new("chroot").arg(stage).args([
            "useradd",
            "--create-home",
            "--uid",
            &DEFAULT_UID.to_string(),
            "--user-group",
            "--groups",
            "sudo",
            "--shell",
            "/bin/bash",
            "--password",
            "*",
            DEFAULT_USER,
        ]),
        log,
    )?;
    install_file(
        &stage.join("etc/sudoers.d/90-slicer-default-user"),
        format!("{DEFAULT_USER} ALL=(ALL) NOPASSWD:ALL\n").as_bytes(),
        0o440,
    )
}

/// Everything a variant's package tree is made from.
fn variant_key(opts: &BuildOptions) -> String {
    key_of(&[
        BUILDER_VERSION.as_bytes(),
        opts.variant.as_str().as_bytes(),
        opts.suite.as_bytes(),
        opts.mirror.as_bytes(),
        BASE_PACKAGES.join(",").as_bytes(),
        SYSTEMD_PACKAGES.join(",").as_bytes(),
        AGENT_UNIT.as_bytes(),
        SSH_SOCKET.as_bytes(),
        SSH_SERVICE.as_bytes(),
        SSHD_CONFIG.as_bytes(),
    ])
}

/// The variant's package tree (debootstrap base, the variant's packages and units, the default
/// user), cached apart from the agent so that a new agent costs a copy, not an apt run.
fn variant_tree(store: &ImageStore, opts: &BuildOptions) -> Result<PathBuf> {
    let key = variant_key(opts);
    let dir = store.debootstrap_dir(&format!("{}-{key}", opts.variant));
    let tree = dir.join("rootfs");
    if dir.join("complete").exists() {
        return Ok(tree);
    }
    let base = debootstrap_base(store, opts)?;
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let log = dir.join("build.log");
    let step = Step::start(&format!("installing the {} packages", opts.variant));
    run(Command::new("cp").arg("-a").arg(&base).arg(&tree), &log)?;
    if opts.variant == Variant::Systemd {
        chroot_install(&tree, SYSTEMD_PACKAGES, &log)?;
        install_file(
            &tree.join("etc/systemd/system/slicer-agent.service"),
            AGENT_UNIT.as_bytes(),
            0o644,
        )?;
        symlink_force(
            "/etc/systemd/system/slicer-agent.service",
            &tree.join("etc/systemd/system/sysinit.target.wants/slicer-agent.service"),
        )?;
        // Without udev the serial gettys wait 90 s for their device: mask them.
        for unit in MASKED_UNITS {
            symlink_force("/dev/null", &tree.join("etc/systemd/system").join(unit))?;
        }
        setup_sshd(&tree)?;
    }
    add_default_user(&tree, &log)?;
    for d in ["var/lib/apt/lists", "var/cache/apt/archives"] {
        if let Ok(entries) = std::fs::read_dir(tree.join(d)) {
            for e in entries.flatten() {
                if e.path().is_file() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
    fs::write(dir.join("complete"), b"")?;
    step.done();
    Ok(tree)
}

fn build_rootfs(store: &ImageStore, opts: &BuildOptions) -> Result<PathBuf> {
    let agent_hash = file_sha256(&opts.agent)?;
    let key = key_of(&[
        variant_key(opts).as_bytes(),
        agent_hash.as_bytes(),
        ROOTFS_SIZE.as_bytes(),
    ]);
    let dir = store.rootfs_dir(opts.variant, &key);
    let image = dir.join("rootfs.ext4");
    if image.exists() {
        eprintln!("{} root filesystem is up to date ({})", opts.variant, image.display());
        return Ok(image);
    }
    tools::require(tools::ROOTFS_TOOLS)?;
    let tree = variant_tree(store, opts)?;
    let stage = store.build_dir().join(format!("rootfs-{}-{key}", opts.variant));
    let _ = fs::remove_dir_all(&stage);
    let log = stage.with_extension("log");
    let _ = fs::remove_file(&log);

    let step = Step::start(&format!("assembling the {} root filesystem", opts.variant));
    run(Command::new("cp").arg("-a").arg(&tree).arg(&stage), &log)?;
    let agent = fs::read(&opts.agent)?;
    install_file(&stage.join(AGENT_GUEST_PATH.trim_start_matches('/')), &agent, 0o755)?;
    install_file(&stage.join("etc/hostname"), b"slicer\n", 0o644)?;
    install_file(
        &stage.join("etc/fstab"),
        b"/dev/vda / ext4 rw,relatime,errors=remount-ro 0 1\n",
        0o644,
    )?;
    install_file(
        &stage.join("etc/slicer/image.json"),
        serde_json::json!({"variant": opts.variant, "key": key})
            .to_string()
            .as_bytes(),
        0o644,
    )?;
    step.done();

    let step = Step::start("writing ext4 image (mkfs.ext4 -d)");
    let tmp_dir = dir.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp_dir);
    fs::create_dir_all(&tmp_dir)?;
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "slicer-root", "-d"])
            .arg(&stage)
            .arg(tmp_dir.join("rootfs.ext4"))
            .arg(ROOTFS_SIZE),
        &log,
    )?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&tmp_dir, &dir)?;
    fs::remove_dir_all(&stage)?;
    step.done();
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_mismatches_are_named() {
        let frag = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n";
        assert!(config_mismatches(frag, "CONFIG_A=y\nCONFIG_C=\"x\"\n").is_empty());
        let bad = config_mismatches(frag, "CONFIG_B=y\n");
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad.iter().any(|m| m.starts_with("CONFIG_B=n")));
    }

    #[test]
    fn the_repository_fragment_parses() {
        let m = parse_config(KERNEL_FRAGMENT);
        assert_eq!(m.get("CONFIG_VIRTIO_MMIO").map(String::as_str), Some("y"));
        assert_eq!(m.get("CONFIG_MODULES").map(String::as_str), Some("n"));
    }

    #[test]
    fn static_check_reads_elf_headers() {
        // The test binary itself is dynamically linked.
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap());
        let d = tempfile::tempdir().unwrap();
        let junk = d.path().join("junk");
        fs::write(&junk, b"not an elf").unwrap();
        assert!(is_static_elf(&junk).is_err());
    }
}
