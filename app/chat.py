"""Chat, race, A/B and losslessness handlers: step events -> chat HTML + figure updates.

Handlers are plain functions of (studio, session, UI values); `app/ui.py` binds them to
components. Streaming handlers are generators that yield one tuple per UI update, in the
order of the *_OUTPUTS names below. Decoding runs in a `DecodeRun` thread; the handler
only reads its queue, so drawing never slows the decoder, and figures are redrawn at most
every FIGURE_EVERY seconds (and always at the end).
"""
from __future__ import annotations

import html
import time

import gradio as gr

from hass.events import Step, summarize
from visual import (depth_acceptance_figure, highlight_html, mask_figure, speedup_figure, speedups,
                    time_split_figure, tree_figure)
from visual.theme import empty_figure

from .studio import DecodeRun, Session, SettingsError, Studio, TokenTexts, Turn, collect, make_config

FIGURE_EVERY = 0.5          # seconds between figure redraws while streaming
TEXT_EVERY = 0.08           # seconds between text updates while streaming
MODES = ("HASS", "plain")

CHAT_OUTPUTS = ("state", "chat", "message", "status", "stats", "tree", "mask", "depth", "speed", "time", "slider")
RACE_OUTPUTS = ("plain_html", "hass_html", "speed", "depth", "status")


# -- rendering --------------------------------------------------------------------------------------
def _esc(s: str) -> str:
    return html.escape(s, quote=False)


def answer_html(turn: Turn, highlight: bool = True) -> str:
    if not turn.steps:
        body = '<div class="hs-out hs-wait">…</div>' if turn.running else '<div class="hs-out"></div>'
    else:
        body = highlight_html(turn.steps, turn.texts, show=highlight)
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
    """The latest step with a real tree (the last step is often cut short by the budget)."""
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
    conv = session.conversation_steps()
    depth = depth_acceptance_figure({"HASS (this conversation)": conv}, "Acceptance by depth · this conversation")
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
        cfg = make_config(temperature, top_p, max_new_tokens, total_tokens, depth, top_k, seed=_seed())
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


def _stream(studio: Studio, session: Session, turn: Turn, gen, highlight: bool, clear_message: bool = False):
    texts = TokenTexts(studio.target)
    run = studio.start(session, [(turn.mode, gen)])
    t0 = time.perf_counter()
    last_fig = 0.0
    last_text = 0.0
    status = f"generating ({turn.mode}{' · ' + turn.draft if turn.draft else ''})…"
    try:
        yield (session, chat_html(session, highlight), "" if clear_message else gr.skip(), status,
               gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), _slider(turn, False))
        while not run.finished:
            got = run.drain(0.05)
            for _, st in got:
                turn.steps.append(st)
                turn.ids.extend(st.new_tokens)
                turn.texts.extend(texts.push(st.new_tokens))
            turn.answer = texts.text
            turn.wall_s = time.perf_counter() - t0
            now = time.perf_counter()
            if not got or now - last_text < TEXT_EVERY:
                continue
            last_text = now
            if now - last_fig >= FIGURE_EVERY:
                last_fig = now
                figs = live_figures(studio, session, turn)
                stats = stats_markdown(turn.steps, turn.wall_s, turn.mode)
                yield (session, chat_html(session, highlight), gr.skip(), status, stats, *figs, gr.skip())
                last_fig = time.perf_counter()      # drawing time does not count as waiting
            else:
                yield (session, chat_html(session, highlight), gr.skip(), status, gr.skip(), gr.skip(), gr.skip(),
                       gr.skip(), gr.skip(), gr.skip(), gr.skip())
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
        cfg = make_config(0, 1, max_new_tokens, total_tokens, depth, top_k)
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
        return (f"✅ **identical**: plain and HASS greedy produced the same {len(a)} token ids "
                f"(HASS used {len(got.get('HASS', []))} target forwards instead of {len(a)}, τ {tau:.2f})")
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"❌ **different** from token {k}: plain {a[k:k + 5]} vs HASS {b[k:k + 5]} "
            f"({len(a)} vs {len(b)} tokens). This is a bug: please report it.")


# -- race and A/B -----------------------------------------------------------------------------------
def _side_html(steps: list[Step], texts: list[str], title: str, highlight: bool = True) -> str:
    s = summarize(steps) if steps else None
    head = f"<div class='hs-role'>{_esc(title)}" + (
        f" · {s.new_tokens} tokens · {s.tokens_per_s:.1f} tok/s · τ {s.tau:.2f}" if s else "") + "</div>"
    body = highlight_html(steps, texts, show=highlight) if steps else "<div class='hs-out hs-wait'>waiting…</div>"
    return f"<div class='hs-side'>{head}{body}</div>"


def _race_stream(studio: Studio, session: Session, names: list[str], jobs, highlight: bool, fig_names: dict,
                 depth_title: str):
    steps: dict[str, list[Step]] = {n: [] for n in names}
    texts: dict[str, list[str]] = {n: [] for n in names}
    decoders = {n: TokenTexts(studio.target) for n in names}
    run = studio.start(session, jobs)
    last_fig = 0.0
    try:
        while not run.finished:
            got = run.drain(0.1)
            for name, st in got:
                if name not in steps:           # warm-up
                    continue
                steps[name].append(st)
                texts[name].extend(decoders[name].push(st.new_tokens))
            if not got:
                continue
            now = time.perf_counter()
            figs = (gr.skip(), gr.skip())
            if now - last_fig >= FIGURE_EVERY:
                figs = (speedup_figure({fig_names[n]: steps[n] for n in names}),
                        depth_acceptance_figure({fig_names[n]: steps[n] for n in names}, depth_title))
                last_fig = time.perf_counter()
            yield (_side_html(steps[names[0]], texts[names[0]], fig_names[names[0]], highlight),
                   _side_html(steps[names[1]], texts[names[1]], fig_names[names[1]], highlight), *figs,
                   f"running {', '.join(n for n in names if steps[n])}…")
        run.wait(5)
    finally:
        studio.finish(session, run)
    races = {fig_names[n]: steps[n] for n in names}
    if run.error is not None:
        status = _warn(f"failed: {run.error}")
    else:
        ratio = speedups(races)
        status = ("**" + " · ".join(f"{k}: speedup {v:.2f}× over plain" for k, v in ratio.items()) + "**"
                  if ratio else "done")
        status += "  \n" + "  \n".join(stats_markdown(v, None, k).split("\n")[0] + f" · τ {summarize(v).tau:.2f}"
                                       for k, v in races.items())
    yield (_side_html(steps[names[0]], texts[names[0]], fig_names[names[0]], highlight),
           _side_html(steps[names[1]], texts[names[1]], fig_names[names[1]], highlight),
           speedup_figure(races), depth_acceptance_figure(races, depth_title), status)


def race(studio: Studio, session: Session, prompt: str, temperature, top_p, max_new_tokens, total_tokens, depth,
         top_k, highlight: bool = True, warmup: int = 8):
    """Plain then HASS on the same prompt, side by side, with the measured speedup.
    Yields RACE_OUTPUTS tuples."""
    session = session if session is not None else Session()
    try:
        messages = _prompt_messages(session, prompt)
        cfg = make_config(temperature, top_p, max_new_tokens, total_tokens, depth, top_k)
        ids = studio.target.render(messages)
        label = studio.draft_for(session.draft_spec)[1]
        jobs = []
        if warmup:
            wcfg = make_config(temperature, top_p, warmup, total_tokens, depth, top_k)
            jobs += [("warmup-plain", studio.generator("plain", ids, wcfg)),
                     ("warmup-hass", studio.generator("HASS", ids, wcfg, session.draft_spec))]
        jobs += [("plain", studio.generator("plain", ids, cfg)),
                 ("HASS", studio.generator("HASS", ids, cfg, session.draft_spec))]
    except (SettingsError, ValueError) as exc:
        yield (gr.skip(), gr.skip(), gr.skip(), gr.skip(), _warn(str(exc)))
        return
    yield from _race_stream(studio, session, ["plain", "HASS"], jobs, highlight,
                            {"plain": "plain", "HASS": f"HASS ({label})"}, "Acceptance by depth")


def ab(studio: Studio, session: Session, prompt: str, temperature, top_p, max_new_tokens, total_tokens, depth,
       top_k, highlight: bool = True):
    """The shipped HASS draft against the shipped EAGLE-2 draft on the same prompt: per-depth
    acceptance compared. Yields RACE_OUTPUTS tuples."""
    session = session if session is not None else Session()
    missing = [k for k in ("hass", "eagle2") if studio.shipped(k) is None]
    if missing:
        names = {"hass": "HASS", "eagle2": "EAGLE-2"}
        msg = (f"A/B needs both shipped drafts for {studio.target.name}; missing: "
               + ", ".join(names[m] for m in missing)
               + " (they appear in assets/drafts/ once trained). Use the race against plain decoding meanwhile.")
        yield (gr.skip(), gr.skip(), gr.skip(), gr.skip(), _warn(msg))
        return
    try:
        messages = _prompt_messages(session, prompt)
        cfg = make_config(temperature, top_p, max_new_tokens, total_tokens, depth, top_k)
        ids = studio.target.render(messages)
        jobs = [("A", studio.generator("HASS", ids, cfg, "hass")), ("B", studio.generator("HASS", ids, cfg, "eagle2"))]
    except (SettingsError, ValueError) as exc:
        yield (gr.skip(), gr.skip(), gr.skip(), gr.skip(), _warn(str(exc)))
        return
    yield from _race_stream(studio, session, ["A", "B"], jobs, highlight,
                            {"A": "HASS draft", "B": "EAGLE-2 draft"}, "Acceptance by depth · HASS vs EAGLE-2")


__all__ = ["send", "stop", "regenerate", "clear", "replay", "rehighlight", "set_draft", "load_model", "race", "ab",
           "check_lossless", "chat_html", "stats_markdown", "step_figures", "CHAT_OUTPUTS", "RACE_OUTPUTS", "MODES"]
