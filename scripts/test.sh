#!/usr/bin/env bash
# Runs the whole test suite against real QEMU guests. Installs and builds what is missing first.
#   sudo ./scripts/test.sh [cargo test args...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "the tests need root (VMs, network namespaces, cgroups): run them as root, e.g. sudo $0" >&2
  exit 1
fi
./scripts/setup.sh --no-run
# The API fuzzer (tests/fuzz_api.rs) runs from a virtualenv of its own, made again when its
# pinned requirements change.
venv=target/fuzz-venv
if ! cmp -s scripts/fuzz-requirements.txt "$venv/requirements.txt" 2>/dev/null; then
  echo "==> python virtualenv for the API fuzzer ($venv)"
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r scripts/fuzz-requirements.txt
  cp scripts/fuzz-requirements.txt "$venv/requirements.txt"
fi
echo "==> host programs (fails early, naming the package, if one is missing)"
cargo test -q -p slicer-image --test host_tools
echo "==> cargo test"
cargo test --workspace "$@"
