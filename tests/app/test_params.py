"""One source per fact: slice lists, intensity presets, head kinds, model availability, options."""

from __future__ import annotations

import argparse

import pytest

from napari_medsam.app.params import (
    DEFAULT_HEAD,
    IntensityChoice,
    add_dataclass_arguments,
    availability,
    dataclass_kwargs,
    head_kinds,
    intensity_presets,
    parse_slices,
)


def test_parse_slices():
    assert parse_slices(None) is None and parse_slices("  ") is None
    assert parse_slices("3, 10-12") == [3, 10, 11, 12]
    assert parse_slices("12;3,3 , 4-4,") == [3, 4, 12]
    for bad in ("5-3", "a", "1-", "-2", "1.5"):
        with pytest.raises(ValueError):
            parse_slices(bad)


def test_the_cli_parses_slices_as_the_widgets_do():
    from napari_medsam.cli._common import parse_int_list
    from napari_medsam.core.errors import MedSamError

    assert parse_int_list("40, 52, 60-62") == parse_slices("40, 52, 60-62") == [40, 52, 60, 61, 62]
    with pytest.raises(MedSamError, match="runs backwards"):
        parse_int_list("9-2")


def test_intensity_presets_come_from_the_core():
    from napari_medsam.core.preprocess import CT_WINDOWS

    presets = intensity_presets()
    assert next(iter(presets)) == "auto"
    assert sorted(c.window for c in presets.values() if c.mode == "ct") == sorted(CT_WINDOWS)
    assert presets["CT soft tissue W400 L40"] == IntensityChoice("ct", "soft_tissue")
    assert {c.mode for c in presets.values()} == {"auto", "ct", "mr", "minmax"}


def test_head_kinds_are_the_registry_default_first(monkeypatch):
    from napari_medsam.core import heads

    kinds = head_kinds()
    assert next(iter(kinds)) == DEFAULT_HEAD and set(kinds) == set(heads.HEADS)
    assert kinds["linear"] == heads.HEAD_DESCRIPTIONS["linear"]
    monkeypatch.setitem(heads.HEADS, "newkind", lambda **kw: None)  # a family added to the registry
    assert "newkind" in head_kinds()


def test_availability():
    ok, why = availability("test_tiny_lite")
    assert ok and "random" in why
    ok, why = availability("litemedsam")
    assert ok and "bundled" in why


def test_options_from_a_parameter_dataclass_keep_its_defaults():
    from napari_medsam.core.finetune import TrainParams

    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, TrainParams, {"epochs": "most epochs", "lr": "learning rate", "augment": "augment",
                                             "batch_size": "slices per step"})
    assert TrainParams(**dataclass_kwargs(TrainParams, p.parse_args([]))) == TrainParams()
    args = p.parse_args(["--epochs", "7", "--no-augment", "--batch-size", "2"])
    assert TrainParams(**dataclass_kwargs(TrainParams, args)) == TrainParams(epochs=7, augment=False, batch_size=2)
    assert "(default: automatic)" in p.format_help() and "(default: 4)" in p.format_help()
    with pytest.raises(TypeError):
        add_dataclass_arguments(argparse.ArgumentParser(), TrainParams, {"head_config": "x"})
