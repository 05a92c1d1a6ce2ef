"""One arm of the burst scenario against a running e2e cluster (burst.sh runs the arms; what
each number means is in burst.md).

The burst: `--pods` DevOps tasks as `--jobs` Jobs (parallelism = completions,
ttlSecondsAfterFinished), far more than the nodes hold. Next to it, for the whole run:
- a CI bot in namespace `ci` creating bare pods at `--ci-rate`, honouring Retry-After as
  client-go does (sleep the header's seconds, at most 10 retries, then a failure), deleting
  each pod once it has Succeeded;
- another tenant in namespace `tenant` (bulwark's defaults, nothing binding): one small pod
  every `--tenant-period` s, and a Deployment scaled from 0 to `--deployment-replicas` once
  half the burst's pods exist; each pod's create -> Running time, from a watch;
- a probe GETting one pod and LISTing a 20-pod namespace every 150 ms;
- once a second: pods not yet running, kube-scheduler's queue and attempts, RSS and CPU of
  the control plane, nodes tainted by bulwark's node controller.
Before the burst, ~`--idle` s of the idle cluster's RSS (subtracted from the peak).
Afterwards: kube-apiserver's 429s, bulwark's refusal metrics, the burst namespace's
FailedCreate Events, and from kube-apiserver's audit log the 429s to controllers that carried
Retry-After (each one a worker asleep inside client-go's retry) and the seconds they asked for.

Writes <out>.csv (samples), <out>-probe.csv, <out>-tenant.csv (one row per tenant pod),
<out>.json (summary). Exit status 0 when every Job completed, 2 when the run timed out, 130
when interrupted; the files are written in every case."""

import argparse
import csv
import glob
import json
import os
import queue
import re
import signal
import ssl
import sys
import threading
import time
import urllib.request
from datetime import datetime

import kube

NS = "burst"
# hold arm: the scheduling gate bulwark puts on pods it holds.
HOLD_GATE = "bulwark.io/pending-cap"
PROBE_NS = "probe"
CI_NS = "ci"
TENANT_NS = "tenant"
PROBE_PODS = 20
# The peak-RSS target is about what holds the backlog; the CPU target adds the controller
# manager, whose Job workers are what a refusal's form changes.
RSS_COMPONENTS = ["kube-apiserver", "etcd", "kube-scheduler"]
CPU_COMPONENTS = RSS_COMPONENTS + ["kube-controller-manager"]
OTHERS = ["kwok", "bulwark-webhook", "bulwark-node-controller"]
SHORT = {"kube-apiserver": "apiserver", "kube-scheduler": "scheduler", "etcd": "etcd",
         "kube-controller-manager": "kcm", "kwok": "kwok", "bulwark-webhook": "webhook",
         "bulwark-node-controller": "nodectl"}
# bulwark's queueing controllers (webhook/src/review/caller.rs): their 429s with Retry-After
# are the ones that put a controller worker to sleep inside client-go.
CONTROLLERS = {
    "system:kube-controller-manager",
    "system:serviceaccount:kube-system:job-controller",
    "system:serviceaccount:kube-system:replicaset-controller",
    "system:serviceaccount:kube-system:statefulset-controller",
    "system:serviceaccount:kube-system:daemon-set-controller",
    "system:serviceaccount:kube-system:replication-controller",
    "system:serviceaccount:kube-system:cronjob-controller",
}
JOB_LABELS = ("batch.kubernetes.io/job-name", "job-name")
COMPLETES_LABEL = "bench.bulwark.io/completes"  # kwok completes such bare pods (stages.yaml)
RESOURCES = {"requests": {"cpu": "10m", "memory": "16Mi"},
             "limits": {"cpu": "100m", "memory": "64Mi"}}
PAUSE = "registry.k8s.io/pause:3.10"
CLIENT_GO_MAX_RETRIES = 10


def parse_time(ts):
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() if ts else None


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


def job(name, completions, ttl):
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": 1000,
            "ttlSecondsAfterFinished": ttl,
            "template": {
                "metadata": {"labels": {"bench": "burst"}},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 0,
                    # Explicit requests, so bulwark's defaulting does not change the pods.
                    "containers": [{"name": "work", "image": PAUSE, "resources": RESOURCES}],
                },
            },
        },
    }


def bare_pod(name, labels=None):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "work", "image": PAUSE, "resources": RESOURCES}],
        },
    }


def deployment(name):
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "web", "image": PAUSE, "resources": RESOURCES}],
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
            "containers": [{"name": "c", "image": PAUSE}],
        },
    }


def header(headers, name):
    name = name.lower()
    return next((v for k, v in headers.items() if k.lower() == name), None)


def create_like_client_go(client, ns, body, stop):
    """POSTs a pod the way client-go's rest client does: a 429 (or 5xx) that carries
    Retry-After is retried inside the call after sleeping that many seconds, at most 10
    times; anything else fails at once. -> (outcome, retries, seconds slept, detail)."""
    retries, slept = 0, 0.0
    while True:
        try:
            status, headers, payload, _ = client.request(
                "POST", f"/api/v1/namespaces/{ns}/pods", body)
        except Exception as e:  # noqa: BLE001 - a broken connection fails the create
            return "failed", retries, slept, f"error:{type(e).__name__}"
        if status == 201:
            return "created", retries, slept, None
        wait = header(headers, "Retry-After")
        retryable = status == 429 or status >= 500
        if retryable and wait is not None and retries < CLIENT_GO_MAX_RETRIES:
            try:
                seconds = max(0, int(wait))
            except ValueError:
                seconds = 1
            retries += 1
            slept += seconds
            if stop.wait(seconds):
                return "abandoned", retries, slept, None
            continue
        return "failed", retries, slept, f"{status}" + ("" if wait is None else " after retries")


class Watch(threading.Thread):
    """LIST then WATCH of `path`, handing every object to `handle(kind, obj, now)`; lists
    again when the watch breaks. One more watcher on the API server, the same in every arm."""

    def __init__(self, cluster, path, handle, name):
        super().__init__(daemon=True, name=name)
        self.cluster = cluster
        self.path = path
        self.handle = handle
        self.stop = threading.Event()
        self.relists = 0
        self.synced = threading.Event()

    def run(self):
        while not self.stop.is_set():
            client = self.cluster.client(timeout=120)
            try:
                lst = client.json("GET", self.path)
                now = time.time()
                for item in lst["items"]:
                    self.handle("LISTED", item, now)
                self.synced.set()
                self._watch(client, lst["metadata"]["resourceVersion"])
            except Exception as e:  # noqa: BLE001 - watch broke: list again
                print(f"{self.name}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                time.sleep(0.5)
            finally:
                client.close()
            if not self.stop.is_set():
                self.relists += 1

    def _watch(self, client, rv):
        client._connect()
        conn = client.conn
        sep = "&" if "?" in self.path else "?"
        conn.request(
            "GET",
            f"{self.path}{sep}watch=1&resourceVersion={rv}&allowWatchBookmarks=true"
            "&timeoutSeconds=600",
            headers={"Accept": "application/json"},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise kube.ApiError(resp.status, resp.read().decode(errors="replace"))
        buf = b""
        while not self.stop.is_set():
            line = resp.readline()
            if not line:
                return
            buf += line
            if not buf.endswith(b"\n"):
                continue  # a chunk boundary inside the event: read on
            ev = json.loads(buf)
            buf = b""
            kind, obj = ev["type"], ev["object"]
            if kind == "ERROR":
                print(f"{self.name}: {str(obj)[:200]}", file=sys.stderr)
                return
            if kind != "BOOKMARK":
                self.handle(kind, obj, time.time())


class Pods:
    """Every pod of the scenario's namespaces as the watch saw it: phase, when it was created,
    first seen Running, first seen Succeeded; deleted pods are kept (their times matter)."""

    NAMESPACES = (NS, CI_NS, TENANT_NS)

    def __init__(self, reaper):
        self.lock = threading.Lock()
        self.pods = {}  # (ns, name) -> record
        self.reaper = reaper

    def handle(self, kind, obj, now):
        meta = obj["metadata"]
        ns = meta.get("namespace")
        if ns not in self.NAMESPACES:
            return
        key = (ns, meta["name"])
        phase = obj.get("status", {}).get("phase", "Pending")
        reap = False
        with self.lock:
            rec = self.pods.get(key)
            if rec is None:
                labels = meta.get("labels") or {}
                rec = {
                    "phase": phase,
                    "seen": now,
                    "created": parse_time(meta.get("creationTimestamp")),
                    "running": None,
                    "done": None,
                    "gone": False,
                    "job": next((labels[k] for k in JOB_LABELS if k in labels), None),
                    "app": labels.get("app"),
                }
                self.pods[key] = rec
            if kind == "DELETED":
                rec["gone"] = True
                return
            rec["phase"] = phase
            gates = (obj.get("spec") or {}).get("schedulingGates") or []
            rec["held"] = any(g.get("name") == HOLD_GATE for g in gates)
            if phase in ("Running", "Succeeded") and rec["running"] is None:
                rec["running"] = now
                # The tenant's periodic pods are only there to be timed.
                reap = ns == TENANT_NS and rec["app"] is None
            if phase == "Succeeded" and rec["done"] is None:
                rec["done"] = now
                reap = reap or ns == CI_NS
        if reap:
            self.reaper.put(key)

    def counts(self, ns):
        out = {"created": 0, "Pending": 0, "Running": 0, "Succeeded": 0, "Failed": 0,
               "succeeded_ever": 0, "held": 0}
        with self.lock:
            recs = [r for (n, _), r in self.pods.items() if n == ns]
        for r in recs:
            out["created"] += 1
            if r["done"] is not None:
                out["succeeded_ever"] += 1
            if not r["gone"]:
                out[r["phase"]] = out.get(r["phase"], 0) + 1
                out["held"] += 1 if r.get("held") else 0
        return out

    def snapshot(self):
        with self.lock:
            return {k: dict(v) for k, v in self.pods.items()}


class Jobs:
    """Each burst Job's status.succeeded over time, and when it completed (it is deleted
    ttlSecondsAfterFinished later, so completion is recorded when seen)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs = {}

    def handle(self, kind, obj, now):
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            return
        spec, status = obj.get("spec", {}), obj.get("status", {})
        succeeded = status.get("succeeded", 0)
        complete = any(c.get("type") == "Complete" and c.get("status") == "True"
                       for c in status.get("conditions") or [])
        with self.lock:
            rec = self.jobs.setdefault(
                name, {"completions": spec.get("completions", 0), "history": [], "done": None})
            if not rec["history"] or rec["history"][-1][1] != succeeded:
                rec["history"].append((now, succeeded))
            if rec["done"] is None and (complete or succeeded >= rec["completions"] > 0):
                rec["done"] = now

    def totals(self):
        with self.lock:
            recs = list(self.jobs.values())
        succeeded = sum(r["history"][-1][1] if r["history"] else 0 for r in recs)
        return len(recs), sum(1 for r in recs if r["done"] is not None), succeeded

    def snapshot(self):
        with self.lock:
            return {k: {**v, "history": list(v["history"])} for k, v in self.jobs.items()}


class Reaper(threading.Thread):
    """Deletes pods handed to it (CI pods once Succeeded, tenant pods once timed)."""

    def __init__(self, cluster):
        super().__init__(daemon=True, name="reaper")
        self.client = cluster.client(timeout=60)
        self.q = queue.Queue()
        self.stop = threading.Event()
        self.deleted = 0
        self.errors = 0

    def put(self, key):
        self.q.put(key)

    def run(self):
        while not self.stop.is_set():
            try:
                ns, name = self.q.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                status, _, _, _ = self.client.request(
                    "DELETE", f"/api/v1/namespaces/{ns}/pods/{name}?gracePeriodSeconds=0")
                if status in (200, 202, 404):
                    self.deleted += 1
                else:
                    self.errors += 1
            except Exception:  # noqa: BLE001 - counted; the pod stays
                self.errors += 1


class CiBot:
    """A CI system's pod creations: `rate` per second, on `workers` connections, each create
    retried on Retry-After as client-go does. Records every attempt's outcome."""

    def __init__(self, cluster, rate, limit, workers, t0):
        self.cluster = cluster
        self.rate = rate
        self.limit = limit
        self.t0 = t0
        self.stop = threading.Event()
        self.slots = queue.Queue()
        self.lock = threading.Lock()
        self.results = []  # (due_t, started_t, outcome, retries, slept, detail, name)
        self.threads = [threading.Thread(target=self._worker, daemon=True, name=f"ci-{i}")
                        for i in range(workers)]
        self.ticker = threading.Thread(target=self._tick, daemon=True, name="ci-ticker")

    def start(self):
        for t in self.threads:
            t.start()
        self.ticker.start()

    def _tick(self):
        i = 0
        while not self.stop.is_set() and i < self.limit:
            due = self.t0 + i / self.rate
            if self.stop.wait(max(0.0, due - time.time())):
                break
            self.slots.put((i, due))
            i += 1

    def _worker(self):
        client = self.cluster.client(timeout=60)
        while not self.stop.is_set():
            try:
                i, due = self.slots.get(timeout=0.5)
            except queue.Empty:
                continue
            name = f"ci-{i:05d}"
            started = time.time()
            outcome, retries, slept, detail = create_like_client_go(
                client, CI_NS, bare_pod(name, {COMPLETES_LABEL: "true"}), self.stop)
            with self.lock:
                self.results.append((due - self.t0, started - self.t0, outcome, retries,
                                     slept, detail, name))
        client.close()

    def finish(self):
        self.stop.set()
        self.ticker.join(timeout=5)
        for t in self.threads:
            t.join(timeout=65)
        with self.lock:
            return list(self.results), self.slots.qsize()


class Tenant(threading.Thread):
    """The other tenant's steady work: one small pod every `period` s, created the way
    client-go would; the time before the first attempt is its creation time."""

    def __init__(self, cluster, period):
        super().__init__(daemon=True, name="tenant")
        self.client = cluster.client(timeout=60)
        self.period = period
        self.stop = threading.Event()
        self.created = {}  # name -> wall time before the first attempt
        self.outcomes = {}

    def run(self):
        i = 0
        next_at = time.time()
        while not self.stop.is_set():
            name = f"tick-{i:04d}"
            self.created[name] = time.time()
            outcome, retries, slept, detail = create_like_client_go(
                self.client, TENANT_NS, bare_pod(name), self.stop)
            self.outcomes[name] = (outcome, retries, slept, detail)
            i += 1
            next_at += self.period
            self.stop.wait(max(0.0, next_at - time.time()))


class Probe(threading.Thread):
    def __init__(self, cluster, t0, interval=0.15):
        super().__init__(daemon=True, name="probe")
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
            start = time.time()
            for op, path in ops:
                try:
                    status, _, _, seconds = self.client.request("GET", path)
                except Exception as e:  # noqa: BLE001 - record and go on
                    status, seconds = f"error:{type(e).__name__}", time.time() - start
                self.rows.append((round(start - self.t0, 3), op, status, round(seconds * 1000, 3)))
            self.stop.wait(max(0.0, self.interval - (time.time() - start)))


def quantiles(values):
    vals = [v for v in values if v is not None]
    return {
        "n": len(vals),
        "p50_s": kube.percentile(vals, 50),
        "p90_s": kube.percentile(vals, 90),
        "p99_s": kube.percentile(vals, 99),
        "max_s": max(vals) if vals else None,
    }


def r3(v):
    return None if v is None else round(v, 3)


def tenant_latencies(pods, tenant, scaled_at, end, t0):
    """(rows, summary): each tenant pod's create -> Running. A pod not Running by the end
    counts with the time it had waited so far (a lower bound), and is counted as such."""
    rows = []
    for (ns, name), r in pods.items():
        if ns != TENANT_NS:
            continue
        if r["app"] is None:
            kind, created = "periodic", tenant.created.get(name, r["seen"])
        else:
            # creationTimestamp has whole seconds; the scale request bounds it from below.
            kind = "deployment"
            created = max(r["created"] or r["seen"], scaled_at or 0)
        running = r["running"]
        latency = (running if running is not None else end) - created
        rows.append({"kind": kind, "name": name, "created_t": r3(created - t0),
                     "running_t": r3(running - t0) if running is not None else "",
                     "latency_s": r3(max(0.0, latency)), "running": running is not None})
    rows.sort(key=lambda x: (x["kind"], x["created_t"]))
    summary = {}
    for kind in ("periodic", "deployment"):
        mine = [x for x in rows if x["kind"] == kind]
        summary[kind] = {**quantiles([x["latency_s"] for x in mine]),
                         "not_running": sum(1 for x in mine if not x["running"])}
    failed = [n for n, o in tenant.outcomes.items() if o[0] == "failed"]
    summary["periodic"]["create_failed"] = len(failed)
    summary["periodic"]["create_retries"] = sum(o[1] for o in tenant.outcomes.values())
    return rows, summary


def status_lag(pods, jobs, end):
    """For each Job, the time its k-th pod was seen Succeeded against the time its
    status.succeeded reached k: how far the Job controller's bookkeeping trailed its pods.
    A count never reached by the end lags by at least end - seen."""
    done_by_job = {}
    for (ns, _), r in pods.items():
        if ns == NS and r["job"] and r["done"] is not None:
            done_by_job.setdefault(r["job"], []).append(r["done"])
    worst = {"max_s": None, "job": None, "k": None}
    lags = []
    for name, times in done_by_job.items():
        times.sort()
        history = jobs.get(name, {}).get("history", [])
        h = 0
        for k, seen in enumerate(times, 1):
            while h < len(history) and history[h][1] < k:
                h += 1
            reached = history[h][0] if h < len(history) else end
            lag = max(0.0, reached - seen)
            lags.append(lag)
            if worst["max_s"] is None or lag > worst["max_s"]:
                worst = {"max_s": round(lag, 2), "job": name, "k": k}
    worst["p99_s"] = r3(kube.percentile(lags, 99))
    worst["p50_s"] = r3(kube.percentile(lags, 50))
    return worst


def audit_refusals(directory):
    """429s to pod creations in kube-apiserver's audit log(s): by who was refused and
    whether the refusal carried retryAfterSeconds (what becomes the Retry-After header)."""
    files = sorted(glob.glob(os.path.join(directory, "logs", "audit*.log")))
    out = {
        "files": len(files),
        "pod_creates": 0,
        "pod_429s": 0,
        "controller_429s": 0,
        "controller_429s_with_retry_after": 0,
        "controller_retry_after_seconds": 0,
        "other_429s": 0,
        "other_429s_with_retry_after": 0,
        "by_user": {},
    }
    for path in files:
        with open(path, errors="replace") as f:
            for line in f:
                if '"create"' not in line or '"pods"' not in line:
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                ref = ev.get("objectRef") or {}
                if ev.get("verb") != "create" or ref.get("resource") != "pods" \
                        or ref.get("subresource"):
                    continue
                out["pod_creates"] += 1
                status = ev.get("responseStatus") or {}
                if status.get("code") != 429:
                    continue
                out["pod_429s"] += 1
                # An impersonated request is decided (and refused) as the impersonated user.
                who = ev.get("impersonatedUser") or ev.get("user") or {}
                user = who.get("username", "?")
                retry = (status.get("details") or {}).get("retryAfterSeconds")
                u = out["by_user"].setdefault(user, {"429s": 0, "with_retry_after": 0,
                                                     "retry_after_seconds": 0})
                u["429s"] += 1
                if retry:
                    u["with_retry_after"] += 1
                    u["retry_after_seconds"] += retry
                if user in CONTROLLERS:
                    out["controller_429s"] += 1
                    if retry:
                        out["controller_429s_with_retry_after"] += 1
                        out["controller_retry_after_seconds"] += retry
                else:
                    out["other_429s"] += 1
                    if retry:
                        out["other_429s_with_retry_after"] += 1
    return out


def webhook_refusals(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {"reachable": False}
    by_reason = {}
    for line in text.splitlines():
        if line.startswith("bulwark_refusals_total{"):
            labels, value = line.rsplit(" ", 1)
            by_reason[labels[len("bulwark_refusals_total"):]] = float(value)
    count = metric_sum(text, "bulwark_retry_after_seconds_count")
    total = metric_sum(text, "bulwark_retry_after_seconds_sum")
    return {
        "reachable": True,
        "refusals": by_reason,
        "forms": {form: metric_sum(text, "bulwark_refusal_forms_total", (f'form="{form}"',))
                  for form in ("retry_after", "immediate")},
        "retry_after_seconds": {"count": count, "sum": total,
                                "mean": round(total / count, 2) if count else None},
    }


def failed_create_events(api):
    path = f"/api/v1/namespaces/{NS}/events?fieldSelector=reason%3DFailedCreate"
    try:
        items = api.json("GET", path)["items"]
    except Exception as e:  # noqa: BLE001 - reported as unknown
        print(f"events: {e}", file=sys.stderr)
        return None
    return {"events": len(items), "count_sum": sum(e.get("count") or 1 for e in items)}


def proc_row(pids, base_cpu):
    row = {}
    for c, p in pids.items():
        rss, cpu = kube.proc_sample(p)
        row[f"{SHORT[c]}_rss_mib"] = round(rss / 2**20, 1) if rss else ""
        row[f"{SHORT[c]}_cpu_s"] = round(cpu - base_cpu[c], 2) if cpu is not None else ""
    return row


class Interrupted(Exception):
    pass


def on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--arm", choices=["with", "without", "with-retry-after", "hold"],
                    required=True)
    ap.add_argument("--label", default="", help="pair or cap run, for the report")
    ap.add_argument("--pods", type=int, default=20000)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--cap", type=int, default=200, help="bulwark.io/max-pending-pods")
    ap.add_argument("--ttl", type=int, default=30, help="Jobs' ttlSecondsAfterFinished")
    ap.add_argument("--ci-rate", type=float, default=10.0)
    ap.add_argument("--ci-pods", type=int, default=0, help="at most; 0: pods / 5")
    ap.add_argument("--ci-workers", type=int, default=16)
    ap.add_argument("--ci-cap", type=int, default=30, help="ci's max-pending-pods")
    ap.add_argument("--tenant-period", type=float, default=2.5)
    ap.add_argument("--deployment-replicas", type=int, default=50)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle baseline")
    ap.add_argument("--timeout", type=float, default=0, help="0: 300 + 0.06 s per pod")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    timeout = a.timeout or 300 + 0.06 * a.pods
    ci_limit = a.ci_pods or max(1, a.pods // 5)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    cluster = kube.Cluster(a.dir)
    api = cluster.client()
    sched_url = f"https://127.0.0.1:{cluster.ports['scheduler']}/metrics"
    webhook_metrics = f"http://127.0.0.1:{cluster.ports['webhook_metrics']}/metrics"

    # Same namespaces in every arm; the annotations only matter while bulwark is called.
    # Only the pending cap limits the burst: no rate limit, no live-pod limit.
    burst_ns = {
        "bulwark.io/pod-rate": "unlimited",
        "bulwark.io/max-pods": "unlimited",
        "bulwark.io/max-pending-pods": str(a.cap),
    }
    if a.arm == "hold":
        # Over the cap, pods wait behind bulwark's scheduling gate instead of being refused.
        burst_ns["bulwark.io/pending-action"] = "hold"
    kube.ensure_namespace(api, NS, burst_ns)
    kube.ensure_namespace(api, PROBE_NS, {"bulwark.io/pod-rate": "unlimited"})
    kube.ensure_namespace(api, CI_NS, {"bulwark.io/max-pending-pods": str(a.ci_cap)})
    kube.ensure_namespace(api, TENANT_NS)
    if a.arm == "without":
        kube.delete_webhooks(api)
        kube.wait_bulwark(api, NS, False)
    else:
        kube.wait_bulwark(api, NS, True)
    for ns in (CI_NS, TENANT_NS):
        # Pods wait for their namespace's default ServiceAccount.
        deadline = time.time() + 60
        while api.request("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default")[0] != 200:
            if time.time() > deadline:
                raise RuntimeError(f"no default ServiceAccount in {ns}")
            time.sleep(0.2)
    for i in range(PROBE_PODS):
        api.json("POST", f"/api/v1/namespaces/{PROBE_NS}/pods", probe_pod(i), ok=(201, 409))
    api.json("POST", f"/apis/apps/v1/namespaces/{TENANT_NS}/deployments", deployment("web"),
             ok=(201, 409))

    reaper = Reaper(cluster)
    reaper.start()
    pods = Pods(reaper)
    jobs = Jobs()
    pod_watch = Watch(cluster, "/api/v1/pods", pods.handle, "pod watch")
    job_watch = Watch(cluster, f"/apis/batch/v1/namespaces/{NS}/jobs", jobs.handle, "job watch")
    pod_watch.start()
    job_watch.start()
    pod_watch.synced.wait(30)
    job_watch.synced.wait(30)

    pids = {c: cluster.pid(c) for c in CPU_COMPONENTS + OTHERS}
    # The idle cluster: what every arm holds before any of the scenario's work.
    idle = []
    idle_end = time.time() + a.idle
    while time.time() < idle_end:
        idle.append({c: (kube.proc_sample(p)[0] or 0) / 2**20 for c, p in pids.items()})
        time.sleep(1.0)
    idle_rss = {c: round(sum(s[c] for s in idle) / len(idle), 1) for c in pids}
    base_cpu = {c: kube.proc_sample(p)[1] for c, p in pids.items()}
    _, base_attempts = scheduler_metrics(sched_url)

    per_job = [a.pods // a.jobs + (1 if i < a.pods % a.jobs else 0) for i in range(a.jobs)]
    t0 = time.time()
    probe = Probe(cluster, t0)
    probe.start()
    tenant = Tenant(cluster, a.tenant_period)
    tenant.start()
    ci = CiBot(cluster, a.ci_rate, ci_limit, a.ci_workers, t0)
    ci.start()
    rows = []
    makespan = None
    scaled_at = None
    interrupted = None
    submitted = None
    try:
        for i, n in enumerate(per_job):
            api.json("POST", f"/apis/batch/v1/namespaces/{NS}/jobs", job(f"burst-{i:03d}", n, a.ttl))
        submitted = time.time() - t0
        next_tick = t0
        while True:
            now = time.time()
            t = now - t0
            burst = pods.counts(NS)
            if scaled_at is None and burst["created"] >= a.pods / 2:
                api.json("PATCH", f"/apis/apps/v1/namespaces/{TENANT_NS}/deployments/web/scale",
                         {"spec": {"replicas": a.deployment_replicas}},
                         content_type="application/merge-patch+json")
                scaled_at = time.time()
            seen_jobs, jobs_done, status_succeeded = jobs.totals()
            try:
                unscheduled, attempts = scheduler_metrics(sched_url)
            except OSError:
                unscheduled, attempts = float("nan"), {}
            nodes = api.json("GET", "/api/v1/nodes")["items"]
            tainted = sum(
                1 for n in nodes
                if any(x.get("key") == "bulwark.io/unhealthy" for x in n["spec"].get("taints") or [])
            )
            cic, ten = pods.counts(CI_NS), pods.counts(TENANT_NS)
            row = {
                "t": round(t, 2),
                "created": burst["created"],
                "not_running": burst["Pending"],
                # Hold arm: pods behind bulwark's gate (part of not_running, never attempted).
                "held": burst["held"],
                "running": burst["Running"],
                "succeeded_pods": burst["succeeded_ever"],
                "succeeded": status_succeeded,
                # Pods seen Succeeded that no Job status counts yet: the controller's lag.
                "uncounted": burst["succeeded_ever"] - status_succeeded,
                "jobs_done": jobs_done,
                "unscheduled": unscheduled,
                "tainted_nodes": tainted,
                "ci_not_running": cic["Pending"],
                "ci_created": cic["created"],
                "tenant_not_running": ten["Pending"],
                "attempts_scheduled": attempts.get("scheduled", 0) - base_attempts.get("scheduled", 0),
                "attempts_unschedulable": attempts.get("unschedulable", 0)
                - base_attempts.get("unschedulable", 0),
                "attempts_error": attempts.get("error", 0) - base_attempts.get("error", 0),
            }
            row.update(proc_row(pids, base_cpu))
            rows.append(row)
            if jobs_done >= a.jobs:
                makespan = max(r["done"] for r in jobs.snapshot().values()) - t0
                break
            if t > timeout:
                break
            next_tick += 1.0
            time.sleep(max(0.0, next_tick - time.time()))
        # The tenant's pods created near the end get a moment to run, not a lower bound.
        if makespan is not None:
            grace_end = time.time() + 30
            while time.time() < grace_end and pods.counts(TENANT_NS)["Pending"] > 0:
                time.sleep(0.5)
    except Interrupted as e:
        interrupted = str(e)
        print(f"interrupted ({interrupted}): writing what was measured", file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end = time.time()
    tenant.stop.set()
    probe.stop.set()
    ci_results, ci_unstarted = ci.finish()
    tenant.join(timeout=65)
    probe.join(timeout=65)
    final = proc_row(pids, base_cpu)
    pod_watch.stop.set()
    job_watch.stop.set()
    reaper.stop.set()

    pod_snap, job_snap = pods.snapshot(), jobs.snapshot()
    tenant_rows, tenant_summary = tenant_latencies(pod_snap, tenant, scaled_at, end, t0)
    if scaled_at is not None:
        tenant_summary["deployment"]["scaled_at_s"] = round(scaled_at - t0, 1)

    if rows:
        with open(a.out + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
    with open(a.out + "-probe.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "op", "status", "ms"])
        w.writerows(probe.rows)
    with open(a.out + "-tenant.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["kind", "name", "created_t", "running_t",
                                          "latency_s", "running"])
        w.writeheader()
        w.writerows(tenant_rows)

    try:
        apiserver_metrics = api.request("GET", "/metrics")[2].decode()
        refused_429 = metric_sum(
            apiserver_metrics, "apiserver_request_total", ('code="429"', 'resource="pods"'))
    except Exception as e:  # noqa: BLE001 - reported as unknown
        print(f"apiserver metrics: {e}", file=sys.stderr)
        refused_429 = None

    def peak(key):
        vals = [r[key] for r in rows if r.get(key) not in ("", None)]
        return max(vals) if vals else None

    rss_sum = [sum(r[f"{SHORT[c]}_rss_mib"] or 0 for c in RSS_COMPONENTS) for r in rows]
    idle_sum = round(sum(idle_rss[c] for c in RSS_COMPONENTS), 1)
    cpu = {c: final[f"{SHORT[c]}_cpu_s"] or (rows[-1][f"{SHORT[c]}_cpu_s"] if rows else None)
           for c in CPU_COMPONENTS + OTHERS}
    ok = [ms for (_, _, status, ms) in probe.rows if status == 200]
    ci_created = [x for x in ci_results if x[2] == "created"]
    ci_done = [pod_snap[(CI_NS, x[6])] for x in ci_created if (CI_NS, x[6]) in pod_snap]
    ci_to_done = [r["done"] - r["created"] for r in ci_done if r["done"] and r["created"]]
    seen_jobs, jobs_done, status_succeeded = jobs.totals()
    summary = {
        "arm": a.arm,
        "label": a.label,
        "pods": a.pods,
        "jobs": a.jobs,
        "cap": a.cap if a.arm != "without" else None,
        "nodes": cluster.state.get("nodes"),
        "pods_per_node": cluster.state.get("pods_per_node"),
        "node_timers": cluster.state.get("node_timers", "e2e"),
        "queueing_controllers": cluster.state.get("queueing_controllers"),
        "max_retry_after": cluster.state.get("max_retry_after"),
        "job_syncs": cluster.state.get("job_syncs"),
        "timeout_s": timeout,
        "submitted_s": r3(submitted),
        # Until the watch saw every Job complete (each Job's completion is recorded when seen,
        # before its TTL deletes it).
        "makespan_s": round(makespan, 1) if makespan is not None else None,
        "finished": makespan is not None,
        "timed_out": makespan is None and interrupted is None,
        "interrupted": interrupted,
        "ran_s": round(end - t0, 1),
        "jobs_done": jobs_done,
        "completed": sum(min(r["history"][-1][1], r["completions"]) if r["history"] else 0
                         for r in job_snap.values()),
        "pods_seen_succeeded": pods.counts(NS)["succeeded_ever"],
        "watch_relists": {"pods": pod_watch.relists, "jobs": job_watch.relists},
        "peak_not_running": peak("not_running"),
        "peak_held": peak("held"),
        # What the scheduler could see: pods not yet running and not behind bulwark's gate.
        "peak_ungated_not_running": max((r["not_running"] - r["held"] for r in rows), default=None),
        "peak_unscheduled": peak("unscheduled"),
        "peak_uncounted": peak("uncounted"),
        "idle_rss_mib": idle_rss,
        "idle_rss_sum_mib": idle_sum,
        "peak_rss_mib": {c: peak(f"{SHORT[c]}_rss_mib") for c in CPU_COMPONENTS + OTHERS},
        "peak_rss_sum_mib": round(max(rss_sum), 1) if rss_sum else None,
        "peak_rss_above_idle_mib": round(max(rss_sum) - idle_sum, 1) if rss_sum else None,
        "cpu_s": cpu,
        "cpu_sum_s": round(sum(cpu[c] or 0 for c in CPU_COMPONENTS), 2),
        "peak_tainted_nodes": peak("tainted_nodes"),
        "attempts": {k: rows[-1][f"attempts_{k}"] if rows else None
                     for k in ("scheduled", "unschedulable", "error")},
        "probe": {
            "n": len(probe.rows),
            "errors": sum(1 for (_, _, status, _) in probe.rows if status != 200),
            "p50_ms": kube.percentile(ok, 50),
            "p99_ms": kube.percentile(ok, 99),
            "max_ms": max(ok) if ok else None,
            **{
                f"{op}_{q}_ms": kube.percentile(
                    [ms for (_, o, s, ms) in probe.rows if o == op and s == 200], q)
                for op in ("get", "list")
                for q in (50, 99)
            },
        },
        "tenant": tenant_summary,
        "ci": {
            "slots": len(ci_results) + ci_unstarted,
            "created": len(ci_created),
            "failed": sum(1 for x in ci_results if x[2] == "failed"),
            "abandoned": sum(1 for x in ci_results if x[2] == "abandoned"),
            "not_started": ci_unstarted,
            "retries": sum(x[3] for x in ci_results),
            "slept_s": round(sum(x[4] for x in ci_results), 1),
            "failures": sorted({x[5] for x in ci_results if x[2] == "failed"}),
            "create_to_succeeded": quantiles(ci_to_done),
            "pods_deleted": reaper.deleted,
        },
        "status_lag": status_lag(pod_snap, job_snap, end),
        "failed_create_events": failed_create_events(api),
        "apiserver_pod_429s": refused_429,
        "bulwark": webhook_refusals(webhook_metrics),
        "audit": audit_refusals(a.dir),
    }
    # The sleeping retries: controller workers that a refusal sent to sleep inside client-go.
    summary["sleeping_retries"] = summary["audit"]["controller_429s_with_retry_after"]
    with open(a.out + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    if interrupted:
        return 130
    return 0 if makespan is not None else 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Interrupted as e:
        # Before the burst started: nothing measured, nothing to write.
        print(f"interrupted ({e}) before the burst started", file=sys.stderr)
        sys.exit(130)
