"""The Fine-tune dock trains, applies, saves and reloads the hsam and selfprompt heads (issue 13).

Tiny random model (``test_tiny_lite``), three training steps: the dock's code paths for these two
families, not their quality (benchmarks/bench_heads.py measures that on a real volume).
"""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import finetune_dock, wait_job

pytestmark = pytest.mark.gui


@pytest.mark.parametrize("kind", ["hsam", "selfprompt"])
def test_dock_trains_segments_and_reloads(viewer, widgets, qtbot, tmp_path, kind):
    from napari_medsam._sample_data import synthetic_volume

    vol = synthetic_volume((6, 48, 48))
    image = viewer.add_image(vol, name="ct")
    truth = np.zeros(vol.shape, np.uint16)
    for z in (1, 4):
        truth[z][vol[z] > 100] = 1
    drawn = viewer.add_labels(truth.copy(), name="drawn")
    fw = finetune_dock(viewer, image, drawn, kind, steps=3)
    fw.train()
    wait_job(qtbot, fw.train_job)
    assert fw.head is not None and fw.head.kind == kind
    assert fw.head.meta.training_slices == (1, 4) and fw.head.meta.history["steps"] == 3

    n_layers = len(viewer.layers)
    fw.segment()
    wait_job(qtbot, fw.predict_job)
    assert len(viewer.layers) == n_layers + 1
    pred = fw.prediction_layer
    assert pred is not drawn and pred.data.shape == vol.shape
    assert set(np.unique(pred.data)) <= {0, 1}
    np.testing.assert_array_equal(drawn.data, truth)  # what the user drew is untouched

    path = tmp_path / f"{kind}.head.pt"
    fw.save_head(str(path))
    wait_job(qtbot, fw.io_job)
    first = fw.head
    fw.head = None
    fw.load_head(str(path))
    wait_job(qtbot, fw.io_job)
    assert fw.head is not None and fw.head.kind == kind and fw.head.meta.config == first.meta.config
