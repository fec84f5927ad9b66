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

Every visitor always sees where their request is: Send first runs `submit` outside the
decoding queue (the message appears at once, saying what it waits for), then `answer` in
the queue (one decode at a time for everyone); a message sent while the tab's previous
answer streams waits behind it, visibly. Race and A/B likewise: `race_submit` says at once
that the race is queued, or refuses (a race of this tab is still running) and says why.
"""
from __future__ import annotations

import dataclasses
import html
import json
import time
from pathlib import Path

import gradio as gr

from hass.events import Step, speedup, summarize
from visual import (depth_acceptance_figure, highlight_html, mask_figure, pass_accuracy_figure, speed_words,
                    speedup_figure, time_split_figure, tree_figure)
from visual.cost import CostStory, cost_figure, cost_story, relative_curve, verdict
from visual.theme import empty_figure

from .markdown import markdown_html
from .studio import Session, SettingsError, Studio, TokenTexts, Turn, collect, make_config

FIGURE_EVERY = 1.0          # at least this many seconds between figure redraws while streaming
TEXT_EVERY = 0.1            # at least this many seconds between text updates while streaming
UI_SHARE = 0.06             # the UI's budget: share of the wall time spent on updates while streaming
PHASE_EVERY = 1.0           # seconds between "reading your message…" updates before the first token
PHASE_AFTER = 0.8           # ...shown only when the first token takes longer than this
LONG_CHARS = 600            # a user message longer than this (or LONG_LINES lines) is shown collapsed
LONG_LINES = 10
MODES = ("HASS", "plain")

CHAT_OUTPUTS = ("state", "chat", "message", "status", "stats", "tree", "mask", "depth", "speed", "time", "slider",
                "replay", "cost", "cost_text")
SUBMIT_OUTPUTS = ("state", "chat", "message", "status", "replay")
RACE_OUTPUTS = ("left_html", "right_html", "speed", "depth", "status")


# -- rendering --------------------------------------------------------------------------------------
def _esc(s: str) -> str:
    return html.escape(s, quote=False)


def user_html(text: str) -> str:
    """A user message; a long one (a pasted document) collapsed to its first lines, the whole
    text one click away."""
    lines = text.splitlines()
    if len(text) <= LONG_CHARS and len(lines) <= LONG_LINES:
        return f'<div class="hs-text">{_esc(text)}</div>'
    head = "\n".join(lines[:3])
    head = (head[:280].rstrip() if len(head) > 280 else head.rstrip()) + "…"
    return (f'<details class="hs-long"><summary><div class="hs-text hs-head">{_esc(head)}</div>'
            f'<span class="hs-more">a long message: {len(text):,} characters, {len(lines):,} lines · show all'
            f'</span></summary><div class="hs-text">{_esc(text)}</div></details>')


def answer_html(turn: Turn, highlight: bool = True) -> str:
    """The answer: tokens coloured by source (fenced code keeps its layout), or with colouring
    off the text rendered as Markdown."""
    if turn.pending:
        return f'<div class="hs-out hs-wait">{_esc(turn.wait or "waiting for its turn…")}</div>'
    if not turn.steps:
        return (f'<div class="hs-out hs-wait">{_esc(turn.phase or "…")}</div>' if turn.running
                else '<div class="hs-out"></div>')
    key = (highlight, len(turn.texts))              # earlier answers do not change: render them once
    if turn.html and turn.html[0] == key:
        return turn.html[1]
    if highlight:
        body = highlight_html(turn.steps, turn.texts, show=True, code_blocks=True)
    else:
        body = markdown_html("".join(turn.texts))
    turn.html = (key, body)
    return body


def chat_html(session: Session, highlight: bool = True) -> str:
    """The whole conversation as HTML; the answers are coloured token spans (or Markdown)."""
    if not session.turns:
        return ('<div class="hs-chat" id="hs-chat"><div class="hs-empty">Ask something, or pick an example '
                'below. Answers are coloured by where each token came from (see the legend).</div></div>')
    parts = ['<div class="hs-chat" id="hs-chat">']
    for i, t in enumerate(session.turns):
        parts.append(f'<div class="hs-msg hs-user"><div class="hs-role">you</div>{user_html(t.user)}</div>')
        if t.pending:
            meta = "waiting"
        else:
            meta = t.mode + (f" · {_esc(t.draft)}" if t.mode == "HASS" and t.draft else "")
        if t.running:
            meta += " · streaming…"
        if t.note:
            meta += f" · {_esc(t.note)}"
        state = " hs-pending" if t.pending else ""
        parts.append(f'<div class="hs-msg hs-bot{state}" data-turn="{i}"><div class="hs-role">assistant · {meta}'
                     f'</div>{answer_html(t, highlight)}</div>')
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


def step_caption(turn: Turn, i: int, shown: bool = False) -> str:
    """What the tree panel shows, naming the answer it belongs to."""
    st = turn.steps[i]
    what = (f"step {i}: {st.kind}, {len(st.new_tokens)} new token(s)"
            + (f", {st.accepted} accepted from a {len(st.tree)}-node tree" if st.tree else ""))
    head = f"**{turn.mode}" + (f" · {turn.draft}" if turn.mode == "HASS" and turn.draft else "") + "**, "
    tail = " (the latest full tree; move the slider to replay another step)" if shown else ""
    return head + what + tail


def _final_caption(turn: Turn) -> str:
    shown = _last_tree_step(turn.steps)
    return step_caption(turn, turn.steps.index(shown), shown=True) if shown is not None else ""


def _warn(msg: str) -> str:
    try:
        gr.Warning(msg)
    except Exception:        # noqa: BLE001 - outside a request (tests)
        pass
    return f"⚠️ {msg}"


def _unchanged(session: Session, highlight: bool, status: str, message=gr.skip()):
    return (session, chat_html(session, highlight), message, status) + (gr.skip(),) * (len(CHAT_OUTPUTS) - 4)


def _seed() -> int:
    """A fresh sampling seed per answer (so Regenerate at T > 0 gives another sample)."""
    return time.time_ns() % (2**31)


# -- the cost panel ---------------------------------------------------------------------------------
def _curve_words(curve: dict[int, float]) -> str:
    rel = relative_curve(curve)
    pts = [n for n in (4, 16, 32, 64) if n in rel] or [n for n in rel if n > 1][:3]
    return ", ".join(f"c({n}) = {rel[n]:.2f}" for n in pts)


def _why(story: CostStory, ratio: float | None) -> str:
    """When it came out slower than plain: what would change that, in a sentence."""
    if ratio is None or not story.steps or ratio >= 1:
        return ""
    return (f" **Why slower:** τ {story.tau:.2f} is below the {story.needed_tau:.2f} plain steps that checking and "
            "drafting cost on this machine. **What would change it:** a draft that guesses more tokens per step (a "
            "higher τ: a better-trained draft, or text it predicts well such as code or copied passages), or "
            "hardware on which checking many tokens costs about as much as one (c(N) near 1), where the same τ "
            "wins.")


def cost_panel(studio: Studio, session: Session):
    """(figure, markdown) of the Cost tab: this machine's cost of checking a draft tree against
    what the conversation's latest HASS answer yielded per step (`visual.cost.cost_story`)."""
    curve = studio.cost_curve()
    if not curve:
        return (cost_figure(cost_story({}, [])), "This machine's verify cost curve is not measured yet, so the "
                "speed cannot be explained (the studio measures it at start-up; see the log).")
    found = session.last_hass_turn() if session is not None else None
    plain = session.plain_step_s() if session is not None else None
    if found is None:
        story = cost_story(curve, [])
        return (cost_figure(story), "Checking N draft tokens in one target forward costs c(N) plain decoding steps "
                f"on this machine ({_curve_words(curve)}), plus the drafting. A HASS answer is faster than plain "
                "exactly when its τ (tokens per step) is above that line; send a message in HASS mode to see where "
                "it lands.")
    i, turn = found
    story = cost_story(curve, turn.steps, plain_step_s=plain)
    head = f"**Answer {i + 1}** (HASS · {_esc(turn.draft or 'draft')}): "
    if not story.steps:
        return cost_figure(story, f"Answer {i + 1}: no speculative steps"), head + story.sentence
    if plain is not None:
        src = (f" The plain step ({plain * 1e3:.1f} ms) is this conversation's latest plain-mode answer's "
               "(the prefill left out).")
    else:
        src = (" No plain answer to compare with yet: the plain step is estimated from this answer's verify times "
               "and the curve (switch Mode to plain, or use the Race tab, for a measured speedup).")
    ratio = story.measured_speedup if story.measured_speedup is not None else story.predicted_speedup
    return cost_figure(story), head + story.sentence + src + _why(story, ratio)


# -- chat -------------------------------------------------------------------------------------------
def _queue_words(studio: Studio, session: Session) -> str:
    """What a message sent now waits for (before it is added)."""
    if session.busy:
        return "queued: it is answered when your previous message's answer is done"
    if session.race_state:
        return "queued: it is answered when your race is done"
    if studio.others_busy(session):
        return ("waiting for another visitor's answer: the studio writes one answer at a time, and yours starts "
                "as soon as it is done")
    return "starting…"


def _submit_out(session: Session, highlight: bool, message, status: str, replay=gr.skip()):
    return (session, chat_html(session, highlight), message, status, replay)


def _check_settings(mode, temperature, top_p, max_new_tokens, total_tokens, depth, top_k, session: Session):
    if mode not in MODES:
        raise SettingsError(f"unknown mode {mode!r}: use HASS or plain")
    return make_config(temperature, top_p, max_new_tokens, total_tokens, depth, top_k, seed=_seed(),
                       **session.tree_options())


def submit(studio: Studio, session: Session, message: str, mode: str, temperature, top_p, max_new_tokens,
           total_tokens, depth, top_k, highlight: bool = True):
    """Send, first part (runs at once, outside the decoding queue): the message joins the
    conversation as a pending turn that says what it waits for, the box empties, and
    `answer` (queued behind every other decode) answers it. A message sent while this tab's
    previous answer still streams waits behind it. Returns SUBMIT_OUTPUTS."""
    session = session if session is not None else Session()
    message = (message or "").strip()
    if not message:
        return _submit_out(session, highlight, gr.skip(), _warn("type a message first"))
    try:
        _check_settings(mode, temperature, top_p, max_new_tokens, total_tokens, depth, top_k, session)
    except SettingsError as exc:
        return _submit_out(session, highlight, gr.skip(), _warn(str(exc)))     # history untouched, message kept
    words = _queue_words(studio, session)
    session.turns.append(Turn(user=message, mode=mode, pending=True, wait=words, sent=time.time()))
    return _submit_out(session, highlight, "", words if words != "starting…" else "sent: starting…", "")


def regenerate_submit(studio: Studio, session: Session, mode: str, temperature, top_p, max_new_tokens,
                      total_tokens, depth, top_k, highlight: bool = True):
    """Regenerate, first part: the last message becomes pending again (its answer is kept
    aside until the new one starts); the text being typed in the box is left alone."""
    session = session if session is not None else Session()
    if not session.turns:
        return _submit_out(session, highlight, gr.skip(), _warn("nothing to regenerate yet"))
    if session.busy:
        return _submit_out(session, highlight, gr.skip(), _warn(
            "an answer is still streaming or waiting: wait for it or press Stop, then Regenerate"))
    try:
        _check_settings(mode, temperature, top_p, max_new_tokens, total_tokens, depth, top_k, session)
    except SettingsError as exc:
        return _submit_out(session, highlight, gr.skip(), _warn(str(exc)))     # the old answer stays
    words = _queue_words(studio, session)
    old = session.turns.pop()
    session.turns.append(Turn(user=old.user, mode=mode, pending=True, wait=words, sent=time.time(), replaces=old))
    return _submit_out(session, highlight, gr.skip(), words if words != "starting…" else "regenerating…", "")


def _drop_pending(session: Session, turn: Turn) -> bool:
    """Take a pending turn out of the conversation (a Regenerate puts the old answer back).
    True when it was a new message (its text can go back into the box)."""
    if turn not in session.turns:
        return False
    i = session.turns.index(turn)
    session.turns.pop(i)
    if turn.replaces is not None:
        session.turns.insert(i, turn.replaces)
        return False
    return True


def answer(studio: Studio, session: Session, mode: str, temperature, top_p, max_new_tokens, total_tokens, depth,
           top_k, highlight: bool = True, typed: str = ""):
    """Send, second part (in the decoding queue, one decode at a time for everyone): stream
    the answer to this tab's oldest pending message; nothing to do when there is none (a
    Stop took it back). Yields CHAT_OUTPUTS tuples. `typed`: the message box now, so a
    message that cannot be answered goes back into an empty box and never over new text."""
    session = session if session is not None else Session()
    i = session.next_pending()
    if i is None:
        yield (session,) + (gr.skip(),) * (len(CHAT_OUTPUTS) - 1)
        return
    turn = session.turns[i]
    try:
        cfg = _check_settings(mode, temperature, top_p, max_new_tokens, total_tokens, depth, top_k, session)
        messages = session.history(upto=i) + [{"role": "user", "content": turn.user}]
        try:
            ids = studio.target.render(messages)
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc
        label = ""
        if mode == "HASS":
            _, label = studio.draft_for(session.draft_spec)
        gen = studio.generator(mode, ids, cfg, session.draft_spec)
    except SettingsError as exc:
        back = _drop_pending(session, turn) and not (typed or "").strip()
        status = _warn(str(exc) + ("; your message is back in the box" if back else ""))
        yield _unchanged(session, highlight, status, turn.user if back else gr.skip())
        return
    turn.pending, turn.running, turn.replaces = False, True, None
    turn.mode, turn.draft, turn.prompt_tokens, turn.wait = mode, label, len(ids), ""
    yield from _stream(studio, session, turn, gen, highlight)


def send(studio: Studio, session: Session, message: str, mode: str, temperature, top_p, max_new_tokens,
         total_tokens, depth, top_k, highlight: bool = True):
    """Stream an answer to `message` (submit, then answer, as one generator: the tests', the
    API's and `app.speedcheck`'s way in). Yields CHAT_OUTPUTS tuples."""
    session = session if session is not None else Session()
    n = len(session.turns)
    out = submit(studio, session, message, mode, temperature, top_p, max_new_tokens, total_tokens, depth, top_k,
                 highlight)
    if len(session.turns) == n:                      # refused: say why, once
        yield out[:4] + (gr.skip(),) * (len(CHAT_OUTPUTS) - 4)
        return
    yield from answer(studio, session, mode, temperature, top_p, max_new_tokens, total_tokens, depth, top_k,
                      highlight)


def regenerate(studio: Studio, session: Session, mode: str, temperature, top_p, max_new_tokens, total_tokens,
               depth, top_k, highlight: bool = True):
    """Answer the last message again (the previous answer is dropped once the new one starts;
    kept when the settings are refused)."""
    session = session if session is not None else Session()
    out = regenerate_submit(studio, session, mode, temperature, top_p, max_new_tokens, total_tokens, depth, top_k,
                            highlight)
    if session.next_pending() is None:
        yield out[:4] + (gr.skip(),) * (len(CHAT_OUTPUTS) - 4)
        return
    yield from answer(studio, session, mode, temperature, top_p, max_new_tokens, total_tokens, depth, top_k,
                      highlight)


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


def prefill_words(studio: Studio, session: Session, turn: Turn, elapsed: float) -> str:
    """'reading your 5,123-token message… 12 s of about 40 s' while the target reads the prompt."""
    first = session.turns and session.turns[0] is turn
    what = (f"your {turn.prompt_tokens:,}-token message" if first
            else f"the conversation ({turn.prompt_tokens:,} tokens)")
    est = studio.prefill_estimate(turn.prompt_tokens)
    tail = f"{elapsed:.0f} s" + (f" of about {est:.0f} s" if est and est > elapsed else "")
    return f"reading {what} before the first token (prefill)… {tail}"


def _stream(studio: Studio, session: Session, turn: Turn, gen, highlight: bool):
    texts = TokenTexts(studio.target)
    run = studio.start(session, [(turn.mode, gen)])
    t0 = time.perf_counter()
    th = Throttle()
    pending = False
    waited = time.time() - turn.sent if turn.sent else 0.0
    status = (f"generating ({turn.mode}{' · ' + turn.draft if turn.draft else ''})…"
              + (f" after {waited:.0f} s in the queue" if waited >= 2 else ""))
    skip = gr.skip()
    last_phase = t0
    try:
        yield (session, chat_html(session, highlight), skip, status, skip, skip, skip, skip, skip, skip,
               _slider(turn, False), "", skip, skip)
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
            if not turn.steps:                      # the prefill: say what takes the time
                if now - t0 >= PHASE_AFTER and now - last_phase >= PHASE_EVERY:
                    last_phase = now
                    turn.phase = prefill_words(studio, session, turn, now - t0)
                    yield (session, chat_html(session, highlight), skip, turn.phase) + (skip,) * 10
                continue
            with_figs = th.take(now) if pending else None
            if with_figs is None:
                continue
            pending = False
            if with_figs:
                figs = live_figures(studio, session, turn)
                stats = stats_markdown(turn.steps, turn.wall_s, turn.mode)
                out = (session, chat_html(session, highlight), skip, status, stats, *figs, skip, skip, skip, skip)
            else:
                out = (session, chat_html(session, highlight), skip, status) + (skip,) * 10
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
        turn.phase = ""
        studio.finish(session, run)
    pre = next((st for st in turn.steps if st.kind == "prefill"), None)
    if pre is not None:
        studio.note_prefill(turn.prompt_tokens, pre.seconds)
    if session.next_pending() is not None:
        status += " · your next message is queued"
    figs = live_figures(studio, session, turn)
    yield (session, chat_html(session, highlight), skip, status, stats_markdown(turn.steps, turn.wall_s, turn.mode),
           *figs, _slider(turn, True), _final_caption(turn) if turn.steps else "", *cost_panel(studio, session))


def stop(studio: Studio, session: Session, highlight: bool = True, typed: str = ""):
    """Stop button: end this session's decoding; the partial answer and the history stay.
    Messages still waiting are taken back (into the box when it is empty)."""
    session = session if session is not None else Session()
    stopped = studio.stop(session)
    turn = next((t for t in session.turns if t.running), None)
    if turn is not None:
        turn.running = False
        turn.note = "stopped"
        turn.answer = studio.target.decode(turn.ids)
    waiting = [t for t in session.turns if t.pending]
    back = [t.user for t in waiting if _drop_pending(session, t)]
    status = "stopped: the partial answer stays in the conversation" if stopped else "nothing is running"
    message = gr.skip()
    if back:
        if not (typed or "").strip():
            message = "\n\n".join(back)
            status += f" · {len(back)} waiting message(s) not sent: back in the box"
        else:
            status += f" · {len(back)} waiting message(s) not sent"
    turn = turn or session.last
    figs = live_figures(studio, session, turn) if turn is not None else (gr.skip(),) * 5
    return (session, chat_html(session, highlight), message, status,
            stats_markdown(turn.steps, turn.wall_s, turn.mode) if turn else gr.skip(), *figs, _slider(turn, True),
            _final_caption(turn) if turn and turn.steps else "", *cost_panel(studio, session))


def clear(session: Session, highlight: bool = True, studio: Studio | None = None):
    session = session if session is not None else Session()
    if studio is not None:
        studio.stop(session)
    session.turns = []
    tree, mask = step_figures(None, None)
    cost = cost_panel(studio, session) if studio is not None else (gr.skip(), gr.skip())
    return (session, chat_html(session, highlight), "", "cleared", "No answer yet.", tree, mask,
            depth_acceptance_figure({}, "Acceptance by depth · this conversation"),
            empty_figure("no tokens yet", "Tokens over time", uirevision="hass-race"), time_split_figure([]),
            _slider(None, True), "", *cost)


def rehighlight(session: Session, highlight: bool):
    return chat_html(session or Session(), highlight)


def replay(studio: Studio, session: Session, index):
    """Step slider: the tree and mask of any step of the last answer."""
    turn = next((t for t in reversed(session.turns) if t.steps and not t.pending), None) if session else None
    if turn is None:
        tree, mask = step_figures(None, None)
        return tree, mask, "no answer to replay yet"
    try:
        i = int(index)
    except (TypeError, ValueError):
        i = len(turn.steps) - 1
    i = max(0, min(i, len(turn.steps) - 1))
    tree, mask = step_figures(studio.target, turn.steps[i])
    return tree, mask, step_caption(turn, i)


def draft_label(studio: Studio, session: Session | None) -> str:
    """The short name of this tab's draft."""
    if session is not None and session.draft_label:
        return session.draft_label
    try:
        return studio.draft_for(session.draft_spec if session is not None else studio.default_draft_spec)[1]
    except SettingsError:
        return "random"


def header_markdown(studio: Studio, session: Session | None = None) -> str:
    """The page title: the model and this tab's draft (short names)."""
    return (f"# HASS Studio\nLossless speculative decoding with a HASS draft head and an EAGLE-2 dynamic draft "
            f"tree · model **{studio.target.name}** ({studio.target.weights} weights) · draft "
            f"**{draft_label(studio, session)}**" + studio.weights_note())


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
    if not steps:
        body = "<div class='hs-out hs-wait'>waiting…</div>"
    elif highlight:
        body = highlight_html(steps, texts, show=True, code_blocks=True)
    else:
        body = markdown_html("".join(texts))
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
    return f"**{_esc(b)}: {_esc(speed_words(r, a))}** · {_esc(how)}"


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
    session.last_race = {}
    try:
        yield (_side_html([], [], names[0]), _side_html([], [], names[1]), gr.skip(), gr.skip(),
               "warming up…" if warmup else "racing…")
        th.spent(th.t0, time.perf_counter(), False)
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
        session.race_state = ""
        session.last_race = {"steps": steps, "names": names, "complete": run.error is None and len(finished) == 2}
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
    session.race_state = "running"
    try:
        messages = _prompt_messages(session, prompt)
        cfg = make_config(temperature, top_p, max_new_tokens, total_tokens, depth, top_k, **_options(session))
        ids = studio.target.render(messages)
        label = studio.draft_for(session.draft_spec)[1]
        jobs = _warmup_jobs(studio, ids, [("plain", ""), ("HASS", session.draft_spec)], warmup, cfg)
        racers = [("plain", studio.generator("plain", ids, cfg)),
                  (f"HASS ({label})", studio.generator("HASS", ids, cfg, session.draft_spec))]
    except (SettingsError, ValueError) as exc:
        session.race_state = ""
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
    session.race_state = "running"
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
        session.race_state = ""
        yield (gr.skip(), gr.skip(), gr.skip(), gr.skip(), _warn(str(exc)))
        return
    yield from _race_stream(studio, session, jobs, racers, highlight,
                            f"Acceptance by depth · {racers[0][0]} vs {name_b}")


def race_submit(studio: Studio, session: Session, what: str = "race"):
    """Race / Run A/B, first part (at once, outside the decoding queue): refuses, saying why,
    while this tab's race or A/B is still running or waiting (gr.Error: the race itself is
    chained with .success, so it never starts); else says what the race waits for."""
    session = session if session is not None else Session()
    if session.race_state:
        raise gr.Error(f"Not started: your {'race' if session.race_state == 'running' else 'previous race'} is "
                       f"still {'running' if session.race_state == 'running' else 'waiting for its turn'}. Wait for "
                       "it, or press Stop, then start another.", duration=10, title="One race at a time")
    session.race_state = "queued"
    if session.busy:
        words = f"queued: the {what} starts when your chat answer is done"
    elif studio.others_busy(session):
        words = (f"waiting for another visitor's answer: the studio decodes one thing at a time, and your {what} "
                 "starts as soon as it is done")
    else:
        words = f"starting the {what}…"
    return session, words


def race_stop(studio: Studio, session: Session) -> str:
    """The race's Stop: ends this tab's race or A/B (running or waiting)."""
    if session is None:
        return "stopped"
    stopped = studio.stop(session)
    was = session.race_state
    session.race_state = ""
    if stopped or was:
        return "stopped"
    return "nothing is running"


# -- why this speed, and what HASS changes -----------------------------------------------------------
def _plain_step(steps: list[Step]) -> float | None:
    secs = [st.seconds for st in steps if st.kind == "plain" and st.seconds > 0]
    return sum(secs) / len(secs) if secs else None


def race_cost_panel(studio: Studio, session: Session):
    """(figure, markdown) of the Race tab's Cost panel after a race (the HASS side against
    this machine's cost curve, the plain step from the race's plain side) or an A/B (each
    draft's τ against the same curve, the plain step estimated)."""
    curve = studio.cost_curve()
    last = session.last_race if session is not None else {}
    if not curve:
        return (cost_figure(cost_story({}, []), "Cost of a check"),
                "This machine's verify cost curve is not measured yet, so the speed cannot be explained.")
    if not last or not any(last.get("steps", {}).values()):
        return (cost_figure(cost_story(curve, []), "What checking a draft tree costs here"),
                f"Checking N draft tokens in one target forward costs c(N) plain decoding steps here "
                f"({_curve_words(curve)}). Run a race to see the HASS side's τ against it.")
    steps, names = last["steps"], last["names"]
    if names[0] == "plain":
        hass_name = names[1]
        plain = _plain_step(steps["plain"])
        story = cost_story(curve, steps[hass_name], plain_step_s=plain)
        text = f"**Race · {_esc(hass_name)}**: {story.sentence}"
        if story.measured_speedup is not None:
            text += (f" The plain step ({plain * 1e3:.1f} ms) is the race's plain side's; both prefills are left out "
                     "here, so this can differ a little from the headline, which counts them.")
        ratio = story.measured_speedup if story.measured_speedup is not None else story.predicted_speedup
        return cost_figure(story), text + _why(story, ratio)
    stories = {n: cost_story(curve, steps[n]) for n in names}
    lines = []
    for n, st in stories.items():
        if st.steps and st.predicted_speedup is not None:
            lines.append(f"- **{_esc(n)}**: τ {st.tau:.2f} against the {st.needed_tau:.2f} its checks and drafting "
                         f"cost: the curve predicts {verdict(st.predicted_speedup)}")
        else:
            lines.append(f"- **{_esc(n)}**: no speculative steps")
    text = ("**A/B** (no plain side, so the plain step is estimated from the verify times): "
            "the same machine and the same trees, so the draft with the higher τ is the faster one.\n"
            + "\n".join(lines))
    first = stories[names[0]]
    return cost_figure(first, f"{names[0]}: τ {first.tau:.2f} vs {first.needed_tau:.2f} needed"
                       if first.steps else None), text


def card_accuracy(folder: Path | None) -> list[float] | None:
    """A draft's held-out top-1 accuracy per alignment pass, from its card (eval.json), or
    None when it has not been evaluated."""
    if folder is None:
        return None
    try:
        acc = json.loads((Path(folder) / "eval.json").read_text())["heldout"]["accuracy_per_pass"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(acc, list) or not acc or not all(isinstance(a, (int, float)) for a in acc):
        return None
    return [float(a) for a in acc]


def _spec_folder(studio: Studio, spec: str) -> Path | None:
    if spec in ("hass", "default"):
        return studio.shipped("hass")
    if spec == "eagle2":
        return studio.shipped("eagle2")
    if spec in ("random", "none", ""):
        return None
    return Path(spec).expanduser()


def pass_panel(studio: Studio, series: dict[str, str]):
    """(figure, markdown): each draft's held-out accuracy per alignment pass, from its card,
    and what HASS's context alignment changes. series: title -> draft spec."""
    acc = {name: card_accuracy(_spec_folder(studio, spec)) for name, spec in series.items()}
    fig = pass_accuracy_figure(acc, "Held-out accuracy per alignment pass (from the drafts' cards)")
    parts = []
    for name, a in acc.items():
        parts.append(f"**{_esc(name)}**: " + (" · ".join(f"pass {j} {v:.1%}" for j, v in enumerate(a, start=1))
                                              if a else "not evaluated (no eval.json in its folder)"))
    text = ("Top-1 accuracy on held-out dialogues, from each draft's card: pass 1 guesses the next token from the "
            "target's own features; passes 2 and 3 guess from the draft's own earlier outputs, as it does when "
            "it drafts 2 and 3 tokens ahead (depths 2 and 3 of the tree).  \n" + "  \n".join(parts))
    names = list(acc)
    if len(names) >= 2 and acc[names[0]] and acc[names[1]] and min(len(acc[names[0]]), len(acc[names[1]])) >= 3:
        a, b = acc[names[0]], acc[names[1]]
        d = [100 * (x - y) for x, y in zip(a, b)]
        later = "lifts them" if d[1] > 0 and d[2] > 0 else "does not lift them here"
        text += (f"  \nHASS's context alignment trains passes 2 and 3 on the draft's own features, which is what "
                 f"{later}: {_esc(names[0])} vs {_esc(names[1])} {d[1]:+.1f} points at pass 2 and {d[2]:+.1f} at "
                 f"pass 3, {d[0]:+.1f} at pass 1. The acceptance by depth (above) is the same story while decoding; "
                 "the speed follows τ, the sum over all depths.")
    return fig, text


def ab_submit(studio: Studio, session: Session, other: str):
    """Run A/B, first part: like `race_submit`, and the per-pass accuracy of the two drafts
    (their cards) at once. Returns (state, status, passes figure, passes text)."""
    session, words = race_submit(studio, session, "A/B")
    try:
        spec_b, name_b = _ab_other(studio, session, other)
    except SettingsError:
        return session, words, gr.skip(), gr.skip()     # the A/B itself says why
    return (session, words, *pass_panel(studio, {"HASS draft (shipped)": "hass", name_b: spec_b}))


__all__ = ["send", "submit", "answer", "stop", "regenerate", "regenerate_submit", "clear", "replay", "rehighlight",
           "set_draft", "load_model", "race", "ab", "race_submit", "ab_submit", "race_stop", "check_lossless",
           "chat_html", "user_html", "answer_html", "stats_markdown", "step_figures", "race_verdict", "cost_panel",
           "race_cost_panel", "pass_panel", "card_accuracy", "header_markdown", "prefill_words", "CHAT_OUTPUTS",
           "SUBMIT_OUTPUTS", "RACE_OUTPUTS", "MODES", "AB_CHOICES", "Throttle"]
