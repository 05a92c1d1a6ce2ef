"""Pod-create latency through kube-apiserver with bulwark registered and not registered, in
one cluster: rounds alternate the order (without, with / with, without), each phase runs a
warm-up, `--serial` creates one at a time, then `--workers` concurrent workers creating
`--per-worker` pods each. Every client keeps one HTTPS connection open. Pods carry a
scheduling gate (the scheduler and kwok never touch them) and are deleted right after being
created (not timed), so bulwark's pending caps stay far away; the namespace has no rate limit.
Writes <out>.csv (every create) and <out>.md (table)."""

import argparse
import csv
import json
import sys
import threading
import time
import urllib.request

import kube

NS = "latency"


def pod():
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "lat-", "labels": {"bench": "latency"}},
        "spec": {
            "schedulingGates": [{"name": "bench.bulwark.io/never"}],
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}],
        },
    }


def create_delete(client, n, sink, errors):
    body = pod()
    for _ in range(n):
        status, _, payload, seconds = client.request("POST", f"/api/v1/namespaces/{NS}/pods", body)
        if status != 201:
            errors.append(status)
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


def phase(cluster, mode, rnd, a, rows):
    main = cluster.client()
    print(f"round {rnd}: {mode} bulwark", flush=True)
    errors = []
    create_delete(main, a.warmup, [], errors)
    serial = []
    create_delete(main, a.serial, serial, errors)
    rows += [(mode, "serial", rnd, round(ms, 3)) for ms in serial]
    clients = [cluster.client() for _ in range(a.workers)]
    for c in clients:  # open the connections before timing
        c.request("GET", f"/api/v1/namespaces/{NS}")
    sinks = [[] for _ in clients]
    threads = [
        threading.Thread(target=create_delete, args=(c, a.per_worker, s, errors))
        for c, s in zip(clients, sinks)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    conc = [ms for s in sinks for ms in s]
    rows += [(mode, f"concurrent-{a.workers}", rnd, round(ms, 3)) for ms in conc]
    for c in clients + [main]:
        c.close()
    print(
        f"  serial p50 {kube.percentile(serial, 50):.2f} ms p99 {kube.percentile(serial, 99):.2f} ms;"
        f" concurrent p50 {kube.percentile(conc, 50):.2f} ms p99 {kube.percentile(conc, 99):.2f} ms,"
        f" {len(conc) / wall:.0f} creates/s; errors {errors[:5]} ({len(errors)})",
        flush=True,
    )
    return len(errors)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--serial", type=int, default=300)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--per-worker", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
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
    rows, errors, calls = [], 0, {}
    try:
        for rnd in range(1, a.rounds + 1):
            order = ["without", "with"] if rnd % 2 else ["with", "without"]
            for mode in order:
                if mode == "without":
                    kube.delete_webhooks(api)
                    kube.wait_bulwark(api, NS, False)
                else:
                    kube.create_webhooks(api, saved)
                    kube.wait_bulwark(api, NS, True)
                time.sleep(1)
                before = where_time_goes(cluster, api) if mode == "with" else None
                errors += phase(cluster, mode, rnd, a, rows)
                if before is not None:
                    for key, (ms, n) in mean_ms(before, where_time_goes(cluster, api)).items():
                        calls.setdefault(key, []).append((ms, n))
    finally:
        kube.create_webhooks(api, saved)

    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "kind", "round", "ms"])
        w.writerows(rows)

    kinds = ["serial", f"concurrent-{a.workers}"]
    lines = [
        "| requests | bulwark | n | p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|",
    ]
    ratios = ["", "| requests | p50 with/without | p99 with/without | added p50 ms | added p99 ms | target |",
              "|---|---:|---:|---:|---:|---|"]
    for kind in kinds:
        stats = {}
        for mode in ("without", "with"):
            v = [ms for (m, k, _, ms) in rows if m == mode and k == kind]
            stats[mode] = (kube.percentile(v, 50), kube.percentile(v, 99))
            lines.append(f"| {kind} | {mode} | {len(v)} | {stats[mode][0]:.2f} | {stats[mode][1]:.2f} |")
        (p50o, p99o), (p50w, p99w) = stats["without"], stats["with"]
        ratios.append(
            f"| {kind} | {p50w / p50o:.3f} | {p99w / p99o:.3f} | {p50w - p50o:+.2f} | "
            f"{p99w - p99o:+.2f} | <= 1.05, added p99 <= 5 ms: "
            f"ratio {'met' if p99w / p99o <= 1.05 else 'missed'}, added p99 "
            f"{'met' if p99w - p99o <= 5 else 'missed'} |"
        )
    split = ["", "Mean time per webhook call during the \"with\" phases (all requests), as kube-apiserver",
             "and bulwark's handler see it:", "", "| view {labels} | mean ms per call | calls |", "|---|---:|---:|"]
    for key, vals in sorted(calls.items()):
        n = sum(c for _, c in vals)
        mean = sum(ms * c for ms, c in vals) / n
        split.append(f"| `{key}` | {mean:.3f} | {n} |")
    text = "\n".join(lines + ratios + split) + f"\n\nfailed creates: {errors}\n"
    with open(a.out + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
