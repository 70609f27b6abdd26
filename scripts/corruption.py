#!/usr/bin/env python3
"""Corruption sweep: flip one bit in each of N randomly chosen stored blocks of an unmounted
warehouse, mount it, read every file, and count: every file that holds a damaged block must
fail with EIO (and be dropped), every other file must read back exactly, and fsck must be
clean afterwards (nothing damaged left referenced).

    python scripts/corruption.py --flips 100             # a fresh warehouse of 400 files
    python scripts/corruption.py --flips 20 --files 100 --json   # what the test suite runs

Exit status: 0 all damage detected and nothing wrong served, 1 otherwise, 2 bad arguments.
"""

import argparse
import errno
import json
import os
import random
import subprocess
import sys
import tempfile

KVFS = [sys.executable, "-m", "kvfs.tools"]


def kvfs(*args, check=True):
    res = subprocess.run([*KVFS, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise RuntimeError(f"kvfs {' '.join(map(str, args))} -> {res.returncode}: {res.stderr.strip()}")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flips", type=int, default=100, help="blocks to damage (default 100)")
    p.add_argument("--files", type=int, default=400, help="files to write (default 400)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where the warehouse goes (default: a new temporary directory)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    if args.flips < 1 or args.files < 1:
        p.error("--flips and --files must be at least 1")
    from kvfs import meta as M
    from kvfs.warehouse import Warehouse

    rng = random.Random(args.seed)
    work = args.workdir or tempfile.mkdtemp(prefix="kvfs-corruption-")
    wh, mnt = os.path.join(work, "wh"), os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    kvfs("mkfs", wh, "--force", "--block-size", "64K", "--device", "a.img:256M", "--device", "b.img:256M")
    kvfs("mount", wh, mnt)
    want = {}
    shared = rng.randbytes(64 << 10)  # some files share their first block (dedup)
    try:
        for i in range(args.files):
            data = rng.randbytes(rng.choice([100, 5000, 64 << 10, 150_000, 400_000]))
            if i % 5 == 0:
                data = shared + data
            want[f"f{i:04d}"] = data
            with open(os.path.join(mnt, f"f{i:04d}"), "wb") as f:
                f.write(data)
    finally:
        kvfs("umount", mnt)

    # Damage: one byte of each of `flips` distinct stored blocks, on the device files.
    w = Warehouse(wh, check_only=True)
    try:
        with w.meta.begin() as txn:
            blocks = [(bytes(h), M.BlockRecord.unpack(v)) for h, v in txn.cursor(db=w.meta.db["blocks"])]
            holders: dict[bytes, set] = {}
            for key, h in txn.cursor(db=w.meta.db["bmap"]):
                holders.setdefault(bytes(h), set()).add(M.parse_bmap_key(key)[0])
            names = {ino: name.decode() for (parent, name), ino in
                     ((M.parse_link_key(k)[1:], M.parse_link_key(k)[0]) for k, _ in txn.cursor(db=w.meta.db["links"]))}
        paths = [d.path for d in w.devices.devices]
    finally:
        w.close()
    damaged = rng.sample(blocks, min(args.flips, len(blocks)))
    for h, rec in damaged:
        fd = os.open(paths[rec.dev], os.O_RDWR)
        try:
            at = rec.offset + rng.randrange(rec.stored_len)
            b = os.pread(fd, 1, at)
            os.pwrite(fd, bytes([b[0] ^ (1 << rng.randrange(8))]), at)  # one bit
        finally:
            os.close(fd)
    bad_files = {names[ino] for h, _ in damaged for ino in holders.get(h, ())}

    kvfs("mount", wh, mnt)
    eio, intact, wrong, missed = set(), 0, [], []
    try:
        for name, data in sorted(want.items()):
            try:
                with open(os.path.join(mnt, name), "rb") as f:
                    got = f.read()
            except OSError as exc:
                if exc.errno == errno.EIO:
                    eio.add(name)
                    continue
                if exc.errno == errno.ENOENT and name in bad_files:
                    eio.add(name)  # dropped already: another file's read found the shared block
                    continue
                raise
            if got != data:
                wrong.append(name)
            elif name in bad_files:
                missed.append(name)
            else:
                intact += 1
        stat = json.loads(kvfs("stat", mnt, "--json").stdout)
        gone = [n for n in eio if os.path.exists(os.path.join(mnt, n))]
    finally:
        kvfs("umount", mnt)
    fsck = json.loads(kvfs("fsck", wh, "--json", "--verify-data", check=False).stdout)
    summary = {
        "flips": len(damaged), "files": len(want), "files_with_damage": len(bad_files),
        "refused_with_eio": len(eio & bad_files), "refused_but_intact": sorted(eio - bad_files),
        "damage_not_detected": missed, "wrong_bytes": wrong, "intact_files_read_back": intact,
        "still_listed_after_eio": gone, "corrupt_blocks_counted": stat["counters"].get("corrupt_blocks", 0),
        "quarantined_files": stat["counters"].get("quarantined_files", 0), "fsck_clean": fsck["clean"],
        "seed": args.seed,
    }
    ok = (not wrong and not missed and not summary["refused_but_intact"] and not gone
          and summary["refused_with_eio"] == len(bad_files) and fsck["clean"])
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"corruption: {summary['flips']} blocks damaged (one bit each), held by {len(bad_files)} of "
              f"{len(want)} files: {summary['refused_with_eio']} refused with EIO and dropped, "
              f"{len(missed)} undetected, {len(wrong)} wrong reads, {intact} intact files read back; "
              f"kvfs stat counted {summary['corrupt_blocks_counted']} corrupt blocks; fsck "
              + ("clean" if fsck["clean"] else f"NOT clean: {fsck['problems'][:5]}") + (": PASS" if ok else ": FAIL"))
    if ok and not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
