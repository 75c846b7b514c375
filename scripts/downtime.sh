#!/usr/bin/env bash
# Downtime and guest-observed blackout against guest size: one `hpmig demo`
# per (size, granularity, run) with defaults (sparse workload at 100k
# stores/s, every page holding data, KVM micro-VM where /dev/kvm opens, TCP
# loopback), read from each run's JSON report. Writes downtime.csv and
# downtime.svg (downtime and blackout, median of the runs, against size).
# Usage: scripts/downtime.sh [sizes="256M 1G 4G"] [runs=3] [out=target/downtime] [hpmig binary]
set -euo pipefail
SIZES=${1:-256M 1G 4G}; RUNS=${2:-3}; OUT=${3:-target/downtime}; HPMIG=${4:-target/release/hpmig}
[ -x "$HPMIG" ] || { echo "no hpmig binary at $HPMIG (cargo build --release)" >&2; exit 1; }
mkdir -p "$OUT"
csv="$OUT/downtime.csv"
echo "size,granularity,run,exit,downtime_ms,blackout_ms,blackout_resolution_ms,blackout_before_pause_ms,blackout_paused_ms,blackout_after_start_ms,final_round_ms,acknowledge_ms,decision_ms,converged,target_met,observer_khz_switchover,observer_max_gap_ms,observer_cpu_share,blackout_error_ms,observer_quiet_ms,observer_realtime" > "$csv"
for size in $SIZES; do
    for g in segment page; do
        for run in $(seq "$RUNS"); do
            json="$OUT/$size-$g-$run.json"
            set +e
            "$HPMIG" demo --memory "$size" --workload sparse --dirty-rate 100000 --contents full \
                --granularity "$g" --json "$json" > "$OUT/$size-$g-$run.txt" 2>&1
            rc=$?
            set -e
            python3 - "$json" "$size" "$g" "$run" "$rc" >> "$csv" <<'PY'
import json, sys
path, size, g, run, rc = sys.argv[1:]
try:
    s = json.load(open(path))["summary"]
except Exception:
    print(f"{size},{g},{run},{rc},,,,,,,,,,,,,,,,,")
    sys.exit(0)
t = s["switchover_ms"]
f = lambda v: "" if v is None else f"{v:.2f}"
print(",".join([size, g, run, rc, f(s["downtime_ms"]), f(s.get("blackout_ms")),
                f(s.get("blackout_resolution_ms")), f(s.get("blackout_before_pause_ms")),
                f(s.get("blackout_paused_ms")), f(s.get("blackout_after_start_ms")), f(t["final_round"]), f(t["acknowledge"]),
                f(t["decision"]), str(s["converged"]).lower(), str(s["downtime_target_met"]).lower(),
                f(s.get("observer_sample_hz_switchover") and s["observer_sample_hz_switchover"] / 1e3),
                f(s.get("blackout_max_gap_ms")), f(s.get("observer_cpu_share")), f(s.get("blackout_error_ms")),
                f(s.get("observer_quiet_ms")), str(s.get("observer_realtime", "")).lower()]))
PY
            tail -1 "$csv"
        done
    done
done
python3 - "$csv" "$OUT/downtime.svg" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def mib(s):
    n, u = float(s[:-1]), s[-1].upper()
    return n * {"M": 1, "G": 1024}[u]
series = {}
for r in rows:
    for key in ("downtime_ms", "blackout_ms"):
        if r[key]:
            series.setdefault((r["granularity"], key), {}).setdefault(mib(r["size"]), []).append(float(r[key]))
W, H, L, B = 640, 400, 70, 50
xs = sorted({x for s in series.values() for x in s})
ymax = max([statistics.median(v) for s in series.values() for v in s.values()] + [1]) * 1.1
import math
def X(x): return L + (math.log2(x) - math.log2(xs[0])) / max(1e-9, math.log2(xs[-1]) - math.log2(xs[0])) * (W - L - 20)
def Y(y): return H - B - y / ymax * (H - B - 20)
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<line x1="{L}" y1="{H-B}" x2="{W-20}" y2="{H-B}" stroke="black"/><line x1="{L}" y1="20" x2="{L}" y2="{H-B}" stroke="black"/>',
       f'<text x="{W/2}" y="{H-10}" text-anchor="middle">guest memory (MiB, log scale)</text>',
       f'<text x="15" y="{H/2}" transform="rotate(-90 15 {H/2})" text-anchor="middle">ms (median of runs)</text>']
for x in xs:
    out.append(f'<text x="{X(x)}" y="{H-B+15}" text-anchor="middle">{int(x)}</text>')
for i in range(5):
    y = ymax * i / 4
    out.append(f'<text x="{L-5}" y="{Y(y)+4}" text-anchor="end">{y:.0f}</text>')
colors = {("segment", "downtime_ms"): "#1f77b4", ("segment", "blackout_ms"): "#aec7e8",
          ("page", "downtime_ms"): "#d62728", ("page", "blackout_ms"): "#ff9896"}
for n, (k, s) in enumerate(sorted(series.items())):
    pts = " ".join(f"{X(x)},{Y(statistics.median(v))}" for x, v in sorted(s.items()))
    c = colors.get(k, "gray")
    out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{pts}"/>')
    out.append(f'<text x="{L+10}" y="{35+15*n}" fill="{c}">{k[0]} {k[1][:-3]}</text>')
out.append("</svg>")
open(sys.argv[2], "w").write("\n".join(out))
print("wrote", sys.argv[2])
PY
python3 - "$csv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
cols = ["downtime_ms", "blackout_ms", "blackout_before_pause_ms", "blackout_paused_ms", "blackout_after_start_ms",
        "blackout_error_ms", "observer_khz_switchover", "observer_cpu_share"]
label = lambda c: c[:-3] if c.endswith("_ms") else c
print("size granularity runs | " + " | ".join(f"{label(c)} median (min-max)" for c in cols))
keys = []
for r in rows:
    if (r["size"], r["granularity"]) not in keys:
        keys.append((r["size"], r["granularity"]))
for k in keys:
    rs = [r for r in rows if (r["size"], r["granularity"]) == k]
    cells = []
    for c in cols:
        v = [float(r[c]) for r in rs if r[c]]
        cells.append(f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else "-")
    print(f"{k[0]} {k[1]} {len(rs)} | " + " | ".join(cells))
PY
echo "wrote $csv"
