"""KV-cache compaction: keep the accepted tree nodes, in order, right after the prefix."""
from __future__ import annotations

import torch
from transformers import Cache

KV = tuple[torch.Tensor, torch.Tensor]


@torch.inference_mode()
def compact(cache: Cache, prefix_len: int, keep: torch.Tensor) -> None:
    """In place: slots prefix_len + keep move to prefix_len.., everything after is dropped.

    `keep` are node indices relative to the prefix (the accepted path, root first).
    """
    idx = keep.to(torch.long) + prefix_len
    new_len = prefix_len + keep.shape[0]
    for layer in cache.layers:
        if not hasattr(layer, "keys") or layer.keys is None:
            raise NotImplementedError(f"cache layer {type(layer).__name__} cannot be compacted")
        for name in ("keys", "values"):
            t = getattr(layer, name)
            kept = t.index_select(-2, idx)
            t = t[..., :new_len, :]
            t[..., prefix_len:, :] = kept
            setattr(layer, name, t)


def cache_length(cache: Cache) -> int:
    return cache.get_seq_length()


def append_kv(past: KV | None, new: KV) -> KV:
    """The draft's own cache: a (keys, values) pair grown along the sequence axis."""
    if past is None:
        return new
    return torch.cat((past[0], new[0]), dim=2), torch.cat((past[1], new[1]), dim=2)
