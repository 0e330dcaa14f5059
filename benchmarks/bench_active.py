"""The active-learning loop with a simulated annotator: which slice to review next pays most?

Data: the MNI152 2009 template shipped with nilearn, labels 0 background / 1 grey matter / 2 white
matter (the argmax of nilearn's GM / WM maps where GM + WM > 0.5, as ``bench_heads.py``; nilearn
0.14 ships no CSF map). Backbone: the bundled LiteMedSAM (fp32, CPU). The candidate pool is every
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

Every strategy starts from the same first slice (the middle of the pool). Prints Markdown tables
and, with ``--out FILE``, writes every figure as JSON::

    python benchmarks/bench_active.py --quick --cache-dir /tmp/medsam-active-cache --out /tmp/active.json
"""

from __future__ import annotations

import argparse
import json
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


def next_even(pool: list[int], reviewed: set[int]) -> int:
    """The pool slice in the middle of the largest gap between reviewed slices and the pool's ends."""
    idx = sorted(pool.index(s) for s in reviewed)
    bounds = [-1, *idx, len(pool)]
    a, b = max(zip(bounds, bounds[1:], strict=False), key=lambda ab: ab[1] - ab[0])
    return pool[(a + b) // 2]


def run_strategy(enc, truth, pool, axis, head, strategy, rounds, max_steps, seed):
    from napari_medsam.app.loop import ReviewLoop, RoundParams
    from napari_medsam.core.finetune import TrainParams
    from napari_medsam.core.progress import drain
    from napari_medsam.core.uncertainty import coverage_ranking

    labels = np.zeros_like(truth)
    loop = ReviewLoop(labels, axis=axis, class_names={1: "GM", 2: "WM"})
    rng = np.random.default_rng(seed)
    ranking = strategy if strategy in SCORE_STRATEGIES else "entropy"
    params = RoundParams(train=TrainParams(head=head, max_steps=max_steps, seed=seed, threads=0), cv_folds=0,
                         candidates=tuple(pool), strategy=ranking, min_gap=1)
    mv = lambda a: np.moveaxis(a, axis, 0)  # noqa: E731
    pick = pool[len(pool) // 2]
    out = []
    for k in range(1, rounds + 1):
        shown = mv(loop.proposals)[pick].copy()
        changed = int(np.count_nonzero(shown != mv(truth)[pick]))
        mv(labels)[pick] = mv(truth)[pick]
        loop.on_user_edit([pick])
        t0 = time.perf_counter()
        rec = drain(loop.round_steps(enc, params))
        secs = time.perf_counter() - t0
        rest = [s for s in pool if not loop.is_reviewed(s)]
        d = dice_per_class(mv(loop.proposals)[rest], mv(truth)[rest], (1, 2))
        whole = np.where(np.isin(np.arange(labels.shape[axis]), loop.reviewed())[:, None, None],
                         mv(labels), mv(loop.proposals))[pool]  # what the user has: reviewed + proposals
        d_all = float(np.mean(dice_per_class(whole, mv(truth)[pool], (1, 2))))
        out.append({"k": k, "slice": pick, "voxels_changed": changed, "dice_gm": d[0], "dice_wm": d[1],
                    "dice": float(np.mean(d)), "dice_pool": d_all, "round_s": round(secs, 2), "train_s": rec.metrics["train_seconds"]})
        print(f"  {PLANES[axis]} {head} {strategy} seed {seed} k={k} slice {pick}: dice {out[-1]['dice']:.3f} "
              f"changed {changed} ({secs:.1f} s) pool {d_all:.3f}", file=sys.stderr, flush=True)
        if k == rounds or not rest:
            break
        if strategy in (*SCORE_STRATEGIES, "coverage"):
            ranked = loop.suggest(1, strategy=strategy, min_gap=1)
            pick = ranked[0][0] if ranked else int(rng.choice(rest))
        elif strategy in ("coverage-third", "coverage-area"):
            mass = None
            if strategy == "coverage-area":
                mass = loop.scores["foreground"].copy()
                for s in loop.reviewed():
                    mass[s] = np.count_nonzero(mv(labels)[s])
            ranked = coverage_ranking(loop.scores["entropy"], 1, extent=loop.foreground_extent(),
                                      exclude=loop.reviewed(), min_gap=1, window=1 / 3, mass=mass)
            pick = ranked[0][0] if ranked else int(rng.choice(rest))
        elif strategy == "even":
            pick = next_even(pool, set(loop.reviewed()))
        else:
            pick = int(rng.choice(rest))
    return out


LOG_LINE = re.compile(r"^\s+(\w+) (\w+) ([\w-]+) seed (\d+) k=(\d+) slice (\d+): dice ([\d.]+) changed (\d+) "
                      r"\(([\d.]+) s\)(?: pool ([\d.]+))?")


def results_from_log(path: Path) -> list[dict]:
    """The per-round lines an earlier (perhaps interrupted) run printed, as results."""
    axis_of = {v: k for k, v in PLANES.items()}
    runs: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        plane, head, strategy, seed, k, sl, dice, changed, secs, pool = m.groups()
        key = (plane, head, strategy, int(seed))
        run = runs.setdefault(key, {"axis": axis_of[plane], "plane": plane, "head": head, "strategy": strategy,
                                    "seed": int(seed), "pool": None, "max_steps": None, "curve": []})
        run["curve"].append({"k": int(k), "slice": int(sl), "dice": float(dice), "voxels_changed": int(changed),
                             "round_s": float(secs), "dice_pool": float(pool) if pool else None})
    return list(runs.values())


def tables(results: list[dict], heads: list[str], rounds: int, header: str) -> str:
    md = [header, ""]
    ks = list(range(1, rounds + 1))
    for axis in sorted({r["axis"] for r in results}):
        for head in heads:
            rows = [r for r in results if r["axis"] == axis and r["head"] == head]
            if not rows:
                continue
            pool = f"{rows[0]['pool']} pool slices, " if rows[0]["pool"] else ""
            steps = f"{rows[0]['max_steps']} steps per round" if rows[0]["max_steps"] else "see the command"
            title = (f"**{PLANES[axis]} (axis {axis}), {head} head** ({pool}{steps}): mean Dice on the unreviewed "
                     "pool slices after k reviewed slices; mean over the k run; the same for the whole pool "
                     "(reviewed slices as corrected, proposals elsewhere); voxels changed: the annotator's "
                     "corrections per slice, mean over the rounds")
            md += [title, "", "| strategy | " + " | ".join(f"k={k}" for k in ks)
                   + " | mean | mean, whole pool | voxels changed |", "|---" * (len(ks) + 4) + "|"]
            for r in rows:
                d = {c["k"]: c["dice"] for c in r["curve"]}
                name = r["strategy"] + (f" (seed {r['seed']})" if r["strategy"] == "random" else "")
                vals = [d.get(k) for k in ks]
                mean = float(np.mean([v for v in vals if v is not None]))
                vc = float(np.mean([c["voxels_changed"] for c in r["curve"]]))
                pools = [c.get("dice_pool") for c in r["curve"] if c.get("dice_pool") is not None]
                pool_mean = f"{float(np.mean(pools)):.3f}" if pools else "-"
                md.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals)
                          + f" | {mean:.3f} | {pool_mean} | {vc:.0f} |")
            md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    ap.add_argument("--md", type=Path, default=None, help="write the Markdown tables here")
    ap.add_argument("--axes", default="1,2", help="slice axes of the MNI array (1 coronal, 2 axial)")
    ap.add_argument("--heads", default="linear,cnn", help="head kinds")
    ap.add_argument("--strategies", default="coverage,coverage-third,coverage-area,entropy,margin,disagreement,tta,even,random")
    ap.add_argument("--strategies-per-head", default=None,
                    help="e.g. 'cnn=entropy,even,random': fewer strategies for a costly head")
    ap.add_argument("--rounds", type=int, default=10, help="reviewed slices to go up to (default 10)")
    ap.add_argument("--pool-every", type=int, default=4, help="the pool: every n-th brain slice (default 4)")
    ap.add_argument("--max-steps", default="150", help="training steps per round, e.g. 150 or 'linear=150,cnn=60'")
    ap.add_argument("--seeds", type=int, default=1, help="random-strategy sequences (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--cache-dir", default=None, help="embedding cache folder (default: the user cache)")
    ap.add_argument("--quick", action="store_true",
                    help="minutes, not hours: pool every 6th slice, 6 rounds, cnn at 60 steps with "
                         "entropy, even and random only")
    ap.add_argument("--from-log", type=Path, nargs="+", default=None,
                    help="only print the tables of the per-round lines earlier runs printed (stderr logs)")
    args = ap.parse_args(argv)
    if args.from_log:
        results = [r for p in args.from_log for r in results_from_log(p)]
        heads = list(dict.fromkeys(r["head"] for r in results))
        rounds = max((c["k"] for r in results for c in r["curve"]), default=0)
        print(tables(results, heads, rounds, "From the per-round lines of: " + ", ".join(map(str, args.from_log))))
        return 0
    if args.quick:
        args.pool_every, args.rounds = 6, 6
        args.max_steps = "linear=150,cnn=60"
        args.strategies_per_head = args.strategies_per_head or "cnn=coverage,entropy,even,random"

    from napari_medsam.core.build import load_model
    from napari_medsam.core.embeddings import EmbeddingCache
    from napari_medsam.core.encoder import VolumeEncoder
    from napari_medsam.core.progress import drain

    torch.set_num_threads(args.threads)
    image, truth = load_mni()
    loaded = load_model("litemedsam", device="cpu", precision="fp32")
    heads = [h for h in args.heads.split(",") if h]
    strategies = [s for s in args.strategies.split(",") if s]
    per_head = {}
    if args.strategies_per_head:
        for part in args.strategies_per_head.split(";"):
            h, _, ss = part.partition("=")
            per_head[h.strip()] = [s for s in ss.split(",") if s]
    steps = {}
    for part in args.max_steps.split(","):
        h, _, v = part.rpartition("=")
        steps[h or "*"] = int(v)
    results = []
    t_start = time.perf_counter()
    for axis in (int(a) for a in args.axes.split(",")):
        lab_sl = np.moveaxis(truth, axis, 0)
        brain = [i for i in range(lab_sl.shape[0]) if lab_sl[i].any()]
        pool = brain[min(2, len(brain) - 1)::args.pool_every]  # the same offset: coarser pools are subsets
        enc = VolumeEncoder(loaded, image, axis=axis, cache=EmbeddingCache(args.cache_dir))
        t0 = time.perf_counter()
        drain(enc.embed(pool))
        print(f"{PLANES[axis]}: pool of {len(pool)} slices embedded in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
        for head in heads:
            ms = steps.get(head, steps.get("*", 150))
            for strategy in per_head.get(head, strategies):
                seeds = range(args.seeds) if strategy == "random" else range(1)
                for seed in seeds:
                    curve = run_strategy(enc, truth, pool, axis, head, strategy, args.rounds, ms, seed)
                    results.append({"axis": axis, "plane": PLANES[axis], "head": head, "strategy": strategy,
                                    "seed": seed, "pool": len(pool), "max_steps": ms, "curve": curve})
    total = time.perf_counter() - t_start
    header = (f"MNI152 2009 (nilearn) GM/WM; LiteMedSAM fp32 on CPU, torch {torch.__version__}, {args.threads} "
              f"thread(s) on {platform.machine()}; pool: every {args.pool_every}-th brain slice; one slice "
              f"reviewed per round, corrected to the truth; {total / 60:.0f} min in all")
    text = tables(results, heads, args.rounds, header)
    print(text)
    if args.md is not None:
        args.md.write_text(text + "\n")
    if args.out is not None:
        args.out.write_text(json.dumps({"header": header, "args": {k: str(v) for k, v in vars(args).items()},
                                        "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
