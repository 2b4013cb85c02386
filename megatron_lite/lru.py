"""A bounded map that forgets its least recently used entry.

The communication path caches its work per kind of message: the router's plans and runners
and the fused backends' prepared launches (kernels/codec_cuda.py's handles too), keyed by
shape, dtype and site; a runner may hold a launch its backend has already forgotten.
Unbounded, a long-running process would keep one entry for every kind of message it ever
saw: every prompt length of an eager prefill, times the sites of a ``weighted-`` codec.
The entries are stateless (a plan, or a launch with its arguments bound), so one that is
forgotten is worked out again on its next call.
"""
from collections import OrderedDict
from typing import Any, Hashable


class LruDict:
    """``d[key] = value``, ``d.get(key)``, ``key in d``: a dict of at most ``maxsize``
    entries; storing one more drops the least recently stored or read."""

    __slots__ = ("_d", "maxsize")

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        self._d: "OrderedDict[Hashable, Any]" = OrderedDict()
        self.maxsize = maxsize

    def get(self, key: Hashable, default: Any = None) -> Any:
        try:
            value = self._d[key]
        except KeyError:
            return default
        self._d.move_to_end(key)
        return value

    def __getitem__(self, key: Hashable) -> Any:
        value = self._d[key]
        self._d.move_to_end(key)
        return value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        if len(self._d) > self.maxsize:
            self._d.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def clear(self) -> None:
        self._d.clear()
