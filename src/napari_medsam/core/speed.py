"""Inference speed: how a loaded model is prepared to run fast, and the CPU runtime policy.

Nothing here runs on import. Two entry points:

* :func:`optimize_for_inference` prepares a :class:`~napari_medsam.core.build.LoadedModel`:
  row-banded execution of the full-resolution conv stage on CPU (exact: same arithmetic on the
  same pixels, in smaller pieces), optional int8 dynamic quantization of the encoder's
  matrix multiplies (changes embeddings beyond round-off, so the returned model has another
  ``variant`` and therefore other cache keys), optional ``torch.compile``. ``load_model`` calls it
  with the exact defaults.
* The process-wide CPU policy (:func:`~napari_medsam.core.runtime.configure_runtime`: threads,
  allocator) lives apart in :mod:`napari_medsam.core.runtime`; it is re-exported here for scripts
  written against the older layout.

Measured on an idle 2-core AVX2 CPU (``benchmarks/bench_encoder.py``, see ``docs/benchmarks.md``):
LiteMedSAM embeds a slice 2.1x faster than the reference NCHW forward run the way other tools run
it (a process of its own with PyTorch's and glibc's defaults; 1.9-2.2x over six runs), and 1.2x
faster than that forward under this runtime policy; the masks are identical. The matrix products
then run at ~94 % of the fp32 peak. Rejected there: bf16 (no native bf16 on such CPUs:
``torch.mm`` runs at ~1 GFLOP/s), int8 (masks IoU 0.84), ``torch.compile`` (slower than this
eager code), batching slices on CPU (no faster, see :func:`encoder_call_size`).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

from .loaded import LoadedModel
from .runtime import (  # re-exported: the CPU policy moved to core.runtime
    RuntimeSettings,
    available_cpus,
    busy_cpus_elsewhere,
    configure_runtime,
    interactive_threads,
    physical_cpus,
    recommended_threads,
)

__all__ = [
    "INT8_VARIANT",
    "RuntimeSettings",
    "available_cpus",
    "busy_cpus_elsewhere",
    "physical_cpus",
    "configure_runtime",
    "encoder_call_size",
    "interactive_threads",
    "optimize_for_inference",
    "recommended_threads",
    "set_band_rows",
]


#: Appended to ``LoadedModel.variant`` (and so to every embedding cache key) by int8 quantization.
INT8_VARIANT = "+int8dyn"
#: Rows per band for the full-resolution conv stage on CPU. Banding keeps every activation below
#: ~20 MiB (LiteMedSAM: 66 rows x 256 columns x 256 channels x 4 B = 17 MiB instead of 64 MiB),
#: which is what glibc serves from its heap instead of fresh page-faulted mmaps: ~1.3x faster in a
#: worker thread (the GUI path, where glibc's per-thread arenas mmap anything above 64 MiB) and
#: ~1.08x in the main thread with glibc's defaults; neutral once :func:`configure_runtime` tuned
#: the allocator. Four bands add few kernel launches, so multi-threaded runs lose nothing.
DEFAULT_BAND_ROWS = 64

# --------------------------------------------------------------------------------------------- model


def encoder_call_size(loaded: LoadedModel, n: int) -> int:
    """Slices per encoder call for a batch of ``n``: all of them on a GPU, one on a CPU.

    On a CPU a batch gains nothing (every matrix multiply already has thousands of rows) and
    multiplies the size of every activation, which then falls out of the cache and, above the
    allocator's thresholds, is page-faulted in afresh: batch 4 measured 1.0-1.3x slower per
    slice than four single calls. Results are identical either way.
    """
    return max(1, n) if loaded.device.type != "cpu" else 1


def set_band_rows(encoder: Any, rows: int) -> int:
    """Set the row band of the banded modules (MBConv, PatchMerging) in ``encoder``'s conv stages
    (0: whole tensors); returns how many were set. Encoders without a conv stage are left alone."""
    from .nets.tiny_vit import ConvStage

    n = 0
    for stage in encoder.modules():
        if isinstance(stage, ConvStage):
            for m in stage.modules():
                if hasattr(m, "band_rows"):
                    m.band_rows = int(rows)
                    n += 1
    return n


def _quantize_int8(encoder: Any) -> Any:
    """A copy of ``encoder`` whose linear layers and 1x1 convs run as int8 dynamic-quantized matmuls.

    Weights are quantized per output channel once; activations per tensor at run time (FBGEMM
    on x86, QNNPACK on ARM). Depthwise and 3x3 convs, attention and norms stay fp32.
    """
    import torch
    from torch import nn

    from .nets.tiny_vit import _is_pointwise_conv

    enc = copy.deepcopy(encoder)
    for parent in list(enc.modules()):
        for name, child in list(parent.named_children()):
            if _is_pointwise_conv(child):
                lin = nn.Linear(child.in_channels, child.out_channels, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.flatten(1))
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, UserWarning):  # torch.ao's own deprecation notices
            warnings.simplefilter("ignore", category)
        return torch.ao.quantization.quantize_dynamic(enc, {nn.Linear: qconfig}, dtype=torch.qint8)


def optimize_for_inference(loaded: LoadedModel, *, band_rows: int | None = None, int8: bool = False,
                           compile: bool = False) -> LoadedModel:  # noqa: A002 - torch's own word
    """``loaded`` prepared for fast inference; the encoder's outputs stay fp32-equal unless ``int8``.

    ``band_rows``: rows per band for the full-resolution conv stage (None: 64 on CPU, off on GPUs,
    where whole tensors keep the device busy). ``int8``: dynamic int8 quantization of the
    encoder's linear layers and 1x1 convs (CPU only); the returned model shares the decoder with
    ``loaded``, has its own quantized encoder, runs without autocast (fp32 activations around the
    int8 products, whatever precision ``loaded`` had) and has ``variant`` ``+int8dyn``, so its
    embeddings are cached apart. ``compile``: ``torch.compile`` the encoder in place (first call compiles, tens
    of seconds to minutes; the compiled kernels are cached on disk by inductor).

    Returns a new :class:`LoadedModel` when int8 changed the encoder, else ``loaded`` itself.
    """
    from .errors import DeviceError

    model = loaded.model
    on_cpu = loaded.device.type == "cpu"
    rows = (DEFAULT_BAND_ROWS if on_cpu else 0) if band_rows is None else int(band_rows)
    set_band_rows(model.image_encoder, rows)
    out = loaded
    if int8 and INT8_VARIANT not in loaded.variant:
        if not on_cpu:
            raise DeviceError("int8 quantization runs on the CPU only; drop --int8 or use --device cpu")
        from .nets.sam import SamModel

        q = SamModel(image_encoder=_quantize_int8(model.image_encoder), prompt_encoder=model.prompt_encoder,
                     mask_decoder=model.mask_decoder).eval()
        # int8 products take fp32 activations: autocast (bf16 where the CPU has it) must not feed them
        # bf16 tensors (FBGEMM's packed weights then refuse the shapes), so the int8 variant runs fp32.
        out = dataclasses.replace(loaded, model=q, dtype=None, variant=loaded.variant + INT8_VARIANT)
    if compile:
        _compile_encoder(out.model.image_encoder)
    return out


def _compile_encoder(encoder: Any) -> None:
    """``torch.compile`` the encoder in place (module identity and state dict keys unchanged)."""
    if getattr(encoder, "_compiled_call_impl", None) is None:
        encoder.compile(dynamic=False)
