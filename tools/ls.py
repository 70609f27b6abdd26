"""`kvfs ls`: list a directory (or show a file) from the catalog, with lineage. Owns the
entry printing that `kvfs find` shares; reading the metadata is kvfs.catalog's."""

import json
import sys
import time

from kvfs.errors import EXIT_OK
from kvfs.units import human

from . import client, command


def add_parser(sub) -> None:
    s = command.subparser(sub, "ls", run, help="list a directory from the catalog, with lineage",
                          description="List a directory (or show a file) of a warehouse from its metadata: "
                                      "mode, flags (P pinned, T ttl, Q quota), size, last use, opens, the "
                                      "process that created it, annotations. Mounted or not; no walk of the mount.",
                          epilog="examples:\n  kvfs ls /mnt/kvfs/vllm\n  kvfs ls /var/lib/kvfs/w1 --json")
    s.add_argument("path", metavar="PATH|WAREHOUSE", help="a path inside a kvfs mount, or a warehouse directory")
    s.add_argument("--json", action="store_true", help="print a JSON list of entries")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def print_entries(entries, as_json: bool, long: bool) -> int:
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


def run(args) -> int:
    catalog, rel, base = client.open_target(args.path)
    try:
        with catalog.meta.begin() as txn:
            entries = catalog.entries(txn, rel, base, recursive=False)
            first = next(entries)
            print_entries(entries if first.kind == "d" else [first], args.json, long=not args.json)
    finally:
        catalog.close()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
