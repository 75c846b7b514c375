#!/usr/bin/env bash
# Worker scaling of round 0 against what the machine allows. Per worker
# count N, two `hpmig demo` runs (source and destination in one process
# over TCP loopback, emulated guest whose every page holds data, destination
# prefaulted), each checked to have verified its copy:
#   copy: page granularity, every page sent whole, so round 0 is bound by
#         copying; beside it memcpy with N threads (`hpmig limits`);
#   diff: segment granularity with --shadow full, every page compared with
#         its (zero) shadow page, so round 0 is bound by comparing; beside
#         it memcmp with N threads.
# Round 0's rate is the table's (bytes on the wire per second: within a few
# percent of guest bytes on a full guest); "of limit" is that rate over the
# limit, "vs 1" the rate over one worker's. Meant for many-core machines.
# Usage: scripts/scaling.sh [memory=2G] [workers="1 2 4 8"] [hpmig binary]
set -euo pipefail
MEM=${1:-2G}; WORKERS=${2:-1 2 4 8}; HPMIG=${3:-target/release/hpmig}
[ -x "$HPMIG" ] || { echo "no hpmig binary at $HPMIG (cargo build --release)" >&2; exit 1; }

# Round 0's MiB/s of one demo run with N workers and these flags.
round0() {
    local n=$1 out rate; shift
    out=$("$HPMIG" demo --guest emulated --memory "$MEM" --workload idle --contents full --warmup 100ms \
        --workers "$n" --prefault "$@" 2>&1) || { echo "$out" >&2; return 1; }
    echo "$out" | grep -qE "what landed equals what was sent|destination equals source" \
        || { echo "$out" >&2; return 1; }
    # Round table: round, dirty pages, work set, wire, time, rate (2 fields
    # each: value and unit), decision. The rate is in MiB/s.
    rate=$(echo "$out" | awk '$1 == "0" && $10 == "MiB/s" {print $9}')
    [ -n "$rate" ] || { echo "$out" >&2; echo "no round 0 rate in the output above" >&2; return 1; }
    echo "$rate"
}

ratio() { echo "$1 $2" | awk '{ r = $2 > 0 ? $1 / $2 : 0; printf "%.2f", r }'; }

echo "cores: $(nproc); guest $MEM; workers: $WORKERS"
printf "%7s | %-43s | %s\n" "" "copy: round 0, page granularity" "diff: round 0, segment, --shadow full"
printf "%7s | %10s %12s %9s %8s | %10s %12s %9s %8s\n" workers "MiB/s" "memcpy MiB/s" "of limit" "vs 1" \
    "MiB/s" "memcmp MiB/s" "of limit" "vs 1"
copy1=""; diff1=""
for n in $WORKERS; do
    copy=$(round0 "$n" --granularity page)
    diff=$(round0 "$n" --granularity segment --shadow full)
    # Lines "NAME threads N total T GiB/s per thread P GiB/s"; T in MiB/s.
    limits=$("$HPMIG" limits --threads "$n" 2>&1) || { echo "$limits" >&2; exit 1; }
    memcpy=$(echo "$limits" | awk '$1 == "memcpy" && $6 == "GiB/s" {print $5 * 1024}')
    memcmp=$(echo "$limits" | awk '$1 == "memcmp" && $6 == "GiB/s" {print $5 * 1024}')
    [ -n "$memcpy" ] && [ -n "$memcmp" ] || { echo "$limits" >&2; echo "no limits in the output above" >&2; exit 1; }
    [ -n "$copy1" ] || { copy1=$copy; diff1=$diff; }
    printf "%7d | %10.1f %12.1f %9s %7sx | %10.1f %12.1f %9s %7sx\n" "$n" \
        "$copy" "$memcpy" "$(ratio "$copy" "$memcpy")" "$(ratio "$copy" "$copy1")" \
        "$diff" "$memcmp" "$(ratio "$diff" "$memcmp")" "$(ratio "$diff" "$diff1")"
done
