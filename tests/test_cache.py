"""KV caches: after tree verification and compaction, the target cache must be exactly the
cache of a fresh forward over the accepted prefix; the draft cache must not depend on how
the verified context was fed to it.
"""
from __future__ import annotations

import copy
import random

import pytest
import torch

import hass.decode
from hass.cache import compact
from hass.decode import GenerationConfig, speculative_generate
from hass.drafting import Drafter
from hass.propose import Proposer
from hass.tree import TreeConfig, ancestor_mask, depths_of, verify_mask

ATOL = 1e-5


def layer_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def fresh_cache(target, tokens: list[int]):
    cache = target.new_cache()
    logits, feats = target.forward(torch.tensor([tokens]), cache)
    return cache, logits, feats


def assert_cache_close(cache, ref, what: str):
    assert cache.get_seq_length() == ref.get_seq_length(), what
    for i, ((k, v), (rk, rv)) in enumerate(zip(layer_kv(cache), layer_kv(ref))):
        assert k.shape == rk.shape, f"{what}: layer {i} keys {tuple(k.shape)} vs {tuple(rk.shape)}"
        torch.testing.assert_close(k, rk, atol=ATOL, rtol=0, msg=lambda m: f"{what}: layer {i} keys: {m}")
        torch.testing.assert_close(v, rv, atol=ATOL, rtol=0, msg=lambda m: f"{what}: layer {i} values: {m}")


def _random_tree(n_nodes: int, rng: random.Random, vocab: int) -> tuple[list[int], list[int]]:
    parents = [-1] + [rng.randrange(0, i) for i in range(1, n_nodes)]
    tokens = [rng.randrange(vocab) for _ in range(n_nodes)]
    return tokens, parents


def _path_to(parents: list[int], node: int) -> list[int]:
    out = []
    while node != -1:
        out.append(node)
        node = parents[node]
    return out[::-1]


@pytest.mark.parametrize("seed", range(4))
def test_compact_after_tree_forward_equals_fresh_prefix(tiny_target, prompts, seed):
    """Prefix forward, one tree forward with the tree mask, compact to a path: the cache (and
    the next step's logits) equal a fresh forward over prefix + path tokens."""
    t = tiny_target
    rng = random.Random(seed)
    prefix = prompts(1, t.vocab_size, 3 + 7 * seed, 3 + 7 * seed, seed=seed)[0]
    tokens, parents = _random_tree(rng.choice([2, 9, 25, 60]), rng, t.vocab_size)
    pt = torch.tensor(parents)
    anc = ancestor_mask(pt)
    depths = depths_of(pt)
    n = len(prefix)

    tree_cache, _, _ = fresh_cache(t, prefix)
    tree_logits, _ = t.forward(torch.tensor([tokens]), tree_cache, position_ids=(n + depths)[None],
                               attention_mask=verify_mask(anc, n, t.dtype))
    assert tree_cache.get_seq_length() == n + len(tokens)

    leaves = [i for i in range(len(tokens)) if i not in parents]
    inner = [i for i in range(len(tokens)) if i in parents]
    targets = {0, max(leaves, key=lambda i: len(_path_to(parents, i))), rng.choice(leaves)}
    if inner:
        targets.add(rng.choice(inner))                   # a path that stops before a leaf
    for node in sorted(targets):
        path = _path_to(parents, node)
        path_tokens = [tokens[i] for i in path]
        ref_cache, ref_logits, _ = fresh_cache(t, prefix + path_tokens)
        # verification logits along the path are the fresh ones (tree mask + positions are right)
        torch.testing.assert_close(tree_logits[0, path], ref_logits[0, n:], atol=1e-4, rtol=0)

        cache = copy.deepcopy(tree_cache)
        compact(cache, n, torch.tensor(path))
        assert_cache_close(cache, ref_cache, f"path {path}")
        # and the cache keeps working: the next token's logits agree
        nxt = torch.tensor([[rng.randrange(t.vocab_size)]])
        pos = torch.tensor([[n + len(path)]])
        a, _ = t.forward(nxt, cache, position_ids=pos)
        b, _ = t.forward(nxt, ref_cache, position_ids=pos)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_compact_keeps_prefix_and_drops_the_rest(tiny_target):
    cache, _, _ = fresh_cache(tiny_target, list(range(10, 30)))
    before = [(k.clone(), v.clone()) for k, v in layer_kv(cache)]
    with torch.inference_mode():                     # as in the decode loop
        compact(cache, 12, torch.tensor([0, 3, 5]))
    assert cache.get_seq_length() == 15
    for (k, v), (k0, v0) in zip(layer_kv(cache), before):
        assert torch.equal(k[..., :12, :], k0[..., :12, :])
        assert torch.equal(k[..., 12:, :], k0[..., [12, 15, 17], :])
        assert torch.equal(v[..., 12:, :], v0[..., [12, 15, 17], :])
    with torch.inference_mode():                     # a path along the first nodes: cut, nothing moved
        compact(cache, 12, torch.tensor([0, 1]))
    assert cache.get_seq_length() == 14
    for (k, v), (k0, v0) in zip(layer_kv(cache), before):
        assert torch.equal(k[..., 12:, :], k0[..., [12, 15], :]) and torch.equal(v[..., 12:, :], v0[..., [12, 15], :])


def test_compact_outside_inference_mode(tiny_target):
    """`compact` is public and `Target.forward` hands out caches of inference tensors; compacting
    one outside `torch.inference_mode()` (a script, a notebook, a test) must work too."""
    cache, _, _ = fresh_cache(tiny_target, list(range(10, 30)))
    ref, _, _ = fresh_cache(tiny_target, list(range(10, 30)))
    with torch.inference_mode():
        compact(ref, 12, torch.tensor([0, 3, 5]))
    compact(cache, 12, torch.tensor([0, 3, 5]))
    assert_cache_close(cache, ref, "compact outside inference mode")


@pytest.fixture()
def spies(monkeypatch):
    """Record the target cache right after every compaction, and every Drafter created."""
    snapshots, drafters = [], []
    real_compact = hass.decode.compact

    def spy_compact(cache, prefix_len, keep):
        real_compact(cache, prefix_len, keep)
        snapshots.append((prefix_len, keep.tolist(), [(k.clone(), v.clone()) for k, v in layer_kv(cache)]))

    class SpyDrafter(Drafter):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            drafters.append(self)

    monkeypatch.setattr(hass.decode, "compact", spy_compact)
    monkeypatch.setattr(hass.decode, "Drafter", SpyDrafter)
    return snapshots, drafters


@pytest.mark.parametrize("kind,tree", [
    ("matched", TreeConfig(60, 6, 10)),
    ("matched", TreeConfig(16, 12, 2)),
    ("corrupted", TreeConfig(60, 6, 10)),
    ("random", TreeConfig(60, 6, 10)),
])
def test_target_cache_after_cycles_equals_fresh_forward(tiny_target, random_draft, oracle_draft, prompts, run,
                                                        spies, kind, tree):
    snapshots, drafters = spies
    t = tiny_target
    longest = 0
    for prompt in prompts(3, t.vocab_size, 2, 30, seed=21):
        snapshots.clear()
        draft = {"random": random_draft, "matched": oracle_draft(t, prompt),
                 "corrupted": oracle_draft(t, prompt, corrupt_every=3)}[kind]
        toks, steps = run(speculative_generate(t, draft, prompt, GenerationConfig(
            max_new_tokens=30, tree=tree, stop_at_eos=False)))
        seq = prompt + toks
        assert len(snapshots) == sum(st.kind == "speculative" for st in steps)
        for prefix_len, path, kv in snapshots:
            m = prefix_len + len(path)            # cache = prompt + emitted tokens minus the pending bonus
            ref, _, _ = fresh_cache(t, seq[:m])
            for i, ((k, v), (rk, rv)) in enumerate(zip(kv, layer_kv(ref))):
                assert k.shape == rk.shape, f"cycle at {prefix_len}, path {path}: layer {i} length"
                torch.testing.assert_close(k, rk, atol=ATOL, rtol=0)
                torch.testing.assert_close(v, rv, atol=ATOL, rtol=0)
            longest = max(longest, len(path))
        # the draft's own cache covers the same verified context, as if fed in one go
        drafter = drafters[-1]
        m = drafter.kv[0].shape[2]
        assert m == (snapshots[-1][0] if snapshots else len(prompt))   # the last cycle does not extend
        if kind == "random":
            _, _, feats = fresh_cache(t, seq[:m])
            ref = Drafter(random_draft, t.embed_tokens, t.lm_head)
            ref.extend(feats, torch.tensor([seq[1:m + 1]]), 0)
            torch.testing.assert_close(drafter.kv[0], ref.kv[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(drafter.kv[1], ref.kv[1], atol=1e-4, rtol=0)
            torch.testing.assert_close(drafter.last_out, ref.last_out, atol=1e-4, rtol=0)
        else:
            # the oracle's "keys" are the token ids and its "values" the positions it was fed
            assert drafter.kv[0][0, 0, :, 0].long().tolist() == seq[1:m + 1]
            assert drafter.kv[1][0, 0, :, 0].long().tolist() == list(range(m))
    if kind == "random":
        assert longest >= 1
    else:
        assert longest >= 4, "no multi-node path was accepted: the compaction of long paths went untested"


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 3, 3], [12], [2, 10], [7, 4, 1]])
def test_draft_extend_in_chunks_equals_all_at_once(tiny_target, random_draft, prompts, chunks):
    t = tiny_target
    seq = prompts(1, t.vocab_size, 13, 13, seed=8)[0]
    _, _, feats = fresh_cache(t, seq[:12])
    nxt = torch.tensor([seq[1:13]])
    whole = Drafter(random_draft, t.embed_tokens, t.lm_head)
    whole.extend(feats, nxt, 0)
    parts = Drafter(random_draft, t.embed_tokens, t.lm_head)
    start = 0
    for c in chunks:
        parts.extend(feats[:, start:start + c], nxt[:, start:start + c], start)
        start += c
    assert parts.kv[0].shape == whole.kv[0].shape == (1, t.config.num_key_value_heads, 12,
                                                      t.config.hidden_size // t.config.num_attention_heads)
    torch.testing.assert_close(parts.kv[0], whole.kv[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(parts.kv[1], whole.kv[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(parts.last_out, whole.last_out, atol=ATOL, rtol=0)
    # the tree grown from either state is the same
    a = Proposer.fixed(20).tree(parts.grow(seq[12], 12, 4, 4))
    b = Proposer.fixed(20).tree(whole.grow(seq[12], 12, 4, 4))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)
