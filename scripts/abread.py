#!/usr/bin/env python3
"""Cold sequential reads through several directories, interleaved: two kvfs mounts served
by two versions of the daemon (an A/B of a change) and a raw directory of the same disk.

On a VM whose cold reads vary 2x from run to run, one run per side tells nothing; this
alternates the sides in every repetition (the order reversed every other one), drops the
page cache before each read, and prints each side's median and every sample.

    # mount the same kind of warehouse twice, each from its own checkout, e.g.
    #   (cd /tmp/old && .venv/bin/python -m kvfs.tools mount /var/tmp/whA /mnt/a)
    #   (cd /work/main && .venv/bin/python -m kvfs.tools mount /var/tmp/whB /mnt/b)
    .venv/bin/python scripts/abread.py --side old=/mnt/a --side new=/mnt/b --side raw=/var/tmp/raw \\
        [--size-mib 32] [--total-mib 512] [--reps 12] [--json]

Files are written once per side (abread-SIZE/ in each directory) and kept for the next run.
Root only (dropping the page cache). Exit status 0, 2 on bad arguments.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvfs.tools.bench import MiB, _files, _read_files, _write_files, drop_caches  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", action="append", required=True, metavar="NAME=DIR",
                    help="a directory to read through (repeat: two or more)")
    ap.add_argument("--size-mib", type=int, default=32, help="file size (default 32)")
    ap.add_argument("--total-mib", type=int, default=512, help="bytes read per repetition and side (default 512)")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sides = dict(s.split("=", 1) for s in args.side if "=" in s)
    if len(sides) != len(args.side) or len(sides) < 2 or not all(os.path.isdir(d) for d in sides.values()):
        ap.error("give two or more --side NAME=DIR, each an existing directory")
    size = args.size_mib * MiB
    count = max(1, args.total_mib // args.size_mib)
    dirs = {name: os.path.join(d, f"abread-{args.size_mib}") for name, d in sides.items()}
    for d in dirs.values():
        if not os.path.isdir(d) or len(os.listdir(d)) != count:
            _write_files(d, size, count, False, 7)
    if not drop_caches():
        ap.error("dropping the page cache needs root")
    samples = {name: [] for name in dirs}
    for rep in range(args.reps):
        for name in (list(dirs) if rep % 2 == 0 else list(reversed(dirs))):
            drop_caches()
            samples[name].append(count * size / 1e6 / _read_files(_files(dirs[name]), False))
    result = {name: {"median_mbps": round(statistics.median(v)), "samples": sorted(round(x) for x in v)}
              for name, v in samples.items()}
    if args.json:
        print(json.dumps({"size_mib": args.size_mib, "files": count, "reps": args.reps, "sides": result}))
    else:
        for name, r in result.items():
            print(f"{name:>12}  median {r['median_mbps']:>6,} MB/s  {r['samples']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
