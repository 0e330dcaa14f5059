"""The image value object, re-exported: it lives in :mod:`napari_medsam.core.volume` (core never
imports io; readers return it, writers take it as a reference)."""

from napari_medsam.core.volume import ImageVolume, LazyArray

__all__ = ["ImageVolume", "LazyArray"]
