"""A small MNI-derived cohort (NIfTI files and DICOM series folders, optionally one corrupt file)
and a linear head trained on the tiny test model: shared by the cohort tests and the benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.io.dicom_data import mni_crop, write_series


def make_cohort(root: Path, t1: np.ndarray, affine: np.ndarray, *, n_nifti: int, n_dicom: int, step: int = 8,
                corrupt: bool = True) -> dict[str, dict]:
    """Write the volumes under ``root``; returns ``{input path: {"data", "affine", "kind"}}``.

    Each volume is the MNI brain box sampled every ``step`` voxels from its own offset, so no two
    volumes are the same; DICOM series are written with a rescale slope and intercept.
    """
    import nibabel as nib

    root.mkdir(parents=True, exist_ok=True)
    volumes: dict[str, dict] = {}
    for n in range(n_nifti + n_dicom):
        data, aff = mni_crop(t1, affine, step=step, offset=n % step)
        data = data[:, :, n // step:]  # volumes with the same offset differ in depth
        if n < n_nifti:
            path = root / f"nifti_{n:02d}.nii.gz"
            nib.save(nib.Nifti1Image(data, aff), path)
            volumes[str(path)] = {"data": data, "affine": aff, "kind": "nifti"}
        else:
            folder = root / f"dicom_{n:02d}"
            aff = aff.copy()
            aff[:3, 3] += aff[:3, 2] * (n // step)
            # frames along the NIfTI's first axis: the slices a head trained on axis 0 knows
            write_series(folder, data, aff, slope=2.0, intercept=-8.0, shuffle_seed=n, axis=0)
            volumes[str(folder)] = {"data": data, "affine": aff, "kind": "dicom"}
    if corrupt:
        good = next(p for p, v in volumes.items() if v["kind"] == "nifti")
        bad = root / "corrupt.nii.gz"
        bad.write_bytes(Path(good).read_bytes()[:400])  # a truncated download
        volumes[str(bad)] = {"data": None, "affine": None, "kind": "corrupt"}
    return volumes


def train_head(root: Path, t1: np.ndarray, brain: np.ndarray, affine: np.ndarray, *, step: int = 8,
               model: str = "test_tiny_lite") -> Path:
    """A linear head on ``model`` trained for 2 epochs on one cropped MNI volume (seconds)."""
    import nibabel as nib

    from napari_medsam.cli import main

    root.mkdir(parents=True, exist_ok=True)
    data, aff = mni_crop(t1, affine, step=step)
    labels, _ = mni_crop(brain.astype(np.uint8), affine, step=step)
    nib.save(nib.Nifti1Image(data, aff), root / "train.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), aff), root / "train_labels.nii.gz")
    head = root / "brain.head.pt"
    rc = main(["train", str(root / "train.nii.gz"), str(root / "train_labels.nii.gz"), "--head", "linear",
               "--model", model, "--epochs", "2", "--class-names", "brain", "--no-disk-cache", "-o", str(head)])
    assert rc == 0
    return head
