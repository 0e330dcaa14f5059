"""The value a loaded model is passed around as: the network plus what identifies its weights.

Its own module so that :mod:`~napari_medsam.core.build` (which makes one) and
:mod:`~napari_medsam.core.speed` (which transforms one) both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .registry import ModelSpec

__all__ = ["LoadedModel"]


@dataclass
class LoadedModel:
    """A model ready to run, with what identifies its weights (for cache keys and head files)."""

    spec: ModelSpec
    model: Any          # SamModel in eval mode on ``device``
    device: Any         # torch.device
    dtype: Any          # autocast dtype or None (fp32)
    weights_path: str | None
    weights_hash: str   # SHA-256 of the weights, or "random-seed<N>" for test models
    variant: str = ""   # how the encoder computes beyond the weights (e.g. "+int8"); part of cache keys

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def adapter_digest(self) -> str:
        """SHA-256 of the encoder adapters in this model (:mod:`~napari_medsam.core.adapt`); "" when plain.

        Adapted embeddings differ from plain ones far more than precision does, so a head records it
        and is refused on a model without the same adapters."""
        return str(getattr(self.model, "adapter_digest", "") or "")

    @property
    def compute_id(self) -> str:
        """Weights hash plus numeric precision and variant: everything in the network that changes an embedding."""
        dt = "fp32" if self.dtype is None else str(self.dtype).replace("torch.", "")
        return f"{self.weights_hash}|{dt}{self.variant}"
