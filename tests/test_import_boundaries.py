"""The import boundaries of docs/architecture.md hold (import-linter contracts in pyproject.toml),
and the check does fail when a forbidden import is added (on a copy of the package, never the tree)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import napari_medsam

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(napari_medsam.__file__).resolve().parent
LINT = Path(sys.executable).with_name("lint-imports")



def _lint(config: Path, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([str(LINT), "--config", str(config), "--no-cache"], capture_output=True, text=True,
                          cwd=str(cwd), env=env, timeout=600)


def _copy_package(tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(PACKAGE, dst / "napari_medsam", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return dst


def test_the_package_keeps_its_import_contracts(tmp_path):
    out = _lint(ROOT / "pyproject.toml", tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "3 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("core/_forbidden.py", "from napari_medsam.io import read_image\n", "core is GUI-free"),
    ("core/_forbidden.py", "import qtpy\n", "core is GUI-free"),
    ("app/_forbidden.py", "import napari\n", "app (the annotation session) imports no Qt"),
    ("io/_forbidden.py", "from napari_medsam.app import AnnotationSession\n", "layers go one way"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, contract):
    src = _copy_package(tmp_path)
    (src / "napari_medsam" / module).write_text(f'"""A deliberate boundary violation."""\n\n{line}')
    out = _lint(tmp_path / "pyproject.toml", tmp_path, pythonpath=src)
    assert out.returncode != 0, out.stdout[-3000:]
    broken = [ln for ln in out.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(ln.startswith(contract) for ln in broken), out.stdout[-3000:]
    assert f"napari_medsam.{module[:-3].replace('/', '.')}" in out.stdout  # the copy was checked, not the tree
