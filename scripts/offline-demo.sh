#!/usr/bin/env bash
# Builds bulwark, starts `bulwark webhook --offline` on 127.0.0.1 with freshly generated
# certificates, and drives it the way kube-apiserver does: one pod defaulted by /mutate, then a
# burst of pod creations in namespace "ci" through /validate, refused with 429 once the
# namespace's rate and pending limits are used up. Exits non-zero if anything is not as shown.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${BULWARK_DEMO_PORT:-18443}
METRICS_PORT=${BULWARK_DEMO_METRICS_PORT:-19090}
work=$(mktemp -d)
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# Bold headings on a terminal only, so logs and CI output stay plain text.
if [ -t 1 ]; then B=$'\033[1m' N=$'\033[0m'; else B='' N=''; fi
say() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }
fail() { echo "demo: $*" >&2; [ -f "$work/webhook.log" ] && tail -20 "$work/webhook.log" >&2; exit 1; }

say "building bulwark"
cargo build --quiet -p bulwark
bin="${CARGO_TARGET_DIR:-target}/debug/bulwark"

say "generating a CA and a serving certificate for 127.0.0.1"
"$bin" certs --out-dir "$work/certs" --dns localhost --ip 127.0.0.1 --days 1 >"$work/cabundle"
echo "caBundle (base64, for the webhook configurations): $(cut -c1-40 "$work/cabundle")..."

cat >"$work/config.yaml" <<'EOF'
defaults:
  mode: enforce
  podRate: 2/s
  podBurst: 5
  maxPods: 1000
  maxPendingPods: 12
  defaultRequests: cpu=100m,memory=128Mi
  defaultLimits: cpu=1,memory=512Mi
cluster:
  maxPendingPods: 1000
reservationTtlSeconds: 60
EOF
say "starting the webhook (offline: policy from config, counts from its own admissions)"
sed 's/^/    /' "$work/config.yaml"
"$bin" webhook --offline --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$METRICS_PORT" \
  --tls-cert "$work/certs/tls.crt" --tls-key "$work/certs/tls.key" --config "$work/config.yaml" \
  2>"$work/webhook.log" &
pid=$!
curl_tls() { curl -sS --cacert "$work/certs/ca.crt" "$@"; }
for _ in $(seq 1 100); do
  if curl_tls -f "https://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then break; fi
  kill -0 "$pid" 2>/dev/null || fail "webhook exited"
  sleep 0.1
done
curl_tls -f "https://127.0.0.1:$PORT/readyz" >/dev/null || fail "webhook not ready"
echo "ready: https://127.0.0.1:$PORT (HTTP/2 and HTTP/1.1), metrics on http://127.0.0.1:$METRICS_PORT/metrics"

review() { # uid namespace pod-name [user]
  local user=${4:-system:serviceaccount:ci:pipeline}
  cat <<EOF
{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"$1",
 "kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},
 "namespace":"$2","operation":"CREATE","userInfo":{"username":"$user"},
 "object":{"apiVersion":"v1","kind":"Pod","metadata":{"name":"$3","namespace":"$2","labels":{"job-name":"burst"}},
   "spec":{"restartPolicy":"Never","containers":[{"name":"work","image":"busybox","command":["sleep","5"]}]}},
 "dryRun":false}}
EOF
}

say "POST /mutate: a pod without requests or limits"
review u-1 ci burst-0 | curl_tls --http2 -X POST -H 'Content-Type: application/json' --data-binary @- \
  "https://127.0.0.1:$PORT/mutate" >"$work/mutate.json"
python3 - "$work/mutate.json" <<'EOF' || fail "mutation not as expected"
import base64, json, sys
r = json.load(open(sys.argv[1]))["response"]
patch = json.loads(base64.b64decode(r["patch"]))  # base64, as kube-apiserver reads []byte
for op in patch:
    print(f"  {op['op']} {op['path']} = {json.dumps(op['value'])}")
for w in r.get("warnings", []):
    print(f"  Warning: {w}")
assert r["allowed"] and any(op["path"].endswith("/resources") for op in patch)
EOF

say "POST /validate: a CI pipeline creates 40 pods in namespace ci (rate 2/s, burst 5, at most 12 pending)"
send() { # i: one creation, its answer in $work/answer-i
  review "u-$1" ci "burst-$1" | curl_tls -X POST -H 'Content-Type: application/json' --data-binary @- \
    "https://127.0.0.1:$PORT/validate" >"$work/answer-$1"
}
# The first 20 at once, as a pipeline's fan-out does (the rate refuses past the burst), then,
# after a pause, 20 one by one (the rate has refilled; the pending cap refuses).
senders=()
for i in $(seq 1 20); do send "$i" & senders+=($!); done
wait "${senders[@]}"
allowed=0; refused=0; rate_msg=""; pending_msg=""
for i in $(seq 1 40); do
  if [ "$i" = 21 ]; then echo "  ... pausing 3s: the rate refills, the pending cap does not (offline, nothing starts)"; sleep 3; fi
  [ "$i" -le 20 ] || send "$i"
  out=$(cat "$work/answer-$i")
  line=$(python3 -c '
import json, sys
r = json.loads(sys.argv[1])["response"]
if r["allowed"]:
    print("allowed")
else:
    s = r["status"]
    print("refused %s %s retryAfterSeconds=%s\t%s" % (s["code"], s["reason"], s.get("details", {}).get("retryAfterSeconds"), s["message"]))
' "$out")
  case "$line" in
    allowed) allowed=$((allowed + 1)); printf '  burst-%-3s allowed\n' "$i" ;;
    refused*) refused=$((refused + 1)); printf '  burst-%-3s %s\n' "$i" "${line%%$'\t'*}"
      case "$line" in
        *"faster than its limit"*) [ -z "$rate_msg" ] && rate_msg="${line#*$'\t'}" ;;
        *"not yet running"*) [ -z "$pending_msg" ] && pending_msg="${line#*$'\t'}" ;;
      esac ;;
    *) fail "unexpected answer: $out" ;;
  esac
done
echo "  allowed $allowed, refused $refused"
[ "$allowed" -ge 5 ] && [ "$allowed" -le 12 ] || fail "expected 5 to 12 admitted, got $allowed"
[ -n "$rate_msg" ] || fail "expected the rate limit to refuse"
[ -n "$pending_msg" ] || fail "expected the pending cap to refuse"

say "the same refusal to the Job controller: no retryAfterSeconds, so client-go does not sleep in its create call and the controller's work queue retries"
out=$(review u-41 ci burst-41 system:serviceaccount:kube-system:job-controller | curl_tls -X POST \
  -H 'Content-Type: application/json' --data-binary @- "https://127.0.0.1:$PORT/validate")
python3 -c '
import json, sys
s = json.loads(sys.argv[1])["response"]["status"]
assert s["code"] == 429 and "retryAfterSeconds" not in s.get("details", {}), s
print("  burst-41  refused %s %s (no retryAfterSeconds)" % (s["code"], s["reason"]))
' "$out" || fail "expected the Job controller to be refused without retryAfterSeconds: $out"

say "what kubectl shows for these refusals (kube-apiserver passes retryAfterSeconds on as Retry-After)"
for msg in "$rate_msg" "$pending_msg"; do
  echo "Error from server (TooManyRequests): admission webhook \"validate.bulwark.io\" denied the request: $msg"
done

say "metrics"
curl -sS "http://127.0.0.1:$METRICS_PORT/metrics" | grep -E '^bulwark_(admission_requests_total|refusals_total|reservations)' | sed 's/^/  /'

say "SIGTERM: stop accepting, drain in-flight requests, exit"
kill -TERM "$pid"
wait "$pid" || fail "webhook exited with an error"
pid=""
grep -o 'draining in-flight requests\|stopped' "$work/webhook.log" | sed 's/^/  log: /'
say "done"
echo "The same webhook in front of a real kube-apiserver: bash scripts/demo.sh"
