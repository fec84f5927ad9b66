"""Multi-sample HASS decoding (batch > 1): EMS-SD, the padded baseline, and sequential.

* `ems` (EMS-SD, method.md section 4): one draft tree per live sample per cycle, then ONE
  target forward over the packed tree tokens of all live samples (`hass.packed`): unpadded
  KV cache with per-sample lengths, unpadded inputs, per-sample SDPA. A finished sample has
  no segment and costs nothing; prompts of any lengths are packed as they are.
* `padded` (the "vanilla" baseline, for comparison only): an ordinary batch of B rows over a
  `DynamicCache`; prompts left-padded, trees right-padded to the largest, accepted tokens
  right-padded to the longest accepted path so the cache stays aligned. Padding is computed
  and padded slots are read (masked) in every later step; finished samples stay in the batch
  as all-padding rows, as in static batching.
* `sequential`: `speculative_generate` for each prompt one after another.

Every sample keeps its own stop rules (the same `Emitter` as batch 1), its own sampling
generator (seed `seeds[i]`, by default cfg.seed + i, consumed in the same order as batch 1)
and its own `Step` events, so `summarize` works per sample. Prompts are taken in groups of
`batch_size` (static batches); a group ends when all its samples have stopped.

A step's timings are the sample's share of its cycle (the cycle's time split equally among
the samples live in it), so a sample's summed seconds is its cost and the samples' sum is
the wall time. Both batched methods draft with `BatchDrafter` (one packed draft forward per
depth); only the target side differs between them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batch_draft import ExtendItem, GrowItem, make_drafter
from .decode import GenerationConfig, speculative_generate
from .drafting import TreeTensors
from .propose import Proposer
from .noise import PositionNoise
from .steps import Clock, Emitter, check_prompt, coupled_draft, event_tree, first_token, path_sources, sampling_noise
from .events import Step, summarize
from .packed import PackedCache, PackedPlan, Segment, packed_forward
from .target import LAST, Target
from .tree import ancestor_mask
from .verify import Verdict, accept

log = logging.getLogger(__name__)

METHODS = ("ems", "padded", "sequential")


@dataclass(frozen=True)
class BatchCycle:
    """One cycle of a batch: the step of every sample that was live in it."""

    method: str
    group: int                  # which group of `batch_size` prompts
    index: int                  # cycle within the group (0 = prefill)
    steps: dict[int, Step]      # prompt index -> its step this cycle
    seconds: float              # wall time of the cycle


@dataclass
class BatchResult:
    """All steps of a batched run, per prompt in input order, and its wall time."""

    method: str
    batch_size: int
    steps: list[list[Step]]
    cycles: list[BatchCycle] = field(default_factory=list)
    wall_s: float = 0.0

    def tokens(self, i: int) -> list[int]:
        return [t for st in self.steps[i] for t in st.new_tokens]

    @property
    def new_tokens(self) -> int:
        return sum(len(st.new_tokens) for steps in self.steps for st in steps)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def accepted_lengths(self) -> list[list[int]]:
        """Per sample, per speculative cycle: tokens emitted (accepted drafts + bonus), for the heatmap."""
        return [[len(st.new_tokens) for st in steps if st.kind == "speculative"] for steps in self.steps]

    def to_dict(self, decode: Callable[[list[int]], str] | None = None) -> dict:
        samples = []
        for i, steps in enumerate(self.steps):
            ids = self.tokens(i)
            s = summarize(steps)
            samples.append({"text": decode(ids) if decode else None, "token_ids": ids, "tau": s.tau,
                            "stop_reason": s.stop_reason})
        return {"samples": samples, "new_tokens": self.new_tokens, "wall_s": self.wall_s,
                "tokens_per_s": self.tokens_per_s, "method": self.method, "batch_size": self.batch_size}


# -- entry points --------------------------------------------------------------------------
def batch_generate(target: Target, draft: torch.nn.Module, prompts: Sequence[list[int]], cfg: GenerationConfig,
                   method: str = "ems", batch_size: int = 8, seeds: Sequence[int] | None = None,
                   drafting: str = "auto") -> Iterator[BatchCycle]:
    """Decode several prompts; yields one `BatchCycle` per cycle. Settings are checked here,
    at once; a running stream ends normally (stop reasons are on each sample's last step).

    drafting: 'auto' | 'batched' | 'loop' (see `hass.batch_draft.make_drafter`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown batch method {method!r}: use one of {', '.join(METHODS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    if not prompts:
        raise ValueError("no prompts to decode")
    draft_vocab = target.vocab_size if getattr(draft, "token_map", None) is None else int(draft.token_map.numel())
    cfg.validate(draft_vocab)
    if draft.config.hidden_size != target.hidden_size:
        raise ValueError(f"draft hidden size {draft.config.hidden_size} does not match the target's "
                         f"{target.hidden_size}")
    ids = [check_prompt(target, p)[0] for p in prompts]
    seeds = [cfg.seed + i for i in range(len(ids))] if seeds is None else list(seeds)
    if len(seeds) != len(ids):
        raise ValueError(f"{len(seeds)} seeds for {len(ids)} prompts")
    if method == "sequential":
        return _sequential(target, draft, [p.tolist() for p in ids], cfg, seeds)
    return _groups(target, draft, ids, cfg, method, batch_size, seeds, drafting)


def run_batch(target: Target, draft: torch.nn.Module, prompts: Sequence[list[int]], cfg: GenerationConfig,
              method: str = "ems", batch_size: int = 8, seeds: Sequence[int] | None = None, drafting: str = "auto",
              on_cycle: Callable[[BatchCycle], None] | None = None) -> BatchResult:
    """`batch_generate` run to the end, with the wall time of the whole run."""
    stream = batch_generate(target, draft, prompts, cfg, method, batch_size, seeds, drafting)
    result = BatchResult(method, 1 if method == "sequential" else batch_size, [[] for _ in prompts])
    t0 = time.perf_counter()
    consumer = 0.0
    for cyc in stream:
        c0 = time.perf_counter()
        result.cycles.append(cyc)
        for i, st in cyc.steps.items():
            result.steps[i].append(st)
        if on_cycle is not None:
            on_cycle(cyc)
        consumer += time.perf_counter() - c0
    result.wall_s = time.perf_counter() - t0 - consumer
    return result


def _sequential(target: Target, draft: torch.nn.Module, prompts: list[list[int]], cfg: GenerationConfig,
                seeds: list[int]) -> Iterator[BatchCycle]:
    for i, p in enumerate(prompts):
        t = time.perf_counter()
        for j, st in enumerate(speculative_generate(target, draft, p, dataclasses.replace(cfg, seed=seeds[i]))):
            now = time.perf_counter()
            yield BatchCycle("sequential", i, j, {i: st}, now - t)
            t = time.perf_counter()


def _groups(target: Target, draft: torch.nn.Module, ids: list[torch.Tensor], cfg: GenerationConfig, method: str,
            batch_size: int, seeds: list[int], drafting: str) -> Iterator[BatchCycle]:
    loop = _ems_group if method == "ems" else _padded_group
    for g, lo in enumerate(range(0, len(ids), batch_size)):
        idx = list(range(lo, min(lo + batch_size, len(ids))))
        yield from loop(target, draft, idx, [ids[i] for i in idx], cfg, [seeds[i] for i in idx], drafting, g)


# -- shared per-sample bookkeeping ---------------------------------------------------------
@dataclass
class _Sample:
    """One sample of a group: its stop rules, sampling randomness and decoding position."""

    index: int                  # position in the input
    prompt: torch.Tensor        # [p]
    emitter: Emitter
    gen: torch.Generator        # the rejection rule's uniforms
    noise: PositionNoise | None  # the per-position noise of sampling (None when greedy)
    n: int = 0                  # tokens in the target cache (prompt + accepted so far)
    root: int = 0               # the next token, not yet in the cache
    done: bool = False
    emitted: list[int] = field(default_factory=list)   # tokens after the prompt (the lookup source reads them)

    @property
    def history(self) -> torch.Tensor:
        """Prompt + emitted tokens (ending with the root): what the lookup source searches."""
        return torch.cat((self.prompt.cpu(), torch.tensor(self.emitted, dtype=torch.long)))

    def room(self, max_len: int) -> int:
        """Tree depth limit, exactly as batch 1: the bonus must fit the context and the budget."""
        return min(max_len - 2 - self.n, self.emitter.remaining - 1)


def _samples(target: Target, idx: list[int], ids: list[torch.Tensor], cfg: GenerationConfig,
             seeds: list[int]) -> list[_Sample]:
    return [_Sample(i, p, Emitter(target, cfg, int(p.shape[0])), torch.Generator().manual_seed(s),
                    sampling_noise(cfg.sampling, s, target.vocab_size), n=int(p.shape[0]))
            for i, p, s in zip(idx, ids, seeds)]


def _verdict(cfg: GenerationConfig, s: _Sample, tree: TreeTensors, anc: torch.Tensor, logits: torch.Tensor) -> Verdict:
    return accept(cfg.sampling, tree.tokens, tree.parents, tree.depths, anc, logits, s.n, s.noise, s.gen)


def _spec_step(s: _Sample, tree: TreeTensors, verdict: Verdict) -> Step:
    path = verdict.path
    new = tree.tokens[torch.tensor(path[1:], dtype=torch.long, device=tree.tokens.device)].tolist() + [verdict.bonus]
    return s.emitter.step("speculative", event_tree(tree), path, new, path_sources(tree, path), verdict.probs,
                          {"draft": 0.0, "verify": 0.0, "other": 0.0}, verdict.choice)


def _trees(drafter, proposer: Proposer, samples, live: list[int], cfg: GenerationConfig, max_length: int,
           clock: Clock) -> tuple[dict[int, TreeTensors], float, float]:
    """One cycle's trees for the live samples (each at its own position and depth): the
    draft pools in one batched growth, then each sample's lookup merge and cut, exactly as
    batch 1 does (`Proposer.tree`). Returns the trees, the growth and the whole draft time."""
    rooms = {r: samples[r].room(max_length) for r in live}
    grow = cfg.tree.depth if cfg.draft_source else 0
    pools = drafter.grow([GrowItem(r, samples[r].root, samples[r].n, min(grow, rooms[r]),
                                   coupled_draft(cfg.sampling, samples[r].noise, drafter.token_map)) for r in live],
                         cfg.tree.top_k, proposer.growth_limit)
    t_grow = clock.lap()
    share = t_grow / max(len(live), 1)
    trees = {r: proposer.tree(pools[r], proposer.chain(samples[r].history), share, rooms[r]) for r in live}
    return trees, t_grow, t_grow + clock.lap()


def _observe(proposer: Proposer, trees, verdicts, t_verify: float, t_grow: float) -> None:
    k = max(len(verdicts), 1)
    for r, v in verdicts.items():
        proposer.observe(trees[r], v.path, t_verify / k, t_grow / k, bonus=v.bonus)


def _share(steps: dict[int, Step], draft: float, verify: float, other: float) -> None:
    """Split a cycle's time equally among the samples live in it (see the module docstring)."""
    k = max(len(steps), 1)
    for st in steps.values():
        st.timings.update(draft=draft / k, verify=verify / k, other=other / k)


def _extend_item(row: int, s: _Sample, feats: torch.Tensor, tree: TreeTensors, verdict: Verdict) -> ExtendItem:
    dev = feats.device
    path = torch.tensor(verdict.path, dtype=torch.long, device=dev)
    nxt = torch.cat((tree.tokens[path[1:]], torch.tensor([verdict.bonus], device=dev)))
    return ExtendItem(row, feats[path], nxt, s.n)


# -- EMS-SD ----------------------------------------------------------------------------------
@torch.inference_mode()
def _ems_group(target: Target, draft: torch.nn.Module, idx: list[int], ids: list[torch.Tensor],
               cfg: GenerationConfig, seeds: list[int], drafting: str, group: int) -> Iterator[BatchCycle]:
    dev = target.device
    samples = _samples(target, idx, ids, cfg, seeds)
    rows = list(range(len(samples)))
    drafter = make_drafter(draft, target.embed_tokens, target.lm_head, len(samples), drafting)
    proposer = Proposer.for_generation(target, cfg)
    cache = PackedCache(len(samples))
    clock = Clock(dev)
    t_start = time.perf_counter()

    # prefill: all prompts packed as they are, each causal over itself
    segs, start = [], 0
    for r, s in zip(rows, samples):
        segs.append(Segment(r, start, s.n, 0, s.n))
        start += s.n
    plan = PackedPlan.build(segs, dev)
    last = torch.tensor([seg.start + seg.length - 1 for seg in segs], device=dev)
    positions = torch.cat([torch.arange(s.n, device=dev) for s in samples])
    logits, feats = packed_forward(target, cache, torch.cat(ids).to(dev), positions, plan, logits_rows=last)
    cache.commit(rows, [s.n for s in samples])
    t_verify = clock.lap()
    steps: dict[int, Step] = {}
    for r, s in zip(rows, samples):
        s.root, p = first_token(logits[r], cfg.sampling, s.noise, s.n)
        s.emitted.append(s.root)
        st = s.emitter.step("prefill", None, [], [s.root], ["target"], [p], {"draft": 0.0, "verify": 0.0, "other": 0.0})
        steps[s.index] = st
        s.done = st.stop_reason is not None
    t_other = clock.lap()
    drafter.extend([ExtendItem(r, feats[seg.start:seg.start + seg.length],
                               torch.cat((s.prompt[1:].to(dev), torch.tensor([s.root], device=dev))), 0)
                    for r, s, seg in zip(rows, samples, segs) if not s.done])
    _share(steps, clock.lap(), t_verify, t_other)
    yield BatchCycle("ems", group, 0, steps, time.perf_counter() - t_start)
    clock.lap()

    cycle = 0
    while True:
        live = [r for r in rows if not samples[r].done]
        if not live:
            return
        cycle += 1
        t_start = time.perf_counter()
        trees, t_grow, t_draft = _trees(drafter, proposer, samples, live, cfg, target.max_length, clock)
        segs, start, ancs = [], 0, {}
        for r in live:
            tree, n = trees[r], samples[r].n
            ancs[r] = ancestor_mask(tree.parents)
            size = int(tree.tokens.shape[0])
            segs.append(Segment(r, start, size, n, n + size, ancs[r]))
            start += size
        plan = PackedPlan.build(segs, dev)
        tokens = torch.cat([trees[r].tokens for r in live])
        positions = torch.cat([samples[r].n + trees[r].depths for r in live])
        logits, feats = packed_forward(target, cache, tokens, positions, plan)
        t_verify = clock.lap()
        steps, verdicts, extend = _judge(cfg, samples, trees, ancs, {
            r: (logits[seg.start:seg.start + seg.length], feats[seg.start:seg.start + seg.length])
            for r, seg in zip(live, segs)})
        cache.keep(live, [torch.tensor(verdicts[r].path) for r in live])
        _observe(proposer, trees, verdicts, t_verify, t_grow)
        t_other = clock.lap()
        drafter.extend(extend)
        t_draft += clock.lap()
        _advance(samples, verdicts, steps)
        _share(steps, t_draft, t_verify, t_other)
        yield BatchCycle("ems", group, cycle, steps, time.perf_counter() - t_start)
        clock.lap()          # the consumer's time between cycles is not decoding time


def _judge(cfg, samples, trees, ancs, outputs):
    """Verdict, step event and draft-extend item of every live sample, from its own rows of
    the verify forward (`outputs`: row -> (logits, features), whatever the batch layout)."""
    steps, verdicts, extend = {}, {}, []
    for r, (lg, ft) in outputs.items():
        s, tree = samples[r], trees[r]
        verdicts[r] = _verdict(cfg, s, tree, ancs[r], lg)
        st = _spec_step(s, tree, verdicts[r])
        steps[s.index] = st
        if st.stop_reason is None:
            extend.append(_extend_item(r, s, ft, tree, verdicts[r]))
    return steps, verdicts, extend


def _advance(samples, verdicts, steps) -> None:
    """Move every judged sample past its accepted path and bonus token."""
    for r, verdict in verdicts.items():
        s = samples[r]
        s.n += len(verdict.path)
        s.root = verdict.bonus
        s.emitted += steps[s.index].new_tokens
        s.done = steps[s.index].stop_reason is not None


# -- the padded ("vanilla") baseline -----------------------------------------------------------
PAD_ID = 0


@torch.inference_mode()
def _padded_group(target: Target, draft: torch.nn.Module, idx: list[int], ids: list[torch.Tensor],
                  cfg: GenerationConfig, seeds: list[int], drafting: str, group: int) -> Iterator[BatchCycle]:
    dev, dtype = target.device, target.dtype
    neg = torch.finfo(dtype).min
    samples = _samples(target, idx, ids, cfg, seeds)
    B = len(samples)
    rows = list(range(B))
    drafter = make_drafter(draft, target.embed_tokens, target.lm_head, B, drafting)
    proposer = Proposer.for_generation(target, cfg)
    cache = target.new_cache()
    clock = Clock(dev)
    t_start = time.perf_counter()

    # prefill: prompts left-padded to the longest; pad slots stay in the cache, masked forever
    P = max(s.n for s in samples)
    inp = torch.full((B, P), PAD_ID, dtype=torch.long, device=dev)
    pos = torch.zeros((B, P), dtype=torch.long, device=dev)
    valid = torch.zeros((B, P), dtype=torch.bool, device=dev)
    for r, s in zip(rows, samples):
        inp[r, P - s.n:] = s.prompt.to(dev)
        pos[r, P - s.n:] = torch.arange(s.n, device=dev)
        valid[r, P - s.n:] = True
    allowed = torch.ones(P, P, dtype=torch.bool, device=dev).tril()[None] & valid[:, None, :]
    allowed |= torch.eye(P, dtype=torch.bool, device=dev)[None]       # pad rows see themselves: no empty row
    logits, feats = target.forward(inp, cache, position_ids=pos, attention_mask=_additive(allowed, dtype, neg),
                                   logits_rows=LAST)
    t_verify = clock.lap()
    steps: dict[int, Step] = {}
    for r, s in zip(rows, samples):
        s.root, p = first_token(logits[r, -1], cfg.sampling, s.noise, s.n)
        s.emitted.append(s.root)
        st = s.emitter.step("prefill", None, [], [s.root], ["target"], [p], {"draft": 0.0, "verify": 0.0, "other": 0.0})
        steps[s.index] = st
        s.done = st.stop_reason is not None
    t_other = clock.lap()
    drafter.extend([ExtendItem(r, feats[r, P - s.n:], torch.cat((s.prompt[1:].to(dev),
                                                                 torch.tensor([s.root], device=dev))), 0)
                    for r, s in zip(rows, samples) if not s.done])
    _share(steps, clock.lap(), t_verify, t_other)
    yield BatchCycle("padded", group, 0, steps, time.perf_counter() - t_start)
    clock.lap()

    L = P                      # aligned cache length (valid and padded slots)
    cycle = 0
    while True:
        live = [r for r in rows if not samples[r].done]
        if not live:
            return
        cycle += 1
        t_start = time.perf_counter()
        trees, t_grow, t_draft = _trees(drafter, proposer, samples, live, cfg, target.max_length, clock)
        N = max(int(trees[r].tokens.shape[0]) for r in live)
        inp = torch.full((B, N), PAD_ID, dtype=torch.long, device=dev)
        pos = torch.zeros((B, N), dtype=torch.long, device=dev)
        allowed = torch.zeros((B, N, L + N), dtype=torch.bool, device=dev)
        allowed[:, :, L:] = torch.eye(N, dtype=torch.bool, device=dev)        # padding rows: themselves only
        ancs = {}
        for r in live:
            tree, n = trees[r], samples[r].n
            size = int(tree.tokens.shape[0])
            ancs[r] = ancestor_mask(tree.parents)
            inp[r, :size] = tree.tokens
            pos[r, :size] = n + tree.depths
            pos[r, size:] = n
            allowed[r, :size, :L] = valid[r]
            allowed[r, :size, L:L + size] = ancs[r]
        logits, feats = target.forward(inp, cache, position_ids=pos, attention_mask=_additive(allowed, dtype, neg))
        t_verify = clock.lap()
        sizes = {r: int(trees[r].tokens.shape[0]) for r in live}
        steps, verdicts, extend = _judge(cfg, samples, trees, ancs,
                                         {r: (logits[r, :sizes[r]], feats[r, :sizes[r]]) for r in live})
        # keep the cache aligned: every row gets K slots, the accepted path then padding
        K = max(len(verdicts[r].path) for r in live)
        src = torch.full((B, K), L, dtype=torch.long, device=dev)
        new_valid = torch.zeros((B, K), dtype=torch.bool, device=dev)
        for r in live:
            path = verdicts[r].path
            src[r, :len(path)] = L + torch.tensor(path, device=dev)
            new_valid[r, :len(path)] = True
        _align(cache, L, src)
        valid = torch.cat((valid, new_valid), 1)
        L += K
        _observe(proposer, trees, verdicts, t_verify, t_grow)
        t_other = clock.lap()
        drafter.extend(extend)
        t_draft += clock.lap()
        _advance(samples, verdicts, steps)
        _share(steps, t_draft, t_verify, t_other)
        yield BatchCycle("padded", group, cycle, steps, time.perf_counter() - t_start)
        clock.lap()


def _additive(allowed: torch.Tensor, dtype: torch.dtype, neg: float) -> torch.Tensor:
    """[B, n, L] bool -> [B, 1, n, L] additive mask."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, neg)[:, None]


def _align(cache, prefix: int, src: torch.Tensor) -> None:
    """Padded compaction of a DynamicCache: slots src[b] (absolute) move to prefix.., per row."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            b, h, _, d = t.shape
            kept = t.gather(2, src[:, None, :, None].expand(b, h, src.shape[1], d))
            setattr(layer, name, torch.cat((t[:, :, :prefix], kept), 2))


# -- the batch page ----------------------------------------------------------------------------
def batch_markdown(doc: dict) -> str:
    """docs/BATCH.md from the JSON `python -m hass batch --out` keeps (every figure from it)."""
    t = doc["tree"]
    tree = ("size fitted per step (limits %d/%d/%d)" % tuple(t["limits"]) if t["rule"] == "fitted"
            else "fixed %d/%d/%d" % tuple(t["limits"])) + (", lookup candidates on" if t["lookup"] else "")
    seq = next((r for r in doc["runs"] if r["method"] == "sequential"), None)
    lines = [
        "# Batch > 1: EMS-SD against padded batching and sequential decoding", "",
        "Written by the command below from the JSON it keeps (`--out DIR` writes `DIR/batch.json`; "
        "`--markdown` this page). Every speed figure is a ratio within this one run.", "",
        f"Machine: {doc['cpu']}, {doc['threads']} torch threads, {doc['device']}, {doc['dtype']}, "
        f"{doc['kernels']} kernels" + (f", {doc['attention']} attention" if doc.get("attention") else "")
        + f". Measured {doc['when']}; 1-minute load average {doc['load_avg_before']} before "
        f"the runs and {doc['load_avg_after']} after. Draft {doc['draft']}, tree {tree}, T = {doc['temperature']}, "
        f"{doc['prompts']} prompts, {doc['max_new_tokens']} new tokens each.", "",
        "```bash", doc["command"], "```", "",
        "| method | batch size | new tokens | wall s | tokens/s | mean tau | vs sequential |",
        "|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        rel = f"{r['tokens_per_s'] / seq['tokens_per_s']:.2f}x" if seq and seq["tokens_per_s"] else "-"
        lines.append(f"| {r['method']} | {r['batch_size']} | {r['new_tokens']} | {r['wall_s']:.1f} | "
                     f"{r['tokens_per_s']:.1f} | {r['tau_mean']:.2f} | {rel} |")
    if doc.get("greedy_identical") is not None:
        lines += ["", "Greedy outputs identical across all runs: " + ("yes." if doc["greedy_identical"] else "**no**.")]
    return "\n".join(lines) + "\n"


# -- prompt files ------------------------------------------------------------------------------
def load_prompt_file(path: str | Path) -> list[list[dict]]:
    """A JSONL file of prompts -> one chat (list of {role, content}) per line, in file order.

    Each line has `turns` (the first turn becomes a user message), `prompt` (a user message)
    or `messages` (a chat as is).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    chats = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: each line must be a JSON object")
        if "turns" in rec:
            turns = rec["turns"]
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                raise ValueError(f"{where}: 'turns' must be a non-empty list of strings")
            chats.append([{"role": "user", "content": turns[0]}])
        elif "prompt" in rec:
            if not isinstance(rec["prompt"], str):
                raise ValueError(f"{where}: 'prompt' must be a string")
            chats.append([{"role": "user", "content": rec["prompt"]}])
        elif "messages" in rec:
            msgs = rec["messages"]
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
            chats.append(msgs)
        else:
            raise ValueError(f"{where}: needs 'turns', 'prompt' or 'messages'")
    if not chats:
        raise ValueError(f"{path} holds no prompts")
    return chats


__all__ = ["METHODS", "BatchCycle", "BatchResult", "batch_generate", "batch_markdown", "load_prompt_file", "run_batch"]
