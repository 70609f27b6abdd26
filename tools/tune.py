"""`kvfs tune`: show or change the eviction watermarks, mounted (at once) or not. Owns the
command; the watermarks are the warehouse's (control operation "tune")."""

import json

from kvfs.errors import EXIT_OK

from . import client, command
from .argtypes import parse_fraction


def add_parser(sub) -> None:
    s = command.subparser(sub, "tune", run, help="show or change the eviction watermarks",
                          description="Show or change the watermarks of a warehouse, mounted (takes effect "
                                      "at once) or not. Above the high watermark kvfs evicts the least "
                                      "recently used unpinned files until use is under the low one.",
                          epilog="examples:\n  kvfs tune /mnt/kvfs\n  kvfs tune /mnt/kvfs --high-watermark 85% --low-watermark 70%")
    s.add_argument("target", metavar="MOUNTPOINT|WAREHOUSE")
    s.add_argument("--high-watermark", type=parse_fraction, metavar="SHARE")
    s.add_argument("--low-watermark", type=parse_fraction, metavar="SHARE")
    s.add_argument("--json", action="store_true", help="print the watermarks as JSON")


def run(args) -> int:
    change = args.high_watermark is not None or args.low_watermark is not None
    target = client.connect(args.target, write=change)
    try:
        r = target.call("tune", high_watermark=args.high_watermark, low_watermark=args.low_watermark)
    finally:
        target.close()
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"high watermark {r['high_watermark']:.1%}, low watermark {r['low_watermark']:.1%}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
