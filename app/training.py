"""The Train tab: start / watch / cancel one short draft-training run in a background thread.

One run at a time across all users: `TrainingManager` (created once at app start-up) owns
the lock and the current job; a second user is told a run is in progress. The UI polls the
job with a `gr.Timer`; curves come from `visual.training_figure` over the metrics the
training loop hands to `on_metrics`.
"""
from __future__ import annotations

import html
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from hass.losses import LossConfig
from hass.target import cache_root
from hass.train import TrainConfig, train
from visual import training_figure

from .policy import Policy
from .studio import Session, SettingsError, Studio, _number

log = logging.getLogger(__name__)

DEFAULT_DATA = "sharegpt-train-1024"
TRAIN_OUTPUTS = ("state", "progress", "figure", "status", "timer")


def data_root() -> Path:
    return cache_root() / "data"


def drafts_root() -> Path:
    """Where drafts trained in the app go: $HASS_APP_DRAFTS, else <cache>/app-drafts."""
    env = os.environ.get("HASS_APP_DRAFTS", "").strip()
    return Path(env).expanduser() if env else cache_root() / "app-drafts"


def default_data() -> str:
    """The prepared feature folder to train on by default, if one exists."""
    p = data_root() / DEFAULT_DATA
    return str(p) if (p / "meta.json").is_file() else ""


@dataclass
class TrainingJob:
    cfg: TrainConfig
    owner: str
    budget: str                      # "steps" | "minutes"
    stop: threading.Event = field(default_factory=threading.Event)
    metrics: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    out: Path | None = None
    thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.finished is None

    def progress(self) -> float:
        if not self.running:
            return 1.0
        last = self.metrics[-1] if self.metrics else {}
        frac_steps = last.get("step", 0) / max(last.get("total_steps", 0) or (self.cfg.max_steps or 0) or 1, 1)
        if self.budget == "minutes" and self.cfg.max_minutes:
            frac_time = (time.time() - self.started) / (60 * self.cfg.max_minutes)
            return max(0.0, min(1.0, max(frac_steps, frac_time)))
        return max(0.0, min(1.0, frac_steps))

    def describe(self) -> str:
        last = self.metrics[-1] if self.metrics else None
        if self.error:
            return f"failed: {self.error}"
        if last is None:
            state = "loading the target and data…" if self.running else "stopped before the first step"
        else:
            state = (f"step {last['step']}/{last.get('total_steps', '?')} · loss {last.get('loss_1', 0):.3f} · "
                     f"acc {last.get('acc_1', 0):.1%} · {last.get('tokens_per_s', 0):.0f} tok/s")
        if self.running:
            return ("cancelling… " if self.stop.is_set() else "training · ") + state
        verb = "cancelled" if self.stop.is_set() else "finished"
        return f"{verb} · {state} · draft saved in {self.out}"


class TrainingManager:
    """Owns the one-run-at-a-time lock and the current (or last) job."""

    def __init__(self, runs_dir: Path | None = None, policy: Policy | None = None):
        self.policy = policy or Policy()
        self._lock = threading.Lock()
        self.job: TrainingJob | None = None
        self.runs_dir = Path(runs_dir) if runs_dir else drafts_root()
        self._last_draft: Path | None = None

    def busy(self) -> bool:
        return self._lock.locked()

    def last_draft(self) -> Path | None:
        return self._last_draft

    def start(self, cfg: TrainConfig, owner: str, budget: str) -> TrainingJob:
        if not self._lock.acquire(blocking=False):
            job = self.job
            who = "you" if job is not None and job.owner == owner else "another user"
            raise SettingsError(f"a training run started by {who} is in progress; one run at a time "
                                "(wait for it to finish" + (" or cancel it)" if who == "you" else ")"))
        job = TrainingJob(cfg=cfg, owner=owner, budget=budget)
        self.job = job
        job.thread = threading.Thread(target=self._run, args=(job,), name="hass-train", daemon=True)
        job.thread.start()
        return job

    def _run(self, job: TrainingJob) -> None:
        try:
            job.out = train(job.cfg, on_metrics=job.metrics.append, stop=job.stop)
            if (job.out / "model.safetensors").is_file():
                self._last_draft = job.out
        except BaseException as exc:       # noqa: BLE001 - shown in the UI
            log.exception("training failed")
            job.error = str(exc) or type(exc).__name__
        finally:
            job.finished = time.time()
            self._lock.release()

    def cancel(self, owner: str) -> str:
        job = self.job
        if job is None or not job.running:
            return "no training run is in progress"
        if job.owner != owner:
            return "the training run in progress belongs to another user: only they can cancel it"
        job.stop.set()
        return "cancelling: the run stops after the current step and saves its draft"


# -- handlers -------------------------------------------------------------------------------------
def progress_html(frac: float, text: str) -> str:
    pct = int(round(100 * max(0.0, min(1.0, frac))))
    return (f'<div class="hs-progress" role="progressbar" aria-valuenow="{pct}" aria-valuemin="0" '
            f'aria-valuemax="100"><div class="hs-progress-bar" style="width:{pct}%"></div>'
            f'<span class="hs-progress-text">{pct}% · {html.escape(text)}</span></div>')


def _warn(msg: str) -> str:
    try:
        gr.Warning(msg)
    except Exception:        # noqa: BLE001
        pass
    return f"⚠️ {msg}"


def make_train_config(data: str, budget: str, minutes, steps, n, k, w, lr, out: Path) -> TrainConfig:
    data = (data or "").strip()
    if not data:
        raise SettingsError("no prepared data: prepare a small set first (button below) or give a feature folder")
    if not (Path(data).expanduser() / "meta.json").is_file():
        raise SettingsError(f"{data} is not a prepared feature folder (no meta.json): use `python -m hass prepare`"
                            " or the prepare button")
    if budget not in ("steps", "minutes"):
        raise SettingsError("budget must be 'steps' or 'minutes'")
    max_steps = _number("steps", steps, 1, 100000, True) if budget == "steps" else None
    max_minutes = _number("minutes", minutes, 0.05, 600, False) if budget == "minutes" else None
    loss = LossConfig(align_steps=_number("n (align steps)", n, 1, 8, True), topk=_number("K", k, 1, 1000, True),
                      topk_weight=_number("w", w, 0, 100, False))
    cfg = TrainConfig(data=str(Path(data).expanduser()), out=str(out), loss=loss, lr=_number("lr", lr, 1e-7, 1, False),
                      batch_size=2, epochs=1000.0, max_steps=max_steps, max_minutes=max_minutes, draft_vocab=8192,
                      checkpoint_minutes=60.0, log_every=5, warmup_frac=0.02)
    try:
        return cfg.validate()
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc


def start(manager: TrainingManager, session: Session, data, budget, minutes, steps, n, k, w, lr):
    """Start button -> TRAIN_OUTPUTS."""
    session = session if session is not None else Session()
    out = manager.runs_dir / time.strftime("draft-%Y%m%d-%H%M%S")
    try:
        manager.policy.check_data_path(str(data or ""), data_root())
        manager.policy.train_budget(budget, steps, minutes)
        cfg = make_train_config(data, budget, minutes, steps, n, k, w, lr, out)
        job = manager.start(cfg, session.sid, budget)
    except SettingsError as exc:
        return session, gr.skip(), gr.skip(), _warn(str(exc)), gr.skip()
    return (session, progress_html(0, job.describe()), training_figure([]), f"started: {job.describe()}",
            gr.Timer(active=True))


def poll(manager: TrainingManager, session: Session, seen: int = -1):
    """Timer tick -> (progress html, figure, status, timer, metrics count)."""
    job = manager.job
    if job is None:
        return progress_html(0, "no run yet"), gr.skip(), "no training run yet", gr.Timer(active=False), seen
    n = len(job.metrics)
    fig = training_figure(list(job.metrics)) if n != seen or not job.running else gr.skip()
    timer = gr.Timer(active=job.running)
    mine = session is not None and job.owner == session.sid
    status = job.describe() if mine else f"(another user's run) {job.describe()}"
    return progress_html(job.progress(), job.describe()), fig, status, timer, n


def cancel(manager: TrainingManager, session: Session) -> str:
    return manager.cancel((session or Session()).sid)


def use_draft(studio: Studio, manager: TrainingManager, session: Session):
    session = session if session is not None else Session()
    path = manager.last_draft()
    if path is None:
        return session, _warn("no draft has been trained in this app yet")
    try:
        _, label = studio.draft_for(str(path))
    except SettingsError as exc:
        return session, _warn(str(exc))
    session.draft_spec, session.draft_label = str(path), label
    return session, f"the chat now uses the draft trained here: **{label}**"


def prepare_small(studio: Studio, n_dialogues, max_len=512) -> tuple[str, str]:
    """Prepare N ShareGPT dialogues with the current target -> (data folder, status)."""
    from hass.data import load_dialogues, prepare

    try:
        studio.policy.check_prepare(n_dialogues)
        n = _number("dialogues", n_dialogues, 1, 5000, True)
        dialogues = load_dialogues(limit=n)
    except (SettingsError, FileNotFoundError, ValueError) as exc:
        return gr.skip(), _warn(str(exc))
    out = data_root() / f"app-{studio.target.name}-{n}"
    try:
        s = prepare(studio.target, dialogues, out, max_len=int(max_len), progress=False,
                    target_spec=studio.model_spec)
    except Exception as exc:     # noqa: BLE001
        return gr.skip(), _warn(f"prepare failed: {exc}")
    return str(out), f"prepared {s.total_dialogues} dialogues ({s.total_tokens} tokens) in {out}"


def eval_tau(studio: Studio, manager: TrainingManager, questions=3, max_new_tokens=64) -> str:
    """Quick tau on a few MT-bench questions: the draft trained here vs the shipped drafts."""
    from hass.evaluate import tau_on_set

    try:
        q = _number("questions", questions, 1, 80, True)
    except SettingsError as exc:
        return _warn(str(exc))
    cands: list[tuple[str, str]] = []
    if manager.last_draft() is not None:
        cands.append(("trained here", str(manager.last_draft())))
    for kind, name in (("hass", "shipped HASS"), ("eagle2", "shipped EAGLE-2")):
        if studio.shipped(kind) is not None:
            cands.append((name, kind))
    if not cands:
        return _warn("nothing to evaluate: train a draft first (no shipped drafts for this model yet)")
    rows = ["| draft | τ (pooled) | τ (macro) | acceptance d1 / d2 / d3 | tokens |", "|---|---|---|---|---|"]
    for name, spec in cands:
        try:
            draft, _ = studio.draft_for(spec)
            r = tau_on_set(studio.target, draft, "mt_bench", q, max_new_tokens=int(max_new_tokens),
                           tree=studio.tree_defaults)
        except Exception as exc:    # noqa: BLE001
            rows.append(f"| {name} | failed: {html.escape(str(exc))} | | | |")
            continue
        acc = " / ".join(f"{a:.0%}" for a in r.per_depth_acceptance[:3])
        rows.append(f"| {name} | {r.tau:.2f} | {r.tau_macro:.2f} | {acc} | {r.new_tokens} |")
    missing = [n for k, n in (("hass", "shipped HASS"), ("eagle2", "shipped EAGLE-2")) if studio.shipped(k) is None]
    note = f"\n\n(not shipped yet: {', '.join(missing)})" if missing else ""
    return f"Greedy, first turn of {q} MT-bench questions, up to {int(max_new_tokens)} new tokens each.\n\n" \
        + "\n".join(rows) + note


__all__ = ["TrainingManager", "TrainingJob", "start", "poll", "cancel", "use_draft", "prepare_small", "eval_tau",
           "default_data", "drafts_root", "progress_html"]
