"""Pure tensor functions for the EAGLE-2 dynamic draft tree (no model calls here).

Candidates are recorded in the order they are proposed (depth by depth, each parent's
children by draft score), so a parent's index is always below its children's: sorting
selected indices gives a topological order for free.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TreeConfig:
    """EAGLE-2 tree shape: total nodes incl. the root, draft depth, children per expanded node."""

    total_tokens: int = 60
    depth: int = 6
    top_k: int = 10

    def validate(self, vocab_size: int | None = None) -> "TreeConfig":
        for name in ("total_tokens", "depth", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be a whole number, got {v!r}")
        if not 2 <= self.total_tokens <= 1024:
            raise ValueError(f"total_tokens must be between 2 and 1024 (root included), got {self.total_tokens}")
        if not 1 <= self.depth <= 64:
            raise ValueError(f"depth must be between 1 and 64, got {self.depth}")
        if not 1 <= self.top_k <= 64:
            raise ValueError(f"top_k must be between 1 and 64, got {self.top_k}")
        if vocab_size is not None and self.top_k > vocab_size:
            raise ValueError(f"top_k={self.top_k} is larger than the vocabulary ({vocab_size})")
        return self


def expand(scores: torch.Tensor, child_logp: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each of k frontier nodes proposes its top_k children.

    scores: [k] cumulative log-prob of the frontier; child_logp: [k, V] draft log-probs.
    Returns (tokens [k*top_k], cumulative scores [k*top_k], frontier row of each child [k*top_k]),
    grouped by parent, children in draft order.
    """
    logp, tokens = child_logp.topk(top_k, dim=-1)
    cum = scores[:, None] + logp
    rows = torch.arange(scores.shape[0], device=scores.device).repeat_interleave(top_k)
    return tokens.reshape(-1), cum.reshape(-1), rows


def best(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n highest scores; ties go to the lower index (stable), sorted ascending.

    Because a child never outscores its parent and has a higher index, the selection is
    closed under ancestors, and ascending order is topological.
    """
    order = torch.sort(-scores, stable=True).indices[:n]
    return order.sort().values


def remap_parents(selected: torch.Tensor, cand_parents: torch.Tensor) -> torch.Tensor:
    """Parents of the kept candidates as node indices of the final tree (root = 0).

    cand_parents holds candidate indices (-1 for the root's children).
    """
    where = torch.full((cand_parents.shape[0] + 1,), -2, dtype=torch.long, device=selected.device)
    where[0] = 0                                           # candidate -1 (shifted to 0) is the root
    where[selected + 1] = torch.arange(1, selected.shape[0] + 1, device=selected.device)
    parents = where[cand_parents[selected] + 1]
    if (parents < 0).any():
        raise AssertionError("tree selection is not closed under ancestors")
    return torch.cat((torch.tensor([-1], device=selected.device), parents))


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """[N, N] bool: row i is True at i and at every ancestor of i (parents topologically ordered)."""
    n = parents.shape[0]
    mask = torch.eye(n, dtype=torch.bool, device=parents.device)
    plist = parents.tolist()
    for i in range(1, n):
        mask[i] |= mask[plist[i]]
    return mask


def depths_of(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every node (root 0), from the ancestor mask row sums."""
    return ancestor_mask(parents).sum(-1) - 1


def leaves(parents: torch.Tensor) -> torch.Tensor:
    """Nodes with no children."""
    n = parents.shape[0]
    has_child = torch.zeros(n, dtype=torch.bool, device=parents.device)
    has_child[parents[parents >= 0]] = True
    return (~has_child).nonzero().flatten()


def paths(parents: torch.Tensor) -> list[list[int]]:
    """One root-to-leaf path per leaf (node indices, root first)."""
    plist = parents.tolist()
    out = []
    for leaf in leaves(parents).tolist():
        path, node = [], leaf
        while node != -1:
            path.append(node)
            node = plist[node]
        out.append(path[::-1])
    return out


def is_chain(parents: torch.Tensor) -> bool:
    """True when every node hangs under the one before it (a single path from the root):
    then each node sees exactly the nodes before it, and the plain causal mask is the tree's."""
    n = parents.shape[0]
    return bool((parents[1:] == torch.arange(n - 1, device=parents.device)).all()) if n > 1 else True


def verify_mask(tree_mask: torch.Tensor, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, N, prefix + N] mask: every node sees the whole prefix and its ancestors."""
    n = tree_mask.shape[0]
    allowed = torch.cat((torch.ones(n, prefix_len, dtype=torch.bool, device=tree_mask.device), tree_mask), dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=tree_mask.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
