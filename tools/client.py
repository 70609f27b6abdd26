"""How a tool reaches a warehouse: a running mount through its control files (Remote), an
unmounted one opened in the tool's own process (Local), or its catalog. Owns the mapping of
control errors to exit codes; the protocol itself is kvfs.control's, the work the engine's.

Engine modules are imported where they are used, so that `kvfs --help` and a usage error
stay quick."""

import errno
import json
import os

from kvfs import control
from kvfs.layout import META_DIR
from kvfs.errors import (
    KvfsError, QuietError,
    EXIT_IN_USE, EXIT_INTERNAL, EXIT_NO_WAREHOUSE, EXIT_NOT_MOUNTED, EXIT_PERMISSION, EXIT_USAGE,
)

_EXIT_FOR_ERRNO = {
    errno.ENOENT: EXIT_USAGE, errno.EINVAL: EXIT_USAGE, errno.ENOTDIR: EXIT_USAGE,
    errno.ENAMETOOLONG: EXIT_USAGE,
    errno.EACCES: EXIT_PERMISSION, errno.EPERM: EXIT_PERMISSION, errno.EROFS: EXIT_IN_USE,
}


def exit_for(err: int) -> int:
    return _EXIT_FOR_ERRNO.get(err, EXIT_INTERNAL)


# A path that is no kvfs thing: one situation, so one code per kind of tool. A tool that
# can open a warehouse itself was given no warehouse (EXIT_NO_WAREHOUSE, whatever else it
# also takes); a tool that works only through a running mount was given a path on none.
def not_a_warehouse(path: str, nor: str) -> QuietError:
    """`path` is neither `nor` (what else the tool takes) nor a warehouse."""
    return QuietError(f"{path} is neither {nor} nor a warehouse", EXIT_NO_WAREHOUSE)


def not_on_a_mount(path: str) -> QuietError:
    return QuietError(f"{path} is not inside a kvfs mount", EXIT_NOT_MOUNTED)


# What a control or stats file of a mount gives once the mount is no longer served (its
# daemon died, or it was unmounted meanwhile).
_GONE = (errno.ENOENT, errno.ENOTCONN)


class Remote:
    """A warehouse served by a running mount, reached through its control file."""

    def __init__(self, mountpoint: str):
        self.mountpoint = mountpoint
        self.path = os.path.join(mountpoint, control.CONTROL_DIR, control.CONTROL_FILE)

    def call(self, op: str, **args) -> dict:
        if op == "stats" and not args:
            # The same snapshot, from a file that anyone may read on any mount: the control
            # file cannot be opened for writing on a read-only mount.
            try:
                with open(os.path.join(self.mountpoint, control.CONTROL_DIR, control.STATS_FILE), "rb") as f:
                    return json.loads(f.read())
            except OSError as exc:
                raise QuietError(f"{self.mountpoint}: cannot read {control.STATS_FILE}: {exc.strerror}",
                                 EXIT_NOT_MOUNTED if exc.errno in _GONE else exit_for(exc.errno)) from None
        try:
            raw = control.exchange(self.path, json.dumps({"op": op, **args}).encode())
        except OSError as exc:
            if exc.errno == errno.EROFS:  # refused at open, by the kernel
                raise QuietError(f"{self.mountpoint} is mounted read-only: {op!r} cannot run there",
                                 EXIT_IN_USE) from None
            if exc.errno in (errno.EACCES, errno.EPERM):  # refused at open
                raise QuietError(f"{self.mountpoint}: the control interface is for root and "
                                 "the warehouse owner", EXIT_PERMISSION) from None
            if exc.errno in _GONE:
                raise QuietError(f"{self.path}: {exc.strerror}", EXIT_NOT_MOUNTED) from None
            raise QuietError(f"{self.mountpoint}: the daemon failed to carry out {op!r} "
                             f"({exc.strerror}); see the warehouse's kvfs.log", exit_for(exc.errno)) from None
        reply = json.loads(raw)
        if not reply.pop("ok"):
            raise QuietError(reply["error"], exit_for(reply.get("errno", errno.EIO)))
        return reply

    def close(self) -> None:
        pass


class Local:
    """An unmounted warehouse, opened in this process for the duration of a tool."""

    def __init__(self, warehouse: str, write: bool):
        from kvfs.warehouse import Warehouse

        self.wh = Warehouse(warehouse, check_only=not write)

    def call(self, op: str, **args) -> dict:
        try:
            return control.run(self.wh, op, args)
        except KvfsError as exc:
            raise QuietError(str(exc), exit_for(exc.errno)) from None

    def close(self) -> None:
        self.wh.close()


def connect(target: str, write: bool = False):
    """A Remote for a kvfs mount point, or for a warehouse that a mount is serving; a
    Local for an unmounted warehouse (opened read-write only when `write`)."""
    from kvfs import meta as M
    from kvfs.mounttab import find_mount, wait_unlocked

    if find_mount(target) is not None:
        return Remote(os.path.realpath(target))
    meta_dir = os.path.join(target, META_DIR)
    if not os.path.isdir(meta_dir):
        raise not_a_warehouse(target, "a kvfs mount point")
    if not wait_unlocked(target, 0):
        try:
            meta = M.Meta(meta_dir, readonly=True)
            try:
                with meta.begin() as txn:
                    mountpoint = (meta.get_json(txn, b"state") or {}).get("mountpoint")
            finally:
                meta.close()
        except Exception:
            mountpoint = None
        if mountpoint and find_mount(mountpoint, resolve=False) is not None:
            return Remote(mountpoint)
        raise QuietError(f"{target} is in use by another process (not a mount this tool can reach)", EXIT_IN_USE)
    return Local(target, write)


def locate(path: str) -> tuple[str, str]:
    """(mount point, path relative to it) of a path inside a kvfs mount. The last
    component is not resolved: a symbolic link names itself, not its target."""
    from kvfs.mounttab import kvfs_mounts

    parent, name = os.path.split(os.path.abspath(path))
    full = os.path.join(os.path.realpath(parent), name) if name else os.path.realpath(parent)
    best = None
    for mp in kvfs_mounts():
        if (full == mp or full.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) > len(best)):
            best = mp
    if best is None:
        raise not_on_a_mount(path)
    return best, os.path.relpath(full, best) if full != best else ""


def open_target(path: str):
    """(catalog, path inside the warehouse, path to show) for a path inside a kvfs mount, or
    for a warehouse directory (its root)."""
    from kvfs.catalog import Catalog
    from kvfs.mounttab import find_mount

    if os.path.isdir(os.path.join(path, META_DIR)) and find_mount(path) is None:
        return Catalog(path), "", path.rstrip("/") or "/"
    try:
        mountpoint, rel = locate(path)
    except QuietError:
        raise not_a_warehouse(path, "inside a kvfs mount") from None
    return Catalog(find_mount(mountpoint, resolve=False)["source"]), rel, path
