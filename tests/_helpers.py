"""Plain helpers the test files share (fixtures live in ``conftest.py``)."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from napari_medsam.core.progress import Progress

# Two boxes (rows, cols) and their labels, intensities: the layout of the heads' and the trainer's tests,
# for in-plane sizes of at least 30 x 31 ...
BOXES = ((slice(4, 14), slice(5, 20)), (slice(18, 30), slice(12, 31)))
# ... and the CLI's smaller files (at least 16 x 19)
CLI_STRUCTURES: dict[str, Any] = {"boxes": ((slice(2, 9), slice(3, 12)), (slice(10, 16), slice(8, 19))),
                                  "values": (1, 2), "mean": 300.0, "sd": 30.0, "shifts": (200.0, -150.0)}


def drain_steps(gen: Generator[Progress, Any, Any]) -> tuple[list[Progress], Any]:
    """Run a progress generator to its end: (every :class:`Progress` it yielded, its result)."""
    steps: list[Progress] = []
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as stop:
            return steps, stop.value


def two_structures(shape: tuple[int, ...], *, seed: int = 0, boxes: Sequence[tuple[slice, slice]] = BOXES,
                   values: Sequence[int] = (2, 5), mean: float = 100.0, sd: float = 10.0,
                   shifts: Sequence[float] = (90.0, -60.0)) -> tuple[np.ndarray, np.ndarray]:
    """A float32 volume of Gaussian noise (``mean``, ``sd``, seeded) with two box-shaped structures on
    every slice (last two axes), shifted in intensity by ``shifts``; and its uint8 labels (``values``)."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(mean, sd, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    for (rows, cols), value in zip(boxes, values, strict=True):
        lab[..., rows, cols] = value
    for value, shift in zip(values, shifts, strict=True):
        vol[lab == value] += shift
    return vol, lab


def permuted_scan(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same scan stored as ``(k, i, j)`` with ``i`` and ``k`` reversed: a different array and a
    different affine for the same anatomy. Returns ``(array, affine, its shape)``; the array's index
    ``(a, b, c)`` is the original's ``(n[1] - 1 - b, c, n[0] - 1 - a)``, with ``n`` the new shape."""
    perm = (2, 0, 1)
    other = np.ascontiguousarray(np.transpose(data, perm)[::-1, ::-1, :])
    n = np.array(data.shape)[list(perm)]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, n[0] - 1
    flip[1, 1], flip[1, 3] = -1, n[1] - 1
    swap = np.eye(4)[[*perm, 3]].T  # other index (a, b, c) -> original index with i = b, j = c, k = a
    return other, affine @ swap @ flip, n
