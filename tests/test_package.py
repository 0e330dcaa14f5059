"""Promises of the package as a whole: light import, import boundaries, manifest exposure."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_medsam"
HEAVY = ("torch", "PyQt6", "PyQt5", "PySide6", "PySide2", "napari", "qtpy", "magicgui")


def test_import_loads_neither_torch_nor_qt():
    code = f"import sys, napari_medsam; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            names.add(("." * node.level) + mod)
    return names


@pytest.mark.parametrize("path", sorted((SRC / "core").rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_core_is_gui_free(path):
    bad = {n for n in _imports(path) if n.split(".")[0] in ("napari", "qtpy", "magicgui", "PyQt6", "PySide6")
           or "_qt" in n.split(".")}
    assert not bad, f"{path} imports {bad}"


def test_cli_and_io_do_not_import_qt():
    for folder in ("cli", "io"):
        for path in (SRC / folder).rglob("*.py"):
            if path.name == "gui.py":
                continue
            bad = {n for n in _imports(path) if n.split(".")[0] in ("qtpy", "magicgui", "PyQt6") or "_qt" in n}
            assert not bad, f"{path} imports {bad}"


def test_manifest_is_exposed_by_the_installed_package():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="napari.manifest") if ep.name == "napari-medsam"]
    assert eps and eps[0].value == "napari_medsam:napari.yaml"
    assert (SRC / "napari.yaml").resolve() == (SRC.parents[1] / "napari.yaml").resolve()
