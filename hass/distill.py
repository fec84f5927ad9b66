"""Self-distilled training dialogues: the target answers the user turns itself.

Why: a draft has to predict the target's own text at decoding time, but ShareGPT answers
were written by far larger models. Here the target writes every assistant turn of a
dialogue (multi-turn dialogues continue with its own earlier answers), rendered with its
own chat template, so `prepare` can then compute features over text the target really
produces (EAGLE's paper, Table 6; SpecForge regenerates responses the same way).

Generation is plain batched decoding through `transformers`' `generate` on the target's
model as it is (left-padded prompts): on a CPU one forward over B rows reads the weights
once, so tokens/s grow with B until the matrix products turn compute-bound
(`measure_generation` finds the knee on the machine at hand). Speculative decoding would
not help here: it trades extra compute per forward for fewer forwards, and batching has
already spent the compute.

Each dialogue is answered greedily or sampled (temperature `temperature`), chosen by a
hash of its id so the choice is stable across restarts and growth; see `DistillConfig`.
Output: a JSONL of `{"id", "messages", "mode", "stops", ...}` records that
`hass.data.load_dialogues` (and so `python -m hass prepare --data`) reads unchanged. A
record is appended (and flushed) when all its turns are answered; on an interrupt (Ctrl-C,
SIGINT, SIGTERM from the CLI) dialogues in progress are written up to their last answered
turn, so a stopped run loses only the generate call in flight, and a restart skips every
id already written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from .attention import stock_attention
from .data import Dialogue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """How the target answers.

    max_new_tokens: cap per answer. 384 tokens hold nearly every complete answer of a 135M
      chat model while a greedy repetition loop costs at most 384 tokens; answers cut by the
      cap are kept (marked "length" in `stops`) and end their dialogue, and one that ends
      in a repetition loop is cut after the loop's first two periods ("loop", `loop_cut`).
    max_len: a dialogue ends when its rendered prompt leaves no room for an answer under
      this length (the length `prepare` truncates to).
    sampled_fraction / temperature: the studio decodes at T = 0 by default and at T > 0 on
      request; a quarter of the dialogues sampled at T = 1 shows the draft the contexts
      that sampling reaches, while greedy text (the default decoding) keeps the majority.
    """

    max_new_tokens: int = 384
    max_len: int = 1024
    batch_size: int = 64
    engine: str = "static"
    sampled_fraction: float = 0.25
    temperature: float = 1.0
    max_turns: int = 8
    seed: int = 0

    def validate(self) -> "DistillConfig":
        if not 1 <= self.max_new_tokens <= 8192:
            raise ValueError(f"max_new_tokens must be in [1, 8192], got {self.max_new_tokens}")
        if self.max_len < 16:
            raise ValueError(f"max_len must be >= 16, got {self.max_len}")
        if not 1 <= self.batch_size <= 512:
            raise ValueError(f"batch size must be in [1, 512], got {self.batch_size}")
        if self.engine not in ("continuous", "static"):
            raise ValueError(f"engine must be 'static' or 'continuous', got {self.engine!r}")
        if not 0.0 <= self.sampled_fraction <= 1.0:
            raise ValueError(f"sampled_fraction must be in [0, 1], got {self.sampled_fraction}")
        if not 0.0 < self.temperature <= 10.0:
            raise ValueError(f"temperature must be in (0, 10], got {self.temperature}")
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        return self

    def mode_of(self, dialogue_id: str) -> str:
        """'greedy' or 'sampled', from a hash of the id (stable under restarts and growth)."""
        digest = hashlib.blake2b(f"distill:{self.seed}:{dialogue_id}".encode(), digest_size=8).digest()
        return "sampled" if int.from_bytes(digest, "big") / 2.0 ** 64 < self.sampled_fraction else "greedy"


@dataclass
class _Conversation:
    """One dialogue being answered: the user turns to answer and what has been said so far."""

    source: Dialogue
    mode: str
    users: list[str]
    system: list[dict]
    said: list[dict] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    answer_tokens: list[int] = field(default_factory=list)
    done: bool = False

    def next_messages(self) -> list[dict]:
        return self.system + self.said + [{"role": "user", "content": self.users[len(self.stops)]}]

    def record(self) -> dict:
        return {"id": self.source.id, "messages": self.system + self.said, "mode": self.mode,
                "stops": self.stops, "answer_tokens": self.answer_tokens}


@dataclass
class DistillSummary:
    dialogues: int = 0
    answers: int = 0
    new_tokens: int = 0
    skipped: int = 0
    seconds: float = 0.0
    total_dialogues: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def generate_batch(target, prompts: Sequence[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   seed: int = 0) -> list[tuple[list[int], str]]:
    """Plain decoding of several prompts at once (left-padded, one forward per token for the
    whole batch). Returns per prompt (new token ids, "eos" | "length"); the EOS is kept."""
    dev = target.device
    pad = _pad_id(target)
    ids, mask = _left_pad(prompts, pad)
    width = ids.shape[1]
    eos = sorted(target.eos_ids)
    kwargs = dict(do_sample=False) if temperature == 0 else \
        dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
    if temperature:
        torch.manual_seed(seed)               # generate samples from torch's global generator
    with torch.inference_mode():
        out = target.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                    eos_token_id=eos, pad_token_id=pad,
                                    stopping_criteria=StoppingCriteriaList([_LoopStop(width)]), **kwargs)
    results = []
    eos_set = set(eos)
    for row in out[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in eos_set), None)
        results.append((row[:cut + 1], "eos") if cut is not None else (row, "length"))
    return results


def generate_continuous(target, prompts: Sequence[list[int]], max_new_tokens: int, temperature: float = 0.0,
                        seed: int = 0) -> list[tuple[list[int], str]]:
    """`generate_batch` by continuous batching (`transformers`' paged-KV `generate_batch`): a row
    that finishes leaves the batch at once and a waiting prompt takes its place, so no forward
    is spent on padding or on rows that already ended. On a CPU its attention over all rows'
    keys at once costs more than that saves here (`distill --measure-engines`), so `distill`
    uses it only when asked. Same result format as `generate_batch`; greedy rows give the
    same tokens up to float rounding."""
    eos = sorted(target.eos_ids)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=_pad_id(target),
                           **(dict(do_sample=False) if temperature == 0 else
                              dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)))
    if temperature:
        torch.manual_seed(seed)
    # not inference_mode: the engine resets its static tensors in place; and stock sdpa: the
    # engine accepts only transformers' own attention names
    with torch.no_grad(), stock_attention(target.model):
        res = target.model.generate_batch(inputs=[list(p) for p in prompts], generation_config=gen,
                                          continuous_batching_config=_cb_config(len(prompts), max_new_tokens),
                                          progress_bar=False, warmup=False)   # warm-up: ~24 s/call, no gain on CPU
    outs = list(res.values())
    if len(outs) != len(prompts) or any(o.error for o in outs) or \
            any(list(o.prompt_ids) != list(p) for o, p in zip(outs, prompts)):
        bad = next((o.error for o in outs if o.error), "missing or reordered results")
        raise RuntimeError(f"continuous batching failed: {bad}")
    eos_set = set(eos)
    results = []
    for o in outs:
        ids = list(o.generated_tokens)
        cut = next((j for j, t in enumerate(ids) if t in eos_set), None)
        results.append((ids[:cut + 1], "eos") if cut is not None else (ids, "length"))
    return results


STATIC_BATCH = 16       # rows per static batch (the knee of `--measure` here)


def _generate(cfg: DistillConfig, target, prompts: list[list[int]], room: int, temperature: float,
              seed: int) -> list[tuple[list[int], str]]:
    """One call's answers by the engine `cfg` asks for: static batches of STATIC_BATCH rows,
    sorted by prompt length (little padding), or continuous batching. On this project's 2-core
    CPU static batching kept more tokens/s for short and for long prompts alike
    (`distill --measure-engines`, docs/TRAINING.md): `transformers`' CPU path for continuous
    batching attends over all rows' keys in one masked product."""
    if cfg.engine == "continuous":
        return generate_continuous(target, prompts, room, temperature, seed=seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))      # similar lengths: little padding
    out: list = [None] * len(prompts)
    for k in range(0, len(order), STATIC_BATCH):
        chunk = order[k:k + STATIC_BATCH]
        for i, ans in zip(chunk, generate_batch(target, [prompts[i] for i in chunk], room, temperature,
                                                seed=seed * 131 + k)):
            out[i] = ans
    return out


def _cb_config(rows: int, max_new_tokens: int, max_len: int = 1024) -> ContinuousBatchingConfig:
    """Size the paged KV cache for these rows instead of most of the free memory (the engine's
    default took 12 GB here), and keep each forward to 512 tokens: prefill chunks stay cheap
    and the logits of one forward stay ~100 MB instead of 8192 rows x 49k vocabulary."""
    page = 256
    return ContinuousBatchingConfig(page_size=page, num_blocks=rows * -(-max_len // page) + 8, max_batch_tokens=512)


def loop_cut(ids: list[int], max_period: int = 64, repeats: int = 3) -> int | None:
    """Where to cut an answer that ends in a repetition loop (a period of at most
    `max_period` tokens repeated at least `repeats` times at its end): after the loop's
    first two periods. None when the answer does not end in a loop."""
    n = len(ids)
    for p in range(1, max_period + 1):
        if n < p * repeats:
            break
        if all(ids[i] == ids[i + p] for i in range(n - p * repeats, n - p)):
            start = n - p * repeats
            while start > 0 and ids[start - 1] == ids[start - 1 + p]:
                start -= 1
            return start + 2 * p
    return None


class _LoopStop(StoppingCriteria):
    """Ends a row of a batched `generate` once its answer is caught in a repetition loop
    (checked every `every` tokens), so a looping row stops costing compute; the answer is
    then cut by `loop_cut`."""

    def __init__(self, prompt_width: int, every: int = 16):
        self.width, self.every = prompt_width, every

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids.shape[1] - self.width
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if new < 3 or new % self.every:
            return done
        for i, row in enumerate(input_ids[:, self.width:].tolist()):
            done[i] = loop_cut(row) is not None
        return done


def _left_pad(prompts: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, W] ids left-padded with `pad` and the matching 0/1 attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def _pad_id(target) -> int:
    tok = target.tokenizer
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    return int(pad) if pad is not None else min(target.eos_ids)


def _split_turns(d: Dialogue, max_turns: int) -> tuple[list[dict], list[str]]:
    system = [m for m in d.messages[:1] if m["role"] == "system"]
    users = [m["content"] for m in d.messages if m["role"] == "user"][:max_turns]
    return system, users


def done_ids(path: Path) -> set[str]:
    """Ids already written to a distill JSONL; a torn last line (a kill mid-write) is cut off."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        log.warning("%s ended in a partial record (a killed run); cut it off", path)
        data = data[:keep]
    ids = set()
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            ids.add(json.loads(line)["id"])
    return ids


def distill(target, dialogues: Sequence[Dialogue], out_path: str | Path, cfg: DistillConfig = DistillConfig(),
            limit: int | None = None, progress: bool = True) -> DistillSummary:
    """Let the target answer the user turns of `dialogues[:limit]`; append records to `out_path`.

    Rows of one `generate` call share a mode (greedy or sampled); conversations already in
    progress go first so they finish and are written early.
    """
    cfg.validate()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out)
    todo = [d for d in (dialogues[:limit] if limit is not None else dialogues) if d.id not in done]
    summary = DistillSummary(total_dialogues=len(done))
    queues: dict[str, deque[_Conversation]] = {"greedy": deque(), "sampled": deque()}
    for d in todo:
        system, users = _split_turns(d, cfg.max_turns)
        if users:
            mode = cfg.mode_of(d.id)
            queues[mode].append(_Conversation(d, mode, users, system))
    log.info("distilling %d dialogues into %s (%d already there; batch %d, cap %d tokens, %.0f%% sampled at T=%g)",
             len(todo), out, len(done), cfg.batch_size, cfg.max_new_tokens, 100 * cfg.sampled_fraction,
             cfg.temperature)
    bar = tqdm(total=len(todo), desc="distill", unit="dlg", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    batch_index = 0
    rows: list[tuple[_Conversation, list[int]]] = []
    with open(out, "a", encoding="utf-8") as sink:
        try:
            while queues["greedy"] or queues["sampled"]:
                mode = max(queues, key=lambda m: len(queues[m]))
                q = queues[mode]
                rows = []
                while q and len(rows) < cfg.batch_size:
                    conv = q.popleft()
                    prompt = target.render(conv.next_messages())
                    if len(prompt) + 1 >= cfg.max_len:          # no room left for an answer
                        conv.done = True
                        _finish(conv, sink, summary, bar)
                        continue
                    rows.append((conv, prompt))
                if not rows:
                    continue
                room = min(cfg.max_new_tokens, cfg.max_len - min(len(p) for _, p in rows))
                temp = cfg.temperature if mode == "sampled" else 0.0
                answers = _generate(cfg, target, [p for _, p in rows], room, temp, seed=cfg.seed * 1_000_003 + batch_index)
                batch_index += 1
                for (conv, prompt), (ids, stop) in zip(rows, answers):
                    ids = ids[:max(cfg.max_len - len(prompt), 0)]
                    if stop == "eos" and (not ids or ids[-1] not in target.eos_ids):
                        stop = "length"                         # the EOS fell beyond this row's room
                    if len(ids) >= cfg.max_new_tokens and stop != "eos":
                        stop = "length"
                    cut = loop_cut(ids) if stop == "length" else None
                    if cut is not None:                         # a greedy repetition loop: keep two periods
                        ids, stop = ids[:cut], "loop"
                    summary.new_tokens += len(ids)
                    summary.answers += 1
                    text = target.decode(ids, skip_special_tokens=True).strip()
                    conv.said += [{"role": "user", "content": conv.users[len(conv.stops)]},
                                  {"role": "assistant", "content": text}]
                    conv.stops.append(stop)
                    conv.answer_tokens.append(len(ids))
                    if stop != "eos" or len(conv.stops) == len(conv.users) or not text:
                        conv.done = True
                        _finish(conv, sink, summary, bar)
                    else:
                        q.appendleft(conv)                      # in progress: answered first next time
                elapsed = time.perf_counter() - t0
                bar.set_postfix(tok_s=f"{summary.new_tokens / max(elapsed, 1e-9):.0f}", answers=summary.answers)
        except KeyboardInterrupt:           # stopped: keep every answered turn, lose only the call in flight
            for conv in [c for c, _ in rows] + [c for q in queues.values() for c in q]:
                if conv.stops and not conv.done:
                    conv.done = True
                    _finish(conv, sink, summary, bar)
            bar.close()
            log.info("interrupted: %d dialogues written this run (in-progress ones up to their last answered "
                     "turn); a restart continues with the rest", summary.dialogues)
            raise
    bar.close()
    summary.seconds = time.perf_counter() - t0
    summary.total_dialogues += summary.dialogues
    log.info("distilled %d dialogues (%d answers, %d new tokens) in %.0fs: %.1f tokens/s; %s holds %d dialogues",
             summary.dialogues, summary.answers, summary.new_tokens, summary.seconds, summary.tokens_per_s, out,
             summary.total_dialogues)
    return summary


def _finish(conv: _Conversation, sink, summary: DistillSummary, bar) -> None:
    """Append a finished conversation (if it has an answer) and flush it to disk."""
    bar.update(1)
    if not any(m["role"] == "assistant" and m["content"] for m in conv.said):
        summary.skipped += 1
        return
    sink.write(json.dumps(conv.record(), ensure_ascii=False) + "\n")
    sink.flush()
    os.fsync(sink.fileno())
    summary.dialogues += 1


def measure_generation(target, prompts: Sequence[list[int]], batch_sizes: Sequence[int], new_tokens: int = 48,
                       repeats: int = 1) -> list[dict]:
    """Tokens/s of `generate_batch` per batch size (every row forced to `new_tokens` tokens
    by asking for them without EOS stops), so the knee of the curve on this machine shows."""
    rows = []
    for b in batch_sizes:
        batch = [prompts[i % len(prompts)] for i in range(b)]
        generate_batch_fixed(target, batch[:1], 4)                       # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            generate_batch_fixed(target, batch, new_tokens)
            best = min(best, time.perf_counter() - t)
        rows.append({"batch_size": b, "dtype": str(target.dtype).removeprefix("torch."), "kernels": target.kernels,
                     "new_tokens": b * new_tokens, "seconds": round(best, 3),
                     "tokens_per_s": round(b * new_tokens / best, 1)})
        log.info("batch %d: %.1f tokens/s", b, rows[-1]["tokens_per_s"])
    return rows


def measure_engines(target, prompts: Sequence[list[int]], new_tokens: int = 192, static_batch: int = 16) -> list[dict]:
    """Kept tokens/s of the two engines on the same prompts, answers ending at EOS or the cap
    as in `distill` (static: left-padded batches of `static_batch`, each running until its
    longest row ends; continuous: all prompts handed over at once)."""
    rows = []
    for engine in ("static", "continuous"):
        t = time.perf_counter()
        if engine == "static":
            outs = [o for i in range(0, len(prompts), static_batch)
                    for o in generate_batch(target, prompts[i:i + static_batch], new_tokens)]
        else:
            outs = generate_continuous(target, prompts, new_tokens)
        sec = time.perf_counter() - t
        kept = sum(len(ids) for ids, _ in outs)
        rows.append({"engine": engine, "prompts": len(prompts), "cap": new_tokens, "new_tokens": kept,
                     "seconds": round(sec, 1), "tokens_per_s": round(kept / sec, 1)})
        log.info("%s: %.1f tokens/s", engine, rows[-1]["tokens_per_s"])
    return rows


def generate_batch_fixed(target, prompts: Sequence[list[int]], new_tokens: int) -> None:
    """Greedy decoding of exactly `new_tokens` per row (no EOS stop): the throughput probe."""
    pad = _pad_id(target)
    ids, mask = _left_pad(prompts, pad)
    with torch.inference_mode():
        target.model.generate(input_ids=ids.to(target.device), attention_mask=mask.to(target.device),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)


__all__ = ["DistillConfig", "DistillSummary", "distill", "done_ids", "generate_batch", "generate_continuous", "loop_cut",
           "measure_engines", "measure_generation"]
