"""Propagation on real MNI152 structures in all three planes: where it stops, 3D Dice, speed.

Structures (nilearn's MNI152 2009 template and its tissue maps, probabilities 0..255):

* ``brain``: grey + white matter probability > 0.5;
* ``ventricle``: the left lateral ventricle: T1 darker than 100 (CSF is ~55 on the template's
  0..255 scale, grey matter ~160), more than 8 mm inside the brain, the connected component left of
  the midline;
* ``deep_gm``: the left basal ganglia: grey matter > 0.5 more than 12 mm inside the brain, the
  largest connected component on the left;
* ``cereb_wm``: the left cerebellar white matter: white matter > 0.5 eroded twice, the connected
  component of the left cerebellum.

For each structure and plane (sagittal = array axis 0, coronal = 1, axial = 2) one box is drawn
around the structure on the slice where it is largest, as a user would, and propagated through the
whole volume with the earlier rule (area and predicted IoU only, ``PropagationParams.legacy()``) and
the current default. Printed per case: the structure's true slice extent, the extent labelled,
slices labelled beyond the true extent, slices missed inside it, the distance of each end from the
true end, and the 3D Dice over the whole volume.

``--cache DIR`` keeps the embeddings on disk between runs (the first run embeds ~500 slices);
``--tune`` also prints, from one permissive run per case (a stricter rule only truncates a run, so
it is simulated exactly on the permissive run's slices), the best rules of a joint grid over the
stop criteria (:data:`GRID`: how the defaults were chosen) and each default criterion varied alone.

    python benchmarks/bench_propagation.py [--model litemedsam] [--cache DIR] [--planes 0,1,2]
    python benchmarks/bench_propagation.py --seeds --cache DIR   # the seed slices' 2D Dice, per decoder output
        # and zoomed (the box decoded on the window 2x / 3x its side: core.zoom)
    python benchmarks/bench_propagation.py --variants "choose=first;choose=previous,connect=1" [--bound 4]
        # one permissive run per case and carry: per-slice Dice traces, the default and best grid rule
        # per case; --save DIR pickles the runs, --floor D the least Dice of the grid rules listed,
        # --load DIR simulates on saved runs, --rules "a=1;b=2" more rules, --guards keeps the leak
        # guards in the grid, --tissue prints the seed-tissue score around the true ends
    python benchmarks/bench_propagation.py --policy "SMALL|LARGE" [--small-stops R] [--large-stops R] [--wide]
        # the seed decides: carry SMALL for seeds whose box gets a zoom window, LARGE for the others;
        # the 12-case table, the best grid rules per class, leave-one-plane-out, each threshold's
        # neighbours (--load DIR reads {carry}.pkl for each from --variants --save)
    python benchmarks/bench_propagation.py --speed [--slice 93] [--reach 10]   # s/slice cold and warm

``--bias 0.1`` runs the plain comparison (or ``--variants``) on T1 times a linear bias field along
each plane's axis (0.9 on the first slice, 1.1 on the last). The plain run compares the earlier rules with today's default, in which a large seed's run (its
box gets no zoom window) follows the structure, each mask gated by the seed's tissue
(``PropagationParams.large_seed``); ``--variants`` runs one carry for every seed (``large_seed=None``
unless the variant names it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_medsam.core.build import load_model
from napari_medsam.core.embeddings import EmbeddingCache
from napari_medsam.core.encoder import VolumeEncoder
from napari_medsam.core.progress import drain
from napari_medsam.core.propagation import LEGACY_CARRY, OPEN_STOPS, Propagation, PropagationParams, propagate
from napari_medsam.core.segment import Prompt2D, box_of

PLANES = {0: "sagittal", 1: "coronal", 2: "axial"}
#: The stop rule first tuned for issue 16 (with the box carry), kept to compare carries.
FIRST_ISSUE16_STOPS = {"min_iou": 0.35, "min_area_frac": 0.0, "min_area_px": 4, "min_area_ratio": 0.15,
                       "max_area_ratio": 2.5, "min_inside": 0.6, "max_intensity_z": 2.0, "min_feature": 0.35}


def load_mni() -> dict[str, np.ndarray]:
    data = Path(importlib.util.find_spec("nilearn").submodule_search_locations[0]) / "datasets" / "data"
    read = lambda name: np.asanyarray(nib.load(data / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz").dataobj)  # noqa: E731
    return {"t1": read("t1"), "gm": read("gm").astype(np.float32) / 255, "wm": read("wm").astype(np.float32) / 255}


def biased(t1: np.ndarray, axis: int, amp: float) -> np.ndarray:
    """``t1`` times a bias field along ``axis`` (``--bias``): 1 - amp on the first slice to 1 + amp
    on the last, linear (a coil's fall-off along the direction a run goes: the worst case for a
    criterion that compares a slice with the seed's)."""
    if not amp:
        return t1
    n = t1.shape[axis]
    shape = [1, 1, 1]
    shape[axis] = n
    return t1.astype(np.float32) * (1 + amp * (2 * np.arange(n) / (n - 1) - 1)).reshape(shape).astype(np.float32)


def structures(mni: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference masks (see the module docstring), each one 3D connected component."""
    from scipy import ndimage as ndi

    t1, gm, wm = mni["t1"].astype(np.float32), mni["gm"], mni["wm"]
    brain = gm + wm > 0.5
    depth = ndi.distance_transform_edt(ndi.binary_fill_holes(brain))
    mid = brain.shape[0] // 2

    def component(mask: np.ndarray, pick) -> np.ndarray:
        lab, n = ndi.label(mask)
        sizes = ndi.sum(mask, lab, range(1, n + 1))
        coms = ndi.center_of_mass(mask, lab, range(1, n + 1))
        ok = [i for i in np.argsort(sizes)[::-1] if pick(coms[i])]
        return lab == ok[0] + 1

    left = lambda com: com[0] < mid  # noqa: E731  (RAS affine: array axis 0 grows to the patient's right)
    return {
        "brain": component(brain, lambda com: True),
        "ventricle": component((t1 < 100) & (depth > 8), left),
        "deep_gm": component((gm > 0.5) & (depth > 12), left),
        "cereb_wm": component(ndi.binary_erosion(wm > 0.5, iterations=2), lambda com: com[0] < mid and com[2] < 50),
    }


def seed_box(gt: np.ndarray, axis: int) -> tuple[int, tuple[float, float, float, float]]:
    """The slice where the structure is largest and a box around its largest piece there (one
    box, one blob, as a user draws it)."""
    from scipy import ndimage as ndi

    other = tuple(a for a in range(3) if a != axis)
    z = int(np.argmax(gt.sum(axis=other)))
    lab, n = ndi.label(np.take(gt, z, axis=axis))
    sizes = ndi.sum(lab > 0, lab, range(1, n + 1))
    box = box_of(lab == int(np.argmax(sizes)) + 1)
    assert box is not None
    return z, box


def evaluate(masks: dict[int, np.ndarray], gt: np.ndarray, axis: int) -> dict[str, float]:
    other = tuple(a for a in range(3) if a != axis)
    true = np.flatnonzero(gt.any(axis=other))
    t0, t1 = int(true[0]), int(true[-1])
    labelled = sorted(masks)
    inter = sum(int((m & np.take(gt, z, axis=axis)).sum()) for z, m in masks.items())
    pred = sum(int(m.sum()) for m in masks.values())
    p0, p1 = (labelled[0], labelled[-1]) if labelled else (t0, t0 - 1)
    beyond = sum(1 for z in labelled if not t0 <= z <= t1)
    missed = sum(1 for z in range(t0, t1 + 1) if z not in masks)
    return {"true": (t0, t1), "got": (p0, p1), "beyond": beyond, "missed": missed,
            "end_lo": p0 - t0, "end_hi": t1 - p1,  # > 0: stopped short; < 0: ran past
            "dice": 2 * inter / max(pred + int(gt.sum()), 1)}


def simulate(run: Propagation, params: PropagationParams) -> dict[int, np.ndarray]:
    """The slices a run with ``params`` keeps, from a permissive run of the same single seed (a
    large seed's run with ``params``' large-seed stops: ``PropagationParams.for_seed``)."""
    (z0,) = run.seeds
    params = params.for_seed(z0 in getattr(run, "large", ()))
    seed_area = run.scores[z0].area
    keep = {z0: run.masks[z0]}
    for step in (-1, 1):
        z = z0 + step
        while z in run.masks and params.stop_reason(run.scores[z], seed_area) is None:
            keep[z] = run.masks[z]
            z += step
    return keep


def fmt(name: str, plane: str, r: dict) -> str:
    ok = "yes" if abs(r["end_lo"]) <= 2 and abs(r["end_hi"]) <= 2 else "no"
    return (f"| {name} | {plane} | {r['true'][0]}-{r['true'][1]} | {r['got'][0]}-{r['got'][1]} | {r['beyond']} | "
            f"{r['missed']} | {r['end_lo']:+d} / {r['end_hi']:+d} | {ok} | {r['dice']:.3f} |")


def summary(rows: list[dict]) -> str:
    ok = sum(abs(r["end_lo"]) <= 2 and abs(r["end_hi"]) <= 2 for r in rows)
    ends = sum((abs(r["end_lo"]) <= 2) + (abs(r["end_hi"]) <= 2) for r in rows)
    return (f"both ends within 2 slices: {ok}/{len(rows)} cases, {ends}/{2 * len(rows)} ends; slices beyond "
            f"{sum(r['beyond'] for r in rows)}, missed {sum(r['missed'] for r in rows)}; mean 3D Dice "
            f"{np.mean([r['dice'] for r in rows]):.3f}")


def setup(args: argparse.Namespace) -> tuple[dict, dict, object, EmbeddingCache | None, list[int]]:
    """The MNI arrays, the structures asked for (``--structures``), the model, the cache, the planes;
    with ``--load`` (saved runs) no model and no cache (None)."""
    mni = load_mni()
    structs = structures(mni)
    if args.structures:
        structs = {k: v for k, v in structs.items() if k in args.structures.split(",")}
    planes = [int(p) for p in args.planes.split(",")]
    if getattr(args, "load", None):
        return mni, structs, None, None, planes
    loaded = load_model(args.model, device=args.device)
    cache = EmbeddingCache(args.cache) if args.cache else EmbeddingCache(disk=False)
    return mni, structs, loaded, cache, planes


def bench_stops(args: argparse.Namespace) -> None:
    mni, structs, loaded, cache, planes = setup(args)
    rules = {"before (area, IoU)": PropagationParams.legacy(),
             "first stop rule of issue 16, box carry": PropagationParams(**LEGACY_CARRY, **FIRST_ISSUE16_STOPS,
                                                                         large_seed=None),
             "one carry for every seed (the default before the sixth pass)": PropagationParams(large_seed=None),
             "after (default: large seeds follow the structure, gated by the seed's tissue)": PropagationParams()}
    results: dict[str, list] = {k: [] for k in rules}
    cpu = dict.fromkeys(rules, 0.0)  # process CPU seconds per rule (the machine is shared: a ratio)
    permissive: list[tuple[str, int, Propagation]] = []
    t_all = time.perf_counter()
    for axis in planes:
        enc = VolumeEncoder(loaded, biased(mni["t1"], axis, args.bias), axis=axis, cache=cache)
        for name, gt in structs.items():
            z, box = seed_box(gt, axis)
            for label, params in rules.items():
                t = time.process_time()
                out = drain(propagate(enc, {z: Prompt2D.from_box(box)}, params=params, **bounded(gt, axis, args.bound)))
                results[label].append((name, PLANES[axis], evaluate(out.masks, gt, axis), out))
                cpu[label] += time.process_time() - t
            if args.tune:
                permissive.append((name, axis, drain(propagate(enc, {z: Prompt2D.from_box(box)},
                                                               params=PropagationParams.permissive(),
                                                               **bounded(gt, axis, args.bound)))))
    print(f"model {loaded.name} on {loaded.device.type} ({loaded.dtype}); {time.perf_counter() - t_all:.0f} s in all")
    for label, rows in results.items():
        print(f"\n{label}\n| structure | plane | true slices | labelled | beyond | missed | ends (lo / hi) "
              f"| within 2 | 3D Dice |\n|---|---|---|---|---|---|---|---|---|")
        for name, plane, r, _ in rows:
            print(fmt(name, plane, r))
        print(summary([r for _, _, r, _ in rows]) + f"; {cpu[label]:.0f} CPU s for the {len(rows)} runs")
        if label.startswith(("after", "one carry")):
            for name, plane, _, out in rows:
                print(f"  {name}/{plane} stops: " + "; ".join(
                    f"{'-' if s.direction < 0 else '+'} at {s.at} ({s.reason})" for s in out.stops))
    if args.tune:
        tune(permissive, structs)


GRID = {"min_iou": (None, 0.1, 0.2, 0.3, 0.35, 0.4), "min_iou_rel": (None, 0.4, 0.5, 0.6, 0.7, 0.8), "min_area_frac": (0.0, 0.01, 0.02),
        "min_area_ratio": (None, 0.15, 0.25), "max_area_ratio": (None, 2.0, 2.5, 3.0), "min_inside": (None, 0.6),
        "max_intensity_z": (None, 2.0, 3.0), "min_feature": (None, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5),
        "min_tissue": (None, 0.01, 0.02), "min_in_range": (None, 0.1)}


#: The guards meant for a leak onto a neighbour (``--guards`` keeps them in every grid rule).
GUARDS = {"min_area_ratio": (0.15,), "max_area_ratio": (2.5,), "min_inside": (0.6,)}


def grid_arrays(permissive: list[tuple[str, int, Propagation]], structs: dict[str, np.ndarray],
                grid: dict | None = None) -> dict:
    """Every combination of ``grid`` (default :data:`GRID`), simulated on the permissive runs,
    vectorised: per criterion value the first failing slice of each run, a combination's stop is
    the earliest of its criteria's. Returns per combination (rows) and run end (columns, two a
    case: down, up) ``dist``, the last slice kept minus the true end outwards (> 0: ran past,
    < 0: stopped short), and per case (columns) ``inter`` / ``pred``, the voxels kept in the
    structure / in all; ``gt``: each case's structure voxels, ``case``: each run end's case,
    ``combos``: the combinations (dicts)."""
    import itertools

    GRID = grid or globals()["GRID"]  # noqa: N806
    keys = list(GRID)
    runs = []  # per (case, direction): slices, cumulative intersection / predicted voxels, true end
    cases = []
    for name, axis, run in permissive:
        gt = structs[name]
        (z0,) = run.seeds
        other = tuple(a for a in range(3) if a != axis)
        true = np.flatnonzero(gt.any(axis=other))
        seed_i = int((run.masks[z0] & np.take(gt, z0, axis=axis)).sum())
        cases.append((int(gt.sum()), seed_i, int(run.masks[z0].sum())))
        for step, end in ((-1, int(true[0])), (1, int(true[-1]))):
            zs = []
            z = z0 + step
            while z in run.masks:
                zs.append(z)
                z += step
            inter = [int((run.masks[z] & np.take(gt, z, axis=axis)).sum()) for z in zs]
            runs.append({"case": len(cases) - 1, "run": run, "zs": zs, "z0": z0, "step": step, "end": end,
                         "ci": np.cumsum([0, *inter]), "cp": np.cumsum([0, *[int(run.masks[z].sum()) for z in zs]])})
    sizes = [len(GRID[k]) for k in keys]
    stop = None
    for i, key in enumerate(keys):
        first = np.zeros((sizes[i], len(runs)), int)
        for vi, v in enumerate(GRID[key]):
            p = PropagationParams.permissive(**{key: v, "min_area_px": 4})
            for j, r in enumerate(runs):
                scores, seed_area = r["run"].scores, r["run"].scores[r["z0"]].area
                first[vi, j] = next((k for k, z in enumerate(r["zs"]) if p.stop_reason(scores[z], seed_area)),
                                    len(r["zs"]))
        shape = [1] * len(keys) + [len(runs)]
        shape[i] = sizes[i]
        stop = first.reshape(shape) if stop is None else np.minimum(stop, first.reshape(shape))
    kept = stop.reshape(-1, len(runs))
    dist = np.zeros(kept.shape, int)
    inter = np.array([[c[1]] * len(kept) for c in cases], float).T
    pred = np.array([[c[2]] * len(kept) for c in cases], float).T
    for j, r in enumerate(runs):
        k = kept[:, j]
        last = np.where(k > 0, np.array([*r["zs"], 0])[np.maximum(k - 1, 0)], r["z0"])
        dist[:, j] = (last - r["end"]) * r["step"]
        inter[:, r["case"]] += r["ci"][k]
        pred[:, r["case"]] += r["cp"][k]
    combos = [dict(zip(keys, c, strict=True)) for c in itertools.product(*(GRID[k] for k in keys))]
    return {"dist": dist, "inter": inter, "pred": pred, "gt": np.array([c[0] for c in cases], float),
            "case": np.array([r["case"] for r in runs]), "combos": combos}


def joint_grid(permissive: list[tuple[str, int, Propagation]], structs: dict[str, np.ndarray],
               grid: dict | None = None) -> list[tuple]:
    """:func:`grid_arrays` summed over the runs: ``(ends within 2, mean 3D Dice, beyond, missed,
    params)`` per combination."""
    g = grid_arrays(permissive, structs, grid)
    dist = g["dist"]
    within = (np.abs(dist) <= 2).sum(axis=1)
    beyond = np.maximum(dist, 0).sum(axis=1)
    missed = np.maximum(-dist, 0).sum(axis=1)
    dice = (2 * g["inter"] / (g["pred"] + g["gt"])).mean(axis=1)
    return [(int(within[i]), float(dice[i]), int(beyond[i]), int(missed[i]), c) for i, c in enumerate(g["combos"])]


def tune(permissive: list[tuple[str, int, Propagation]], structs: dict[str, np.ndarray]) -> None:
    """All combinations of :data:`GRID` (joint, across every structure and plane); the best by run
    ends within 2 slices at a mean 3D Dice not below the legacy rule's; then each criterion of the
    default varied alone."""
    rows = joint_grid(permissive, structs)
    legacy = PropagationParams.legacy()
    legacy_dice = float(np.mean([evaluate(simulate(run, legacy), structs[name], axis)["dice"]
                                 for name, axis, run in permissive]))
    ok = sorted((r for r in rows if r[1] >= legacy_dice - 1e-9), key=lambda r: (-r[0], -r[1], r[2]))
    print(f"\njoint grid: {len(rows)} rules x {2 * len(permissive)} run ends (simulated on permissive runs); "
          f"legacy mean 3D Dice {legacy_dice:.3f}; best 10 at Dice >= legacy:")
    for within, dice, beyond, missed, p in ok[:10]:
        print(f"  ends within 2: {within}/{2 * len(permissive)}, Dice {dice:.3f}, beyond {beyond}, missed {missed}: {p}")
    base = PropagationParams()
    print("\neach criterion of the default varied alone (simulated on permissive runs)")
    for key, values in GRID.items():
        for v in values:
            p = dataclasses.replace(base, **{key: v})
            res = [evaluate(simulate(run, p), structs[name], axis) for name, axis, run in permissive]
            print(f"{key}={v}: {summary(res)}")
    print("\nper-slice scores of the permissive runs just past the true end (first 4 slices beyond):")
    for name, axis, run in permissive:
        gt = structs[name]
        other = tuple(a for a in range(3) if a != axis)
        true = np.flatnonzero(gt.any(axis=other))
        for step, edge in ((-1, int(true[0])), (1, int(true[-1]))):
            zs = [edge + step * k for k in range(-2, 4)]
            cells = []
            for z in zs:
                s = run.scores.get(z)
                cells.append("-" if s is None else f"{z}:iou{s.iou:.2f} a{s.area_ratio:.2f} in{s.inside:.2f} "
                             f"z{s.intensity_z:.1f} f{s.feature:.2f} t{s.tissue:.2f} r{s.in_range:.2f}")
            print(f"  {name}/{PLANES[axis]} {'+' if step > 0 else '-'} end {edge}: " + " | ".join(cells))


def parse_carry(text: str) -> dict:
    """``"choose=previous,carry_point=1,min_iou_rel=0.6"`` -> PropagationParams overrides (carry and,
    for the "default stops" line of ``--variants``, stop criteria; ``none`` switches one off)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(PropagationParams)}
    out: dict = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        kind = types[key]
        if value.lower() == "none" and "None" in kind:
            out[key] = None
        elif kind.startswith("bool"):
            out[key] = value.lower() in ("1", "true", "yes")
        elif kind.startswith("float"):
            out[key] = float(value)
        elif kind.startswith("int"):
            out[key] = int(value)
        else:
            out[key] = value
    return out


def trace(run: Propagation, gt: np.ndarray, axis: int) -> dict:
    """Per-slice Dice of a run against the structure, outwards from the seed in each direction, and
    where it drifted: the first slice inside the true extent whose Dice fell below half the seed's."""
    other = tuple(a for a in range(3) if a != axis)
    true = np.flatnonzero(gt.any(axis=other))
    (z0,) = run.seeds
    d = lambda m, z: 2 * int((m & np.take(gt, z, axis=axis)).sum()) / max(int(m.sum() + np.take(gt, z, axis=axis).sum()), 1)  # noqa: E731
    seed = d(run.masks[z0], z0)
    out = {"seed": seed}
    for step, edge in ((-1, int(true[0])), (1, int(true[-1]))):
        z, cells, drift = z0 + step, [], None
        while 0 <= z < gt.shape[axis] and (z in run.masks or (z - edge) * step <= 0):
            if z in run.masks:
                v = d(run.masks[z], z)
                cells.append(str(min(int(v * 10), 9)))
                if drift is None and (z - edge) * step <= 0 and v < seed / 2:
                    drift = z
            else:
                cells.append(".")
            if z == edge:
                cells.append("|")
            z += step
        out[step] = ("".join(cells), drift, abs(edge - z0))
    return out


def bounded(gt: np.ndarray, axis: int, bound: int | None) -> dict:
    """``propagate``'s start/stop for ``--bound``: the true extent +- bound slices ({}: no bound)."""
    if bound is None:
        return {}
    true = np.flatnonzero(gt.any(axis=tuple(a for a in range(3) if a != axis)))
    return {"start": max(int(true[0]) - bound, 0), "stop": min(int(true[-1]) + bound + 1, gt.shape[axis])}


def tissue_trace(run: Propagation, gt: np.ndarray, axis: int) -> str:
    """``SliceScore.tissue`` x 100 (capped at 99) from 8 slices inside to 4 past each true end
    ('|' after the true end, '--' no slice): where the seed's own tissue runs out."""
    true = np.flatnonzero(gt.any(axis=tuple(a for a in range(3) if a != axis)))
    out = []
    for step, edge in ((-1, int(true[0])), (1, int(true[-1]))):
        zs = [edge - step * k for k in range(8, -5, -1)]
        cells = " ".join(("--" if z not in run.scores else f"{min(int(run.scores[z].tissue * 100), 99):2d}")
                         + ("|" if z == edge else "") for z in zs)
        out.append(f"{'-+'[step > 0]} {cells}")
    return ";  ".join(out)


def bench_variants(args: argparse.Namespace) -> None:
    """One permissive run per case for each carry variant: per-slice Dice outwards from the seed
    (a digit: Dice x 10; '.': no mask; '|': the true end), where it drifted; the default stop rule
    (with the variant's own stop overrides), each ``--rules`` rule and the best joint-grid rules
    simulated on those runs, per case. The grid's best are taken at a mean 3D Dice not below
    ``--floor`` (default: the first variant's with the default stops: list the baseline first);
    ``--guards`` keeps the three leak guards in every grid rule; ``--load DIR`` reads the runs
    ``--save DIR`` wrote instead of propagating (no model, no embeddings)."""
    mni, structs, loaded, cache, planes = setup(args)
    variants = args.variants.split(";")
    encs = {} if args.load else {axis: VolumeEncoder(loaded, biased(mni["t1"], axis, args.bias), axis=axis, cache=cache)
                                 for axis in planes}
    if args.bias and not args.load:
        print(f"T1 times a linear bias field along each plane's axis: {1 - args.bias:g} .. {1 + args.bias:g}")
    name_of = lambda text: text.replace(",", "_").replace("=", "-") or "default"  # noqa: E731
    floor = args.floor
    for text in variants:
        carry = {"large_seed": None, **parse_carry(text)}  # one carry for every seed (unless named)
        carry_only = {k: v for k, v in carry.items() if k not in OPEN_STOPS and k != "min_area_px"}
        t0 = time.perf_counter()
        permissive = []
        print(f"\n== carry {carry or 'default'}")
        if args.load:
            import pickle

            with open(Path(args.load) / f"{name_of(text)}.pkl", "rb") as f:
                saved = pickle.load(f)  # noqa: S301 - our own file, written by --save
            runs = {(name, axis): run for name, axis, run in saved["runs"]}
            print(f"  (runs read from {args.load}, saved with --bound {saved['bound']})")
        for axis in planes:
            for name, gt in structs.items():
                if args.load:
                    run = runs[(name, axis)]
                else:
                    z, box = seed_box(gt, axis)
                    run = drain(propagate(encs[axis], {z: Prompt2D.from_box(box)},
                                          params=PropagationParams.permissive(**carry_only),
                                          **bounded(gt, axis, args.bound)))
                permissive.append((name, axis, run))
                t = trace(run, gt, axis)
                print(f"  {name}/{PLANES[axis]} seed Dice {t['seed']:.2f}; "
                      + "; ".join(f"{'-+'[step > 0]} drift at {t[step][1]} (end {t[step][2]} away) {t[step][0]}"
                                  for step in (-1, 1)))
        if args.tissue:
            print("  SliceScore.tissue x 100 around the true ends (8 inside .. 4 past; '|' after the true end):")
            for name, axis, run in permissive:
                print(f"    {name}/{PLANES[axis]}: {tissue_trace(run, structs[name], axis)}")
        if args.save:
            import pickle

            Path(args.save).mkdir(parents=True, exist_ok=True)
            with open(Path(args.save) / f"{name_of(text)}.pkl", "wb") as f:
                pickle.dump({"carry": carry, "bound": args.bound, "runs": permissive}, f)
        default = PropagationParams(**carry)
        res = [evaluate(simulate(run, default), structs[name], axis) for name, axis, run in permissive]
        ceiling = [evaluate(run.masks, structs[name], axis) for name, axis, run in permissive]
        reach = sum((r["end_lo"] <= 2) + (r["end_hi"] <= 2) for r in ceiling)
        print(f"  permissive: {summary(ceiling)}; reach (run ends at or past the true end - 2, the most any "
              f"stop rule could place within 2): {reach}/{2 * len(ceiling)}")
        overrides = {k: v for k, v in carry.items() if k not in carry_only}
        print(f"  default stops{' + ' + str(overrides) if overrides else ''}: {summary(res)}")
        table(permissive, res)
        for name, axis, run in permissive:
            print(f"    {name}/{PLANES[axis]} stops: {simulate_stops(run, default)}")
        for rule_text in filter(None, args.rules.split(";")):
            rule = PropagationParams(**{**carry_only, **parse_carry(rule_text)})  # carry_only holds large_seed
            res_r = [evaluate(simulate(run, rule), structs[name], axis) for name, axis, run in permissive]
            print(f"  rule {rule_text} (default stops otherwise): {summary(res_r)} "
                  f"(mean 3D Dice {np.mean([r['dice'] for r in res_r]):.5f})")
            table(permissive, res_r)
            for name, axis, run in permissive:
                print(f"    {name}/{PLANES[axis]} stops: {simulate_stops(run, rule)}")
        rows = joint_grid(permissive, structs, {**GRID, **GUARDS} if args.guards else None)
        if floor is None:
            floor = float(np.mean([r["dice"] for r in res]))
        ok = sorted((r for r in rows if r[1] >= floor - 1e-9), key=lambda r: (-r[0], -r[1], r[2]))
        best = max(rows, key=lambda r: (r[0], r[1]))
        if args.guards:
            print(f"  (grid with the guards kept: {GUARDS})")
        print(f"  best grid rule (any Dice): ends within 2 {best[0]}/{2 * len(permissive)}, Dice {best[1]:.3f}, "
              f"beyond {best[2]}, missed {best[3]}: {best[4]}")
        print(f"  best 5 grid rules at mean 3D Dice >= {floor:.3f}:")
        for within, dice, beyond, missed, p in ok[:5]:
            print(f"    ends within 2: {within}/{2 * len(permissive)}, Dice {dice:.3f}, beyond {beyond}, "
                  f"missed {missed}: {p}")
        if ok:
            rule = PropagationParams.permissive(**carry_only, **ok[0][4], min_area_px=4)
            print("  the first of them, per case:")
            table(permissive, [evaluate(simulate(run, rule), structs[name], axis) for name, axis, run in permissive])
        print(f"  {time.perf_counter() - t0:.0f} s")


#: A wider grid for :func:`bench_policy` (``--wide``): absolute and relative IoU floors as high as
#: a zoomed decode's (0.6-0.9), the area against the seed's, and the intensity criteria finer.
WIDE_GRID = {"min_iou": (None, 0.3, 0.5, 0.6, 0.7), "min_iou_rel": (None, 0.6, 0.7, 0.8, 0.9),
             "min_area_frac": (0.0, 0.05, 0.1, 0.2), "max_intensity_z": (None, 1.5, 2.0, 3.0),
             "min_feature": (None, 0.35, 0.5, 0.6, 0.7, 0.8), "min_tissue": (None, 0.02, 0.05, 0.1, 0.2),
             "min_in_range": (None, 0.1, 0.2, 0.3, 0.5)}


def seed_class(gt: np.ndarray, axis: int, context: float | None) -> str:
    """``"small"`` when the case's one-box seed gets a zoom window (:func:`core.zoom.zoom_window`
    at ``context``, the default context when None), ``"large"`` when it does not."""
    from napari_medsam.core.zoom import DEFAULT_CONTEXT, zoom_window

    z, box = seed_box(gt, axis)
    shape = tuple(s for a, s in enumerate(gt.shape) if a != axis)
    return "large" if zoom_window(box, shape, context=context or DEFAULT_CONTEXT) is None else "small"


def class_scores(g: dict, rows: np.ndarray | None = None, cases: np.ndarray | None = None) -> dict:
    """Per grid rule (``rows``, default all) of :func:`grid_arrays` ``g``, over ``cases`` (default
    all): cases with both ends within 2, ends within 2, the sum of 3D Dice, beyond, missed."""
    rows = np.arange(len(g["combos"])) if rows is None else rows
    cases = np.arange(len(g["gt"])) if cases is None else cases
    cols = np.flatnonzero(np.isin(g["case"], cases))
    d = g["dist"][np.ix_(rows, cols)]
    ok = np.abs(d) <= 2
    both = np.zeros(len(rows), int)
    for c in cases:
        both += ok[:, g["case"][cols] == c].all(axis=1)
    dice = 2 * g["inter"][np.ix_(rows, cases)] / (g["pred"][np.ix_(rows, cases)] + g["gt"][cases])
    return {"cases": both, "ends": ok.sum(axis=1), "dice": dice.sum(axis=1),
            "beyond": np.maximum(d, 0).sum(axis=1), "missed": np.maximum(-d, 0).sum(axis=1)}


def top_rules(g: dict, cases: np.ndarray | None = None) -> np.ndarray:
    """The grid rules tied best over ``cases``: most cases with both ends within 2, then most ends
    within 2, then the highest 3D Dice (to 3 decimals)."""
    s = class_scores(g, cases=cases)
    key = s["cases"] * 10**6 + s["ends"] * 10**3 + np.round(s["dice"] / max(len(g["gt"] if cases is None else cases), 1), 3)
    return np.flatnonzero(key == key.max())


def bench_policy(args: argparse.Namespace) -> None:
    """One policy chosen by the seed's size (``--policy "SMALL|LARGE"``, two carries as in
    ``--variants``): a seed whose box gets a zoom window (:func:`seed_class`) is carried with SMALL,
    one that does not with LARGE; one permissive run per case with its class's carry (or ``--load
    DIR``: the runs ``--variants --save`` wrote, ``{carry}.pkl`` for each). Prints, with the leak
    guards kept in every rule: the 12-case table under ``--small-stops`` / ``--large-stops``
    (``key=value,...`` on top of the default stops, as ``--rules``), the best grid rules per class
    and their combination, leave-one-plane-out (a class's rules chosen on two planes, scored on the
    third: min-max over the rules tied best on the two) and each given threshold moved to its
    neighbouring grid values."""
    small_text, _, large_text = args.policy.partition("|")
    carries = {cls: {"large_seed": None, **parse_carry(text)} for cls, text in (("small", small_text), ("large", large_text))}
    name_of = lambda text: text.replace(",", "_").replace("=", "-") or "default"  # noqa: E731
    mni, structs, loaded, cache, planes = setup(args)
    context = carries["small"].get("zoom")
    only = lambda carry: {k: v for k, v in carry.items() if k not in OPEN_STOPS and k != "min_area_px"}  # noqa: E731
    runs: dict[str, list] = {"small": [], "large": []}
    t0 = time.perf_counter()
    saved = {}
    if args.load:
        import pickle

        for cls, text in (("small", small_text), ("large", large_text)):
            with open(Path(args.load) / f"{name_of(text)}.pkl", "rb") as f:
                data = pickle.load(f)  # noqa: S301 - our own file, written by --save
            saved[cls] = {(name, axis): run for name, axis, run in data["runs"]}
            print(f"{cls} seeds: runs read from {args.load}/{name_of(text)}.pkl (--bound {data['bound']})")
    timing = {"small": 0.0, "large": 0.0}
    for axis in planes:
        enc = None if args.load else VolumeEncoder(loaded, mni["t1"], axis=axis, cache=cache)
        for name, gt in structs.items():
            cls = seed_class(gt, axis, context)
            if args.load:
                run = saved[cls][(name, axis)]
            else:
                z, box = seed_box(gt, axis)
                t = time.process_time()
                run = drain(propagate(enc, {z: Prompt2D.from_box(box)},
                                      params=PropagationParams.permissive(**only(carries[cls])),
                                      **bounded(gt, axis, args.bound)))
                timing[cls] += time.process_time() - t
            runs[cls].append((name, axis, run))
    print("classes: " + "; ".join(f"{cls}: " + ", ".join(f"{n}/{PLANES[a]}" for n, a, _ in rs) for cls, rs in runs.items()))
    if not args.load:
        print(f"permissive runs: CPU s small {timing['small']:.0f}, large {timing['large']:.0f}; "
              f"{time.perf_counter() - t0:.0f} s wall")
        if args.save:
            import pickle

            Path(args.save).mkdir(parents=True, exist_ok=True)
            for cls, text in (("small", small_text), ("large", large_text)):
                with open(Path(args.save) / f"{name_of(text)}.pkl", "wb") as f:
                    pickle.dump({"carry": carries[cls], "bound": args.bound, "runs": runs[cls]}, f)
    order = [(name, axis) for axis in planes for name in structs]
    given = {"small": args.small_stops, "large": args.large_stops}

    def combined(res: dict[str, list]) -> list[tuple[str, int, dict]]:
        by = {(n, a): r for cls in res for (n, a, _), r in zip(runs[cls], res[cls], strict=True)}
        return [(n, a, by[(n, a)]) for n, a in order if (n, a) in by]

    def show(res: dict[str, list], title: str) -> None:
        rows = combined(res)
        print(f"\n{title}\n| structure | plane | true slices | labelled | beyond | missed | ends (lo / hi) | within 2 "
              "| 3D Dice |\n|---|---|---|---|---|---|---|---|---|")
        for n, a, r in rows:
            print(fmt(n, PLANES[a], r))
        print(summary([r for _, _, r in rows]) + f" (mean 3D Dice {np.mean([r['dice'] for _, _, r in rows]):.4f})")

    rules = {cls: PropagationParams(**{**carries[cls], **parse_carry(given[cls])}) for cls in runs}
    res = {cls: [evaluate(simulate(run, rules[cls]), structs[n], a) for n, a, run in runs[cls]] for cls in runs}
    show(res, f"the policy with the given stops: small seeds {small_text} + stops [{given['small'] or 'default'}]; "
              f"large seeds {large_text} + stops [{given['large'] or 'default'}]")
    for cls in runs:
        for n, a, run in runs[cls]:
            print(f"    {n}/{PLANES[a]} ({cls}) stops: {simulate_stops(run, rules[cls])}")
    grid = {**(WIDE_GRID if args.wide else GRID), **GUARDS}
    grids = {cls: grid_arrays(rs, structs, grid) for cls, rs in runs.items() if rs}
    print(f"\ngrid ({'WIDE_GRID' if args.wide else 'GRID'}, the leak guards kept: {GUARDS}); "
          f"{len(next(iter(grids.values()))['combos'])} rules a class")
    best = {}
    for cls, g in grids.items():
        s = class_scores(g)
        top = top_rules(g)
        n = len(g["gt"])
        best[cls] = top[0]
        print(f"  {cls} seeds ({n} cases): best {s['cases'][top[0]]}/{n} cases, {s['ends'][top[0]]}/{2 * n} ends, "
              f"Dice {s['dice'][top[0]] / n:.3f}, beyond {s['beyond'][top[0]]}, missed {s['missed'][top[0]]}; "
              f"{len(top)} rules tied, the first: {_short(g['combos'][top[0]])}")
    res_best = {cls: [evaluate(simulate(run, PropagationParams.permissive(**only(carries[cls]), **grids[cls]['combos'][best[cls]],
                                                                          min_area_px=4)), structs[n], a)
                      for n, a, run in runs[cls]] for cls in grids}
    show(res_best, "the policy with each class's best grid rule (in sample)")
    # Leave one plane out: a class's rules chosen on the other planes' cases, scored on the plane's.
    print("\nleave one plane out (rules chosen on the other planes, scored on this one; min-max over the tied best):")
    tot = np.zeros(3)
    for held in planes:
        line, lo_hi = [], np.zeros((2, 3))
        for cls, g in grids.items():
            axes = np.array([a for _, a, _ in runs[cls]])
            train, test = np.flatnonzero(axes != held), np.flatnonzero(axes == held)
            if not len(test):
                continue
            top = top_rules(g, train) if len(train) else np.arange(len(g["combos"]))
            s = class_scores(g, rows=top, cases=test)
            lo_hi += [[s["cases"].min(), s["ends"].min(), s["dice"].min()], [s["cases"].max(), s["ends"].max(), s["dice"].max()]]
            line.append(f"{cls} {s['cases'].min()}-{s['cases'].max()}/{len(test)} cases, {s['ends'].min()}-{s['ends'].max()}"
                        f"/{2 * len(test)} ends ({len(top)} rules tied on the rest; first {_short(g['combos'][top[0]])})")
        n_test = sum(1 for _, a in order if a == held)
        print(f"  held out {PLANES[held]}: {lo_hi[0, 0]:.0f}-{lo_hi[1, 0]:.0f}/{n_test} cases, {lo_hi[0, 1]:.0f}-"
              f"{lo_hi[1, 1]:.0f}/{2 * n_test} ends, mean 3D Dice {lo_hi[0, 2] / n_test:.3f}-{lo_hi[1, 2] / n_test:.3f}; "
              + "; ".join(line))
        tot += lo_hi[0]
    print(f"  all planes held out (the least of each fold): {tot[0]:.0f}/{len(order)} cases, {tot[1]:.0f}/{2 * len(order)} ends")
    # The given rules' thresholds moved to their neighbouring grid values.
    print("\nthe given stops, each threshold moved to a neighbouring value of the grid (cases, ends of the class):")
    for cls in runs:
        base = rules[cls]
        for key, values in grid.items():
            if key in GUARDS:
                continue
            cur = getattr(base, key)
            vals = sorted({*[v for v in values if v is not None], *([cur] if cur is not None else [])})
            i = vals.index(cur) if cur is not None else None
            off = [None] if None in values else []
            near = off + vals if i is None else [
                v for v in (vals[i - 1] if i > 0 else None, vals[i + 1] if i + 1 < len(vals) else None)
                if v is not None] + off
            cells = []
            for v in near:
                p = dataclasses.replace(base, **{key: v})
                r = [evaluate(simulate(run, p), structs[n], a) for n, a, run in runs[cls]]
                ok = sum(abs(x["end_lo"]) <= 2 and abs(x["end_hi"]) <= 2 for x in r)
                ends = sum((abs(x["end_lo"]) <= 2) + (abs(x["end_hi"]) <= 2) for x in r)
                cells.append(f"{v}: {ok}, {ends}")
            print(f"  {cls} {key}={cur} -> " + "; ".join(cells))


def _short(params: dict) -> str:
    """A grid rule without its switched-off criteria and the guards."""
    return ", ".join(f"{k}={v}" for k, v in params.items() if v is not None and k not in GUARDS and v != 0.0) or "guards only"


def table(permissive: list[tuple[str, int, Propagation]], res: list[dict]) -> None:
    print("| structure | plane | true slices | labelled | beyond | missed | ends (lo / hi) | within 2 | 3D Dice |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for (name, axis, _), r in zip(permissive, res, strict=True):
        print(fmt(name, PLANES[axis], r))
    print(summary(res))


def simulate_stops(run: Propagation, params: PropagationParams) -> str:
    """Where and why ``params`` stops each direction of a permissive single-seed run."""
    (z0,) = run.seeds
    params = params.for_seed(z0 in getattr(run, "large", ()))
    seed_area = run.scores[z0].area
    out = []
    for step in (-1, 1):
        z = z0 + step
        why = None
        while z in run.masks:
            why = params.stop_reason(run.scores[z], seed_area)
            if why:
                break
            z += step
        out.append(f"{'-+'[step > 0]} at {z} ({why or 'vanished/bound'})")
    return "; ".join(out)


def bench_seeds(args: argparse.Namespace) -> None:
    """The 2D Dice of the one-box seed mask on its slice, per structure and plane: the ceiling of
    what propagating it can reach."""
    from napari_medsam.core.segment import segment_slice

    mni = load_mni()
    structs = structures(mni)
    loaded = load_model(args.model, device=args.device)
    cache = EmbeddingCache(args.cache) if args.cache else EmbeddingCache(disk=False)
    from napari_medsam.core.propagation import _contrast, _deepest_point
    from napari_medsam.core.segment import decode_all
    from napari_medsam.core.zoom import decode_zoomed, zoom_window

    print(f"model {loaded.name} on {loaded.device.type} ({loaded.dtype})\n| structure | plane | seed slice | "
          "structure px | mask px | seed 2D Dice | outputs 0-3: Dice (pred. IoU, contrast) | by IoU | by contrast "
          "| box + own mask | box + point | box +5 % | zoom x2 | zoom x3 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for axis in [int(p) for p in args.planes.split(",")]:
        enc = VolumeEncoder(loaded, mni["t1"], axis=axis, cache=cache)
        tf = enc.transform()
        for name, gt in structs.items():
            z, box = seed_box(gt, axis)
            g = np.take(gt, z, axis=axis)
            dice = lambda m, g=g: 2 * int((m & g).sum()) / max(int(m.sum() + g.sum()), 1)  # noqa: E731
            first = segment_slice(enc, z, [Prompt2D.from_box(box)])[0]
            img = enc.intensity.apply(enc.raw_slice(z))
            cands = decode_all(loaded, enc.get(z), tf, Prompt2D.from_box(box))
            cells = " ".join(f"{dice(c.mask):.2f} ({c.iou:.2f}, {_contrast(img, c.mask, box):.2f})" for c in cands)
            by_iou = max(cands, key=lambda c: c.iou)
            by_con = max(cands, key=lambda c: _contrast(img, c.mask, box) if c.mask.any() else -1)
            own = segment_slice(enc, z, [Prompt2D(box=box, mask_logits=first.logits)])[0]
            pt = _deepest_point(first.mask) if first.mask.any() else np.array([(box[0] + box[2]) / 2,
                                                                                (box[1] + box[3]) / 2])
            point = segment_slice(enc, z, [Prompt2D(points=pt[None].astype(np.float32), labels=np.ones(1, np.int64),
                                                    box=box)])[0]
            side = max(box[2] - box[0], box[3] - box[1])
            m5 = 0.05 * side
            grown = segment_slice(enc, z, [Prompt2D.from_box((box[0] - m5, box[1] - m5, box[2] + m5, box[3] + m5))])[0]
            zoomed = []
            for context in (2.0, 3.0):  # the box decoded on the embedding of the window around it
                win = zoom_window(box, tf.original, context=context)
                zoomed.append("-" if win is None else
                              f"{dice(decode_zoomed(enc, z, Prompt2D.from_box(box), win)[0][0].mask):.2f}")
            print(f"| {name} | {PLANES[axis]} | {z} | {int(g.sum())} | {int(first.mask.sum())} | "
                  f"{dice(first.mask):.2f} | {cells} | {dice(by_iou.mask):.2f} | {dice(by_con.mask):.2f} | "
                  f"{dice(own.mask):.2f} | {dice(point.mask):.2f} | {dice(grown.mask):.2f} | {' | '.join(zoomed)} |")


def bench_speed(args: argparse.Namespace) -> None:
    """One box around the brain on a coronal slice, +-reach slices, cold cache then warm."""
    mni = load_mni()
    brain = structures(mni)["brain"]
    loaded = load_model(args.model, device=args.device)
    z = args.slice
    seed = Prompt2D.from_box(box_of(brain[:, z, :]))
    params = PropagationParams(max_slices=args.reach)
    with tempfile.TemporaryDirectory() as tmp:
        enc = VolumeEncoder(loaded, mni["t1"], axis=1, cache=EmbeddingCache(tmp))
        t0 = time.perf_counter()
        out = drain(propagate(enc, {z: seed}, params=params))
        cold = time.perf_counter() - t0
        visited = len(enc.cached_indices())
        t0 = time.perf_counter()
        out = drain(propagate(enc, {z: seed}, params=params))
        warm = time.perf_counter() - t0
    print(f"model {loaded.name} on {loaded.device.type}; seed coronal slice {z}, reach +-{args.reach}")
    print(f"slices visited {visited}, with a mask {len(out)}")
    print(f"cold cache: {cold / visited:.3f} s/slice (encoder + decoder); warm: {warm / visited * 1e3:.1f} ms/slice "
          f"(decoder + scores); ratio {cold / warm:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="litemedsam")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache", default=None, help="embedding cache folder kept between runs")
    ap.add_argument("--planes", default="0,1,2")
    ap.add_argument("--structures", default="", help="comma-separated subset of brain,ventricle,deep_gm,cereb_wm")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--seeds", action="store_true", help="only the seed slices' 2D Dice")
    ap.add_argument("--variants", default="", help="carry variants to compare, ';'-separated, each "
                    "'key=value,...' of PropagationParams (e.g. 'choose=first;choose=previous,carry_point=1')")
    ap.add_argument("--bound", type=int, default=None, help="propagate only within the true "
                    "extent +- this many slices (fewer slices to embed; 'beyond' counts at most this many a run end)")
    ap.add_argument("--floor", type=float, default=None, help="--variants: the least mean 3D Dice of the grid "
                    "rules listed (default: the first variant's with the default stops)")
    ap.add_argument("--save", default=None, help="--variants: pickle each variant's permissive runs into this "
                    "folder (to simulate other rules later without propagating again)")
    ap.add_argument("--load", default=None, help="--variants: read the permissive runs --save wrote into this "
                    "folder instead of propagating")
    ap.add_argument("--rules", default="", help="--variants: stop rules to simulate on each variant's runs, ';'-separated "
                    "'key=value,...' of PropagationParams on top of the defaults (e.g. 'min_iou=none,min_iou_rel=0.5')")
    ap.add_argument("--guards", action="store_true", help="--variants: keep the leak guards (collapse 0.15, "
                    "growth x2.5, jump 0.6) in every grid rule")
    ap.add_argument("--tissue", action="store_true", help="--variants: print SliceScore.tissue around each true end")
    ap.add_argument("--policy", default="", help="'SMALL|LARGE': two carries ('key=value,...'), the first for seeds "
                    "that get a zoom window, the second for those that do not (see bench_policy)")
    ap.add_argument("--small-stops", default="", help="--policy: the small seeds' stops, 'key=value,...' on top of the defaults")
    ap.add_argument("--large-stops", default="", help="--policy: the large seeds' stops, 'key=value,...' on top of the defaults")
    ap.add_argument("--wide", action="store_true", help="--policy: search WIDE_GRID instead of GRID")
    ap.add_argument("--bias", type=float, default=0.0, help="the plain run and --variants: T1 times a linear bias "
                    "field along each plane's axis, 1 - BIAS on the first slice to 1 + BIAS on the last")
    ap.add_argument("--slice", type=int, default=93)
    ap.add_argument("--reach", type=int, default=10)
    args = ap.parse_args()
    if args.speed:
        bench_speed(args)
    elif args.seeds:
        bench_seeds(args)
    elif args.policy:
        bench_policy(args)
    elif args.variants:
        bench_variants(args)
    else:
        bench_stops(args)


if __name__ == "__main__":
    main()
