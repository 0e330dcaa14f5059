"""A minimal live curve of the training loss for the Fine-tune dock (no plotting library)."""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QPointF
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget


class LossPlot(QWidget):
    """A minimal live curve of the training loss (no plotting library)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.values: list[float] = []
        self.setMinimumHeight(70)

    def clear(self) -> None:
        self.values = []
        self.update()

    def add(self, value: float) -> None:
        self.values.append(float(value))
        self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        painter.setPen(QPen(QColor(128, 128, 128), 1))
        painter.drawRect(0, 0, w - 1, h - 1)
        vals = [v for v in self.values if np.isfinite(v)]
        if len(vals) < 2:
            painter.drawText(6, h // 2, "loss")
            return
        lo, hi = min(vals), max(vals)
        span = max(hi - lo, 1e-9)
        n = len(vals)
        poly = QPolygonF([QPointF(3 + (w - 6) * i / (n - 1), 3 + (h - 6) * (1 - (v - lo) / span))
                          for i, v in enumerate(vals)])
        painter.setPen(QPen(QColor(255, 165, 0), 2))
        painter.drawPolyline(poly)
        painter.setPen(QPen(QColor(200, 200, 200), 1))
        painter.drawText(6, 14, f"loss {vals[-1]:.3f}  (min {lo:.3f})")
