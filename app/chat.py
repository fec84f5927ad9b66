"""Chat, race, A/B and losslessness handlers: step events -> chat HTML + figure updates.

Handlers are plain functions of (studio, session, UI values); `app/ui.py` binds them to
components. Streaming handlers are generators that yield one tuple per UI update, in the
order of the *_OUTPUTS names below. Decoding runs in a `DecodeRun` thread; the handler
only reads its queue, so drawing never sits inside the decoder's timed sections.

Drawing still shares the process (and the GIL) with the decoder, so it is budgeted
(`Throttle`): while an answer streams, the time spent building updates plus the time the
generator waits at `yield` (Gradio postprocessing and sending the update) stays near
UI_SHARE of the wall time, half for text, half for figures; text updates come at most every
TEXT_EVERY seconds, figures at most every FIGURE_EVERY seconds and less often when they are
expensive; the last update always has everything. `python -m app.speedcheck` measures the
result against the CLI.
"""
from __future__ import annotations

import dataclasses
import html
import time
from pathlib import Path

import gradio as gr

from hass.events import Step, speedup, summarize
from visual import (depth_acceptance_figure, highlight_html, mask_figure, speedup_figure,
                    time_split_figure, tree_figure)
from visual.theme import empty_figure

from .studio import Session, SettingsError, Studio, TokenTexts, Turn, collect, make_config

FIGURE_EVERY = 1.0          # at least this many seconds between figure redraws while streaming
TEXT_EVERY = 0.1            # at least this many seconds between text updates while streaming
UI_SHARE = 0.06             # the UI's budget: share of the wall time spent on updates while streaming
MODES = ("HASS", "plain")

CHAT_OUTPUTS = ("state", "chat", "message", "status", "stats", "tree", "mask", "depth", "speed", "time", "slider")
RACE_OUTPUTS = ("left_html", "right_html", "speed", "depth", "status")


# -- rendering --------------------------------------------------------------------------------------
def _esc(s: str) -> str:
    return html.escape(s, quote=False)


def answer_html(turn: Turn, highlight: bool = True) -> str:
    if not turn.steps:
        return '<div class="hs-out hs-wait">…</div>' if turn.running else '<div class="hs-out"></div>'
    key = (highlight, len(turn.texts))              # earlier answers do not change: render them once
    if turn.html and turn.html[0] == key:
        return turn.html[1]
    body = highlight_html(turn.steps, turn.texts, show=highlight)
    turn.html = (key, body)
    return body


def chat_html(session: Session, highlight: bool = True) -> str:
    """The whole conversation as HTML; the answers are coloured token spans."""
    if not session.turns:
        return ('<div class="hs-chat" id="hs-chat"><div class="hs-empty">Ask something, or pick an example '
                'below. Answers are coloured by where each token came from (see the legend).</div></div>')
    parts = ['<div class="hs-chat" id="hs-chat">']
    for i, t in enumerate(session.turns):
        parts.append(f'<div class="hs-msg hs-user"><div class="hs-role">you</div>'
                     f'<div class="hs-text">{_esc(t.user)}</div></div>')
        meta = t.mode + (f" · {_esc(t.draft)}" if t.mode == "HASS" and t.draft else "")
        if t.running:
            meta += " · streaming…"
        if t.note:
            meta += f" · {_esc(t.note)}"
        parts.append(f'<div class="hs-msg hs-bot" data-turn="{i}"><div class="hs-role">assistant · {meta}</div>'
                     f'{answer_html(t, highlight)}</div>')
    parts.append("</div>")
    return "".join(parts)


def stats_markdown(steps: list[Step], wall_s: float | None = None, label: str = "") -> str:
    if not steps:
        return "No answer yet."
    s = summarize(steps)
    total = s.seconds or 1e-9
    lines = [
        f"**{label or 'run'}**: {s.new_tokens} tokens in {s.target_forwards} target forwards",
        f"- τ (tokens per target forward of a speculative cycle, incl. bonus): **{s.tau:.2f}**"
        + ("" if s.cycles else " (no speculative cycles)"),
        f"- speed: **{s.tokens_per_s:.1f} tok/s** (decoder time {s.seconds:.2f} s"
        + (f", wall {wall_s:.2f} s)" if wall_s else ")"),
        f"- time split: draft {s.draft_s / total:.0%} · verify {s.verify_s / total:.0%} · "
        f"other {s.other_s / total:.0%}",
    ]
    if s.per_depth_acceptance:
        lines.append("- acceptance by depth: " + " · ".join(
            f"d{d} {a:.0%}" for d, a in enumerate(s.per_depth_acceptance, start=1)))
    if s.stop_reason:
        lines.append(f"- stop: {s.stop_reason}")
    return "\n".join(lines)


def step_figures(target, step: Step | None):
    """(tree figure, mask figure) of one step, with the token texts the figures need."""
    if step is None:
        return (empty_figure("no step yet", "Draft tree", uirevision="hass-tree"),
                empty_figure("no step yet", "Tree mask", uirevision="hass-mask"))
    if step.tree is None or step.kind != "speculative":
        return tree_figure(step, []), mask_figure(step, [])
    texts = target.token_text(step.tree.tokens)
    bonus = target.token_text([step.new_tokens[-1]])[0] if step.sources and step.sources[-1] == "bonus" else None
    choice = target.token_text(step.target_choice) if step.target_choice else None
    return tree_figure(step, texts, bonus, choice_texts=choice), mask_figure(step, texts)


def _last_tree_step(steps: list[Step]) -> Step | None:
    """The latest typical step: a real tree, not cut short by the end of the answer (the last
    step often is: the token budget or EOS), else the latest step with any tree."""
    for st in reversed(steps):
        if st.tree is not None and len(st.tree) > 1 and st.stop_reason is None:
            return st
    for st in reversed(steps):
        if st.tree is not None and len(st.tree) > 1:
            return st
    for st in reversed(steps):
        if st.tree is not None:
            return st
    return steps[-1] if steps else None


def live_figures(studio: Studio, session: Session, turn: Turn):
    steps = turn.steps
    tree, mask = step_figures(studio.target, _last_tree_step(steps))
    by_draft = session.steps_by_draft()       # one series per draft when the conversation used several
    series = by_draft if len(by_draft) > 1 else {"HASS (this conversation)": session.conversation_steps()}
    depth = depth_acceptance_figure(series, "Acceptance by depth · this conversation")
    speed = speedup_figure({turn.mode: steps}) if steps else empty_figure("no tokens yet", "Tokens over time",
                                                                           uirevision="hass-race")
    timing = time_split_figure(steps)
    return tree, mask, depth, speed, timing


def _slider(turn: Turn | None, final: bool):
    n = len(turn.steps) if turn else 0
    if not final or n == 0:
        return gr.update(interactive=False) if not final else gr.update(minimum=0, maximum=1, value=0,
                                                                          interactive=False)
    shown = _last_tree_step(turn.steps)
    value = turn.steps.index(shown) if shown is not None else n - 1
    return gr.update(minimum=0, maximum=max(n - 1, 1), value=value, step=1, interactive=n > 1,
                     label=f"Replay a step (0-{n - 1})")


def _warn(msg: str) -> str:
    try:
        gr.Warning(msg)
    except Exception:        # noqa: BLE001 - outside a request (tests)
        pass
    return f"⚠️ {msg}"


def _unchanged(session: Session, highlight: bool, status: str, message=gr.skip()):
    return (session, chat_html(session, highlight), message, status, gr.skip(), gr.skip(), gr.skip(), gr.skip(),
            gr.skip(), gr.skip(), gr.skip())


def _seed() -> int:
    """A fresh sampling seed per answer (so Regenerate at T > 0 gives another sample)."""
    return time.time_ns() % (2**31)


# -- chat -------------------------------------------------------------------------------------------
def send(studio: Studio, session: Session, message: str, mode: str, temperature, top_p, max_new_tokens,
         total_tokens, depth, top_k, highlight: bool = True):
    """Stream an answer to `message`. Yields CHAT_OUTPUTS tuples."""
    session = session if session is not None else Session()
    message = (message or "").strip()
    if not message:
        yield _unchanged(session, highlight, _warn("type a message first"))
        return
    if mode not in MODES:
        yield _unchanged(session, highlight, _warn(f"unknown mode {mode!r}: use HASS or plain"))
        return
    try:
        cfg = make_config(temperature, top_p, max_new_tokens, total_tokens, depth, top_k, seed=_seed(),
                          **session.tree_options())
        messages = session.history() + [{"role": "user", "content": message}]
        try:
            ids = studio.target.render(messages)
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc
        label = ""
        if mode == "HASS":
            _, label = studio.draft_for(session.draft_spec)
        gen = studio.generator(mode, ids, cfg, session.draft_spec)
    except SettingsError as exc:
        yield _unchanged(session, highlight, _warn(str(exc)))     # history untouched, message kept
        return
    turn = Turn(user=message, mode=mode, draft=label, running=True)
    session.turns.append(turn)
    yield from _stream(studio, session, turn, gen, highlight, clear_message=True)


class Throttle:
    """The streaming budget, half for text and half for figures: `text_ui` / `fig_ui` count
    the seconds spent on updates (building them, then waiting at `yield` while Gradio
    processes and sends them). A text update is due when TEXT_EVERY has passed and the text
    time is within UI_SHARE / 2 of the elapsed time; figures when FIGURE_EVERY has passed and
    also their last cost / (UI_SHARE / 2), so together updates stay near UI_SHARE."""

    def __init__(self, share: float | None = None, text_every: float | None = None,
                 figure_every: float | None = None):
        self.share = UI_SHARE if share is None else share
        self.text_every = TEXT_EVERY if text_every is None else text_every
        self.figure_every = FIGURE_EVERY if figure_every is None else figure_every
        self.t0 = time.perf_counter()
        self.text_ui = 0.0
        self.fig_ui = 0.0
        self.last_text = float("-inf")
        self.last_fig = self.t0            # the first figures after FIGURE_EVERY: text streams first
        self.fig_cost = 0.0

    def text_due(self, now: float) -> bool:
        return now - self.last_text >= self.text_every and self.text_ui <= self.share / 2 * (now - self.t0)

    def figures_due(self, now: float) -> bool:
        return now - self.last_fig >= max(self.figure_every, self.fig_cost / max(self.share / 2, 1e-9))

    def take(self, now: float) -> bool | None:
        """None when no update is due now; else the text update is taken (its clock starts
        again) and the answer says whether the figures come with it."""
        if not self.text_due(now):
            return None
        self.last_text = now
        return self.figures_due(now)

    def spent(self, start: float, end: float, figures: bool) -> None:
        if figures:
            self.fig_ui += end - start
            self.last_fig, self.fig_cost = end, end - start
        else:
            self.text_ui += end - start


def _stream(studio: Studio, session: Session, turn: Turn, gen, highlight: bool, clear_message: bool = False):
    texts = TokenTexts(studio.target)
    run = studio.start(session, [(turn.mode, gen)])
    t0 = time.perf_counter()
    th = Throttle()
    pending = False
    status = f"generating ({turn.mode}{' · ' + turn.draft if turn.draft else ''})…"
    try:
        yield (session, chat_html(session, highlight), "" if clear_message else gr.skip(), status,
               gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), _slider(turn, False))
        th.spent(t0, time.perf_counter(), False)
        while not run.finished:
            got = run.drain(0.05)
            for _, st in got:
                turn.steps.append(st)
                turn.ids.extend(st.new_tokens)
                turn.texts.extend(texts.push(st.new_tokens))
            turn.answer = texts.text
            turn.wall_s = time.perf_counter() - t0
            pending = pending or bool(got)
            now = time.perf_counter()
            with_figs = th.take(now) if pending else None
            if with_figs is None:
                continue
            pending = False
            if with_figs:
                figs = live_figures(studio, session, turn)
                stats = stats_markdown(turn.steps, turn.wall_s, turn.mode)
                out = (session, chat_html(session, highlight), gr.skip(), status, stats, *figs, gr.skip())
            else:
                out = (session, chat_html(session, highlight), gr.skip(), status, gr.skip(), gr.skip(), gr.skip(),
                       gr.skip(), gr.skip(), gr.skip(), gr.skip())
            yield out
            th.spent(now, time.perf_counter(), with_figs)
        run.wait(5)
        turn.answer = studio.target.decode(turn.ids)
        turn.wall_s = time.perf_counter() - t0
        turn.running = False
        if run.error is not None:
            turn.note = f"error: {run.error}"
            status = _warn(f"decoding failed: {run.error}")
        elif run.stop.is_set() and not (turn.steps and turn.steps[-1].stop_reason):
            turn.note = "stopped"
            status = "stopped: the partial answer stays in the conversation"
        else:
            reason = turn.steps[-1].stop_reason if turn.steps else None
            status = f"done ({reason})"
    finally:
        if turn.running:                     # closed early: Stop, or the browser went away
            run.stop.set()
            turn.running = False
            turn.note = turn.note or "stopped"
            turn.answer = studio.target.decode(turn.ids)
        studio.finish(session, run)
    figs = live_figures(studio, session, turn)
    yield (session, chat_html(session, highlight), gr.skip(), status, stats_markdown(turn.steps, turn.wall_s, turn.mode),
           *figs, _slider(turn, True))


def stop(studio: Studio, session: Session, highlight: bool = True):
    """Stop button: end this session's decoding; the partial answer and the history stay."""
    session = session if session is not None else Session()
    stopped = studio.stop(session)
    turn = session.last
    if turn is not None and turn.running:
        turn.running = False
        turn.note = "stopped"
        turn.answer = studio.target.decode(turn.ids)
    status = "stopped: the partial answer stays in the conversation" if stopped else "nothing is running"
    figs = live_figures(studio, session, turn) if turn is not None else (gr.skip(),) * 5
    return (session, chat_html(session, highlight), gr.skip(), status,
            stats_markdown(turn.steps, turn.wall_s, turn.mode) if turn else gr.skip(), *figs, _slider(turn, True))


def regenerate(studio: Studio, session: Session, mode: str, temperature, top_p, max_new_tokens, total_tokens,
               depth, top_k, highlight: bool = True):
    """Answer the last message again (the previous answer is dropped)."""
    session = session if session is not None else Session()
    if not session.turns:
        yield _unchanged(session, highlight, _warn("nothing to regenerate yet"))
        return
    if session.turns[-1].running:
        yield _unchanged(session, highlight, _warn("an answer is still streaming: stop it first"))
        return
    n = len(session.turns)
    last = session.turns.pop()
    first = True
    for out in send(studio, session, last.user, mode, temperature, top_p, max_new_tokens, total_tokens, depth,
                    top_k, highlight):
        if first and len(session.turns) < n:        # refused (bad settings): keep the old answer
            session.turns.append(last)
            out = (session, chat_html(session, highlight), *out[2:])
        first = False
        yield out


def clear(session: Session, highlight: bool = True):
    session = session if session is not None else Session()
    session.turns = []
    tree, mask = step_figures(None, None)
    return (session, chat_html(session, highlight), "", "cleared", "No answer yet.", tree, mask,
            depth_acceptance_figure({}, "Acceptance by depth · this conversation"),
            empty_figure("no tokens yet", "Tokens over time", uirevision="hass-race"), time_split_figure([]),
            _slider(None, True))


def rehighlight(session: Session, highlight: bool):
    return chat_html(session or Session(), highlight)


def replay(studio: Studio, session: Session, index):
    """Step slider: the tree and mask of any step of the last answer."""
    turn = session.last if session else None
    if turn is None or not turn.steps:
        tree, mask = step_figures(None, None)
        return tree, mask, "no answer to replay yet"
    try:
        i = int(index)
    except (TypeError, ValueError):
        i = len(turn.steps) - 1
    i = max(0, min(i, len(turn.steps) - 1))
    st = turn.steps[i]
    tree, mask = step_figures(studio.target, st)
    what = (f"step {i}: {st.kind}, {len(st.new_tokens)} new token(s)"
            + (f", {st.accepted} accepted from a {len(st.tree)}-node tree" if st.tree else ""))
    return tree, mask, what


def set_draft(studio: Studio, session: Session, choice: str, path: str = ""):
    """Draft dropdown / path: load it for this session (a failure keeps the previous one)."""
    session = session if session is not None else Session()
    try:
        spec = studio.draft_spec_for(choice, path)
        _, label = studio.draft_for(spec)
    except SettingsError as exc:
        return session, _warn(str(exc))
    session.draft_spec, session.draft_label = spec, label
    extra = " (a random draft: output is still exact, but few tokens are accepted)" if label == "random" else ""
    return session, f"draft: **{label}**{extra}"


def load_model(studio: Studio, spec: str):
    """Load another target for the whole studio; a failure keeps the previous one."""
    try:
        msg = studio.load_model(spec)
    except SettingsError as exc:
        return _warn(str(exc)), gr.skip(), gr.skip(), gr.skip()
    t = studio.tree_defaults
    return msg, t.total_tokens, t.depth, t.top_k


# -- prompts for race / check -----------------------------------------------------------------------
def _prompt_messages(session: Session, prompt: str) -> list[dict]:
    prompt = (prompt or "").strip()
    if prompt:
        return [{"role": "user", "content": prompt}]
    if session is not None:
        for t in reversed(session.turns):
            return [{"role": "user", "content": t.user}]
    raise SettingsError("type a prompt (or send one in the chat first)")


def check_lossless(studio: Studio, session: Session, prompt: str, max_new_tokens, total_tokens, depth, top_k):
    """Greedy plain and HASS on the same prompt: are the token ids identical? -> markdown."""
    session = session if session is not None else Session()
    try:
        messages = (session.history() + [{"role": "user", "content": prompt.strip()}]) if (prompt or "").strip() \
            else _prompt_messages(session, prompt)
        cfg = make_config(0, 1, max_new_tokens, total_tokens, depth, top_k, **_options(session))
        try:
            ids = studio.target.render(messages)
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc
        jobs = [("plain", studio.generator("plain", ids, cfg)),
                ("HASS", studio.generator("HASS", ids, cfg, session.draft_spec))]
    except SettingsError as exc:
        return _warn(str(exc))
    run = studio.start(session, jobs)
    try:
        got = collect(run)
    except Exception as exc:       # noqa: BLE001
        return _warn(f"check failed: {exc}")
    finally:
        studio.finish(session, run)
    if run.stop.is_set() and len(got) < 2:
        return "stopped before both runs finished"
    a = [t for s in got.get("plain", []) for t in s.new_tokens]
    b = [t for s in got.get("HASS", []) for t in s.new_tokens]
    tau = summarize(got.get("HASS", [])).tau
    if a == b:
        return (f"✔ **identical**: plain and HASS greedy produced the same {len(a)} token ids "
                f"(HASS used {len(got.get('HASS', []))} target forwards instead of {len(a)}, τ {tau:.2f})")
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"✘ **different** from token {k}: plain {a[k:k + 5]} vs HASS {b[k:k + 5]} "
            f"({len(a)} vs {len(b)} tokens). This is a bug: please report it.")


# -- race and A/B -----------------------------------------------------------------------------------
AB_CHOICES = ("shipped EAGLE-2", "trained in this app", "the chat's draft")


def _side_html(steps: list[Step], texts: list[str], title: str, highlight: bool = True, done: bool = False) -> str:
    s = summarize(steps) if steps else None
    head = f"<div class='hs-role'>{_esc(title)}" + (
        f" · {s.new_tokens} tokens · {s.tokens_per_s:.1f} tok/s · τ {s.tau:.2f}" if s else "") + (
        " · done" if done and s else "") + "</div>"
    body = highlight_html(steps, texts, show=highlight) if steps else "<div class='hs-out hs-wait'>waiting…</div>"
    return f"<div class='hs-side'>{head}{body}</div>"


def race_verdict(races: dict[str, list[Step]]) -> str:
    """The race's result in words: the second series against the first (plain, or draft A),
    as total-time ratio when both produced the same new tokens (each series timed by its own
    step clocks), else as the ratio of tokens per second, said so."""
    (a, sa), (b, sb) = list(races.items())[:2]
    x, y = summarize(sa), summarize(sb)
    if not x.new_tokens or not y.new_tokens or x.seconds <= 0 or y.seconds <= 0:
        return "no result: a side produced no tokens"
    same = [t for st in sa for t in st.new_tokens] == [t for st in sb for t in st.new_tokens]
    r = speedup(x.new_tokens, x.seconds, y.new_tokens, y.seconds)      # the bench's definition
    if x.new_tokens == y.new_tokens:
        how = (f"{a} {x.seconds:.2f} s vs {b} {y.seconds:.2f} s for the same {x.new_tokens} new tokens "
               "(identical token ids)" if same else
               f"{a} {x.seconds:.2f} s vs {b} {y.seconds:.2f} s for {x.new_tokens} new tokens each")
    else:
        how = (f"different lengths ({x.new_tokens} vs {y.new_tokens} tokens), so the ratio of tokens/s: "
               f"{y.tokens_per_s:.1f} vs {x.tokens_per_s:.1f}")
    if r >= 1:
        head = f"{b}: {r:.2f}× faster than {a}"
    else:
        head = f"{b}: {r:.2f}×, slower than {a} ({a} is {1 / r:.2f}× faster)"
    return f"**{_esc(head)}** · {_esc(how)}"


def _race_stream(studio: Studio, session: Session, warmup, racers, highlight: bool, depth_title: str):
    """Stream a race: `warmup` jobs first (not shown), then the two `racers` (title, generator)
    interleaved by DecodeRun. Yields RACE_OUTPUTS tuples."""
    names = [n for n, _ in racers]
    steps: dict[str, list[Step]] = {n: [] for n in names}
    texts: dict[str, list[str]] = {n: [] for n in names}
    decoders = {n: TokenTexts(studio.target) for n in names}
    finished: set[str] = set()
    run = studio.start(session, warmup, race=racers)
    th = Throttle()
    pending = False
    yield (_side_html([], [], names[0]), _side_html([], [], names[1]), gr.skip(), gr.skip(),
           "warming up…" if warmup else "racing…")
    th.spent(th.t0, time.perf_counter(), False)
    try:
        while not run.finished:
            got = run.drain(0.1)
            for name, st in got:
                if name not in steps:           # warm-up
                    continue
                steps[name].append(st)
                texts[name].extend(decoders[name].push(st.new_tokens))
                pending = True
                if st.stop_reason:
                    finished.add(name)
            now = time.perf_counter()
            with_figs = th.take(now) if pending else None
            if with_figs is None:
                continue
            pending = False
            figs = ((speedup_figure(steps), depth_acceptance_figure(steps, depth_title)) if with_figs
                    else (gr.skip(), gr.skip()))
            status = "racing (interleaved step by step): " + " · ".join(
                f"{n} {sum(len(s.new_tokens) for s in steps[n])} tokens" + (" (done)" if n in finished else "")
                for n in names)
            yield (*(_side_html(steps[n], texts[n], n, highlight, n in finished) for n in names), *figs, status)
            th.spent(now, time.perf_counter(), with_figs)
        run.wait(5)
    finally:
        studio.finish(session, run)
    if run.error is not None:
        status = _warn(f"failed: {run.error}")
    elif run.stop.is_set() and len(finished) < len(names):
        status = "stopped before both sides finished"
    else:
        status = race_verdict(steps)
        status += "  \n" + "  \n".join(stats_markdown(v, None, k).split("\n")[0] + f" · τ {summarize(v).tau:.2f}"
                                        for k, v in steps.items())
    yield (*(_side_html(steps[n], texts[n], n, highlight, n in finished) for n in names),
           speedup_figure(steps), depth_acceptance_figure(steps, depth_title), status)


def set_tree_rule(session: Session, rule: str) -> Session:
    """Settings: "fitted" (the size chosen per step for this machine) or "fixed"."""
    session.tree_rule = "fixed" if rule == "fixed" else "fitted"
    return session


def set_lookup(session: Session, on: bool) -> Session:
    session.lookup = bool(on)
    return session


def _options(session: Session | None) -> dict:
    return (session or Session()).tree_options()


def _warmup_jobs(studio: Studio, ids: list[int], specs: list[tuple[str, str]], warmup: int, cfg) -> list:
    """Short runs with the race's own settings (budget `warmup`) before it is timed."""
    if not warmup:
        return []
    wcfg = dataclasses.replace(cfg, max_new_tokens=int(warmup))
    return [(f"warmup-{i}", studio.generator(mode, ids, wcfg, spec)) for i, (mode, spec) in enumerate(specs)]


def race(studio: Studio, session: Session, prompt: str, temperature, top_p, max_new_tokens, total_tokens, depth,
         top_k, highlight: bool = True, warmup: int = 8):
    """Plain and HASS on the same prompt, interleaved step by step (after a short warm-up of
    both), streaming side by side, with the measured speedup. Yields RACE_OUTPUTS tuples."""
    session = session if session is not None else Session()
    try:
        messages = _prompt_messages(session, prompt)
        cfg = make_config(temperature, top_p, max_new_tokens, total_tokens, depth, top_k, **_options(session))
        ids = studio.target.render(messages)
        label = studio.draft_for(session.draft_spec)[1]
        jobs = _warmup_jobs(studio, ids, [("plain", ""), ("HASS", session.draft_spec)], warmup, cfg)
        racers = [("plain", studio.generator("plain", ids, cfg)),
                  (f"HASS ({label})", studio.generator("HASS", ids, cfg, session.draft_spec))]
    except (SettingsError, ValueError) as exc:
        yield (gr.skip(), gr.skip(), gr.skip(), gr.skip(), _warn(str(exc)))
        return
    yield from _race_stream(studio, session, jobs, racers, highlight, "Acceptance by depth")


def _ab_other(studio: Studio, session: Session, other: str) -> tuple[str, str]:
    """(spec, series title) of draft B."""
    if other in (None, "", "shipped EAGLE-2"):
        if studio.shipped("eagle2") is None:
            raise SettingsError(f"there is no shipped EAGLE-2 draft for {studio.target.name} (it appears in "
                                "assets/drafts/ once trained); compare with a draft trained in this app instead")
        return "eagle2", "EAGLE-2 draft (shipped)"
    if other == "trained in this app":
        spec = studio.draft_spec_for("trained in this app")
        return spec, f"trained here ({Path(spec).name})"
    if other == "the chat's draft":
        spec = session.draft_spec or "default"
        label = studio.draft_for(spec)[1]
        shipped_hass = studio.shipped("hass")
        if spec in ("hass", "default") or (shipped_hass is not None and label == shipped_hass.name):
            raise SettingsError("the chat uses the shipped HASS draft itself: pick another draft in the chat's "
                                "settings, or compare with the shipped EAGLE-2 draft")
        return spec, f"chat's draft ({label})"
    raise SettingsError(f"unknown A/B choice {other!r}: use one of {', '.join(AB_CHOICES)}")


def ab(studio: Studio, session: Session, prompt: str, temperature, top_p, max_new_tokens, total_tokens, depth,
       top_k, highlight: bool = True, other: str = "shipped EAGLE-2", warmup: int = 8):
    """The shipped HASS draft (A) against another draft (B: the shipped EAGLE-2 draft, the one
    trained in this app, or the chat's draft) on the same prompt, interleaved step by step:
    per-depth acceptance compared, one series per draft. Yields RACE_OUTPUTS tuples."""
    session = session if session is not None else Session()
    try:
        if studio.shipped("hass") is None:
            raise SettingsError(f"A/B compares against the shipped HASS draft, and none ships for "
                                f"{studio.target.name} yet (it appears in assets/drafts/ once trained). Use the "
                                "race against plain decoding meanwhile.")
        spec_b, name_b = _ab_other(studio, session, other)
        messages = _prompt_messages(session, prompt)
        cfg = make_config(temperature, top_p, max_new_tokens, total_tokens, depth, top_k, **_options(session))
        ids = studio.target.render(messages)
        jobs = _warmup_jobs(studio, ids, [("HASS", "hass"), ("HASS", spec_b)], warmup, cfg)
        racers = [("HASS draft (shipped)", studio.generator("HASS", ids, cfg, "hass")),
                  (name_b, studio.generator("HASS", ids, cfg, spec_b))]
    except (SettingsError, ValueError) as exc:
        yield (gr.skip(), gr.skip(), gr.skip(), gr.skip(), _warn(str(exc)))
        return
    yield from _race_stream(studio, session, jobs, racers, highlight,
                            f"Acceptance by depth · {racers[0][0]} vs {name_b}")


__all__ = ["send", "stop", "regenerate", "clear", "replay", "rehighlight", "set_draft", "load_model", "race", "ab",
           "check_lossless", "chat_html", "stats_markdown", "step_figures", "race_verdict", "CHAT_OUTPUTS",
           "RACE_OUTPUTS", "MODES", "AB_CHOICES", "Throttle"]
