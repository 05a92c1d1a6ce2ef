#!/usr/bin/env bash
# Burst stability: a burst of Job pods (default 10,000: 50 Jobs x 200 completions, parallelism
# 200) on 50 kwok nodes x 20 pod slots, once without bulwark (its webhook registrations
# deleted) and once with bulwark (namespace max-pending-pods near the free capacity), each on
# a fresh cluster. Samples once a second (pods not yet running, scheduler queue and attempts,
# RSS/CPU of kube-apiserver, etcd, kube-scheduler), probes the API server with a GET and a
# LIST every 150 ms, and reports the makespan. Output: bench/results/burst-{without,with}.csv
# (+ -probe.csv, .json), bench/results/burst-summary.md and burst.png.
#
#   bench/burst.sh [--pods 10000] [--jobs 50] [--nodes 50] [--pods-per-node 20] [--cap 1000]
#                  [--controller-qps 200] [--timeout 1200] [--modes "without with"]
#                  [--dir /tmp/burst-cluster] [--job-syncs N] [--max-retry-after 30]
#                  [--results DIR]
# --job-syncs sets kube-controller-manager's --concurrent-job-syncs (default 5) in both modes;
# --max-retry-after is bulwark's maxRetryAfterSeconds (default 30, bulwark's own default; the
# e2e tests use 1);
# --results writes the files to DIR instead of bench/results (to keep a variant's run apart).
# Each measured run holds /tmp/bulwark-bench.lock (flock) so benchmarks do not overlap.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

pods=10000 jobs=50 nodes=50 per_node=20 cap=1000 qps=200 timeout=1200
modes="without with" dir=/tmp/burst-cluster job_syncs="" out_dir="" max_retry=30
while [ $# -gt 0 ]; do
  case "$1" in
    --pods) pods=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --pods-per-node) per_node=$2; shift 2 ;;
    --cap) cap=$2; shift 2 ;;
    --controller-qps) qps=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --job-syncs) job_syncs=$2; shift 2 ;;
    --results) out_dir=$2; shift 2 ;;
    --max-retry-after) max_retry=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 64 ;;
  esac
done

. "$root/bench/lib.sh"
if [ -n "$out_dir" ]; then
  results=$out_dir
  mkdir -p "$results"
fi
up_extra=(--max-retry-after "$max_retry")
[ -z "$job_syncs" ] || up_extra+=(--job-syncs "$job_syncs")

for mode in $modes; do
  echo "== $mode bulwark: $pods pods in $jobs Jobs on $nodes nodes x $per_node slots"
  "$e2e" --dir "$dir" up --nodes "$nodes" --pods-per-node "$per_node" \
    --controller-qps "$qps" "${up_extra[@]}" 2>&1 | tail -n 2
  # Let start-up settle (node heartbeats, caches) before measuring.
  sleep 10
  rc=0
  flock /tmp/bulwark-bench.lock timeout --kill-after=30 $((timeout + 180)) \
    python3 "$root/bench/burst.py" --dir "$dir" --mode "$mode" --pods "$pods" --jobs "$jobs" \
    --cap "$cap" --timeout "$timeout" --out "$results/burst-$mode" >"$results/burst-$mode.log" \
    2>&1 || rc=$?
  tail -n 40 "$results/burst-$mode.log"
  [ "$rc" -eq 0 ] || echo "!! $mode run ended with status $rc (2: not every pod completed in time)"
  for log in bulwark-webhook bulwark-node-controller kwok kube-controller-manager; do
    cp "$dir/logs/$log.log" "$results/burst-$mode-$log.log" 2>/dev/null || true
  done
  "$e2e" --dir "$dir" down >/dev/null 2>&1 || true
done

python3 "$root/bench/burst_report.py" "$results"
