"""The whole GUI workflow on the annotation session alone, no Qt: the bundled LiteMedSAM on the real
MNI152 template, a box on one coronal slice, commit, propagate, train a head on the labelled slices,
predict the volume, write NIfTI. It runs in a subprocess so that "no Qt was imported" is checked in
a process where no GUI test ran before.

The crop, slice and box are the ones ``tests/_qt/test_widgets.py::test_litemedsam_segments_the_mni_brain``
drives through the widgets; that test checks that the session alone writes the same labels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
#: coronal slices 83..103 of the template (the second data axis of the RAS volume), box on slice 10
CROP_LO, CROP_N, SLICE, AXIS = 83, 21, 10, 1


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def mni_crop() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float], np.ndarray]:
    """The cropped T1 volume, its brain mask (grey + white matter > 0.5), the box around the
    brain on :data:`SLICE` grown by 3 pixels, ``(r0, c0, r1, c1)`` in (row, col) of that slice, and
    the crop's voxel-to-world affine."""
    import nibabel as nib

    from tests.conftest import MNI_GM, MNI_T1, MNI_WM

    img = nib.load(MNI_T1)
    t1 = np.asanyarray(img.dataobj)
    shift = np.eye(4)
    shift[1, 3] = CROP_LO
    affine = img.affine @ shift
    gm = np.asanyarray(nib.load(MNI_GM).dataobj, dtype=np.float32)
    wm = np.asanyarray(nib.load(MNI_WM).dataobj, dtype=np.float32)
    sl = slice(CROP_LO, CROP_LO + CROP_N)
    vol = np.ascontiguousarray(t1[:, sl, :])
    brain = ((gm + wm) > 0.5)[:, sl, :]
    rows, cols = np.nonzero(brain[:, SLICE, :])
    box = (float(rows.min() - 3), float(cols.min() - 3), float(rows.max() + 3), float(cols.max() + 3))
    return vol, brain, box, affine


def run_workflow(out_dir: str | os.PathLike, loaded: object = None) -> dict:
    """Drive the session as the widgets do; return the figures (and where the NIfTI files went)."""
    from napari_medsam.app import AnnotationSession, ModelChoice
    from napari_medsam.core.finetune import TrainParams
    from napari_medsam.core.segment import Prompt2D
    from napari_medsam.core.volume import ImageVolume

    out = Path(out_dir)
    data, brain, box, affine = mni_crop()
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    vol = ImageVolume(data=data, spacing=spacing, origin=tuple(float(v) for v in affine[:3, 3]), affine=affine,
                      source="MNI152 coronal crop", format="nifti")
    session = AnnotationSession(disk_cache=False)
    if loaded is None:
        session.load_model(ModelChoice("litemedsam", device="cpu", precision="fp32"))
    else:
        session.set_model(loaded)
    session.open_image(vol, axis=AXIS)
    session.class_names = {1: "brain"}
    changed: list[tuple[int, tuple]] = []
    session.labels_changed.connect(lambda axis, slices: changed.append((axis, slices)))
    session.proposals_changed.connect(lambda axis, slices: changed.append((axis, slices)))

    res = session.preview(SLICE, Prompt2D.from_box(box))
    session.commit(SLICE, res, 1)
    session.propagate(1, index=SLICE)
    labels = session.labels.data.copy()
    labelled = [i for i in range(CROP_N) if labels[:, i, :].any()]
    figures = {
        "seed_dice": _dice(res.mask, brain[:, SLICE, :]),
        "propagated_dice": _dice(labels == 1, brain),
        "labelled": labelled,
        "events": [[a, list(s)] for a, s in changed],
    }
    labels_path = session.save_labels(out / "labels.nii.gz", name="brain")

    # a head on every other labelled slice, predicted on the whole crop; scored on the slices it did not see
    train = labelled[::2]
    head = session.train_head(TrainParams(head="cnn"), slices=train)
    pred = session.predict()
    unseen = [i for i in range(CROP_N) if i not in train]
    pred_path = session.save_labels(out / "prediction.nii.gz", pred.labels, name="cnn head")
    figures.update({
        "train_slices": list(head.meta.training_slices),
        "head_dice_unseen": _dice(pred.labels[:, unseen, :] == 1, brain[:, unseen, :]),
        "head_dice": _dice(pred.labels == 1, brain),
        "labels_path": str(labels_path),
        "prediction_path": str(pred_path),
        "qt_imported": sorted(m for m in ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari")
                              if m in sys.modules),
    })
    session.restore_labels(labels_path)
    figures["restored_equal"] = bool(np.array_equal(session.labels.data, labels))
    return figures


@pytest.mark.slow
def test_the_whole_workflow_runs_on_the_session_without_qt(tmp_path):
    code = ("import json, sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from tests.app.test_session_workflow import run_workflow\n"
            "print('FIGURES', json.dumps(run_workflow(sys.argv[1])))\n")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          timeout=1800, env=env, cwd=str(tmp_path))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FIGURES ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    fig = json.loads(lines[-1][len("FIGURES "):])
    print(fig)  # -s shows the figures quoted in the closing note

    assert fig["qt_imported"] == []
    # the same thresholds as the widget-driven run (tests/_qt/test_widgets.py)
    assert fig["seed_dice"] > 0.55, fig
    assert len(fig["labelled"]) >= 15 and SLICE in fig["labelled"], fig
    assert fig["propagated_dice"] > 0.6, fig
    # commit (labels_changed), then propagation (proposals_changed): two events along the coronal axis
    assert fig["events"][0] == [AXIS, [SLICE]] and fig["events"][1][0] == AXIS and len(fig["events"]) == 2
    # a head trained on half the labelled slices segments the slices it never saw
    assert fig["train_slices"] == fig["labelled"][::2]
    assert fig["head_dice_unseen"] > 0.6, fig

    import nibabel as nib

    from tests.conftest import MNI_T1

    ref = nib.load(MNI_T1)
    written = nib.load(fig["prediction_path"])
    assert written.shape == (ref.shape[0], CROP_N, ref.shape[2])
    # the crop's geometry: voxel (0, 0, 0) of the crop is voxel (0, CROP_LO, 0) of the template
    np.testing.assert_allclose(written.affine[:3, :3], ref.affine[:3, :3], atol=1e-5)
    np.testing.assert_allclose(written.affine @ [0, 0, 0, 1], ref.affine @ [0, CROP_LO, 0, 1], atol=1e-4)
    assert fig["restored_equal"]
