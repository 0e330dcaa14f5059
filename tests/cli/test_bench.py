"""``napari-medsam bench`` end to end with the tiny random model (the figures themselves are the
benchmarks' business; here: every section that needs no real weights runs and reports)."""

import json

from napari_medsam.cli import main
from napari_medsam.core.nets import sam


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
    assert sam.FAST_CPU_DECODER  # the bench switched the reference on and off again
    assert {r["head"] for r in report["heads"]} >= {"linear", "cnn"}
    assert report["peak"]


def test_encoder_time_budget_accounts_for_the_wall_time():
    import torch

    from napari_medsam.cli.bench import encoder_time_budget, format_budget
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

    from napari_medsam.cli.bench import ShippedProcess
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

    from napari_medsam.cli.bench import ShippedProcess

    with pytest.raises(RuntimeError, match="child process ended"):
        ShippedProcess("no_such_model", torch.rand(1, 3, 8, 8))
