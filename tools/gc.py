"""`kvfs gc`: find (and with --delete reclaim) space that nothing uses, on a running mount
or an unmounted warehouse. Owns the command and its report; the search is kvfs.fsck.gc's."""

import json

from kvfs.errors import EXIT_OK
from kvfs.units import human

from . import client, command
from .argtypes import parse_seconds


def add_parser(sub) -> None:
    s = command.subparser(sub, "gc", run, help="find (and reclaim) space that nothing uses",
                          description="Find leaked extents, block records that no file references, "
                                      "unlinked inodes that nobody has open and files created and never "
                                      "finished. Reports only, unless --delete. Works on a running mount "
                                      "(through its control file) and on an unmounted warehouse.",
                          epilog="examples:\n  kvfs gc /mnt/kvfs\n  kvfs gc /var/lib/kvfs/w1 --delete --json")
    s.add_argument("target", metavar="MOUNTPOINT|WAREHOUSE")
    s.add_argument("--delete", action="store_true", help="reclaim what was found")
    s.add_argument("--grace", type=parse_seconds, default=300.0, metavar="SECONDS",
                   help="leave unlinked or unfinished inodes younger than this alone (default 300)")
    s.add_argument("--json", action="store_true", help="print a machine-readable report")


def run(args) -> int:
    target = client.connect(args.target, write=args.delete)
    # Unmounted, nothing is open and nothing is being written: no inode is young.
    grace = args.grace if isinstance(target, client.Remote) else 0.0
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


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
