#!/usr/bin/env bash
# The switch-over's fault campaign in its full mode (>= 200 runs of real
# `hpmig source` and `hpmig dest` processes with a fault at every phase in
# both directions; see tests/campaign.rs), then its table.
# Usage: scripts/fault-campaign.sh [jobs=2]
# Needs /dev/kvm (the micro-VM guest). Writes target/fault-campaign/full.md.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-2}
cargo build --quiet -p hpmig --tests
status=0
HPMIG_CAMPAIGN=full HPMIG_CAMPAIGN_JOBS=$JOBS HPMIG_REQUIRE_KVM=1 \
    cargo test --quiet -p hpmig --test campaign -- --nocapture >/dev/null 2>&1 || status=$?
cat target/fault-campaign/full.md
exit $status
