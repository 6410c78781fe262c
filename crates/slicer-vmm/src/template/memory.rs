//! Template memory: sealed memfds holding a template's or capture's guest RAM, and the cache
//! of them a host keeps loaded for the next restores.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Context, Result};
use crate::Error;

/// Default bound of [`LoadedMemory`]: what a host keeps loaded unless told otherwise.
pub const DEFAULT_TEMPLATE_MEMORY: u64 = 2 << 30;

/// Template and capture memory a host keeps loaded for the next restores: sealed memfds (see
/// [`Host::load_template_memory`](crate::Host::load_template_memory)) by template directory, at most `limit` bytes of them, the least
/// recently used going first (one no running clone maps before one that some clone does).
///
/// Evicting only closes the host's descriptor: a running clone maps the memfd, which keeps it
/// (and the `Vm` of that clone keeps a descriptor too, so it is still counted here); the next
/// restore of that template loads it from disk again. Every memfd made is counted in
/// [`MemoryUse::pinned_bytes`] until its last holder closes it.
pub struct LoadedMemory {
    inner: std::sync::Mutex<Loaded>,
}

struct Loaded {
    limit: u64,
    /// Oldest use first.
    cache: Vec<Entry>,
    /// Every memfd made, with its size, until the cache and every clone have dropped it.
    made: Vec<(std::sync::Weak<std::os::fd::OwnedFd>, u64)>,
}

struct Entry {
    dir: PathBuf,
    fd: Arc<std::os::fd::OwnedFd>,
    bytes: u64,
}

/// What template and capture memory holds now (see [`LoadedMemory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Kept loaded by the host for later restores.
    pub loaded_bytes: u64,
    /// How many templates and captures that is.
    pub loaded: usize,
    /// All template and capture memory alive: loaded, or held by running clones.
    pub pinned_bytes: u64,
    /// The bound on `loaded_bytes`.
    pub limit_bytes: u64,
}

impl LoadedMemory {
    pub fn new(limit: u64) -> LoadedMemory {
        LoadedMemory {
            inner: std::sync::Mutex::new(Loaded {
                limit,
                cache: Vec::new(),
                made: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bounds what is kept loaded to `limit` bytes (evicting now if over it).
    pub fn set_limit(&self, limit: u64) {
        let mut l = self.lock();
        l.limit = limit;
        l.trim();
    }

    /// The memory loaded for the template in `dir`, now the most recently used.
    pub fn get(&self, dir: &Path) -> Option<Arc<std::os::fd::OwnedFd>> {
        let mut l = self.lock();
        let i = l.cache.iter().position(|e| e.dir == dir)?;
        let e = l.cache.remove(i);
        let fd = e.fd.clone();
        l.cache.push(e);
        Some(fd)
    }

    /// Whether the memory of the template in `dir` is loaded.
    pub fn contains(&self, dir: &Path) -> bool {
        self.lock().cache.iter().any(|e| e.dir == dir)
    }

    /// Keeps `fd` (`bytes` long) as the memory of the template in `dir`, then evicts past the
    /// limit (this one too when it alone is over it: the caller's handle still works). When
    /// another caller loaded it meanwhile, that copy is kept and returned.
    pub fn insert(&self, dir: &Path, fd: Arc<std::os::fd::OwnedFd>, bytes: u64) -> Arc<std::os::fd::OwnedFd> {
        let mut l = self.lock();
        if let Some(e) = l.cache.iter().find(|e| e.dir == dir) {
            return e.fd.clone();
        }
        l.made.push((Arc::downgrade(&fd), bytes));
        l.cache.push(Entry {
            dir: dir.to_path_buf(),
            fd: fd.clone(),
            bytes,
        });
        l.trim();
        fd
    }

    /// Evicts loaded memory no running clone maps, least recently used first, until `need`
    /// bytes are freed or none is left; returns what was freed.
    pub fn evict_unused(&self, need: u64) -> u64 {
        let mut l = self.lock();
        let mut freed = 0;
        while freed < need {
            let Some(i) = l.cache.iter().position(|e| Arc::strong_count(&e.fd) == 1) else {
                break;
            };
            let e = l.cache.remove(i);
            tracing::info!(
                "unloaded the memory of {} ({} MiB) to make room",
                e.dir.display(),
                e.bytes >> 20
            );
            freed += e.bytes;
        }
        freed
    }

    /// Drops the memory of the template in `dir` (a removed commit).
    pub fn forget(&self, dir: &Path) {
        self.lock().cache.retain(|e| e.dir != dir);
    }

    /// What is loaded and alive now.
    pub fn usage(&self) -> MemoryUse {
        let mut l = self.lock();
        l.made.retain(|(w, _)| w.strong_count() > 0);
        MemoryUse {
            loaded_bytes: l.cache.iter().map(|e| e.bytes).sum(),
            loaded: l.cache.len(),
            pinned_bytes: l.made.iter().map(|(_, b)| b).sum(),
            limit_bytes: l.limit,
        }
    }
}

impl Loaded {
    /// Evicts the least recently used until the loaded memory fits the limit: first what no
    /// clone maps (that frees memory now), then the rest (freed when its clones end).
    fn trim(&mut self) {
        let mut total: u64 = self.cache.iter().map(|e| e.bytes).sum();
        for unused_only in [true, false] {
            while total > self.limit {
                let Some(i) = self
                    .cache
                    .iter()
                    .position(|e| !unused_only || Arc::strong_count(&e.fd) == 1)
                else {
                    break;
                };
                let e = self.cache.remove(i);
                tracing::info!(
                    "unloaded the memory of {} ({} MiB): template memory is bounded to {} MiB",
                    e.dir.display(),
                    e.bytes >> 20,
                    self.limit >> 20
                );
                total -= e.bytes;
            }
        }
    }
}

/// A new memfd of `len` bytes that can be sealed.
pub(super) fn new_memfd(len: u64) -> Result<std::fs::File> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: a NUL-terminated name; the kernel returns a new descriptor or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"slicer-template-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(Error::Io {
            context: "memfd_create".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the kernel just gave us this descriptor.
    let mem = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    mem.set_len(len)?;
    Ok(mem)
}

/// Copies the data extents of `src` (its first `len` bytes) to the same offsets of `dst`:
/// holes (never-touched guest pages) stay holes.
pub(super) fn copy_extents(src: &std::fs::File, dst: &std::fs::File, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let raw = src.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a descriptor the caller owns.
        let data = unsafe { libc::lseek(raw, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after pos
        }
        // SAFETY: as above.
        let hole = (unsafe { libc::lseek(raw, data, libc::SEEK_HOLE) }.max(data) as u64).min(len);
        let mut at = data as u64;
        while at < hole {
            let n = ((hole - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        pos = hole as i64;
    }
    Ok(())
}

/// Punches out the all-zero pages of `mem` (a capture's memory, allocated in full): guest
/// pages never written then take no memory in it, nor in the copy on disk.
pub(super) fn punch_zero_pages(mem: &std::fs::File, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    static ZERO_PAGE: [u8; PAGE] = [0; PAGE];
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    // A run of zero pages, punched in one call when it ends.
    let mut run: Option<u64> = None;
    let punch = |from: u64, to: u64| -> Result<()> {
        // SAFETY: fallocate on a descriptor the caller owns.
        let r = unsafe {
            libc::fallocate(
                mem.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                from as i64,
                (to - from) as i64,
            )
        };
        if r != 0 {
            return Err(Error::Io {
                context: "punching zero pages".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    };
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        mem.read_exact_at(&mut buf[..n], at)?;
        for (i, page) in buf[..n].chunks(PAGE).enumerate() {
            let off = at + (i * PAGE) as u64;
            // A slice comparison is one memcmp, fast in any build.
            match (page == &ZERO_PAGE[..page.len()], run) {
                (true, None) => run = Some(off),
                (false, Some(from)) => {
                    punch(from, off)?;
                    run = None;
                }
                _ => {}
            }
        }
        at += n as u64;
    }
    if let Some(from) = run {
        punch(from, len)?;
    }
    Ok(())
}

/// Allocates every page of `mem` that is a hole (a zero page the guest never wrote), so the
/// memfd holds the whole of the guest's RAM. Clones map it privately, and tmpfs, unlike a
/// disk file, allocates a page in the file itself on a fault in a hole, a write fault too
/// (the copy-on-write needs a source page): left sparse, a clone's cgroup would be charged
/// for that shared page as well as its private copy, up to twice its RAM, and the kernel kills
/// a guest that merely uses all of its memory. Filled here, the template's pages are the
/// daemon's, allocated once, and a clone is charged only for the pages it writes.
pub(super) fn fill_holes(mem: &std::fs::File, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor the caller owns; mode 0 only allocates within the size.
    if unsafe { libc::fallocate(mem.as_raw_fd(), 0, 0, len as i64) } != 0 {
        return Err(Error::Io {
            context: "allocating the template memory".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Seals a memfd against write, grow, shrink and further seals (no shared writable mapping of
/// it may exist any more).
pub(super) fn seal(mem: &std::fs::File) -> Result<()> {
    use std::os::fd::AsRawFd;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor the caller owns.
    if unsafe { libc::fcntl(mem.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(Error::Io {
            context: "sealing the template memory".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `path`'s data extents copied into a new memfd of the same size, then sealed.
pub(super) fn sealed_copy(path: &Path) -> Result<std::os::fd::OwnedFd> {
    let src = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = src.metadata()?.len();
    let mem = new_memfd(len)?;
    copy_extents(&src, &mem, len)?;
    fill_holes(&mem, len)?;
    seal(&mem)?;
    Ok(std::os::fd::OwnedFd::from(mem))
}
