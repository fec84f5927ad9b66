"""The benchmark: every method on the same prompts, in one process, interleaved per prompt.

Speed is only ever reported as a ratio measured side by side: for each prompt the methods
run one after another (A B C A B C ...), after a warm-up, with the same token budget.
"""
from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from .decode import GenerationConfig, plain_generate, speculative_generate
from .draft import DraftHead
from .evalsets import Question, load_set
from .events import Step, speedup, summarize
from .target import Target
from .tree import TreeConfig
from .verify import SamplingConfig

log = logging.getLogger(__name__)

BUILTIN_METHODS = ("plain", "hass", "hass-draft", "lookup", "eagle2", "hass-rejection", "hf-generate",
                   "hf-prompt-lookup")
# opt-in: plain decoding on a second copy of the target with torch's stock matmul kernels,
# so the gain of the packed oneDNN kernels is measured side by side, like everything else
OPTIONAL_METHODS = ("plain-stock", "plain-onednn", "plain-rows")


@dataclass
class Record:
    set: str
    question: str
    turn: int
    method: str
    temperature: float
    new_tokens: int
    wall_s: float
    target_forwards: int
    tau: float
    token_ids: list[int]
    accepted_per_depth: list[int] = field(default_factory=list)
    reached_per_depth: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    greedy_equal: bool | None = None
    offered_by_origin: dict[str, int] = field(default_factory=dict)
    accepted_by_origin: dict[str, int] = field(default_factory=dict)
    tree_sizes: list[int] = field(default_factory=list)
    order: int = 0                      # the method's place in this prompt's rotated order


# -- one method = a function (target, prompt ids, budget, temperature, seed) -> Record fields ---------
Runner = Callable[[list[int], int, float, int], dict]


def _from_steps(steps: Iterator[Step]) -> dict:
    t0 = time.perf_counter()
    collected = list(steps)
    wall = time.perf_counter() - t0
    s = summarize(collected)
    return dict(new_tokens=s.new_tokens, wall_s=wall, target_forwards=s.target_forwards, tau=s.tau,
                token_ids=[t for st in collected for t in st.new_tokens], accepted_per_depth=s.accepted_per_depth,
                reached_per_depth=s.reached_per_depth, draft_s=s.draft_s, verify_s=s.verify_s, other_s=s.other_s,
                offered_by_origin=s.offered_by_origin, accepted_by_origin=s.accepted_by_origin,
                tree_sizes=s.tree_sizes)


def _coupled(run: Runner) -> bool:
    return bool(getattr(run, "coupled", False))


def plain_runner(target: Target) -> Runner:
    def run(ids, budget, temperature, seed):
        cfg = GenerationConfig(max_new_tokens=budget, sampling=SamplingConfig(temperature), seed=seed)
        return _from_steps(plain_generate(target, ids, cfg))
    run.coupled = True              # samples with the position-keyed noise (`hass.noise`)
    return run


def draft_runner(target: Target, draft: DraftHead | None, tree: TreeConfig | dict, rule: str = "coupled") -> Runner:
    """Speculative decoding; `tree` is a fixed TreeConfig or GenerationConfig fields (tree,
    fitted, lookup, draft_source); `rule`: the sampling rule at T > 0. Without a draft (lookup
    only) a random one stands in, unused."""
    fields = tree if isinstance(tree, dict) else {"tree": tree}
    if draft is None:
        from .draft import new_draft
        draft = new_draft(target.config).to(target.device, target.dtype)

    def run(ids, budget, temperature, seed):
        cfg = GenerationConfig(max_new_tokens=budget, sampling=SamplingConfig(temperature, rule=rule), seed=seed,
                               **fields)
        return _from_steps(speculative_generate(target, draft, ids, cfg))
    run.coupled = rule == "coupled"
    return run


def hf_runner(target: Target, prompt_lookup: bool) -> Runner:
    """transformers' own `generate` (greedy or sampling), optionally with prompt lookup decoding."""
    def run(ids, budget, temperature, seed):
        torch.manual_seed(seed)
        inp = torch.tensor([ids], device=target.device)
        kw = dict(max_new_tokens=budget, do_sample=temperature > 0, eos_token_id=sorted(target.eos_ids) or None,
                  pad_token_id=next(iter(target.eos_ids), 0), attention_mask=torch.ones_like(inp))
        if temperature > 0:
            kw.update(temperature=temperature, top_p=1.0, top_k=0)
        if prompt_lookup:
            kw["prompt_lookup_num_tokens"] = 10
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = target.model.generate(inp, **kw)
        if target.device.type == "cuda":
            torch.cuda.synchronize(target.device)
        wall = time.perf_counter() - t0
        new = out[0, inp.shape[1]:].tolist()
        return dict(new_tokens=len(new), wall_s=wall, target_forwards=0, tau=float("nan"), token_ids=new)
    return run


def rotation(names: list[str], k: int) -> list[str]:
    """The k-th prompt's method order: A B C, then B C A, then C A B, ..."""
    k %= max(len(names), 1)
    return names[k:] + names[:k]


def interleave(questions: list[Question], methods: dict[str, Runner], budget: int, temperature: float,
               render: Callable[[list[dict]], list[int]], decode: Callable[[list[int]], str],
               on_record: Callable[[Record], None] | None = None) -> list[Record]:
    """For each question and turn, run every method back to back, in an order rotated from
    prompt to prompt (no method always runs first or right after another). The reference for
    equality and for multi-turn histories is the first method given (`plain` when present).
    Equality is checked at T = 0 for every method, and at T > 0 between methods that sample
    with position-keyed noise (`coupled`: plain and coupled speculative decoding), whose
    tokens for one seed must be the same too."""
    records: list[Record] = []
    names = list(methods)
    k = 0
    for q in questions:
        history: list[dict] = []
        for turn, text in enumerate(q.turns):
            history.append({"role": "user", "content": text})
            ids = render(history)
            done: dict[str, Record] = {}
            for place, name in enumerate(rotation(names, k)):
                done[name] = Record(set=q.set, question=q.id, turn=turn, method=name, temperature=temperature,
                                    order=place, **methods[name](ids, budget, temperature,
                                                                 seed=zlib.crc32(f"{q.set}/{q.id}/{turn}".encode())))
            k += 1
            reference = done[names[0]]
            for name in names:
                r = done[name]
                if name != names[0] and (temperature == 0 or (_coupled(methods[name]) and _coupled(methods[names[0]]))):
                    r.greedy_equal = r.token_ids == reference.token_ids
                records.append(r)
                if on_record:
                    on_record(r)
            history.append({"role": "assistant", "content": decode(reference.token_ids)})
    return records


def memory_bandwidth(device: torch.device, mb: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write), this device's practical limit."""
    n = mb * (1 << 20) // 4
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best


def summarize_records(records: list[Record], weight_bytes: int, bandwidth: float) -> dict:
    """Per set and method, and the mean over sets: tokens/s, speedup vs plain, tau, ..."""
    out: dict = {"sets": {}, "mean": {}}
    sets = sorted({r.set for r in records})
    methods = list(dict.fromkeys(r.method for r in records))
    for s in sets:
        out["sets"][s] = {}
        for m in methods:
            rs = [r for r in records if r.set == s and r.method == m]
            if rs:
                out["sets"][s][m] = _stats(rs, weight_bytes, bandwidth)
        plain = out["sets"][s].get("plain")
        for m, v in out["sets"][s].items():
            v["speedup"] = speedup(plain["new_tokens"], plain["wall_s"], v["new_tokens"], v["wall_s"]) if plain else None
    for m in methods:
        per_set = [out["sets"][s][m] for s in sets if m in out["sets"][s]]
        mean = {}
        for key in ("tokens_per_s", "speedup", "tau", "tau_macro", "greedy_equal", "bandwidth_fraction",
                    "weights_gb_per_s"):
            vals = [v[key] for v in per_set if v.get(key) is not None]
            mean[key] = sum(vals) / len(vals) if vals else None
        depth = max((len(v["per_depth_acceptance"]) for v in per_set), default=0)
        mean["per_depth_acceptance"] = [
            sum(v["per_depth_acceptance"][d] for v in per_set if d < len(v["per_depth_acceptance"]))
            / max(1, sum(d < len(v["per_depth_acceptance"]) for v in per_set)) for d in range(depth)]
        out["mean"][m] = mean
    return out


def _stats(rs: list[Record], weight_bytes: int, bandwidth: float) -> dict:
    tokens = sum(r.new_tokens for r in rs)
    wall = sum(r.wall_s for r in rs)
    fwd = sum(r.target_forwards for r in rs)
    spec = [r for r in rs if r.target_forwards and r.tau == r.tau]
    depth = max((len(r.accepted_per_depth) for r in rs), default=0)
    acc = [sum(r.accepted_per_depth[d] for r in rs if d < len(r.accepted_per_depth)) for d in range(depth)]
    reach = [sum(r.reached_per_depth[d] for r in rs if d < len(r.reached_per_depth)) for d in range(depth)]
    cycles = sum(r.target_forwards - 1 for r in spec)           # the prefill is not a cycle
    spec_tokens = sum(r.new_tokens - 1 for r in spec)
    eq = [r.greedy_equal for r in rs if r.greedy_equal is not None]
    offered: dict[str, int] = {}
    accepted: dict[str, int] = {}
    for r in rs:
        for o, c in r.offered_by_origin.items():
            offered[o] = offered.get(o, 0) + c
        for o, c in r.accepted_by_origin.items():
            accepted[o] = accepted.get(o, 0) + c
    sizes = [n for r in rs for n in r.tree_sizes]
    gbps = weight_bytes * fwd / wall / 1e9 if fwd and wall else None
    return {
        "prompts": len(rs), "new_tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "target_forwards": fwd,
        "tau": spec_tokens / cycles if cycles else (1.0 if fwd else None),
        "tau_macro": sum(r.tau for r in spec) / len(spec) if spec else (1.0 if fwd else None),
        "per_depth_acceptance": [a / b if b else 0.0 for a, b in zip(acc, reach)],
        "greedy_equal": sum(eq) / len(eq) if eq else None,
        "draft_s": sum(r.draft_s for r in rs), "verify_s": sum(r.verify_s for r in rs),
        "other_s": sum(r.other_s for r in rs),
        "weights_gb_per_s": gbps,
        "bandwidth_fraction": gbps * 1e9 / bandwidth if gbps else None,
        # per origin: nodes verified, nodes accepted, and the acceptance rate of a verified node
        "by_origin": {o: {"offered": offered[o], "accepted": accepted.get(o, 0),
                          "rate": accepted.get(o, 0) / offered[o] if offered[o] else 0.0} for o in sorted(offered)},
        "tree_size_mean": sum(sizes) / len(sizes) if sizes else None,
        "tree_size_quartiles": _quartiles(sizes),
    }


def _quartiles(xs: list[int]) -> list[float] | None:
    if not xs:
        return None
    s = sorted(xs)
    return [float(s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]) for q in (0.0, 0.25, 0.5, 0.75, 1.0)]


def markdown_table(summary: dict, bandwidth: float) -> str:
    lines = [f"Machine memory bandwidth (tensor copy): {bandwidth / 1e9:.1f} GB/s", "",
             "| set | method | tokens/s | speedup | tau | tau (macro) | equal to plain | weights GB/s (fraction) |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [(s, m, v) for s, ms in summary["sets"].items() for m, v in ms.items()]
    rows += [("mean", m, v) for m, v in summary["mean"].items()]
    for s, m, v in rows:
        def f(x, fmt):
            return "-" if x is None else format(x, fmt)
        bw = "-" if v.get("weights_gb_per_s") is None else \
            f"{v['weights_gb_per_s']:.1f} ({v['bandwidth_fraction']:.0%})"
        lines.append(f"| {s} | {m} | {f(v['tokens_per_s'], '.1f')} | {f(v['speedup'], '.2f')}x | "
                     f"{f(v['tau'], '.2f')} | {f(v['tau_macro'], '.2f')} | "
                     f"{'-' if v['greedy_equal'] is None else format(v['greedy_equal'], '.0%')} | {bw} |")
    return "\n".join(lines)


def as_dicts(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records]


__all__ = ["BUILTIN_METHODS", "Record", "interleave", "rotation", "summarize_records", "memory_bandwidth", "markdown_table",
           "plain_runner", "draft_runner", "hf_runner", "load_set"]
