"""One run of the burst scenario against a running e2e cluster (see burst.sh).

Submits `--jobs` Jobs sharing `--pods` completions (parallelism = completions per Job), then
samples once a second until every pod has completed or `--timeout` passes: pods not yet
running, scheduler queue and attempts, RSS and CPU of kube-apiserver, etcd, kube-scheduler;
a probe thread GETs one pod and LISTs a small namespace's pods every 150 ms.
Writes <out>.csv (samples), <out>-probe.csv (probe latencies), <out>.json (summary)."""

import argparse
import csv
import json
import re
import ssl
import sys
import threading
import time
import urllib.request

import kube

NS = "burst"
PROBE_NS = "probe"
PROBE_PODS = 20
COMPONENTS = ["kube-apiserver", "etcd", "kube-scheduler"]
# Also sampled (CPU and RSS), not part of the RSS target.
OTHERS = ["kube-controller-manager", "kwok", "bulwark-webhook", "bulwark-node-controller"]
SHORT = {"kube-controller-manager": "kcm", "bulwark-webhook": "webhook",
         "bulwark-node-controller": "nodectl"}


def scheduler_metrics(url):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
        text = r.read().decode()
    pending = 0.0
    attempts = {}
    for line in text.splitlines():
        # Gated pods (the probe's) are never attempted: not part of the backlog.
        if line.startswith("scheduler_pending_pods{") and 'queue="gated"' not in line:
            pending += float(line.rsplit(" ", 1)[1])
        elif line.startswith("scheduler_schedule_attempts_total{"):
            m = re.search(r'result="([^"]+)"', line)
            key = m.group(1) if m else "?"
            attempts[key] = attempts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return pending, attempts


def metric_sum(text, name, must=()):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(m in line for m in must):
                total += float(line.rsplit(" ", 1)[1])
    return total


def job(name, completions, gated=False):
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": 1000,
            "template": {
                "metadata": {"labels": {"bench": "burst"}},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 0,
                    "containers": [
                        {
                            "name": "work",
                            "image": "registry.k8s.io/pause:3.10",
                            "resources": {
                                "requests": {"cpu": "10m", "memory": "16Mi"},
                                "limits": {"cpu": "100m", "memory": "64Mi"},
                            },
                        }
                    ],
                },
            },
        },
    }


def probe_pod(i):
    # Gated: never scheduled, never run; only there to be read.
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"probe-{i}"},
        "spec": {
            "schedulingGates": [{"name": "bench.bulwark.io/never"}],
            "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}],
        },
    }


class PodWatch(threading.Thread):
    """Phase of every pod of the burst namespace, from a LIST and then a WATCH (one more
    watcher on the API server, the same in both runs)."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.phases = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.relists = 0

    def counts(self):
        with self.lock:
            phases = list(self.phases.values())
        out = {"created": len(phases), "Pending": 0, "Running": 0, "Succeeded": 0, "Failed": 0}
        for ph in phases:
            out[ph] = out.get(ph, 0) + 1
        return out

    def run(self):
        while not self.stop.is_set():
            client = self.cluster.client(timeout=120)
            try:
                lst = client.json("GET", f"/api/v1/namespaces/{NS}/pods")
                with self.lock:
                    self.phases = {
                        p["metadata"]["name"]: p.get("status", {}).get("phase", "Pending")
                        for p in lst["items"]
                    }
                rv = lst["metadata"]["resourceVersion"]
                self._watch(client, rv)
            except Exception as e:  # noqa: BLE001 - watch broke: list again
                print(f"pod watch: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                time.sleep(0.5)
            finally:
                client.close()
            if not self.stop.is_set():
                self.relists += 1

    def _watch(self, client, rv):
        client._connect()
        conn = client.conn
        conn.request(
            "GET",
            f"/api/v1/namespaces/{NS}/pods?watch=1&resourceVersion={rv}"
            "&allowWatchBookmarks=true&timeoutSeconds=600",
            headers={"Accept": "application/json"},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise kube.ApiError(resp.status, resp.read().decode(errors="replace"))
        buf = b""
        while not self.stop.is_set():
            line = resp.readline()
            if not line:
                print("pod watch: closed by the server", file=sys.stderr)
                return
            buf += line
            if not buf.endswith(b"\n"):
                continue  # a chunk boundary inside the event: read on
            ev = json.loads(buf)
            buf = b""
            kind, obj = ev["type"], ev["object"]
            if kind == "ERROR":
                print(f"pod watch: {str(obj)[:200]}", file=sys.stderr)
                return
            if kind == "BOOKMARK":
                continue
            name = obj["metadata"]["name"]
            with self.lock:
                if kind == "DELETED":
                    self.phases.pop(name, None)
                else:
                    self.phases[name] = obj.get("status", {}).get("phase", "Pending")


class Probe(threading.Thread):
    def __init__(self, cluster, t0, interval=0.15):
        super().__init__(daemon=True)
        self.client = cluster.client(timeout=60)
        self.t0 = t0
        self.interval = interval
        self.rows = []
        self.stop = threading.Event()

    def run(self):
        ops = [
            ("get", f"/api/v1/namespaces/{PROBE_NS}/pods/probe-0"),
            ("list", f"/api/v1/namespaces/{PROBE_NS}/pods"),
        ]
        while not self.stop.is_set():
            start = time.monotonic()
            for op, path in ops:
                try:
                    status, _, _, seconds = self.client.request("GET", path)
                except Exception as e:  # noqa: BLE001 - record and go on
                    status, seconds = f"error:{type(e).__name__}", time.monotonic() - start
                self.rows.append((round(start - self.t0, 3), op, status, round(seconds * 1000, 3)))
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - start)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--mode", choices=["with", "without"], required=True)
    ap.add_argument("--pods", type=int, default=10000)
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--cap", type=int, default=1000, help="bulwark.io/max-pending-pods")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    cluster = kube.Cluster(a.dir)
    api = cluster.client()
    sched_url = f"https://127.0.0.1:{cluster.ports['scheduler']}/metrics"
    webhook_metrics = f"http://127.0.0.1:{cluster.ports['webhook_metrics']}/metrics"

    # Same namespaces in both runs; the annotations only matter while bulwark is called.
    # Only the pending cap limits the burst: no rate limit, no live-pod limit.
    annotations = {
        "bulwark.io/pod-rate": "unlimited",
        "bulwark.io/max-pods": "unlimited",
        "bulwark.io/max-pending-pods": str(a.cap),
    }
    kube.ensure_namespace(api, NS, annotations)
    kube.ensure_namespace(api, PROBE_NS, {"bulwark.io/pod-rate": "unlimited"})
    if a.mode == "without":
        kube.delete_webhooks(api)
        kube.wait_bulwark(api, NS, False)
    else:
        kube.wait_bulwark(api, NS, True)
    for i in range(PROBE_PODS):
        api.json("POST", f"/api/v1/namespaces/{PROBE_NS}/pods", probe_pod(i), ok=(201, 409))
    pids = {c: cluster.pid(c) for c in COMPONENTS + OTHERS}
    base_cpu = {c: kube.proc_sample(p)[1] for c, p in pids.items()}
    _, base_attempts = scheduler_metrics(sched_url)
    time.sleep(2)

    per_job = [a.pods // a.jobs + (1 if i < a.pods % a.jobs else 0) for i in range(a.jobs)]
    watch = PodWatch(cluster)
    watch.start()
    time.sleep(1)
    t0 = time.monotonic()
    probe = Probe(cluster, t0)
    probe.start()
    for i, n in enumerate(per_job):
        api.json("POST", f"/apis/batch/v1/namespaces/{NS}/jobs", job(f"burst-{i:03d}", n))
    submitted = time.monotonic() - t0

    rows = []
    makespan = None  # every Job reports all its completions
    pods_done = None  # every pod Succeeded (from the watch)
    next_tick = t0
    while True:
        now = time.monotonic()
        t = now - t0
        jobs = api.json("GET", f"/apis/batch/v1/namespaces/{NS}/jobs")["items"]
        st = [j.get("status", {}) for j in jobs]
        succeeded = sum(s.get("succeeded", 0) for s in st)
        active = sum(s.get("active", 0) for s in st)
        ready = sum(s.get("ready", 0) for s in st)
        failed = sum(s.get("failed", 0) for s in st)
        try:
            unscheduled, attempts = scheduler_metrics(sched_url)
        except OSError:
            unscheduled, attempts = float("nan"), {}
        pods = watch.counts()
        nodes = api.json("GET", "/api/v1/nodes")["items"]
        tainted = sum(
            1
            for n in nodes
            if any(x.get("key") == "bulwark.io/unhealthy" for x in n["spec"].get("taints") or [])
        )
        row = {
            "t": round(t, 2),
            "created": pods["created"],
            "not_running": pods["Pending"],
            "running": pods["Running"],
            "succeeded_pods": pods["Succeeded"],
            "succeeded": succeeded,
            "job_active": active,
            "job_ready": ready,
            "tainted_nodes": tainted,
            "unscheduled": unscheduled,
            "failed": failed,
            "attempts_scheduled": attempts.get("scheduled", 0) - base_attempts.get("scheduled", 0),
            "attempts_unschedulable": attempts.get("unschedulable", 0)
            - base_attempts.get("unschedulable", 0),
            "attempts_error": attempts.get("error", 0) - base_attempts.get("error", 0),
        }
        for c, p in pids.items():
            rss, cpu = kube.proc_sample(p)
            key = SHORT.get(c, c.replace("kube-", ""))
            row[f"{key}_rss_mib"] = round(rss / 2**20, 1) if rss else ""
            row[f"{key}_cpu_s"] = round(cpu - base_cpu[c], 2) if cpu is not None else ""
        rows.append(row)
        if pods_done is None and pods["Succeeded"] >= a.pods:
            pods_done = t
        if succeeded >= a.pods:
            makespan = t
            break
        if t > a.timeout:
            break
        next_tick += 1.0
        time.sleep(max(0.0, next_tick - time.monotonic()))
    probe.stop.set()
    watch.stop.set()
    probe.join(timeout=70)

    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    with open(a.out + "-probe.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "op", "status", "ms"])
        w.writerows(probe.rows)

    apiserver_metrics = api.request("GET", "/metrics")[2].decode()
    refused_429 = metric_sum(
        apiserver_metrics, "apiserver_request_total", ('code="429"', 'resource="pods"')
    )
    try:
        with urllib.request.urlopen(webhook_metrics, timeout=5) as r:
            wm = r.read().decode()
        bulwark_refusals = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in wm.splitlines()
            if line.startswith("bulwark_refusals_total{")
        }
    except OSError:
        bulwark_refusals = {}

    def peak(key):
        vals = [r[key] for r in rows if r[key] != ""]
        return max(vals) if vals else None

    total_rss = [
        sum(r[f"{c.replace('kube-', '')}_rss_mib"] or 0 for c in COMPONENTS) for r in rows
    ]
    ok = [ms for (_, _, status, ms) in probe.rows if status == 200]
    errors = sum(1 for (_, _, status, _) in probe.rows if status != 200)
    summary = {
        "mode": a.mode,
        "pods": a.pods,
        "jobs": a.jobs,
        "cap": a.cap if a.mode == "with" else None,
        # kube-controller-manager's Job workers (None: its default, 5).
        "job_syncs": cluster.state.get("job_syncs"),
        "submitted_s": round(submitted, 2),
        # Until every Job reports all its completions (status.succeeded, sampled each second).
        "makespan_s": round(makespan, 1) if makespan is not None else None,
        # Until the watch saw every pod Succeeded (None if a completed pod was deleted).
        "pods_succeeded_s": round(pods_done, 1) if pods_done is not None else None,
        "completed": rows[-1]["succeeded"],
        "timed_out": makespan is None,
        "pod_watch_relists": watch.relists,
        "peak_not_running": peak("not_running"),
        "peak_unscheduled": peak("unscheduled"),
        "peak_rss_mib": {c: peak(f"{c.replace('kube-', '')}_rss_mib") for c in COMPONENTS},
        "peak_rss_sum_mib": round(max(total_rss), 1),
        "cpu_s": {c: rows[-1][f"{SHORT.get(c, c.replace('kube-', ''))}_cpu_s"] for c in COMPONENTS + OTHERS},
        "peak_tainted_nodes": peak("tainted_nodes"),
        "attempts": {
            k: rows[-1][f"attempts_{k}"] for k in ("scheduled", "unschedulable", "error")
        },
        "probe": {
            "n": len(probe.rows),
            "errors": errors,
            "p50_ms": kube.percentile(ok, 50),
            "p99_ms": kube.percentile(ok, 99),
            "max_ms": max(ok) if ok else None,
            **{
                f"{op}_{q}_ms": kube.percentile(
                    [ms for (_, o, s, ms) in probe.rows if o == op and s == 200], q
                )
                for op in ("get", "list")
                for q in (50, 99)
            },
        },
        "apiserver_pod_429s": refused_429,
        "bulwark_refusal_metrics": bulwark_refusals,
    }
    with open(a.out + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0 if makespan is not None else 2


if __name__ == "__main__":
    sys.exit(main())
