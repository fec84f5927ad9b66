"""Unpadded multi-sample attention (EMS-SD, method.md section 4): a per-sample KV store and a
packed forward.

Why: in a batch the samples accept different numbers of tokens per cycle. Padding every
sample to the longest tree and keeping the cache aligned computes padding tokens and reads
padded KV slots again in every later step. Here instead

* `SlotStore` holds one layer's keys/values as [rows, H_kv, capacity, D]; each sample (row)
  fills its own slots from 0, has its own valid length and writes new entries at its own
  offset (one index_put for all samples); nothing is realigned.
* the new tokens of all live samples go through the unmodified `transformers` model as ONE
  flat sequence (batch dim 1) with per-token `position_ids`;
* a custom attention function, registered through `transformers.AttentionInterface` and
  selected only for the duration of a packed call, runs SDPA per sample: the sample's query
  slice against views of its own slots [0, prefix + new) with its own block mask (causal for
  a prompt, the tree mask for verification). No padded slot and no other sample's key is
  ever read, every query sees at least itself (no fully masked row, no NaN), and a finished
  sample simply has no segment: it costs nothing.

Per-forward metadata (`PackedPlan`) travels as a forward kwarg, which `transformers` hands
down to the attention function unchanged.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache

from .attention import OWN_PREFIX, rows_attention_forward, switched_attention

log = logging.getLogger(__name__)

PACKED_ATTENTION = OWN_PREFIX + "packed"
PLAN_KWARG = "hass_plan"


# -- the per-forward layout ----------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """One sample's part of a packed forward.

    Queries are rows [start, start + length) of the packed sequence. The sample's keys are
    its slots [0, kv_len): the first `prefix` are visible to every query; the rest (this
    forward's new keys, and for draft trees the nodes written by earlier depths) are seen
    through `block` ([length, kv_len - prefix] bool, None = causal over new keys only).
    The new keys are written to slots [kv_len - length, kv_len).
    """

    row: int
    start: int
    length: int
    prefix: int
    kv_len: int
    block: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.length < 1 or self.prefix < 0 or self.kv_len < self.prefix + self.length:
            raise ValueError(f"inconsistent segment {self}")
        if self.block is None and self.kv_len != self.prefix + self.length:
            raise ValueError("a causal segment reads only its prefix and its own new keys")
        if self.block is not None and tuple(self.block.shape) != (self.length, self.kv_len - self.prefix):
            raise ValueError(f"block mask {tuple(self.block.shape)} does not fit {self.length} queries over "
                             f"{self.kv_len - self.prefix} keys")


@dataclass
class PackedPlan:
    """Segments of one packed forward plus what the cache and attention need, built once."""

    segments: list[Segment]
    rows: torch.Tensor          # [N] row of every packed token (where its K/V are written)
    slots: torch.Tensor         # [N] slot of every packed token
    masks: list[torch.Tensor | None] = field(default_factory=list)   # per segment, bool [length, kv_len]
    causal: list[bool] = field(default_factory=list)                 # per segment: SDPA is_causal

    @classmethod
    def build(cls, segments: Sequence[Segment], device: torch.device) -> "PackedPlan":
        start = 0
        rows, slots, masks, causal = [], [], [], []
        for seg in segments:
            if seg.start != start:
                raise ValueError("segments must tile the packed sequence in order")
            start += seg.length
            rows.append(torch.full((seg.length,), seg.row, dtype=torch.long))
            slots.append(torch.arange(seg.kv_len - seg.length, seg.kv_len))
            mask, is_causal = _full_mask(seg, device)
            masks.append(mask)
            causal.append(is_causal)
        return cls(list(segments), torch.cat(rows).to(device), torch.cat(slots).to(device), masks, causal)

    @property
    def tokens(self) -> int:
        return int(self.rows.shape[0])

    @property
    def max_kv(self) -> int:
        return max(s.kv_len for s in self.segments)


def _full_mask(seg: Segment, device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """The bool [length, kv_len] mask of a segment, or (None, is_causal) when SDPA needs none."""
    if seg.block is None:
        if seg.prefix == 0:
            return None, seg.length > 1               # square causal block: SDPA's own causal mask
        if seg.length == 1:
            return None, False                         # one query sees everything
        block = torch.ones(seg.length, seg.length, dtype=torch.bool, device=device).tril()
    else:
        block = seg.block.to(device=device, dtype=torch.bool)
    if seg.prefix == 0 and not bool(block.any(-1).all()):
        raise ValueError("a query row that sees no key would give NaN")
    pre = torch.ones(seg.length, seg.prefix, dtype=torch.bool, device=device)
    return torch.cat((pre, block), 1), False


# -- per-sample KV storage -----------------------------------------------------------------
class SlotStore:
    """Keys and values of one attention layer for several samples: [rows, H_kv, capacity, D].

    Capacity grows by doubling when a write needs more; slots beyond a sample's valid length
    are scratch (tree nodes under verification) and are overwritten later, never read.
    """

    def __init__(self, rows: int):
        self.rows = rows
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[2])

    def reserve(self, like: torch.Tensor, capacity: int) -> None:
        """Make room for `capacity` slots per row; `like` ([*, H, *, D]) gives heads, dim, dtype, device."""
        if self.keys is not None and capacity <= self.capacity:
            return
        new_cap = max(capacity, 2 * self.capacity, 16)
        shape = (self.rows, like.shape[1], new_cap, like.shape[-1])
        keys = like.new_zeros(shape)
        values = like.new_zeros(shape)
        if self.keys is not None:
            keys[:, :, :self.capacity] = self.keys
            values[:, :, :self.capacity] = self.values
        self.keys, self.values = keys, values

    def write(self, rows: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [1, H, N, D] of N packed tokens; token i goes to (rows[i], slots[i])."""
        self.reserve(k, int(slots.max()) + 1)
        self.keys[rows, :, slots] = k[0].transpose(0, 1)
        self.values[rows, :, slots] = v[0].transpose(0, 1)

    def move(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Compaction: slot src[i] of row rows[i] is copied to slot dst[i] (gathered first, so
        overlapping moves are safe)."""
        if self.keys is None or rows.numel() == 0:
            return
        self.keys[rows, :, dst] = self.keys[rows, :, src]
        self.values[rows, :, dst] = self.values[rows, :, src]


class PackedCache(Cache):
    """A `transformers` Cache with per-sample valid lengths, for packed (batch dim 1) forwards.

    `update` writes the new keys at each sample's own offsets (from the current plan) and
    returns the whole per-sample buffers; the packed attention function reads each sample's
    own slots only. `lengths[row]` is the number of committed (verified) tokens of a row.
    """

    def __init__(self, rows: int):
        super().__init__(layers=[])
        self.rows = rows
        self.lengths = [0] * rows
        self.stores: list[SlotStore] = []
        self.plan: PackedPlan | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.plan is None:
            raise RuntimeError("PackedCache is only used through packed_forward (it needs a plan)")
        while len(self.stores) <= layer_idx:
            self.stores.append(SlotStore(self.rows))
        store = self.stores[layer_idx]
        store.write(self.plan.rows, self.plan.slots, key_states, value_states)
        return store.keys, store.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths, default=0)

    def commit(self, rows: Sequence[int], counts: Sequence[int]) -> None:
        """The tokens just written after each row's valid length all stay (a prefill)."""
        for row, n in zip(rows, counts):
            self.lengths[row] += int(n)

    def keep(self, rows: Sequence[int], paths: Sequence[torch.Tensor]) -> None:
        """Per sample: the nodes `path` (relative to its valid length) move to the slots right
        after it, in order; its valid length grows by len(path). One gather per layer."""
        if not rows:
            return
        dev = self.stores[0].keys.device if self.stores else torch.device("cpu")
        r, src, dst = _moves(rows, paths, self.lengths, dev)
        for store in self.stores:
            store.move(r, src, dst)
        for row, path in zip(rows, paths):
            self.lengths[row] += int(path.shape[0])

    def memory_bytes(self) -> int:
        return sum(s.keys.numel() * s.keys.element_size() * 2 for s in self.stores if s.keys is not None)


def _moves(rows: Sequence[int], paths: Sequence[torch.Tensor], lengths: Sequence[int],
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, src, dst = [], [], []
    for row, path in zip(rows, paths):
        path = path.to("cpu", torch.long)
        base = lengths[row]
        r.append(torch.full((path.shape[0],), row, dtype=torch.long))
        src.append(path + base)
        dst.append(torch.arange(base, base + path.shape[0]))
    return torch.cat(r).to(device), torch.cat(src).to(device), torch.cat(dst).to(device)


# -- the attention function ----------------------------------------------------------------
def packed_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: PackedPlan,
                scaling: float | None = None) -> torch.Tensor:
    """query [1, Hq, N, D] packed; key/value [rows, H_kv, capacity, D] per sample.

    Returns [1, N, Hq, D] (the layout `transformers` attention functions return). Each
    segment reads only key[row, :, :kv_len]: no padding, no other sample.
    """
    n, hq, d = query.shape[2], query.shape[1], value.shape[-1]
    gqa = hq != key.shape[1]
    out = query.new_empty((1, n, hq, d))
    for seg, mask, causal in zip(plan.segments, plan.masks, plan.causal):
        s, e = seg.start, seg.start + seg.length
        o = F.scaled_dot_product_attention(
            query[:, :, s:e], key[seg.row:seg.row + 1, :, :seg.kv_len], value[seg.row:seg.row + 1, :, :seg.kv_len],
            attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=gqa)
        out[0, s:e] = o[0].transpose(0, 1)
    return out


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """The registered attention function: packed per-sample SDPA when the forward carries a
    plan; otherwise the attention the target runs outside packed calls (the rows kernel's
    where its layers carry it, else torch's SDPA), so another thread's ordinary forward on the
    same model, while a packed call has the implementation switched, gives what it gives
    without the switch."""
    plan = kwargs.pop(PLAN_KWARG, None)
    if plan is None:
        return rows_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError("packed attention is for inference (no dropout)")
    return packed_sdpa(query, key, value, plan, scaling), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
try:   # ordinary forwards that run while the switch is on get the exact sdpa mask
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
except ImportError:      # pragma: no cover - older transformers: packed calls pass their own mask anyway
    log.debug("no AttentionMaskInterface; ordinary forwards during a packed call use sdpa without a mask function")

def packed_attention(model: torch.nn.Module):
    """The packed attention implementation on `model` for the block (overlapping packed
    calls share one switch: `hass.attention.switched_attention`), restored after."""
    return switched_attention(model, PACKED_ATTENTION)


@torch.inference_mode()
def packed_forward(target, cache: PackedCache, tokens: torch.Tensor, positions: torch.Tensor, plan: PackedPlan,
                   logits_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the packed new tokens of several samples through the target in one forward.

    tokens/positions: [N]. Returns (logits [R, V] float for `logits_rows` (all rows when
    None), features [N, H]). The stock decoder runs unchanged; only its attention function
    and its cache are ours. `target` is a `hass.target.Target`.
    """
    if tokens.shape[0] != plan.tokens:
        raise ValueError(f"{tokens.shape[0]} packed tokens but the plan covers {plan.tokens}")
    decoder = target.model.get_decoder()
    dev = tokens.device
    # a prepared 4D mask makes `transformers` skip its own mask construction; the packed
    # attention function ignores it and uses the plan's per-sample masks
    placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=dev)
    cache.plan = plan
    try:
        with packed_attention(target.model):
            out = decoder(input_ids=tokens[None], past_key_values=cache, position_ids=positions[None],
                          attention_mask=placeholder, use_cache=True, **{PLAN_KWARG: plan})
    finally:
        cache.plan = None
    feats = out.last_hidden_state[0]
    rows = feats if logits_rows is None else feats[logits_rows.to(dev)]
    return target.lm_head(rows).float(), feats


__all__ = ["PACKED_ATTENTION", "PackedCache", "PackedPlan", "Segment", "SlotStore", "packed_attention",
           "packed_forward", "packed_sdpa"]
