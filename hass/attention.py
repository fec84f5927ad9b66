"""Grouped-query attention under a tree mask, kept inside torch's kernel on a CPU.

transformers' `sdpa` attention copies every key/value head `num_key_value_groups` times
(`repeat_kv`) whenever the forward carries a mask, because on CUDA a masked grouped-query
SDPA falls back to the slow math kernel. A one-token decode step has no mask and skips the
copy; a tree verification has one, so on a CPU it re-copied the whole KV cache in every
layer, a cost plain decoding never pays (the default model has 3 KV heads for 9 query heads).
Torch's CPU kernel takes a mask and `enable_gqa` together, so `GQA_ATTENTION` is `sdpa` with
grouped queries kept in the kernel there; everything else (no mask, no grouping, another
device) goes to transformers' own `sdpa` unchanged. `python -m hass cost` measures the verify
cost curve on whichever attention the target runs.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

OWN_PREFIX = "hass_"                        # the names of this project's attention functions start with it
GQA_ATTENTION = OWN_PREFIX + "sdpa_gqa"


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


__all__ = ["GQA_ATTENTION", "OWN_PREFIX", "gqa_sdpa_forward", "stock_attention", "switched_attention", "use_gqa_attention"]
