"""The Annotate widget's background prefetching (tiny random model, a real napari viewer).

While the user browses a volume, the slices around the one under view are embedded in a
background thread through the session's encoder and cache; these tests check that the
neighbourhood follows the slider, that the checkbox, a propagation, a new model, new data, a
removed layer and a closed widget each stop or pause it, and that no thread is left behind.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from napari_medsam._qt import _workers
from napari_medsam._qt._shared import encoder_request
from napari_medsam.core import encoder as encoder_mod
from napari_medsam.core.progress import Progress

pytestmark = pytest.mark.gui

THREAD_NAME = "napari-medsam-prefetch"


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


@pytest.fixture
def annot(widgets, qtbot):
    """The Annotate widget (docked with the Model widget, tiny model loaded); no prefetch thread left after."""
    yield widgets.annot
    widgets.annot.prefetch.close()
    qtbot.waitUntil(lambda: not _prefetch_threads(), timeout=30_000)


@pytest.fixture
def volume(viewer, annot):
    layer = viewer.add_image(np.random.default_rng(0).random((16, 32, 30)).astype(np.float32), name="vol")
    annot.image_combo.set_layer(layer)
    return layer


def _go_to(viewer, image, z):
    viewer.dims.set_point(0, image.data_to_world([z, 0, 0])[0])


def _encoder(annot, image):
    return annot.session.peek_encoder(encoder_request(image, annot.viewer, annot.session))


def _cached(annot, image) -> set[int]:
    enc = _encoder(annot, image)
    return set() if enc is None else enc.cached_indices()


def _wait_cached(qtbot, annot, image, wanted, timeout=60_000):
    qtbot.waitUntil(lambda: set(wanted) <= _cached(annot, image), timeout=timeout)


def test_the_neighbours_of_the_slice_under_view_are_embedded(viewer, annot, qtbot):
    tall = viewer.add_image(np.random.default_rng(4).random((48, 24, 20)).astype(np.float32), name="tall")
    annot.image_combo.set_layer(tall)
    assert annot.prefetch_check.isChecked()  # on by default
    _go_to(viewer, tall, 30)
    _wait_cached(qtbot, annot, tall, {29, 30, 31})
    qtbot.waitUntil(lambda: "ready" in annot.prefetch_label.text(), timeout=10_000)
    _go_to(viewer, tall, 34)  # browsing up: 8 slices ahead, 4 behind
    _wait_cached(qtbot, annot, tall, {30, 33, 34, 35, 42})
    pf = annot.prefetch.prefetcher
    assert pf is not None and pf.wait_idle(30)
    qtbot.waitUntil(lambda: annot.prefetch_label.text().startswith("13 / 13"), timeout=10_000)
    assert not _cached(annot, tall) & set(range(15))  # only the neighbourhoods: nothing far away
    # the prefetcher embeds through the session's encoder: a preview on these slices reuses them
    assert pf.encoder is _encoder(annot, tall)


def test_moving_the_slider_never_waits_for_the_encoder(viewer, annot, volume, qtbot, monkeypatch):
    _go_to(viewer, volume, 2)
    qtbot.waitUntil(lambda: annot.prefetch.prefetcher is not None, timeout=30_000)
    started, release = threading.Event(), threading.Event()
    real = encoder_mod.run_encoder

    def slow(*a):
        if threading.current_thread().name == THREAD_NAME:
            started.set()
            release.wait(10)
        return real(*a)

    monkeypatch.setattr(encoder_mod, "run_encoder", slow)
    try:
        _go_to(viewer, volume, 9)  # 9 is not cached: the prefetcher starts on it and blocks
        assert started.wait(30)
        t0 = time.perf_counter()
        for z in (10, 11, 12, 11):
            _go_to(viewer, volume, z)
        assert time.perf_counter() - t0 < 1.0  # a blocked update() would wait 10 s
    finally:
        release.set()
    _wait_cached(qtbot, annot, volume, {10, 11, 12})


def test_unchecking_the_box_stops_prefetching(viewer, annot, volume, qtbot):
    _go_to(viewer, volume, 3)
    qtbot.waitUntil(lambda: _prefetch_threads() != [], timeout=30_000)
    annot.prefetch_check.setChecked(False)
    assert annot.prefetch.prefetcher is None
    qtbot.waitUntil(lambda: not _prefetch_threads(), timeout=30_000)
    before = _cached(annot, volume)
    _go_to(viewer, volume, 13)
    qtbot.wait(600)
    assert _cached(annot, volume) == before and 13 not in before
    assert annot.prefetch_label.text() == ""
    annot.prefetch_check.setChecked(True)  # on again: it picks up where the user is
    _wait_cached(qtbot, annot, volume, {12, 13, 14})


def test_removing_the_layer_or_closing_the_widget_stops_the_thread(viewer, annot, volume, qtbot):
    _go_to(viewer, volume, 5)
    qtbot.waitUntil(lambda: len(_prefetch_threads()) == 1, timeout=30_000)
    viewer.layers.remove(volume)
    assert annot.prefetch.prefetcher is None
    qtbot.waitUntil(lambda: not _prefetch_threads(), timeout=30_000)

    other = viewer.add_image(np.random.default_rng(1).random((8, 24, 24)).astype(np.float32), name="other")
    annot.image_combo.set_layer(other)
    _go_to(viewer, other, 4)
    qtbot.waitUntil(lambda: len(_prefetch_threads()) == 1, timeout=30_000)
    annot.close()  # closeEvent -> cleanup
    qtbot.waitUntil(lambda: not _prefetch_threads(), timeout=30_000)
    assert annot.prefetch.prefetcher is None
    _go_to(viewer, other, 1)  # the closed widget no longer follows the viewer
    qtbot.wait(300)
    assert not _prefetch_threads()


def test_a_new_model_or_new_data_gets_a_new_prefetcher(viewer, annot, volume, qtbot):
    from napari_medsam.core.build import load_model

    _go_to(viewer, volume, 8)
    qtbot.waitUntil(lambda: annot.prefetch.prefetcher is not None, timeout=30_000)
    first = annot.prefetch.prefetcher
    loaded = load_model("test_tiny_lite", device="cpu")  # another model object: new encoders
    annot.session.set_model(loaded)
    qtbot.waitUntil(lambda: annot.prefetch.prefetcher not in (None, first), timeout=30_000)
    assert not first.running or first._stop.is_set()
    assert annot.prefetch.prefetcher.encoder.loaded is loaded
    _wait_cached(qtbot, annot, volume, {7, 8, 9})

    second = annot.prefetch.prefetcher
    volume.data = np.random.default_rng(2).random((16, 32, 30)).astype(np.float32)
    qtbot.waitUntil(lambda: annot.prefetch.prefetcher not in (None, second), timeout=30_000)
    enc = annot.prefetch.prefetcher.encoder
    assert enc is not second.encoder and enc.content_hash != second.encoder.content_hash
    _wait_cached(qtbot, annot, volume, {7, 8, 9})
    qtbot.waitUntil(lambda: len(_prefetch_threads()) == 1, timeout=30_000)


def test_prefetching_waits_while_a_propagation_runs(viewer, annot, volume, qtbot, monkeypatch):
    _go_to(viewer, volume, 4)
    qtbot.waitUntil(lambda: annot.prefetch.prefetcher is not None, timeout=30_000)
    assert annot.prefetch.prefetcher.wait_idle(30)
    release = threading.Event()

    def stalled(req, seeds, params=None, *, cancel=None, span=None):
        while not release.is_set() and not cancel.is_set():
            yield Progress(0, 0, "propagating")
            time.sleep(0.02)
        return {}

    monkeypatch.setattr(annot.session, "propagate_steps", stalled)
    _, shp = annot.prompt_layers()
    shp.add_rectangles(np.array([[4, 3, 3], [4, 3, 20], [4, 20, 20], [4, 20, 3]], float))
    annot.propagate()
    assert annot.propagate_job is not None and annot.propagate_job.running
    pf = annot.prefetch.prefetcher
    assert pf._pause_count > 0 and annot.session.cpu_jobs == 1
    qtbot.wait(200)
    before = _cached(annot, volume)
    _go_to(viewer, volume, 14)  # far away: nothing new may be embedded while it propagates
    qtbot.wait(800)
    assert 14 not in _cached(annot, volume) or 14 in before
    release.set()
    qtbot.waitUntil(lambda: annot.propagate_job.done, timeout=30_000)
    assert annot.session.cpu_jobs == 0 and pf._pause_count == 0
    _wait_cached(qtbot, annot, volume, {13, 14, 15})


def test_a_job_that_needs_the_cpu_is_counted_until_it_finishes(annot, qtbot):
    session = annot.session
    seen = []
    session.busy_changed.connect(seen.append)

    def steps(cancel):
        yield Progress(0, 1, "working")
        return 1

    job = session.hold_cpu(_workers.start(steps, desc="test"))
    assert session.cpu_jobs == 1
    qtbot.waitUntil(lambda: job.done, timeout=30_000)
    qtbot.waitUntil(lambda: session.cpu_jobs == 0, timeout=5_000)
    assert seen == [1, 0]
    assert session.hold_cpu(job) is job and session.cpu_jobs == 0  # a finished job holds nothing
    session.busy_changed.disconnect(seen.append)


def test_2d_images_prefetch_their_single_slice(viewer, annot, qtbot):
    flat = viewer.add_image(np.random.default_rng(5).random((30, 26)).astype(np.float32), name="flat")
    annot.image_combo.set_layer(flat)
    _wait_cached(qtbot, annot, flat, {0})
    assert _encoder(annot, flat).n_slices == 1


def test_selecting_an_image_away_from_the_viewers_point_stops_the_old_prefetcher(viewer, annot, volume, qtbot):
    _go_to(viewer, volume, 5)
    qtbot.waitUntil(lambda: annot.prefetch.prefetcher is not None, timeout=30_000)
    far = viewer.add_image(np.zeros((4, 32, 30), np.float32), name="far", translate=(500.0, 0.0, 0.0))
    annot.image_combo.set_layer(far)  # the viewer's point lies outside it: no slice under view
    assert annot.prefetch.prefetcher is None
    qtbot.waitUntil(lambda: not _prefetch_threads(), timeout=30_000)
    annot.image_combo.set_layer(volume)
    qtbot.waitUntil(lambda: annot.prefetch.prefetcher is not None, timeout=30_000)


def test_prefetched_slices_are_announced_to_the_other_docks(viewer, annot, volume, qtbot):
    """The Model dock's "n slices cached" line listens to ``embeddings_changed``."""
    seen = []
    annot.session.embeddings_changed.connect(seen.append)
    _go_to(viewer, volume, 8)
    _wait_cached(qtbot, annot, volume, {7, 8, 9})
    qtbot.waitUntil(lambda: id(volume) in seen, timeout=10_000)


def test_a_new_intensity_choice_restarts_prefetching_without_a_slider_move(viewer, widgets, annot, volume, qtbot):
    model_w = widgets.model
    _go_to(viewer, volume, 8)
    qtbot.waitUntil(lambda: annot.prefetch.prefetcher is not None, timeout=30_000)
    first = annot.prefetch.prefetcher
    assert first.wait_idle(30)  # settled: no progress line changes (which would also re-follow)
    def settled() -> bool:
        ready, _, wanted = annot.prefetch_label.text().partition(" ready")[0].partition(" / ")
        return ready.strip().isdigit() and ready.strip() == wanted.strip()

    qtbot.waitUntil(settled, timeout=10_000)
    qtbot.wait(1000)
    model_w.intensity_combo.setCurrentText("min-max")
    qtbot.waitUntil(lambda: annot.prefetch.prefetcher not in (None, first), timeout=30_000)
    assert annot.prefetch.prefetcher.encoder.intensity != first.encoder.intensity
