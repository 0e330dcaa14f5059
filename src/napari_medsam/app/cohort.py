"""Predict a whole cohort with a trained head: in this process or on a dask.distributed cluster.

GUI-free; the ``napari-medsam predict`` command and scripts drive it. The pieces:

- :func:`expand_inputs` turns files, globs, folders (a DICOM series folder is one volume per
  series) and CSV / TXT lists into volume paths; :func:`plan` names one output per volume.
- :func:`run_cohort` is a generator (yields :class:`~napari_medsam.core.progress.Progress` per
  finished volume, returns a :class:`CohortSummary`). Without ``workers`` / ``scheduler`` it runs
  the volumes one after another in this process. With ``workers=N`` it starts a dask
  ``LocalCluster`` of N workers, each running one volume at a time with ``cores // N`` torch
  threads; ``scheduler=ADDRESS`` uses a running cluster. One task per volume.
- Each worker loads the model and the head once: a :class:`ModelPlugin` (a dask worker plugin)
  holds them for every task that worker runs.
- A volume that fails is retried once (``retries``) and then reported with its reason; it never
  stops the others. Each written output gets a sidecar ``<output>.medsam.json`` (input
  fingerprint, head SHA-256, shape, voxel counts); a rerun skips volumes whose sidecar matches
  and whose output opens with that shape, so an interrupted run resumes where it stopped.
- Memory per worker: one volume at a time, read lazily where the format allows (DICOM slice by
  slice, uncompressed NIfTI memory-mapped); dask's ``memory_limit`` (default: the machine's
  memory shared among the workers) pauses or restarts a worker that outgrows it, and the volume
  is then reported as failed.
- Embeddings go through the embedding cache (disk by default), so a scan of the cohort opens in
  napari already embedded for that model.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from napari_medsam.core.errors import Cancelled, MedSamError
from napari_medsam.core.progress import Progress, ProgressGen
from napari_medsam.core.weights import file_sha256

__all__ = [
    "CohortItem",
    "CohortParams",
    "CohortSummary",
    "ItemResult",
    "ModelPlugin",
    "expand_inputs",
    "plan",
    "predict_item",
    "run_cohort",
    "write_summary",
]

_log = logging.getLogger(__name__)

PLUGIN_NAME = "napari-medsam-models"
SIDECAR_SUFFIX = ".medsam.json"
SIDECAR_FORMAT = "napari-medsam-prediction/1"
LIST_SUFFIXES = (".csv", ".txt", ".lst")
OUTPUT_FORMATS = ("auto", ".nii.gz", ".nii", ".ome.zarr", ".zarr", ".tif", ".npy")
SUMMARY_FIELDS = ("input", "output", "status", "attempts", "seconds", "voxels_per_class", "error")
_GLOB_CHARS = set("*?[")
_LABEL_NAME = "prediction"  # the label image of an .ome.zarr output: labels/prediction
_DASK_LOG_ENV = "DASK_LOGGING__DISTRIBUTED"


@dataclass(frozen=True)
class CohortParams:
    """What every volume of a cohort is predicted with (picklable: it travels to the workers)."""

    head: str
    weights: str | None = None
    device: str = "auto"
    precision: str = "auto"
    cache_dir: str | None = None
    disk_cache: bool = True
    batch_size: int = 8
    probabilities: str | None = None  # folder for per-class probability maps, or None
    dicom_seg: bool = False  # also write <output stem>.seg.dcm for DICOM inputs
    torch_threads: int = 0  # per worker; 0 leaves torch's setting
    adapter: str | None = None  # an adapter file (core.adapt) applied to the encoder before the head

    def model_key(self) -> tuple:
        return (os.path.abspath(self.head), self.weights, self.device, self.precision, self.cache_dir,
                self.disk_cache, self.adapter and os.path.abspath(self.adapter))


@dataclass(frozen=True)
class CohortItem:
    """One volume to predict: its input (a path, or ``FOLDER::SERIES``) and its output path."""

    input: str
    output: str


@dataclass
class ItemResult:
    """How one volume went. ``status``: ``done``, ``skipped`` (already done) or ``failed``."""

    input: str
    output: str
    status: str
    seconds: float = 0.0
    voxels: dict[int, int] = field(default_factory=dict)
    error: str = ""
    attempts: int = 0

    def row(self) -> dict[str, Any]:
        return {"input": self.input, "output": self.output, "status": self.status, "attempts": self.attempts,
                "seconds": f"{self.seconds:.3f}",
                "voxels_per_class": json.dumps({str(k): v for k, v in sorted(self.voxels.items())}),
                "error": self.error}


@dataclass(frozen=True)
class CohortSummary:
    """The results in input order, the summary CSV (if written) and the dashboard link (if any)."""

    results: tuple[ItemResult, ...]
    summary_path: str | None
    dashboard: str | None
    seconds: float

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)


# ---- inputs ------------------------------------------------------------------------------------


def _read_list(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8-sig")
    base = path.parent
    entries: list[str] = []
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
        column = 0
        if rows:
            header = [c.strip().lower() for c in rows[0]]
            for name in ("input", "image", "path", "file", "filename"):
                if name in header:
                    column = header.index(name)
                    rows = rows[1:]
                    break
        entries = [r[column].strip() for r in rows if len(r) > column and r[column].strip()]
    else:
        entries = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [e if os.path.isabs(os.path.expanduser(e.split("::")[0])) else str(base / e) for e in entries]


def _folder_entries(folder: Path) -> list[str]:
    """Volumes inside a folder that is not itself one image: images, zarr stores, DICOM folders."""
    from napari_medsam.io import image_format
    from napari_medsam.io.dicom import _looks_dicom, list_series

    direct_dicom = [f for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")
                    and _looks_dicom(f)]
    if direct_dicom:  # a series folder: one volume per series
        try:
            series = list_series(folder)
        except MedSamError:
            return [str(folder)]  # unreadable: reported as that input's error
        return [str(folder)] if len(series) == 1 else [f"{folder}::{s.uid}" for s in series]
    out: list[str] = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if image_format(child) is not None:
            out.append(str(child))
        elif child.is_dir():
            out.extend(_folder_entries(child))
    return out


def expand_inputs(specs: Sequence[str | os.PathLike]) -> list[str]:
    """Volume inputs from files, globs, folders and CSV / TXT lists, in order, without duplicates.

    A folder holding DICOM files is one volume per series (``FOLDER`` or ``FOLDER::UID``); a
    ``.zarr`` store is one volume; any other folder is searched for images, stores and DICOM
    folders. A ``.csv`` list takes the column named input / image / path / file (else the first);
    a ``.txt`` list one path per line (``#`` comments); relative entries are relative to the list.
    A path that does not exist is kept: it fails with a clear error in the summary.

    Raises :class:`MedSamError` when a glob matches nothing or nothing at all is given.
    """
    from napari_medsam.io import image_format

    out: list[str] = []
    for spec in specs:
        text = os.path.expanduser(os.fspath(spec))
        path = Path(text)
        if "::" in text and not path.exists():
            out.append(text)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES and image_format(path) is None:
            out.extend(expand_inputs(_read_list(path)))
        elif path.is_dir() and image_format(path) is None:
            out.extend(_folder_entries(path))
        elif not path.exists() and _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise MedSamError(f"{text} matches no file; check the pattern (quote it so the shell "
                                  "does not expand it first)")
            out.extend(expand_inputs(matches))
        else:
            out.append(text)
    seen: set[str] = set()
    unique = [p for p in out if not (p in seen or seen.add(p))]
    if not unique:
        raise MedSamError("no input volume: the given folders and lists hold no image")
    return unique


def _output_name(entry: str, fmt: str) -> str:
    from napari_medsam.io import image_format
    from napari_medsam.io.dicom import split_series
    from napari_medsam.io.readers import split_extension

    path, series = split_series(entry)
    in_fmt = image_format(path)
    if in_fmt is None:  # DICOM (a folder, a folder::series or a .dcm file) or not there yet
        stem = split_extension(path)[0] if path.suffix.lower() in (".dcm", ".ima") else path.name
        if series is not None:
            stem = f"{stem}_{series.split('.')[-1][-16:]}"  # a UID's last part, or the index
        return stem + (".nii.gz" if fmt == "auto" else fmt)
    stem, ext = split_extension(path)
    if fmt != "auto":
        return stem + fmt
    from napari_medsam.io.readers import WRITABLE_FORMATS

    # NIfTI, and formats we read but do not write (MGH, MINC, NRRD, MetaImage, ...), give .nii.gz
    return f"{stem}.nii.gz" if in_fmt == "nifti" or in_fmt not in WRITABLE_FORMATS else f"{stem}{ext}"


def plan(inputs: Sequence[str], output: str | os.PathLike, *, fmt: str = "auto",
         single_file: bool = False) -> list[CohortItem]:
    """One :class:`CohortItem` per input: ``output`` itself when ``single_file``, else a file in the
    folder ``output`` named after the input (``.nii.gz`` for NIfTI and DICOM inputs, else the
    input's extension, or ``fmt`` when given).

    Raises :class:`MedSamError` when two inputs would be written to the same name.
    """
    if fmt not in OUTPUT_FORMATS:
        raise MedSamError(f"unknown output format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    out = Path(os.path.expanduser(os.fspath(output)))
    if single_file:
        if len(inputs) != 1:
            raise MedSamError(f"{len(inputs)} inputs cannot all be written to the one file {out}; give a folder")
        return [CohortItem(str(inputs[0]), str(out))]
    names = [_output_name(p, fmt) for p in inputs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MedSamError(f"several inputs would be written to the same output name(s) {dupes} in {out}; "
                          "rename them or predict them one at a time")
    return [CohortItem(str(p), str(out / n)) for p, n in zip(inputs, names, strict=True)]


# ---- fingerprints and resuming -------------------------------------------------------------------


def input_fingerprint(entry: str) -> str:
    """Cheap identity of an input: path, size and modification time of its file(s)."""
    from napari_medsam.io.dicom import split_series

    path, series = split_series(entry)
    h = hashlib.sha256(f"{os.path.abspath(path)}::{series}".encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else ''}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _sidecar(output: str) -> Path:
    return Path(output + SIDECAR_SUFFIX)


def _output_shape(output: str) -> tuple[int, ...]:
    from napari_medsam.io import image_format, read_image

    path = Path(output)
    if output.lower().endswith(".ome.zarr") and (path / "labels" / _LABEL_NAME).is_dir():
        path = path / "labels" / _LABEL_NAME
    if image_format(path) == "nifti":
        import nibabel as nib

        return tuple(int(s) for s in nib.load(path).shape)  # header only
    return tuple(read_image(path, lazy=True).spatial_shape)


def _matching_record(item: CohortItem, head_sha: str) -> dict | None:
    try:
        record = json.loads(_sidecar(item.output).read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT
            or record.get("head_sha256") != head_sha
            or record.get("input_fingerprint") != input_fingerprint(item.input)):
        return None
    return record


def already_done(item: CohortItem, head_sha: str) -> bool:
    """True when ``item``'s output and sidecar are there, match its input and head, and open."""
    record = _matching_record(item, head_sha)
    if record is None or record.get("status", "done") != "done":
        return False
    try:
        if any(not os.path.exists(p) for p in record.get("extra_outputs", ())):
            return False
        return _output_shape(item.output) == tuple(record["shape"])
    except Exception:  # noqa: BLE001 - an output that does not open (any reader error) is not done
        return False


def previous_outcome(item: CohortItem, head_sha: str) -> ItemResult | None:
    """What a rerun need not redo: a verified output (``skipped``), or a failure on an input that
    has not changed since and cannot succeed as it is (unreadable or invalid: ``failed`` with the
    recorded reason). Failures of another kind (a worker lost, memory) are tried again."""
    if already_done(item, head_sha):
        return ItemResult(item.input, item.output, "skipped")
    record = _matching_record(item, head_sha)
    if record is not None and record.get("status") == "failed" and record.get("input_error"):
        return ItemResult(item.input, item.output, "failed", error=f"{record.get('error', '')} (unchanged since "
                          "the last run; fix the input, or rerun with --no-resume)")
    return None


def _is_input_error(exc: BaseException) -> bool:
    from napari_medsam.core.errors import ImageReadError, InvalidImageError

    return isinstance(exc, (ImageReadError, InvalidImageError))


def _write_sidecar(output: str, record: dict[str, Any]) -> None:
    side = _sidecar(output)
    side.parent.mkdir(parents=True, exist_ok=True)
    tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps({"format": SIDECAR_FORMAT, **record}, indent=1))
    os.replace(tmp, side)


def _record_failure(item: CohortItem, head_sha: str, exc: BaseException) -> None:
    try:
        _write_sidecar(item.output, {"status": "failed", "input": item.input,
                                     "input_fingerprint": input_fingerprint(item.input), "head_sha256": head_sha,
                                     "error": _reason(exc), "input_error": _is_input_error(exc)})
    except OSError as e:  # the summary still has the failure
        _log.warning("could not record the failure of %s next to %s: %s", item.input, item.output, e)


# ---- one volume ----------------------------------------------------------------------------------


class _Models:
    """The model, head and embedding cache of one worker, loaded on first use, then shared."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._value: tuple[Any, Any, Any] | None = None
        self.loads = 0

    def get(self, params: CohortParams) -> tuple[Any, Any, Any]:
        with self._lock:
            if self._value is None or self._key != params.model_key():
                from napari_medsam.core.build import load_model
                from napari_medsam.core.embeddings import EmbeddingCache
                from napari_medsam.core.finetune import load_head, read_head_meta

                meta = read_head_meta(params.head)
                loaded = load_model(meta.backbone, weights=params.weights, device=params.device,
                                    precision=params.precision, cache_dir=params.cache_dir)
                if params.adapter:
                    from napari_medsam.core.adapt import load_adapter

                    loaded = load_adapter(params.adapter, loaded).loaded
                head = load_head(params.head, loaded=loaded)
                root = None if params.cache_dir is None else Path(params.cache_dir) / "embeddings"
                cache = EmbeddingCache(root, disk=params.disk_cache)
                self._key, self._value = params.model_key(), (loaded, head, cache)
                self.loads += 1
            return self._value


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def predict_item(item: CohortItem, params: CohortParams, models: _Models, head_sha: str,
                 cancel: threading.Event | None = None) -> ItemResult:
    """Read, predict and write one volume (raises on failure); writes the sidecar last."""
    import numpy as np

    from napari_medsam.core.infer import encoder_for_head, predict_slices
    from napari_medsam.io import read_image, write_image, write_labels
    from napari_medsam.io.readers import split_extension

    t0 = time.perf_counter()
    image = read_image(item.input)
    loaded, head, cache = models.get(params)
    encoder = encoder_for_head(loaded, image, head, cache=cache)
    gen = predict_slices(encoder, head, batch_size=params.batch_size,
                         return_probs=params.probabilities is not None, cancel=cancel)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            res = stop.value
            break
    out = item.output
    names = {int(c): str(n) for c, n in zip(head.meta.class_ids, res.class_names, strict=True)}
    if out.lower().endswith(".ome.zarr"):
        from napari_medsam.io.ome_zarr import write_ome_zarr

        write_ome_zarr(out, image, {_LABEL_NAME: res.labels}, class_names=names)
    else:
        write_labels(out, res.labels, reference=image, name=f"{head.meta.kind} head")
    extra: list[str] = []
    if params.probabilities is not None and res.probs is not None:
        stem, ext = split_extension(out)
        for k, name in enumerate(("background", *res.class_names)):
            p = write_image(Path(params.probabilities) / f"{stem}_prob_{_safe(name)}{ext}", res.probs[k],
                            reference=image)
            extra.append(str(p))
    if params.dicom_seg and image.format == "dicom" and res.labels.any():
        from napari_medsam.io.dicom_seg import write_dicom_seg

        stem = split_extension(out)[0]
        ids = [int(c) for c in head.meta.class_ids]
        p = write_dicom_seg(Path(out).with_name(f"{stem}.seg.dcm"), res.labels, reference=image,
                            class_ids=ids, class_names=[names[c] for c in ids])
        extra.append(str(p))
    values, counts = np.unique(res.labels, return_counts=True)
    voxels = {int(v): int(n) for v, n in zip(values, counts, strict=True) if v}
    _write_sidecar(out, {"status": "done", "input": item.input, "input_fingerprint": input_fingerprint(item.input),
                         "head": os.path.abspath(params.head), "head_sha256": head_sha,
                         "shape": [int(v) for v in res.labels.shape],
                         "voxels_per_class": {str(k): v for k, v in voxels.items()}, "extra_outputs": extra})
    return ItemResult(item.input, out, "done", seconds=time.perf_counter() - t0, voxels=voxels)


# ---- dask ------------------------------------------------------------------------------------------


try:  # the plugin base class only when distributed is installed; in-process runs do not need it
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPluginBase
except ImportError:  # pragma: no cover - distributed is a dependency
    _WorkerPluginBase = object  # type: ignore[assignment,misc]


class ModelPlugin(_WorkerPluginBase):  # type: ignore[misc,valid-type]
    """A dask worker plugin: the worker's torch threads and its one :class:`_Models` holder."""

    name = PLUGIN_NAME

    def __init__(self, torch_threads: int = 0) -> None:
        self.torch_threads = int(torch_threads)
        self.models: _Models | None = None  # made on the worker (a lock does not pickle)

    def setup(self, worker: Any) -> None:
        self.models = _Models()
        if self.torch_threads > 0:
            import torch

            torch.set_num_threads(self.torch_threads)


def _task(item: CohortItem, params: CohortParams, head_sha: str) -> ItemResult:
    from distributed import get_worker

    plugin = get_worker().plugins[PLUGIN_NAME]
    return predict_item(item, params, plugin.models, head_sha)


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return " ".join(text.split())


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def cluster_threads(workers: int, cores: int | None = None) -> int:
    """Torch threads per worker so that ``workers x threads <= cores`` (at least 1)."""
    cores = _cpu_count() if cores is None else cores
    return max(1, cores // max(1, workers))


@dataclass
class _Run:
    items: list[CohortItem]
    results: dict[int, ItemResult]
    attempts: dict[int, int]


def run_cohort(
    items: Sequence[CohortItem],
    params: CohortParams,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    processes: bool = True,
    memory_limit: str | float | None = "auto",
    retries: int = 1,
    summary: str | os.PathLike | None = None,
    resume: bool = True,
    cancel: threading.Event | None = None,
) -> ProgressGen[CohortSummary]:
    """Predict every item; yields Progress per finished volume, returns a :class:`CohortSummary`.

    ``workers``: start a ``LocalCluster`` of that many workers (``processes=False``: threads of this
    process, for tests and small machines); ``scheduler``: the address of a running dask scheduler
    (its workers need napari-medsam installed); neither: run here, one volume after another.
    ``retries``: extra attempts for a failed volume. ``resume``: skip volumes already done (see
    :func:`already_done`). ``summary``: where to write the CSV (also written when stopped).
    Progress ``info`` carries ``dashboard`` (the dask dashboard link, when there is one),
    ``failed`` and ``skipped`` counts. ``cancel`` stops between volumes (raising
    :class:`Cancelled`); results so far are in the summary CSV.
    """
    if workers is not None and workers < 1:
        raise MedSamError(f"--workers must be at least 1, got {workers}")
    if workers is not None and scheduler is not None:
        raise MedSamError("give either a number of workers or a scheduler address, not both")
    from napari_medsam.core.finetune import read_head_meta

    read_head_meta(params.head)  # a missing or broken head fails here, before any volume
    head_sha = file_sha256(params.head)
    items = list(items)
    run = _Run(items, {}, {})
    total = len(items)
    t0 = time.perf_counter()
    todo: list[int] = []
    for i, item in enumerate(items):
        before = previous_outcome(item, head_sha) if resume else None
        if before is not None:
            run.results[i] = before
        else:
            todo.append(i)
    dashboard: str | None = None

    def progress(message: str) -> Progress:
        failed = sum(r.status == "failed" for r in run.results.values())
        skipped = sum(r.status == "skipped" for r in run.results.values())
        return Progress(len(run.results), total, message,
                        {"failed": failed, "skipped": skipped, **({"dashboard": dashboard} if dashboard else {})})

    def finish() -> CohortSummary:
        results = tuple(run.results.get(i) or ItemResult(it.input, it.output, "not run")
                        for i, it in enumerate(items))
        path = write_summary(summary, results) if summary is not None else None
        return CohortSummary(results, None if path is None else str(path), dashboard, time.perf_counter() - t0)

    try:
        if workers is None and scheduler is None:
            yield progress("in process")
            models = _Models()
            for i in todo:
                for attempt in range(1, retries + 2):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"stopped after {len(run.results)} of {total} volumes")
                    try:
                        result = predict_item(items[i], params, models, head_sha, cancel)
                    except Cancelled:
                        raise
                    except Exception as e:  # noqa: BLE001 - a failing volume never stops the rest
                        _log.info("volume %s failed (attempt %d): %s", items[i].input, attempt, e)
                        result = ItemResult(items[i].input, items[i].output, "failed", error=_reason(e))
                        if attempt > retries:
                            _record_failure(items[i], head_sha, e)
                    result.attempts = attempt
                    if result.status == "done":
                        break
                run.results[i] = result
                yield progress(Path(items[i].input.split("::")[0]).name)
        elif todo:
            gen = _run_distributed(run, todo, params, head_sha, workers=workers, scheduler=scheduler,
                                   processes=processes, memory_limit=memory_limit, retries=retries, cancel=cancel)
            for link in gen:
                if link and dashboard is None:
                    dashboard = link
                yield progress("distributed")
    finally:
        summary_value = finish()
    return summary_value


def _run_distributed(run: _Run, todo: list[int], params: CohortParams, head_sha: str, *, workers: int | None,
                     scheduler: str | None, processes: bool, memory_limit: Any, retries: int,
                     cancel: threading.Event | None) -> Iterator[str | None]:
    """Submit one task per volume; yield the dashboard link (or None) after each finished volume."""
    from distributed import Client, LocalCluster, as_completed

    quiet = logging.getLogger("distributed")  # its INFO lines would reach the root handler of a CLI
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    cluster = None
    if scheduler is None:
        threads = cluster_threads(int(workers or 1))
        # worker processes configure their logging on import, from the environment they inherit:
        # keep their per-task tracebacks out of the terminal (each failure is in the summary)
        saved = os.environ.get(_DASK_LOG_ENV)
        os.environ[_DASK_LOG_ENV] = "critical"
        try:
            cluster = LocalCluster(n_workers=int(workers or 1), threads_per_worker=1, processes=processes,
                                   memory_limit=memory_limit, dashboard_address=":0",
                                   silence_logs=logging.CRITICAL)
        finally:
            if saved is None:
                os.environ.pop(_DASK_LOG_ENV, None)
            else:
                os.environ[_DASK_LOG_ENV] = saved
        params = replace(params, torch_threads=params.torch_threads or threads)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        client.register_plugin(ModelPlugin(params.torch_threads), name=PLUGIN_NAME)
        link = _dashboard(client)
        yield link
        futures: dict[Any, int] = {}
        for i in todo:
            fut = client.submit(_task, run.items[i], params, head_sha, pure=False, key=f"medsam-predict-{i}-1")
            futures[fut] = i
            run.attempts[i] = 1
        queue = as_completed(list(futures))
        for fut in queue:
            if cancel is not None and cancel.is_set():
                for f in futures:
                    f.cancel()
                raise Cancelled(f"stopped after {len(run.results)} of {len(run.items)} volumes")
            i = futures.pop(fut)
            item = run.items[i]
            if fut.status == "finished":
                result = fut.result()
            else:
                exc = fut.exception()
                _log.info("volume %s failed (attempt %d): %s", item.input, run.attempts[i], exc)
                if run.attempts[i] <= retries:
                    run.attempts[i] += 1
                    again = client.submit(_task, item, params, head_sha, pure=False,
                                          key=f"medsam-predict-{i}-{run.attempts[i]}")
                    futures[again] = i
                    queue.add(again)
                    continue
                result = ItemResult(item.input, item.output, "failed", error=_reason(exc))
                _record_failure(item, head_sha, exc)
            result.attempts = run.attempts[i]
            run.results[i] = result
            yield link
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        quiet.setLevel(level)


def _dashboard(client: Any) -> str | None:
    try:
        import bokeh  # noqa: F401 - the dashboard needs it
    except ImportError:
        return None
    try:
        return str(client.dashboard_link)
    except (KeyError, AttributeError, ValueError):
        return None


def write_summary(path: str | os.PathLike, results: Sequence[ItemResult]) -> Path:
    """Write the summary CSV (one row per volume, :data:`SUMMARY_FIELDS`), atomically."""
    out = Path(os.path.expanduser(os.fspath(path)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerow(r.row())
    os.replace(tmp, out)
    return out


def summary_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a summary CSV back (tests, scripts)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
