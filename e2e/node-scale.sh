#!/usr/bin/env bash
# Node controller at scale: brings up the local cluster with NODES kwok nodes (default 1000),
# then reports the node controller's resident memory once its watches have synced, and the
# time from a node going bad (KernelDeadlock set) to bulwark's taint (grace is 2 s in the
# e2e cluster). Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${NODES:-1000}
dir=$(mktemp -d)/cluster
trap 'e2e/cluster --dir "$dir" down >/dev/null 2>&1 || true; rm -rf "$(dirname "$dir")"' EXIT

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
start=$(date +%s%N)
e2e/cluster --dir "$dir" up --nodes "$nodes" >/dev/null
up=$(ms_since "$start")
eval "$(e2e/cluster --dir "$dir" env)"
pid=$(cat "$dir/run/bulwark-node-controller.pid")
webhook=$(cat "$dir/run/bulwark-webhook.pid")
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2 / 1024}' "/proc/$1/status"; }
echo "cluster with $nodes kwok nodes up in ${up} ms"
sleep 5
echo "node controller RSS after sync: $(rss "$pid"); webhook RSS: $(rss "$webhook")"

node=kwok-node-7
kubectl annotate node "$node" kwok.x-k8s.io/node- >/dev/null
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
t0=$(date +%s%N)
kubectl patch node "$node" --subresource=status --type=strategic -p \
  "{\"status\":{\"conditions\":[{\"type\":\"KernelDeadlock\",\"status\":\"True\",\"reason\":\"Scale\",\"message\":\"scale test\",\"lastTransitionTime\":\"$now\",\"lastHeartbeatTime\":\"$now\"}]}}" >/dev/null
until kubectl get node "$node" -o jsonpath='{.spec.taints[*].key}' | grep -q bulwark.io/unhealthy; do
  sleep 0.1
  [ "$(ms_since "$t0")" -lt 60000 ] || { echo "no taint within 60s" >&2; exit 1; }
done
echo "signal to taint: $(ms_since "$t0") ms (grace 2 s, checked once a second; from the condition write)"
echo "node controller RSS after acting: $(rss "$pid")"
