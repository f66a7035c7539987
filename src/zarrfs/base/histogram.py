"""A latency histogram: log-spaced buckets, constant memory, percentiles within a factor of 2.

Owns: `LatencyHistogram` (what the filesystem records for every read and `zarrfs stats` shows). Pure.
"""

from __future__ import annotations

import bisect
import math

#: Upper bounds (seconds) of the latency buckets: 50 us to ~200 s, each twice the previous.
BUCKETS = tuple(0.00005 * 2**i for i in range(23))


class LatencyHistogram:
    """Counts of observations by bucket; percentiles are bucket upper bounds (within 2x)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0
        self.sum = 0.0
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += 1
        self.sum += seconds
        self.max = max(self.max, seconds)

    def percentile(self, q: float) -> float | None:
        if not self.total:
            return None
        rank = math.ceil(q * self.total)
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return BUCKETS[i] if i < len(BUCKETS) else self.max
        return self.max
