"""How far the host may run ahead of the device within one forward pass.

MLX allocates an op's output when the host encodes it and frees a temporary only once the device
has run the work that used it. Encoding a whole forward as one graph takes the host a few
milliseconds and the device over a hundred, so nearly every temporary of the pass is allocated
before the first is freed: +3-6 GB at 1080p on the 2B shape (bench/RESULTS.md). Waiting for each
chunk before encoding the next bounds that, but leaves the device idle while the host encodes.
`RunAhead` keeps `depth` chunks scheduled: the host encodes chunk k+1 while the device runs chunk k.
"""
from __future__ import annotations

from collections import deque

import mlx.core as mx


class RunAhead:
    """Call it on a chunk's output: the chunk is scheduled, and the host then waits until no more
    than `depth - 1` earlier chunks are still unfinished. depth 1 waits for every chunk."""

    def __init__(self, depth: int = 2):
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.depth = depth
        self._pending: deque[mx.array] = deque()

    def __call__(self, x: mx.array) -> None:
        mx.async_eval(x)
        self._pending.append(x)
        while len(self._pending) >= self.depth:
            mx.eval(self._pending.popleft())      # already scheduled: waits for it, nothing more
