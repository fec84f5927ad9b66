"""Plain and speculative generation loops. Both are generators of `Step` events.

Validation happens when the generator is created (bad settings raise at once); once a
stream runs it never raises for a normal end: EOS, the token budget and the context limit
are reported as the last step's `stop_reason`.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import compact
from .candidates import LookupConfig, Pool
from .draft import DraftHead
from .drafting import Drafter
from .events import Step
from .propose import Proposer
from .steps import Clock, Emitter, check_prompt, coupled_draft, event_tree, first_token, path_sources, sampling_noise
from .target import LAST, Target
from .tree import TreeConfig, ancestor_mask, is_chain, verify_mask
from .verify import SamplingConfig, Verdict, accept

MAX_NEW_TOKENS_LIMIT = 32768


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    seed: int = 0
    stop_at_eos: bool = True
    fitted: bool = False                 # choose the tree size per step (tree.total_tokens is then the cap)
    lookup: LookupConfig | None = None   # lookup candidates in the tree (None = draft only)
    draft_source: bool = True            # False: lookup candidates only (the draft head is not run)

    def validate(self, vocab_size: int | None = None) -> "GenerationConfig":
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS_LIMIT}, got {m!r}")
        self.sampling.validate()
        self.tree.validate(vocab_size)
        if self.lookup is not None:
            self.lookup.validate()
        if not self.draft_source and self.lookup is None:
            raise ValueError("no candidate source: enable the draft head or lookup")
        return self


def plain_generate(target: Target, input_ids: list[int], cfg: GenerationConfig) -> Iterator[Step]:
    """Autoregressive decoding through the same target code path: one token per forward."""
    cfg.validate(target.vocab_size)
    ids = check_prompt(target, input_ids)
    return _plain(target, ids, cfg)


@torch.inference_mode()
def _plain(target: Target, ids: torch.Tensor, cfg: GenerationConfig) -> Iterator[Step]:
    noise = sampling_noise(cfg.sampling, cfg.seed, target.vocab_size)
    em = Emitter(target, cfg, ids.shape[1])
    cache = target.new_cache()
    clock = Clock(target.device)
    logits, _ = target.forward(ids, cache, logits_rows=LAST)
    t_fwd = clock.lap()
    n = ids.shape[1]
    tok, p = first_token(logits[0, -1], cfg.sampling, noise, n)
    step = em.step("prefill", None, [], [tok], ["target"], [p], {"draft": 0.0, "verify": t_fwd, "other": clock.lap()})
    yield step
    clock.lap()
    while step.stop_reason is None:
        logits, _ = target.forward(torch.tensor([[tok]], device=target.device), cache,
                                   position_ids=torch.tensor([[n]], device=target.device))
        t_fwd = clock.lap()
        n += 1
        tok, p = first_token(logits[0, -1], cfg.sampling, noise, n)
        step = em.step("plain", None, [], [tok], ["target"], [p], {"draft": 0.0, "verify": t_fwd, "other": clock.lap()})
        yield step
        clock.lap()        # the consumer's time between steps is not decoding time


def speculative_generate(target: Target, draft: DraftHead, input_ids: list[int],
                         cfg: GenerationConfig) -> Iterator[Step]:
    """EAGLE-2 tree drafting + one-forward tree verification; output equals `plain_generate`
    (token for token at T = 0, in distribution at T > 0)."""
    draft_vocab = target.vocab_size if draft.token_map is None else int(draft.token_map.numel())
    cfg.validate(draft_vocab)
    ids = check_prompt(target, input_ids)
    if draft.config.hidden_size != target.hidden_size:
        raise ValueError(f"draft hidden size {draft.config.hidden_size} does not match the target's "
                         f"{target.hidden_size}")
    return _speculative(target, draft, ids, cfg)


@torch.inference_mode()
def _speculative(target: Target, draft: DraftHead, ids: torch.Tensor, cfg: GenerationConfig) -> Iterator[Step]:
    gen = torch.Generator().manual_seed(cfg.seed)          # the rejection rule's uniforms
    noise = sampling_noise(cfg.sampling, cfg.seed, target.vocab_size)
    dev = target.device
    em = Emitter(target, cfg, ids.shape[1])
    drafter = Drafter(draft, target.embed_tokens, target.lm_head)
    perturb = coupled_draft(cfg.sampling, noise, drafter.token_map)
    proposer = Proposer.for_generation(target, cfg)
    cache = target.new_cache()
    clock = Clock(dev)

    logits, feats = target.forward(ids, cache, logits_rows=LAST)
    t_verify = clock.lap()
    n = ids.shape[1]
    root, p = first_token(logits[0, -1], cfg.sampling, noise, n)
    t_other = clock.lap()
    step = em.step("prefill", None, [], [root], ["target"], [p], {"draft": 0.0, "verify": t_verify, "other": t_other})
    # verified pairs (f_t, x_{t+1}) not yet fed to the draft: fed in one extend when it next drafts
    pending = _Pending(0)
    pending.add(feats, torch.cat((ids[:, 1:], torch.tensor([[root]], device=dev)), 1))
    yield step
    clock.lap()

    history = torch.cat((ids[0].cpu(), torch.tensor([root])))
    while step.stop_reason is None:
        # the root sits at position n; a path of k drafts puts the bonus at n + k + 1 < max_length
        room = min(target.max_length - 2 - n, em.remaining - 1)
        chain = proposer.chain(history)
        drafting = cfg.draft_source and proposer.use_draft(chain)
        if drafting:
            pending.flush(drafter)
        t_extend = clock.lap()
        pool = drafter.grow(root, n, cfg.tree.top_k, min(cfg.tree.depth, room), proposer.growth_limit, perturb) \
            if drafting else Pool.empty(root, dev)
        t_grow = clock.lap()
        tree = proposer.tree(pool, chain, t_grow, room)
        t_draft = t_extend + t_grow + clock.lap()
        anc = ancestor_mask(tree.parents)
        # a chain (lookup-only or top-1 drafts, or the root alone) needs no tree mask: the model's
        # own causal one is the same, and its mask-free attention path is the plain step's
        mask = None if is_chain(tree.parents) else verify_mask(anc, n, target.dtype)
        logits, feats = target.forward(tree.tokens[None], cache, position_ids=(n + tree.depths)[None],
                                       attention_mask=mask)
        t_verify = clock.lap()
        verdict = accept(cfg.sampling, tree.tokens, tree.parents, tree.depths, anc, logits[0], n, noise, gen)
        path = torch.tensor(verdict.path, device=dev)
        compact(cache, n, path)
        new = tree.tokens[path[1:]].tolist() + [verdict.bonus]
        proposer.observe(tree, verdict.path, t_verify, t_grow, t_draft, verdict.bonus)
        t_other = clock.lap()
        step = em.step("speculative", event_tree(tree, drafting), verdict.path, new, path_sources(tree, verdict.path),
                       verdict.probs, {"draft": t_draft, "verify": t_verify, "other": t_other}, verdict.choice)
        if step.stop_reason is None and cfg.draft_source:
            pending.add(feats[:, path], torch.cat((tree.tokens[path[1:]], torch.tensor([verdict.bonus], device=dev)))[None])
        n += len(verdict.path)
        root = verdict.bonus
        history = torch.cat((history, torch.tensor(new[:len(step.new_tokens)])))
        yield step
        clock.lap()        # the consumer's time between steps is not decoding time


class _Pending:
    """Verified (feature, next token) pairs waiting for the draft's cache, from `start` on."""

    def __init__(self, start: int):
        self.start, self.feats, self.tokens = start, [], []

    def add(self, feats: torch.Tensor, tokens: torch.Tensor) -> None:
        self.feats.append(feats)
        self.tokens.append(tokens)

    def flush(self, drafter: Drafter) -> None:
        if self.feats:
            feats, toks = torch.cat(self.feats, 1), torch.cat(self.tokens, 1)
            drafter.extend(feats, toks, self.start)
            self.start += int(toks.shape[1])
            self.feats, self.tokens = [], []


__all__ = ["GenerationConfig", "plain_generate", "speculative_generate", "Verdict"]
