"""The Annotate dock's zoomed previews of small boxes (tiny random model, a real napari viewer).

A small box's quick preview (on the slice's embedding) is drawn first; a worker then embeds the
window around the box and the decode on it runs on the main thread; the zoomed mask replaces the
quick one and is what Commit writes. "Zoom in on small objects" switches it off; a newer prompt
drops an older prompt's zoomed preview; a Commit pressed meanwhile waits for the zoomed one.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_medsam._qt._shared import encoder_request
from napari_medsam.core.progress import Progress

from .conftest import wait_job

pytestmark = pytest.mark.gui

SMALL_A = (50, 42, 62, 58)  # on a 120 x 100 slice: a 32 px window, x3.75
SMALL_B = (30, 60, 40, 74)


@pytest.fixture
def annot(widgets, qtbot):
    annot = widgets.annot
    annot.prefetch_check.setChecked(False)  # these tests time nothing; fewer threads
    yield annot
    wait_job(qtbot, annot._refine_job, timeout=60_000)
    annot.prefetch.close()


@pytest.fixture
def image(viewer, annot):
    vol = np.random.default_rng(7).random((3, 120, 100)).astype(np.float32) * 40
    vol[1, 52:60, 44:56] = 200.0
    vol[1, 32:38, 62:72] = 150.0
    layer = viewer.add_image(vol, name="small")
    annot.image_combo.set_layer(layer)
    viewer.dims.set_point(0, layer.data_to_world([1, 0, 0])[0])
    return layer


def _rect(z, r0, c0, r1, c1):
    return np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]], float)


def _idle(annot):
    return all(j is None or not j.running for j in (annot._preview_job, annot._refine_job))


def _expected(annot, image):
    """The quick and the zoomed mask of the prompt now on slice 1, computed apart from the dock."""
    _img, view, prompt, req, _tag = annot._snapshot()
    assert view.index == 1 and prompt is not None
    s = annot.session
    quick = s.preview(1, prompt, req).mask
    zoomed = s.refine(1, prompt, req)
    return quick, None if zoomed is None else zoomed.mask


def test_a_small_box_ends_with_the_zoomed_mask_in_the_preview_and_committed(viewer, annot, image, qtbot):
    assert annot.zoom_check.isChecked() and annot.session.zoom is not None  # on by default
    _, shp = annot.prompt_layers()
    latencies = []
    annot.zoom_shown.connect(lambda latency, compute: latencies.append((latency, compute)))
    shp.add_rectangles(_rect(1, *SMALL_A))
    qtbot.waitUntil(lambda: annot.zooms_shown == 1 and _idle(annot), timeout=60_000)
    quick, zoomed = _expected(annot, image)
    assert zoomed is not None and not np.array_equal(quick, zoomed)  # the two differ: the test can tell
    np.testing.assert_array_equal(annot._preview.data[1] > 0, zoomed)
    assert annot._last is not None and np.array_equal(annot._last[1].mask, zoomed)
    assert annot.previews_shown == 1  # the quick one reached the screen first
    assert len(latencies) == 1 and latencies[0][0] >= annot.last_latency and latencies[0][1] > 0
    assert "zoomed ×3.8" in annot.status_label.text()
    assert f"{1000 * annot.last_zoom_latency:.0f} ms" in annot.status_label.text()  # what is on screen took
    annot.commit()
    labels = annot.labels_layer
    np.testing.assert_array_equal(labels.data[1] == 1, zoomed)
    assert labels.data[[0, 2]].sum() == 0


@pytest.mark.parametrize("inline_s", [0.1, None], ids=["decode-here", "decode-in-worker"])
def test_a_commit_pressed_before_the_previews_writes_the_zoomed_mask(viewer, annot, image, qtbot, inline_s):
    annot.inline_preview_s = inline_s  # None: the quick preview is decoded in a worker too
    _, shp = annot.prompt_layers()
    shp.add_rectangles(_rect(1, *SMALL_A))
    quick, zoomed = _expected(annot, image)  # (before the dock's previews arrive: the worker embeds the slice)
    annot.commit()
    qtbot.waitUntil(lambda: len(annot.edits) > 0 and _idle(annot), timeout=60_000)
    assert annot.zooms_shown == 1
    np.testing.assert_array_equal(annot.labels_layer.data[1] == 1, zoomed)
    assert not np.array_equal(zoomed, quick)


def test_unchecking_gives_the_quick_mask_only(viewer, annot, image, qtbot):
    annot.zoom_check.setChecked(False)
    assert annot.session.zoom is None
    _, shp = annot.prompt_layers()
    shp.add_rectangles(_rect(1, *SMALL_A))
    qtbot.waitUntil(lambda: annot.previews_shown == 1 and _idle(annot), timeout=60_000)
    annot.session.zoom = annot._zoom_context  # what it would give zoomed (to tell them apart)
    quick, zoomed = _expected(annot, image)
    annot.session.zoom = None
    assert annot.zooms_shown == 0 and annot._refine_job is None
    np.testing.assert_array_equal(annot._preview.data[1] > 0, quick)
    assert not np.array_equal(quick, zoomed) and "zoom" not in annot.status_label.text()
    annot.zoom_check.setChecked(True)  # on again: the prompt on screen is zoomed
    qtbot.waitUntil(lambda: annot.zooms_shown == 1 and _idle(annot), timeout=60_000)
    np.testing.assert_array_equal(annot._preview.data[1] > 0, zoomed)
    annot.zoom_check.setChecked(False)  # off: back to the quick mask, and Commit writes that
    qtbot.waitUntil(lambda: annot._last is not None and _idle(annot), timeout=60_000)
    np.testing.assert_array_equal(annot._preview.data[1] > 0, quick)
    annot.commit()
    np.testing.assert_array_equal(annot.labels_layer.data[1] == 1, quick)


def test_a_prompt_change_during_the_refine_shows_the_latest_prompts_result_only(viewer, annot, image, qtbot,
                                                                                  monkeypatch):
    s = annot.session
    gate = threading.Event()
    real_steps, real_refined = s.refine_steps, s.refined
    decoded, prompts = [], []

    def gated(req, index, prompt):  # the first prompt's encoder call takes until the gate opens
        yield Progress(0, 1, "zooming")
        if tuple(round(v) for v in prompt.box) == SMALL_A:
            assert gate.wait(30)
        return (yield from real_steps(req, index, prompt))

    def recorded(req, index, prompt):
        decoded.append(tuple(round(v) for v in prompt.box))
        prompts.append(prompt)
        return real_refined(req, index, prompt)

    monkeypatch.setattr(s, "refine_steps", gated)
    monkeypatch.setattr(s, "refined", recorded)
    _, shp = annot.prompt_layers()
    shp.add_rectangles(_rect(1, *SMALL_A))
    qtbot.waitUntil(lambda: annot.previews_shown == 1 and annot._refine_job is not None, timeout=60_000)
    assert annot._last is None and annot._quick is not None  # the quick mask on screen; not what Commit writes
    assert "zooming" in annot.status_label.text()
    shp.data = [_rect(1, *SMALL_B)]  # the user moves the box while A's window is embedded
    qtbot.waitUntil(lambda: annot.previews_shown == 2, timeout=60_000)
    annot.commit()  # while a zoomed preview is on its way: it waits for it
    qtbot.wait(50)
    assert len(annot.edits) == 0 and annot._commit_pending
    gate.set()
    qtbot.waitUntil(lambda: len(annot.edits) > 0 and _idle(annot), timeout=60_000)
    assert decoded == [SMALL_B] and annot.zooms_shown == 1  # A's zoomed preview was dropped, never drawn
    monkeypatch.undo()
    zoomed_b = s.refine(1, prompts[-1], encoder_request(image, viewer, s))
    np.testing.assert_array_equal(annot.labels_layer.data[1] == 1, zoomed_b.mask)


def test_a_window_forgotten_before_its_decode_is_embedded_again_in_the_worker(viewer, annot, image, qtbot,
                                                                               monkeypatch):
    """The encoder keeps its last 8 windows: if the prompt's window left that memory between the
    worker's embedding and the decode here, the decode must not embed it on the main thread (an
    encoder pass there freezes the window): the worker embeds it again, then the zoomed mask comes."""
    from napari_medsam.core import encoder as encoder_mod

    s = annot.session
    real_steps = s.refine_steps
    runs = []

    def steps(req, index, prompt):  # the first run's window is forgotten once it is embedded
        runs.append(1)
        first = len(runs) == 1
        gen = real_steps(req, index, prompt)
        try:
            while True:
                p = next(gen)
                if first and p.message == "embedded":
                    s.peek_encoder(req)._windows.clear()
                yield p
        except StopIteration as stop:
            return stop.value

    on_main = []
    real_run = encoder_mod.run_encoder

    def run(*a):
        on_main.append(threading.current_thread() is threading.main_thread())
        return real_run(*a)

    monkeypatch.setattr(s, "refine_steps", steps)
    monkeypatch.setattr(encoder_mod, "run_encoder", run)
    _, shp = annot.prompt_layers()
    shp.add_rectangles(_rect(1, *SMALL_A))
    qtbot.waitUntil(lambda: annot.zooms_shown == 1 and _idle(annot), timeout=60_000)
    assert len(runs) == 2  # the worker embedded the window a second time
    assert on_main and not any(on_main)  # never an encoder call on the main thread
    monkeypatch.undo()
    _quick, zoomed = _expected(annot, image)
    np.testing.assert_array_equal(annot._preview.data[1] > 0, zoomed)

