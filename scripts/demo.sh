#!/usr/bin/env bash
# Brings up a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, 4 kwok nodes) with bulwark registered as its admission webhook, then shows
# bulwark at work the way an operator sees it, through kubectl:
#   - a pod without resources gets the namespace's defaults;
#   - a Job of 300 pods, all created at once, is paced so that no more than 20 are pending,
#     and still completes;
#   - a creation that cannot fit is refused with 429 + Retry-After: kubectl retries, then
#     prints bulwark's message.
# The cluster stays up afterwards (the last lines say how to use it and stop it). The first
# run builds the control plane from its Go modules (about 11 minutes, cached afterwards).
# Exits non-zero if anything is not as shown.
set -euo pipefail
cd "$(dirname "$0")/.."

# Bold headings on a terminal only, so logs and CI output stay plain text.
if [ -t 1 ]; then B=$'\033[1m' N=$'\033[0m'; else B='' N=''; fi
say() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }
fail() { echo "demo: $*" >&2; exit 1; }
indent() { sed 's/^/  /'; }

say "bringing up the cluster (first run builds etcd, Kubernetes and kwok from their Go modules)"
e2e/cluster up
eval "$(e2e/cluster env)"
kubectl get nodes | indent

say "namespace batch: at most 20 pods not yet running, 50 creations/s"
kubectl create namespace batch | indent
kubectl annotate namespace batch bulwark.io/max-pending-pods=20 bulwark.io/pod-rate=50/s \
  bulwark.io/pod-burst=50 | indent
for _ in $(seq 1 100); do kubectl -n batch get serviceaccount default >/dev/null 2>&1 && break; sleep 0.2; done

say "a pod without resources: bulwark sets the namespace's defaults"
echo "\$ kubectl -n batch run hello --image=registry.k8s.io/pause:3.10"
kubectl -n batch run hello --image=registry.k8s.io/pause:3.10 2>&1 | indent
echo "\$ kubectl -n batch get pod hello -o jsonpath='{.spec.containers[0].resources}'"
resources=$(kubectl -n batch get pod hello -o jsonpath='{.spec.containers[0].resources}')
echo "  $resources"
defaulted=$(kubectl -n batch get pod hello -o jsonpath='{.metadata.annotations.bulwark\.io/defaulted}')
echo "  bulwark.io/defaulted: $defaulted"
[[ "$resources" == *'"requests":{"cpu":"100m","memory":"128Mi"}'* ]] || fail "pod was not defaulted"
kubectl -n batch delete pod hello --wait=false >/dev/null

say "a Job of 300 pods with parallelism 300: the Job controller asks for all of them at once"
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
echo "  bulwark refused $refused creations for the pending cap; the Job controller waited the Retry-After and came back"
[ "$max_pending" -le 20 ] || fail "pending exceeded its cap: $max_pending"
[ "$refused" -gt 0 ] || fail "the pending cap never held the Job back"

say "a creation that cannot fit: namespace tiny allows 1 pod and has it"
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

say "the cluster is yours"
cat <<EOF
  eval "\$(e2e/cluster env)"        # KUBECONFIG and PATH (kubectl) for this shell
  kubectl get pods -A
  kubectl annotate ns batch bulwark.io/max-pending-pods=50 --overwrite
  curl -s \$BULWARK_METRICS_URL | grep ^bulwark_
  e2e/cluster down                  # stop everything
EOF
