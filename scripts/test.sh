#!/usr/bin/env bash
# Runs the whole test suite, the full tier: the unit tests and every test marked
# `#[ignore = "full tier: ..."]` (real QEMU guests, root, netns, nftables, cgroups, the image
# store, the API fuzzer's virtualenv). Installs and builds what is missing first. A plain
# `cargo test --workspace` is the unit tier: it runs what needs none of that, as any user.
#   sudo ./scripts/test.sh [cargo test args...] [-- test binary args...]
#   e.g. sudo ./scripts/test.sh -p slicer-daemon --test api -- --nocapture
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "the full tier needs root (VMs, network namespaces, cgroups): run it as root, e.g. sudo $0" >&2
  echo "(plain \`cargo test --workspace\` runs the unit tier as any user)" >&2
  exit 1
fi
# Arguments before `--` go to cargo, after it to the test binaries, after --include-ignored.
cargo_args=()
test_args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then
    shift
    test_args=("$@")
    break
  fi
  cargo_args+=("$1")
  shift
done
# --workspace unless the caller chose packages (with --workspace, cargo ignores -p).
scope=(--workspace)
for a in ${cargo_args[@]+"${cargo_args[@]}"}; do
  case "$a" in
    -p | -p* | --package | --package=*) scope=() ;;
  esac
done
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
cargo test -q -p slicer-image --test host_tools -- --include-ignored
# A full-tier test never skips: it fails when what it needs is missing (docs/TESTING.md).
echo "==> cargo test (full tier: --include-ignored)"
cargo test ${scope[@]+"${scope[@]}"} ${cargo_args[@]+"${cargo_args[@]}"} -- --include-ignored ${test_args[@]+"${test_args[@]}"}
