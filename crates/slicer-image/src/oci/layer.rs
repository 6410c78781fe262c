//! Applies OCI layer tarballs, in order, onto a directory on the host.
//!
//! The layers come from a registry and are hostile input: every path is resolved inside the
//! root with `openat2(RESOLVE_IN_ROOT)`, so neither `..` nor a symlink planted by an earlier
//! entry (or layer) can reach outside it, and every change is made with `*at` calls relative to
//! a descriptor of the resolved parent. Whiteouts follow the OCI image spec: `.wh.NAME` removes
//! NAME from the layers below, `.wh..wh..opq` empties its directory of what the layers below
//! put there. Sizes and entry counts are bounded by a [`Budget`] shared by all layers.
//!
//! Written by hand: the `tar` crate reads the archive, but its `unpack` neither knows whiteouts
//! nor confines symlinks inside a root, and no maintained crate applies OCI layers that way.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tar::EntryType;

/// Limits on what all layers of one image may write.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Bytes of file contents still allowed.
    pub bytes: u64,
    /// Entries still allowed.
    pub entries: u64,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget {
            bytes: 32 << 30,
            entries: 2_000_000,
        }
    }
}

/// What applying one layer did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
}

const MAX_DEPTH: usize = 256;
const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

fn err(path: &[u8], what: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{}: {what}", String::from_utf8_lossy(path)))
}

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| err(b, "NUL byte in name"))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A layer path split into components: leading `/` and `./` dropped, `..` refused.
fn components(path: &[u8]) -> io::Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(err(path, "path leaves the image root (..)")),
            c => out.push(c),
        }
    }
    if out.len() > MAX_DEPTH {
        return Err(err(path, format!("deeper than {MAX_DEPTH} directories")));
    }
    Ok(out)
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    if comps.is_empty() {
        return b".".to_vec();
    }
    comps.join(&b'/')
}

/// Applies layers onto one root directory.
pub struct Applier {
    root: OwnedFd,
    pub budget: Budget,
}

impl Applier {
    pub fn new(root: &Path, budget: Budget) -> io::Result<Applier> {
        let f = File::open(root)?;
        Ok(Applier { root: f.into(), budget })
    }

    /// `openat2(root, path, O_PATH|O_DIRECTORY, RESOLVE_IN_ROOT)`: `path` as seen from inside.
    fn open_in_root(&self, path: &[u8]) -> io::Result<OwnedFd> {
        self.resolve(path, libc::O_PATH | libc::O_DIRECTORY)
    }

    /// `openat2(root, path, flags, RESOLVE_IN_ROOT)`: symlinks and `..` never leave the root.
    fn resolve(&self, path: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
        let c = cstr(path)?;
        // SAFETY: open_how is plain data, zeroed then filled; the syscall reads it for `size`.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: valid descriptor, NUL-terminated path, a live open_how of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.root.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just gave us this descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// The directory at `comps` (inside the root), made with mode 0755 where missing.
    fn ensure_dir(&self, comps: &[&[u8]]) -> io::Result<OwnedFd> {
        match self.open_in_root(&join(comps)) {
            Ok(fd) => Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !comps.is_empty() => {
                let (last, parent) = comps.split_last().expect("not empty");
                let pfd = self.ensure_dir(parent)?;
                let name = cstr(last)?;
                // SAFETY: valid descriptor and NUL-terminated name.
                let rc = unsafe { libc::mkdirat(pfd.as_raw_fd(), name.as_ptr(), 0o755) };
                if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                    return Err(io::Error::last_os_error());
                }
                self.open_in_root(&join(comps)).map_err(|e| {
                    err(
                        &join(comps),
                        format!("a symlink on the way points at nothing in the image ({e})"),
                    )
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Applies one uncompressed layer tarball.
    pub fn apply(&mut self, reader: impl Read) -> io::Result<LayerStats> {
        let mut archive = tar::Archive::new(reader);
        let mut stats = LayerStats::default();
        // Paths this layer made: an opaque marker keeps them and hides only what was below.
        let mut made: HashSet<Vec<u8>> = HashSet::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            if self.budget.entries == 0 {
                return Err(io::Error::other("the image has too many files"));
            }
            self.budget.entries -= 1;
            stats.entries += 1;
            let raw = entry.path_bytes().into_owned();
            let comps = components(&raw)?;
            let Some((name, parent)) = comps.split_last() else {
                continue; // the root itself
            };
            let pfd = self.ensure_dir(parent).map_err(|e| err(&raw, e))?;
            let ctx = |e: io::Error| err(&raw, e);
            if *name == OPAQUE {
                stats.whiteouts += 1;
                self.opaque(&pfd, parent, &made).map_err(ctx)?;
                continue;
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT) {
                stats.whiteouts += 1;
                if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/') {
                    return Err(err(&raw, "malformed whiteout"));
                }
                remove_at(pfd.as_raw_fd(), hidden, 0).map_err(ctx)?;
                continue;
            }
            made.insert(join(&comps));
            let at = At {
                raw: &raw,
                dirfd: pfd.as_raw_fd(),
                parent,
                name,
            };
            if !self.write_entry(&mut entry, &at, &mut stats)? {
                made.remove(&join(&comps));
            }
        }
        Ok(stats)
    }

    /// Writes one entry (not a whiteout) at its place; `false` for a kind that is skipped.
    fn write_entry<R: Read>(&mut self, entry: &mut tar::Entry<R>, at: &At, stats: &mut LayerStats) -> io::Result<bool> {
        let ctx = |e: io::Error| err(at.raw, e);
        let header = entry.header();
        let kind = header.entry_type();
        let owner = Owner {
            mode: header.mode().map_err(ctx)? & 0o7777,
            uid: header.uid().map_err(ctx)? as libc::uid_t,
            gid: header.gid().map_err(ctx)? as libc::gid_t,
            mtime: header.mtime().unwrap_or(0) as i64,
        };
        let cname = cstr(at.name)?;
        match kind {
            EntryType::Directory => write_dir(entry, at, &owner).map_err(ctx)?,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.write_regular(entry, at, &owner, stats)?
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| err(at.raw, "symlink without a target"))?
                    .into_owned();
                remove_at(at.dirfd, at.name, 0).map_err(ctx)?;
                let t = cstr(&target)?;
                // SAFETY: valid descriptor and NUL-terminated strings.
                check(unsafe { libc::symlinkat(t.as_ptr(), at.dirfd, cname.as_ptr()) }).map_err(ctx)?;
                chown_at(at.dirfd, &cname, owner.uid, owner.gid).map_err(ctx)?;
            }
            EntryType::Link => self.write_hardlink(entry, at, &cname)?,
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                write_node(entry.header(), kind, at, &cname, &owner).map_err(ctx)?
            }
            // PAX and GNU long-name headers are read by the tar crate; others are skipped.
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// A regular file, its contents within the image's byte budget.
    fn write_regular<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        at: &At,
        owner: &Owner,
        stats: &mut LayerStats,
    ) -> io::Result<()> {
        let ctx = |e: io::Error| err(at.raw, e);
        let size = entry.size();
        if size > self.budget.bytes {
            return Err(err(at.raw, "the image's files exceed the size limit"));
        }
        remove_at(at.dirfd, at.name, 0).map_err(ctx)?;
        let fd = open_at(at.dirfd, at.name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL).map_err(ctx)?;
        let mut file = File::from(fd);
        let mut limited = (&mut *entry).take(self.budget.bytes);
        let n = io::copy(&mut limited, &mut file).map_err(ctx)?;
        self.budget.bytes -= n;
        stats.bytes += n;
        file.flush()?;
        let fd = OwnedFd::from(file);
        let xattrs = xattrs(entry);
        finish_fd(&fd, owner.uid, owner.gid, owner.mode, Some(owner.mtime), &xattrs).map_err(ctx)
    }

    /// A hard link to an entry already in the root (never outside it); a link to itself is
    /// left alone.
    fn write_hardlink<R: Read>(&self, entry: &tar::Entry<R>, at: &At, cname: &CString) -> io::Result<()> {
        let target = entry
            .link_name_bytes()
            .ok_or_else(|| err(at.raw, "hardlink without a target"))?
            .into_owned();
        let tcomps = components(&target)?;
        let Some((tname, tparent)) = tcomps.split_last() else {
            return Err(err(at.raw, "hardlink to the root"));
        };
        let tfd = self.open_in_root(&join(tparent)).map_err(|e| {
            err(
                at.raw,
                format!("hardlink target {}: {e}", String::from_utf8_lossy(&target)),
            )
        })?;
        if tparent == at.parent && *tname == at.name {
            return Ok(());
        }
        remove_at(at.dirfd, at.name, 0).map_err(|e| err(at.raw, e))?;
        let tc = cstr(tname)?;
        // SAFETY: valid descriptors and NUL-terminated names; flags 0 links the
        // entry itself (a symlink is not followed).
        check(unsafe { libc::linkat(tfd.as_raw_fd(), tc.as_ptr(), at.dirfd, cname.as_ptr(), 0) })
            .map_err(|e| err(at.raw, format!("hardlink to {}: {e}", String::from_utf8_lossy(&target))))?;
        Ok(())
    }

    /// Makes the directory `path` (and missing parents) with `mode`, inside the root. An
    /// existing directory keeps its mode.
    pub fn mkdir(&self, path: &str, mode: u32) -> io::Result<()> {
        let comps = components(path.as_bytes())?;
        let existed = self.open_in_root(&join(&comps)).is_ok();
        let fd = self.ensure_dir(&comps)?;
        if !existed {
            let dir = open_at(fd.as_raw_fd(), b".", libc::O_RDONLY | libc::O_DIRECTORY)?;
            // SAFETY: a descriptor we own.
            check(unsafe { libc::fchmod(dir.as_raw_fd(), mode) })?;
        }
        Ok(())
    }

    /// Writes a root-owned file at `path` inside the root, replacing whatever was there.
    pub fn write_file(&self, path: &str, data: &[u8], mode: u32) -> io::Result<()> {
        let comps = components(path.as_bytes())?;
        let (name, parent) = comps.split_last().ok_or_else(|| err(path.as_bytes(), "no name"))?;
        let pfd = self.ensure_dir(parent)?;
        remove_at(pfd.as_raw_fd(), name, 0)?;
        let fd = open_at(pfd.as_raw_fd(), name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL)?;
        let mut f = File::from(fd);
        f.write_all(data)?;
        finish_fd(&OwnedFd::from(f), 0, 0, mode, None, &[])
    }

    /// Makes `path` a symlink to `target` inside the root, replacing whatever was there.
    pub fn symlink(&self, path: &str, target: &str) -> io::Result<()> {
        let comps = components(path.as_bytes())?;
        let (name, parent) = comps.split_last().ok_or_else(|| err(path.as_bytes(), "no name"))?;
        let pfd = self.ensure_dir(parent)?;
        remove_at(pfd.as_raw_fd(), name, 0)?;
        let (t, n) = (cstr(target.as_bytes())?, cstr(name)?);
        // SAFETY: valid descriptor and NUL-terminated strings.
        check(unsafe { libc::symlinkat(t.as_ptr(), pfd.as_raw_fd(), n.as_ptr()) })?;
        Ok(())
    }

    /// True when `path` names something inside the root (symlinks followed, inside it).
    pub fn exists(&self, path: &str) -> bool {
        self.resolve(path.as_bytes(), libc::O_PATH).is_ok()
    }

    /// Removes what the layers below put in the directory `pfd` (at `parent`).
    fn opaque(&self, pfd: &OwnedFd, parent: &[&[u8]], made: &HashSet<Vec<u8>>) -> io::Result<()> {
        let dir = open_at(pfd.as_raw_fd(), b".", libc::O_RDONLY | libc::O_DIRECTORY)?;
        for name in list(&dir)? {
            let mut comps = parent.to_vec();
            comps.push(name.as_bytes());
            if !made.contains(&join(&comps)) {
                remove_at(dir.as_raw_fd(), name.as_bytes(), 0)?;
            }
        }
        Ok(())
    }
}

/// Names in a directory (via its descriptor's /proc entry: the descriptor pins the directory).
fn list(dir: &OwnedFd) -> io::Result<Vec<std::ffi::OsString>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))? {
        out.push(e?.file_name());
    }
    Ok(out)
}

fn open_at(dirfd: RawFd, name: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: valid descriptor and NUL-terminated name; O_NOFOLLOW: a symlink is not opened.
    let fd = check(unsafe { libc::openat(dirfd, c.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC, 0o600) })?;
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn is_dir_at(dirfd: RawFd, name: &[u8]) -> bool {
    let Ok(c) = cstr(name) else { return false };
    // SAFETY: stat is plain data written by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, NUL-terminated name, live stat buffer.
    let rc = unsafe { libc::fstatat(dirfd, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Removes `name` in `dirfd` and, if it is a directory, everything below it (without following
/// symlinks). A missing name is not an error.
fn remove_at(dirfd: RawFd, name: &[u8], depth: usize) -> io::Result<()> {
    if depth > MAX_DEPTH * 4 {
        return Err(io::Error::other("directory tree too deep to remove"));
    }
    let c = cstr(name)?;
    // SAFETY: valid descriptor and NUL-terminated name.
    if unsafe { libc::unlinkat(dirfd, c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ENOENT) => return Ok(()),
        Some(libc::EISDIR) | Some(libc::EPERM) => {}
        _ => return Err(io::Error::last_os_error()),
    }
    let dir = open_at(dirfd, name, libc::O_RDONLY | libc::O_DIRECTORY)?;
    for child in list(&dir)? {
        remove_at(dir.as_raw_fd(), child.as_bytes(), depth + 1)?;
    }
    // SAFETY: valid descriptor and NUL-terminated name.
    check(unsafe { libc::unlinkat(dirfd, c.as_ptr(), libc::AT_REMOVEDIR) })?;
    Ok(())
}

/// Where an entry goes: its path in the archive (for errors), its parent directory (open,
/// inside the root) and its name there.
struct At<'a> {
    raw: &'a [u8],
    dirfd: RawFd,
    parent: &'a [&'a [u8]],
    name: &'a [u8],
}

/// An entry's owner, permission bits and modification time, from its header.
struct Owner {
    mode: u32,
    uid: libc::uid_t,
    gid: libc::gid_t,
    mtime: i64,
}

/// A directory: made unless one is there, then owned, moded and given its xattrs.
fn write_dir<R: Read>(entry: &mut tar::Entry<R>, at: &At, owner: &Owner) -> io::Result<()> {
    if !is_dir_at(at.dirfd, at.name) {
        remove_at(at.dirfd, at.name, 0)?;
        let cname = cstr(at.name)?;
        // SAFETY: valid descriptor and NUL-terminated name.
        check(unsafe { libc::mkdirat(at.dirfd, cname.as_ptr(), 0o700) })?;
    }
    let fd = open_at(at.dirfd, at.name, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let xattrs = xattrs(entry);
    finish_fd(&fd, owner.uid, owner.gid, owner.mode, None, &xattrs)
}

/// A character or block device, or a FIFO.
fn write_node(header: &tar::Header, kind: EntryType, at: &At, cname: &CString, owner: &Owner) -> io::Result<()> {
    let ty = match kind {
        EntryType::Char => libc::S_IFCHR,
        EntryType::Block => libc::S_IFBLK,
        _ => libc::S_IFIFO,
    };
    let major = header.device_major().ok().flatten().unwrap_or(0);
    let minor = header.device_minor().ok().flatten().unwrap_or(0);
    remove_at(at.dirfd, at.name, 0)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: valid descriptor and NUL-terminated name.
    check(unsafe { libc::mknodat(at.dirfd, cname.as_ptr(), ty | 0o600, dev) })?;
    chown_at(at.dirfd, cname, owner.uid, owner.gid)?;
    // A device node cannot be opened to fchmod it safely; fchmodat does not
    // follow anything here, the name was just made as a node.
    // SAFETY: valid descriptor and NUL-terminated name.
    check(unsafe { libc::fchmodat(at.dirfd, cname.as_ptr(), owner.mode, 0) })?;
    Ok(())
}

fn chown_at(dirfd: RawFd, name: &CString, uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name; the link itself, never its target.
    check(unsafe { libc::fchownat(dirfd, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(())
}

/// Owner, then mode (a chown clears set-id bits), extended attributes and mtime of an open file.
fn finish_fd(
    fd: &OwnedFd,
    uid: libc::uid_t,
    gid: libc::gid_t,
    mode: u32,
    mtime: Option<i64>,
    xattrs: &[(CString, Vec<u8>)],
) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: plain syscalls on a descriptor we own.
    check(unsafe { libc::fchown(raw, uid, gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::fchmod(raw, mode) })?;
    for (k, v) in xattrs {
        // SAFETY: valid descriptor, NUL-terminated name, a live buffer of the length passed.
        check(unsafe { libc::fsetxattr(raw, k.as_ptr(), v.as_ptr().cast(), v.len(), 0) })?;
    }
    if let Some(t) = mtime {
        let ts = [
            libc::timespec { tv_sec: t, tv_nsec: 0 },
            libc::timespec { tv_sec: t, tv_nsec: 0 },
        ];
        // SAFETY: valid descriptor and two timespecs.
        check(unsafe { libc::futimens(raw, ts.as_ptr()) })?;
    }
    Ok(())
}

/// `SCHILY.xattr.*` PAX records of an entry (how Docker and BuildKit store capabilities and
/// other extended attributes).
fn xattrs<R: Read>(entry: &mut tar::Entry<R>) -> Vec<(CString, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(Some(exts)) = entry.pax_extensions() {
        for e in exts.flatten() {
            if let Some(name) = e.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                if let Ok(c) = CString::new(name) {
                    if out.len() < 64 && e.value_bytes().len() <= 64 << 10 {
                        out.push((c, e.value_bytes().to_vec()));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(0);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn special(b: &mut tar::Builder<Vec<u8>>, path: &str, kind: EntryType, link: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        if !link.is_empty() {
            b.append_link(&mut h, path, link).unwrap();
        } else {
            b.append_data(&mut h, path, &[][..]).unwrap();
        }
    }

    #[test]
    #[ignore = "full tier: needs root, unpacking gives files their layer's owners (scripts/test.sh runs it)"]
    fn whiteouts_opaque_links_and_modes() {
        let root = tempfile::tempdir().unwrap();
        let mut a = Applier::new(root.path(), Budget::default()).unwrap();
        a.apply(
            &layer(|b| {
                special(b, "etc/", EntryType::Directory, "");
                file(b, "etc/gone", b"x", 0o644);
                special(b, "opt/", EntryType::Directory, "");
                file(b, "opt/old", b"old", 0o644);
                file(b, "bin/tool", b"tool", 0o4755);
            })[..],
        )
        .unwrap();
        a.apply(
            &layer(|b| {
                file(b, "etc/.wh.gone", b"", 0o644);
                file(b, "opt/new", b"new", 0o644);
                file(b, "opt/.wh..wh..opq", b"", 0o644);
                special(b, "bin/hard", EntryType::Link, "bin/tool");
                special(b, "bin/soft", EntryType::Symlink, "tool");
            })[..],
        )
        .unwrap();
        let p = root.path();
        assert!(!p.join("etc/gone").exists());
        assert!(!p.join("opt/old").exists());
        assert_eq!(std::fs::read(p.join("opt/new")).unwrap(), b"new");
        let tool = std::fs::metadata(p.join("bin/tool")).unwrap();
        assert_eq!(tool.permissions().mode() & 0o7777, 0o4755);
        assert_eq!((tool.uid(), tool.gid()), (1000, 1000));
        assert_eq!(std::fs::metadata(p.join("bin/hard")).unwrap().ino(), tool.ino());
        assert_eq!(std::fs::read_link(p.join("bin/soft")).unwrap(), Path::new("tool"));
    }

    #[test]
    #[ignore = "full tier: needs root, unpacking gives files their layer's owners (scripts/test.sh runs it)"]
    fn nothing_escapes_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let mut a = Applier::new(root.path(), Budget::default()).unwrap();
        // Symlinks to the outside, then files written through them: they land inside.
        let target = outside.path().to_str().unwrap().to_string();
        a.apply(
            &layer(|b| {
                special(b, "etc/", EntryType::Directory, "");
                special(b, "escape", EntryType::Symlink, "/etc");
                file(b, "escape/pwned", b"x", 0o644);
                special(b, "up", EntryType::Symlink, "../../../../..");
                file(b, "up/pwned2", b"x", 0o644);
            })[..],
        )
        .unwrap();
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert!(root.path().join("etc/pwned").exists());
        assert!(root.path().join("pwned2").exists());
        // Through a symlink whose target is missing inside: refused, nothing written outside.
        let e = a
            .apply(
                &layer(|b| {
                    special(b, "dangling", EntryType::Symlink, &target);
                    file(b, "dangling/pwned", b"x", 0o644);
                })[..],
            )
            .unwrap_err();
        assert!(e.to_string().contains("dangling"), "{e}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // `..` in a path is refused outright; so is a hardlink through an escaping symlink.
        let e = a.apply(&layer(|b| file_raw(b, "../x"))[..]).unwrap_err();
        assert!(e.to_string().contains(".."), "{e}");
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        a.apply(&layer(|b| special(b, "steal", EntryType::Link, "escape/secret"))[..])
            .unwrap_err();
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    }

    fn file_raw(b: &mut tar::Builder<Vec<u8>>, path: &str) {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(0);
        h.set_entry_type(EntryType::Regular);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }

    #[test]
    #[ignore = "full tier: needs root, unpacking gives files their layer's owners (scripts/test.sh runs it)"]
    fn budget_bounds_sizes_and_counts() {
        let root = tempfile::tempdir().unwrap();
        let mut a = Applier::new(
            root.path(),
            Budget {
                bytes: 10,
                entries: 100,
            },
        )
        .unwrap();
        let e = a.apply(&layer(|b| file(b, "big", &[0u8; 64], 0o644))[..]).unwrap_err();
        assert!(e.to_string().contains("size limit"), "{e}");
        let mut a = Applier::new(
            root.path(),
            Budget {
                bytes: 1 << 20,
                entries: 2,
            },
        )
        .unwrap();
        let e = a
            .apply(
                &layer(|b| {
                    for i in 0..3 {
                        file(b, &format!("f{i}"), b"", 0o644);
                    }
                })[..],
            )
            .unwrap_err();
        assert!(e.to_string().contains("too many"), "{e}");
    }
}
