"""The shipped drafts serve SmolLM2-135M-Instruct however it was loaded: from the GGUF
package, from a local model folder or from a hub-cache entry of its hub id. The hub is not
reachable here, so the folder and the cache entry are built from the GGUF's dequantised
weights (the same model under another path and name)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hass.assets import DRAFTS, SHIPPED, resolve_draft
from hass.identity import identity_digest, model_identity, weights_label
from hass.target import DEFAULT_HUB_ID, DEFAULT_NAME, _cached_gguf, default_gguf_path, load_target


@pytest.fixture(scope="module")
def gguf_folder() -> Path:
    return _cached_gguf(default_gguf_path())


@pytest.fixture(scope="module")
def default_target():
    return load_target("default", device="cpu", dtype="fp32")


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    return dst


def test_shipped_drafts_record_the_identity_of_the_default_model(default_target):
    """The drafts' stamped identity is the one the code computes for the model they were trained on."""
    for kind, folder in SHIPPED[DEFAULT_NAME].items():
        extra = json.loads((DRAFTS / folder / "config.json").read_text())["hass"]
        assert extra["target"] == DEFAULT_NAME
        assert extra["target_identity"] == default_target.identity, kind


def test_identity_depends_on_shape_and_vocabulary(default_target):
    base = model_identity(default_target.config, default_target.tokenizer)
    assert identity_digest(base) == default_target.identity
    cfg = default_target.config.__class__.from_dict(default_target.config.to_dict())
    cfg.num_hidden_layers += 1
    assert identity_digest(model_identity(cfg, default_target.tokenizer)) != default_target.identity

    class Renamed:                                   # one token string changed: another vocabulary
        def get_vocab(self):
            v = dict(default_target.tokenizer.get_vocab())
            tok = next(t for t, i in v.items() if i == 100)
            v[tok + "x"] = v.pop(tok)
            return v

    assert identity_digest(model_identity(default_target.config, Renamed())) != default_target.identity


def test_a_model_folder_under_another_name_uses_the_shipped_hass_draft(gguf_folder, tmp_path):
    folder = _copy_model(gguf_folder, tmp_path / "SmolLM2-135M-Instruct")
    target = load_target(str(folder), device="cpu", dtype="fp32")
    assert target.name == DEFAULT_NAME                       # not the folder's name
    assert target.weights.startswith("original (folder")
    draft, label = resolve_draft("default", target)
    assert label == SHIPPED[DEFAULT_NAME]["hass"]


def test_a_hub_cache_entry_of_the_hub_id_uses_the_shipped_hass_draft(gguf_folder, tmp_path, monkeypatch):
    """The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<rev>/...}."""
    owner, name = DEFAULT_HUB_ID.split("/")
    repo = tmp_path / "hub" / f"models--{owner}--{name}"
    rev = "0" * 40
    _copy_model(gguf_folder, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))   # read per call, not per import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = load_target(DEFAULT_HUB_ID, device="cpu", dtype="fp32")
    assert target.name == DEFAULT_NAME                       # not "SmolLM2-135M-Instruct"
    assert target.weights.startswith("original (hub")
    _, label = resolve_draft("default", target)
    assert label == SHIPPED[DEFAULT_NAME]["hass"]


def test_another_model_keeps_its_own_name_and_gets_no_shipped_draft(tiny_folder):
    target = load_target(str(tiny_folder), device="cpu", dtype="fp32")
    assert target.name == Path(tiny_folder).name
    _, label = resolve_draft("default", target)
    assert label == "random"


def test_weights_label_names_the_quantisation():
    assert weights_label("gguf", "SmolLM2-135M-Instruct.Q4_1.gguf", "float32") == "Q4_1 (GGUF, dequantised to float32)"
    assert weights_label("gguf", "m.Q8_0.gguf") == "Q8_0 (GGUF)"
    assert weights_label("hub", "", "float32") == "original (hub, float32)"


def test_gguf_cache_key_follows_the_content_not_the_path(tmp_path):
    """The same GGUF in another venv or clone (another path, another mtime) maps to the same
    cached folder; a different file of the same size does not."""
    import os
    from hass.target import _content_key
    data = bytes(range(256)) * 9000                        # > 2 MiB: head and tail blocks differ
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(data)
    os.utime(b, (1, 1))
    assert _content_key(a) == _content_key(b)
    c = tmp_path / "c.gguf"
    c.write_bytes(data[:-1] + b"\x00" if data[-1] else data[:-1] + b"\x01")
    assert _content_key(c) != _content_key(a)
