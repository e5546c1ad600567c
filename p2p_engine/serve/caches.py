"""The edit caches of recently edited sources, least recently used first out, bounded in bytes (--cache-bytes).

A source's first edit runs whole and is remembered (`seen`); its second records an `EditCache` of the source
alone (`Pipeline.edit_cache`, windows covering every step, so any later windows fit) and it and every later
re-edit run the targets' rows only. Used by the worker's thread alone; /metrics reads the counts.
"""
from __future__ import annotations

from collections import OrderedDict

SEEN = 4096  # sources remembered as edited once


class CacheLRU:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._caches: OrderedDict[tuple, object] = OrderedDict()
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._caches)

    def get(self, key: tuple):
        cache = self._caches.get(key)
        if cache is not None:
            self._caches.move_to_end(key)
            self.hits += 1
        return cache

    def seen(self, key: tuple) -> bool:
        """Whether `key`'s source was edited before; remembers it either way."""
        before = key in self._seen
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > SEEN:
            self._seen.popitem(last=False)
        return before

    def put(self, key: tuple, cache) -> None:
        self.misses += 1
        size = cache.nbytes
        if size > self.max_bytes:
            return
        while self._caches and self.nbytes + size > self.max_bytes:
            _, old = self._caches.popitem(last=False)
            self.nbytes -= old.nbytes
        self._caches[key] = cache
        self.nbytes += size
