"""pyfuse3 Operations over a Warehouse, and the mount's control directory.

This is the only module (with kvfs.mount) that imports pyfuse3 or trio, and the only place
where engine errors become FUSEError: every handler goes through `_fuse_errors`, so nothing
but FUSEError ever leaves a handler (anything else would end the FUSE session).

The hidden directory `.kvfs` in the root (kvfs.control describes its files) lives here, not
in the warehouse: its inodes and file handles are numbered above anything the warehouse
hands out, and every handler checks for them first.
"""

import errno
import functools
import json
import logging
import os
import stat
import time

import pyfuse3
import trio

from . import control
from .errors import KvfsError
from .meta import ROOT_INO, Inode
from .policy import QUOTA_XATTR

log = logging.getLogger("kvfs.fs")

# Published KV blocks are immutable and every namespace change passes through this kernel
# mount, so the kernel may cache names, attributes and pages for a long time.
ENTRY_TIMEOUT = 300
ATTR_TIMEOUT = 300
STATFS_BSIZE = 4096  # the alignment O_DIRECT clients should use (LMCache reads f_bsize)

# The control directory and its files: inode numbers the warehouse's counter never reaches.
CONTROL_NAME = control.CONTROL_DIR.encode()  # the control directory, in the mount's root
CTL_DIR_INO = (1 << 63) + 1
CTL_FILE_INO = CTL_DIR_INO + 1
STATS_INO = CTL_DIR_INO + 2
METRICS_INO = CTL_DIR_INO + 3
LOOKUP_INO = CTL_DIR_INO + 4
DIRECT_INO = CTL_DIR_INO + 5
VIRTUAL_NAMES = {
    control.CONTROL_FILE.encode(): CTL_FILE_INO,
    control.STATS_FILE.encode(): STATS_INO,
    control.METRICS_FILE.encode(): METRICS_INO,
    control.LOOKUP_FILE.encode(): LOOKUP_INO,
    control.DIRECT_FILE.encode(): DIRECT_INO,
}
VIRTUAL_MODES = {
    CTL_DIR_INO: stat.S_IFDIR | 0o755,
    CTL_FILE_INO: stat.S_IFREG | 0o600,  # root and the daemon's user only
    STATS_INO: stat.S_IFREG | 0o444,
    METRICS_INO: stat.S_IFREG | 0o444,
    LOOKUP_INO: stat.S_IFREG | 0o666,  # anyone: answers only what the caller may search
    DIRECT_INO: stat.S_IFREG | 0o444,  # where the direct path's socket is (kvfs.direct_server)
}
VIRTUAL_FH = 1 << 62  # handles of open control files count up from here


def _virtual(ino: int) -> bool:
    return ino >= CTL_DIR_INO


def _reserved(parent: int, name: bytes) -> bool:
    """Names that refer to the control directory or live in it: not for clients to make."""
    return _virtual(parent) or (parent == ROOT_INO and name == CONTROL_NAME)


class _ControlHandle:
    def __init__(self, ino: int, content: bytes | None = None, ctx=None):
        self.ino = ino
        self.uid, self.gid = (ctx.uid, ctx.gid) if ctx is not None else (0, 0)
        self.request = bytearray()
        self.reply = content  # stats.json: the snapshot; control: set once run
        self.ran = content is not None  # a request runs once, even if it failed


def _fuse_errors(fn):
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            try:
                return await fn(self, *args)
            finally:
                if self.wh.discarded:
                    self._invalidate_discarded()
        except pyfuse3.FUSEError:
            raise
        except KvfsError as exc:
            if exc.errno in (errno.EIO, errno.ENOSPC):
                log.error("%s: %s", fn.__name__, exc)
            else:
                log.debug("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, warehouse, registry=None):
        super().__init__()
        self.wh = warehouse
        self.registry = registry  # Prometheus registry of the warehouse (kvfs.metrics)
        self._dirs: dict[int, int] = {}
        self._next_dir_fh = 1
        self._ctl: dict[int, _ControlHandle] = {}
        self._next_ctl_fh = VIRTUAL_FH
        self._stale: dict[int, float] = {}  # caller pid -> until when its open's retry is expected
        self._started = time.time_ns()
        self.direct_info: bytes | None = None  # .kvfs/direct: set by kvfs.mount when it serves the direct path
        warehouse.on_removed = self._removed

    @staticmethod
    def _removed(entries):
        """The warehouse removed names by itself (eviction, expiry, retire): the kernel
        must drop what it caches of them, or it would answer for files that are gone."""
        for parent, name, ino in entries:
            pyfuse3.invalidate_entry_async(parent, name, deleted=ino, ignore_enoent=True)

    def _virtual_entry(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = ENTRY_TIMEOUT
        e.attr_timeout = 1  # stats.json changes
        e.st_mode = VIRTUAL_MODES[ino]
        e.st_nlink = 2 if ino == CTL_DIR_INO else 1
        e.st_uid = os.getuid()
        e.st_gid = os.getgid()
        e.st_blksize = 4096
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self._started
        return e

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode.ino
        e.generation = 0
        e.entry_timeout = ENTRY_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = inode.mode
        e.st_nlink = inode.nlink
        e.st_uid = inode.uid
        e.st_gid = inode.gid
        e.st_rdev = inode.rdev
        e.st_size = inode.size
        e.st_blksize = self.wh.block_size
        e.st_blocks = (inode.size + 511) // 512
        e.st_atime_ns = inode.atime_ns
        e.st_mtime_ns = inode.mtime_ns
        e.st_ctime_ns = inode.ctime_ns
        return e

    # -- namespace ------------------------------------------------------------------

    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        if _reserved(parent_inode, name):
            ino = CTL_DIR_INO if parent_inode == ROOT_INO else VIRTUAL_NAMES.get(name)
            if ino == DIRECT_INO and self.direct_info is None:
                ino = None  # no direct path: clients use file I/O
            if ino is not None:
                return self._virtual_entry(ino)
        else:
            try:
                return self._entry(self.wh.lookup(parent_inode, name))
            except KvfsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        timeout = ENTRY_TIMEOUT
        shared = self.wh.shared
        if shared is not None and not _reserved(parent_inode, name):
            # Read-through: the store is asked, in a thread, and for a bounded time. A miss
            # holds briefly (another node may publish the name), or not at all if the
            # store could not be asked.
            inode, timeout = await trio.to_thread.run_sync(shared.lookup, parent_inode, name)
            if inode is not None:
                return self._entry(inode)
        # Cache the miss in the kernel: clients probe for names that mostly don't exist.
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = timeout
        return e

    def _invalidate_discarded(self):
        """Tell the kernel to drop pages and attributes of inodes whose unpublished
        changes were discarded (it still caches bytes that were never stored)."""
        for ino in self.wh.take_discarded():
            trio.lowlevel.spawn_system_task(self._invalidate, ino)

    @staticmethod
    async def _invalidate(ino):
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
        except Exception as exc:  # the kernel may already have forgotten it
            log.debug("invalidate_inode(%d): %s", ino, exc)

    @_fuse_errors
    async def getattr(self, inode, ctx=None):
        if _virtual(inode):
            return self._virtual_entry(inode)
        return self._entry(self.wh.getattr(inode))

    @_fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        if _virtual(inode):
            # Truncating the control file (a shell's `>`) is allowed and means nothing.
            if inode == CTL_FILE_INO and fields.update_size and attr.st_size == 0:
                return self._virtual_entry(inode)
            raise pyfuse3.FUSEError(errno.EPERM)
        kw = {}
        if fields.update_size:
            kw["size"] = attr.st_size
            if self.wh.remote_pending(inode):  # its data first (or dropped), in a thread:
                # either may wait for another thread's fetch of the same file
                await trio.to_thread.run_sync(
                    self.wh.fill_remote if attr.st_size else self.wh.drop_remote, inode)
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        if "size" in kw:  # a truncation reads and commits: in a thread, as writes are
            return self._entry(await trio.to_thread.run_sync(functools.partial(self.wh.setattr, inode, **kw)))
        return self._entry(self.wh.setattr(inode, **kw))

    @_fuse_errors
    async def readlink(self, inode, ctx):
        return self.wh.readlink(inode)

    @_fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._refuse(parent_inode, name)
        return self._entry(self.wh.mknod(parent_inode, name, mode, ctx.uid, ctx.gid, rdev, pid=ctx.pid))

    @_fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        self._refuse(parent_inode, name)
        return self._entry(self.wh.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid, pid=ctx.pid))

    @_fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        self._refuse(parent_inode, name)
        return self._entry(self.wh.symlink(parent_inode, name, target, ctx.uid, ctx.gid, pid=ctx.pid))

    @_fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._refuse(new_parent_inode, new_name, inode)
        return self._entry(self.wh.link(inode, new_parent_inode, new_name))

    @_fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        self._refuse(parent_inode, name)
        self.wh.unlink(parent_inode, name)

    @_fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        self._refuse(parent_inode, name)
        self.wh.rmdir(parent_inode, name)

    @staticmethod
    def _refuse(parent: int, name: bytes, ino: int = 0) -> None:
        if _reserved(parent, name) or _virtual(ino):
            raise pyfuse3.FUSEError(errno.EPERM)

    @_fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._refuse(parent_inode_old, name_old)
        self._refuse(parent_inode_new, name_new)
        wflags = 0
        if flags & pyfuse3.RENAME_NOREPLACE:
            wflags |= 1
        if flags & pyfuse3.RENAME_EXCHANGE:
            wflags |= 2
        self.wh.rename(parent_inode_old, name_old, parent_inode_new, name_new, wflags)

    @_fuse_errors
    async def opendir(self, inode, ctx):
        ino = inode if inode == CTL_DIR_INO else self.wh.getattr(inode).ino
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = ino
        return fh

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        ino = self._dirs[fh]
        if ino == CTL_DIR_INO:
            for off, (name, vino) in enumerate(VIRTUAL_NAMES.items(), 1):
                if vino == DIRECT_INO and self.direct_info is None:
                    continue  # not served: not there
                if off > start_id and not pyfuse3.readdir_reply(token, name, self._virtual_entry(vino), off):
                    return
            return
        while True:
            batch = self.wh.readdir(ino, start_id)
            if not batch:
                return
            for name, inode, entry_id in batch:
                if not pyfuse3.readdir_reply(token, name, self._entry(inode), entry_id):
                    return
                start_id = entry_id

    @_fuse_errors
    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    @_fuse_errors
    async def fsyncdir(self, fh, datasync):
        await trio.to_thread.run_sync(self.wh.checkpoint)

    @_fuse_errors
    async def statfs(self, ctx):
        st = self.wh.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = STATFS_BSIZE
        s.f_frsize = STATFS_BSIZE
        s.f_blocks = st["capacity"] // STATFS_BSIZE
        s.f_bfree = st["free"] // STATFS_BSIZE
        s.f_bavail = s.f_bfree
        s.f_files = st["inodes"] + (1 << 32)
        s.f_ffree = s.f_files - st["inodes"]
        s.f_favail = s.f_ffree
        s.f_namemax = 255
        return s

    # -- extended attributes ----------------------------------------------------------

    # user.kvfs.pin and user.kvfs.ttl on a directory walk its subtree: in a thread.

    @staticmethod
    def _check_admin(name: bytes, ctx) -> None:
        # A tenant may own its directory, but not raise its own quota.
        if name == QUOTA_XATTR and ctx.uid not in (0, os.getuid()):
            raise pyfuse3.FUSEError(errno.EPERM)

    @_fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        self._refuse(0, b"", inode)
        self._check_admin(name, ctx)
        await trio.to_thread.run_sync(self.wh.setxattr, inode, name, value)

    @_fuse_errors
    async def getxattr(self, inode, name, ctx):
        if _virtual(inode):
            raise pyfuse3.FUSEError(errno.ENODATA)
        return self.wh.getxattr(inode, name)

    @_fuse_errors
    async def listxattr(self, inode, ctx):
        if _virtual(inode):
            return []
        return self.wh.listxattr(inode)

    @_fuse_errors
    async def removexattr(self, inode, name, ctx):
        self._refuse(0, b"", inode)
        self._check_admin(name, ctx)
        await trio.to_thread.run_sync(self.wh.removexattr, inode, name)

    # -- files --------------------------------------------------------------------------

    @staticmethod
    def _file_info(fh: int) -> pyfuse3.FileInfo:
        # keep_cache: pages stay valid across opens (content changes go through this
        # mount). direct_io stays off even for O_DIRECT clients so the kernel can keep
        # several large requests in flight.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def _open_control(self, inode, flags, ctx) -> pyfuse3.FileInfo:
        if inode == CTL_DIR_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if inode == CTL_FILE_INO:
            if ctx.uid not in (0, os.getuid()):
                raise pyfuse3.FUSEError(errno.EACCES)
            handle = _ControlHandle(inode)
        elif inode == LOOKUP_INO:
            handle = _ControlHandle(inode, ctx=ctx)
        else:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            handle = _ControlHandle(inode, await trio.to_thread.run_sync(self._snapshot, inode))
        fh = self._next_ctl_fh
        self._next_ctl_fh += 1
        self._ctl[fh] = handle
        # Contents are made per open: the kernel must ask for them, not cache them.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def _snapshot(self, ino: int) -> bytes:
        if ino == DIRECT_INO:
            if self.direct_info is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self.direct_info
        if ino == METRICS_INO:
            from . import metrics

            return metrics.render(self.registry or metrics.registry_for(self.wh))
        return json.dumps(self.wh.stats(), indent=1).encode() + b"\n"

    def _lookup(self, handle: _ControlHandle) -> bytes:
        """.kvfs/lookup: a JSON list of paths in, a JSON list of booleans out."""
        try:
            paths = json.loads(handle.request)
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deep
            paths = None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return json.dumps(self.wh.exists_many(paths, handle.uid, handle.gid)).encode()

    async def _run_control(self, handle: _ControlHandle) -> bytes:
        if not handle.ran:
            handle.ran = True
            if handle.ino == LOOKUP_INO:
                handle.reply = self._lookup(handle)
            else:
                handle.reply = await trio.to_thread.run_sync(control.handle, self.wh, bytes(handle.request))
        if handle.reply is None:
            raise pyfuse3.FUSEError(errno.EIO)  # it failed, and that was reported then
        return handle.reply

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        if _virtual(inode):
            return await self._open_control(inode, flags, ctx)
        acc = flags & os.O_ACCMODE
        write = acc in (os.O_WRONLY, os.O_RDWR)
        try:
            if self.wh.remote_pending(inode):  # data still in the shared tier
                # About to be emptied: nothing to fetch. Either waits for another thread's
                # fetch of the same file: in a thread, never on the event loop.
                drop = write and flags & os.O_TRUNC
                await trio.to_thread.run_sync(self.wh.drop_remote if drop else self.wh.fill_remote, inode)
            fh = self.wh.open(inode, write=write, append=bool(flags & os.O_APPEND))
        except KvfsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # The kernel still holds a name for an inode that is gone (renamed over, evicted,
            # or replaced by a newer version from the shared tier) and not yet forgotten:
            # ESTALE makes it look the name up again and retry the open once (Linux's
            # do_filp_open). If the retry finds a gone inode too (the name was replaced again
            # meanwhile), that caller gets ENOENT, a miss clients understand, not ESTALE.
            now = time.monotonic()
            if self._stale.pop(ctx.pid, 0) > now:
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            if len(self._stale) > 4096:
                self._stale.clear()
            self._stale[ctx.pid] = now + 1.0
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        if write and flags & os.O_TRUNC:
            try:
                await trio.to_thread.run_sync(functools.partial(self.wh.setattr, inode, size=0))
            except BaseException:
                self.wh.release(fh)
                raise
        return self._file_info(fh)

    @_fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        self._refuse(parent_inode, name)
        if not stat.S_ISREG(mode) and stat.S_IFMT(mode) != 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        fh, inode = self.wh.create(parent_inode, name, mode, ctx.uid, ctx.gid, pid=ctx.pid)
        return self._file_info(fh), self._entry(inode)

    @_fuse_errors
    async def read(self, fh, off, size):
        if fh >= VIRTUAL_FH:
            reply = await self._run_control(self._ctl[fh])
            return reply[off:off + size]
        # What the daemon holds (read ahead into its block cache) is answered here, on the
        # event loop; only reads that go to the devices take a worker thread.
        data = self.wh.read_cached(fh, off, size)
        if data is None:
            data = await trio.to_thread.run_sync(self.wh.read, fh, off, size)
        return data

    @_fuse_errors
    async def write(self, fh, off, buf):
        if fh >= VIRTUAL_FH:
            handle = self._ctl[fh]
            if handle.ino not in (CTL_FILE_INO, LOOKUP_INO):
                raise pyfuse3.FUSEError(errno.EBADF)
            if handle.ran:  # a new request on the same open file
                handle.request.clear()
                handle.reply = None
                handle.ran = False
            if len(handle.request) + len(buf) > control.MAX_REQUEST * (16 if handle.ino == LOOKUP_INO else 1):
                raise pyfuse3.FUSEError(errno.EFBIG)
            handle.request += buf
            return len(buf)
        # Writes, commits and truncations may wait for the devices (and for the lock, which
        # an inline eviction or a commit holds meanwhile): in a worker thread, so that the
        # event loop goes on answering other requests.
        return await trio.to_thread.run_sync(self.wh.write, fh, off, buf)

    @_fuse_errors
    async def flush(self, fh):
        if fh >= VIRTUAL_FH:
            # A request written and never read back (echo ... > .kvfs/control) runs at
            # close, so that its failure still reaches the writer.
            handle = self._ctl[fh]
            if handle.request and not handle.ran and handle.ino == CTL_FILE_INO:
                reply = json.loads(await self._run_control(handle))
                if not reply["ok"]:
                    raise pyfuse3.FUSEError(reply.get("errno", errno.EIO))
            return
        await trio.to_thread.run_sync(self.wh.flush, fh)

    @_fuse_errors
    async def fsync(self, fh, datasync):
        if fh >= VIRTUAL_FH:
            return
        await trio.to_thread.run_sync(self.wh.fsync, fh, datasync)

    @_fuse_errors
    async def release(self, fh):
        if fh >= VIRTUAL_FH:
            self._ctl.pop(fh, None)
            return
        await trio.to_thread.run_sync(self.wh.release, fh)
