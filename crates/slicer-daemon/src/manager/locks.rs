//! Per-VM operation locks: one state change at a time per VM.

use super::*;

/// Per-VM operation locks by hostname; an entry lives while someone holds or waits for it.
pub(super) type OpMap = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// One VM's operation lock, held: create (up to its launch), delete, relaunch, suspend,
/// restore, pause, resume, shutdown and the reaping of an exited VM run one at a time per VM.
pub struct VmOp {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    ops: OpMap,
}

impl Drop for VmOp {
    fn drop(&mut self) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        self.guard.take();
        // Locks nobody holds or waits for go (also one left by a waiter that gave up).
        ops.retain(|_, l| Arc::strong_count(l) > 1);
    }
}

impl Manager {
    pub(super) fn op_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for and takes `hostname`'s operation lock (see [`VmOp`]).
    pub async fn lock_vm(&self, hostname: &str) -> VmOp {
        let lock = self.op_map().entry(hostname.to_string()).or_default().clone();
        VmOp {
            guard: Some(lock.lock_owned().await),
            ops: self.ops.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn operation_locks_serialise_and_go_when_unused() {
        let ops = OpMap::default();
        let lock = |h: &str| {
            let l = ops.lock().unwrap().entry(h.to_string()).or_default().clone();
            let ops = ops.clone();
            async move {
                VmOp {
                    guard: Some(l.lock_owned().await),
                    ops,
                }
            }
        };
        let first = lock("vm-1").await;
        let waiting = tokio::spawn(lock("vm-1"));
        let other = lock("vm-2").await;
        // The waiter runs (on this single-threaded runtime) whenever the test yields.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "a second operation on vm-1 waits");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ops.lock().unwrap().len(), 2);
        drop(second);
        drop(other);
        assert!(ops.lock().unwrap().is_empty(), "unused locks are removed");
    }
}
