"""Adapters from the shell: ``train --adapter medsa|lora`` writes an adapter file; ``segment --adapter FILE`` uses it.

``napari-medsam train IMAGE LABELS --adapter medsa -o wm.adapter.pt [--sd-trans] [--hyp] [--rank R]``
trains Med-SA adapters (or LoRA) in the image encoder and the mask decoder on the labelled slices,
prompted with boxes simulated from the labels (:func:`napari_medsam.core.adapt.train_adapters`),
after printing the estimated time; ``--head`` is not needed. The adapted model then segments with
boxes as the plain one does: ``napari-medsam segment IMAGE --adapter wm.adapter.pt --box ...``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import positive_float, positive_int, run_with_progress

ADAPTER_CHOICES = ("medsa", "lora")


def add_train_args(t: argparse.ArgumentParser) -> None:
    """The adapter options of ``train``."""
    g = t.add_argument_group("adapters (Medical SAM Adapter / LoRA: adapt the encoder itself, box prompts)")
    g.add_argument("--adapter", default=None, choices=ADAPTER_CHOICES,
                   help="train adapters in the encoder + the mask decoder instead of a head and write an adapter "
                        "file to -o: medsa (bottleneck adapters) or lora (low-rank q/v updates)")
    g.add_argument("--sd-trans", action="store_true",
                   help="adapters: SD-Trans depth attention over the neighbouring slices (one on each side)")
    t.add_argument("--with-adapter", default=None, metavar="FILE",
                   help="train the head on the embeddings of the encoder adapted by FILE (written by "
                        "`train --adapter ...`); predict with it then needs --adapter FILE too")
    g.add_argument("--hyp", action="store_true", help="adapters: HyP-Adpt, a prompt-conditioned adapter in the decoder")
    g.add_argument("--rank", type=positive_int, default=4, help="LoRA rank (default 4)")
    g.add_argument("--steps", type=positive_int, default=None, help="adapters: training steps (default 80)")
    g.add_argument("--decoder-lr", type=positive_float, default=None,
                   help="adapters: learning rate of the mask decoder (default 1e-4; the adapters' is --lr, 1e-3)")


def add_file_arg(p: argparse.ArgumentParser) -> None:
    """``--adapter FILE`` for commands that segment."""
    p.add_argument("--adapter", default=None, metavar="FILE",
                   help="an adapter file written by `napari-medsam train --adapter ...` (for the same --model)")


def apply_from_args(args: argparse.Namespace, loaded: Any, attr: str = "adapter") -> Any:
    """``loaded`` with the adapter of ``--adapter FILE`` (the option stored as ``attr``) applied;
    ``loaded`` itself without one."""
    path = getattr(args, attr, None)
    if not path:
        return loaded
    from ..core.adapt import describe_adapter, load_adapter

    adapted = load_adapter(path, loaded).loaded
    print(f"using {describe_adapter(adapted)} from {path}", file=sys.stderr)
    return adapted


def run_train(args: argparse.Namespace) -> int:
    from ..core.adapt import AdapterConfig, AdaptParams, estimate_seconds, save_adapter, train_adapters
    from ..core.errors import MedSamError
    from ..io import read_image
    from ._common import check_outputs, encoder_from_args, load_from_args, parse_int_list
    from .heads import _read_labels

    if getattr(args, "init", None):
        raise MedSamError("--init continues a head; adapters start afresh (drop --init)")
    check_outputs(args, [args.output], [args.image, args.labels, args.weights], kind="file")
    image = read_image(args.image)
    labels = _read_labels(args.labels, image)
    loaded = load_from_args(args)
    encoder = encoder_from_args(args, loaded, image)
    config = AdapterConfig(kind=args.adapter, rank=args.rank, sd_trans=args.sd_trans, hyp=args.hyp)
    kw: dict[str, Any] = {}
    for name in ("seed", "steps", "lr", "decoder_lr", "batch_size", "threads"):  # the shared train options
        value = getattr(args, name, None)
        if value is not None:
            kw[name] = value
    params = AdaptParams(**kw)
    slices = parse_int_list(args.slices)
    n = len(slices) if slices else None
    if n is None:
        from ..core.finetune import labelled_slices

        n = len(labelled_slices(labels, encoder.axis)) if encoder.is_3d else 1
    est = estimate_seconds(loaded, config, params, n_slices=max(1, n))
    print(f"adapter {config.tag} on {n} slice(s): estimated {est['total_s']:.0f} s "
          f"({params.steps} steps x {est['step_s']:.2f} s on this machine now)", file=sys.stderr)
    trained = run_with_progress(train_adapters(encoder, labels, slices, config=config, params=params),
                                "training", unit="step")
    out = save_adapter(args.output, trained)
    h, c = trained.meta.history, trained.meta.parameters
    print(f"trained adapter {config.tag} on {h['n_slices']} slice(s) along axis {trained.meta.axis} "
          f"({', '.join(str(s) for s in trained.meta.training_slices[:12])}): {h['steps']} steps in "
          f"{h['seconds']:.1f} s, loss {h['first_loss']:.4f} -> {h['final_loss']:.4f}; "
          f"{c['trainable']:,} trainable parameters ({100 * c['share']:.1f} %); wrote {out}")
    return 0
