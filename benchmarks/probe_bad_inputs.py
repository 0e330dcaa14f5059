"""Rerun issue 17's table of bad inputs through the CLI and print one row per case.

    python benchmarks/probe_bad_inputs.py [--model litemedsam]

Each row runs ``napari-medsam`` in a subprocess and prints the exit status and the one stderr line
(an error) or the result. The rows are the contract test's (tests/cli/test_bad_inputs.py) plus the
issue's measured rows (binary image under auto intensity, a box partly outside the slice), which
run with ``--model`` (default litemedsam, bundled) on the MNI152 template.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cli.test_bad_inputs import SUBPROCESS_ROWS, make_bad_files  # noqa: E402
from tests.conftest import MNI_GM, MNI_T1, MNI_WM  # noqa: E402


def cli(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    code = "import sys; from napari_medsam.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return p.returncode, p.stdout, p.stderr


def verdict(rc: int, out: str, err: str) -> str:
    if "Traceback" in err:
        return "TRACEBACK"
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    if rc == 0:
        return "ok: " + (out.strip().splitlines() or [""])[-1][:110]
    return ("one line: " + errors[0][:150]) if len(errors) == 1 else f"{len(errors)} error lines"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="litemedsam")
    args = ap.parse_args()
    import nibabel as nib

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        t0 = time.perf_counter()
        bad = make_bad_files(root)
        print("| row | rc | result |\n|---|---|---|")
        for row, argv, _needle in SUBPROCESS_ROWS:
            rc, out, err = cli([str(a).format(**bad) for a in argv], root)
            print(f"| {row} | {rc} | {verdict(rc, out, err)} |")
        before = {p: Path(p).read_bytes() for p in (bad["vol"], bad["readonly"], bad["zarr_file"], bad["head"])}

        model = ["--model", args.model, "--device", "cpu", "--cache-dir", root / "cache"]
        # the measured rows, on the MNI152 T1 (coronal slice 93) and its brain mask
        t1 = nib.load(MNI_T1)
        brain = (np.asanyarray(nib.load(MNI_GM).dataobj) + np.asanyarray(nib.load(MNI_WM).dataobj)) > 0.5
        z = 93
        gt = brain[:, z, :]
        rows_, cols_ = np.flatnonzero(gt.any(1)), np.flatnonzero(gt.any(0))
        box = f"{z},{rows_[0]},{cols_[0]},{rows_[-1] + 1},{cols_[-1] + 1}"
        binary = root / "brain_0_100.nii.gz"
        nib.save(nib.Nifti1Image((brain * 100).astype(np.int16), t1.affine), binary)
        for mode in ("auto", "minmax"):
            out = root / f"bin_{mode}.nii.gz"
            rc, o, err = cli(["segment", binary, "--axis", "1", "--box", box, "--intensity", mode, "-o", out,
                              *model], root)
            m = np.asarray(nib.load(out).dataobj)[:, z, :] > 0 if rc == 0 else np.zeros_like(gt)
            print(f"| 0/100 int16 brain mask, --intensity {mode} | {rc} | {int(m.sum())} px, IoU {iou(m, gt):.2f} "
                  f"with the mask ({int(gt.sum())} px) |")
        masks = {}
        r1, c1 = rows_[-1] + 1, cols_[-1] + 1
        for name, b in (("partly outside", f"{z},{rows_[0] - 40},{cols_[0] - 40},{r1},{c1}"),
                        ("clipped", f"{z},{max(rows_[0] - 40, 0)},{max(cols_[0] - 40, 0)},{r1},{c1}")):
            out = root / f"box_{name.replace(' ', '_')}.nii.gz"
            rc, o, err = cli(["segment", MNI_T1, "--axis", "1", "--box", b, "-o", out, *model], root)
            masks[name] = np.asarray(nib.load(out).dataobj)[:, z, :] > 0 if rc == 0 else None
            px = "-" if masks[name] is None else int(masks[name].sum())
            print(f"| box {name} ({b}) | {rc} | {px} px |")
        for name in ("long", "constant", "nan", "holes", "corrupt"):
            argv = ["segment", bad[name], "--box", "0,0,0,1,100" if name == "long" else "2,4,4,20,20",
                    "-o", root / f"{name}_out.nii.gz", *model]
            rc, out, err = cli(argv, root)
            warn = [ln for ln in err.splitlines() if ln.startswith("WARNING")]
            print(f"| {name} ({Path(bad[name]).name}) | {rc} | {verdict(rc, out, err)}"
                  f"{' / ' + warn[0][:120] if warn else ''} |")
        kept = all(Path(p).read_bytes() == c for p, c in before.items())
        print(f"\ninputs and user files unchanged: {kept}; {time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
