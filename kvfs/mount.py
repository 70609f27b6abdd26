"""The daemon: `serve()` runs a mount until it is unmounted or signalled, and the helpers
it needs (options, logging, read-ahead, the shared tier's start).

`kvfs mount` (kvfs.tools.mount) starts `serve()` in a new session and waits on a pipe until
the daemon says the mount is serving, or why it is not. Besides kvfs.fs, this is the only
module that imports pyfuse3 and trio; the mount table and unmounting are kvfs.mounttab's.
"""

import logging
import logging.handlers
import os
import signal

from .errors import QuietError, EXIT_MOUNT_FAILED
from .mounttab import find_mount
from .layout import BACKUP_INTERVAL, LOG_FILE
from .warehouse import Warehouse

log = logging.getLogger("kvfs.mount")

CHECKPOINT_INTERVAL = 5.0  # seconds; bounds what a power cut can take (like ext4 commit=5)
HOUSEKEEPING_INTERVAL = 1.0  # seconds between looks for expired files and retired trees
READ_AHEAD_KB = 4096
# Mount options that belong to kvfs rather than to FUSE / the kernel.
KVFS_OPTIONS = {"compress", "durability", "metrics_port", "metrics_addr",
                "shared", "shared_endpoint", "shared_timeout", "shared_queue", "direct"}
M_ARENA_MAX = -8  # mallopt(3) parameter (glibc malloc.h)
MALLOC_ARENAS = 2


def setup_logging(warehouse: str, debug: bool, to_stderr: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Their debug output holds request headers (credentials) and bodies: never in the log.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    os.umask(0o077)  # the log (and its rotations) may name files: owner only
    path = os.path.join(warehouse, LOG_FILE)
    fh = logging.handlers.RotatingFileHandler(path, maxBytes=16 << 20, backupCount=3)
    os.chmod(path, 0o600)
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if to_stderr:
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        root.addHandler(sh)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """glibc gives every thread that allocates its own malloc arena (up to 8 per core).
    The daemon's worker threads pass block-sized buffers around, and memory freed in many
    arenas stays scattered over them: a 4-minute soak (scripts/soak.py) saw the daemon's
    RSS go from 240 to 370 MiB with its Python heap flat, and stay at 162 MiB with two
    arenas. Must run before the daemon starts threads; not glibc: nothing to do."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


def split_options(opts: list[str]) -> tuple[set[str], dict[str, str]]:
    """Split -o values into FUSE options and kvfs options (compress=, durability=)."""
    fuse, ours = set(), {}
    for group in opts:
        for opt in group.split(","):
            opt = opt.strip()
            if not opt or opt in ("rw", "defaults", "auto", "noauto", "user", "nouser", "_netdev", "nofail"):
                continue
            key, _, val = opt.partition("=")
            if key in KVFS_OPTIONS:
                ours[key] = val
            elif key.startswith("x-"):
                continue  # fstab/systemd annotations
            else:
                fuse.add(opt)
    return fuse, ours


def raise_read_ahead(mountpoint: str) -> None:
    """Buffered reads arrive 128 KiB at a time unless the mount's bdi read-ahead is raised."""
    # No stat() of the mount point here: the daemon is not serving yet, it would deadlock.
    info = find_mount(mountpoint, resolve=False)
    if info is None:
        log.info("mount point %s not found in mountinfo; read_ahead_kb unchanged", mountpoint)
        return
    try:
        path = f"/sys/class/bdi/{info['dev']}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.info("could not raise read_ahead_kb (%s); reads stay at the kernel default", exc)


def serve(warehouse: str, mountpoint: str, fuse_opts: set[str], kvfs_opts: dict[str, str],
          ready_fd: int | None = None) -> int:
    """Run the daemon in this process until unmounted or signalled."""
    import pyfuse3
    import trio

    from .fs import Operations

    def tell(msg: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            try:
                os.write(ready_fd, msg.encode() + b"\n")
            finally:
                os.close(ready_fd)
                ready_fd = None

    limit_malloc_arenas()
    readonly = "ro" in fuse_opts
    try:
        wh = Warehouse(warehouse, readonly=readonly, mountpoint=mountpoint,
                       compression=kvfs_opts.get("compress") or None,
                       durability=kvfs_opts.get("durability") or "fsync")
    except QuietError as exc:
        tell(f"error {exc.exitcode} {exc}")
        raise
    tier = None
    if kvfs_opts.get("shared"):
        try:
            tier = start_shared(wh, kvfs_opts)
        except QuietError as exc:
            wh.close()
            tell(f"error {exc.exitcode} {exc}")
            raise
    from . import metrics

    registry = metrics.registry_for(wh)
    ops = Operations(wh, registry)
    metrics_server = None
    if kvfs_opts.get("metrics_port"):
        addr = kvfs_opts.get("metrics_addr") or "127.0.0.1"
        try:
            metrics_server = metrics.serve(registry, int(kvfs_opts["metrics_port"]), addr)
        except OSError as exc:
            if tier is not None:
                tier.stop()
            wh.close()
            msg = f"cannot serve metrics on {addr}:{kvfs_opts['metrics_port']}: {exc.strerror}"
            tell(f"error {EXIT_MOUNT_FAILED} {msg}")
            raise QuietError(msg, EXIT_MOUNT_FAILED) from None
        log.info("serving Prometheus metrics on http://%s:%s/metrics", addr, kvfs_opts["metrics_port"])
    fsname = wh.path.replace("\\", "\\\\").replace(",", "\\,")  # libfuse option syntax
    options = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=kvfs"} | fuse_opts
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as exc:
        if tier is not None:
            tier.stop()
        wh.close()
        msg = f"cannot mount on {mountpoint}: {exc}"
        tell(f"error {EXIT_MOUNT_FAILED} {msg}")
        raise QuietError(msg, EXIT_MOUNT_FAILED) from None
    direct = None
    if (kvfs_opts.get("direct") or "on") != "off":
        from .direct_server import DirectServer

        try:
            direct = DirectServer(wh, only_uid=None if "allow_other" in fuse_opts else os.geteuid())
            direct.start()
            ops.direct_info = direct.describe()
        except OSError as exc:  # the mount serves on; clients use file I/O
            log.warning("direct path not served: %s", exc)
            direct = None
    if wh.recovery is not None:
        log.warning("warehouse was not cleanly unmounted; recovery ran: %s", wh.recovery)
    log.info("serving %s on %s (pid %d, options %s)", wh.path, mountpoint, os.getpid(), sorted(options))

    async def checkpoints():
        # A failing checkpoint (a device returning EIO to fdatasync, say) is logged and
        # retried; it must not take the whole mount down with it. A metadata backup is
        # taken right after a checkpoint every BACKUP_INTERVAL (and at once if there is
        # none): what it copies is then durable on the devices too.
        last_backup = None
        failing = None  # (message, when logged): a failing device is logged once a minute
        while True:
            await trio.sleep(CHECKPOINT_INTERVAL)
            try:
                await trio.to_thread.run_sync(wh.checkpoint)
            except Exception as exc:
                if failing is None or failing[0] != str(exc) or trio.current_time() - failing[1] > 60:
                    log.exception("checkpoint failed; retrying every %.0f s", CHECKPOINT_INTERVAL)
                    failing = (str(exc), trio.current_time())
                continue
            failing = None
            if wh.readonly or (last_backup is not None and trio.current_time() - last_backup < BACKUP_INTERVAL):
                continue
            try:
                await trio.to_thread.run_sync(wh.backup_meta, last_backup is None)
            except Exception:
                log.exception("metadata backup failed; retrying at the next interval")
            last_backup = trio.current_time()

    async def evictor():
        # Keeps use under the high watermark ahead of the writers, which evict inline only
        # when they find no room at all. Woken by the warehouse when use passes the high
        # watermark, and once a second anyway (a tune, a mount of a full warehouse).
        while True:
            await trio.to_thread.run_sync(wh.pressure.wait, 1.0, abandon_on_cancel=True)
            wh.pressure.clear()
            if not wh.over_high_watermark():
                continue
            try:
                files, _ = await trio.to_thread.run_sync(wh.evict_to_low_watermark)
            except Exception:
                log.exception("eviction failed; retrying")
                files = 0
            if not files:  # everything left is pinned or open: wait for that to change
                await trio.sleep(0.5)

    async def housekeeper():
        while True:
            try:
                await trio.to_thread.run_sync(wh.expire)
                while await trio.to_thread.run_sync(wh.reap):
                    pass
            except Exception:
                log.exception("housekeeping (expiry, retire) failed; retrying")
            await trio.sleep(HOUSEKEEPING_INTERVAL)

    async def signals():
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as it:
            async for sig in it:
                log.info("signal %d: unmounting", sig)
                pyfuse3.terminate()
                return

    async def after_init():
        # FUSE's INIT reply lowers the bdi read-ahead to what the daemon negotiated, so it
        # is raised once INIT is done: the first stat() is answered only after it.
        try:
            await trio.to_thread.run_sync(os.stat, mountpoint)
        except OSError as exc:
            log.warning("stat of %s failed (%s); read-ahead left as it is", mountpoint, exc)
            return
        raise_read_ahead(mountpoint)

    async def main():
        if tier is not None:
            tier.start()  # the uploader thread; lookups reach the tier through kvfs.fs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(checkpoints)
            if not wh.readonly:
                nursery.start_soon(evictor)
                nursery.start_soon(housekeeper)
            nursery.start_soon(after_init)
            nursery.start_soon(signals)
            recovered = ""
            if wh.recovery is not None:
                r = wh.recovery
                recovered = (f" recovered {r['incomplete_files']} incomplete files, "
                             f"{r['orphans']} orphans, {r['unreferenced_blocks']} blocks")
            tell("ready" + recovered)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    unmounted = False
    try:
        trio.run(main)
        unmounted = True
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        if direct is not None:
            direct.stop()
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            log.exception("pyfuse3.close failed")
        if tier is not None:
            tier.stop()  # what is still queued is uploaded after the next mount
        wh.close()
        log.info("warehouse %s closed cleanly%s", wh.path, "" if unmounted else " after an error")
    return 0


def start_shared(wh, kvfs_opts: dict[str, str]):
    """The shared tier of `wh` from the shared* options (kvfs.shared), not yet started."""
    from .errors import EXIT_USAGE

    if wh.readonly:
        raise QuietError("a shared tier needs a read-write mount", EXIT_USAGE)
    try:
        from .shared import SharedTier
    except ImportError as exc:
        raise QuietError(f"the shared tier needs boto3 ({exc})", EXIT_MOUNT_FAILED) from None
    try:
        timeout = float(kvfs_opts.get("shared_timeout") or 0) or None
        queue = int(kvfs_opts.get("shared_queue") or 0) or None
        kw = {"timeout": timeout} if timeout else {}
        return SharedTier(wh, kvfs_opts["shared"], endpoint=kvfs_opts.get("shared_endpoint") or None,
                          queue_limit=queue, **kw)
    except ValueError as exc:
        raise QuietError(str(exc), EXIT_USAGE) from None
    except Exception as exc:  # botocore's configuration errors (a profile that does not exist, ...)
        raise QuietError(f"the shared tier cannot be set up: {exc}", EXIT_USAGE) from None
