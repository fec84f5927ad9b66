"""Drafting for several samples at once: one packed draft forward per tree depth.

Why batched: on a CPU the draft's cost is dominated by reading weights, above all the
target's lm_head (vocab x hidden) that turns every expanded node into log-probs. One packed
forward and one lm_head GEMM for all live samples read them once per depth instead of once
per sample. The draft KV is unpadded like the target's (`SlotStore`): each sample has its
own valid length, tree nodes are written after it as scratch, and each sample's queries
attend only to its own slots.

The tree logic is `hass.candidates.Growth`, the same object `hass.drafting.Drafter.grow`
drives for batch 1 (only the KV layout differs), per sample; `LoopDrafter` keeps one
`Drafter` per sample behind the same interface, for draft modules that are not a
`DraftHead` (test doubles) and as the reference the batched one is tested against.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .draft import DraftHead, OutputHead
from .candidates import Growth, Pool
from .drafting import Drafter
from .kernels import follow_target
from .packed import PackedPlan, Segment, SlotStore


@dataclass(frozen=True)
class ExtendItem:
    """Verified pairs (f_t, x_{t+1}) for t = start .. start + m - 1 of one sample."""

    row: int
    features: torch.Tensor     # [m, H]
    tokens: torch.Tensor       # [m]
    start: int


@dataclass(frozen=True)
class GrowItem:
    """Grow one sample's tree from `root` at sequence position `prefix`, at most `depth` deep
    (`perturb`: the sample's coupled-sampling draft side, `hass.noise.draft_perturbation`)."""

    row: int
    root: int
    prefix: int
    depth: int
    perturb: Callable[[torch.Tensor, int], torch.Tensor] | None = None


class LoopDrafter:
    """One batch-1 `Drafter` per sample: works with any draft module."""

    def __init__(self, draft: torch.nn.Module, embed: torch.nn.Module, lm_head: torch.nn.Module, rows: int):
        self.drafters = [Drafter(draft, embed, lm_head) for _ in range(rows)]

    @property
    def token_map(self) -> torch.Tensor | None:
        return self.drafters[0].token_map

    def extend(self, items: Sequence[ExtendItem]) -> None:
        for it in items:
            self.drafters[it.row].extend(it.features[None], it.tokens[None], it.start)

    def grow(self, items: Sequence[GrowItem], top_k: int,
             frontier_width: Callable[[Growth], int] | None = None) -> dict[int, Pool]:
        return {it.row: self.drafters[it.row].grow(it.root, it.prefix, top_k, it.depth, frontier_width, it.perturb)
                for it in items}


class BatchDrafter:
    """The draft head over several samples' unpadded KV: packed extend and packed tree growth."""

    def __init__(self, draft: DraftHead, embed: torch.nn.Module, lm_head: torch.nn.Module, rows: int):
        if not isinstance(draft, DraftHead):
            raise TypeError("batched drafting needs a DraftHead; use LoopDrafter for other draft modules")
        self.draft, self.embed = draft, embed
        pack = follow_target(draft, lm_head)
        self.head = OutputHead(lm_head, draft.token_map, dtype=draft.fc.weight.dtype, pack=pack)
        self.store = SlotStore(rows)
        self.lengths = [0] * rows
        self.last_out: torch.Tensor | None = None       # [rows, H]: the draft's guess of f at each root

    @property
    def token_map(self) -> torch.Tensor | None:
        return self.head.token_map

    def log_probs(self, out: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head.logits(out).float(), dim=-1)   # ranks in fp32 whatever the draft's dtype

    def _forward(self, segments: list[Segment], features: torch.Tensor, tokens: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """One packed draft-layer forward; writes the new K/V; returns outputs [N, H]."""
        dev = features.device
        plan = PackedPlan.build(segments, dev)
        draft = self.draft
        dt = draft.fc.weight.dtype              # the draft may run in a lower precision than the target
        x = draft.fuse(features[None].to(dt), self.embed(tokens)[None].to(dt))
        cos, sin = draft.rotary(x, positions[None])
        attn = draft.layer.self_attn
        k, v = attn.project_kv(x, cos, sin)
        self.store.write(plan.rows, plan.slots, k, v)
        outs = []
        for seg in segments:
            s, e = seg.start, seg.start + seg.length
            block = seg.block if seg.block is not None else \
                torch.ones(seg.length, seg.length, dtype=torch.bool, device=dev).tril()
            mask = torch.cat((torch.ones(seg.length, seg.prefix, dtype=torch.bool, device=dev), block), 1)
            kk = self.store.keys[seg.row:seg.row + 1, :, :seg.kv_len]
            vv = self.store.values[seg.row:seg.row + 1, :, :seg.kv_len]
            outs.append(attn.attend(x[:, s:e], cos[:, s:e], sin[:, s:e], kk, vv, mask[None, None]))
        return draft.layer.finish(x, torch.cat(outs, 1))[0]

    @torch.inference_mode()
    def extend(self, items: Sequence[ExtendItem]) -> None:
        """Feed verified pairs of several samples in one forward; each sample's draft cache grows."""
        if not items:
            return
        segs, start = [], 0
        for it in items:
            if it.start != self.lengths[it.row]:
                raise AssertionError(f"row {it.row}: extend at {it.start} but the draft holds {self.lengths[it.row]}")
            m = int(it.tokens.shape[0])
            segs.append(Segment(it.row, start, m, it.start, it.start + m))
            start += m
        feats = torch.cat([it.features for it in items])
        toks = torch.cat([it.tokens for it in items])
        pos = torch.cat([torch.arange(it.start, it.start + it.tokens.shape[0]) for it in items]).to(feats.device)
        out = self._forward(segs, feats, toks, pos)
        if self.last_out is None:
            self.last_out = out.new_zeros((self.store.rows, out.shape[-1]))
        for it, seg in zip(items, segs):
            self.lengths[it.row] += seg.length
            self.last_out[it.row] = out[seg.start + seg.length - 1]

    @torch.inference_mode()
    def grow(self, items: Sequence[GrowItem], top_k: int,
             frontier_width: Callable[[Growth], int] | None = None) -> dict[int, Pool]:
        """EAGLE-2 growth per sample (`hass.candidates.Growth`, as batch 1), every depth one
        packed forward and one lm_head GEMM for all samples still growing."""
        pools: dict[int, Pool] = {}
        dev = self.last_out.device if self.last_out is not None else torch.device("cpu")
        live = []
        for it in items:
            if it.prefix != self.lengths[it.row]:
                raise AssertionError(f"row {it.row}: tree at {it.prefix} but the draft holds {self.lengths[it.row]}")
            if it.depth <= 0:
                pools[it.row] = Pool.empty(it.root, dev)
            else:
                live.append(it)
        if not live:
            return pools
        rows = torch.tensor([it.row for it in live], device=dev)
        first = self.log_probs(self.last_out[rows])                      # [S, V]: one GEMM
        growths = [Growth(it.root, it.prefix, it.depth, top_k, self.last_out[it.row], first[i], self.head.to_target,
                          it.perturb) for i, it in enumerate(live)]
        rows_of = {id(g): it.row for g, it in zip(growths, live)}
        while True:
            growing = [g for g in growths if g.goes_on(frontier_width)]
            for g in growths:
                if g not in growing:
                    g.depth = g.grown                  # stopped: never resumed in a later round
            if not growing:
                break
            segs, start, blocks, feats, toks, pos = [], 0, [], [], [], []
            for g in growing:
                f, t, block, p = g.frontier_inputs()
                kf = int(t.shape[0])
                segs.append(Segment(rows_of[id(g)], start, kf, g.prefix, g.prefix + g.written + kf, block))
                blocks.append(block)
                feats.append(f)
                toks.append(t)
                pos.append(torch.full((kf,), p, device=dev))
                start += kf
            out = self._forward(segs, torch.cat(feats), torch.cat(toks), torch.cat(pos))
            lp_all = self.log_probs(out)                                 # one GEMM for all samples
            for g, seg, block in zip(growing, segs, blocks):
                sl = slice(seg.start, seg.start + seg.length)
                g.advance(out[sl], lp_all[sl], block)
        for g, it in zip(growths, live):
            pools[it.row] = g.pool()
        return pools


def make_drafter(draft: torch.nn.Module, embed: torch.nn.Module, lm_head: torch.nn.Module, rows: int,
                 mode: str = "auto") -> BatchDrafter | LoopDrafter:
    """'batched' (one packed forward per depth), 'loop' (a Drafter per sample) or 'auto'
    (batched for a DraftHead, else loop)."""
    if mode not in ("auto", "batched", "loop"):
        raise ValueError(f"drafting must be auto, batched or loop, got {mode!r}")
    if mode == "loop" or (mode == "auto" and not isinstance(draft, DraftHead)):
        return LoopDrafter(draft, embed, lm_head, rows)
    return BatchDrafter(draft, embed, lm_head, rows)


__all__ = ["BatchDrafter", "ExtendItem", "GrowItem", "LoopDrafter", "make_drafter"]
