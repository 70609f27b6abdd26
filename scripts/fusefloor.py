#!/usr/bin/env python3
"""The floor under any pyfuse3 filesystem on this machine, for kvfs bench's rows that miss
their targets: a filesystem that does no work at all (names and sizes in a dict, every
read answered from one buffer in memory, nothing stored) mounted with kvfs's FUSE options
and read-ahead, measured with the same client loops as `kvfs bench` beside a plain
directory of the disk, alternating, in the same run.

kvfs does more than this filesystem for every request (LMDB, devices, hashing), so for
these workloads kvfs/raw can be no better than null/raw: that ratio is the ceiling of the
pyfuse3 + trio design on this machine, not of kvfs's engine.

    .venv/bin/python scripts/fusefloor.py [--scale quick|standard|full] [--dir /var/tmp] [--markdown]

Root only (mounting; cold reads drop the page cache). Exit status 0, 1 if the null
filesystem could not be mounted, 2 on bad arguments or without root.
"""

import argparse
import errno
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvfs.tools.bench import (MiB, SCALES, _files, _read_files, _write_files, create_rate,  # noqa: E402
                        drop_caches, lookup_names, miss_rate, stat_rate)

READ_BUF = memoryview(os.urandom(4 * MiB))


def serve(mountpoint: str) -> None:
    """Run the null filesystem on mountpoint until it is unmounted."""
    import pyfuse3
    import trio

    from kvfs.fs import ATTR_TIMEOUT, ENTRY_TIMEOUT
    from kvfs.mount import raise_read_ahead

    class Null(pyfuse3.Operations):
        def __init__(self):
            super().__init__()
            self.names: dict[tuple[int, bytes], int] = {}
            self.children: dict[int, list[bytes]] = {pyfuse3.ROOT_INODE: []}
            self.nodes: dict[int, list[int]] = {pyfuse3.ROOT_INODE: [stat.S_IFDIR | 0o755, 0]}  # mode, size
            self.next_ino = pyfuse3.ROOT_INODE + 1

        def _entry(self, ino: int) -> pyfuse3.EntryAttributes:
            mode, size = self.nodes[ino]
            e = pyfuse3.EntryAttributes()
            e.st_ino = ino
            e.entry_timeout = ENTRY_TIMEOUT
            e.attr_timeout = ATTR_TIMEOUT
            e.st_mode = mode
            e.st_nlink = 2 if stat.S_ISDIR(mode) else 1
            e.st_size = size
            e.st_blksize = MiB
            return e

        def _add(self, parent: int, name: bytes, mode: int) -> pyfuse3.EntryAttributes:
            if (parent, name) in self.names:
                raise pyfuse3.FUSEError(errno.EEXIST)
            ino = self.next_ino
            self.next_ino += 1
            self.names[parent, name] = ino
            self.children[parent].append(name)
            self.nodes[ino] = [mode, 0]
            if stat.S_ISDIR(mode):
                self.children[ino] = []
            return self._entry(ino)

        async def lookup(self, parent_inode, name, ctx=None):
            ino = self.names.get((parent_inode, name))
            if ino is None:
                e = pyfuse3.EntryAttributes()
                e.st_ino = 0
                e.entry_timeout = ENTRY_TIMEOUT
                return e
            return self._entry(ino)

        async def getattr(self, inode, ctx=None):
            return self._entry(inode)

        async def setattr(self, inode, attr, fields, fh, ctx):
            if fields.update_size:
                self.nodes[inode][1] = attr.st_size
            return self._entry(inode)

        async def mkdir(self, parent_inode, name, mode, ctx):
            return self._add(parent_inode, name, stat.S_IFDIR | mode)

        async def create(self, parent_inode, name, mode, flags, ctx):
            e = self._add(parent_inode, name, stat.S_IFREG | (mode & 0o7777))
            return pyfuse3.FileInfo(fh=e.st_ino, keep_cache=True), e

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh, off, size):
            n = max(0, min(size, self.nodes[fh][1] - off, len(READ_BUF)))
            return READ_BUF[:n]

        async def write(self, fh, off, buf):
            node = self.nodes[fh]
            node[1] = max(node[1], off + len(buf))
            return len(buf)

        async def flush(self, fh):
            pass

        async def fsync(self, fh, datasync):
            pass

        async def release(self, fh):
            pass

        async def opendir(self, inode, ctx):
            return inode

        async def readdir(self, fh, start_id, token):
            names = self.children[fh]
            for i in range(start_id, len(names)):
                if not pyfuse3.readdir_reply(token, names[i], self._entry(self.names[fh, names[i]]), i + 1):
                    break

        async def releasedir(self, fh):
            pass

        async def statfs(self, ctx):
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 4096
            s.f_namemax = 255
            return s

    pyfuse3.init(Null(), mountpoint, set(pyfuse3.default_options) | {"fsname=nullfs", "subtype=null"})
    raise_read_ahead(mountpoint)
    try:
        trio.run(pyfuse3.main)
    except BaseException:  # (SIGINT, from the terminal or from a parent that died)
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=False)  # (unmounted by the parent: main returned)


def _interrupt_when_parent_dies() -> None:
    """In the server (preexec_fn): SIGINT when the measuring process dies, so that the
    server unmounts instead of leaving a mount nobody serves."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


def _unmount(mnt: str) -> None:
    from kvfs.errors import QuietError
    from kvfs.mounttab import fusermount_unmount

    for lazy in (False, True):  # busy or dead: detach it
        try:
            fusermount_unmount(mnt, lazy)
            return
        except QuietError:
            if not os.path.ismount(mnt):
                return


def measure(args) -> list[tuple[str, str, float, float]]:
    scale = SCALES[args.scale]
    base = tempfile.mkdtemp(prefix="kvfs-floor-", dir=args.dir)
    mnt, raw = os.path.join(base, "mnt"), os.path.join(base, "raw")
    os.makedirs(mnt)
    os.makedirs(raw)
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", mnt],
                              preexec_fn=_interrupt_when_parent_dies)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if server.poll() is not None or time.monotonic() > deadline:
                print("fusefloor: the null filesystem did not mount", file=sys.stderr)
                sys.exit(1)
            time.sleep(0.05)
        sides = {"raw": raw, "null": mnt}
        rows = []
        res: dict[str, dict[str, list[float]]] = {}

        def add(name, side, value):
            res.setdefault(name, {"raw": [], "null": []})[side].append(value)

        n = scale.entries
        for side, d in sides.items():
            add(f"create, directory of {n:,} entries", side, create_rate(os.path.join(d, "meta"), n))
        size = 32 * MiB
        count = max(2, scale.total // size)
        small = max(2, scale.total // (2 * MiB))
        for side, d in sides.items():
            _write_files(os.path.join(d, "seq"), size, count, False, 1)
            _write_files(os.path.join(d, "small"), 2 * MiB, small, False, 2)
        for rep in range(scale.reps):
            names, missing = lookup_names(n, scale.lookups, rep)
            for side in (("raw", "null") if rep % 2 == 0 else ("null", "raw")):
                d = sides[side]
                drop_caches()
                add(f"lookup hit in {n:,} entries, cold", side, stat_rate(os.path.join(d, "meta"), names))
                add(f"lookup miss in {n:,} entries", side, miss_rate(os.path.join(d, "meta"), missing))
                drop_caches()
                paths = _files(os.path.join(d, "seq"))
                add("read 32 MiB files, cold", side, count * size / 1e6 / _read_files(paths, False))
                add("read 32 MiB files, warm", side, count * size / 1e6 / _read_files(paths, False))
                paths = _files(os.path.join(d, "small"))
                _read_files(paths, False)
                add("read 2 MiB files, warm", side, small * 2 * MiB / 1e6 / _read_files(paths, False))
        for name, v in res.items():
            rows.append((name, "MB/s" if "read" in name else "ops/s",
                         statistics.median(v["raw"]), statistics.median(v["null"])))
        return rows
    finally:
        _unmount(mnt)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            _unmount(mnt)
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="standard")
    ap.add_argument("--dir", default="/var/tmp", help="where the raw directory and mount point go (the disk under test)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--serve", metavar="MOUNTPOINT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    if not drop_caches():
        ap.error("dropping the page cache needs root (cold reads would be warm ones)")
    rows = measure(args)
    if args.markdown:
        print("| workload | unit | raw | null pyfuse3 | null/raw |")
        print("|---|---|---:|---:|---:|")
        for name, unit, raw, null in rows:
            print(f"| {name} | {unit} | {raw:,.0f} | {null:,.0f} | {null / raw:.2f} |")
    else:
        for name, unit, raw, null in rows:
            print(f"{name:40} {unit:6} raw {raw:>12,.0f}  null pyfuse3 {null:>12,.0f}  null/raw {null / raw:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
