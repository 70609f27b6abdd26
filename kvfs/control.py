"""The control protocol of a running mount: its files, its requests and replies, and the
daemon's side of it. How a tool reaches a mount or an unmounted warehouse is
kvfs.tools.client's; this module imports neither kvfs.mount nor kvfs.tools.

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
    .kvfs/direct      mode 0444, only while the direct path is served: JSON naming its
                      socket, {"version", "socket", "pid", "block_size"} (kvfs.direct_server,
                      kvfs-direct(7)).

Requests and replies (`run` below is the one dispatcher, used in the daemon and, for an
unmounted warehouse, in the tool's own process: kvfs.tools.client.Local):

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

from .errors import Invalid, KvfsError, NotFound

CONTROL_DIR = ".kvfs"
CONTROL_FILE = "control"
STATS_FILE = "stats.json"
METRICS_FILE = "metrics"
LOOKUP_FILE = "lookup"
DIRECT_FILE = "direct"
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


# -- the client's side of the wire (kvfs.kv's batch lookup, kvfs.tools.client) -----------

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
