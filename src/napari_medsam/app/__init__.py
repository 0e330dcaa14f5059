"""The application layer: the annotation session the widgets, the CLI and scripts share.

Never imports Qt or napari (an import-linter contract in ``pyproject.toml`` checks it); torch is
imported only by the verbs that run a model. See :class:`~napari_medsam.app.session.AnnotationSession`.
"""

from .params import IntensityChoice, ModelChoice
from .session import AnnotationSession, EncoderRequest

__all__ = ["AnnotationSession", "EncoderRequest", "IntensityChoice", "ModelChoice"]
