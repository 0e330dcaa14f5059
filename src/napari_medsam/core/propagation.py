"""3D propagation: one object carried slice by slice from seed prompts, stopping where it ends.

From each seed slice the mask is carried in both directions: the next slice's prompt is the
previous mask's box grown by a margin (plus its low-res logits for models trained with mask
prompts). Every slice gets a :class:`SliceScore` from what a reader would check: the decoder's
predicted IoU, how the area and the shape changed from the previous slice, and whether the mask
still covers the seed's tissue (intensity statistics in the mask against the seed's, and the image
embedding pooled in the mask against the seed's). The run stops at the first slice whose score
fails :meth:`PropagationParams.stop_reason`; that slice is not written.

The result, :class:`Propagation`, is a read-only mapping ``{slice: (H, W) bool mask}`` (what older
callers used) that also says which slices are seeds and which are *proposals* (propagated, not
reviewed), each proposal's score, and where and why each run stopped. A caller that keeps a set
of reviewed slices (the annotation loop) uses :func:`plan_update` to replace the proposals of an
earlier propagation with a new one's and never touch a reviewed slice.

Every criterion is a ratio or a z-score relative to the seed or the previous slice, so none
depends on the scan's units, size or orientation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import Cancelled, PromptError
from .preprocess import SliceTransform
from .progress import Progress, ProgressGen
from .segment import MaskResult, Prompt2D, box_of, decode, decode_all
from .zoom import DEFAULT_CONTEXT, MIN_SIDE, Window, decode_zoomed, prompt_bounds, zoom_window

__all__ = ["LARGE_SEED", "Propagation", "PropagationParams", "SliceScore", "StopInfo", "parse_range", "plan_update", "propagate"]


#: How a run from a *large* seed is carried and stopped, on top of the other fields (see
#: :attr:`PropagationParams.large_seed`): the seed is the decoder output that best splits its box,
#: each slice keeps the output most like the previous mask (it follows the structure: a brain's
#: masks stay at per-slice Dice 0.8-0.9 where the single-mask output's drift to 0.1-0.2), only the
#: pieces of a mask joined to the previous one (a separate piece is dropped, not carried), no
#: absolute IoU floor (the multimask outputs' predicted IoU is ~0.2 throughout), and each mask, the
#: seed's too, keeps only the seed's own tissue (``gate`` 0.25: intensities within the seed mask's
#: 5-95 % range widened by a quarter of it: a brain's masks lose the CSF, skull and background the
#: decoder takes in, MNI brains' 3D Dice 0.63-0.85 -> 0.89-0.94). The run ends where that gated mask
#: vanishes or collapses (those multimask masks keep their size past the end, on the background; the
#: gate empties them there). No seed-tissue floor: on a gated mask it stopped brains short under a
#: bias field. Chosen on MNI152 (docs/benchmarks.md, issue 16 sixth and seventh passes).
LARGE_SEED: tuple[tuple[str, Any], ...] = (("seed_choose", "contrast"), ("choose", "previous"), ("connect", True),
                                           ("gate", 0.25), ("min_iou", None))


@dataclass(frozen=True)
class PropagationParams:
    """When and how a mask is carried to the next slice, and when it stops.

    Carrying: ``margin``: least box growth in *model-frame* pixels (LiteMedSAM's own 3D inference
    grows by 3 at 256 px); ``margin_frac``: ... or this fraction of the box's longer side, whichever
    is larger, so that growing objects are not clipped by their previous box; ``use_logits``: feed
    the previous low-res logits as a mask prompt (None: for models trained with mask prompts);
    ``max_slices``: the farthest distance from a seed (None: no limit); ``choose``: which of the
    decoder's outputs is kept on a propagated slice: ``"first"`` the single-mask output,
    ``"iou"`` the best predicted IoU of all, ``"previous"`` the one with the highest IoU with the
    previous slice's mask, ``"feature"`` the one whose pooled embedding is most like the seed's,
    ``"previous+feature"`` the sum of both, ``"contrast"`` the one that best splits the prompt box's
    intensities in two (Otsu's criterion); ``seed_choose``: the same for the seed slice (there is
    no previous mask: ``"previous"`` falls back to the predicted IoU); ``carry_point``: also give a
    positive point at the previous mask's deepest pixel (the maximum of its distance transform);
    ``connect``: keep only the pieces of a mask that touch the previous mask grown by the margin
    (on a seed: that touch its box or positive points), so a separate neighbour the decoder also
    marked is neither written nor carried. ``choose="lookahead"`` keeps the output whose own box,
    carried one slice further, gives a mask most like it there (one decoder call per output more).
    Carried box limits, relative to the seed (None: off): ``max_box_growth``: the carried box's
    height and width are at most this factor times the seed mask's box's (shrunk about its centre);
    ``box_within``: the carried box is clipped to the seed mask's box grown by this fraction of its
    sides; ``similar_q``: the box is carried from the part of the previous mask whose image
    embedding is like the seed's: cells whose cosine similarity with the seed's pooled embedding is
    at least the ``similar_q`` quantile of that similarity over the seed mask's own cells (when
    that part is empty, the whole previous mask).

    Stopping (a slice that fails one is not written, and its run ends):
    ``min_area_frac`` / ``min_area_px``: the mask vanished (below this fraction of the seed's area
    or this many pixels); ``min_iou``: the decoder's predicted IoU; ``min_area_ratio``: the area
    collapsed to below this fraction of the previous slice's in one step; ``max_area_ratio``: ... or
    grew by more than this factor (a leak into a neighbour); ``min_inside``: less than this fraction
    of the mask lies inside the previous slice's mask grown by the step margin (it jumped to
    something else); ``max_intensity_z``: the mean intensity in the mask moved more than this many
    seed standard deviations from the seed's mean (or the previous slice's, whichever is closer,
    so a slow drift along the structure is followed, a jump is not); ``min_feature``: the cosine
    similarity of the image embedding averaged over the mask with the seed's fell below this.
    The seed's own tissue (an end criterion, not a drift detector): a pixel is *seed tissue* when
    its intensity lies within the seed mask's own ``tissue_q`` .. ``1 - tissue_q`` quantiles;
    ``min_tissue``: the mask holds less seed tissue than this fraction of the seed's (what is left of
    the structure has tapered out: a carry that keeps a mask of the same size past the end, as a
    multimask output does, has none left there); ``min_in_range``: the fraction of the mask that is
    seed tissue fell below this fraction of the seed's own (the mask lies on other tissue).
    ``zoom``: decode a small object on the embedding of the square window around its box, this many
    times the box's longer side (:mod:`~napari_medsam.core.zoom`; one encoder call per slice, not
    cached), decided per seed (its prompt's box): a seed too large to gain keeps the slices' cached
    embeddings for its whole run; None: off. ``zoom_fixed``: a run's windows are at least as large
    as its seed's (it keeps the seed's magnification as the object shrinks towards its end, and its
    pooled features stay comparable with the seed's); False: each window follows its carried box.
    ``large_seed``: the seed decides how its run goes. A seed whose box gets no zoom window
    (:func:`~napari_medsam.core.zoom.zoom_window` at ``zoom``, or the default context when zoom is
    off: the box's longer side is over a third of the slice's) is *large*: its run uses these
    ``(field, value)`` pairs on top of the other fields (:data:`LARGE_SEED`; :meth:`for_seed`);
    a smaller seed's run uses the fields as they are. None: every run uses the fields as they are.
    ``gate``: keep of each decoded mask (the seed's too) only the pixels of the seed's tissue: whose
    intensity lies within the seed mask's ``tissue_q`` .. ``1 - tissue_q`` quantiles widened by this
    fraction of that range on each side (then, with ``connect``, only the pieces joined to the
    previous mask, or on the seed to its prompt); the next box is carried from the gated mask and
    every score is taken on it, so the end shows as the gated area collapsing. ``gate_follow``: the
    range moves with the median intensity of the previous slice's gated mask (a slow bias field is
    followed); ``gate_close``: a morphological closing of this radius (pixels) of the gated mask,
    within the decoded mask. None: no gate.
    Set a criterion to None to switch it off; :meth:`legacy` is the propagation before these
    existed (area and IoU only), kept for benchmarks.
    """

    # The stop thresholds were chosen on MNI152 (4 structures x 3 planes, one box each, LiteMedSAM,
    # bf16 CPU): every combination of a grid over the seven criteria was simulated on one permissive
    # run per case (a stricter rule only truncates a run) and the rule with the most run ends within
    # 2 slices of the true end, at a mean 3D Dice not below the legacy rule's, was kept (see
    # "Propagation (issues 3, 16)" in docs/benchmarks.md, bench_propagation.py --tune). The pooled
    # embedding's similarity with the seed's (0.35) and the IoU floor (0.35, as before) do the work;
    # a fixed fraction of the seed's area is no stop any more (it cut the tapering ends of
    # structures short). Intensity (2 SD), collapse (0.15), jump (0.6) and the area-leak limit (x2.5)
    # change no run end on MNI and stay as guards for other scans (a leak onto a vessel).
    margin: float = 3.0
    margin_frac: float = 0.05
    choose: str = "first"
    seed_choose: str = "first"
    carry_point: bool = False
    connect: bool = False
    max_box_growth: float | None = None
    box_within: float | None = None
    similar_q: float | None = None
    min_area_frac: float = 0.0
    min_area_px: int = 4
    min_iou: float | None = 0.35
    min_iou_rel: float | None = None
    use_logits: bool | None = None
    max_slices: int | None = None
    min_area_ratio: float | None = 0.15
    max_area_ratio: float | None = 2.5
    min_inside: float | None = 0.6
    max_intensity_z: float | None = 2.0
    min_feature: float | None = 0.35
    tissue_q: float = 0.05
    min_tissue: float | None = None
    min_in_range: float | None = None
    zoom: float | None = None
    zoom_fixed: bool = True
    gate: float | None = None
    gate_follow: bool = False
    gate_close: int = 0
    large_seed: tuple[tuple[str, Any], ...] | None = LARGE_SEED

    @classmethod
    def legacy(cls, **kw: Any) -> PropagationParams:
        """The earlier propagation: the single-mask output carried as a box, stopping on vanishing
        area (2 % of the seed's) or low predicted IoU only."""
        return cls(**{**LEGACY_CARRY, "min_area_frac": 0.02, "min_area_ratio": None, "max_area_ratio": None,
                      "min_inside": None, "max_intensity_z": None, "min_feature": None, "min_tissue": None,
                      "min_in_range": None, "large_seed": None, **kw})

    @classmethod
    def permissive(cls, **kw: Any) -> PropagationParams:
        """The default carry with no stop but a vanishing mask: every slice scored, for tuning
        (see benchmarks; a stricter rule only truncates such a run). A large seed keeps the default
        large-seed carry (:data:`LARGE_SEED` without its stops)."""
        large = tuple((k, v) for k, v in LARGE_SEED if k not in OPEN_STOPS)
        return cls(**{**OPEN_STOPS, "large_seed": large, **kw})

    def for_seed(self, large: bool) -> PropagationParams:
        """The parameters of a run from a seed that is ``large`` (gets no zoom window) or not:
        ``large_seed`` applied for a large one (see the class docstring), these for a small one."""
        if not large or not self.large_seed:
            return self
        return replace(self, **dict(self.large_seed), large_seed=None)

    def is_large(self, prompt: Prompt2D, shape: tuple[int, int]) -> bool:
        """Whether a seed prompt on a slice of ``shape`` is large: it has a box or points, and the
        window around them would not magnify them 1.5x (:func:`~napari_medsam.core.zoom.zoom_window`
        at ``zoom``, or the default context when zoom is off)."""
        bounds = prompt_bounds(prompt)
        return bounds is not None and zoom_window(bounds, shape, context=self.zoom or DEFAULT_CONTEXT) is None

    def stop_reason(self, s: SliceScore, seed_area: int) -> str | None:
        """Why slice score ``s`` ends its run (None: keep going)."""
        if s.area < max(self.min_area_px, self.min_area_frac * seed_area):
            return "vanished"
        checks = (
            (self.min_iou, s.iou, False, "predicted IoU"),
            (self.min_iou_rel, s.iou_rel, False, "predicted IoU below the seed's"),
            (self.min_area_ratio, s.area_ratio, False, "area collapsed"),
            (self.max_area_ratio, s.area_ratio, True, "area grew"),
            (self.min_inside, s.inside, False, "jumped"),
            (self.max_intensity_z, s.intensity_z, True, "intensity"),
            (self.min_feature, s.feature, False, "features"),
            (self.min_tissue, s.tissue, False, "seed tissue ran out"),
            (self.min_in_range, s.in_range, False, "off the seed's tissue"),
        )
        for limit, value, upper, reason in checks:
            if limit is not None and np.isfinite(value) and (value > limit if upper else value < limit):
                return reason
        return None


#: How :meth:`PropagationParams.legacy` carries a mask: the decoder's single-mask output, as a box.
LEGACY_CARRY: dict[str, Any] = {"choose": "first", "seed_choose": "first", "carry_point": False, "connect": False,
                                "max_box_growth": None, "box_within": None, "similar_q": None}
#: The stop criteria of :meth:`PropagationParams.permissive`: all off but a vanishing mask.
OPEN_STOPS: dict[str, Any] = {"min_iou": None, "min_iou_rel": None, "min_area_frac": 0.0, "min_area_px": 1, "min_area_ratio": None,
                              "max_area_ratio": None, "min_inside": None, "max_intensity_z": None,
                              "min_feature": None, "min_tissue": None, "min_in_range": None}
CHOICES = ("first", "iou", "previous", "feature", "previous+feature", "contrast", "lookahead")


@dataclass(frozen=True)
class SliceScore:
    """What one propagated slice looked like, from its run's seed.

    ``seed``: the seed slice of the run; ``distance``: slices from it; ``area``: mask pixels;
    ``iou``: the decoder's predicted IoU; ``iou_rel``: it over the seed's for the same decoder
    output; ``output``: which decoder output was kept (0 the single-mask one); ``area_ratio``: area / the previous slice's area;
    ``overlap``: IoU with the previous slice's mask; ``inside``: fraction of the mask inside the
    previous mask grown by the step margin; ``intensity_z``: distance of the mask's mean intensity
    from the seed's (or the previous slice's, the closer) in seed standard deviations;
    ``feature``: cosine similarity of the embedding pooled in the mask with the seed's;
    ``tissue``: the mask's pixels of seed tissue (intensity within the seed mask's own quantiles,
    :attr:`PropagationParams.tissue_q`) over the seed's; ``in_range``: the fraction of the mask that
    is seed tissue over the seed's fraction; ``confidence``: one number in [0, 1] from all of them (1 for a seed), for display and ranking.
    """

    seed: int
    distance: int
    area: int
    iou: float
    area_ratio: float = 1.0
    iou_rel: float = 1.0
    output: int = 0
    overlap: float = 1.0
    inside: float = 1.0
    intensity_z: float = 0.0
    feature: float = 1.0
    tissue: float = 1.0
    in_range: float = 1.0
    confidence: float = 1.0


@dataclass(frozen=True)
class StopInfo:
    """Where one run (a seed, a direction) ended: ``last`` is the last slice written (the seed
    itself when none), ``at`` the slice that failed (None when the run reached its bound)."""

    seed: int
    direction: int
    last: int
    at: int | None
    reason: str


@dataclass(frozen=True)
class Propagation(Mapping[int, np.ndarray]):
    """The result of :func:`propagate`: a mapping ``{slice: (H, W) bool mask}`` of non-empty slices.

    ``seeds``: slices prompted by the user (their masks come from the prompts); ``scores``: a
    :class:`SliceScore` for every written slice; ``stops``: one :class:`StopInfo` per run;
    ``span``: ``(start, stop)``, the half-open range of slices propagation was allowed to write;
    ``large``: the seeds whose runs were carried as large seeds (:attr:`PropagationParams.large_seed`).
    """

    masks: dict[int, np.ndarray]
    scores: dict[int, SliceScore]
    seeds: tuple[int, ...]
    stops: tuple[StopInfo, ...] = ()
    span: tuple[int, int] = (0, 0)
    large: tuple[int, ...] = ()

    def __getitem__(self, z: int) -> np.ndarray:
        return self.masks[z]

    def __iter__(self) -> Iterator[int]:
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def proposals(self) -> tuple[int, ...]:
        """Written slices that are not seeds: proposals until someone reviews them."""
        return tuple(z for z in self.masks if z not in self.seeds)

    def confidence(self, z: int) -> float:
        return self.scores[z].confidence


def plan_update(new: Mapping[int, np.ndarray], *, proposals: Iterable[int] = (),
                reviewed: Iterable[int] = ()) -> tuple[dict[int, np.ndarray], set[int]]:
    """What to change in a label volume after a new propagation of one object.

    ``proposals``: slices an earlier propagation of this object wrote and nobody reviewed since;
    ``reviewed``: slices the user accepted, committed or edited (never changed here).
    Returns ``(write, clear)``: the new masks for slices not reviewed, and the earlier proposal
    slices to erase first (all of them that are not reviewed: a new propagation replaces the old
    proposals, also where it now stops short of them).
    """
    done = {int(z) for z in reviewed}
    write = {int(z): m for z, m in new.items() if int(z) not in done}
    clear = {int(z) for z in proposals} - done
    return write, clear


def parse_range(text: str, n: int, *, inclusive: bool = False) -> tuple[int, int]:
    """``"A:B"`` (either side may be empty) -> ``(start, stop)``, a half-open slice range as in Python.

    ``inclusive``: B is the last slice wanted (as a user reads slice numbers: ``10:20`` is 11
    slices), not one past it. Negative values count from the end, as in Python (``-1`` is the last
    slice). Raises :class:`PromptError` on bad input.
    """
    parts = text.split(":")
    if len(parts) != 2:
        raise PromptError(f"a slice range is START:STOP (either may be empty), got {text!r}")
    try:
        a, b = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise PromptError(f"a slice range is START:STOP with whole numbers, got {text!r}") from None
    if inclusive and b is not None:
        b = None if b == -1 else b + 1
    start, stop, _ = slice(a, b).indices(n)
    if stop <= start:
        raise PromptError(f"slice range {text!r} holds no slice of 0..{n - 1}")
    return start, stop


def _step_prompt(prev: MaskResult, tf: SliceTransform, params: PropagationParams, use_logits: bool,
                 focus: np.ndarray | None = None,
                 seed_box: tuple[float, float, float, float] | None = None) -> tuple[Prompt2D, float] | None:
    """The next slice's prompt from the previous mask: its box grown by the margin, plus (options)
    a positive point where the mask is deepest and its logits as a mask prompt.

    ``focus``: the part of the previous mask the box is taken from (default: all of it; see
    :attr:`PropagationParams.similar_q`); ``seed_box``: the seed mask's tight box, for the box limits
    :attr:`~PropagationParams.max_box_growth` and :attr:`~PropagationParams.box_within`."""
    src = prev.mask if focus is None or not focus.any() else focus
    tight = box_of(src)
    if tight is None:
        return None
    side = max(tight[2] - tight[0], tight[3] - tight[1])  # original pixels
    margin_px = max(params.margin / min(tf.scale_rc), params.margin_frac * side)
    box = box_of(src, margin_px)
    if box is None:
        return None
    if seed_box is not None:
        box = _limit_box(box, seed_box, params, src.shape)
        if box is None:
            return None
    points, labels = np.zeros((0, 2), np.float32), np.zeros((0,), np.int64)
    if params.carry_point:
        points, labels = _deepest_point(src)[None].astype(np.float32), np.ones((1,), np.int64)
    return Prompt2D(points=points, labels=labels, box=box, mask_logits=prev.logits if use_logits else None), margin_px


def _limit_box(box: tuple[float, float, float, float], seed_box: tuple[float, float, float, float],
               params: PropagationParams, shape: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """``box`` within the limits relative to the seed's box (None: nothing of it is left)."""
    r0, c0, r1, c1 = box
    sh, sw = max(seed_box[2] - seed_box[0], 1.0), max(seed_box[3] - seed_box[1], 1.0)
    if params.max_box_growth is not None:
        g = float(params.max_box_growth)
        if r1 - r0 > g * sh:
            mid = (r0 + r1) / 2
            r0, r1 = mid - g * sh / 2, mid + g * sh / 2
        if c1 - c0 > g * sw:
            mid = (c0 + c1) / 2
            c0, c1 = mid - g * sw / 2, mid + g * sw / 2
    if params.box_within is not None:
        f = float(params.box_within)
        r0, r1 = max(r0, seed_box[0] - f * sh), min(r1, seed_box[2] + f * sh)
        c0, c1 = max(c0, seed_box[1] - f * sw), min(c1, seed_box[3] + f * sw)
    r0, c0, r1, c1 = max(r0, 0.0), max(c0, 0.0), min(r1, float(shape[0])), min(c1, float(shape[1]))
    if r1 - r0 < 1 or c1 - c0 < 1:
        return None
    return r0, c0, r1, c1


def _similarity(embedding: Any, feature: np.ndarray) -> np.ndarray:
    """``(g, g)`` cosine similarity of each cell's image embedding with ``feature`` (unit length)."""
    e = embedding[0].float().cpu().numpy().astype(np.float64)  # (C, g, g)
    norm = np.linalg.norm(e, axis=0)
    return np.einsum("chw,c->hw", e, feature) / np.maximum(norm, 1e-12)


def _cells(logits: np.ndarray, g: int) -> np.ndarray:
    """``(g, g)`` bool: the embedding cells that the mask (model-frame logits > 0) mostly covers."""
    f = logits.shape[-1] // g
    w = (logits > 0).astype(np.float32)
    if f > 1:
        w = w[: g * f, : g * f].reshape(g, f, g, f).mean(axis=(1, 3))
    return w > 0.5


def _cells_to_original(cells: np.ndarray, tf: SliceTransform) -> np.ndarray:
    """A ``(g, g)`` cell map in the model frame -> ``(H, W)`` bool on the original grid (nearest)."""
    g = cells.shape[0]
    sr, sc = tf.scale_rc
    per = tf.input_size / g  # model pixels per cell
    rows = np.minimum(((np.arange(tf.original[0]) + 0.5) * sr / per).astype(int), g - 1)
    cols = np.minimum(((np.arange(tf.original[1]) + 0.5) * sc / per).astype(int), g - 1)
    return cells[np.ix_(rows, cols)]


def _deepest_point(mask: np.ndarray) -> np.ndarray:
    """``(row, col)`` of the mask's pixel farthest from its border (the maximum of the distance
    transform): a point surely inside even for a thin or curved object, unlike its centroid."""
    from scipy import ndimage as ndi

    dt = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return np.array(np.unravel_index(int(np.argmax(dt)), dt.shape), np.float64)


def _connected(mask: np.ndarray, near: np.ndarray) -> np.ndarray:
    """The pieces of ``mask`` (8-connected) that touch ``near``: what stays joined to the object in 3D."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask if n == 0 or (mask & near).any() else np.zeros_like(mask)
    keep = np.unique(lab[near & mask])
    return np.isin(lab, keep[keep > 0])


def _prompted(p: Prompt2D, shape: tuple[int, int]) -> np.ndarray:
    """Where a seed's prompt says the object is: inside its box, or at its positive points."""
    near = np.zeros(shape, bool)
    if p.box is not None:
        r0, c0, r1, c1 = (int(round(v)) for v in p.box)
        near[max(r0, 0):max(r1, r0 + 1), max(c0, 0):max(c1, c0 + 1)] = True
    else:
        for (r, c), lab in zip(np.asarray(p.points).reshape(-1, 2), np.asarray(p.labels).reshape(-1), strict=True):
            if lab == 1:
                near[min(max(int(round(r)), 0), shape[0] - 1), min(max(int(round(c)), 0), shape[1] - 1)] = True
    return near if near.any() else np.ones(shape, bool)


def _gated(mask: np.ndarray, img: np.ndarray, bounds: tuple[float, float], close: int) -> np.ndarray:
    """The pixels of ``mask`` whose intensity in ``img`` lies within ``bounds``, closed with a
    square of radius ``close`` (0: not closed) within ``mask``."""
    out = mask & (img >= bounds[0]) & (img <= bounds[1])
    if close > 0 and out.any():
        from scipy import ndimage as ndi

        st = np.ones((2 * close + 1, 2 * close + 1), bool)
        out = ndi.binary_closing(np.pad(out, close + 1), structure=st)[close + 1:-close - 1, close + 1:-close - 1] & mask
    return out


def _keep(res: MaskResult, kept: np.ndarray) -> MaskResult:
    """``res`` with its mask (and probabilities) cut down to ``kept``."""
    if np.array_equal(kept, res.mask):
        return res
    prob = None if res.prob is None else np.where(kept, res.prob, np.minimum(res.prob, 0.5)).astype(np.float32)
    return MaskResult(mask=kept, logits=res.logits, iou=res.iou, prob=prob)


def _known_result(mask: np.ndarray, decoded: MaskResult, tf: SliceTransform, window: Window | None) -> MaskResult:
    """A :class:`MaskResult` for a mask a person gave: low-res logits (+-8) of it in the model frame
    of ``tf`` (the slice's, or the zoom ``window``'s: its part inside the window), for the features
    pooled in it; the decoded output's predicted IoU."""
    local = mask if window is None else mask[window[0]:window[2], window[1]:window[3]]
    low = tf.mask_to_model_lowres(local.astype(np.float32), int(decoded.logits.shape[-1]))
    return MaskResult(mask=mask, logits=(16.0 * low - 8.0).astype(np.float32), iou=decoded.iou,
                      prob=mask.astype(np.float32))


def _contrast(img: np.ndarray, mask: np.ndarray, box: tuple[float, float, float, float] | None) -> float:
    """How well ``mask`` splits the box's intensities in two (Otsu's criterion: between-class over
    total variance, 0..1); the whole slice when there is no box."""
    if box is not None:
        r0, c0, r1, c1 = (int(round(v)) for v in box)
        img, mask = img[max(r0, 0):r1, max(c0, 0):c1], mask[max(r0, 0):r1, max(c0, 0):c1]
    n, k = mask.size, int(mask.sum())
    if k == 0 or k == n:
        return 0.0
    total = float(img.var())
    if total <= 0:
        return 0.0
    w = k / n
    return float(w * (1 - w) * (img[mask].mean() - img[~mask].mean()) ** 2 / total)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def _choose(cands: list[MaskResult], how: str, *, prev: np.ndarray | None, seed_feature: np.ndarray | None,
            embedding: Any, img: np.ndarray, box: tuple[float, float, float, float] | None,
            ahead: Any = None) -> tuple[int, MaskResult]:
    """The decoder output to keep and its index (see :attr:`PropagationParams.choose`); an empty one
    never wins. ``ahead(c)``: for ``"lookahead"``, how well ``c`` agrees with what its box gives on
    the next slice (None there: no next slice, the previous mask decides)."""
    if how == "first" or len(cands) == 1:
        return 0, cands[0]

    def feature(c: MaskResult) -> float:
        v = _pooled_feature(embedding, c.logits) if seed_feature is not None else None
        return float(v @ seed_feature) if v is not None else 0.0

    def score(c: MaskResult) -> float:
        if not c.mask.any():
            return -np.inf
        if how == "iou":
            return c.iou
        if how == "contrast":
            return _contrast(img, c.mask, box)
        overlap = _iou(c.mask, prev) if prev is not None else c.iou
        if how == "previous":
            return overlap + 1e-3 * c.iou  # ties: the decoder's own choice
        if how == "feature":
            return feature(c) + 1e-3 * c.iou
        if how == "previous+feature":
            return overlap + feature(c)
        if how == "lookahead":
            agree = ahead(c) if ahead is not None else None
            return (overlap if agree is None else agree) + 1e-3 * c.iou
        raise PromptError(f"choose must be one of {', '.join(CHOICES)}; got {how!r}")

    k = max(range(len(cands)), key=lambda i: score(cands[i]))
    return k, cands[k]


def _grow(mask: np.ndarray, px: float) -> np.ndarray:
    """``mask`` dilated by ``px`` pixels (a square: a running window sum along each axis)."""
    r = max(1, int(np.ceil(px)))
    out = np.asarray(mask, bool)
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(r + 1, r) if a == axis else (0, 0) for a in (0, 1)]
        cs = np.cumsum(np.pad(out, pad).astype(np.int32), axis=axis)
        hi = np.take(cs, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
        lo = np.take(cs, np.arange(0, n), axis=axis)
        out = hi > lo
    return out


def _pooled_feature(embedding: Any, logits: np.ndarray) -> np.ndarray | None:
    """The ``(C,)`` embedding averaged over the mask (model frame), unit length; None if empty."""
    import torch

    g = int(embedding.shape[-1])
    side = logits.shape[-1]
    f = side // g
    w = (logits > 0).astype(np.float32)
    if f > 1:
        w = w[: g * f, : g * f].reshape(g, f, g, f).mean(axis=(1, 3))
    total = float(w.sum())
    if total <= 0:
        return None
    wt = torch.from_numpy(w).to(embedding.device, embedding.dtype)
    v = torch.einsum("chw,hw->c", embedding[0].float(), wt.float()) / total
    v = v.double().cpu().numpy()
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else None


@dataclass
class _Seed:
    """What a run compares its slices with: the seed's area, intensity statistics and feature."""

    area: int
    mean: float
    std: float
    feature: np.ndarray | None
    result: MaskResult = field(repr=False)
    ious: tuple[float, ...] = ()  # the predicted IoU of each decoder output on the seed slice
    box: tuple[float, float, float, float] | None = None  # the seed mask's tight box
    similar: float | None = None  # the cell similarity threshold of PropagationParams.similar_q
    tissue_range: tuple[float, float] = (float("nan"), float("nan"))  # seed tissue: intensities in here
    tissue_px: int = 0  # the seed mask's pixels of seed tissue
    window: Window | None = None  # the zoom window it was decoded on (PropagationParams.zoom): its run is too
    params: PropagationParams = PropagationParams()  # its runs' (PropagationParams.for_seed)
    large: bool = False  # carried as a large seed (PropagationParams.large_seed)
    gate_range: tuple[float, float] | None = None  # PropagationParams.gate: intensities kept (None: no gate)
    median: float = float("nan")  # the seed mask's median intensity (gate_follow's reference)

    def tissue_of(self, vals: np.ndarray, shift: float = 0.0) -> tuple[float, float]:
        """``(tissue, in_range)`` of a mask whose pixel intensities are ``vals`` (see SliceScore),
        the seed's tissue range moved by ``shift`` (``gate_follow``)."""
        if self.tissue_px <= 0:
            return float("nan"), float("nan")
        k = _count_within(vals, (self.tissue_range[0] + shift, self.tissue_range[1] + shift))
        frac_seed = self.tissue_px / self.area
        return k / self.tissue_px, (k / vals.size) / frac_seed if vals.size else 0.0

    def iou_rel(self, iou: float, output: int) -> float:
        ref = self.ious[output] if output < len(self.ious) else self.result.iou
        return float(iou / ref) if ref > 0 else float("inf")


def _count_within(vals: np.ndarray, bounds: tuple[float, float]) -> int:
    """How many of ``vals`` lie within ``bounds`` (inclusive)."""
    return int(((vals >= bounds[0]) & (vals <= bounds[1])).sum())


def _confidence(s: SliceScore, p: PropagationParams) -> float:
    """One number in [0, 1]: the weakest of the criteria, each scaled to 1 (clearly fine) .. 0 (at its limit)."""
    def up(v: float, lo: float | None, good: float) -> float:
        if lo is None or not np.isfinite(v):
            return 1.0
        return float(np.clip((v - lo) / max(good - lo, 1e-6), 0.0, 1.0))

    def down(v: float, hi: float | None, good: float) -> float:
        if hi is None or not np.isfinite(v):
            return 1.0
        return float(np.clip((hi - v) / max(hi - good, 1e-6), 0.0, 1.0))

    parts = (up(s.iou, p.min_iou, 0.9), up(s.inside, p.min_inside, 0.95),
             up(s.area_ratio, p.min_area_ratio, 0.8), down(s.area_ratio, p.max_area_ratio, 1.25),
             down(s.intensity_z, p.max_intensity_z, 0.5), up(s.feature, p.min_feature, 0.95),
             up(s.tissue, p.min_tissue, 0.5), up(s.in_range, p.min_in_range, 0.8))
    return float(min(parts))


def propagate(encoder: Any, seeds: dict[int, Prompt2D], *, params: PropagationParams = PropagationParams(),
              start: int | None = None, stop: int | None = None,
              cancel: threading.Event | None = None) -> ProgressGen[Propagation]:
    """Segment one object through a volume from prompts on one or several slices.

    ``encoder``: a :class:`~napari_medsam.core.encoder.VolumeEncoder`; ``seeds``: ``{slice:
    Prompt2D}``; ``start``/``stop``: the half-open range of slices it may write (default: all; every
    seed must lie inside). From each seed the mask is carried slice by slice in both directions
    and each run stops at the first slice that fails :meth:`PropagationParams.stop_reason`, at the
    range's end, or at the next seed. Between two seeds both contribute: their probabilities are
    blended by inverse distance. Only the slices visited are embedded.
    Yields :class:`Progress`; returns a :class:`Propagation`.
    """
    if not seeds:
        raise PromptError("propagation needs a prompt on at least one slice")
    n = encoder.n_slices
    lo = 0 if start is None else int(start)
    hi = n if stop is None else int(stop)
    if not (0 <= lo < hi <= n):
        raise PromptError(f"slice range {lo}:{hi} must lie within 0:{n} and hold at least one slice")
    for z in seeds:
        if not lo <= z < hi:
            raise PromptError(f"seed slice {z} is outside the range {lo}..{hi - 1}")
    tf = encoder.transform()
    spec = encoder.loaded.spec
    use_logits = params.use_logits if params.use_logits is not None else "mask" in spec.prompts
    order = sorted(seeds)
    limit = params.max_slices if params.max_slices is not None else n
    # Each run: (start seed, direction, last slice it may reach).
    runs: list[tuple[int, int, int]] = []
    for k, z in enumerate(order):
        lo_bound = order[k - 1] if k > 0 else lo - 1
        hi_bound = order[k + 1] if k + 1 < len(order) else hi
        runs.append((z, -1, max(lo_bound + (0 if k > 0 else 1), z - limit)))
        runs.append((z, +1, min(hi_bound - (0 if k + 1 < len(order) else 1), z + limit)))
    total = len(order) + sum(abs(end - z) for z, _, end in runs)
    done = 0

    def values(z: int, mask: np.ndarray) -> np.ndarray:
        """The intensities (the model's 0..255 scale) of the mask's pixels on slice ``z``."""
        return np.asarray(encoder.intensity.apply(encoder.raw_slice(z)), np.float64)[mask]

    def stats(vals: np.ndarray) -> tuple[float, float]:
        if not vals.size:
            return float("nan"), float("nan")
        return float(vals.mean()), float(vals.std())

    contributions: dict[int, list[tuple[int, np.ndarray, SliceScore]]] = {}
    seed_info: dict[int, _Seed] = {}
    def window(prompt: Prompt2D, least: int | None) -> Window | None:
        """The zoom window for ``prompt``, at least ``least`` pixels wide (None: not zoomed)."""
        if least is None or params.zoom is None:
            return None
        return zoom_window(prompt_bounds(prompt), tf.original, context=params.zoom, min_side=max(MIN_SIDE, least))

    def run_side(seed: _Seed) -> int | None:
        """The least window side of a seed's run: the seed's own (a run keeps its magnification,
        ``zoom_fixed``) or the least of any window; None: the run is not zoomed."""
        if seed.window is None:
            return None
        return seed.window[2] - seed.window[0] if params.zoom_fixed else MIN_SIDE

    def candidates(z: int, prompt: Prompt2D, how: str, win: Window | None, *,
                   prob: bool = True) -> tuple[list[MaskResult], Any]:
        """The decoder's outputs for ``prompt`` on slice ``z`` (all of them unless ``how`` is
        "first"), on the slice's embedding or on that of the window ``win``; and that embedding."""
        if win is not None:
            return decode_zoomed(encoder, z, prompt, win, all_outputs=how != "first", return_prob=prob)
        emb = encoder.get(z)
        if how == "first":
            return decode(encoder.loaded, emb, tf, [prompt], return_prob=prob), emb
        return decode_all(encoder.loaded, emb, tf, prompt, return_prob=prob), emb

    def agreement(c: MaskResult, z_next: int, seed_box: Any, least: int | None,
                  p: PropagationParams) -> float | None:
        """For ``choose="lookahead"``: IoU of ``c``'s mask with what its box gives on ``z_next``."""
        if not lo <= z_next < hi:
            return None
        nxt = _step_prompt(c, tf, p, use_logits and least is None, seed_box=seed_box)
        if nxt is None:
            return 0.0
        ahead = candidates(z_next, nxt[0], "first", window(nxt[0], least), prob=False)[0][0]
        return _iou(c.mask, ahead.mask)

    def focus_of(res: MaskResult, emb: Any, seed: _Seed) -> np.ndarray | None:
        """The part of ``res``'s mask the next box is carried from (``similar_q``; None: all of it)."""
        if seed.similar is None or seed.feature is None:
            return None
        like = _similarity(emb, seed.feature) >= seed.similar
        return res.mask & _cells_to_original(like, tf)

    for p in (params, params.for_seed(True)):
        for how in (p.choose, p.seed_choose):
            if how not in CHOICES:
                raise PromptError(f"choose must be one of {', '.join(CHOICES)}; got {how!r}")
    if params.zoom is not None and params.similar_q is not None:
        raise PromptError("similar_q carries the box from embedding cells of the whole slice: it does not "
                          "combine with zoom (set one of them to None)")
    for z in order:
        large = bool(params.large_seed) and params.is_large(seeds[z], tuple(tf.original))
        p = params.for_seed(large)  # the seed decides its runs' carry and stops
        need_all = p.choose != "first" or p.seed_choose != "first" or p.min_iou_rel is not None
        win = window(seeds[z], MIN_SIDE)
        cands, emb = candidates(z, seeds[z], p.seed_choose, win)
        agree: dict[int, float | None] = {}
        if p.seed_choose == "lookahead":
            for c in cands:
                least = None if win is None else win[2] - win[0]
                vals = [v for v in (agreement(c, z - 1, None, least, p), agreement(c, z + 1, None, least, p))
                        if v is not None]
                agree[id(c)] = float(np.mean(vals)) if vals else None
        k, res = _choose(cands, p.seed_choose, prev=None, seed_feature=None, embedding=emb,
                         img=encoder.intensity.apply(encoder.raw_slice(z)), box=seeds[z].box,
                         ahead=lambda c, agree=agree: agree.get(id(c)))
        if p.connect:
            res = _keep(res, _connected(res.mask, _prompted(seeds[z], res.mask.shape)))
        decoded = res
        known = seeds[z].known
        if known is not None and np.shape(known) == tuple(tf.original) and np.any(known):
            # a person's mask: the run carries from it and compares with it (the decoder's predicted
            # IoU stays the reference of the relative IoU floor)
            res = _known_result(np.asarray(known, bool), res, encoder.embed_window(z, win)[1] if win else tf, win)
        if need_all and len(cands) == 1:
            cands = candidates(z, seeds[z], "all", win, prob=False)[0]
        vals = values(z, res.mask)
        gate_range = None
        if p.gate is not None and vals.size:
            # the gate: the seed mask cut down to its own tissue (of the decoder's mask, the range
            # the seed-tissue criteria use, widened by gate); the run compares with the gated seed
            q = min(max(float(p.tissue_q), 0.0), 0.5)
            g_lo, g_hi = float(np.quantile(vals, q)), float(np.quantile(vals, 1.0 - q))
            wide = float(p.gate) * (g_hi - g_lo)
            gate_range = (g_lo - wide, g_hi + wide)
            img = np.asarray(encoder.intensity.apply(encoder.raw_slice(z)), np.float64)
            kept = _gated(res.mask, img, gate_range, int(p.gate_close))
            if p.connect:
                kept = _connected(kept, _prompted(seeds[z], kept.shape))
            if decoded is res and kept.any():  # a person's mask is kept as it is
                res = decoded = _keep(res, kept)
                vals = img[kept]
        # The intensity reference is the decoder's own reading of the seed: the carried slices are
        # the decoder's readings too. A person's mask is tighter (no partial-volume rim): its
        # spread made every decoded mask a jump "off the seed's intensity" (MNI axial ventricle: a
        # committed zoomed mask propagated to no slice at all, intensity z 1.7-3.5 at the next ones).
        mean, std = stats(vals if decoded is res else values(z, decoded.mask))
        tissue_range, tissue_px = (float("nan"), float("nan")), 0
        if vals.size:
            q = min(max(float(p.tissue_q), 0.0), 0.5)
            tissue_range = (float(np.quantile(vals, q)), float(np.quantile(vals, 1.0 - q)))
            tissue_px = _count_within(vals, tissue_range)
        feat = _pooled_feature(emb, res.logits)
        similar = None
        if p.similar_q is not None and feat is not None:
            sim = _similarity(emb, feat)
            cells = _cells(res.logits, sim.shape[0])
            if cells.any():
                similar = float(np.quantile(sim[cells], p.similar_q))
        seed_info[z] = _Seed(area=max(int(res.mask.sum()), 1), mean=mean, std=std, feature=feat, result=res,
                             ious=tuple(float(c.iou) for c in cands), box=box_of(res.mask), similar=similar,
                             tissue_range=tissue_range, tissue_px=tissue_px, window=win, params=p, large=large,
                             gate_range=gate_range, median=float(np.median(vals)) if vals.size else float("nan"))
        done += 1
        yield Progress(done, total, "propagating", {"slice": z})
    stops: list[StopInfo] = []
    for z0, step, end in runs:
        seed = seed_info[z0]
        p = seed.params
        limits = p.max_box_growth is not None or p.box_within is not None
        seed_box = seed.box if limits else None
        prev = seed.result
        prev_mean = seed.mean
        side = run_side(seed)  # the run's least window side (None: not zoomed)
        focus = focus_of(prev, encoder.get(z0), seed) if seed.similar is not None else None
        z = z0
        shift = 0.0  # gate_follow: how far the seed's range has moved with the gated masks' median
        reason, failed = "range end", None
        while z != end:
            if cancel is not None and cancel.is_set():
                raise Cancelled("propagation stopped; nothing was written")
            nxt = _step_prompt(prev, tf, p, use_logits and seed.window is None, focus=focus, seed_box=seed_box)
            if nxt is None:
                reason, failed = "vanished", z + step
                break
            prompt, margin_px = nxt
            z += step
            cands, emb = candidates(z, prompt, p.choose, window(prompt, side))
            ahead = ((lambda c, z=z, step=step, box=seed_box, side=side, p=p: agreement(c, z + step, box, side, p))
                     if p.choose == "lookahead" else None)
            k, res = _choose(cands, p.choose, prev=prev.mask,
                             seed_feature=seed.feature, embedding=emb,
                             img=encoder.intensity.apply(encoder.raw_slice(z)), box=prompt.box, ahead=ahead)
            img = np.asarray(encoder.intensity.apply(encoder.raw_slice(z)), np.float64)
            if seed.gate_range is not None:
                bounds = (seed.gate_range[0] + shift, seed.gate_range[1] + shift)
                res = _keep(res, _gated(res.mask, img, bounds, int(p.gate_close)))
            if p.connect:
                res = _keep(res, _connected(res.mask, _grow(prev.mask, margin_px)))
            done += 1
            yield Progress(done, total, "propagating", {"slice": z})
            area = int(res.mask.sum())
            prev_area = max(int(prev.mask.sum()), 1)
            inter = int((res.mask & prev.mask).sum())
            union = area + prev_area - inter
            inside = float((res.mask & _grow(prev.mask, margin_px)).sum() / area) if area else 0.0
            vals = img[res.mask]
            mean, _ = stats(vals)
            tissue, in_range = seed.tissue_of(vals, shift)
            sd = max(seed.std, 1.0)  # intensities are on 0..255: below one grey level is noise
            iz = min(abs(mean - seed.mean), abs(mean - prev_mean)) / sd if np.isfinite(mean) else float("nan")
            feat = float("nan")
            if seed.feature is not None and area:
                v = _pooled_feature(emb, res.logits)
                feat = float(v @ seed.feature) if v is not None else float("nan")
            score = SliceScore(seed=z0, distance=abs(z - z0), area=area, iou=float(res.iou),
                               area_ratio=area / prev_area, iou_rel=seed.iou_rel(float(res.iou), k), output=k,
                               overlap=inter / max(union, 1), inside=inside,
                               intensity_z=float(iz), feature=feat, tissue=tissue, in_range=in_range)
            why = p.stop_reason(score, seed.area)
            if why is not None:
                reason, failed = why, z
                z -= step
                break
            score = SliceScore(**{**score.__dict__, "confidence": _confidence(score, p)})
            assert res.prob is not None
            contributions.setdefault(z, []).append((z0, res.prob, score))
            prev, prev_mean = res, mean
            if p.gate_follow and seed.gate_range is not None and vals.size and np.isfinite(seed.median):
                shift = float(np.median(vals)) - seed.median
            if seed.similar is not None:
                focus = focus_of(res, emb, seed)
        stops.append(StopInfo(seed=z0, direction=step, last=z, at=failed, reason=reason))
    masks: dict[int, np.ndarray] = {z: s.result.mask for z, s in seed_info.items()}
    scores: dict[int, SliceScore] = {z: SliceScore(seed=z, distance=0, area=int(s.result.mask.sum()),
                                                   iou=float(s.result.iou)) for z, s in seed_info.items()}
    for z, parts in contributions.items():
        if z in seeds:
            continue
        if len(parts) == 1:
            prob = parts[0][1]
        else:  # between two seeds: closer seed weighs more
            weights = np.array([1.0 / max(abs(z - s), 1) for s, _, _ in parts])
            weights /= weights.sum()
            prob = sum(w * p for w, (_, p, _) in zip(weights, parts, strict=True))
        m = prob > 0.5
        if m.any():
            masks[z] = m
            scores[z] = min((sc for _, _, sc in parts), key=lambda sc: sc.confidence)
    yield Progress(total, total, "propagating", {"slices": len(masks)})  # early stops: the rest is done
    keys = sorted(masks)
    return Propagation(masks={z: masks[z] for z in keys}, scores={z: scores[z] for z in keys},
                       seeds=tuple(order), stops=tuple(stops), span=(lo, hi),
                       large=tuple(z for z in order if seed_info[z].large))
