#!/usr/bin/env bash
# Benchmarks against real guests; records tables in docs/benchmarks.md.
#   sudo ./scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --no-run
cargo build --release -q -p slicer-bench
for cpus in 1 2; do
  target/release/slicer-bench --suite boot --image min --cpus "$cpus" "$@"
done
target/release/slicer-bench --suite daemon --image min "$@"
target/release/slicer-bench --suite net --image min "$@"
target/release/slicer-bench --suite jail --image min "$@"
target/release/slicer-bench --suite warm --image min "$@"
target/release/slicer-bench --suite warm --image systemd --memory 512 "$@"
target/release/slicer-bench --suite images "$@"
target/release/slicer-bench --suite density --image min --vms 20 "$@"
target/release/slicer-bench --suite density --image systemd --memory 512 --vms 20 "$@"
target/release/slicer-bench --suite livefork --image min --boots 5 "$@"
# Slicer Proxy against direct, on the host (downloads, request latency, connection rate, RSS).
target/release/slicer-bench --suite proxy --transfer-mib 256 --execs 500 "$@"
# Adds idle VMs until create latency doubles, memory runs short or 600 are held (minutes).
target/release/slicer-bench --suite hold --image min --vms 600 "$@"
# 20 minutes of four clients creating, using and deleting sandboxes; leaks, RSS, percentiles.
target/release/slicer-bench --suite soak --image min --secs 1200 --clients 4 "$@"
# Two builds side by side (before/after a change): build the old one's slicer binary first, e.g.
#   git worktree add /tmp/old <commit> && (cd /tmp/old && cargo build --release -p slicer)
#   target/release/slicer-bench --suite ab --old /tmp/old/target/release/slicer --new target/release/slicer
