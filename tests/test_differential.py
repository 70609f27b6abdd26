"""Differential test: random sequences of file operations give the same results on a kvfs
mount as on tmpfs (return values, errnos, file contents, listings)."""

import itertools
import json
import os
import random
import shutil
import stat
import tempfile
import time

from conftest import run_kvfs
from hypothesis import HealthCheck, given, settings, strategies as st

NAMES = ["a", "b", "c", "d/x", "d/y", "e/z", "d", "e"]
_counter = itertools.count()


def _data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Tree:
    """One side of the comparison: a directory plus the file descriptors held open in it."""

    def __init__(self, root: str):
        self.root = root
        self.fds: list[int | None] = []

    def p(self, name):
        return os.path.join(self.root, name)

    def close_all(self):
        for fd in self.fds:
            if fd is not None:
                os.close(fd)
        self.fds = []


def apply(tree: Tree, op):
    """Run one operation; return a comparable result ('ok', value) or ('err', errno)."""
    kind, args = op[0], op[1:]
    try:
        if kind == "write":
            name, off, n, seed = args
            fd = os.open(tree.p(name), os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                return ("ok", os.pwrite(fd, _data(seed, n), off))
            finally:
                os.close(fd)
        if kind == "append":
            name, n, seed = args
            with open(tree.p(name), "ab") as f:
                return ("ok", f.write(_data(seed, n)))
        if kind == "trunc_open":
            name, n, seed = args
            with open(tree.p(name), "wb") as f:
                return ("ok", f.write(_data(seed, n)))
        if kind == "truncate":
            name, size = args
            os.truncate(tree.p(name), size)
            return ("ok", None)
        if kind == "read":
            with open(tree.p(args[0]), "rb") as f:
                return ("ok", f.read())
        if kind == "size":
            st_ = os.stat(tree.p(args[0]))
            # A directory's st_size is filesystem-specific (tmpfs counts entries).
            return ("ok", "dir" if stat.S_ISDIR(st_.st_mode) else st_.st_size)
        if kind == "rename":
            os.rename(tree.p(args[0]), tree.p(args[1]))
            return ("ok", None)
        if kind == "unlink":
            os.unlink(tree.p(args[0]))
            return ("ok", None)
        if kind == "mkdir":
            os.mkdir(tree.p(args[0]))
            return ("ok", None)
        if kind == "rmdir":
            os.rmdir(tree.p(args[0]))
            return ("ok", None)
        if kind == "link":
            os.link(tree.p(args[0]), tree.p(args[1]))
            return ("ok", os.stat(tree.p(args[1])).st_nlink)
        if kind == "excl":
            fd = os.open(tree.p(args[0]), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
            return ("ok", None)
        if kind == "listdir":
            return ("ok", sorted(os.listdir(tree.p(args[0]) if args[0] else tree.root)))
        if kind == "hold":
            tree.fds.append(os.open(tree.p(args[0]), os.O_RDWR))
            return ("ok", len(tree.fds) - 1)
        if kind in ("fd_write", "fd_read", "fd_close"):
            live = [i for i, fd in enumerate(tree.fds) if fd is not None]
            if not live:
                return ("ok", "no fd")
            i = live[args[0] % len(live)]
            fd = tree.fds[i]
            if kind == "fd_write":
                return ("ok", os.pwrite(fd, _data(args[2], args[3]), args[1]))
            if kind == "fd_read":
                return ("ok", os.pread(fd, 1 << 22, 0))
            os.close(fd)
            tree.fds[i] = None
            return ("ok", None)
    except OSError as exc:
        return ("err", exc.errno)
    raise AssertionError(f"unknown op {kind}")


def snapshot(root: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel] = ("dir", sorted(dirnames), sorted(filenames))
        for fn in filenames:
            path = os.path.join(dirpath, fn)
            st_ = os.lstat(path)
            with open(path, "rb") as f:
                out[os.path.join(rel, fn)] = ("file", stat.S_IMODE(st_.st_mode), st_.st_nlink, f.read())
    return out


name = st.sampled_from(NAMES)
size = st.one_of(st.integers(0, 5000), st.integers(0, 3 << 20))
offset = st.one_of(st.integers(0, 5000), st.integers(0, 3 << 20))
seed = st.integers(0, 1 << 16)
length = st.one_of(st.integers(0, 9000), st.integers(0, 1 << 20))
ops = st.one_of(
    st.tuples(st.just("write"), name, offset, length, seed),
    st.tuples(st.just("append"), name, length, seed),
    st.tuples(st.just("trunc_open"), name, length, seed),
    st.tuples(st.just("truncate"), name, size),
    st.tuples(st.just("read"), name),
    st.tuples(st.just("size"), name),
    st.tuples(st.just("rename"), name, name),
    st.tuples(st.just("unlink"), name),
    st.tuples(st.just("mkdir"), name),
    st.tuples(st.just("rmdir"), name),
    st.tuples(st.just("link"), name, name),
    st.tuples(st.just("excl"), name),
    st.tuples(st.just("listdir"), st.sampled_from(["", "d", "e"])),
    st.tuples(st.just("hold"), name),
    st.tuples(st.just("fd_write"), st.integers(0, 7), offset, seed, length),
    st.tuples(st.just("fd_read"), st.integers(0, 7)),
    st.tuples(st.just("fd_close"), st.integers(0, 7)),
)


def test_kvfs_behaves_like_tmpfs(make_mount):
    # Small blocks so that a few KiB already span several blocks.
    m = make_mount(block_size="4K", devices=(("a.img", "256M"),))
    shm = tempfile.mkdtemp(prefix="kvfs-diff-", dir="/dev/shm")

    @settings(max_examples=int(os.environ.get("KVFS_DIFF_EXAMPLES", "250")), deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(ops, min_size=1, max_size=30))
    def run(sequence):
        case = f"case{next(_counter)}"
        sides = [Tree(os.path.join(m.path, case)), Tree(os.path.join(shm, case))]
        for t in sides:
            os.mkdir(t.root)
            os.mkdir(t.p("d"))
        try:
            for op in sequence:
                results = [apply(t, op) for t in sides]
                assert results[0] == results[1], f"{op}: kvfs {results[0]!r:.200} vs tmpfs {results[1]!r:.200}"
            for t in sides:
                t.close_all()
            assert snapshot(sides[0].root) == snapshot(sides[1].root)
        finally:
            for t in sides:
                t.close_all()
                shutil.rmtree(t.root, ignore_errors=True)

    try:
        run()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    ncases = next(_counter)
    print("differential cases:", ncases)
    assert ncases >= 20, "hypothesis ran too few cases"
    # Everything was deleted again: once the kernel has forgotten the inodes, every extent
    # must be free (exact refcounts, nothing leaked), and fsck must agree.
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st_ = os.statvfs(m.path)
        if st_.f_bfree == st_.f_blocks:
            break
        time.sleep(0.1)
    assert st_.f_bfree == st_.f_blocks, f"{(st_.f_blocks - st_.f_bfree) * 4096} bytes still in use"
    m.umount()
    report = json.loads(run_kvfs("fsck", m.warehouse, "--json").stdout)
    assert report["clean"], report["problems"]
