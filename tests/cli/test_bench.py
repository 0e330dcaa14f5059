"""``napari-medsam bench`` end to end with the tiny random model (the figures themselves are the
benchmarks' business; here: every section that needs no real weights runs and reports)."""

import json

import pytest

from napari_medsam.cli import main
from napari_medsam.core.registry import list_models


def test_bench_peak_decoder_heads(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", "test_tiny_lite", "--sections", "peak,decoder,heads", "--quick",
                 "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ours vs reference modules" in printed
    report = json.loads(out.read_text())
    (dec,) = report["decoder"]
    conditions = [r["condition"] for r in dec["rows"]]
    assert conditions[:2] == ["reference modules, idle", "ours, idle"]
    assert dec["iou_min"] == 1.0  # the fast path gives the reference's masks
    assert all(r["n"] > 0 and 0 < r["median_ms"] <= r["p95_ms"] for r in dec["rows"])
    heads = {r["head"]: r for r in report["heads"]}
    assert set(heads) >= {"linear", "cnn"}
    for kind, r in heads.items():  # every head trained and predicted (a failing head is an error row)
        assert "error" not in r, (kind, r)
        assert r["s_per_epoch"] > 0 and r["predict_s_per_slice"] > 0
    assert {p["dtype"] for p in report["peak"]} == {"fp32", "bf16"}


def test_encoder_time_budget_accounts_for_the_wall_time():
    import torch

    from napari_medsam._bench import encoder_time_budget, format_budget
    from napari_medsam.core.build import load_model

    loaded = load_model("test_tiny_lite", device="cpu", precision="fp32")
    size = loaded.spec.input_size
    inputs = torch.rand(2, 3, size, size)
    b = encoder_time_budget(loaded, inputs, naive_s=1.0, peak_gflops=100.0)
    cats = {r["category"]: r["s_per_slice"] for r in b["rows"]}
    assert cats["matrix products"] > 0 and b["matmul_gflop"] > 0  # the tiny TinyViT has linear layers
    assert cats["GELU"] > 0 and cats["window attention"] > 0
    # the categories split the wall time; "other" is what the named ops leave
    assert sum(cats.values()) >= b["wall_s_per_slice"] * 0.999
    assert all(v >= 0 for v in cats.values())
    assert b["x_if_only_matmul"] == 1.0 / cats["matrix products"]
    assert abs(b["rest_allowed_s"] - (0.5 - cats["matrix products"])) < 1e-12
    assert "bound:" in format_budget(b)


def test_shipped_process_times_the_naive_forward_in_a_fresh_process():
    import torch

    from napari_medsam._bench import ShippedProcess
    from napari_medsam.core.registry import get_spec

    size = get_spec("test_tiny_lite").input_size
    with ShippedProcess("test_tiny_lite", torch.rand(2, 3, size, size)) as child:
        assert child.info["threads"] >= 1  # PyTorch's own default in a process we did not configure
        rounds = [child.round() for _ in range(2)]
        proc = child.proc
    assert all(t > 0 and f >= 0 for t, f in rounds)
    assert proc.poll() == 0  # it quit when asked


def test_shipped_process_says_when_the_child_cannot_start():
    import pytest
    import torch

    from napari_medsam._bench import ShippedProcess

    with pytest.raises(RuntimeError, match="child process ended"):
        ShippedProcess("no_such_model", torch.rand(1, 3, 8, 8))


def test_bench_fails_when_a_head_fails(tmp_path, monkeypatch, capsys):
    from napari_medsam import _bench

    def broken(*a, **k):
        raise RuntimeError("no training today")

    monkeypatch.setattr("napari_medsam.core.finetune.fine_tune", broken)
    assert _bench.bench_heads  # the harness the command calls
    assert main(["bench", "--models", "test_tiny_lite", "--sections", "heads", "--quick", "--threads", "1"]) == 1
    assert "no training today" in capsys.readouterr().err


def _bench_models() -> list:
    """Every registered model; the real-size ones (a ViT-B forward is tens of seconds on 2 cores, ViT-H
    minutes, and the encoder section runs a dozen) are marked heavy (out of the default run: ``-m heavy``
    runs them, as on a GPU machine); the tiny ones cover both layouts."""
    return [m if m.startswith("test_") else pytest.param(m, marks=[pytest.mark.slow, pytest.mark.heavy])
            for m in list_models(include_test=True)]


@pytest.mark.parametrize("model", _bench_models())
def test_bench_runs_over_every_registered_model(model, tmp_path, monkeypatch, capsys):
    """Random weights where none are here; the encoder section in its smallest form (one slice, one
    round, no int8 or budget) and the decoder section, with "of peak" against each dtype's own peak."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", model, "--sections", "peak,encoder,decoder", "--quick", "--slices", "1",
                 "--rounds", "1", "--threads", "1", "--out", str(out)]) == 0
    import json as _json

    report = _json.loads(out.read_text())
    (enc,) = report["encoder"]
    if model.startswith("test_"):  # seeded random weights by design: never reported as real ones
        assert enc["real_weights"] is False and enc["n_masks"] == 0
    if not enc["real_weights"]:
        assert f"## Encoder: {model} (" in (printed := capsys.readouterr().out)
        assert "random weights: timings only" in printed.split(f"## Encoder: {model} (", 1)[1].splitlines()[0]
    peaks = {p["dtype"]: p["gflops"] for p in report["peak"] if p["threads"] == 1}
    for row in enc["rows"]:
        assert row["s_per_slice"] > 0
        if "frac_peak" in row:
            expected = enc["gflops_per_slice"] / row["s_per_slice"] / peaks[row["peak_dtype"]]
            assert abs(row["frac_peak"] - expected) < 1e-9
    assert any(r.get("peak_dtype") == "bf16" for r in enc["rows"]) == any("bf16" in r["variant"] for r in enc["rows"])
    (dec,) = report["decoder"]
    assert dec["iou_min"] > 0.99 and all(r["n"] > 0 for r in dec["rows"])


def test_gpu_check_script_dry_run(tmp_path):
    """benchmarks/gpu_check.sh on the CPU with the tiny models (what a GPU session runs, minus the GPU)."""
    import json as _json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = _json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["device"] == "cpu"
    assert [r["model"] for r in report["encoder"]] == ["test_tiny_lite", "test_tiny_vit"]
    assert all(r["ms_per_slice"] > 0 for r in report["encoder"])
    assert all(r["iou_min"] > 0.9 for r in report["iou"])  # bf16 vs fp32 masks of the same weights
    assert len(report["decoder"]) == 2
