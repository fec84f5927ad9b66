"""Chat and losslessness handlers: step events -> chat HTML + figure updates.

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
answer streams waits behind it, visibly. The Race / A-B tab's handlers live in `app.race`,
which builds on the helpers here (`Throttle`, `stats_markdown`, the prompt and settings helpers).
"""
from __future__ import annotations

import html
import time

import gradio as gr

from hass.events import Step, summarize
from visual import depth_acceptance_figure, highlight_html, mask_figure, speedup_figure, time_split_figure, tree_figure
from visual.cost import CostStory, cost_figure, cost_story, relative_curve
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


def _kernel_words(target) -> str:
    """The kernels of the target's linear layers (and of its attention when it is the rows
    kernel's: then every verify forward is bit for bit the plain steps'), in words."""
    from hass.attention import ROWS_ATTENTION
    kern = getattr(target, "kernels", "stock")
    if kern == "rows":
        both = getattr(target, "attention", None) == ROWS_ATTENTION
        return "the rows kernel (hass/rowkernel.py)" + (" for its linear layers and attention" if both else "")
    return {"onednn": "oneDNN's packed kernels"}.get(kern, f"torch's {kern} kernels")


def machine_markdown(studio: Studio) -> str:
    """What this studio runs on (the About tab): the speedup depends on the machine's class
    more than on anything else (README), so a visitor of a Space sees which one they got."""
    import torch

    from hass.device import cpu_description
    dev = studio.target.device
    where = (f"{torch.cuda.get_device_name(dev)} ({dev})" if dev.type == "cuda" else
             f"{cpu_description()}, {torch.get_num_threads()} torch "
             f"thread{'s' if torch.get_num_threads() != 1 else ''}, {_kernel_words(studio.target)}"
             if dev.type == "cpu" else str(dev))
    cpu_note = (" On a CPU with AVX2 only (no AVX-512) checking a few draft tokens costs noticeably more "
                "than one plain step, so an answer needs a higher τ to gain." if dev.type == "cpu" else "")
    return f"**This studio runs on** {_esc(where)}.{cpu_note} The Cost panel shows this machine's own curve."


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


# -- settings ---------------------------------------------------------------------------------------
def set_tree_rule(session: Session, rule: str) -> Session:
    """Settings: "fitted" (the size chosen per step for this machine) or "fixed"."""
    session.tree_rule = "fixed" if rule == "fixed" else "fitted"
    return session


def set_lookup(session: Session, on: bool) -> Session:
    session.lookup = bool(on)
    return session


def _options(session: Session | None) -> dict:
    return (session or Session()).tree_options()


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


__all__ = ["send", "submit", "answer", "stop", "regenerate", "regenerate_submit", "clear", "replay", "rehighlight",
           "set_draft", "load_model", "set_tree_rule", "set_lookup", "check_lossless", "chat_html", "user_html",
           "answer_html", "stats_markdown", "step_figures", "cost_panel", "header_markdown", "prefill_words",
           "CHAT_OUTPUTS", "SUBMIT_OUTPUTS", "MODES", "Throttle"]
