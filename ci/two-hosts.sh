#!/usr/bin/env bash
# Migrates a guest between two "hosts": two network namespaces joined by a
# veth pair, each with its own address (they exist only inside the
# namespaces this script creates, and are removed at the end). Needs root
# and iproute2. Usage: ci/two-hosts.sh [path/to/hpmig] [extra source flags]
set -euo pipefail
cd "$(dirname "$0")/.."
HPMIG=${1:-target/release/hpmig}
shift || true
EXTRA=("$@")
[ -x "$HPMIG" ] || { echo "two-hosts: $HPMIG not built (cargo build --release)" >&2; exit 1; }
command -v ip >/dev/null || { echo "two-hosts: needs iproute2 (apt-get install iproute2)" >&2; exit 1; }

SRC=hpmig-src-$$ DST=hpmig-dst-$$
SRC_IP=10.231.$((RANDOM % 250)).1 ; DST_IP=${SRC_IP%.1}.2
PORT=7790
TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
cleanup() {
    ip netns pids "$DST" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$SRC" 2>/dev/null || true
    ip netns del "$DST" 2>/dev/null || true
}
trap cleanup EXIT

ip netns add "$SRC"
ip netns add "$DST"
ip link add "veth-s$$" netns "$SRC" type veth peer name "veth-d$$" netns "$DST"
ip -n "$SRC" addr add "$SRC_IP/24" dev "veth-s$$"
ip -n "$DST" addr add "$DST_IP/24" dev "veth-d$$"
for ns in "$SRC" "$DST"; do
    ip -n "$ns" link set lo up
done
ip -n "$SRC" link set "veth-s$$" up
ip -n "$DST" link set "veth-d$$" up

echo "two-hosts: source $SRC_IP ($SRC), destination $DST_IP ($DST)"
dest_log=$(mktemp)
journal=$(mktemp -d)
HPMIG_TOKEN=$TOKEN ip netns exec "$DST" timeout 120 "$HPMIG" dest --listen "$DST_IP:$PORT" --run-for 500ms \
    --once --journal "$journal" >"$dest_log" 2>&1 &
dest_pid=$!
for _ in $(seq 50); do
    grep -q "waiting for one migration" "$dest_log" && break
    sleep 0.1
done
set +e
HPMIG_TOKEN=$TOKEN ip netns exec "$SRC" timeout 120 "$HPMIG" source --to "$DST_IP:$PORT" --memory 64M --warmup 200ms \
    --dirty-rate 100000 "${EXTRA[@]}"
src_rc=$?
wait "$dest_pid"
dst_rc=$?
set -e
echo "--- destination ---"
cat "$dest_log"
rm -rf "$dest_log" "$journal"
if [ "$src_rc" -ne 0 ] || [ "$dst_rc" -ne 0 ]; then
    echo "two-hosts: FAILED (source exit $src_rc, destination exit $dst_rc)"
    exit 1
fi
echo "two-hosts: migrated across namespaces, verified, guest runs on"
