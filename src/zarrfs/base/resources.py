"""What one process of zarrfs holds: file descriptors and memory, against documented budgets.

Owns: whether a process runs, raising the descriptor soft limit to the hard limit at start (as most daemons do), counting the
descriptors in use (`/proc/self/fd`) and remembering the peak, and `Budget`, the one place that says
how much memory each part of the core may hold (`zarrfs stats` shows it beside what each part holds).

Descriptors. zarrfs's use is bounded whatever the archive's size: loaded manifest indexes hold none
(`manifests.index.ManifestIndex.load`), disk cache reads and writes close what they open, so what is open at
once is at most: S3 connections (`config.MAX_CONCURRENT_REQUESTS`), HTTP connections
(`config.MAX_CONCURRENT_HTTP`), one per cache-dir worker thread (`config.DISK_CACHE_THREADS`) and per
CPU thread (`config.CPU_THREADS`), one lock file per manifest load in flight (at most one per FUSE
request, `config.MAX_FUSE_TASKS`), and a few of the process's own (stdio, the FUSE device, the log, the
event loop's wakeup pipes, the metrics listener): `config.FD_BUDGET` in all. A limit below it is
logged at start.

Memory. The parts' own budgets add up to `Budget.total`: the block cache (`--memory-cache-size`;
bytes prefetched ahead of readers live in it, at most `config.PREFETCH_MEMORY_SHARE` of it), loaded
manifest indexes (`--manifest-memory`), resolved versions (`--version-memory`), blocks waiting to be
written to disk (`config.DISK_CACHE_PENDING_MAX`) and synthesized `.zmetadata` documents
(`config.CONSOLIDATED_MEMORY`). Never does: enforce anything itself (each part keeps within its own
budget), or I/O beyond /proc.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

from zarrfs import config

log = logging.getLogger(__name__)


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on descriptors to its hard limit; the soft limit after
    (-1: unlimited). Logs when it is below `config.FD_BUDGET`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.debug("cannot raise the descriptor limit to %d: %s", target, e)
    if soft == resource.RLIM_INFINITY:
        return -1
    if soft < config.FD_BUDGET:
        log.warning(
            "the descriptor limit is %d, below the %d zarrfs may need under full load: raise it "
            "(ulimit -n) if requests fail with 'Too many open files'",
            soft,
            config.FD_BUDGET,
        )
    return soft


def pid_running(pid: object) -> bool:
    """Whether a process with this pid runs on this host (another user's included)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_descriptors() -> int:
    """Descriptors this process has open now (-1 when /proc cannot tell)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own descriptor
    except OSError:
        return -1


class DescriptorGauge:
    """Descriptors open now and the most seen (sampled: `sample` runs periodically)."""

    def __init__(self) -> None:
        self.peak = 0

    def sample(self) -> int:
        now = open_descriptors()
        self.peak = max(self.peak, now)
        return now

    def stats(self) -> dict[str, int]:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return {
            "open": self.sample(),
            "peak": self.peak,
            "limit": -1 if soft == resource.RLIM_INFINITY else soft,
            "budget": config.FD_BUDGET,
        }


@dataclass(frozen=True, slots=True)
class Budget:
    """How much memory each part of one core may hold (bytes)."""

    block_cache: int
    manifests: int
    versions: int
    disk_pending: int = config.DISK_CACHE_PENDING_MAX
    consolidated: int = config.CONSOLIDATED_MEMORY
    #: `--virtual-zarr`: the views kept, and the cache of small blocks their extraction reads
    #: (0 without the option).
    virtual_zarr: int = 0
    virtual_metadata: int = 0

    @property
    def total(self) -> int:
        return (
            self.block_cache
            + self.manifests
            + self.versions
            + self.disk_pending
            + self.consolidated
            + self.virtual_zarr
            + self.virtual_metadata
        )
