"""The target's attention on a CPU: the rows kernel's, or grouped-query SDPA kept in torch's kernel.

transformers' `sdpa` attention copies every key/value head `num_key_value_groups` times
(`repeat_kv`) whenever the forward carries a mask, because on CUDA a masked grouped-query
SDPA falls back to the slow math kernel. A one-token decode step has no mask and skips the
copy; a tree verification has one, so on a CPU it re-copied the whole KV cache in every
layer, a cost plain decoding never pays (the default model has 3 KV heads for 9 query heads).
Torch's CPU kernel takes a mask and `enable_gqa` together, so `GQA_ATTENTION` is `sdpa` with
grouped queries kept in the kernel there; everything else (no mask, no grouping, another
device) goes to transformers' own `sdpa` unchanged. `python -m hass cost` measures the verify
cost curve on whichever attention the target runs.

A target on the rows kernel runs `ROWS_ATTENTION` instead (`hass.rowkernel.rows_attention`):
each query row computed alone in a fixed order, so a verify forward's rows are bit for bit
the one-token steps'; what it does not cover goes to `gqa_sdpa_forward`.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .rowkernel import attention_kernel, rows_attention, rows_unavailable

OWN_PREFIX = "hass_"                        # the names of this project's attention functions start with it
GQA_ATTENTION = OWN_PREFIX + "sdpa_gqa"
ROWS_ATTENTION = OWN_PREFIX + "rows"
ROWS_MAX_QUERIES = 256      # longer calls (prefills) go to torch's blocked kernel, alike in every mode


def gqa_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns [B, N, H, D] as `sdpa` does."""
    if (attention_mask is None or not query.is_cpu or query.shape[1] == key.shape[1]
            or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GQA_ATTENTION, gqa_sdpa_forward)
try:   # masks are built for it exactly as for sdpa (None where sdpa's causal flag suffices)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
except ImportError:      # pragma: no cover - older transformers
    pass


def rows_attention_covers(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          mask: torch.Tensor | None) -> bool:
    """Whether `hass.rowkernel.rows_attention` computes this call: one sequence of at most
    ROWS_MAX_QUERIES queries, fp32 on a CPU, grouped heads, a head size in whole vectors, and
    no mask (causal), an additive float one or a boolean one [1, 1, n, >= keys]."""
    n = query.shape[2]
    return (query.is_cpu and query.dtype == torch.float32 and key.dtype == torch.float32
            and value.dtype == torch.float32 and query.shape[0] == 1 and n <= ROWS_MAX_QUERIES
            and n <= key.shape[2] and query.shape[3] % 8 == 0 and query.shape[1] % key.shape[1] == 0
            and (mask is None or (mask.dtype in (torch.float32, torch.bool) and mask.dim() == 4
                                  and mask.shape[0] == 1 and mask.shape[1] == 1 and mask.shape[3] >= key.shape[2])))


def rows_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature, on the rows kernel's attention
    (`hass.rowkernel.rows_attention`): each query row computed alone, so a verify forward's
    row is bit for bit the one-token step's. Calls it does not cover (`rows_attention_covers`;
    dropout, sliding windows, soft caps or sinks) go to `gqa_sdpa_forward`."""
    kernel = getattr(module, "_hass_rows_attention", None)
    if (kernel is None or (dropout and module.training)
            or any(kwargs.get(name) is not None for name in ("sliding_window", "softcap", "s_aux", "position_bias"))
            or not rows_attention_covers(query, key, value, attention_mask)):
        return gqa_sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = query.shape[3] ** -0.5 if scaling is None else scaling
    return rows_attention(query, key, value, attention_mask, scale, kernel), None


AttentionInterface.register(ROWS_ATTENTION, rows_attention_forward)
try:
    AttentionMaskInterface.register(ROWS_ATTENTION, sdpa_mask)
except NameError:        # pragma: no cover - older transformers
    pass


def use_rows_attention(model: torch.nn.Module, device: torch.device) -> bool:
    """On a CPU fp32 model whose attention is transformers' `sdpa` (or this project's grouped
    variant), switch to `ROWS_ATTENTION` when the rows kernel runs here; return whether it did."""
    cfg = getattr(model, "config", None)
    if (device.type != "cpu" or getattr(cfg, "_attn_implementation", None) not in ("sdpa", GQA_ATTENTION)
            or next(model.parameters()).dtype != torch.float32):
        return False
    if rows_unavailable() is not None:
        return False
    give_rows_attention(model)
    model.set_attn_implementation(ROWS_ATTENTION)
    return True


def give_rows_attention(model: torch.nn.Module) -> None:
    """Each attention layer of the model (a module with q_proj and o_proj) keeps the rows
    kernel's attention entry point at hand (`_hass_rows_attention`: a lookup per call is slow)."""
    kernel = attention_kernel()
    for module in model.modules():
        if hasattr(module, "o_proj") and hasattr(module, "q_proj"):
            module._hass_rows_attention = kernel


def use_attention(model: torch.nn.Module, device: torch.device, kernels: str) -> str:
    """The attention a loaded target runs: the rows kernel's beside its linear layers (so a
    verify forward is bit for bit the plain steps'), else torch's grouped SDPA on a CPU, else
    what it had; returns its name."""
    if not (kernels == "rows" and use_rows_attention(model, device)):
        use_gqa_attention(model, device)
    return model.config._attn_implementation


def use_gqa_attention(model: torch.nn.Module, device: torch.device) -> bool:
    """On a CPU, switch a model that runs transformers' `sdpa` with grouped queries to
    `GQA_ATTENTION`; return whether it was switched."""
    cfg = getattr(model, "config", None)
    heads, kv_heads = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if (device.type != "cpu" or getattr(cfg, "_attn_implementation", None) != "sdpa"
            or not heads or not kv_heads or heads == kv_heads):
        return False
    model.set_attn_implementation(GQA_ATTENTION)
    return True


_SWITCH_LOCK = threading.Lock()
_SWITCH_ATTR = "_hass_attention_switch"     # on the model: (implementation, active blocks, one to restore)


@contextmanager
def switched_attention(model: torch.nn.Module, implementation: str) -> Iterator[None]:
    """`model` runs `implementation` for the block, restored after. Reference-counted on the
    model, so overlapping blocks that ask for the same implementation (two threads' packed
    batches) share one switch; asking for another one while a switch is held is an error,
    not a silent change of what the other block runs."""
    with _SWITCH_LOCK:
        held = getattr(model, _SWITCH_ATTR, None)
        if held is None:
            previous = model.config._attn_implementation
            if previous != implementation:
                model.set_attn_implementation(implementation)
            held = (implementation, 0, previous)
        elif held[0] != implementation:
            raise RuntimeError(f"attention is switched to {held[0]!r} by another block; cannot switch to "
                               f"{implementation!r} now")
        setattr(model, _SWITCH_ATTR, (implementation, held[1] + 1, held[2]))
    try:
        yield
    finally:
        with _SWITCH_LOCK:
            name, count, previous = getattr(model, _SWITCH_ATTR)
            if count == 1:
                delattr(model, _SWITCH_ATTR)
                if previous != name:
                    model.set_attn_implementation(previous)
            else:
                setattr(model, _SWITCH_ATTR, (name, count - 1, previous))


def stock_attention(model: torch.nn.Module):
    """transformers' own `sdpa` for the block where the model runs one of this project's
    attention functions (named with `OWN_PREFIX`), for callers that accept only the
    stock names (the continuous-batching engine of `generate_batch`); a model on a stock
    implementation keeps it."""
    if str(getattr(getattr(model, "config", None), "_attn_implementation", "")).startswith(OWN_PREFIX):
        return switched_attention(model, "sdpa")
    return nullcontext()


__all__ = ["GQA_ATTENTION", "OWN_PREFIX", "ROWS_ATTENTION", "give_rows_attention", "gqa_sdpa_forward",
           "rows_attention_covers", "rows_attention_forward", "stock_attention", "switched_attention", "use_attention",
           "use_gqa_attention", "use_rows_attention"]
