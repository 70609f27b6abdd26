"""Several processes on one mount at once: the vLLM filesystem-tier pattern on shared names."""

import hashlib
import os
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent('''
    import errno, hashlib, mmap, os, random, sys, time
    root, seed, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    rng = random.Random(seed)

    def content(key):
        r = random.Random(key)
        return r.randbytes(r.choice([4096, 65536, 1 << 20, (2 << 20) + 4096]))

    stats = {"written": 0, "exists": 0, "read": 0, "excl_lost": 0}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        key = f"{rng.randrange(64):02x}"
        dest = os.path.join(root, key[0], key + ".bin")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.exists(dest):
            stats["exists"] += 1
            try:
                fd = os.open(dest, os.O_RDONLY | os.O_DIRECT)
            except FileNotFoundError:  # another worker unlinked it in between
                continue
            size = os.fstat(fd).st_size
            buf = mmap.mmap(-1, max(size, 4096))
            n = os.readv(fd, [buf])
            os.close(fd)
            assert n == size and buf[:n] == content(key), f"wrong bytes in {dest}"
            stats["read"] += 1
            if rng.random() < 0.1:
                try:
                    os.unlink(dest)
                except FileNotFoundError:
                    pass
            continue
        data = content(key)
        tmp = f"{dest}_{seed}_{rng.getrandbits(32):08x}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_TRUNC | os.O_DIRECT, 0o644)
        except FileExistsError:
            stats["excl_lost"] += 1
            continue
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        assert os.write(fd, buf) == len(data)
        os.close(fd)
        os.replace(tmp, dest)
        stats["written"] += 1
    print(stats)
''')


def test_four_processes_vllm_pattern(mnt, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = mnt.p("vllm")
    os.mkdir(root)
    procs = [subprocess.Popen([sys.executable, str(script), root, str(k), "6"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    totals = [eval(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sum(t["written"] for t in totals) > 5 and sum(t["read"] for t in totals) > 5, totals
    # No temp file is left over and every published file holds exactly its bytes.
    for dirpath, _, files in os.walk(root):
        for name in files:
            assert not name.endswith(".tmp"), name
    mnt.remount()
    import random

    for dirpath, _, files in os.walk(root):
        for name in files:
            key = name[:-4]
            r = random.Random(key)
            expect = r.randbytes(r.choice([4096, 65536, 1 << 20, (2 << 20) + 4096]))
            with open(os.path.join(dirpath, name), "rb") as f:
                assert hashlib.sha256(f.read()).digest() == hashlib.sha256(expect).digest(), name


REPUBLISHER = textwrap.dedent('''
    import os, random, sys, time
    root, wid, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    rng = random.Random(wid)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        name = f"n{rng.randrange(200):03d}"
        tmp = os.path.join(root, f".tmp.{wid}.{n}")
        with open(tmp, "wb") as f:
            f.write(name.encode())
        os.replace(tmp, os.path.join(root, name))
        n += 1
    print(n)
''')


def test_listing_during_rename_over_shows_each_name_once(mnt, tmp_path):
    """A name that a rename replaces never stops existing, so a listing taken meanwhile
    shows it exactly once (the entry keeps its place: its readdir offset)."""
    root = mnt.p("d")
    os.mkdir(root)
    names = [f"n{i:03d}" for i in range(200)]
    for name in names:
        with open(os.path.join(root, name), "wb") as f:
            f.write(name.encode())
    script = tmp_path / "republisher.py"
    script.write_text(REPUBLISHER)
    procs = [subprocess.Popen([sys.executable, str(script), root, str(k), "4"], stdout=subprocess.PIPE, text=True)
             for k in range(3)]
    listings = 0
    try:
        while procs[0].poll() is None:
            seen = [n for n in os.listdir(root) if not n.startswith(".tmp.")]
            assert sorted(seen) == names, sorted(n for n in set(seen) if seen.count(n) > 1)
            listings += 1
    finally:
        outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert listings > 5 and sum(int(o) for o in outs) > 500, (listings, outs)
    for name in names:
        assert open(os.path.join(root, name), "rb").read() == name.encode()
