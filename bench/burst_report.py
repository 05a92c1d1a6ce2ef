"""Side-by-side summary of the two burst runs (burst.py output) against the burst targets
(docs/architecture.md, Targets; the thresholds below are those of the runs in bench/burst.md),
and the plot of pods not yet running and kube-apiserver RSS over time.
Usage: burst_report.py RESULTS_DIR  ->  RESULTS_DIR/burst-summary.md, RESULTS_DIR/burst.png"""

import csv
import json
import os
import subprocess
import sys

COMPONENTS = ["kube-apiserver", "etcd", "kube-scheduler"]


def load(results, mode):
    path = os.path.join(results, f"burst-{mode}.json")
    if not os.path.exists(path):
        return None, []
    with open(path) as f:
        summary = json.load(f)
    with open(os.path.join(results, f"burst-{mode}.csv")) as f:
        rows = list(csv.DictReader(f))
    return summary, rows


def ratio(w, wo):
    if w is None or wo in (None, 0):
        return None
    return w / wo


def fmt(v, digits=1):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(without, with_):
    lines = [
        "| metric | without bulwark | with bulwark | with / without | target |",
        "|---|---:|---:|---:|---|",
    ]

    def row(name, a, b, target="", digits=1, check=None):
        r = ratio(b, a)
        verdict = ""
        if check is not None and r is not None:
            verdict = " (met)" if check(r) else " (missed)"
        lines.append(
            f"| {name} | {fmt(a, digits)} | {fmt(b, digits)} | "
            f"{fmt(r, 2)} | {target}{verdict} |"
        )

    row("makespan, s", without["makespan_s"], with_["makespan_s"], "<= 1.05",
        check=lambda r: r <= 1.05)
    row("peak RSS apiserver+etcd+scheduler, MiB", without["peak_rss_sum_mib"],
        with_["peak_rss_sum_mib"], "<= 0.5", check=lambda r: r <= 0.5)
    for c in COMPONENTS:
        row(f"  peak RSS {c}, MiB", without["peak_rss_mib"][c], with_["peak_rss_mib"][c])
    row("probe p99 (GET+LIST), ms", without["probe"]["p99_ms"], with_["probe"]["p99_ms"],
        "<= 0.5", check=lambda r: r <= 0.5)
    row("probe p50 (GET+LIST), ms", without["probe"]["p50_ms"], with_["probe"]["p50_ms"])
    for op in ("get", "list"):
        row(f"  probe {op.upper()} p99, ms", without["probe"][f"{op}_99_ms"],
            with_["probe"][f"{op}_99_ms"])
    pw, pn = without["probe"], with_["probe"]
    lines.append(
        f"| probe requests (errors) | {pw['n']} ({pw['errors']}) | {pn['n']} ({pn['errors']}) | | |"
    )
    row("peak pods not yet running", without["peak_not_running"], with_["peak_not_running"], digits=0)
    row("peak unscheduled (scheduler queue)", without["peak_unscheduled"],
        with_["peak_unscheduled"], digits=0)
    for k in ("scheduled", "unschedulable", "error"):
        row(f"scheduler attempts: {k}", without["attempts"][k], with_["attempts"][k], digits=0)
    for c in without["cpu_s"]:
        if c in with_["cpu_s"]:
            row(f"CPU seconds {c}", without["cpu_s"][c], with_["cpu_s"][c])
    if "peak_tainted_nodes" in without:
        row("peak nodes tainted bulwark.io/unhealthy", without["peak_tainted_nodes"],
            with_["peak_tainted_nodes"], digits=0)
    row("pod creations answered 429", without["apiserver_pod_429s"],
        with_["apiserver_pod_429s"], digits=0)
    row("pods completed", without["completed"], with_["completed"], digits=0)
    return "\n".join(lines)


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
    script = r'''
import csv, sys, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
results, modes = sys.argv[1], sys.argv[2:]
fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
colors = {"without": "tab:red", "with": "tab:blue"}
for mode in modes:
    rows = list(csv.DictReader(open(f"{results}/burst-{mode}.csv")))
    t = [float(r["t"]) for r in rows]
    label = f"{mode} bulwark"
    a1.plot(t, [float(r["not_running"]) for r in rows], color=colors[mode], label=label + ": not yet running")
    a1.plot(t, [float(r["unscheduled"]) for r in rows], color=colors[mode], ls=":", label=label + ": unscheduled")
    a2.plot(t, [float(r["apiserver_rss_mib"] or "nan") for r in rows], color=colors[mode], label=label + ": kube-apiserver")
    a2.plot(t, [sum(float(r[k] or 0) for k in ("apiserver_rss_mib", "etcd_rss_mib", "scheduler_rss_mib")) for r in rows],
            color=colors[mode], ls="--", label=label + ": apiserver+etcd+scheduler")
a1.set_ylabel("pods"); a1.set_title("Burst of Job pods: pods pending over time"); a1.legend(fontsize=8); a1.grid(alpha=.3)
a2.set_ylabel("RSS, MiB"); a2.set_xlabel("seconds since the Jobs were submitted"); a2.set_title("Resident memory")
a2.legend(fontsize=8); a2.grid(alpha=.3); a2.set_ylim(bottom=0)
fig.tight_layout(); fig.savefig(f"{results}/burst.png", dpi=110)
'''
    subprocess.run([py, "-c", script, results, *runs], check=True)


def main():
    results = sys.argv[1]
    without, wo_rows = load(results, "without")
    with_, w_rows = load(results, "with")
    if without is None or with_ is None:
        print("need both burst-without.json and burst-with.json", file=sys.stderr)
        return 1
    md = [
        f"Burst: {with_['pods']} pods in {with_['jobs']} Jobs; bulwark cap "
        f"max-pending-pods={with_['cap']}; kube-controller-manager --concurrent-job-syncs="
        f"{with_.get('job_syncs') or '5 (default)'}. Ratios are with / without, from one "
        "invocation.",
        "",
        table(without, with_),
        "",
    ]
    for s in (without, with_):
        if s["timed_out"]:
            md.append(f"**{s['mode']} run timed out**: {s['completed']} of {s['pods']} completed.")
    md.append(f"bulwark refusal metrics (with run): `{json.dumps(with_['bulwark_refusal_metrics'])}`")
    text = "\n".join(md) + "\n"
    with open(os.path.join(results, "burst-summary.md"), "w") as f:
        f.write(text)
    print(text)
    plot(results, ["without", "with"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
