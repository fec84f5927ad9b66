"""T = 0: speculative decoding must reproduce plain greedy decoding token for token.

The tiny fp32 target is peaked enough (see conftest.build_tiny_target) that a mismatch is
a cache, mask, position or acceptance bug, never fp32 noise (method.md section 5).
Three drafts: a random one (almost every draft token rejected: bonus-only cycles), the
oracle (the tree holds the target's greedy continuation: deep paths accepted) and a
corrupted oracle (acceptance stops at varied depths).
"""
from __future__ import annotations

import pytest
import torch

from hass.decode import GenerationConfig, plain_generate, speculative_generate
from hass.draft import new_draft
from hass.events import summarize
from hass.tree import TreeConfig

N_PROMPTS = 20
NEW_TOKENS = 24
SHAPES = {
    "chain-1": TreeConfig(total_tokens=2, depth=1, top_k=1),
    "depth1-wide": TreeConfig(total_tokens=11, depth=1, top_k=10),
    "wide": TreeConfig(total_tokens=48, depth=3, top_k=16),
    "deep": TreeConfig(total_tokens=16, depth=12, top_k=2),
    "eagle2-60-6-10": TreeConfig(total_tokens=60, depth=6, top_k=10),
}


@pytest.fixture(scope="module")
def greedy_prompts(tiny_target, prompts):
    return prompts(N_PROMPTS, tiny_target.vocab_size, 1, 40, seed=1234)


@pytest.fixture(scope="module")
def plain_outputs(tiny_target, greedy_prompts, run):
    """Plain greedy (tokens, steps) per prompt, computed once for all tree shapes."""
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    return [run(plain_generate(tiny_target, p, cfg)) for p in greedy_prompts]


def _draft_for(kind, target, prompt, random_draft, oracle_draft):
    if kind == "random":
        return random_draft
    if kind == "matched":
        return oracle_draft(target, prompt)
    return oracle_draft(target, prompt, corrupt_every=3)


def _check_step_bookkeeping(steps, prompt_len):
    """Every step's fields agree with its tokens (positions, sources, accepted counts)."""
    pos = prompt_len
    for i, st in enumerate(steps):
        assert st.index == i
        assert st.position == pos
        assert len(st.new_tokens) == len(st.sources) == len(st.target_prob) >= 1
        assert st.accepted == sum(s.startswith("draft") for s in st.sources)
        assert (st.stop_reason is None) == (i < len(steps) - 1)
        if st.kind == "speculative":
            assert st.sources[:st.accepted] == [f"draft@{d}" for d in range(1, st.accepted + 1)]
            assert st.tree is not None and st.path[0] == 0 and len(st.path) >= st.accepted + 1
            assert [st.tree.tokens[j] for j in st.path[1:st.accepted + 1]] == st.new_tokens[:st.accepted]
        pos += len(st.new_tokens)


def test_tiny_target_is_peaked_enough(tiny_target, greedy_prompts, plain_outputs):
    """Precondition of every equality test here: no argmax near-tie that fp32 noise could flip."""
    gaps = []
    for p, (toks, _) in zip(greedy_prompts, plain_outputs):
        logits, _ = tiny_target.forward(torch.tensor([p + toks[:-1]]), tiny_target.new_cache())
        top2 = logits[0, len(p) - 1:].topk(2, dim=-1).values
        gaps.append(top2[:, 0] - top2[:, 1])
    assert float(torch.cat(gaps).min()) > 1e-3


@pytest.mark.parametrize("kind", ["random", "matched", "corrupted"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_speculative_greedy_equals_plain(tiny_target, random_draft, oracle_draft, greedy_prompts, plain_outputs,
                                         run, shape, kind):
    tree = SHAPES[shape]
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, tree=tree, stop_at_eos=False)
    accepted, cycles = 0, 0
    for prompt, (plain_toks, plain_steps) in zip(greedy_prompts, plain_outputs):
        draft = _draft_for(kind, tiny_target, prompt, random_draft, oracle_draft)
        toks, steps = run(speculative_generate(tiny_target, draft, prompt, cfg))
        assert toks == plain_toks, f"prompt of length {len(prompt)}: speculative != plain"
        assert steps[-1].stop_reason == "max_new_tokens"
        _check_step_bookkeeping(steps, len(prompt))
        # the target probability reported per token is the same in both loops
        spec_p = torch.tensor([x for s in steps for x in s.target_prob])
        plain_p = torch.tensor([x for s in plain_steps for x in s.target_prob])
        torch.testing.assert_close(spec_p, plain_p, atol=1e-5, rtol=1e-4)
        for st in steps:
            if st.kind == "speculative":
                assert len(st.tree) <= tree.total_tokens
                assert max(st.tree.depths) <= tree.depth
                accepted += st.accepted
                cycles += 1
    mean_accepted = accepted / cycles
    if kind == "matched":
        # the oracle's tree holds the greedy continuation: nearly every cycle takes a full path
        if tree.depth == 1:
            assert mean_accepted > 0.9
        else:
            assert mean_accepted > 1.5, f"matched draft accepted only {mean_accepted:.2f} tokens per cycle"
    if kind == "corrupted" and tree.depth > 1:
        assert 0.3 < mean_accepted < tree.depth          # partial paths, not all-or-nothing


def test_matched_drafter_accepts_deep_paths(tiny_target, oracle_draft, greedy_prompts, plain_outputs, run):
    """Guard against a silent degradation to zero acceptance: tau must be well above 1,
    and the number of target forwards well below the number of tokens."""
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, tree=SHAPES["eagle2-60-6-10"], stop_at_eos=False)
    taus, depths_seen = [], set()
    for prompt, (plain_toks, _) in zip(greedy_prompts[:8], plain_outputs[:8]):
        toks, steps = run(speculative_generate(tiny_target, oracle_draft(tiny_target, prompt), prompt, cfg))
        assert toks == plain_toks
        s = summarize(steps)
        taus.append(s.tau)
        assert s.target_forwards < len(toks) / 2
        depths_seen.update(st.accepted for st in steps if st.kind == "speculative")
    assert sum(taus) / len(taus) > 2.5
    assert max(depths_seen) >= 3                    # multi-node paths were accepted (and compacted)


@pytest.mark.parametrize("kind", ["random", "matched"])
def test_max_new_tokens_is_exact(tiny_target, random_draft, oracle_draft, greedy_prompts, plain_outputs, run, kind):
    for budget in (1, 2, 3, 5, 8, 13):
        for tree in (SHAPES["deep"], SHAPES["eagle2-60-6-10"]):
            cfg = GenerationConfig(max_new_tokens=budget, tree=tree, stop_at_eos=False)
            for prompt, (plain_toks, _) in list(zip(greedy_prompts, plain_outputs))[:4]:
                draft = _draft_for(kind, tiny_target, prompt, random_draft, oracle_draft)
                toks, steps = run(speculative_generate(tiny_target, draft, prompt, cfg))
                assert toks == plain_toks[:budget]
                assert steps[-1].stop_reason == "max_new_tokens"
                ptoks, psteps = run(plain_generate(tiny_target, prompt, cfg))
                assert ptoks == plain_toks[:budget] and len(psteps) == budget


@pytest.fixture()
def eos_target(tiny_target, monkeypatch):
    """Factory: the tiny model with its EOS moved to a chosen token (restored afterwards)."""
    from hass.target import Target

    def make(eos: int) -> Target:
        monkeypatch.setattr(tiny_target.model.config, "eos_token_id", eos)
        monkeypatch.setattr(tiny_target.model.generation_config, "eos_token_id", eos)
        t = Target(model=tiny_target.model, tokenizer=None, name="tiny-eos")
        assert t.eos_ids == {eos}
        return t
    return make


@pytest.mark.parametrize("kind", ["random", "matched", "corrupted"])
def test_stop_at_eos_gives_identical_output(eos_target, random_draft, oracle_draft, greedy_prompts, plain_outputs,
                                            run, kind):
    tested = 0
    for prompt, (full, _) in zip(greedy_prompts, plain_outputs):
        # an EOS that first appears mid-output, so the stop lands inside a speculative cycle
        cand = [t for i, t in enumerate(full) if 3 <= i <= 15 and t not in full[:i]]
        if not cand:
            continue
        eos = cand[0]
        expected = full[:full.index(eos) + 1]
        target = eos_target(eos)
        for tree in (SHAPES["deep"], SHAPES["eagle2-60-6-10"]):
            cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, tree=tree, stop_at_eos=True)
            ptoks, psteps = run(plain_generate(target, prompt, cfg))
            draft = _draft_for(kind, target, prompt, random_draft, oracle_draft)
            stoks, ssteps = run(speculative_generate(target, draft, prompt, cfg))
            assert ptoks == expected and psteps[-1].stop_reason == "eos"
            assert stoks == expected and ssteps[-1].stop_reason == "eos"
            # stop_at_eos=False runs through the same token
            cfg_no = GenerationConfig(max_new_tokens=NEW_TOKENS, tree=tree, stop_at_eos=False)
            draft = _draft_for(kind, target, prompt, random_draft, oracle_draft)
            assert run(speculative_generate(target, draft, prompt, cfg_no))[0] == full
        tested += 1
        if tested == 6:
            break
    assert tested >= 4


def test_eos_as_first_token_stops_at_once(eos_target, random_draft, greedy_prompts, plain_outputs, run):
    prompt, (full, _) = greedy_prompts[0], plain_outputs[0]
    target = eos_target(full[0])
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, tree=SHAPES["eagle2-60-6-10"])
    for gen in (plain_generate(target, prompt, cfg), speculative_generate(target, random_draft, prompt, cfg)):
        toks, steps = run(gen)
        assert toks == [full[0]] and len(steps) == 1 and steps[0].stop_reason == "eos"


@pytest.fixture(scope="module")
def short_target(make_target):
    """The same tiny model with a 64-position context, so contexts fill up cheaply."""
    return make_target(max_position_embeddings=64, name="tiny-llama-64")


def _check_context_stop(target, draft_for, prompts, run, shape, rooms, seed):
    max_len = target.max_length
    cfg = GenerationConfig(max_new_tokens=64, tree=SHAPES[shape], stop_at_eos=False)
    base = prompts(1, target.vocab_size, max_len, max_len, seed=seed)[0]
    for room in rooms:
        prompt = base[:max_len - room]
        ptoks, psteps = run(plain_generate(target, prompt, cfg))
        assert psteps[-1].stop_reason == "context"
        assert len(prompt) + len(ptoks) == max_len         # every position is used, none beyond
        stoks, ssteps = run(speculative_generate(target, draft_for(prompt), prompt, cfg))
        assert ssteps[-1].stop_reason == "context"
        assert stoks == ptoks, (f"prompt {len(prompt)} tokens (context {max_len}): plain emitted {len(ptoks)}, "
                                f"speculative {len(stoks)}")


@pytest.mark.parametrize("kind", ["random", "matched", "corrupted"])
@pytest.mark.parametrize("shape", ["deep", "eagle2-60-6-10"])
def test_context_limit_stops_cleanly(short_target, oracle_draft, prompts, run, kind, shape):
    """Prompts ending 1..20 positions before max_position_embeddings: both loops stop with
    stop_reason 'context' after the same tokens, without raising."""
    random_draft = new_draft(short_target.config, seed=3)
    _check_context_stop(short_target, lambda p: _draft_for(kind, short_target, p, random_draft, oracle_draft),
                        prompts, run, shape, range(1, 21), seed=99)


@pytest.mark.parametrize("kind", ["random", "matched"])
def test_context_limit_on_512_positions(tiny_target, random_draft, oracle_draft, prompts, run, kind):
    _check_context_stop(tiny_target, lambda p: _draft_for(kind, tiny_target, p, random_draft, oracle_draft),
                        prompts, run, "eagle2-60-6-10", (1, 2, 6, 11), seed=7)


def test_longest_allowed_prompt(tiny_target, random_draft, oracle_draft, prompts, run):
    max_len = tiny_target.max_length
    prompt = prompts(1, tiny_target.vocab_size, max_len - 1, max_len - 1, seed=5)[0]
    cfg = GenerationConfig(max_new_tokens=10, tree=SHAPES["eagle2-60-6-10"])
    ptoks, psteps = run(plain_generate(tiny_target, prompt, cfg))
    for draft in (random_draft, oracle_draft(tiny_target, prompt)):
        stoks, ssteps = run(speculative_generate(tiny_target, draft, prompt, cfg))
        assert stoks == ptoks and ssteps[-1].stop_reason == psteps[-1].stop_reason == "context"
        assert len(stoks) == 1                 # the last position of the context is still used


def test_reduced_draft_vocabulary(tiny_target, oracle_draft, greedy_prompts, plain_outputs, run):
    """A draft with a token map (EAGLE-3 style reduced vocabulary) stays exact, and its draft
    indices are mapped back to target ids: with the oracle behind a permuted map, acceptance
    stays high only if every drafted index is translated correctly."""
    gen = torch.Generator().manual_seed(0)
    subset = torch.randperm(tiny_target.vocab_size, generator=gen)[:48].sort().values
    random_mapped = new_draft(tiny_target.config, seed=4, token_map=subset).eval()
    perm = torch.randperm(tiny_target.vocab_size, generator=gen)
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, tree=SHAPES["eagle2-60-6-10"], stop_at_eos=False)
    accepted, cycles = 0, 0
    for prompt, (plain_toks, _) in list(zip(greedy_prompts, plain_outputs))[:6]:
        toks, steps = run(speculative_generate(tiny_target, random_mapped, prompt, cfg))
        assert toks == plain_toks
        allowed = set(subset.tolist())
        assert all(set(st.tree.tokens[1:]) <= allowed for st in steps if st.kind == "speculative")
        oracle = oracle_draft(tiny_target, prompt)
        oracle.token_map = perm
        toks, steps = run(speculative_generate(tiny_target, oracle, prompt, cfg))
        assert toks == plain_toks
        accepted += sum(st.accepted for st in steps if st.kind == "speculative")
        cycles += sum(st.kind == "speculative" for st in steps)
    assert accepted / cycles > 1.5
