#!/usr/bin/env bash
# Per-pod overhead: pod-create latency through the real kube-apiserver with no webhook, with
# bulwark's two registrations pointed at a no-op webhook (the floor any webhook costs), with
# the mutating one answering with a patch like bulwark's defaults, with only the validating one
# pointed there, and with bulwark; serial and with concurrent workers,
# for pods with and without resources, in one cluster (release build; see pod_latency.py).
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
cargo build --release --locked -q -p bulwark-bench-ceiling

# The no-op webhook: the bench ceiling server in --allow mode, with its own certificate.
noop_dir=$(mktemp -d)
"$BULWARK_BIN" certs --out-dir "$noop_dir" --ip 127.0.0.1 --dns localhost >/dev/null 2>&1
noop_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$target/release/bulwark-bench-ceiling" --allow --listen "127.0.0.1:$noop_port" \
  --tls-cert "$noop_dir/tls.crt" --tls-key "$noop_dir/tls.key" 2>"$noop_dir/noop.log" &
noop_pid=$!
# The same no-op webhook, patching on /mutate as bulwark's defaults do a pod without resources
# (the container's requests and limits, and the bulwark.io/defaulted annotation).
cat >"$noop_dir/patch.json" <<'EOF'
[{"op":"add","path":"/spec/containers/0/resources","value":{"limits":{"cpu":"1","memory":"512Mi"},"requests":{"cpu":"100m","memory":"128Mi"}}},
 {"op":"add","path":"/metadata/annotations","value":{"bulwark.io/defaulted":"c: requests.cpu=100m,requests.memory=128Mi,limits.cpu=1,limits.memory=512Mi"}}]
EOF
patch_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$target/release/bulwark-bench-ceiling" --allow --mutate-patch "$noop_dir/patch.json" \
  --listen "127.0.0.1:$patch_port" --tls-cert "$noop_dir/tls.crt" --tls-key "$noop_dir/tls.key" \
  2>"$noop_dir/noop-patch.log" &
patch_pid=$!
trap 'kill $noop_pid $patch_pid 2>/dev/null; rm -rf "$noop_dir"; cleanup' EXIT

"$e2e" --dir "$dir" up --nodes 4 2>&1 | tail -n 2
sleep 5
flock /tmp/bulwark-bench.lock timeout --kill-after=30 2400 \
  python3 "$root/bench/pod_latency.py" --dir "$dir" "${args[@]}" \
  --noop-url "https://127.0.0.1:$noop_port" --noop-ca "$noop_dir/ca.crt" \
  --noop-patch-url "https://127.0.0.1:$patch_port" \
  --out "$root/bench/results/pod-latency"
