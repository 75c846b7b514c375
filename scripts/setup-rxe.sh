#!/usr/bin/env bash
# Soft-RoCE on an ordinary Linux host whose kernel has rdma_rxe: makes an
# rxe device on a network interface so `hpmig ... --rdma rxe0` can be tried
# without RDMA hardware.
#   scripts/setup-rxe.sh add IFACE [NAME]   create NAME (default rxe0) on IFACE, wait for ACTIVE
#   scripts/setup-rxe.sh remove [NAME]      delete it again
#   scripts/setup-rxe.sh status             list the RDMA links
# Needs root and iproute2's `rdma` tool. Machines without rdma_rxe in their
# kernel (like hpmig's CI) use the QEMU harness instead: ci/softroce/run.sh,
# which runs this script inside its VM (POSIX sh, busybox is enough).
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
die() { echo "setup-rxe: $*" >&2; exit 1; }
command -v rdma >/dev/null 2>&1 || die "the 'rdma' tool is missing (apt-get install iproute2)"

cmd=${1:-}
case "$cmd" in
    add)
        iface=${2:-}; name=${3:-rxe0}
        [ -n "$iface" ] || usage
        [ "$(id -u)" -eq 0 ] || die "creating an rxe device needs root"
        [ -e "/sys/class/net/$iface" ] || die "no network interface '$iface' (see: ip link)"
        if rdma link show "$name/1" >/dev/null 2>&1; then
            die "$name exists already ($(rdma link show "$name/1")); remove it first"
        fi
        # rdma_rxe needs the crc32 algorithm without declaring it.
        if [ ! -d /sys/module/rdma_rxe ]; then
            modprobe crc32_generic 2>/dev/null || true
            modprobe rdma_rxe 2>/dev/null || die "this kernel has no rdma_rxe module (modprobe rdma_rxe failed); use ci/softroce/run.sh"
        fi
        rdma link add "$name" type rxe netdev "$iface" || die "rdma link add failed (dmesg may say why)"
        for _ in $(seq 1 40); do
            if rdma link show "$name/1" | grep -q ACTIVE; then
                rdma link show "$name/1"
                echo "setup-rxe: $name is ACTIVE on $iface; try: hpmig devices; hpmig demo --guest emulated --rdma $name"
                exit 0
            fi
            sleep 0.25
        done
        rdma link show "$name/1" || true
        die "$name did not come up ACTIVE within 10 s (is $iface up? ip link set $iface up)"
        ;;
    remove)
        name=${2:-rxe0}
        [ "$(id -u)" -eq 0 ] || die "removing an rxe device needs root"
        rdma link delete "$name" || die "could not delete $name"
        echo "setup-rxe: removed $name"
        ;;
    status)
        rdma link show
        ;;
    *) usage ;;
esac
