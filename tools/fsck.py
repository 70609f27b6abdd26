"""`kvfs fsck`: check (and repair) a warehouse that is not mounted. Owns the command's
options; the checks and repairs are kvfs.fsck's."""


from . import command


def add_parser(sub) -> None:
    s = command.subparser(sub, "fsck", run, help="check a warehouse that is not mounted",
                          description="Check the metadata of an unmounted warehouse against its invariants: "
                                      "reference counts, extent overlaps, leaked space, dangling entries.",
                          epilog="examples:\n  kvfs fsck /var/lib/kvfs/w1\n  kvfs fsck /var/lib/kvfs/w1 --verify-data --json\n"
                                 "  kvfs fsck /var/lib/kvfs/w1 --repair")
    s.add_argument("warehouse")
    s.add_argument("--verify-data", action="store_true", help="also read every block and verify its hash")
    s.add_argument("--repair", action="store_true",
                   help="fix what was found: recompute reference counts, reclaim leaked space, "
                        "drop dangling entries (never touches intact data)")
    s.add_argument("--json", action="store_true", help="print a machine-readable report")


def run(args) -> int:
    from kvfs.fsck import run_fsck

    return run_fsck(args)


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
