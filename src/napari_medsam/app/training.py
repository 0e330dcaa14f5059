"""The one ``train_head`` pipeline: labelled slices of a volume -> a trained prompt-free head.

``napari-medsam train``, the Fine-tune widget and scripts all run :func:`train_head_steps`:
embed the training slices through the encoder's cache, turn the labels into targets, train.
Class names come from a list (one per class, in label order) or a ``{label id: name}`` mapping;
a list of the wrong length is refused with the classes the labels hold.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.progress import Progress, ProgressGen

__all__ = ["class_names_for", "train_head_steps"]


def class_names_for(class_ids: Sequence[int], names: Sequence[str] | Mapping[int, str] | None) -> list[str] | None:
    """One name per class id: from a ``{id: name}`` mapping (missing: ``"class <id>"``), or a list
    that must have one name per class. None -> None (the head's default names)."""
    from ..core.errors import MedSamError

    if names is None:
        return None
    if isinstance(names, Mapping):
        return [str(names.get(int(c), f"class {c}")) for c in class_ids]
    names = [str(n) for n in names]
    if len(names) != len(class_ids):
        raise MedSamError(f"{len(names)} class names were given but the labels hold {len(class_ids)} classes "
                          f"({list(class_ids)}): give one name per class, in label order")
    return names


def train_head_steps(encoder: Any, labels: Any, slices: Sequence[int] | None = None, params: Any = None, *,
                     class_names: Sequence[str] | Mapping[int, str] | None = None, init: Any = None,
                     cancel: threading.Event | None = None, threads: Any = None) -> ProgressGen[Any]:
    """Embed the labelled slices of ``encoder``'s volume, collect targets, train; return a TrainedHead.

    ``labels``: integer array of the volume's spatial shape (0 background); ``slices``: training
    slices along the encoder's axis (None: every slice holding a label); ``params``: a
    :class:`~napari_medsam.core.finetune.TrainParams` (None: its defaults, the benchmarked schedule);
    ``init``: a head to continue training (its classes are kept, new ones in the labels are added
    after them, see :func:`~napari_medsam.core.finetune.fine_tune`); ``threads``: a context manager
    factory that sets the embedding thread's torch threads (the session passes its worker policy).
    """
    from ..core.finetune import TrainParams, collect_training_data, fine_tune

    yield Progress(0, 0, "preparing")
    if threads is None:
        data = yield from collect_training_data(encoder, labels, slices, cancel=cancel)
    else:
        with threads():
            data = yield from collect_training_data(encoder, labels, slices, cancel=cancel)
    ids = tuple(data.class_ids)
    if init is not None:  # continuing: the head's classes first, new ones after (the head grows)
        old = tuple(init.meta.class_ids)
        ids = old + tuple(c for c in ids if c not in old)
    names = class_names_for(ids, class_names)
    head = yield from fine_tune(data, params if params is not None else TrainParams(), loaded=encoder.loaded,
                                class_names=names, init=init, cancel=cancel)
    return head
