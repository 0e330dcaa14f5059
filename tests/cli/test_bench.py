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
