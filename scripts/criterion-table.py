#!/usr/bin/env python3
"""Turns criterion's terminal output (stdin) into `name  throughput` lines,
and the ratio of every benchmark to the `memcmp-baseline` of its group."""
import re
import sys

text = sys.stdin.read()
rows = {}
name = None
for line in text.splitlines():
    m = re.match(r"^(\S+/\S+)", line)
    if m and not line.startswith(" "):
        name = m.group(1)
    t = re.search(r"thrpt:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
    if t and name and "%" not in t.group(1):
        val, unit = float(t.group(1)), t.group(2)
        scale = {"GiB/s": 1024, "MiB/s": 1, "KiB/s": 1 / 1024}.get(unit, 1)
        rows[name] = val * scale
        name = None
for n, v in rows.items():
    parts = n.split("/")
    base = rows.get("/".join([parts[0], "memcmp-baseline"] + parts[2:]))
    ratio = f"  {v / base:.2f}x baseline" if base else ""
    print(f"{n:40s} {v / 1024:7.2f} GiB/s{ratio}")
