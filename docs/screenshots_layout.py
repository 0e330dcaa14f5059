"""Layout check of every napari-medsam dock at the screen sizes users have (issue 16): the window
at 1366x768 (a laptop) and 1920x1080, the four docks opened as napari's Plugins menu opens them
(``add_plugin_dock_widget`` without ``tabify``: the menu docks each below the others, and the plugin's
docks then tab themselves together), each dock raised in turn and shot as ``docs/images/10-layout-<dock>-<w>x<h>.png``; printed per dock: its
minimum height and the height its dock area has, so a control pushed off-screen shows as a number
too. Pictures of the layout only: the tiny random model, nothing loaded::

    xvfb-run -a -s "-screen 0 1920x1200x24" python docs/screenshots_layout.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshots_common import open_mni, pump, shot  # noqa: E402

DOCKS = ("Model", "Annotate", "Fine-tune", "Review")
SIZES = ((1366, 768), (1920, 1080))


def main() -> int:
    from qtpy.QtWidgets import QDockWidget

    viewer, _image, model_w = open_mni("test_tiny_lite", size=SIZES[0])
    dock = model_w
    while not isinstance(dock, QDockWidget):  # the Model dock napari made around the widget
        dock = dock.parentWidget()
    docks = {"Model": dock}
    for name in DOCKS[1:]:
        dock, _w = viewer.window.add_plugin_dock_widget("napari-medsam", name)  # as the Plugins menu does
        docks[name] = dock
        pump(0.3)
    pump(1.0)
    tabbed = set(viewer.window._qt_window.tabifiedDockWidgets(docks["Model"]))  # private: the check only
    print(f"docks tabbed with Model: {sorted(n for n, d in docks.items() if d in tabbed)}", flush=True)
    for w, h in SIZES:
        viewer.window.resize(w, h)
        pump(1.0)
        for name, dock in docks.items():
            dock.raise_()
            pump(0.5)
            inner = dock.widget()
            need, have = inner.minimumSizeHint().height(), dock.height()
            print(f"{w}x{h} {name}: minimum height {need} px, dock {have} px"
                  f"{'' if need <= have else '  (does not fit: scrolls or crushes)'}", flush=True)
            shot(viewer, f"10-layout-{name.lower().replace('-', '')}-{w}x{h}.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
