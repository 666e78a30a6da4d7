"""A replica's pixel budget: how many pixels its requests may be decoding at once.

A decoded image takes 3 bytes a pixel, and decoding and resizing briefly need about 12 (the
decoder's own buffer, mode conversions, the resize; measured on a 49M-pixel PNG). Without a bound, a
handful of concurrent uploads near the pixel limit (10k x 10k PNGs of a few hundred KB each) take a
replica from 1 GB to 5 GB. With one, requests whose pixels do not fit wait their turn, first come first served, and
give up after ``wait_s`` (the service answers 503 with ``Retry-After``). An image larger than the
whole budget waits until it can run alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class BudgetExhausted(Exception):
    """No room in the budget within the wait allowed."""


class PixelBudget:
    """Admits work by its pixel count while the pixels admitted stay within ``limit``.

    Args:
        limit: the most pixels admitted at once (>= 1).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a pixel budget must be >= 1, got {limit}")
        self.limit = int(limit)
        self.in_use = 0
        self.stats = {"admitted": 0, "waited": 0, "refused": 0, "peak_pixels": 0}
        self._turns: deque[object] = deque()
        self._changed = asyncio.Condition()

    @property
    def waiting(self) -> int:
        """How many requests are queued for their turn now (asked, neither admitted nor given up)."""
        return len(self._turns)

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int, wait_s: float | None) -> AsyncIterator[None]:
        """Holds ``pixels`` of the budget for the block; ``wait_s=None`` waits without a limit.

        Raises:
            BudgetExhausted: not admitted within ``wait_s`` seconds.
        """
        pixels = max(0, min(int(pixels), self.limit))
        turn = object()
        async with self._changed:
            self._turns.append(turn)

            def admissible() -> bool:
                return self._turns[0] is turn and self.in_use + pixels <= self.limit

            if not admissible():
                self.stats["waited"] += 1
                try:
                    await asyncio.wait_for(self._changed.wait_for(admissible), wait_s)
                except BaseException as exc:  # the wait ran out, or the request was cancelled
                    self._turns.remove(turn)
                    self._changed.notify_all()  # the next in line may fit now
                    if not isinstance(exc, TimeoutError):
                        raise
                    self.stats["refused"] += 1
                    raise BudgetExhausted(f"{pixels} pixels did not fit in the budget of {self.limit} "
                                          f"within {wait_s} s") from None
            self._turns.popleft()
            self.in_use += pixels
            self.stats["admitted"] += 1
            self.stats["peak_pixels"] = max(self.stats["peak_pixels"], self.in_use)
            self._changed.notify_all()  # the next in line may fit beside this one
        try:
            yield
        finally:
            async with self._changed:
                self.in_use -= pixels
                self._changed.notify_all()
