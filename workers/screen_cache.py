"""What a worker keeps of a screenshot for the next question about it.

Agents ask several things about one screen ("click the search box", then "where is Submit?"), and
evaluation sets pair each screenshot with several instructions. GUI-Actor's prompt puts the image
before the instruction: system prompt, image, then the instruction's tokens. Everything up to the
end of the image (the vision tower, the language model's keys and values over those positions, and
the pointer head's image side) depends on the image bytes, the resize limits and the system prompt
alone, never on the instruction. An engine stores that state here under those three; a later
request with the same three skips the decode, the vision tower and all but the instruction's few
tokens of the language model (bench/RESULTS.md has the numbers).

Bytes are bounded: least recently used entries go first, and an entry larger than the whole budget
is never stored. Entries are opaque here (the engine's device arrays); a job that holds one keeps
it alive even if it is evicted meanwhile. Thread-safe: preprocessing threads look up, the compute
thread stores.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Hashable


class ScreenCache:
    def __init__(self, budget_bytes: int):
        self.budget = max(0, int(budget_bytes))
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, image: bytes | memoryview, *context: Hashable) -> tuple | None:
        """The key for these image bytes under `context` (whatever else the stored state depends
        on), or None when the cache is off. SHA-256: ~0.5 ms per MB here, and one user's
        screenshot cannot be made to collide with another's."""
        if not self.enabled:
            return None
        return (hashlib.sha256(image).digest(), *context)

    def get(self, key: Hashable | None) -> Any | None:
        """The entry stored under `key` (now the most recently used), or None."""
        if key is None:
            return None
        with self._lock:
            item = self._entries.get(key)
            if item is None:
                return None
            self._entries.move_to_end(key)
            return item[0]

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of `nbytes` would be stored at all."""
        return 0 < nbytes <= self.budget

    def put(self, key: Hashable, entry: Any, nbytes: int) -> bool:
        """Store `entry` (replacing one under the same key), evicting the least recently used
        until it fits. False, storing nothing, when it is larger than the whole budget."""
        if not self.fits(nbytes):
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            while self._entries and self._bytes + nbytes > self.budget:
                _, (_, size) = self._entries.popitem(last=False)
                self._bytes -= size
            self._entries[key] = (entry, nbytes)
            self._bytes += nbytes
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
