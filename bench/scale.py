"""Webhook memory at scale: loads `--namespaces` namespaces and `--pods` pods (spread evenly,
each with a scheduling gate so neither the scheduler nor kwok works on them) into the running
e2e cluster with bulwark's registrations deleted (its caps would refuse them), registers bulwark
again, then starts fresh `bulwark webhook` processes with the cluster webhook's own command line
(other ports) and measures the time from exec to HTTP 200 on /readyz and the resident memory
once ready, 10 s and 30 s later. Writes <out>.json."""

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import kube


def load(cluster, namespaces, pods, workers):
    per_ns = [pods // namespaces + (1 if i < pods % namespaces else 0) for i in range(namespaces)]
    lock = threading.Lock()
    next_item = [0]
    done = [0]
    failures = []

    def items_ns():
        while True:
            with lock:
                i = next_item[0]
                next_item[0] += 1
            if i >= namespaces:
                return
            yield i

    def ns_worker():
        c = cluster.client()
        for i in items_ns():
            body = {"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": f"scale-{i:05d}", "labels": {"bench": "scale"}}}
            st = c.request("POST", "/api/v1/namespaces", body)[0]
            if st not in (201, 409):
                failures.append(st)

    def pod_worker():
        c = cluster.client()
        for i in items_ns():
            existing = c.json("GET", f"/api/v1/namespaces/scale-{i:05d}/pods?limit=1000")
            have = {p["metadata"]["name"] for p in existing["items"]}
            for j in range(per_ns[i]):
                name = f"p-{j:03d}"
                if name in have:
                    continue
                body = {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "labels": {"app": f"app-{j % 5}", "bench": "scale"}},
                    "spec": {
                        "schedulingGates": [{"name": "bench.bulwark.io/never"}],
                        "containers": [{
                            "name": "main", "image": "registry.k8s.io/pause:3.10",
                            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                          "limits": {"cpu": "1", "memory": "512Mi"}},
                        }],
                    },
                }
                st = c.request("POST", f"/api/v1/namespaces/scale-{i:05d}/pods", body)[0]
                if st not in (201, 409):
                    failures.append(st)
                with lock:
                    done[0] += 1

    for stage, fn in (("namespaces", ns_worker), ("pods", pod_worker)):
        t0 = time.monotonic()
        next_item[0] = 0
        threads = [threading.Thread(target=fn, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            if stage == "pods":
                print(f"  {done[0]} pods created, {time.monotonic() - t0:.0f}s", flush=True)
        print(f"{stage}: {time.monotonic() - t0:.1f}s, failures {len(failures)}", flush=True)
    return failures


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    rss, _ = kube.proc_sample(pid)
    return round(rss / 2**20, 1) if rss else None


def fresh_webhook(cluster, log_path, binary=None, limit=300):
    base = cluster.pid("bulwark-webhook")
    with open(f"/proc/{base}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0") if a]
    if binary:
        argv[0] = binary
    port = free_port()
    args = [a for a in argv if not a.startswith(("--listen=", "--metrics-listen="))]
    args += [f"--listen=127.0.0.1:{port}", "--metrics-listen=127.0.0.1:0"]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with open(log_path, "w") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            ready = None
            while time.monotonic() - t0 < limit:
                if proc.poll() is not None:
                    raise RuntimeError(f"webhook exited with {proc.returncode}, log {log_path}")
                try:
                    with urllib.request.urlopen(
                        f"https://127.0.0.1:{port}/readyz", context=ctx, timeout=2
                    ) as r:
                        if r.status == 200:
                            ready = time.monotonic() - t0
                            break
                except OSError:
                    pass
                time.sleep(0.05)
            if ready is None:
                raise RuntimeError(f"webhook not ready within {limit}s")
            result = {"ready_s": round(ready, 2), "rss_ready_mib": rss_mib(proc.pid)}
            peak = 0.0
            for _ in range(30):
                time.sleep(1)
                peak = max(peak, rss_mib(proc.pid) or 0)
                if _ == 9:
                    result["rss_10s_mib"] = rss_mib(proc.pid)
            result["rss_30s_mib"] = rss_mib(proc.pid)
            with open(f"/proc/{proc.pid}/status") as f:
                result["vmhwm_mib"] = next(
                    round(int(l.split()[1]) / 1024, 1) for l in f if l.startswith("VmHWM:")
                )
            return result
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--namespaces", type=int, default=10000)
    ap.add_argument("--pods", type=int, default=100000)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--starts", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="after the fresh starts, start another bulwark binary as many times (a build to compare)",
    )
    a = ap.parse_args()
    also = []
    for spec in a.also:
        name, sep, path = spec.partition("=")
        if not sep or not os.access(path, os.X_OK):
            ap.error(f"--also {spec}: expected NAME=PATH to an executable")
        also.append((name, path))
    cluster = kube.Cluster(a.dir)
    api = cluster.client()
    kube.wait_bulwark(api, "default", True)
    saved = kube.save_webhooks(api)
    kube.delete_webhooks(api)
    kube.wait_bulwark(api, "default", False)
    t0 = time.monotonic()
    try:
        failures = load(cluster, a.namespaces, a.pods, a.workers)
    finally:
        kube.create_webhooks(api, saved)
    load_s = time.monotonic() - t0
    kube.wait_bulwark(api, "default", True)
    metrics = api.request("GET", "/metrics")[2].decode()

    def stored(resource):
        for line in metrics.splitlines():
            if line.startswith("apiserver_storage_objects{") and f'resource="{resource}"' in line:
                return int(float(line.rsplit(" ", 1)[1]))
        return None

    def listed(path):
        # remainingItemCount is exact; the storage metric is refreshed only now and then.
        meta = api.json("GET", f"{path}?limit=1")["metadata"]
        if "remainingItemCount" in meta:
            return meta["remainingItemCount"] + 1
        return None

    count = listed("/api/v1/pods") or stored("pods")
    nss = listed("/api/v1/namespaces") or stored("namespaces")
    time.sleep(5)
    existing = cluster.pid("bulwark-webhook")
    summary = {
        "namespaces_in_cluster": nss,
        "pods_in_cluster": count,
        "load_s": round(load_s, 1),
        "load_failures": len(failures),
        "cluster_webhook_rss_mib": rss_mib(existing),
        "apiserver_rss_mib": rss_mib(cluster.pid("kube-apiserver")),
        "fresh_starts": [],
    }
    for i in range(a.starts):
        r = fresh_webhook(cluster, os.path.join(a.dir, "logs", f"scale-webhook-{i}.log"))
        print(f"fresh webhook {i}: {r}", flush=True)
        summary["fresh_starts"].append(r)
    for name, path in also:
        starts = summary.setdefault("compared", {}).setdefault(name, [])
        for i in range(a.starts):
            log = os.path.join(a.dir, "logs", f"scale-webhook-{name}-{i}.log")
            r = fresh_webhook(cluster, log, binary=path)
            print(f"fresh webhook {name} {i}: {r}", flush=True)
            starts.append(r)
    with open(a.out + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
