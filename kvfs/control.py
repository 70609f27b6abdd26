"""The control interface of a running mount, and how tools reach a warehouse.

A mount has a hidden directory `.kvfs` in its root (served by kvfs.fs, not listed by
readdir):

    .kvfs/control     mode 0600, owned by the daemon's user: open it read-write, write one
                      JSON request, read the JSON reply from the same open file. Only root
                      and the daemon's user may open it.
    .kvfs/stats.json  Warehouse.stats() as JSON, a snapshot taken at open (mode 0444).
    .kvfs/metrics     the same in the Prometheus text format (kvfs.metrics).
    .kvfs/lookup      mode 0666: write a JSON list of paths (relative to the mount's root),
                      read a JSON list of booleans: which exist, as far as the caller may
                      search the directories on the way. A batch costs one round trip.

Requests and replies (`run` below is the one dispatcher, used in the daemon and, for an
unmounted warehouse, in the tool's own process):

    {"op": "stats"}                                  -> Warehouse.stats()
    {"op": "retire", "path": "models/llama-7b"}      -> {"files", "bytes", "seconds"}
    {"op": "retire", "path": ..., "shared": true}    -> also deletes the path's manifests from
                                                        the shared tier: + {"shared_manifests"}
                                                        (the path need not exist locally)
    {"op": "gc", "delete": false, "grace": 300}      -> kvfs.fsck.gc() report
    {"op": "tune", "high_watermark": 0.9, "low_watermark": 0.8}
                                                     -> {"high_watermark", "low_watermark"}
    {"op": "faults", "rules": [...], "drop_cache": true}
                                                     -> the injected device faults now (only
                                                        in a daemon started with KVFS_FAULTS;
                                                        see kvfs.store.Faults)

A reply is {"ok": true, ...} or {"ok": false, "error": "...", "errno": N}. A request that
is not JSON or names no known operation makes the read fail with EINVAL.
"""

import errno
import json
import logging
import math
import os
import time

from .errors import (
    Invalid, KvfsError, NotFound, QuietError,
    EXIT_IN_USE, EXIT_INTERNAL, EXIT_NO_WAREHOUSE, EXIT_NOT_MOUNTED, EXIT_PERMISSION, EXIT_USAGE,
)

CONTROL_DIR = ".kvfs"
CONTROL_FILE = "control"
STATS_FILE = "stats.json"
METRICS_FILE = "metrics"
LOOKUP_FILE = "lookup"
MAX_REQUEST = 64 << 10
OPERATIONS = ("stats", "retire", "gc", "tune", "faults")

log = logging.getLogger("kvfs.control")


def run(wh, op: str, args: dict) -> dict:
    """Carry out one control operation on an open warehouse."""
    if op == "stats":
        return wh.stats()
    if op == "retire":
        path = args.get("path")
        if not isinstance(path, str) or not path:
            raise Invalid("retire needs a path")
        shared = bool(args.get("shared"))
        if shared and wh.shared is None:
            raise Invalid("this mount has no shared tier (mount it with --shared)")
        t0 = time.monotonic()
        before = wh.stats_totals()
        try:
            done = wh.retire(path)
        except NotFound:
            if not shared:
                raise
            done = None  # only in the shared tier
        while done is not None and done["ino"] in wh.retiring():
            wh.reap()
        after = wh.stats_totals()
        reply = {
            "files": after.get("retired_files", 0) - before.get("retired_files", 0),
            "bytes": after.get("retired_bytes", 0) - before.get("retired_bytes", 0),
        }
        if shared:  # after the local copies are gone: nothing here uploads them again
            reply["shared_manifests"] = wh.shared.retire(path)
        reply["seconds"] = round(time.monotonic() - t0, 3)
        return reply
    if op == "gc":
        from .fsck import DEFAULT_GC_GRACE, gc

        grace = args.get("grace", DEFAULT_GC_GRACE)
        if not _number(grace) or not math.isfinite(grace) or grace < 0:
            raise Invalid("grace must be a finite number of seconds >= 0")
        delete = args.get("delete", False)
        if not isinstance(delete, bool):  # "no" must not mean yes
            raise Invalid("delete must be true or false")
        return gc(wh, delete=delete, grace=float(grace))
    if op == "tune":
        marks = []
        for key in ("high_watermark", "low_watermark"):
            v = args.get(key)
            if v is not None and not _number(v):
                raise Invalid(f"{key} must be a number")
            marks.append(v)
        if marks != [None, None]:
            wh.set_watermarks(*marks)
        return {"high_watermark": wh.high_watermark, "low_watermark": wh.low_watermark}
    if op == "faults":
        faults = wh.devices.faults
        if faults is None:
            raise KvfsError("fault injection is off (the daemon was started without KVFS_FAULTS)",
                            errno.EPERM)
        if "rules" in args:
            try:
                faults.set_rules(args["rules"] if isinstance(args["rules"], list) else [args["rules"]])
            except (ValueError, TypeError) as exc:
                raise Invalid(str(exc)) from None
        if args.get("drop_cache"):
            wh.drop_cache()
        return faults.describe()
    raise Invalid(f"unknown control operation {op!r}")  # OPERATIONS and run() disagree


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)  # JSON true is not 1


def handle(wh, raw: bytes) -> bytes:
    """The daemon's side of .kvfs/control: one request in, one reply out."""
    try:
        req = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deep
        req = None
    if not isinstance(req, dict) or req.get("op") not in OPERATIONS:
        log.warning("control request refused (not a JSON object with a known op): %r", raw[:200])
        raise Invalid(f'a control request is a JSON object with "op" one of {", ".join(OPERATIONS)}')
    op = req.pop("op")
    try:
        reply = {"ok": True, **run(wh, op, req)}
    except KvfsError as exc:
        log.info("control %s %s failed: %s", op, req, exc)
        reply = {"ok": False, "error": str(exc), "errno": exc.errno}
    return json.dumps(reply).encode() + b"\n"


# -- the tools' side ----------------------------------------------------------------------

_EXIT_FOR_ERRNO = {
    errno.ENOENT: EXIT_USAGE, errno.EINVAL: EXIT_USAGE, errno.ENOTDIR: EXIT_USAGE,
    errno.ENAMETOOLONG: EXIT_USAGE,
    errno.EACCES: EXIT_PERMISSION, errno.EPERM: EXIT_PERMISSION, errno.EROFS: EXIT_IN_USE,
}


def exchange(path: str, request: bytes) -> bytes:
    """Write one request to a .kvfs file and read its whole reply (from offset 0,
    wherever the write left the file position). OSError as the file gives it."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, request)
        chunks = []
        while chunk := os.pread(fd, 1 << 20, sum(map(len, chunks))):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def exit_for(err: int) -> int:
    return _EXIT_FOR_ERRNO.get(err, EXIT_INTERNAL)


class Remote:
    """A warehouse served by a running mount, reached through its control file."""

    def __init__(self, mountpoint: str):
        self.mountpoint = mountpoint
        self.path = os.path.join(mountpoint, CONTROL_DIR, CONTROL_FILE)

    def call(self, op: str, **args) -> dict:
        if op == "stats" and not args:
            # The same snapshot, from a file that anyone may read on any mount: the control
            # file cannot be opened for writing on a read-only mount.
            try:
                with open(os.path.join(self.mountpoint, CONTROL_DIR, STATS_FILE), "rb") as f:
                    return json.loads(f.read())
            except OSError as exc:
                raise QuietError(f"{self.mountpoint}: cannot read {STATS_FILE}: {exc.strerror}",
                                 exit_for(exc.errno)) from None
        try:
            raw = exchange(self.path, json.dumps({"op": op, **args}).encode())
        except OSError as exc:
            if exc.errno == errno.EROFS:  # refused at open, by the kernel
                raise QuietError(f"{self.mountpoint} is mounted read-only: {op!r} cannot run there",
                                 EXIT_IN_USE) from None
            if exc.errno in (errno.EACCES, errno.EPERM):  # refused at open
                raise QuietError(f"{self.mountpoint}: the control interface is for root and "
                                 "the warehouse owner", EXIT_PERMISSION) from None
            if exc.errno in (errno.ENOENT, errno.ENOTCONN):
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
        from .warehouse import Warehouse

        self.wh = Warehouse(warehouse, check_only=not write)

    def call(self, op: str, **args) -> dict:
        try:
            return run(self.wh, op, args)
        except KvfsError as exc:
            raise QuietError(str(exc), exit_for(exc.errno)) from None

    def close(self) -> None:
        self.wh.close()


def connect(target: str, write: bool = False):
    """A Remote for a kvfs mount point, or for a warehouse that a mount is serving; a
    Local for an unmounted warehouse (opened read-write only when `write`)."""
    from . import meta as M
    from .mount import find_mount, wait_unlocked
    from .layout import META_DIR

    if find_mount(target) is not None:
        return Remote(os.path.realpath(target))
    meta_dir = os.path.join(target, META_DIR)
    if not os.path.isdir(meta_dir):
        raise QuietError(f"{target} is neither a kvfs mount point nor a warehouse", EXIT_NO_WAREHOUSE)
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
    from .mount import kvfs_mounts

    parent, name = os.path.split(os.path.abspath(path))
    full = os.path.join(os.path.realpath(parent), name) if name else os.path.realpath(parent)
    best = None
    for mp in kvfs_mounts():
        if (full == mp or full.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) > len(best)):
            best = mp
    if best is None:
        raise QuietError(f"{path} is not inside a kvfs mount", EXIT_NOT_MOUNTED)
    return best, os.path.relpath(full, best) if full != best else ""
