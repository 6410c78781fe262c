//! Shell scripts the tests run in guests, where more than one test needs the same one.

/// Leaves live state that only a memory capture carries over: a counter a shell keeps
/// advancing in `/dev/shm/count`, a tmpfs file held open (fd 3) by a `sleep` whose pid is in
/// `/dev/shm/holder` and then unlinked, and a write on disk (`/root/on-disk`). Returns once
/// the holder and the counter are there.
pub const LIVE_STATE: &str = "echo held > /dev/shm/held; \
     setsid sh -c 'echo $$ > /dev/shm/holder; exec sleep 100000 3</dev/shm/held' </dev/null >/dev/null 2>&1 & \
     setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /dev/shm/count.new; mv /dev/shm/count.new /dev/shm/count; sleep 0.05; done' </dev/null >/dev/null 2>&1 & \
     echo disk > /root/on-disk; sync; \
     for i in $(seq 500); do p=$(cat /dev/shm/holder 2>/dev/null) && [ -e /proc/$p/fd/3 ] && [ -e /dev/shm/count ] && break; sleep 0.01; done; \
     rm /dev/shm/held";
