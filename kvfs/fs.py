"""pyfuse3 Operations over a Warehouse.

This is the only module (with kvfs.mount) that imports pyfuse3 or trio, and the only place
where engine errors become FUSEError: every handler goes through `_fuse_errors`, so nothing
but FUSEError ever leaves a handler (anything else would end the FUSE session).
"""

import errno
import functools
import logging
import os
import stat

import pyfuse3
import trio

from .errors import KvfsError
from .meta import Inode

log = logging.getLogger("kvfs.fs")

# Published KV blocks are immutable and every namespace change passes through this kernel
# mount, so the kernel may cache names, attributes and pages for a long time.
ENTRY_TIMEOUT = 300
ATTR_TIMEOUT = 300
STATFS_BSIZE = 4096  # the alignment O_DIRECT clients should use (LMCache reads f_bsize)


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

    def __init__(self, warehouse):
        super().__init__()
        self.wh = warehouse
        self._dirs: dict[int, int] = {}
        self._next_dir_fh = 1

    def _entry(self, inode: Inode, ref: bool = True) -> pyfuse3.EntryAttributes:
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
        if ref:
            self.wh.ref(inode.ino)
        return e

    # -- namespace ------------------------------------------------------------------

    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return self._entry(self.wh.lookup(parent_inode, name))
        except KvfsError as exc:
            if exc.errno != errno.ENOENT:
                raise
        # Cache the miss in the kernel: clients probe for names that mostly don't exist.
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = ENTRY_TIMEOUT
        return e

    async def forget(self, inode_list):
        # forget has no reply: an exception here would end the FUSE session (and the
        # mount), so each inode is handled on its own and failures are only logged.
        for ino, n in inode_list:
            try:
                self.wh.forget(ino, n)
            except Exception:
                log.exception("forget of inode %d failed; its space is reclaimed by fsck/gc", ino)
        if self.wh.discarded:
            self._invalidate_discarded()

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
        return self._entry(self.wh.getattr(inode), ref=False)

    @_fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        kw = {}
        if fields.update_size:
            kw["size"] = attr.st_size
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
        return self._entry(self.wh.setattr(inode, **kw), ref=False)

    @_fuse_errors
    async def readlink(self, inode, ctx):
        return self.wh.readlink(inode)

    @_fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._entry(self.wh.mknod(parent_inode, name, mode, ctx.uid, ctx.gid, rdev))

    @_fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._entry(self.wh.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        return self._entry(self.wh.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._entry(self.wh.link(inode, new_parent_inode, new_name))

    @_fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        self.wh.unlink(parent_inode, name)

    @_fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        self.wh.rmdir(parent_inode, name)

    @_fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        wflags = 0
        if flags & pyfuse3.RENAME_NOREPLACE:
            wflags |= 1
        if flags & pyfuse3.RENAME_EXCHANGE:
            wflags |= 2
        self.wh.rename(parent_inode_old, name_old, parent_inode_new, name_new, wflags)

    @_fuse_errors
    async def opendir(self, inode, ctx):
        ino = self.wh.getattr(inode).ino
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = ino
        return fh

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        ino = self._dirs[fh]
        while True:
            batch = self.wh.readdir(ino, start_id)
            if not batch:
                return
            for name, inode, entry_id in batch:
                if not pyfuse3.readdir_reply(token, name, self._entry(inode, ref=False), entry_id):
                    return
                self.wh.ref(inode.ino)
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
        s.f_files = max(st["files"] + (1 << 32), 1)
        s.f_ffree = s.f_files - st["files"]
        s.f_favail = s.f_ffree
        s.f_namemax = 255
        return s

    # -- extended attributes ----------------------------------------------------------

    @_fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        self.wh.setxattr(inode, name, value)

    @_fuse_errors
    async def getxattr(self, inode, name, ctx):
        return self.wh.getxattr(inode, name)

    @_fuse_errors
    async def listxattr(self, inode, ctx):
        return self.wh.listxattr(inode)

    @_fuse_errors
    async def removexattr(self, inode, name, ctx):
        self.wh.removexattr(inode, name)

    # -- files --------------------------------------------------------------------------

    @staticmethod
    def _file_info(fh: int) -> pyfuse3.FileInfo:
        # keep_cache: pages stay valid across opens (content changes go through this
        # mount). direct_io stays off even for O_DIRECT clients so the kernel can keep
        # several large requests in flight.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        acc = flags & os.O_ACCMODE
        write = acc in (os.O_WRONLY, os.O_RDWR)
        fh = self.wh.open(inode, write=write, append=bool(flags & os.O_APPEND))
        if write and flags & os.O_TRUNC:
            try:
                self.wh.setattr(inode, size=0)
            except BaseException:
                self.wh.release(fh)
                raise
        return self._file_info(fh)

    @_fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        if not stat.S_ISREG(mode) and stat.S_IFMT(mode) != 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        fh, inode = self.wh.create(parent_inode, name, mode, ctx.uid, ctx.gid)
        return self._file_info(fh), self._entry(inode)

    @_fuse_errors
    async def read(self, fh, off, size):
        return await trio.to_thread.run_sync(self.wh.read, fh, off, size)

    @_fuse_errors
    async def write(self, fh, off, buf):
        return self.wh.write(fh, off, buf)

    @_fuse_errors
    async def flush(self, fh):
        self.wh.flush(fh)

    @_fuse_errors
    async def fsync(self, fh, datasync):
        await trio.to_thread.run_sync(self.wh.fsync, fh, datasync)

    @_fuse_errors
    async def release(self, fh):
        self.wh.release(fh)
