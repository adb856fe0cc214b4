"""Parsed shard layouts, kept by blob digest within a byte budget.

A layout is parsed once, when its shard is fetched (the fetch validates every shard
before it becomes a blob), and reused by the node when the model is made resident and
its answer built. What the daemon keeps of layouts is bounded in bytes: least recently
used ones are dropped past :data:`DEFAULT_LAYOUT_BUDGET`, and the node drops a model's
when it unloads it. A layout that alone is over the budget is not kept at all (it is
parsed again when needed).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from weightd.formats.safetensors import ShardLayout

__all__ = ["DEFAULT_LAYOUT_BUDGET", "LayoutCache", "layout_bytes"]

#: Bytes of parsed layouts one daemon keeps (a shard of 1,000 tensors takes about
#: 300 KB; one of 100,000 about 28 MiB).
DEFAULT_LAYOUT_BUDGET = 64 * 1024 * 1024

#: What one tensor of a layout costs in memory, its name aside (a ``TensorInfo`` with
#: slots, its shape tuple, the by-name dict entry, the tuple slot), measured on CPython
#: 3.11 for two-dimensional shapes and short names (293 bytes with 5-character names).
_BYTES_PER_TENSOR = 300


def layout_bytes(layout: ShardLayout) -> int:
    """About how much memory ``layout`` holds (what the budget counts)."""
    names = sum(len(t.name) for t in layout.tensors)
    meta = sum(len(k) + len(v) + 120 for k, v in layout.metadata.items())
    return 1024 + len(layout.tensors) * _BYTES_PER_TENSOR + names + meta


class LayoutCache:
    """Layouts by blob digest, least recently used dropped past ``budget`` bytes.

    Thread-safe; the lock guards only the bookkeeping.

    Example
    -------
    >>> from weightd.formats import layout_from_bytes
    >>> hdr = b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    >>> cache = LayoutCache(budget=1 << 20)
    >>> cache.put("d1", layout_from_bytes(len(hdr).to_bytes(8, "little") + hdr + b"x"))
    >>> cache.get("d1").names()
    ['w']
    """

    def __init__(self, budget: int = DEFAULT_LAYOUT_BUDGET) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[ShardLayout, int]] = OrderedDict()
        self._bytes = 0

    def get(self, digest: str) -> ShardLayout | None:
        with self._lock:
            item = self._items.get(digest)
            if item is None:
                return None
            self._items.move_to_end(digest)
            return item[0]

    def put(self, digest: str, layout: ShardLayout) -> None:
        """Keep ``layout`` (unless it alone is over the budget), dropping the least
        recently used ones until the rest fit."""
        cost = layout_bytes(layout)
        with self._lock:
            old = self._items.pop(digest, None)
            if old is not None:
                self._bytes -= old[1]
            if cost > self.budget:
                return
            self._items[digest] = (layout, cost)
            self._bytes += cost
            while self._bytes > self.budget:
                _, (_, freed) = self._items.popitem(last=False)
                self._bytes -= freed

    def drop(self, digest: str) -> None:
        with self._lock:
            item = self._items.pop(digest, None)
            if item is not None:
                self._bytes -= item[1]

    @property
    def nbytes(self) -> int:
        """Bytes the kept layouts hold, as :func:`layout_bytes` counts them."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._items
