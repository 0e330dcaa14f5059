"""Adapters in the docks (issue 14): the Model dock shows the active adapter, loads one from a
file and removes it; the Fine-tune dock trains one (Med-SA or LoRA) on the labelled slices, with
the estimated time shown before the steps start, progress, Cancel, then saves and applies it.

The work is :mod:`napari_medsam.core.adapt` through the session's verbs
(:meth:`~napari_medsam.app.session.AnnotationSession.train_adapter_steps`,
:meth:`~napari_medsam.app.session.AnnotationSession.set_adapter`,
:meth:`~napari_medsam.app.session.AnnotationSession.remove_adapter`); torch loads with the model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import QFileDialog

from ..core.progress import Progress, ProgressGen
from . import _workers
from ._shared import encoder_request

ADAPTER_TARGET = "adapter:"  # the Fine-tune dock's head combo data for an adapter, e.g. "adapter:medsa"
ADAPTER_TARGETS = {"adapter:medsa": "Adapter: Med-SA (bottleneck adapters in the encoder + the mask decoder)",
                   "adapter:lora": "Adapter: LoRA (low-rank q/v updates in the encoder + the mask decoder)"}


def adapters_dir() -> Path:
    """Where trained adapters are saved (``<user cache>/napari-medsam/adapters``)."""
    from ..core.weights import weights_dir

    return weights_dir().parent / "adapters"


def _load_adapter_steps(path: str, loaded: Any) -> ProgressGen[Any]:
    from ..core.adapt import load_adapter

    yield Progress(0, 1, "reading adapter")
    return load_adapter(path, loaded)


def _save_adapter_steps(path: Path, trained: Any) -> ProgressGen[Path]:
    from ..core.adapt import save_adapter

    yield Progress(0, 1, "saving adapter")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_adapter(path, trained)


class ModelAdaptersMixin:
    """The Model dock's adapter line and its Load adapter… / Remove buttons."""

    def _show_adapter(self, loaded: Any) -> None:
        text = ""
        if loaded is not None:
            from ..core.adapt import describe_adapter

            text = describe_adapter(loaded)
        self.adapter_label.setText(f"Active: {text}." if text else "No adapter (the plain model).")
        self.adapter_label.setVisible(bool(text))  # a line only while an adapter is active
        self.adapter_load_button.setEnabled(loaded is not None)
        self.adapter_remove_button.setEnabled(bool(text))
        self.adapter_remove_button.setVisible(bool(text))

    def load_adapter(self, path: str) -> _workers.Job | None:
        """Apply the adapter file ``path`` to the loaded model (a worker reads it); returns the job."""
        loaded = self.session.loaded
        if loaded is None:
            self.adapter_label.setText("Load the model the adapter was trained on first.")
            return None
        self.adapter_job = _workers.start(lambda cancel: _load_adapter_steps(path, loaded), desc="Loading the adapter",
                                          show_bar=False, cancelable=False, on_returned=self.session.set_adapter)
        return self.adapter_job

    def remove_adapter(self) -> None:
        self.session.remove_adapter()

    def _on_choose_adapter(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load adapter", str(adapters_dir()),
                                              "Adapter files (*.pt);;All files (*)")
        if path:
            self.load_adapter(path)


class FinetuneAdaptersMixin:
    """The Fine-tune dock's adapter training: "Adapter: Med-SA / LoRA" beside the heads."""

    def adapter_kind(self) -> str | None:
        """``"medsa"`` or ``"lora"`` when an adapter is the training target, else None (a head)."""
        data = str(self.head_combo.currentData())
        return data[len(ADAPTER_TARGET):] if data.startswith(ADAPTER_TARGET) else None

    def adapt_params(self) -> Any:
        from ..core.adapt import AdaptParams

        steps = int(self.epochs_spin.value())  # "Steps" for an adapter; 0: the default
        kw = {"steps": steps} if steps else {}
        return AdaptParams(seed=int(self.seed_spin.value()), **kw)

    def _on_target_changed(self, *_: Any) -> None:
        from ..core.adapt import AdaptParams
        from ..core.finetune import TrainParams

        adapter = self.adapter_kind() is not None
        self.epochs_label.setText("Steps" if adapter else "Epochs (max)")
        self.epochs_spin.setSpecialValueText(f"auto ({AdaptParams().steps} steps)" if adapter
                                             else f"auto (up to {TrainParams().max_steps} steps)")

    def _train_adapter(self, image: Any, labels: Any, slices: Any) -> None:
        from ..core.adapt import AdapterConfig

        req = encoder_request(image, self.viewer, self.session)
        if req is None:
            return
        snapshot = np.array(labels.data, copy=True)
        config, params = AdapterConfig(kind=self.adapter_kind()), self.adapt_params()
        self.loss_plot.clear()
        self._plot_time = 0.0
        _workers.show_progress(self.progress_bar)
        self.loss_label.setText("Estimating the training time…")
        self.train_job = self.session.hold_cpu(_workers.start(
            lambda cancel: self.session.train_adapter_steps(req, snapshot, slices, config, params, cancel=cancel),
            desc=f"Training a {config.tag} adapter", on_progress=self._on_adapter_progress,
            on_returned=self._on_adapter_trained, on_finished=self._on_job_finished,
            show_bar=self.session.napari_progress))
        self._update_buttons()

    def _on_adapter_progress(self, p: Progress) -> None:
        info = p.info
        if "estimate_s" in info:
            self.estimate_s = float(info["estimate_s"])
            self.loss_label.setText(f"Estimated {self.estimate_s:.0f} s for {p.total} steps on "
                                    f"{info.get('n_slices', '?')} slice(s) ({info['step_s']:.2f} s a step here now)…")
            return
        loss = info.get("loss")
        if loss is not None:
            self.loss_plot.values.append(float(loss))
        now = time.perf_counter()
        if now - self._plot_time < 0.2 and not (p.total and p.step >= p.total):
            return
        self._plot_time = now
        _workers.show_progress(self.progress_bar, p)
        if loss is not None:
            self.loss_plot.update()
            self.loss_label.setText(f"step {p.step}/{p.total} · loss {self.loss_plot.current():.4f} · "
                                    f"{info.get('eta', 0):.0f} s left (estimated {self.estimate_s:.0f} s)")
        elif p.message and p.total:
            self.loss_label.setText(f"{p.message}: {p.step}/{p.total}")

    def _on_adapter_trained(self, trained: Any) -> None:
        hist, meta = trained.meta.history, trained.meta
        self.loss_plot.set_final(hist.get("final_loss"))
        path = adapters_dir() / f"{meta.backbone}-{meta.adapter.tag}-{meta.digest[:12]}.adapter.pt"
        self.session.set_adapter(trained)  # the Model dock says so; previews use it from now on
        self.trained_adapter = trained
        self.loss_label.setText(f"Trained the {meta.adapter.tag} adapter in {hist['seconds']:.1f} s "
                                f"(estimated {self.estimate_s:.0f} s), loss {hist['first_loss']:.3f} -> "
                                f"{hist['final_loss']:.3f}; applied. Saving…")
        self.io_job = _workers.start(lambda cancel: _save_adapter_steps(path, trained), desc="Saving the adapter",
                                     show_bar=False, cancelable=False, on_returned=self._on_adapter_saved)

    def _on_adapter_saved(self, path: Any) -> None:
        self.adapter_path = Path(path)
        self.loss_label.setText(self.loss_label.text().replace("Saving…", f"Saved to {path}."))
