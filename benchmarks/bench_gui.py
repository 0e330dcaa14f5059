"""Responsiveness of the napari widgets: main-thread stalls while a volume embeds, prompt latency.

Run under a display (``xvfb-run -a python benchmarks/bench_gui.py``). It opens a real napari window
with the plugin's Model and Annotate widgets, then measures on the GUI (main) thread:

1. the longest gap between ticks of a 10 ms ``QTimer`` while idle (baseline) and while the Model
   widget embeds a 100-slice volume in its thread worker (the figure that must stay < 100 ms);
2. prompt latency: from a box added to the Shapes layer to its preview drawn in the viewer, on an
   embedded slice, idle and while an embedding worker runs (the trap another SAM plugin hit with
   napari >= 0.5, which made it turn its thread workers off);
3. the image encoder's speed in the main thread and in a thread worker (same slices, fresh cache).

Prints one line per figure. ``--model test_tiny_lite`` gives a quick smoke run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="litemedsam", help="model to load (default litemedsam)")
    p.add_argument("--slices", type=int, default=100, help="slices of the volume to embed (default 100)")
    p.add_argument("--prompts", type=int, default=5, help="prompts per latency figure (default 5)")
    p.add_argument("--tick-ms", type=int, default=10, help="timer interval on the main thread (default 10)")
    p.add_argument("--napari-bar-slices", type=int, default=12,
                   help="slices to embed with napari's own progress bar on, for comparison (0: skip)")
    return p.parse_args()


class StallMeter:
    """Records the gaps between ticks of a QTimer on the main thread."""

    def __init__(self, interval_ms: int) -> None:
        from qtpy.QtCore import QTimer

        self.interval = interval_ms / 1000
        self.gaps: list[float] = []
        self._last: float | None = None
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.gaps.append(now - self._last)
        self._last = now

    def start(self) -> None:
        self.gaps, self._last = [], None
        self.timer.start()

    def stop(self) -> dict[str, float]:
        self.timer.stop()
        g = sorted(self.gaps) or [0.0]
        return {"max_ms": 1000 * g[-1], "p99_ms": 1000 * g[min(len(g) - 1, int(0.99 * len(g)))],
                "median_ms": 1000 * statistics.median(g), "ticks": len(self.gaps),
                "over_50ms": sum(x > 0.05 for x in g)}


def pump(seconds: float) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.001)


def pump_until(cond, timeout: float) -> bool:
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        QApplication.processEvents()
        if cond():
            return True
        time.sleep(0.001)
    return False


def fmt(stats: dict[str, float]) -> str:
    return (f"max {stats['max_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms, median {stats['median_ms']:.1f} ms, "
            f"{stats['over_50ms']} gaps > 50 ms in {stats['ticks']} ticks")


def main() -> int:
    args = _parse()
    os.environ.setdefault("NAPARI_MEDSAM_CACHE", tempfile.mkdtemp(prefix="medsam-bench-"))
    import napari
    import numpy as np

    from napari_medsam._qt import _workers
    from napari_medsam._sample_data import make_mni152_sample

    print(f"# napari {napari.__version__}, model {args.model}, cores {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    data, kwargs, _ = make_mni152_sample()[0]
    n = min(args.slices, data.shape[0])
    start = (data.shape[0] - n) // 2
    vol = np.ascontiguousarray(data[start:start + n])
    viewer = napari.Viewer(show=True)
    image = viewer.add_image(vol, name=f"MNI {n} slices", scale=kwargs["scale"], colormap="gray")
    other = viewer.add_image(np.ascontiguousarray(data[:, :, 40:140].transpose(2, 0, 1)), name="MNI axial",
                             scale=kwargs["scale"], colormap="gray", visible=False)
    _, model_w = viewer.window.add_plugin_dock_widget("napari-medsam", "Model")
    _, annot_w = viewer.window.add_plugin_dock_widget("napari-medsam", "Annotate")
    pump(1.0)
    meter = StallMeter(args.tick_ms)

    meter.start()
    pump(2.0)
    print(f"idle main thread (2 s): {fmt(meter.stop())}", flush=True)

    model_w.select_model(args.model)
    meter.start()
    t0 = time.perf_counter()
    model_w.load()
    _workers.wait(model_w.load_job, 600_000)
    print(f"load {args.model} in a worker: {time.perf_counter() - t0:.1f} s; main thread {fmt(meter.stop())}",
          flush=True)
    if annot_w.session.loaded is None:
        print("model did not load", file=sys.stderr)
        return 1

    # -- 1. embedding a volume: main-thread stalls
    model_w.image_combo.set_layer(image)
    viewer.dims.current_step = (n // 2, *viewer.dims.current_step[1:])
    pump(0.2)
    meter.start()
    t0 = time.perf_counter()
    model_w.embed()
    _workers.wait(model_w.embed_job, 3_600_000)
    secs = time.perf_counter() - t0
    stats = meter.stop()
    print(f"embed {n} slices in a worker: {secs:.1f} s ({secs / n * 1000:.0f} ms/slice); "
          f"main thread {fmt(stats)}", flush=True)
    print(f"RESULT max main-thread stall while embedding {n} slices: {stats['max_ms']:.1f} ms "
          f"({'OK' if stats['max_ms'] < 100 else 'OVER'} the 100 ms budget)", flush=True)

    # -- 1b. the same with napari's own progress bar (its activity indicator animates a GIF)
    if args.napari_bar_slices:
        k_bar = args.napari_bar_slices
        model_w.session.napari_progress = True
        model_w.image_combo.set_layer(other)
        pump(0.2)
        meter.start()
        t0 = time.perf_counter()
        model_w.embed()
        pump_until(lambda: model_w.embed_job.done or (model_w.embed_job.last is not None
                                                       and model_w.embed_job.last.step >= k_bar), 3600)
        secs_bar = time.perf_counter() - t0
        done_bar = model_w.embed_job.last.step if model_w.embed_job.last is not None else 0
        stats_bar = meter.stop()
        model_w.embed_job.cancel()
        _workers.wait(model_w.embed_job, 600_000)
        model_w.session.napari_progress = False
        print(f"embed {done_bar} slices with napari's progress bar on: {secs_bar:.1f} s "
              f"({secs_bar / max(done_bar, 1) * 1000:.0f} ms/slice); main thread {fmt(stats_bar)}", flush=True)

    # -- 2. prompt latency on embedded slices, idle and with a worker running
    annot_w.image_combo.set_layer(image)
    pump(0.3)
    pts, shp = annot_w.prompt_layers()
    h, w = vol.shape[1:]

    shown: list[tuple[float, float]] = []  # (latency, model seconds) of every preview drawn
    annot_w.preview_shown.connect(lambda latency, compute: shown.append((latency, compute)))
    compute_times = lambda: [c for _, c in shown]  # noqa: E731

    def one_prompt(z: int, k: int) -> float:
        viewer.dims.current_step = (z, *viewer.dims.current_step[1:])
        pump(0.05)
        before = len(shown)
        r0, c0 = h * 0.30 + k, w * 0.25 + k
        box = np.array([[z, r0, c0], [z, r0, c0 + w * 0.4], [z, r0 + h * 0.4, c0 + w * 0.4], [z, r0 + h * 0.4, c0]])
        shp.add_rectangles(box)
        ok = pump_until(lambda: len(shown) > before, 120)
        lat = shown[-1][0] if ok else float("nan")
        annot_w.clear_slice()
        pump(0.05)
        return lat

    one_prompt(n // 2, 0)  # warm-up (first decoder call)
    idle = [one_prompt(n // 2 + k, k) for k in range(args.prompts)]
    idle_compute = compute_times()[-args.prompts:]

    # the same prompts decoded synchronously on the main thread in the prompt's event handler
    annot_w.preview_in_worker = False
    direct = [one_prompt(n // 2 + k, k) for k in range(args.prompts)]
    annot_w.preview_in_worker = True
    meter.start()
    model_w.image_combo.set_layer(other)  # a second volume embeds in the background meanwhile
    pump(0.1)
    model_w.embed()
    pump(1.0)
    busy = [one_prompt(n // 2 - 1 - k, k) for k in range(args.prompts)]
    busy_compute = compute_times()[-args.prompts:]
    running = model_w.embed_job is not None and model_w.embed_job.running
    stats_busy = meter.stop()
    if model_w.embed_job is not None:
        model_w.embed_job.cancel()
        _workers.wait(model_w.embed_job, 600_000)

    def lat(xs: list[float], compute: list[float] | None = None) -> str:
        ms = [1000 * x for x in xs]
        out = f"median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms over {len(ms)} boxes"
        if compute:
            out += f" (model time in the worker: median {1000 * statistics.median(compute):.0f} ms)"
        return out

    print(f"prompt latency (box -> preview on screen), idle: {lat(idle, idle_compute)}", flush=True)
    print(f"prompt latency with an embedding worker running{'' if running else ' (it finished early)'}: "
          f"{lat(busy, busy_compute)}; main thread meanwhile {fmt(stats_busy)}", flush=True)
    print(f"same prompts decoded on the main thread, no worker (the window blocks meanwhile): {lat(direct)}",
          flush=True)

    # -- 3. encoder speed: main thread vs thread worker (fresh cache, same slices)
    from napari_medsam.app.session import AnnotationSession, EncoderRequest
    from napari_medsam.core.progress import drain
    from napari_medsam.core.volume import ImageVolume

    probe = AnnotationSession(disk_cache=False)
    probe.set_model(annot_w.session.loaded)
    k = 6

    def req(offset: int) -> EncoderRequest:
        sub = np.ascontiguousarray(vol[offset:offset + k]) + 0  # new content -> nothing cached
        return EncoderRequest(image_id=offset, data_id=id(sub), volume=ImageVolume.from_array(sub), axis=0)

    r_main = req(0)
    drain(probe.embed_steps(r_main))  # warm-up (builds the encoder once)
    r_main = req(k)
    t0 = time.perf_counter()
    drain(probe.embed_steps(r_main))
    main_s = (time.perf_counter() - t0) / k
    r_worker = req(2 * k)
    t0 = time.perf_counter()
    job = _workers.start(lambda cancel: probe.embed_steps(r_worker, cancel=cancel), desc="probe", show_bar=False)
    _workers.wait(job, 600_000)
    worker_s = (time.perf_counter() - t0) / k
    print(f"image encoder, {k} slices: main thread {1000 * main_s:.0f} ms/slice, thread worker "
          f"{1000 * worker_s:.0f} ms/slice", flush=True)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
