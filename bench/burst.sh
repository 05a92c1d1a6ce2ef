#!/usr/bin/env bash
# The burst benchmark (bench/burst.md): a burst of DevOps tasks far beyond the nodes'
# capacity (default 20,000 pods in 100 Jobs, ttlSecondsAfterFinished 30) next to a CI bot and
# another tenant, in three arms side by side, each on a fresh cluster:
#   without           bulwark's webhook registrations deleted;
#   with              bulwark as shipped (controllers refused without Retry-After);
#   with-retry-after  --queueing-controllers false (controllers refused with Retry-After,
#                     the previous behaviour);
#   hold              bulwark with the burst namespace in hold mode (pending-action hold:
#                     pods over the cap wait behind bulwark's scheduling gate, not refused);
#                     not in the default --arms, add it: --arms "without with hold";
# the set repeated --pairs times (the order reversed every other pair, so drift on the machine
# does not always favour the same arm), then the `with` arm once per --caps value (the burst
# namespace's max-pending-pods) for the cap curve. Every arm runs the node controller with its
# production timers. Results: DIR/burst-<arm>-<label>.{csv,json} (+ -probe.csv, -tenant.csv),
# DIR/burst-runs.tsv (every run and how it ended), DIR/burst-summary.md, burst-report.json,
# burst.png.
#
#   bench/burst.sh [--pods 20000] [--jobs 100] [--nodes 50] [--pods-per-node 20]
#                  [--cap 200] [--caps 100,300,1000] [--pairs 2] [--first-pair 1]
#                  [--arms "without with with-retry-after"] [--controller-qps 200]
#                  [--timeout SECONDS] [--max-retry-after 30] [--job-syncs N]
#                  [--ci-rate 10] [--ci-cap 30] [--tenant-period 2.5]
#                  [--deployment-replicas 50] [--ttl 30]
#                  [--dir /tmp/burst-cluster] [--results DIR]
# --timeout is per arm (default 300 s + 0.06 s per pod); an arm that does not finish is
# reported with what it reached. --caps "" skips the cap curve. --first-pair N numbers the pairs
# from N (an invocation that adds pairs to an earlier one's results: burst-runs.tsv is kept and
# appended to, and pair N keeps the order its number gives). --results defaults to
# bench/results/burst. Each arm holds /tmp/bulwark-bench.lock (flock) so benchmarks do not
# overlap. INT/TERM stop the running arm and its cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

pods=20000 jobs=100 nodes=50 per_node=20 cap=200 caps="100,300,1000" pairs=2 first=1 qps=200
arms="without with with-retry-after" dir=/tmp/burst-cluster job_syncs="" out_dir=""
max_retry=30 timeout="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --pods) pods=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --pods-per-node) per_node=$2; shift 2 ;;
    --cap) cap=$2; shift 2 ;;
    --caps) caps=$2; shift 2 ;;
    --pairs) pairs=$2; shift 2 ;;
    --first-pair) first=$2; shift 2 ;;
    --arms) arms=$2; shift 2 ;;
    --controller-qps) qps=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --job-syncs) job_syncs=$2; shift 2 ;;
    --results) out_dir=$2; shift 2 ;;
    --max-retry-after) max_retry=$2; shift 2 ;;
    --ci-rate|--ci-cap|--tenant-period|--deployment-replicas|--ttl)
      extra+=("$1" "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 64 ;;
  esac
done
for arm in $arms; do
  case "$arm" in without|with|with-retry-after|hold) ;; *) echo "unknown arm $arm" >&2; exit 64 ;; esac
done
[ -n "$timeout" ] || timeout=$((300 + pods * 6 / 100))
case "$first" in ''|*[!0-9]*|0) echo "--first-pair takes a pair number from 1" >&2; exit 64 ;; esac

. "$root/bench/lib.sh"
results=${out_dir:-$root/bench/results/burst}
mkdir -p "$results"
runs=$results/burst-runs.tsv
if [ "$first" -eq 1 ] || [ ! -s "$runs" ]; then
  printf 'label\tarm\tcap\tstatus\tstarted\n' >"$runs"
fi

# Children run in their own process group (job control), so a signal stops the whole
# chain (flock, timeout, python) at once instead of after the arm has run to its end.
set -m
child="" current="" started=""
on_signal() {
  trap - INT TERM
  if [ -n "$child" ]; then
    kill -TERM -- "-$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  [ -z "$current" ] || printf '%s\tinterrupted\t%s\n' "$current" "$started" >>"$runs"
  echo "!! interrupted: stopping the cluster" >&2
  exit 130
}
trap on_signal INT TERM
run() {
  "$@" &
  child=$!
  local rc=0
  wait "$child" || rc=$?
  child=""
  return "$rc"
}

# One arm on a fresh cluster: $1 arm, $2 label, $3 cap.
run_arm() {
  local arm=$1 label=$2 arm_cap=$3 rc=0
  started=$(date -u +%Y-%m-%dT%H:%MZ)
  local stem=$results/burst-$arm-$label
  local up=(--nodes "$nodes" --pods-per-node "$per_node" --controller-qps "$qps"
    --max-retry-after "$max_retry" --node-timers production)
  [ -z "$job_syncs" ] || up+=(--job-syncs "$job_syncs")
  [ "$arm" != with-retry-after ] || up+=(--queueing-controllers false)
  current=$(printf '%s\t%s\t%s' "$label" "$arm" "$arm_cap")
  echo "== $label $arm: $pods pods in $jobs Jobs on $nodes nodes x $per_node slots, cap $arm_cap"
  if ! run "$e2e" --dir "$dir" up "${up[@]}" >"$stem-up.log" 2>&1; then
    tail -n 20 "$stem-up.log"
    printf '%s\t%s\t%s\t%s\t%s\n' "$label" "$arm" "$arm_cap" "cluster-failed" "$started" >>"$runs"
    current=""
    return 0
  fi
  # Let start-up settle (node heartbeats, caches) before measuring.
  sleep 10
  run flock /tmp/bulwark-bench.lock timeout --foreground --kill-after=30 $((timeout + 300)) \
    python3 "$root/bench/burst.py" --dir "$dir" --arm "$arm" --label "$label" \
    --pods "$pods" --jobs "$jobs" --cap "$arm_cap" --timeout "$timeout" "${extra[@]}" \
    --out "$stem" >"$stem.log" 2>&1 || rc=$?
  grep -E '"(makespan_s|finished|sleeping_retries|peak_not_running)"' "$stem.log" || tail -n 20 "$stem.log"
  case "$rc" in
    0) status=finished ;;
    2) status=timed-out; echo "!! $label $arm: not every Job completed in ${timeout}s" ;;
    124|137) status=killed; echo "!! $label $arm: killed by the harness's timeout" ;;
    *) status="failed-$rc"; echo "!! $label $arm ended with status $rc" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$label" "$arm" "$arm_cap" "$status" "$started" >>"$runs"
  current=""
  for log in bulwark-webhook bulwark-node-controller kube-controller-manager; do
    cp "$dir/logs/$log.log" "$stem-$log.log" 2>/dev/null || true
  done
  run "$e2e" --dir "$dir" down >/dev/null 2>&1 || true
}

for ((p = first; p < first + pairs; p++)); do
  order=$arms
  if [ $((p % 2)) -eq 0 ]; then
    order=$(printf '%s\n' $arms | tac | tr '\n' ' ')
  fi
  for arm in $order; do
    run_arm "$arm" "p$p" "$cap"
  done
done
for c in ${caps//,/ }; do
  run_arm with "cap$c" "$c"
done

python3 "$root/bench/burst_report.py" "$results"
