"""The EAGLE/HASS draft head: fc over [embed(x_{t+1}), f_t], one LLaMA-style decoder layer.

Built from `transformers`' LLaMA pieces (RMSNorm, MLP, rotary embedding); only the
attention call is written here, because HASS training feeds it keys and values from
several feature levels at once. The target's embedding and lm_head are shared, never
stored with the draft.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig

from .attention import rows_attention_covers
from .kernels import PackedLinear
from .rowkernel import rows_attention
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    rotate_half,
)

log = logging.getLogger(__name__)

KV = tuple[torch.Tensor, torch.Tensor]
_IGNORED_KEYS = ("embed_tokens.weight", "lm_head.weight")


class DraftLoadError(RuntimeError):
    """A draft could not be loaded; the previous draft (if any) stays in use."""


def draft_config_for(target_config, **extra) -> LlamaConfig:
    """A LLaMA config for one draft layer, sized like the target."""
    tc = target_config
    heads = tc.num_attention_heads
    cfg = LlamaConfig(
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
        max_position_embeddings=getattr(tc, "max_position_embeddings", 2048),
        rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-6),
        rope_parameters=dict(getattr(tc, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}),
        hidden_act=getattr(tc, "hidden_act", "silu"),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    )
    cfg.hass = dict(extra)
    return cfg


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on one [B, heads, n, D] tensor: transformers' `apply_rotary_pos_emb`
    term for term, without the second tensor it always rotates too."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


class DraftAttention(nn.Module):
    """Multi-head attention with rotary positions; keys/values may be longer than queries.

    `_hass_rows_attention`: the rows kernel's attention entry point, given as to the target's
    layers (`hass.attention.give_rows_attention`) when the draft runs on its target's rows
    kernels (`hass.kernels.follow_target`); the inference calls it covers
    (`hass.attention.rows_attention_covers`, with a causal or boolean mask) then skip SDPA's
    per-call set-up, and each query row is computed alone, so a packed batch's rows are the
    single sequences' rows."""

    _hass_rows_attention = None

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> KV:
        """Keys (rotated) and values of x: [B, kv_heads, n, head_dim] each."""
        b, n, _ = x.shape
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return rotate(k, cos, sin), v

    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Queries from x attend over the given keys/values with an additive or boolean mask
        ([B, 1, n, keys]; None: causal, query i sees keys up to keys - n + i)."""
        b, n, _ = x.shape
        q = rotate(self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        kernel = self._hass_rows_attention
        if (kernel is not None and not (torch.is_grad_enabled() and q.requires_grad)
                and (mask is None or mask.dtype == torch.bool) and rows_attention_covers(q, k, v, mask)):
            return self.o_proj(rows_attention(q, k, v, mask, self.head_dim ** -0.5, kernel).view(b, n, -1))
        if mask is None:
            total = k.shape[2]
            mask = torch.ones(n, total, dtype=torch.bool, device=x.device).tril(total - n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class DraftLayer(nn.Module):
    """One decoder layer without the input norm (the fc output is already on feature scale)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = DraftAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        h = x + attn_out
        return h + self.mlp(self.post_attention_layernorm(h))


class DraftHead(nn.Module):
    """f^_{t+1} = layer(fc(cat(embed(x_{t+1}), f_t))); logits come from the target's lm_head.

    An optional `token_map` (target token ids, EAGLE-3 style) restricts the draft's
    vocabulary to the most frequent tokens: the lm_head rows are sliced, not retrained.
    """

    def __init__(self, cfg: LlamaConfig, token_map: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.layers = nn.ModuleList([DraftLayer(cfg)])
        self.rotary = LlamaRotaryEmbedding(cfg)
        self.register_buffer("token_map", None if token_map is None else token_map.to(torch.long))

    @property
    def layer(self) -> DraftLayer:
        return self.layers[0]

    def set_token_map(self, token_map: torch.Tensor) -> None:
        """Give the draft another vocabulary. Its weights do not depend on the map (the map
        only selects rows of the target's frozen lm_head), so a trained draft can be continued
        with a larger or better-sampled one."""
        self.token_map = token_map.to(device=self.fc.weight.device, dtype=torch.long)
        self.config.hass["draft_vocab_size"] = int(token_map.numel())

    def fuse(self, features: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat((token_embeds, features.to(token_embeds.dtype)), dim=-1))

    def forward(self, features: torch.Tensor, token_embeds: torch.Tensor, position_ids: torch.Tensor,
                past: KV | None = None, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        """Run n new (feature, token) pairs over `past`; return outputs and the new pairs' K/V.

        `mask` ([B, 1, n, past + n], additive float or boolean) defaults to causal.
        The caller owns the cache: it decides which of the returned K/V entries to keep.
        """
        dt = self.fc.weight.dtype              # the draft may run in a lower precision than the target
        x = self.fuse(features.to(dt), token_embeds.to(dt))
        cos, sin = self.rotary(x, position_ids)
        k_new, v_new = self.layer.self_attn.project_kv(x, cos, sin)
        k, v = (k_new, v_new) if past is None else (torch.cat((past[0], k_new), 2), torch.cat((past[1], v_new), 2))
        out = self.layer.finish(x, self.layer.self_attn.attend(x, cos, sin, k, v, mask))
        return out, (k_new, v_new)


class OutputHead:
    """The target's frozen lm_head as the draft sees it: all rows, or the token map's rows."""

    def __init__(self, lm_head: nn.Module, token_map: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 pack: bool = False):
        w, b = lm_head.weight, getattr(lm_head, "bias", None)
        self.token_map = None if token_map is None else token_map.to(w.device)
        self.weight = w if token_map is None else w[self.token_map].detach()
        self.bias = b if (b is None or token_map is None) else b[self.token_map].detach()
        if dtype is not None and dtype != self.weight.dtype:      # a copy in the draft's precision
            self.weight = self.weight.detach().to(dtype)
            self.bias = None if self.bias is None else self.bias.detach().to(dtype)
        # `pack`: multiply through a packed copy on the target's kernel (rows or oneDNN; inference
        # only; see hass.kernels)
        self._linear = None
        layer = type(lm_head) if isinstance(lm_head, PackedLinear) else PackedLinear   # the target's kernel
        if pack and isinstance(lm_head, PackedLinear) and self.weight is w:
            self._linear = lm_head                               # the target's own packed head, as it is
        elif pack and layer.fits(self.weight):
            self._linear = layer.of(self.weight, self.bias)

    @property
    def size(self) -> int:
        return self.weight.shape[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        return F.linear(x, self.weight, self.bias) if self._linear is None else self._linear(x)

    def to_target(self, idx: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary indices -> target token ids."""
        return idx if self.token_map is None else self.token_map[idx]


def new_draft(target_config, seed: int = 0, token_map: torch.Tensor | None = None, **extra) -> DraftHead:
    """A randomly initialised draft (useful before training: output stays exact, acceptance is low)."""
    if token_map is not None:
        extra["draft_vocab_size"] = int(token_map.numel())
    cfg = draft_config_for(target_config, **extra)
    gen = torch.Generator().manual_seed(seed)
    draft = DraftHead(cfg, token_map)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, getattr(cfg, "initializer_range", 0.02), generator=gen)
    return draft


# -- files ---------------------------------------------------------------------------------
def save_draft(draft: DraftHead, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write model.safetensors + config.json atomically (temp file, then rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in draft.state_dict().items() if not k.startswith("rotary.")}
    cfg = draft.config.to_dict()
    cfg["architectures"] = ["HassDraftHead"]
    _atomic_write(folder / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    _atomic_write(folder / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2, default=str)))
    return folder


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


TOKEN_MAP_FILE = "token_map.pt"     # SGLang's --speculative-token-map file, written by hass.export


def _read_token_map(path: Path) -> torch.Tensor:
    """Target token ids from a token-map file: a tensor or list of ints, read without unpickling code."""
    try:
        ids = torch.load(path, map_location="cpu", weights_only=True)
        ids = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids)
    except Exception as exc:     # weights_only refuses anything but tensors and plain containers
        raise DraftLoadError(f"{path} is not a token map (a tensor or list of token ids): {exc}") from exc
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise DraftLoadError(f"{path}: a token map holds integer token ids, found {ids.dtype}")
    return ids.to(torch.long).flatten()


def _unfold_fc_bias(state: dict[str, torch.Tensor], weights: Path, no_fc_bias: bool) -> None:
    """Bring official-layout variants back to this head's keys, in place.

    EAGLE drafts trained without an fc bias (config `"bias": false`, the EAGLE repo's switch)
    have no `fc.bias`: a zero bias is the same function. A vLLM export (hass.export) carries
    the fc bias b folded into attention biases (q/k/v: W·b, o_proj: b), which is unfolded
    here after checking that it is one.
    """
    attn = "layers.0.self_attn."
    biases = {p: state.get(f"{attn}{p}.bias") for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if "fc.weight" in state and "fc.bias" not in state and (no_fc_bias or biases["o_proj"] is not None):
        state["fc.bias"] = torch.zeros(state["fc.weight"].shape[0], dtype=state["fc.weight"].dtype)
    if all(b is None for b in biases.values()):
        return
    if any(b is None for b in biases.values()) or "fc.bias" not in state:
        raise DraftLoadError(f"{weights}: attention biases other than a folded fc bias are not supported "
                             "(this draft head's attention has no biases)")
    b = biases["o_proj"].double()
    for p in ("q_proj", "k_proj", "v_proj"):
        w = state.get(f"{attn}{p}.weight")
        if w is None or w.shape[1] != b.shape[0]:
            return          # the key/shape check in load_draft reports it
        want = w.double() @ b
        tol = 1e-2 * float(want.abs().max()) + 1e-6       # the biases may be stored in fp16 / bf16
        if biases[p].shape != want.shape or float((biases[p].double() - want).abs().max()) > tol:
            raise DraftLoadError(f"{weights}: {attn}{p}.bias is not the fc bias folded through {p} "
                                 "(attention biases are only read as a folded fc bias)")
    state["fc.bias"] = (state["fc.bias"].double() + b).to(state["fc.bias"].dtype)
    for p in biases:
        del state[f"{attn}{p}.bias"]


def load_draft(folder: str | Path, target_config, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> DraftHead:
    """Load a draft folder (this project's, an SGLang/vLLM export, or the official EAGLE/HASS layout).

    Raises `DraftLoadError` with the reason for anything that does not fit the target.
    Only safetensors are read: pickled checkpoints are refused, never unpickled. A
    `token_map.pt` beside the weights (SGLang's token-map file) is read as plain tensor data.
    """
    folder = Path(folder).expanduser()
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise DraftLoadError(f"draft folder not found: {folder}")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")
                                                             if p.name != TOKEN_MAP_FILE]
        hint = f" (found {', '.join(pickled)}: pickled checkpoints are not loaded for safety; convert to safetensors)" \
            if pickled else ""
        raise DraftLoadError(f"{folder} has no model.safetensors{hint}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DraftLoadError(f"{weights} is not a readable safetensors file: {exc}") from exc
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if "lm_head.weight" in state:
        log.warning("%s: lm_head.weight is not used; this draft head scores with the target's lm_head "
                    "(the token map's rows)", weights)
    state = {k: v for k, v in state.items() if k not in _IGNORED_KEYS}
    token_map = state.pop("token_map", None)
    if token_map is None and (folder / TOKEN_MAP_FILE).is_file():     # an exported / FR-Spec style folder
        token_map = _read_token_map(folder / TOKEN_MAP_FILE)
    if token_map is not None:
        bad = token_map.ndim != 1 or token_map.numel() == 0 or int(token_map.min()) < 0 \
            or int(token_map.max()) >= target_config.vocab_size
        if bad:
            raise DraftLoadError(f"{weights}: token_map does not index this target's vocabulary "
                                 f"({target_config.vocab_size} tokens)")
    cfg = {}
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise DraftLoadError(f"{cfg_path} is not valid JSON: {exc}") from exc
    _unfold_fc_bias(state, weights, no_fc_bias=cfg.get("bias") is False)
    extra = cfg.get("hass", {}) or {}
    draft = DraftHead(draft_config_for(target_config, **extra), token_map)
    expected = {k: v.shape for k, v in draft.state_dict().items()
                if not k.startswith("rotary.") and k != "token_map"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DraftLoadError(f"{weights} does not fit a draft head: missing keys {missing[:6]}, "
                             f"unexpected keys {unexpected[:6]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise DraftLoadError(f"{weights}: {k} has shape {tuple(state[k].shape)}, this target needs "
                                 f"{tuple(shape)} (was the draft trained for another target?)")
    draft.load_state_dict(state, strict=False)
    return draft.to(device=device, dtype=dtype).eval()      # .to(dtype) leaves the integer token_map alone
