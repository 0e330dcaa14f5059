"""benchmarks/bench_active.py's own logic: pools per seed, the starting slice, the seed summary's
verdicts, the one-structure labels (the simulation itself needs LiteMedSAM and is the benchmark's business)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_active  # noqa: E402


def test_pools_per_seed_move_only_with_jitter():
    brain = list(range(10, 60))
    assert bench_active.make_pool(brain, 4, seed=2) == bench_active.make_pool(brain, 4, seed=0) == brain[2::4]
    pools = [bench_active.make_pool(brain, 4, seed=s, jitter=True) for s in range(3)]
    assert [p[0] for p in pools] == [12, 13, 14]
    assert all(set(p) <= set(brain) and np.all(np.diff(p) == 4) for p in pools)
    assert len({tuple(p) for p in pools}) == 3
    assert bench_active.make_pool(brain, 4, seed=4, jitter=True) == pools[0]  # the offset wraps at --pool-every
    assert set(bench_active.make_pool(brain, 8)) <= set(bench_active.make_pool(brain, 4))


def test_first_pick_is_the_middle_or_where_the_structure_is_largest():
    truth = np.zeros((20, 5, 5), np.uint8)
    truth[3, :2, :2] = 1
    truth[11, :4, :4] = 1
    pool = [1, 3, 7, 11, 15]
    assert bench_active.first_pick(pool, truth, structure=False) == 7
    assert bench_active.first_pick(pool, truth, structure=True) == 11


def _run(strategy, seed, dice, axis=1):
    return {"axis": axis, "head": "linear", "strategy": strategy, "seed": seed, "structure": "gmwm",
            "pool": 10, "max_steps": 5,
            "curve": [{"k": k + 1, "dice": d, "voxels_changed": 1, "dice_pool": d} for k, d in enumerate(dice)]}


def test_seed_summary_pairs_by_seed_and_names_the_verdict_per_k():
    even = [[0.50, 0.60, 0.70], [0.52, 0.62, 0.70], [0.54, 0.64, 0.70]]
    cov = [[0.51, 0.60, 0.60],   # k=1: +0.01 each seed (>=); k=2: -0.02, 0, +0.01 (below on the mean,
           [0.53, 0.62, 0.60],   # >= with two seeds: within); k=3: -0.10 with every seed (below)
           [0.55, 0.65, 0.60]]
    cov[0][1] = 0.58
    results = [_run("even", s, d) for s, d in enumerate(even)] + [_run("coverage", s, d) for s, d in enumerate(cov)]
    text = bench_active.seed_summary(results, 3)
    assert "| coverage | 3 |" in text and "| even | 3 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| diff |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells[0].startswith("+0.0100 [+0.0100, +0.0100] >=")
    assert cells[1].endswith("within") and cells[1].startswith("-0.0033")
    assert cells[2].startswith("-0.1000") and cells[2].endswith("below")
    assert "at 1 of 3 k; below on the mean but >= with some seed at 1; below with every seed at 1" in text
    spread = next(line for line in text.splitlines() if line.startswith("| spread |"))
    assert [c.strip() for c in spread.strip("|").split("|")][1:4] == ["0.0400", "0.0700", "0.0000"]  # the larger own range
    # one seed per strategy: no summary (nothing to spread)
    assert bench_active.seed_summary([_run("even", 0, even[0]), _run("coverage", 0, cov[0])], 3) == ""


def test_max_steps_per_kind_and_for_every_head():
    assert bench_active.steps_for("", ["linear", "hsam"]) == {"linear": 150, "hsam": 40}
    assert bench_active.steps_for("hsam=20", ["linear", "hsam"]) == {"linear": 150, "hsam": 20}
    assert bench_active.steps_for("30", ["linear", "selfprompt"]) == {"linear": 30, "selfprompt": 30}


def test_unknown_head_is_refused_with_the_registry_kinds(capsys):
    with pytest.raises(SystemExit):
        bench_active.main(["--heads", "linear,vit"])
    err = capsys.readouterr().err
    assert "unknown head kind(s) vit" in err and "hsam" in err


@pytest.mark.slow
def test_ventricles_fill_part_of_the_brain_on_both_sides():
    from bench_heads import load_mni

    _, gmwm = load_mni()
    v = bench_active.structure_labels("ventricles")
    assert v.shape == gmwm.shape and set(np.unique(v)) == {0, 1}
    assert np.array_equal(v, v[::-1])  # both hemispheres
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        brain, inside = gmwm.any(axis=other), v.any(axis=other).astype(bool)
        assert 0 < inside.sum() < 0.7 * brain.sum()  # the pool holds slices without it


@pytest.mark.slow
def test_strategies_that_pick_alike_share_rounds_and_match_their_runs_alone(mni):
    # one run of several strategies shares the rounds while their picks agree and replays the shared
    # slices when they part; every curve must be the one the strategy gives alone (same seed)
    from napari_medsam.core.build import load_model
    from napari_medsam.core.encoder import VolumeEncoder

    t1 = np.asarray(mni["t1"], np.float32)[::4, ::4, ::4]
    gm, wm = mni["gm"][::4, ::4, ::4], mni["wm"][::4, ::4, ::4]
    truth = np.where(gm + wm > 0.5, np.where(wm > gm, 2, 1), 0).astype(np.uint8)
    enc = VolumeEncoder(load_model("test_tiny_lite", device="cpu", precision="fp32"), t1, axis=1)
    brain = [i for i in range(truth.shape[1]) if truth[:, i].any()]
    pool = bench_active.make_pool(brain, 4)
    names = ["even", "coverage-lower", "random"]
    together = bench_active.run_strategies(enc, truth, pool, 1, "linear", names, 3, 10, 0)
    assert list(together) == names
    assert [c["slice"] for c in together["random"]][1:] != [c["slice"] for c in together["even"]][1:]
    for name in ("even", "random"):
        alone = bench_active.run_strategy(enc, truth, pool, 1, "linear", name, 3, 10, 0)
        assert [(c["slice"], c["dice"]) for c in alone] == [(c["slice"], c["dice"]) for c in together[name]]
