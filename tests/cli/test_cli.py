import nibabel as nib
import numpy as np
import pytest

from napari_medsam.cli import main
from tests.conftest import MNI_T1, dice


def test_models_table_shows_litemedsam_offline(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("litemedsam"))
    assert "bundled, offline" in line and "256" in line
    assert "sam_vit_h" in out and "test_tiny_lite" not in out
    assert main(["models", "--all"]) == 0
    assert "test_tiny_lite" in capsys.readouterr().out


def test_embed_twice_is_a_cache_hit(tmp_path, capsys):
    img = tmp_path / "vol.npy"
    np.save(img, np.random.default_rng(0).integers(-1000, 1000, (5, 40, 37)).astype(np.int16))
    args = ["embed", str(img), "--model", "test_tiny_lite", "--cache-dir", str(tmp_path / "c"), "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "computed 5, cache hits 0" in first and "embedding time" in first
    assert main(args) == 0
    assert "computed 0, cache hits 5" in capsys.readouterr().out
    assert main([*args, "--axis", "2"]) == 0  # another axis is another set of embeddings
    assert "computed 37, cache hits 0" in capsys.readouterr().out


def test_segment_box_writes_labels_with_geometry(tmp_path, capsys):
    affine = np.array([[0.8, 0, 0, -30], [0, 0.8, 0, 12], [0, 0, 2.5, 7], [0, 0, 0, 1]])
    data = np.random.default_rng(1).integers(0, 800, (30, 26, 6)).astype(np.int16)
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), src)
    out = tmp_path / "labels.nii.gz"
    rc = main(["segment", str(src), "--model", "test_tiny_lite", "--axis", "2", "--box", "3,2,2,20,20",
               "--box", "3,10,5,28,25", "--point", "1,5,5,1", "-o", str(out), "--device", "cpu",
               "--cache-dir", str(tmp_path / "c")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "object 1" in printed and "object 3" in printed
    lab = nib.load(out)
    assert lab.shape == data.shape
    np.testing.assert_allclose(lab.affine, affine, atol=1e-6)
    arr = np.asarray(lab.dataobj)
    assert set(np.unique(arr)) <= {0, 1, 2, 3}
    assert not arr[..., [0, 2, 4, 5]].any()  # only the prompted slices
    # what the command says it wrote is in the file: the point object on slice 1, the boxes on slice 3
    import re

    found = {int(m[0]): (int(m[1]), int(m[2])) for m in re.findall(r"object (\d+): slice (\d+), (\d+) pixels", printed)}
    assert set(found) == {1, 2, 3} and found[3][0] == 1 and found[1][0] == found[2][0] == 3
    assert found[3][1] > 0 and int((arr[..., 1] == 3).sum()) == found[3][1]
    assert set(np.unique(arr[..., 1])) == {0, 3}
    assert set(np.unique(arr[..., 3])) - {0} and set(np.unique(arr[..., 3])) <= {0, 1, 2}


@pytest.mark.parametrize("argv,needle", [
    (["segment", "IMG", "--model", "nope", "--box", "0,1,1,5,5", "-o", "OUT"], "unknown model 'nope'"),
    (["segment", "IMG", "--model", "test_tiny_lite", "-o", "OUT"], "at least one --box"),
    (["embed", "MISSING"], "not found"),
])
def test_errors_are_one_line_and_actionable(tmp_path, capsys, argv, needle):
    img = tmp_path / "v.npy"
    np.save(img, np.zeros((3, 8, 8), np.float32))
    argv = [a.replace("IMG", str(img)).replace("OUT", str(tmp_path / "o.npy")).replace("MISSING", str(tmp_path / "x.nii"))
            for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_bad_box_format_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["segment", "x.npy", "--box", "1,2,3", "-o", "y.npy"])
    assert e.value.code == 2
    assert "Z,R0,C0,R1,C1" in capsys.readouterr().err


@pytest.mark.slow
def test_real_segment_on_mni_slice(tmp_path, mni):
    gt = mni["brain"][:, 93, :]
    rows, cols = np.flatnonzero(gt.any(1)), np.flatnonzero(gt.any(0))
    out = tmp_path / "brain.nii.gz"
    box = f"93,{rows[0]},{cols[0]},{rows[-1] + 1},{cols[-1] + 1}"
    assert main(["segment", str(MNI_T1), "--axis", "1", "--box", box, "-o", str(out), "--device", "cpu"]) == 0
    pred = np.asarray(nib.load(out).dataobj)[:, 93, :] > 0
    assert dice(pred, gt) > 0.7  # measured 0.82


def test_train_options_are_the_training_dataclass():
    """`train`'s options, defaults and help come from TrainParams, the dataclass the Fine-tune dock reads too."""
    from napari_medsam.app.params import dataclass_kwargs
    from napari_medsam.cli import build_parser
    from napari_medsam.core.finetune import TrainParams

    parser = build_parser()
    args = parser.parse_args(["train", "img.nii.gz", "lab.nii.gz", "--head", "cnn", "-o", "x.head"])
    # every other default is the dataclass's; the model's --precision is the head's too (TrainParams.precision)
    assert dataclass_kwargs(TrainParams, args) == {"head": "cnn", "precision": "auto"}
    args = parser.parse_args(["train", "i", "l", "-o", "x", "--max-steps", "40", "--no-augment", "--seed", "3",
                              "--precision", "fp32"])
    assert dataclass_kwargs(TrainParams, args) == {"max_steps": 40, "augment": False, "seed": 3, "precision": "fp32"}
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["train"]
    helps = {o: a.help for a in sub._actions for o in a.option_strings}
    d = TrainParams()
    for option, value in (("--batch-size", d.batch_size), ("--max-steps", d.max_steps), ("--patience", d.patience)):
        assert helps[option].endswith(f"(default: {value})"), option
