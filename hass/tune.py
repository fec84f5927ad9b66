"""Pick the draft tree that is fastest on this device, by measurement.

1. Record: decode a few prompts greedily with a large tree per top_k; each step event holds
   the tree (nodes ranked by cumulative draft score) and the target's choice at every node.
2. Estimate: for every smaller (total_tokens, depth), the accepted length each recorded
   cycle *would* have had is read off the recorded tree (the best-scored nodes of the
   allowed depths, the longest path the target agrees with). Costs come from timing the
   verify forward per tree size and the drafter per depth on this device.
3. Verify: the best few estimates and plain decoding run side by side on the prompts; the
   measured winner is written to the device profile.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch

from .cost import median_time, verify_costs
from .decode import GenerationConfig, plain_generate, speculative_generate
from .draft import DraftHead
from .drafting import Drafter
from .events import Step, summarize
from .target import Target
from .tree import TreeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    tree: TreeConfig
    tau: float                 # estimated tokens per cycle
    cycle_s: float             # estimated seconds per cycle
    speedup: float             # estimated, vs plain


def accepted_in_subtree(step: Step, total_tokens: int, depth: int) -> int:
    """Accepted drafts had the tree been cut to the best total_tokens - 1 nodes of depth <= depth."""
    t = step.tree
    order = sorted((i for i in range(1, len(t.tokens)) if t.depths[i] <= depth), key=lambda i: (-t.logp[i], i))
    keep = {0, *order[:total_tokens - 1]}
    node, accepted = 0, 0
    while True:
        nxt = [c for c in range(1, len(t.tokens)) if t.parents[c] == node and c in keep
               and t.tokens[c] == step.target_choice[node]]
        if not nxt:
            return accepted
        node, accepted = nxt[0], accepted + 1


@torch.inference_mode()
def draft_costs(target: Target, draft: DraftHead, prefix: int, depths: list[int], top_ks: list[int],
                repeats: int = 5) -> dict[tuple[int, int], float]:
    """Median seconds to grow a tree of each depth and top_k (plus one extend of 3 pairs)."""
    dev = target.device
    drafter = Drafter(draft, target.embed_tokens, target.lm_head)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, prefix, target.hidden_size, generator=g).to(dev, target.dtype)
    toks = torch.randint(0, target.vocab_size, (1, prefix), generator=g).to(dev)
    drafter.extend(feats[:, :-3], toks[:, :-3], 0)
    base_kv = drafter.kv
    out = {}
    for k in top_ks:
        for d in depths:
            tree = TreeConfig(60, d, k)

            def run():
                drafter.kv = base_kv
                drafter.extend(feats[:, -3:], toks[:, -3:], prefix - 3)
                drafter.grow(int(toks[0, -1]), prefix, tree.top_k, d)
            run()
            out[(d, k)] = median_time(run, repeats, dev)
    return out


def record(target: Target, draft: DraftHead, prompts: list[list[int]], top_k: int, max_total: int, max_depth: int,
           max_new_tokens: int) -> list[Step]:
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, tree=TreeConfig(max_total, max_depth, top_k))
    steps: list[Step] = []
    for ids in prompts:
        steps.extend(s for s in speculative_generate(target, draft, ids, cfg) if s.kind == "speculative")
    return steps


def estimate(steps_by_k: dict[int, list[Step]], verify_s: dict[int, float], draft_s: dict[tuple[int, int], float],
             plain_step_s: float, other_s: float) -> list[Candidate]:
    """Every (total_tokens, depth, top_k) the recordings can answer for, best estimated first."""
    out = []
    for k, steps in steps_by_k.items():
        if not steps:
            continue
        for depth in sorted({d for d, kk in draft_s if kk == k}):
            for n in sorted(verify_s):
                if n < 2 or n - 1 > k + (depth - 1) * k * k:          # more nodes than such a tree can have
                    continue
                tau = 1 + sum(accepted_in_subtree(s, n, depth) for s in steps) / len(steps)
                cycle = draft_s[(depth, k)] + verify_s[n] + other_s
                out.append(Candidate(TreeConfig(n, depth, k), tau, cycle, (tau / cycle) * plain_step_s))
    return sorted(out, key=lambda c: -c.speedup)


def measure(target: Target, draft: DraftHead | None, prompts: list[list[int]], tree: TreeConfig | None,
            max_new_tokens: int) -> tuple[float, int]:
    """Wall seconds and new tokens for plain (draft None) or speculative decoding of the prompts."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, tree=tree or TreeConfig())
    t0, tokens = time.perf_counter(), 0
    for ids in prompts:
        gen = plain_generate(target, ids, cfg) if draft is None else speculative_generate(target, draft, ids, cfg)
        tokens += summarize(list(gen)).new_tokens
    return time.perf_counter() - t0, tokens


def tune(target: Target, draft: DraftHead, prompts: list[list[int]], max_new_tokens: int = 64,
         top_ks: tuple[int, ...] = (2, 4, 6, 8, 10), max_total: int = 60, max_depth: int = 6,
         sizes: tuple[int, ...] = (4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 60), finalists: int = 3) -> dict:
    """Record, estimate, then measure the finalists against plain decoding side by side."""
    prefix = int(statistics.mean(len(p) for p in prompts)) + max_new_tokens // 2
    log.info("timing verify forwards and the drafter at a %d-token context", prefix)
    # one plain step is a verify forward over one token: timed the same way, in the same loop,
    # so the estimate compares like with like (a whole plain run would add prefill and load noise)
    vs = verify_costs(target, prefix, sorted({1, *sizes}))
    plain_step = vs.pop(1)
    ds = draft_costs(target, draft, prefix, list(range(1, max_depth + 1)), list(top_ks))
    steps_by_k = {}
    for k in top_ks:
        log.info("recording trees with top_k=%d", k)
        steps_by_k[k] = record(target, draft, prompts, k, max_total, max_depth, max_new_tokens)
    other = statistics.median(s.timings.get("other", 0.0) for st in steps_by_k.values() for s in st) \
        if any(steps_by_k.values()) else 0.0
    ranked = estimate(steps_by_k, vs, ds, plain_step, other)
    results = []
    for cand in ranked[:finalists]:
        p_s = p_tok = s_s = s_tok = 0
        for ids in prompts:                                    # interleaved per prompt: A B A B
            t, n = measure(target, None, [ids], None, max_new_tokens)
            p_s, p_tok = p_s + t, p_tok + n
            t, n = measure(target, draft, [ids], cand.tree, max_new_tokens)
            s_s, s_tok = s_s + t, s_tok + n
        results.append({"tree": [cand.tree.total_tokens, cand.tree.depth, cand.tree.top_k],
                        "estimated_tau": cand.tau, "estimated_speedup": cand.speedup,
                        "measured_speedup": (s_tok / s_s) / (p_tok / p_s)})
    best = max(results, key=lambda r: r["measured_speedup"])
    return {"best": best, "finalists": results, "plain_step_s": plain_step, "prefix": prefix,
            "verify_s": {str(k): v for k, v in vs.items()},
            "draft_s": {f"{d}x{k}": v for (d, k), v in ds.items()},
            "top_estimates": [{"tree": [c.tree.total_tokens, c.tree.depth, c.tree.top_k], "tau": c.tau,
                               "speedup": c.speedup} for c in ranked[:10]]}
