#!/usr/bin/env python3
"""Crash harness: kill the kvfs daemon at random moments under a mixed workload, mount again
(recovery), and check every visible file against a journal of completed writes.

Each trial mounts one small warehouse (it fills, so eviction runs), starts writer, rewriter,
renamer and reader processes, waits a random time, then either
  kill     kill -9 of the daemon: the OS keeps what it wrote (LMDB pages, device pages), or
  powercut kill -9 under a volatile device write cache (KVFS_FAULTS {"volatile": true}):
           device writes since the last sync are lost, and the metadata goes back to what
           was last synced (the copy the daemon keeps in meta.power-cut/ at each sync),
           which is what a power cut does to drives without power-loss protection.
With --direct-writers N, N clients of the direct path (kvfs.direct_client) join each
trial: each stores batches of files over its socket (all of its durable/ files in one batch,
every one at the batch's version, half of them with sync; new and rewritten cache/ files)
and reads batches back through it.
Then it mounts again and checks:
  - every file that is visible holds exactly one complete version (self-describing content:
    key, version, length and a hash in a header), or is empty where a writer truncated it;
  - durable/ is pinned: after a kill every file closed before the crash is there with that
    version or a newer one; after a power cut every file that was fsync'd (file, then its
    directory after the rename) is;
  - a direct batch is published whole or not at all: a direct writer's durable/ files are
    all there or none, all at one version; its stores count as closed once acknowledged,
    and as fsync'd where they asked for sync;
  - kvfs fsck --verify-data is clean after the unmount.
The warehouse carries over from trial to trial (each recovery starts from the last one's
state); --fresh-every N makes a new one every N trials.

    python scripts/crashtest.py --trials 200           # the long run (about 15 minutes)
    python scripts/crashtest.py --trials 4 --seed 7    # what the test suite runs
    python scripts/crashtest.py --trials 50 --direct-writers 2   # with direct-path writers

Exit status: 0 every trial passed, 1 a trial failed (the failure and the kept warehouse
are printed), 2 bad arguments.
"""

import argparse
import errno
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import xxhash

from kvfs.mounttab import daemon_pid

KVFS = [sys.executable, "-m", "kvfs.tools"]
HEADER = struct.Struct(">4s48sIQ16s")  # magic, key, version, payload length, xxh3-128(payload)
MAGIC = b"KVCT"
SIZES = (1, 4095, 70000, 300000, 1 << 20, (1 << 20) + 12345)
DURABLE_KEYS = 24  # durable/ is pinned: a bounded set of keys, rewritten with new versions


def content(key: str, version: int) -> bytes:
    rng = random.Random(f"{key}/{version}")
    payload = rng.randbytes(rng.choice(SIZES))
    return HEADER.pack(MAGIC, key.encode(), version, len(payload), xxhash.xxh3_128_digest(payload)) + payload


def parse(data: bytes) -> tuple[str, int] | None:
    """(key, version) of a complete file; None if it is not one."""
    if len(data) < HEADER.size:
        return None
    magic, key, version, length, digest = HEADER.unpack(data[:HEADER.size])
    payload = data[HEADER.size:]
    if magic != MAGIC or len(payload) != length or xxhash.xxh3_128_digest(payload) != digest:
        return None
    return key.rstrip(b"\0").decode(), version


# -- workers (each a process; it stops when the mount dies under it) ----------------------

def worker(role: str, root: str, journal: str, seed: int) -> None:
    rng = random.Random(seed)
    log = open(journal, "a", buffering=1)
    versions: dict[str, int] = {}
    if role == "durable":  # continue the versions of earlier trials
        for name in os.listdir(os.path.join(root, "durable")):
            try:
                got = parse(open(os.path.join(root, "durable", name), "rb").read())
            except OSError:
                continue
            if got is not None and got[0].startswith(f"d{seed}_"):
                versions[got[0]] = max(versions.get(got[0], -1), got[1])
    if role == "direct":
        return direct_worker(root, log, seed, rng)
    i = 0
    log.write("ready\n")
    try:
        while True:
            i += 1
            if role == "durable":  # vLLM-style publish, made durable: fsync file, rename, fsync dir
                key = f"d{seed}_{rng.randrange(DURABLE_KEYS)}"
                v = versions.get(key, -1) + 1
                tmp = os.path.join(root, "durable", f".{key}.{v}.{os.getpid()}.tmp")
                fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                try:
                    os.write(fd, content(key, v))
                    sync = rng.random() < 0.7
                    if sync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, os.path.join(root, "durable", key))
                versions[key] = v
                log.write(f"closed {key} {v}\n")
                if sync:
                    dfd = os.open(os.path.join(root, "durable"), os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(dfd)
                    finally:
                        os.close(dfd)
                    log.write(f"synced {key} {v}\n")
            elif role == "cache":  # LMCache/vLLM-style cache files: temp + rename, or O_TRUNC rewrite
                if rng.random() < 0.6:
                    key = f"c{seed}_{i}"
                    tmp = os.path.join(root, "cache", key + ".tmp")
                    with open(tmp, "xb") as f:
                        f.write(content(key, 0))
                    try:
                        os.replace(tmp, os.path.join(root, "cache", key))
                    except FileNotFoundError:
                        pass  # a closed temp file is a cache file too: eviction may take it first
                else:
                    key = f"r{seed}_{rng.randrange(6)}"
                    v = versions.get(key, -1) + 1
                    log.write(f"start {key} {v}\n")
                    with open(os.path.join(root, "cache", key), "wb") as f:
                        data = content(key, v)
                        half = len(data) // 2
                        f.write(data[:half])  # two writes: a crash between them must not show half
                        f.write(data[half:])
                    versions[key] = v
                    log.write(f"closed {key} {v}\n")
            elif role == "renamer":  # move cache files under another name and back
                d = os.path.join(root, "cache")
                names = [n for n in os.listdir(d) if n.startswith("c") and not n.endswith(".tmp")]
                if names:
                    n = rng.choice(names)
                    dst = n[:-2] if n.endswith(".m") else n + ".m"
                    try:
                        os.rename(os.path.join(d, n), os.path.join(d, dst))
                    except FileNotFoundError:
                        pass  # evicted or moved meanwhile
                time.sleep(0.002)
            elif role == "reader":  # every read of a published file is that file, whole
                # (not of r* files: they are rewritten in place, and a reader may see a
                # rewrite in progress, on kvfs as on any filesystem)
                sub = rng.choice(("durable", "cache"))
                d = os.path.join(root, sub)
                names = os.listdir(d)
                if names:
                    n = rng.choice(names)
                    try:
                        with open(os.path.join(d, n), "rb") as f:
                            data = f.read()
                    except FileNotFoundError:
                        continue
                    if not n.endswith(".tmp") and not n.startswith("r") and parse(data) is None:
                        log.write(f"BAD-READ {sub}/{n} {len(data)}\n")
    except OSError as exc:
        # Expected once the daemon is killed; the harness fails the trial if it came before.
        log.write(f"error {time.time():.6f} {errno.errorcode.get(exc.errno, exc.errno)} {role}: {exc}\n")


DIRECT_DURABLE = 8  # durable/ files of one direct writer: always stored together, in one batch


def direct_worker(root: str, log, seed: int, rng: random.Random) -> None:
    """A client of the direct path: batches stored over its socket and read back through
    it. Its durable/ keys (dd<k>_<j>, k its place among the workers) continue from trial to
    trial; every batch stores all of them at one version (the batch's), so a recovered
    warehouse must show them all at one version, or none. cache/ gets new files (x<seed>_i)
    and rewrites of a few (y<seed>_k), each a new file renamed over (never torn)."""
    from kvfs import direct_client

    k = seed % 1000
    durable = [f"dd{k}_{j}" for j in range(DIRECT_DURABLE)]
    version = -1
    for key in durable:
        try:
            got = parse(open(os.path.join(root, "durable", key), "rb").read())
        except FileNotFoundError:
            continue
        if got is not None:
            version = max(version, got[1])
    client = direct_client.connect(root)
    if client is None:
        log.write(f"error {time.time():.6f} ENODEV direct: the mount does not serve the direct path\n")
        return
    # Room for the biggest batch: all durable keys (or a cache batch), each of the biggest size.
    slot = HEADER.size + max(SIZES)
    buf = client.buffer(DIRECT_DURABLE * slot)
    versions: dict[str, int] = {}
    log.write("ready\n")

    def store(items, sync: bool) -> None:
        """items: [(path under root, key, version)], stored as one batch."""
        work = []
        for n, (path, key, v) in enumerate(items):
            data = content(key, v)
            buf.mm[n * slot:n * slot + len(data)] = data
            work.append((path, buf, n * slot, len(data), 0o644))
        for (path, _, _), r in zip(items, client.write(work, parents=False, sync=sync)):
            if r:
                raise OSError(-r, f"direct store of {path}: {os.strerror(-r)}")
        log.write("stored\n")

    i = 0
    try:
        while True:
            i += 1
            what = rng.random()
            if what < 0.3:  # all durable keys at the next version, one batch
                version += 1
                sync = rng.random() < 0.5
                log.write(f"start-batch {durable[0]} {version}\n")
                store([(f"durable/{key}", key, version) for key in durable], sync)
                for key in durable:
                    log.write(f"closed {key} {version}\n")
                    if sync:
                        log.write(f"synced {key} {version}\n")
            elif what < 0.6:  # new cache files, and now and then a rewrite, in one batch
                items = [(f"cache/x{seed}_{i}_{j}", f"x{seed}_{i}_{j}", 0) for j in range(rng.randrange(1, 5))]
                if rng.random() < 0.5:
                    key = f"y{seed}_{rng.randrange(4)}"
                    v = versions[key] = versions.get(key, -1) + 1
                    log.write(f"start {key} {v}\n")
                    items.append((f"cache/{key}", key, v))
                store(items, sync=False)
                for _, key, v in items:
                    if key.startswith("y"):
                        log.write(f"closed {key} {v}\n")
            else:  # read a batch of published files back through the direct path
                sub = rng.choice(("durable", "cache"))
                names = [n for n in os.listdir(os.path.join(root, sub))
                         if not n.endswith(".tmp") and not n.startswith(("r", "."))]
                names = rng.sample(names, min(len(names), DIRECT_DURABLE))
                results = client.read([(f"{sub}/{n}", 0, slot, buf, j * slot) for j, n in enumerate(names)])
                for j, (n, r) in enumerate(zip(names, results)):
                    if r == -errno.ENOENT:
                        continue  # evicted, renamed or rewritten meanwhile
                    got = parse(bytes(buf.mm[j * slot:j * slot + r])) if r >= 0 else None
                    if got is None or got[0] != n.split(".")[0]:
                        log.write(f"BAD-READ direct {sub}/{n} {r if r < 0 else got}\n")
    except OSError as exc:
        # Expected once the daemon is killed (the connection drops, or the mount is gone).
        log.write(f"error {time.time():.6f} {errno.errorcode.get(exc.errno, exc.errno)} direct: {exc}\n")


# -- the harness ---------------------------------------------------------------------------

def kvfs(*args, check=True, env=None, timeout=300):
    res = subprocess.run([*KVFS, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise RuntimeError(f"kvfs {' '.join(map(str, args))} -> {res.returncode}: {res.stderr.strip()}")
    return res


class Trial:
    def __init__(self, args, work: str):
        self.args = args
        self.work = work
        self.warehouse = os.path.join(work, "wh")
        self.mnt = os.path.join(work, "mnt")
        os.makedirs(self.mnt, exist_ok=True)

    def mkfs(self) -> None:
        kvfs("mkfs", self.warehouse, "--force", "--block-size", "256K", "--high-watermark", "0.85",
             "--low-watermark", "0.7", "--device", "a.img:96M", "--device", "b.img:96M")
        self.mount(power_cut=False)
        for d in ("durable", "cache"):
            os.makedirs(os.path.join(self.mnt, d), exist_ok=True)
        os.setxattr(os.path.join(self.mnt, "durable"), "user.kvfs.pin", b"1")
        self.umount()

    def mount(self, power_cut: bool) -> None:
        env = dict(os.environ)
        env.pop("KVFS_FAULTS", None)
        if power_cut:
            rules = [{"op": "sync", "lie": True}] if self.args.lying_sync else []
            env["KVFS_FAULTS"] = json.dumps({"volatile": True, "rules": rules})
        kvfs("mount", self.warehouse, self.mnt, env=env)

    def umount(self) -> None:
        kvfs("umount", self.mnt)

    def run(self, n: int, mode: str, rng: random.Random) -> dict:
        self.mount(power_cut=mode == "powercut")
        pid = daemon_pid(self.warehouse)
        journals = []
        procs = []
        roles = ("durable", "durable", "cache", "cache", "renamer", "reader", "reader")
        for k, role in enumerate(roles + ("direct",) * self.args.direct_writers):
            j = os.path.join(self.work, f"journal-{role}-{k}")
            journals.append(j)
            # Durable writers keep their seeds (so keys and versions continue from trial to
            # trial); the rest take new ones (a direct writer keeps its durable keys by its
            # place, k = seed % 1000).
            seed = k if role == "durable" else 1000 * n + k
            procs.append(subprocess.Popen([sys.executable, __file__, "worker", role, self.mnt, j, str(seed)]))
        deadline = time.monotonic() + 60  # the crash comes that long after all are at work
        while not all(os.path.exists(j) and open(j).read().startswith("ready") for j in journals):
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not start within 60 s")
            time.sleep(0.01)
        time.sleep(rng.uniform(self.args.min_run, self.args.max_run))
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        from kvfs.mounttab import detach_dead, find_mount

        entry = find_mount(self.mnt)
        if entry is not None:
            detach_dead(entry)  # what kvfs mount does over a dead mount; here before the restore
        for p in procs:  # (after the abort: a client may wait on the dead daemon till then)
            p.wait(timeout=60)
        if mode == "powercut":
            # What the drives kept: device writes since the last sync died with the daemon's
            # memory; the metadata is the copy taken at the last sync.
            meta = os.path.join(self.warehouse, "meta")
            snap = os.path.join(self.warehouse, "meta.power-cut")
            # (a kill between the snapshot's two renames leaves the new copy under .tmp)
            snap = next(p for p in (snap, snap + ".tmp") if os.path.isfile(os.path.join(p, "data.mdb")))
            shutil.copyfile(os.path.join(snap, "data.mdb"), os.path.join(meta, "data.mdb"))
            try:
                os.unlink(os.path.join(meta, "lock.mdb"))
            except FileNotFoundError:
                pass
        self.mount(power_cut=False)
        try:
            return self.check(journals, mode, killed_at)
        finally:
            self.umount()

    def check(self, journals: list[str], mode: str, killed_at: float) -> dict:
        closed: dict[str, int] = {}
        synced: dict[str, int] = {}
        started: dict[str, int] = {}
        problems = []
        stored = 0  # direct batches acknowledged
        for j in journals:
            if not os.path.exists(j):
                continue
            for line in open(j).read().splitlines():
                parts = line.split()
                if parts[0] in ("closed", "synced", "start") and len(parts) == 3:
                    into = {"closed": closed, "synced": synced, "start": started}[parts[0]]
                    into[parts[1]] = max(into.get(parts[1], -1), int(parts[2]))
                elif parts[0] == "stored":
                    stored += 1
                elif parts[0] == "BAD-READ":
                    problems.append(f"a reader saw a torn file before the crash: {line}")
                elif parts[0] == "error" and float(parts[1]) < killed_at:
                    problems.append(f"a client failed before the crash: {line}")
        st = json.loads(kvfs("stat", self.mnt, "--json").stdout)
        for counter in ("corrupt_blocks", "quarantined_files", "device_errors"):
            if st["counters"].get(counter):
                problems.append(f"kvfs stat: {counter} = {st['counters'][counter]}")
        files = 0
        for sub in ("durable", "cache"):
            d = os.path.join(self.mnt, sub)
            for name in os.listdir(d):
                files += 1
                try:
                    with open(os.path.join(d, name), "rb") as f:
                        data = f.read()
                except OSError as exc:
                    problems.append(f"{sub}/{name}: {exc.strerror}")
                    continue
                got = parse(data)
                base = name[1:].split(".")[0] if name.startswith(".") else name.split(".")[0]
                if got is None:
                    if not (data == b"" and name.startswith("r")):
                        problems.append(f"{sub}/{name}: {len(data)} bytes that are no complete version")
                elif got[0] != base:
                    problems.append(f"{sub}/{name}: holds {got[0]} version {got[1]}")
        # A direct writer's durable/ files are stored all at once, at one version: one
        # transaction, so all of them are there at one version, or none is.
        batches: dict[str, dict[str, int | None]] = {}
        for name in os.listdir(os.path.join(self.mnt, "durable")):
            if name.startswith("dd") and not name.endswith(".tmp"):
                try:
                    got = parse(open(os.path.join(self.mnt, "durable", name), "rb").read())
                except OSError:
                    got = None  # (reported above)
                batches.setdefault(name.split("_")[0], {})[name] = got[1] if got else None
        for writer, found in sorted(batches.items()):
            if len(found) != DIRECT_DURABLE or len(set(found.values())) != 1:
                problems.append(f"durable/{writer}_*: a direct batch torn: {sorted(found.items())}")
        if mode == "kill":  # a rewrite (in place, or a direct store): the last closed version, or a later one begun
            for key, v in closed.items():
                if not key.startswith(("r", "y")):
                    continue
                try:
                    data = open(os.path.join(self.mnt, "cache", key), "rb").read()
                except FileNotFoundError:
                    continue  # evicted (cache/ is not pinned)
                got = parse(data)
                last = started.get(key, v)
                if not ((got is not None and v <= got[1] <= last) or (data == b"" and last > v)):
                    problems.append(f"cache/{key}: holds {got or f'{len(data)} bytes'}; version {v} was closed "
                                    f"and {last} the last begun")
        promised = {k: v for k, v in (synced if mode == "powercut" else closed).items() if k.startswith("d")}
        for key, v in promised.items():
            path = os.path.join(self.mnt, "durable", key)
            try:
                got = parse(open(path, "rb").read())
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    problems.append(f"durable/{key}: {exc.strerror}")
                    continue
                problems.append(f"durable/{key} version {v} was {'fsync' if mode == 'powercut' else 'clos'}ed "
                                "before the crash and is gone")
                continue
            if got is None or got[1] < v:
                problems.append(f"durable/{key}: holds {got}, version {v} was promised")
        for name in os.listdir(os.path.join(self.mnt, "durable")):  # (pinned: they would pile up)
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.mnt, "durable", name))
        for j in journals:  # the next trial's journals start empty
            if os.path.exists(j):
                os.unlink(j)
        return {"files": files, "promised": len(promised), "problems": problems, "direct_batches": stored}


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "worker":
        worker(*argv[1:4], int(argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    p.add_argument("--power-cut-share", type=float, default=0.5, metavar="SHARE",
                   help="share of trials that simulate a power cut instead of a kill (default 0.5)")
    p.add_argument("--fresh-every", type=int, default=50, metavar="N", help="new warehouse every N trials")
    p.add_argument("--min-run", type=float, default=0.3, help="least seconds of work before the crash")
    p.add_argument("--max-run", type=float, default=2.5, help="most seconds of work before the crash")
    p.add_argument("--workdir", default=None, help="where warehouses go (default: a new temporary directory)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--direct-writers", type=int, default=0, metavar="N",
                   help="clients of the direct path storing and reading batches in every trial "
                        "(default 0: file I/O through the mount only)")
    p.add_argument("--lying-sync", action="store_true",
                   help="make the drives acknowledge syncs they do not do (power-cut trials): "
                        "the harness must then fail, which shows that it can")
    args = p.parse_args(argv)
    if (args.trials < 1 or not 0 <= args.power_cut_share <= 1 or args.min_run > args.max_run
            or args.direct_writers < 0):
        p.error("need --trials >= 1, 0 <= --power-cut-share <= 1, --min-run <= --max-run, --direct-writers >= 0")
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    work = args.workdir or tempfile.mkdtemp(prefix="kvfs-crashtest-")
    os.makedirs(work, exist_ok=True)
    trial = Trial(args, work)
    summary = {"seed": seed, "trials": 0, "kill": 0, "powercut": 0, "files_checked": 0,
               "promises_checked": 0, "recoveries": 0, "direct_writers": args.direct_writers,
               "direct_batches": 0, "failed": None}
    t0 = time.monotonic()
    try:
        for n in range(args.trials):
            if n % args.fresh_every == 0:
                trial.mkfs()
            mode = "powercut" if rng.random() < args.power_cut_share else "kill"
            result = trial.run(n, mode, rng)
            fsck = kvfs("fsck", trial.warehouse, "--json", "--verify-data", check=False)
            report = json.loads(fsck.stdout) if fsck.stdout.strip().startswith("{") else {"clean": False, "problems": [fsck.stderr]}
            if not report.get("clean"):
                result["problems"] += [f"fsck: {x}" for x in report.get("problems", [])]
            summary["trials"] += 1
            summary[mode] += 1
            summary["files_checked"] += result["files"]
            summary["promises_checked"] += result["promised"]
            summary["direct_batches"] += result["direct_batches"]
            if result["problems"]:
                summary["failed"] = {"trial": n, "mode": mode, "problems": result["problems"][:20],
                                     "warehouse": trial.warehouse}
                break
            if not args.json:
                direct = f", {result['direct_batches']} direct batches" if args.direct_writers else ""
                print(f"trial {n + 1}/{args.trials} {mode:8s} ok: {result['files']} files checked, "
                      f"{result['promised']} promises kept{direct}", flush=True)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", trial.mnt], capture_output=True)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    log = os.path.join(trial.warehouse, "kvfs.log")
    if os.path.exists(log):
        summary["recoveries"] = open(log).read().count("recovered after unclean shutdown")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"crashtest: {summary['trials']} trials ({summary['kill']} kill -9, {summary['powercut']} power cuts) "
              f"in {summary['seconds']} s, {summary['files_checked']} files and "
              f"{summary['promises_checked']} promises checked"
              + (f", {summary['direct_batches']} direct batches from {args.direct_writers} direct writers"
                 if args.direct_writers else "")
              + f", seed {seed}: "
              + ("all passed" if not summary["failed"] else "FAILED"))
        if summary["failed"]:
            print(json.dumps(summary["failed"], indent=2))
    if not summary["failed"] and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
