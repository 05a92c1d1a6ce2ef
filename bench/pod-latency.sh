#!/usr/bin/env bash
# Per-pod overhead: pod-create latency through the real kube-apiserver with bulwark's webhooks
# registered vs deleted, serial and with concurrent workers, in one cluster (release build).
# Output: bench/results/pod-latency.csv and pod-latency.md.
#   bench/pod-latency.sh [--serial 300] [--workers 8] [--per-worker 150] [--rounds 2]
#                        [--dir /tmp/burst-cluster]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
dir=/tmp/burst-cluster
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --serial|--workers|--per-worker|--rounds|--warmup) args+=("$1" "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 64 ;;
  esac
done
. "$root/bench/lib.sh"

"$e2e" --dir "$dir" up --nodes 4 2>&1 | tail -n 2
sleep 5
flock /tmp/bulwark-bench.lock timeout --kill-after=30 1200 \
  python3 "$root/bench/pod_latency.py" --dir "$dir" "${args[@]}" \
  --out "$root/bench/results/pod-latency"
