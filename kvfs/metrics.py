"""Prometheus metrics of a warehouse: a collector that reads Warehouse.stats() at each
scrape (nothing is counted twice, nothing scans), rendered for .kvfs/metrics and served over
HTTP by `kvfs mount --metrics-port`."""

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .shared_files import COUNTERS as SHARED

# counter name in Warehouse.stats()["counters"] -> (metric, help)
COUNTERS = {
    "lookup_hit": ("kvfs_lookup_hits", "Lookups that found a name (the kernel caches many)."),
    "lookup_miss": ("kvfs_lookup_misses", "Lookups of names that do not exist (the kernel caches many)."),
    "evicted_files": ("kvfs_evicted_files", "Files evicted to keep use under the watermarks."),
    "evicted_bytes": ("kvfs_evicted_bytes", "Sizes of the files evicted."),
    "expired_files": ("kvfs_expired_files", "Files removed because their ttl ran out."),
    "expired_bytes": ("kvfs_expired_bytes", "Sizes of the files that expired."),
    "retired_files": ("kvfs_retired_files", "Files removed by kvfs retire."),
    "retired_bytes": ("kvfs_retired_bytes", "Sizes of the files retired."),
    "stored_blocks": ("kvfs_stored_blocks", "Blocks written to a device."),
    "dedup_blocks": ("kvfs_dedup_blocks", "Blocks found already stored and not written again."),
    "commits": ("kvfs_commits", "Files published (flush, fsync, close)."),
    "device_reads": ("kvfs_block_reads", "Blocks read from a device and verified."),
    "cache_hits": ("kvfs_block_cache_hits", "Blocks served from the daemon's block cache."),
    "read_ahead_blocks": ("kvfs_read_ahead_blocks", "Blocks read ahead of sequential readers into the block cache."),
    "read_ahead_waits": ("kvfs_read_ahead_waits", "Reads that waited for a block being read ahead."),
    "read_ahead_late": ("kvfs_read_ahead_late", "Blocks a reader needed before read-ahead had started them."),
    "read_ahead_wasted": ("kvfs_read_ahead_wasted", "Blocks read ahead and pushed out of the cache before any reader used them."),
    "read_ahead_errors": ("kvfs_read_ahead_errors", "Read-ahead reads that failed (the reader that needs the block reads it again)."),
    "corrupt_blocks": ("kvfs_corrupt_blocks", "Blocks that failed verification (served as EIO)."),
    "quarantined_files": ("kvfs_quarantined_files", "Files dropped because they held a damaged block."),
    "healed_blocks": ("kvfs_healed_blocks", "Quarantined blocks replaced by a new write of the same content."),
    "device_errors": ("kvfs_device_errors", "Device reads, writes and syncs that failed (EIO, ENOSPC, ...)."),
    "quota_refusals": ("kvfs_quota_refusals", "Writes refused with EDQUOT."),
    # The direct path (kvfs.direct, kvfs-direct(7)): batched requests over a Unix socket.
    "direct_lookups": ("kvfs_direct_lookups", "Paths looked up through the direct path."),
    "direct_reads": ("kvfs_direct_reads", "File ranges the direct path was asked to read (items of read requests)."),
    "direct_read_bytes": ("kvfs_direct_read_bytes", "Bytes read through the direct path into clients' memory."),
    "direct_stores": ("kvfs_direct_stores", "Files the direct path was asked to store (items of write requests)."),
    "direct_write_bytes": ("kvfs_direct_written_bytes", "Bytes of the files stored through the direct path."),
    "direct_unbuffered_reads": ("kvfs_direct_unbuffered_reads",
                                "Blocks the direct path read past the page cache (O_DIRECT)."),
}
# Only for a warehouse with a shared tier (Warehouse.stats()["shared"]).
SHARED_COUNTERS = {f"shared_{k}": (f"kvfs_shared_{k}", doc) for k, doc in SHARED.items()}


class WarehouseCollector:
    def __init__(self, wh):
        self.wh = wh

    def collect(self):
        st = self.wh.stats()
        gauges = (
            ("kvfs_capacity_bytes", "Space of the devices' data areas.", st["capacity"]),
            ("kvfs_used_bytes", "Space used on the devices (what df shows).", st["used"]),
            ("kvfs_free_bytes", "Space free on the devices.", st["free"]),
            ("kvfs_high_watermark_ratio", "Eviction starts above this share of capacity.", st["high_watermark"]),
            ("kvfs_low_watermark_ratio", "Eviction stops under this share of capacity.", st["low_watermark"]),
            ("kvfs_files", "Regular files.", st["files"]),
            ("kvfs_file_bytes", "Sizes of the regular files (logical bytes).", st["file_bytes"]),
            ("kvfs_block_bytes", "Raw bytes of the stored blocks, each once.", st["block_bytes"]),
            ("kvfs_stored_bytes", "Bytes the stored blocks take on the devices.", st["stored_bytes"]),
            ("kvfs_referenced_bytes", "Raw bytes of blocks times their references.", st["referenced_bytes"]),
            ("kvfs_dedup_ratio", "Referenced bytes / block bytes.", st["dedup_ratio"]),
            ("kvfs_compression_ratio", "Block bytes / stored bytes.", st["compression_ratio"]),
            ("kvfs_blocks", "Stored blocks.", st["blocks"]),
            ("kvfs_inodes", "Inodes of every kind.", st["inodes"]),
            ("kvfs_evictable_files", "Files eviction may take (not pinned).", st["evictable_files"]),
            ("kvfs_expiring_files", "Files with a ttl.", st["expiring_files"]),
            ("kvfs_retiring_trees", "Retired directory trees still being deleted.", st["retiring"]),
            ("kvfs_open_files", "Files open through the mount.", st["open_files"]),
            ("kvfs_quarantined_blocks", "Damaged blocks still held by some file (never served).",
             st["quarantined_blocks"]),
        )
        if st.get("shared"):
            gauges += (("kvfs_shared_queue_files", "Files waiting for upload to the shared tier.", st["shared"]["queue"]),
                       ("kvfs_shared_remote_files", "Files read through whose data is not fetched yet.",
                        st["shared"]["remote_files"]))
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = st["counters"]
        for key, (name, doc) in (COUNTERS | SHARED_COUNTERS if st.get("shared") else COUNTERS).items():
            yield CounterMetricFamily(name, doc, value=counters.get(key, 0))
        labels = ["device", "path"]
        fams = {
            "size": GaugeMetricFamily("kvfs_device_capacity_bytes", "Data area of a device.", labels=labels),
            "free": GaugeMetricFamily("kvfs_device_free_bytes", "Free space of a device.", labels=labels),
            "reads": CounterMetricFamily("kvfs_device_reads", "Reads from a device since mount.", labels=labels),
            "read_bytes": CounterMetricFamily("kvfs_device_read_bytes", "Bytes read from a device since mount.", labels=labels),
            "writes": CounterMetricFamily("kvfs_device_writes", "Writes to a device since mount.", labels=labels),
            "write_bytes": CounterMetricFamily("kvfs_device_written_bytes", "Bytes written to a device since mount.", labels=labels),
        }
        for d in st["devices"]:
            for key, fam in fams.items():
                fam.add_metric([str(d["index"]), d["path"]], d[key])
        yield from fams.values()


def registry_for(wh) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WarehouseCollector(wh))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition format."""
    return generate_latest(registry)


def serve(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1"):
    """Serve /metrics over HTTP in a thread; returns the server (shutdown() stops it)."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
