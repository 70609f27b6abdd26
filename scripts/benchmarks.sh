#!/usr/bin/env bash
# Regenerate BENCHMARKS.md on this machine: kvfs bench at the standard scale (a few
# minutes; SCALE=full for a directory of 1,000,000 entries), then the floor of any pyfuse3
# filesystem here (scripts/fusefloor.py) for the same client loops. Run as root on a quiet
# machine.
set -euo pipefail
cd "$(dirname "$0")/.."
KVFS_SKIP_CLIENTS=1 bash scripts/setup.sh
SCALE="${SCALE:-standard}"
{
  .venv/bin/kvfs bench --scale "$SCALE" --markdown
  cat <<'TEXT'
## The floor: a pyfuse3 filesystem that does nothing

The same client loops on a FUSE filesystem that does no work at all (names and sizes in a
dict, every read answered from one buffer in memory, nothing stored), mounted with kvfs's
FUSE options and read-ahead, beside the same kind of raw directory, in a second run
(`.venv/bin/python scripts/fusefloor.py`). kvfs does more than it for every request, so
for these workloads kvfs/raw can be no better than null/raw: where the two are close, what
bounds kvfs is the per-request cost of the kernel's FUSE path plus pyfuse3 and trio (and,
for warm reads, the kernel's FUSE page cache), not kvfs's engine.

TEXT
  .venv/bin/python scripts/fusefloor.py --scale "$SCALE" --markdown
  echo
} > BENCHMARKS.md.new
mv BENCHMARKS.md.new BENCHMARKS.md
cat BENCHMARKS.md
