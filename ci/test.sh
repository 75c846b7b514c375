#!/usr/bin/env bash
# hpmig's test command (the README names it): installs what it needs when it
# is missing, then checks formatting, lints, runs every test and a smoke run
# of the demo. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Rust toolchain: cargo with rustfmt and clippy.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "ci/test.sh: cargo not found; install Rust (https://rustup.rs) and run again" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        step "installing $component"
        rustup component add "$component"
    fi
done

# System packages: a C compiler for the -sys crates; rdma-core's headers
# and libclang for the RDMA transport (`--features rdma`, rdma-sys/bindgen).
apt_need=()
command -v cc >/dev/null 2>&1 || apt_need+=(build-essential)
command -v ip >/dev/null 2>&1 || apt_need+=(iproute2)
for p in libibverbs-dev librdmacm-dev libclang-dev clang qemu-system-x86; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || apt_need+=("$p")
done
if [ ${#apt_need[@]} -gt 0 ]; then
    step "installing ${apt_need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${apt_need[@]}"
fi

# KVM tests must not skip where /dev/kvm exists, nor the QEMU tests
# (tests/bench_signals.rs), whose qemu-system-x86 is installed above.
if [ -e /dev/kvm ]; then
    export HPMIG_REQUIRE_KVM=1
    export HPMIG_REQUIRE_QEMU=1
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -D warnings (default build, then with RDMA)"
cargo clippy --workspace --all-targets -- -D warnings
rdma_features=(--features hpmig/rdma,hpmig-transport-rdma/rdma)
cargo clippy --workspace --all-targets "${rdma_features[@]}" -- -D warnings

step "cargo test --workspace"
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT
cargo test --workspace 2>&1 | tee "$test_log"

step "cargo test with the RDMA transport built: its unit tests here, its device tests in the soft-RoCE VM below"
# The tests/ executables need a verbs device; run here they would only say
# so. The harness runs them with HPMIG_RDMA_DEVICE=rxe0, where they cannot skip.
cargo test -p hpmig-transport-rdma --features rdma --lib 2>&1 | tee -a "$test_log"

step "benchmarks build"
cargo bench --workspace --no-run

step "demo smoke run (release build)"
cargo run --release --quiet -- demo --memory 64M --warmup 100ms --dirty-rate 100000

step "source and destination on two hosts (network namespaces)"
bash ci/two-hosts.sh target/release/hpmig --zstd auto

step "benchmark matrix smoke run (hpmig bench --quick): the output must be complete"
bench_out=$(mktemp -d)
target/release/hpmig bench --quick --out "$bench_out"
rows=$(($(wc -l < "$bench_out/bench.csv") - 1))
[ "$rows" -eq 12 ] || { echo "bench.csv has $rows cells, expected 12" >&2; exit 1; }
python3 - "$bench_out/bench.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert d["schema"] == 2, d["schema"]
assert len(d["cells"]) == 12 and all(len(c["runs"]) == 3 for c in d["cells"]), "incomplete bench.json"
for c in d["cells"]:
    assert c["contents"] == "full", c["contents"]
    for r in c["runs"]:
        # Every run: bytes counted on the shaped link, a one-clock downtime
        # and a brownout; the memory budgets written.
        assert r["link_emulation"] == "veth-tbf" and r["link_tx_bytes"] > 0, r
        assert r["total_bytes"] == r["link_tx_bytes"] + r["link_rx_bytes"], r
        assert r["downtime_ms"] is not None and r["brownout"] is not None, r
        assert "shadow_bytes" in r and "xbzrle_cache_bytes" in r, r
        # The run's peak memory: both ends' guests at least, and the shadow.
        assert r["peak_rss_bytes"] >= 2 * c["memory_bytes"] + r["shadow_bytes"], r
print("quick matrix complete: 12 cells x 3 runs, link-counted")
PY
# The quick matrix's guests are 64 MiB: one figure set, named for the size;
# --replot must draw the same set again from bench.json alone.
check_plots() {
    for plot in bytes_per_round time_vs_link paper; do
        grep -q "<svg" "$bench_out/$plot-64M.svg" || { echo "plot $plot-64M.svg missing $1" >&2; exit 1; }
    done
}
check_plots "after the run"
rm "$bench_out"/*.svg
target/release/hpmig bench --replot "$bench_out"
check_plots "after --replot"
rm -rf "$bench_out"

step "QEMU as the peer (hpmig bench --peer, one run per cell): every QEMU mode must complete"
peer_out=$(mktemp -d)
target/release/hpmig bench --peer --repeats 1 --peer-memory 64M --out "$peer_out"
python3 - "$peer_out/bench.json" <<'PY'
import json, sys
cells = json.load(open(sys.argv[1]))["cells"]
names = sorted({c["variant"] for c in cells})
assert names == ["page", "qemu", "qemu-multifd", "qemu-xbzrle", "qemu-xbzrle-1/8", "segment", "segment-fp"], names
assert len(cells) == 14 and all(len(c["runs"]) == 1 for c in cells), "a run failed"
# Each delta method at its memory budget: the full shadow and xbzrle at the
# guest's size, the fingerprints and the bounded xbzrle at 1/8 of it.
budget = {c["variant"]: c["runs"][0]["shadow_bytes"] + c["runs"][0]["xbzrle_cache_bytes"] for c in cells}
mem = cells[0]["memory_bytes"]
assert budget["segment"] == mem and budget["qemu-xbzrle"] == mem, budget
assert budget["segment-fp"] == mem // 8 and budget["qemu-xbzrle-1/8"] == mem // 8, budget
# At 10 Gbit/s a 64 MiB guest at 100k stores/s converges whatever the method.
assert all(c["runs"][0]["converged"] for c in cells if c["link"] == "10Gbit"), "a 10 Gbit/s run did not converge"
# Every run finished with a downtime on one clock (QEMU: STOP on the source
# to RESUME on the destination), a blackout, and bytes counted on the link.
for c in cells:
    r = c["runs"][0]
    for k in ("downtime_ms", "blackout_ms", "brownout", "link_tx_bytes"):
        assert r[k] is not None, (c["variant"], c["link"], k, r)
    if c["variant"].startswith("qemu"):
        assert r["tool_downtime_ms"] is not None, r
print("peer comparison complete:", len(cells), "cells")
PY
rm -rf "$peer_out"

step "soft-RoCE harness: RDMA tests and migrations on a real rxe device in a QEMU VM"
softroce_log=$(mktemp)
bash ci/softroce/run.sh --cache "${HPMIG_SOFTROCE_CACHE:-$HOME/.cache/hpmig-softroce}" | tee "$softroce_log"
# Its tests count in the closing line like the host's.
grep -a '^test result:' "$softroce_log" >> "$test_log" || true
rm -f "$softroce_log"

step "fuzzing: every target for about a minute"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
if rustup toolchain list 2>/dev/null | grep -q nightly; then
    fuzz=(cargo +nightly fuzz)
else
    fuzz=(env RUSTC_BOOTSTRAP=1 cargo fuzz)
fi
for target in records handshake apply; do
    (cd fuzz && "${fuzz[@]}" run "$target" "corpus/$target" -- -max_total_time=60 -rss_limit_mb=2048 2>&1 | grep -E "^Done|DONE|ERROR|panicked|SUMMARY")
done

# One closing line over every test binary (cargo prints one line per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "\n%d passed, %d failed\n", p, f }' "$test_log"
