"""Drafts to and from the serving engines: `hass.export` layouts and `load_draft` reading them back.

The engines themselves (SGLang, vLLM) are not installed here and need a GPU; what is checked
is (1) the round trip export -> load_draft gives the same logits, (2) the exported keys and
shapes equal the official EAGLE-1/2 layout the engines' loaders read, and (3) an "engine view"
rebuilt from the exported files alone - fc, then a stock LLaMA decoder layer (transformers')
with its input norm replaced by the identity, as both engines do - computes what the draft
computes. The draft only needs the target's config, so no target weights are loaded: a
random lm_head stands in for the target's.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from hass.__main__ import main
from hass.assets import DRAFTS
from hass.draft import DraftLoadError, OutputHead, load_draft
from hass.export import TOKEN_MAP_FILE, ExportError, engine_commands, export_draft

SHIPPED = DRAFTS / "smollm2-135m-hass"

# SmolLM2-135M-Instruct, the target the shipped drafts were trained for (its config.json)
SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            hidden_act="silu", tie_word_embeddings=True)


def official_layout(layout: str, h: int = 576, inter: int = 1536, heads: int = 9, kv_heads: int = 3,
                    head_dim: int = 64) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an EAGLE-1/2 draft checkpoint as the engines load it.

    From: SafeAILab/EAGLE eagle/model/cnets1.py (`Model`: fc = Linear(2h, h, bias), one
    LlamaDecoderLayer whose index-0 layer has no input_layernorm; embed_tokens is a frozen copy
    of the target's, lm_head is the target's); sgl-project/sglang python/sglang/srt/models/
    llama_eagle.py (fc = nn.Linear(2h, h) with its default bias; layer 0 input_layernorm
    dropped; lm_head/embed taken from the target); vllm-project/vllm
    vllm/model_executor/models/llama_eagle.py (fc = Linear(2h, h, bias=False); stock
    LlamaDecoderLayer, so q/k/v/o biases exist when config.attention_bias is set).
    """
    a = "layers.0.self_attn."
    table = {
        "fc.weight": (h, 2 * h),
        f"{a}q_proj.weight": (heads * head_dim, h), f"{a}k_proj.weight": (kv_heads * head_dim, h),
        f"{a}v_proj.weight": (kv_heads * head_dim, h), f"{a}o_proj.weight": (h, heads * head_dim),
        "layers.0.mlp.gate_proj.weight": (inter, h), "layers.0.mlp.up_proj.weight": (inter, h),
        "layers.0.mlp.down_proj.weight": (h, inter),
        "layers.0.post_attention_layernorm.weight": (h,),
    }
    if layout == "sglang":
        table["fc.bias"] = (h,)
    else:       # the fc bias folded into attention biases (hass.export)
        table.update({f"{a}q_proj.bias": (heads * head_dim,), f"{a}k_proj.bias": (kv_heads * head_dim,),
                      f"{a}v_proj.bias": (kv_heads * head_dim,), f"{a}o_proj.bias": (h,)})
    return table


@pytest.fixture(scope="module")
def target_config() -> LlamaConfig:
    return LlamaConfig(**SMOL)


@pytest.fixture(scope="module")
def original(target_config):
    return load_draft(SHIPPED, target_config)


@pytest.fixture(scope="module")
def lm_head() -> nn.Linear:
    """A stand-in for the target's lm_head (random, fixed)."""
    head = nn.Linear(SMOL["hidden_size"], SMOL["vocab_size"], bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return head.requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    """Non-trivial draft inputs: 12 (feature, token embedding) pairs at positions 0..11."""
    gen = torch.Generator().manual_seed(0)
    n, h = 12, SMOL["hidden_size"]
    return torch.randn(1, n, h, generator=gen) * 2, torch.randn(1, n, h, generator=gen) * 0.05, torch.arange(n)[None]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    return {layout: export_draft(SHIPPED, root / layout, layout) for layout in ("sglang", "vllm")}


def _run(draft, inputs) -> torch.Tensor:
    with torch.no_grad():
        return draft(*inputs)[0]


def _engine_view(folder: Path, inputs) -> torch.Tensor:
    """The draft as the engines assemble it from the exported files: fc, then a stock LLaMA layer
    (built from config.json) with the input norm replaced by the identity; no final norm."""
    cfg = LlamaConfig.from_dict(json.loads((folder / "config.json").read_text()))
    cfg._attn_implementation = "eager"
    state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    h = cfg.hidden_size
    fc = nn.Linear(2 * h, h, bias="fc.bias" in state)
    fc.load_state_dict({k.removeprefix("fc."): v for k, v in state.items() if k.startswith("fc.")})
    layer = LlamaDecoderLayer(cfg, layer_idx=0)
    layer.input_layernorm = nn.Identity()
    layer.load_state_dict({k.removeprefix("layers.0."): v for k, v in state.items() if k.startswith("layers.0.")},
                          strict=True)
    features, embeds, pos = inputs
    with torch.no_grad():
        x = fc(torch.cat((embeds, features), dim=-1))
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        out = layer(x, attention_mask=mask, position_ids=pos,
                    position_embeddings=LlamaRotaryEmbedding(cfg)(x, pos))
    return out[0] if isinstance(out, tuple) else out


# -- round trip -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["sglang", "vllm"])
def test_round_trip_gives_the_same_logits(layout, exported, original, target_config, lm_head, inputs):
    back = load_draft(exported[layout], target_config)
    assert original.token_map is not None and back.token_map is not None
    assert not torch.equal(original.token_map, torch.arange(original.token_map.numel())), "token map is the identity"
    assert torch.equal(back.token_map, original.token_map)
    ref, out = _run(original, inputs), _run(back, inputs)
    ref_logits = OutputHead(lm_head, original.token_map).logits(ref)
    out_logits = OutputHead(lm_head, back.token_map).logits(out)
    assert float(ref.std()) > 0.1 and ref_logits.argmax(-1).unique().numel() > 3, "inputs are too trivial"
    # sglang keeps every tensor as it was; vllm unfolds o_proj.bias back into fc.bias exactly
    assert torch.equal(out, ref)
    assert torch.equal(out_logits, ref_logits)


@pytest.mark.parametrize("layout", ["sglang", "vllm"])
def test_engine_view_of_the_export_computes_the_draft(layout, exported, original, lm_head, inputs):
    ref = _run(original, inputs)
    view = _engine_view(exported[layout], inputs)
    # fp16 weights evaluated in fp32 on both sides; the vllm view adds the folded biases in another order
    assert torch.allclose(view, ref, atol=5e-5, rtol=1e-5), float((view - ref).abs().max())
    tm = original.token_map
    if layout == "sglang":          # SGLang: lm_head = target lm_head rows [token map], ids mapped back
        logits = view @ lm_head.weight[tm].T
        assert torch.equal(tm[logits.argmax(-1)], tm[OutputHead(lm_head, tm).logits(ref).argmax(-1)])
    else:                           # vLLM: the full target lm_head; on the token map's rows it agrees
        full = view @ lm_head.weight.T
        assert full.shape[-1] == SMOL["vocab_size"]
        assert torch.allclose(full[..., tm], OutputHead(lm_head, tm).logits(ref), atol=1e-3)


def test_the_fold_is_needed_for_vllm(exported, original, inputs):
    """Dropping the fc bias (what loading it into a bias-free fc would amount to) changes the draft:
    so the engine-view test above does check the fold."""
    folder = exported["vllm"]
    state = load_file(str(folder / "model.safetensors"))
    assert "fc.bias" not in state and float(state["layers.0.self_attn.o_proj.bias"].float().abs().max()) > 0
    ref = _run(original, inputs)
    no_bias = {k: v for k, v in state.items() if not k.endswith("_proj.bias")}
    broken = folder.parent / "vllm-without-fold"
    broken.mkdir()
    save_file(no_bias, str(broken / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text()) | {"attention_bias": False}
    (broken / "config.json").write_text(json.dumps(cfg))
    assert not torch.allclose(_engine_view(broken, inputs), ref, atol=1e-2)


# -- layout against the official one -------------------------------------------------------
@pytest.mark.parametrize("layout", ["sglang", "vllm"])
def test_keys_and_shapes_match_the_official_layout(layout, exported, original):
    folder = exported[layout]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert got == official_layout(layout)
    assert dtypes == {torch.float16}                     # the shipped draft's dtype is kept
    assert not any(k.startswith(("lm_head", "embed_tokens", "model.")) or "input_layernorm" in k for k in got)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == [{"sglang": "LlamaForCausalLMEagle", "vllm": "LlamaForCausalLM"}[layout]]
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False
    assert cfg["attention_bias"] is (layout == "vllm")
    assert cfg.get("bias", "absent") == {"sglang": "absent", "vllm": False}[layout]   # EAGLE's fc-bias switch
    assert cfg["rope_theta"] == 100000.0 and cfg["head_dim"] == 64 and cfg["num_key_value_heads"] == 3
    assert not (folder / "pytorch_model.bin").exists()
    ids = torch.load(folder / TOKEN_MAP_FILE, weights_only=True)     # what SGLang's load_token_map reads
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 and ids.ndim == 1
    assert torch.equal(ids, original.token_map)


def test_engine_commands_name_the_engines_flags(exported):
    sg = engine_commands(exported["sglang"], "sglang", "HuggingFaceTB/SmolLM2-135M-Instruct")
    for flag in ("sglang.launch_server", "--speculative-algorithm EAGLE", "--speculative-draft-model-path",
                 f"--speculative-token-map {exported['sglang'] / TOKEN_MAP_FILE}"):
        assert flag in sg
    vl = engine_commands(exported["vllm"], "vllm", "HuggingFaceTB/SmolLM2-135M-Instruct")
    spec = json.loads(vl.split("--speculative-config ", 1)[1].strip("'"))
    assert vl.startswith("vllm serve HuggingFaceTB/SmolLM2-135M-Instruct")
    assert spec["method"] == "eagle" and spec["model"] == str(exported["vllm"])


def test_cli_export(tmp_path, capsys):
    assert main(["export", "--draft", "eagle2", "--layout", "sglang", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert f"--speculative-token-map {tmp_path / 'e' / TOKEN_MAP_FILE}" in out
    assert "--model-path HuggingFaceTB/SmolLM2-135M-Instruct" in out
    assert main(["export", "--draft", "eagle2", "--layout", "sglang", "--out", str(tmp_path / "e")]) == 2
    assert "not empty" in capsys.readouterr().err


# -- official-layout folders ---------------------------------------------------------------
@pytest.mark.parametrize("with_fc_bias", [True, False])
def test_official_folder_without_token_map_uses_the_full_target_head(with_fc_bias, tmp_path, original,
                                                                     target_config, lm_head, inputs):
    """An EAGLE repo style folder: `LlamaForCausalLM` config, a frozen embed_tokens copy, no token
    map, no lm_head; EAGLE-LLaMA3 drafts also have no fc.bias."""
    state = {k: v.half() for k, v in original.state_dict().items() if not k.startswith("rotary.") and k != "token_map"}
    state["embed_tokens.weight"] = torch.zeros(SMOL["vocab_size"], SMOL["hidden_size"], dtype=torch.float16)
    if not with_fc_bias:
        del state["fc.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = {k: v for k, v in SMOL.items() if k != "rope_parameters"} | {
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "rope_theta": 100000.0, "bias": with_fc_bias}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    draft = load_draft(tmp_path, target_config)
    assert draft.token_map is None
    head = OutputHead(lm_head, draft.token_map)
    assert head.size == SMOL["vocab_size"]                # the whole target lm_head
    reference = copy.deepcopy(original)
    if not with_fc_bias:             # a missing fc bias is a zero one
        assert float(original.fc.bias.detach().abs().max()) > 0
        with torch.no_grad():
            reference.fc.bias.zero_()
    out = _run(draft, inputs)
    assert torch.equal(out, _run(reference, inputs))
    tm = original.token_map
    assert torch.equal(head.logits(out)[..., tm], OutputHead(lm_head, tm).logits(out))


def test_a_missing_fc_bias_needs_the_config_to_say_so(tmp_path, original, target_config):
    state = {k: v for k, v in original.state_dict().items()
             if not k.startswith("rotary.") and k not in ("token_map", "fc.bias")}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(DraftLoadError, match="missing keys.*fc.bias"):
        load_draft(tmp_path, target_config)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "bias": False}))
    assert torch.count_nonzero(load_draft(tmp_path, target_config).fc.bias) == 0


def test_attention_biases_that_are_no_fold_are_refused(exported, tmp_path, target_config):
    state = load_file(str(exported["vllm"] / "model.safetensors"))
    state["layers.0.self_attn.q_proj.bias"] = state["layers.0.self_attn.q_proj.bias"] + 1.0
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((exported["vllm"] / "config.json").read_text())
    with pytest.raises(DraftLoadError, match="not the fc bias folded"):
        load_draft(tmp_path, target_config)


# -- refusals -----------------------------------------------------------------------------
def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_draft(SHIPPED, out, "sglang")
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    export_draft(SHIPPED, out, "vllm", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", TOKEN_MAP_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]          # no temp or old folder left behind


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import hass.export as ex

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ex, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_draft(SHIPPED, tmp_path / "out", "sglang")
    assert list(tmp_path.iterdir()) == []


def test_refuses_pickled_weights(tmp_path, target_config):
    src = tmp_path / "bin-draft"
    src.mkdir()
    (src / "config.json").write_text((SHIPPED / "config.json").read_text())
    torch.save({"fc.weight": torch.zeros(2, 2)}, src / "pytorch_model.bin")
    with pytest.raises(DraftLoadError, match="pytorch_model.bin: pickled checkpoints are not loaded"):
        export_draft(src, tmp_path / "out", "sglang")
    with pytest.raises(DraftLoadError, match="pickled"):
        load_draft(src, target_config)
    assert not (tmp_path / "out").exists()


def test_refuses_bad_paths_and_layouts(tmp_path):
    with pytest.raises(ExportError, match="not found"):
        export_draft(tmp_path / "missing", tmp_path / "out", "sglang")
    with pytest.raises(ExportError, match="outside the draft folder"):
        export_draft(SHIPPED, SHIPPED / "engine", "sglang")
    with pytest.raises(ExportError, match="unknown layout"):
        export_draft(SHIPPED, tmp_path / "out", "tensorrt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_draft(SHIPPED, tmp_path / "file", "sglang")
    with pytest.raises(DraftLoadError, match="not found"):
        load_draft(tmp_path / "missing", LlamaConfig(**SMOL))
