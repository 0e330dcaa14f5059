"""GUI tests: import triton before any OpenGL context exists.

napari's canvas on Mesa (llvmpipe under Xvfb) maps Mesa's libLLVM; importing triton's own LLVM
after that crashes the process. The plugin guards itself (``session.avoid_triton_llvm_clash``, run
when a model loads), but other test modules in the same pytest process (core fine-tuning builds
torch optimisers, which import triton) may run after a GUI test: importing triton first, while it is
still safe, keeps the whole suite order-independent.
"""

from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import pytest

if sys.platform.startswith("linux") and "triton" not in sys.modules:
    try:
        if importlib.util.find_spec("triton") is not None:
            import triton  # noqa: F401
    except ImportError:
        pass


PLUGIN = "napari-medsam"


def finetune_dock(viewer, image, drawn, target, steps):
    """A Fine-tune dock on ``image`` / ``drawn`` with head (or adapter) ``target`` chosen and ``steps`` epochs."""
    _, fw = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    fw.image_combo.set_layer(image)
    fw.labels_combo.set_layer(drawn)
    index = fw.head_combo.findData(target)
    assert index >= 0, target
    fw.head_combo.setCurrentIndex(index)
    fw.epochs_spin.setValue(steps)
    return fw


def wait_job(qtbot, job, timeout=120_000):
    if job is not None:
        qtbot.waitUntil(lambda: job.done, timeout=timeout)


@pytest.fixture(autouse=True)
def _napari_settings_in_memory(monkeypatch):
    """napari settings that are never saved: the first dock writes reader preferences
    (``_reader.prefer_our_reader``), which must not reach the user's settings file."""
    import napari.settings as ns
    from napari.settings._napari_settings import NapariSettings

    settings = NapariSettings(config_path=None)
    monkeypatch.setattr(ns, "_SETTINGS", settings)
    return settings


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def widgets(viewer, qtbot):
    """The Model and Annotate widgets docked through the manifest, with the tiny model loaded."""
    _, model_w = viewer.window.add_plugin_dock_widget(PLUGIN, "Model")
    _, annot_w = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate")
    model_w.select_model("test_tiny_lite")
    model_w.load()
    wait_job(qtbot, model_w.load_job)
    assert model_w.session.loaded is not None and model_w.session.loaded.name == "test_tiny_lite"
    assert annot_w.session is model_w.session  # one session per viewer, shared by its widgets
    yield SimpleNamespace(model=model_w, annot=annot_w)
    for w in (model_w, annot_w):
        for job in (getattr(w, "embed_job", None), getattr(w, "propagate_job", None),
                    getattr(w, "_preview_job", None), getattr(w, "status_job", None)):
            if job is not None:
                job.cancel()
                wait_job(qtbot, job, timeout=60_000)
