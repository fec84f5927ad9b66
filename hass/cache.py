"""KV-cache compaction: keep the accepted tree nodes, in order, right after the prefix."""
from __future__ import annotations

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

KV = tuple[torch.Tensor, torch.Tensor]


@torch.inference_mode()
def compact(cache: Cache, prefix_len: int, keep: torch.Tensor) -> None:
    """In place: slots prefix_len + keep move to prefix_len.., everything after is dropped.

    `keep` are node indices relative to the prefix (the accepted path, root first).
    """
    idx = keep.to(torch.long) + prefix_len
    new_len = prefix_len + keep.shape[0]
    # a path along the first nodes (0, 1, .., k: the root alone, a chain's accepted prefix)
    # is already in place: cut the rest off, move nothing
    in_place = keep.tolist() == list(range(keep.shape[0]))
    for layer in cache.layers:
        if not hasattr(layer, "keys") or layer.keys is None:
            raise NotImplementedError(f"cache layer {type(layer).__name__} cannot be compacted")
        for name in ("keys", "values"):
            t = getattr(layer, name)
            if in_place:
                setattr(layer, name, t[..., :new_len, :])
                continue
            kept = t.index_select(-2, idx)
            t = t[..., :new_len, :]
            t[..., prefix_len:, :] = kept
            setattr(layer, name, t)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes into a buffer with spare room instead of concatenating.

    `DynamicLayer.update` copies the whole cache on every forward (torch.cat); on a CPU that
    copy and its allocation are a measurable part of a decode step. Here `keys`/`values` are views of a
    buffer that grows by doubling, so a step writes only its new slots. Crop and compaction
    keep working because they slice or write through those views.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.numel() else 0
        if self._kbuf is not None and n and self.keys.data_ptr() != self._kbuf.data_ptr():
            self._kbuf = self._vbuf = None       # replaced from outside (e.g. reordered): adopt it
        need = n + key_states.shape[-2]
        if self._kbuf is None or need > self._kbuf.shape[-2] or key_states.shape[:-2] != self._kbuf.shape[:-2]:
            cap = max(2 * need, need + 256)
            shape = (*key_states.shape[:-2], cap, key_states.shape[-1])
            kbuf, vbuf = key_states.new_empty(shape), value_states.new_empty(shape)
            if n:
                kbuf[..., :n, :] = self.keys
                vbuf[..., :n, :] = self.values
            self._kbuf, self._vbuf = kbuf, vbuf
        self._kbuf[..., n:need, :] = key_states
        self._vbuf[..., n:need, :] = value_states
        self.keys, self.values = self._kbuf[..., :need, :], self._vbuf[..., :need, :]
        return self.keys, self.values


def new_cache(config) -> DynamicCache:
    """A stock DynamicCache whose full-attention layers are `GrowingLayer`s."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def cache_length(cache: Cache) -> int:
    return cache.get_seq_length()


def append_kv(past: KV | None, new: KV) -> KV:
    """The draft's own cache: a (keys, values) pair grown along the sequence axis."""
    if past is None:
        return new
    return torch.cat((past[0], new[0]), dim=2), torch.cat((past[1], new[1]), dim=2)
