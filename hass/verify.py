"""Acceptance along a verified tree: greedy (T = 0) and lossless sampling (T > 0).

Both plain sampling and speculative verification turn logits into probabilities with the
same `target_probs`, which is what makes the sampling path lossless. At T > 0 there are two
rules (`SamplingConfig.rule`):

* "coupled" (the default): the target's choice at each position is the Gumbel-max sample
  with that position's noise (`hass.noise`, `coupled_choice`), exactly the draw plain
  decoding makes there, and a child is accepted when it is that choice: the greedy rule on
  the target's samples. The output equals plain sampling's for the same seed, token for
  token.
* "rejection": the multi-candidate rejection rule of method.md section 3 (each child a
  deterministic proposal): the output is distributed as plain sampling, not equal to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .noise import PositionNoise

RULES = ("coupled", "rejection")


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_p in (0, 1]; top_k 0 = off; rule: how speculative
    decoding accepts at T > 0 ("coupled" or "rejection", see the module docstring)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    rule: str = "coupled"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> "SamplingConfig":
        t, p, k = self.temperature, self.top_p, self.top_k
        if not isinstance(t, (int, float)) or not 0 <= t <= 100 or t != t:
            raise ValueError(f"temperature must be between 0 and 100, got {t!r}")
        if not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k (sampling) must be a whole number >= 0 (0 = off), got {k!r}")
        if self.rule not in RULES:
            raise ValueError(f"sampling rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        return self

    @property
    def coupled(self) -> bool:
        """Sampling with position-keyed noise shared by the target and the draft."""
        return not self.greedy and self.rule == "coupled"


def target_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, over the last axis (float32)."""
    logits = logits.float() / max(cfg.temperature, 1e-6)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p          # mass strictly above each token
        drop = before >= cfg.top_p                       # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


@dataclass(frozen=True)
class Verdict:
    """The accepted path (node indices, root first) and the target's next token after it."""

    path: list[int]
    bonus: int
    probs: list[float]   # target probability of each accepted draft token, then of the bonus
    choice: list[int] | None = None   # per node, the target's token after it (None: not computed)


def filtered(cfg: SamplingConfig) -> bool:
    """Whether top-k or top-p removes tokens (so the kept set needs `target_probs`)."""
    return bool(cfg.top_k) or cfg.top_p < 1.0


def coupled_choice(logits: torch.Tensor, cfg: SamplingConfig, g: torch.Tensor,
                   probs: torch.Tensor | None = None) -> torch.Tensor:
    """The Gumbel-max sample argmax(logits / T + g) of each row, among the tokens top-k and
    top-p keep: an exact sample of `target_probs(logits, cfg)` (a softmax's normalisation does
    not move the argmax). Plain decoding and verification both choose through here; `probs`:
    those probabilities when the caller has them already (only read when filtered)."""
    scores = (logits.float() / cfg.temperature).add_(g.to(logits.device))   # one [rows, V] temporary, not two
    if filtered(cfg):
        probs = target_probs(logits, cfg) if probs is None else probs
        scores = scores.masked_fill(probs == 0, float("-inf"))
    return scores.argmax(-1)


def _longest_path(toks: list[int], pars: list[int], chosen: list[int]) -> list[int]:
    """The longest path whose every token is `chosen` at its parent (node indices, root
    first). Nodes are topological, so one pass in index order knows each node's parent's
    verdict; at most one node per depth is fully accepted. Plain lists: a tree has at most
    a few dozen nodes, and tensor ops on them cost more than the walk."""
    ok, depth = [True], [0]
    last = 0
    for i in range(1, len(toks)):
        p = pars[i]
        ok.append(ok[p] and toks[i] == chosen[p])
        depth.append(depth[p] + 1)
        if ok[i] and depth[i] > depth[last]:
            last = i
    path = [last]
    while pars[path[-1]] >= 0:
        path.append(pars[path[-1]])
    return path[::-1]


def accept_greedy(tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, anc: torch.Tensor,
                  logits: torch.Tensor) -> Verdict:
    """Longest path whose every token is the target's argmax at its parent.

    tokens/parents/depths: [N]; anc: [N, N] ancestor mask; logits: [N, V] target logits per node.
    """
    return _verdict(tokens, parents, logits.argmax(-1), lambda rows: torch.softmax(logits[rows].float(), -1))


def accept_coupled(tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, anc: torch.Tensor,
                   logits: torch.Tensor, cfg: SamplingConfig, noise: PositionNoise, start: int) -> Verdict:
    """The greedy rule on the target's samples: at every node the target chooses the token
    at its position (the root sits at `start`, a node of depth d chooses position
    start + d + 1) exactly as plain sampling chooses it there (`coupled_choice` with that
    position's noise); the longest path of chosen tokens is accepted, and the choice after
    it is the bonus."""
    probs = target_probs(logits, cfg) if filtered(cfg) else None      # every row's kept set is needed then
    choice = coupled_choice(logits, cfg, noise.rows(start + 1 + depths, logits.device), probs)
    return _verdict(tokens, parents, choice,
                    lambda rows: target_probs(logits[rows], cfg) if probs is None else probs[rows])


def _verdict(tokens: torch.Tensor, parents: torch.Tensor, choice: torch.Tensor, path_probs) -> Verdict:
    """The verdict for the target's token after every node (`choice`): the longest path of
    chosen tokens, the bonus after it, and the target probability of each token emitted
    (`path_probs(rows)`: the target's distributions at those node rows)."""
    choices = choice.tolist()
    path = _longest_path(tokens.tolist(), parents.tolist(), choices)
    rows = torch.tensor(path, device=tokens.device)
    chosen = torch.cat((tokens[rows[1:]], choice[path[-1]:path[-1] + 1]))
    p = path_probs(rows).gather(-1, chosen[:, None])[:, 0]
    return Verdict(path, choices[path[-1]], p.tolist(), choices)


def accept_sampling(tokens: torch.Tensor, parents: torch.Tensor, logits: torch.Tensor, cfg: SamplingConfig,
                    generator: torch.Generator | None) -> Verdict:
    """Walk down the tree: at a node with target distribution p, try its children in draft
    order, accepting child x with probability p(x) and otherwise zeroing p(x) and
    renormalising; the bonus is drawn from what is left (method.md section 3).

    Each draft child is a deterministic proposal, so every output token is distributed
    exactly as plain sampling from the target.
    """
    probs = target_probs(logits, cfg)
    plist = parents.tolist()
    children: dict[int, list[int]] = {}
    for i in range(1, len(plist)):
        children.setdefault(plist[i], []).append(i)   # ascending index = draft order among siblings
    toks = tokens.tolist()
    node, path, out_p = 0, [0], []
    while True:
        p = probs[node].clone()
        moved = False
        for child in children.get(node, []):
            x = toks[child]
            px = float(p[x])
            u = float(torch.rand((), generator=generator))
            if u < px:
                out_p.append(float(probs[node, x]))
                node, moved = child, True
                path.append(child)
                break
            p[x] = 0.0
            total = float(p.sum())
            if total <= 0:          # numerically exhausted: fall back to the unmodified target
                p = probs[node].clone()
                break
            p /= total
        if not moved:
            bonus = sample(p, generator)
            out_p.append(float(probs[node, bonus]))
            return Verdict(path, bonus, out_p)


def accept(cfg: SamplingConfig, tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor,
           anc: torch.Tensor, logits: torch.Tensor, start: int, noise: PositionNoise | None,
           gen: torch.Generator | None) -> Verdict:
    """The verdict on one verified tree (root at sequence position `start`; logits [N, V],
    one row per node) under the sampling settings: greedy, coupled or rejection. The verdict's
    `choice` is the target's token after every node; the rejection rule draws no such token
    per node, so its verdicts carry the target's greedy one."""
    if cfg.greedy:
        return accept_greedy(tokens, parents, depths, anc, logits)
    if cfg.coupled:
        return accept_coupled(tokens, parents, depths, anc, logits, cfg, noise, start)
    v = accept_sampling(tokens.cpu(), parents.cpu(), logits.cpu(), cfg, gen)
    return Verdict(v.path, v.bonus, v.probs, logits.argmax(-1).tolist())
