"""The drafting side: the draft head's own cache, its extend step and EAGLE-2 growth over it.

Position convention (shared with training): the pair (f_t, x_{t+1}) sits at rotary
position t. A tree node at depth d (sequence position n + d) is expanded as the pair
(f^_parent, node) at position n + d - 1.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cache import KV, append_kv
from .draft import DraftHead, OutputHead
from .kernels import follow_target
from .candidates import Growth, Pool


@dataclass(frozen=True)
class TreeTensors:
    """A tree to verify, root first, topological: tokens, parents (-1 root), depths,
    cumulative draft log-prob, the draft probability of each node given its parent, and
    (when cut from a candidate pool) each node's origin bits, pool index and value."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    logp: torch.Tensor
    prob: torch.Tensor
    origin: torch.Tensor | None = None
    pool_index: torch.Tensor | None = None
    values: torch.Tensor | None = None
    expected: float = 0.0
    rule: str = ""
    pool: Pool | None = None


class Drafter:
    """Holds the draft's KV cache over the real (verified) context and grows trees from it."""

    def __init__(self, draft: DraftHead, embed: torch.nn.Module, lm_head: torch.nn.Module):
        self.draft, self.embed = draft, embed
        params = next(iter(draft.parameters()), None)         # the draft's precision (test doubles may have none)
        pack = follow_target(draft, lm_head)
        self.head = OutputHead(lm_head, draft.token_map, dtype=None if params is None else params.dtype, pack=pack)
        self.kv: KV | None = None
        self.last_out: torch.Tensor | None = None     # [1, 1, H]: the draft's guess of f at the root

    @property
    def token_map(self) -> torch.Tensor | None:
        """Target ids of the draft's vocabulary (None: the target's whole vocabulary)."""
        return self.head.token_map

    def log_probs(self, out: torch.Tensor) -> torch.Tensor:
        """Draft log-probs over its own vocabulary (the token map's, or the target's)."""
        return torch.log_softmax(self.head.logits(out).float(), dim=-1)   # ranks in fp32 whatever the draft's dtype

    @torch.inference_mode()
    def extend(self, features: torch.Tensor, next_tokens: torch.Tensor, start: int) -> None:
        """Feed verified pairs (f_t, x_{t+1}) for t = start .. start+m-1 into the draft cache."""
        m = features.shape[1]
        pos = torch.arange(start, start + m, device=features.device)[None]
        out, kv = self.draft(features, self.embed(next_tokens), pos, self.kv)
        self.kv = append_kv(self.kv, kv)
        self.last_out = out[:, -1:]

    @torch.inference_mode()
    def grow(self, root_token: int, prefix_len: int, top_k: int, depth: int,
             frontier_width: Callable[[Growth], int] | None = None,
             perturb: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> Pool:
        """EAGLE-2 growth (`hass.candidates.Growth`) over this draft's cache: every candidate
        of up to `depth` depths; `frontier_width(growth)` may stop it earlier or expand
        fewer frontier nodes (`Growth.goes_on`);
        `perturb`: coupled sampling's draft side (`hass.noise.draft_perturbation`)."""
        dev = self.last_out.device
        if depth <= 0:
            return Pool.empty(root_token, dev)
        root_out = self.last_out[0, 0]
        g = Growth(root_token, prefix_len, depth, top_k, root_out, self.log_probs(root_out[None])[0],
                   self.head.to_target, perturb)
        tree_kv: KV | None = None
        while g.goes_on(frontier_width):
            feat, toks, block, pos = g.frontier_inputs()
            kf = int(toks.shape[0])
            mask = torch.cat((torch.ones(kf, prefix_len, dtype=torch.bool, device=dev), block), 1)
            past = self.kv if tree_kv is None else append_kv(self.kv, tree_kv)
            out, kv = self.draft(feat[None], self.embed(toks)[None], torch.full((1, kf), pos, device=dev), past,
                                 mask[None, None])
            tree_kv = append_kv(tree_kv, kv)
            g.advance(out[0], self.log_probs(out[0]), block)
        return g.pool()
