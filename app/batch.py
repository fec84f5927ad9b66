"""The Batch tab: several prompts decoded together (EMS-SD unpadded, padded, sequential).

The chosen methods run one after another on a background thread over the same prompts;
the tab streams a per-sample x per-cycle heatmap of accepted lengths, the throughput of
each method (total new tokens over wall time) and the per-sample answers.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import gradio as gr

from hass.batch import METHODS, BatchCycle, batch_generate
from hass.evalsets import SETS, load_set
from hass.events import Step, summarize
from visual import batch_heatmap, speedup_figure
from visual.theme import empty_figure

from .studio import Session, SettingsError, Studio, drain_queue, make_config

log = logging.getLogger(__name__)

MAX_PROMPTS = 16
MAX_BATCH = 16
UI_MAX_NEW = 512
ORDER = ("sequential", "padded", "ems")          # baseline first, so its numbers are there to compare
LABELS = {"ems": "EMS-SD (unpadded)", "padded": "padded (vanilla)", "sequential": "sequential (batch 1)"}
UPDATE_EVERY = 0.3


def default_prompts(per_set: int = 2) -> str:
    """A few first turns of the eval sets, one per line."""
    out = []
    for name in SETS:
        try:
            out += [" ".join(q.turns[0].split()) for q in load_set(name, per_set)]
        except (FileNotFoundError, ValueError):
            continue
    return "\n".join(out or ["Explain why the sky is blue.", "Write a haiku about rain.", "What is 17 * 23?"])


@dataclass
class MethodRun:
    """What one method produced so far: steps per sample, cycles (with their wall time)."""

    method: str
    steps: list[list[Step]]
    cycles: list[BatchCycle] = field(default_factory=list)
    wall_s: float = 0.0
    done: bool = False

    @property
    def new_tokens(self) -> int:
        return sum(len(st.new_tokens) for c in self.cycles for st in c.steps.values())

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def accepted(self) -> list[list[int]]:
        return [[len(st.new_tokens) for st in steps if st.kind == "speculative"] for steps in self.steps]


class BatchJob:
    """Runs the methods in a thread; cycles come back through a queue (the UI's work is never
    inside the timed decoding). `stop` ends it between cycles."""

    def __init__(self, studio: Studio, draft, prompts: list[list[int]], cfg, methods: list[str], batch_size: int):
        self.studio, self.draft, self.prompts, self.cfg = studio, draft, prompts, cfg
        self.methods, self.batch_size = methods, batch_size
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.stop = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        # validated here, at once: a bad setting is a message, not a dead thread
        self.streams = {m: batch_generate(studio.target, draft, prompts, cfg, m, batch_size) for m in methods}
        self.thread = threading.Thread(target=self._run, name="hass-batch", daemon=True)

    def start(self) -> "BatchJob":
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            for m in self.methods:
                stream = self.streams[m]
                t0 = time.perf_counter()
                for cyc in stream:
                    self.q.put(("cycle", m, cyc, time.perf_counter() - t0))
                    if self.stop.is_set():
                        break
                stream.close()
                self.q.put(("done", m, None, time.perf_counter() - t0))
                if self.stop.is_set():
                    break
        except BaseException as exc:       # reported to the UI, never raised in the thread
            log.exception("batch decoding failed")
            self.error = exc
        finally:
            for s in self.streams.values():
                s.close()
            self.done.set()

    def drain(self, wait: float) -> list[tuple]:
        return drain_queue(self.q, wait)


def parse_prompts(text: str) -> list[str]:
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise SettingsError("give at least one prompt (one per line)")
    if len(prompts) > MAX_PROMPTS:
        raise SettingsError(f"at most {MAX_PROMPTS} prompts here, got {len(prompts)} (use `python -m hass batch` "
                            "for more)")
    return prompts


def _throughput_figure(runs: dict[str, MethodRun]):
    """Tokens over wall time per method; one point per batch cycle."""
    races = {}
    for m, r in runs.items():
        t_prev, pts = 0.0, []
        for i, c in enumerate(r.cycles):
            toks = [t for st in c.steps.values() for t in st.new_tokens]
            pts.append(Step(index=i, kind="speculative", tree=None, path=[], accepted=0, new_tokens=toks,
                            sources=["bonus"] * len(toks), target_prob=[], timings={"verify": c.seconds}))
            t_prev += c.seconds
        races[LABELS[m]] = pts
    if not any(races.values()):
        return empty_figure("no cycles yet", "Throughput")
    return speedup_figure(races, _throughput_title(runs), uirevision="hass-batch-speed")


def _throughput_title(runs: dict[str, MethodRun]) -> str:
    base = runs.get("sequential")
    parts = []
    for m, r in runs.items():
        s = f"{m} {r.tokens_per_s:.1f} tok/s"
        if base is not None and m != "sequential" and base.done and r.done and base.tokens_per_s > 0:
            s += f" ({r.tokens_per_s / base.tokens_per_s:.2f}× sequential)"
        parts.append(s)
    return "Throughput · " + " · ".join(parts)


def _table(prompts: list[str], runs: dict[str, MethodRun], decode) -> list[list]:
    show = next((runs[m] for m in ("ems", "padded", "sequential") if m in runs and any(runs[m].steps)), None)
    rows = []
    for i, p in enumerate(prompts):
        steps = show.steps[i] if show else []
        s = summarize(steps) if steps else None
        rows.append([i, p[:80] + ("…" if len(p) > 80 else ""),
                     decode([t for st in steps for t in st.new_tokens]) if steps else "",
                     round(s.tau, 2) if s else None, (s.stop_reason or "running") if s else ""])
    return rows


def _status(runs: dict[str, MethodRun], methods: list[str], note: str = "") -> str:
    parts = []
    for m in methods:
        r = runs.get(m)
        if r is None:
            parts.append(f"{m}: waiting")
        else:
            parts.append(f"{m}: {'done' if r.done else 'running'}, {r.new_tokens} tokens in {r.wall_s:.1f}s "
                         f"= {r.tokens_per_s:.1f} tok/s, {len(r.cycles)} cycles")
    return " · ".join(parts) + (f" · {note}" if note else "")


def run(studio: Studio, session: Session, prompts_text: str, batch_size, methods, max_new, temperature, total,
        depth, top_k, heat_method: str):
    """Handler: stream (status, heatmap, throughput, answers) while the methods run."""
    empty = (gr.update(), gr.update(), gr.update())
    try:
        prompts = parse_prompts(prompts_text)
        methods = [m for m in ORDER if m in (methods or [])]
        if not methods:
            raise SettingsError("pick at least one method")
        b = int(batch_size or 0)
        if not 1 <= b <= MAX_BATCH:
            raise SettingsError(f"batch size must be between 1 and {MAX_BATCH}")
        draft, label = studio.draft_for(session.draft_spec if session else "default")
        vocab = studio.target.vocab_size if getattr(draft, "token_map", None) is None else int(draft.token_map.numel())
        cfg = make_config(temperature, 1.0, min(int(max_new or 0), UI_MAX_NEW) if max_new else max_new, total, depth,
                          top_k, vocab, **(session or Session()).tree_options())
        ids = [studio.target.render([{"role": "user", "content": p}]) for p in prompts]
        job = BatchJob(studio, draft, ids, cfg, methods, b)
    except (SettingsError, ValueError) as exc:
        yield (f"**Cannot run:** {exc}", *empty, gr.update())
        return
    sid = session.sid if session else "anonymous"
    with studio._lock:                       # one batch run per session; a new one stops the old
        old = studio.batch_jobs.pop(sid, None)
        if old is not None:
            old.stop.set()
        studio.batch_jobs[sid] = job
    job.start()
    runs: dict[str, MethodRun] = {}
    decode = studio.target.decode
    last = 0.0
    try:
        while True:
            finished = job.done.is_set()
            for kind, m, cyc, elapsed in job.drain(0.1):
                r = runs.setdefault(m, MethodRun(m, [[] for _ in prompts]))
                r.wall_s = elapsed
                if kind == "done":
                    r.done = True
                    continue
                r.cycles.append(cyc)
                for i, st in cyc.steps.items():
                    r.steps[i].append(st)
            if finished and job.q.empty():
                break
            if time.perf_counter() - last >= UPDATE_EVERY:
                last = time.perf_counter()
                yield _outputs(runs, methods, prompts, decode, heat_method, f"draft {label}")
        note = "stopped" if job.stop.is_set() else f"draft {label}"
        if job.error is not None:
            note = f"failed: {job.error}"
        yield _outputs(runs, methods, prompts, decode, heat_method, note)
    finally:
        job.stop.set()
        with studio._lock:
            if studio.batch_jobs.get(sid) is job:
                del studio.batch_jobs[sid]


def _outputs(runs, methods, prompts, decode, heat_method, note):
    heat = runs.get(heat_method) or next((runs[m] for m in ("ems", "padded", "sequential") if m in runs), None)
    fig = batch_heatmap(heat.accepted(), f"{heat.method} · tokens per cycle (accepted + bonus) per sample",
                        uirevision="hass-batch-heat") if heat and any(heat.accepted()) else \
        empty_figure("no speculative cycles yet", "Batch acceptance")
    return (_status(runs, methods, note), fig, _throughput_figure(runs), _table(prompts, runs, decode))


def stop(studio: Studio, session: Session) -> str:
    with studio._lock:
        job = studio.batch_jobs.pop(session.sid if session else "anonymous", None)
    if job is None:
        return "nothing running"
    job.stop.set()
    return "stopping…"


def build(studio: Studio, state: gr.State, dec: dict) -> None:
    """The tab's components and wiring; call inside `with gr.Tab(...)` of the Blocks."""
    t = studio.tree_defaults
    gr.Markdown("Several prompts decoded **together**. **EMS-SD** packs the new tokens of all live samples into "
                "one target forward with per-sample KV lengths (no padding; a finished sample costs nothing). "
                "**padded** is the vanilla batch: trees and accepted tokens padded to the longest, cache kept "
                "aligned (padding computed and read again). **sequential** decodes one prompt after another. "
                "Greedy outputs are identical across the three; only the speed differs. Uses the chat's draft.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            prompts = gr.Textbox(default_prompts(), lines=6, max_lines=16, label=f"Prompts (one per line, at most "
                                 f"{MAX_PROMPTS})", elem_id="hs-batch-prompts")
        with gr.Column(scale=2):
            methods = gr.CheckboxGroup(list(METHODS), value=list(METHODS), label="Methods", elem_id="hs-batch-methods")
            with gr.Row():
                batch_size = gr.Slider(1, MAX_BATCH, value=4, step=1, label="Batch size", elem_id="hs-batch-size")
                max_new = gr.Number(32, label="Max new tokens", precision=0, elem_id="hs-batch-max-new")
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature")
            with gr.Row():
                total = gr.Number(t.total_tokens, label="Tree total tokens", precision=0)
                depth = gr.Number(t.depth, label="Tree depth", precision=0)
                topk = gr.Number(t.top_k, label="Tree top-k", precision=0)
            heat_method = gr.Radio(list(METHODS), value="ems", label="Heatmap of", elem_id="hs-batch-heat-of")
            with gr.Row():
                go = gr.Button("Run batch", variant="primary", elem_id="hs-batch-run")
                halt = gr.Button("Stop", variant="stop", elem_id="hs-batch-stop")
    status = gr.Markdown("", elem_id="hs-batch-status")
    with gr.Row():
        heat = gr.Plot(empty_figure("no batch cycles yet", "Batch acceptance"), show_label=False,
                       elem_id="hs-batch-heat")
        speed = gr.Plot(empty_figure("no cycles yet", "Throughput"), show_label=False, elem_id="hs-batch-speed")
    table = gr.Dataframe(headers=["#", "prompt", "answer", "τ", "stop"], datatype=["number", "str", "str", "number",
                                                                                    "str"],
                         interactive=False, wrap=True, elem_id="hs-batch-table")
    ev = go.click(partial(run, studio), [state, prompts, batch_size, methods, max_new, temperature, total, depth, topk,
                                         heat_method],
                  [status, heat, speed, table], show_progress="hidden", api_name="batch", **dec)
    halt.click(partial(stop, studio), [state], status, cancels=[ev], concurrency_limit=None, api_name="batch_stop")


__all__ = ["build", "run", "stop", "parse_prompts", "default_prompts", "BatchJob", "MethodRun"]
