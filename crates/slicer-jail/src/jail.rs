//! The child side of a jailed spawn: everything between `fork` and `exec`.
//!
//! [`JailSpec::prepare`] does all the allocation and path work in the parent; the returned
//! [`Prepared::enter`] runs in the forked child and only makes syscalls on prepared C strings
//! and descriptors (async-signal-safe). In order:
//!
//! 1. join the VM's cgroup (`0` into each `cgroup.procs`, opened by the parent);
//! 2. new mount, IPC and UTS namespaces (and an empty network namespace when the VM has none
//!    of its own: its NIC, if any, is an already opened TAP descriptor);
//! 3. make every mount private, mount a small tmpfs as the new root, create the paths and bind
//!    the VM's directory (read-write), its kernel and disk images, `/usr` and `/etc/ld.so.cache`
//!    (read-only, nosuid, nodev) and a few device nodes at the same paths as on the host, so
//!    QEMU's arguments and qcow2 backing paths need no translation;
//!    (with umask 0 for the layout, 077 afterwards);
//! 4. `pivot_root` into it, detach the old root, remount the new root read-only;
//! 5. drop the capability bounding set, set groups, gid and uid (all capabilities go with
//!    root), `no_new_privs`, rlimits.
//!
//! The seccomp filter is QEMU's own (`-sandbox on,...`), installed by QEMU once it has set up.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{io_err, Error, Result};

/// What one VM's QEMU may see and be.
#[derive(Debug, Clone, Default)]
pub struct JailSpec {
    /// An empty directory on the host where the jail's root tmpfs is mounted (inside the
    /// child's own mount namespace only; the host never sees the mount).
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (e.g. the owner group of /dev/kvm).
    pub groups: Vec<u32>,
    /// Directories bound read-write at the same path.
    pub rw_dirs: Vec<PathBuf>,
    /// Files bound read-only at the same path.
    pub ro_files: Vec<PathBuf>,
    /// Files bound read-write at the same path (the VM's disk): the jail holds no directory
    /// the process could create or rename an entry in.
    pub rw_files: Vec<PathBuf>,
    /// Device nodes bound at the same path.
    pub devices: Vec<PathBuf>,
    /// Give the process an empty network namespace of its own.
    pub new_netns: bool,
    /// `cgroup.procs` files to join.
    pub cgroup_procs: Vec<PathBuf>,
    /// (resource, soft = hard limit)
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// Mount a procfs at /proc that shows the process only itself (`hidepid=invisible`, its
    /// uid being its own; `subset=pid`): for QEMUs that open an inherited descriptor by its
    /// `/proc/self/fd/N` path (a template's sealed memory).
    pub proc: bool,
}

/// Host directories every jail gets read-only: QEMU, its libraries and firmware live in /usr.
const SYSTEM_DIRS: &[&str] = &["/usr"];
/// Top-level names that are symlinks into /usr on merged-/usr systems, directories elsewhere.
const USR_LINKS: &[&str] = &["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];
const SYSTEM_FILES: &[&str] = &["/etc/ld.so.cache"];
/// Device nodes QEMU may open.
pub const BASE_DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

#[derive(Debug)]
enum Op {
    Mkdir(CString),
    Touch(CString),
    Symlink(CString, CString),
    /// source, target, remount flags
    Bind(CString, CString, libc::c_ulong),
    /// A procfs at the target (see [`JailSpec::proc`]).
    Proc(CString),
}

/// A jail ready to enter in a forked child.
#[derive(Debug)]
pub struct Prepared {
    root: CString,
    ops: Vec<Op>,
    cgroup_fds: Vec<OwnedFd>,
    unshare_flags: libc::c_int,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Invalid(format!("path {} has a NUL byte", p.display())))
}

impl JailSpec {
    /// Checks the spec, opens the cgroup files and lays out every path (in the parent).
    pub fn prepare(&self) -> Result<Prepared> {
        if self.uid == 0 || self.gid == 0 {
            return Err(Error::Invalid("a jail never runs as uid or gid 0".into()));
        }
        if !self.root.is_absolute() || self.root == Path::new("/") {
            return Err(Error::Invalid(format!(
                "jail root {} must be an absolute directory other than /",
                self.root.display()
            )));
        }
        std::fs::create_dir_all(&self.root).map_err(io_err(format!("creating {}", self.root.display())))?;
        const RO: libc::c_ulong = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        const RW: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        let mut l = Layout {
            root: &self.root,
            ops: Vec::new(),
            made: Vec::new(),
        };
        l.system(RO)?;
        let files = SYSTEM_FILES
            .iter()
            .map(PathBuf::from)
            .filter(|f| f.is_file())
            .chain(self.ro_files.iter().cloned());
        for f in files {
            l.bind_file(&f, RO | libc::MS_NOEXEC)?;
        }
        for f in &self.rw_files {
            l.bind_file(f, RW)?;
        }
        for d in &self.rw_dirs {
            l.bind_dir(d, RW)?;
        }
        for dev in &self.devices {
            l.bind_file(dev, libc::MS_NOSUID | libc::MS_NOEXEC)?;
        }
        if self.proc {
            let t = l.inside(Path::new("/proc"))?;
            l.mkdirs(&t)?;
            l.ops.push(Op::Proc(cstr(&t)?));
        }
        let ops = l.ops;
        let cgroup_fds = self.open_cgroup_procs()?;
        let mut unshare_flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if self.new_netns {
            unshare_flags |= libc::CLONE_NEWNET;
        }
        Ok(Prepared {
            root: cstr(&self.root)?,
            ops,
            cgroup_fds,
            unshare_flags,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            rlimits: self
                .rlimits
                .iter()
                .map(|(r, v)| {
                    (
                        *r,
                        libc::rlimit {
                            rlim_cur: *v,
                            rlim_max: *v,
                        },
                    )
                })
                .collect(),
        })
    }

    /// The cgroup `procs` files, opened for writing (the child writes its pid through them).
    fn open_cgroup_procs(&self) -> Result<Vec<OwnedFd>> {
        let mut cgroup_fds = Vec::new();
        for f in &self.cgroup_procs {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(f)
                .map_err(io_err(format!("opening {}", f.display())))?;
            cgroup_fds.push(OwnedFd::from(file));
        }
        Ok(cgroup_fds)
    }
}

/// The jail's layout being planned: the operations so far and the directories they make.
struct Layout<'a> {
    root: &'a Path,
    ops: Vec<Op>,
    made: Vec<PathBuf>,
}

impl Layout<'_> {
    /// Where host path `p` (absolute, without `..`) appears inside the jail.
    fn inside(&self, p: &Path) -> Result<PathBuf> {
        if !p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(Error::Invalid(format!(
                "jail path {} must be absolute without '..'",
                p.display()
            )));
        }
        Ok(self.root.join(p.strip_prefix("/").unwrap_or(p)))
    }

    /// Makes `target` and every directory between it and the root, each once.
    fn mkdirs(&mut self, target: &Path) -> Result<()> {
        let mut chain: Vec<&Path> = target.ancestors().take_while(|a| *a != self.root).collect();
        chain.reverse();
        for d in chain {
            if !self.made.iter().any(|m| m == d) {
                self.ops.push(Op::Mkdir(cstr(d)?));
                self.made.push(d.to_path_buf());
            }
        }
        Ok(())
    }

    /// The system directories, bound with `ro`, and the top-level names that link into /usr
    /// (as links where the host has links, as bound directories where it has directories).
    fn system(&mut self, ro: libc::c_ulong) -> Result<()> {
        for d in SYSTEM_DIRS {
            self.bind_dir(Path::new(d), ro)?;
        }
        for l in USR_LINKS {
            let host = Path::new(l);
            match std::fs::symlink_metadata(host) {
                Ok(m) if m.file_type().is_symlink() => {
                    let to = std::fs::read_link(host).map_err(io_err(format!("reading link {l}")))?;
                    self.ops.push(Op::Symlink(cstr(&to)?, cstr(&self.inside(host)?)?));
                }
                Ok(m) if m.is_dir() => self.bind_dir(host, ro)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Binds host directory `host` at its place inside the jail with `flags`.
    fn bind_dir(&mut self, host: &Path, flags: libc::c_ulong) -> Result<()> {
        let t = self.inside(host)?;
        self.mkdirs(&t)?;
        self.ops.push(Op::Bind(cstr(host)?, cstr(&t)?, flags));
        Ok(())
    }

    /// Binds host file (or device) `host` at its place inside the jail with `flags`, over an
    /// empty file made there.
    fn bind_file(&mut self, host: &Path, flags: libc::c_ulong) -> Result<()> {
        let t = self.inside(host)?;
        if let Some(parent) = t.parent() {
            self.mkdirs(parent)?;
        }
        self.ops.push(Op::Touch(cstr(&t)?));
        self.ops.push(Op::Bind(cstr(host)?, cstr(&t)?, flags));
        Ok(())
    }
}

/// `struct mount_attr` of mount_setattr(2) (not in every libc release).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// Binds `src` at `dst` with `flags`, for every mount below it too: a remount of a recursive
/// bind changes only its top mount, so a read-only `/usr` with a submount (e.g. `/usr/local`
/// on its own filesystem) would leave that submount writable. mount_setattr(2) (Linux 5.12)
/// sets the flags on the whole tree; without it the bind is not recursive (no submount is
/// visible at all).
///
/// # Safety
/// Async-signal-safe: syscalls on prepared C strings.
unsafe fn bind(src: &CString, dst: &CString, flags: libc::c_ulong) -> std::io::Result<()> {
    let null = std::ptr::null::<libc::c_char>();
    let remount = |dst: &CString| {
        check(libc::mount(
            null,
            dst.as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REMOUNT | flags,
            std::ptr::null(),
        ))
    };
    check(libc::mount(
        src.as_ptr(),
        dst.as_ptr(),
        null,
        libc::MS_BIND | libc::MS_REC,
        std::ptr::null(),
    ))?;
    remount(dst)?;
    let mut set = 0;
    for (ms, attr) in [
        (libc::MS_RDONLY, MOUNT_ATTR_RDONLY),
        (libc::MS_NOSUID, MOUNT_ATTR_NOSUID),
        (libc::MS_NODEV, MOUNT_ATTR_NODEV),
        (libc::MS_NOEXEC, MOUNT_ATTR_NOEXEC),
    ] {
        if flags & ms != 0 {
            set |= attr;
        }
    }
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let r = libc::syscall(
        libc::SYS_mount_setattr,
        libc::AT_FDCWD,
        dst.as_ptr(),
        AT_RECURSIVE,
        &attr as *const MountAttr,
        std::mem::size_of::<MountAttr>(),
    );
    if r == 0 {
        return Ok(());
    }
    if *libc::__errno_location() != libc::ENOSYS {
        return Err(std::io::Error::last_os_error());
    }
    check(libc::umount2(dst.as_ptr(), libc::MNT_DETACH))?;
    check(libc::mount(
        src.as_ptr(),
        dst.as_ptr(),
        null,
        libc::MS_BIND,
        std::ptr::null(),
    ))?;
    remount(dst)
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Prepared {
    /// Enters the jail. Call only in a forked child before `exec` (e.g. from
    /// `Command::pre_exec`): it changes the calling process for good.
    ///
    /// # Safety
    /// Async-signal-safe: only syscalls on data prepared before the fork.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        self.join_cgroups()?;
        check(libc::unshare(self.unshare_flags))?;
        // The jail's directories must be traversable by the VM's uid whatever the caller's
        // umask; QEMU itself then creates its sockets and files private (0700/0600).
        libc::umask(0);
        self.build_root()?;
        libc::umask(0o077);
        self.pivot()?;
        self.drop_privileges()
    }

    /// Writes the child's pid (`0`: the writer) into each cgroup's `procs` file.
    ///
    /// # Safety
    /// As [`Prepared::enter`].
    unsafe fn join_cgroups(&self) -> std::io::Result<()> {
        for fd in &self.cgroup_fds {
            if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Makes every mount private, mounts a small tmpfs at the root and lays out the jail in it.
    ///
    /// # Safety
    /// As [`Prepared::enter`].
    unsafe fn build_root(&self) -> std::io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        check(libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            c"tmpfs".as_ptr(),
            self.root.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=0755,size=256k,nr_inodes=512".as_ptr().cast(),
        ))?;
        for op in &self.ops {
            run_op(op)?;
        }
        Ok(())
    }

    /// Makes the jail the root (the old root detached) and remounts it read-only.
    ///
    /// # Safety
    /// As [`Prepared::enter`].
    unsafe fn pivot(&self) -> std::io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        check(libc::chdir(self.root.as_ptr()))?;
        check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        check(libc::chdir(c"/".as_ptr()))?;
        check(libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        ))
    }

    /// Empties the capability bounding set, becomes the jail's uid, gid and groups, sets
    /// no_new_privs and applies the resource limits.
    ///
    /// # Safety
    /// As [`Prepared::enter`].
    unsafe fn drop_privileges(&self) -> std::io::Result<()> {
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && *libc::__errno_location() != libc::EINVAL {
                return Err(std::io::Error::last_os_error());
            }
        }
        check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
        check(libc::setresgid(self.gid, self.gid, self.gid))?;
        check(libc::setresuid(self.uid, self.uid, self.uid))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        for (res, lim) in &self.rlimits {
            check(libc::setrlimit(*res, lim))?;
        }
        Ok(())
    }
}

/// One step of the jail's layout, inside the new root's tmpfs.
///
/// # Safety
/// As [`Prepared::enter`].
unsafe fn run_op(op: &Op) -> std::io::Result<()> {
    match op {
        Op::Mkdir(p) => {
            if libc::mkdir(p.as_ptr(), 0o755) < 0 && *libc::__errno_location() != libc::EEXIST {
                return Err(std::io::Error::last_os_error());
            }
        }
        Op::Touch(p) => {
            let fd = libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC, 0o600);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
        }
        Op::Symlink(to, at) => check(libc::symlink(to.as_ptr(), at.as_ptr()))?,
        Op::Proc(at) => {
            let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            let r = libc::mount(
                c"proc".as_ptr(),
                at.as_ptr(),
                c"proc".as_ptr(),
                flags,
                c"hidepid=invisible,subset=pid".as_ptr().cast(),
            );
            if r < 0 {
                // Kernels before 5.8 know neither the word nor subset=.
                check(libc::mount(
                    c"proc".as_ptr(),
                    at.as_ptr(),
                    c"proc".as_ptr(),
                    flags,
                    c"hidepid=2".as_ptr().cast(),
                ))?;
            }
        }
        Op::Bind(src, dst, flags) => bind(src, dst, *flags)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_laid_out_once_and_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spec = JailSpec {
            root: dir.path().join("jail"),
            uid: 4242,
            gid: 4242,
            rw_dirs: vec!["/var/lib/x/vms/a".into()],
            ro_files: vec!["/var/lib/x/images/k".into()],
            ..Default::default()
        };
        let p = spec.prepare().unwrap();
        let mkdirs: Vec<String> = p
            .ops
            .iter()
            .filter_map(|o| match o {
                Op::Mkdir(c) => Some(c.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        let var = format!("{}/var", spec.root.display());
        assert_eq!(mkdirs.iter().filter(|m| **m == var).count(), 1, "{mkdirs:?}");
        assert!(mkdirs.contains(&format!("{}/var/lib/x/vms/a", spec.root.display())));
        assert!(JailSpec { uid: 0, ..spec.clone() }.prepare().is_err());
        assert!(JailSpec {
            rw_dirs: vec!["/a/../etc".into()],
            ..spec.clone()
        }
        .prepare()
        .is_err());
        assert!(JailSpec {
            root: "/".into(),
            ..spec
        }
        .prepare()
        .is_err());
    }

    #[test]
    #[ignore = "full tier: needs root (mount namespaces)"]
    fn a_read_only_bind_is_read_only_in_every_submount() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("usr"), dir.path().join("jail-usr"));
        std::fs::create_dir_all(src.join("local")).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        let (c_src, c_dst, c_sub) = (
            cstr(&src).unwrap(),
            cstr(&dst).unwrap(),
            cstr(&src.join("local")).unwrap(),
        );
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c").arg(format!(
            "touch {0}/top 2>&1; touch {0}/local/sub 2>&1; echo end",
            dst.display()
        ));
        // SAFETY: raw syscalls in the forked child on strings made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let null = std::ptr::null::<libc::c_char>();
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                // A submount below the source, as /usr/local on a filesystem of its own.
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    c_sub.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                ))?;
                bind(&c_src, &c_dst, libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV)
            });
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("end"), "{text}");
        assert_eq!(text.matches("Read-only file system").count(), 2, "{text}");
    }
}
