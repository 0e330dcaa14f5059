"""Review dock: a thin view of :class:`~napari_medsam.app.loop.ReviewLoop` over a Labels layer.

Painting or committing a prompt on a slice makes it reviewed; rounds fill a *proposals* layer (outlines,
never the user's labels). Keys on the labels layer: Shift-A accept, Shift-R mark reviewed, Shift-N next
suggestion. Autosaves (:mod:`napari_medsam.app.autosave`) and offers to resume.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from napari.layers import Labels
from qtpy import QtWidgets as qw
from qtpy.QtCore import Qt
from qtpy.QtGui import QFont

from .. import _layers
from ..app.loop import ReviewLoop, RoundParams
from ..app.params import head_kinds
from ..app.session import AnnotationSession
from ..core.finetune import TrainParams
from ..core.progress import Progress
from ..core.uncertainty import DEFAULT_SCORE, DEFAULT_STRATEGY, STRATEGIES
from . import _workers
from ._dock import DockWidget
from ._layer_combo import LayerCombo
from ._round_plot import RoundPlot
from ._shared import encoder_request, is_image
from .session import session_for

PROPOSAL_COLOURS = _layers.PROPOSAL_COLOURS  # one palette for proposals and predictions
REFRESH_INTERVAL = 0.3  # seconds between two repaints of the proposals during a round
AUTOSAVE_DELAY = 3.0  # seconds after the last edit before an autosave
AUTOSAVE_MAX_DELAY = 6.0  # seconds at most between the first unsaved edit and its save (continuous painting)


class ReviewWidget(DockWidget):
    """Reviewed slices, suggestions, accept, rounds and their metrics for one Labels layer."""

    def __init__(self, napari_viewer: Any, *, session: AnnotationSession | None = None,
                 autosave_root: Any = None) -> None:
        super().__init__()
        self.viewer = napari_viewer = _layers.unwrap(napari_viewer)
        self.session = session or session_for(napari_viewer)
        self.autosave_root = autosave_root
        self.loop: ReviewLoop | None = None
        self.saver: Any = None  # app.autosave.Autosaver of the loop
        self.snapshot: Any = None  # an autosaved session of this image that can be resumed
        self.round_job: _workers.Job | None = None
        self.setup_job: _workers.Job | None = None  # hashes the image, then looks for an autosave
        self.labels_layer = self.proposals_layer = self.req = None
        self._refreshed = 0.0

        self.image_combo = LayerCombo(napari_viewer, is_image)
        self.labels_combo = LayerCombo(napari_viewer, self._accept_labels)
        self.head_combo, self.strategy_combo = _combo(head_kinds()), _combo(STRATEGIES)
        self.strategy_combo.setCurrentIndex(STRATEGIES.index(DEFAULT_STRATEGY))
        self.strategy_combo.setToolTip("coverage: split the largest run of unreviewed slices inside the "
                                       "predicted foreground first, at its middle; or one uncertainty score alone")
        self.steps_spin = qw.QSpinBox(minimum=1, maximum=100_000, value=TrainParams().max_steps,
                                      toolTip="training steps per round")
        self.auto_spin = qw.QSpinBox(minimum=0, maximum=100, specialValueText="off",
                                     toolTip="run a round automatically after this many newly reviewed slices")
        self.start_button, self.resume_button = _button("Start reviewing", self.start), _button("Resume", self.resume)
        self.resume_button.setVisible(False)
        self.reviewed_label, self.status, self.metrics_label = qw.QLabel("Not started."), qw.QLabel(""), qw.QLabel("")
        for label in (self.reviewed_label, self.status):
            label.setWordWrap(True)
        self.metrics_label.setFont(QFont("monospace", 8))
        self.round_plot = RoundPlot()
        self.suggest_list = qw.QListWidget(maximumHeight=110)
        self.next_button = _button("Next suggested (Shift-N)", self.next_suggested)
        self.mark_button = _button("Mark reviewed (Shift-R)", self.mark_current)
        self.accept_button = _button("Accept (Shift-A)", self.accept_current)
        self.range_from, self.range_to = qw.QSpinBox(), qw.QSpinBox()
        self.range_button = _button("Accept range", lambda: self.accept_range(self.range_from.value(),
                                                                             self.range_to.value()))
        self.round_button, self.cancel_button = _button("Run round", self.run_round), _button("Cancel", self.cancel)
        self.progress_bar = qw.QProgressBar(visible=False)

        form = qw.QFormLayout()
        for name, w in (("Image", self.image_combo), ("Labels", self.labels_combo), ("Head", self.head_combo),
                        ("Steps", self.steps_spin), ("Suggest by", self.strategy_combo),
                        ("Auto round", self.auto_spin)):
            form.addRow(name, w)
        layout = qw.QVBoxLayout(self)
        layout.addLayout(form)
        for row in ((self.start_button, self.resume_button), (self.reviewed_label,), (self.suggest_list,),
                    (self.next_button,), (self.mark_button, self.accept_button),
                    (self.range_from, self.range_to, self.range_button), (self.round_button, self.cancel_button),
                    (self.progress_bar,), (self.status,), (self.metrics_label,), (self.round_plot,)):
            h = qw.QHBoxLayout()
            for w in row:
                h.addWidget(w)
            layout.addLayout(h, 1 if row[0] is self.round_plot else 0)  # the curve takes the room left
        self.suggest_list.itemDoubleClicked.connect(lambda item: self.go_to(int(item.data(Qt.ItemDataRole.UserRole))))
        self.image_combo.layer_changed.connect(lambda _ly: self.labels_combo.refresh())
        self.strategy_combo.currentTextChanged.connect(self._update)
        self.connect_session(self.session.labels_changed, self._on_session_labels)
        self._update()

    def _accept_labels(self, layer: Any) -> bool:
        image = self.image_combo.layer if hasattr(self, "image_combo") else None
        return (isinstance(layer, Labels) and not _layers.is_preview(layer) and layer is not self.proposals_layer
                and image is not None and _layers.fits(layer, image))

    def _update(self, *_: Any) -> None:
        busy = self.round_job is not None and self.round_job.running
        on = self.loop is not None
        for w in (self.next_button, self.mark_button, self.accept_button, self.range_button):
            w.setEnabled(on)
        self.round_button.setEnabled(on and not busy)
        self.cancel_button.setEnabled(busy)
        if not on:
            return
        rev = self.loop.reviewed()
        self.reviewed_label.setText(f"Reviewed along axis {self.loop.axis}: {len(rev)} slice(s)"
                                    + (f": {', '.join(map(str, rev[:40]))}{' …' if len(rev) > 40 else ''}" if rev else ""))
        self.suggest_list.clear()
        strategy = self.strategy_combo.currentText()
        for s, v in self.loop.suggest(8, strategy=strategy):
            item = qw.QListWidgetItem(f"slice {s}    {DEFAULT_SCORE if strategy == 'coverage' else strategy} {v:.3f}")
            item.setData(Qt.ItemDataRole.UserRole, s)
            self.suggest_list.addItem(item)
        self.metrics_label.setText(self.loop.metrics_table())
        self.round_plot.set_rounds([r.metrics for r in self.loop.rounds])

    def current(self) -> int:
        view = _layers.current_slice(self.viewer.dims, self.labels_layer) if self.labels_layer is not None else None
        return view.index if view is not None and self.loop is not None and view.axis == self.loop.axis else 0

    def go_to(self, index: int) -> None:
        """Move the viewer to slice ``index`` along the loop's axis."""
        layer = self.labels_layer
        pos = np.asarray(layer.world_to_data(np.asarray(self.viewer.dims.point, float)), float)
        pos[self.loop.axis] = index
        world = layer.data_to_world(pos)
        offset = int(self.viewer.dims.ndim) - int(layer.ndim)
        self.viewer.dims.set_point(self.loop.axis + offset, float(world[self.loop.axis]))

    def start(self) -> ReviewLoop | None:
        """Bind a new loop to the chosen layers along the axis in view; look for an autosave."""
        image, labels = self.image_combo.layer, self.labels_combo.layer
        if image is None or labels is None or not isinstance(labels.data, np.ndarray) or labels.ndim != 3:
            self.status.setText("Choose a 3D image and a Labels layer drawn on it (an in-memory array).")
            return None
        self.cleanup()
        self.req = encoder_request(image, self.viewer, self.session)
        self.labels_layer = labels
        loop = ReviewLoop(labels.data, axis=self.req.axis, class_names=self.session.class_names,
                          auto_every=int(self.auto_spin.value()), init_head=self.session.head)
        self.proposals_layer = self.viewer.add_labels(
            loop.proposals, name=f"{labels.name} proposals", opacity=0.8, scale=labels.scale,
            translate=labels.translate, rotate=labels.rotate, shear=labels.shear, affine=labels.affine.affine_matrix,
            colormap=_layers.proposal_colormap())
        self.proposals_layer.contour, self.proposals_layer.editable = 1, False
        self._bind(loop)
        self.viewer.layers.selection.active = labels
        labels.events.paint.connect(self._on_paint)
        for key, fn in (("Shift-A", self.accept_current), ("Shift-R", self.mark_current),
                        ("Shift-N", self.next_suggested)):
            labels.bind_key(key, lambda _layer, fn=fn: fn(), overwrite=True)
        for spin in (self.range_from, self.range_to):
            spin.setRange(0, self.loop.n_slices - 1)
        self.status.setText("Paint or accept slices, then run a round.")
        self.setup_job = _workers.start(lambda cancel: self.session.encoder_steps(self.req), desc="Hashing the image",
                                        on_returned=self._on_encoder, cancelable=False)
        self._update()
        return self.loop

    def _on_encoder(self, enc: Any) -> None:
        from ..app.autosave import Autosaver, SessionStore, session_folder

        if self.loop is None:
            return
        store = SessionStore(session_folder(enc.content_hash, getattr(enc.volume, "source", None),
                                            root=self.autosave_root))
        snap = store.load()
        if snap is not None and snap.fits(self.loop):
            self.snapshot = snap
            self.resume_button.setVisible(True)
            self.status.setText(f"{snap.describe()} can be resumed.")
        self.saver = Autosaver(self.loop, store, delay=AUTOSAVE_DELAY, max_delay=AUTOSAVE_MAX_DELAY)

    def _bind(self, loop: ReviewLoop) -> None:
        self.loop = self.session.loop = loop
        loop.round_due.connect(lambda _n: self.run_round())
        self.proposals_layer.data = loop.proposals

    def resume(self) -> None:
        """Restore the autosaved session into the labels layer (the loop, its rounds and heads)."""
        if self.snapshot is None or self.loop is None:
            return
        self._bind(self.snapshot.to_loop(loaded=self.session.loaded, labels=self.labels_layer.data))
        if self.saver is not None:
            self.saver.rebind(self.loop)
        self.snapshot = None
        self.resume_button.setVisible(False)
        self.status.setText("Resumed the autosaved session.")
        self._refresh()

    def mark_current(self) -> tuple[int, ...]:
        return self._refresh(self.loop.mark_reviewed([self.current()]))

    def accept_current(self) -> bool:
        return self._refresh(self.loop.accept(self.current()))

    def accept_range(self, start: int, stop: int) -> tuple[int, ...]:
        return self._refresh(self.loop.accept_range(start, stop))

    def _refresh(self, result: Any = None) -> Any:
        for layer in (self.labels_layer, self.proposals_layer):
            layer.refresh()
        self._update()
        return result

    def next_suggested(self) -> int | None:
        picks = self.loop.suggest(1, strategy=self.strategy_combo.currentText())
        if not picks:
            self.status.setText("No suggestion yet: run a round first.")
            return None
        self.go_to(picks[0][0])
        return picks[0][0]

    def run_round(self) -> _workers.Job | None:
        """Train and re-predict in a thread worker (the user keeps working meanwhile)."""
        if self.loop is None or (self.round_job is not None and self.round_job.running):
            return None
        if self.session.loaded is None:
            self.status.setText("Load a model in the Model widget first.")
            return None
        params = RoundParams(train=TrainParams(head=self.head_combo.currentText(), max_steps=self.steps_spin.value()),
                             strategy=self.strategy_combo.currentText())
        loop, req, session = self.loop, self.req, self.session

        def steps(cancel: Any) -> Any:
            yield Progress(0, 0, "preparing")
            enc = session.encoder(req)  # worker thread: built (and hashed) once
            return (yield from loop.round_steps(enc, params, current=self.current, cancel=cancel))

        _workers.show_progress(self.progress_bar)
        self.round_job = self.session.hold_cpu(_workers.start(
            steps, desc="Review round", on_progress=self._on_progress, on_returned=self._on_round,
            on_finished=self._on_finished))
        self._update()
        return self.round_job

    def cancel(self) -> None:
        if self.round_job is not None and self.round_job.running:
            self.round_job.cancel()

    def _on_progress(self, p: Any) -> None:
        now = time.perf_counter()
        if now - self._refreshed < REFRESH_INTERVAL and not (p.total and p.step >= p.total):
            return
        self._refreshed = now
        _workers.show_progress(self.progress_bar, p)
        loss = p.info.get("loss")
        self.status.setText(f"{p.message} {p.step}/{p.total}" + (f" · loss {loss:.3f}" if loss is not None else ""))
        if p.info.get("slices"):
            self.proposals_layer.refresh()

    def _on_round(self, record: Any) -> None:
        self.status.setText(f"Round {record.index} done in {record.metrics.get('seconds', 0):.0f} s.")
        self._refresh()

    def _on_finished(self, job: _workers.Job) -> None:
        self.progress_bar.setVisible(False)
        self.status.setText("Round cancelled; proposals written so far stay." if job.cancelled else self.status.text())
        self._update()

    def _on_paint(self, event: Any) -> None:
        """A paint, fill or erase on the labels layer: its slices (from the undo atoms) are reviewed."""
        if self.loop is None or self.session.writing_proposals:  # the session's own writes are not the user's
            return
        ax, slices = self.loop.axis, set()
        for atom in getattr(event, "value", None) or ():
            key = getattr(atom, "slice_key", None)  # napari's masked atom: a bounding box of slices
            if key is not None and isinstance(key[ax], slice):
                slices.update(range(*key[ax].indices(self.loop.n_slices)))
            elif isinstance(atom, tuple) and len(atom[0]) == 3:  # (indices, old values, new values)
                slices.update(int(v) for v in np.unique(np.asarray(atom[0][ax])))
        self.loop.on_user_edit(sorted(slices) or [self.current()])
        self._refresh()

    def _on_session_labels(self, axis: int, slices: tuple) -> None:
        if self.loop is not None and axis == self.loop.axis and slices:
            self.loop.on_user_edit(slices)
            self._update()

    def cleanup(self) -> None:
        self.cancel()
        self.disconnect_session()
        if self.saver is not None:
            self.saver.close()
            self.saver = None
        if self.labels_layer is not None:
            self.labels_layer.events.paint.disconnect(self._on_paint)


def _combo(items: Any) -> qw.QComboBox:
    box = qw.QComboBox()
    box.addItems(list(items))
    return box


def _button(text: str, slot: Any) -> qw.QPushButton:
    button = qw.QPushButton(text)
    button.clicked.connect(lambda *_: slot())
    return button

