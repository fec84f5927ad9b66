"""What every decoding loop shares, batch 1 and batch N: prompt checks, the device clock,
the stop rules that turn a verdict into a `Step`, the first token and the event tree."""
from __future__ import annotations

import time

import torch

from .candidates import LOOKUP, ORIGIN_NAMES
from .drafting import TreeTensors
from .events import DraftTree, Step
from .target import Target
from .noise import PositionNoise, draft_perturbation
from .verify import SamplingConfig, coupled_choice, target_probs


class Clock:
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


def check_prompt(target: Target, input_ids: list[int]) -> torch.Tensor:
    if not input_ids:
        raise ValueError("empty prompt: nothing to continue from")
    ids = torch.tensor([list(map(int, input_ids))], device=target.device)
    if int(ids.min()) < 0 or int(ids.max()) >= target.vocab_size:
        raise ValueError(f"token ids must lie in [0, {target.vocab_size})")
    if ids.shape[1] >= target.max_length:
        raise ValueError(f"prompt too long: {ids.shape[1]} tokens, the model's context is {target.max_length} "
                         "(shorten the prompt or clear the chat history)")
    return ids


class Emitter:
    """Applies the stop rules to each step's new tokens and counts what was emitted."""

    def __init__(self, target: Target, cfg, prompt_len: int):
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
        accepted = sum(s.startswith(("draft@", "lookup@")) for s in sources)
        st = Step(index=self.index, kind=kind, tree=tree, path=path, accepted=accepted, new_tokens=tokens,
                  sources=sources, target_prob=probs, timings=timings, position=position, stop_reason=stop,
                  target_choice=target_choice or [])
        self.index += 1
        return st


def first_token(logits: torch.Tensor, cfg: SamplingConfig, noise: PositionNoise | None,
                position: int) -> tuple[int, float]:
    """The target's token at sequence `position` (after the prompt, or one plain step):
    its argmax at T = 0, else the Gumbel-max sample with that position's noise."""
    if cfg.greedy:
        tok = int(logits.argmax())
        return tok, float(torch.softmax(logits.float(), -1)[tok])
    p = target_probs(logits, cfg)
    tok = int(coupled_choice(logits, cfg, noise.at(position, logits.device), p))
    return tok, float(p[tok])


def sampling_noise(cfg: SamplingConfig, seed: int, vocab_size: int) -> PositionNoise | None:
    """The per-position noise of a stream (None when greedy: nothing is random)."""
    return None if cfg.greedy else PositionNoise(seed, vocab_size)


def coupled_draft(cfg: SamplingConfig, noise: PositionNoise | None, token_map: torch.Tensor | None):
    """The draft's side of coupled sampling for a stream (`hass.noise.draft_perturbation`),
    None unless the rule is coupled and T > 0."""
    return draft_perturbation(noise, cfg.temperature, token_map) if cfg.coupled else None


def event_tree(t: TreeTensors, drafted: bool = True) -> DraftTree:
    """The plain-data tree of a step, with each node's origin when it was cut from a pool
    (`drafted`: whether the draft head ran this step)."""
    origin = [] if t.origin is None else ["root"] + [ORIGIN_NAMES[int(o)] for o in t.origin[1:].tolist()]
    return DraftTree(tokens=t.tokens.tolist(), parents=t.parents.tolist(), depths=t.depths.tolist(),
                     logp=[round(x, 5) for x in t.logp.tolist()], prob=[round(x, 5) for x in t.prob.tolist()],
                     origin=origin, rule=t.rule, expected=round(t.expected, 4), drafted=drafted)


def path_sources(t: TreeTensors, path: list[int]) -> list[str]:
    """Per new token of an accepted path: "draft@d" (found by the draft head, alone or with
    lookup), "lookup@d" (by lookup only), then "bonus"."""
    if t.origin is None:
        kinds = ["draft"] * len(path)
    else:
        o = t.origin.tolist()
        kinds = ["lookup" if o[i] == LOOKUP else "draft" for i in path]
    return [f"{kinds[d]}@{d}" for d in range(1, len(path))] + ["bonus"]


__all__ = ["Clock", "Emitter", "check_prompt", "event_tree", "first_token", "path_sources", "sampling_noise",
           "coupled_draft"]
