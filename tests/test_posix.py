"""The POSIX surface real clients use, through a real kvfs mount."""

import ctypes
import errno
import mmap
import os
import stat
import time

import pytest

from conftest import run_kvfs, wait_for

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old, new, flags):
    if libc.renameat2(AT_FDCWD, old.encode(), AT_FDCWD, new.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def expect_errno(err, fn, *args):
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == err, f"{fn.__name__}{args}: {info.value}"


def test_errnos(mnt):
    p = mnt.p
    expect_errno(errno.ENOENT, os.stat, p("missing"))
    expect_errno(errno.ENOENT, open, p("missing"))
    with open(p("f"), "w") as f:
        f.write("x")
    expect_errno(errno.EEXIST, os.open, p("f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.mkdir(p("d"))
    with open(p("d", "inner"), "w"):
        pass
    expect_errno(errno.ENOTEMPTY, os.rmdir, p("d"))
    expect_errno(errno.EEXIST, os.mkdir, p("d"))
    expect_errno(errno.ENAMETOOLONG, open, p("n" * 256), "w")
    with open(p("n" * 255), "w") as f:  # 255 bytes is allowed
        f.write("ok")
    assert open(p("n" * 255)).read() == "ok"
    expect_errno(errno.EISDIR, open, p("d"), "w")
    expect_errno(errno.EISDIR, os.unlink, p("d"))
    expect_errno(errno.ENOTDIR, os.rmdir, p("f"))
    expect_errno(errno.ENOTDIR, os.stat, p("f", "x"))
    expect_errno(errno.ENOTDIR, os.rename, p("d"), p("f"))
    expect_errno(errno.EISDIR, os.rename, p("f"), p("d"))
    expect_errno(errno.ENODATA, os.getxattr, p("f"), "user.nothing")
    expect_errno(errno.EINVAL, os.readlink, p("f"))


def test_attributes(mnt):
    path = mnt.p("f")
    with open(path, "wb") as f:
        f.write(b"hello world")
    os.chmod(path, 0o640)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    os.chown(path, 1234, 5678)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    os.truncate(path, 5)
    assert open(path, "rb").read() == b"hello"
    os.truncate(path, 8)
    assert open(path, "rb").read() == b"hello\0\0\0"
    with open(path, "r+b") as f:  # O_TRUNC through open
        pass
    with open(path, "wb") as f:
        f.write(b"new")
    assert open(path, "rb").read() == b"new"
    with open(path, "ab") as f:  # O_APPEND
        f.write(b"+more")
    assert open(path, "rb").read() == b"new+more"


def test_statfs_reports_alignment_and_capacity(mnt):
    st = os.statvfs(mnt.path)
    assert st.f_bsize == 4096
    assert st.f_namemax == 255
    total = st.f_blocks * st.f_frsize
    assert 500 << 20 < total <= 512 << 20  # two 256 MiB devices less their headers
    free_before = st.f_bfree * st.f_frsize
    with open(mnt.p("f"), "wb") as f:
        f.write(os.urandom(8 << 20))
    st = os.statvfs(mnt.path)
    assert free_before - st.f_bfree * st.f_frsize == 8 << 20


def test_rename_semantics(mnt):
    p = mnt.p
    for name, data in (("a", b"AAAA"), ("b", b"BB")):
        with open(p(name), "wb") as f:
            f.write(data)
    reader = open(p("b"), "rb")  # the replaced file stays readable while open
    os.rename(p("a"), p("b"))
    assert open(p("b"), "rb").read() == b"AAAA"
    assert not os.path.exists(p("a"))
    assert reader.read() == b"BB"
    reader.close()

    with open(p("c"), "wb") as f:
        f.write(b"CC")
    expect_errno(errno.EEXIST, renameat2, p("b"), p("c"), RENAME_NOREPLACE)
    renameat2(p("b"), p("c"), RENAME_EXCHANGE)
    assert open(p("b"), "rb").read() == b"CC"
    assert open(p("c"), "rb").read() == b"AAAA"
    expect_errno(errno.ENOENT, renameat2, p("b"), p("zz"), RENAME_EXCHANGE)
    renameat2(p("b"), p("new"), RENAME_NOREPLACE)
    assert open(p("new"), "rb").read() == b"CC"

    os.makedirs(p("x", "y"))
    os.mkdir(p("empty"))
    os.rename(p("x"), p("empty"))  # a directory over an empty directory
    assert os.listdir(p("empty")) == ["y"]
    os.mkdir(p("full"))
    open(p("full", "f"), "w").close()
    expect_errno(errno.ENOTEMPTY, os.rename, p("empty"), p("full"))
    assert os.stat(mnt.path).st_nlink == 2 + 2  # root has "empty" and "full"


def test_open_file_survives_unlink(mnt):
    path = mnt.p("f")
    data = os.urandom(3 << 20)
    with open(path, "wb") as f:
        f.write(data)
    f = open(path, "rb")
    os.unlink(path)
    assert not os.path.exists(path)
    assert f.read() == data
    f.close()
    # The space is given back once the last user is gone (the kernel's FORGET comes
    # asynchronously after the last close).
    assert wait_for(lambda: (lambda st: st.f_blocks == st.f_bfree)(os.statvfs(mnt.path)))


def test_links_symlinks_xattrs(mnt):
    p = mnt.p
    with open(p("f"), "wb") as f:
        f.write(b"data")
    os.link(p("f"), p("g"))
    assert os.stat(p("f")).st_nlink == 2
    assert os.stat(p("f")).st_ino == os.stat(p("g")).st_ino
    os.unlink(p("f"))
    assert open(p("g"), "rb").read() == b"data"
    assert os.stat(p("g")).st_nlink == 1

    os.symlink("g", p("s"))
    assert os.readlink(p("s")) == "g"
    assert open(p("s"), "rb").read() == b"data"
    assert stat.S_ISLNK(os.lstat(p("s")).st_mode)

    os.setxattr(p("g"), "user.kvfs.model", b"llama-3-8b")
    os.setxattr(p("g"), "user.empty", b"")
    assert os.getxattr(p("g"), "user.kvfs.model") == b"llama-3-8b"
    assert sorted(os.listxattr(p("g"))) == ["user.empty", "user.kvfs.model"]
    os.removexattr(p("g"), "user.empty")
    assert os.listxattr(p("g")) == ["user.kvfs.model"]
    expect_errno(errno.ENODATA, os.removexattr, p("g"), "user.empty")
    big = b"v" * 65536
    os.setxattr(p("g"), "user.big", big)
    assert os.getxattr(p("g"), "user.big") == big


def test_sparse_random_writes_and_fallocate(mnt):
    path = mnt.p("sparse")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, b"end", 5 * (1 << 20) + 7)
    os.pwrite(fd, b"mid", 1 << 20)
    os.pwrite(fd, b"start", 0)
    os.close(fd)
    data = open(path, "rb").read()
    expect = bytearray(5 * (1 << 20) + 10)
    expect[0:5] = b"start"
    expect[1 << 20:(1 << 20) + 3] = b"mid"
    expect[-3:] = b"end"
    assert data == bytes(expect)
    # Holes take no space: 3 small blocks were stored.
    st = os.statvfs(mnt.path)
    assert (st.f_blocks - st.f_bfree) * st.f_frsize <= 3 * 4096

    # pyfuse3 has no fallocate handler: glibc's posix_fallocate falls back to writes.
    fd = os.open(mnt.p("pre"), os.O_CREAT | os.O_RDWR, 0o644)
    os.posix_fallocate(fd, 0, 3 << 20)
    os.close(fd)
    assert os.stat(mnt.p("pre")).st_size == 3 << 20


def test_direct_io_any_alignment(mnt):
    path = mnt.p("dio")
    buf = mmap.mmap(-1, 4 << 20)
    payload = os.urandom(4 << 20)
    buf.write(payload)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_DIRECT, 0o644)
    assert os.write(fd, buf) == 4 << 20
    # FUSE imposes no alignment: an odd offset and length work too.
    assert os.pwrite(fd, b"unaligned", 12345) == 9
    os.close(fd)
    expect = bytearray(payload)
    expect[12345:12354] = b"unaligned"
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    out = mmap.mmap(-1, 4 << 20)
    assert os.readv(fd, [out]) == 4 << 20
    assert bytes(out) == bytes(expect)
    assert os.pread(fd, 100, 12340) == bytes(expect[12340:12440])
    os.close(fd)


def test_readdir_offsets_are_stable_under_changes(mnt):
    d = mnt.p("d")
    os.mkdir(d)
    names = {f"f{i:04d}" for i in range(600)}
    for n in names:
        open(os.path.join(d, n), "w").close()
    seen = []
    with os.scandir(d) as it:
        for i, e in enumerate(it):
            seen.append(e.name)
            if i == 100:  # deleting entries mid-listing must not skip or repeat others
                for victim in sorted(names)[:50]:
                    if victim not in seen:
                        os.unlink(os.path.join(d, victim))
                        names.discard(victim)
    assert len(seen) == len(set(seen))
    assert names <= set(seen)


def test_readonly_mount_rejects_writes(make_mount):
    m = make_mount()
    with open(m.p("f"), "wb") as f:
        f.write(b"kept")
    os.mkdir(m.p("d"))
    m.umount()
    m.options = ["ro"]
    m.mount()
    assert open(m.p("f"), "rb").read() == b"kept"
    expect_errno(errno.EROFS, open, m.p("g"), "w")
    expect_errno(errno.EROFS, open, m.p("f"), "r+b")
    expect_errno(errno.EROFS, os.unlink, m.p("f"))
    expect_errno(errno.EROFS, os.mkdir, m.p("e"))
    expect_errno(errno.EROFS, os.rename, m.p("f"), m.p("h"))
    expect_errno(errno.EROFS, os.setxattr, m.p("f"), "user.x", b"1")
    expect_errno(errno.EROFS, os.chmod, m.p("f"), 0o600)
    expect_errno(errno.EROFS, os.truncate, m.p("f"), 0)
    expect_errno(errno.EROFS, os.rmdir, m.p("d"))


def test_persists_across_remount_and_fsck_clean(mnt):
    p = mnt.p
    os.makedirs(p("a", "b"))
    with open(p("a", "b", "f"), "wb") as f:
        f.write(b"x" * 3_000_001)
    os.symlink("a/b/f", p("link"))
    os.setxattr(p("a"), "user.tag", b"v")
    mnt.umount()
    res = run_kvfs("fsck", mnt.warehouse)
    assert "clean" in res.stdout
    mnt.mount()
    assert open(p("link"), "rb").read() == b"x" * 3_000_001
    assert os.getxattr(p("a"), "user.tag") == b"v"


def test_directory_compression_and_read_ahead(mnt):
    os.mkdir(mnt.p("z"))
    os.setxattr(mnt.p("z"), "user.kvfs.compress", b"zstd")
    expect_errno(errno.EINVAL, os.setxattr, mnt.p("z"), "user.kvfs.compress", b"lz77")
    data = bytes(range(256)) * (16 << 12)  # 16 MiB, very compressible
    with open(mnt.p("z", "f"), "wb") as f:
        f.write(data)
    st = os.statvfs(mnt.path)
    assert (st.f_blocks - st.f_bfree) * st.f_frsize < 1 << 20
    assert open(mnt.p("z", "f"), "rb").read() == data
    with open("/proc/self/mountinfo") as f:
        dev = next(line.split()[2] for line in f if line.split()[4] == mnt.path)
    with open(f"/sys/class/bdi/{dev}/read_ahead_kb") as f:
        assert int(f.read()) == 4096


def test_failed_commit_does_not_leave_stale_bytes_in_the_kernel_cache(make_mount):
    m = make_mount(devices=(("a.img", "8M"),))
    os.setxattr(m.path, "user.kvfs.pin", b"1")  # all pinned: full means ENOSPC, not eviction
    with open(m.p("v"), "wb") as f:
        f.write(b"A" * 100)
    n = 0
    for size in (64 << 10, 4096):  # fill the warehouse to the last allocation unit
        with pytest.raises(OSError) as info:
            while True:
                with open(m.p(f"fill{n}"), "wb") as f:
                    f.write(os.urandom(size))
                n += 1
        assert info.value.errno == errno.ENOSPC
    fd = os.open(m.p("v"), os.O_RDWR)
    os.pwrite(fd, b"B" * 10, 0)  # fits in memory, cannot be stored
    expect_errno(errno.ENOSPC, os.close, fd)
    # Another open must see what is stored, not what the kernel cached from the write.
    assert wait_for(lambda: open(m.p("v"), "rb").read() == b"A" * 100, timeout=5)
    # A shrinking truncate that cannot be stored fails whole and changes nothing.
    expect_errno(errno.ENOSPC, os.truncate, m.p("v"), 10)
    assert wait_for(lambda: os.stat(m.p("v")).st_size == 100, timeout=5)
    assert open(m.p("v"), "rb").read() == b"A" * 100


def test_daemon_survives_inconsistent_metadata_on_unlink(make_mount):
    m = make_mount()
    with open(m.p("victim"), "wb") as f:
        f.write(b"hi")
    m.umount()
    from kvfs.warehouse import Warehouse

    w = Warehouse(m.warehouse)
    with w.meta.begin(write=True) as txn:  # plant: the file's block record vanishes
        for key, _ in list(txn.cursor(db=w.meta.db["blocks"])):
            txn.delete(key, db=w.meta.db["blocks"])
    w.close()
    m.mount()
    expect_errno(errno.EIO, lambda: open(m.p("victim"), "rb").read())
    os.unlink(m.p("victim"))
    subprocess_drop_dentries()
    with open(m.p("after"), "wb") as f:  # the mount still serves
        f.write(b"ok")
    assert open(m.p("after"), "rb").read() == b"ok"
    m.umount()  # and unmounts cleanly


def subprocess_drop_dentries():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    time.sleep(0.3)


def test_odd_paths_and_symlinked_mount_point(make_warehouse, tmp_path):
    from conftest import Mount, daemon_pid, run_kvfs

    wh = make_warehouse("w,comma")
    real = tmp_path / "m é"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    m = Mount(wh, real)
    try:
        run_kvfs("mount", wh, link)
        m.pid = daemon_pid(str(wh))
        res = run_kvfs("mount", wh, real, check=False)
        assert res.returncode in (5, 6)
        with open(os.path.join(real, "f"), "w") as f:
            f.write("x")
        m.umount()
    finally:
        m.cleanup()
