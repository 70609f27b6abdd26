"""`kvfs find`: search the catalog by size, age, use, pin, creator and annotation. Owns
the command's tests as options; kvfs.catalog.Filter applies them."""


from kvfs.errors import EXIT_OK

from . import client, command
from .argtypes import parse_age, parse_size
from .ls import print_entries


def add_parser(sub) -> None:
    s = command.subparser(sub, "find", run, help="search the catalog by size, age, use, pin, creator, annotation",
                          description="Walk a directory tree of a warehouse in its metadata and print the "
                                      "entries that pass every test given. Annotations are the attributes "
                                      "user.kvfs.KEY of an entry or of a directory above it.",
                          epilog="examples:\n  kvfs find /mnt/kvfs --model llama-3-8b --unused-for 7d\n"
                                 "  kvfs find /mnt/kvfs/vllm --type f --min-size 1G --long\n"
                                 "  kvfs find /var/lib/kvfs/w1 --creator 'python*' --json")
    s.add_argument("path", metavar="PATH|WAREHOUSE", help="a path inside a kvfs mount, or a warehouse directory")
    s.add_argument("--type", choices=("f", "d", "l"), help="regular files, directories or symbolic links")
    s.add_argument("--name", metavar="GLOB", help="the last path component matches GLOB")
    s.add_argument("--min-size", type=parse_size, metavar="SIZE")
    s.add_argument("--max-size", type=parse_size, metavar="SIZE")
    s.add_argument("--unused-for", type=parse_age, metavar="AGE", help="last used at least AGE ago (90s, 15m, 2h, 7d)")
    s.add_argument("--used-within", type=parse_age, metavar="AGE", help="last used less than AGE ago")
    s.add_argument("--older-than", type=parse_age, metavar="AGE", help="created at least AGE ago")
    s.add_argument("--newer-than", type=parse_age, metavar="AGE", help="created less than AGE ago")
    s.add_argument("--pinned", action="store_const", const=True, help="pinned entries only")
    s.add_argument("--unpinned", dest="pinned", action="store_const", const=False, help="unpinned entries only")
    s.add_argument("--uid", type=int, help="created by this user id")
    s.add_argument("--creator", metavar="GLOB", help="created by a process whose name matches GLOB")
    s.add_argument("--model", help="annotated user.kvfs.model=MODEL")
    s.add_argument("--tenant", help="annotated user.kvfs.tenant=TENANT")
    s.add_argument("--annotation", action="append", metavar="KEY[=VALUE]",
                   help="annotated user.kvfs.KEY (=VALUE); repeat for several")
    s.add_argument("--long", "-l", action="store_true", help="print entries as kvfs ls does")
    s.add_argument("--json", action="store_true", help="print a JSON list of entries")


def run(args) -> int:
    from kvfs.catalog import Filter

    notes = {}
    for a in args.annotation or []:
        key, sep, value = a.partition("=")
        notes[key] = value if sep else None
    if args.model:
        notes["model"] = args.model
    if args.tenant:
        notes["tenant"] = args.tenant
    f = Filter(kind=args.type, name=args.name, min_size=args.min_size, max_size=args.max_size,
               unused_for=args.unused_for, used_within=args.used_within, older_than=args.older_than,
               newer_than=args.newer_than, pinned=args.pinned, uid=args.uid, creator=args.creator,
               annotations=notes)
    catalog, rel, base = client.open_target(args.path)
    try:
        with catalog.meta.begin() as txn:
            print_entries((e for e in catalog.entries(txn, rel, base, recursive=True) if f(e)),
                           args.json, long=args.long)
    finally:
        catalog.close()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
