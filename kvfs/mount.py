"""Mounting and unmounting: the daemon's main loop and the helpers around it.

`kvfs mount` starts this module's `serve()` in a new session (the daemon) and waits on a
pipe until the daemon says the mount is serving, or why it is not. Besides kvfs.fs, this is
the only module that imports pyfuse3 and trio.
"""

import errno
import logging
import logging.handlers
import os
import re
import signal
import subprocess
import sys
import time

from .errors import QuietError, EXIT_MOUNT_FAILED, EXIT_NOT_MOUNTED
from .layout import BACKUP_INTERVAL, LOCK_FILE, LOG_FILE, lock_holder
from .warehouse import Warehouse

log = logging.getLogger("kvfs.mount")

CHECKPOINT_INTERVAL = 5.0  # seconds; bounds what a power cut can take (like ext4 commit=5)
HOUSEKEEPING_INTERVAL = 1.0  # seconds between looks for expired files and retired trees
READ_AHEAD_KB = 4096
# Mount options that belong to kvfs rather than to FUSE / the kernel.
KVFS_OPTIONS = {"compress", "durability", "metrics_port", "metrics_addr",
                "shared", "shared_endpoint", "shared_timeout", "shared_queue"}
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


def start_daemon(argv: list[str], warehouse: str, timeout: float = 60.0) -> str:
    """Start `kvfs mount --foreground ...` in a new session; return its ready message."""
    rfd, wfd = os.pipe()
    cmd = [sys.executable, "-m", "kvfs.cli", *argv, "--foreground", "--ready-fd", str(wfd), "--quiet"]
    with open(os.devnull, "rb") as devnull, open(os.path.join(warehouse, LOG_FILE), "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=devnull, stdout=logf, stderr=logf, pass_fds=(wfd,),
                                start_new_session=True, close_fds=True)
    os.close(wfd)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        import select

        while time.monotonic() < deadline:
            r, _, _ = select.select([rfd], [], [], 0.2)
            if r:
                chunk = os.read(rfd, 4096)
                if not chunk:
                    break
                buf += chunk
                if buf.endswith(b"\n"):
                    break
            elif proc.poll() is not None:
                break
    finally:
        os.close(rfd)
    msg = buf.decode(errors="replace").strip()
    if msg.startswith("ready"):
        return msg[len("ready"):].strip()
    if msg.startswith("error "):
        _, code, text = msg.split(" ", 2)
        raise QuietError(text, int(code))
    if proc.poll() is None:
        proc.kill()
        raise QuietError(f"the daemon did not report ready in {timeout:.0f}s; see {warehouse}/{LOG_FILE}", EXIT_MOUNT_FAILED)
    raise QuietError(f"the daemon exited with status {proc.returncode}; see {warehouse}/{LOG_FILE}", EXIT_MOUNT_FAILED)


def _unescape(s: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _mount_entries() -> list[dict]:
    """Every kvfs mount in /proc/self/mountinfo, most recent last."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 6 or len(rfields) < 2 or rfields[0] != "fuse.kvfs":
            continue
        out.append({"mountpoint": _unescape(fields[4]), "source": _unescape(rfields[1]),
                    "options": fields[5], "dev": fields[2]})
    return out


def kvfs_mounts() -> list[str]:
    return [e["mountpoint"] for e in _mount_entries()]


def find_mount(mountpoint: str, resolve: bool = True) -> dict | None:
    """The /proc/self/mountinfo entry of a kvfs mount at `mountpoint`, if any."""
    target = os.path.abspath(mountpoint)
    if resolve:
        try:
            target = os.path.realpath(mountpoint)
        except OSError:
            pass
    for entry in reversed(_mount_entries()):
        if entry["mountpoint"] == target:
            return entry
    return None


FUSECTL = "/sys/fs/fuse/connections"


def daemon_gone(warehouse: str) -> bool:
    """True if no live daemon serves `warehouse`: nobody holds its lock, or the holder is a
    zombie. (A daemon killed while one of its threads waits in the kernel, e.g. to
    invalidate a name in a directory that a client request has locked, stays a zombie that
    holds its files, /dev/fuse and the lock included, until its connection is aborted.)"""
    if wait_unlocked(warehouse, 0):
        return True
    pid = daemon_pid(warehouse)
    return pid is not None and not pid_alive(pid)


def abort_connection(entry: dict) -> bool:
    """Abort the FUSE connection of a mount whose daemon is gone (root only; the fusectl
    filesystem is mounted if it is not). Every request waiting on it fails with ENOTCONN,
    so clients and the dead daemon's last threads are let go. False if it could not."""
    minor = entry["dev"].partition(":")[2]
    path = os.path.join(FUSECTL, minor, "abort")
    if not os.path.exists(path) and os.path.isdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError:
        return False
    logging.getLogger("kvfs").warning("aborted the FUSE connection of %s (its daemon is gone)", entry["mountpoint"])
    return True


def detach_dead(entry: dict, timeout: float = 10.0) -> None:
    """Let go of a mount whose daemon died: abort its connection, detach it lazily, and
    wait until the dead daemon's warehouse lock is free."""
    abort_connection(entry)
    fusermount_unmount(entry["mountpoint"], lazy=True)
    if not wait_unlocked(entry["source"], timeout):
        raise QuietError(f"{entry['source']} is still locked by the dead daemon of {entry['mountpoint']} "
                         f"(pid {daemon_pid(entry['source'])})", EXIT_MOUNT_FAILED)


def is_dead_mount(mountpoint: str) -> bool:
    try:
        os.stat(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def fusermount_unmount(mountpoint: str, lazy: bool = False) -> None:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        err = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
        raise QuietError(f"cannot unmount {mountpoint}: {err}", EXIT_MOUNT_FAILED)


def wait_unlocked(warehouse: str, timeout: float) -> bool:
    """Wait until no process holds the warehouse lock (the daemon has finished closing)."""
    import fcntl

    path = os.path.join(warehouse, LOCK_FILE)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def unmount(mountpoint: str, lazy: bool = False, timeout: float = 120.0) -> tuple[str, bool]:
    """Unmount; return (warehouse, whether a daemon was serving it)."""
    info = find_mount(mountpoint)
    if info is None:
        raise QuietError(f"{mountpoint} is not a kvfs mount point", EXIT_NOT_MOUNTED)
    was_running = not wait_unlocked(info["source"], 0)
    pid = daemon_pid(info["source"]) if was_running else None
    if pid is not None and not pid_alive(pid):
        detach_dead(info)  # a zombie daemon: nothing would ever answer the unmount
        return info["source"], False
    fusermount_unmount(info["mountpoint"], lazy)
    deadline = time.monotonic() + timeout
    done = wait_unlocked(info["source"], timeout)
    while done and pid is not None and pid_alive(pid):
        if time.monotonic() > deadline:
            done = False
            break
        time.sleep(0.02)
    if not done:
        raise QuietError(
            f"unmounted {mountpoint}, but the daemon has not finished closing {info['source']} "
            f"after {timeout:.0f}s", EXIT_MOUNT_FAILED)
    return info["source"], was_running


daemon_pid = lock_holder  # the daemon is the process that holds the warehouse lock


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
