"""Hostile input on a real mount: odd and overlong names, deep paths, huge offsets and
sizes, extended attributes at their limits, garbage in the policy attributes and in the
control files, thousands of open handles.

Each test keeps a few reference files from its start and checks after every hostile group
that the daemon is still alive and that they still read back byte for byte, from the
daemon (O_DIRECT: not from the page cache): bad input gets a clear errno and loses nothing.
"""

import errno
import json
import mmap
import os
import random

import pytest

from conftest import pid_alive, run_kvfs
from kvfs.errors import EXIT_USAGE

MiB = 1 << 20


def expect_errno(err, fn, *args, **kw):
    errs = err if isinstance(err, tuple) else (err,)
    with pytest.raises(OSError) as info:
        fn(*args, **kw)
    assert info.value.errno in errs, f"{getattr(fn, '__name__', fn)}{args}: {info.value}"


def read_direct(path) -> bytes:
    """The whole file as the daemon serves it (O_DIRECT bypasses the page cache)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        size = os.fstat(fd).st_size
        buf = mmap.mmap(-1, max(4096, (size + 4095) // 4096 * 4096))
        n = os.readv(fd, [buf])
        return bytes(buf[:n])
    finally:
        os.close(fd)


class References:
    """Files written before the hostile input, checked after each group of it."""

    def __init__(self, mount):
        self.m = mount
        rng = random.Random(7)
        self.files = {
            "ref/small": b"kept",
            "ref/block": rng.randbytes(MiB),
            "ref/odd": rng.randbytes(3 * MiB + 17),
            "ref/sub/empty": b"",
        }
        os.makedirs(mount.p("ref", "sub"))
        for rel, data in self.files.items():
            with open(mount.p(rel), "wb") as f:
                f.write(data)
        os.setxattr(mount.p("ref", "small"), "user.tag", b"v1")

    def check(self, what=""):
        assert pid_alive(self.m.pid), f"the daemon died ({what}); see {self.m.warehouse}/kvfs.log"
        for rel, data in self.files.items():
            assert read_direct(self.m.p(rel)) == data, f"{rel} changed ({what})"
        assert os.getxattr(self.m.p("ref", "small"), "user.tag") == b"v1"

    def finish(self):
        """Unmount (the daemon must still be there to do it) and fsck --verify-data. No
        handler may have failed unexpectedly (an exception that became EIO)."""
        self.check("at the end")
        self.m.umount()
        with open(os.path.join(self.m.warehouse, "kvfs.log"), errors="replace") as f:
            log = f.read()
        assert "Traceback" not in log, log[log.index("Traceback") - 200:][:3000]
        report = json.loads(run_kvfs("fsck", self.m.warehouse, "--json", "--verify-data").stdout)
        assert report["clean"], report["problems"]


@pytest.fixture
def hostile(make_mount):
    m = make_mount()
    return m, References(m)


# -- names -------------------------------------------------------------------------------------

def test_names_with_every_byte_value(hostile):
    """Every byte but NUL and '/' is allowed in a name; names need not be UTF-8. They are
    made, listed, read, renamed and looked up as given, and survive a remount."""
    m, refs = hostile
    d = os.fsencode(m.p("names"))
    os.mkdir(d)
    allowed = [b for b in range(1, 256) if b != 0x2F]
    names = {bytes([b]) for b in allowed if b != 0x2E}  # "." alone is the directory itself
    names |= {b"x" + bytes([b]) + b"x" for b in allowed}
    names.add(bytes(allowed))  # all 254 of them in one name
    names.add(bytes(random.Random(1).choices(range(0x80, 0x100), k=255)))  # 255 bytes, not UTF-8
    content = {name: name for name in names}
    for name in names:
        with open(d + b"/" + name, "xb") as f:
            f.write(name)
    assert set(os.listdir(d)) == names
    for name in names:
        assert open(d + b"/" + name, "rb").read() == name
    # Renames between odd names, a symbolic link to one, an attribute named with odd bytes.
    for b in allowed[:40]:
        old, new = b"x" + bytes([b]) + b"x", b"y" + bytes([b, 0xFF])
        os.rename(d + b"/" + old, d + b"/" + new)
        content[new] = content.pop(old)
    os.symlink(bytes(allowed), d + b"/link")
    assert os.readlink(d + b"/link") == bytes(allowed)
    assert open(d + b"/link", "rb").read() == bytes(allowed)
    os.setxattr(d + b"/\xff", b"user.\x01\xfe\n", b"odd")
    assert os.getxattr(d + b"/\xff", b"user.\x01\xfe\n") == b"odd"
    # The batch lookup file takes names that are not UTF-8 as surrogate escapes.
    probe = [os.fsdecode(b"names/" + n) for n in (b"\xff", b"\x01", b"y\x01\xff", b"absent\xfe")]
    fd = os.open(m.p(".kvfs", "lookup"), os.O_RDWR)
    try:
        os.write(fd, json.dumps(probe).encode())
        assert json.loads(os.pread(fd, 4096, 0)) == [True, True, True, False]
    finally:
        os.close(fd)
    refs.check("odd names")
    m.remount()
    assert set(os.listdir(d)) == set(content) | {b"link"}
    for name, data in content.items():
        assert read_direct(d + b"/" + name) == data
    refs.finish()


def test_name_length_limits_and_dot_names(hostile):
    m, refs = hostile
    d = m.p("len")
    os.mkdir(d)
    n255, n256 = "n" * 255, "n" * 256
    utf8 = "é" * 127 + "z"  # 255 bytes in UTF-8
    assert len(utf8.encode()) == 255
    for name in (n255, utf8):
        with open(os.path.join(d, name), "wb") as f:
            f.write(name.encode())
        assert open(os.path.join(d, name), "rb").read() == name.encode()
    os.mkdir(os.path.join(d, "d" * 255))
    os.symlink("t", os.path.join(d, "s" * 255))
    os.link(os.path.join(d, n255), os.path.join(d, "l" * 255))
    os.rename(os.path.join(d, "l" * 255), os.path.join(d, "r" * 255))
    os.mkfifo(os.path.join(d, "f" * 255))
    long = os.path.join(d, n256)
    expect_errno(errno.ENAMETOOLONG, open, long, "wb")
    expect_errno(errno.ENAMETOOLONG, os.stat, long)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, long)
    expect_errno(errno.ENAMETOOLONG, os.symlink, "t", long)
    expect_errno(errno.ENAMETOOLONG, os.link, os.path.join(d, n255), long)
    expect_errno(errno.ENAMETOOLONG, os.rename, os.path.join(d, n255), long)
    expect_errno(errno.ENAMETOOLONG, os.mkfifo, long)
    assert os.path.exists(os.path.join(d, n255))  # a failed rename moved nothing
    # A symbolic link's target: up to 4095 bytes.
    os.symlink("t" * 4095, os.path.join(d, "longtarget"))
    assert os.readlink(os.path.join(d, "longtarget")) == "t" * 4095
    expect_errno(errno.ENAMETOOLONG, os.symlink, "t" * 4096, os.path.join(d, "toolong"))
    # "." and ".." are the kernel's; they never name a file.
    expect_errno(errno.EEXIST, os.mkdir, os.path.join(d, "."))
    expect_errno(errno.EEXIST, os.open, os.path.join(d, ".."), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    expect_errno(errno.EINVAL, os.rmdir, os.path.join(d, "."))
    expect_errno(errno.ENOTEMPTY, os.rmdir, os.path.join(d, ".."))
    expect_errno(errno.EISDIR, os.unlink, os.path.join(d, ".."))
    assert sorted(os.listdir(d)) == sorted([n255, utf8, "d" * 255, "s" * 255, "r" * 255, "f" * 255, "longtarget"])
    # Names reserved for the control directory cannot be made or removed.
    expect_errno(errno.EEXIST, os.mkdir, m.p(".kvfs"))
    expect_errno((errno.EPERM, errno.EACCES), open, m.p(".kvfs", "new"), "wb")
    os.mkdir(m.p("len", "empty"))
    expect_errno(errno.EPERM, os.rename, m.p("len", "empty"), m.p(".kvfs"))
    expect_errno(errno.EPERM, os.rename, m.p(".kvfs"), m.p("len", "empty"))
    os.rmdir(m.p("len", "empty"))
    refs.finish()


def test_deep_paths(hostile):
    """Paths stop at PATH_MAX (the kernel's ENAMETOOLONG); directories relative to an open
    directory go deeper, and the tools handle such a tree (du, pin, retire, fsck)."""
    m, refs = hostile
    top = m.p("deep")
    os.mkdir(top)
    path, depth = top, 0
    with pytest.raises(OSError) as info:
        while True:
            path = os.path.join(path, "dd")
            os.mkdir(path)
            depth += 1
    assert info.value.errno == errno.ENAMETOOLONG and len(path) > 4095, (depth, len(path))
    # Deeper than PATH_MAX through directory handles: 2000 levels in all.
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(2000):
            if not os.path.lexists(os.path.join(f"/proc/self/fd/{fd}", "dd")):
                os.mkdir("dd", dir_fd=fd)
            nfd = os.open("dd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open("bottom", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(leaf, b"at the bottom")
        os.close(leaf)
        with open(os.open("bottom", os.O_RDONLY, dir_fd=fd), "rb") as f:
            assert f.read() == b"at the bottom"
    finally:
        os.close(fd)
    # A directory moved into its own subtree would be a loop: the kernel refuses.
    expect_errno(errno.EINVAL, os.rename, top, os.path.join(top, "dd", "dd", "loop"))
    du = json.loads(run_kvfs("du", top, "--json").stdout)
    assert du[-1] == {"path": top, "files": 1, "dirs": 2000, "bytes": 13}
    run_kvfs("pin", top)
    refs.check("deep tree")
    m.umount()
    report = json.loads(run_kvfs("fsck", m.warehouse, "--json").stdout)
    assert report["clean"], report["problems"]
    m.mount()
    run_kvfs("retire", top)
    assert not os.path.exists(top)
    refs.finish()


# -- offsets and sizes ---------------------------------------------------------------------------

MAX_FILE_SIZE = 1 << 50  # kvfs.files.MAX_FILE_SIZE


def test_huge_sparse_offsets_and_sizes(hostile):
    """Writes far out make sparse files whose holes read as zeros and take no space; past
    the largest file size a write or truncate is EFBIG; negative offsets and sizes are
    EINVAL; none of it changes what was stored."""
    m, refs = hostile
    used_before = (lambda st: (st.f_blocks - st.f_bfree) * st.f_frsize)(os.statvfs(m.path))
    path = m.p("sparse")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, b"abc", 1 << 40) == 3
        assert os.fstat(fd).st_size == (1 << 40) + 3
        assert os.pread(fd, 10, (1 << 40) - 7) == bytes(7) + b"abc"
        assert os.pread(fd, MiB, 1 << 39) == bytes(MiB)  # the middle of the hole
        assert os.pread(fd, 10, (1 << 40) + 3) == b""  # at the end
        assert os.pwrite(fd, b"end", MAX_FILE_SIZE - 3) == 3
        assert os.fstat(fd).st_size == MAX_FILE_SIZE
        expect_errno(errno.EFBIG, os.pwrite, fd, b"x", MAX_FILE_SIZE)
        assert os.pwrite(fd, b"EN", MAX_FILE_SIZE - 2) == 2
        assert os.pwrite(fd, b"DX", MAX_FILE_SIZE - 1) == 1  # what fits is written (POSIX)
        expect_errno(errno.EFBIG, os.pwrite, fd, b"x", 1 << 62)
        expect_errno((errno.EFBIG, errno.EINVAL), os.pwrite, fd, b"xyz", (1 << 63) - 2)  # overflows
        expect_errno(errno.EINVAL, os.pwrite, fd, b"x", -1)
        expect_errno(errno.EINVAL, os.pread, fd, 1, -1)
        expect_errno(errno.EFBIG, os.ftruncate, fd, MAX_FILE_SIZE + 1)
        expect_errno(errno.EFBIG, os.ftruncate, fd, 1 << 62)
        expect_errno(errno.EINVAL, os.ftruncate, fd, -1)
        expect_errno(errno.EFBIG, os.truncate, path, (1 << 63) - 1)
        assert os.fstat(fd).st_size == MAX_FILE_SIZE  # the failures changed nothing
        assert os.pread(fd, 3, MAX_FILE_SIZE - 3) == b"eED"
        os.lseek(fd, 1 << 62, os.SEEK_SET)
        expect_errno(errno.EFBIG, os.write, fd, b"x")
    finally:
        os.close(fd)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    expect_errno(errno.EFBIG, os.write, fd, b"x")  # appending at the largest size
    os.close(fd)
    # Holes take no space: the two blocks written (at most 1 MiB each) hold it all.
    used = (lambda st: (st.f_blocks - st.f_bfree) * st.f_frsize)(os.statvfs(m.path))
    assert used - used_before <= 2 * MiB, used - used_before
    refs.check("huge offsets")
    m.remount()
    assert os.stat(path).st_size == MAX_FILE_SIZE
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pread(fd, 6, (1 << 40) - 3) == bytes(3) + b"abc"
        assert os.pread(fd, 3, MAX_FILE_SIZE - 3) == b"eED"
        os.ftruncate(fd, (1 << 40) + 2)  # shrink through the middle of the stored block
        os.ftruncate(fd, MAX_FILE_SIZE)  # and out again: what was cut reads as zeros
        assert os.pread(fd, 4, (1 << 40)) == b"ab\0\0"
        assert os.pread(fd, 3, MAX_FILE_SIZE - 3) == bytes(3)
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 0
    refs.finish()


# -- extended attributes ---------------------------------------------------------------------------

def test_xattrs_at_their_limits(hostile):
    m, refs = hostile
    f = m.p("x")
    with open(f, "wb") as fh:
        fh.write(b"x")
    name255 = "user." + "n" * 250
    os.setxattr(f, name255, b"at the limit")
    assert os.getxattr(f, name255) == b"at the limit"
    expect_errno(errno.ERANGE, os.setxattr, f, name255 + "n", b"v")
    expect_errno(errno.ERANGE, os.getxattr, f, name255 + "n")
    big = random.Random(3).randbytes(65536)  # XATTR_SIZE_MAX
    os.setxattr(f, "user.big", big)
    assert os.getxattr(f, "user.big") == big
    expect_errno(errno.E2BIG, os.setxattr, f, "user.big", big + b"!")
    expect_errno(errno.E2BIG, os.setxattr, f, "user.huge", bytes(MiB))
    assert os.getxattr(f, "user.big") == big  # the refused write changed nothing
    os.setxattr(f, "user.empty", b"")
    assert os.getxattr(f, "user.empty") == b""
    os.setxattr(f, "user.nul", b"a\0b")
    assert os.getxattr(f, "user.nul") == b"a\0b"
    expect_errno(errno.EEXIST, os.setxattr, f, "user.empty", b"x", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, f, "user.missing", b"x", os.XATTR_REPLACE)
    expect_errno(errno.ENODATA, os.removexattr, f, "user.missing")
    expect_errno(errno.ERANGE, os.setxattr, f, "", b"x")
    # Many attributes: their names together pass what listxattr can return (64 KiB).
    g = m.p("many")
    with open(g, "wb") as fh:
        fh.write(b"g")
    names = [f"user.{i:04d}." + "a" * 120 for i in range(600)]
    for n in names:
        os.setxattr(g, n, n.encode())
    expect_errno(errno.E2BIG, os.listxattr, g)
    assert all(os.getxattr(g, n) == n.encode() for n in names[::50])
    for n in names:
        os.removexattr(g, n)
    assert os.listxattr(g) == []
    # Several 64 KiB values on one file.
    for i in range(32):
        os.setxattr(g, f"user.v{i}", big)
    assert os.getxattr(g, "user.v31") == big
    # The control directory has none and takes none.
    for p in (m.p(".kvfs"), m.p(".kvfs", "control"), m.p(".kvfs", "stats.json")):
        expect_errno(errno.EPERM, os.setxattr, p, "user.x", b"1")
        assert os.listxattr(p) == []
    refs.check("xattrs")
    m.remount()
    assert os.getxattr(f, name255) == b"at the limit" and os.getxattr(g, "user.v7") == big
    refs.finish()


def test_policy_xattrs_refuse_garbage(hostile):
    """user.kvfs.pin, .ttl, .quota and .compress take exact values: anything else is
    EINVAL (never EIO) and leaves the policy as it was."""
    m, refs = hostile
    f, q = m.p("f"), m.p("q")
    with open(f, "wb") as fh:
        fh.write(b"f")
    os.mkdir(q)
    os.setxattr(f, "user.kvfs.pin", b"1")
    os.setxattr(f, "user.kvfs.ttl", b"60")
    os.setxattr(q, "user.kvfs.quota", b"4M")
    os.setxattr(q, "user.kvfs.compress", b"zstd")
    garbage = {
        (f, "user.kvfs.pin"): [b"banana", b"2", b"-1", b"\xff", b"1\0", b"yes please"],
        (f, "user.kvfs.ttl"): [b"-5", b"1e3", b"4294967296", b"nan", b"0x10", b"\0", b"5s", b"9" * 5000],
        (q, "user.kvfs.quota"): [b"1e999", b"-5", b"nan", b"inf", b"-1G", b"\xff\xfe", b"1.5.5G", b"16E",
                                 b"9" * 30, b"9" * 400, b"18446744073709551616", b"99999999P"],
        (q, "user.kvfs.compress"): [b"lz77", b"\xff", b"zstd\0"],
    }
    for (path, name), values in garbage.items():
        before = os.getxattr(path, name)
        for value in values:
            try:
                os.setxattr(path, name, value)
            except OSError as exc:
                assert exc.errno == errno.EINVAL, (name, value[:40], exc)
            else:
                pytest.fail(f"{name}={value[:40]!r} was accepted")
            assert os.getxattr(path, name) == before, (name, value[:40])
    assert os.getxattr(q, "user.kvfs.quota") == str(4 * MiB).encode()
    expect_errno(errno.ENOTDIR, os.setxattr, f, "user.kvfs.quota", b"1G")  # files have none
    # The largest quota there is still works, and so do the policies themselves.
    os.setxattr(q, "user.kvfs.quota", b"16383P")
    with open(os.path.join(q, "in"), "wb") as fh:
        fh.write(bytes(MiB))
    refs.check("policy garbage")
    # The same sizes on the command line: a usage error, not a traceback.
    res = run_kvfs("mkfs", os.path.join(os.path.dirname(m.warehouse), "w2"), "--size", "9" * 400, check=False)
    assert res.returncode == EXIT_USAGE and "too large" in res.stderr, res.stderr
    refs.finish()


# -- open handles ---------------------------------------------------------------------------------

def daemon_anon_kib(pid) -> int:
    """The daemon's anonymous resident memory (its heap; LMDB and device pages are file
    pages and come and go with the page cache)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


@pytest.fixture
def many_fds():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 12000
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_thousands_of_open_handles(hostile, many_fds):
    """5000 handles on one file and 5000 files open at once, each written a little: the
    daemon's memory stays bounded while they are open (a handle costs what it holds, not a
    block), every byte reads back, and all of it is given back at the last close."""
    m, refs = hostile
    base = daemon_anon_kib(m.pid)
    one = m.p("one")
    with open(one, "wb") as f:
        f.write(bytes(range(256)) * 4096)  # 1 MiB
    readers = [os.open(one, os.O_RDONLY) for _ in range(4000)]
    writers = [os.open(one, os.O_WRONLY) for _ in range(1000)]
    assert all(os.pread(fd, 256, 0) == bytes(range(256)) for fd in readers[::97])
    for k, fd in enumerate(writers[::100]):
        os.pwrite(fd, b"W%d" % k, 100_000 * k + 1)
    for fd in readers + writers:
        os.close(fd)
    expect = bytearray(bytes(range(256)) * 4096)
    for k in range(10):
        expect[100_000 * k + 1:100_000 * k + 1 + len(b"W%d" % k)] = b"W%d" % k
    assert read_direct(one) == expect
    os.mkdir(m.p("many"))
    fds = [os.open(m.p("many", f"f{i}"), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644) for i in range(5000)]
    for i, fd in enumerate(fds):
        os.pwrite(fd, b"%d" % i, i % 3000)  # a few bytes somewhere in the first block
    peak = daemon_anon_kib(m.pid)
    assert peak - base < 256 * 1024, f"5000 open files with a few bytes each cost {(peak - base) >> 10} MiB"
    for i, fd in enumerate(fds[::250]):
        assert os.pread(fd, 10, (250 * i) % 3000) == b"%d" % (250 * i)
    for fd in fds:
        os.close(fd)
    for i in range(0, 5000, 123):
        assert read_direct(m.p("many", f"f{i}")) == bytes(i % 3000) + b"%d" % i
    stats = json.load(open(m.p(".kvfs", "stats.json")))
    assert stats["open_files"] == 0 and stats["files"] == 5000 + 4 + 1
    after = daemon_anon_kib(m.pid)
    assert after - base < 128 * 1024, f"{(after - base) >> 10} MiB stayed after every handle was closed"
    refs.check("open handles")
    refs.finish()


# -- the control files ---------------------------------------------------------------------------

def control(m, request: bytes, name="control"):
    """Send one request; return ('reply', parsed JSON) or ('errno', name of the error)."""
    fd = os.open(m.p(".kvfs", name), os.O_RDWR)
    try:
        try:
            pos = 0
            while pos < len(request):
                pos += os.write(fd, request[pos:pos + MiB])
            raw = os.pread(fd, 16 * MiB, 0)
        except OSError as exc:
            return "errno", errno.errorcode[exc.errno]
        return "reply", json.loads(raw)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # a request never read runs at close; its failure was seen already


def test_control_file_survives_garbage(hostile):
    """Garbage written to .kvfs/control and .kvfs/lookup gets EINVAL (not a JSON request),
    EFBIG (too big) or an error reply; the daemon survives and later requests work."""
    m, refs = hostile
    rng = random.Random(11)
    garbage = {
        "random bytes": rng.randbytes(4000),
        "truncated JSON": b'{"op": "st',
        "empty": b"",
        "not an object": b'[1, 2, 3]',
        "a string": b'"stats"',
        "null": b"null",
        "unknown op": b'{"op": "format-everything"}',
        "op of the wrong type": b'{"op": 5}',
        "op a list": b'{"op": ["stats"]}',
        "two requests": b'{"op": "stats"}\n{"op": "stats"}',
        "NUL bytes": b'{"op": "stats"}\0\0\0',
        "a number too long to parse": b'{"op": "tune", "high_watermark": ' + b"9" * 5000 + b"}",
        "deeply nested": b"[" * 30000 + b"]" * 30000,
        "a deeply nested argument": b'{"op": "stats", "a": ' + b"[" * 30000 + b"]" * 30000 + b"}",
    }
    for what, request in garbage.items():
        assert control(m, request) == ("errno", "EINVAL"), what
    assert control(m, json.dumps({"op": "stats", "pad": "x" * (70 << 10)}).encode()) == ("errno", "EFBIG")
    assert control(m, rng.randbytes(10 * MiB)) == ("errno", "EFBIG")  # a 10 MB write
    refused = {
        "retire without a path": {"op": "retire"},
        "retire a number": {"op": "retire", "path": 5},
        "retire the root": {"op": "retire", "path": "/"},
        "retire ..": {"op": "retire", "path": "../../etc"},
        "retire a NUL": {"op": "retire", "path": "a\0b"},
        "retire a long name": {"op": "retire", "path": "x" * 300},
        "retire what is not there": {"op": "retire", "path": "nothing/here"},
        "retire the control directory": {"op": "retire", "path": ".kvfs"},
        "retire a lone surrogate": {"op": "retire", "path": "ref/\ud800"},
        "gc grace a string": {"op": "gc", "grace": "soon"},
        "gc grace negative": {"op": "gc", "grace": -1},
        "gc grace infinite": {"op": "gc", "grace": float("inf")},
        "gc grace NaN": {"op": "gc", "grace": float("nan")},
        "tune a string": {"op": "tune", "high_watermark": "90%"},
        "tune out of range": {"op": "tune", "high_watermark": 5},
        "tune low above high": {"op": "tune", "high_watermark": 0.5, "low_watermark": 0.6},
        "tune NaN": {"op": "tune", "high_watermark": float("nan")},
        # Wrong types are refused, not read as something else: "no" is not a yes.
        "gc delete a string": {"op": "gc", "delete": "no"},
        "gc delete a number": {"op": "gc", "delete": 0},
        "gc grace a boolean": {"op": "gc", "grace": True},
        "tune booleans": {"op": "tune", "high_watermark": True, "low_watermark": True},
    }
    for what, request in refused.items():
        kind, reply = control(m, json.dumps(request).encode())
        assert kind == "reply" and not reply["ok"] and reply["errno"] in (errno.EINVAL, errno.ENOENT,
                                                                          errno.ENAMETOOLONG), (what, reply)
    lookup_garbage = {
        "random bytes": rng.randbytes(1000),
        "an object": b'{"paths": ["a"]}',
        "numbers": b"[1, 2]",
        "nested lists": b'[["ref"]]',
        "deeply nested": b"[" * 200000 + b"]" * 200000,
    }
    for what, request in lookup_garbage.items():
        assert control(m, request, "lookup") == ("errno", "EINVAL"), what
    assert control(m, rng.randbytes(2 * MiB), "lookup") == ("errno", "EFBIG")
    # Requests written and closed without reading the reply, thousands of handles open.
    fds = [os.open(m.p(".kvfs", "control"), os.O_RDWR) for _ in range(2000)]
    for fd in fds[::10]:
        os.write(fd, rng.randbytes(100))
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:  # a request runs at close: garbage fails there
            assert exc.errno == errno.EINVAL
    refs.check("control garbage")
    kind, reply = control(m, b'{"op": "stats"}')
    assert kind == "reply" and reply["ok"] and reply["files"] == 4
    kind, reply = control(m, b'{"op": "tune", "high_watermark": 0.9, "low_watermark": 0.8}')
    assert reply == {"ok": True, "high_watermark": 0.9, "low_watermark": 0.8}
    assert control(m, json.dumps(["ref/small", "ref/nothing"]).encode(), "lookup") == ("reply", [True, False])
    # A path that no bytes can spell (a lone surrogate) names nothing.
    assert control(m, json.dumps(["ref/\ud800", "ref/small"]).encode(), "lookup") == ("reply", [False, True])
    refs.finish()
