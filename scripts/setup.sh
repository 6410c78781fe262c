#!/usr/bin/env bash
# Installs everything slicer needs on a Debian 12 host, builds it and its guest images, and
# (unless --no-run) boots a sandbox to show it works.
#   sudo ./scripts/setup.sh            install + build + demo
#   sudo ./scripts/setup.sh --no-run   install + build only (used by scripts/test.sh)
#   ./scripts/setup.sh --cargo-tools   only the cargo subcommands CI runs (used by .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

# --- cargo tools --------------------------------------------------------------------------
# .ci/run runs `cargo machete` (a dependency no crate uses fails CI). Pinned: a new release's
# findings must not fail CI by surprise; installed again only when missing or another version.
MACHETE_VERSION=0.9.2
cargo_tools() {
  if [ "$(cargo machete --version 2>/dev/null)" != "$MACHETE_VERSION" ]; then
    echo "==> cargo install cargo-machete@$MACHETE_VERSION"
    cargo install -q --locked "cargo-machete@$MACHETE_VERSION"
  fi
}

RUN=1
case "${1:-}" in
  --no-run) RUN=0 ;;
  --cargo-tools) cargo_tools; exit 0 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
  echo "setup needs root (apt-get, debootstrap, VM networking): run it as root, e.g. sudo $0" >&2
  exit 1
fi

# --- host packages ------------------------------------------------------------------------
# Every host program slicer, its tests and benchmarks run comes from one of these (the audited
# list with the program of each is crates/slicer-image/src/tools.rs; its test checks this line).
PKGS=(qemu-system-x86 qemu-utils debootstrap linux-source-6.1 build-essential make bc flex bison
      libelf-dev libssl-dev libssl3 pkgconf e2fsprogs cpio xz-utils iproute2 nftables ca-certificates
      openssh-client docker-registry python3 python3-venv)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# QEMU's system emulator and qemu-img must come from the same release: pin qemu-utils to the
# version of qemu-system-x86 that apt offers (some images ship a newer qemu-utils alone).
qemu_mismatch=0
if dpkg-query -W -f='${Version}' qemu-system-x86 >/dev/null 2>&1 && \
   [ "$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null)" != "$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null)" ]; then
  qemu_mismatch=1
fi
if [ ${#missing[@]} -gt 0 ] || [ $qemu_mismatch -eq 1 ]; then
  echo "==> apt-get install ${missing[*]:-qemu-utils (version match)}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  qv=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  install=()
  for p in "${PKGS[@]}"; do
    case "$p" in qemu-system-x86|qemu-utils) install+=("$p=$qv") ;; *) install+=("$p") ;; esac
  done
  apt-get install -y -q --no-install-recommends --allow-downgrades "${install[@]}" qemu-block-extra- >/dev/null
fi

# docker-registry is only for the tests, which start their own on 127.0.0.1: never a service
# listening on the host's addresses.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

cargo_tools

# --- build --------------------------------------------------------------------------------
echo "==> cargo build (slicer, and the static guest agent)"
cargo build --release -q -p slicer
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release -q -p slicer-agent --target x86_64-unknown-linux-gnu
install -D -m 0755 target/release/slicer /usr/local/bin/slicer
install -D -m 0755 target/x86_64-unknown-linux-gnu/release/slicer-agent /usr/local/lib/slicer/slicer-agent

# --- guest images (cached by their inputs: fast when nothing changed) ----------------------
slicer image build --variant min
slicer image build --variant systemd

if [ $RUN -eq 1 ]; then
  echo "==> booting a throwaway sandbox from the min image"
  slicer run --image min -- sh -c 'echo "hello from $(hostname), kernel $(uname -r)"'
  # The daemon with a working default: one API-driven host group, token auth on 127.0.0.1:8080.
  if [ ! -f slicer.yaml ]; then
    slicer new sandbox --min --count=0 --net=isolated --graceful-shutdown=false > slicer.yaml
    echo "==> wrote slicer.yaml (edit it, or make another with: slicer new NAME [flags] > x.yaml)"
  fi
  echo "==> starting the daemon: slicer up ./slicer.yaml (Ctrl-C stops it)"
  echo "    token: sudo cat ${SLICER_DATA_DIR:-/var/lib/slicer}/auth/token"
  exec slicer up ./slicer.yaml
fi
