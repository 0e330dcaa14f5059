"""``python -m napari_medsam [IMAGE]`` and ``napari-medsam gui [IMAGE]``: start annotating.

With a display, :func:`launch` opens napari with the image (the MNI152 T1 template by default), the
plugin's Model and Annotate widgets docked, and the bundled model loading in the background.
Without one it says so and runs the same job headless: it embeds a few slices around the middle of
the volume and segments the middle one with a box, printing what it did.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .core.registry import DEFAULT_MODEL


def has_display() -> bool:
    """Whether a window can be shown (X11 / Wayland on Linux; always on macOS and Windows)."""
    if not sys.platform.startswith("linux"):
        return True
    if os.environ.get("QT_QPA_PLATFORM", "").split(":")[0] in ("offscreen", "minimal"):
        return False
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def launch(image: str | os.PathLike | None = None, *, model: str = DEFAULT_MODEL, device: str = "auto",
           headless: bool | None = None, block: bool = True) -> Any:
    """Open napari on ``image`` with the plugin's widgets (or run headless without a display).

    Returns the viewer (``block=False`` returns before the event loop, for scripts and tests), or
    the headless summary dict.
    """
    if headless is None:
        headless = not has_display()
    if headless:
        why = "no display (DISPLAY and WAYLAND_DISPLAY are not set)" if not has_display() else "headless requested"
        print(f"napari-medsam: {why}; running the same job without a window.", flush=True)
        return run_headless(image, model=model, device=device)
    return _launch_gui(image, model=model, device=device, block=block)


def _launch_gui(image: str | os.PathLike | None, *, model: str, device: str, block: bool) -> Any:
    import napari

    viewer = napari.Viewer(title="napari-medsam")
    if image is None:
        viewer.open_sample("napari-medsam", "mni152")
    else:
        viewer.open(os.fspath(image), plugin="napari-medsam")
    # The first dock shows a scan with an affine in the axial radiological view and makes our
    # reader napari's choice for the medical formats (_qt/session.py).
    _, model_w = viewer.window.add_plugin_dock_widget("napari-medsam", "Model")
    viewer.window.add_plugin_dock_widget("napari-medsam", "Annotate", tabify=False)
    layer = viewer.layers[0] if len(viewer.layers) else None
    if layer is not None and layer.ndim == 3:
        from ._layers import slice_axis

        axis = slice_axis(viewer.dims, layer)
        viewer.dims.set_current_step(axis, layer.data.shape[axis] // 2)
    model_w.select_model(model)
    if device != "auto":
        model_w.device_combo.setCurrentText(device)
    model_w.load()  # in a thread worker: the window is usable at once
    if block:
        napari.run()
    return viewer


def _brain_or_body_box(slice_: Any) -> tuple[float, float, float, float]:
    """A box around what stands out of the background on a slice (threshold at 20 % of the range)."""
    import numpy as np

    s = np.asarray(slice_, dtype=np.float32)
    thr = s.min() + 0.2 * (s.max() - s.min())
    rows, cols = np.nonzero(s > thr)
    if rows.size == 0:
        h, w = s.shape
        return (h * 0.25, w * 0.25, h * 0.75, w * 0.75)
    return (float(rows.min()), float(cols.min()), float(rows.max() + 1), float(cols.max() + 1))


def run_headless(image: str | os.PathLike | None = None, *, model: str = DEFAULT_MODEL, device: str = "auto",
                 n_slices: int = 5) -> dict[str, Any]:
    """Embed a few slices around the middle and segment the middle one with a box; print and return it."""
    from ._sample_data import mni152_path
    from .core.build import load_model
    from .core.embeddings import EmbeddingCache
    from .core.encoder import VolumeEncoder
    from .core.progress import drain
    from .core.segment import Prompt2D, segment_slice
    from .io import read_image

    path = os.fspath(image) if image is not None else str(mni152_path())
    vol = read_image(path, lazy=not path.lower().endswith(".gz"))
    print(f"image: {path} shape {vol.shape} spacing {tuple(round(s, 3) for s in vol.spacing)}", flush=True)
    t0 = time.perf_counter()
    loaded = load_model(model, device=device)
    print(f"model: {loaded.name} on {loaded.device} ({time.perf_counter() - t0:.1f} s to load)", flush=True)
    enc = VolumeEncoder(loaded, vol, cache=EmbeddingCache(disk=False))
    mid = enc.n_slices // 2
    lo = max(0, mid - n_slices // 2)
    picked = list(range(lo, min(enc.n_slices, lo + n_slices)))
    t0 = time.perf_counter()
    summary = drain(enc.embed(picked))
    secs = time.perf_counter() - t0
    print(f"embedded slices {picked[0]}-{picked[-1]} along axis {enc.axis}: {summary['computed']} computed in "
          f"{secs:.1f} s ({secs / max(1, len(picked)):.2f} s per slice)", flush=True)
    box = _brain_or_body_box(enc.intensity.apply(enc.raw_slice(mid)))
    t0 = time.perf_counter()
    res = segment_slice(enc, mid, [Prompt2D.from_box(box)])[0]
    area = int(res.mask.sum())
    print(f"segmented slice {mid} with the box (r0, c0, r1, c1) = {tuple(round(v) for v in box)}: "
          f"{area} pixels ({100 * area / res.mask.size:.1f} % of the slice), predicted IoU {res.iou:.2f}, "
          f"{1000 * (time.perf_counter() - t0):.0f} ms", flush=True)
    return {"image": path, "slices": picked, "slice": mid, "box": box, "area": area, "iou": res.iou,
            "model": loaded.name}


def build_parser(prog: str = "python -m napari_medsam") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", nargs="?", default=None,
                   help="a NIfTI, TIFF, zarr / OME-Zarr or .npy image (default: the MNI152 T1 sample)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model to load (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--headless", action="store_true", help="run the headless job even with a display")


def main(argv: Sequence[str] | None = None) -> int:
    from .core.errors import MedSamError

    args = build_parser().parse_args(argv)
    try:
        launch(args.image, model=args.model, device=args.device, headless=True if args.headless else None)
    except MedSamError as e:
        print(f"napari-medsam: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
