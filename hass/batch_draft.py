"""Drafting for several samples at once: one packed draft forward per tree depth.

Why batched: on a CPU the draft's cost is dominated by reading weights, above all the
target's lm_head (vocab x hidden) that turns every expanded node into log-probs. One packed
forward and one lm_head GEMM for all live samples read them once per depth instead of once
per sample. The draft KV is unpadded like the target's (`SlotStore`): each sample has its
own valid length, tree nodes are written after it as scratch, and each sample's queries
attend only to its own slots.

The tree logic is EAGLE-2 exactly as `hass.drafting.Drafter.grow` does it (same pure
functions from `hass.tree`, same order of candidates), per sample; `LoopDrafter` keeps one
`Drafter` per sample behind the same interface, for draft modules that are not a
`DraftHead` (test doubles) and as the reference the batched one is tested against.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .draft import DraftHead, OutputHead
from .drafting import Drafter, TreeTensors
from .kernels import follow_target
from .packed import PackedPlan, Segment, SlotStore
from .tree import TreeConfig, best, expand, remap_parents


@dataclass(frozen=True)
class ExtendItem:
    """Verified pairs (f_t, x_{t+1}) for t = start .. start + m - 1 of one sample."""

    row: int
    features: torch.Tensor     # [m, H]
    tokens: torch.Tensor       # [m]
    start: int


@dataclass(frozen=True)
class GrowItem:
    """Grow one sample's tree from `root` at sequence position `prefix`, at most `depth` deep."""

    row: int
    root: int
    prefix: int
    depth: int


def _root_only(root: int, dev: torch.device) -> TreeTensors:
    z = torch.zeros(1, device=dev)
    return TreeTensors(torch.tensor([root], device=dev), torch.tensor([-1], device=dev),
                       torch.zeros(1, dtype=torch.long, device=dev), z, torch.ones(1, device=dev))


class LoopDrafter:
    """One batch-1 `Drafter` per sample: works with any draft module."""

    def __init__(self, draft: torch.nn.Module, embed: torch.nn.Module, lm_head: torch.nn.Module, rows: int):
        self.drafters = [Drafter(draft, embed, lm_head) for _ in range(rows)]

    def extend(self, items: Sequence[ExtendItem]) -> None:
        for it in items:
            self.drafters[it.row].extend(it.features[None], it.tokens[None], it.start)

    def grow(self, items: Sequence[GrowItem], cfg: TreeConfig) -> dict[int, TreeTensors]:
        return {it.row: self.drafters[it.row].grow(it.root, it.prefix, cfg, it.depth) for it in items}


@dataclass
class _Tree:
    """One sample's EAGLE-2 growth state (the locals of `Drafter.grow`)."""

    row: int
    root: int
    prefix: int
    depth: int
    toks: list[torch.Tensor]
    scores: list[torch.Tensor]
    local: list[torch.Tensor]
    parents: list[torch.Tensor]
    depths: list[torch.Tensor]
    frontier: torch.Tensor
    front_feat: torch.Tensor
    front_anc: torch.Tensor
    n_cand: int
    written: int = 0          # tree nodes already in the draft store after `prefix`

    @property
    def all_tok(self) -> torch.Tensor:
        return torch.cat(self.toks)

    @property
    def all_score(self) -> torch.Tensor:
        return torch.cat(self.scores)


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
    def grow(self, items: Sequence[GrowItem], cfg: TreeConfig) -> dict[int, TreeTensors]:
        """EAGLE-2 per sample (see `Drafter.grow`), every depth one packed forward and one
        lm_head GEMM for all samples still growing."""
        out_trees: dict[int, TreeTensors] = {}
        dev = self.last_out.device if self.last_out is not None else torch.device("cpu")
        live = []
        for it in items:
            if it.prefix != self.lengths[it.row]:
                raise AssertionError(f"row {it.row}: tree at {it.prefix} but the draft holds {self.lengths[it.row]}")
            if it.depth <= 0:
                out_trees[it.row] = _root_only(it.root, dev)
            else:
                live.append(it)
        if not live:
            return out_trees
        k = cfg.top_k
        rows = torch.tensor([it.row for it in live], device=dev)
        first = self.log_probs(self.last_out[rows])                      # [S, V]: one GEMM
        trees: list[_Tree] = []
        for i, it in enumerate(live):
            tok, score, _ = expand(torch.zeros(1, device=dev), first[i:i + 1], k)
            tok = self.head.to_target(tok)
            trees.append(_Tree(
                row=it.row, root=it.root, prefix=it.prefix, depth=it.depth, toks=[tok], scores=[score],
                local=[score], parents=[torch.full_like(tok, -1)], depths=[torch.ones_like(tok)],
                frontier=torch.arange(tok.shape[0], device=dev),
                front_feat=self.last_out[it.row:it.row + 1].expand(tok.shape[0], -1),
                front_anc=torch.zeros(tok.shape[0], 0, dtype=torch.bool, device=dev), n_cand=int(tok.shape[0])))
        for d in range(1, max(t.depth for t in trees)):
            growing = [t for t in trees if t.depth > d]
            segs, start, node_ancs = [], 0, []
            for t in growing:
                kf = int(t.frontier.shape[0])
                self_mask = torch.eye(kf, dtype=torch.bool, device=dev)
                block = torch.cat((t.front_anc, self_mask), 1)
                segs.append(Segment(t.row, start, kf, t.prefix, t.prefix + t.written + kf, block))
                node_ancs.append(block)
                start += kf
            feats = torch.cat([t.front_feat for t in growing])
            toks = torch.cat([t.all_tok[t.frontier] for t in growing])
            pos = torch.cat([torch.full((int(t.frontier.shape[0]),), t.prefix + d - 1, device=dev) for t in growing])
            out = self._forward(segs, feats, toks, pos)
            lp_all = self.log_probs(out)                                 # one GEMM for all samples
            for t, seg, node_anc in zip(growing, segs, node_ancs):
                o = out[seg.start:seg.start + seg.length]
                lp = lp_all[seg.start:seg.start + seg.length]
                t.written += seg.length
                all_score = t.all_score
                ctok, cscore, crow = expand(all_score[t.frontier], lp, k)
                ctok = self.head.to_target(ctok)
                t.toks.append(ctok)
                t.scores.append(cscore)
                t.local.append(cscore - all_score[t.frontier][crow])
                t.parents.append(t.frontier[crow])
                t.depths.append(torch.full_like(ctok, d + 1))
                pick = best(cscore, k)
                t.frontier = t.n_cand + pick
                t.front_feat = o[crow[pick]]
                t.front_anc = node_anc[crow[pick]]
                t.n_cand += int(ctok.shape[0])
        for t in trees:
            all_tok, all_score = t.all_tok, t.all_score
            cand_parents, cand_depths, cand_local = torch.cat(t.parents), torch.cat(t.depths), torch.cat(t.local)
            sel = best(all_score, cfg.total_tokens - 1)
            out_trees[t.row] = TreeTensors(
                tokens=torch.cat((torch.tensor([t.root], device=dev), all_tok[sel])),
                parents=remap_parents(sel, cand_parents),
                depths=torch.cat((torch.zeros(1, dtype=torch.long, device=dev), cand_depths[sel])),
                logp=torch.cat((torch.zeros(1, device=dev), all_score[sel])),
                prob=torch.cat((torch.ones(1, device=dev), cand_local[sel].exp())),
            )
        return out_trees


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
