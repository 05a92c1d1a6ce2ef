#!/usr/bin/env bash
# Soak: MINUTES (default 30) of steady pod-creation load through the real API server with
# bulwark registered, sampling the webhook's and the node controller's resident memory every
# 15 s. Four namespaces get a Job of 8 pods each every 4 s (8 pods/s in all, what the e2e
# cluster's Job controller keeps up with, so the number of objects stays level) under
# max-pending-pods 6 and 2 pods/s per namespace, so admissions, 429 refusals, Retry-After
# back-off, pod churn and Job clean-up (ttlSecondsAfterFinished) all run the whole time. Prints the samples, the memory at the end
# of the warm-up (5 min) against the last and the peak, the fitted slope, and the admission
# counts; fails if the webhook ever stopped answering (a kubectl apply failing for another
# reason than bulwark's 429) or its memory grew by more than 20 % after the warm-up.
# Results: bench/results/soak.csv. Cluster in $SOAK_DIR (default /tmp/bulwark-soak), stopped
# at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-30}"
dir="${SOAK_DIR:-/tmp/bulwark-soak}"
out=bench/results
mkdir -p "$out"
csv="$out/soak.csv"
cluster() { e2e/cluster --dir "$dir" "$@"; }

# SOAK_PROFILE=debug soaks the debug build (same code, no optimiser; for a busy machine).
profile="${SOAK_PROFILE:-release}"
if [ "$profile" = release ]; then
  cargo build --release -q -p bulwark
else
  cargo build -q -p bulwark
fi
export BULWARK_BIN="$PWD/target/$profile/bulwark"
trap 'cluster down >/dev/null 2>&1 || true; kill $(jobs -p) 2>/dev/null || true' EXIT
up_log="$(mktemp)"
cluster up --nodes 8 2>&1 | tee "$up_log"
metrics="$(grep -o 'metrics http[^ ,]*' "$up_log" | head -1 | cut -d' ' -f2)"
eval "$(cluster env)"
webhook_pid="$(cat "$dir/run/bulwark-webhook.pid")"
nc_pid="$(cat "$dir/run/bulwark-node-controller.pid")"
namespaces=(soak-1 soak-2 soak-3 soak-4)
for ns in "${namespaces[@]}"; do
  kubectl create namespace "$ns" >/dev/null
  kubectl annotate namespace "$ns" bulwark.io/max-pending-pods=6 bulwark.io/pod-rate=2/s \
    bulwark.io/pod-burst=4 >/dev/null
done
sleep 2

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
refusals() { curl -s "$metrics" | awk '/^bulwark_refusals_total/ {s += $NF} END {print s + 0}'; }
admitted() { curl -s "$metrics" | awk '/^bulwark_admission_requests_total\{/ && /endpoint="validate"/ && /verdict="allowed"/ {s += $NF} END {print s + 0}'; }

job_yaml() {
  for ns in "${namespaces[@]}"; do
    cat <<YAML
---
apiVersion: batch/v1
kind: Job
metadata: {generateName: soak-, namespace: $ns}
spec:
  completions: 8
  parallelism: 8
  ttlSecondsAfterFinished: 5
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers: [{name: work, image: registry.k8s.io/pause:3.10}]
YAML
  done
}

end=$(( $(date +%s) + minutes * 60 ))
failures=0
(
  while [ "$(date +%s)" -lt "$end" ]; do
    if ! err="$(job_yaml | kubectl create -f - 2>&1 >/dev/null)"; then
      echo "load: kubectl create failed: $err" >&2
      echo x >> "$dir/load-failures"
    fi
    sleep 4
  done
) &

start=$(date +%s)
echo "seconds,webhook_rss_kib,node_controller_rss_kib,pods,admitted,refused" > "$csv"
while [ "$(date +%s)" -lt "$end" ]; do
  t=$(( $(date +%s) - start ))
  pods="$(kubectl get pods -A --no-headers 2>/dev/null | grep -c soak- || true)"
  line="$t,$(rss_kib "$webhook_pid"),$(rss_kib "$nc_pid"),$pods,$(admitted),$(refusals)"
  echo "$line" >> "$csv"
  echo "soak: $line"
  sleep 15
done
wait
[ -f "$dir/load-failures" ] && failures="$(wc -l < "$dir/load-failures")"

python3 - "$csv" "$failures" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
failures = int(sys.argv[2])
t = [int(r["seconds"]) for r in rows]
w = [int(r["webhook_rss_kib"]) / 1024 for r in rows]
n = [int(r["node_controller_rss_kib"]) / 1024 for r in rows]
warm = next((i for i, s in enumerate(t) if s >= 300), 0)
def slope(xs, ys):
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs) or 1
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var * 600
tw, ww, nw = t[warm:], w[warm:], n[warm:]
print(f"soak: {t[-1] // 60} min, {len(rows)} samples")
for name, ys in (("webhook", ww), ("node controller", nw)):
    print(f"  {name}: RSS after warm-up {ys[0]:.1f} MiB, last {ys[-1]:.1f}, peak {max(ys):.1f}, "
          f"slope {slope(tw, ys):+.2f} MiB per 10 min")
print(f"  admitted {rows[-1]['admitted']} pod creations, refused {rows[-1]['refused']} (429), "
      f"kubectl failures {failures}")
growth = (ww[-1] - ww[0]) / ww[0]
ok = failures == 0 and growth <= 0.20
print(f"  webhook memory growth after warm-up {growth * 100:+.1f} %: {'flat' if ok else 'NOT FLAT or failures'}")
sys.exit(0 if ok else 1)
PY
