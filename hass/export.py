"""Drafts for the serving engines: the EAGLE-1/2 layouts SGLang and vLLM load.

Both engines read an EAGLE draft as a one-layer LLaMA checkpoint: `fc` over
[token embedding; target feature], `layers.0.*` without `input_layernorm`, no final norm,
and the target's own embedding and lm_head. They differ in three ways, which is why there
are two layouts (what was read in each engine's source is in docs/SERVING.md):

* architecture name: SGLang dispatches on `LlamaForCausalLMEagle`; vLLM's `method: eagle`
  prefixes `Eagle` to the name it finds, so it needs `LlamaForCausalLM`.
* `fc.bias`: SGLang's fc has a bias and loads it; vLLM's fc has none and its loader has no
  place for one. For vLLM the bias b is folded, exactly, into attention biases
  (q/k/v biases W·b and o_proj bias b, `attention_bias: true`), which the stock LLaMA layer
  of both engines supports: the layer then computes what the draft computes.
* the reduced vocabulary: SGLang takes `--speculative-token-map` (a `.pt` tensor of target
  ids) and drafts from those rows of the target's lm_head, which is what the draft was
  trained with. vLLM's EAGLE-1 model has no such option: it drafts over the full
  vocabulary. `token_map.pt` is written in both layouts (this project's loader reads it);
  vLLM ignores it.

Only safetensors are read and written; the token map is a plain int64 tensor file.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

from .draft import DraftHead, DraftLoadError, load_draft

log = logging.getLogger(__name__)

LAYOUTS = ("sglang", "vllm")
ARCHITECTURES = {"sglang": "LlamaForCausalLMEagle", "vllm": "LlamaForCausalLM"}
TOKEN_MAP_FILE = "token_map.pt"
WEIGHTS_FILE = "model.safetensors"
_ATTN = "layers.0.self_attn."


class ExportError(ValueError):
    """An export that cannot be done as asked (paths, layout); nothing was written."""


def export_draft(src_folder: str | Path, out_folder: str | Path, layout: str, overwrite: bool = False) -> Path:
    """Write the draft in `src_folder` as an engine-loadable folder (see the module docstring).

    The folder appears whole or not at all (written beside it, then renamed); an existing
    non-empty `out_folder` is replaced only with `overwrite=True`. Weights keep the source's
    floating-point dtype. Returns `out_folder`.
    """
    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    src, out = Path(src_folder).expanduser().resolve(), Path(out_folder).expanduser().resolve()
    _check_paths(src, out, overwrite)
    source_cfg = _read_config(src)
    dtype = _weights_dtype(src / WEIGHTS_FILE)
    draft = load_draft(src, LlamaConfig.from_dict(source_cfg), "cpu", torch.float32)
    state = engine_state(draft, layout)
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    cfg = engine_config(draft, layout, source_cfg, dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if draft.token_map is not None:
            torch.save(draft.token_map.to(torch.int64).cpu().clone(), tmp / TOKEN_MAP_FILE)
        _readable(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if layout == "vllm" and draft.token_map is not None:
        log.warning("vLLM's EAGLE model has no reduced-vocabulary option: it drafts over all %d tokens with "
                    "the target's lm_head, not the %d the draft was trained on (%s is ignored by vLLM)",
                    draft.config.vocab_size, draft.token_map.numel(), TOKEN_MAP_FILE)
    log.info("exported %s as a %s draft to %s", src, layout, out)
    return out


def engine_state(draft: DraftHead, layout: str) -> dict[str, torch.Tensor]:
    """The draft's weights under the official EAGLE key names (fp32), laid out for `layout`."""
    state = {k: v.detach().float().cpu() for k, v in draft.state_dict().items()
             if not k.startswith("rotary.") and k != "token_map"}
    if layout == "sglang":
        return state
    bias = state.pop("fc.bias")
    if not bool(bias.any()):                    # nothing to fold: a plain bias-free layer
        return state
    # The layer sees x instead of x + b. q/k/v of x + b are W·x + W·b: biases W·b. The residual
    # stream must carry x + b too: o_proj's bias b adds it (the v bias W·b passes the attention
    # unchanged, its weights summing to 1, and ends up in W_o·W_v·b as in the draft).
    b = bias.double()
    for proj in ("q_proj", "k_proj", "v_proj"):
        state[f"{_ATTN}{proj}.bias"] = (state[f"{_ATTN}{proj}.weight"].double() @ b).float()
    state[f"{_ATTN}o_proj.bias"] = bias
    return state


def engine_config(draft: DraftHead, layout: str, source_cfg: dict, dtype: torch.dtype) -> dict:
    """config.json for the engine: a one-layer LLaMA config with the architecture it dispatches on.

    Rotary settings are written both the transformers-5 way (`rope_parameters`) and the older
    way (`rope_theta`, `rope_scaling`), since the engines read one or the other by version.
    """
    c = draft.config
    rope = dict(getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None if rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    folded = layout == "vllm" and draft.fc.bias is not None and bool(draft.fc.bias.detach().any())
    hass = dict(getattr(c, "hass", {}) or {})
    hass["export"] = {"layout": layout, "fc_bias_folded_into_attention": folded,
                      "token_map": TOKEN_MAP_FILE if draft.token_map is not None else None}
    cfg = {
        "architectures": [ARCHITECTURES[layout]],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": c.hidden_act,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "attention_bias": folded,
        "mlp_bias": False,
        "tie_word_embeddings": False,       # SGLang: an own (hot-vocabulary) lm_head slot, filled from the target
        "torch_dtype": str(dtype).removeprefix("torch."),
        "hass": hass,
    }
    if layout == "vllm":
        cfg["bias"] = False                 # the EAGLE repo's switch: fc has no bias (engines: "no attention bias")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if source_cfg.get(key) is not None:
            cfg[key] = source_cfg[key]
    return cfg


def engine_commands(out: str | Path, layout: str, target: str, steps: int = 6, top_k: int = 10,
                    draft_tokens: int = 60) -> str:
    """The command line that serves `target` with the exported draft (the tree: this project's defaults)."""
    out, q = Path(out), shlex.quote
    if layout == "sglang":
        parts = ["python -m sglang.launch_server", f"--model-path {q(target)}", "--speculative-algorithm EAGLE",
                 f"--speculative-draft-model-path {q(str(out))}", f"--speculative-num-steps {steps}",
                 f"--speculative-eagle-topk {top_k}", f"--speculative-num-draft-tokens {draft_tokens}"]
        if (out / TOKEN_MAP_FILE).is_file():
            parts.insert(4, f"--speculative-token-map {q(str(out / TOKEN_MAP_FILE))}")
        return " \\\n    ".join(parts)
    spec = json.dumps({"method": "eagle", "model": str(out), "num_speculative_tokens": 5})
    return f"vllm serve {q(target)} \\\n    --speculative-config {q(spec)}"


# -- helpers ------------------------------------------------------------------------------
def _check_paths(src: Path, out: Path, overwrite: bool) -> None:
    if not src.is_dir():
        raise ExportError(f"draft folder not found: {src}")
    if src == out or src in out.parents or out in src.parents:
        raise ExportError(f"the output folder {out} must be outside the draft folder {src} (and not contain it)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: pass overwrite=True (--overwrite) to replace it")


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise DraftLoadError(f"{src} has no config.json: the export needs the draft's LLaMA config")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DraftLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict) or "hidden_size" not in cfg:
        raise DraftLoadError(f"{path} is not a LLaMA-style config (no hidden_size)")
    return cfg


def _weights_dtype(path: Path) -> torch.dtype:
    """The dtype the draft was stored in (its fc weight's); the export keeps it."""
    if not path.is_file():
        return torch.float16          # load_draft will say why the folder cannot be read
    with safe_open(str(path), "pt") as f:
        name = next((k for k in f.keys() if k.endswith("fc.weight")), None)
        return f.get_tensor(name).dtype if name else torch.float16


def _readable(folder: Path) -> None:
    """The permissions of a normally created folder (mkdtemp makes it private): a server may run as another user."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for p in folder.iterdir():
        p.chmod(0o666 & ~mask)


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder to `out`; an existing `out` is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
