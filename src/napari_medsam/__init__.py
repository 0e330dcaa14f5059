"""napari-medsam: Segment Anything for medical images in napari.

Importing this package loads neither torch nor any Qt binding.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
