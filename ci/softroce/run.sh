#!/usr/bin/env bash
# Soft-RoCE harness: runs hpmig's RDMA tests and an RDMA migration on a real
# rxe device inside a QEMU VM (software emulation) booting Debian's kernel.
# See ci/softroce/README.md. Usage:
#   ci/softroce/run.sh [--cache DIR] [--timeout SECONDS] [--throughput-only]
# --throughput-only skips the conformance tests and demos: the VM runs only
# ib_write_bw, hpmig pump, round 0 and the registration timing.
# Exits non-zero when the VM does not boot, rxe0 does not come up ACTIVE,
# any step fails, or the run times out. Its last line: "N passed, N failed".
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/ci/softroce"
CACHE=${HPMIG_SOFTROCE_CACHE:-$HOME/.cache/hpmig-softroce}
TIMEOUT=${HPMIG_SOFTROCE_TIMEOUT:-900}
APPEND_MODE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cache) CACHE=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --throughput-only) APPEND_MODE=" hpmig.throughput-only"; shift ;;
        *) echo "usage: $0 [--cache DIR] [--timeout SECONDS] [--throughput-only]" >&2; exit 2 ;;
    esac
done
mkdir -p "$CACHE"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hpmig-softroce.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
say() { echo "softroce: $*"; }

# 1. Host packages (the VM's userspace comes from them).
PKGS="qemu-system-x86 busybox-static cpio kmod iproute2 rdma-core ibverbs-providers
      ibverbs-utils libibverbs-dev librdmacm-dev perftest clang libclang-dev"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    say "installing:$missing"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# 2. The guest kernel: the package linux-image-amd64 depends on, cached.
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$KPKG" ] || { say "cannot find the kernel package linux-image-amd64 depends on"; exit 1; }
DEB=$(ls "$CACHE"/"$KPKG"_*.deb 2>/dev/null | head -1 || true)
if [ -z "$DEB" ]; then
    say "downloading $KPKG"
    (cd "$CACHE" && apt-get download -qq "$KPKG" >/dev/null)
    DEB=$(ls "$CACHE"/"$KPKG"_*.deb | head -1)
fi
KROOT="$CACHE/kernel-$(basename "$DEB" .deb)"
if [ ! -d "$KROOT/lib/modules" ]; then
    rm -rf "$KROOT.tmp"; mkdir -p "$KROOT.tmp"
    dpkg-deb -x "$DEB" "$KROOT.tmp"
    mv "$KROOT.tmp" "$KROOT"
fi
KVER=$(ls "$KROOT/lib/modules" | head -1)
depmod -b "$KROOT" "$KVER"
VMLINUZ="$KROOT/boot/vmlinuz-$KVER"

# 3. Host-built binaries: the transport-rdma test executables and hpmig.
say "building the RDMA tests and hpmig (release, --features rdma)"
cd "$ROOT"
TESTS=$(cargo test --release -p hpmig-transport-rdma --features rdma --no-run \
        --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])')
cargo build --release --features rdma --bin hpmig -q
[ -n "$TESTS" ] || { say "no RDMA test executables were built"; exit 1; }

# 4. The initramfs.
IR="$WORK/root"
mkdir -p "$IR"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc/libibverbs.d,lib/modules,harness}
cp /bin/busybox "$IR/bin/busybox"
# Modules in dependency order; crc32_generic first (rdma_rxe needs the crc32
# algorithm but does not declare it).
: > "$IR/modules.order"
for m in dummy crc32_generic rdma_rxe; do
    modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | awk '$1=="insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
    name=$(basename "$ko")
    case "$ko" in
        *.xz) xz -dc "$ko" > "$IR/lib/modules/${name%.xz}"; name=${name%.xz} ;;
        *.zst) zstd -qdc "$ko" > "$IR/lib/modules/${name%.zst}"; name=${name%.zst} ;;
        *) cp "$ko" "$IR/lib/modules/$name" ;;
    esac
    echo "$name" >> "$IR/modules.order"
done
copy_bin() { # copy a program and the shared libraries it loads
    local src=$1 dst=$2
    mkdir -p "$(dirname "$IR/$dst")"; cp -L "$src" "$IR/$dst"
    ldd "$src" 2>/dev/null | awk '/=>/ {print $3} /^\t\// {print $1}' | while read -r lib; do
        [ -f "$lib" ] && { mkdir -p "$IR$(dirname "$lib")"; cp -Ln "$lib" "$IR$lib"; }
    done
}
for b in /usr/bin/ibv_devinfo /usr/bin/ib_write_bw /sbin/rdma /bin/ip; do
    [ -x "$b" ] || b=$(command -v "$(basename "$b")")
    copy_bin "$b" "/usr/bin/$(basename "$b")"
done
PROVIDER=$(ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so | head -1)
copy_bin "$PROVIDER" "$PROVIDER"
cp /etc/libibverbs.d/rxe.driver "$IR/etc/libibverbs.d/"
copy_bin "$ROOT/target/release/hpmig" /usr/bin/hpmig
i=0
for t in $TESTS; do
    copy_bin "$t" "/harness/test$i-$(basename "$t" | sed 's/-[0-9a-f]*$//')"
    i=$((i + 1))
done
cp "$HERE/init" "$IR/init"; chmod +x "$IR/init"
cp "$ROOT/scripts/setup-rxe.sh" "$IR/harness/setup-rxe.sh"
(cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.gz"
say "initramfs: $(du -h "$WORK/initrd.gz" | cut -f1), kernel $KVER, prepared in $(( $(date +%s) - START )) s"

# 5. Boot it.
LOG="$WORK/serial.log"
set +e
timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 3072 \
    -nographic -no-reboot -nic none \
    -kernel "$VMLINUZ" -initrd "$WORK/initrd.gz" \
    -append "console=ttyS0 quiet panic=-1 oops=panic$APPEND_MODE" 2>&1 | tee "$LOG" | grep --line-buffered -E '^(HARNESS|test |softroce|.*(passed|failed|ratio|MB/s|Gbit))'
rc=${PIPESTATUS[0]}
set -e
cp "$LOG" "$CACHE/last-serial.log" 2>/dev/null || true
say "VM ran $(( $(date +%s) - START )) s in all (serial log: $CACHE/last-serial.log)"
if [ "$rc" -eq 124 ]; then
    say "TIMEOUT after $TIMEOUT s"; echo "0 passed, 1 failed"; exit 1
fi
summary=$(grep -a '^HARNESS summary:' "$LOG" | tail -1 || true)
if [ -z "$summary" ]; then
    say "the VM gave no summary (did it boot? see the serial log)"; echo "0 passed, 1 failed"; exit 1
fi
passed=$(echo "$summary" | sed -E 's/.* ([0-9]+) passed.*/\1/')
failed=$(echo "$summary" | sed -E 's/.* ([0-9]+) failed.*/\1/')
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
