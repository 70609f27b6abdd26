"""`kvfs mount`: check the options, then start the daemon (kvfs.mount.serve) in a new
session and wait until it serves, or serve in front with --foreground. Owns the command
and starting the daemon; the daemon's loop and the mount table are kvfs.mount's and
kvfs.mounttab's."""

import argparse
import os
import subprocess
import sys
import time

from kvfs.errors import QuietError, EXIT_MOUNT_FAILED, EXIT_NO_WAREHOUSE, EXIT_OK, EXIT_USAGE
from kvfs.layout import LOG_FILE, META_DIR

from . import command


def add_parser(sub) -> None:
    s = command.subparser(sub, "mount", run, help="mount a warehouse",
                          description="Mount a warehouse. Returns once the mount serves requests "
                                      "(the daemon logs to WAREHOUSE/kvfs.log), or stays in front with --foreground.",
                          epilog="examples:\n  kvfs mount /var/lib/kvfs/w1 /mnt/kvfs\n"
                                 "  kvfs mount /var/lib/kvfs/w1 /mnt/kvfs -o allow_other,ro\n"
                                 "fstab:\n  /var/lib/kvfs/w1  /mnt/kvfs  fuse.kvfs  allow_other,_netdev  0 0")
    s.add_argument("warehouse")
    s.add_argument("mountpoint")
    s.add_argument("-o", action="append", metavar="OPTIONS",
                   help="comma-separated mount options: FUSE/kernel ones (allow_other, ro, "
                        "default_permissions, ...) pass through; compress=zstd|none and "
                        "durability=fsync|close are kvfs's own")
    s.add_argument("--foreground", "-f", action="store_true", help="stay in front; log to stderr too")
    s.add_argument("--debug", "-d", action="store_true", help="log every operation")
    s.add_argument("--compress", choices=("none", "zstd"), help="codec for new blocks on this mount")
    s.add_argument("--durability", choices=("fsync", "close"),
                   help="fsync (default): data is durable at fsync and every 5 s; close: at every close")
    s.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on http://ADDR:PORT/metrics (also -o metrics_port=PORT)")
    s.add_argument("--metrics-addr", metavar="ADDR",
                   help="address for --metrics-port (default 127.0.0.1; also -o metrics_addr=ADDR)")
    s.add_argument("--shared", metavar="s3://BUCKET[/PREFIX]",
                   help="share files with every node mounted on this bucket and prefix: upload what is "
                        "published here, read through what is not here (also -o shared=URL); credentials "
                        "and region from the usual AWS variables and files")
    s.add_argument("--shared-endpoint", metavar="URL",
                   help="the S3 endpoint (MinIO, Ceph RGW, SeaweedFS, ...; default: AWS, or "
                        "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; also -o shared_endpoint=URL)")
    s.add_argument("--shared-timeout", type=float, metavar="SECONDS",
                   help="the longest one request to the store, or a lookup waiting for it, may take "
                        "(default 2; also -o shared_timeout=SECONDS)")
    s.add_argument("--shared-queue", type=int, metavar="FILES",
                   help="files waiting for upload beyond which unpinned ones are dropped (default "
                        "10000; pinned files are never dropped; also -o shared_queue=FILES)")
    s.add_argument("--quiet", "-q", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)


def run(args) -> int:
    from kvfs import mount as daemon, mounttab as m

    warehouse = os.path.abspath(args.warehouse)
    # Resolve symlinks now: the kernel records (and mountinfo shows) the real path.
    mountpoint = os.path.realpath(args.mountpoint)
    fuse_opts, kvfs_opts = daemon.split_options(args.o or [])
    if args.compress:
        kvfs_opts["compress"] = args.compress
    if args.durability:
        kvfs_opts["durability"] = args.durability
    if args.metrics_port is not None:
        kvfs_opts["metrics_port"] = str(args.metrics_port)
    if args.metrics_addr:
        kvfs_opts["metrics_addr"] = args.metrics_addr
    for key in ("shared", "shared_endpoint", "shared_timeout", "shared_queue"):
        if getattr(args, key) is not None:
            kvfs_opts[key] = str(getattr(args, key))
    _check_shared_options(kvfs_opts, fuse_opts)
    port = kvfs_opts.get("metrics_port")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise QuietError(f"metrics_port must be a port number, not {port!r}", EXIT_USAGE)
    if kvfs_opts.get("compress", "none") not in ("none", "zstd"):
        raise QuietError(f"compress must be 'none' or 'zstd', not {kvfs_opts['compress']!r}", EXIT_USAGE)
    if kvfs_opts.get("durability", "fsync") not in ("fsync", "close"):
        raise QuietError(f"durability must be 'fsync' or 'close', not {kvfs_opts['durability']!r}", EXIT_USAGE)
    if kvfs_opts.get("direct", "on") not in ("on", "off"):
        raise QuietError(f"direct must be 'on' or 'off', not {kvfs_opts['direct']!r}", EXIT_USAGE)
    if not os.path.isdir(os.path.join(warehouse, META_DIR)):
        raise QuietError(f"{warehouse} is not a kvfs warehouse (run kvfs mkfs first)", EXIT_NO_WAREHOUSE)
    existing = m.find_mount(mountpoint, resolve=False)
    if existing is not None and m.daemon_gone(existing["source"]):
        # A daemon that was killed leaves its mount behind ("Transport endpoint is not
        # connected"), and possibly clients waiting on it forever: abort and detach it.
        print(f"kvfs: {mountpoint}: stale mount of a dead daemon; detaching it", file=sys.stderr)
        m.detach_dead(existing)
    elif existing is not None:
        raise QuietError(f"{mountpoint} is already a kvfs mount point (of {existing['source']})", EXIT_MOUNT_FAILED)
    elif m.is_dead_mount(mountpoint):
        print(f"kvfs: {mountpoint}: stale FUSE mount; detaching it", file=sys.stderr)
        m.fusermount_unmount(mountpoint, lazy=True)
    if not os.path.isdir(mountpoint):
        raise QuietError(f"mount point {mountpoint} does not exist or is not a directory", EXIT_MOUNT_FAILED)
    if args.foreground:
        daemon.setup_logging(warehouse, args.debug, to_stderr=not args.quiet)
        return daemon.serve(warehouse, mountpoint, fuse_opts, kvfs_opts, ready_fd=args.ready_fd)
    argv = ["mount", warehouse, mountpoint]
    for opt in args.o or []:
        argv += ["-o", opt]
    if args.debug:
        argv.append("--debug")
    if args.compress:
        argv += ["--compress", args.compress]
    if args.durability:
        argv += ["--durability", args.durability]
    if args.metrics_port is not None:
        argv += ["--metrics-port", str(args.metrics_port)]
    if args.metrics_addr:
        argv += ["--metrics-addr", args.metrics_addr]
    for key in ("shared", "shared_endpoint", "shared_timeout", "shared_queue"):
        if getattr(args, key) is not None:
            argv += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    note = start_daemon(argv, warehouse)
    if not args.quiet:
        print(f"kvfs: mounted {warehouse} on {mountpoint}" + (f" ({note})" if note else ""))
    return EXIT_OK


def _check_shared_options(kvfs_opts: dict, fuse_opts: set) -> None:
    """The shared tier's options, checked before a daemon is started."""
    url = kvfs_opts.get("shared")
    given = [k for k in ("shared_endpoint", "shared_timeout", "shared_queue") if kvfs_opts.get(k)]
    if not url:
        if given:
            raise QuietError(f"{given[0]} needs a shared tier (--shared s3://BUCKET/PREFIX)", EXIT_USAGE)
        return
    if "ro" in fuse_opts:
        raise QuietError("a shared tier needs a read-write mount (not -o ro)", EXIT_USAGE)
    if not url.startswith("s3://") or len(url[5:].partition("/")[0]) < 3:
        raise QuietError(f"--shared takes s3://BUCKET[/PREFIX], not {url!r}", EXIT_USAGE)
    try:
        if float(kvfs_opts.get("shared_timeout") or 1) <= 0:
            raise ValueError
    except ValueError:
        raise QuietError(f"shared_timeout must be a positive number of seconds, not {kvfs_opts['shared_timeout']!r}", EXIT_USAGE) from None
    q = kvfs_opts.get("shared_queue")
    if q is not None and not (q.isdigit() and int(q) > 0):
        raise QuietError(f"shared_queue must be a positive number of files, not {q!r}", EXIT_USAGE)


def start_daemon(argv: list[str], warehouse: str, timeout: float = 60.0) -> str:
    """Start `kvfs mount --foreground ...` in a new session; return its ready message."""

    rfd, wfd = os.pipe()
    cmd = [sys.executable, "-m", "kvfs.tools", *argv, "--foreground", "--ready-fd", str(wfd), "--quiet"]
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


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
