"""The `kvfs` command: one entry point, one subcommand per module of kvfs.tools.

Builds the parser from each tool's add_parser(), rewrites the fstab form (mount.fuse3 runs
`kvfs WAREHOUSE MOUNTPOINT -o OPTS`), and leaves errors to kvfs.tools.command. No tool's
work is done here."""

import os
import sys

from kvfs import __version__

from . import (
    bench, command, du, find, fsck, gc, ls, mkfs, mount, pin, retire, stat, tune, umount, unpin,
)

TOOLS = (mkfs, mount, umount, fsck, stat, ls, find, du, pin, unpin, retire, gc, tune, bench)
SUBCOMMANDS = tuple(t.__name__.rpartition(".")[2] for t in TOOLS)


def build_parser():
    p, sub = command.parser(
        description="kvfs: a token warehouse for LLM KV caches, presented as a FUSE filesystem.",
        epilog="Each subcommand has a man page: man kvfs-SUBCOMMAND (see man/ in the source tree).",
    )
    p.add_argument("--version", action="version", version=f"kvfs {__version__}")
    for tool in TOOLS:
        tool.add_parser(sub)
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
    return command.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
