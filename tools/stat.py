"""`kvfs stat`: what a warehouse holds and how it is doing, mounted or not. Owns the
report's wording; the figures come from Warehouse.stats() through kvfs.tools.client."""

import json

from kvfs.errors import EXIT_OK
from kvfs.units import human, plural

from . import client, command


def add_parser(sub) -> None:
    s = command.subparser(sub, "stat", run, help="show what a warehouse holds and how it is doing",
                          description="Capacity, use, watermarks, files and blocks, deduplication and "
                                      "compression ratios, hit rate, evictions, expiries, retirements and "
                                      "per-device use and I/O of a warehouse, mounted or not.",
                          epilog="examples:\n  kvfs stat /mnt/kvfs\n  kvfs stat /var/lib/kvfs/w1 --json")
    s.add_argument("target", metavar="MOUNTPOINT|WAREHOUSE")
    s.add_argument("--json", action="store_true", help="print everything as JSON")


def run(args) -> int:
    target = client.connect(args.target)
    try:
        st = target.call("stats")
    finally:
        target.close()
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    c = st["counters"]
    cap = st["capacity"] or 1
    where = f"mounted on {st['mountpoint']}" if st["mountpoint"] else ("clean" if st["clean"] else "NOT clean: mount or fsck it")
    hit = f"{st['hit_rate']:.1%} hit rate" if st["hit_rate"] is not None else "no lookups yet"
    print(f"warehouse  {st['warehouse']} ({where})")
    print(f"capacity   {human(st['capacity'])}, used {human(st['used'])} ({st['used'] / cap:.1%}), "
          f"free {human(st['free'])}")
    print(f"eviction   above {st['high_watermark']:.0%}, down to {st['low_watermark']:.0%}; "
          f"{plural(st['evictable_files'], 'file')} evictable, {st['expiring_files']:,} with a ttl")
    print(f"files      {st['files']:,} holding {human(st['file_bytes'])}; {plural(st['blocks'], 'block')} of "
          f"{human(st['block_bytes'])} stored in {human(st['stored_bytes'])}")
    print(f"savings    dedup {st['dedup_ratio']:.2f}x, compression {st['compression_ratio']:.2f}x")
    print(f"lookups    {plural(c.get('lookup_hit', 0), 'hit')}, {plural(c.get('lookup_miss', 0), 'miss', 'misses')} ({hit})")
    print(f"removed    evicted {plural(c.get('evicted_files', 0), 'file')} ({human(c.get('evicted_bytes', 0))}), "
          f"expired {c.get('expired_files', 0):,} ({human(c.get('expired_bytes', 0))}), "
          f"retired {c.get('retired_files', 0):,} ({human(c.get('retired_bytes', 0))})")
    if any(c.get(k) for k in ("direct_reads", "direct_stores", "direct_lookups")):
        print(f"direct     {plural(c.get('direct_reads', 0), 'read')} ({human(c.get('direct_read_bytes', 0))}), "
              f"{plural(c.get('direct_stores', 0), 'store')} ({human(c.get('direct_write_bytes', 0))}), "
              f"{plural(c.get('direct_lookups', 0), 'lookup')}")
    if c.get("corrupt_blocks") or st.get("quarantined_blocks"):
        print(f"DAMAGE     {plural(c.get('corrupt_blocks', 0), 'block')} failed verification, "
              f"{plural(c.get('quarantined_files', 0), 'file')} holding them dropped, "
              f"{st.get('quarantined_blocks', 0):,} still quarantined, {c.get('healed_blocks', 0):,} healed "
              "by new writes: see the log; kvfs fsck --verify-data --repair finds the rest")
    if c.get("device_errors"):
        print(f"ERRORS     {c['device_errors']:,} device reads, writes or syncs failed: see the log")
    sh = st.get("shared")
    if sh:
        where = sh["url"] or "none now (counters of earlier mounts)"
        state = f", {sh['state']}" + (f": {sh['last_error']}" if sh.get("last_error") else "") if sh["url"] else ""
        print(f"shared     {where}{state}; queue {plural(sh['queue'], 'file')}"
              + (f" (at most {sh['queue_limit']:,} unpinned)" if sh.get("queue_limit") else "")
              + f", {sh.get('dropped_files', 0):,} dropped")
        print(f"           uploaded {plural(sh.get('uploaded_files', 0), 'file')}, {plural(sh.get('uploaded_blocks', 0), 'block')} "
              f"({human(sh.get('uploaded_bytes', 0))}; {sh.get('present_blocks', 0):,} were there already); "
              f"fetched {plural(sh.get('fetched_files', 0), 'file')}, {plural(sh.get('fetched_blocks', 0), 'block')} "
              f"({human(sh.get('fetched_bytes', 0))})")
        print(f"           lookups {sh.get('lookup_hits', 0):,} found, {sh.get('lookup_misses', 0):,} not; "
              f"{plural(sh.get('failures', 0), 'failure')}, {plural(sh.get('corrupt_blocks', 0), 'corrupt block')} refused, "
              f"{plural(sh.get('superseded_files', 0), 'local version')} superseded, "
              f"{plural(sh['remote_files'], 'file')} not fetched yet")
    for d in st["devices"]:
        # Device I/O is counted by the process that has the warehouse open: the mount's
        # daemon, or (unmounted) this command, which has done none worth showing.
        io = (f"; since mount {plural(d['reads'], 'read')} ({human(d['read_bytes'])}), "
              f"{plural(d['writes'], 'write')} ({human(d['write_bytes'])})") if st["mountpoint"] else ""
        print(f"device {d['index']}   {d['path']}: {human(d['size'] - d['free'])} of {human(d['size'])} used{io}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return command.main(add_parser, argv)
