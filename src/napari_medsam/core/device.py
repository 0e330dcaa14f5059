"""Device and precision choice: ``auto`` picks CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Literal

from .errors import DeviceError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def available_devices() -> list[str]:
    import torch

    out = []
    if torch.cuda.is_available():
        out.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    out.append("cpu")
    return out


def resolve_device(name: str = "auto") -> Any:
    """A ``torch.device`` for ``name`` (``auto``, ``cuda``, ``cuda:1``, ``mps``, ``cpu``)."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return torch.device(available_devices()[0])
    base = name.split(":")[0]
    if base not in ("cuda", "mps", "cpu"):
        raise DeviceError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if base != "cpu" and base not in available_devices():
        raise DeviceError(
            f"device {name!r} is not available on this machine (found: {', '.join(available_devices())}); "
            "use --device auto or cpu"
        )
    return torch.device(name)


#: oneDNN instruction-set caps (``ONEDNN_MAX_CPU_ISA``) below its native bf16 kernels
_ONEDNN_ISA_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX) and oneDNN, which
    runs PyTorch's bf16 products on a CPU, may use them (``ONEDNN_MAX_CPU_ISA`` not capped below)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap in _ONEDNN_ISA_WITHOUT_BF16:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: Any) -> Any:
    """The autocast dtype for ``precision`` on ``device`` (None means plain fp32)."""
    import torch

    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise DeviceError("fp16 autocast is for GPUs; on CPU use bf16 or fp32")
        return torch.float16
    # auto
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def head_precision(precision: str, loaded: Any, head: Any = None, *, training: bool = False) -> Any:
    """The autocast dtype a trainable head predicts (or, with ``training``, trains) under; None: fp32.

    ``auto``: bf16 where the loaded model runs bf16 (:func:`resolve_precision` decided that for its
    encoder: a GPU with bf16, a CPU with native bf16) and the head's family was checked in bf16
    against the benchmarked Dice for this use (``head.bf16`` for prediction, ``head.bf16_training``
    for training; no head: True), else fp32, so that CPUs without native bf16 (where bf16 is
    emulated and slow) and an explicitly fp32 model stay fp32. ``fp32``: fp32. ``bf16``: bf16
    whatever the model runs. ``fp16``: fp32 (fp16 training needs a loss scaler; the heads are small
    next to the encoder the fp16 choice is for).
    """
    import torch

    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return torch.bfloat16
    checked = getattr(head, "bf16_training" if training else "bf16", True)
    if precision == "auto" and getattr(loaded, "dtype", None) == torch.bfloat16 and checked:
        return torch.bfloat16
    return None


def precision_name(dtype: Any) -> str:
    """``"fp32"`` for None, else the dtype's short name (``"bf16"``, ``"fp16"``)."""
    if dtype is None:
        return "fp32"
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(str(dtype).replace("torch.", ""), str(dtype))


@contextlib.contextmanager
def autocast(device: Any, dtype: Any) -> Iterator[None]:
    import torch

    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
