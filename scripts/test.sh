#!/usr/bin/env bash
# Runs the whole test suite against real QEMU guests. Installs and builds what is missing first.
#   sudo ./scripts/test.sh [cargo test args...]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --no-run
echo "==> cargo test"
cargo test --workspace "$@"
