"""One :class:`~napari_medsam.app.session.AnnotationSession` per viewer, shared by its dock widgets.

The session itself is GUI-free (:mod:`napari_medsam.app`); only this mapping knows viewers. It is
a ``WeakKeyDictionary``: two viewers, or two tests, never share a model or an encoder, and a closed
viewer's session goes with it.

The first dock opened on a viewer also sets up what the plugin does once per viewer
(:func:`_first_dock`): scans with an anatomical affine open in the axial radiological view
(:func:`~napari_medsam._orientation.show_radiological_on_open`), napari opens our medical
formats with this plugin without asking (:func:`~napari_medsam._reader.prefer_our_reader`), and a
removed layer schedules a garbage-collector settle (:mod:`~napari_medsam._qt._gc`).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

from ..app.session import AnnotationSession

__all__ = ["session_for"]

_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def session_for(viewer: Any) -> AnnotationSession:
    """The session of ``viewer``, created on first use and dropped with the viewer."""
    session = _SESSIONS.get(viewer)
    if session is None:
        session = _SESSIONS[viewer] = AnnotationSession()
        _first_dock(viewer)
    return session


def _first_dock(viewer: Any) -> None:
    """Once per viewer: radiological views on open (and now, for a scan shown in napari's default
    order), our reader preferred for the medical formats (a user's own choice stays), and a
    garbage-collector settle after a layer is removed."""
    from .. import _orientation, _reader
    from . import _gc

    if not hasattr(getattr(viewer, "layers", None), "events"):
        return  # not a viewer (a script's stand-in)
    viewer.layers.events.removed.connect(_gc.settle_later)  # a removed layer's memory is reclaimed
    _orientation.show_radiological_on_open(viewer)
    if tuple(viewer.dims.order) == tuple(range(int(viewer.dims.ndim))):  # the user has not chosen a view
        images = [ly for ly in viewer.layers if getattr(ly, "_type_string", "") == "image"
                  and not getattr(ly, "rgb", False)]
        if images:
            _orientation.show_plane(viewer, images[-1], "axial")
    with contextlib.suppress(Exception):  # noqa: BLE001 - a preference is a convenience, never an error
        _reader.prefer_our_reader()
