"""`kvfs mkfs`: create a warehouse. Owns the command's options and its report; making the
warehouse is kvfs.warehouse's (Warehouse.mkfs), not this module's."""

import json
import os

from kvfs.errors import EXIT_OK
from kvfs.units import human, plural

from . import command
from .argtypes import parse_device, parse_fraction, parse_size


def add_parser(sub) -> None:
    s = command.subparser(sub, "mkfs", run, help="create a warehouse",
                          description="Create a warehouse: LMDB metadata plus one or more data devices.",
                          epilog="examples:\n  kvfs mkfs /var/lib/kvfs/w1\n"
                                 "  kvfs mkfs /var/lib/kvfs/w1 --device /dev/nvme1n1 --device /dev/nvme2n1\n"
                                 "  kvfs mkfs /var/lib/kvfs/w1 --device /data/a.img:200G --block-size 256K")
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


def run(args) -> int:
    from kvfs.warehouse import Warehouse

    sb = Warehouse.mkfs(args.warehouse, devices=args.device or None, size=args.size,
                        block_size=args.block_size, compression=args.compress, force=args.force,
                        high_watermark=args.high_watermark, low_watermark=args.low_watermark)
    if args.json:
        print(json.dumps(sb, indent=2))
    else:
        total = sum(d["size"] for d in sb["devices"])
        print(f"created warehouse {os.path.abspath(args.warehouse)} (uuid {sb['uuid']})")
        print(f"  block size {human(sb['block_size'])}, compression {sb['compression']}, "
              f"{plural(len(sb['devices']), 'device')}, {human(total)} in all")
        print(f"  eviction above {sb['high_watermark']:.0%} of capacity, down to {sb['low_watermark']:.0%}")
        for i, d in enumerate(sb["devices"]):
            print(f"  device {i}: {d['path']} ({human(d['size'])})")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
