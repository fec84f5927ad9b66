"""Candidates for one speculative step, from two sources, merged into one ranked pool.

* The **draft source** is EAGLE-2 growth (`Growth`): from the draft head's guess at the
  root, expand the top_k frontier per depth; every child proposed is recorded with its
  cumulative draft log-prob, parent and depth. `Growth` holds one sample's state and does
  not run the model: `hass.drafting.Drafter` (batch 1) and `hass.batch_draft.BatchDrafter`
  (one packed forward for several samples) feed it the draft outputs of each depth, so the
  EAGLE-2 rule is written once.
* The **lookup source** (`lookup`): the tokens that followed the latest earlier occurrence
  of the context's last n tokens (n-gram / prompt lookup); free to propose, strong on text
  that copies its context.

`merge_lookup` hangs the lookup continuation under the root, reusing identical draft
nodes, so a token is proposed once under a parent whichever source found it. The pool is
then cut to a tree by `hass.fit` (the node values and how many nodes to verify). Candidate
indices are topological (a parent's index is below its children's), which every selection
relies on.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .tree import best, expand

DRAFT, LOOKUP = 1, 2          # origin bits: a node found by both sources has both
ORIGIN_NAMES = {DRAFT: "draft", LOOKUP: "lookup", DRAFT | LOOKUP: "both"}


@dataclass(frozen=True)
class Pool:
    """All candidates of one step (the root excluded), topological.

    parents: candidate index of the parent, -1 for the root's children; score: cumulative
    draft log-prob (a lookup-only node carries its parent's); local: draft probability given
    the parent (0 for lookup-only nodes); origin: DRAFT | LOOKUP bits; lookup_depth: the
    node's place on the lookup chain (0 when not on it).
    """

    root: int
    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    score: torch.Tensor
    local: torch.Tensor
    origin: torch.Tensor
    lookup_depth: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @staticmethod
    def empty(root: int, device: torch.device) -> "Pool":
        z = torch.zeros(0, device=device)
        zl = torch.zeros(0, dtype=torch.long, device=device)
        return Pool(root, zl, zl, zl, z, z, zl, zl)


class Growth:
    """One sample's EAGLE-2 growth: the frontier, its features and ancestor rows, and every
    candidate so far. The model calls happen outside (`frontier_inputs` -> draft forward ->
    `advance`), so batch 1 and batch N grow trees by the same rule.

    `perturb(logp, position)`, when given, replaces the draft's log-probs of the children at
    sequence `position` before they are ranked (coupled sampling: `hass.noise`)."""

    def __init__(self, root: int, prefix: int, depth: int, top_k: int, root_out: torch.Tensor,
                 root_logp: torch.Tensor, to_target, perturb: Callable[[torch.Tensor, int], torch.Tensor] | None = None):
        dev = root_out.device
        self.root, self.prefix, self.depth, self.k = root, prefix, depth, top_k
        self.to_target = to_target
        self.perturb = perturb
        if perturb is not None:
            root_logp = perturb(root_logp, prefix + 1)
        tok, score, _ = expand(torch.zeros(1, device=dev), root_logp[None], top_k)
        tok = to_target(tok)
        self.toks, self.scores, self.local = [tok], [score], [score]
        self.parents = [torch.full_like(tok, -1)]
        self.depths = [torch.ones_like(tok)]
        self.frontier = torch.arange(tok.shape[0], device=dev)                 # candidate indices
        self.front_feat = root_out[None].expand(tok.shape[0], -1)              # f^ of each frontier node's parent
        self.front_anc = torch.zeros(tok.shape[0], 0, dtype=torch.bool, device=dev)   # rows over expanded nodes
        self.n_cand = int(tok.shape[0])
        self.grown = 1                                                        # depths proposed so far
        self.written = 0                                                      # expanded nodes (draft scratch KV)
        self._all_tok, self._all_score = tok, score

    @property
    def all_tok(self) -> torch.Tensor:
        return self._all_tok

    @property
    def all_score(self) -> torch.Tensor:
        """Cumulative draft log-probs of every candidate so far."""
        return self._all_score

    def frontier_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(parent features [kf, H], frontier tokens [kf], the frontier's mask over the
        expanded nodes incl. itself [kf, written + kf], rotary position) of the next depth."""
        kf = int(self.frontier.shape[0])
        self_mask = torch.eye(kf, dtype=torch.bool, device=self.frontier.device)
        block = torch.cat((self.front_anc, self_mask), 1)
        return self.front_feat, self.all_tok[self.frontier], block, self.prefix + self.grown - 1

    def advance(self, out: torch.Tensor, logp: torch.Tensor, block: torch.Tensor) -> None:
        """Take the draft outputs [kf, H] and log-probs [kf, V] of the frontier (as given by
        `frontier_inputs`); record its children and pick the next frontier."""
        d = self.grown
        if self.perturb is not None:
            logp = self.perturb(logp, self.prefix + d + 1)
        frontier_score = self._all_score[self.frontier]
        ctok, cscore, crow = expand(frontier_score, logp, self.k)
        ctok = self.to_target(ctok)
        self.toks.append(ctok)
        self.scores.append(cscore)
        self.local.append(cscore - frontier_score[crow])
        self.parents.append(self.frontier[crow])
        self.depths.append(torch.full_like(ctok, d + 1))
        pick = best(cscore, self.k)
        self.written += int(self.frontier.shape[0])
        self.frontier = self.n_cand + pick
        self.front_feat = out[crow[pick]]
        self.front_anc = block[crow[pick]]
        self.n_cand += int(ctok.shape[0])
        self.grown += 1
        self._all_tok, self._all_score = torch.cat(self.toks), torch.cat(self.scores)

    def frontier_scores(self) -> torch.Tensor:
        return self._all_score[self.frontier]

    def goes_on(self, frontier_width: Callable[["Growth"], int] | None = None) -> bool:
        """Draft another depth? Not past `depth`; `frontier_width(self)` (the fitter's) may stop
        it (0) or expand only that many of the best-scored frontier nodes: a node whose
        children no tree would verify is not worth its rows in the draft forward and head."""
        if self.grown >= self.depth:
            return False
        if frontier_width is None:
            return True
        width = frontier_width(self)
        if 0 < width < int(self.frontier.shape[0]):
            keep = best(self.frontier_scores(), width)
            self.frontier, self.front_feat, self.front_anc = (self.frontier[keep], self.front_feat[keep],
                                                              self.front_anc[keep])
        return width > 0

    def pool(self) -> Pool:
        dev = self._all_tok.device
        local = torch.cat(self.local).exp()
        return Pool(self.root, self._all_tok, torch.cat(self.parents), torch.cat(self.depths), self._all_score,
                    local, torch.full_like(self._all_tok, DRAFT), torch.zeros_like(self._all_tok, device=dev))


# -- the lookup source ---------------------------------------------------------------------
@dataclass(frozen=True)
class LookupConfig:
    """n-gram lookup: match the last max_ngram .. min_ngram tokens (longest first) against
    the earlier context and propose up to `max_tokens` tokens that followed the latest match."""

    max_ngram: int = 4
    min_ngram: int = 2
    max_tokens: int = 10

    def validate(self) -> "LookupConfig":
        if not 1 <= self.min_ngram <= self.max_ngram <= 64:
            raise ValueError(f"lookup n-grams need 1 <= min <= max <= 64, got {self.min_ngram}..{self.max_ngram}")
        if not 1 <= self.max_tokens <= 64:
            raise ValueError(f"lookup max_tokens must be in [1, 64], got {self.max_tokens}")
        return self


def lookup(history: torch.Tensor, cfg: LookupConfig) -> list[int]:
    """The continuation after the latest earlier occurrence of the history's longest
    matching suffix n-gram (history: 1-D token ids ending with the root); [] if none."""
    L = int(history.shape[0])
    for n in range(min(cfg.max_ngram, L - 1), cfg.min_ngram - 1, -1):
        suffix = history[L - n:]
        windows = history[:L - 1].unfold(0, n, 1)           # windows ending before the last token
        hits = (windows == suffix).all(-1).nonzero().flatten()
        if hits.numel():
            start = int(hits[-1]) + n                        # the token after the latest match
            return history[start:start + cfg.max_tokens].tolist()
    return []


def merge_lookup(pool: Pool, chain: list[int]) -> Pool:
    """Hang `chain` (tokens after the root) into the pool: where a draft node under the same
    parent has the token, mark it as found by lookup too; else add a lookup-only node."""
    if not chain:
        return pool
    dev = pool.tokens.device
    toks, parents = pool.tokens.tolist(), pool.parents.tolist()
    origin, ldepth = pool.origin.clone(), pool.lookup_depth.clone()
    new_tok, new_par, new_dep, new_score = [], [], [], []
    index = {(p, t): i for i, (p, t) in enumerate(zip(parents, toks))}
    cur, cur_depth, cur_score = -1, 0, 0.0
    n = len(toks)
    for j, t in enumerate(chain, start=1):
        hit = index.get((cur, t))
        if hit is not None and hit < n:
            origin[hit] |= LOOKUP
            ldepth[hit] = j
            cur, cur_depth, cur_score = hit, int(pool.depths[hit]), float(pool.score[hit])
            continue
        idx = n + len(new_tok)
        new_tok.append(t)
        new_par.append(cur)
        new_dep.append(cur_depth + 1)
        new_score.append(cur_score)
        index[(cur, t)] = idx
        cur, cur_depth = idx, cur_depth + 1
    if not new_tok:
        return Pool(pool.root, pool.tokens, pool.parents, pool.depths, pool.score, pool.local, origin, ldepth)
    k = len(new_tok)
    first = len(chain) - k + 1
    return Pool(
        pool.root,
        torch.cat((pool.tokens, torch.tensor(new_tok, dtype=pool.tokens.dtype, device=dev))),
        torch.cat((pool.parents, torch.tensor(new_par, dtype=torch.long, device=dev))),
        torch.cat((pool.depths, torch.tensor(new_dep, dtype=torch.long, device=dev))),
        torch.cat((pool.score, torch.tensor(new_score, dtype=pool.score.dtype, device=dev))),
        torch.cat((pool.local, torch.zeros(k, dtype=pool.local.dtype, device=dev))),
        torch.cat((origin, torch.full((k,), LOOKUP, dtype=origin.dtype, device=dev))),
        torch.cat((ldepth, torch.arange(first, first + k, dtype=ldepth.dtype, device=dev))),
    )


__all__ = ["DRAFT", "LOOKUP", "ORIGIN_NAMES", "Growth", "LookupConfig", "Pool", "lookup", "merge_lookup"]
