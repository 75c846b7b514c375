#!/usr/bin/env bash
# --downtime 50ms at 1 GiB: sparse 100k/s and dense 20k/s, uncapped and 1 Gbit/s, 5 runs each.
# Usage: scripts/downtime-target.sh [hpmig binary] > target.csv (about 3 minutes here).
set -u
cd "$(dirname "$0")/.."; HPMIG=${1:-target/release/hpmig}; J=$(mktemp -d)
echo "load,link,run,exit,downtime_ms,converged,target_met,stop"
for load in "sparse 100000" "dense 20000"; do set -- $load
  for bw in none 1Gbit; do
    for r in 1 2 3 4 5; do
      extra=(); [ "$bw" != none ] && extra=(--bandwidth "$bw")
      "$HPMIG" demo --memory 1G --workload "$1" --dirty-rate "$2" --downtime 50ms "${extra[@]}" --json $J/run.json > $J/run.txt 2>&1; rc=$?
      python3 -c "
import json;s=json.load(open('$J/run.json'))['summary'];print(','.join(['$1@$2','$bw','$r','$rc','%.1f'%s['downtime_ms'],str(s['converged']),str(s['downtime_target_met']),s['stop_reason']]))"
    done
  done
done
