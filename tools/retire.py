"""`kvfs retire`: drop a whole subtree of a running mount at once. Owns the command and
its report; the work is the daemon's (control operation "retire")."""

import json

from kvfs.errors import QuietError, EXIT_OK, EXIT_USAGE
from kvfs.units import human, plural

from . import client, command


def add_parser(sub) -> None:
    s = command.subparser(sub, "retire", run, help="drop a whole subtree at once (one model's KV, say)",
                          description="Remove a file or a directory tree from a running mount: the name "
                                      "disappears at once, the tree is deleted in short batches that do not "
                                      "stall other clients, pinned files included. Open files keep their data "
                                      "until closed. Returns when everything is deleted.",
                          epilog="example:\n  kvfs retire /mnt/kvfs/vllm/llama-3-8b_0123456789ab")
    s.add_argument("paths", nargs="+", metavar="PATH", help="files or directories on a kvfs mount")
    s.add_argument("--shared", action="store_true",
                   help="also delete their manifests from the mount's shared tier (every node then "
                        "stops finding them there; blocks are left to the store's lifecycle rules)")
    s.add_argument("--json", action="store_true", help="print what was retired as JSON")


def run(args) -> int:
    results = []
    for path in args.paths:
        mountpoint, rel = client.locate(path)
        if not rel:
            raise QuietError(f"{path} is the mount's root; retire the directories in it", EXIT_USAGE)
        r = client.Remote(mountpoint).call("retire", path=rel, **({"shared": True} if args.shared else {}))
        results.append({"path": path, **r})
        if not args.json:
            shared = f"; {r['shared_manifests']} manifests deleted from the shared tier" if args.shared else ""
            print(f"retired {path}: {plural(r['files'], 'file')}, {human(r['bytes'])} in {r['seconds']:.1f} s{shared}")
    if args.json:
        print(json.dumps(results, indent=2))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
