"""One :class:`~napari_medsam.app.session.AnnotationSession` per viewer, shared by its dock widgets.

The session itself is GUI-free (:mod:`napari_medsam.app`); only this mapping knows viewers. It is
a ``WeakKeyDictionary``: two viewers, or two tests, never share a model or an encoder, and a closed
viewer's session goes with it.
"""

from __future__ import annotations

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
    return session
