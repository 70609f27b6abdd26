#!/usr/bin/env bash
# Regenerate BENCHMARKS.md on this machine: kvfs bench at the standard scale (a few
# minutes; SCALE=full for a directory of 1,000,000 entries). Run as root on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
KVFS_SKIP_CLIENTS=1 bash scripts/setup.sh
.venv/bin/kvfs bench --scale "${SCALE:-standard}" --markdown > BENCHMARKS.md.new
mv BENCHMARKS.md.new BENCHMARKS.md
cat BENCHMARKS.md
