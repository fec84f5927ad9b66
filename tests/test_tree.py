"""The EAGLE-2 tree: pure tree functions and `Drafter.grow`, against brute-force references.

The references here are deliberately naive (walk up parent pointers, sort Python lists,
run the draft one pair at a time along every path) so they share no code with hass/tree.py
or the batched, tree-masked drafting in hass/drafting.py.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from hass.draft import new_draft
from hass.drafting import Drafter
from hass.propose import Proposer
from hass.tree import TreeConfig, ancestor_mask, best, depths_of, expand, leaves, paths, remap_parents, verify_mask


# -- brute-force helpers ---------------------------------------------------------------------------
def random_parents(n: int, rng: random.Random, shape: str = "any") -> list[int]:
    """A random topologically ordered parent list (parent index < child index), root first."""
    parents = [-1]
    for i in range(1, n):
        if shape == "chain":
            parents.append(i - 1)
        elif shape == "star":
            parents.append(0)
        else:
            parents.append(rng.randrange(0, i))
    return parents


def ancestors_of(parents: list[int], i: int) -> list[int]:
    out = []
    while i != -1:
        out.append(i)
        i = parents[i]
    return out[::-1]                  # root first, i last


TREES = [random_parents(n, random.Random(seed), shape)
         for seed, (n, shape) in enumerate([(1, "any"), (2, "any"), (5, "chain"), (7, "star"), (12, "any"),
                                            (30, "any"), (60, "any"), (60, "chain"), (61, "star"), (200, "any")])]


@pytest.mark.parametrize("parents", TREES, ids=lambda p: f"n{len(p)}")
def test_ancestor_mask_depths_leaves_paths(parents):
    n = len(parents)
    pt = torch.tensor(parents)
    anc = ancestor_mask(pt)
    assert anc.dtype == torch.bool and anc.shape == (n, n)
    ref = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        ref[i, ancestors_of(parents, i)] = True
    assert torch.equal(anc, ref)

    assert depths_of(pt).tolist() == [len(ancestors_of(parents, i)) - 1 for i in range(n)]

    ref_leaves = [i for i in range(n) if i not in parents]
    assert leaves(pt).tolist() == ref_leaves

    got_paths = paths(pt)
    assert got_paths == [ancestors_of(parents, leaf) for leaf in ref_leaves]
    covered = {i for p in got_paths for i in p}
    assert covered == set(range(n))               # every node lies on some root-to-leaf path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prefix_len", [0, 1, 17])
def test_verify_mask(dtype, prefix_len):
    parents = TREES[5]
    n = len(parents)
    anc = ancestor_mask(torch.tensor(parents))
    mask = verify_mask(anc, prefix_len, dtype)
    assert mask.shape == (1, 1, n, prefix_len + n) and mask.dtype == dtype
    m = mask[0, 0].float()
    neg = float(torch.finfo(dtype).min)
    assert (m[:, :prefix_len] == 0).all()                     # the whole prefix is visible to every node
    for i in range(n):
        for j in range(n):
            visible = j in ancestors_of(parents, i)
            v = float(m[i, prefix_len + j])
            assert (v == 0.0) if visible else (v == neg), (i, j)
    # as an additive attention mask it zeroes exactly the invisible entries
    w = torch.softmax(torch.randn(n, prefix_len + n) + m, dim=-1)
    assert (w[m < 0] == 0).all() and (w[m == 0] > 0).all()


def _scores_for(parents: list[int], rng: random.Random, tie_every: int = 0) -> list[float]:
    """Cumulative log-prob scores: a child never outscores its parent; optional exact ties."""
    s = []
    for i, p in enumerate(parents):
        step = 0.0 if (tie_every and i % tie_every == 0) else math.log(rng.uniform(0.01, 1.0))
        s.append((s[p] if p >= 0 else 0.0) + step)
    return s


@pytest.mark.parametrize("tie_every", [0, 3])
@pytest.mark.parametrize("seed", range(6))
def test_best_is_ancestor_closed_and_topological(seed, tie_every):
    rng = random.Random(seed)
    # candidates as grow records them: -1 marks a child of the (unscored) root
    parents = [p - 1 for p in random_parents(rng.randrange(3, 80), rng)][1:]
    st = torch.tensor(_scores_for([-1] + [p + 1 for p in parents], rng, tie_every)[1:])
    scores = st.tolist()                       # the float32 values best() actually compares
    for n in (1, 2, 5, len(scores) // 2, len(scores), len(scores) + 3):
        sel = best(st, n).tolist()
        ref = sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n])
        assert sel == ref                                           # top n, ties to the lower index
        assert sel == sorted(sel) and len(set(sel)) == len(sel)    # ascending = topological
        chosen = set(sel)
        assert all(parents[i] == -1 or parents[i] in chosen for i in sel)   # ancestor-closed
        tree_parents = remap_parents(torch.tensor(sel), torch.tensor(parents)).tolist()
        assert tree_parents[0] == -1
        for node, cand in enumerate(sel, start=1):
            p = parents[cand]
            assert tree_parents[node] == (0 if p == -1 else sel.index(p) + 1)
            assert tree_parents[node] < node


def test_remap_parents_rejects_open_selection():
    parents = torch.tensor([-1, -1, 0, 2])                 # candidates 0,1 under root; 2 under 0; 3 under 2
    with pytest.raises(AssertionError):
        remap_parents(torch.tensor([1, 3]), parents)        # 3 without its parent 2


def test_expand_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    scores = -torch.rand(4, generator=gen) * 3
    logp = torch.log_softmax(torch.randn(4, 50, generator=gen), -1)
    toks, cum, rows = expand(scores, logp, 5)
    assert toks.shape == cum.shape == rows.shape == (20,)
    for r in range(4):
        order = sorted(range(50), key=lambda v: -float(logp[r, v]))[:5]
        sl = slice(5 * r, 5 * r + 5)
        assert toks[sl].tolist() == order
        assert rows[sl].tolist() == [r] * 5
        torch.testing.assert_close(cum[sl], scores[r] + logp[r, order])


# -- Drafter.grow ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peaked_draft(tiny_target):
    """A random draft whose weights are scaled up so its distributions are peaked: the
    reference ranking then has no near-ties that batched vs sequential fp32 could flip."""
    draft = new_draft(tiny_target.config, seed=11)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if not name.endswith("layernorm.weight") and not name.endswith("bias"):
                p.mul_(8.0)
    return draft.eval()


def _prepared_drafter(target, draft, prompt):
    ids = torch.tensor([prompt])
    logits, feats = target.forward(ids, target.new_cache())
    root = int(logits[0, -1].argmax())
    drafter = Drafter(draft, target.embed_tokens, target.lm_head)
    drafter.extend(feats, torch.cat((ids[:, 1:], torch.tensor([[root]])), 1), 0)
    return drafter, root


@torch.inference_mode()
def reference_eagle2(target, draft, drafter, n, cfg: TreeConfig, depth: int):
    """EAGLE-2 by the book, one draft call per path step (no tree mask, no batching).

    Returns every candidate as dict(path, score, logp, depth) in proposal order, and the
    boundary gaps of every top-k cut (to assert there are no near-ties).
    """
    lm = target.lm_head
    embed = target.embed_tokens
    base_kv, root_out = drafter.kv, drafter.last_out               # [1, 1, H]
    cands, gaps = [], []

    def children(state_out, path, score):
        lp = torch.log_softmax(lm(state_out[0, -1]).float(), -1)
        order = sorted(range(lp.shape[0]), key=lambda v: -float(lp[v]))
        return [dict(path=path + (v,), score=score + float(lp[v]), logp=float(lp[v]), depth=len(path) + 1)
                for v in order[:cfg.top_k]]

    def cut(items, k):
        ranked = sorted(items, key=lambda c: -c["score"])
        if len(ranked) > k:
            gaps.append(ranked[k - 1]["score"] - ranked[k]["score"])
        return ranked[:k]

    level = children(root_out, (), 0.0)
    cands += level
    states = {(): (base_kv, root_out)}
    frontier = level                                               # depth 1: all top_k children
    for d in range(1, depth):
        nxt = []
        for node in frontier:
            kv, out_parent = states[node["path"][:-1]]
            tok = torch.tensor([[node["path"][-1]]])
            pos = torch.tensor([[n + d - 1]])
            out, new_kv = draft(out_parent, embed(tok), pos, kv)
            kv_node = (torch.cat((kv[0], new_kv[0]), 2), torch.cat((kv[1], new_kv[1]), 2))
            states[node["path"]] = (kv_node, out)
            nxt += children(out, node["path"], node["score"])
        cands += nxt
        frontier = cut(nxt, cfg.top_k)
    chosen = cut(cands, cfg.total_tokens - 1)
    return cands, chosen, gaps


GROW_CASES = [
    (TreeConfig(8, 3, 3), 3),
    (TreeConfig(8, 3, 3), 1),
    (TreeConfig(16, 5, 2), 5),
    (TreeConfig(20, 4, 4), 4),
    (TreeConfig(60, 6, 10), 6),
    (TreeConfig(60, 6, 10), 2),          # depth capped by the caller (context or token budget)
    (TreeConfig(2, 1, 1), 1),
    (TreeConfig(1024, 3, 5), 3),         # more room than candidates: everything is kept
]


@pytest.mark.parametrize("prompt_seed", [0, 1])
@pytest.mark.parametrize("cfg,depth", GROW_CASES, ids=lambda x: str(x))
def test_grow_matches_step_by_step_eagle2(tiny_target, peaked_draft, prompts, cfg, depth, prompt_seed):
    prompt = prompts(1, tiny_target.vocab_size, 5 + 9 * prompt_seed, 5 + 9 * prompt_seed, seed=prompt_seed)[0]
    drafter, root = _prepared_drafter(tiny_target, peaked_draft, prompt)
    n = len(prompt)
    tree = Proposer.fixed(cfg.total_tokens).tree(drafter.grow(root, n, cfg.top_k, depth))
    toks, par, dep = tree.tokens.tolist(), tree.parents.tolist(), tree.depths.tolist()
    N = len(toks)

    # structure: root first, parents before children, depths follow parents, size bound
    assert toks[0] == root and par[0] == -1 and dep[0] == 0
    assert float(tree.logp[0]) == 0.0 and float(tree.prob[0]) == 1.0
    assert 1 < N <= cfg.total_tokens
    for i in range(1, N):
        assert 0 <= par[i] < i
        assert dep[i] == dep[par[i]] + 1 <= depth
    assert tree.depths.tolist() == depths_of(tree.parents).tolist()
    torch.testing.assert_close(tree.logp[1:], tree.logp[tree.parents[1:]] + tree.prob[1:].log(), atol=1e-5, rtol=0)
    assert bool((tree.prob[1:] > 0).all() and (tree.prob[1:] <= 1).all())
    for i in range(N):                                 # siblings are distinct tokens
        kids = [toks[j] for j in range(N) if par[j] == i]
        assert len(kids) == len(set(kids))

    # the same tree as EAGLE-2 computed one path step at a time
    cands, chosen, gaps = reference_eagle2(tiny_target, peaked_draft, drafter, n, cfg, depth)
    assert min(gaps, default=1.0) > 1e-4, "near-tie in the reference ranking: pick other seeds"
    assert N - 1 == min(cfg.total_tokens - 1, len(cands))
    got = {}
    for i in range(1, N):
        path = tuple(toks[j] for j in ancestor_mask(tree.parents)[i].nonzero().flatten().tolist()[1:])
        got[path] = (float(tree.logp[i]), float(tree.prob[i]), dep[i])
    want = {c["path"]: (c["score"], math.exp(c["logp"]), c["depth"]) for c in chosen}
    assert set(got) == set(want)
    for path, (score, prob, d) in want.items():
        assert got[path][2] == d
        assert abs(got[path][0] - score) < 1e-4
        assert abs(got[path][1] - prob) < 1e-4
    # the chosen nodes are the top scores among all candidates recorded
    all_scores = sorted((c["score"] for c in cands), reverse=True)
    assert sorted((v[0] for v in got.values()), reverse=True) == pytest.approx(all_scores[:N - 1], abs=1e-4)


def test_grow_with_depth_zero_is_root_only(tiny_target, peaked_draft, prompts):
    prompt = prompts(1, tiny_target.vocab_size, 6, 6, seed=3)[0]
    drafter, root = _prepared_drafter(tiny_target, peaked_draft, prompt)
    tree = Proposer.fixed(60).tree(drafter.grow(root, len(prompt), 10, 0))
    assert tree.tokens.tolist() == [root] and tree.parents.tolist() == [-1] and tree.depths.tolist() == [0]


def test_grow_does_not_touch_the_real_draft_cache(tiny_target, peaked_draft, prompts):
    prompt = prompts(1, tiny_target.vocab_size, 9, 9, seed=4)[0]
    drafter, root = _prepared_drafter(tiny_target, peaked_draft, prompt)
    k, v = drafter.kv[0].clone(), drafter.kv[1].clone()
    out = drafter.last_out.clone()
    a = Proposer.fixed(60).tree(drafter.grow(root, len(prompt), 10, 6))
    b = Proposer.fixed(60).tree(drafter.grow(root, len(prompt), 10, 6))
    assert torch.equal(drafter.kv[0], k) and torch.equal(drafter.kv[1], v) and torch.equal(drafter.last_out, out)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)


def test_is_chain_exactly_when_the_tree_mask_is_the_causal_one():
    """The decoder drops the tree mask for chains; that is only sound if a chain's ancestor
    mask is the causal (lower-triangular) one, and every other tree's is not."""
    from hass.tree import ancestor_mask, is_chain
    cases = {(-1,): True, (-1, 0): True, (-1, 0, 1, 2): True,
             (-1, 0, 0): False, (-1, 0, 1, 1): False, (-1, 0, 1, 0): False}
    for parents, chain in cases.items():
        p = torch.tensor(parents)
        causal = torch.ones(len(parents), len(parents), dtype=torch.bool).tril()
        assert is_chain(p) is chain
        assert bool(torch.equal(ancestor_mask(p), causal)) is chain
