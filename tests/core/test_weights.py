import dataclasses
import functools
import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch

from napari_medsam.core.build import build_sam, load_model
from napari_medsam.core.errors import (
    CheckpointError,
    ChecksumError,
    UnknownModelError,
    WeightsUnavailableError,
)
from napari_medsam.core.registry import LITEMEDSAM_SHA256, WeightsSource, get_spec
from napari_medsam.core.weights import (
    bundled_path,
    load_checkpoint,
    load_state_dict_strict,
    resolve_weights,
    weights_dir,
)


@pytest.fixture()
def served(tmp_path):
    """A tiny real checkpoint served by a local HTTP server."""
    torch.manual_seed(3)
    model = build_sam(get_spec("test_tiny_lite"))
    root = tmp_path / "srv"
    root.mkdir()
    ckpt = root / "tiny.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_address[1]}/tiny.pth",
               "sha": hashlib.sha256(ckpt.read_bytes()).hexdigest(), "model": model, "size": ckpt.stat().st_size}
    finally:
        server.shutdown()


def _spec(url, sha):
    base = get_spec("test_tiny_lite")
    return dataclasses.replace(base, name="tiny_dl", weights=WeightsSource(filename="tiny.pth", url=url, sha256=sha))


def test_download_verify_and_load(served, tmp_path):
    calls = []
    spec = _spec(served["url"], served["sha"])
    loaded = load_model(spec, device="cpu", cache_dir=tmp_path, progress=lambda d, t: calls.append((d, t)),
                        fuse=False)
    assert (weights_dir(tmp_path) / "tiny.pth").is_file()
    assert loaded.weights_hash == served["sha"]
    assert calls and calls[-1][0] == served["size"]
    for k, v in served["model"].state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    # second time: from the cache folder, no download
    calls.clear()
    again = load_model(spec, device="cpu", cache_dir=tmp_path)
    assert not calls and again.weights_path == str(weights_dir(tmp_path) / "tiny.pth")


def test_bad_checksum_leaves_no_file(served, tmp_path):
    spec = _spec(served["url"], "0" * 64)
    with pytest.raises(ChecksumError, match="expected 0000"):
        resolve_weights(spec, cache_dir=tmp_path)
    assert not any(weights_dir(tmp_path).iterdir())


def test_no_network_names_url_and_folder(tmp_path):
    spec = _spec("http://127.0.0.1:9/tiny.pth", None)
    with pytest.raises(WeightsUnavailableError) as e:
        resolve_weights(spec, cache_dir=tmp_path, timeout=2)
    assert "http://127.0.0.1:9/tiny.pth" in str(e.value) and str(weights_dir(tmp_path)) in str(e.value)


def test_manual_only_model_says_where_to_put_it(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="medsam_vit_b.pth.*MedSAM"):
        resolve_weights(get_spec("medsam_vit_b"), cache_dir=tmp_path)


def test_bundled_litemedsam_is_found_without_import_and_verified():
    path = bundled_path(get_spec("litemedsam"))
    assert path is not None and path.name == "lite_medsam.pth"
    p, digest = resolve_weights(get_spec("litemedsam"))
    assert p == path and digest == LITEMEDSAM_SHA256


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad)


def test_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "opt": np.dtype}, evil)  # a pickled non-tensor object
    with pytest.raises(CheckpointError, match="pickled code|cannot read"):
        load_checkpoint(evil)


def test_wrappers_and_module_prefix(tmp_path):
    sd = {"a": torch.zeros(2)}
    for obj in ({"state_dict": sd}, {"model": sd}, sd, {"module.a": torch.zeros(2)}):
        f = tmp_path / "c.pth"
        torch.save(obj, f)
        assert list(load_checkpoint(f)) == ["a"]


def test_strict_loading_names_keys():
    model = build_sam(get_spec("test_tiny_lite"))
    sd = dict(model.state_dict())
    sd.pop("mask_decoder.iou_token.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys: mask_decoder\.iou_token\.weight.*unexpected keys: extra"):
        load_state_dict_strict(model, sd, source="x.pth")


def test_user_file_wins_and_must_exist(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        resolve_weights(get_spec("litemedsam"), path=tmp_path / "nope.pth")


def test_unknown_model():
    with pytest.raises(UnknownModelError, match="litemedsam"):
        get_spec("sam_vit_x")


# ---- weights without a published checksum (MedSAM, MobileSAM) --------------------------------


@pytest.mark.parametrize("name", ["medsam_vit_b", "mobilesam"])
def test_dropped_in_file_without_checksum_needs_trust_once(tmp_path, name):
    from napari_medsam.core.weights import TRUSTED_FILE, trusted_hashes

    spec = get_spec(name)
    dropped = weights_dir(tmp_path) / spec.weights.filename
    dropped.parent.mkdir(parents=True)
    dropped.write_bytes(b"a checkpoint someone put here")
    with pytest.raises(ChecksumError, match="cannot be verified.*--trust-weights"):
        resolve_weights(spec, cache_dir=tmp_path, download=False)
    assert trusted_hashes(tmp_path) == {}
    path, digest = resolve_weights(spec, cache_dir=tmp_path, download=False, trust=True)
    assert path == dropped and digest == hashlib.sha256(dropped.read_bytes()).hexdigest()
    assert trusted_hashes(tmp_path) == {spec.weights.filename: digest}
    assert (weights_dir(tmp_path) / TRUSTED_FILE).is_file()
    assert resolve_weights(spec, cache_dir=tmp_path, download=False)[1] == digest  # recorded: no flag needed
    dropped.write_bytes(b"another file under the same name")
    with pytest.raises(ChecksumError, match="changed since it was trusted"):
        resolve_weights(spec, cache_dir=tmp_path, download=False)


def test_download_without_published_checksum_is_recorded(served, tmp_path):
    from napari_medsam.core.weights import trusted_hashes

    spec = _spec(served["url"], None)
    _, digest = resolve_weights(spec, cache_dir=tmp_path)
    assert digest == served["sha"] and trusted_hashes(tmp_path) == {"tiny.pth": served["sha"]}
    (weights_dir(tmp_path) / "tiny.pth").write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match="changed since it was trusted"):
        resolve_weights(spec, cache_dir=tmp_path)


def test_models_table_says_an_unverified_file_needs_trust(tmp_path, capsys):
    from napari_medsam.cli import main

    (weights_dir(tmp_path) / "mobile_sam.pt").parent.mkdir(parents=True)
    (weights_dir(tmp_path) / "mobile_sam.pt").write_bytes(b"x")
    assert main(["models", "--cache-dir", str(tmp_path)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("mobilesam"))
    assert "--trust-weights" in line
