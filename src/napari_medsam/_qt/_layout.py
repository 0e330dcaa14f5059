"""Layout helpers shared by the dock widgets."""

from __future__ import annotations

from qtpy.QtWidgets import QFrame, QScrollArea, QSizePolicy, QVBoxLayout, QWidget


def scroll_layout(widget: QWidget) -> QVBoxLayout:
    """Put a scroll area in ``widget`` and return the layout of its content.

    napari stacks dock widgets on the right: on a small screen a widget gets less height than its
    contents need, and Qt would squash labels and tables to nothing. Inside a scroll area the
    contents keep their size and a scroll bar appears instead.
    """
    content = QWidget()
    area = QScrollArea()
    area.setWidget(content)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(area)
    return QVBoxLayout(content)
