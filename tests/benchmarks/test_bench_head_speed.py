"""benchmarks/bench_head_speed.py's own logic: the slab and its training / held-out split (the
timings themselves need LiteMedSAM and are the benchmark's business)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_head_speed  # noqa: E402


def test_slab_is_61_slices_around_the_brain_middle_with_24_labelled_and_37_held_out():
    labels = np.zeros((5, 200, 7), np.uint8)
    labels[:, 40:161] = 1  # the "brain" on slices 40..160 of axis 1: its middle is 100
    slab, train, held = bench_head_speed.slab_split(labels, 1)
    assert slab == list(range(70, 131))
    assert len(train) == 24 and len(set(train)) == 24 and set(train) <= set(slab)
    assert train[0] == 72 and train[-1] == 128  # spread from the 3rd to the 3rd-last slice, as bench_gui's figure
    assert sorted(set(held) | set(train)) == slab and not set(held) & set(train) and len(held) == 37
