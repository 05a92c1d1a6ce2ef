#!/usr/bin/env bash
# Instructions per review for bulwark's /mutate or /validate, with the functions they go to:
# the release binary under callgrind, driven by h2load over h2 with the body of
# bench/webhook-throughput.sh. Instruction counts do not depend on what else the machine runs,
# so before/after comparisons hold on a shared machine where req/s does not.
#
# Usage: bench/profile-webhook.sh [mutate|validate] [requests]   (default: mutate 2000)
# BULWARK_BIN=path profiles that binary; PROTO=h1 sends over HTTP/1.1 keep-alive (one request
# at a time, as kube-apiserver does) instead of h2. Writes
# bench/results/raw/profile-<endpoint>[-h1].txt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
endpoint=${1:-mutate}
n=${2:-2000}
bulwark=${BULWARK_BIN:-$root/target/release/bulwark}
command -v valgrind >/dev/null || { echo "needs valgrind" >&2; exit 1; }
command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null; }

work=$(mktemp -d)
vg=
cleanup() { [ -n "$vg" ] && kill "$vg" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
"$bulwark" certs --out-dir "$work/certs" --dns localhost --ip 127.0.0.1 >/dev/null 2>&1
# The request body: the one the throughput benchmark sends.
sed -n '/^python3 - "\$work\/pod.json" <<.EOF.$/,/^EOF$/p' "$here/webhook-throughput.sh" | sed '1d;$d' >"$work/gen.py"
python3 "$work/gen.py" "$work/pod.json"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
  "$bulwark" webhook --offline --config "$here/webhook-throughput.yaml" \
  --tls-cert "$work/certs/tls.crt" --tls-key "$work/certs/tls.key" \
  --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" 2>"$work/vg.log" &
vg=$!
for _ in $(seq 300); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
proto=${PROTO:-h2}
case "$proto" in
  h2) flow=(-m 16) suffix= ;;
  h1) flow=(--h1 -m 1) suffix=-h1 ;;
  *) echo "PROTO must be h2 or h1" >&2; exit 2 ;;
esac
load() { h2load -n "$1" -c 1 "${flow[@]}" -t 1 -H 'Content-Type: application/json' -d "$work/pod.json" \
  "https://127.0.0.1:$port/$endpoint" | grep -E '^requests:|^status codes:'; }
# Warm-up (connection set-up, lazy statics), then count only the measured requests.
load 200 >/dev/null
callgrind_control -z "$vg" >/dev/null
load "$n"
callgrind_control -d "$vg" >/dev/null
sleep 1
out=$here/results/raw/profile-$endpoint$suffix.txt
mkdir -p "$(dirname "$out")"
dump=$(ls -t "$work"/cg.out* | grep -v '^$' | head -1)
total=$(callgrind_annotate "$dump" 2>/dev/null | sed -n 's/^\([0-9,]*\) (100.0%).*PROGRAM TOTALS.*/\1/p' | tr -d ,)
python3 "$here/callgrind-summary.py" "$dump" "$n" "$endpoint" >"$out"
# For callgrind_annotate --tree=caller and the like.
cp "$dump" "$here/results/raw/callgrind-$endpoint$suffix.out"
head -1 "$out"
echo "profile: $out"
