"""Screenshots of the Review dock for the user guide (docs/images/09-review-rounds.png).

Run under a display: ``xvfb-run -a -s "-screen 0 1920x1200x24" python docs/screenshots_review.py``.
Opens the MNI152 sample, starts reviewing its coronal slices, "corrects" three slices to the
GM/WM maps nilearn ships (as a user painting them would), runs two rounds and takes the window
with the proposals, the suggestions and the metrics table. ``--model test_tiny_lite`` (the default
here: a random tiny model, minutes less on a CPU) shows the layout; ``--model litemedsam`` the real
proposals (every slice is embedded in the first round: many minutes on a CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshots import pump, shot, wait  # noqa: E402

CORONAL = 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="test_tiny_lite")
    p.add_argument("--head", default="cnn")
    args = p.parse_args()
    os.environ.setdefault("NAPARI_MEDSAM_CACHE", tempfile.mkdtemp(prefix="medsam-shots-"))
    import napari
    import numpy as np
    from nilearn import datasets

    from napari_medsam.io import read_image

    viewer = napari.Viewer(title="napari-medsam")
    viewer.window.resize(1500, 1000)
    viewer.open_sample("napari-medsam", "mni152")
    image = viewer.layers[0]
    gm = np.asarray(read_image(datasets.GM_MNI152_FILE_PATH).data[...], np.float32) / 255.0
    wm = np.asarray(read_image(datasets.WM_MNI152_FILE_PATH).data[...], np.float32) / 255.0
    truth = np.where(gm + wm > 0.5, np.where(wm > gm, 2, 1), 0).astype(np.uint8)
    labels = viewer.add_labels(np.zeros_like(truth), name="GM, WM", scale=image.scale, translate=image.translate,
                               affine=image.affine.affine_matrix)
    viewer.dims.order = (CORONAL, 2, 0)
    _, model_w = viewer.window.add_plugin_dock_widget("napari-medsam", "Model")
    _, review = viewer.window.add_plugin_dock_widget("napari-medsam", "Review", tabify=False)
    model_w.select_model(args.model)
    wait(model_w.load())
    review.image_combo.set_layer(image)
    review.labels_combo.set_layer(labels)
    review.head_combo.setCurrentText(args.head)
    viewer.dims.set_point(CORONAL, image.data_to_world([0, 116, 0])[CORONAL])
    review.start()
    wait(review.setup_job)
    for s in (80, 116, 150):  # what painting these coronal slices would write
        idx = tuple(a.ravel() for a in np.indices(truth[:, s].shape))
        full = (idx[0], np.full(idx[0].shape, s), idx[1])
        labels.data_setitem(full, truth[full])
    for _ in range(2):
        wait(review.run_round())
        s = review.next_suggested()
        if s is not None:
            sl = (slice(None), s, slice(None))
            idx = tuple(a.ravel() for a in np.indices(truth[sl].shape))
            full = (idx[0], np.full(idx[0].shape, s), idx[1])
            labels.data_setitem(full, truth[full])
    wait(review.run_round())
    review.next_suggested()
    viewer.layers.selection.active = labels
    pump(1.0)
    shot(viewer, "09-review-rounds.png")
    print(review.loop.metrics_table(), flush=True)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
