"""What a running core has done, as one snapshot: requests, bytes, cache hit ratios, retries,
errors, read latency percentiles; and the same as Prometheus text.

Owns: gathering every part's counters into one JSON-ready dict (`snapshot`), and rendering it in the
Prometheus text format (`prometheus_text`, for `--metrics-port`; no client library needed). Never keeps
counters of its own: each part owns its counters (`S3Reader.stats`, `BlockCache.stats()`, the
filesystem's read-latency histogram, ...).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from zarrfs.io import retry

if TYPE_CHECKING:
    from zarrfs.fs.filesystem import Filesystem


def snapshot(fs: Filesystem, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every counter of `fs` and its parts, with derived ratios."""
    blocks = fs.stack.blocks.stats()
    reads = fs.read_stats
    latency = fs.read_latency
    lookups = blocks["hits"] + blocks["misses"]
    out: dict[str, Any] = {
        "time": time.time(),
        "reads": dict(reads),
        "read_latency_seconds": {
            "p50": latency.percentile(0.5),
            "p90": latency.percentile(0.9),
            "p99": latency.percentile(0.99),
            "max": latency.max if latency.total else None,
            "count": latency.total,
        },
        "s3": dict(fs.reader.stats),
        "slots": dict(fs.reader.slots.stats),
        "retries": dict(retry.stats),
        "memory_cache": {**blocks, **fs.stack.blocks.recheck_stats()},
        "memory_hit_ratio": blocks["hits"] / lookups if lookups else None,
        "manifests": {
            **fs.manifests.stats,
            "loaded": fs.manifests.loaded_count,
            "loaded_bytes": fs.manifests.loaded_bytes,
        },
        "readahead": dict(fs.readahead.stats),
        "unopened_streams": fs.streams.stats(),
        "descriptors": fs.descriptors.stats(),
        "memory": _memory(fs),
    }
    disk = fs.stack.disk
    if disk is not None:
        disk_stats = {**disk.disk.stats(), **disk.stats}
        out["disk_cache"] = disk_stats
        misses = blocks["misses"]
        out["disk_hit_ratio"] = blocks["disk_hits"] / misses if misses else None
    if fs.virtual is not None:
        out["virtual_zarr"] = {
            **fs.virtual.cache.stats,
            "loaded_bytes": fs.virtual.loaded_bytes,
            "metadata_cache": fs.stack.sparse.stats(),
        }
    if fs.gate is not None:
        out["cache_dir"] = {**fs.gate.stats, "stalled": int(fs.gate.stalled)}
    if extra:
        out.update(extra)
    return out


def _memory(fs: Filesystem) -> dict[str, Any]:
    """What each part holds, its budget, their totals, and the process's resident memory."""
    budget = fs.budget
    disk = fs.stack.disk
    held = {
        "block_cache": fs.stack.blocks.stats()["bytes"],
        "prefetched_ahead": fs.stack.prefetch_budget.used,
        "manifests": fs.manifests.loaded_bytes,
        "versions": fs.versions_bytes,
        "disk_pending": disk.pending if disk is not None else 0,
        "consolidated": fs.consolidated_bytes,
        "virtual_zarr": fs.virtual.loaded_bytes if fs.virtual is not None else 0,
        "virtual_metadata": fs.stack.sparse.stats()["bytes"],
    }
    return {
        "held": held,
        "budget": {
            "block_cache": budget.block_cache,
            "prefetched_ahead": fs.stack.prefetch_budget.limit,
            "manifests": budget.manifests,
            "versions": budget.versions,
            "disk_pending": budget.disk_pending,
            "consolidated": budget.consolidated,
            "virtual_zarr": budget.virtual_zarr,
            "virtual_metadata": budget.virtual_metadata,
        },
        "held_total": sum(held.values()) - held["prefetched_ahead"],  # inside the block cache
        "budget_total": budget.total,
        "rss": _rss(),
    }


def _rss() -> int:
    """Resident bytes of this process (-1 when /proc cannot tell)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return -1


def prometheus_text(snap: dict[str, Any]) -> str:
    """The numeric leaves of a snapshot as Prometheus gauges, `zarrfs_<section>_<name>`."""
    lines: list[str] = []

    def emit(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or value is None:
            return
        metric = "zarrfs_" + "".join(c if c.isalnum() else "_" for c in name)
        lines.append(f"# TYPE {metric} gauge")
        lines.append(f"{metric} {value}")

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}_{key}" if prefix else str(key), child)
        else:
            emit(prefix, value)

    walk("", {k: v for k, v in snap.items() if k != "time"})
    return "\n".join(lines) + "\n"
