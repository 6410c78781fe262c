#!/usr/bin/env bash
# Slicer's docs/proxy/linux.md walk-through, its commands as the page types them (run by
# tests/proxy.rs in a temporary directory, with `sudo` a pass-through when already root). The
# only additions are the proxy's test-only options (--hosts-file, --upstream-ca: the machine has
# no internet, so wikipedia.org is a test upstream in a network namespace) and the polls that
# wait for each daemon to come up.
set -euo pipefail
extra=(--hosts-file ./hosts --upstream-ca ./upstream-ca/ca.crt)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
poll() { # poll DESCRIPTION COMMAND...: until COMMAND succeeds, 120 s at most
  local what=$1; shift
  for _ in $(seq 1 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timed out waiting for $what" >&2; return 1
}

slicer new sbox --count=0 \
  --net=isolated \
  --drop=0.0.0.0/0 \
  --allow=192.168.222.1:3128 \
  --allow=192.168.222.1:3129 \
  --find-ssh-keys=false \
  --ca \
  --socket ./slicer.sock \
  > slicer.yaml

sudo slicer ca init --hostgroup sbox

sudo slicer proxy up \
    --hostgroup sbox \
    --bind 192.168.222.1 \
    --deny-cidr 192.168.1.0/24 "${extra[@]}" 2>proxy.log &
pids+=($!)
poll "the proxy" bash -c 'exec 3<>/dev/tcp/192.168.222.1/3128'

sudo slicer up 2>daemon.log &
pids+=($!)
poll "the daemon" env SLICER_URL=./slicer.sock slicer vm list

export SLICER_URL="./slicer.sock"
PROXY_TOKEN=$(slicer proxy client create audit-test)
sudo slicer proxy allow audit-test --host '*'

slicer vm launch --tag role=audit-test

if sudo slicer vm exec sbox-1 -- curl -iSL --max-time 3 https://wikipedia.org; then
  echo "the VM reached wikipedia.org without the proxy" >&2
  exit 1
fi

sudo slicer vm exec \
    --env HTTPS_PROXY="https://proxy:$PROXY_TOKEN@192.168.222.1:3129" \
    sbox-1 -- curl -iSL https://wikipedia.org | tee through-proxy.txt
grep -q '^HTTP/.* 200' through-proxy.txt
grep -q 'allow client=audit-test' proxy.log
echo "walk-through done"
