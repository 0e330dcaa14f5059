"""Write DICOM test series with pydicom from a NIfTI-style array and affine (tests and benchmarks).

Independent of the reader under test: each frame ``k`` holds ``data[:, :, k].T`` (DICOM rows run
along the array's second axis ``j``, columns along ``i``), and its tags come straight from the
DICOM definitions: ``ImagePositionPatient`` is the LPS position of voxel ``(0, 0, k)``,
``ImageOrientationPatient`` the LPS directions of ``i`` (along a row) and ``j`` (down a column),
``PixelSpacing`` ``(|j step|, |i step|)``. So NIfTI voxel ``(i, j, k)`` is DICOM array index
``(k, j, i)`` of a correct reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LPS = np.diag([-1.0, -1.0, 1.0])


def write_series(folder: Path, data: np.ndarray, affine: np.ndarray, *, slope: float = 1.0,
                 intercept: float = 0.0, series_uid: str | None = None, description: str = "MNI",
                 modality: str = "MR", shuffle_seed: int | None = 0, prefix: str = "", axis: int = 2) -> list[Path]:
    """Write one single-frame file per slice along ``axis`` (default ``k``); stored values are
    ``(data - intercept) / slope``. With ``axis=2`` a frame is ``data[:, :, k].T`` as described
    above; in general its columns run along the first other axis, its rows along the second.

    Files get shuffled names (``shuffle_seed``) so no reader can rely on the file order.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    stored = np.round((np.asarray(data, np.float64) - intercept) / slope).astype(np.int16)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    a = np.asarray(affine, float)
    c_axis, r_axis = (x for x in range(3) if x != axis)
    di, dj, dk = a[:3, c_axis], a[:3, r_axis], a[:3, axis]
    row_dir = LPS @ di / np.linalg.norm(di)
    col_dir = LPS @ dj / np.linalg.norm(dj)
    stored = np.moveaxis(stored, axis, 2)
    n = stored.shape[2]
    names = np.arange(n)
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(names)
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{prefix}IM{int(names[k]):04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.SeriesDescription = modality, description
        ds.PatientID, ds.PatientName = "MNI152", "MNI^Template"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex = "", "", "O"
        ds.SeriesNumber = 1
        ds.InstanceNumber = int(n - k)  # deliberately opposite to the spatial order
        ds.ImagePositionPatient = [float(v) for v in LPS @ (a[:3, 3] + k * dk)]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(np.linalg.norm(dj)), float(np.linalg.norm(di))]
        ds.SliceThickness = float(np.linalg.norm(dk))
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
        frame = np.ascontiguousarray(stored[:, :, k].T)
        ds.Rows, ds.Columns = frame.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = frame.tobytes()
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def mni_crop(t1: np.ndarray, affine: np.ndarray, *, step: int = 4, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small MNI volume: every ``step``-th voxel of the brain box (offset shifts it); its affine."""
    box = (slice(14 + offset, 180, step), slice(18 + offset, 214, step), slice(10 + offset, 170, step))
    data = np.asarray(t1[box], np.float32)
    scale = np.diag([step, step, step, 1.0])
    shift = np.eye(4)
    shift[:3, 3] = [b.start for b in box]
    return data, np.asarray(affine, float) @ shift @ scale
