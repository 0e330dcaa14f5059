"""The session's adapter verbs (what the Fine-tune and Model docks call), without a window:
train_adapter_steps yields the estimate before the first step, set_adapter makes the adapted model
current (encoders rebuilt, embeddings keyed apart), remove_adapter goes back to the plain model."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam.app import AnnotationSession
from napari_medsam.app.params import ModelChoice
from napari_medsam.core.adapt import AdapterConfig, AdaptParams, adapter_config, base_model


@pytest.mark.parametrize("precision", ["fp32", "auto"])  # auto: bf16 on a CPU with AVX512-BF16
def test_train_set_and_remove_an_adapter(precision):
    from napari_medsam._sample_data import synthetic_volume

    session = AnnotationSession(disk_cache=False)
    plain = session.load_model(ModelChoice("test_tiny_lite", precision=precision))
    vol = synthetic_volume((5, 40, 40))
    labels = np.zeros(vol.shape, np.uint16)
    labels[2][vol[2] > 100] = 1
    session.open_image(vol, labels=labels)
    before = session.encoder()
    gen = session.train_adapter_steps(None, labels, None, AdapterConfig(kind="lora"), AdaptParams(steps=2, threads=1))
    seen = []
    try:
        while True:
            seen.append(next(gen))
    except StopIteration as stop:
        trained = stop.value
    messages = [p.message for p in seen]
    est = seen[messages.index("estimated")]
    assert messages.index("estimated") < messages.index("training")
    assert est.info["n_slices"] == 1 and est.info["estimate_s"] > 0 and est.total == 2
    assert trained.meta.history["steps"] == 2 and session.loaded is plain  # nothing applied yet

    session.set_adapter(trained)
    assert adapter_config(session.loaded).kind == "lora" and base_model(session.loaded) is plain
    after = session.encoder()
    assert after is not before and after.loaded is session.loaded
    assert session.loaded.variant != plain.variant  # the cache key names the adapter
    session.remove_adapter()
    assert session.loaded is plain
    session.remove_adapter()  # on a plain model: nothing to do
    assert session.loaded is plain
