#!/usr/bin/env bash
# The one GPU check (issue 18): what a session lent a GPU runs, in under 5 minutes.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#
# 1. the gpu-marked tests;
# 2. encoder ms/slice, batched, bf16 autocast: LiteMedSAM, SAM ViT-B, SAM ViT-H (random weights
#    where none are here: timings only);
# 3. decoder (prompt -> mask) latency, median and p95, one box;
# 4. mask IoU of the GPU bf16 masks against CPU fp32 masks of the same weights on real MNI slices.
#
# Without CUDA (or with --dry-run) it runs the same code on the CPU with the tiny test models and one
# slice: what CI runs (tests/cli/test_bench.py), so that the script cannot rot between GPU loans.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
DRY=0
OUT=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    *) echo "gpu_check.sh: unknown option $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: dry run on the CPU"
  DRY=1
fi
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
echo "== gpu_check: dry_run=$DRY, results in $OUT"
grep -o -w 'avx512_bf16\|amx_bf16\|avx2' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ' | sed 's/^/CPU flags: /'; echo
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda,
'|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

echo "== 1. gpu-marked tests"
rc=0
timeout 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider -p no:warnings tests -x > "$OUT/gpu_tests.log" 2>&1 || rc=$?
tail -n 5 "$OUT/gpu_tests.log"
if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then  # 5: none collected
  echo "gpu-marked tests failed (rc $rc), see $OUT/gpu_tests.log" >&2
  exit 1
fi

echo "== 2-4. encoder, decoder, masks vs CPU fp32"
DRY=$DRY OUT=$OUT timeout 240 "$PY" - <<'EOF'
import dataclasses, json, os, time

import numpy as np
import torch

from napari_medsam._bench import bench_decoder, bench_load, format_decoder, format_table, real_slices
from napari_medsam.core.device import autocast
from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.segment import decode

dry = os.environ["DRY"] == "1"
dev = torch.device("cpu" if dry else "cuda")
models = ["test_tiny_lite", "test_tiny_vit"] if dry else ["litemedsam", "sam_vit_b", "sam_vit_h"]
batch = {"litemedsam": 32, "sam_vit_b": 8, "sam_vit_h": 4}
report = {"dry_run": dry, "device": str(dev), "encoder": [], "decoder": [], "iou": []}
data = real_slices(2 if dry else 8)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


for name in models:
    loaded, real = bench_load(name, device=str(dev))
    ve = VolumeEncoder(loaded, data.volume, axis=data.axis)
    x = torch.from_numpy(np.stack([ve.model_input(k) for k in data.indices]))
    b = 2 if dry else batch[name]
    xb = x.repeat((b + len(x) - 1) // len(x), 1, 1, 1)[:b].to(dev)
    if dev.type == "cuda":
        xb = xb.contiguous(memory_format=torch.channels_last)
    enc = loaded.model.image_encoder
    with torch.inference_mode(), autocast(dev, torch.bfloat16):
        enc(xb)  # warm-up (cuDNN / oneDNN kernels chosen)
        sync()
        times = []
        for _ in range(1 if dry else 5):
            t0 = time.perf_counter()
            enc(xb)
            sync()
            times.append(time.perf_counter() - t0)
    row = {"model": name, "real_weights": real, "batch": b, "ms_per_slice": 1000 * float(np.median(times)) / b}
    report["encoder"].append(row)
    print(f"encoder {name}: {row['ms_per_slice']:.2f} ms/slice (batch {b}, bf16, {'real' if real else 'random'} weights)")
    # masks: this device in bf16 against CPU fp32, same weights
    cpu, _ = bench_load(name, device="cpu")
    cpu.model.load_state_dict({k: v.cpu() for k, v in loaded.model.state_dict().items()})
    ve_cpu = VolumeEncoder(cpu, data.volume, axis=data.axis)
    gpu_bf16 = dataclasses.replace(loaded, dtype=torch.bfloat16)
    ve_dev = VolumeEncoder(gpu_bf16, data.volume, axis=data.axis)
    ious = []
    for k in data.indices[:2]:
        tf = ve_cpu.transform()
        for p in data.prompts(k):
            a = decode(cpu, ve_cpu.get(k), tf, [p])[0].mask
            m = decode(gpu_bf16, ve_dev.get(k), tf, [p])[0].mask
            u = (a | m).sum()
            ious.append(float((a & m).sum() / u) if u else 1.0)
    report["iou"].append({"model": name, "iou_mean": float(np.mean(ious)), "iou_min": float(np.min(ious)),
                          "n": len(ious)})
    print(f"masks {name}: IoU {dev.type} bf16 vs CPU fp32 mean {np.mean(ious):.4f}, min {np.min(ious):.4f} "
          f"over {len(ious)} boxes")
    del loaded, cpu, enc
for name in models[:2]:
    r = bench_decoder(name, device=str(dev), repeats=1 if dry else 5, n_slices=2 if dry else 4, with_prefetch=False)
    report["decoder"].append(r)
    print(f"decoder {name}:\n{format_decoder(r)}")
print(format_table(report["encoder"], [("model", "model", ""), ("batch", "batch", ""),
                                       ("ms_per_slice", "ms/slice", ".2f"), ("real_weights", "real weights", "")]))
with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=2, default=str)
print("wrote", os.path.join(os.environ["OUT"], "gpu_check.json"))
EOF
echo "== gpu_check done"
