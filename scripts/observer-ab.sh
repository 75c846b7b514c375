#!/usr/bin/env bash
# Interleaved A/B of two hpmig binaries on the downtime benchmark: for each
# pair and size, one `scripts/downtime.sh SIZE 1` run (segment and page) per
# binary, the order alternating from pair to pair so that a drift of the
# machine falls on both. Writes OUT/ab.csv (downtime.sh's columns, with the
# binary and the pair first) and prints medians (min-max) per binary, size
# and granularity. Run it on a quiet machine (no build, no CI beside it).
# Usage: scripts/observer-ab.sh A_BIN B_BIN [pairs=6] [sizes="256M 1G 4G"] [out=target/observer-ab]
set -euo pipefail
cd "$(dirname "$0")/.."
A=${1:?usage: $0 A_BIN B_BIN [pairs] [sizes] [out]}; B=${2:?usage: $0 A_BIN B_BIN [pairs] [sizes] [out]}
PAIRS=${3:-6}; SIZES=${4:-256M 1G 4G}; OUT=${5:-target/observer-ab}
for bin in "$A" "$B"; do [ -x "$bin" ] || { echo "no hpmig binary at $bin" >&2; exit 1; }; done
rm -rf "$OUT"; mkdir -p "$OUT"
for i in $(seq "$PAIRS"); do
    for size in $SIZES; do
        if [ $((i % 2)) = 1 ]; then order="a b"; else order="b a"; fi
        for which in $order; do
            bin=$A; [ "$which" = b ] && bin=$B
            scripts/downtime.sh "$size" 1 "$OUT/$which-$size-$i" "$bin" > /dev/null 2>&1
            echo "pair $i $size $which done" >&2
        done
    done
done
python3 - "$OUT" "$A" "$B" <<'PY'
import csv, glob, os, statistics as st, sys
out, a, b = sys.argv[1:]
names = {"a": a, "b": b}
rows = []
for f in sorted(glob.glob(os.path.join(out, "*", "downtime.csv"))):
    which, size, pair = os.path.basename(os.path.dirname(f)).split("-")
    for r in csv.DictReader(open(f)):
        rows.append({"binary": names[which], "pair": pair, **r})
rows.sort(key=lambda r: (r["size"], r["granularity"], int(r["pair"]), r["binary"]))
w = csv.DictWriter(open(os.path.join(out, "ab.csv"), "w"), fieldnames=list(rows[0]))
w.writeheader(); w.writerows(rows)
def m(v):
    v = [float(x) for x in v if x]
    return f"{st.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else "-"
groups = {}
for r in rows:
    groups.setdefault((r["binary"], r["size"], r["granularity"]), []).append(r)
print("binary size granularity runs | downtime ms | blackout ms | observer kHz | longest gap ms | runs >= 10 kHz")
for k in sorted(groups):
    rs = groups[k]
    fast = sum(1 for r in rs if r["observer_khz_switchover"] and float(r["observer_khz_switchover"]) >= 10)
    print(*k, len(rs), "|", m(r["downtime_ms"] for r in rs), "|", m(r["blackout_ms"] for r in rs), "|",
          m(r["observer_khz_switchover"] for r in rs), "|", m(r["observer_max_gap_ms"] for r in rs), "|", fast)
print(f"wrote {os.path.join(out, 'ab.csv')}")
PY
