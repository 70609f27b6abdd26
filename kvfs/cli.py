"""The `kvfs` command: one entry point, one subcommand per tool.

Every subcommand is a function taking parsed arguments and returning an exit code; `main()`
turns QuietError into one line on stderr and its exit code (see kvfs.errors and man/).
"""

import argparse
import errno
import json
import logging
import os
import sys

from . import __version__, units
from .errors import (
    QuietError, EXIT_INTERNAL, EXIT_MOUNT_FAILED, EXIT_NO_WAREHOUSE, EXIT_NOT_MOUNTED, EXIT_OK,
    EXIT_PERMISSION, EXIT_USAGE,
)

SUBCOMMANDS = ("mkfs", "mount", "umount", "fsck", "stat", "ls", "find", "du", "pin", "unpin",
               "retire", "gc", "tune", "bench")
# Exit code for an OSError on a path the user named, per subcommand.
_OS_ERROR_EXIT = {"mkfs": 9, "mount": 6, "umount": 6, "fsck": 3, "gc": 3, "tune": 3, "stat": 3}

def parse_size(text: str) -> int:
    """'200G', '512MiB', '4096' -> bytes (binary units), for argparse."""
    try:
        value = units.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def parse_fraction(text: str) -> float:
    """'90%', '90' or '0.9' -> 0.9 (a share of the warehouse's capacity)."""
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid share {text!r} (examples: 90%, 0.9)") from None
    if text.strip().endswith("%") or value > 1:
        value /= 100
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a share must be above 0% and at most 100%: {text!r}")
    return value


def parse_device(text: str) -> tuple[str, int | None]:
    path, sep, size = text.rpartition(":")
    if sep and path and not size.startswith("/"):
        return path, parse_size(size)
    return text, None


human = units.human


def cmd_mkfs(args) -> int:
    from .warehouse import Warehouse

    sb = Warehouse.mkfs(args.warehouse, devices=args.device or None, size=args.size,
                        block_size=args.block_size, compression=args.compress, force=args.force,
                        high_watermark=args.high_watermark, low_watermark=args.low_watermark)
    if args.json:
        print(json.dumps(sb, indent=2))
    else:
        total = sum(d["size"] for d in sb["devices"])
        print(f"created warehouse {os.path.abspath(args.warehouse)} (uuid {sb['uuid']})")
        print(f"  block size {human(sb['block_size'])}, compression {sb['compression']}, "
              f"{len(sb['devices'])} device(s), {human(total)} in all")
        print(f"  eviction above {sb['high_watermark']:.0%} of capacity, down to {sb['low_watermark']:.0%}")
        for i, d in enumerate(sb["devices"]):
            print(f"  device {i}: {d['path']} ({human(d['size'])})")
    return EXIT_OK


def cmd_mount(args) -> int:
    from . import mount as m

    warehouse = os.path.abspath(args.warehouse)
    # Resolve symlinks now: the kernel records (and mountinfo shows) the real path.
    mountpoint = os.path.realpath(args.mountpoint)
    fuse_opts, kvfs_opts = m.split_options(args.o or [])
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
    if not os.path.isdir(os.path.join(warehouse, "meta")):
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
        m.setup_logging(warehouse, args.debug, to_stderr=not args.quiet)
        return m.serve(warehouse, mountpoint, fuse_opts, kvfs_opts, ready_fd=args.ready_fd)
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
    note = m.start_daemon(argv, warehouse)
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


def cmd_umount(args) -> int:
    from .mount import unmount

    source, was_running = unmount(args.mountpoint, lazy=args.lazy, timeout=args.timeout)
    if not args.quiet:
        if was_running:
            print(f"kvfs: unmounted {args.mountpoint}; {source} is clean")
        else:
            print(f"kvfs: detached {args.mountpoint}; its daemon was not running, so {source} "
                  "was not closed cleanly: the next mount recovers it")
    return EXIT_OK


def cmd_fsck(args) -> int:
    from .fsck import run_fsck

    return run_fsck(args)


def cmd_stat(args) -> int:
    from .control import connect

    target = connect(args.target)
    try:
        st = target.call("stats")
    finally:
        target.close()
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    c = st["counters"]
    cap = st["capacity"] or 1
    where = f"mounted on {st['mountpoint']}" if st["mountpoint"] else ("clean" if st["clean"] else "NOT clean: mount or fsck it")
    hit = f"{st['hit_rate']:.1%} hit rate" if st["hit_rate"] is not None else "no lookups yet"
    print(f"warehouse  {st['warehouse']} ({where})")
    print(f"capacity   {human(st['capacity'])}, used {human(st['used'])} ({st['used'] / cap:.1%}), "
          f"free {human(st['free'])}")
    print(f"eviction   above {st['high_watermark']:.0%}, down to {st['low_watermark']:.0%}; "
          f"{st['evictable_files']:,} files evictable, {st['expiring_files']:,} with a ttl")
    print(f"files      {st['files']:,} holding {human(st['file_bytes'])}; {st['blocks']:,} blocks of "
          f"{human(st['block_bytes'])} stored in {human(st['stored_bytes'])}")
    print(f"savings    dedup {st['dedup_ratio']:.2f}x, compression {st['compression_ratio']:.2f}x")
    print(f"lookups    {c.get('lookup_hit', 0):,} hits, {c.get('lookup_miss', 0):,} misses ({hit})")
    print(f"removed    evicted {c.get('evicted_files', 0):,} files ({human(c.get('evicted_bytes', 0))}), "
          f"expired {c.get('expired_files', 0):,} ({human(c.get('expired_bytes', 0))}), "
          f"retired {c.get('retired_files', 0):,} ({human(c.get('retired_bytes', 0))})")
    if c.get("corrupt_blocks") or st.get("quarantined_blocks"):
        print(f"DAMAGE     {c.get('corrupt_blocks', 0)} blocks failed verification, "
              f"{c.get('quarantined_files', 0)} files holding them dropped, "
              f"{st.get('quarantined_blocks', 0)} still quarantined, {c.get('healed_blocks', 0)} healed "
              "by new writes: see the log; kvfs fsck --verify-data --repair finds the rest")
    if c.get("device_errors"):
        print(f"ERRORS     {c['device_errors']} device reads, writes or syncs failed: see the log")
    sh = st.get("shared")
    if sh:
        where = sh["url"] or "none now (counters of earlier mounts)"
        state = f", {sh['state']}" + (f": {sh['last_error']}" if sh.get("last_error") else "") if sh["url"] else ""
        print(f"shared     {where}{state}; queue {sh['queue']:,} files"
              + (f" (at most {sh['queue_limit']:,} unpinned)" if sh.get("queue_limit") else "")
              + f", {sh.get('dropped_files', 0):,} dropped")
        print(f"           uploaded {sh.get('uploaded_files', 0):,} files, {sh.get('uploaded_blocks', 0):,} blocks "
              f"({human(sh.get('uploaded_bytes', 0))}; {sh.get('present_blocks', 0):,} were there already); "
              f"fetched {sh.get('fetched_files', 0):,} files, {sh.get('fetched_blocks', 0):,} blocks "
              f"({human(sh.get('fetched_bytes', 0))})")
        print(f"           lookups {sh.get('lookup_hits', 0):,} found, {sh.get('lookup_misses', 0):,} not; "
              f"{sh.get('failures', 0):,} failures, {sh.get('corrupt_blocks', 0):,} corrupt blocks refused, "
              f"{sh.get('superseded_files', 0):,} local versions superseded, {sh['remote_files']:,} files not fetched yet")
    for d in st["devices"]:
        print(f"device {d['index']}   {d['path']}: {human(d['size'] - d['free'])} of {human(d['size'])} used; "
              f"since mount {d['reads']:,} reads ({human(d['read_bytes'])}), "
              f"{d['writes']:,} writes ({human(d['write_bytes'])})")
    return EXIT_OK


def _when(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _print_entries(entries, as_json: bool, long: bool) -> int:
    n = 0
    if as_json:
        sys.stdout.write("[")
    for e in entries:
        if as_json:
            sys.stdout.write(("," if n else "") + "\n" + json.dumps(e.as_dict()))
        elif long:
            d = e.as_dict()
            flags = ("P" if d["pinned"] else "-") + ("T" if d["ttl"] else "-") + ("Q" if "quota" in d else "-")
            who = d.get("creator")
            creator = f"{who['process'] or '?'}[{who['pid']}] uid {who['uid']}" if who else "-"
            notes = " ".join(f"{k}={v}" for k, v in d["annotations"].items())
            print(f"{d['mode']} {flags} {human(d['size']):>10}  used {_when(d['last_use'])}  "
                  f"opens {d.get('opens', 0):>5}  {creator:<28} {d['path']}" + (f"  [{notes}]" if notes else ""))
        else:
            print(e.path)
        n += 1
    if as_json:
        sys.stdout.write("\n]\n")
    return n


def cmd_ls(args) -> int:
    from .catalog import open_target

    catalog, rel, base = open_target(args.path)
    try:
        with catalog.meta.begin() as txn:
            entries = catalog.entries(txn, rel, base, recursive=False)
            first = next(entries)
            _print_entries(entries if first.kind == "d" else [first], args.json, long=not args.json)
    finally:
        catalog.close()
    return EXIT_OK


def cmd_find(args) -> int:
    from .catalog import Filter, open_target

    notes = {}
    for a in args.annotation or []:
        key, sep, value = a.partition("=")
        notes[key] = value if sep else None
    if args.model:
        notes["model"] = args.model
    if args.tenant:
        notes["tenant"] = args.tenant
    f = Filter(kind=args.type, name=args.name, min_size=args.min_size, max_size=args.max_size,
               unused_for=args.unused_for, used_within=args.used_within, older_than=args.older_than,
               newer_than=args.newer_than, pinned=args.pinned, uid=args.uid, creator=args.creator,
               annotations=notes)
    catalog, rel, base = open_target(args.path)
    try:
        with catalog.meta.begin() as txn:
            _print_entries((e for e in catalog.entries(txn, rel, base, recursive=True) if f(e)),
                           args.json, long=args.long)
    finally:
        catalog.close()
    return EXIT_OK


def cmd_du(args) -> int:
    from .catalog import du, open_target

    catalog, rel, base = open_target(args.path)
    try:
        with catalog.meta.begin() as txn:
            if catalog.resolve(txn, rel).mode & 0o170000 != 0o040000:
                raise QuietError(f"{args.path} is not a directory", EXIT_USAGE)
            rows = du(catalog, txn, rel, base)
    finally:
        catalog.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{human(r['bytes']):>10}  {r['files']:>9,} files  {r['path']}")
    return EXIT_OK


def _age(text: str) -> float:
    try:
        return units.parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def _set_pin(args, pinned: bool) -> int:
    from .control import locate
    from .policy import PIN_XATTR

    for path in args.paths:
        try:
            locate(os.path.realpath(path))  # another filesystem would take the xattr as is
        except QuietError:
            raise QuietError(f"{path}: not on a kvfs mount", EXIT_NOT_MOUNTED) from None
        try:
            os.setxattr(path, PIN_XATTR, b"1" if pinned else b"0")
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise QuietError(f"{path}: {exc.strerror}", EXIT_PERMISSION) from None
            raise QuietError(f"{path}: {exc.strerror}", EXIT_USAGE) from None
        if not args.quiet:
            print(f"{'pinned' if pinned else 'unpinned'} {path}")
    return EXIT_OK


def cmd_pin(args) -> int:
    return _set_pin(args, True)


def cmd_unpin(args) -> int:
    return _set_pin(args, False)


def cmd_retire(args) -> int:
    from .control import Remote, locate

    results = []
    for path in args.paths:
        mountpoint, rel = locate(path)
        if not rel:
            raise QuietError(f"{path} is the mount's root; retire the directories in it", EXIT_USAGE)
        r = Remote(mountpoint).call("retire", path=rel, **({"shared": True} if args.shared else {}))
        results.append({"path": path, **r})
        if not args.json:
            shared = f"; {r['shared_manifests']} manifests deleted from the shared tier" if args.shared else ""
            print(f"retired {path}: {r['files']} files, {human(r['bytes'])} in {r['seconds']:.1f} s{shared}")
    if args.json:
        print(json.dumps(results, indent=2))
    return EXIT_OK


def cmd_gc(args) -> int:
    from .control import Remote, connect

    target = connect(args.target, write=args.delete)
    # Unmounted, nothing is open and nothing is being written: no inode is young.
    grace = args.grace if isinstance(target, Remote) else 0.0
    try:
        r = target.call("gc", delete=args.delete, grace=grace)
    finally:
        target.close()
    if args.json:
        print(json.dumps(r, indent=2))
        return EXIT_OK
    for p in r["problems"]:
        print(f"  {p}")
    if not r["problems"]:
        print("kvfs gc: nothing to collect" + (f" ({r['young']} younger than the grace period left alone)" if r["young"] else ""))
    elif r["deleted"]:
        print(f"kvfs gc: {len(r['problems'])} found, {human(r['reclaimed_bytes'])} reclaimed"
              + (f"; {r['changed_meanwhile']} changed while gc ran: run it again" if r["changed_meanwhile"] else ""))
    else:
        print(f"kvfs gc: {len(r['problems'])} found ({human(r['leaked_bytes'])} of leaked space); "
              "run again with --delete to reclaim")
    return EXIT_OK


def cmd_tune(args) -> int:
    from .control import connect

    change = args.high_watermark is not None or args.low_watermark is not None
    target = connect(args.target, write=change)
    try:
        r = target.call("tune", high_watermark=args.high_watermark, low_watermark=args.low_watermark)
    finally:
        target.close()
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"high watermark {r['high_watermark']:.1%}, low watermark {r['low_watermark']:.1%}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvfs",
        description="kvfs: a token warehouse for LLM KV caches, presented as a FUSE filesystem.",
        epilog="Each subcommand has a man page: man kvfs-SUBCOMMAND (see man/ in the source tree).",
    )
    p.add_argument("--version", action="version", version=f"kvfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("mkfs", help="create a warehouse",
                       description="Create a warehouse: LMDB metadata plus one or more data devices.",
                       epilog="examples:\n  kvfs mkfs /var/lib/kvfs/w1\n"
                              "  kvfs mkfs /var/lib/kvfs/w1 --device /dev/nvme1n1 --device /dev/nvme2n1\n"
                              "  kvfs mkfs /var/lib/kvfs/w1 --device /data/a.img:200G --block-size 256K",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("warehouse", help="warehouse directory (created if missing)")
    s.add_argument("--device", action="append", type=parse_device, metavar="PATH[:SIZE]",
                   help="block device or file (a file is created and preallocated at SIZE); repeat to stripe")
    s.add_argument("--size", type=parse_size, metavar="SIZE",
                   help="size of the default device WAREHOUSE/data0.img when no --device is given "
                        "(default: 4G, at most half the free space)")
    s.add_argument("--block-size", type=parse_size, default=1 << 20, metavar="SIZE",
                   help="logical block size, a power of two from 4K to 16M (default 1M)")
    s.add_argument("--compress", choices=("none", "zstd"), default="none",
                   help="default codec for new blocks (default none)")
    s.add_argument("--force", action="store_true", help="replace an existing warehouse / reuse device files")
    s.add_argument("--high-watermark", type=parse_fraction, default=0.9, metavar="SHARE",
                   help="evict least recently used files when use passes this share of capacity (default 90%%)")
    s.add_argument("--low-watermark", type=parse_fraction, default=0.8, metavar="SHARE",
                   help="... until use is under this share (default 80%%)")
    s.add_argument("--json", action="store_true", help="print the superblock as JSON")
    s.set_defaults(func=cmd_mkfs)

    s = sub.add_parser("mount", help="mount a warehouse",
                       description="Mount a warehouse. Returns once the mount serves requests "
                                   "(the daemon logs to WAREHOUSE/kvfs.log), or stays in front with --foreground.",
                       epilog="examples:\n  kvfs mount /var/lib/kvfs/w1 /mnt/kvfs\n"
                              "  kvfs mount /var/lib/kvfs/w1 /mnt/kvfs -o allow_other,ro\n"
                              "fstab:\n  /var/lib/kvfs/w1  /mnt/kvfs  fuse.kvfs  allow_other,_netdev  0 0",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
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
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("umount", help="unmount and wait until the warehouse is clean",
                       description="Unmount a kvfs mount point: the daemon commits open files, marks "
                                   "the warehouse clean and exits; umount returns after that.",
                       epilog="example:\n  kvfs umount /mnt/kvfs",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("mountpoint")
    s.add_argument("--lazy", "-z", action="store_true", help="detach now even if busy (like umount -l)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the daemon (default 120)")
    s.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("fsck", help="check a warehouse that is not mounted",
                       description="Check the metadata of an unmounted warehouse against its invariants: "
                                   "reference counts, extent overlaps, leaked space, dangling entries.",
                       epilog="examples:\n  kvfs fsck /var/lib/kvfs/w1\n  kvfs fsck /var/lib/kvfs/w1 --verify-data --json\n"
                              "  kvfs fsck /var/lib/kvfs/w1 --repair",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("warehouse")
    s.add_argument("--verify-data", action="store_true", help="also read every block and verify its hash")
    s.add_argument("--repair", action="store_true",
                   help="fix what was found: recompute reference counts, reclaim leaked space, "
                        "drop dangling entries (never touches intact data)")
    s.add_argument("--json", action="store_true", help="print a machine-readable report")
    s.set_defaults(func=cmd_fsck)

    s = sub.add_parser("stat", help="show what a warehouse holds and how it is doing",
                       description="Capacity, use, watermarks, files and blocks, deduplication and "
                                   "compression ratios, hit rate, evictions, expiries, retirements and "
                                   "per-device use and I/O of a warehouse, mounted or not.",
                       epilog="examples:\n  kvfs stat /mnt/kvfs\n  kvfs stat /var/lib/kvfs/w1 --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("target", metavar="MOUNTPOINT|WAREHOUSE")
    s.add_argument("--json", action="store_true", help="print everything as JSON")
    s.set_defaults(func=cmd_stat)

    s = sub.add_parser("ls", help="list a directory from the catalog, with lineage",
                       description="List a directory (or show a file) of a warehouse from its metadata: "
                                   "mode, flags (P pinned, T ttl, Q quota), size, last use, opens, the "
                                   "process that created it, annotations. Mounted or not; no walk of the mount.",
                       epilog="examples:\n  kvfs ls /mnt/kvfs/vllm\n  kvfs ls /var/lib/kvfs/w1 --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("path", metavar="PATH|WAREHOUSE", help="a path inside a kvfs mount, or a warehouse directory")
    s.add_argument("--json", action="store_true", help="print a JSON list of entries")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("find", help="search the catalog by size, age, use, pin, creator, annotation",
                       description="Walk a directory tree of a warehouse in its metadata and print the "
                                   "entries that pass every test given. Annotations are the attributes "
                                   "user.kvfs.KEY of an entry or of a directory above it.",
                       epilog="examples:\n  kvfs find /mnt/kvfs --model llama-3-8b --unused-for 7d\n"
                              "  kvfs find /mnt/kvfs/vllm --type f --min-size 1G --long\n"
                              "  kvfs find /var/lib/kvfs/w1 --creator 'python*' --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("path", metavar="PATH|WAREHOUSE", help="a path inside a kvfs mount, or a warehouse directory")
    s.add_argument("--type", choices=("f", "d", "l"), help="regular files, directories or symbolic links")
    s.add_argument("--name", metavar="GLOB", help="the last path component matches GLOB")
    s.add_argument("--min-size", type=parse_size, metavar="SIZE")
    s.add_argument("--max-size", type=parse_size, metavar="SIZE")
    s.add_argument("--unused-for", type=_age, metavar="AGE", help="last used at least AGE ago (90s, 15m, 2h, 7d)")
    s.add_argument("--used-within", type=_age, metavar="AGE", help="last used less than AGE ago")
    s.add_argument("--older-than", type=_age, metavar="AGE", help="created at least AGE ago")
    s.add_argument("--newer-than", type=_age, metavar="AGE", help="created less than AGE ago")
    s.add_argument("--pinned", action="store_const", const=True, help="pinned entries only")
    s.add_argument("--unpinned", dest="pinned", action="store_const", const=False, help="unpinned entries only")
    s.add_argument("--uid", type=int, help="created by this user id")
    s.add_argument("--creator", metavar="GLOB", help="created by a process whose name matches GLOB")
    s.add_argument("--model", help="annotated user.kvfs.model=MODEL")
    s.add_argument("--tenant", help="annotated user.kvfs.tenant=TENANT")
    s.add_argument("--annotation", action="append", metavar="KEY[=VALUE]",
                   help="annotated user.kvfs.KEY (=VALUE); repeat for several")
    s.add_argument("--long", "-l", action="store_true", help="print entries as kvfs ls does")
    s.add_argument("--json", action="store_true", help="print a JSON list of entries")
    s.set_defaults(func=cmd_find)

    s = sub.add_parser("du", help="space per directory, from the catalog",
                       description="Files and bytes (file sizes) below each entry of a directory, largest "
                                   "first, and in all. Mounted or not; no walk of the mount.",
                       epilog="examples:\n  kvfs du /mnt/kvfs/vllm\n  kvfs du /var/lib/kvfs/w1 --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("path", metavar="PATH|WAREHOUSE", help="a directory inside a kvfs mount, or a warehouse directory")
    s.add_argument("--json", action="store_true", help="print a JSON list of rows")
    s.set_defaults(func=cmd_du)

    for name, func, verb in (("pin", cmd_pin, "pin"), ("unpin", cmd_unpin, "unpin")):
        s = sub.add_parser(name, help=f"{verb} files so that eviction and expiry {'never take' if verb == 'pin' else 'may take'} them",
                           description=("Pin files: eviction and expiry never remove them. A pinned "
                                        "directory pins everything below it, now and what is created later."
                                        if verb == "pin" else
                                        "Unpin files (and, for a directory, everything below it): they are "
                                        "evicted and expire like any other again."),
                           epilog=f"examples:\n  kvfs {name} /mnt/kvfs/system-prompts\n  kvfs {name} /mnt/kvfs/a.bin /mnt/kvfs/b.bin\n"
                                  f"same as:\n  setfattr -n user.kvfs.pin -v {1 if verb == 'pin' else 0} PATH",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("paths", nargs="+", metavar="PATH", help="files or directories on a kvfs mount")
        s.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
        s.set_defaults(func=func)

    s = sub.add_parser("retire", help="drop a whole subtree at once (one model's KV, say)",
                       description="Remove a file or a directory tree from a running mount: the name "
                                   "disappears at once, the tree is deleted in short batches that do not "
                                   "stall other clients, pinned files included. Open files keep their data "
                                   "until closed. Returns when everything is deleted.",
                       epilog="example:\n  kvfs retire /mnt/kvfs/vllm/llama-3-8b_0123456789ab",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("paths", nargs="+", metavar="PATH", help="files or directories on a kvfs mount")
    s.add_argument("--shared", action="store_true",
                   help="also delete their manifests from the mount's shared tier (every node then "
                        "stops finding them there; blocks are left to the store's lifecycle rules)")
    s.add_argument("--json", action="store_true", help="print what was retired as JSON")
    s.set_defaults(func=cmd_retire)

    s = sub.add_parser("gc", help="find (and reclaim) space that nothing uses",
                       description="Find leaked extents, block records that no file references, "
                                   "unlinked inodes that nobody has open and files created and never "
                                   "finished. Reports only, unless --delete. Works on a running mount "
                                   "(through its control file) and on an unmounted warehouse.",
                       epilog="examples:\n  kvfs gc /mnt/kvfs\n  kvfs gc /var/lib/kvfs/w1 --delete --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("target", metavar="MOUNTPOINT|WAREHOUSE")
    s.add_argument("--delete", action="store_true", help="reclaim what was found")
    s.add_argument("--grace", type=float, default=300.0, metavar="SECONDS",
                   help="leave unlinked or unfinished inodes younger than this alone (default 300)")
    s.add_argument("--json", action="store_true", help="print a machine-readable report")
    s.set_defaults(func=cmd_gc)

    s = sub.add_parser("tune", help="show or change the eviction watermarks",
                       description="Show or change the watermarks of a warehouse, mounted (takes effect "
                                   "at once) or not. Above the high watermark kvfs evicts the least "
                                   "recently used unpinned files until use is under the low one.",
                       epilog="examples:\n  kvfs tune /mnt/kvfs\n  kvfs tune /mnt/kvfs --high-watermark 85% --low-watermark 70%",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("target", metavar="MOUNTPOINT|WAREHOUSE")
    s.add_argument("--high-watermark", type=parse_fraction, metavar="SHARE")
    s.add_argument("--low-watermark", type=parse_fraction, metavar="SHARE")
    s.add_argument("--json", action="store_true", help="print the watermarks as JSON")
    s.set_defaults(func=cmd_tune)

    from .bench import SCALES, WORKLOADS

    s = sub.add_parser("bench", help="measure kvfs against the raw disk, same run, as ratios",
                       description="Run each workload (sequential files, client O_DIRECT, the vLLM "
                                   "filesystem-tier pattern, metadata in a big directory, parallel "
                                   "readers, space savings) on a kvfs mount and on a plain directory of "
                                   "the same disk, alternating, and print the medians with kvfs/raw.",
                       epilog="examples:\n  kvfs bench\n  kvfs bench --scale full --json > bench.json\n"
                              "  kvfs bench --mount /mnt/kvfs --raw /data/raw --only seq --only vllm",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--scale", choices=sorted(SCALES), default="standard",
                   help="quick (seconds), standard (default, a few minutes), full (1,000,000 entries)")
    s.add_argument("--only", action="append", choices=WORKLOADS, metavar="WORKLOAD",
                   help=f"run only this workload ({', '.join(WORKLOADS)}); repeat for several")
    s.add_argument("--dir", default="/var/tmp", help="where to make the temporary warehouse and raw "
                   "directory (default /var/tmp): the disk under test")
    s.add_argument("--mount", metavar="MOUNTPOINT", help="use this kvfs mount instead of a temporary one")
    s.add_argument("--raw", metavar="DIR", help="with --mount: a plain directory on the same disk")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument("--markdown", action="store_true", help="print a whole BENCHMARKS.md document")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    # mount.fuse3 (fstab type fuse.kvfs) runs "kvfs WAREHOUSE MOUNTPOINT -o OPTS": two
    # paths. Anything else that is not a subcommand is a typo for argparse to report.
    if (len(argv) >= 2 and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-")
            and ("/" in argv[0] or os.path.isdir(argv[0]))):
        argv.insert(0, "mount")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except QuietError as exc:
        print(f"kvfs {args.command}: {exc}", file=sys.stderr)
        return exc.exitcode
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # a path the user gave: one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"kvfs {args.command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return _OS_ERROR_EXIT.get(args.command, EXIT_INTERNAL)
    except Exception as exc:  # a bug: keep the traceback, in the log if there is one
        logging.getLogger("kvfs").exception("internal error")
        print(f"kvfs {args.command}: internal error: {exc!r}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

