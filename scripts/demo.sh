#!/usr/bin/env bash
# Brings up a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, 4 kwok nodes) with bulwark registered as its admission webhook, then shows
# bulwark at work the way an operator sees it, through kubectl:
#   - a pod without resources gets the namespace's defaults;
#   - a Job of 300 pods, all created at once, is paced so that no more than 20 are pending,
#     and still completes;
#   - a creation that cannot fit is refused with 429 + Retry-After: kubectl retries, then
#     prints bulwark's message;
#   - `kubectl bulwark status` says which namespaces are throttled, by which limit, and where
#     each limit came from.
# The cluster stays up afterwards (the last lines say how to use it and stop it). The first
# run builds bulwark and the control plane from their sources (26 minutes measured on a fresh
# 2-core machine; cached afterwards): each step says how long the demo has run and what is
# left, and build output goes to log files under ~/.cache/bulwark/logs, shown if a build fails.
# Exits non-zero if anything is not as shown.
set -euo pipefail
cd "$(dirname "$0")/.."

# Bold headings on a terminal only, so logs and CI output stay plain text.
if [ -t 1 ]; then B=$'\033[1m' N=$'\033[0m'; else B='' N=''; fi
say() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }
fail() { echo "demo: $*" >&2; exit 1; }
indent() { sed 's/^/  /'; }

started=$(date +%s)
# clock [SINCE]: minutes and seconds since SINCE (default: the demo's start).
clock() { local s=$(($(date +%s) - ${1:-$started})); printf '%dm%02ds' $((s / 60)) $((s % 60)); }
steps=(
  "build bulwark"
  "build the control plane"
  "start the cluster"
  "defaults for a pod"
  "a Job of 300 pods"
  "a creation that cannot fit"
  "is bulwark throttling me?"
)
step_no=0
# step TITLE: the next step's heading, with the time so far and the steps after it.
step() {
  step_no=$((step_no + 1))
  say "[$step_no/${#steps[@]}, $(clock)] $*"
  local left=("${steps[@]:$step_no}") line="" s
  for s in "${left[@]}"; do line+="${line:+; }$s"; done
  [ -z "$line" ] || echo "  (left: $line)"
}

logs="${BULWARK_CACHE:-$HOME/.cache/bulwark}/logs"
mkdir -p "$logs"
# quietly LOG COMMAND...: runs COMMAND with its output in LOG, saying every 30 s how long it
# has run and what it is at; on failure shows the end of LOG.
quietly() {
  local log=$1 t0 pid n=0 at fetched
  shift
  t0=$(date +%s)
  "$@" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    n=$((n + 1))
    if [ $((n % 30)) -eq 0 ]; then
      at=$(grep -E '^(building|fetching| *Compiling)' "$log" | tail -n 1 | sed 's/^ *//' || true)
      fetched=$(grep -c '^go: downloading' "$log" || true)
      if [ "${fetched:-0}" -gt 0 ]; then at+=" ($fetched Go modules fetched so far)"; fi
      echo "  ... $(clock "$t0"): ${at:-working}"
    fi
  done
  if ! wait "$pid"; then
    echo "  failed after $(clock "$t0"); the end of $log:" >&2
    tail -n 40 "$log" | indent >&2
    fail "a build failed (whole log: $log)"
  fi
  echo "  done in $(clock "$t0") (log: $log)"
}

step "build bulwark (cargo build)"
quietly "$logs/demo-cargo.log" cargo build --locked -p bulwark -p bulwark-e2e

# A cluster needs etcd, Kubernetes and kwok; helm and promtool (for the deploy/ tests) are
# left to `cargo test`.
export BULWARK_BUILD=cluster
step "build the control plane: etcd, Kubernetes and kwok from their Go modules (first run only)"
quietly "$logs/demo-control-plane.log" bash e2e/build.sh

step "start the cluster"
e2e/cluster up 2>&1 | indent
eval "$(e2e/cluster env)"
kubectl get nodes | indent

step "defaults for a pod: namespace batch takes at most 20 pods not yet running, 50 creations/s"
kubectl create namespace batch | indent
kubectl annotate namespace batch bulwark.io/max-pending-pods=20 bulwark.io/pod-rate=50/s \
  bulwark.io/pod-burst=50 | indent
for _ in $(seq 1 100); do kubectl -n batch get serviceaccount default >/dev/null 2>&1 && break; sleep 0.2; done

echo
echo "a pod without resources: bulwark sets the namespace's defaults"
echo "\$ kubectl -n batch run hello --image=registry.k8s.io/pause:3.10"
kubectl -n batch run hello --image=registry.k8s.io/pause:3.10 2>&1 | indent
echo "\$ kubectl -n batch get pod hello -o jsonpath='{.spec.containers[0].resources}'"
resources=$(kubectl -n batch get pod hello -o jsonpath='{.spec.containers[0].resources}')
echo "  $resources"
defaulted=$(kubectl -n batch get pod hello -o jsonpath='{.metadata.annotations.bulwark\.io/defaulted}')
echo "  bulwark.io/defaulted: $defaulted"
[[ "$resources" == *'"requests":{"cpu":"100m","memory":"128Mi"}'* ]] || fail "pod was not defaulted"
kubectl -n batch delete pod hello --wait=false >/dev/null

step "a Job of 300 pods with parallelism 300: the Job controller asks for all of them at once"
kubectl -n batch create -f - <<'EOF' | indent
apiVersion: batch/v1
kind: Job
metadata:
  name: burst
spec:
  completions: 300
  parallelism: 300
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: work
        image: registry.k8s.io/pause:3.10
EOF
start=$(date +%s)
max_pending=0
printf '  %7s %8s %8s %10s %14s\n' seconds pending running completed job-succeeded
while :; do
  phases=$(kubectl -n batch get pods -l job-name=burst -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}')
  pending=$(grep -c '^Pending$' <<<"$phases" || true)
  running=$(grep -c '^Running$' <<<"$phases" || true)
  completed=$(grep -c '^Succeeded$' <<<"$phases" || true)
  succeeded=$(kubectl -n batch get job burst -o jsonpath='{.status.succeeded}')
  succeeded=${succeeded:-0}
  elapsed=$(($(date +%s) - start))
  [ "$pending" -gt "$max_pending" ] && max_pending=$pending
  printf '  %7s %8s %8s %10s %14s\n' "$elapsed" "$pending" "$running" "$completed" "$succeeded"
  [ "$succeeded" -ge 300 ] && break
  [ "$elapsed" -lt 300 ] || fail "the Job did not complete within 300s"
  sleep 2
done
refused=$(curl -sS "$BULWARK_METRICS_URL" | awk '/^bulwark_refusals_total\{.*reason="max_pending"/ {s += $2} END {print s + 0}')
echo "  all 300 pods completed in $(($(date +%s) - start))s; at most $max_pending pending in the samples above (cap 20);"
echo "  bulwark refused $refused creations for the pending cap; the Job controller's work queue retried them (it is refused without Retry-After)"
[ "$max_pending" -le 20 ] || fail "pending exceeded its cap: $max_pending"
[ "$refused" -gt 0 ] || fail "the pending cap never held the Job back"

step "a creation that cannot fit: namespace tiny allows 1 pod and has it"
kubectl create namespace tiny | indent
kubectl annotate namespace tiny bulwark.io/max-pods=1 | indent
for _ in $(seq 1 100); do kubectl -n tiny get serviceaccount default >/dev/null 2>&1 && break; sleep 0.2; done
kubectl -n tiny run first --image=registry.k8s.io/pause:3.10 | indent
echo "\$ kubectl -n tiny run second --image=registry.k8s.io/pause:3.10   # kubectl retries on Retry-After, then gives up"
if out=$(kubectl -n tiny run second --image=registry.k8s.io/pause:3.10 -v=4 2>&1); then
  fail "the second pod was admitted"
fi
retries=$(grep -c 'Got a Retry-After response' <<<"$out" || true)
error=$(grep '^Error from server' <<<"$out" || true)
echo "  (kubectl waited out $retries Retry-After answers first)"
echo "  $error"
[[ "$error" == 'Error from server (TooManyRequests): admission webhook "validate.bulwark.io" denied the request: namespace "tiny" has 1 live pod, at its limit of 1; retry in '*'(annotation bulwark.io/max-pods)' ]] ||
  fail "unexpected kubectl output: $out"

say "the cluster stays up ($(clock) so far)"
cat <<EOF
  eval "\$(e2e/cluster env)"        # KUBECONFIG and PATH (kubectl, kubectl bulwark) for this shell
  kubectl get pods -A
  kubectl bulwark status -A -o wide
  kubectl annotate ns batch bulwark.io/max-pending-pods=50 --overwrite
  curl -s \$BULWARK_METRICS_URL | grep ^bulwark_
  e2e/cluster down                  # stop everything
EOF

step "is bulwark throttling me? (kubectl bulwark: bulwark as the kubectl plugin kubectl-bulwark)"
# bulwark sums refusals up in one Throttled Event per namespace at the first refusal, then
# once a minute: wait for the Events that hold every refusal so far (the metrics count them).
metric() { curl -sS "$BULWARK_METRICS_URL" | awk -v r="reason=\"$1\"" 'index($0, "bulwark_refusals_total{") == 1 && index($0, r) {s += $2} END {print s + 0}'; }
reported() {
  kubectl get events -n "$1" --field-selector reason=Throttled \
    -o jsonpath='{range .items[*]}{.metadata.annotations.bulwark\.io/refusals}{"\n"}{end}' |
    tr ',' '\n' | awk -F= '{s += $2} END {print s + 0}'
}
echo "  (waiting up to a minute for bulwark's next Throttled Events)"
for _ in $(seq 1 75); do
  [ "$(reported batch)" -ge "$(metric max_pending)" ] && [ "$(reported tiny)" -ge "$(metric max_pods)" ] && break
  sleep 1
done
echo "\$ kubectl get events -n batch --field-selector reason=Throttled"
kubectl get events -n batch --field-selector reason=Throttled 2>&1 | indent
echo "\$ kubectl describe ns batch"
kubectl describe ns batch | indent
echo "\$ kubectl bulwark status -A"
status=$(kubectl bulwark status -A 2>&1)
echo "$status" | indent
batch_row=$(grep '^batch ' <<<"$status" || true)
tiny_row=$(grep '^tiny ' <<<"$status" || true)
[[ "$batch_row" == *"(annotation)"*"max-pending"* ]] || fail "status shows no refusals for batch: $batch_row"
[[ "$tiny_row" == *"1/1 (annotation)"*"max-pods 100%"* ]] || fail "status does not show tiny at its limit: $tiny_row"
