"""Image input and output: NIfTI, TIFF, ``.npy`` and zarr / OME-Zarr.

:func:`read_image` returns an :class:`ImageVolume` (array-like data plus spacing, origin and
affine, lazy by default); :func:`write_labels` and :func:`write_image` write arrays with the
geometry of a reference volume, atomically. nibabel, tifffile and zarr load on first use.
"""

from napari_medsam.io.readers import SUPPORTED_EXTENSIONS, image_format, read_image
from napari_medsam.io.volume import ImageVolume, LazyArray
from napari_medsam.io.writers import write_image, write_labels

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "ImageVolume",
    "LazyArray",
    "image_format",
    "read_image",
    "write_image",
    "write_labels",
]
