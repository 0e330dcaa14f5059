"""The Fine-tune and Model docks: adapters trained, saved, applied, removed and loaded from the
docks (issue 14 item 6); the loss curve smoothed with a label that ends on the head's reported
loss, and predictions in colours distinct from the user's labels (issue 16 item 5).

Tiny random model (``test_tiny_lite``), a few training steps: the code paths, not the quality.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam import _layers
from napari_medsam._qt._loss_plot import LossPlot, moving_average

from .conftest import finetune_dock, wait_job

pytestmark = pytest.mark.gui


def _volume_and_labels(viewer):
    from napari_medsam._sample_data import synthetic_volume

    vol = synthetic_volume((6, 48, 48))
    image = viewer.add_image(vol, name="ct", scale=(2.5, 0.8, 0.8))
    truth = np.zeros(vol.shape, np.uint16)
    for z in (1, 3):
        truth[z][vol[z] > 100] = 1
    drawn = viewer.add_labels(truth, name="drawn", scale=(2.5, 0.8, 0.8))
    drawn.colormap = _layers.class_colormap(_layers.default_classes())
    return image, drawn


def test_moving_average_and_label(qtbot):
    rng = np.random.default_rng(0)
    raw = np.abs(rng.normal(0.3, 0.3, 120))
    raw[7] = np.nan  # a non-finite step is left out of the curve
    plot = LossPlot(window=10)
    qtbot.addWidget(plot)
    for v in raw:
        plot.add(v)
    finite = raw[np.isfinite(raw)]
    expected = np.array([finite[max(0, i - 9):i + 1].mean() for i in range(finite.size)])
    np.testing.assert_allclose(plot.smoothed(), expected)
    np.testing.assert_allclose(moving_average([1.0, 3.0, 5.0], 2), [1.0, 2.0, 4.0])
    assert plot.smoothed().std() < finite.std() / 2  # smoother than the raw steps
    assert plot.label() == f"loss {expected[-1]:.3f} (mean of the last 10 steps)"
    plot.set_final(0.289)
    assert plot.label() == "final loss 0.289"
    plot.resize(200, 80)
    plot.grab()  # paints both curves without error
    plot.clear()
    assert plot.label() == "loss" and plot.final is None


def test_head_loss_label_and_prediction_colours(viewer, widgets, qtbot):
    image, drawn = _volume_and_labels(viewer)
    fw = finetune_dock(viewer, image, drawn, "cnn", steps=3)
    fw.train()
    wait_job(qtbot, fw.train_job)
    final = fw.head.meta.history["final_loss"]
    assert fw.loss_plot.label() == f"final loss {final:.3f}"  # what the Head box says
    assert f"final loss {final:.3f}" in fw.head_label.text()
    trained_in = fw.head.meta.history["precision"]  # the precision is named (issue 16 item 4)
    assert f"({trained_in})" in fw.head_label.text() and f"; {trained_in})." in fw.loss_label.text()
    fw.segment()
    wait_job(qtbot, fw.predict_job)
    from napari_medsam.core.device import head_precision, precision_name

    predicted_in = precision_name(head_precision("auto", fw.session.loaded, fw.head.module))
    assert f"s ({predicted_in}) into a new layer" in fw.loss_label.text()
    pred = fw.prediction_layer
    user_colour = drawn.colormap.map(1)
    pred_colour = pred.colormap.map(1)
    assert not np.allclose(pred_colour, user_colour)  # class 1 predicted: not the user's red
    np.testing.assert_allclose(pred_colour, _layers.proposal_colormap().map(1))
    from napari_medsam._qt import review_widget

    assert review_widget.PROPOSAL_COLOURS is _layers.PROPOSAL_COLOURS  # one palette for proposals too


def test_segment_again_replaces_an_unedited_prediction_and_keeps_an_edited_one(viewer, widgets, qtbot):
    """An unedited prediction is a proposal: Segment volume again writes into it instead of stacking
    layers; once the user paints on it, it is theirs and the next prediction gets a new layer."""
    image, drawn = _volume_and_labels(viewer)
    fw = finetune_dock(viewer, image, drawn, "cnn", steps=2)
    fw.train()
    wait_job(qtbot, fw.train_job)
    n = len(viewer.layers)
    fw.segment()
    wait_job(qtbot, fw.predict_job)
    first = fw.prediction_layer
    assert len(viewer.layers) == n + 1 and "into a new layer" in fw.loss_label.text()
    first.data = np.zeros_like(first.data)  # stands for an older prediction: the next one must overwrite it
    fw._prediction_untouched = True  # (that assignment was not the user's edit)
    fw.segment()
    wait_job(qtbot, fw.predict_job)
    assert fw.prediction_layer is first and len(viewer.layers) == n + 1
    assert "replacing its unedited earlier prediction" in fw.loss_label.text()
    assert first.data.any()  # the new prediction is in it
    first.paint((2, 10, 10), 1)  # the user corrects the prediction: it is theirs now
    kept = np.asarray(first.data).copy()
    fw.segment()
    wait_job(qtbot, fw.predict_job)
    assert fw.prediction_layer is not first and len(viewer.layers) == n + 2
    np.testing.assert_array_equal(first.data, kept)  # the edited layer is untouched


def test_adapter_trains_applies_saves_removes_and_loads(viewer, widgets, qtbot, tmp_path):
    from napari_medsam.core.adapt import adapter_config, base_model

    image, drawn = _volume_and_labels(viewer)
    session = widgets.model.session
    plain = session.loaded
    assert "No adapter" in widgets.model.adapter_label.text()
    assert not widgets.model.adapter_remove_button.isEnabled()
    fw = finetune_dock(viewer, image, drawn, "adapter:medsa", steps=2)
    assert fw.epochs_label.text() == "Steps"
    seen = []
    original = fw._on_adapter_progress
    fw._on_adapter_progress = lambda p: (seen.append((p.message, dict(p.info))), original(p))[1]
    fw.train()
    wait_job(qtbot, fw.train_job)
    assert not fw.train_job.cancelled
    messages = [m for m, _ in seen]
    first_step = messages.index("training")
    assert "estimated" in messages[:first_step]  # the estimate came before the first step
    assert np.isfinite(fw.estimate_s) and fw.estimate_s > 0
    adapted = session.loaded
    assert adapter_config(adapted).kind == "medsa" and base_model(adapted) is plain
    assert adapted.variant != plain.variant  # its embeddings are keyed apart
    assert fw.trained_adapter.meta.history["steps"] == 2
    assert fw.loss_plot.label() == f"final loss {fw.trained_adapter.meta.history['final_loss']:.3f}"
    text = widgets.model.adapter_label.text()
    assert text.startswith("Active: adapter medsa") and widgets.model.adapter_remove_button.isEnabled()
    assert not widgets.model.adapter_label.isHidden()  # the line shows only while an adapter is active
    wait_job(qtbot, fw.io_job)
    path = fw.adapter_path
    assert path is not None and path.is_file() and path.name.endswith(".adapter.pt")
    assert "medsam-cache" in str(path)  # the user cache (the tests' own, see tests/conftest.py)
    # the Annotate dock's previews now run on the adapted encoder
    from napari_medsam._qt._shared import encoder_request

    req = encoder_request(image, viewer, session)
    assert session.encoder(req).loaded is adapted

    widgets.model.adapter_remove_button.click()
    assert session.loaded is plain and "No adapter" in widgets.model.adapter_label.text()
    assert widgets.model.adapter_label.isHidden() and widgets.model.adapter_remove_button.isHidden()
    job = widgets.model.load_adapter(str(path))
    wait_job(qtbot, job)
    assert adapter_config(session.loaded).kind == "medsa"
    assert session.loaded.variant == adapted.variant  # the same weights, the same cache key


def test_lora_adapter_and_cancel(viewer, widgets, qtbot):
    from napari_medsam.core.adapt import adapter_config

    image, drawn = _volume_and_labels(viewer)
    session = widgets.model.session
    plain = session.loaded
    fw = finetune_dock(viewer, image, drawn, "adapter:lora", steps=5000)
    fw.train()
    qtbot.waitUntil(lambda: len(fw.loss_plot.values) >= 1, timeout=120_000)
    fw.cancel()
    wait_job(qtbot, fw.train_job)
    assert fw.train_job.cancelled and session.loaded is plain  # nothing applied
    assert "cancelled" in fw.loss_label.text()
    fw.epochs_spin.setValue(1)
    fw.train()
    wait_job(qtbot, fw.train_job)
    assert adapter_config(session.loaded).kind == "lora"
    wait_job(qtbot, fw.io_job)
