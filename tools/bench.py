"""kvfs bench: each workload on a kvfs mount and on a plain directory of the same disk (the
raw baseline), in the same run, alternating, repeated; the median of each is reported with
the ratio kvfs/raw. Nothing here is a pass/fail test: the numbers are for people. It drives
kvfs only as a client does (the `kvfs` command, file I/O on the mount): no engine module.

Without --mount, a file-backed warehouse is made and mounted in --dir for the run and the
raw baseline is a directory beside it (so both sit on the same disk); with --mount, the raw
directory must be given too (--raw). Cold reads drop the page cache first
(/proc/sys/vm/drop_caches: root only; otherwise they are reported as not measured).
"""

import json
import math
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from kvfs.errors import EXIT_OK, EXIT_USAGE, QuietError

from . import command

MiB = 1 << 20


@dataclass
class Scale:
    total: int  # bytes per file-size workload
    entries: int  # directory entries for the metadata workload
    lookups: int
    prompts: int  # prompts for the space workload
    reps: int


SCALES = {
    "quick": Scale(total=64 * MiB, entries=2_000, lookups=1_000, prompts=4, reps=1),
    "standard": Scale(total=512 * MiB, entries=100_000, lookups=20_000, prompts=16, reps=5),
    "full": Scale(total=1024 * MiB, entries=1_000_000, lookups=50_000, prompts=32, reps=3),
}


@dataclass
class Row:
    workload: str
    unit: str
    raw: float | None
    kvfs: float | None
    target: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.raw and self.kvfs is not None:
            return self.kvfs / self.raw
        return None

    def as_dict(self) -> dict:
        return {"workload": self.workload, "unit": self.unit, "raw": self.raw, "kvfs": self.kvfs,
                "ratio": None if self.ratio is None else round(self.ratio, 3), "target": self.target,
                "note": self.note}


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def _buffer(size: int, seed: int) -> mmap.mmap:
    """A page-aligned buffer (O_DIRECT needs one) of unique, incompressible bytes."""
    buf = mmap.mmap(-1, size)
    rnd = random.Random(seed).randbytes(MiB)
    for off in range(0, size, MiB):
        n = min(MiB, size - off)
        buf[off:off + n] = rnd[:n]
        buf[off:off + 16] = seed.to_bytes(8, "big") + off.to_bytes(8, "big")  # every block unique
    return buf


def _write_files(d: str, size: int, count: int, direct: bool, seed: int) -> float:
    """Write `count` files of `size` bytes (1 MiB writes), fsync each; returns seconds."""
    os.makedirs(d, exist_ok=True)
    flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    t = time.perf_counter()
    for i in range(count):
        buf = _buffer(size, seed * 100_000 + i)
        fd = os.open(os.path.join(d, f"f{i:06d}"), flags, 0o644)
        try:
            for off in range(0, size, MiB):
                os.write(fd, memoryview(buf)[off:off + MiB])
            os.fsync(fd)
        finally:  # (an open file would keep the mount busy at cleanup)
            os.close(fd)
        buf.close()
    return time.perf_counter() - t


def _read_files(paths: list[str], direct: bool) -> float:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    buf = mmap.mmap(-1, MiB)
    t = time.perf_counter()
    for p in paths:
        fd = os.open(p, flags)
        try:
            while os.readv(fd, [buf]) > 0:
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - t


def _floor2(ratio: float) -> str:
    """Two decimals, rounded down: a ratio just under its target must not print as meeting it."""
    return f"{math.floor(ratio * 100) / 100:.2f}"


def create_rate(d: str, n: int) -> float:
    """Make directory d with n empty files (open O_CREAT, close): files per second."""
    os.makedirs(d)
    t = time.perf_counter()
    for i in range(n):
        os.close(os.open(os.path.join(d, f"{i:032x}.bin"), os.O_CREAT | os.O_WRONLY, 0o644))
    return n / (time.perf_counter() - t)


def lookup_names(n: int, lookups: int, seed: int) -> tuple[list[str], list[str]]:
    """Names of create_rate's files to look up, and as many names that are not there."""
    rng = random.Random(seed)
    names = [f"{rng.randrange(n):032x}.bin" for _ in range(lookups)]
    missing = [f"{rng.getrandbits(127) | 1 << 127:032x}.bin" for _ in range(lookups)]
    return names, missing


def stat_rate(d: str, names: list[str]) -> float:
    t = time.perf_counter()
    for name in names:
        os.stat(os.path.join(d, name))
    return len(names) / (time.perf_counter() - t)


def miss_rate(d: str, names: list[str]) -> float:
    t = time.perf_counter()
    for name in names:
        os.path.exists(os.path.join(d, name))
    return len(names) / (time.perf_counter() - t)


def _files(d: str) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d))


class Bench:
    def __init__(self, mount: str, raw: str, scale: Scale, progress=None):
        self.mount, self.raw, self.scale = mount, raw, scale
        self.rows: list[Row] = []
        self.progress = progress or (lambda msg: None)
        self.can_drop = drop_caches()
        self._seq = 0

    def _dirs(self, name: str) -> dict[str, str]:
        self._seq += 1
        return {"raw": os.path.join(self.raw, f"{name}-{self._seq}"),
                "kvfs": os.path.join(self.mount, f"{name}-{self._seq}")}

    def _both(self, fn) -> dict[str, list[float]]:
        """fn(side, dir) -> value, run alternately on raw and kvfs, scale.reps times."""
        out = {"raw": [], "kvfs": []}
        for rep in range(self.scale.reps):
            order = ("raw", "kvfs") if rep % 2 == 0 else ("kvfs", "raw")
            for side in order:
                out[side].append(fn(side, rep))
        return out

    def add(self, workload, unit, values, target=None, note=""):
        med = {k: statistics.median(v) if v and None not in v else None for k, v in values.items()}
        # The spread of the ratio over the repetitions (raw and kvfs of one repetition ran
        # back to back): on a noisy machine the median alone hides how far runs differ.
        ratios = [k / r for r, k in zip(values["raw"], values["kvfs"]) if r and k is not None]
        if len(ratios) > 1:
            spread = f"runs {_floor2(min(ratios))}-{_floor2(max(ratios))}"
            note = f"{spread}; {note}" if note else spread
        row = Row(workload, unit, med["raw"], med["kvfs"], target, note)
        self.rows.append(row)
        self.progress(row)

    # -- 1 and 2: sequential files, buffered and O_DIRECT -----------------------------------

    def files(self, size: int, direct: bool) -> None:
        count = max(2, self.scale.total // size)
        label = f"{size // MiB} MiB files" + (", O_DIRECT" if direct else "")
        mb = count * size / 1e6
        written, cold, warm = {"raw": [], "kvfs": []}, {"raw": [], "kvfs": []}, {"raw": [], "kvfs": []}
        for rep in range(self.scale.reps):
            for side in (("raw", "kvfs") if rep % 2 == 0 else ("kvfs", "raw")):
                d = self._dirs("seq")[side]
                written[side].append(mb / _write_files(d, size, count, direct, self._seq))
                paths = _files(d)
                cold[side].append(mb / _read_files(paths, direct) if drop_caches() else None)
                warm[side].append(mb / _read_files(paths, direct))
                shutil.rmtree(d)
        self.add(f"write {label} (fsync each)", "MB/s", written, 0.7)
        if not direct:
            self.add(f"read {label}, cold", "MB/s", cold, 0.9,
                     "" if self.can_drop else "not measured: dropping caches needs root")
            self.add(f"read {label}, warm", "MB/s", warm, 0.8)
        else:
            self.add(f"read {label}", "MB/s", cold if self.can_drop else warm, 0.9)

    # -- 3: the vLLM filesystem-tier pattern --------------------------------------------

    def vllm(self) -> None:
        size = 2 * MiB
        count = max(4, self.scale.total // size)

        def run(side, rep):
            root = self._dirs("vllm")[side]
            os.makedirs(root)
            rng = random.Random(rep)
            buf = _buffer(size, 7 + rep)
            t = time.perf_counter()
            paths = []
            for i in range(count):
                h = f"{rng.getrandbits(128):032x}"
                dest = os.path.join(root, h[:3], h[3:5] + "_g0", h + ".bin")
                for _ in range(3):  # existence checks that miss
                    os.path.exists(os.path.join(root, f"{rng.getrandbits(128):032x}.bin"))
                if os.path.exists(dest):
                    continue
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                buf[:16] = i.to_bytes(8, "big") + rep.to_bytes(8, "big")
                tmp = f"{dest}_{rng.getrandbits(32):08x}.tmp"
                fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_TRUNC | os.O_DIRECT, 0o644)
                os.write(fd, buf)
                os.close(fd)
                os.replace(tmp, dest)
                paths.append(dest)
            wt = time.perf_counter() - t
            drop_caches()
            rbuf = mmap.mmap(-1, size)
            t = time.perf_counter()
            for p in paths:
                fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
                os.readv(fd, [rbuf])
                os.close(fd)
            rt = time.perf_counter() - t
            shutil.rmtree(root)
            return count * size / 1e6 / wt, count * size / 1e6 / rt

        res = self._both(run)
        self.add("vLLM tier: write (3 misses, O_EXCL|O_DIRECT temp, rename)", "MB/s",
                 {k: [w for w, _ in v] for k, v in res.items()}, 0.7)
        self.add("vLLM tier: O_DIRECT readv of whole files, cold", "MB/s",
                 {k: [r for _, r in v] for k, v in res.items()}, 0.9)

    # -- 4: metadata in a big directory --------------------------------------------------

    def metadata(self) -> None:
        n, lookups = self.scale.entries, self.scale.lookups
        creates, hits, misses = {"raw": [], "kvfs": []}, {"raw": [], "kvfs": []}, {"raw": [], "kvfs": []}
        dirs = self._dirs("meta")
        for side in ("raw", "kvfs"):  # one big directory each, made once
            creates[side].append(create_rate(dirs[side], n))
        for rep in range(self.scale.reps):
            names, missing = lookup_names(n, lookups, rep)
            for side in (("raw", "kvfs") if rep % 2 == 0 else ("kvfs", "raw")):
                drop_caches()
                hits[side].append(stat_rate(dirs[side], names))
                misses[side].append(miss_rate(dirs[side], missing))
        for side in ("raw", "kvfs"):
            shutil.rmtree(dirs[side])
        self.add(f"create, directory of {n:,} entries", "ops/s", creates, 0.3)
        self.add(f"lookup hit in {n:,} entries, cold", "ops/s", hits, 0.3)
        self.add(f"lookup miss in {n:,} entries", "ops/s", misses, 0.3)

    # -- 5: parallel readers ----------------------------------------------------------------

    def parallel(self) -> None:
        size = 32 * MiB
        dirs = self._dirs("par")
        for side in ("raw", "kvfs"):
            _write_files(dirs[side], size, 4, False, 900)
        one, four = {"raw": [], "kvfs": []}, {"raw": [], "kvfs": []}
        for rep in range(self.scale.reps):
            for side in (("raw", "kvfs") if rep % 2 == 0 else ("kvfs", "raw")):
                paths = _files(dirs[side])
                drop_caches()
                one[side].append(size / 1e6 / _read_files(paths[:1], False))
                drop_caches()
                t = time.perf_counter()
                threads = [threading.Thread(target=_read_files, args=([p], False)) for p in paths]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                four[side].append(4 * size / 1e6 / (time.perf_counter() - t))
        for side in ("raw", "kvfs"):
            shutil.rmtree(dirs[side])
        self.add("1 reader, 32 MiB, cold", "MB/s", one)
        self.add("4 readers of different files, cold", "MB/s", four, None,
                 "scaling 4/1: raw {:.2f}x, kvfs {:.2f}x (target kvfs >= 1.5x)".format(
                     statistics.median(four["raw"]) / statistics.median(one["raw"]),
                     statistics.median(four["kvfs"]) / statistics.median(one["kvfs"])))

    # -- 6: space ----------------------------------------------------------------------------

    def space(self) -> None:
        """Prompts that share long prefixes, stored per prompt (one file per prompt and
        layer, as vLLM's ExampleConnector does): logical bytes against what the devices
        use, plain and with zstd."""
        import numpy as np

        for codec in ("none", "zstd"):
            d = self._dirs(f"space-{codec}")["kvfs"]
            os.makedirs(d)
            if codec == "zstd":
                os.setxattr(d, "user.kvfs.compress", b"zstd")
            rng = np.random.default_rng(11)
            # Token-major (tokens, heads, head dim), as vLLM and LMCache lay KV out: a shared
            # prefix is a shared run of bytes. Each layer's prefix differs, each tail too.
            shared = [rng.standard_normal((4096, 8, 128)).astype(np.float16) for _ in range(4)]
            before = self._used()
            logical = 0
            for p in range(self.scale.prompts):
                for layer in range(4):
                    tail = rng.standard_normal((512, 8, 128)).astype(np.float16)
                    data = np.concatenate([shared[layer], tail], axis=0).tobytes()
                    with open(os.path.join(d, f"p{p}-layer{layer}.bin"), "wb") as f:
                        f.write(data)
                    logical += len(data)
            physical = self._used() - before
            self.rows.append(Row(f"space: {self.scale.prompts} prompts sharing 8/9 of their KV, {codec} "
                                 "(raw: bytes given; kvfs: bytes on its devices)",
                                 "MiB", logical / MiB, physical / MiB, None,
                                 f"kvfs stores {logical / max(physical, 1):.1f}x less"))
            self.progress(self.rows[-1])
            shutil.rmtree(d)

    def _used(self) -> int:
        os.sync()
        st = os.statvfs(self.mount)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def direct_path(self) -> None:
        """The direct path against the device file it reads (tools.bench_direct)."""
        from . import bench_direct

        bench_direct.run(self, drop_caches, Row)

    def run(self, workloads: list[str]) -> list[Row]:
        steps = {
            "seq": lambda: (self.files(2 * MiB, False), self.files(32 * MiB, False)),
            "direct": lambda: (self.files(2 * MiB, True), self.files(32 * MiB, True)),
            "vllm": self.vllm, "meta": self.metadata, "parallel": self.parallel, "space": self.space,
            "direct-path": self.direct_path,
        }
        for w in workloads:
            steps[w]()
        return self.rows


WORKLOADS = ("seq", "direct", "vllm", "meta", "parallel", "space", "direct-path")


def table(rows: list[Row]) -> str:
    lines = ["| workload | unit | raw | kvfs | kvfs/raw | target | |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"  # noqa: E731
        ratio = "-" if r.ratio is None else _floor2(r.ratio)
        target = "" if r.target is None else f">= {r.target}"
        verdict = "" if r.target is None or r.ratio is None else ("met" if r.ratio >= r.target else "below")
        lines.append(f"| {r.workload} | {r.unit} | {fmt(r.raw)} | {fmt(r.kvfs)} | {ratio} | {target} | "
                     f"{', '.join(x for x in (verdict, r.note) if x)} |")
    return "\n".join(lines)


def add_parser(sub) -> None:
    s = command.subparser(sub, "bench", run, help="measure kvfs against the raw disk, same run, as ratios",
                          description="Run each workload (sequential files, client O_DIRECT, the vLLM "
                                      "filesystem-tier pattern, metadata in a big directory, parallel "
                                      "readers, space savings) on a kvfs mount and on a plain directory of "
                                      "the same disk, alternating, and print the medians with kvfs/raw.",
                          epilog="examples:\n  kvfs bench\n  kvfs bench --scale full --json > bench.json\n"
                                 "  kvfs bench --mount /mnt/kvfs --raw /data/raw --only seq --only vllm")
    s.add_argument("--scale", choices=sorted(SCALES), default="standard",
                   help="quick (seconds), standard (default, a few minutes), full (1,000,000 entries)")
    s.add_argument("--only", action="append", choices=WORKLOADS, metavar="WORKLOAD",
                   help=f"run only this workload ({', '.join(WORKLOADS)}); repeat for several")
    s.add_argument("--dir", default="/var/tmp", help="where to make the temporary warehouse and raw "
                   "directory (default /var/tmp): the disk under test")
    s.add_argument("--mount", metavar="MOUNTPOINT", help="use this kvfs mount instead of a temporary one")
    s.add_argument("--raw", metavar="DIR", help="with --mount: a plain directory on the same disk")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument("--markdown", action="store_true", help="print a whole BENCHMARKS.md document")


def run(args) -> int:
    scale = SCALES[args.scale]
    workloads = args.only or list(WORKLOADS)
    own = args.mount is None
    if not own and not args.raw:
        raise QuietError("with --mount, give --raw: a plain directory on the same disk", EXIT_USAGE)
    base = tempfile.mkdtemp(prefix="kvfs-bench-", dir=args.dir) if own else None
    mount, raw = args.mount, args.raw
    kvfs = [sys.executable, "-m", "kvfs.tools"]
    try:
        if own:
            raw, mount = os.path.join(base, "raw"), os.path.join(base, "mnt")
            os.makedirs(raw)
            os.makedirs(mount)
            size = max(4 * scale.total, 2 << 30) + (scale.entries * 8192 if "meta" in workloads else 0)
            if "direct-path" in workloads:  # its files, and a Llama-3-8B context (4 GiB at 32K tokens)
                size += (scale.reps + 1) * scale.total + (5 << 30 if scale.total >= 512 * MiB else 512 * MiB)
            subprocess.run([*kvfs, "mkfs", os.path.join(base, "wh"), "--size", str(size)], check=True,
                           capture_output=True)
            subprocess.run([*kvfs, "mount", os.path.join(base, "wh"), mount], check=True, capture_output=True)
        tty = sys.stderr.isatty() and not args.json
        progress = (lambda r: print(f"  {r.workload}: raw {r.raw}, kvfs {r.kvfs}", file=sys.stderr)) if tty else None
        b = Bench(mount, raw, scale, progress)
        rows = b.run(workloads)
    finally:
        if own:
            subprocess.run([*kvfs, "umount", mount], capture_output=True)
            shutil.rmtree(base, ignore_errors=True)
    machine = {"cpus": os.cpu_count(), "kernel": os.uname().release,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.json:
        print(json.dumps({"scale": args.scale, "machine": machine, "rows": [r.as_dict() for r in rows]}, indent=2))
    elif args.markdown:
        print(markdown(rows, machine, args))
    else:
        print(table(rows))
    return EXIT_OK


def markdown(rows: list[Row], machine: dict, args) -> str:
    """A whole BENCHMARKS.md: what was measured, where, by which command, then the table."""
    cmd = "kvfs bench --scale " + args.scale + "".join(f" --only {w}" for w in args.only or [])
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return "\n".join([
        "# kvfs benchmarks",
        "",
        f"Measured {machine['date']} on {machine['cpus']} CPUs ({cpu}), {mem:.0f} GiB of memory, "
        f"Linux {machine['kernel']}, with `{cmd}` (regenerate: `bash scripts/benchmarks.sh`).",
        "",
        "Each workload ran on a kvfs mount of a file-backed warehouse and on a plain directory of",
        "the same disk, alternating, in the same run; the figures are medians. *kvfs/raw* is the",
        "ratio of the two (higher is better, but for space, where kvfs is the bytes it stores),",
        "with its lowest and highest over the repetitions. Cold reads drop the page cache",
        "first. The targets are issue 6's.",
        "",
        table(rows),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
