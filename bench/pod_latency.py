"""Pod-create latency through kube-apiserver, in one cluster, with four registrations taking
turns (the order alternates between rounds):

- `without`: no webhook registered;
- `noop`: bulwark's two registrations (the same rules, matchConditions, timeouts) pointed at a
  no-op webhook that allows everything (`bulwark-bench-ceiling --allow`): the floor any pair of
  webhooks costs;
- `noop-patch` (for the pod without resources only): the same two registrations pointed at a
  no-op webhook whose mutating answer carries a JSON patch of the size and shape bulwark's
  defaults make (`--mutate-patch`): the floor of any defaulting webhook, since kube-apiserver
  then applies the patch and decodes the pod again;
- `noop-validate`: only the validating registration, pointed at the no-op webhook: the floor of
  one webhook, what a pod that needs no defaulting should cost with bulwark;
- `bulwark`: bulwark's own two registrations.

Each phase times `--serial` creates one at a time, then `--workers` concurrent workers creating
`--per-worker` pods each, for a pod without resources (bulwark's mutating webhook defaults it)
and one with every request and limit set (its matchConditions skip the mutating call). Every
client keeps one HTTPS connection open. Pods carry a scheduling gate (the scheduler and kwok
never touch them) and are deleted right after being created (not timed), so bulwark's pending
caps stay far away; the namespace has no rate limit. Writes <out>.csv (every create) and
<out>.md (tables)."""

import argparse
import base64
import copy
import csv
import json
import sys
import threading
import time
import urllib.request

import kube

NS = "latency"
ARMS = ["without", "noop", "noop-patch", "noop-validate", "bulwark"]
# Arms that measure only one kind of pod: a pod with every resource set skips the mutating
# call, so a patching no-op webhook is the plain no-op for it.
ONLY = {"noop-patch": "no-resources"}
FULL = {
    "requests": {"cpu": "10m", "memory": "16Mi"},
    "limits": {"cpu": "100m", "memory": "64Mi"},
}


def pod(resources):
    container = {"name": "c", "image": "registry.k8s.io/pause:3.10"}
    if resources:
        container["resources"] = FULL
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "lat-", "labels": {"bench": "latency"}},
        "spec": {
            "schedulingGates": [{"name": "bench.bulwark.io/never"}],
            "terminationGracePeriodSeconds": 0,
            "containers": [container],
        },
    }


def create_delete(client, n, sink, errors, body):
    for _ in range(n):
        status, _, payload, seconds = client.request("POST", f"/api/v1/namespaces/{NS}/pods", body)
        if status != 201:
            errors.append(f"{status} {payload[:300]!r}" if len(errors) < 5 else status)
            continue
        sink.append(seconds * 1000)
        name = json.loads(payload)["metadata"]["name"]
        client.json("DELETE", f"/api/v1/namespaces/{NS}/pods/{name}", ok=(200, 202, 404))


def sums(text, metric):
    """{labels: [sum, count]} of one Prometheus histogram in a text exposition."""
    out = {}
    for line in text.splitlines():
        for part, i in ((f"{metric}_sum{{", 0), (f"{metric}_count{{", 1)):
            if line.startswith(part):
                labels, value = line[len(part) - 1 :].rsplit(" ", 1)
                out.setdefault(labels, [0.0, 0.0])[i] = float(value)
    return out


def where_time_goes(cluster, api):
    """Snapshot of the two views of a webhook call: kube-apiserver's (the whole call: encoding
    the review, TLS, the round trip, decoding the answer) and bulwark's handler (body read to
    answer encoded). The difference of two snapshots gives the mean of each per call."""
    apiserver = sums(api.request("GET", "/metrics")[2].decode(),
                     "apiserver_admission_webhook_admission_duration_seconds")
    url = f"http://127.0.0.1:{cluster.ports['webhook_metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        handler = sums(r.read().decode(), "bulwark_admission_duration_seconds")
    return {"apiserver": apiserver, "handler": handler}


def mean_ms(before, after):
    """Mean milliseconds per call for each label set that moved between two snapshots."""
    out = {}
    for view in ("apiserver", "handler"):
        for labels, (s1, c1) in after[view].items():
            s0, c0 = before[view].get(labels, (0.0, 0.0))
            if c1 > c0:
                out[f"{view} {labels}"] = (round((s1 - s0) / (c1 - c0) * 1000, 3), int(c1 - c0))
    return out


def phase(cluster, arm, kind, rnd, a, rows):
    """One arm for one kind of pod: warm-up, serial creates, then concurrent workers."""
    body = pod(kind == "resources")
    main = cluster.client()
    errors = []
    create_delete(main, a.warmup, [], errors, body)
    serial = []
    create_delete(main, a.serial, serial, errors, body)
    rows += [(arm, kind, "serial", rnd, round(ms, 3)) for ms in serial]
    clients = [cluster.client() for _ in range(a.workers)]
    for c in clients:  # open the connections before timing
        c.request("GET", f"/api/v1/namespaces/{NS}")
    sinks = [[] for _ in clients]
    threads = [
        threading.Thread(target=create_delete, args=(c, a.per_worker, s, errors, body))
        for c, s in zip(clients, sinks)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    conc = [ms for s in sinks for ms in s]
    rows += [(arm, kind, f"concurrent-{a.workers}", rnd, round(ms, 3)) for ms in conc]
    for c in clients + [main]:
        c.close()
    def ms(values, q):
        p = kube.percentile(values, q)
        return "-" if p is None else f"{p:.2f}"

    print(
        f"  {arm:>13} {kind:>12}: serial p50 {ms(serial, 50)} ms "
        f"p99 {ms(serial, 99)} ms; concurrent p50 "
        f"{ms(conc, 50)} ms p99 {ms(conc, 99)} ms, "
        f"{len(conc) / wall:.0f} creates/s; errors {errors[:5]} ({len(errors)})",
        flush=True,
    )
    return len(errors)


WEBHOOK_CALLS = "apiserver_admission_webhook_admission_duration_seconds_count"


def webhook_calls(api):
    """kube-apiserver's count of webhook calls, all registrations together."""
    text = api.request("GET", "/metrics")[2].decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(WEBHOOK_CALLS + "{")
    )


def registered(api):
    """Whether a dry-run create (of a pod without resources) reaches any webhook."""
    before = webhook_calls(api)
    api.request("POST", f"/api/v1/namespaces/{NS}/pods?dryRun=All", pod(False))
    return webhook_calls(api) > before


# The no-op registrations have a name of their own: `bulwark cabundle` keeps the caBundle of
# the configurations named "bulwark" equal to bulwark's CA, which would make kube-apiserver
# refuse the no-op webhook's certificate.
NOOP_NAME = "bulwark-bench-noop"


def noop_registrations(saved, url, ca_pem, validate_only):
    """bulwark's registrations (rules, matchConditions, timeouts), under NOOP_NAME, pointed at
    the no-op webhook at `url`."""
    out = {}
    bundle = base64.b64encode(ca_pem.encode()).decode()
    for plural, obj in saved.items():
        if validate_only and plural.startswith("mutating"):
            continue
        obj = copy.deepcopy(obj)
        obj["metadata"]["name"] = NOOP_NAME
        for hook in obj.get("webhooks", []):
            path = "/mutate" if plural.startswith("mutating") else "/validate"
            hook["clientConfig"] = {"url": url + path, "caBundle": bundle}
        out[plural] = obj
    return out


def switch(api, arm, saved, noop, noop_patch, noop_validate):
    """Registers what `arm` measures and waits until the API server calls it (or nothing)."""
    kube.delete_webhooks(api)
    kube.delete_webhooks(api, NOOP_NAME)
    want = {
        "without": None,
        "noop": noop,
        "noop-patch": noop_patch,
        "noop-validate": noop_validate,
        "bulwark": saved,
    }[arm]
    if want is None:
        deadline = time.monotonic() + 60
        while registered(api):
            if time.monotonic() > deadline:
                raise RuntimeError("webhooks still called after their registrations were deleted")
            time.sleep(0.2)
        return
    kube.create_webhooks(api, want)
    if arm == "bulwark":
        kube.wait_bulwark(api, NS, True)
        return
    deadline = time.monotonic() + 60
    while not registered(api):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{arm}: the no-op webhook is never called")
        time.sleep(0.2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--serial", type=int, default=300)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--per-worker", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--noop-url", required=True, help="the no-op webhook, https://HOST:PORT")
    ap.add_argument("--noop-ca", required=True, help="PEM CA of the no-op webhook's certificate")
    ap.add_argument(
        "--noop-patch-url", required=True, help="the no-op webhook that patches on /mutate"
    )
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cluster = kube.Cluster(a.dir)
    api = cluster.client()
    kube.ensure_namespace(
        api,
        NS,
        {
            "bulwark.io/pod-rate": "unlimited",
            "bulwark.io/max-pods": "unlimited",
            "bulwark.io/max-pending-pods": "unlimited",
        },
    )
    kube.wait_bulwark(api, NS, True)
    saved = kube.save_webhooks(api)
    with open(a.noop_ca) as f:
        ca = f.read()
    noop = noop_registrations(saved, a.noop_url, ca, False)
    noop_patch = noop_registrations(saved, a.noop_patch_url, ca, False)
    noop_validate = noop_registrations(saved, a.noop_url, ca, True)
    kinds = ["no-resources", "resources"]
    rows, errors, calls = [], 0, {}
    try:
        for rnd in range(1, a.rounds + 1):
            order = ARMS if rnd % 2 else list(reversed(ARMS))
            print(f"round {rnd}: {' / '.join(order)}", flush=True)
            for arm in order:
                switch(api, arm, saved, noop, noop_patch, noop_validate)
                time.sleep(1)
                for kind in kinds:
                    if ONLY.get(arm, kind) != kind:
                        continue
                    timed = arm in ("bulwark", "noop-patch")
                    before = where_time_goes(cluster, api) if timed else None
                    errors += phase(cluster, arm, kind, rnd, a, rows)
                    if before is not None:
                        after = where_time_goes(cluster, api)
                        for key, (ms, n) in mean_ms(before, after).items():
                            calls.setdefault((arm, kind, key), []).append((ms, n))
    finally:
        kube.delete_webhooks(api)
        kube.delete_webhooks(api, NOOP_NAME)
        kube.create_webhooks(api, saved)

    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "pod", "requests", "round", "ms"])
        w.writerows(rows)

    loads = ["serial", f"concurrent-{a.workers}"]

    def stats(arm, kind, load):
        v = [ms for (m, k, l, _, ms) in rows if m == arm and k == kind and l == load]
        return len(v), kube.percentile(v, 50), kube.percentile(v, 99)

    lines = ["| pod | requests | arm | n | p50 ms | p99 ms |", "|---|---|---|---:|---:|---:|"]
    for kind in kinds:
        for load in loads:
            for arm in ARMS:
                n, p50, p99 = stats(arm, kind, load)
                if n == 0:
                    continue
                lines.append(f"| {kind} | {load} | {arm} | {n} | {p50:.2f} | {p99:.2f} |")

    def verdict(r):
        return "met" if r <= 1.05 else "missed"

    # The targets: bulwark against the floor of the same two registrations; a pod that needs no
    # defaulting against one no-op webhook (bulwark's matchConditions skip its mutating call).
    ratios = [
        "",
        "| pod | requests | bulwark / | p50 ratio | p99 ratio | target <= 1.05 (p50, p99) |",
        "|---|---|---|---:|---:|---|",
    ]
    for kind in kinds:
        for load in loads:
            _, b50, b99 = stats("bulwark", kind, load)
            floors = [("noop", "two no-op webhooks")]
            if kind == "no-resources":
                floors.append(("noop-patch", "two no-op webhooks, the mutating one patching"))
            if kind == "resources":
                floors.append(("noop-validate", "one no-op webhook"))
            floors.append(("without", "no webhook (context)"))
            for arm, label in floors:
                _, f50, f99 = stats(arm, kind, load)
                target = "" if arm == "without" else f"{verdict(b50 / f50)}, {verdict(b99 / f99)}"
                ratios.append(
                    f"| {kind} | {load} | {label} | {b50 / f50:.3f} | {b99 / f99:.3f} | {target} |"
                )
    split = [
        "",
        "Mean time per webhook call during the bulwark and noop-patch phases, as kube-apiserver",
        "and (for bulwark) its handler see it:",
        "",
        "| arm | pod | view {labels} | mean ms per call | calls |",
        "|---|---|---|---:|---:|",
    ]
    for (arm, kind, key), vals in sorted(calls.items()):
        n = sum(c for _, c in vals)
        mean = sum(ms * c for ms, c in vals) / n
        split.append(f"| {arm} | {kind} | `{key}` | {mean:.3f} | {n} |")
    text = "\n".join(lines + ratios + split) + f"\n\nfailed creates: {errors}\n"
    with open(a.out + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
