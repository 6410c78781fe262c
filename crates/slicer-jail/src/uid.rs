//! One unprivileged uid per running VM.
//!
//! A uid is free when no process on the host runs under it: the pool scans `/proc` (real uid
//! in `/proc/<pid>/status`), so uids held by other daemons' VMs, or by VMs an earlier run of
//! this daemon left running, are never handed out again. Between the choice and the moment
//! QEMU runs under the uid (when the scan starts seeing it), a lease holds a non-blocking
//! `flock` on `<lock dir>/<uid>`: another lease, in this process or another daemon, skips it.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use crate::{io_err, Error, Result};

/// Default range: above what distributions hand out to users and subordinate-uid ranges,
/// below 2^31.
pub const DEFAULT_START: u32 = 2_000_000_000;
pub const DEFAULT_COUNT: u32 = 65_536;

pub struct UidPool {
    start: u32,
    count: u32,
    lock_dir: PathBuf,
}

/// A uid chosen for one VM, reserved until dropped: drop it once QEMU runs under the uid.
pub struct UidLease {
    pub uid: u32,
    _lock: std::fs::File,
}

impl UidPool {
    /// uids `start..start+count`; `lock_dir` is shared by every daemon on the host.
    pub fn new(start: u32, count: u32, lock_dir: PathBuf) -> UidPool {
        UidPool { start, count, lock_dir }
    }

    pub fn range(&self) -> std::ops::Range<u32> {
        self.start..self.start.saturating_add(self.count)
    }

    /// A uid no process runs under, starting the search at a point derived from `hint` (the
    /// VM's name), so a VM tends to get the same uid again.
    pub fn lease(&self, hint: &str) -> Result<UidLease> {
        std::fs::create_dir_all(&self.lock_dir).map_err(io_err(format!("creating {}", self.lock_dir.display())))?;
        let used = uids_in_use();
        let first = hint
            .bytes()
            .fold(2166136261u32, |h, b| (h ^ u32::from(b)).wrapping_mul(16777619))
            % self.count.max(1);
        for uid in (0..self.count).map(|i| self.start + (first + i) % self.count) {
            if used.contains(&uid) {
                continue;
            }
            let path = self.lock_dir.join(uid.to_string());
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io_err(format!("opening {}", path.display())))?;
            // SAFETY: flock(2) on a descriptor we own; never blocks (LOCK_NB).
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(UidLease { uid, _lock: file });
            }
        }
        Err(Error::NoFreeUid {
            start: self.start,
            end: self.start.saturating_add(self.count),
        })
    }
}

/// Real uids of every process on the host.
pub fn uids_in_use() -> HashSet<u32> {
    let mut set = HashSet::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Some(uid) = process_uid(&e.path().join("status")) {
            set.insert(uid);
        }
    }
    set
}

fn process_uid(status: &std::path::Path) -> Option<u32> {
    let text = std::fs::read_to_string(status).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The real uid of a process.
pub fn uid_of(pid: u32) -> Option<u32> {
    process_uid(&PathBuf::from(format!("/proc/{pid}/status")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_skip_uids_in_use_and_stay_in_range() {
        let dir = tempfile::tempdir().unwrap();
        // Our own uid is in use: a pool of exactly that uid has nothing to give.
        let me = unsafe { libc::getuid() };
        let pool = UidPool::new(me, 1, dir.path().join("locks"));
        assert!(matches!(pool.lease("x"), Err(Error::NoFreeUid { .. })));
        let pool = UidPool::new(DEFAULT_START, 8, dir.path().join("locks"));
        let a = pool.lease("vm-1").unwrap().uid;
        assert!(pool.range().contains(&a));
        assert_eq!(pool.lease("vm-1").unwrap().uid, a, "same hint, same uid while free");
        // While leased, another lease (here or in another daemon) gets another uid.
        let held = pool.lease("vm-1").unwrap();
        let b = pool.lease("vm-1").unwrap();
        assert_ne!(held.uid, b.uid);
        assert!(uid_of(std::process::id()).is_some());
    }
}
