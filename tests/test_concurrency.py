"""Several processes on one mount at once: the vLLM filesystem-tier pattern on shared names,
and 16 processes racing on the same few names."""

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import pid_alive, run_kvfs

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


# -- 16 processes racing on the same few names ----------------------------------------------

RACER = textwrap.dedent('''
    import ctypes, errno, hashlib, json, mmap, os, random, struct, sys, time
    root, wid, seconds, start_at, progress = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \\
        float(sys.argv[4]), sys.argv[5]
    libc = ctypes.CDLL(None, use_errno=True)
    RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
    HDR = struct.Struct(">8sIIQ32s")  # magic, writer, sequence number, body length, sha256(body)
    MAGIC = b"KVFSRACE"
    SIZES = [0, 1, 4000, 65536 - HDR.size, 65536, 100_000, 300_001, 1 << 20]
    TARGETS = [os.path.join(root, "shared", f"t{k}") for k in range(4)]
    SLOT = 0.02  # seconds: every process races for one O_EXCL name per slot

    def payload(w, seq):
        rng = random.Random(w * 1_000_003 + seq)
        body = rng.randbytes(rng.choice(SIZES))
        return HDR.pack(MAGIC, w, seq, len(body), hashlib.sha256(body).digest()) + body

    rng = random.Random(wid)
    stats = {"ops": 0, "published": 0, "noreplace_won": 0, "noreplace_lost": 0, "verified": 0,
             "absent": 0, "unlinked": 0, "stolen": 0, "exchanged": 0, "linked": 0, "listed": 0}
    errors = []
    excl = {}  # round -> won?
    seq = 0

    def error(op, what):
        if len(errors) < 20:
            errors.append(f"{op}: {what}")

    def verify(data, where):
        """A complete payload of some writer: never a mix, never torn."""
        if len(data) < HDR.size:
            return error("verify", f"{where}: {len(data)} bytes, shorter than a header")
        magic, w, s, n, digest = HDR.unpack_from(data)
        if magic != MAGIC or len(data) != HDR.size + n or hashlib.sha256(data[HDR.size:]).digest() != digest:
            return error("verify", f"{where}: torn or foreign bytes ({len(data)} bytes, header {w}/{s}/{n})")
        if data != payload(w, s):
            return error("verify", f"{where}: bytes differ from writer {w}'s write {s}")
        stats["verified"] += 1

    def read_whole(path, how):
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if how == "direct" else 0))
        try:
            size = os.fstat(fd).st_size
            if how == "mmap" and size:
                with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
                    return bytes(m)
            if how == "direct":
                buf = mmap.mmap(-1, max(4096, (size + 4096) // 4096 * 4096))
                n = os.readv(fd, [buf])
                return bytes(buf[:n])
            chunks = []
            while chunk := os.read(fd, rng.choice([4096, 65536, 1 << 20])):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write_tmp(data):
        global seq
        tmp = os.path.join(root, "shared", f".tmp.{wid}.{seq}")
        direct = rng.random() < 0.3
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | (os.O_DIRECT if direct else 0), 0o644)
        try:
            if direct:
                buf = mmap.mmap(-1, max(len(data), 1))
                buf.write(data)
                os.write(fd, memoryview(buf)[:len(data)])
            else:
                pos = 0
                while pos < len(data):
                    step = rng.choice([len(data), 4096, 65536, 12345])
                    pos += os.write(fd, data[pos:pos + step])
        finally:
            os.close(fd)
        return tmp

    def renameat2(old, new, flags):
        if libc.renameat2(-100, old.encode(), -100, new.encode(), flags) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def excl_round(r):
        path = os.path.join(root, "excl", f"{r:06d}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            excl[r] = False
            return
        excl[r] = True
        os.write(fd, str(wid).encode())
        os.close(fd)

    def one_op():
        global seq
        target = rng.choice(TARGETS)
        op = rng.choices(["publish", "noreplace", "read", "unlink", "steal", "exchange", "link", "list"],
                         [25, 5, 40, 5, 8, 7, 5, 5])[0]
        if op in ("publish", "noreplace"):
            seq += 1
            tmp = write_tmp(payload(wid, seq))
            if op == "publish":
                os.replace(tmp, target)
                stats["published"] += 1
                return
            try:
                renameat2(tmp, target, RENAME_NOREPLACE)
                stats["noreplace_won"] += 1
            except FileExistsError:
                stats["noreplace_lost"] += 1
                os.unlink(tmp)
            return
        try:
            if op == "read":
                verify(read_whole(target, rng.choice(["plain", "direct", "mmap"])), target)
            elif op == "unlink":
                os.unlink(target)
                stats["unlinked"] += 1
            elif op in ("steal", "link"):
                mine = os.path.join(root, "private", f"{wid}.{op}")
                (os.rename if op == "steal" else os.link)(target, mine)
                verify(read_whole(mine, "plain"), mine)
                os.unlink(mine)
                stats["stolen" if op == "steal" else "linked"] += 1
            elif op == "exchange":
                other = rng.choice([t for t in TARGETS if t != target])
                renameat2(target, other, RENAME_EXCHANGE)
                stats["exchanged"] += 1
            elif op == "list":
                # (A name unlinked and made again during a listing may show twice: POSIX
                # leaves that open. test_listing_during_rename_over... covers rename.)
                names = os.listdir(os.path.join(root, "shared"))
                strays = [n for n in names if not n.startswith((".tmp.", "t"))]
                if strays:
                    error("list", f"names nobody made: {strays}")
                stats["listed"] += 1
        except FileNotFoundError:
            stats["absent"] += 1

    while time.time() < start_at:
        time.sleep(0.001)
    deadline = time.time() + seconds
    last_round = -1
    prog = os.open(progress, os.O_WRONLY | os.O_CREAT, 0o644)
    while time.time() < deadline:
        r = int((time.time() - start_at) / SLOT)
        what = "excl" if r > last_round else "op"
        os.pwrite(prog, struct.pack("<Q16s", stats["ops"], what.encode()), 0)
        try:
            if r > last_round:
                last_round = r
                excl_round(r)
            else:
                one_op()
        except OSError as exc:
            error(what, f"{errno.errorcode.get(exc.errno, exc.errno)} {exc}")
        stats["ops"] += 1
    os.pwrite(prog, struct.pack("<Q16s", stats["ops"], b"done"), 0)
    print(json.dumps({"stats": stats, "errors": errors, "excl": excl}))
''')


def _task_states(pid):
    """Where each thread of a process waits in the kernel (for a deadlock report)."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        base = f"/proc/{pid}/task/{tid}"
        try:
            wchan = open(f"{base}/wchan").read()
            stack = open(f"{base}/stack").read().strip().replace("\n", " | ")
        except OSError as exc:
            wchan, stack = "?", str(exc)
        out.append(f"  {pid}/{tid} wchan={wchan} {stack[:300]}")
    return "\n".join(out)


def test_sixteen_processes_race_on_the_same_names(make_mount, tmp_path):
    """16 processes create, write, rename over, exchange, link, unlink and read four shared
    names, and race for one O_EXCL name every 20 ms. Every read is a complete payload of
    some writer; every O_EXCL name has exactly one winner; nothing deadlocks (a watchdog
    fails the test, with the daemon's and the workers' kernel stacks, when no process makes
    progress for 30 s); the daemon survives, unmounts, and fsck --verify-data is clean."""
    m = make_mount(block_size="64K")
    for d in ("shared", "excl", "private"):
        os.mkdir(m.p(d))
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    nproc, seconds = 16, 10.0
    start_at = time.time() + 2.0  # all start together, once their interpreters are up
    progress = [tmp_path / f"progress{k}" for k in range(nproc)]
    procs = [subprocess.Popen([sys.executable, str(script), m.path, str(k), str(seconds), str(start_at),
                               str(progress[k])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(nproc)]

    def read_progress():
        out = []
        for p in progress:
            try:
                ops, what = struct.unpack("<Q16s", p.read_bytes()[:24])
                out.append((ops, what.rstrip(b"\0").decode()))
            except (OSError, struct.error):
                out.append((0, "starting"))
        return out

    stall_limit = 30.0
    last, last_change = None, time.monotonic()
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            now = read_progress()
            if now != last:
                last, last_change = now, time.monotonic()
            elif time.monotonic() - last_change > stall_limit and time.time() > start_at:
                report = [f"no progress for {stall_limit:.0f} s: a deadlock. workers (ops, doing): {now}",
                          "daemon threads:", _task_states(m.pid)]
                report += ["stuck workers:"] + [_task_states(p.pid) for p in procs if p.poll() is None]
                with open(os.path.join(m.warehouse, "kvfs.log"), errors="replace") as f:
                    report += ["daemon log (tail):", *f.read().splitlines()[-40:]]
                # A request the daemon has taken holds its caller in an uninterruptible
                # wait: only the end of the daemon (the FUSE connection) lets them go.
                m.kill9()
                pytest.fail("\n".join(report))
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    errors = [e for r in results for e in r["errors"]]
    assert not errors, errors
    total = {k: sum(r["stats"][k] for r in results) for k in results[0]["stats"]}
    assert total["published"] > 50 and total["verified"] > 100 and total["exchanged"] > 5, total
    assert total["stolen"] > 5 and total["linked"] > 5 and total["noreplace_won"] > 0, total

    # O_EXCL: exactly one winner per name, and the name holds the winner's id.
    winners: dict[int, list[int]] = {}
    attempts: dict[int, int] = {}
    for k, r in enumerate(results):
        for rnd, won in r["excl"].items():
            attempts[int(rnd)] = attempts.get(int(rnd), 0) + 1
            if won:
                winners.setdefault(int(rnd), []).append(k)
    assert set(winners) == set(attempts), "an O_EXCL name nobody won"
    assert all(len(w) == 1 for w in winners.values()), {r: w for r, w in winners.items() if len(w) != 1}
    contended = sum(1 for n in attempts.values() if n > 1)
    assert contended > 100, f"only {contended} O_EXCL names were raced for"
    assert sorted(os.listdir(m.p("excl"))) == [f"{r:06d}" for r in sorted(attempts)]
    for rnd, (k,) in winners.items():
        assert open(m.p("excl", f"{rnd:06d}")).read() == str(k), rnd

    # What is left: no temp file, no private name, each target one complete payload.
    left = os.listdir(m.p("shared"))
    assert set(left) <= {"t0", "t1", "t2", "t3"}, left
    assert os.listdir(m.p("private")) == []
    for name in left:
        data = open(m.p("shared", name), "rb").read()
        magic, w, s, n, digest = struct.unpack_from(">8sIIQ32s", data)
        assert magic == b"KVFSRACE" and len(data) == 56 + n, name
        assert hashlib.sha256(data[56:]).digest() == digest, name
    print(f"16 processes: {total}; O_EXCL names {len(attempts)} (raced: {contended})")
    assert pid_alive(m.pid)
    m.umount()
    report = json.loads(run_kvfs("fsck", m.warehouse, "--json", "--verify-data").stdout)
    assert report["clean"], report["problems"]


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
