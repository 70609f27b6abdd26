"""`kvfs du`: files and bytes per directory, from the catalog. Owns the command and its
table; the sums are kvfs.catalog.du's."""

import json

from kvfs.errors import QuietError, EXIT_OK, EXIT_USAGE
from kvfs.units import human, plural

from . import client, command


def add_parser(sub) -> None:
    s = command.subparser(sub, "du", run, help="space per directory, from the catalog",
                          description="Files and bytes (file sizes) below each entry of a directory, largest "
                                      "first, and in all. Mounted or not; no walk of the mount.",
                          epilog="examples:\n  kvfs du /mnt/kvfs/vllm\n  kvfs du /var/lib/kvfs/w1 --json")
    s.add_argument("path", metavar="PATH|WAREHOUSE", help="a directory inside a kvfs mount, or a warehouse directory")
    s.add_argument("--json", action="store_true", help="print a JSON list of rows")


def run(args) -> int:
    from kvfs.catalog import du

    catalog, rel, base = client.open_target(args.path)
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
            print(f"{human(r['bytes']):>10}  {plural(r['files'], 'file'):>15}  {r['path']}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
