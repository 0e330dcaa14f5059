"""The Review dock's per-round curve: proposal Dice and cross-validated Dice across rounds (no plotting library)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget

#: (metric key, legend, colour) of each curve
CURVES = (("proposal_dice", "proposal Dice", QColor(255, 165, 0)), ("cv_dice", "CV Dice", QColor(80, 170, 255)))


class RoundPlot(QWidget):
    """Dice per round on a fixed 0..1 scale: how much the user kept of the last proposals, and CV Dice."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.rounds: list[dict[str, Any]] = []
        self.setMinimumHeight(90)
        self.setMaximumHeight(260)
        self.setToolTip("per round: Dice of the previous round's proposals against what you kept (orange), "
                        "cross-validated Dice over the reviewed slices (blue)")

    def set_rounds(self, metrics: Sequence[Mapping[str, Any]]) -> None:
        self.rounds = [dict(m) for m in metrics]
        self.update()

    def points(self, key: str) -> list[tuple[int, float]]:
        """``(round, value)`` of one curve, rounds without a finite value left out."""
        out = []
        for i, m in enumerate(self.rounds, start=1):
            v = m.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out.append((i, float(v)))
        return out

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        left, top, bottom = 30, 18, 16
        painter.setPen(QPen(QColor(128, 128, 128), 1))
        painter.drawRect(left, top, w - left - 4, h - top - bottom)
        for v in (0.0, 0.5, 1.0):
            y = top + (h - top - bottom) * (1 - v)
            painter.drawText(2, int(y) + 4, f"{v:.1f}")
        n = max(2, len(self.rounds))

        def xy(i: int, v: float) -> QPointF:
            return QPointF(left + 6 + (w - left - 16) * (i - 1) / (n - 1), top + (h - top - bottom) * (1 - v))

        for i in range(1, len(self.rounds) + 1):
            painter.drawText(int(xy(i, 0).x()) - 3, h - 3, str(i))
        x_legend = left + 4
        for key, name, colour in CURVES:
            pts = [xy(i, v) for i, v in self.points(key)]
            painter.setPen(QPen(colour, 2))
            if len(pts) > 1:
                painter.drawPolyline(QPolygonF(pts))
            painter.setBrush(colour)
            for p in pts:
                painter.drawEllipse(p, 3, 3)
            painter.drawText(x_legend, 13, name)
            x_legend += painter.fontMetrics().horizontalAdvance(name) + 12
        if not self.rounds:
            painter.setPen(QPen(QColor(200, 200, 200), 1))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "Dice per round")
