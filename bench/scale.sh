#!/usr/bin/env bash
# Webhook memory at scale: a cluster holding NAMESPACES namespaces and PODS pods (default
# 10,000 and 100,000); a fresh `bulwark webhook` (release build) started against it: time to
# ready (/readyz) and resident memory once its caches are synced. Output:
# bench/results/scale.json (+ scale.log).
#   bench/scale.sh [--namespaces 10000] [--pods 100000] [--workers 12] [--starts 2]
#                  [--dir /tmp/burst-cluster] [--also NAME=PATH ...]
# --also starts another bulwark binary the same way against the same cluster (say, a build
# with another allocator), so two builds are compared on identical data in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
dir=/tmp/burst-cluster
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --namespaces|--pods|--workers|--starts|--also) args+=("$1" "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 64 ;;
  esac
done
. "$root/bench/lib.sh"

"$e2e" --dir "$dir" up --nodes 4 2>&1 | tail -n 2
# Loading is part of the measurement's load on the machine: hold the lock for all of it.
flock /tmp/bulwark-bench.lock timeout --kill-after=30 2400 \
  python3 "$root/bench/scale.py" --dir "$dir" "${args[@]}" --out "$root/bench/results/scale" \
  2>&1 | tee "$root/bench/results/scale.log"
