"""What the user-guide screenshot scripts share: a real napari window on the MNI152 sample, the
Model dock, waiting for workers, painting a slice as a user would, and taking the window as a PNG.

Used by ``docs/screenshots.py`` (prompting, propagation, fine-tuning) and
``docs/screenshots_review.py`` (the Review dock). Run those under a display, e.g.
``xvfb-run -a -s "-screen 0 1920x1200x24" python docs/screenshots_review.py``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "images"


def pump(seconds: float) -> None:
    """Let Qt process events for ``seconds`` (workers report back, the canvas repaints)."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.005)


def wait(job: Any, timeout: float = 1800) -> None:
    """Wait for a dock's worker job to finish (Qt keeps running)."""
    from napari_medsam._qt import _workers

    _workers.wait(job, int(timeout * 1000))
    pump(0.3)


def shot(viewer: Any, name: str, size: tuple[int, int] | None = None) -> Path:
    """The whole window (canvas, layer list and docked widgets) as ``docs/images/<name>``;
    ``size``: resize the window to (width, height) first and fit the view to it."""
    from PIL import Image

    if size is not None:
        viewer.window.resize(*size)
        pump(1.5)
        viewer.reset_view()
    pump(0.5)
    img = viewer.screenshot(canvas_only=False, flash=False)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    Image.fromarray(img).save(path, optimize=True)
    print(f"wrote {path} {img.shape[1]}x{img.shape[0]}", flush=True)
    return path


def open_mni(model: str, *, size: tuple[int, int] = (1500, 1000)) -> tuple[Any, Any, Any]:
    """A napari window of ``size`` with the MNI152 sample and the Model dock, ``model`` selected
    (not loaded). Embeddings go to a fresh cache folder unless ``NAPARI_MEDSAM_CACHE`` names one.
    Returns ``(viewer, image layer, model dock)``."""
    os.environ.setdefault("NAPARI_MEDSAM_CACHE", tempfile.mkdtemp(prefix="medsam-shots-"))
    import napari

    viewer = napari.Viewer(title="napari-medsam")
    viewer.window.resize(*size)
    viewer.open_sample("napari-medsam", "mni152")
    image = viewer.layers[0]
    _, model_w = viewer.window.add_plugin_dock_widget("napari-medsam", "Model")
    model_w.select_model(model)
    return viewer, image, model_w


def paint_slice(labels: Any, values: Any, axis: int, index: int) -> None:
    """What painting slice ``index`` (along ``axis``) with ``values`` (the whole volume's) does:
    the voxels written through the layer, so napari records the edit and emits its paint event."""
    import numpy as np

    shape = tuple(n for a, n in enumerate(values.shape) if a != axis)
    idx = [a.ravel() for a in np.indices(shape)]
    idx.insert(axis, np.full(idx[0].shape, index))
    full = tuple(idx)
    labels.data_setitem(full, values[full])
