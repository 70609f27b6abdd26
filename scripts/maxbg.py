"""Does raising the FUSE connection's max_background help several readers of a mount?

Makes and mounts a file-backed warehouse in --dir, writes N files of distinct random data,
then reads them all at once with N threads, cold (page cache dropped: run as root), with
the connection's max_background at what the kernel negotiated and at a raised value,
alternating, and prints the medians. Run from the checkout: .venv/bin/python scripts/maxbg.py
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from kvfs.tools.bench import drop_caches

KVFS = [sys.executable, "-m", "kvfs.tools"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp", help="where the warehouse goes (the disk under test)")
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--mib", type=int, default=192, help="MiB per file")
    ap.add_argument("--raised", type=int, default=64, help="the max_background to compare with")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    base = tempfile.mkdtemp(dir=args.dir, prefix="maxbg-")
    wh, mp = f"{base}/wh", f"{base}/mnt"
    os.mkdir(mp)
    subprocess.run(KVFS + ["mkfs", wh, "--size", str((args.readers * args.mib + 512) << 20)], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(KVFS + ["mount", wh, mp], check=True)
    try:
        size = args.mib << 20
        for i in range(args.readers):
            with open(f"{mp}/f{i}", "wb") as f:
                f.write(os.urandom(size))
        ctl = f"/sys/fs/fuse/connections/{os.minor(os.stat(mp).st_dev)}/max_background"
        orig = open(ctl).read().strip()

        def run() -> float:
            if not drop_caches():
                sys.exit("maxbg: cannot drop the page cache (run as root)")

            def read(i):
                fd = os.open(f"{mp}/f{i}", os.O_RDONLY)
                while os.read(fd, 1 << 20):
                    pass
                os.close(fd)
            threads = [threading.Thread(target=read, args=(i,)) for i in range(args.readers)]
            t = time.monotonic()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            return args.readers * size / (time.monotonic() - t) / 1e9

        res: dict[str, list[float]] = {}
        try:
            for _ in range(args.reps):
                for value in (orig, str(args.raised)):
                    with open(ctl, "w") as f:
                        f.write(value)
                    res.setdefault(value, []).append(run())
        finally:
            with open(ctl, "w") as f:
                f.write(orig)
        for value, v in res.items():
            print(f"max_background {value}: {args.readers} cold readers {statistics.median(v):.2f} GB/s "
                  f"(runs {', '.join(f'{x:.2f}' for x in v)})")
    finally:
        subprocess.run(KVFS + ["umount", mp])
        subprocess.run(["rm", "-rf", base])
    return 0


if __name__ == "__main__":
    sys.exit(main())
