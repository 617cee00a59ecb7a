#!/usr/bin/env python3
"""The kernel matrix's report (scripts/kernel-matrix.sh): one column per kernel row, one line per
test, and the exit status. Usage: kernel_matrix_report.py OUT ROW=host|vm...

OUT holds, per row, console.log (the tests' output between `=== fathom-matrix` banners),
qemu.rc, seconds and lists/<binary> (the tests the row must report on); and vm-skip.tsv (tests
not run in VMs: test, reason) and may-skip.tsv (the written skip list: row glob, test, reason).

A row fails on a failed, unfinished or missing test, a crash, a hang, a kernel panic, and on a
test that reported itself skipped (`fathom-skip: <test>: <why>`) or ignored without being on
the written skip list for that row. Tested by scripts/tests/test_kernel_matrix_report.py.
"""
import fnmatch
import os
import re
import sys

out = sys.argv[1]
rows = [a.split("=")[0] for a in sys.argv[2:]]
is_vm = {a.split("=")[0]: a.endswith("=vm") for a in sys.argv[2:]}
vm_skip = {}
for line in open(os.path.join(out, "vm-skip.tsv")):
    if "\t" in line:
        k, why = line.rstrip("\n").split("\t", 1)
        vm_skip[k] = why
may_skip = []
path = os.path.join(out, "may-skip.tsv")
for line in open(path) if os.path.exists(path) else []:
    if line.count("\t") >= 2:
        may_skip.append(tuple(line.rstrip("\n").split("\t", 2)))


def listed_skip(row, test):
    """The written reason `test` may skip in `row`, or None."""
    for glob, t, why in may_skip:
        if t == test and fnmatch.fnmatchcase(row, glob):
            return why
    return None

RESULT = re.compile(r"^test (\S+) \.\.\. (?:.*?)(ok|FAILED|ignored)\s*$")
START = re.compile(r"^test (\S+) \.\.\. ")
SKIP = re.compile(r"^fathom-skip: (\S+): (.*)$")
BANNER = re.compile(r"=== fathom-matrix (begin|end|done|kernel)\b ?(.*)$")

def parse(name):
    d = os.path.join(out, name)
    text = open(os.path.join(d, "console.log"), errors="replace").read().replace("\r", "")
    lines = text.split("\n")
    rc = int(open(os.path.join(d, "qemu.rc")).read().strip() or 1)
    res = {"kernel": "?", "tests": {}, "problems": [], "notes": [], "skips": {}, "order": [], "binaries": set()}
    binary, pending, done, ended = None, [], False, set()
    for line in lines:
        m = BANNER.search(line)
        if m:
            kind, rest = m.groups()
            if kind == "kernel":
                res["kernel"] = rest.strip()
            elif kind == "begin":
                binary, pending = rest.strip(), []
                res["binaries"].add(binary)
            elif kind == "end":
                b, _, tail = rest.partition(" ")
                code = int(re.search(r"rc=(\d+)", tail).group(1))
                ended.add(b)
                for t in pending:
                    res["tests"][t] = "unfinished"
                if code != 0 and not any(
                    k.startswith(b + "::") and v == "FAIL" for k, v in res["tests"].items()
                ):
                    res["problems"].append(f"{b} exited with {code} without a failing test")
                binary = None
            elif kind == "done":
                done = True
            continue
        if binary is None:
            continue
        s = SKIP.match(line.strip())
        if s:
            res["skips"][f"{binary}::{s.group(1)}"] = s.group(2)
            continue
        m = RESULT.match(line)
        if m:
            t, r = m.groups()
            key = f"{binary}::{t}"
            res["tests"][key] = {"ok": "pass", "FAILED": "FAIL", "ignored": "ignored"}[r]
            res["order"].append(key)
            pending = [p for p in pending if p != key]
            continue
        m = START.match(line)
        if m:
            key = f"{binary}::{m.group(1)}"
            res["order"].append(key)
            pending.append(key)
            continue
        # A result on a line of its own, after output the test wrote straight to stderr.
        if pending and line.strip() in ("ok", "FAILED", "ignored"):
            key = pending.pop(0)
            res["tests"][key] = {"ok": "pass", "FAILED": "FAIL", "ignored": "ignored"}[line.strip()]
    if binary is not None:
        res["problems"].append(f"{binary} never finished (crash or hang)")
        for t in pending:
            res["tests"][t] = "unfinished"
    for k, why in res["skips"].items():
        if res["tests"].get(k) == "pass":
            res["tests"][k] = "skip"
    # A skip or an ignored test counts only when the written skip list has it for this row.
    for k, state in list(res["tests"].items()):
        if state not in ("skip", "ignored"):
            continue
        listed = listed_skip(name, k)
        if listed is None:
            res["tests"][k] = "UNLISTED SKIP"
            why = res["skips"].get(k, "ignored")
            res["problems"].append(
                f"{k} was skipped ({why}) but is not on the skip list (MAY_SKIP in scripts/kernel-matrix.sh) for {name}"
            )
        else:
            res["skips"][k] = f"{res['skips'].get(k, 'ignored')} (listed: {listed})"
    for b in sorted(os.listdir(os.path.join(d, "lists"))):
        for t in open(os.path.join(d, "lists", b)).read().split():
            k = f"{b}::{t}"
            if k in res["tests"]:
                continue
            if is_vm[name] and k in vm_skip:
                res["tests"][k] = "skip"
                res["skips"][k] = f"not run in VMs (VM_SKIP): {vm_skip[k]}"
            else:
                res["tests"][k] = "NOT RUN"
            res["order"].append(k)
    if rc == 124 or rc == 137:
        res["problems"].append(f"hung: killed after FATHOM_VM_TIMEOUT={os.environ.get('FATHOM_VM_TIMEOUT', '1500')} s")
    elif rc != 0:
        res["problems"].append(f"QEMU exited with {rc}")
    crash = [l.strip() for l in lines if re.search(r"Kernel panic|BUG: |Oops: ", l)]
    if crash:
        res["problems"].append(
            "kernel panic/BUG/Oops in the console log: " + " | ".join(crash[:3])
        )
    first = os.path.join(d, "console.first-boot.log")
    if os.path.exists(first):
        crashed = [
            l.strip()
            for l in open(first, errors="replace").read().split("\n")
            if re.search(r"Kernel panic|BUG: |Oops: ", l)
        ]
        res["notes"].append(
            "booted twice: the first boot crashed (while booting, or an int3 of text patching; "
            + (" | ".join(crashed[:3]) or "no panic line")
            + f"); its log: {first}"
        )
    if not done:
        res["problems"].append("the run did not reach its end")
    res["log"] = os.path.join(d, "console.log")
    sec = os.path.join(d, "seconds")
    res["seconds"] = int(open(sec).read()) if os.path.exists(sec) else None
    return res

results = {r: parse(r) for r in rows}
order = []
for r in rows:
    for k in results[r]["order"]:
        if k not in order:
            order.append(k)
width = max([len(k) for k in order] + [10])
heads = [f"{r} ({results[r]['kernel']})" for r in rows]
colw = max(len(h) for h in heads) + 2
print()
print("kernel matrix".ljust(width + 2) + "".join(h.ljust(colw) for h in heads))
for k in order:
    cells = [results[r]["tests"].get(k, "-") for r in rows]
    print(k.ljust(width + 2) + "".join(c.ljust(colw) for c in cells))
print()
failed = False
for r in rows:
    res = results[r]
    counts = {}
    for v in res["tests"].values():
        counts[v] = counts.get(v, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    secs = f", VM {res['seconds']} s" if res["seconds"] is not None else ""
    bad = sum(counts.get(s, 0) for s in ("FAIL", "NOT RUN", "unfinished")) > 0 or res["problems"]
    failed |= bool(bad)
    print(f"{r}: {'FAILED' if bad else 'ok'} — {summary}{secs}; log: {res['log']}")
    for p in res["problems"]:
        print(f"  problem: {p}")
    for n in res["notes"]:
        print(f"  note: {n}")
    for k, why in sorted(res["skips"].items()):
        print(f"  skipped {k}: {why}")
sys.exit(1 if failed else 0)
