#!/usr/bin/env bash
# Webhook throughput and latency against its ceiling and a Go peer, over TLS on loopback.
#
# Servers (all on 127.0.0.1, free ports, certificates from `bulwark certs` in a temp dir):
#   bulwark   `bulwark webhook --offline` with bench/webhook-throughput.yaml: /mutate, /validate
#   ceiling   bench/ceiling: the same hyper + rustls stack answering every POST with one
#             constant AdmissionReview, one instance per answer (bulwark's mutate / validate
#             answer, byte for byte)
#   agnhost   the Kubernetes e2e image's Go webhook (k8s.io/kubernetes/test/images/agnhost
#             `webhook`, built by bench/agnhost): /mutating-pods-sidecar (decodes the pod,
#             answers a JSONPatch) and /pods (decodes the pod, allows)
# Load: h2load (nghttp2-client, installed with apt when missing) over h2 and http/1.1 at 1, 4,
# 16 and 64 requests in flight, the same ~3 KiB Job-pod AdmissionReview for every server (one
# that lacks resources, so bulwark's /mutate defaults it), then a fixed 5,000 reviews/s over h2
# against bulwark with its own handler-time histogram read from /metrics.
# Latency percentiles come from h2load's per-request --log-file.
#
# Usage: bench/webhook-throughput.sh [--smoke] [--label NAME] [--duration SECONDS]
#   --smoke     a few hundred requests per cell, to check the harness (CI)
#   --label     names the result files (default: run)
#   --no-build  use the binaries already built
# BULWARK_BIN=path measures that bulwark binary instead of the one built here;
# BULWARK_BEFORE_BIN=path measures another one alongside (say, main's), reported as "before".
# The measurement holds /tmp/bulwark-bench.lock (flock) so it never overlaps another
# benchmark; builds happen before the lock is taken.
# Writes bench/results/<label>.md (the tables) and bench/results/raw/<label>/ (h2load output).
set -euo pipefail
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
smoke=0
label=run
duration=8
warmup=2
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --label) label=$2; shift ;;
    --duration) duration=$2; shift ;;
    --no-build) build=0 ;;
    *) echo "usage: $0 [--smoke] [--label NAME] [--duration SECONDS]" >&2; exit 2 ;;
  esac
  shift
done

if ! command -v h2load >/dev/null 2>&1; then
  echo "installing nghttp2-client for h2load" >&2
  apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null
fi

# Builds (no lock: compiling is not measured).
if [ "$build" = 1 ]; then
  (cd "$root" && cargo build --locked --release -q -p bulwark -p bulwark-bench-ceiling)
fi
# BULWARK_BIN: another bulwark binary to measure (say, one built from main for a before/after).
bulwark=${BULWARK_BIN:-$root/target/release/bulwark}
ceiling=$root/target/release/bulwark-bench-ceiling
agnhost=$("$here/agnhost/build.sh")/agnhost

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bulwark" certs --out-dir "$work/certs" --dns localhost --ip 127.0.0.1 >/dev/null 2>&1
cert=$work/certs/tls.crt
key=$work/certs/tls.key
ca=$work/certs/ca.crt

# The body of crates' webhook/benches/decision.rs: a Job pod as kube-apiserver sends it after
# its own defaulting, with no resources, so /mutate defaults them.
python3 - "$work/pod.json" <<'EOF'
import json, sys
env = [{"name": f"VAR_{n}", "value": f"value-{n}-" + "x" * 40} for n in range(12)]
ns = "ci-7"
review = {
    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
    "request": {
        "uid": "0c9a8d74-9cb7-44dd-b98e-000000000007",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": ns, "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:job-controller",
                     "groups": ["system:serviceaccounts"]},
        "object": {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "generateName": "build-7-", "namespace": ns,
                "labels": {"batch.kubernetes.io/job-name": "build-7",
                           "bulwark.io/workflow": "wf-7", "controller-uid": "4f1c"},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "build-7",
                                     "uid": "4f1c", "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": {
                "containers": [{
                    "name": "build", "image": "registry.example.com/ci/builder:1.2.3",
                    "command": ["/bin/sh", "-c", "make test"], "env": env,
                    "volumeMounts": [{"name": "kube-api-access", "readOnly": True,
                                      "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent",
                }],
                "restartPolicy": "Never", "terminationGracePeriodSeconds": 30,
                "dnsPolicy": "ClusterFirst", "serviceAccountName": "default",
                "schedulerName": "default-scheduler", "priority": 0,
                "tolerations": [
                    {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                     "effect": "NoExecute", "tolerationSeconds": 300},
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                     "effect": "NoExecute", "tolerationSeconds": 300},
                ],
                "volumes": [{"name": "kube-api-access", "projected": {"sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}}],
            },
            "status": {},
        },
        "dryRun": False,
    },
}
with open(sys.argv[1], "w") as f:
    json.dump(review, f, separators=(",", ":"))
EOF

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 100); do
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  exit 1
}
post() { # url -> answer on stdout
  curl -sS --fail --cacert "$ca" -H 'Content-Type: application/json' --data-binary "@$work/pod.json" "$1"
}

bp=$(free_port); bm=$(free_port)
RUST_LOG=warn "$bulwark" webhook --offline --config "$here/webhook-throughput.yaml" \
  --tls-cert "$cert" --tls-key "$key" --listen "127.0.0.1:$bp" \
  --metrics-listen "127.0.0.1:$bm" 2>"$work/bulwark.log" &
pids+=($!)
ap=$(free_port)
before=${BULWARK_BEFORE_BIN:-}
if [ -n "$before" ]; then
  bbp=$(free_port); bbm=$(free_port)
  RUST_LOG=warn "$before" webhook --offline --config "$here/webhook-throughput.yaml" \
    --tls-cert "$cert" --tls-key "$key" --listen "127.0.0.1:$bbp" \
    --metrics-listen "127.0.0.1:$bbm" 2>"$work/before.log" &
  pids+=($!)
  wait_port "$bbp"
fi
"$agnhost" webhook --port "$ap" --tls-cert-file "$cert" --tls-private-key-file "$key" \
  --sidecar-image registry.example.com/sidecar:1 2>"$work/agnhost.log" &
pids+=($!)
wait_port "$bp"; wait_port "$ap"

post "https://localhost:$bp/mutate" >"$work/mutate.answer"
post "https://localhost:$bp/validate" >"$work/validate.answer"
post "https://localhost:$ap/mutating-pods-sidecar" >"$work/agnhost-mutate.answer"
post "https://localhost:$ap/pods" >"$work/agnhost-validate.answer"
grep -q '"patch":' "$work/mutate.answer" || { echo "bulwark's /mutate did not patch" >&2; exit 1; }
grep -q '"allowed":true' "$work/validate.answer" || { echo "bulwark's /validate did not allow" >&2; exit 1; }
grep -q '"patch":"' "$work/agnhost-mutate.answer" || { echo "agnhost did not patch" >&2; exit 1; }

cmp=$(free_port); cvp=$(free_port)
"$ceiling" --tls-cert "$cert" --tls-key "$key" --listen "127.0.0.1:$cmp" --response "$work/mutate.answer" 2>/dev/null &
pids+=($!)
"$ceiling" --tls-cert "$cert" --tls-key "$key" --listen "127.0.0.1:$cvp" --response "$work/validate.answer" 2>/dev/null &
pids+=($!)
wait_port "$cmp"; wait_port "$cvp"

raw=$here/results/raw/$label
mkdir -p "$raw"
rm -f "$raw"/*
cp "$work"/*.answer "$work/pod.json" "$raw/"

# One h2load run: name proto inflight url -> a TSV row in $raw/cells.tsv
cell() {
  local name=$1 proto=$2 inflight=$3 url=$4 args=()
  if [ "$proto" = h2 ]; then
    # kube-apiserver multiplexes its reviews over few connections.
    local conns=$(( inflight >= 16 ? inflight / 16 : 1 ))
    args+=(-c "$conns" -m $(( inflight / conns )))
  else
    args+=(--h1 -c "$inflight")
  fi
  if [ "$smoke" = 1 ]; then args+=(-n 200); else args+=(-D "$duration" --warm-up-time "$warmup"); fi
  local base=$raw/$name-$proto-$inflight
  h2load "${args[@]}" -t 1 -H 'Content-Type: application/json' -d "$work/pod.json" \
    --log-file "$base.log" "$url" >"$base.out" 2>&1 || true
  python3 - "$base" "$name" "$proto" "$inflight" >>"$raw/cells.tsv" <<'EOF'
import re, sys
base, name, proto, inflight = sys.argv[1:5]
out = open(base + ".out").read()
m = re.search(r"finished in ([\d.]+)(?:ms|s), ([\d.]+) req/s", out)
rps = float(m.group(2)) if m else 0.0
m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
done, ok, failed = (int(m.group(2)), int(m.group(3)), int(m.group(4))) if m else (0, 0, 0)
# A few streams cut by the end of the duration are counted as done with no status at all;
# only 3xx/4xx/5xx answers count against a cell.
m = re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
ok2xx = done - sum(int(g) for g in m.groups()) if m else 0
lat = []
for line in open(base + ".log"):
    f = line.split("\t")
    if len(f) >= 3 and f[1] != "-1":
        lat.append(int(f[2]))
lat.sort()
pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1000 if lat else float("nan")
print(f"{name}\t{proto}\t{inflight}\t{rps:.0f}\t{pct(0.5):.3f}\t{pct(0.99):.3f}\t{done}\t{ok2xx}\t{failed}")
EOF
  rm -f "$base.log"
}

lock=/tmp/bulwark-bench.lock
exec 9>>"$lock"
echo "waiting for $lock" >&2
flock 9
echo "measuring (label $label)" >&2
{
  echo "# $(date -u +%FT%TZ) $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
  echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$raw/cells.tsv"
for proto in h2 h1; do
  for inflight in 1 4 16 64; do
    # The three servers back to back per cell, so drift in the machine's load hits all alike.
    for kind in mutate validate; do
      cell "bulwark-$kind" "$proto" "$inflight" "https://127.0.0.1:$bp/$kind"
      if [ -n "$before" ]; then cell "before-$kind" "$proto" "$inflight" "https://127.0.0.1:$bbp/$kind"; fi
      if [ "$kind" = mutate ]; then
        cell ceiling-mutate "$proto" "$inflight" "https://127.0.0.1:$cmp/mutate"
        cell agnhost-mutate "$proto" "$inflight" "https://127.0.0.1:$ap/mutating-pods-sidecar"
      else
        cell ceiling-validate "$proto" "$inflight" "https://127.0.0.1:$cvp/validate"
        cell agnhost-validate "$proto" "$inflight" "https://127.0.0.1:$ap/pods"
      fi
    done
  done
done

# A fixed 5,000 reviews/s over h2 (4 connections of 4 streams, 1,250/s each) against bulwark:
# client-side latency from h2load, handler time from bulwark's own histogram.
metric() { curl -sS "http://127.0.0.1:$1/metrics" | grep "^bulwark_admission_duration_seconds_bucket{endpoint=\"$2\"" || true; }
fixed=()
servers=("bulwark $bp $bm")
if [ -n "$before" ]; then servers+=("before $bbp $bbm"); fi
for server in "${servers[@]}"; do
for kind in mutate validate; do
  read -r sname sport smetrics <<<"$server"
  hist0=$(metric "$smetrics" "$kind")
  if [ "$smoke" = 1 ]; then n=(-n 400); else n=(-D "$duration" --warm-up-time "$warmup"); fi
  base=$raw/fixed-$sname-$kind
  h2load "${n[@]}" -t 1 -c 4 -m 4 --rps 1250 -H 'Content-Type: application/json' \
    -d "$work/pod.json" --log-file "$base.log" "https://127.0.0.1:$sport/$kind" >"$base.out" 2>&1 || true
  hist1=$(metric "$smetrics" "$kind")
  fixed+=("$(python3 - "$base" "$sname $kind" "$hist0" "$hist1" <<'EOF'
import re, sys
base, kind, before, after = sys.argv[1:5]
def buckets(text):
    out = {}
    for line in text.splitlines():
        m = re.search(r'le="([^"]+)"\} (\d+)', line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out
b, a = buckets(before), buckets(after)
d = {k: a[k] - b.get(k, 0) for k in a}
total = d.get("+Inf", 0)
under_1ms = d.get("0.001", 0)
p99_bucket = next((k for k in sorted((k for k in d if k != "+Inf"), key=float) if total and d[k] >= 0.99 * total), "> 0.5")
out = open(base + ".out").read()
m = re.search(r"finished in ([\d.]+)(?:ms|s), ([\d.]+) req/s", out)
rps = float(m.group(2)) if m else 0.0
lat = sorted(int(l.split("\t")[2]) for l in open(base + ".log") if l.split("\t")[1] != "-1")
pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1000 if lat else float("nan")
share = f"{100 * under_1ms / total:.2f}%" if total else "n/a"
bound = f"<= {float(p99_bucket) * 1000:g} ms" if p99_bucket != "> 0.5" else "> 500 ms"
print(f"| {kind} | {rps:.0f} | {pct(0.5):.3f} | {pct(0.99):.3f} | {share} | {bound} |")
EOF
)")
  rm -f "$base.log"
done
done
flock -u 9

python3 - "$raw/cells.tsv" "$here/results/$label.md" "$label" "$smoke" "$duration" \
  "$(wc -c <"$work/pod.json")" "$(wc -c <"$work/mutate.answer")" "$(wc -c <"$work/validate.answer")" \
  "$(wc -c <"$work/agnhost-mutate.answer")" "$(wc -c <"$work/agnhost-validate.answer")" \
  "$(printf '%s\n' "${fixed[@]}")" <<'EOF'
import sys
cells, dest, label, smoke, duration, req, mans, vans, gmans, gvans, fixed = sys.argv[1:12]
head, rows = [], {}
for line in open(cells):
    if line.startswith("#"):
        head.append(line[2:].strip())
        continue
    name, proto, inflight, rps, p50, p99, done, ok, failed = line.rstrip("\n").split("\t")
    rows[(name, proto, int(inflight))] = (float(rps), p50, p99, int(done), int(ok), int(failed))
out = [f"## webhook throughput: {label}", ""]
out += [f"- {h}" for h in head]
how = "200 requests per cell (smoke)" if smoke == "1" else f"{duration} s per cell after a 2 s warm-up"
out += [f"- {how}; h2load -t 1 on the same machine as the servers",
        f"- request {req} B; answers: bulwark mutate {mans} B, validate {vans} B; "
        f"agnhost mutate {gmans} B, validate {gvans} B; each ceiling answers bulwark's answer byte for byte",
        "- h2: 1 connection up to 16 in flight, then 16 streams per connection; h1: one connection per request in flight",
        "- latency in ms, per request from h2load's log; ratio = req/s of bulwark / req/s of the other", ""]
has_before = any(k[0].startswith("before-") for k in rows)
if has_before:
    out += ["- before: BULWARK_BEFORE_BIN, measured in the same run right after bulwark", ""]
out += ["| endpoint | proto | in flight | bulwark req/s | p50 | p99 | ceiling req/s | p50 | p99 | agnhost req/s | p50 | p99 | bulwark/ceiling | bulwark/agnhost |"
        + (" before req/s | p50 | p99 | before/ceiling | bulwark/before |" if has_before else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|---:|" if has_before else "")]
bad = []
for kind in ("mutate", "validate"):
    for proto in ("h2", "h1"):
        for inflight in (1, 4, 16, 64):
            b = rows.get((f"bulwark-{kind}", proto, inflight))
            c = rows.get((f"ceiling-{kind}", proto, inflight))
            g = rows.get((f"agnhost-{kind}", proto, inflight))
            if not (b and c and g):
                continue
            for n, r in (("bulwark", b), ("ceiling", c), ("agnhost", g)):
                if r[5] or r[4] < r[3]:
                    bad.append(f"{n} {kind} {proto} {inflight}: {r[3]} done, {r[4]} 2xx, {r[5]} failed")
            ratio = lambda x, y: f"{x[0] / y[0]:.2f}" if y[0] else "n/a"
            line = (f"| {kind} | {proto} | {inflight} | {b[0]:.0f} | {b[1]} | {b[2]} | {c[0]:.0f} | {c[1]} | {c[2]} | "
                    f"{g[0]:.0f} | {g[1]} | {g[2]} | {ratio(b, c)} | {ratio(b, g)} |")
            w = rows.get((f"before-{kind}", proto, inflight))
            if has_before and w:
                line += f" {w[0]:.0f} | {w[1]} | {w[2]} | {ratio(w, c)} | {ratio(b, w)} |"
            out.append(line)
out += ["", "Fixed rate, h2, 4 connections x 4 streams, --rps 1250 per connection (5,000 reviews/s offered), bulwark only:", "",
        "| server endpoint | achieved req/s | client p50 ms | client p99 ms | handler <= 1 ms | handler p99 (histogram bucket) |",
        "|---|---:|---:|---:|---:|---:|"]
out += [l for l in fixed.splitlines() if l.strip()]
if bad:
    out += ["", "Cells with failed or non-2xx requests:", ""] + [f"- {b}" for b in bad]
text = "\n".join(out) + "\n"
open(dest, "w").write(text)
print(text)
EOF
