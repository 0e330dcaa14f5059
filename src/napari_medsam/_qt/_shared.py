"""What the three docks share: which layers are images, the snapshot of what to embed, loading.

Each is a thin adapter between napari objects and the GUI-free session
(:class:`~napari_medsam.app.session.AnnotationSession`); no maths here.
"""

from __future__ import annotations

from typing import Any

from .. import _layers
from ..app.params import ModelChoice
from ..app.session import AnnotationSession, EncoderRequest
from . import _gc, _workers

__all__ = ["encoder_request", "is_image", "load_model_job"]


def is_image(layer: Any) -> bool:
    from napari.layers import Image

    return isinstance(layer, Image) and int(layer.ndim) in (2, 3)


def encoder_request(layer: Any, viewer: Any, session: AnnotationSession) -> EncoderRequest | None:
    """Snapshot (main thread) of what to embed for ``layer`` along the axis under view."""
    if layer is None or not is_image(layer):
        return None
    view = _layers.current_slice(viewer.dims, layer)
    axis = view.axis if view is not None else _layers.slice_axis(viewer.dims, layer) if layer.ndim == 3 else 0
    data = _layers._plain_data(layer)
    return EncoderRequest(image_id=id(layer), data_id=id(data), volume=_layers.image_volume(layer), axis=axis,
                          intensity=session.intensity, name=layer.name)


def load_model_job(session: AnnotationSession, choice: ModelChoice, *, on_progress: Any = None,
                   on_done: Any = None) -> _workers.Job:
    """Load ``choice`` into ``session`` in a thread worker (shared by every widget)."""

    def returned(loaded: Any) -> None:
        session.set_model(loaded, choice)
        _gc.settle()  # the load is a wait the user expects: the collector's full scan goes here

    def finished(job: _workers.Job) -> None:
        if on_done is not None:
            on_done(job)

    return _workers.start(lambda cancel: session.load_model_steps(choice), desc=f"Loading {choice.name}",
                          on_progress=on_progress, on_returned=returned, on_finished=finished,
                          cancelable=False, show_bar=session.napari_progress)
