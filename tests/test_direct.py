"""The direct path (kvfs.direct, kvfs.direct_server, kvfs.direct_client) on real mounts.

Every test mounts for real and talks to the daemon's socket from this process, from forked
children running as another user, or from client subprocesses killed mid-request: the same
bytes as file I/O through the mount, the kernel's permission rules, garbage refused with an
errno while the daemon serves on, EROFS on a read-only mount, quotas, eviction and ENOSPC as
for any writer, damaged blocks refused and quarantined, the counters, and crashes of a
client or of the daemon in the middle of a batch leaving nothing torn or leaked."""

import errno
import fcntl
import json
import mmap
import os
import random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from conftest import Mount, pid_alive, run_kvfs, wait_for
from kvfs import meta as M
from kvfs.direct_client import DirectClient, DirectError, connect
from kvfs.warehouse import Warehouse

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB  # the block size of these tests' warehouses: small, so that ranges cross blocks
NOBODY = 65534


def content(key: str, size: int) -> bytes:
    return random.Random(key).randbytes(size)


def compressible(key: str, size: int) -> bytes:
    rnd = random.Random(key)
    words = [bytes(rnd.choice(b"abcdefghij") for _ in range(rnd.randint(2, 9))) for _ in range(64)]
    out = bytearray()
    while len(out) < size:
        out += rnd.choice(words) + b" "
    return bytes(out[:size])


def write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def stats(m) -> dict:
    return json.loads(run_kvfs("stat", m.path, "--json").stdout)


def fsck(warehouse) -> dict:
    res = run_kvfs("fsck", warehouse, "--json", "--verify-data", check=False)
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["clean"], report
    return report


def gc_problems(target) -> list:
    return json.loads(run_kvfs("gc", target, "--json", "--grace", "0").stdout)["problems"]


def store(c, files: dict, mode=0o644, **kw) -> list:
    """Store {path: bytes} in one direct batch; the per-file results."""
    total = sum(len(d) for d in files.values())
    buf = c.buffer(max(total, 1))
    items, off = [], 0
    for path, data in files.items():
        buf.mm[off:off + len(data)] = data
        items.append((path, buf, off, len(data), mode))
        off += len(data)
    try:
        return c.write(items, **kw)
    finally:
        buf.close()


def dread(c, path, offset, length) -> tuple[int, bytes]:
    """One direct read: (result, the bytes it says it read)."""
    buf = c.buffer(max(length, 1))
    try:
        [n] = c.read([(path, offset, length, buf, 0)])
        return n, bytes(buf.mm[:max(n, 0)])
    finally:
        buf.close()


@pytest.fixture
def dmount(make_mount):
    """A two-device warehouse with 64 KiB blocks, mounted."""
    return make_mount(block_size="64K", devices=(("a.img", "64M"), ("b.img", "64M")))


def ranges_for(size: int, seed: str) -> list[tuple[int, int]]:
    """Ranges that start and end on, just before and just after block boundaries, cover the
    whole file, run past its end, start at or past it, and a few random ones."""
    rs = [(0, size), (0, size + 1000), (0, 0), (size, 10), (size + 5 * BS, 10), (max(size - 5, 0), 100)]
    for b in range(0, size + BS, BS):
        rs += [(max(b - 1, 0), 2), (max(b - 10, 0), BS + 20), (b, BS), (b + 1, BS - 2)]
    rnd = random.Random(seed)
    rs += [(rnd.randrange(size + 1), rnd.randrange(3 * BS)) for _ in range(20)]
    return rs


def check_ranges(c, files: dict) -> None:
    """Every range of every file, read in ONE direct batch into one buffer at scattered
    offsets, equals what pread through the mount returns."""
    items, want = [], []
    off = 0
    for path, expect in files.items():
        for fo, n in ranges_for(len(expect), path):
            items.append((path, fo, n, off))
            want.append(expect[fo:fo + n])
            off += n + 7  # gaps between destinations: nothing spills over
    buf = c.buffer(off + 1)
    try:
        buf.mm[:] = b"\xee" * len(buf.mm)
        results = c.read([(p, fo, n, buf, bo) for p, fo, n, bo in items])
        for (path, fo, n, bo), w, r in zip(items, want, results):
            assert r == len(w), (path, fo, n, r)
            assert bytes(buf.mm[bo:bo + r]) == w, (path, fo, n)
            assert buf.mm[bo + n:bo + n + 7] == b"\xee" * 7, ("wrote past its range", path, fo, n)
    finally:
        buf.close()


# -- 1: the same bytes as file I/O --------------------------------------------------------------

def test_direct_reads_equal_plain_reads_for_written_sparse_open_and_stored_files(dmount):
    m = dmount
    c = connect(m.path)
    assert c is not None and c.block_size == BS and not c.readonly
    os.mkdir(m.p("w"))
    write(m.p("w", "raw"), content("raw", 5 * BS + 123))
    write(m.p("w", "tiny"), b"x")
    write(m.p("w", "empty"), b"")
    with open(m.p("w", "sparse"), "wb") as f:  # holes made by seek and truncate
        f.truncate(4 * BS + 7)
        f.seek(2 * BS - 500)
        f.write(content("mid", 1000))          # crosses a block boundary between two holes
        f.seek(5 * BS + 3)
        f.write(b"tail")
        f.truncate(7 * BS + 1)                 # a hole at the end
    write(m.p("w", "holes"), b"")
    os.truncate(m.p("w", "holes"), 3 * BS)     # nothing but holes
    stored = {"d/s/big": content("big", 3 * BS + 99), "d/s/block": content("block", BS),
              "d/one": b"1", "d/empty": b""}
    assert store(c, stored) == [0, 0, 0, 0]
    # A file open for writing: what the daemon holds and has not published.
    fd = os.open(m.p("w", "open"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, content("open", BS + 300), 0)
        os.pwrite(fd, b"later", 3 * BS)
        pending = os.pread(fd, 4 * BS, 0)
        check_ranges(c, {"w/open": pending})
    finally:
        os.close(fd)
    paths = ["w/raw", "w/tiny", "w/empty", "w/sparse", "w/holes", "w/open", *stored]
    for p in stored:  # what the direct path stored, file I/O reads back
        assert read(m.p(p)) == stored[p]
        st = os.stat(m.p(p))
        assert st.st_size == len(stored[p]) and stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == 0
    plain = {p: read(m.p(p)) for p in paths}
    assert plain["w/sparse"][2 * BS - 500:2 * BS + 500] == content("mid", 1000)
    assert plain["w/holes"] == bytes(3 * BS)
    check_ranges(c, plain)
    assert c.lookup(paths) == [len(plain[p]) for p in paths]
    c.close()
    m.remount()  # nothing cached now: the direct path reads the devices first
    c = connect(m.p("w"))  # any path inside the mount finds it
    assert c is not None and c.root == m.path
    check_ranges(c, plain)
    assert {p: read(m.p(p)) for p in paths} == plain
    c.close()


def test_direct_reads_equal_plain_reads_of_compressed_files(make_mount):
    m = make_mount(block_size="64K", devices=(("a.img", "64M"),), options=["compress=zstd"])
    c = connect(m.path)
    os.mkdir(m.p("z"))
    files = {"z/written": compressible("w", 4 * BS + 777), "z/stored": compressible("s", 3 * BS + 5),
             "z/small": compressible("t", 999)}
    write(m.p("z/written"), files["z/written"])
    write(m.p("z/small"), files["z/small"])
    assert store(c, {"z/stored": files["z/stored"]}) == [0]
    c.close()
    m.remount()
    st = stats(m)
    assert st["stored_bytes"] * 2 < st["block_bytes"], st  # it really is compressed
    c = connect(m.path)
    check_ranges(c, files)  # direct first: decompressed from the devices
    assert {p: read(m.p(p)) for p in files} == files
    check_ranges(c, files)
    c.close()


def test_lookups_answer_sizes_and_errnos(dmount):
    m = dmount
    os.makedirs(m.p("a", "b"))
    write(m.p("a", "f"), b"12345")
    os.symlink("f", m.p("a", "link"))
    with connect(m.path) as c:
        got = c.lookup(["a/f", m.p("a", "f"), "a//./f", "a", "a/b", "a/missing", "nope/f", "a/f/x",
                        "", ".", "a/../a/f", ".kvfs/direct", ".kvfs", "a/link", "x" * 300, "a/f\udcff"])
        E = errno
        assert got == [5, 5, 5, -E.EISDIR, -E.EISDIR, -E.ENOENT, -E.ENOENT, -E.ENOTDIR,
                       -E.EINVAL, -E.EINVAL, -E.EINVAL, -E.EINVAL, -E.EINVAL, -E.EINVAL,
                       -E.ENAMETOOLONG, -E.ENOENT], got
        assert c.lookup([]) == []
        with pytest.raises(ValueError):
            c.lookup([os.path.dirname(m.path)])  # an absolute path outside the mount


def test_a_store_replaces_a_file_and_its_open_readers_keep_the_old_bytes(dmount):
    m = dmount
    old, new = content("old", 2 * BS + 1), content("new", BS - 3)
    write(m.p("f"), old)
    with connect(m.path) as c, open(m.p("f"), "rb") as reader:
        assert store(c, {"f": new}, mode=0o600) == [0]
        assert reader.read() == old
        assert read(m.p("f")) == new and stat.S_IMODE(os.stat(m.p("f")).st_mode) == 0o600
        assert dread(c, "f", 0, 3 * BS) == (len(new), new)
        os.mkdir(m.p("dir"))
        write(m.p("plainfile"), b"p")
        bad = {"dir": b"x", "plainfile/x": b"x", "nodir/x": b"x", ".kvfs/x": b"x", "a/../b": b"x"}
        assert store(c, bad, parents=False) == [-errno.EISDIR, -errno.ENOTDIR, -errno.ENOENT,
                                                -errno.EINVAL, -errno.EINVAL]
        buf = c.buffer(16)
        assert c.write([("m", buf, 0, 1, 0o100644), ("m2", buf, 0, 1, -1)]) == [-errno.EINVAL] * 2
        assert sorted(os.listdir(m.path)) == ["dir", "f", "plainfile"]  # nothing made
        assert store(c, {"deep/er/f": b"made"}) == [0]  # parents by default
        assert read(m.p("deep", "er", "f")) == b"made"
        assert stat.S_IMODE(os.stat(m.p("deep", "er")).st_mode) == 0o755


# -- 2: permissions ---------------------------------------------------------------------------

def as_user(fn, uid=NOBODY, gid=NOBODY, groups=()):
    """Run fn() in a forked child with these credentials; return what it returned (JSON),
    or raise AssertionError with the child's exception."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            out = json.dumps({"ok": fn()})
        except BaseException as exc:  # noqa: B036 (reported to the parent)
            out = json.dumps({"error": repr(exc), "errno": getattr(exc, "errno", None)})
            code = 1
        try:
            with os.fdopen(w, "w") as f:
                f.write(out)
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        out = json.loads(f.read() or "{}")
    _, status = os.waitpid(pid, 0)
    if "ok" not in out:
        raise AssertionError(f"child failed: {out} (status {status})")
    return out["ok"]


@pytest.fixture
def public_dmount(make_warehouse):
    """A mount with allow_other on a mount point other users can reach."""
    mp = tempfile.mkdtemp(prefix="kvfs-dtest-", dir="/tmp")
    os.chmod(mp, 0o755)
    m = Mount(make_warehouse(block_size="64K", devices=(("a.img", "64M"),)), mp, ["allow_other"])
    try:
        m.mount()
        yield m
    finally:
        m.cleanup()
        shutil.rmtree(mp, ignore_errors=True)


def test_another_user_gets_the_kernels_permission_rules(public_dmount):
    m = public_dmount
    secret, shared, public = content("secret", BS + 10), content("grp", 2 * BS), content("pub", 100)
    write(m.p("secret"), secret)
    os.chmod(m.p("secret"), 0o600)
    write(m.p("group"), shared)
    os.chown(m.p("group"), 0, 4242)
    os.chmod(m.p("group"), 0o640)
    write(m.p("public"), public)
    os.mkdir(m.p("private"), 0o700)
    write(m.p("private", "f"), b"hidden")
    os.chmod(m.p("private", "f"), 0o644)
    os.mkdir(m.p("mine"))
    os.chown(m.p("mine"), NOBODY, NOBODY)
    os.mkdir(m.p("sticky"))
    os.chmod(m.p("sticky"), 0o1777)
    write(m.p("sticky", "roots"), b"root's")
    mp = m.path

    def nobody():
        c = connect(mp)
        assert c is not None
        out = {}
        buf = c.buffer(4 * BS)
        buf.mm[:] = b"\xaa" * len(buf.mm)
        out["read"] = c.read([("secret", 0, BS + 10, buf, 0), ("private/f", 0, 6, buf, 2 * BS),
                              ("public", 0, 100, buf, 3 * BS), ("group", 0, 10, buf, 3 * BS + 200)])
        out["untouched"] = bytes(buf.mm[:3 * BS]) == b"\xaa" * (3 * BS)
        out["public"] = bytes(buf.mm[3 * BS:3 * BS + 100]).hex()
        out["lookup"] = c.lookup(["secret", "private/f", "private", "public", "group"])
        out["store"] = c.write([("new", buf, 0, 10, 0o644), ("private/x", buf, 0, 10, 0o644),
                                ("public", buf, 0, 10, 0o644), ("sticky/roots", buf, 0, 10, 0o644),
                                ("sticky/mine", buf, 0, 10, 0o644), ("mine/f", buf, 0, 10, 0o640),
                                ("newdir/f", buf, 0, 10, 0o644)], parents=False)
        out["mkdir"] = c.write([("mine/sub/f", buf, 0, 10, 0o644), ("newdir/f", buf, 0, 10, 0o644),
                                ("private/sub/f", buf, 0, 10, 0o644)], parents=True)
        return out

    out = as_user(nobody)
    E = errno
    assert out["read"] == [-E.EACCES, -E.EACCES, 100, -E.EACCES], out
    assert out["untouched"], "a refused read wrote into the caller's buffer"
    assert bytes.fromhex(out["public"]) == public
    assert out["lookup"] == [BS + 10, -E.EACCES, -E.EISDIR, 100, 2 * BS], out  # stat needs no read bit
    assert out["store"] == [-E.EACCES, -E.EACCES, -E.EACCES, -E.EPERM, 0, 0, -E.ENOENT], out
    assert out["mkdir"] == [0, -E.EACCES, -E.EACCES], out  # as mkdir -p says, not ENOENT
    assert read(m.p("secret")) == secret and read(m.p("public")) == public
    assert read(m.p("sticky", "roots")) == b"root's"
    assert not os.path.exists(m.p("new")) and not os.path.exists(m.p("private", "x"))
    for p in ("sticky/mine", "mine/f", "mine/sub/f", "mine/sub"):
        st = os.stat(m.p(p))
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), p
    assert read(m.p("mine", "f")) == b"\xaa" * 10

    def member():  # the group's bits, through a supplementary group
        c = connect(mp)
        buf = c.buffer(2 * BS)
        n = c.read([("group", 0, 2 * BS, buf, 0)])
        return n, bytes(buf.mm[:]).hex(), c.read([("secret", 0, 1, buf, 0)])

    n, got, refused = as_user(member, groups=(4242, 77))
    assert n == [2 * BS] and bytes.fromhex(got) == shared and refused == [-E.EACCES]
    assert as_user(lambda: connect(mp).lookup(["group"]), groups=()) == [2 * BS]


def test_without_allow_other_only_the_owner_is_served(dmount):
    m = dmount
    write(m.p("f"), b"data")
    root = m.path
    info = json.loads(read(m.p(".kvfs", "direct")))
    assert info["pid"] == m.pid and info["block_size"] == BS

    def other():
        out = {"connect": connect(root) is None}  # the kernel keeps it out of the mount itself
        try:
            DirectClient(root, info)  # the socket itself answers
            out["errno"] = 0
        except DirectError as exc:
            out["errno"] = exc.errno
        return out

    assert as_user(other) == {"connect": True, "errno": errno.EACCES}
    with connect(m.path) as c:  # the owner still is served
        assert c.lookup(["f"]) == [4]


# -- 3: garbage ---------------------------------------------------------------------------------

def raw_socket(m) -> socket.socket:
    info = json.loads(read(m.p(".kvfs", "direct")))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(info["socket"])
    return s


def send(s, body: bytes, fds=()) -> None:
    msg = struct.pack("<I", len(body)) + body
    if fds:
        socket.send_fds(s, [msg], list(fds))
    else:
        s.sendall(msg)


def recv(s) -> dict | None:
    def exact(n):
        out = b""
        while len(out) < n:
            chunk = s.recv(n - len(out))
            if not chunk:
                return None
            out += chunk
        return out
    head = exact(4)
    if head is None:
        return None
    return json.loads(exact(struct.unpack("<I", head)[0]))


def call(s, req, fds=()) -> dict:
    send(s, req if isinstance(req, bytes) else json.dumps(req).encode(), fds)
    return recv(s)


def refused(reply, err=errno.EINVAL) -> bool:
    return reply["ok"] is False and reply["errno"] == err and reply["error"]


def memfd(size, seals=fcntl.F_SEAL_SHRINK) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    if size:
        os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_garbage_on_the_socket_is_refused_and_the_daemon_serves_on(dmount, tmp_path):
    m = dmount
    write(m.p("f"), content("f", BS + 5))
    s = raw_socket(m)
    E = errno
    for body in (b"\xff\xfe\x00garbage", b"not json", b"", b"[1, 2]", b"42", b"null", b'"op"',
                 b'{"no": "op"}', b'{"op": 7}', b"[" * 100000 + b"]" * 100000):
        assert refused(call(s, body)), body[:20]
    assert refused(call(s, {"op": "format_disk"}))
    assert refused(call(s, {"op": "__init__"}))
    assert refused(call(s, {"op": "lookup"})) and refused(call(s, {"op": "lookup", "paths": "f"}))
    assert call(s, {"op": "lookup", "paths": ["f", 7, None, ["f"], "\x00", "/", "/f"]})["sizes"] == \
        [BS + 5, -E.EINVAL, -E.EINVAL, -E.EINVAL, -E.EINVAL, -E.EINVAL, BS + 5]  # (a NUL: no name has one)
    assert refused(call(s, {"op": "lookup", "paths": [0] * ((1 << 20) + 1)}))  # too many
    # buffer: no fd, two fds, a pipe, a regular file, a memfd not sealed, empty, write-sealed
    assert refused(call(s, {"op": "buffer", "id": 1}))
    assert refused(call(s, {"op": "buffer", "id": "x"}, fds=[memfd(4096)]))
    r, w = os.pipe()
    plain = os.open(tmp_path / "plain", os.O_CREAT | os.O_RDWR)
    os.ftruncate(plain, 4096)
    for fds in ([r], [plain], [memfd(4096, 0)], [memfd(0)], [memfd(4096), memfd(4096)]):
        assert refused(call(s, {"op": "buffer", "id": 1}, fds=fds)), fds
    for fd in (r, w, plain):
        os.close(fd)
    F_SEAL_FUTURE_WRITE = 0x10  # (not in the fcntl module)
    for seals in (fcntl.F_SEAL_WRITE, F_SEAL_FUTURE_WRITE):  # memory the daemon cannot write
        assert refused(call(s, {"op": "buffer", "id": 1}, fds=[memfd(4096, fcntl.F_SEAL_SHRINK | seals)]))
    assert refused(call(s, {"op": "unbuffer", "id": 99}), E.ENOENT)
    # a good buffer, whose fd this side closes at once: the daemon's mapping still works
    fd = memfd(2 * BS)
    mm = mmap.mmap(fd, 2 * BS)
    assert call(s, {"op": "buffer", "id": 5}, fds=[fd]) == {"ok": True, "id": 5, "size": 2 * BS}
    os.close(fd)
    # items: malformed ones fail the request; ranges outside the buffer fail the item
    for items in ("x", [["f", 0, 1, 5]], [["f", 0, 1, 5, 0, 0]], ["f"], [["f", "0", 1, 5, 0]],
                  [["f", 0, 1.5, 5, 0]], [["f", 0, True, 5, 0]], [["f", 0, 1, None, 0]]):
        assert refused(call(s, {"op": "read", "items": items})), items
        assert refused(call(s, {"op": "write", "items": items})), items
    reply = call(s, {"op": "read", "items": [
        ["f", 0, 100, 5, 2 * BS - 99], ["f", 0, 100, 6, 0], ["f", 0, 10, 5, -1], ["f", 0, 1 << 62, 5, 0],
        ["f", -1, 10, 5, 0], ["f", 0, -1, 5, 0], ["f", 1 << 62, 10, 5, 0], [7, 0, 10, 5, 0],
        ["f", BS - 2, 4, 5, 2 * BS - 4]]})
    assert reply["results"] == [-E.EFAULT, -E.EFAULT, -E.EFAULT, -E.EFAULT, -E.EINVAL, -E.EFAULT,
                                -E.EINVAL, -E.EINVAL, 4], reply
    assert mm[2 * BS - 4:] == content("f", BS + 5)[BS - 2:BS + 2] and mm[:2 * BS - 4] == bytes(2 * BS - 4)
    reply = call(s, {"op": "write", "items": [["g", 5, 2 * BS - 1, 2, 0o644], ["h", 9, 0, 1, 0o644],
                                              ["i", 5, 0, 2, 0o644]]})
    assert reply["results"] == [-E.EFAULT, -E.EFAULT, 0], reply
    assert read(m.p("i")) == bytes(2) and not os.path.exists(m.p("g"))
    mm.close()  # unmapped here too: the daemon's mapping keeps the memory
    assert call(s, {"op": "read", "items": [["f", 0, 10, 5, 0]]})["results"] == [10]
    # more buffers than allowed
    for i in range(100, 200):
        reply = call(s, {"op": "buffer", "id": i}, fds=[memfd(4096)])
        if not reply["ok"]:
            break
    assert refused(reply, E.EMFILE) and i == 100 + 63
    # a request over the limit: refused, and the connection ends (the stream is lost)
    s.sendall(struct.pack("<I", (256 << 20) + 1) + b"{")
    assert refused(recv(s), E.EMSGSIZE)
    try:
        assert recv(s) is None
    except ConnectionResetError:  # (it closed with our byte unread)
        pass
    s.close()
    # peers that go away mid-message, or before reading their reply
    s = raw_socket(m)
    s.sendall(struct.pack("<I", 1000) + b'{"op":')
    s.close()
    s = raw_socket(m)
    send(s, json.dumps({"op": "lookup", "paths": ["f"] * 50000}).encode())
    s.close()
    s = raw_socket(m)
    s.sendall(b"\x01\x00")  # half a length
    s.close()
    # the daemon is alive and serves a normal client; the mount works
    assert pid_alive(m.pid)
    with connect(m.path) as c:
        assert dread(c, "f", 0, BS + 5) == (BS + 5, content("f", BS + 5))
        assert store(c, {"after": b"fine"}) == [0]
    assert read(m.p("after")) == b"fine" and read(m.p("f")) == content("f", BS + 5)


# -- 4, 5: read-only mounts, no direct path ---------------------------------------------------

def test_read_only_mount_serves_direct_reads_and_refuses_stores_with_erofs(dmount):
    m = dmount
    with connect(m.path) as c:
        assert store(c, {"k/a": content("a", BS + 1)}) == [0]
    m.umount()
    m.options = ["ro"]
    m.mount()
    with connect(m.path) as c:
        assert c.readonly
        assert dread(c, "k/a", 0, 2 * BS) == (BS + 1, content("a", BS + 1))
        with pytest.raises(DirectError) as info:
            store(c, {"k/b": b"no"})
        assert info.value.errno == errno.EROFS
        with pytest.raises(DirectError) as info:
            store(c, {"k/a": b"no"}, parents=False)
        assert info.value.errno == errno.EROFS
        assert c.lookup(["k/a", "k/b"]) == [BS + 1, -errno.ENOENT]
    assert read(m.p("k", "a")) == content("a", BS + 1)


def test_connect_falls_back_outside_a_mount_and_with_direct_off(make_mount, tmp_path):
    assert connect(str(tmp_path)) is None
    assert connect("/") is None
    m = make_mount(block_size="64K", devices=(("a.img", "16M"),), options=["direct=off"])
    os.mkdir(m.p("d"))
    assert not os.path.exists(m.p(".kvfs", "direct"))
    assert connect(m.path) is None and connect(m.p("d")) is None
    write(m.p("d", "f"), b"file I/O still works")
    assert read(m.p("d", "f")) == b"file I/O still works"


# -- 6: quotas, a full warehouse ----------------------------------------------------------------

def test_a_quota_refuses_direct_stores_past_it_and_keeps_earlier_files(dmount):
    m = dmount
    os.mkdir(m.p("q"))
    os.setxattr(m.p("q"), "user.kvfs.quota", b"1M")
    a, b, c_, d = (content(n, 600 * KiB) for n in "abcd")
    with connect(m.path) as c:
        assert store(c, {"q/a": a}) == [0]
        assert store(c, {"q/b": b}) == [-errno.EDQUOT]
        assert store(c, {"q/c": c_[:300 * KiB], "q/d": d}) == [0, -errno.EDQUOT]
        assert store(c, {"outside": d}) == [0]  # no quota there
        assert c.lookup(["q/a", "q/b", "q/c", "q/d"]) == [600 * KiB, -errno.ENOENT, 300 * KiB, -errno.ENOENT]
        assert read(m.p("q", "a")) == a and read(m.p("q", "c")) == c_[:300 * KiB]
        os.unlink(m.p("q", "a"))  # what refused stores counted was given back
        assert store(c, {"q/b": b}) == [0]
        assert dread(c, "q/b", 0, 600 * KiB) == (600 * KiB, b)


def _fill(c, prefix, count, size, batch=4) -> dict:
    """Store `count` distinct files of `size` bytes in batches; {path: bytes} of those stored,
    and the errnos of those refused."""
    stored, errs = {}, []
    for i in range(0, count, batch):
        files = {f"{prefix}/f{j:03d}": content(f"{prefix}{j}", size) for j in range(i, min(i + batch, count))}
        for (path, data), r in zip(files.items(), store(c, files)):
            if r == 0:
                stored[path] = data
            else:
                errs.append(-r)
    return stored, errs


def test_direct_stores_evict_old_files_and_get_enospc_only_when_all_is_pinned(make_mount):
    m = make_mount(block_size="64K", devices=(("a.img", "16M"),))
    cap = stats(m)["capacity"]
    with connect(m.path) as c:
        stored, errs = _fill(c, "old", 40, 1 * MiB)  # two and a half times the capacity
        assert errs == [] and len(stored) == 40
        st = stats(m)
        assert st["used"] <= cap and st["counters"].get("evicted_files", 0) >= 20, st
        present = {p: d for p, d in stored.items() if c.lookup([p]) == [len(d)]}
        assert "old/f000" not in present and "old/f039" in present  # the oldest went first
        for p, d in present.items():
            assert dread(c, p, 0, len(d)) == (len(d), d)
        run_kvfs("pin", m.path)  # everything pinned, and new files inherit it
        more, errs = _fill(c, "pinned", 20, 1 * MiB)
        assert errs and set(errs) == {errno.ENOSPC}, errs
        assert stats(m)["used"] <= cap
        for p, d in {**present, **more}.items():  # nothing stored was lost
            assert dread(c, p, 0, len(d)) == (len(d), d), p
            assert read(m.p(p)) == d
        run_kvfs("unpin", m.path)
        after, errs = _fill(c, "after", 4, 1 * MiB)
        assert errs == [] and len(after) == 4
    m.umount()
    fsck(m.warehouse)


# -- 7: damaged blocks --------------------------------------------------------------------------

def extent_of(warehouse, rel: str, idx: int = 0) -> tuple[str, int]:
    """(device file, offset) of block `idx` of a file (warehouse not mounted)."""
    w = Warehouse(str(warehouse), check_only=True)
    try:
        _, _, ino = w.resolve(rel)
        with w.meta.begin() as txn:
            rec = w.meta.get_block(txn, txn.get(M.bmap_key(ino, idx), db=w.meta.db["bmap"]))
        return w.devices.devices[rec.dev].path, rec.offset
    finally:
        w.close()


def flip(device: str, offset: int) -> None:
    with open(device, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def test_a_flipped_bit_is_eio_on_the_direct_path_quarantined_and_never_served(dmount):
    m = dmount
    shared = content("shared", BS)
    files = {"a": shared + content("a", BS), "b": shared + content("b", 100), "c": content("c", 2 * BS + 3)}
    with connect(m.path) as c:
        assert store(c, files) == [0, 0, 0]
    m.umount()
    device, off = extent_of(m.warehouse, "a")
    flip(device, off + 1000)
    m.mount()
    with connect(m.path) as c:
        buf = c.buffer(8 * BS)
        # a: the damaged block whole (read straight into the caller's memory, verified there);
        # c, and a's good second block, in the same batch
        got = c.read([("a", 0, 2 * BS, buf, 0), ("c", 0, 3 * BS, buf, 2 * BS), ("a", BS, BS, buf, 5 * BS)])
        assert got == [-errno.EIO, 2 * BS + 3, BS], got
        assert bytes(buf.mm[2 * BS:4 * BS + 3]) == files["c"]
        assert bytes(buf.mm[5 * BS:6 * BS]) == files["a"][BS:]
        st = stats(m)
        assert st["counters"]["corrupt_blocks"] == 1 and st["counters"]["quarantined_files"] == 1, st
        assert st["quarantined_blocks"] == 1
        assert c.lookup(["a"]) == [-errno.ENOENT]  # dropped: never served again
        assert not os.path.exists(m.p("a"))
        # b shares the block: a part of it (decoded from a copy) is EIO too, then b is gone
        assert c.read([("b", 100, 1000, buf, 0)]) == [-errno.EIO]
        assert c.read([("b", 0, 10, buf, 0)]) == [-errno.ENOENT]
        with pytest.raises(FileNotFoundError):
            read(m.p("b"))
        st = stats(m)
        assert st["counters"]["corrupt_blocks"] == 1 and st["counters"]["quarantined_files"] == 2, st
        # the same content stored again is stored anew, not deduplicated against the bad copy
        assert store(c, {"a": files["a"]}) == [0]
        assert dread(c, "a", 0, 2 * BS) == (2 * BS, files["a"])
    m.umount()
    m.mount()
    with connect(m.path) as c:
        assert dread(c, "a", 0, 2 * BS) == (2 * BS, files["a"])
        assert dread(c, "c", 0, 3 * BS) == (2 * BS + 3, files["c"])
    m.umount()
    fsck(m.warehouse)


def test_a_reader_scribbling_on_its_buffer_cannot_get_a_good_block_quarantined(dmount):
    """A raw block is read straight into the caller's memory and verified there. A
    client that changes that memory meanwhile must not make the daemon believe the block is
    damaged: that would quarantine it and drop every file holding it (another user's too)."""
    m = dmount
    victim = content("victim", 2 * BS)
    write(m.p("victim"), victim)
    m.remount()  # nothing cached
    with connect(m.path) as c:
        buf = c.buffer(2 * BS)
        pid = os.fork()
        if pid == 0:  # the scribbler: shares the buffer's memory
            try:
                end, j, mm = time.monotonic() + 1.5, 0, buf.mm
                while time.monotonic() < end:
                    for _ in range(1000):
                        mm[j] ^= 0xFF
                        j = (j + 4099) % (2 * BS)
            finally:
                os._exit(0)
        try:
            results = set()
            end = time.monotonic() + 1.2
            while time.monotonic() < end:  # whole blocks, and pieces of blocks
                results.update(c.read([("victim", 0, 2 * BS, buf, 0)]))
                results.update(c.read([("victim", BS // 2, BS, buf, 0), ("victim", 100, 200, buf, BS)]))
        finally:
            os.waitpid(pid, 0)
        assert results <= {2 * BS, BS, 200}, results
        st = stats(m)
        assert st["counters"].get("corrupt_blocks", 0) == 0 and st["quarantined_blocks"] == 0, st
        assert c.lookup(["victim"]) == [2 * BS]
        assert dread(c, "victim", 0, 2 * BS) == (2 * BS, victim)
    assert read(m.p("victim")) == victim


def test_a_batch_naming_one_path_twice_or_the_same_bytes_often_stays_consistent(dmount):
    m = dmount
    same = content("same", 2 * BS + 1)
    with connect(m.path) as c:
        buf = c.buffer(6 * BS)
        buf.mm[:2 * BS + 1] = same
        buf.mm[3 * BS:4 * BS] = content("other", BS)
        items = [("d/x", buf, 0, 2 * BS + 1, 0o644), ("d/y", buf, 0, 2 * BS + 1, 0o644),
                 ("d/x", buf, 3 * BS, BS, 0o600), ("d/z", buf, 0, 2 * BS + 1, 0o644),
                 ("d/zero", buf, 4 * BS, 2 * BS, 0o644)]  # all zeros: holes
        assert c.write(items) == [0] * 5
        assert sorted(os.listdir(m.p("d"))) == ["x", "y", "z", "zero"]
        assert read(m.p("d", "x")) == content("other", BS)  # the last one named wins
        assert read(m.p("d", "y")) == same and read(m.p("d", "z")) == same
        assert dread(c, "d/zero", 0, 2 * BS) == (2 * BS, bytes(2 * BS))
        assert stats(m)["blocks"] == 4  # stored once each: same's three blocks and other's one
    m.umount()
    fsck(m.warehouse)
    assert gc_problems(m.warehouse) == []


# -- 8: counters ------------------------------------------------------------------------------

def test_direct_requests_are_counted_in_stats(dmount):
    m = dmount
    with connect(m.path) as c:
        assert store(c, {"x": content("x", 3 * BS), "y": b"yy", "z": b""}) == [0, 0, 0]
        assert store(c, {"w": content("w", 10)}) == [0]
        assert c.lookup(["x", "y", "nope"]) == [3 * BS, 2, -errno.ENOENT]
        buf = c.buffer(4 * BS)
        assert c.read([("x", 0, 3 * BS, buf, 0), ("y", 1, 10, buf, 3 * BS), ("nope", 0, 1, buf, 0)]) == \
            [3 * BS, 1, -errno.ENOENT]
        assert c.read([("w", 0, 4, buf, 0)]) == [4]
    want = {"direct_stores": 4, "direct_write_bytes": 3 * BS + 12, "direct_lookups": 3,
            "direct_reads": 4, "direct_read_bytes": 3 * BS + 5}
    from_file = json.loads(read(m.p(".kvfs", "stats.json")))["counters"]
    from_cmd = stats(m)["counters"]
    for counters in (from_file, from_cmd):
        assert {k: counters.get(k) for k in want} == want, counters


# -- 9: crashes mid-batch -----------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import random, sys
    from kvfs.direct_client import DirectError, connect
    root, prefix, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    c = connect(root)
    buf = c.buffer(count * size)
    for i in range(count):
        buf.mm[i * size:(i + 1) * size] = random.Random(f"{prefix}{i}").randbytes(size)
    print("go", flush=True)
    try:
        r = c.write([(f"{prefix}/f{i:03d}", buf, i * size, size, 0o644) for i in range(count)], sync=True)
        print("done", r, flush=True)
    except DirectError as exc:
        print("error", exc.errno, flush=True)
""")


def wchar(pid) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def start_writer(m, prefix, count, size):
    p = subprocess.Popen([sys.executable, "-c", WRITER, m.path, prefix, str(count), str(size)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = wchar(m.pid)
    assert p.stdout.readline().strip() == "go", p.stderr.read()
    return p, base


def wait_mid_batch(m, base, nbytes, p):
    """Until the daemon has written `nbytes` more since `base` (blocks of the batch reaching
    the devices), while the client still waits for its reply."""
    deadline = time.monotonic() + 20
    while wchar(m.pid) - base < nbytes:
        assert p.poll() is None and time.monotonic() < deadline, "the batch ended before the kill"
        time.sleep(0.0005)


def check_all_or_none(m, prefix, count, size) -> int:
    present = 0
    for i in range(count):
        path = m.p(prefix, f"f{i:03d}")
        if os.path.exists(path):
            assert read(path) == content(f"{prefix}{i}", size), path
            present += 1
    assert present in (0, count), f"{present} of {count} files of one batch were published"
    return present


def test_kill9_of_a_direct_writer_and_of_the_daemon_mid_batch(dmount):
    m = dmount
    count, size = 48, 512 * KiB  # 24 MiB a batch
    with connect(m.path) as c:  # stored and synced before the crashes: must survive them
        kept = {f"kept/f{i}": content(f"kept{i}", 100 * KiB + i) for i in range(8)}
        assert store(c, kept, sync=True) == [0] * 8
        before = stats(m)["counters"].get("direct_stores", 0)
    # kill -9 of the client while its batch is stored: the daemon finishes it (or not) whole
    p, base = start_writer(m, "one", count, size)
    wait_mid_batch(m, base, 4 * MiB, p)
    p.kill()
    p.wait()
    assert "done" not in p.stdout.read()
    assert wait_for(lambda: stats(m)["counters"].get("direct_stores", 0) == before + count)
    assert check_all_or_none(m, "one", count, size) == count  # the request ran to its end
    assert pid_alive(m.pid)
    # kill -9 of the daemon while a batch is stored
    p, base = start_writer(m, "two", count, size)
    wait_mid_batch(m, base, 4 * MiB, p)
    os.kill(m.pid, signal.SIGKILL)
    out, _ = p.communicate(timeout=30)
    assert out.startswith("error"), out  # the client learned that its batch failed
    assert wait_for(lambda: not pid_alive(m.pid), 10)
    m.mount()  # recovery
    assert check_all_or_none(m, "two", count, size) in (0, count)
    assert check_all_or_none(m, "one", count, size) in (0, count)
    with connect(m.path) as c:
        for path, data in kept.items():
            assert read(m.p(path)) == data
            assert dread(c, path, 0, len(data)) == (len(data), data)
    assert gc_problems(m.path) == []
    m.umount()
    assert gc_problems(m.warehouse) == []
    fsck(m.warehouse)


def _engine(tmp_path, **mkfs):
    from kvfs.direct import Caller

    path = str(tmp_path / "ew")
    Warehouse.mkfs(path, size=64 << 20, **mkfs)
    return path, Warehouse(path), Caller(0, 0)


def _engine_fsck(path) -> list:
    from kvfs.fsck import Fsck

    w = Warehouse(path, check_only=True)
    try:
        with w.meta.begin() as txn:
            f = Fsck(w, txn)
            f.run(verify_data=True)
        return f.problems
    finally:
        w.close()


def _read_back(w, caller, path, size) -> bytes:
    out = bytearray(size + 10)
    assert w.direct.read(caller, [(path, 0, size + 10, memoryview(out))]) == [size]
    return bytes(out[:size])


def test_small_files_of_several_small_blocks_are_stored_whole(tmp_path):
    """Small files are stored by the request's thread: every block of them, also where a
    block is 4 KiB (a 20,000-byte file once came back as its first block and zeros)."""
    path, w, root = _engine(tmp_path, block_size=4096)
    try:
        datas = {f"d/f{i}": os.urandom(n) for i, n in enumerate((1, 4096, 4097, 20000, 65536))}
        assert w.direct.store(root, [(p, memoryview(d), 0o644) for p, d in datas.items()], parents=True) == [0] * 5
        for p, d in datas.items():
            assert _read_back(w, root, p, len(d)) == d, p
    finally:
        w.close()
    assert _engine_fsck(path) == []


def test_a_path_named_twice_in_a_batch_leaks_nothing(tmp_path):
    """The later item wins; the earlier one's blocks, referenced and dropped within the one
    transaction, are freed (not left as unreferenced records that hold their extents)."""
    path, w, root = _engine(tmp_path)
    try:
        a, b = os.urandom(3 * MiB + 5), os.urandom(2 * MiB)
        assert w.direct.store(root, [("x", memoryview(a), 0o644), ("x", memoryview(b), 0o644)]) == [0, 0]
        assert _read_back(w, root, "x", len(b)) == b
        assert w.blocks.held == {}
        with w.meta.begin() as txn:
            refs = [M.BlockRecord.unpack(v).refcount for _, v in txn.cursor(db=w.meta.db["blocks"])]
        assert refs and all(r > 0 for r in refs), refs
    finally:
        w.close()
    assert _engine_fsck(path) == []


def test_names_no_client_could_use_are_refused(tmp_path):
    """A NUL in a name (no FUSE client could name it, readdir would cut it short) is EINVAL,
    for stores and reads alike; nothing is made."""
    path, w, root = _engine(tmp_path)
    try:
        assert w.direct.store(root, [("f\x00evil", memoryview(b"x"), 0o644), ("d\x00/f", memoryview(b"x"), 0o644)],
                              parents=True) == [-errno.EINVAL] * 2
        assert w.direct.lookup(root, ["f\x00evil", "f"]) == [-errno.EINVAL, -errno.ENOENT]
        assert w.readdir(M.ROOT_INO, 0) == []
    finally:
        w.close()


def test_a_killed_daemons_socket_directory_goes_at_the_next_mount_and_nothing_else(tmp_path):
    """A daemon killed with -9 leaves its socket's directory, named after its warehouse;
    the warehouse's next daemon removes it: the socket and the directory, nothing else (not
    another warehouse's, not one holding anything more, never recursively)."""
    from kvfs.direct_server import DirectServer

    run = tmp_path / "run"
    run.mkdir()
    path, w, _ = _engine(tmp_path)
    mine = f"kvfs-direct-{w.sb['uuid'][:8]}"

    def socket_dir(name, extra=False):
        d = run / name
        d.mkdir()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(d / "socket"))
        s.close()
        if extra:
            (d / "keep").write_bytes(b"x")
        return d

    dead = socket_dir(f"{mine}-dead")
    fuller = socket_dir(f"{mine}-full", extra=True)
    others = socket_dir("kvfs-direct-0badc0de-other")
    server = DirectServer(w, runtime_dir=str(run))
    try:
        assert not dead.exists() and (fuller / "keep").exists() and others.exists()
        assert os.path.basename(server.dir).startswith(mine)
    finally:
        server.stop()
        w.close()
    assert not os.path.exists(server.dir)
