"""A bounded LRU of answers keyed by (domain, version, variant, sha256 of the image bytes): a repeated
image skips decoding and inference. Per process; thread-safe."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class AnswerCache:
    def __init__(self, entries: int) -> None:
        self.entries = max(0, int(entries))
        self._data: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> Any | None:
        if not self.entries:
            return None
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: tuple[Any, ...], value: Any) -> None:
        if not self.entries:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.entries:
                self._data.popitem(last=False)

    def drop_domain(self, domain: str) -> None:
        with self._lock:
            for key in [k for k in self._data if k[0] == domain]:
                del self._data[key]

    def __len__(self) -> int:
        return len(self._data)
