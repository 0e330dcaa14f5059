"""The CUDA path (marked ``gpu``; skipped where there is no CUDA): batched bf16 embeddings and masks
agree with CPU fp32 on real MNI slices. ``benchmarks/gpu_check.sh`` runs these first."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh)")]


@pytest.mark.parametrize("name", ["litemedsam", "test_tiny_vit"])
def test_cuda_bf16_masks_agree_with_cpu_fp32(name, mni):
    from napari_medsam.core.build import load_model
    from napari_medsam.core.encoder import VolumeEncoder
    from napari_medsam.core.segment import Prompt2D, box_of, decode

    cpu = load_model(name, device="cpu", precision="fp32")
    gpu = load_model(name, device="cuda", precision="bf16")
    gpu.model.load_state_dict({k: v.cuda() for k, v in cpu.model.state_dict().items()})
    gpu = dataclasses.replace(gpu, dtype=torch.bfloat16)
    vol = np.ascontiguousarray(mni["t1"][:, :, 80:96].transpose(2, 0, 1))
    brain = mni["brain"][:, :, 80:96].transpose(2, 0, 1)
    ve_c, ve_g = VolumeEncoder(cpu, vol), VolumeEncoder(gpu, vol)
    ious = []
    for k in (2, 8, 14):
        p = [Prompt2D.from_box(box_of(brain[k]))]
        a = decode(cpu, ve_c.get(k), ve_c.transform(), p)[0].mask
        b = decode(gpu, ve_g.get(k), ve_g.transform(), p)[0].mask
        ious.append((a & b).sum() / max((a | b).sum(), 1))
    assert min(ious) > (0.85 if name == "litemedsam" else 0.5), ious
