"""`kvfs unpin`: files are evicted and expire like any other again. Shares kvfs pin's
parser and setter (kvfs.tools.pin); owns nothing else."""

from . import command, pin


def add_parser(sub) -> None:
    pin.add_parser(sub, "unpin", run)


def run(args) -> int:
    return pin.set_pin(args, False)


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
