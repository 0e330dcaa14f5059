"""Screenshots of the Review dock for the user guide (docs/images/09-review-rounds-<W>x<H>.png).

Run under a display: ``xvfb-run -a -s "-screen 0 1920x1200x24" python docs/screenshots_review.py``.
Opens the MNI152 sample, loads the bundled LiteMedSAM, starts reviewing its coronal slices,
"corrects" three slices to the GM/WM maps nilearn ships (what a user painting them writes), then
runs three rounds from the dock, correcting the suggested slice after each as a user would, and
takes the window with the proposals, the suggestions, the metrics table and the per-round curve
at 1366 x 768 and 1920 x 1080. Every coronal slice is embedded in the first round (minutes on a
CPU); ``--model test_tiny_lite`` shows the layout only (a random model).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshots_common import open_mni, paint_slice, pump, shot, wait  # noqa: E402

CORONAL = 1
SIZES = ((1366, 768), (1920, 1080))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="litemedsam")
    p.add_argument("--head", default="linear")
    p.add_argument("--steps", type=int, default=150, help="training steps per round")
    args = p.parse_args()
    import numpy as np
    from nilearn import datasets

    from napari_medsam.io import read_image

    viewer, image, model_w = open_mni(args.model, size=SIZES[0])
    gm = np.asarray(read_image(datasets.GM_MNI152_FILE_PATH).data[...], np.float32) / 255.0
    wm = np.asarray(read_image(datasets.WM_MNI152_FILE_PATH).data[...], np.float32) / 255.0
    truth = np.where(gm + wm > 0.5, np.where(wm > gm, 2, 1), 0).astype(np.uint8)
    labels = viewer.add_labels(np.zeros_like(truth), name="GM, WM", scale=image.scale, translate=image.translate,
                               affine=image.affine.affine_matrix)
    viewer.dims.order = (CORONAL, 2, 0)  # rows: inferior -> superior (k), columns: left -> right (i)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.orientation2d = ("up", "right")  # superior at the top
    _, review = viewer.window.add_plugin_dock_widget("napari-medsam", "Review", tabify=True)
    wait(model_w.load())
    review.image_combo.set_layer(image)
    review.labels_combo.set_layer(labels)
    review.autosave_root = tempfile.mkdtemp(prefix="medsam-shots-sessions-")  # no earlier session to resume
    review.head_combo.setCurrentText(args.head)
    review.steps_spin.setValue(args.steps)
    viewer.dims.set_point(CORONAL, image.data_to_world([0, 116, 0])[CORONAL])
    review.start()
    wait(review.setup_job)
    for s in (80, 116, 150):
        paint_slice(labels, truth, CORONAL, s)
    for rnd in range(3):
        wait(review.run_round())
        print(f"round {rnd + 1}: {review.loop.rounds[-1].metrics}", flush=True)
        s = review.next_suggested()
        if s is not None and rnd < 2:
            paint_slice(labels, truth, CORONAL, s)  # the user corrects the suggested slice
    viewer.layers.selection.active = labels
    pump(1.0)
    for w, h in SIZES:
        shot(viewer, f"09-review-rounds-{w}x{h}.png", size=(w, h))
    print(review.loop.metrics_table(), flush=True)
    print("suggested:", review.loop.suggest(8), flush=True)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
