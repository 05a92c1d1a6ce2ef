"""Instructions per review from a callgrind dump of bulwark: self cost by function, and what
the review handler and the Admitter spend their inclusive cost on. callgrind_annotate 3.19
charges every thread's self cost to clone(), so the dump is read directly.

Usage: callgrind-summary.py DUMP REQUESTS ENDPOINT
"""

import collections
import re
import sys

path, n, endpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3]
names, self_cost, calls = {}, collections.Counter(), collections.Counter()


def name(tok):
    m = re.match(r"\((\d+)\)(?: (.*))?", tok)
    if not m:
        return tok
    if m.group(2):
        names[m.group(1)] = m.group(2)
    return names.get(m.group(1), tok)


fn = cfn = None
after_call = False
for line in open(path):
    line = line.rstrip("\n")
    if line.startswith("fn="):
        fn = name(line[3:])
    elif line.startswith("cfn="):
        cfn = name(line[4:])
    elif line.startswith("calls="):
        after_call = True
    elif line[:1].isdigit() or line[:1] in ("+", "-", "*"):
        parts = line.split()
        if len(parts) < 2 or fn is None:
            continue
        if after_call:
            # The line after calls= is the call's inclusive cost, not the caller's own.
            calls[(fn, cfn)] += int(parts[1])
            after_call = False
        else:
            self_cost[fn] += int(parts[1])

total = sum(self_cost.values())
print(f"endpoint {endpoint}, {n} requests, {total // n} instructions per review ({total} in all)")
print("\nself cost per review, top 30:")
for f, c in self_cost.most_common(30):
    print(f"{c // n:>9} {100 * c / total:5.1f}%  {f[:140]}")


def callees(pattern):
    got = collections.Counter()
    for (caller, callee), c in calls.items():
        if re.search(pattern, caller):
            got[callee] += c
    return got.most_common(12)


for title, pattern in (
    ("the review handler", r"^bulwark::serve::http::review::\{\{closure\}\}$"),
    ("Service::answer", r"^bulwark::serve::http::Service::answer$"),
    ("Admitter::" + endpoint, r"^bulwark::review::answer::Admitter::" + endpoint + "$"),
):
    print(f"\ninclusive cost per review of what {title} calls:")
    for f, c in callees(pattern):
        print(f"{c // n:>9} {100 * c / total:5.1f}%  {f[:140]}")
