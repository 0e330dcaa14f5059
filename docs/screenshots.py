"""Screenshots of the real napari window for the user guide (docs/images/*.png).

Run under a display (``xvfb-run -a -s "-screen 0 1920x1200x24" python docs/screenshots.py``: the
window is 1500 x 1000); it takes a few minutes on a CPU
because it uses the bundled LiteMedSAM on the real MNI152 template: open the sample, load the model,
draw a box around the left lateral ventricle on an axial slice, preview, commit, propagate, then
train a small head on a few of the propagated slices and start segmenting the volume with it.
``--model test_tiny_lite`` gives a fast run with a random model (pictures of the layout only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshots_common import open_mni, pump, shot, wait  # noqa: E402

AXIAL = 2  # NIfTI (i, j, k): axial slices are along k


def ventricle_box(t1, k: int) -> tuple[int, int, int, int]:
    """(i0, j0, i1, j1) around the left lateral ventricle on axial slice k of the MNI T1: the
    largest dark connected region inside the brain near the midline."""
    import numpy as np
    from scipy import ndimage

    s = np.asarray(t1[:, :, k], dtype=np.float32)
    brain = ndimage.binary_fill_holes(s > 0.3 * s.max())
    dark = (s < 0.55 * np.median(s[brain])) & ndimage.binary_erosion(brain, iterations=12)
    lab, n = ndimage.label(dark)
    mid = s.shape[0] // 2
    best, best_size = None, 0
    for idx, sl in enumerate(ndimage.find_objects(lab), start=1):
        size = int((lab[sl] == idx).sum())
        centre = (sl[0].start + sl[0].stop) / 2
        if size > best_size and centre < mid and mid - centre < 30:  # left hemisphere: i < midline
            best, best_size = sl, size
    if best is None:
        return (mid - 25, 95, mid - 2, 160)
    return (best[0].start - 3, best[1].start - 3, best[0].stop + 3, best[1].stop + 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="litemedsam")
    p.add_argument("--skip-finetune", action="store_true")
    args = p.parse_args()
    import numpy as np

    viewer, image, model_w = open_mni(args.model)
    t1 = np.asarray(image.data)
    k = 93  # axial slice through the bodies of the lateral ventricles
    viewer.dims.order = (AXIAL, 1, 0)  # rows: posterior -> anterior (j), columns: left -> right (i)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.orientation2d = ("up", "right")  # anterior at the top
    viewer.dims.set_point(AXIAL, image.data_to_world([0, 0, k])[AXIAL])
    _, annot = viewer.window.add_plugin_dock_widget("napari-medsam", "Annotate")
    viewer.reset_view()
    shot(viewer, "01-open-mni.png")

    wait(model_w.load())
    model_w.embed()
    pump(8.0)
    shot(viewer, "02-model-embedding.png")
    model_w.cancel()
    wait(model_w.embed_job)

    annot.set_classes(annot.classes)  # default class list
    annot.class_table.item(0, 0).setText("left lateral ventricle")
    pts, shp = annot.prompt_layers()
    i0, j0, i1, j1 = ventricle_box(t1, k)
    n, z = annot.previews_shown, annot.zooms_shown  # before the box: on an embedded slice it previews at once
    shp.add_rectangles(np.array([[i0, j0, k], [i1, j0, k], [i1, j1, k], [i0, j1, k]], float))
    end = time.perf_counter() + 600
    while annot.previews_shown == n and time.perf_counter() < end:
        pump(0.1)
    # the box is small: the zoomed mask follows the quick one (Zoom in on small objects)
    while annot.zooms_shown == z and annot._refine_tag is not None and time.perf_counter() < end:
        pump(0.1)
    viewer.layers.selection.active = shp
    shot(viewer, "03-box-preview.png")

    annot.commit()
    pump(0.5)
    annot.propagate()
    pump(3.0)
    shot(viewer, "04-propagating.png")
    wait(annot.propagate_job)
    labels = annot.labels_layer
    filled = [z for z in range(labels.data.shape[AXIAL]) if labels.data[:, :, z].any()]
    print(f"propagated over axial slices {filled[0]}-{filled[-1]} ({len(filled)} slices)" if filled else
          "propagation wrote nothing", flush=True)
    if filled:  # show a slice a few millimetres from the prompt where the labels are large
        near = [z for z in filled if 3 <= abs(z - k) <= 12] or filled
        show = max(near, key=lambda z: int(labels.data[:, :, z].astype(bool).sum()))
    else:
        show = k
    viewer.dims.set_point(AXIAL, image.data_to_world([0, 0, show])[AXIAL])
    viewer.layers.selection.active = labels
    shot(viewer, "05-propagated.png")

    viewer.dims.ndisplay = 3
    for layer in list(viewer.layers):
        layer.visible = layer in (image, labels)
    image.rendering, image.opacity = "mip", 0.35
    camera.angles = (150, -30, -160)  # from the left, above and behind
    shot(viewer, "06-labels-3d.png")
    viewer.dims.ndisplay = 2
    image.rendering, image.opacity = "mip", 1.0
    for layer in list(viewer.layers):
        layer.visible = True

    if not args.skip_finetune:
        _, fw = viewer.window.add_plugin_dock_widget("napari-medsam", "Fine-tune", tabify=True)
        fw.image_combo.set_layer(image)
        fw.labels_combo.set_layer(labels)
        fw.head_combo.setCurrentIndex(fw.head_combo.findData("cnn"))
        fw.some_slices.setChecked(True)
        if filled:
            step = max(1, len(filled) // 6)
            fw.slices_edit.setText(", ".join(str(z) for z in filled[::step]))
        fw.epochs_spin.setValue(40)
        fw.train()
        wait(fw.train_job)
        fw.segment()  # embeds every remaining slice: minutes on a CPU, so shown running, then cancelled
        pump(10.0)
        shot(viewer, "07-finetune.png")
        fw.cancel()
        wait(fw.predict_job)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
