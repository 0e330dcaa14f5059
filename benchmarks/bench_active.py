"""The active-learning loop with a simulated annotator: which slice to review next pays most?

Data: the MNI152 2009 template shipped with nilearn, labels 0 background / 1 grey matter / 2 white
matter (the argmax of nilearn's GM / WM maps where GM + WM > 0.5, as ``bench_heads.py``; nilearn
0.14 ships no CSF map). Backbone: the bundled LiteMedSAM (CPU; fp32 unless ``--precision``). The candidate pool is every
``--pool-every``-th brain slice along the plane's axis (only those are embedded); every round the
annotator reviews one slice of the pool and corrects it fully to the ground truth (the voxels
they change are the round's proposal against the truth on that slice), then a round of
:class:`napari_medsam.app.loop.ReviewLoop` trains the head on every reviewed slice (warm-started
from the previous round's head) and re-predicts the rest of the pool. Reported: mean Dice
(GM, WM) on the unreviewed pool slices after 1..R reviewed slices, per head, plane and strategy:

``entropy``, ``margin``, ``disagreement``, ``tta``
    the most uncertain pool slice by that score (:mod:`napari_medsam.core.uncertainty`);
``coverage``
    the default strategy (:func:`napari_medsam.core.uncertainty.coverage_ranking`): the middle
    slice of the largest gap between reviewed slices and the ends of the foreground the head
    predicts; between gaps of equal length, the one whose middle slice has the higher entropy;
``coverage-score``, ``coverage-spread``, ``coverage-lower``
    ``coverage`` with the tie-break between gaps of equal length named
    (:data:`napari_medsam.core.uncertainty.COVERAGE_TIES`): the higher entropy of the gap's middle
    slice (the default's), the larger summed distance of that slice to the reviewed ones, or the gap
    nearer slice 0 (as ``even``);
``coverage-third``
    the same, but the slice of highest entropy within the middle third of the gap;
``coverage-area``
    the same as ``coverage-third`` with gaps measured in predicted foreground pixels instead of
    slices (the reviewed slices count their labels' pixels);
``even``
    evenly spaced, incrementally: the middle of the largest gap between reviewed slices and the
    ends of the pool (middle, quarters, eighths, ...);
``random``
    uniformly among the unreviewed pool slices (``--seeds`` sequences).

Every strategy starts from the same first slice (the middle of the pool; with ``--structure``,
the pool slice where the structure is largest).

Seeds. ``--seeds N`` is the number of ``random`` orders (seed s: order and training seed s).
``--train-seeds N`` runs *every* strategy N times, seed s = 0..N-1 being the torch seed of each
round's training (its initialisation, windows and shifts); with ``--pool-jitter`` seed s also moves
the pool's offset by s slices (every n-th brain slice from the (2 + s)-th on), so the runs see
different slices, not only different training noise. With more than one seed per strategy a
summary follows the tables: per strategy the mean over seeds of the mean Dice over k and its
min - max, and per k the paired difference of ``coverage`` minus ``even`` (same seed) over the seeds.

Structures. ``--structure gmwm`` (default): the GM/WM labels above, which fill every pool slice.
``--structure ventricles`` (or ``deep_gm``, ``cereb_wm``): one class, a structure that fills only
part of the volume, from ``bench_propagation.structures`` (the left-hemisphere component there,
here joined with its mirror image across the midline, both hemispheres: the template is the
symmetric 2009 one); the pool stays every n-th *brain* slice, so it holds slices without the
structure, and Dice is the structure's, pooled over the unreviewed pool slices (false positives
on empty slices count).

Strategies that have reviewed the same slices in the same order share those rounds (one torch
thread makes a round reproducible; a branch that parts replays the shared slices and checks that
the replayed Dice is the recorded one), so ``even`` and a ``coverage`` that picks as it does cost
one run. ``--precision auto`` runs LiteMedSAM in bf16 on a CPU with avx512_bf16 or AMX (the
header names the precision); the default stays fp32, as the earlier tables were.

Heads: any kind of :data:`napari_medsam.core.heads.HEADS`; unless ``--max-steps`` names one, each
kind trains :data:`DEFAULT_STEPS` steps per round (the SAM-decoder heads cost ~3x a cnn step).

Prints Markdown tables and, with ``--out FILE``, writes every figure as JSON::

    python benchmarks/bench_active.py --quick --cache-dir /tmp/medsam-active-cache --out /tmp/active.json
    python benchmarks/bench_active.py --axes 0,1,2 --heads linear --strategies coverage,even --train-seeds 3 \
        --pool-jitter --cache-dir /tmp/medsam-active-cache
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_heads import dice_per_class, load_mni  # noqa: E402

PLANES = {0: "sagittal", 1: "coronal", 2: "axial"}
SCORE_STRATEGIES = ("entropy", "margin", "disagreement", "tta")
#: training steps per round of each head kind unless ``--max-steps`` says otherwise
DEFAULT_STEPS = {"linear": 150, "cnn": 60, "autosam": 40, "hsam": 40, "selfprompt": 40}
#: structures of ``bench_propagation.structures`` usable as ``--structure`` (mirrored to both sides)
STRUCTURES = ("ventricles", "deep_gm", "cereb_wm")


def structure_labels(name: str) -> np.ndarray:
    """A one-class (uint8, 1 inside) mask of ``name``: bench_propagation's left-hemisphere structure
    joined with its mirror image across the midline of the symmetric template (array axis 0)."""
    import bench_propagation

    key = {"ventricles": "ventricle"}.get(name, name)
    left = bench_propagation.structures(bench_propagation.load_mni())[key]
    return (left | left[::-1]).astype(np.uint8)


def make_pool(brain: list[int], every: int, seed: int = 0, jitter: bool = False) -> list[int]:
    """Every ``every``-th brain slice from the (2 + ``seed``)-th on with ``jitter`` (else the 2nd:
    coarser pools are subsets of finer ones)."""
    start = 2 + (seed % every if jitter else 0)
    return brain[min(start, len(brain) - 1)::every]


def first_pick(pool: list[int], truth_sl: np.ndarray, structure: bool) -> int:
    """The slice every strategy starts from: the pool's middle, or for a structure the pool slice
    where it is largest (a user starts where they see it; an empty slice teaches nothing)."""
    if not structure:
        return pool[len(pool) // 2]
    area = [int(np.count_nonzero(truth_sl[s])) for s in pool]
    return pool[int(np.argmax(area))]


def next_even(pool: list[int], reviewed: set[int]) -> int:
    """The pool slice in the middle of the largest gap between reviewed slices and the pool's ends."""
    idx = sorted(pool.index(s) for s in reviewed)
    bounds = [-1, *idx, len(pool)]
    a, b = max(zip(bounds, bounds[1:], strict=False), key=lambda ab: ab[1] - ab[0])
    return pool[(a + b) // 2]


#: ``coverage`` with its tie-break between runs of equal length named (``coverage`` alone: the default's)
COVERAGE_VARIANTS = {"coverage-score": "score", "coverage-spread": "spread", "coverage-lower": "lower"}


def _next_pick(loop, strategy, pool, rest, rng, labels, axis):
    from napari_medsam.core.uncertainty import coverage_ranking

    if strategy in (*SCORE_STRATEGIES, "coverage"):
        ranked = loop.suggest(1, strategy=strategy, min_gap=1)
    elif strategy in COVERAGE_VARIANTS:
        ranked = coverage_ranking(loop.scores["entropy"], 1, extent=loop.foreground_extent(),
                                  exclude=loop.reviewed(), min_gap=1, tie=COVERAGE_VARIANTS[strategy])
    elif strategy in ("coverage-third", "coverage-area"):
        mass = None
        if strategy == "coverage-area":
            mass = loop.scores["foreground"].copy()
            for s in loop.reviewed():
                mass[s] = np.count_nonzero(np.moveaxis(labels, axis, 0)[s])
        ranked = coverage_ranking(loop.scores["entropy"], 1, extent=loop.foreground_extent(),
                                  exclude=loop.reviewed(), min_gap=1, window=1 / 3, mass=mass)
    elif strategy == "even":
        return next_even(pool, set(loop.reviewed()))
    else:
        return int(rng.choice(rest))
    return ranked[0][0] if ranked else int(rng.choice(rest))


def run_strategies(enc, truth, pool, axis, head, strategies, rounds, max_steps, seed, *,
                   class_names=None, first=None, tag=""):
    """The loop for each of ``strategies`` (one training seed): ``{strategy: curve}``.

    Strategies that have picked the same slices so far share their rounds: with the same reviewed
    slices in the same order and the same seed a round trains and predicts the same (one torch
    thread), so the shared rounds are run once; when their next picks differ, each new branch
    replays the common slices from a fresh loop and goes on alone.
    """
    from napari_medsam.app.loop import ReviewLoop, RoundParams
    from napari_medsam.core.finetune import TrainParams
    from napari_medsam.core.progress import drain

    class_names = class_names or {1: "GM", 2: "WM"}
    classes = tuple(sorted(class_names))
    mv = lambda a: np.moveaxis(a, axis, 0)  # noqa: E731
    rngs = {st: np.random.default_rng(seed) for st in strategies}
    results: dict[str, list] = {}
    start = pool[len(pool) // 2] if first is None else first
    branches = [(tuple(strategies), [start], [])]  # strategies, slices reviewed in order (last: next), curve so far
    while branches:
        group, picks, curve = branches.pop(0)
        ranking = "tta" if "tta" in group else "entropy"  # the round scores tta only when asked
        params = RoundParams(train=TrainParams(head=head, max_steps=max_steps, seed=seed, threads=0), cv_folds=0,
                             candidates=tuple(pool), strategy=ranking, min_gap=1)
        labels = np.zeros_like(truth)
        loop = ReviewLoop(labels, axis=axis, class_names=class_names)
        for i, p in enumerate(picks[:-1]):  # replay the slices this branch shares with the one it left
            mv(labels)[p] = mv(truth)[p]
            loop.on_user_edit([p])
            drain(loop.round_steps(enc, params))
            rest = [s for s in pool if not loop.is_reviewed(s)]
            again = float(np.mean(dice_per_class(mv(loop.proposals)[rest], mv(truth)[rest], classes)))
            if again != curve[i]["dice"]:  # the rounds are not reproducible here: sharing them is wrong
                raise RuntimeError(f"replayed round k={i + 1} gave Dice {again} instead of {curve[i]['dice']}")
        if len(picks) > 1:
            print(f"  ({', '.join(group)} left {len(picks) - 1} shared rounds, replayed)", file=sys.stderr, flush=True)
        curve = list(curve)
        pick = picks[-1]
        while True:
            k = len(picks)
            shown = mv(loop.proposals)[pick].copy()
            changed = int(np.count_nonzero(shown != mv(truth)[pick]))
            mv(labels)[pick] = mv(truth)[pick]
            loop.on_user_edit([pick])
            t0 = time.perf_counter()
            rec = drain(loop.round_steps(enc, params))
            secs = time.perf_counter() - t0
            rest = [s for s in pool if not loop.is_reviewed(s)]
            d = dice_per_class(mv(loop.proposals)[rest], mv(truth)[rest], classes)
            whole = np.where(np.isin(np.arange(labels.shape[axis]), loop.reviewed())[:, None, None],
                             mv(labels), mv(loop.proposals))[pool]  # what the user has: reviewed + proposals
            d_all = float(np.mean(dice_per_class(whole, mv(truth)[pool], classes)))
            fg = loop.scores["foreground"]
            curve.append({"k": k, "slice": pick, "voxels_changed": changed, "extent": loop.foreground_extent(),
                          "foreground": {int(s): float(fg[s]) for s in rest},
                          **{f"dice_{class_names[c].lower()}": v for c, v in zip(classes, d, strict=True)},
                          "dice": float(np.mean(d)), "dice_pool": d_all, "round_s": round(secs, 2),
                          "train_s": rec.metrics["train_seconds"], "cpu_s": round(time.process_time(), 1)})
            for st in group:
                print(f"  {PLANES[axis]} {head} {st} seed {seed} k={k} slice {pick}: dice {curve[-1]['dice']:.4f} "
                      f"changed {changed} ({secs:.1f} s) pool {d_all:.4f}{tag}", file=sys.stderr, flush=True)
            if k == rounds or not rest:
                for st in group:
                    results[st] = curve
                break
            nxt = {st: _next_pick(loop, st, pool, rest, rngs[st], labels, axis) for st in group}
            ways: dict[int, list[str]] = {}
            for st in group:
                ways.setdefault(nxt[st], []).append(st)
            pick, *others = ways
            for p in others:
                branches.append((tuple(ways[p]), [*picks, p], list(curve)))
            group = tuple(ways[pick])
            picks.append(pick)
    return {st: results[st] for st in strategies}


def run_strategy(enc, truth, pool, axis, head, strategy, rounds, max_steps, seed, **kw):
    """One strategy's curve (see :func:`run_strategies`)."""
    return run_strategies(enc, truth, pool, axis, head, [strategy], rounds, max_steps, seed, **kw)[strategy]


LOG_LINE = re.compile(r"^\s+(\w+) (\w+) ([\w-]+) seed (\d+) k=(\d+) slice (\d+): dice ([\d.]+) changed (\d+) "
                      r"\(([\d.]+) s\)(?: pool ([\d.]+))?(?: \[(\w+)(?: offset (\d+))?\])?")


def results_from_log(path: Path) -> list[dict]:
    """The per-round lines an earlier (perhaps interrupted) run printed, as results."""
    axis_of = {v: k for k, v in PLANES.items()}
    runs: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        plane, head, strategy, seed, k, sl, dice, changed, secs, pool, structure, offset = m.groups()
        structure = structure or "gmwm"
        key = (plane, head, strategy, int(seed), structure)
        run = runs.setdefault(key, {"axis": axis_of[plane], "plane": plane, "head": head, "strategy": strategy,
                                    "seed": int(seed), "pool": None, "max_steps": None, "structure": structure,
                                    "offset": int(offset) if offset else None, "curve": []})
        run["curve"].append({"k": int(k), "slice": int(sl), "dice": float(dice), "voxels_changed": int(changed),
                             "round_s": float(secs), "dice_pool": float(pool) if pool else None})
    return list(runs.values())


def _setting(r: dict) -> tuple:
    return (r.get("structure") or "gmwm", r["axis"], r["head"])


def _title(r: dict) -> str:
    structure = r.get("structure") or "gmwm"
    what = "GM/WM" if structure == "gmwm" else structure
    return f"{PLANES[r['axis']]} (axis {r['axis']}), {r['head']} head, {what}"


def _mean_dice(run: dict, ks: list[int]) -> float:
    d = {c["k"]: c["dice"] for c in run["curve"]}
    return float(np.mean([d[k] for k in ks if k in d]))


def tables(results: list[dict], heads: list[str], rounds: int, header: str) -> str:
    md = [header, ""]
    ks = list(range(1, rounds + 1))
    settings = sorted({_setting(r) for r in results}, key=lambda t: (t[0] != "gmwm", t[0], t[1], heads.index(t[2])
                                                                     if t[2] in heads else len(heads)))
    for setting in settings:
        rows = [r for r in results if _setting(r) == setting]
        many = len({r["seed"] for r in rows}) > 1
        pool = f"{rows[0]['pool']} pool slices, " if rows[0]["pool"] else ""
        steps = f"{rows[0]['max_steps']} steps per round" if rows[0]["max_steps"] else "see the command"
        title = (f"**{_title(rows[0])}** ({pool}{steps}): mean Dice on the unreviewed "
                 "pool slices after k reviewed slices; mean over the k run; the same for the whole pool "
                 "(reviewed slices as corrected, proposals elsewhere); voxels changed: the annotator's "
                 "corrections per slice, mean over the rounds")
        md += [title, "", "| strategy | " + " | ".join(f"k={k}" for k in ks)
               + " | mean | mean, whole pool | voxels changed |", "|---" * (len(ks) + 4) + "|"]
        for r in rows:
            d = {c["k"]: c["dice"] for c in r["curve"]}
            name = r["strategy"] + (f" (seed {r['seed']})" if many or r["strategy"] == "random" else "")
            vals = [d.get(k) for k in ks]
            mean = float(np.mean([v for v in vals if v is not None]))
            vc = float(np.mean([c["voxels_changed"] for c in r["curve"]]))
            pools = [c.get("dice_pool") for c in r["curve"] if c.get("dice_pool") is not None]
            pool_mean = f"{float(np.mean(pools)):.3f}" if pools else "-"
            md.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals)
                      + f" | {mean:.3f} | {pool_mean} | {vc:.0f} |")
        md.append("")
    return "\n".join(md)


def seed_summary(results: list[dict], rounds: int, a: str = "coverage", b: str = "even") -> str:
    """Per setting with more than one seed: each strategy's mean Dice over k (mean, min - max over
    seeds), and per k the paired difference ``a - b`` (same seed): mean and min - max over seeds.

    The verdict at one k: ``>=`` when the seeds' mean difference is >= 0; ``within`` when it is
    negative but ``a`` is >= ``b`` with at least one seed (the paired differences' range holds 0);
    ``below`` when ``a`` is below ``b`` with every seed. Each strategy's own seed spread (max - min
    of its Dice at that k) is printed beside it: a paired difference can be below 0 with every seed
    and still smaller than that spread.
    """
    ks = list(range(1, rounds + 1))
    md: list[str] = []
    for setting in sorted({_setting(r) for r in results}):
        rows = [r for r in results if _setting(r) == setting]
        seeds = sorted({r["seed"] for r in rows})
        if len(seeds) < 2:
            continue
        md += [(f"**{_title(rows[0])}**, seeds {', '.join(map(str, seeds))}: mean Dice over k = 1..{rounds} "
               "(mean over the seeds, min - max)"), "", "| strategy | seeds | mean | min - max |", "|---|---|---|---|"]
        by: dict[str, dict[int, dict]] = {}
        for r in rows:
            by.setdefault(r["strategy"], {})[r["seed"]] = r
        for name, runs in by.items():
            m = [_mean_dice(runs[s], ks) for s in sorted(runs)]
            md.append(f"| {name} | {len(m)} | {np.mean(m):.4f} | {min(m):.4f} - {max(m):.4f} |")
        md.append("")
        if a not in by or b not in by:
            continue
        common = sorted(set(by[a]) & set(by[b]))
        verdicts = []
        md += [(f"{a} - {b} at equal k, paired by seed ({len(common)} seeds): mean [min, max]; verdict "
                f"(>=: mean >= 0; within: below on the mean, >= with some seed; below: below with every seed); "
                f"spread: the larger of {a}'s and {b}'s own seed ranges (max - min of the Dice) at that k"), "",
               "| k | " + " | ".join(f"{k}" for k in ks) + " | mean over k |", "|---" * (len(ks) + 2) + "|"]
        cells, spreads = [], []
        for k in ks:
            da = [next((c["dice"] for c in by[a][s]["curve"] if c["k"] == k), None) for s in common]
            db = [next((c["dice"] for c in by[b][s]["curve"] if c["k"] == k), None) for s in common]
            pairs = [(x, y) for x, y in zip(da, db, strict=True) if x is not None and y is not None]
            if not pairs:
                cells.append("-")
                continue
            dd = [x - y for x, y in pairs]
            spreads.append(f"{max(np.ptp([x for x, _ in pairs]), np.ptp([y for _, y in pairs])):.4f}")
            mean = float(np.mean(dd))
            verdict = ">=" if mean >= 0 else ("within" if max(dd) >= 0 else "below")
            verdicts.append(verdict)
            cells.append(f"{mean:+.4f} [{min(dd):+.4f}, {max(dd):+.4f}] {verdict}")
        whole = [_mean_dice(by[a][s], ks) - _mean_dice(by[b][s], ks) for s in common]
        md.append("| diff | " + " | ".join(cells) + f" | {np.mean(whole):+.4f} [{min(whole):+.4f}, {max(whole):+.4f}] |")
        spread_whole = max(np.ptp([_mean_dice(by[n][s], ks) for s in common]) for n in (a, b))
        md.append("| spread | " + " | ".join(spreads) + f" | {spread_whole:.4f} |")
        md += ["", (f"{a} >= {b} on the seed mean at {verdicts.count('>=')} of {len(verdicts)} k; below on the mean but "
                f">= with some seed at {verdicts.count('within')}; below with every seed at {verdicts.count('below')}."), ""]
    return "\n".join(md)


def steps_for(spec: str, heads: list[str]) -> dict[str, int]:
    """``--max-steps``: one number for every head, or ``kind=n`` pairs (the rest: :data:`DEFAULT_STEPS`)."""
    steps = dict(DEFAULT_STEPS)
    for part in (p for p in spec.split(",") if p):
        h, _, v = part.rpartition("=")
        if h:
            steps[h.strip()] = int(v)
        else:
            steps = {k: int(v) for k in {*DEFAULT_STEPS, *heads}}
    return {h: steps.get(h, 60) for h in heads}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    ap.add_argument("--md", type=Path, default=None, help="write the Markdown tables here")
    ap.add_argument("--axes", default="1,2", help="slice axes of the MNI array (0 sagittal, 1 coronal, 2 axial)")
    ap.add_argument("--heads", default="linear,cnn", help="head kinds (any of napari_medsam.core.heads.HEADS)")
    ap.add_argument("--strategies", default="coverage,coverage-third,coverage-area,entropy,margin,disagreement,tta,even,random")
    ap.add_argument("--strategies-per-head", default=None,
                    help="e.g. 'cnn=entropy,even,random': fewer strategies for a costly head")
    ap.add_argument("--rounds", type=int, default=10, help="reviewed slices to go up to (default 10)")
    ap.add_argument("--pool-every", type=int, default=4, help="the pool: every n-th brain slice (default 4)")
    ap.add_argument("--max-steps", default="",
                    help="training steps per round, e.g. 150 (every head) or 'linear=150,cnn=60' "
                         f"(default per kind: {', '.join(f'{k}={v}' for k, v in DEFAULT_STEPS.items())})")
    ap.add_argument("--seeds", type=int, default=1, help="random-strategy sequences (default 1)")
    ap.add_argument("--train-seeds", type=int, default=1,
                    help="run every strategy with training seeds 0..N-1 (default 1: seed 0)")
    ap.add_argument("--pool-jitter", action="store_true",
                    help="seed s also shifts the pool's offset by s slices (different slices per seed)")
    ap.add_argument("--structure", default="gmwm", choices=("gmwm", *STRUCTURES),
                    help="gmwm (default): GM/WM labels; or one structure filling part of the volume")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                    help="LiteMedSAM's precision (default fp32; auto: bf16 where the CPU has avx512_bf16 or AMX)")
    ap.add_argument("--cache-dir", default=None, help="embedding cache folder (default: the user cache)")
    ap.add_argument("--quick", action="store_true",
                    help="minutes, not hours: pool every 6th slice, 6 rounds, cnn at 60 steps with "
                         "entropy, even and random only")
    ap.add_argument("--from-json", type=Path, nargs="+", default=None,
                    help="only print the tables of earlier runs' --out files")
    ap.add_argument("--from-log", type=Path, nargs="+", default=None,
                    help="only print the tables of the per-round lines earlier runs printed (stderr logs)")
    args = ap.parse_args(argv)
    if args.from_log or args.from_json:
        results = [r for p in args.from_log or () for r in results_from_log(p)]
        results += [r for p in args.from_json or () for r in json.loads(p.read_text())["results"]]
        heads = list(dict.fromkeys(r["head"] for r in results))
        rounds = max((c["k"] for r in results for c in r["curve"]), default=0)
        sources = ", ".join(map(str, [*(args.from_log or ()), *(args.from_json or ())]))
        print(tables(results, heads, rounds, "From the earlier runs of: " + sources))
        print(seed_summary(results, rounds))
        return 0
    if args.quick:
        args.pool_every, args.rounds = 6, 6
        args.max_steps = args.max_steps or "linear=150,cnn=60"
        args.strategies_per_head = args.strategies_per_head or "cnn=coverage,entropy,even,random"

    from napari_medsam.core.build import load_model
    from napari_medsam.core.embeddings import EmbeddingCache
    from napari_medsam.core.encoder import VolumeEncoder
    from napari_medsam.core.heads import HEADS
    from napari_medsam.core.progress import drain

    heads = [h for h in args.heads.split(",") if h]
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        ap.error(f"unknown head kind(s) {', '.join(unknown)}; choose from {', '.join(HEADS)}")
    torch.set_num_threads(args.threads)
    image, truth = load_mni()
    class_names = {1: "GM", 2: "WM"}
    if args.structure != "gmwm":
        truth = structure_labels(args.structure)
        class_names = {1: args.structure}
    loaded = load_model("litemedsam", device="cpu", precision=args.precision)
    from napari_medsam.core.device import resolve_precision

    precision = "fp32" if resolve_precision(args.precision, torch.device("cpu")) is None else "bf16"
    strategies = [s for s in args.strategies.split(",") if s]
    per_head = {}
    if args.strategies_per_head:
        for part in args.strategies_per_head.split(";"):
            h, _, ss = part.partition("=")
            per_head[h.strip()] = [s for s in ss.split(",") if s]
    steps = steps_for(args.max_steps, heads)
    brain_truth = load_mni()[1] if args.structure != "gmwm" else truth
    results = []
    t_start, cpu_start = time.perf_counter(), time.process_time()
    for axis in (int(a) for a in args.axes.split(",")):
        lab_sl = np.moveaxis(brain_truth, axis, 0)
        brain = [i for i in range(lab_sl.shape[0]) if lab_sl[i].any()]
        enc = VolumeEncoder(loaded, image, axis=axis, cache=EmbeddingCache(args.cache_dir))
        n_seeds = max(args.train_seeds, args.seeds if "random" in strategies else 1)
        pools = {s: make_pool(brain, args.pool_every, s, args.pool_jitter) for s in range(n_seeds)}
        t0 = time.perf_counter()
        drain(enc.embed(sorted({i for p in pools.values() for i in p})))
        with_structure = sum(bool(np.moveaxis(truth, axis, 0)[i].any()) for i in pools[0])
        print(f"{PLANES[axis]}: pools of {sorted({len(p) for p in pools.values()})} slices embedded in "
              f"{time.perf_counter() - t0:.0f} s; {with_structure} of pool 0's slices hold the labels",
              file=sys.stderr, flush=True)
        for head in heads:
            ms = steps[head]
            names = per_head.get(head, strategies)
            n_of = {st: max(args.train_seeds, args.seeds) if st == "random" else args.train_seeds for st in names}
            runs = []
            for seed in range(max(n_of.values())):
                group = [st for st in names if n_of[st] > seed]
                pool = pools.get(seed) or make_pool(brain, args.pool_every, seed, args.pool_jitter)
                first = first_pick(pool, np.moveaxis(truth, axis, 0), args.structure != "gmwm")
                tag = f" [{args.structure} offset {pool[0]}]" if (args.structure != "gmwm" or args.pool_jitter) else ""
                curves = run_strategies(enc, truth, pool, axis, head, group, args.rounds, ms, seed,
                                        class_names=class_names, first=first, tag=tag)
                runs += [{"axis": axis, "plane": PLANES[axis], "head": head, "strategy": st, "seed": seed,
                          "structure": args.structure, "offset": pool[0], "pool": len(pool), "max_steps": ms,
                          "curve": curves[st]} for st in group]
            results += sorted(runs, key=lambda r: (names.index(r["strategy"]), r["seed"]))
    total = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    what = "GM/WM" if args.structure == "gmwm" else f"{args.structure} (both sides, one class)"
    header = (f"MNI152 2009 (nilearn) {what}; LiteMedSAM {precision} on CPU, torch {torch.__version__}, {args.threads} "
              f"thread(s) on {platform.machine()}; pool: every {args.pool_every}-th brain slice"
              f"{' (offset jittered by seed)' if args.pool_jitter else ''}; one slice reviewed per round, "
              f"corrected to the truth; {total / 60:.0f} min wall, {cpu / 60:.0f} min CPU; load average at the end {load}")
    text = tables(results, heads, args.rounds, header) + "\n" + seed_summary(results, args.rounds)
    print(text)
    if args.md is not None:
        args.md.write_text(text + "\n")
    if args.out is not None:
        args.out.write_text(json.dumps({"header": header, "args": {k: str(v) for k, v in vars(args).items()},
                                        "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
