"""`hass.replay`: a fixed cut replayed from the plain text takes the very steps speculative
decoding takes (tokens and step count), and the ceiling bounds every cut."""
from __future__ import annotations

import pytest
import torch

from hass.decode import GenerationConfig, speculative_generate
from hass.events import summarize
from hass.replay import Candidates, ceiling_cut, eagle2_cut, on_continuation, record, replay, replay_report
from hass.tree import TreeConfig
from hass.verify import SamplingConfig

SHAPES = [TreeConfig(8, 3, 3), TreeConfig(20, 5, 4), TreeConfig(2, 1, 1)]
NEW = 24


def _drafts(target, prompt, oracle_draft, random_draft):
    return {"random": random_draft, "oracle": oracle_draft(target, prompt),
            "corrupted oracle": oracle_draft(target, prompt, corrupt_every=3)}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.total_tokens}/{s.depth}/{s.top_k}")
def test_replayed_cut_takes_the_steps_of_speculative_decoding(tiny_target, random_draft, oracle_draft, prompts,
                                                             shape):
    accepted_somewhere = False
    for prompt in prompts(3, tiny_target.vocab_size, 3, 12, seed=7):
        for name, draft in _drafts(tiny_target, prompt, oracle_draft, random_draft).items():
            steps = list(speculative_generate(tiny_target, draft, prompt, GenerationConfig(max_new_tokens=NEW, tree=shape)))
            s = summarize(steps)
            rec = record(tiny_target, draft, prompt, NEW, shape.depth, shape.top_k)
            assert rec.answer == [t for st in steps for t in st.new_tokens]
            tokens, cycles = replay(rec, eagle2_cut(shape.total_tokens))
            assert (tokens, cycles) == (s.new_tokens - 1, s.cycles), (name, shape)
            accepted_somewhere |= s.tau > 1.5
            ceiling = replay(rec, ceiling_cut)
            assert ceiling[0] / ceiling[1] >= tokens / cycles - 1e-12
    assert accepted_somewhere                      # the oracle drafts did accept deep paths


@pytest.mark.parametrize("temperature", [0.8, 1.3])
def test_replay_under_coupled_sampling_takes_the_steps_of_speculative_decoding(tiny_target, random_draft,
                                                                             oracle_draft, prompts, temperature):
    """At T > 0 the plain sampled text of a seed fixes every step of coupled speculative
    decoding as the greedy text does at T = 0; a greedy recording (negative control) does not."""
    shape, sampling = TreeConfig(8, 3, 3), SamplingConfig(temperature=temperature)
    differs = False
    for seed, prompt in enumerate(prompts(2, tiny_target.vocab_size, 3, 12, seed=11)):
        for name, draft in _drafts(tiny_target, prompt, oracle_draft, random_draft).items():
            cfg = GenerationConfig(max_new_tokens=NEW, tree=shape, sampling=sampling, seed=seed)
            steps = list(speculative_generate(tiny_target, draft, prompt, cfg))
            s = summarize(steps)
            rec = record(tiny_target, draft, prompt, NEW, shape.depth, shape.top_k, sampling, seed)
            assert rec.answer == [t for st in steps for t in st.new_tokens]
            assert replay(rec, eagle2_cut(shape.total_tokens)) == (s.new_tokens - 1, s.cycles), (name, seed)
            greedy = record(tiny_target, draft, prompt, NEW, shape.depth, shape.top_k)
            differs |= greedy.answer != rec.answer
    assert differs


def test_replay_refuses_the_rejection_rule(tiny_target, random_draft, prompts):
    prompt = prompts(1, tiny_target.vocab_size, 3, 8, seed=2)[0]
    with pytest.raises(ValueError, match="coupled"):
        record(tiny_target, random_draft, prompt, 8, 3, 3, SamplingConfig(temperature=1.0, rule="rejection"))


def test_replay_tells_cuts_apart_and_keeping_everything_is_the_ceiling(tiny_target, oracle_draft, prompts):
    prompt = prompts(1, tiny_target.vocab_size, 4, 8, seed=3)[0]
    draft = oracle_draft(tiny_target, prompt, corrupt_every=3)
    rec = record(tiny_target, draft, prompt, NEW, 4, 3)
    wide, narrow = replay(rec, eagle2_cut(30)), replay(rec, eagle2_cut(2))
    assert wide[1] < narrow[1]                     # negative control: a one-node cut takes more steps
    everything = max(len(p) for p in rec.pools) + 1
    assert replay(rec, eagle2_cut(everything)) == replay(rec, ceiling_cut)
    report = replay_report({"set": [rec]}, [2, 30])
    assert report["sets"]["set"]["tau"]["2"] <= report["sets"]["set"]["tau"]["30"] <= report["mean_tau"]["ceiling"]


def test_on_continuation_needs_the_whole_path():
    # root children: 5 (on), 6; under 5: 7 (on), 8; under 6: 7 (same token, wrong parent)
    tokens = torch.tensor([5, 6, 7, 8, 7])
    parents = torch.tensor([-1, -1, 0, 0, 1])
    depths = torch.tensor([1, 1, 2, 2, 2])
    on = on_continuation(tokens, parents, depths, [5, 7, 9])
    assert on.tolist() == [True, False, True, False, False]
    pool = Candidates(depths, torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5]), on)
    assert ceiling_cut(pool).tolist() == [0, 2]
