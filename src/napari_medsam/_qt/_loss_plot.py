"""A minimal live curve of the training loss for the Fine-tune dock (no plotting library).

Per-step losses of a small head swing widely (0.02 to 1.0 on one batch after another), so the
raw points are drawn faint and a trailing moving average over :attr:`LossPlot.window` steps on top;
the label reads the smoothed value while training and, once training ends, the loss the trained
head reports (:meth:`LossPlot.set_final`), so that it says what the Head box says.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QPointF
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget

WINDOW = 20  # steps in the moving average


def moving_average(values: Any, window: int) -> np.ndarray:
    """Trailing mean of ``values`` over ``window`` points (fewer at the start): point i is the
    mean of ``values[max(0, i - window + 1):i + 1]``."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return v
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(1, v.size + 1)
    lo = np.maximum(0, i - max(1, int(window)))
    return (c[i] - c[lo]) / (i - lo)


class LossPlot(QWidget):
    """A minimal live curve of the training loss (no plotting library)."""

    def __init__(self, parent: QWidget | None = None, *, window: int = WINDOW) -> None:
        super().__init__(parent)
        self.values: list[float] = []
        self.window = int(window)
        self.final: float | None = None  # the loss the trained head reports
        self.setMinimumHeight(70)

    def clear(self) -> None:
        self.values = []
        self.final = None
        self.update()

    def add(self, value: float) -> None:
        self.values.append(float(value))
        self.update()

    def set_final(self, value: float | None) -> None:
        """Training ended: label the curve with the loss the head reports (None: keep the smoothed one)."""
        self.final = None if value is None or not np.isfinite(value) else float(value)
        self.update()

    def smoothed(self) -> np.ndarray:
        """The moving average drawn (over the finite raw values)."""
        vals = [v for v in self.values if np.isfinite(v)]
        return moving_average(vals, self.window)

    def current(self) -> float:
        """The smoothed loss now (nan before the first finite value)."""
        smooth = self.smoothed()
        return float(smooth[-1]) if smooth.size else float("nan")

    def label(self) -> str:
        """What the plot says: the smoothed loss while training, the head's loss after."""
        if self.final is not None:
            return f"final loss {self.final:.3f}"
        smooth = self.smoothed()
        if smooth.size == 0:
            return "loss"
        n = min(self.window, smooth.size)
        return f"loss {smooth[-1]:.3f} (mean of the last {n} steps)"

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        painter.setPen(QPen(QColor(128, 128, 128), 1))
        painter.drawRect(0, 0, w - 1, h - 1)
        vals = [v for v in self.values if np.isfinite(v)]
        if len(vals) < 2:
            painter.drawText(6, h // 2, self.label())
            return
        lo, hi = min(vals), max(vals)
        span = max(hi - lo, 1e-9)
        n = len(vals)

        def line(ys: Any) -> QPolygonF:
            return QPolygonF([QPointF(3 + (w - 6) * i / (n - 1), 3 + (h - 6) * (1 - (v - lo) / span))
                              for i, v in enumerate(ys)])

        painter.setPen(QPen(QColor(255, 165, 0, 70), 1))  # the raw steps, faint
        painter.drawPolyline(line(vals))
        painter.setPen(QPen(QColor(255, 165, 0), 2))  # the moving average
        painter.drawPolyline(line(self.smoothed()))
        painter.setPen(QPen(QColor(200, 200, 200), 1))
        painter.drawText(6, 14, self.label())
