"""``Backoff``: when a failed request may go out again. Exponential, jittered, no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass
class Backoff:
    first: float = 2.0
    maximum: float = 300.0
    failures: int = 0
    not_before: float = 0.0

    def failed(self, now: float, at_least: float = 0.0) -> float:
        """Record a failure at ``now``; the delay until the next try (half to full, jittered)."""
        self.failures += 1
        delay: float = min(self.first * 2.0 ** (self.failures - 1), self.maximum)
        delay = max(delay * random.uniform(0.5, 1.0), at_least)
        self.not_before = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures, self.not_before = 0, 0.0

    def ready(self, now: float) -> bool:
        return now >= self.not_before
