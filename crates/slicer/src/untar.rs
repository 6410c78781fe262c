//! Unpacking a guest's tar on the user's machine (`vm cp NAME:/dir LOCAL -r`).
//!
//! The archive is written by the guest, so it is hostile input, and the user running the CLI
//! (perhaps root) is the one it would hurt:
//! - a member's extension headers (GNU long name / long link, PAX) are read into memory by the
//!   `tar` crate with no limit: they are bounded here ([`MAX_MEMBER_HEADERS`]);
//! - modes are masked with the user's umask (and never world-writable); setuid, setgid and
//!   sticky bits are dropped, as `tar` without `-p` does for a non-root user;
//! - names are made relative; names with `..` are skipped; a member that would be written
//!   through a symlink (or hard link) out of the destination is refused (the `tar` crate's
//!   `unpack_in` checks that);
//! - `--exclude` patterns match names relative to the destination, whatever the guest sent.

use std::cell::Cell;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use anyhow::{bail, Context, Result};

/// Most bytes the `tar` crate may read from the archive while it parses the headers of one
/// member (its 512-byte header and any GNU long name, GNU long link and PAX extension header
/// before it, each of which it keeps in memory whole): three extension headers of 64 KiB each
/// plus their own headers and padding fit.
pub const MAX_MEMBER_HEADERS: u64 = 256 << 10;

/// Mode bits a guest never sets on the user's files, whatever the umask: others' write.
const ALWAYS_MASKED: u32 = 0o002;

/// The budget of reads while headers are parsed. `None` while a member's data is read (a file's
/// data goes to disk as it comes, so its size is not held in memory).
#[derive(Default)]
struct Budget {
    left: Cell<Option<u64>>,
    exceeded: Cell<bool>,
}

/// The archive's reader, failing once a member's headers exceed their budget. The `tar`
/// crate offers no limit on extension headers (`Archive::entries` reads a long name or a PAX
/// header with `read_to_end`) and parsing the stream again beside it would be a second tar
/// parser to keep in step, so the bound is on bytes read while it parses headers.
struct Bounded<R> {
    inner: R,
    budget: Rc<Budget>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(left) = self.budget.left.get() else {
            return self.inner.read(buf);
        };
        if left == 0 && !buf.is_empty() {
            self.budget.exceeded.set(true);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a member's headers exceed {} KiB", MAX_MEMBER_HEADERS >> 10),
            ));
        }
        let max = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.budget.left.set(Some(left - n as u64));
        Ok(n)
    }
}

/// The process's umask, read from /proc (reading it with umask(2) means setting it, which
/// races with other threads creating files); 0o022 if /proc does not say.
pub fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// `name` relative to the destination: root and `.` components dropped; `None` when it has a
/// `..` (it would leave the destination) or names the destination itself.
fn relative(name: &Path) -> Option<PathBuf> {
    let mut rel = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return None,
            Component::Normal(p) => rel.push(p),
        }
    }
    (!rel.as_os_str().is_empty()).then_some(rel)
}

/// The `--exclude` rules of a download, matched against names relative to the destination.
/// A pattern that names a path under the guest's source directory `src` (`/src/dir/x`) is
/// taken relative to it (`/x`), as the user meant it.
pub fn exclude_rules(src: &str, exclude: &[String]) -> Result<ignore::gitignore::Gitignore> {
    // Rooted at "": nothing is stripped from the (already relative) names matched.
    let mut b = ignore::gitignore::GitignoreBuilder::new("");
    let src = src.trim_end_matches('/');
    for p in exclude {
        let line = match p.strip_prefix(src).filter(|r| !src.is_empty() && r.starts_with('/')) {
            Some(under) => under,
            None => p.as_str(),
        };
        b.add_line(None, line).with_context(|| format!("--exclude {p:?}"))?;
    }
    Ok(b.build()?)
}

/// Unpacks the tar read from `r` into `dest` (created if missing), but what `exclude` leaves
/// out, with modes masked by `umask` (see the module's documentation).
pub fn unpack<R: Read>(r: R, dest: &Path, exclude: &ignore::gitignore::Gitignore, umask: u32) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let budget = Rc::new(Budget::default());
    let mut ar = tar::Archive::new(Bounded {
        inner: r,
        budget: budget.clone(),
    });
    // Modes as `tar` without `-p`: the permission bits only, then the umask.
    ar.set_preserve_permissions(false);
    ar.set_preserve_ownerships(false);
    ar.set_unpack_xattrs(false);
    ar.set_mask(umask | ALWAYS_MASKED);
    let mut entries = ar.entries().context("reading the guest's tar")?;
    loop {
        budget.left.set(Some(MAX_MEMBER_HEADERS));
        let next = entries.next();
        budget.left.set(None);
        let mut e = match next {
            None => return Ok(()),
            Some(Ok(e)) => e,
            Some(Err(_)) if budget.exceeded.get() => bail!(
                "the guest's tar has a member whose headers (long name, long link or PAX) exceed {} KiB; nothing more was unpacked",
                MAX_MEMBER_HEADERS >> 10
            ),
            Some(Err(err)) => return Err(err).context("reading the guest's tar"),
        };
        let name = e.path().context("a name in the guest's tar")?.into_owned();
        let is_dir = e.header().entry_type().is_dir();
        match relative(&name) {
            None if name.components().any(|c| c == Component::ParentDir) => {
                eprintln!("skipped {name:?}: it would leave {}", dest.display());
            }
            None => {}
            Some(rel) if exclude.matched_path_or_any_parents(&rel, is_dir).is_ignore() => {}
            Some(_) => {
                e.unpack_in(dest)
                    .with_context(|| format!("unpacking {name:?} into {}", dest.display()))?;
            }
        }
        // What unpacking did not read (a skipped member, a link's data) is read past here,
        // with no budget: it is never held.
        io::copy(&mut e, &mut io::sink()).context("reading the guest's tar")?;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A tar header of `kind` for `name` with `size` bytes of data and `mode`.
    fn header(kind: tar::EntryType, name: &[u8], size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        // Written raw: set_path refuses `..` and absolute names, which a guest may send.
        let gnu = h.as_gnu_mut().expect("a GNU header");
        gnu.name[..name.len()].copy_from_slice(name);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(1);
        h.set_cksum();
        h
    }

    fn member(out: &mut Vec<u8>, h: &tar::Header, data: &[u8]) {
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    fn file(out: &mut Vec<u8>, name: &str, data: &[u8], mode: u32) {
        member(
            out,
            &header(tar::EntryType::Regular, name.as_bytes(), data.len() as u64, mode),
            data,
        );
    }

    fn end(mut out: Vec<u8>) -> Vec<u8> {
        out.extend_from_slice(&[0; 1024]);
        out
    }

    fn no_rules() -> ignore::gitignore::Gitignore {
        exclude_rules("/src", &[]).expect("no rules")
    }

    /// A reader of `n` bytes made as they are read (nothing is held), counting what was read.
    struct Lazy {
        head: Vec<u8>,
        pos: u64,
        len: u64,
        read: Rc<Cell<u64>>,
    }

    impl Read for Lazy {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let left = self.len - self.pos;
            let n = (buf.len() as u64).min(left) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                let at = self.pos as usize + i;
                *b = self.head.get(at).copied().unwrap_or(b'a');
            }
            self.pos += n as u64;
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }

    #[test]
    fn a_100_mib_pax_header_is_refused_after_its_budget() {
        let size = 100u64 << 20;
        let h = header(tar::EntryType::XHeader, b"PaxHeaders/x", size, 0o644);
        let read = Rc::new(Cell::new(0));
        let lazy = Lazy {
            head: h.as_bytes().to_vec(),
            pos: 0,
            len: 512 + size,
            read: read.clone(),
        };
        let dir = tempfile::tempdir().expect("a directory");
        let err = unpack(lazy, dir.path(), &no_rules(), 0o022).expect_err("refused");
        assert!(err.to_string().contains("exceed 256 KiB"), "{err:#}");
        assert!(read.get() <= MAX_MEMBER_HEADERS, "read {} bytes", read.get());
    }

    #[test]
    fn a_long_gnu_name_within_the_budget_unpacks_and_a_larger_one_is_refused() {
        for (len, ok) in [(3_000usize, true), (400_000, false)] {
            // A name of `len` bytes: directories of 200-byte names, then a file.
            let mut name = String::new();
            while name.len() + 201 < len {
                name.push_str(&"d".repeat(200));
                name.push('/');
            }
            name.push('f');
            let mut tar = Vec::new();
            let mut long = name.clone().into_bytes();
            long.push(0);
            member(
                &mut tar,
                &header(tar::EntryType::GNULongName, b"././@LongLink", long.len() as u64, 0o644),
                &long,
            );
            // The member the long name names, then another.
            file(&mut tar, "short", b"hi", 0o644);
            file(&mut tar, "after", b"x", 0o644);
            let dir = tempfile::tempdir().expect("a directory");
            let res = unpack(end(tar).as_slice(), dir.path(), &no_rules(), 0o022);
            if ok {
                res.expect("unpacked");
                assert!(dir.path().join(&name).is_file());
                assert!(!dir.path().join("short").exists());
                assert!(dir.path().join("after").is_file());
            } else {
                let err = res.expect_err("refused");
                assert!(err.to_string().contains("exceed 256 KiB"), "{err:#}");
            }
        }
    }

    #[test]
    fn modes_get_the_umask_and_lose_setuid_setgid_and_world_write() {
        let mut tar = Vec::new();
        file(&mut tar, "suid", b"#!/bin/sh\n", 0o6777);
        member(&mut tar, &header(tar::EntryType::Directory, b"d/", 0, 0o7777), &[]);
        file(&mut tar, "d/f", b"x", 0o666);
        let dir = tempfile::tempdir().expect("a directory");
        unpack(end(tar.clone()).as_slice(), dir.path(), &no_rules(), 0o022).expect("unpacked");
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join(p))
                .expect("unpacked")
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("suid"), 0o755);
        assert_eq!(mode("d"), 0o755);
        assert_eq!(mode("d/f"), 0o644);
        // With no umask at all, still no write for others.
        let dir2 = tempfile::tempdir().expect("a directory");
        unpack(end(tar).as_slice(), dir2.path(), &no_rules(), 0).expect("unpacked");
        let m = std::fs::metadata(dir2.path().join("suid"))
            .expect("unpacked")
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(m, 0o775);
    }

    #[test]
    fn an_absolute_exclude_and_absolute_names_do_not_panic() {
        let mut tar = Vec::new();
        file(&mut tar, "/abs/path", b"1", 0o644);
        file(&mut tar, "/abs/kept", b"2", 0o644);
        file(&mut tar, "node_modules/x", b"3", 0o644);
        file(&mut tar, "src/a", b"4", 0o644);
        let dir = tempfile::tempdir().expect("a directory");
        let rules = exclude_rules(
            "/home/u/proj",
            &["/abs/path".into(), "/home/u/proj/node_modules".into()],
        )
        .expect("rules");
        unpack(end(tar).as_slice(), dir.path(), &rules, 0o022).expect("unpacked");
        assert!(!dir.path().join("abs/path").exists());
        assert!(dir.path().join("abs/kept").is_file());
        assert!(!dir.path().join("node_modules").exists());
        assert!(dir.path().join("src/a").is_file());
    }

    #[test]
    fn nothing_lands_outside_the_destination() {
        let outside = tempfile::tempdir().expect("a directory");
        let mut tar = Vec::new();
        file(&mut tar, "../escaped", b"x", 0o644);
        file(&mut tar, "a/../../escaped2", b"x", 0o644);
        let mut link = header(tar::EntryType::Symlink, b"link", 0, 0o777);
        link.set_link_name(outside.path()).expect("a link name");
        link.set_cksum();
        member(&mut tar, &link, &[]);
        file(&mut tar, "link/through", b"x", 0o644);
        let dir = tempfile::tempdir().expect("a directory");
        let dest = dir.path().join("dest");
        let err = unpack(end(tar).as_slice(), &dest, &no_rules(), 0o022).expect_err("refused");
        assert!(format!("{err:#}").contains("outside of destination"), "{err:#}");
        assert!(!dir.path().join("escaped").exists());
        assert!(!dir.path().join("escaped2").exists());
        assert_eq!(std::fs::read_dir(outside.path()).expect("listed").count(), 0);

        // A hard link to a file outside is refused too.
        let secret = outside.path().join("secret");
        std::fs::write(&secret, "s").expect("written");
        let mut tar = Vec::new();
        let mut hard = header(tar::EntryType::Link, b"hard", 0, 0o644);
        hard.set_link_name(&secret).expect("a link name");
        hard.set_cksum();
        member(&mut tar, &hard, &[]);
        let dest = dir.path().join("dest2");
        assert!(unpack(end(tar).as_slice(), &dest, &no_rules(), 0o022).is_err());
        assert!(!dest.join("hard").exists());
    }
}
