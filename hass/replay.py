"""tau of fixed tree cuts replayed from one pass over the plain text, and the ceiling of
a draft's candidates.

At temperature 0 a step accepts the longest chain of verified nodes that spells the
target's own greedy continuation, so the output and every root position a decoding visits
follow from the plain greedy text. At T > 0 under coupled sampling the same holds for the
plain *sampled* text of the seed: the target's choice after a node on that text is the
plain sample at that position (the noise is keyed by the position alone, `hass.noise`), and
the draft's proposals there are perturbed by the same noise. The draft's candidates at a
root position depend only on the text before it (the draft reads the target's features of
verified tokens, the same whichever tree verified them, up to rounding). So one plain
decode, one target forward over prompt + answer and one draft growth per position give
every step of any fixed tree:

* `record`: EAGLE-2 growth's candidate pool at every answer position, each candidate
  marked when it lies on the plain continuation;
* `replay`: decoding with a cut of those pools, without the target: `eagle2_cut` (the best
  `total - 1` by draft score, as `speculative_generate`) gives the tau `eval-draft`
  measures, up to rounding;
* `ceiling_cut` keeps exactly the candidates on the continuation. No rule that chooses
  from these candidates accepts more, so its tau is all the draft's candidates allow: the
  gap from a cut to it is what a better cut could win; beyond it only a better draft helps.

Under the rejection rule at T > 0 acceptance is itself random, so nothing is replayable.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .decode import GenerationConfig, plain_generate
from .draft import DraftHead
from .drafting import Drafter
from .steps import coupled_draft, sampling_noise
from .target import LAST, Target
from .tree import best
from .verify import SamplingConfig

Cut = Callable[["Candidates"], torch.Tensor]        # a pool -> the candidate indices to verify


@dataclass(frozen=True)
class Candidates:
    """One root position's pool (CPU): depths, cumulative draft log-probs and whether each
    candidate spells the plain continuation from the root (its ancestors included)."""

    depths: torch.Tensor
    score: torch.Tensor
    on_path: torch.Tensor

    def __len__(self) -> int:
        return int(self.depths.shape[0])


@dataclass(frozen=True)
class Recording:
    """A prompt's plain answer (greedy, or sampled for a seed) and the pool at each of its
    root positions (`pools[i]`: the root is `answer[i]`, as decoding roots a step at its last
    token)."""

    prompt_len: int
    answer: list[int]
    pools: list[Candidates]


def on_continuation(tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor,
                    continuation: list[int]) -> torch.Tensor:
    """Candidates whose path from the root spells `continuation` (depth d: its token d - 1)."""
    on = torch.zeros(tokens.shape[0], dtype=torch.bool)
    deepest = int(depths.max()) if depths.numel() else 0
    for d in range(1, min(deepest, len(continuation)) + 1):
        rows = (depths == d).nonzero().flatten()
        hit = tokens[rows] == continuation[d - 1]
        if d > 1:
            hit &= on[parents[rows]]
        on[rows] = hit
    return on


@torch.inference_mode()
def record(target: Target, draft: DraftHead, input_ids: list[int], max_new_tokens: int = 128,
           depth: int = 6, top_k: int = 10, sampling: SamplingConfig | None = None, seed: int = 0) -> Recording:
    """Decode `input_ids` plainly (greedy, or sampled with `sampling` and `seed` under coupled
    sampling), then grow the draft's pool at every root position as `speculative_generate`
    would (the same depth limit near the token budget and the context's end, the same noise
    on the draft's proposals)."""
    sampling = sampling if sampling is not None else SamplingConfig()
    if not sampling.greedy and not sampling.coupled:
        raise ValueError("replay at T > 0 needs coupled sampling: under the rejection rule acceptance is random")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
    answer = [t for st in plain_generate(target, input_ids, cfg) for t in st.new_tokens]
    p = len(input_ids)
    full = torch.tensor([list(input_ids) + answer], device=target.device)
    _, feats = target.forward(full, target.new_cache(), logits_rows=LAST)
    drafter = Drafter(draft, target.embed_tokens, target.lm_head)
    perturb = coupled_draft(sampling, sampling_noise(sampling, seed, target.vocab_size), drafter.token_map)
    drafter.extend(feats[:, :p], full[:, 1:p + 1], 0)           # pairs (f_t, x_t+1) up to the first root
    pools = []
    for i in range(len(answer) - 1):                            # the last token roots no step
        n = p + i
        if i:
            drafter.extend(feats[:, n - 1:n], full[:, n:n + 1], n - 1)
        room = min(target.max_length - 2 - n, max_new_tokens - (i + 1) - 1)   # decode.py's limit
        pool = drafter.grow(answer[i], n, top_k, min(depth, room), perturb=perturb)
        tokens, parents, depths = pool.tokens.cpu(), pool.parents.cpu(), pool.depths.cpu()
        pools.append(Candidates(depths, pool.score.float().cpu(),
                                on_continuation(tokens, parents, depths, answer[i + 1:])))
    return Recording(p, answer, pools)


def replay(rec: Recording, cut: Cut) -> tuple[int, int]:
    """(new tokens of the speculative steps, speculative steps) of decoding with `cut`: its
    tau is their ratio, as `hass.events.summarize` counts it (the prefill's token apart)."""
    i, tokens, steps = 0, 0, 0
    last = len(rec.answer) - 1
    while i < last:
        pool = rec.pools[i]
        kept = cut(pool)
        hits = kept[pool.on_path[kept]]
        accepted = int(pool.depths[hits].max()) if hits.numel() else 0
        new = min(accepted + 1, last - i)                       # the answer ends at EOS or the budget
        tokens, steps, i = tokens + new, steps + 1, i + new
    return tokens, steps


def eagle2_cut(total_tokens: int) -> Cut:
    """EAGLE-2's fixed cut: the best `total_tokens - 1` candidates by cumulative draft score."""
    return lambda pool: best(pool.score, total_tokens - 1)


def ceiling_cut(pool: Candidates) -> torch.Tensor:
    """The candidates on the continuation: what a cut that knew the answer would verify."""
    return pool.on_path.nonzero().flatten()


def replay_report(recordings: dict[str, list[Recording]], totals: list[int]) -> dict:
    """Per set (recordings pooled, as `eval-draft` pools a set's steps) and their mean: tau
    of EAGLE-2's cut at each tree size in `totals`, and the ceiling."""
    cuts = {str(t): eagle2_cut(t) for t in totals} | {"ceiling": ceiling_cut}
    sets = {}
    for name, recs in recordings.items():
        row = {}
        for label, cut in cuts.items():
            counts = [replay(r, cut) for r in recs]
            row[label] = sum(c[0] for c in counts) / max(sum(c[1] for c in counts), 1)
        sets[name] = {"prompts": len(recs), "new_tokens": sum(len(r.answer) for r in recs), "tau": row}
    mean = {label: sum(s["tau"][label] for s in sets.values()) / max(len(sets), 1) for label in cuts}
    return {"sets": sets, "mean_tau": mean}


__all__ = ["Candidates", "Recording", "ceiling_cut", "eagle2_cut", "on_continuation", "record", "replay",
           "replay_report"]
