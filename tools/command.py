"""How one command runs: parse, call, and turn what it raises into one line on stderr and
a documented exit code (kvfs.errors, man/). Shared by the dispatcher and each tool's main();
knows no subcommand's options or work."""

import argparse
import logging
import os
import re
import sys

from kvfs.errors import (
    QuietError, EXIT_DEVICE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_MOUNT_FAILED, EXIT_NO_WAREHOUSE, EXIT_PIPE,
    EXIT_USAGE,
)

# Exit code for an OSError on a path the user named, per subcommand.
OS_ERROR_EXIT = {"mkfs": EXIT_DEVICE, "mount": EXIT_MOUNT_FAILED, "umount": EXIT_MOUNT_FAILED,
                 "fsck": EXIT_NO_WAREHOUSE, "gc": EXIT_NO_WAREHOUSE, "tune": EXIT_NO_WAREHOUSE, "stat": EXIT_NO_WAREHOUSE}


def run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Parse `argv` (the subcommand first) and carry it out; the exit code."""
    try:
        code = _carry_out(parser, argv)
        sys.stdout.flush()  # here, not at exit: a reader that went away is seen below
        return code
    except BrokenPipeError:  # from what the command printed, or from that flush
        return reader_gone()


def _carry_out(parser: argparse.ArgumentParser, argv: list[str]) -> int:
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
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except OSError as exc:  # a path the user gave: one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"kvfs {args.command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return OS_ERROR_EXIT.get(args.command, EXIT_INTERNAL)
    except Exception as exc:  # a bug: keep the traceback, in the log if there is one
        logging.getLogger("kvfs").exception("internal error")
        print(f"kvfs {args.command}: internal error: {exc!r}", file=sys.stderr)
        return EXIT_INTERNAL


def reader_gone() -> int:
    """Standard output's reader went away (`kvfs find ... | head -1`): end as coreutils do
    in a pipeline, without a word, with the status a shell gives a command killed by SIGPIPE.
    Not by that signal itself: SIGPIPE stays ignored in a process that may be serving a
    mount (`kvfs mount --foreground`, the daemon kvfs mount starts). What is left in
    Python's buffer would fail again at exit: standard output is pointed at /dev/null, as
    the Python documentation recommends."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # a stdout without a descriptor (a test's capture)
        pass
    return EXIT_PIPE


class Parser(argparse.ArgumentParser):
    """argparse, except that a value that starts with a minus sign and a digit (`--size
    -5G`, `--grace -1`) is a value, not an unknown option: the option's type says what is
    wrong with it (as Python 3.13's argparse does for every such value)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._negative_number_matcher = re.compile(r"^-\.?\d")


def parser(prog: str = "kvfs", **kw) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """A `kvfs` parser and its (required) subcommand list, for add_parser()s to fill."""
    p = Parser(prog=prog, **kw)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    return p, sub


def main(add_parser, argv: list[str] | None) -> int:
    """One tool on its own: `argv` is what follows its name on the `kvfs` command line."""
    p, sub = parser()
    add_parser(sub)
    (name,) = sub.choices
    return run(p, [name, *(sys.argv[1:] if argv is None else argv)])


def subparser(sub, name: str, run, **kw) -> argparse.ArgumentParser:
    """The parser of subcommand `name`, carried out by `run(args)`; its description and
    examples (the epilog) are printed as written."""
    s = sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    s.set_defaults(func=run)
    return s
