"""The studio's shared objects: the loaded model (one per process, read-only while decoding),
a cache of loaded drafts, settings validation, and decoding runs in a background thread.

Per-browser-session data lives in `Session` (held by a `gr.State`): plain data only (no
locks, no tensors), so Gradio can copy it for every new visitor.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hass.assets import resolve_draft, shipped_draft
from hass.decode import MAX_NEW_TOKENS_LIMIT, GenerationConfig, plain_generate, speculative_generate
from hass.events import Step
from hass.candidates import LookupConfig
from hass.fit import load_cost_curve
from hass.profile import FITTED_TREE
from hass.target import Target, load_target
from hass.tree import TreeConfig
from hass.verify import SamplingConfig

from .errors import SettingsError
from .policy import Policy

log = logging.getLogger(__name__)

# draft choices shown in the UI -> how they resolve
DRAFT_CHOICES = ("shipped HASS", "shipped EAGLE-2", "trained in this app", "random", "path")
UI_MAX_NEW_TOKENS = 2048


# -- per-session data -----------------------------------------------------------------------------
@dataclass
class Turn:
    """One exchange: the user's message and the answer as it streamed (steps + token texts)."""

    user: str
    mode: str = "HASS"
    draft: str = ""
    steps: list[Step] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)      # per new token, in order (incremental decode)
    ids: list[int] = field(default_factory=list)
    answer: str = ""
    running: bool = False
    note: str = ""                                      # "stopped", an error, ...
    wall_s: float = 0.0
    html: tuple = ()                                    # (key, HTML) of the answer, reused while unchanged
    pending: bool = False                               # sent, waiting for its turn to decode (the queue)
    wait: str = ""                                      # what a pending turn waits for, in words
    phase: str = ""                                     # what a running turn does before its first token
    prompt_tokens: int = 0                              # tokens the target reads before answering
    replaces: "Turn | None" = None                      # Regenerate: the answer to restore if this one fails
    sent: float = 0.0                                   # time.time() when it was sent (0: not through the queue)


@dataclass
class Session:
    """What one browser tab owns: the conversation and the draft it chose."""

    turns: list[Turn] = field(default_factory=list)
    draft_spec: str = "default"
    draft_label: str = ""
    run_id: str = ""
    sid: str = field(default_factory=lambda: uuid.uuid4().hex)
    tree_rule: str = "fitted"         # "fitted" (size chosen per step for this machine) | "fixed"
    lookup: bool = True               # lookup candidates in the tree
    race_state: str = ""              # "" | "queued" | "running": this tab's race or A/B
    last_race: dict = field(default_factory=dict)     # the last race: {"steps": {name: steps}, "names", "complete"}

    def tree_options(self) -> dict:
        """make_config's tree options for this tab's settings."""
        return {"fitted": self.tree_rule == "fitted", "lookup": self.lookup}

    def history(self, upto: int | None = None) -> list[dict]:
        """The conversation for the chat template: finished turns (a stopped answer counts),
        of the first `upto` turns when given."""
        msgs: list[dict] = []
        for t in self.turns[:upto]:
            if t.running or t.pending:
                continue
            msgs.append({"role": "user", "content": t.user})
            if t.answer:
                msgs.append({"role": "assistant", "content": t.answer})
        return msgs

    def conversation_steps(self) -> list[Step]:
        return [s for t in self.turns if t.mode == "HASS" for s in t.steps]

    def steps_by_draft(self) -> dict[str, list[Step]]:
        """The conversation's HASS steps per draft (folder drafts by their folder's name), in
        the order the drafts were first used."""
        out: dict[str, list[Step]] = {}
        for t in self.turns:
            if t.mode == "HASS" and t.steps:
                out.setdefault(Path(t.draft).name if t.draft else "HASS", []).extend(t.steps)
        return out

    @property
    def last(self) -> Turn | None:
        return self.turns[-1] if self.turns else None

    @property
    def busy(self) -> bool:
        """An answer of this tab is decoding or waiting for its turn."""
        return any(t.running or t.pending for t in self.turns)

    def next_pending(self) -> int | None:
        return next((i for i, t in enumerate(self.turns) if t.pending), None)

    def last_hass_turn(self) -> tuple[int, Turn] | None:
        """(index, turn) of the conversation's latest finished HASS answer with steps."""
        for i in range(len(self.turns) - 1, -1, -1):
            t = self.turns[i]
            if t.mode == "HASS" and t.steps and not t.running and not t.pending:
                return i, t
        return None

    def plain_step_s(self) -> float | None:
        """Seconds of one plain decoding step, from this conversation's latest plain-mode
        answer (its plain steps; the prefill left out), or None without one."""
        for t in reversed(self.turns):
            if t.mode == "plain" and not t.running:
                secs = [st.seconds for st in t.steps if st.kind == "plain" and st.seconds > 0]
                if secs:
                    return sum(secs) / len(secs)
        return None


# -- token texts ----------------------------------------------------------------------------------
class TokenTexts:
    """Per-token text by incremental decoding (text of ids[:k+1] minus text of ids[:k]); an
    incomplete multi-byte character yields "" until the token that completes it."""

    def __init__(self, target: Target):
        self.target = target
        self.ids: list[int] = []
        self.text = ""

    def push(self, tokens: list[int]) -> list[str]:
        out = []
        for t in tokens:
            self.ids.append(int(t))
            full = self.target.decode(self.ids)
            if full.endswith("\ufffd"):       # an incomplete multi-byte character: wait for more
                out.append("")
                continue
            out.append(full[len(self.text):])
            self.text = full
        return out


# -- settings -------------------------------------------------------------------------------------
def _number(name: str, v, lo: float, hi: float, whole: bool):
    if v is None or (isinstance(v, str) and not v.strip()):
        raise SettingsError(f"{name} is empty: give a number from {lo:g} to {hi:g}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, got {v!r}") from None
    if math.isnan(x) or not lo <= x <= hi:
        raise SettingsError(f"{name} must be between {lo:g} and {hi:g}, got {v!r}")
    if whole:
        if x != int(x):
            raise SettingsError(f"{name} must be a whole number, got {v!r}")
        return int(x)
    return x


def make_config(temperature, top_p, max_new_tokens, total_tokens, depth, top_k, vocab_size: int | None = None,
                seed: int = 0, fitted: bool = False, lookup: bool = False) -> GenerationConfig:
    """A validated GenerationConfig from UI values; SettingsError names the bad one.
    fitted: the tree size is chosen per step for this machine (total tokens = the cap);
    lookup: lookup candidates join the draft tree."""
    t = _number("temperature", temperature, 0, 2, False)
    p = _number("top-p", top_p, 1e-6, 1, False) if top_p is not None and top_p != 0 else None
    if p is None:
        raise SettingsError("top-p must be in (0, 1], got 0")
    m = _number("max new tokens", max_new_tokens, 1, min(UI_MAX_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT), True)
    tree = TreeConfig(_number("tree total tokens", total_tokens, 2, 1024, True),
                      _number("tree depth", depth, 1, 64, True), _number("tree top-k", top_k, 1, 64, True))
    cfg = GenerationConfig(max_new_tokens=m, sampling=SamplingConfig(temperature=t, top_p=p), tree=tree, seed=seed,
                           fitted=bool(fitted), lookup=LookupConfig() if lookup else None)
    try:
        return cfg.validate(vocab_size)
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc


# -- decoding in a background thread --------------------------------------------------------------
def drain_queue(q: queue.SimpleQueue, wait: float) -> list:
    """Everything in `q` now; waits up to `wait` s for the first item."""
    out = []
    try:
        out.append(q.get(timeout=wait))
    except queue.Empty:
        return out
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


class DecodeRun:
    """Runs step generators in a thread and hands their steps over through a queue, so the
    UI's work (HTML, plots) never sits inside the decoder's timed sections. `stop` ends it
    between steps.

    `jobs` run one after the other. `race` jobs run after them, interleaved step by step on
    the same thread: the next step always goes to the racer that has used the least decoding
    time so far (its own step timings, which exclude everything outside the generator, so
    a racer is never charged for the other's steps or for the UI). Both racers thus run
    under the same machine conditions, stream at once, and at any moment have had about
    the same compute time, so their progress on screen is their speed."""

    def __init__(self, jobs: list[tuple[str, Iterator[Step]]], race: list[tuple[str, Iterator[Step]]] | None = None):
        self.jobs = jobs
        self.race = list(race or [])
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.stop = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.order: list[str] = []            # job name of every step, in the order they ran
        self.used: dict[str, float] = {}      # decoding seconds per job (sum of its step timings)
        self.thread = threading.Thread(target=self._run, name="hass-decode", daemon=True)

    def start(self) -> "DecodeRun":
        self.thread.start()
        return self

    def _put(self, name: str, step: Step) -> None:
        self.order.append(name)
        self.used[name] = self.used.get(name, 0.0) + step.seconds
        self.q.put((name, step))

    def _run(self) -> None:
        try:
            for name, gen in self.jobs:
                try:
                    for step in gen:
                        self._put(name, step)
                        if self.stop.is_set():
                            break
                finally:
                    gen.close()
                if self.stop.is_set():
                    break
            if self.race and not self.stop.is_set():
                self._interleave()
        except BaseException as exc:        # reported to the UI, never raised in the thread
            log.exception("decoding failed")
            self.error = exc
        finally:
            for _, gen in self.jobs + self.race:
                gen.close()
            self.done.set()

    def _interleave(self) -> None:
        live = list(self.race)
        while live and not self.stop.is_set():
            name, gen = min(live, key=lambda j: self.used.get(j[0], 0.0))     # ties: the order given
            step = next(gen, None)
            if step is None:
                live.remove((name, gen))
                continue
            self._put(name, step)

    def drain(self, wait: float = 0.1) -> list[tuple[str, Step]]:
        """Everything produced so far; waits up to `wait` s for the first item."""
        return drain_queue(self.q, wait)

    @property
    def finished(self) -> bool:
        return self.done.is_set() and self.q.empty()

    def wait(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)


# -- the shared studio ------------------------------------------------------------------------------
class Studio:
    """One per process: the model, the drafts loaded for it, the running decodes and the
    training manager. Swapping the model is atomic: a failed load keeps the previous one."""

    def __init__(self, target: Target, model_spec: str = "default", draft_spec: str = "default",
                 training=None, policy: Policy | None = None):
        self.target = target
        self.policy = policy or Policy()
        self.model_spec = model_spec
        self.default_draft_spec = draft_spec
        self._drafts: dict[tuple[int, str], tuple[object, str]] = {}
        self._lock = threading.RLock()
        self._runs: dict[str, DecodeRun] = {}
        self.batch_jobs: dict[str, object] = {}      # the Batch tab's run per session (app/batch.py), under _lock
        self.training = training
        self._curve: tuple[int, dict[int, float]] | None = None     # (id of the target, its cost curve)
        self.prefill_rate: float | None = None        # prompt tokens per second of the latest long prefill
        self.tree_defaults, self.tree_source = self._tree_defaults()

    @classmethod
    def load(cls, model_spec: str = "default", draft_spec: str = "default", training=None,
             policy: Policy | None = None) -> "Studio":
        return cls(load_target(model_spec), model_spec, draft_spec, training, policy)

    # -- model ---------------------------------------------------------------------------------
    def _tree_defaults(self) -> tuple[TreeConfig, str]:
        """The growth limits of the fitted tree (its size is chosen per step); the cost curve
        is measured now (once per machine, cached) so the first answer does not wait for it."""
        try:
            load_cost_curve(self.target)
        except Exception as exc:   # noqa: BLE001 - a failed measurement only costs the first answer time
            log.warning("could not measure the verify cost curve: %s", exc)
        return FITTED_TREE, "size fitted per step to this machine's verify costs (the numbers are its limits)"

    def cost_curve(self) -> dict[int, float]:
        """This machine's verify cost curve for the current target ({N: seconds}, measured at
        start-up and cached on disk), {} when it could not be measured."""
        target = self.target
        if self._curve is None or self._curve[0] != id(target):
            try:
                curve = load_cost_curve(target, measure=False)
            except Exception as exc:      # noqa: BLE001 - the panels say the curve is missing
                log.warning("could not read the verify cost curve: %s", exc)
                curve = {}
            if not curve or 1 not in curve:
                return {}                 # not cached (or no N = 1 to divide by): try again next time
            self._curve = (id(target), curve)
        return self._curve[1]

    def note_prefill(self, tokens: int, seconds: float) -> None:
        """Remember how fast a long prompt was read, to say how long the next one will take."""
        if tokens >= 256 and seconds > 0:
            self.prefill_rate = tokens / seconds

    def prefill_estimate(self, tokens: int) -> float | None:
        return tokens / self.prefill_rate if self.prefill_rate else None

    def others_busy(self, session: Session) -> bool:
        """Is another tab's answer, race or batch decoding now (so this one waits)?"""
        with self._lock:
            runs = any(sid != session.sid for sid in self._runs)
            batches = any(sid != session.sid and isinstance(getattr(job, "done", None), threading.Event)
                          and not job.done.is_set() for sid, job in self.batch_jobs.items())
        return runs or batches

    def load_model(self, spec: str) -> str:
        """Load another target; on failure raise with the reason and keep the current one."""
        self.policy.check_model_load()
        spec = (spec or "").strip()
        if not spec:
            raise SettingsError("give a model: 'default', a model folder, a .gguf file or a hub id")
        try:
            target = load_target(spec)
        except Exception as exc:       # noqa: BLE001 - any failure keeps the previous model
            raise SettingsError(f"could not load {spec!r}: {exc} (still using {self.target.name})") from exc
        with self._lock:
            self.target, self.model_spec = target, spec
            self._drafts.clear()
            self.tree_defaults, self.tree_source = self._tree_defaults()
        return (f"loaded {target.source or target.name} in {target.load_seconds:.1f}s "
                f"({target.device.type}, {str(target.dtype).removeprefix('torch.')}, {target.kernels} kernels)")

    # -- drafts --------------------------------------------------------------------------------
    def draft_spec_for(self, choice: str, path: str = "") -> str:
        """The resolve_draft spec of a UI draft choice."""
        if choice == "shipped HASS":
            return "hass"
        if choice == "shipped EAGLE-2":
            return "eagle2"
        if choice == "random":
            return "random"
        if choice == "trained in this app":
            out = self.training.last_draft() if self.training is not None else None
            if out is None:
                raise SettingsError("no draft has been trained in this app yet (see the Train tab)")
            return str(out)
        if choice == "path":
            self.policy.check_draft_path()
            if not (path or "").strip():
                raise SettingsError("give the folder of a draft (model.safetensors + config.json)")
            return path.strip()
        if choice in ("default", None, ""):
            return "default"
        raise SettingsError(f"unknown draft choice {choice!r}")

    def draft_for(self, spec: str):
        """(draft, label) for a spec, loaded once per model."""
        spec = spec or "default"
        key = (id(self.target), spec)
        with self._lock:
            if key not in self._drafts:
                try:
                    self._drafts[key] = resolve_draft(spec, self.target)
                except FileNotFoundError as exc:
                    raise SettingsError(f"{exc}. The shipped drafts appear in assets/drafts/ once trained; "
                                        "until then pick 'random' or a trained draft") from exc
                except Exception as exc:       # noqa: BLE001 - a bad folder, a wrong size, ...
                    raise SettingsError(f"could not load draft {spec!r}: {exc}") from exc
            return self._drafts[key]

    def weights_note(self) -> str:
        """A warning when a shipped draft runs on other weights than those it was measured on."""
        folder = shipped_draft(self.target, "hass")
        if folder is None:
            return ""
        try:
            measured = json.loads((folder / "config.json").read_text()).get("hass", {}).get("target_weights")
        except (OSError, ValueError):
            return ""
        if measured and measured.split(" ")[0] != self.target.weights.split(" ")[0]:
            return (f" · the shipped drafts were trained and measured on the {measured.split(' ')[0]} weights only: "
                    "the output stays exact, acceptance may differ")
        return ""

    def shipped(self, kind: str) -> Path | None:
        return shipped_draft(self.target, kind)

    # -- decoding ------------------------------------------------------------------------------
    def generator(self, mode: str, ids: list[int], cfg: GenerationConfig, draft_spec: str = "default"):
        """A validated step generator (raises SettingsError at once on a bad setting)."""
        self.policy.check_new_tokens(cfg.max_new_tokens)
        try:
            if mode == "plain":
                return plain_generate(self.target, ids, cfg)
            draft, _ = self.draft_for(draft_spec)
            return speculative_generate(self.target, draft, ids, cfg)
        except SettingsError:
            raise
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc

    def start(self, session: Session, jobs: list[tuple[str, Iterator[Step]]],
              race: list[tuple[str, Iterator[Step]]] | None = None) -> DecodeRun:
        """Run `jobs` (then `race`, interleaved: see DecodeRun) for this session; a run the
        session still had is stopped."""
        run = DecodeRun(jobs, race)
        with self._lock:
            old = self._runs.pop(session.sid, None)
            if old is not None:
                old.stop.set()
            self._runs[session.sid] = run
        return run.start()

    def stop(self, session: Session) -> bool:
        with self._lock:
            run = self._runs.pop(session.sid, None)
        if run is None:
            return False
        run.stop.set()
        return True

    def finish(self, session: Session, run: DecodeRun) -> None:
        run.stop.set()
        with self._lock:
            if self._runs.get(session.sid) is run:
                del self._runs[session.sid]


def collect(run: DecodeRun, timeout: float = 600.0) -> dict[str, list[Step]]:
    """Wait for a run and group its steps by job name (for tests and non-streaming handlers)."""
    out: dict[str, list[Step]] = {}
    t0 = time.perf_counter()
    while not run.finished and time.perf_counter() - t0 < timeout:
        for name, st in run.drain(0.2):
            out.setdefault(name, []).append(st)
    for name, st in run.drain(0):
        out.setdefault(name, []).append(st)
    if run.error is not None:
        raise run.error
    return out
