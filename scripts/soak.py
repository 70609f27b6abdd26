#!/usr/bin/env python3
"""Soak: mixed clients on a small warehouse at full capacity, eviction on, for a while.

A fresh warehouse (one file-backed device of --size, 1 GiB by default) is mounted and
--clients processes run against it until --minutes have passed:

  writer    the vLLM pattern: O_EXCL temp file (O_DIRECT now and then), write, rename to
            kv/<hh>/<key>.bin; every file carries a header (magic, key, length, sha256)
  reader    opens recently published files (plain, O_DIRECT or mmap) and verifies them
            whole: the key in the header is the file's own, the length and hash match
  lookup    existence checks, one by one (stat) and in batches (.kvfs/lookup)
  unlinker  removes recently published files

and, from this process, now and then: kvfs stat, kvfs gc (report only), kvfs retire of
one kv/<hh> directory, and a check that the pinned reference files are intact. The
warehouse is far smaller than what is written, so it runs at its high watermark and
evicts all along. ENOENT for a file that was evicted, unlinked or retired meanwhile is
what a cache does, not an error; so is a retire that finds its directory gone (retired
before and not yet made again by a writer: see retire_raced). Wrong bytes are always an
error, and so is any other errno (ENOSPC included: something evictable always exists) and
any other retire failure.

The daemon's resident memory (VmRSS, and RssAnon: its heap) is sampled every few seconds.
At the end the clients stop, the mount is unmounted and `kvfs fsck --json --verify-data`
runs. A summary is printed (--json: as JSON); the exit status is 1 on any error, on RSS
growth past --max-rss-growth-mib between the end of the warm-up and the end, or when fsck
is not clean.

    .venv/bin/python scripts/soak.py [--minutes 30] [--size 1G] [--clients 8] [--dir /var/tmp]

Run it with this checkout's .venv python: the kvfs commands it starts are `python -m
kvfs.tools`, which only an install of this checkout provides (tools/ becomes kvfs.tools
when installed; a path to the source tree alone is not enough).
"""

import argparse
import collections
import errno
import hashlib
import json
import mmap
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's kvfs, here and in the kvfs commands run below

from kvfs.mounttab import daemon_pid, pid_alive  # noqa: E402
from kvfs.tools.client import exit_for  # noqa: E402

KVFS = [sys.executable, "-m", "kvfs.tools"]
HDR = struct.Struct(">8sQQ32s")  # magic, key, body length, sha256(body)
MAGIC = b"KVFSSOAK"
KEYSPACE = 1 << 20
RECENT = 4096  # published keys, a ring; readers and unlinkers pick among the newest
NEWEST = 256  # ... this many: most of them are still there (eviction takes the oldest)
ROLES = ["writer", "reader", "writer", "lookup", "reader", "unlinker", "writer", "reader"]
REFERENCES = 8  # pinned files that must survive the whole run


def body_for(key: int) -> bytes:
    rng = random.Random(key)
    return rng.randbytes(rng.choice([4096, 256 << 10, 1 << 20, (2 << 20) + 4096, 3 << 20]))


def payload(key: int) -> bytes:
    body = body_for(key)
    return HDR.pack(MAGIC, key, len(body), hashlib.sha256(body).digest()) + body


def path_of(mount: str, key: int) -> str:
    return os.path.join(mount, "kv", f"{key & 0xFF:02x}", f"{key:06x}.bin")


def check_payload(data: bytes, key: int) -> str | None:
    """None if `data` is exactly what a writer of `key` published, else what is wrong."""
    if len(data) < HDR.size:
        return f"{len(data)} bytes, shorter than a header"
    magic, k, n, digest = HDR.unpack_from(data)
    if magic != MAGIC:
        return "no header"
    if k != key:
        return f"holds key {k:06x}"
    if len(data) != HDR.size + n:
        return f"{len(data)} bytes, header says {HDR.size + n}"
    if hashlib.sha256(data[HDR.size:]).digest() != digest:
        return "body does not match its hash"
    return None


def read_whole(path: str, how: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if how == "direct" else 0))
    try:
        size = os.fstat(fd).st_size
        if how == "mmap" and size:
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
                return bytes(m)
        if how == "direct":
            buf = mmap.mmap(-1, max(4096, (size + 4095) // 4096 * 4096 + 4096))
            n = os.readv(fd, [buf])
            return bytes(buf[:n])
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# -- clients ---------------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.ops = collections.Counter()  # what was done: write, read, lookup, lookup_batch, unlink
        self.info = collections.Counter()  # bytes written and read, lookups that hit and missed
        self.gone = collections.Counter()  # ENOENT: evicted, unlinked or retired meanwhile
        self.errors = collections.Counter()  # errno name -> count (all unexpected)
        self.wrong_bytes = 0
        self.samples: list[str] = []

    def error(self, what: str, key: str = "") -> None:
        if key:
            self.errors[key] += 1
        if len(self.samples) < 10:
            self.samples.append(what)

    def as_dict(self) -> dict:
        return {"ops": dict(self.ops), "info": dict(self.info), "gone": dict(self.gone),
                "errors": dict(self.errors), "wrong_bytes": self.wrong_bytes, "samples": self.samples}


def client(role: str, wid: int, mount: str, stop, progress, recent, head, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator decides when to stop
    rng = random.Random(wid * 7919 + int(time.time()))
    tally = Tally()
    seq = 0
    lookup_file = os.path.join(mount, ".kvfs", "lookup")

    def pick_recent() -> int:
        newest = head.value
        if not newest:
            return 0
        return recent[(newest - 1 - rng.randrange(min(newest, NEWEST))) % RECENT]

    def write_one():
        nonlocal seq
        key = rng.randrange(1, KEYSPACE)
        dest = path_of(mount, key)
        data = payload(key)
        seq += 1
        tmp = f"{dest}.{wid}.{seq}.tmp"
        try:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            direct = rng.random() < 0.3
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | (os.O_DIRECT if direct else 0), 0o644)
            try:
                if direct:
                    buf = mmap.mmap(-1, len(data))
                    buf.write(data)
                    os.write(fd, buf)
                else:
                    os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
        except FileNotFoundError:  # its directory was retired meanwhile
            tally.gone["write"] += 1
            return
        with head.get_lock():
            recent[head.value % RECENT] = key
            head.value += 1
        tally.ops["write"] += 1
        tally.info["write_bytes"] += len(data)

    def read_one():
        key = pick_recent()
        if not key:
            return
        how = rng.choice(["plain", "direct", "mmap"])
        try:
            data = read_whole(path_of(mount, key), how)
        except FileNotFoundError:
            tally.gone["read"] += 1
            return
        wrong = check_payload(data, key)
        if wrong:
            tally.wrong_bytes += 1
            tally.error(f"wrong bytes ({how}) in {path_of(mount, key)}: {wrong}")
        tally.ops["read"] += 1
        tally.info["read_bytes"] += len(data)

    def lookup_one():
        if rng.random() < 0.2:  # a batch, as kvfs.kv does it
            keys = [pick_recent() if rng.random() < 0.5 else rng.randrange(1, KEYSPACE) for _ in range(64)]
            rel = [os.path.relpath(path_of(mount, k), mount) for k in keys]
            fd = os.open(lookup_file, os.O_RDWR)
            try:
                os.write(fd, json.dumps(rel).encode())
                answer = json.loads(os.pread(fd, 1 << 20, 0))
            finally:
                os.close(fd)
            if len(answer) != len(rel) or not all(isinstance(a, bool) for a in answer):
                tally.error(f"malformed lookup answer {answer!r:.200}", "bad lookup answer")
            tally.ops["lookup_batch"] += 1
            tally.info["lookup_hit"] += sum(answer)
            tally.info["lookup_miss"] += len(answer) - sum(answer)
            return
        key = pick_recent() if rng.random() < 0.5 else rng.randrange(1, KEYSPACE)
        tally.ops["lookup"] += 1
        tally.info["lookup_hit" if os.path.exists(path_of(mount, key)) else "lookup_miss"] += 1

    def unlink_one():
        try:
            os.unlink(path_of(mount, pick_recent()))
            tally.ops["unlink"] += 1
        except FileNotFoundError:
            tally.gone["unlink"] += 1
        time.sleep(0.02)  # removes much less than the writers make

    step = {"writer": write_one, "reader": read_one, "lookup": lookup_one, "unlinker": unlink_one}[role]
    n = 0
    while not stop.is_set():
        try:
            step()
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            tally.error(f"{role}: {exc}", name)
        except Exception as exc:  # a bug in this script, or a malformed reply
            tally.error(f"{role}: {type(exc).__name__}: {exc}", type(exc).__name__)
        n += 1
        progress[wid] = n
    results.put((role, tally.as_dict()))


# -- the orchestrator ------------------------------------------------------------------------

def kvfs(*args, check=True, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([*KVFS, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise RuntimeError(f"kvfs {' '.join(map(str, args))} exited {res.returncode}: {res.stderr.strip()}")
    return res


NO_SUCH = os.strerror(errno.ENOENT).lower()  # "no such file or directory", as kvfs words it


def inode_of(path: str) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


def retire_raced(res: subprocess.CompletedProcess, target: str, ino_before: int | None) -> bool:
    """Whether a failed `kvfs retire target` lost a race with the writers rather than failed:
    retire said that very directory does not exist (the exit code kvfs gives ENOENT and
    "<name>: no such file or directory"), and it indeed was not there all along: it is
    absent now, or the directory there now is not the one seen before the call (absent
    then, or another inode: a writer made it again; kvfs never reuses an inode number).
    Any other failure, and an ENOENT for a directory that stayed put, is a real one."""
    said_gone = (res.returncode == exit_for(errno.ENOENT)
                 and res.stderr.strip().lower().endswith(f"{os.path.basename(target)}: {NO_SUCH}"))
    return said_gone and (ino_before is None or inode_of(target) != ino_before)


def retire(target: str) -> bool:
    """kvfs retire `target`: True when it was retired, False when it was gone meanwhile
    (retire_raced); RuntimeError for any other failure."""
    before = inode_of(target)
    res = kvfs("retire", target, check=False)
    if res.returncode == 0:
        return True
    if retire_raced(res, target, before):
        return False
    raise RuntimeError(f"kvfs retire {target} exited {res.returncode}: {res.stderr.strip()}")


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a process in KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(rest.split()[0])
    return fields["VmRSS"], fields["RssAnon"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long the clients run (default 30)")
    p.add_argument("--size", default="1G", help="warehouse capacity (default 1G)")
    p.add_argument("--block-size", default="1M", help="warehouse block size (default 1M)")
    p.add_argument("--clients", type=int, default=8, help=f"client processes, roles in turn: {', '.join(ROLES)}")
    p.add_argument("--dir", default="/var/tmp", help="where the temporary warehouse and mount point go")
    p.add_argument("--sample-seconds", type=float, default=5.0, help="how often RSS is sampled (default 5)")
    p.add_argument("--warmup-seconds", type=float, default=60.0,
                   help="RSS growth is measured from the first sample after this (at most 20%% of the run)")
    p.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                   help="fail if the daemon's VmRSS grows more than this after the warm-up (default 64)")
    p.add_argument("--stall-seconds", type=float, default=120.0,
                   help="fail if no client makes progress for this long (a deadlock)")
    p.add_argument("--keep", action="store_true", help="keep the warehouse directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    if args.clients < 1:
        p.error("--clients must be at least 1")

    work = tempfile.mkdtemp(prefix="kvfs-soak-", dir=args.dir)
    wh, mnt = os.path.join(work, "wh"), os.path.join(work, "mnt")
    os.mkdir(mnt)
    kvfs("mkfs", wh, "--device", f"data.img:{args.size}", "--block-size", args.block_size)
    kvfs("mount", wh, mnt)
    pid = daemon_pid(wh)
    duration = args.minutes * 60
    warmup = min(args.warmup_seconds, 0.2 * duration)
    summary: dict = {"minutes": args.minutes, "size": args.size, "clients": args.clients, "warehouse": wh}
    failures: list[str] = []
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    progress = ctx.Array("Q", args.clients, lock=False)
    recent = ctx.Array("Q", RECENT, lock=False)
    head = ctx.Value("Q", 0)  # keys published so far (the next slot of the ring)
    results = ctx.Queue()
    procs = []
    mounted = True
    try:
        # Pinned references: never evicted, checked all along.
        refs = {}
        os.makedirs(os.path.join(mnt, "pinned"))
        os.setxattr(os.path.join(mnt, "pinned"), "user.kvfs.pin", b"1")
        for i in range(REFERENCES):
            refs[os.path.join(mnt, "pinned", f"ref{i}")] = data = payload(KEYSPACE + i)
            with open(os.path.join(mnt, "pinned", f"ref{i}"), "wb") as f:
                f.write(data)
        os.makedirs(os.path.join(mnt, "kv"))

        roles = [ROLES[i % len(ROLES)] for i in range(args.clients)]
        procs = [ctx.Process(target=client, args=(role, i, mnt, stop, progress, recent, head, results), daemon=True)
                 for i, role in enumerate(roles)]
        for proc in procs:
            proc.start()
        t0 = time.monotonic()
        rss: list[tuple[float, int, int]] = []  # (seconds, VmRSS KiB, RssAnon KiB)
        use: list[float] = []
        admin = collections.Counter()
        admin_errors: list[str] = []
        next_sample = next_admin = 0.0
        last_progress, last_change = None, t0
        rng = random.Random(1)
        while (now := time.monotonic() - t0) < duration:
            if not pid_alive(pid):
                failures.append(f"the daemon (pid {pid}) died; see {wh}/kvfs.log")
                break
            if now >= next_sample:
                rss.append((now, *memory_kib(pid)))
                st = os.statvfs(mnt)
                use.append(1 - st.f_bfree / st.f_blocks)
                next_sample = now + args.sample_seconds
                snap = list(progress)
                if snap != last_progress:
                    last_progress, last_change = snap, time.monotonic()
                elif time.monotonic() - last_change > args.stall_seconds:
                    failures.append(f"no client made progress for {args.stall_seconds:.0f} s (deadlock?)")
                    break
            if now >= next_admin:
                action = rng.choice(["stat", "gc", "retire", "refs"])
                try:
                    if action == "stat":
                        kvfs("stat", mnt, "--json")
                    elif action == "gc":
                        found = json.loads(kvfs("gc", mnt, "--json").stdout)
                        admin["gc_problems"] += len(found["problems"])
                    elif action == "retire":
                        if not retire(os.path.join(mnt, "kv", f"{rng.randrange(256):02x}")):
                            action = "retire_gone"  # counted apart: expected, not an error
                    else:
                        for path, data in refs.items():
                            if read_whole(path, "direct") != data:
                                raise RuntimeError(f"pinned reference {path} changed")
                    admin[action] += 1
                except (OSError, RuntimeError, ValueError) as exc:
                    admin_errors.append(f"{action}: {exc}")
                next_admin = now + max(1.0, min(15.0, duration / 20))
            time.sleep(0.2)
        stop.set()
        tallies = collections.defaultdict(Tally)
        for _ in procs:
            try:
                role, t = results.get(timeout=120)
            except Exception:
                failures.append("a client did not report (stuck in the filesystem?)")
                break
            agg = tallies[role]
            agg.ops.update(t["ops"])
            agg.info.update(t["info"])
            agg.gone.update(t["gone"])
            agg.errors.update(t["errors"])
            agg.wrong_bytes += t["wrong_bytes"]
            agg.samples += t["samples"]
        for proc in procs:
            proc.join(timeout=30)
        elapsed = time.monotonic() - t0
        for path, data in refs.items():
            if read_whole(path, "direct") != data:
                failures.append(f"pinned reference {path} changed")
        alive = pid_alive(pid)
        stats = json.loads(kvfs("stat", mnt, "--json").stdout) if alive else {"counters": {}}
        if alive:
            rss.append((elapsed, *memory_kib(pid)))
        elif not any("died" in f for f in failures):
            failures.append(f"the daemon (pid {pid}) died; see {wh}/kvfs.log")

        # Figures.
        ops = collections.Counter()
        info = collections.Counter()
        gone = collections.Counter()
        errors = collections.Counter()
        wrong = 0
        samples = []
        for t in tallies.values():
            ops.update(t.ops)
            info.update(t.info)
            gone.update(t.gone)
            errors.update(t.errors)
            wrong += t.wrong_bytes
            samples += t.samples
        if admin_errors:
            errors["admin"] += len(admin_errors)
            samples += admin_errors[:10]
        warm = [s for s in rss if s[0] >= warmup] or rss
        tail = [s for s in rss if s[0] >= elapsed - max(args.sample_seconds * 3, 0.1 * elapsed)] or rss[-1:]
        start_rss = statistics.median(s[1] for s in warm[:3]) if warm else 0
        end_rss = statistics.median(s[1] for s in tail) if tail else 0
        growth_mib = (end_rss - start_rss) / 1024
        c = stats["counters"]
        summary.update({
            "seconds": round(elapsed, 1),
            "ops": dict(sorted(ops.items())),
            "ops_total": sum(ops.values()),
            "lookups": {"hit": info["lookup_hit"], "miss": info["lookup_miss"]},
            "written_gib": round(info["write_bytes"] / (1 << 30), 2),
            "read_gib": round(info["read_bytes"] / (1 << 30), 2),
            "gone_enoent": dict(gone),
            "errors": dict(errors),
            "wrong_bytes": wrong,
            "error_samples": samples[:20],
            "admin": dict(admin),
            "evicted_files": c.get("evicted_files", 0),
            "evicted_gib": round(c.get("evicted_bytes", 0) / (1 << 30), 2),
            "retired_files": c.get("retired_files", 0),
            "use_after_warmup": {"min": round(min(use[len(use) // 5:] or use), 3), "max": round(max(use), 3)},
            "rss_mib": {"start": round(start_rss / 1024, 1), "peak": round(max(s[1] for s in rss) / 1024, 1),
                        "end": round(end_rss / 1024, 1), "growth": round(growth_mib, 1),
                        "first": round(rss[0][1] / 1024, 1), "samples": len(rss)},
            "rss_anon_mib": {"first": round(rss[0][2] / 1024, 1), "peak": round(max(s[2] for s in rss) / 1024, 1),
                             "last": round(rss[-1][2] / 1024, 1)},
            # (seconds, VmRSS MiB), at most 40 points: the shape of the curve.
            "rss_series": [(round(t), round(v / 1024, 1)) for t, v, _ in rss[::max(1, len(rss) // 40)]],
        })
        if errors or wrong:
            failures.append(f"{sum(errors.values())} errors, {wrong} wrong reads")
        if growth_mib > args.max_rss_growth_mib:
            failures.append(f"daemon RSS grew {growth_mib:.1f} MiB after the warm-up "
                            f"(more than {args.max_rss_growth_mib:g})")
        if not ops["write"] or not ops["read"]:
            failures.append("the clients did not both write and read")

        res = kvfs("umount", mnt, check=False)
        if res.returncode != 0:
            failures.append(f"kvfs umount failed: {res.stderr.strip()}")
            raise SystemExit(finish(summary, failures, args))
        mounted = False
        res = kvfs("fsck", wh, "--json", "--verify-data", check=False)
        report = json.loads(res.stdout)
        summary["fsck"] = {"clean": report["clean"], "problems": report["problems"][:10], "stats": report.get("stats")}
        if not report["clean"]:
            failures.append(f"fsck found {len(report['problems'])} problems")
    finally:
        stop.set()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        if mounted:
            kvfs("umount", mnt, check=False, timeout=120)
            if pid_alive(pid):
                subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
                os.kill(pid, signal.SIGKILL)
        if not args.keep and not failures:
            shutil.rmtree(work, ignore_errors=True)
    return finish(summary, failures, args)


def finish(summary: dict, failures: list[str], args) -> int:
    summary["failures"] = failures
    summary["result"] = "FAIL" if failures else "PASS"
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 1 if failures else 0


def print_summary(s: dict) -> None:
    r = s.get("rss_mib", {})
    print(f"kvfs soak: {s.get('seconds', 0):.0f} s, {s['clients']} clients, warehouse {s['size']} ({s['warehouse']})")
    print(f"  ops        {s.get('ops_total', 0):,} ({', '.join(f'{k} {v:,}' for k, v in s.get('ops', {}).items())}); "
          f"names looked up {s.get('lookups')}")
    print(f"  data       written {s.get('written_gib', 0)} GiB, read and verified {s.get('read_gib', 0)} GiB")
    print(f"  capacity   use {s.get('use_after_warmup')}, evicted {s.get('evicted_files', 0):,} files "
          f"({s.get('evicted_gib', 0)} GiB), retired {s.get('retired_files', 0):,}")
    print(f"  expected   ENOENT for files gone meanwhile: {s.get('gone_enoent', {})}")
    print(f"  errors     {s.get('errors', {}) or 'none'}; wrong bytes {s.get('wrong_bytes', 0)}")
    for line in s.get("error_samples", []):
        print(f"             {line}")
    print(f"  admin      {s.get('admin', {})}")
    print(f"  daemon RSS start {r.get('start')} MiB (after warm-up; first sample {r.get('first')}), "
          f"peak {r.get('peak')}, end {r.get('end')}, growth {r.get('growth')} MiB; heap (RssAnon) {s.get('rss_anon_mib')}")
    print(f"  RSS curve  {' '.join(f'{t}s:{v:.0f}' for t, v in s.get('rss_series', []))}")
    print(f"  fsck       {s.get('fsck')}")
    print(f"  result     {s['result']}" + "".join(f"\n             {f}" for f in s["failures"]))


if __name__ == "__main__":
    sys.exit(main())
