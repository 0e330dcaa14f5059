"""Typed, actionable errors.

Every error raised on user input is a :class:`MedSamError`; its message says what failed, why,
and what to do next. Widgets show them as notifications; the CLI prints them without a traceback.
"""

from __future__ import annotations


class MedSamError(Exception):
    """Base class of every error napari-medsam raises on purpose."""


class UnknownModelError(MedSamError, KeyError):
    """A model or head name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsUnavailableError(MedSamError):
    """Weights are neither bundled, nor given, nor cached, and cannot be downloaded."""


class ChecksumError(MedSamError):
    """A weights file whose SHA-256 does not match the registry."""


class CheckpointError(MedSamError):
    """A checkpoint that cannot be read or does not fit the network (missing/unexpected keys)."""


class InvalidImageError(MedSamError, ValueError):
    """An image of a shape, dtype or content the tool cannot segment."""


class ImageReadError(MedSamError):
    """A file that cannot be read (missing, corrupt or of an unknown format)."""


class CacheMismatchError(MedSamError):
    """An embedding store written for other inputs (model, weights, image, preprocessing)."""


class HeadMismatchError(MedSamError):
    """A trained head that does not fit the loaded backbone or the request."""


class OutputError(MedSamError):
    """An output path that cannot be written without destroying an input or a user file, or at all."""


class PromptError(MedSamError, ValueError):
    """Prompts that cannot be used (outside the image, empty, malformed)."""


class DeviceError(MedSamError):
    """A requested device that is not available on this machine."""


class Cancelled(MedSamError):
    """Long work stopped at the user's request."""
