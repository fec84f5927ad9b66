"""The drafting side: the draft head's own cache, its extend step and EAGLE-2 tree growth.

Position convention (shared with training): the pair (f_t, x_{t+1}) sits at rotary
position t. A tree node at depth d (sequence position n + d) is expanded as the pair
(f^_parent, node) at position n + d - 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import KV, append_kv
from .draft import DraftHead, OutputHead
from .kernels import follow_target
from .tree import TreeConfig, best, expand, remap_parents


@dataclass(frozen=True)
class TreeTensors:
    """A drafted tree, root first, topological: tokens, parents (-1 root), depths,
    cumulative draft log-prob and the draft probability of each node given its parent."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    logp: torch.Tensor
    prob: torch.Tensor


class Drafter:
    """Holds the draft's KV cache over the real (verified) context and grows trees from it."""

    def __init__(self, draft: DraftHead, embed: torch.nn.Module, lm_head: torch.nn.Module):
        self.draft, self.embed = draft, embed
        params = next(iter(draft.parameters()), None)         # the draft's precision (test doubles may have none)
        pack = follow_target(draft, lm_head)
        self.head = OutputHead(lm_head, draft.token_map, dtype=None if params is None else params.dtype, pack=pack)
        self.kv: KV | None = None
        self.last_out: torch.Tensor | None = None     # [1, 1, H]: the draft's guess of f at the root

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
    def grow(self, root_token: int, prefix_len: int, cfg: TreeConfig, depth: int) -> TreeTensors:
        """EAGLE-2: expand the top_k frontier per depth, then keep the best total_tokens - 1."""
        dev = self.last_out.device
        root = torch.tensor([root_token], device=dev)
        if depth <= 0:
            z = torch.zeros(1, device=dev)
            return TreeTensors(root, torch.tensor([-1], device=dev), torch.zeros(1, dtype=torch.long, device=dev),
                               z, torch.ones(1, device=dev))
        k = cfg.top_k
        tok, score, _ = expand(torch.zeros(1, device=dev), self.log_probs(self.last_out[0]), k)
        tok = self.head.to_target(tok)
        toks, scores, local, parents = [tok], [score], [score], [torch.full_like(tok, -1)]
        depths = [torch.ones_like(tok)]
        frontier = torch.arange(tok.shape[0], device=dev)          # candidate indices
        front_feat = self.last_out[0].expand(tok.shape[0], -1)    # f^ of each frontier node's parent
        front_anc = torch.zeros(tok.shape[0], 0, dtype=torch.bool, device=dev)  # rows over expanded nodes
        tree_kv: KV | None = None
        n_cand = tok.shape[0]
        all_tok, all_score = tok, score
        for d in range(1, depth):
            kf = frontier.shape[0]
            self_mask = torch.eye(kf, dtype=torch.bool, device=dev)
            mask = torch.cat((torch.ones(kf, prefix_len, dtype=torch.bool, device=dev), front_anc, self_mask), 1)
            past = self.kv if tree_kv is None else append_kv(self.kv, tree_kv)
            pos = torch.full((1, kf), prefix_len + d - 1, device=dev)
            out, kv = self.draft(front_feat[None], self.embed(all_tok[frontier])[None], pos, past, mask[None, None])
            tree_kv = append_kv(tree_kv, kv)
            node_anc = torch.cat((front_anc, self_mask), 1)          # ancestors incl. self, over expanded nodes
            lp = self.log_probs(out[0])
            ctok, cscore, rows = expand(all_score[frontier], lp, k)
            ctok = self.head.to_target(ctok)
            toks.append(ctok)
            scores.append(cscore)
            local.append(cscore - all_score[frontier][rows])
            parents.append(frontier[rows])
            depths.append(torch.full_like(ctok, d + 1))
            pick = best(cscore, k)
            frontier = n_cand + pick
            front_feat = out[0][rows[pick]]
            front_anc = node_anc[rows[pick]]
            n_cand += ctok.shape[0]
            all_tok, all_score = torch.cat(toks), torch.cat(scores)
        cand_parents, cand_depths, cand_local = torch.cat(parents), torch.cat(depths), torch.cat(local)
        sel = best(all_score, cfg.total_tokens - 1)
        return TreeTensors(
            tokens=torch.cat((root, all_tok[sel])),
            parents=remap_parents(sel, cand_parents),
            depths=torch.cat((torch.zeros(1, dtype=torch.long, device=dev), cand_depths[sel])),
            logp=torch.cat((torch.zeros(1, device=dev), all_score[sel])),
            prob=torch.cat((torch.ones(1, device=dev), cand_local[sel].exp())),
        )
