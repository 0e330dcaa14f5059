"""`napari-medsam suggest`: the next slices to review, from a head file, on a real (subsampled) MNI volume."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam.cli import main
from napari_medsam.core.build import load_model
from napari_medsam.core.finetune import load_head
from napari_medsam.core.infer import encoder_for_head, predict_slices
from napari_medsam.core.progress import drain
from napari_medsam.core.uncertainty import coverage_ranking, foreground_extent, slice_scores
from napari_medsam.io import read_image, write_image, write_labels


@pytest.fixture(scope="module")
def files(tmp_path_factory, mni):
    root = tmp_path_factory.mktemp("suggest_cli")
    t1 = np.asarray(mni["t1"], np.float32)[::5, ::5, ::5]  # 40 x 47 x 38
    gm, wm = mni["gm"][::5, ::5, ::5], mni["wm"][::5, ::5, ::5]
    lab = np.where(gm + wm > 0.5, np.where(wm > gm, 2, 1), 0).astype(np.uint8)
    img = write_image(root / "mni.nii.gz", t1)
    labels = write_labels(root / "labels.nii.gz", lab)
    head = root / "h.head.pt"
    cache = root / "cache"
    rc = main(["train", str(img), str(labels), "--head", "linear", "--model", "test_tiny_lite", "--slices", "15,30",
               "--axis", "1", "--epochs", "5", "--cache-dir", str(cache), "-o", str(head)])
    assert rc == 0
    return {"img": img, "labels": labels, "head": head, "cache": cache, "truth": lab}


def test_suggest_prints_the_most_uncertain_unreviewed_slices(files, capsys):
    capsys.readouterr()
    rc = main(["suggest", str(files["img"]), "--head", str(files["head"]), "-n", "4", "--reviewed", "15,30",
               "--strategy", "entropy", "--cache-dir", str(files["cache"])])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 4
    picks = [(int(a), float(b)) for a, b in (line.split() for line in out)]
    slices = [s for s, _ in picks]
    assert not {15, 30} & set(slices)
    assert all(abs(a - b) >= 2 for i, a in enumerate(slices) for b in slices[i + 1:])
    assert [v for _, v in picks] == sorted((v for _, v in picks), reverse=True)
    # the first pick is the most uncertain unreviewed slice of the head's prediction
    loaded = load_model("test_tiny_lite", device="cpu")
    head = load_head(files["head"], loaded=loaded)
    enc = encoder_for_head(loaded, read_image(files["img"]), head)
    res = drain(predict_slices(enc, head, return_probs=True))
    scores = {s: slice_scores(res.probs[:, :, s])["entropy"] for s in range(47) if s not in (15, 30)}
    best = max(scores, key=scores.get)
    assert slices[0] == best and picks[0][1] == pytest.approx(scores[best], rel=1e-3)
    # the default, coverage: the same slices' entropy, in the order that splits the predicted foreground
    rc = main(["suggest", str(files["img"]), "--head", str(files["head"]), "-n", "4", "--reviewed", "15,30",
               "--cache-dir", str(files["cache"])])
    cover = [(int(a), float(b)) for a, b in (line.split() for line in capsys.readouterr().out.strip().splitlines())]
    fg = [s for s in range(47) if s not in (15, 30) and res.labels[:, s].any()]
    expect = coverage_ranking(scores, 4, extent=foreground_extent({s: np.count_nonzero(res.labels[:, s])
                                                                    for s in scores}), exclude=(15, 30))
    assert rc == 0 and [s for s, _ in cover] == [s for s, _ in expect]
    assert all(fg[0] <= s <= fg[-1] and abs(s - r) >= 2 for s, _ in cover for r in (15, 30))
    assert all(v == pytest.approx(scores[s], rel=1e-3) for s, v in cover)


def test_suggest_refuses_another_axis_and_a_score_it_cannot_compute(files, capsys):
    rc = main(["suggest", str(files["img"]), "--head", str(files["head"]), "--axis", "2"])
    assert rc == 1 and "axis 1" in capsys.readouterr().err
    rc = main(["suggest", str(files["img"]), "--head", str(files["head"]), "--score", "disagreement"])
    assert rc == 1 and "two rounds" in capsys.readouterr().err
    rc = main(["suggest", str(files["img"]), "--head", str(files["head"]), "--reviewed", "3,99"])
    assert rc == 1 and "outside" in capsys.readouterr().err


def test_train_init_continues_a_head_and_adds_a_class(files, tmp_path, capsys):
    lab = files["truth"].copy()
    lab[:, 20, :][lab[:, 20, :] == 2] = 3  # a third class on a new slice
    labels = write_labels(tmp_path / "more.nii.gz", lab)
    out = tmp_path / "more.head.pt"
    rc = main(["train", str(files["img"]), str(labels), "--init", str(files["head"]), "--model", "test_tiny_lite",
               "--slices", "20", "--epochs", "2", "--cache-dir", str(files["cache"]), "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "continued a linear head" in capsys.readouterr().out
    meta = load_head(out).meta
    assert meta.kind == "linear" and meta.axis == 1 and meta.class_ids == (1, 2, 3)
    assert meta.training_slices == (15, 20, 30) and "continued_from" in meta.history
    rc = main(["train", str(files["img"]), str(labels), "--model", "test_tiny_lite", "-o", str(tmp_path / "x.pt")])
    assert rc == 1 and "--init" in capsys.readouterr().err
