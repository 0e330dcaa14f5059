"""The Fine-tune dock trains the ``hsam`` and ``selfprompt`` heads on a real volume (issue 13).

Run under a display: ``xvfb-run -a -s "-screen 0 1920x1080x24" python docs/screenshots_heads.py``.
Opens the MNI152 sample, loads the bundled LiteMedSAM (the Model dock's default precision), paints
nilearn's GM/WM maps (what a user painting them writes) on ``--k`` coronal slices spread through the
brain, as ``benchmarks/bench_heads.py`` picks them, and for each head: picks it in the Fine-tune dock,
trains (the dock's defaults: auto epochs, seed 0), segments the volume into a new layer, prints the
Dice of that layer against the GM/WM maps on every brain slice it was not trained on (and on every
3rd, the benchmark's evaluation slices), and takes the window at 1920 x 1080 on an unseen slice as
``docs/images/13-finetune-<head>-1920x1080.png``. The first segmentation embeds every coronal slice
(minutes on a CPU); the second reuses the session's cache. ``--model test_tiny_lite`` is a fast run
with a random model (the layout only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshots_common import open_mni, paint_slice, pump, shot, wait  # noqa: E402

CORONAL = 1
SIZE = (1920, 1080)


def spread(brain: list[int], k: int) -> list[int]:
    """``k`` slices evenly spread through the brain: the rule of ``benchmarks/bench_heads.py``."""
    import numpy as np

    pos = np.linspace(0, len(brain) - 1, k + 2)[1:-1]
    return sorted({brain[int(round(p))] for p in pos})


def dice(pred, truth, classes=(1, 2)) -> list[float]:
    out = []
    for c in classes:
        p, t = pred == c, truth == c
        denom = int(p.sum()) + int(t.sum())
        out.append(2.0 * int((p & t).sum()) / denom if denom else 1.0)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="litemedsam")
    p.add_argument("--heads", default="hsam,selfprompt")
    p.add_argument("--k", type=int, default=3, help="labelled coronal slices (default 3)")
    p.add_argument("--epochs", type=int, default=0, help="the dock's Epochs (max); 0: auto, its default")
    p.add_argument("--show", type=int, default=None, help="coronal slice to take (default: the unseen "
                   "brain slice halfway between the first two training slices)")
    args = p.parse_args()
    import numpy as np
    from nilearn import datasets

    from napari_medsam.io import read_image

    viewer, image, model_w = open_mni(args.model, size=SIZE)
    gm = np.asarray(read_image(datasets.GM_MNI152_FILE_PATH).data[...], np.float32) / 255.0
    wm = np.asarray(read_image(datasets.WM_MNI152_FILE_PATH).data[...], np.float32) / 255.0
    truth = np.where(gm + wm > 0.5, np.where(wm > gm, 2, 1), 0).astype(np.uint8)
    assert truth.shape == image.data.shape, (truth.shape, image.data.shape)
    labels = viewer.add_labels(np.zeros_like(truth), name="GM, WM", scale=image.scale, translate=image.translate,
                               affine=image.affine.affine_matrix)
    viewer.dims.order = (CORONAL, 2, 0)  # rows: inferior -> superior (k), columns: left -> right (i)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.orientation2d = ("up", "right")  # superior at the top
    brain = [j for j in range(truth.shape[CORONAL]) if truth[:, j].any()]
    train = spread(brain, args.k)
    unseen = [j for j in brain if j not in train]
    every3 = [j for j in brain[::3] if j not in train]
    show = args.show if args.show is not None else (train[0] + train[1]) // 2 if len(train) > 1 else unseen[0]
    print(f"coronal brain slices {brain[0]}-{brain[-1]} ({len(brain)}); painted {train}; showing {show}", flush=True)
    for s in train:
        paint_slice(labels, truth, CORONAL, s)
    _, fw = viewer.window.add_plugin_dock_widget("napari-medsam", "Fine-tune", tabify=True)
    t0 = time.perf_counter()
    wait(model_w.load())
    print(f"model {model_w.session.loaded.name} loaded ({model_w.precision_combo.currentText()}) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    fw.session.class_names.update({1: "GM", 2: "WM"})  # what naming them in the Annotate dock's class list writes
    fw.image_combo.set_layer(image)
    fw.labels_combo.set_layer(labels)
    viewer.dims.set_point(CORONAL, image.data_to_world([0, show, 0])[CORONAL])
    pump(0.5)
    predictions = []
    for kind in [h.strip() for h in args.heads.split(",") if h.strip()]:
        index = fw.head_combo.findData(kind)
        assert index >= 0, kind
        fw.head_combo.setCurrentIndex(index)
        fw.epochs_spin.setValue(args.epochs)
        t0 = time.perf_counter()
        fw.train()
        wait(fw.train_job)
        head = fw.head
        assert head is not None and head.kind == kind, (head, kind)
        hist = head.meta.history
        print(f"{kind}: trained on {head.meta.training_slices} (axis {head.meta.axis}), {hist['steps']} steps, "
              f"{hist['seconds']:.1f} s in the trainer ({time.perf_counter() - t0:.1f} s wall with embedding); "
              f"dock says: {fw.loss_label.text()!r}", flush=True)
        t0 = time.perf_counter()
        fw.segment()
        wait(fw.predict_job)
        layer = fw.prediction_layer
        assert layer is not None and layer not in predictions, "no new prediction layer"
        predictions.append(layer)
        pred = np.asarray(layer.data)
        print(f"{kind}: segmented in {time.perf_counter() - t0:.1f} s wall; dock says: {fw.loss_label.text()!r}",
              flush=True)
        for name, sl in (("all unseen brain slices", unseen), ("every 3rd brain slice, unseen", every3),
                         (f"slice {show}", [show])):
            d = dice(pred[:, sl], truth[:, sl])
            print(f"{kind}: Dice GM {d[0]:.3f} WM {d[1]:.3f} mean {np.mean(d):.3f} on {name} ({len(sl)})",
                  flush=True)
        for other in predictions[:-1]:
            other.visible = False
        viewer.layers.selection.active = layer
        pump(1.0)
        shot(viewer, f"13-finetune-{kind}-{SIZE[0]}x{SIZE[1]}.png", size=SIZE)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
