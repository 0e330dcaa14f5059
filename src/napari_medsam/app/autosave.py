"""Autosave of a review session: a crash loses seconds, and a torn save never replaces a good one.

A session folder per image, named by the image's content hash
(:func:`~napari_medsam.core.embeddings.hash_volume`): ``.napari-medsam/<hash>/`` beside the image
when that folder is writable, else ``<user data dir>/napari-medsam/sessions/<hash>/``
(platformdirs; also for images inside the Python installation, such as sample data). Each save is a numbered *snapshot*::

    snap-00000012/labels.npy, proposals.npy, pending.npz, state.json
    heads/round-0003-<sha256[:16]>.head.pt      (one per round, written once, the safe head format)
    manifest-00000012.json                      (written last: every file of the snapshot + its sha256)

Every file is written to a temporary name, flushed to disk (fsync) and renamed into place; the
manifest comes last, the same way, and the folder is fsynced after it. A snapshot without a
manifest, or whose files do not match the manifest's checksums, does not exist for
:meth:`SessionStore.load`, which falls back to the newest good one. Older snapshots are removed only
after a newer manifest is on disk, and the newest :data:`KEEP` good ones always stay (a torn
or corrupt snapshot never takes the place of a good one).

:class:`Autosaver` saves a :class:`~napari_medsam.app.loop.ReviewLoop` ``delay`` seconds after its
edits stop (at the latest ``max_delay`` seconds after the first unsaved edit, so continuous
painting is saved too) and right after every round, in a background thread.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MedSamError
from ..core.weights import file_sha256

__all__ = ["Autosaver", "FORMAT", "KEEP", "SessionStore", "Snapshot", "session_folder"]

FORMAT = "napari-medsam-session/1"
KEEP = 3  # snapshots kept
_log = logging.getLogger(__name__)
_MANIFEST = re.compile(r"^manifest-(\d{8})\.json$")


def session_folder(content_hash: str, image_path: str | os.PathLike | None = None, *,
                   root: str | os.PathLike | None = None) -> Path:
    """Where the session of the image with ``content_hash`` lives (see the module docstring).

    ``root``: use ``root/<hash>`` instead (tests, a custom location).
    """
    if not re.fullmatch(r"[0-9a-fA-F]{8,128}", content_hash or ""):
        raise MedSamError(f"not a content hash: {content_hash!r}")
    if root is not None:
        return Path(root) / content_hash
    if image_path is not None:
        parent = Path(image_path).expanduser().resolve().parent
        installed = any(parent.is_relative_to(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix})
        if parent.is_dir() and os.access(parent, os.W_OK) and not installed:  # never into site-packages
            return parent / ".napari-medsam" / content_hash
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-medsam")) / "sessions" / content_hash


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable[[Any], None]) -> str:
    """Write ``path`` via ``write(file)`` to a temporary name, fsync, rename; return its sha256."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


@dataclass
class Snapshot:
    """One good snapshot read back: the loop's state, its arrays and its heads' files."""

    seq: int
    folder: Path
    created: str
    state: dict[str, Any]
    labels: np.ndarray
    proposals: np.ndarray
    pending: dict[int, np.ndarray]
    head_files: list[Path | None]
    extra: dict[str, Any] = field(default_factory=dict)

    def fits(self, loop: Any) -> bool:
        """Can this snapshot restore into ``loop`` (same labels shape, same slice axis)?"""
        return self.labels.shape == loop.labels.shape and int(self.state.get("axis", -1)) == loop.axis

    def describe(self) -> str:
        """One line for the user: how much was reviewed, how many rounds, when."""
        n = len(self.state.get("reviewed", {}).get(str(self.state.get("axis", 0)), []))
        return (f"An autosaved session ({n} reviewed slices, {len(self.state.get('rounds', []))} rounds, "
                f"saved {self.created[:19].replace('T', ' ')} UTC)")

    def heads(self, loaded: Any = None) -> list[Any]:
        """The rounds' heads (:func:`~napari_medsam.core.finetune.load_head`; None for a missing one)."""
        from ..core.finetune import load_head

        return [None if p is None else load_head(p, loaded=loaded) for p in self.head_files]

    def to_loop(self, *, loaded: Any = None, labels: np.ndarray | None = None) -> Any:
        """A :class:`~napari_medsam.app.loop.ReviewLoop` in this snapshot's state. ``labels``: an
        array to restore into (e.g. the labels layer's), else the snapshot's own."""
        from .loop import ReviewLoop

        lab = self.labels
        if labels is not None:
            if labels.shape != self.labels.shape:
                raise MedSamError(f"labels of shape {labels.shape} cannot take a session of shape {self.labels.shape}")
            labels[...] = self.labels
            lab = labels
        return ReviewLoop.from_state(self.state, lab, self.proposals.copy(), heads=self.heads(loaded),
                                     pending=self.pending)


class SessionStore:
    """The snapshots of one session folder: :meth:`save` a loop, :meth:`load` the newest good one."""

    def __init__(self, folder: str | os.PathLike, *, keep: int = KEEP) -> None:
        self.folder = Path(folder)
        self.keep = max(1, int(keep))
        self._heads: dict[tuple, tuple[str, str]] = {}  # (round index, timestamp) -> (relative path, sha256)
        self._good: dict[int, tuple] = {}  # snapshot number -> (files' size and mtime, they match the manifest)
        self._lock = threading.Lock()

    # -- reading ------------------------------------------------------------------------------------
    def manifests(self) -> list[int]:
        """Snapshot numbers with a manifest on disk, newest first (good or not)."""
        if not self.folder.is_dir():
            return []
        seqs = [int(m.group(1)) for p in self.folder.iterdir() if (m := _MANIFEST.match(p.name))]
        return sorted(seqs, reverse=True)

    def load(self) -> Snapshot | None:
        """The newest snapshot whose files all match its manifest (None: no good snapshot)."""
        for seq in self.manifests():
            try:
                return self._read(seq)
            except (OSError, ValueError, KeyError, TypeError, MedSamError) as e:
                _log.warning("session snapshot %d in %s is unusable (%s); trying an older one", seq, self.folder, e)
        return None

    def _read(self, seq: int) -> Snapshot:
        man = json.loads((self.folder / f"manifest-{seq:08d}.json").read_text())
        if man.get("format") != FORMAT or int(man.get("seq", -1)) != seq:
            raise MedSamError(f"manifest {seq} is not a {FORMAT} manifest")
        files: Mapping[str, str] = man["files"]
        for rel, digest in files.items():
            p = self.folder / rel
            if file_sha256(p) != digest:
                raise MedSamError(f"{rel} does not match its checksum")
        snap = self.folder / man["snapshot"]
        state = json.loads((snap / "state.json").read_text())
        labels = np.load(snap / "labels.npy", allow_pickle=False)
        proposals = np.load(snap / "proposals.npy", allow_pickle=False)
        with np.load(snap / "pending.npz", allow_pickle=False) as z:
            pending = {int(k): z[k] for k in z.files}
        heads = [None if h is None else self.folder / h for h in man.get("heads", [])]
        return Snapshot(seq=seq, folder=snap, created=man.get("created", ""), state=state, labels=labels,
                        proposals=proposals, pending=pending, head_files=heads, extra=dict(man.get("extra", {})))

    # -- writing ------------------------------------------------------------------------------------
    def save(self, loop: Any, *, extra: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None) -> int:
        """Write a snapshot of ``loop``; returns its number. Thread-safe (one save at a time).

        The arrays and the state are copied under the loop's lock (a consistent moment); the
        writing happens after, outside it. ``extra``: JSON-able values stored in the manifest
        (or a function returning them, called under the same lock).
        """
        with loop._lock:
            state = loop.state()
            labels = np.array(loop.labels)
            proposals = np.array(loop.proposals)
            pending = loop.pending()
            rounds = list(loop.rounds)
            extra = dict((extra() if callable(extra) else extra) or {})
        return self.write(state=state, labels=labels, proposals=proposals, pending=pending, rounds=rounds,
                          extra=extra)

    def write(self, *, state: Mapping[str, Any], labels: np.ndarray, proposals: np.ndarray,
              pending: Mapping[int, np.ndarray], rounds: list[Any], extra: Mapping[str, Any]) -> int:
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            existing = [int(p.name[5:]) for p in self.folder.glob("snap-*") if p.name[5:].isdigit()]
            seq = max([0, *existing, *self.manifests()]) + 1
            name = f"snap-{seq:08d}"
            snap = self.folder / name
            snap.mkdir()
            files: dict[str, str] = {}
            files[f"{name}/labels.npy"] = _write_atomic(snap / "labels.npy", lambda f: np.save(f, labels))
            files[f"{name}/proposals.npy"] = _write_atomic(snap / "proposals.npy", lambda f: np.save(f, proposals))
            files[f"{name}/pending.npz"] = _write_atomic(
                snap / "pending.npz", lambda f: np.savez(f, **{str(k): v for k, v in pending.items()}))
            text = json.dumps(state, sort_keys=True).encode()
            files[f"{name}/state.json"] = _write_atomic(snap / "state.json", lambda f: f.write(text))
            _fsync_dir(snap)
            heads: list[str | None] = []
            for rec in rounds:
                if rec.head is None:
                    heads.append(None)
                    continue
                rel, digest = self._head_file(rec)
                heads.append(rel)
                files[rel] = digest
            manifest = {"format": FORMAT, "seq": seq, "snapshot": name, "files": files, "heads": heads,
                        "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                        "extra": dict(extra)}
            body = json.dumps(manifest, indent=1, sort_keys=True).encode()
            _write_atomic(self.folder / f"manifest-{seq:08d}.json", lambda f: f.write(body))
            _fsync_dir(self.folder)
            self._prune()
            return seq

    def _head_file(self, rec: Any) -> tuple[str, str]:
        key = (rec.index, rec.timestamp, id(rec.head))
        known = self._heads.get(key)
        if known is not None and (self.folder / known[0]).is_file():
            return known
        from ..core.finetune import save_head

        hdir = self.folder / "heads"
        hdir.mkdir(exist_ok=True)
        tmp = hdir / f".round-{rec.index:04d}.tmp-{os.getpid()}-{threading.get_ident()}.head.pt"
        try:
            save_head(tmp, rec.head)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            digest = file_sha256(tmp)
            final = hdir / f"round-{rec.index:04d}-{digest[:16]}.head.pt"
            if final.is_file() and file_sha256(final) == digest:
                tmp.unlink()
            else:
                os.replace(tmp, final)
            _fsync_dir(hdir)
        finally:
            tmp.unlink(missing_ok=True)
        rel = f"heads/{final.name}"
        self._heads[key] = (rel, digest)
        return rel, digest

    def _is_good(self, seq: int) -> bool:
        """Do the snapshot's files match its manifest? (Re-hashed only when a file's size or mtime changed.)"""
        try:
            man = json.loads((self.folder / f"manifest-{seq:08d}.json").read_text())
            files = man["files"]
            stamp = tuple((rel, (st := (self.folder / rel).stat()).st_size, st.st_mtime_ns) for rel in sorted(files))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        known = self._good.get(seq)
        if known is not None and known[0] == stamp:
            return known[1]
        try:
            good = man.get("format") == FORMAT and all(file_sha256(self.folder / r) == d for r, d in files.items())
        except OSError:
            good = False
        self._good[seq] = (stamp, good)
        return good

    def _prune(self) -> None:
        """Keep the newest ``keep`` good snapshots and the heads they name; remove the rest (older
        good ones, and unusable ones: torn, corrupt, or a folder without a manifest)."""
        seqs = self.manifests()
        keep = [q for q in seqs if self._is_good(q)][:self.keep]
        if not keep:
            return
        wanted: set[str] = set()
        for seq in keep:
            man = json.loads((self.folder / f"manifest-{seq:08d}.json").read_text())
            wanted.update(h for h in man.get("heads", []) if h)
        for seq in seqs:
            if seq not in keep:
                (self.folder / f"manifest-{seq:08d}.json").unlink(missing_ok=True)
                self._good.pop(seq, None)
        for p in self.folder.glob("snap-*"):
            n = p.name[5:]
            if n.isdigit() and int(n) not in keep and int(n) < keep[0]:
                shutil.rmtree(p, ignore_errors=True)
        hdir = self.folder / "heads"
        if hdir.is_dir():
            for p in hdir.glob("round-*.head.pt"):
                if f"heads/{p.name}" not in wanted:
                    p.unlink(missing_ok=True)


class Autosaver:
    """Save a loop in the background ``delay`` s after its edits stop (``max_delay`` s at most)
    and right after each round. :meth:`close` stops it after a last save of what is unsaved.

    ``extra()``: JSON-able values to store with each snapshot (read under the loop's lock);
    ``on_error(exc)``: called in the saving thread when a save fails (default: logged).
    """

    def __init__(self, loop: Any, store: SessionStore, *, delay: float = 3.0, max_delay: float = 15.0,
                 extra: Callable[[], Mapping[str, Any]] | None = None,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.loop, self.store = loop, store
        self.delay, self.max_delay = float(delay), float(max(delay, max_delay))
        self.extra = extra
        self.on_error = on_error
        self.saves = 0
        self.last_seq: int | None = None
        self._cond = threading.Condition()
        self._first: float | None = None
        self._last = 0.0
        self._now = False
        self._stop = False
        loop.changed.connect(self.touch)
        loop.round_finished.connect(self._on_round)
        self._thread = threading.Thread(target=self._run, name="napari-medsam-autosave", daemon=True)
        self._thread.start()

    def rebind(self, loop: Any) -> None:
        """Save ``loop`` from now on (e.g. one restored from a snapshot) instead of the current one."""
        for sig, slot in ((self.loop.changed, self.touch), (self.loop.round_finished, self._on_round)):
            sig.disconnect(slot)
        self.loop = loop
        loop.changed.connect(self.touch)
        loop.round_finished.connect(self._on_round)
        self.touch()

    def touch(self) -> None:
        """Something changed: save after the quiet delay."""
        with self._cond:
            t = time.monotonic()
            if self._first is None:
                self._first = t
            self._last = t
            self._cond.notify()

    def _on_round(self, _record: Any = None) -> None:
        with self._cond:
            if self._first is None:
                self._first = time.monotonic()
            self._now = True
            self._cond.notify()

    @property
    def dirty(self) -> bool:
        with self._cond:
            return self._first is not None

    def _due(self) -> float | None:
        """Seconds until the next save is due (0: now), None when nothing is unsaved."""
        if self._first is None:
            return None
        if self._now:
            return 0.0
        t = time.monotonic()
        return max(0.0, min(self._last + self.delay, self._first + self.max_delay) - t)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    wait = self._due()
                    if wait == 0.0:
                        break
                    self._cond.wait(timeout=wait)
                if self._stop:
                    return
                self._first, self._now = None, False
            self._save()

    def _save(self) -> None:
        try:
            self.last_seq = self.store.save(self.loop, extra=self.extra)
            self.saves += 1
        except Exception as e:  # noqa: BLE001 - a failed autosave must not end the thread
            if self.on_error is not None:
                self.on_error(e)
            else:
                _log.warning("autosave to %s failed: %s", self.store.folder, e)

    def flush(self) -> None:
        """Save now (in the calling thread) if anything is unsaved."""
        with self._cond:
            pending = self._first is not None
            self._first, self._now = None, False
        if pending:
            self._save()

    def close(self) -> None:
        """Stop the background thread, then save what is unsaved."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)
        try:
            self.loop.changed.disconnect(self.touch)
            self.loop.round_finished.disconnect(self._on_round)
        except (TypeError, ValueError, RuntimeError):
            pass
        self.flush()
