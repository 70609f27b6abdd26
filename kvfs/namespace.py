"""The namespace: POSIX operations on inodes and directory entries, over the metadata.

Owns: inodes, directory entries (name -> inode, with a stable readdir offset), the back
links from inodes to their names, symbolic links, ordinary extended attributes, path
resolution, and dropping an inode's data when its last name and last opener are gone
(through kvfs.blocks). Knows nothing of devices, open-file buffers or policy: the pin, ttl
and quota attributes are kvfs.policy's, and truncation is kvfs.files'. Runs under Core.lock.
"""

import errno
import logging
import os
import stat

from . import codec as codecs
from . import meta as M
from .core import Layer, now_ns
from .errors import (
    Exists, Invalid, IsADirectory, KvfsError, NameTooLong, NoAttr, NotADirectory, NotEmpty, NotFound,
)

log = logging.getLogger("kvfs.warehouse")

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
SYMLINK_MAX = 4095
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
COMPRESS_XATTR = b"user.kvfs.compress"  # a directory's codec for new files


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name longer than {NAME_MAX} bytes")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise Invalid(f"invalid name {name!r}")


def check_xattr(name: bytes, value: bytes | None = None) -> None:
    if not name or len(name) > XATTR_NAME_MAX:
        raise KvfsError("attribute name out of range", errno.ERANGE)
    if value is not None and len(value) > XATTR_SIZE_MAX:
        raise KvfsError("attribute value too large", errno.E2BIG)


def _process_name(pid: int) -> bytes:
    if pid <= 0:
        return b""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read(16).rstrip(b"\n")
    except OSError:  # gone already
        return b""


class Namespace(Layer):
    """Names and inodes of an open warehouse (see the module docstring)."""

    def __init__(self, core, blocks, default_codec: int):
        super().__init__(core)
        self.blocks = blocks
        self.default_codec = default_codec

    # -- inodes and entries ---------------------------------------------------------------

    def get_inode(self, txn, ino: int) -> M.Inode:
        inode = self.meta.get_inode(txn, ino)
        if inode is None:
            raise NotFound(f"inode {ino} does not exist")
        return inode

    def live(self, inode: M.Inode) -> M.Inode:
        """`inode` as its open file has it now (size and times not yet published)."""
        of = self.core.open.get(inode.ino)
        if of is not None and of.changed:
            inode.size = of.size
            inode.mtime_ns = of.mtime_ns
            inode.ctime_ns = max(inode.ctime_ns, of.mtime_ns)
        return inode

    def get_dir(self, txn, ino: int) -> M.Inode:
        inode = self.get_inode(txn, ino)
        if not stat.S_ISDIR(inode.mode):
            raise NotADirectory(f"inode {ino} is not a directory")
        if inode.nlink == 0:
            raise NotFound("directory was removed")
        return inode

    def find(self, txn, parent: int, name: bytes) -> tuple[int, int] | None:
        """(inode, entry id) of `name` in directory `parent`, or None."""
        raw = txn.get(M.dentry_key(parent, name), db=self.meta.db["dentries"])
        return None if raw is None else M.parse_dentry_val(raw)

    def add_entry(self, txn, parent: int, name: bytes, ino: int, entry_id: int | None = None) -> None:
        if entry_id is None:
            entry_id = self.meta.next_counter(txn, b"next_entry", 1)
        db = self.meta.db
        if not txn.put(M.dentry_key(parent, name), M.dentry_val(ino, entry_id), db=db["dentries"], overwrite=False):
            raise Exists(f"{name!r} exists")
        txn.put(M.dirent_key(parent, entry_id), name, db=db["dirents"])
        self.meta.add_link(txn, ino, parent, name)

    def remove_entry(self, txn, parent: int, name: bytes) -> int:
        db = self.meta.db
        key = M.dentry_key(parent, name)
        raw = txn.get(key, db=db["dentries"])
        if raw is None:
            raise NotFound(f"{name!r} not found")
        ino, entry_id = M.parse_dentry_val(raw)
        txn.delete(key, db=db["dentries"])
        txn.delete(M.dirent_key(parent, entry_id), db=db["dirents"])
        self.meta.remove_link(txn, ino, parent, name)
        return ino

    def touch_dir(self, txn, parent: M.Inode, t: int, nlink_delta: int = 0) -> None:
        parent.mtime_ns = parent.ctime_ns = t
        parent.nlink += nlink_delta
        self.meta.put_inode(txn, parent)

    def _in_use(self, ino: int) -> bool:
        # Only open files need an unlinked inode's data: the kernel reads and writes
        # through open handles (mmap holds one too), so a name the kernel merely still
        # caches does not keep space that an unlink or an eviction gave back.
        return ino in self.core.open

    def drop_link(self, txn, inode: M.Inode, t: int, effects: list) -> None:
        inode.nlink -= 1
        if stat.S_ISDIR(inode.mode):
            inode.nlink = 0
        inode.ctime_ns = t
        if inode.nlink > 0:
            self.meta.put_inode(txn, inode)
        elif self._in_use(inode.ino):
            self.meta.put_inode(txn, inode)
            txn.put(M.ino_key(inode.ino), b"", db=self.meta.db["orphans"])
        else:
            self.purge_inode(txn, inode.ino, effects)

    def purge_inode(self, txn, ino: int, effects: list) -> None:
        """Delete inode `ino` and drop its references to blocks."""
        for h in self.meta.delete_inode_records(txn, ino):
            self.blocks.decref(txn, h, effects)

    def purge_orphans(self, txn, effects: list) -> int:
        """Purge every unlinked inode that was kept for a reference now gone."""
        orphans = [M.parse_u64(key) for key, _ in txn.cursor(db=self.meta.db["orphans"])]
        for ino in orphans:
            self.purge_inode(txn, ino, effects)
        return len(orphans)

    def maybe_purge(self, ino: int) -> None:
        """Purge `ino` if it is an unlinked inode that its last opener just let go of."""
        if self.core.readonly or self._in_use(ino):
            return
        with self.meta.begin() as txn:
            if txn.get(M.ino_key(ino), db=self.meta.db["orphans"]) is None:
                return
        effects: list = []
        with self.meta.begin(write=True) as txn:
            self.purge_inode(txn, ino, effects)
        self.blocks.apply(effects)

    def drop_incomplete(self, txn, ino: int, effects: list, removed: list | None = None) -> None:
        """Remove a file that was created and never flushed (recovery, gc); its name goes
        to `removed` for the kernel to be told."""
        db = self.meta.db
        val = txn.get(M.ino_key(ino), db=db["incomplete"])
        parent, name = M.parse_u64(val[:8]), val[8:]
        dv = txn.get(M.dentry_key(parent, name), db=db["dentries"])
        if dv is not None and M.parse_dentry_val(dv)[0] == ino:
            self.remove_entry(txn, parent, name)
            if removed is not None:
                removed.append((parent, name, ino))
        txn.delete(M.ino_key(ino), db=db["incomplete"])
        inode = self.meta.get_inode(txn, ino)
        if inode is not None:
            inode.nlink = max(0, inode.nlink - 1)
            if inode.nlink == 0:
                self.purge_inode(txn, ino, effects)
            else:
                self.meta.put_inode(txn, inode)

    def remove_names(self, txn, ino: int, effects: list, removed: list) -> M.Inode:
        """Unlink every name of `ino` (its data goes now, or at its last close)."""
        inode = self.get_inode(txn, ino)
        names = self.meta.names_of(txn, ino)
        if not names:
            log.error("inode %d is indexed for eviction but has no name; dropping it (run kvfs fsck)", ino)
            inode.nlink = 1
            names = [(None, None)]
        t = now_ns()
        for parent, name in names:
            if parent is not None:
                self.remove_entry(txn, parent, name)
                pdir = self.meta.get_inode(txn, parent)
                if pdir is not None:
                    self.touch_dir(txn, pdir, t)
                removed.append((parent, name, ino))
            self.drop_link(txn, inode, t, effects)
        return inode

    def new_inode(self, txn, mode: int, uid: int, gid: int, parent: M.Inode, rdev: int = 0) -> M.Inode:
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        t = now_ns()
        ino = self.meta.next_counter(txn, b"next_ino", M.ROOT_INO + 1)
        nlink = 2 if stat.S_ISDIR(mode) else 1
        flags = parent.flags & M.F_PINNED  # pin and ttl are inherited from the directory
        if self.dir_codec(txn, parent) == codecs.CODEC_ZSTD:
            flags |= M.F_COMPRESS
        return M.Inode(ino, mode, nlink, uid, gid, 0, t, t, t, rdev, flags, parent.ttl)

    def dir_codec(self, txn, parent: M.Inode) -> int:
        raw = txn.get(M.xattr_key(parent.ino, COMPRESS_XATTR), db=self.meta.db["xattrs"])
        if raw is not None:
            try:
                return codecs.codec_by_name(raw.decode().strip())
            except (Invalid, UnicodeDecodeError):
                pass
        return self.default_codec

    def _dir_has_entries(self, txn, ino: int) -> bool:
        for _ in self.meta.iter_prefix(txn, "dentries", M.ino_key(ino)):
            return True
        return False

    def _check_removable(self, txn, inode: M.Inode, directory: bool, name: bytes) -> bool:
        """Whether `inode` (named `name`) is a directory; IsADirectory, NotADirectory or
        NotEmpty unless it may go where a directory (or, not `directory`, a file) goes."""
        is_dir = stat.S_ISDIR(inode.mode)
        if is_dir and not directory:
            raise IsADirectory(f"{name!r} is a directory")
        if directory and not is_dir:
            raise NotADirectory(f"{name!r} is not a directory")
        if is_dir and self._dir_has_entries(txn, inode.ino):
            raise NotEmpty(f"{name!r} is not empty")
        return is_dir

    # -- POSIX operations -------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> M.Inode:
        if len(name) > NAME_MAX:
            raise NameTooLong("name too long")
        with self.core.lock, self.meta.begin() as txn:
            self.get_dir(txn, parent)
            found = self.find(txn, parent, name)
            if found is None:
                self.counters["lookup_miss"] += 1
                raise NotFound(f"{name!r} not found")
            self.counters["lookup_hit"] += 1
            return self.live(self.get_inode(txn, found[0]))

    def getattr(self, ino: int) -> M.Inode:
        with self.core.lock, self.meta.begin() as txn:
            return self.live(self.get_inode(txn, ino))

    def make(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
             rdev: int = 0, target: bytes | None = None, incomplete: bool = False,
             pid: int = 0) -> M.Inode:
        """Make `name` in `parent`. uid, gid and pid are the caller's: the new inode's
        owner, and its lineage record. incomplete: a file nothing was published into yet
        (recovery removes it unless a commit completes it)."""
        check_name(name)
        self.core.check_writable()
        with self.core.lock, self.meta.begin(write=True) as txn:
            pdir = self.get_dir(txn, parent)
            if self.find(txn, parent, name) is not None:
                raise Exists(f"{name!r} exists")
            inode = self.new_inode(txn, mode, uid, gid, pdir, rdev)
            self.add_entry(txn, parent, name, inode.ino)
            if target is not None:
                inode.size = len(target)
                txn.put(M.ino_key(inode.ino), target, db=self.meta.db["symlinks"])
            if incomplete:
                inode.flags |= M.F_INCOMPLETE
                txn.put(M.ino_key(inode.ino), M.u64(parent) + name, db=self.meta.db["incomplete"])
            self.meta.put_inode(txn, inode)
            self.meta.put_lineage(txn, inode.ino, M.Lineage(inode.ctime_ns, uid, gid, pid, 0, _process_name(pid)))
            self.touch_dir(txn, pdir, inode.ctime_ns, 1 if stat.S_ISDIR(mode) else 0)
            return inode

    def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
              pid: int = 0) -> M.Inode:
        if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise Invalid("unsupported file type")
        return self.make(parent, name, mode, uid, gid, rdev, pid=pid)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int, pid: int = 0) -> M.Inode:
        return self.make(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid, pid=pid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int, pid: int = 0) -> M.Inode:
        if len(target) > SYMLINK_MAX:
            raise NameTooLong("symlink target too long")
        return self.make(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target, pid=pid)

    def readlink(self, ino: int) -> bytes:
        with self.meta.begin() as txn:
            target = txn.get(M.ino_key(ino), db=self.meta.db["symlinks"])
        if target is None:
            raise Invalid("not a symbolic link")
        return target

    def link(self, ino: int, new_parent: int, new_name: bytes) -> M.Inode:
        check_name(new_name)
        self.core.check_writable()
        with self.core.lock, self.meta.begin(write=True) as txn:
            inode = self.get_inode(txn, ino)
            if stat.S_ISDIR(inode.mode):
                raise KvfsError("hard links to directories are not allowed", errno.EPERM)
            if inode.nlink == 0:
                raise NotFound("file was removed")
            pdir = self.get_dir(txn, new_parent)
            self.add_entry(txn, new_parent, new_name, ino)
            t = now_ns()
            inode.nlink += 1
            inode.ctime_ns = t
            # A second name makes the file part of the namespace for good.
            if txn.delete(M.ino_key(ino), db=self.meta.db["incomplete"]):
                inode.flags &= ~M.F_INCOMPLETE
            self.meta.put_inode(txn, inode)
            self.touch_dir(txn, pdir, t)
            return self.live(inode)

    def unlink(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, directory=False)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, directory=True)

    def _remove(self, parent: int, name: bytes, directory: bool) -> None:
        self.core.check_writable()
        effects: list = []
        with self.core.lock:
            with self.meta.begin(write=True) as txn:
                pdir = self.get_dir(txn, parent)
                found = self.find(txn, parent, name)
                if found is None:
                    raise NotFound(f"{name!r} not found")
                inode = self.get_inode(txn, found[0])
                is_dir = self._check_removable(txn, inode, directory, name)
                self.remove_entry(txn, parent, name)
                t = now_ns()
                self.touch_dir(txn, pdir, t, -1 if is_dir else 0)
                self.drop_link(txn, inode, t, effects)
            self.blocks.apply(effects)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        check_name(new_name)
        self.core.check_writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise Invalid("bad rename flags")
        effects: list = []
        with self.core.lock:
            with self.meta.begin(write=True) as txn:
                opdir = self.get_dir(txn, old_parent)
                npdir = opdir if new_parent == old_parent else self.get_dir(txn, new_parent)
                src = self.find(txn, old_parent, old_name)
                if src is None:
                    raise NotFound(f"{old_name!r} not found")
                dst = self.find(txn, new_parent, new_name)
                src_inode = self.get_inode(txn, src[0])
                t = now_ns()
                if flags & RENAME_EXCHANGE:
                    if dst is None:
                        raise NotFound(f"{new_name!r} not found")
                    self._exchange(txn, (old_parent, old_name, opdir, src, src_inode),
                                   (new_parent, new_name, npdir, dst), t)
                else:
                    if dst is not None and dst[0] == src[0]:
                        if flags & RENAME_NOREPLACE:
                            raise Exists(f"{new_name!r} exists")
                        return  # two names of one inode: POSIX says do nothing
                    self._move(txn, (old_parent, old_name, opdir, src, src_inode),
                               (new_parent, new_name, npdir, dst), t, flags, effects)
                self.touch_dir(txn, opdir, t)
                if npdir is not opdir:
                    self.touch_dir(txn, npdir, t)
            self.blocks.apply(effects)
            self.core.published(src[0])  # a file under its new name is published there
            if flags & RENAME_EXCHANGE:
                self.core.published(dst[0])

    def _exchange(self, txn, old, new, t: int) -> None:
        old_parent, old_name, opdir, src, src_inode = old
        new_parent, new_name, npdir, dst = new
        db = self.meta.db
        dst_inode = self.get_inode(txn, dst[0])
        txn.put(M.dentry_key(old_parent, old_name), M.dentry_val(dst[0], src[1]), db=db["dentries"])
        txn.put(M.dentry_key(new_parent, new_name), M.dentry_val(src[0], dst[1]), db=db["dentries"])
        if src[0] != dst[0]:  # two names of one inode: its links stay as they are
            self.meta.remove_link(txn, src[0], old_parent, old_name)
            self.meta.remove_link(txn, dst[0], new_parent, new_name)
            self.meta.add_link(txn, src[0], new_parent, new_name)
            self.meta.add_link(txn, dst[0], old_parent, old_name)
        if old_parent != new_parent:
            delta = int(stat.S_ISDIR(src_inode.mode)) - int(stat.S_ISDIR(dst_inode.mode))
            opdir.nlink -= delta
            npdir.nlink += delta
        for node in (src_inode, dst_inode):
            node.ctime_ns = t
            self.meta.put_inode(txn, node)
        self._move_incomplete(txn, src[0], new_parent, new_name)
        self._move_incomplete(txn, dst[0], old_parent, old_name)

    def _move(self, txn, old, new, t: int, flags: int, effects: list) -> None:
        old_parent, old_name, opdir, src, src_inode = old
        new_parent, new_name, npdir, dst = new
        src_dir = stat.S_ISDIR(src_inode.mode)
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise Exists(f"{new_name!r} exists")
            dst_inode = self.get_inode(txn, dst[0])
            dst_dir = self._check_removable(txn, dst_inode, src_dir, new_name)
            self.remove_entry(txn, new_parent, new_name)
            if dst_dir:
                npdir.nlink -= 1
            self.drop_link(txn, dst_inode, t, effects)
        self.remove_entry(txn, old_parent, old_name)
        # A replaced name keeps its readdir offset: it never stops existing, so a listing
        # taken meanwhile must show it once, not again at the end.
        self.add_entry(txn, new_parent, new_name, src[0], dst[1] if dst is not None else None)
        if src_dir and old_parent != new_parent:
            opdir.nlink -= 1
            npdir.nlink += 1
        src_inode.ctime_ns = t
        self.meta.put_inode(txn, src_inode)
        self._move_incomplete(txn, src[0], new_parent, new_name)

    def _move_incomplete(self, txn, ino: int, parent: int, name: bytes) -> None:
        db = self.meta.db["incomplete"]
        if txn.get(M.ino_key(ino), db=db) is not None:
            txn.put(M.ino_key(ino), M.u64(parent) + name, db=db)

    def readdir(self, ino: int, start_id: int, limit: int = 512) -> list[tuple[bytes, M.Inode, int]]:
        """Entries after offset `start_id`: (name, inode, offset of the next entry)."""
        out = []
        with self.core.lock, self.meta.begin() as txn:
            self.get_dir(txn, ino)
            start = M.dirent_key(ino, start_id + 1)
            for key, name in self.meta.iter_prefix(txn, "dirents", M.ino_key(ino), start):
                _, entry_id = M.parse_dirent_key(key)
                found = self.find(txn, ino, name)
                if found is None:
                    continue
                out.append((name, self.live(self.get_inode(txn, found[0])), entry_id))
                if len(out) >= limit:
                    break
        return out

    def set_attributes(self, ino: int, t: int, mode: int | None = None, uid: int | None = None,
                       gid: int | None = None, atime_ns: int | None = None,
                       mtime_ns: int | None = None) -> M.Inode:
        """setattr but for the size (kvfs.files truncates), at change time `t`."""
        with self.core.lock, self.meta.begin(write=True) as txn:
            inode = self.get_inode(txn, ino)
            if mode is not None:
                inode.mode = stat.S_IFMT(inode.mode) | (mode & 0o7777)
            if uid is not None:
                inode.uid = uid
            if gid is not None:
                inode.gid = gid
            if atime_ns is not None:
                inode.atime_ns = atime_ns
                self.core.accessed.pop(ino, None)  # an explicit time wins over an earlier use
            if mtime_ns is not None:
                inode.mtime_ns = mtime_ns
                of = self.core.open.get(ino)
                if of is not None:
                    of.mtime_ns = mtime_ns
            inode.ctime_ns = t
            self.meta.put_inode(txn, inode)
            return self.live(inode)

    # -- extended attributes (the pin, ttl and quota ones are kvfs.policy's) ---------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        with self.meta.begin() as txn:
            self.get_inode(txn, ino)
            val = txn.get(M.xattr_key(ino, name), db=self.meta.db["xattrs"])
        if val is None:
            raise NoAttr(f"no attribute {name!r}")
        return val

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self.core.check_writable()
        check_xattr(name, value)
        if name == COMPRESS_XATTR:
            codecs.codec_by_name(value.decode(errors="replace").strip())
        with self.core.lock, self.meta.begin(write=True) as txn:
            inode = self.get_inode(txn, ino)
            txn.put(M.xattr_key(ino, name), value, db=self.meta.db["xattrs"])
            inode.ctime_ns = now_ns()
            self.meta.put_inode(txn, inode)
        if name.startswith(b"user."):
            self.core.published(ino)  # annotations are part of what is shared

    def xattr_names(self, txn, ino: int) -> list[bytes]:
        return [k[8:] for k, _ in self.meta.iter_prefix(txn, "xattrs", M.ino_key(ino))]

    def removexattr(self, ino: int, name: bytes) -> None:
        self.core.check_writable()
        with self.core.lock, self.meta.begin(write=True) as txn:
            inode = self.get_inode(txn, ino)
            if not txn.delete(M.xattr_key(ino, name), db=self.meta.db["xattrs"]):
                raise NoAttr(f"no attribute {name!r}")
            inode.ctime_ns = now_ns()
            self.meta.put_inode(txn, inode)

    # -- paths ------------------------------------------------------------------------------

    def resolve(self, path: str | bytes) -> tuple[int, bytes, int]:
        """(parent, name, inode) of a path relative to the root, e.g. 'models/llama'."""
        parts = M.path_parts(path)
        if not parts:
            raise Invalid("the root itself has no name")
        if b".." in parts:
            raise Invalid("'..' is not allowed in a warehouse path")
        for part in parts:
            check_name(part)
        ino = M.ROOT_INO
        with self.meta.begin() as txn:
            for part in parts:
                parent = ino
                self.get_dir(txn, parent)
                found = self.find(txn, parent, part)
                if found is None:
                    raise NotFound(f"{os.fsdecode(path)}: no such file or directory")
                ino = found[0]
        return parent, parts[-1], ino

    def exists_many(self, paths: list[str], uid: int, gid: int) -> list[bool]:
        """Whether each path (relative to the root) names something, as far as a caller
        with `uid` and `gid` may know: every directory on the way must let it search, as
        the kernel would check for a lookup (supplementary groups are not known here, so
        this may say no where a lookup would find). One read transaction for the batch."""
        searchable: dict[int, bool] = {}

        def may_search(txn, ino: int) -> bool:
            if ino not in searchable:
                d = self.meta.get_inode(txn, ino)
                bit = 0 if d is None or not stat.S_ISDIR(d.mode) else (
                    0o111 if uid == 0 else 0o100 if uid == d.uid else 0o010 if gid == d.gid else 0o001)
                searchable[ino] = bool(d is not None and d.mode & bit)
            return searchable[ino]

        out = []
        with self.meta.begin() as txn:
            for path in paths:
                try:
                    parts = M.path_parts(path)
                except Invalid:  # no bytes spell it: no file has that name
                    parts = []
                ino, found = M.ROOT_INO, bool(parts) and b".." not in parts
                for part in parts if found else ():
                    hit = may_search(txn, ino) and len(part) <= NAME_MAX and self.find(txn, ino, part)
                    if not hit:
                        found = False
                        break
                    ino = hit[0]
                out.append(found)
        hits = sum(out)
        self.counters["lookup_hit"] += hits
        self.counters["lookup_miss"] += len(out) - hits
        return out

    def dir_path(self, txn, ino: int) -> bytes | None:
        """The path of directory `ino` relative to the root (b"" for the root), or None
        if it has no name (a retired tree)."""
        parts = []
        for _ in range(4096):
            if ino == M.ROOT_INO:
                return b"/".join(reversed(parts))
            names = self.meta.names_of(txn, ino)
            if not names:
                return None
            ino, name = names[0]
            parts.append(name)
        return None

    def paths(self, txn, ino: int) -> list[tuple[int, bytes, bytes]]:
        """(parent, name, path relative to the root) of each name of `ino` that has a path."""
        out = []
        for parent, name in self.meta.names_of(txn, ino):
            base = self.dir_path(txn, parent)
            if base is not None:
                out.append((parent, name, base + b"/" + name if base else name))
        return out
