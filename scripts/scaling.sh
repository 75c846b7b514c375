#!/usr/bin/env bash
# Worker scaling of round 0: one `hpmig demo` per worker count (source and
# destination in one process over TCP loopback, emulated guest whose every
# page holds data, page granularity, destination prefaulted), printing round
# 0's MiB/s and the ratio to one worker. Meant for many-core machines.
# Usage: scripts/scaling.sh [memory=2G] [workers="1 2 4 8"] [hpmig binary]
set -euo pipefail
MEM=${1:-2G}; WORKERS=${2:-1 2 4 8}; HPMIG=${3:-target/release/hpmig}
[ -x "$HPMIG" ] || { echo "no hpmig binary at $HPMIG (cargo build --release)" >&2; exit 1; }
echo "cores: $(nproc); guest $MEM; workers: $WORKERS"
base=""
for n in $WORKERS; do
    out=$("$HPMIG" demo --guest emulated --memory "$MEM" --workload idle --contents full --warmup 100ms \
        --granularity page --workers "$n" --prefault 2>&1) || { echo "$out"; exit 1; }
    # Round table: round, dirty pages, work set, wire, time, rate (2 fields
    # each: value and unit), decision. The rate is in MiB/s.
    rate=$(echo "$out" | awk '$1 == "0" && $10 == "MiB/s" {print $9}')
    echo "$out" | grep -qE "what landed equals what was sent|destination equals source" || { echo "$out"; exit 1; }
    [ -n "$base" ] || base=$rate
    printf "workers %2d: round 0 %8.1f MiB/s  (%.2fx one worker)\n" "$n" "$rate" "$(echo "$rate $base" | awk '{print $1 / $2}')"
done
