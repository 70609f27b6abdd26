"""`kvfs umount`: unmount and wait until the warehouse is clean. Owns the command and its
messages; the unmount itself is kvfs.mounttab's."""


from kvfs.errors import EXIT_OK

from . import command


def add_parser(sub) -> None:
    s = command.subparser(sub, "umount", run, help="unmount and wait until the warehouse is clean",
                          description="Unmount a kvfs mount point: the daemon commits open files, marks "
                                      "the warehouse clean and exits; umount returns after that.",
                          epilog="example:\n  kvfs umount /mnt/kvfs")
    s.add_argument("mountpoint")
    s.add_argument("--lazy", "-z", action="store_true", help="detach now even if busy (like umount -l)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the daemon (default 120)")
    s.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")


def run(args) -> int:
    from kvfs.mounttab import unmount

    source, was_running = unmount(args.mountpoint, lazy=args.lazy, timeout=args.timeout)
    if not args.quiet:
        if was_running:
            print(f"kvfs: unmounted {args.mountpoint}; {source} is clean")
        else:
            print(f"kvfs: detached {args.mountpoint}; its daemon was not running, so {source} "
                  "was not closed cleanly: the next mount recovers it")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
