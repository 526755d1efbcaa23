"""A set of 64-bit hashes at 8 bytes each: what the loader remembers to find duplicate ids and texts.

Why not a Python ``set[int]``: every member is a boxed int (32 bytes) plus a hash-table slot,
about 75 bytes per item; two such sets (ids and texts) made a 1M-item load peak ~60 MB
above a 10k-item one (bench/million.py). Here members live in one sorted numpy ``uint64``
array (8 bytes each); new members go to a small Python set first and are merged into the
array every ``batch`` additions, so adding stays O(1) amortised.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


class HashSet64:
    """Membership of unsigned 64-bit integers with a flat memory cost per member.

    Asked in batches (a loader chunk at a time): one vectorised binary search per batch,
    because numpy called once per item costs microseconds (a 1M-item loop took 30 s
    against 0.8 s for a ``set``).
    """

    def __init__(self, batch: int = 65_536) -> None:
        self._buf = np.empty(0, dtype=np.uint64)  # capacity; the first ``_n`` are the sorted members
        self._n = 0
        self._recent: set[int] = set()
        self._batch = batch

    @property
    def _sorted(self) -> np.ndarray:
        return self._buf[:self._n]

    def __len__(self) -> int:
        return self._n + len(self._recent)

    def __contains__(self, h: int) -> bool:
        return self.contains_many([h])[0]

    def contains_many(self, hashes: Sequence[int]) -> list[bool]:
        """For each hash, whether it is a member now (members added later are not seen)."""
        if not len(hashes):
            return []
        a = self._sorted
        if len(a):
            keys = np.fromiter(hashes, dtype=np.uint64, count=len(hashes))
            idx = np.minimum(np.searchsorted(a, keys), len(a) - 1)
            old = (a[idx] == keys).tolist()
        else:
            old = [False] * len(hashes)
        recent = self._recent
        return [o or h in recent for h, o in zip(hashes, old)]

    def update(self, hashes: Iterable[int]) -> None:
        """Add every hash (0 <= h < 2**64); adding a member again changes nothing."""
        hs = list(hashes)
        fresh = [h for h, m in zip(hs, self.contains_many(hs)) if not m]
        self._recent.update(fresh)
        if len(self._recent) >= self._batch:
            self._merge()

    def add(self, h: int) -> None:
        self.update([h])

    def _merge(self) -> None:
        """Append the recent members and sort in place: a stable sort (timsort) of two sorted runs is one merge.

        The array grows by doubling in place rather than a new array per merge: a fresh
        ``union1d`` per merge left freed blocks of every size behind (RSS 119 MB for 15 MB of
        members over 100 merges), this keeps it near the members' size.
        """
        m, n = len(self._recent), self._n
        if n + m > len(self._buf):
            grown = np.empty(max(2 * len(self._buf), n + m, 1 << 16), dtype=np.uint64)
            grown[:n] = self._buf[:n]
            self._buf = grown
        self._buf[n:n + m] = np.fromiter(self._recent, dtype=np.uint64, count=m)  # none is a member already
        self._buf[:n + m].sort(kind="stable")
        self._n = n + m
        self._recent = set()
