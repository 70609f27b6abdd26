"""`kvfs pin`: pin files so that eviction and expiry never take them (the xattr
user.kvfs.pin, set through the mount). Owns pin and unpin's shared parser and setter;
what a pin means is the warehouse's."""

import errno
import os

from kvfs.errors import QuietError, EXIT_OK, EXIT_PERMISSION, EXIT_USAGE

from . import client, command


def add_parser(sub, name: str = "pin", func=None) -> None:
    """kvfs pin, or (with its own `func`) kvfs unpin."""
    s = command.subparser(sub, name, func or run,
                          help=f"{name} files so that eviction and expiry {'never take' if name == 'pin' else 'may take'} them",
                          description=("Pin files: eviction and expiry never remove them. A pinned "
                                       "directory pins everything below it, now and what is created later."
                                       if name == "pin" else
                                       "Unpin files (and, for a directory, everything below it): they are "
                                       "evicted and expire like any other again."),
                          epilog=f"examples:\n  kvfs {name} /mnt/kvfs/system-prompts\n  kvfs {name} /mnt/kvfs/a.bin /mnt/kvfs/b.bin\n"
                                 f"same as:\n  setfattr -n user.kvfs.pin -v {1 if name == 'pin' else 0} PATH")
    s.add_argument("paths", nargs="+", metavar="PATH", help="files or directories on a kvfs mount")
    s.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")


def set_pin(args, pinned: bool) -> int:
    from kvfs.policy import PIN_XATTR

    for path in args.paths:
        try:
            client.locate(os.path.realpath(path))  # another filesystem would take the xattr as is
        except QuietError:
            raise client.not_on_a_mount(path) from None
        try:
            os.setxattr(path, PIN_XATTR, b"1" if pinned else b"0")
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise QuietError(f"{path}: {exc.strerror}", EXIT_PERMISSION) from None
            raise QuietError(f"{path}: {exc.strerror}", EXIT_USAGE) from None
        if not args.quiet:
            print(f"{'pinned' if pinned else 'unpinned'} {path}")
    return EXIT_OK


def run(args) -> int:
    return set_pin(args, True)


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
