"""One tree per step from the candidate sources, cut to the size that pays on this machine.

The shape of transformers' candidate generators: the draft head (`Growth`, through a
drafter) and the lookup source propose; `Proposer` merges their candidates into one pool,
asks the `Fitter` which to verify, and learns from every verdict. Batch 1 and every sample
of a batch go through the same `Proposer.tree` / `Proposer.observe`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .candidates import DRAFT, Growth, LookupConfig, Pool, lookup, merge_lookup
from .drafting import TreeTensors
from .fit import CostModel, Fitter, make_fitter
from .tree import remap_parents


@dataclass
class DraftGate:
    """Whether to run the draft head on a step where lookup has a proposal (fitted trees with
    lookup; `Proposer.use_draft` drafts without asking when lookup has none): a two-armed
    choice between drafting and lookup alone, by the throughput each arm has given lately, trying the other arm now and then
    (below). Throughput is decayed tokens over decayed seconds per arm (a ratio of sums, not
    a mean of per-step rates: lookup's gains come in rare long bursts, which a mean of step
    rates would under-weight), decayed per step of decoding, not per sample of the arm, so
    what a rarely tried arm did long ago weighs little against its latest try. Where the
    draft cannot pay for itself, decoding stays about as fast as lookup alone instead of
    paying the draft every step.

    Each look at the draft arm while it is losing costs a drafting step at its lower rate,
    so while lookup alone leads those looks space out (`explore` steps, doubling up to
    `max_explore`); when the ranking flips they come every `explore` steps again. Looks at
    lookup alone keep their pace: its bursts need many samples to be seen at all."""

    explore: int = 8
    max_explore: int = 64
    decay: float = 0.97
    tokens: dict = field(default_factory=dict)        # arm (True = draft) -> decayed tokens
    seconds: dict = field(default_factory=dict)       # arm -> decayed seconds
    seen: dict = field(default_factory=dict)          # arm -> the step it was last observed at
    steps: int = 0
    interval: int = 0                                 # steps between looks at the other arm (set at the first ranking)
    since: int = 0                                    # steps since the last look
    leader: bool | None = None                        # the arm ranked best at the last choice

    def rate(self, arm: bool) -> float | None:
        s = self.seconds.get(arm)
        return self.tokens[arm] / s if s else None

    def choose(self) -> bool:
        self.steps += 1
        with_draft, without = self.rate(True), self.rate(False)
        if with_draft is None:
            return True
        if without is None:
            return self.steps <= 3                     # a few drafting steps, then try without
        best = with_draft >= without
        if best != self.leader:                        # the first ranking (leader None) or a flip
            self.interval, self.leader = self.explore, best
        self.since += 1
        if self.since < self.interval:
            return best
        self.since = 0
        if not best:
            self.interval = min(2 * self.interval, self.max_explore)
        return not best

    def observe(self, drafted: bool, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        age = self.decay ** max(self.steps - self.seen.get(drafted, self.steps), 1)
        self.seen[drafted] = self.steps
        self.tokens[drafted] = age * self.tokens.get(drafted, 0.0) + tokens
        self.seconds[drafted] = age * self.seconds.get(drafted, 0.0) + seconds


@dataclass
class Proposer:
    """fitter: calibration and costs; total_tokens: a fixed cut (None = fitted per step);
    lookup: the lookup source's settings (None = off)."""

    fitter: Fitter
    total_tokens: int | None
    lookup: LookupConfig | None
    gate: DraftGate | None = None
    _gated: bool = field(default=False, init=False, repr=False)    # this step's draft choice was the gate's

    @classmethod
    def for_generation(cls, target, cfg) -> "Proposer":
        """From a `GenerationConfig`: a fitted size measures (or reads) the cost curve."""
        if cfg.fitted:
            gate = DraftGate() if cfg.lookup is not None and cfg.draft_source else None
            return cls(make_fitter(target, cfg.tree.total_tokens), None, cfg.lookup, gate)
        return cls.fixed(cfg.tree.total_tokens, cfg.lookup)

    @classmethod
    def fixed(cls, total_tokens: int, lookup_cfg: LookupConfig | None = None) -> "Proposer":
        """EAGLE-2's cut: the best `total_tokens - 1` candidates, no cost curve needed."""
        return cls(Fitter(CostModel({1: 1.0})), total_tokens, lookup_cfg)

    def chain(self, history: torch.Tensor | None) -> list[int]:
        """The lookup source's continuation of `history` (context + root; [] when lookup is
        off or finds nothing): found once per step, for `use_draft` and `tree`."""
        if self.lookup is None or history is None:
            return []
        return lookup(history, self.lookup)

    def use_draft(self, chain: list[int] = ()) -> bool:
        """Run the draft head this step? Always for fixed trees (EAGLE-2 as published), and
        whenever lookup has nothing to propose (the step's `chain` is empty: without the
        draft that step would be a plain step); otherwise the gate decides, and learns from
        this step (`observe`): both of its arms are measured on steps where lookup had a
        proposal."""
        self._gated = self.gate is not None and bool(chain)
        return not self._gated or self.gate.choose()

    @property
    def growth_limit(self) -> Callable[[Growth], int] | None:
        """How far draft growth goes (`Fitter.frontier_width`; fitted sizes only: a fixed tree
        grows fully, as EAGLE-2 publishes it)."""
        return self.fitter.frontier_width if self.total_tokens is None else None

    def tree(self, pool: Pool, chain: list[int] = (), draft_s: float = 0.0, max_depth: int = 64) -> TreeTensors:
        """Merge the lookup `chain` (`Proposer.chain`; at most `max_depth` tokens of it: the
        context and budget limits) into `pool` and cut it."""
        if chain and max_depth > 0:
            pool = merge_lookup(pool, list(chain[:max_depth]))
        choice = self.fitter.select(pool, self.total_tokens, draft_s)
        dev = pool.tokens.device
        sel = choice.selected.to(dev)
        zl = torch.zeros(1, dtype=torch.long, device=dev)
        return TreeTensors(
            tokens=torch.cat((torch.tensor([pool.root], device=dev), pool.tokens[sel])),
            parents=remap_parents(sel, pool.parents) if sel.numel() else torch.tensor([-1], device=dev),
            depths=torch.cat((zl, pool.depths[sel])),
            logp=torch.cat((torch.zeros(1, device=dev), pool.score[sel].float())),
            prob=torch.cat((torch.ones(1, device=dev), pool.local[sel].float())),
            origin=torch.cat((zl, pool.origin[sel])),
            pool_index=torch.cat((torch.full((1,), -1, dtype=torch.long, device=dev), sel)),
            values=None if choice.values is None else
            torch.cat((torch.ones(1, dtype=torch.float64), choice.values[choice.selected])),
            expected=choice.expected, rule=choice.rule, pool=pool,
        )

    def observe(self, tree: TreeTensors, path: list[int], verify_s: float, grow_s: float,
                draft_s: float | None = None, bonus: int | None = None) -> None:
        """Learn from one verdict: which nodes were accepted (and the `bonus` token drawn
        after them), what the step cost (`grow_s`: the draft growth; `draft_s`: all drafting
        work of the step, catch-up extends included)."""
        draft_s = grow_s if draft_s is None else draft_s
        pool = tree.pool
        if tree.values is not None:              # the values were used: keep calibrating them
            on_path = torch.zeros(tree.tokens.shape[0], dtype=torch.bool)
            on_path[path] = True
            self.fitter.calibrator.update(pool, tree.pool_index.cpu()[1:], on_path[1:], bonus)
        draft_depths = pool.depths[(pool.origin & DRAFT) > 0]
        levels = int(draft_depths.max()) if draft_depths.numel() else 0
        self.fitter.cost.observe(int(tree.tokens.shape[0]), verify_s, levels, grow_s)
        if self._gated:
            self.gate.observe(levels > 0, len(path), verify_s + draft_s)


__all__ = ["Proposer"]
