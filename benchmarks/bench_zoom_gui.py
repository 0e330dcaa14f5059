"""Zoomed previews in a real napari window: a small box's release -> its quick preview -> its zoomed one.

LiteMedSAM on the MNI152 T1 template (nilearn's copy), opened axial through the plugin's reader,
the Annotate dock docked as a user has it (prefetching off: the slices are embedded first, so the
quick preview is one decoder call on the main thread). On each of ``--boxes`` axial slices a box is
put around a lateral ventricle (see :func:`ventricle_boxes`), the clock starts when the box lands in
the Shapes layer, and the time to the quick preview (``preview_shown``) and to the zoomed one
(``zoom_shown``) are printed per box, then their medians and the median ratio. Both are taken in
one run, box by box, so the ratio holds on a loaded machine; the absolute figures do not.

Run: ``OMP_NUM_THREADS=1 xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/bench_zoom_gui.py``
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def ventricle_boxes(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, slices: list[int]) -> dict[int, tuple]:
    """{axial slice k: (r0, c0, r1, c1)} of one lateral ventricle: the largest dark (T1 under half the
    brain's median) component inside the brain mask eroded by 10 px, near the slice's middle."""
    from scipy import ndimage

    out = {}
    for k in slices:
        tissue = gm[:, :, k] + wm[:, :, k]
        brain = ndimage.binary_fill_holes(ndimage.binary_closing(tissue > 0.5, iterations=3))
        if not brain.any():
            continue
        img = np.asarray(t1[:, :, k], np.float32)
        csf = ndimage.binary_erosion(brain, iterations=10) & (img < 0.5 * np.median(img[brain]))
        lab, _n = ndimage.label(csf)
        h, w = csf.shape
        best, best_size = None, 0
        for i, sl in enumerate(ndimage.find_objects(lab), start=1):
            size = int((lab[sl] == i).sum())
            cr, cc = (sl[0].start + sl[0].stop) / 2, (sl[1].start + sl[1].stop) / 2
            if abs(cr - h / 2) < h / 6 and abs(cc - w / 2) < w / 4 and size > best_size:
                best, best_size = sl, size
        if best is not None and best_size >= 20:
            out[k] = (float(best[0].start), float(best[1].start), float(best[0].stop), float(best[1].stop))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--boxes", type=int, default=7, help="boxes, one per axial slice (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--model", default="litemedsam")
    args = p.parse_args()

    import nibabel as nib
    import torch
    from qtpy.QtWidgets import QApplication

    torch.set_num_threads(args.threads)
    import napari
    import nilearn

    from napari_medsam import _layers
    from napari_medsam._qt._shared import encoder_request
    from napari_medsam.app.params import ModelChoice
    from napari_medsam.core.progress import drain

    data = Path(nilearn.__file__).parent / "datasets" / "data"
    MNI_T1, MNI_GM, MNI_WM = (data / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm"))
    gm = np.asanyarray(nib.load(MNI_GM).dataobj, dtype=np.float32)
    wm = np.asanyarray(nib.load(MNI_WM).dataobj, dtype=np.float32)
    viewer = napari.Viewer(show=True)
    _, annot = viewer.window.add_plugin_dock_widget("napari-medsam", "Annotate")
    annot.prefetch_check.setChecked(False)
    session = annot.session
    t0 = time.perf_counter()
    session.set_model(drain(session.load_model_steps(ModelChoice(args.model, device="cpu"))))
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
    image = viewer.open(str(MNI_T1), plugin="napari-medsam")[0]
    annot.image_combo.set_layer(image)
    view = _layers.current_slice(viewer.dims, image)
    assert view is not None and view.axis == 2, view  # nilearn's MNI opens axial: data axis 2 is k
    ks = [int(k) for k in np.linspace(80, 100, args.boxes).round()]
    boxes = ventricle_boxes(np.asarray(image.data), gm, wm, ks)
    req = encoder_request(image, viewer, session)
    enc = session.encoder(req)
    drain(enc.embed(sorted(boxes)))
    print(f"embedded {len(boxes)} slices; slice shape {enc.slice_shape}")
    _, shp = annot.prompt_layers()
    shown: dict[str, float] = {}
    computed: dict[str, float] = {}  # what the model took: the quick decode; the window's encoder call + decode

    def on_quick(latency: float, compute: float) -> None:
        shown["quick"], computed["quick"] = time.perf_counter(), compute

    def on_zoom(latency: float, compute: float) -> None:
        shown["zoom"], computed["zoom"] = time.perf_counter(), compute

    annot.preview_shown.connect(on_quick)
    annot.zoom_shown.connect(on_zoom)
    app = QApplication.instance()

    def settle(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.005)

    rows = []
    for i, (k, (r0, c0, r1, c1)) in enumerate(sorted(boxes.items())):
        viewer.dims.set_point(2, image.data_to_world([0, 0, k])[2])
        settle(0.3)
        shown.clear()
        n = annot.zooms_shown
        t_box = time.perf_counter()
        shp.add_rectangles(np.array([[r0, c0, k], [r0, c1, k], [r1, c1, k], [r1, c0, k]], float))
        while annot.zooms_shown == n and time.perf_counter() - t_box < 60:
            app.processEvents()
            time.sleep(0.001)
        if "zoom" not in shown:
            print(f"slice {k}: no zoomed preview ({annot.status_label.text()})")
            continue
        window = session.zoom_window(req, k, annot._snapshot()[2])
        quick_ms, zoom_ms = 1000 * (shown["quick"] - t_box), 1000 * (shown["zoom"] - t_box)
        warm = i > 0
        print(f"slice {k}: box {int(r1 - r0)}x{int(c1 - c0)} px, window {window[2] - window[0]} px: "
              f"quick {quick_ms:.0f} ms, zoomed {zoom_ms:.0f} ms (x{zoom_ms / quick_ms:.1f}; model "
              f"{1000 * computed['quick']:.0f} / {1000 * computed['zoom']:.0f} ms)"
              f"{'' if warm else ' [warm-up, left out]'}; {annot.status_label.text()}", flush=True)
        if warm:
            rows.append((quick_ms, zoom_ms, 1000 * computed["zoom"]))
        annot.clear_slice()
        settle(0.2)
    if rows:
        q = statistics.median(r[0] for r in rows)
        z = statistics.median(r[1] for r in rows)
        ratio = statistics.median(r[1] / r[0] for r in rows)
        enc_ms = statistics.median(r[2] for r in rows)
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        print(f"RESULT {len(rows)} boxes: box release -> quick preview median {q:.0f} ms, -> zoomed preview "
              f"median {z:.0f} ms (its encoder call + decode {enc_ms:.0f} ms); zoomed / quick median x{ratio:.1f}; "
              f"load average {' '.join(load)}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
