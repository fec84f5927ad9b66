"""Plain and speculative generation loops. Both are generators of `Step` events.

Validation happens when the generator is created (bad settings raise at once); once a
stream runs it never raises for a normal end: EOS, the token budget and the context limit
are reported as the last step's `stop_reason`.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import compact
from .draft import DraftHead
from .drafting import Drafter, TreeTensors
from .events import DraftTree, Step
from .target import LAST, Target
from .tree import TreeConfig, ancestor_mask, verify_mask
from .verify import SamplingConfig, Verdict, accept_greedy, accept_sampling, sample, target_probs

MAX_NEW_TOKENS_LIMIT = 32768


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    seed: int = 0
    stop_at_eos: bool = True

    def validate(self, vocab_size: int | None = None) -> "GenerationConfig":
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS_LIMIT}, got {m!r}")
        self.sampling.validate()
        self.tree.validate(vocab_size)
        return self


class _Clock:
    """Wall-clock sections that wait for the device, so CUDA timings are real."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def _check_prompt(target: Target, input_ids: list[int]) -> torch.Tensor:
    if not input_ids:
        raise ValueError("empty prompt: nothing to continue from")
    ids = torch.tensor([list(map(int, input_ids))], device=target.device)
    if int(ids.min()) < 0 or int(ids.max()) >= target.vocab_size:
        raise ValueError(f"token ids must lie in [0, {target.vocab_size})")
    if ids.shape[1] >= target.max_length:
        raise ValueError(f"prompt too long: {ids.shape[1]} tokens, the model's context is {target.max_length} "
                         "(shorten the prompt or clear the chat history)")
    return ids


class _Emitter:
    """Applies the stop rules to each step's new tokens and counts what was emitted."""

    def __init__(self, target: Target, cfg: GenerationConfig, prompt_len: int):
        self.eos = target.eos_ids if cfg.stop_at_eos else set()
        self.budget = cfg.max_new_tokens
        self.max_len = target.max_length
        self.emitted = 0
        self.prompt_len = prompt_len
        self.index = 0

    @property
    def remaining(self) -> int:
        return self.budget - self.emitted

    def step(self, kind: str, tree: DraftTree | None, path: list[int], tokens: list[int], sources: list[str],
             probs: list[float], timings: dict[str, float], target_choice: list[int] | None = None) -> Step:
        stop = None
        for i, t in enumerate(tokens):
            if t in self.eos:
                tokens, sources, probs, stop = tokens[:i + 1], sources[:i + 1], probs[:i + 1], "eos"
                break
        if len(tokens) >= self.remaining:
            tokens, sources, probs = tokens[:self.remaining], sources[:self.remaining], probs[:self.remaining]
            stop = stop or "max_new_tokens"
        position = self.prompt_len + self.emitted
        self.emitted += len(tokens)
        if stop is None and self.prompt_len + self.emitted >= self.max_len:
            stop = "context"          # every position of the context is used
        accepted = sum(s.startswith("draft") for s in sources)
        st = Step(index=self.index, kind=kind, tree=tree, path=path, accepted=accepted, new_tokens=tokens,
                  sources=sources, target_prob=probs, timings=timings, position=position, stop_reason=stop,
                  target_choice=target_choice or [])
        self.index += 1
        return st


def _first_token(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> tuple[int, float]:
    """The target's token after the prompt (or after one plain step)."""
    if cfg.greedy:
        tok = int(logits.argmax())
        return tok, float(torch.softmax(logits.float(), -1)[tok])
    p = target_probs(logits.cpu(), cfg)
    tok = sample(p, gen)
    return tok, float(p[tok])


def plain_generate(target: Target, input_ids: list[int], cfg: GenerationConfig) -> Iterator[Step]:
    """Autoregressive decoding through the same target code path: one token per forward."""
    cfg.validate(target.vocab_size)
    ids = _check_prompt(target, input_ids)
    return _plain(target, ids, cfg)


@torch.inference_mode()
def _plain(target: Target, ids: torch.Tensor, cfg: GenerationConfig) -> Iterator[Step]:
    gen = torch.Generator().manual_seed(cfg.seed)
    em = _Emitter(target, cfg, ids.shape[1])
    cache = target.new_cache()
    clock = _Clock(target.device)
    logits, _ = target.forward(ids, cache, logits_rows=LAST)
    t_fwd = clock.lap()
    tok, p = _first_token(logits[0, -1], cfg.sampling, gen)
    step = em.step("prefill", None, [], [tok], ["target"], [p], {"draft": 0.0, "verify": t_fwd, "other": clock.lap()})
    yield step
    clock.lap()
    n = ids.shape[1]
    while step.stop_reason is None:
        logits, _ = target.forward(torch.tensor([[tok]], device=target.device), cache,
                                   position_ids=torch.tensor([[n]], device=target.device))
        t_fwd = clock.lap()
        n += 1
        tok, p = _first_token(logits[0, -1], cfg.sampling, gen)
        step = em.step("plain", None, [], [tok], ["target"], [p], {"draft": 0.0, "verify": t_fwd, "other": clock.lap()})
        yield step
        clock.lap()        # the consumer's time between steps is not decoding time


def speculative_generate(target: Target, draft: DraftHead, input_ids: list[int],
                         cfg: GenerationConfig) -> Iterator[Step]:
    """EAGLE-2 tree drafting + one-forward tree verification; output equals `plain_generate`
    (token for token at T = 0, in distribution at T > 0)."""
    draft_vocab = target.vocab_size if draft.token_map is None else int(draft.token_map.numel())
    cfg.validate(draft_vocab)
    ids = _check_prompt(target, input_ids)
    if draft.config.hidden_size != target.hidden_size:
        raise ValueError(f"draft hidden size {draft.config.hidden_size} does not match the target's "
                         f"{target.hidden_size}")
    return _speculative(target, draft, ids, cfg)


@torch.inference_mode()
def _speculative(target: Target, draft: DraftHead, ids: torch.Tensor, cfg: GenerationConfig) -> Iterator[Step]:
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = target.device
    em = _Emitter(target, cfg, ids.shape[1])
    drafter = Drafter(draft, target.embed_tokens, target.lm_head)
    cache = target.new_cache()
    clock = _Clock(dev)

    logits, feats = target.forward(ids, cache, logits_rows=LAST)
    t_verify = clock.lap()
    root, p = _first_token(logits[0, -1], cfg.sampling, gen)
    t_other = clock.lap()
    n = ids.shape[1]
    step = em.step("prefill", None, [], [root], ["target"], [p], {"draft": 0.0, "verify": t_verify, "other": t_other})
    if step.stop_reason is None:
        drafter.extend(feats, torch.cat((ids[:, 1:], torch.tensor([[root]], device=dev)), 1), 0)
        step.timings["draft"] = clock.lap()
    yield step
    clock.lap()

    while step.stop_reason is None:
        # the root sits at position n; a path of k drafts puts the bonus at n + k + 1 < max_length
        depth = min(cfg.tree.depth, target.max_length - 2 - n, em.remaining - 1)
        tree = drafter.grow(root, n, cfg.tree, depth)
        t_draft = clock.lap()
        anc = ancestor_mask(tree.parents)
        mask = verify_mask(anc, n, target.dtype)
        logits, feats = target.forward(tree.tokens[None], cache, position_ids=(n + tree.depths)[None],
                                       attention_mask=mask)
        t_verify = clock.lap()
        if cfg.sampling.greedy:
            verdict = accept_greedy(tree.tokens, tree.parents, tree.depths, anc, logits[0])
        else:
            verdict = accept_sampling(tree.tokens.cpu(), tree.parents.cpu(), logits[0].cpu(), cfg.sampling, gen)
        path = torch.tensor(verdict.path, device=dev)
        compact(cache, n, path)
        new = tree.tokens[path[1:]].tolist() + [verdict.bonus]
        sources = [f"draft@{d}" for d in range(1, len(path))] + ["bonus"]
        event_tree = _event_tree(tree)
        choice = logits[0].argmax(-1).tolist()
        t_other = clock.lap()
        step = em.step("speculative", event_tree, verdict.path, new, sources, verdict.probs,
                       {"draft": t_draft, "verify": t_verify, "other": t_other}, choice)
        if step.stop_reason is None:
            nxt = torch.cat((tree.tokens[path[1:]], torch.tensor([verdict.bonus], device=dev)))[None]
            drafter.extend(feats[:, path], nxt, n)
            step.timings["draft"] += clock.lap()
        n += len(verdict.path)
        root = verdict.bonus
        yield step
        clock.lap()        # the consumer's time between steps is not decoding time


def _event_tree(t: TreeTensors) -> DraftTree:
    return DraftTree(tokens=t.tokens.tolist(), parents=t.parents.tolist(), depths=t.depths.tolist(),
                     logp=[round(x, 5) for x in t.logp.tolist()], prob=[round(x, 5) for x in t.prob.tolist()])


__all__ = ["GenerationConfig", "plain_generate", "speculative_generate", "Verdict"]
