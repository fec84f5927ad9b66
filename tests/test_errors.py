"""Every user-facing failure is a clear, typed error that names what was wrong.

Model specs -> `ModelLoadError`; draft folders -> `DraftLoadError`; bad settings and prompts
-> `ValueError` raised when the generator is created (not on the first `next`).
"""
from __future__ import annotations

import json
import os
import pickle
import time

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from hass.decode import GenerationConfig, plain_generate, speculative_generate
from hass.draft import DraftLoadError, load_draft, new_draft, save_draft
from hass.target import ModelLoadError, Target, load_target
from hass.tree import TreeConfig
from hass.verify import SamplingConfig


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Nothing in here may write to the user's model cache."""
    monkeypatch.setenv("HASS_CACHE", str(tmp_path / "hass-cache"))


# -- load_target -----------------------------------------------------------------------------------
def _load_error(spec) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_target(spec, device="cpu")
    return str(info.value)


@pytest.mark.parametrize("spec", ["", "   ", "\n"])
def test_load_target_empty_spec(spec):
    assert "empty model spec" in _load_error(spec)


def test_load_target_non_string_spec():
    assert "empty model spec" in _load_error(None)


@pytest.mark.parametrize("spec", ["definitely-not-a-model", "a/b/c", "./relative/missing"])
def test_load_target_unknown_spec(spec):
    msg = _load_error(spec)
    assert "unknown model spec" in msg and spec in msg


def test_load_target_missing_folder(tmp_path):
    missing = tmp_path / "no" / "such-model"
    msg = _load_error(str(missing))
    assert str(missing) in msg and "not an existing folder" in msg


def test_load_target_folder_without_config(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    msg = _load_error(str(folder))
    assert "no config.json" in msg and str(folder) in msg


def test_load_target_folder_with_broken_files(tmp_path, tiny_target):
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    assert str(bad_json) in _load_error(str(bad_json))
    no_tokenizer = tmp_path / "no-tokenizer"
    tiny_target.model.save_pretrained(no_tokenizer)
    msg = _load_error(str(no_tokenizer))
    assert "could not load" in msg and str(no_tokenizer) in msg


def test_load_target_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"not a model")
    msg = _load_error(str(f))
    assert "not a .gguf" in msg and str(f) in msg


def test_load_target_missing_gguf(tmp_path):
    f = tmp_path / "model.Q4.gguf"
    msg = _load_error(str(f))
    assert "GGUF file not found" in msg and str(f) in msg


def test_load_target_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    msg = _load_error(str(f))
    assert "could not read GGUF file" in msg and str(f) in msg
    assert not list((tmp_path / "hass-cache").rglob("config.json"))     # nothing half-written cached


def test_load_target_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once at import; mirror the variable into it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    msg = _load_error("some-org/some-model-that-is-not-cached")
    assert time.perf_counter() - t0 < 20, "offline hub lookups must fail fast, not retry"
    assert "hub" in msg and "some-org/some-model-that-is-not-cached" in msg
    assert "offline" in msg and "local folder" in msg


# -- load_draft / save_draft -----------------------------------------------------------------------
def _draft_error(folder, config) -> str:
    with pytest.raises(DraftLoadError) as info:
        load_draft(folder, config)
    return str(info.value)


def test_load_draft_missing_folder(tmp_path, tiny_target):
    msg = _draft_error(tmp_path / "nope", tiny_target.config)
    assert "not found" in msg and "nope" in msg


def test_load_draft_empty_folder(tmp_path, tiny_target):
    msg = _draft_error(tmp_path, tiny_target.config)
    assert "no model.safetensors" in msg


def test_load_draft_refuses_pickles_without_unpickling(tmp_path, tiny_target, random_draft, monkeypatch):
    torch.save(random_draft.state_dict(), tmp_path / "pytorch_model.bin")

    def forbidden(*a, **kw):
        raise AssertionError("load_draft tried to unpickle a checkpoint")
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    msg = _draft_error(tmp_path, tiny_target.config)
    assert "pytorch_model.bin" in msg and "safetensors" in msg


def test_load_draft_corrupt_safetensors(tmp_path, tiny_target):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + bytes(64))
    msg = _draft_error(tmp_path, tiny_target.config)
    assert "model.safetensors" in msg and "not a readable safetensors" in msg


def test_load_draft_truncated_safetensors(tmp_path, tiny_target, random_draft):
    save_draft(random_draft, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors" in _draft_error(tmp_path, tiny_target.config)


def test_load_draft_for_another_hidden_size(tmp_path, tiny_target, make_target):
    other = make_target(hidden_size=32, intermediate_size=64, name="tiny-h32")
    save_draft(new_draft(other.config), tmp_path)
    msg = _draft_error(tmp_path, tiny_target.config)
    assert "shape" in msg and "another target" in msg


def test_load_draft_missing_key(tmp_path, tiny_target, random_draft):
    save_draft(random_draft, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["fc.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    msg = _draft_error(tmp_path, tiny_target.config)
    assert "missing keys" in msg and "fc.bias" in msg


def test_load_draft_unexpected_key(tmp_path, tiny_target, random_draft):
    save_draft(random_draft, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["layers.1.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / "model.safetensors"))
    msg = _draft_error(tmp_path, tiny_target.config)
    assert "unexpected keys" in msg and "layers.1.mlp.up_proj.weight" in msg


def test_load_draft_bad_config_json(tmp_path, tiny_target, random_draft):
    save_draft(random_draft, tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    assert "not valid JSON" in _draft_error(tmp_path, tiny_target.config)


def _same_outputs(a, b, target, prompt):
    cfg = GenerationConfig(max_new_tokens=16, tree=TreeConfig(30, 5, 6), stop_at_eos=False)
    sa = list(speculative_generate(target, a, prompt, cfg))
    sb = list(speculative_generate(target, b, prompt, cfg))
    assert [s.new_tokens for s in sa] == [s.new_tokens for s in sb]
    assert [s.tree for s in sa] == [s.tree for s in sb]             # identical trees, scores included


def test_save_load_round_trip(tmp_path, tiny_target, prompts):
    draft = new_draft(tiny_target.config, seed=5)
    with torch.no_grad():                                       # non-trivial norms and biases too
        for name, p in draft.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = save_draft(draft, tmp_path / "d")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]   # no temp files left
    loaded = load_draft(folder, tiny_target.config)
    sd, ld = draft.state_dict(), loaded.state_dict()
    assert set(sd) == set(ld)
    for k in sd:
        assert torch.equal(sd[k], ld[k]), k
    # a path to the weights file works like its folder
    again = load_draft(folder / "model.safetensors", tiny_target.config)
    assert all(torch.equal(again.state_dict()[k], sd[k]) for k in sd)
    x = torch.randn(1, 5, tiny_target.hidden_size)
    e = torch.randn(1, 5, tiny_target.hidden_size)
    pos = torch.arange(5)[None]
    with torch.no_grad():
        assert torch.equal(draft(x, e, pos)[0], loaded(x, e, pos)[0])
    for prompt in prompts(3, tiny_target.vocab_size, 1, 20, seed=2):
        _same_outputs(draft, loaded, tiny_target, prompt)


def test_load_official_eagle_layout(tmp_path, tiny_target, random_draft, prompts):
    """Official EAGLE/HASS checkpoints may prefix keys with 'model.' and carry embed_tokens."""
    state = {f"model.{k}": v.contiguous() for k, v in random_draft.state_dict().items()
             if not k.startswith("rotary.") and k != "token_map"}
    state["embed_tokens.weight"] = torch.zeros(tiny_target.vocab_size, tiny_target.hidden_size)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    loaded = load_draft(tmp_path, tiny_target.config)
    _same_outputs(random_draft, loaded, tiny_target, prompts(1, tiny_target.vocab_size, 9, 9, seed=3)[0])


# -- settings and prompts --------------------------------------------------------------------------
BAD_SETTINGS = [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens="8"), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_new_tokens=10 ** 9), "max_new_tokens"),
    (dict(sampling=SamplingConfig(temperature=-0.1)), "temperature"),
    (dict(sampling=SamplingConfig(temperature=float("nan"))), "temperature"),
    (dict(sampling=SamplingConfig(temperature="hot")), "temperature"),
    (dict(sampling=SamplingConfig(temperature=1.0, top_p=0.0)), "top_p"),
    (dict(sampling=SamplingConfig(temperature=1.0, top_p=1.5)), "top_p"),
    (dict(sampling=SamplingConfig(temperature=1.0, top_p=-0.2)), "top_p"),
    (dict(sampling=SamplingConfig(temperature=1.0, top_k=-1)), "top_k"),
    (dict(sampling=SamplingConfig(temperature=1.0, top_k=2.5)), "top_k"),
    (dict(tree=TreeConfig(total_tokens=1, depth=3, top_k=2)), "total_tokens"),
    (dict(tree=TreeConfig(total_tokens=0, depth=3, top_k=2)), "total_tokens"),
    (dict(tree=TreeConfig(total_tokens=10, depth=0, top_k=2)), "depth"),
    (dict(tree=TreeConfig(total_tokens=10, depth=-1, top_k=2)), "depth"),
    (dict(tree=TreeConfig(total_tokens=10, depth=3, top_k=0)), "top_k"),
    (dict(tree=TreeConfig(total_tokens=10.0, depth=3, top_k=2)), "total_tokens"),
    (dict(tree=TreeConfig(total_tokens=10, depth=3, top_k=129)), "top_k"),
]


@pytest.mark.parametrize("kwargs,setting", BAD_SETTINGS, ids=[f"{s}-{i}" for i, (_, s) in enumerate(BAD_SETTINGS)])
@pytest.mark.parametrize("loop", ["plain", "speculative"])
def test_invalid_settings_raise_at_creation(tiny_target, random_draft, kwargs, setting, loop):
    cfg = GenerationConfig(**kwargs)
    with pytest.raises(ValueError, match=setting):
        if loop == "plain":
            plain_generate(tiny_target, [1, 2, 3], cfg)
        else:
            speculative_generate(tiny_target, random_draft, [1, 2, 3], cfg)


def test_tree_top_k_larger_than_vocabulary(make_target):
    small = make_target(vocab_size=12, hidden_size=32, intermediate_size=64, max_position_embeddings=64)
    cfg = GenerationConfig(tree=TreeConfig(total_tokens=10, depth=2, top_k=13))
    with pytest.raises(ValueError, match="top_k.*vocabulary"):
        speculative_generate(small, new_draft(small.config), [1, 2], cfg)
    speculative_generate(small, new_draft(small.config), [1, 2], GenerationConfig(tree=TreeConfig(10, 2, 12)))


def test_valid_edge_settings_are_accepted(tiny_target, random_draft):
    for cfg in (GenerationConfig(max_new_tokens=1, tree=TreeConfig(2, 1, 1)),
                GenerationConfig(sampling=SamplingConfig(temperature=1.0, top_p=1.0, top_k=0)),
                GenerationConfig(sampling=SamplingConfig(temperature=0.5, top_p=1e-3, top_k=1))):
        toks = [t for s in speculative_generate(tiny_target, random_draft, [5, 6], cfg) for t in s.new_tokens]
        assert 1 <= len(toks) <= cfg.max_new_tokens


@pytest.mark.parametrize("loop", ["plain", "speculative"])
def test_bad_prompts_raise_at_creation(tiny_target, random_draft, loop):
    def make(prompt):
        cfg = GenerationConfig(max_new_tokens=4)
        if loop == "plain":
            return plain_generate(tiny_target, prompt, cfg)
        return speculative_generate(tiny_target, random_draft, prompt, cfg)

    with pytest.raises(ValueError, match="empty prompt"):
        make([])
    n = tiny_target.max_length
    for length in (n, n + 50):
        with pytest.raises(ValueError, match="prompt too long"):
            make([1] * length)
    with pytest.raises(ValueError, match="token ids"):
        make([1, tiny_target.vocab_size])
    with pytest.raises(ValueError, match="token ids"):
        make([-1, 2])
    make([1] * (n - 1))                                        # the longest prompt that fits: one new token


def test_draft_for_another_hidden_size_is_rejected(tiny_target, make_target):
    other = make_target(hidden_size=32, intermediate_size=64, name="tiny-h32")
    with pytest.raises(ValueError, match="hidden size"):
        speculative_generate(tiny_target, new_draft(other.config), [1, 2, 3], GenerationConfig())


# -- Target.render ---------------------------------------------------------------------------------
class StubTokenizer:
    """Just enough tokenizer for Target: no chat template, whitespace 'encoding'."""

    chat_template = None
    eos_token_id = 2
    unk_token_id = 0

    def convert_tokens_to_ids(self, tok):
        return self.unk_token_id

    def encode(self, text):
        return [len(w) % 100 for w in text.split()]


def test_render_errors(tiny_target):
    with pytest.raises(ValueError, match="no tokenizer"):
        tiny_target.render([{"role": "user", "content": "hi"}])
    t = Target(model=tiny_target.model, tokenizer=StubTokenizer(), name="stub")
    with pytest.raises(ValueError, match="empty conversation"):
        t.render([])
    with pytest.raises(ValueError, match="malformed message"):
        t.render([{"role": "user"}])
    with pytest.raises(ValueError, match="malformed message"):
        t.render(["hello"])
    with pytest.raises(ValueError, match="empty prompt"):
        t.render([{"role": "user", "content": "   "}])
    assert t.render([{"role": "user", "content": "two words"}]) == [3, 5]
