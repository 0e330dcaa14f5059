"""The progress record yielded by every long-running generator in ``core``.

Long work (embedding a volume, propagating a mask, training a head) is written as a generator that
``yield``s :class:`Progress` and ``return``s its result, so that the CLI can draw a progress bar,
napari can run it in a thread worker and stop it between steps, and tests can drain it.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One step of long work.

    ``step`` counts completed units out of ``total`` (``total`` may be 0 when unknown);
    ``info`` carries extras such as ``{"loss": 0.31}`` or ``{"cache_hit": True}``.
    """

    step: int
    total: int
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


ProgressGen = Generator[Progress, None, T]


def drain(gen: Generator[Any, Any, T]) -> T:
    """Run a progress generator to its end and return its result (scripts and tests)."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
