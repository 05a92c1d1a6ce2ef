"""The burst benchmark's report (burst.sh runs it): every arm's figures, the targets as
ratios against the `without` arm of the same pair with their spread across pairs, the same
for the `with-retry-after` arm, the cap curve, and the plot.
Usage: burst_report.py RESULTS_DIR -> RESULTS_DIR/burst-summary.md, burst-report.json,
burst.png"""

import csv
import json
import os
import subprocess
import sys

ARMS = ["without", "with", "with-retry-after"]


def load_runs(results):
    """Every run burst.sh recorded (burst-runs.tsv), with its summary if it wrote one; runs
    found only as files (an older listing) are added too."""
    runs = []
    listed = set()
    path = os.path.join(results, "burst-runs.tsv")
    if os.path.exists(path):
        with open(path) as f:
            for row in csv.DictReader(f, delimiter="\t"):
                runs.append({"label": row["label"], "arm": row["arm"], "cap": row["cap"],
                             "status": row["status"], "started": row.get("started") or ""})
                listed.add((row["label"], row["arm"]))
    for name in sorted(os.listdir(results)):
        if name.startswith("burst-") and name.endswith(".json") and name != "burst-report.json":
            with open(os.path.join(results, name)) as f:
                s = json.load(f)
            key = (s.get("label", ""), s["arm"])
            if key not in listed:
                status = "finished" if s.get("finished") else (
                    "interrupted" if s.get("interrupted") else "timed-out")
                runs.append({"label": key[0], "arm": key[1], "cap": s.get("cap"),
                             "status": status, "started": ""})
                listed.add(key)
    for r in runs:
        stem = os.path.join(results, f"burst-{r['arm']}-{r['label']}")
        r["stem"] = stem
        r["summary"] = None
        if os.path.exists(stem + ".json"):
            with open(stem + ".json") as f:
                r["summary"] = json.load(f)
    return runs


def get(s, *path):
    for p in path:
        if s is None:
            return None
        s = s.get(p) if isinstance(s, dict) else None
    return s


def tenant_p99(s):
    return get(s, "tenant", "periodic", "p99_s")


def deployment_p99(s):
    return get(s, "tenant", "deployment", "p99_s")


def probe_ms(s):
    return get(s, "probe", "p99_ms")


# (name, how to read it from a summary, target ratio with / without, kind)
TARGETS = [
    ("other tenant's pod startup p99 (periodic pods)", tenant_p99, 0.1),
    ("other tenant's pod startup p99 (Deployment 0 -> N)", deployment_p99, 0.1),
    ("makespan", lambda s: get(s, "makespan_s"), 1.0),
    ("CPU s apiserver+etcd+scheduler+controller-manager", lambda s: get(s, "cpu_sum_s"), 0.7),
    ("peak RSS apiserver+etcd+scheduler above idle", lambda s: get(s, "peak_rss_above_idle_mib"),
     0.5),
    ("probe p99, GET+LIST", probe_ms, 0.5),
]
INFO = [
    ("probe GET p99", lambda s: get(s, "probe", "get_99_ms")),
    ("probe LIST p99", lambda s: get(s, "probe", "list_99_ms")),
]


def ratio(w, wo):
    if w is None or wo in (None, 0):
        return None
    return w / wo


def fmt(v, digits=1):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def unfinished(s):
    if s is None:
        return "no result"
    if s.get("finished"):
        return ""
    why = "interrupted" if s.get("interrupted") else f"timed out at {fmt(s.get('timeout_s'), 0)} s"
    return f"{why}: {s.get('jobs_done')} of {s.get('jobs')} Jobs, {fmt(s.get('completed'))} of {fmt(s.get('pods'))} pods"


def pairs_of(runs, arm):
    """label -> (arm's summary, without's summary) for every pair that has both runs."""
    by = {}
    for r in runs:
        if r["label"].startswith("p"):
            by.setdefault(r["label"], {})[r["arm"]] = r
    out = {}
    for label in sorted(by, key=lambda x: int(x[1:]) if x[1:].isdigit() else 0):
        if arm in by[label] and "without" in by[label]:
            out[label] = (by[label][arm]["summary"], by[label]["without"]["summary"])
    return out


def target_table(runs, arm, report):
    pairs = pairs_of(runs, arm)
    if not pairs:
        return [f"_No pair has both a `{arm}` and a `without` run._", ""]
    labels = list(pairs)
    head = "| target (ratio " + arm + " / without) | " + " | ".join(labels) + \
        " | spread (min-max) | target | met |"
    lines = [head, "|---|" + "---:|" * len(labels) + "---:|---|---|"]
    entry = report.setdefault(arm, {})
    for name, read, target in TARGETS:
        ratios, cells = [], []
        for label in labels:
            w, wo = pairs[label]
            r = ratio(read(w), read(wo))
            mark = "" if (w and w.get("finished") and wo and wo.get("finished")) else "*"
            cells.append(f"{fmt(r, 2)}{mark} ({fmt(read(w))} / {fmt(read(wo))})")
            if r is not None:
                ratios.append(r)
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "n/a"
        met = sum(1 for r in ratios if r <= target)
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {spread} | <= {target} | {met} of {len(labels)} pairs |")
        entry[name] = {"target": target, "ratios": dict(zip(labels, [
            ratio(read(pairs[lb][0]), read(pairs[lb][1])) for lb in labels])),
            "met_pairs": met, "pairs": len(labels)}
    for name, read in INFO:
        cells = [f"{fmt(ratio(read(pairs[lb][0]), read(pairs[lb][1])), 2)} "
                 f"({fmt(read(pairs[lb][0]))} / {fmt(read(pairs[lb][1]))})" for lb in labels]
        lines.append(f"| {name} (information) | " + " | ".join(cells) + " | | | |")
    sleeping = [get(pairs[lb][0], "sleeping_retries") for lb in labels]
    lines.append(
        f"| controller workers sent to sleep (429s with Retry-After to controllers, `{arm}` arm) | "
        + " | ".join(fmt(x) for x in sleeping) + " | | none | "
        + f"{sum(1 for x in sleeping if x == 0)} of {len(labels)} pairs |")
    entry["sleeping_retries"] = dict(zip(labels, sleeping))
    lines.append("")
    lines.append("Cells: ratio (" + arm + " / without). `*`: one of the two runs did not finish, "
                 "so the figures cover only what it reached.")
    lines.append("")
    return lines


def row_values(s):
    t = get(s, "tenant") or {}
    per, dep = t.get("periodic") or {}, t.get("deployment") or {}
    b = get(s, "bulwark") or {}
    audit = get(s, "audit") or {}
    ci = get(s, "ci") or {}
    lag = get(s, "status_lag") or {}
    fc = get(s, "failed_create_events") or {}
    return [
        ("makespan, s", get(s, "makespan_s")),
        ("Jobs done", get(s, "jobs_done")),
        ("tenant periodic pods: n", per.get("n")),
        ("  create -> Running p50 / p90, s", f"{fmt(per.get('p50_s'))} / {fmt(per.get('p90_s'))}"),
        ("  p99 / max, s", f"{fmt(per.get('p99_s'))} / {fmt(per.get('max_s'))}"),
        ("  not Running by the end", per.get("not_running")),
        ("tenant Deployment pods: n (scaled at, s)", f"{fmt(dep.get('n'))} ({fmt(dep.get('scaled_at_s'))})"),
        ("  create -> Running p50 / p90, s", f"{fmt(dep.get('p50_s'))} / {fmt(dep.get('p90_s'))}"),
        ("  p99 / max, s", f"{fmt(dep.get('p99_s'))} / {fmt(dep.get('max_s'))}"),
        ("  not Running by the end", dep.get("not_running")),
        ("probe p50 / p99, ms", f"{fmt(get(s, 'probe', 'p50_ms'))} / {fmt(get(s, 'probe', 'p99_ms'))}"),
        ("  GET p99 / LIST p99, ms", f"{fmt(get(s, 'probe', 'get_99_ms'))} / {fmt(get(s, 'probe', 'list_99_ms'))}"),
        ("  requests (errors)", f"{fmt(get(s, 'probe', 'n'))} ({fmt(get(s, 'probe', 'errors'))})"),
        ("peak burst pods not yet running", get(s, "peak_not_running")),
        ("  of them past bulwark's gate (peak) / held behind it (peak)",
         f"{fmt(get(s, 'peak_ungated_not_running'))} / {fmt(get(s, 'peak_held'))}"),
        ("peak unscheduled (scheduler queue)", get(s, "peak_unscheduled")),
        ("scheduler attempts scheduled / unschedulable",
         f"{fmt(get(s, 'attempts', 'scheduled'), 0)} / {fmt(get(s, 'attempts', 'unschedulable'), 0)}"),
        ("RSS apiserver+etcd+scheduler: idle / peak / above idle, MiB",
         f"{fmt(get(s, 'idle_rss_sum_mib'))} / {fmt(get(s, 'peak_rss_sum_mib'))} / {fmt(get(s, 'peak_rss_above_idle_mib'))}"),
        ("peak RSS kube-apiserver / etcd / scheduler / controller-manager, MiB",
         " / ".join(fmt(get(s, "peak_rss_mib", c)) for c in
                    ("kube-apiserver", "etcd", "kube-scheduler", "kube-controller-manager"))),
        ("CPU s apiserver+etcd+scheduler+controller-manager", get(s, "cpu_sum_s")),
        ("  apiserver / etcd / scheduler / controller-manager",
         " / ".join(fmt(get(s, "cpu_s", c)) for c in
                    ("kube-apiserver", "etcd", "kube-scheduler", "kube-controller-manager"))),
        ("  kwok / bulwark webhook / node controller",
         " / ".join(fmt(get(s, "cpu_s", c)) for c in
                    ("kwok", "bulwark-webhook", "bulwark-node-controller"))),
        ("pod creations answered 429 (kube-apiserver)", get(s, "apiserver_pod_429s")),
        ("bulwark refusals: Retry-After / immediate",
         f"{fmt(get(b, 'forms', 'retry_after'), 0)} / {fmt(get(b, 'forms', 'immediate'), 0)}"),
        ("  Retry-After asked, mean s", get(b, "retry_after_seconds", "mean")),
        ("audit: 429s to controllers (with Retry-After)",
         f"{fmt(audit.get('controller_429s'))} ({fmt(audit.get('controller_429s_with_retry_after'))})"),
        ("  seconds those asked controller workers to sleep", audit.get("controller_retry_after_seconds")),
        ("audit: 429s to other clients (with Retry-After)",
         f"{fmt(audit.get('other_429s'))} ({fmt(audit.get('other_429s_with_retry_after'))})"),
        ("FailedCreate Events in the burst namespace (sum of count)", fc.get("count_sum")),
        ("Job status.succeeded behind its pods: max / p99, s",
         f"{fmt(lag.get('max_s'))} / {fmt(lag.get('p99_s'))}"),
        ("CI bot: created / failed / abandoned of slots",
         f"{fmt(ci.get('created'))} / {fmt(ci.get('failed'))} / {fmt(ci.get('abandoned'))} of {fmt(ci.get('slots'))}"),
        ("  retries, seconds slept on Retry-After", f"{fmt(ci.get('retries'))}, {fmt(ci.get('slept_s'))}"),
        ("  create -> Succeeded p50 / p99, s",
         f"{fmt(get(ci, 'create_to_succeeded', 'p50_s'))} / {fmt(get(ci, 'create_to_succeeded', 'p99_s'))}"),
        ("peak nodes tainted bulwark.io/unhealthy", get(s, "peak_tainted_nodes")),
    ]


def runs_table(runs):
    shown = [r for r in runs if r["summary"] is not None]
    if not shown:
        return ["_No run produced a summary._", ""]
    head = "| | " + " | ".join(f"{r['label']} {r['arm']}" for r in shown) + " |"
    lines = [head, "|---|" + "---:|" * len(shown)]
    cols = [row_values(r["summary"]) for r in shown]
    for i, (name, _) in enumerate(cols[0]):
        lines.append(f"| {name} | " + " | ".join(fmt(c[i][1]) for c in cols) + " |")
    lines.append("")
    return lines


def cap_table(runs, report):
    caps = [r for r in runs if r["label"].startswith("cap")]
    if not caps:
        return []
    withouts = [r["summary"] for r in runs if r["arm"] == "without" and r["summary"]]

    def mean(read):
        vals = [read(s) for s in withouts if read(s) is not None]
        return sum(vals) / len(vals) if vals else None

    ref = {"tenant": mean(tenant_p99), "deployment": mean(deployment_p99),
           "makespan": mean(lambda s: get(s, "makespan_s")), "probe": mean(probe_ms)}
    lines = [
        "| max-pending-pods | tenant p99, s (/ without) | Deployment p99, s (/ without) | "
        "makespan, s (/ without) | probe p99, ms (/ without) | peak not running | 429s | "
        "finished |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    curve = []
    for r in sorted(caps, key=lambda r: int(r["cap"]) if str(r["cap"]).isdigit() else 0):
        s = r["summary"]
        vals = {"tenant": tenant_p99(s), "deployment": deployment_p99(s),
                "makespan": get(s, "makespan_s"), "probe": probe_ms(s)}
        cell = {k: f"{fmt(v)} ({fmt(ratio(v, ref[k]), 2)})" for k, v in vals.items()}
        lines.append(
            f"| {r['cap']} | {cell['tenant']} | {cell['deployment']} | {cell['makespan']} | "
            f"{cell['probe']} | {fmt(get(s, 'peak_not_running'))} | "
            f"{fmt(get(s, 'apiserver_pod_429s'), 0)} | "
            f"{'yes' if get(s, 'finished') else (unfinished(s) or r['status'])} |")
        curve.append({"cap": r["cap"], **vals,
                      **{f"{k}_ratio": ratio(v, ref[k]) for k, v in vals.items()}})
    lines.append("")
    lines.append(f"Ratios against the mean of the {len(withouts)} `without` run(s) of this "
                 "invocation.")
    lines.append("")
    report["cap_curve"] = curve
    return lines


def plot(results, runs):
    venv = os.path.expanduser("~/.cache/bulwark/bench-venv")
    py = os.path.join(venv, "bin", "python3")
    try:
        import matplotlib  # noqa: F401

        py = sys.executable
    except ImportError:
        if not os.path.exists(py):
            subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        if subprocess.run([py, "-c", "import matplotlib"], capture_output=True).returncode:
            subprocess.run([py, "-m", "pip", "install", "-q", "matplotlib"], check=True)
    stems = [f"{r['arm']}|{r['label']}|{r['stem']}" for r in runs
             if r["summary"] is not None and os.path.exists(r["stem"] + ".csv")]
    if not stems:
        return
    script = r'''
import csv, sys, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out, runs = sys.argv[1], [a.split("|", 2) for a in sys.argv[2:]]
fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(11, 11), sharex=True)
colors = {"without": "tab:red", "with": "tab:blue", "with-retry-after": "tab:orange",
          "hold": "tab:green"}
cap_colors = ["tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:cyan"]
styles = ["-", "--", ":", "-."]
caps = 0
for arm, label, stem in runs:
    if label.startswith("cap"):
        color, ls, name = cap_colors[caps % len(cap_colors)], "-", f"with, max-pending {label[3:]}"
        caps += 1
    else:
        n = int(label[1:]) if label[1:].isdigit() else 1
        color, ls, name = colors.get(arm, "k"), styles[(n - 1) % len(styles)], f"{arm} ({label})"
    rows = list(csv.DictReader(open(stem + ".csv")))
    t = [float(r["t"]) for r in rows]
    a1.plot(t, [float(r["not_running"]) for r in rows], color=color, ls=ls, label=name)
    a3.plot(t, [float(r["apiserver_rss_mib"] or "nan") for r in rows], color=color, ls=ls, label=name)
    lat = list(csv.DictReader(open(stem + "-tenant.csv")))
    for kind, marker in (("periodic", "o"), ("deployment", "x")):
        pts = [(float(r["created_t"]), float(r["latency_s"])) for r in lat if r["kind"] == kind]
        if pts:
            a2.scatter([p[0] for p in pts], [max(p[1], 0.05) for p in pts], s=10 if marker == "o" else 16,
                       marker=marker, color=color, alpha=.6,
                       label=f"{name}: {'periodic pods' if kind == 'periodic' else 'Deployment pods'}")
a1.set_ylabel("burst pods not yet running"); a1.set_title("Burst: pods not yet running (Pending, scheduled or not)")
a1.legend(fontsize=7, ncol=2); a1.grid(alpha=.3); a1.set_ylim(bottom=0)
a2.set_yscale("log"); a2.set_ylabel("create -> Running, s (log)")
a2.set_title("The other tenant: each pod's create -> Running, by creation time (o periodic, x Deployment)")
a2.legend(fontsize=6, ncol=2); a2.grid(alpha=.3, which="both")
a3.set_ylabel("RSS, MiB"); a3.set_xlabel("seconds since the burst started"); a3.set_title("kube-apiserver resident memory")
a3.legend(fontsize=7, ncol=2); a3.grid(alpha=.3); a3.set_ylim(bottom=0)
fig.tight_layout(); fig.savefig(out, dpi=100)
'''
    subprocess.run([py, "-c", script, os.path.join(results, "burst.png"), *stems], check=True)


def main():
    results = sys.argv[1]
    runs = load_runs(results)
    if not runs:
        print(f"no burst runs in {results}", file=sys.stderr)
        return 1
    first = next((r["summary"] for r in runs if r["summary"]), {}) or {}
    report = {"runs": [{k: r[k] for k in ("label", "arm", "cap", "status", "started")}
                       for r in runs]}
    pair_cap = next((r["cap"] for r in runs if r["label"].startswith("p") and r["arm"] != "without"),
                    None)
    md = [
        "# Burst benchmark: summary",
        "",
        f"{fmt(first.get('pods'))} pods in {first.get('jobs')} Jobs (ttlSecondsAfterFinished) on "
        f"{first.get('nodes')} kwok nodes x {first.get('pods_per_node')} pod slots; burst "
        f"namespace max-pending-pods {pair_cap} in the pairs; node controller timers "
        f"`{first.get('node_timers')}`; kube-controller-manager --concurrent-job-syncs "
        f"{first.get('job_syncs') or '5 (default)'}; bulwark maxRetryAfterSeconds "
        f"{first.get('max_retry_after')}. Each run on a fresh cluster; the arms of a pair come from "
        "one invocation, run one after the other (`started`: when each run began).",
        "",
        "## Runs",
        "",
        "| label | arm | cap | status | started |",
        "|---|---|---:|---|---|",
    ]
    for r in runs:
        note = unfinished(r["summary"]) if r["summary"] else "no result"
        md.append(f"| {r['label']} | {r['arm']} | {r['cap'] if r['arm'] != 'without' else ''} | "
                  f"{r['status']}{': ' + note if note else ''} | {r['started']} |")
    md += ["", "## Targets: with / without, per pair", ""]
    md += target_table(runs, "with", report)
    md += ["## Both forms: with-retry-after / without, per pair", ""]
    md += target_table(runs, "with-retry-after", report)
    if any(r["arm"] == "hold" for r in runs):
        md += ["## Hold mode: hold / without, per pair", ""]
        md += target_table(runs, "hold", report)
    caps = cap_table(runs, report)
    if caps:
        md += ["## Cap curve (`with`, one run per max-pending-pods)", ""] + caps
    md += ["## Every run", ""] + runs_table(runs)
    md += ["![burst pods not yet running, the other tenant's pod latency and kube-apiserver RSS](burst.png)", ""]
    text = "\n".join(md) + "\n"
    with open(os.path.join(results, "burst-summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(results, "burst-report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(text)
    plot(results, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
