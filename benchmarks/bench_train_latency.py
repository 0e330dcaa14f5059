"""Prompt-to-mask latency while a head trains in a background thread (issue 5: training must not starve the GUI).

What the Fine-tune widget does: ``fine_tune`` runs in a worker thread (torch threads limited by
``TrainParams.threads``, default all cores but one) while the user keeps clicking, and every
click decodes a box on the GUI side. Measured on MNI152 axial slices with LiteMedSAM: the
median and p95 latency of ``segment_slice`` (one box) idle, then while a ``cnn`` head trains on
three labelled slices, alternating idle / training rounds in one run. The clicks take the
threads the Annotate widget gives them (:func:`napari_medsam.core.speed.interactive_threads`: the
runtime policy's count when idle, the one core training leaves while it runs);
``--decoder-threads N`` forces N in both conditions instead. Prints a table::

    python benchmarks/bench_train_latency.py [--decoder-threads N] [--rounds 3] [--prompts 30]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="litemedsam")
    p.add_argument("--decoder-threads", type=int, default=None,
                   help="force this many decoder threads in both conditions (default: the widget's policy)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=30, help="prompts timed per condition and round")
    args = p.parse_args(argv)

    import torch

    from napari_medsam._bench import bench_load, format_table, machine_info, median, p95, real_slices
    from napari_medsam.core.encoder import VolumeEncoder
    from napari_medsam.core.finetune import TrainParams, collect_training_data, fine_tune
    from napari_medsam.core.progress import drain
    from napari_medsam.core.segment import segment_slice
    from napari_medsam.core.speed import configure_runtime, interactive_threads

    rt = configure_runtime(args.decoder_threads)
    idle_threads = rt.threads
    busy_threads = args.decoder_threads or interactive_threads(idle_threads, background_busy=True)
    info = machine_info()
    loaded, _ = bench_load(args.model)
    data = real_slices(6)
    ve = VolumeEncoder(loaded, data.volume, axis=data.axis)
    drain(ve.embed(data.indices))
    labels = data.brain.astype(np.uint8)
    train = drain(collect_training_data(ve, labels, list(data.indices[:3])))
    jobs = [(k, pr) for k in data.indices for pr in data.prompts(k)]
    segment_slice(ve, jobs[0][0], [jobs[0][1]])  # warm-up
    params = TrainParams(head="cnn", max_steps=10_000, patience=0)  # trains until stopped
    print(f"{info['cpu']}, load average {info['loadavg_1min']}; decoder {idle_threads} thread(s) idle, "
          f"{busy_threads} while training; training {params.threads or 'all cores but one'} "
          f"(TrainParams default); torch {torch.__version__}")

    def clicks(threads: int) -> list[float]:
        torch.set_num_threads(threads)
        lat = []
        for i in range(args.prompts):
            k, pr = jobs[i % len(jobs)]
            t0 = time.perf_counter()
            segment_slice(ve, k, [pr])
            lat.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.02)  # a user's clicks are apart; lets the trainer run between them
        return lat

    idle: list[float] = []
    busy: list[float] = []
    steps = 0
    for _ in range(args.rounds):
        idle += clicks(idle_threads)
        cancel = threading.Event()
        done = []

        def train_loop(cancel: threading.Event = cancel, done: list = done) -> None:
            gen = fine_tune(train, params, loaded=loaded, cancel=cancel)
            try:
                for pr in gen:
                    done.append(pr.step)
            except Exception:  # noqa: BLE001 - Cancelled ends the round
                pass

        t = threading.Thread(target=train_loop, daemon=True)
        t.start()
        time.sleep(1.0)  # training under way
        busy += clicks(busy_threads)
        cancel.set()
        t.join()
        steps += len(done)
    rows = [{"condition": "idle", "n": len(idle), "median_ms": median(idle), "p95_ms": p95(idle)},
            {"condition": "while a cnn head trains", "n": len(busy), "median_ms": median(busy), "p95_ms": p95(busy)}]
    print(format_table(rows, [("condition", "condition", ""), ("n", "n", ""), ("median_ms", "median ms", ".1f"),
                              ("p95_ms", "p95 ms", ".1f")]))
    print(f"\nmedian while training / idle: {median(busy) / median(idle):.2f}x "
          f"(budget 2x); {steps} training steps ran during the clicks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
