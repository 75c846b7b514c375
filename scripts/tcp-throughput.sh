#!/usr/bin/env bash
# Round-0 throughput of hpmig over TCP on loopback, next to iperf3 with the
# same number of streams, in one run; CPU time per GiB at both ends.
# Usage: scripts/tcp-throughput.sh [memory=1G] [streams=2] [extra source flags...]
# Needs iperf3 (apt-get install iperf3) and a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
MEM=${1:-1G}; STREAMS=${2:-2}; shift 2 || shift $#
HPMIG=${HPMIG:-target/release/hpmig}  # another build: HPMIG=path/to/hpmig
[ -x "$HPMIG" ] || cargo build --release --quiet
command -v iperf3 >/dev/null || { echo "needs iperf3 (apt-get install iperf3)" >&2; exit 1; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

# iperf3, same stream count, 5 s.
ip_port=$(port)
iperf3 -s -1 -B 127.0.0.1 -p "$ip_port" >/dev/null 2>&1 &
sleep 0.5
iperf3 -c 127.0.0.1 -p "$ip_port" -P "$STREAMS" -t 5 -J > "$work/iperf.json"
iperf_bps=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]/8)' "$work/iperf.json")

# hpmig: an idle guest whose every page holds data, page granularity, so round 0 moves all of it.
hp_port=$(port)
"$HPMIG" dest --listen "127.0.0.1:$hp_port" --run-for 200ms ${PREFAULT:+--prefault} > "$work/dest.txt" 2>&1 &
dest=$!
sleep 0.5
"$HPMIG" source --to "127.0.0.1:$hp_port" --memory "$MEM" --contents full --workload idle --granularity page \
    --streams "$STREAMS" --json "$work/src.json" "$@" > "$work/src.txt"
wait "$dest"
python3 - "$work/src.json" "$iperf_bps" "$work/dest.txt" "$work/src.txt" <<'PY'
import json, re, sys
src = json.load(open(sys.argv[1])); iperf = float(sys.argv[2])
r0 = src["rounds"][0]
rate = r0["wire_bytes"] / (r0["duration_ms"] / 1e3)
dest = open(sys.argv[3]).read(); srct = open(sys.argv[4]).read()
dcpu = re.search(r"dest cpu: ([\d.]+) s .*?, ([\d.]+) s per GiB", dest)
scpu = re.search(r"source cpu:\s+([\d.]+) s .*?, ([\d.]+) s per GiB", srct)
print(f"iperf3 (loopback): {iperf/1e6:8.1f} MB/s")
print(f"hpmig round 0:     {rate/1e6:8.1f} MB/s  ({r0['wire_bytes']/2**20:.0f} MiB in {r0['duration_ms']:.0f} ms)")
print(f"ratio hpmig/iperf3: {rate/iperf:.2f}")
print(f"cpu per GiB: source {scpu.group(2)} s, destination {dcpu.group(2)} s (whole migration)")
PY
