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

A key is the bytes' SHA-256, which a text- and photo-dense 1080p PNG (~600 KB) takes 0.6 ms to
compute on an H200 host's CPU, before its decode could start (bench/RESULTS.md, twenty-ninth
session). Most screenshots are new, though, and a CRC-32 of the bytes (~0.01 ms) rules an entry out
just as surely: `lookup` hashes a large screenshot on a helper thread, beside its decode, where no
stored entry has its CRC, length and context.
"""
from __future__ import annotations

import hashlib
import threading
import zlib
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Hashable

try:
    from imagecodecs import zlibng_crc32 as crc32   # ~60 GB/s here; the system zlib's ~5
except ImportError:
    crc32 = zlib.crc32

BESIDE_BYTES = 128 * 1024     # smaller screenshots hash in ~0.1 ms, about what waking a helper costs
_hasher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="screen-key")


class ScreenCache:
    def __init__(self, budget_bytes: int):
        self.budget = max(0, int(budget_bytes))
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._quick: Counter[tuple] = Counter()     # the stored keys' (length, CRC-32, *context)
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
        on), or None when the cache is off. SHA-256, so that one user's screenshot cannot be made
        to collide with another's; then what `lookup` checks first."""
        if not self.enabled:
            return None
        return _keyed(image, _quick(image, context))

    def lookup(self, image: bytes | memoryview, *context: Hashable) -> tuple[Any | None, Future]:
        """(the entry stored for these bytes under `context`, or None; their key, as a Future, done
        unless the key is being computed on a helper thread: call its `result()` when the key is
        needed, after the decode). A miss may be stored before the key is done: look again then."""
        key: Future = Future()
        if not self.enabled:
            key.set_result(None)
            return None, key
        quick = _quick(image, context)
        if len(image) >= BESIDE_BYTES:
            with self._lock:
                ruled_out = quick not in self._quick
            if ruled_out:
                return None, _hasher.submit(_keyed, image, quick)
        key.set_result(_keyed(image, quick))
        return self.get(key.result()), key

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
                self._forget(key, old[1])
            while self._entries and self._bytes + nbytes > self.budget:
                gone, (_, size) = self._entries.popitem(last=False)
                self._forget(gone, size)
            self._entries[key] = (entry, nbytes)
            self._bytes += nbytes
            self._quick[_quick_part(key)] += 1
        return True

    def _forget(self, key: Hashable, nbytes: int) -> None:
        """Account for an entry taken out (the lock held)."""
        self._bytes -= nbytes
        quick = _quick_part(key)
        self._quick[quick] -= 1
        if self._quick[quick] <= 0:
            del self._quick[quick]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._quick.clear()
            self._bytes = 0


def _quick(image: bytes | memoryview, context: tuple) -> tuple:
    return (len(image), crc32(image), *context)


def _keyed(image: bytes | memoryview, quick: tuple) -> tuple:
    """A key: the bytes' SHA-256, then what `_quick` gave for them."""
    return (hashlib.sha256(image).digest(), *quick)


def _quick_part(key: Hashable) -> Hashable:
    """What `_quick` gave for a key's bytes and context; a key of another form (tests store
    strings) stands for itself."""
    return key[1:] if isinstance(key, tuple) else key
