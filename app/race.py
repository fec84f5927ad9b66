"""Race and A/B handlers: two decodes of one prompt, interleaved step by step, side by side.

Split from `app.chat` so the Chat tab's handlers and the Race / A-B tab's stay readable apart;
this module builds on chat's shared pieces (the streaming budget `Throttle`, `stats_markdown`,
the prompt and settings helpers, the cost-panel words) and `app/ui.py` binds both to
components. Streaming handlers yield RACE_OUTPUTS tuples. `race_submit` says at once that the
race is queued, or refuses (a race of this tab is still running) and says why.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import gradio as gr

from hass.events import Step, speedup, summarize
from visual import depth_acceptance_figure, highlight_html, pass_accuracy_figure, speed_words, speedup_figure
from visual.cost import cost_figure, cost_story, verdict

from .chat import Throttle, _curve_words, _esc, _options, _prompt_messages, _warn, _why, stats_markdown
from .markdown import markdown_html
from .studio import Session, SettingsError, Studio, TokenTexts, make_config

RACE_OUTPUTS = ("left_html", "right_html", "speed", "depth", "status")
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


__all__ = ["race", "ab", "race_submit", "ab_submit", "race_stop", "race_verdict", "race_cost_panel", "pass_panel",
           "card_accuracy", "RACE_OUTPUTS", "AB_CHOICES"]
