"""The studio tells the true story (issue 14), in a real browser and in the handlers.

The browser tests drive the Gradio app in this process (Debian's headless Chromium through
Playwright, never a downloaded browser) on a tiny target with the default model's
tokenizer. Its answers are *scripted* step events (a fixed text, fixed step timings, an
optional delay per step), so what the page must show is known exactly: the cost panel's
numbers are recomputed here with `visual.cost.cost_story` on the very steps the page got, the
race's verdict is known in both directions, an answer contains a code block, a slow answer
keeps a second visitor waiting. No default-model decoding: the whole file runs in well under
two minutes.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from browser import text_of, wait_text, wait_title

from app import chat
from app import race as race_mod
from app.studio import Session, Studio
from app.training import TrainingManager
from hass.events import DraftTree, Step
from hass.target import Target
from visual.cost import cost_story

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")     # gr.Warning outside a request

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
# this machine's verify cost curve, as the studio would have measured it: c(N) = curve[N] / curve[1]
CURVE = {1: 0.010, 2: 0.011, 4: 0.012, 8: 0.016, 16: 0.024, 32: 0.040, 64: 0.072}
SIZES = (3, 2, 3, 2, 1)
SCRIPT = ("Here is the function:\n```python\ndef add(a, b):\n    return a + b\n```\n"
          "It returns the sum of `a` and `b`.")


class Script:
    """Scripted decoding: `generator(mode, ids, cfg, spec)` yields a prefill step, then plain
    steps (one token, `plain_s` on the step clock) or speculative steps (2-3 tokens: accepted
    drafts plus the bonus, from a small tree with one rejected guess; `draft_s` + `verify_s`).
    `delay` wall seconds pass before each step (outside the step clocks), `prefill_s` before
    the first. Every run's steps are recorded in `runs` as (mode, steps)."""

    def __init__(self, target: Target):
        self.target = target
        self.text = SCRIPT
        self.delay = 0.0
        self.prefill_s = 0.0
        self.plain_s = 0.010
        self.draft_s = 0.004
        self.verify_s = 0.012
        self.runs: list[tuple[str, list[Step]]] = []

    def steps(self, mode: str, tokens: list[int]) -> list[Step]:
        out = [Step(index=0, kind="prefill", tree=None, path=[], accepted=0, new_tokens=tokens[:1],
                    sources=["target"], target_prob=[0.9], timings={"draft": 0.0, "verify": 3 * self.plain_s,
                                                                    "other": 0.0})]
        rest, i, sizes = tokens[1:], 0, SIZES
        while i < len(rest):
            if mode == "plain":
                chunk = rest[i:i + 1]
                out.append(Step(index=len(out), kind="plain", tree=None, path=[], accepted=0, new_tokens=chunk,
                                sources=["target"], target_prob=[0.8], timings={"draft": 0.0, "verify": self.plain_s,
                                                                                "other": 0.0}))
            else:
                chunk = rest[i:i + sizes[len(out) % len(sizes)]]
                k = len(chunk)                      # k - 1 accepted drafts and the bonus
                prev = (tokens[:1] + rest)[i]
                toks = [prev] + chunk[:-1] + [(chunk[-1] + 1) % 1000]          # + one rejected guess
                parents = [-1] + list(range(k - 1)) + [k - 1]
                tree = DraftTree(tokens=toks, parents=parents, depths=list(range(k)) + [k],
                                 logp=[0.0] + [-0.5 * d for d in range(1, k + 1)], prob=[1.0] + [0.6] * k,
                                 origin=["root"] + ["draft"] * k, rule="fixed")
                out.append(Step(index=len(out), kind="speculative", tree=tree, path=list(range(k)), accepted=k - 1,
                                new_tokens=chunk, sources=[f"draft@{d}" for d in range(1, k)] + ["bonus"],
                                target_prob=[0.8] * k, timings={"draft": self.draft_s, "verify": self.verify_s,
                                                                "other": 0.0}))
            i += len(chunk)
        last = out[-1]
        out[-1] = Step(**{**last.__dict__, "stop_reason": "max_new_tokens"})
        return out

    def generator(self, mode, ids, cfg, draft_spec="default"):
        tokens = self.target.tokenizer.encode(self.text, add_special_tokens=False)[:cfg.max_new_tokens]
        steps = self.steps(mode, tokens)
        record: list[Step] = []
        self.runs.append((mode, record))
        delay, prefill = self.delay, self.prefill_s

        def run():
            if prefill:
                time.sleep(prefill)
            for st in steps:
                if delay:
                    time.sleep(delay)
                record.append(st)
                yield st
        return run()

    def last(self, mode: str) -> list[Step]:
        return next(steps for m, steps in reversed(self.runs) if m == mode)


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def story_target(make_chat_target) -> Target:
    return make_chat_target("tiny-story", 2048)


@pytest.fixture(scope="module")
def studio_app(story_target, tmp_path_factory):
    """(studio, script, url): the Gradio app of app/ui.py served from this process."""
    import app.studio as studio_mod
    from app.ui import build, css

    mp = pytest.MonkeyPatch()
    mp.setattr(studio_mod, "load_cost_curve", lambda target, measure=True: dict(CURVE))
    studio = Studio(story_target, model_spec="tiny", draft_spec="random",
                    training=TrainingManager(tmp_path_factory.mktemp("story-drafts")))
    script = Script(story_target)
    mp.setattr(studio, "generator", script.generator)
    demo = build(studio)
    demo.queue(default_concurrency_limit=1, max_size=64)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, css=css(),
                            quiet=True)
    try:
        yield studio, script, url
    finally:
        demo.close()
        mp.undo()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `apt-get install chromium` (the browser tests use Debian's "
                    "chromium, never a downloaded build)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def open_page(browser, studio_app):
    """open_page() -> a new visitor (own browser context, so its own Gradio session)."""
    contexts, errors = [], []

    def make():
        ctx = browser.new_context(viewport={"width": 1440, "height": 1000})
        contexts.append(ctx)
        pg = ctx.new_page()
        pg.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        pg.set_default_timeout(30_000)
        pg.goto(studio_app[2])
        pg.wait_for_selector("#hs-msg textarea")
        return pg
    yield make
    for ctx in contexts:
        ctx.close()
    assert not errors, "browser console errors:\n" + "\n".join(errors)


@pytest.fixture()
def script(studio_app):
    """The script, reset to fast defaults for each test."""
    s = studio_app[1]
    s.text, s.delay, s.prefill_s, s.plain_s, s.draft_s, s.verify_s = SCRIPT, 0.0, 0.0, 0.010, 0.004, 0.012
    return s



def send(pg, text: str) -> None:
    pg.locator("#hs-msg textarea").fill(text)
    pg.locator("#hs-send").click()


def set_mode(pg, mode: str) -> None:
    pg.locator("#hs-mode").get_by_label(mode, exact=True).check()


# -- 2. every visitor always sees state -------------------------------------------------------------
def test_a_second_visitor_sees_their_message_waiting_and_a_busy_visitor_queues(open_page, script):
    script.delay = 0.8     # ~16 steps: each answer streams for ~13 s, so A still streams on a loaded CI machine
    a, b = open_page(), open_page()
    send(a, "First visitor's question")
    a.wait_for_function("document.querySelectorAll('#hs-chat-box .hs-tok').length >= 1")
    send(b, "Second visitor's question")
    # at once, while A still streams: B's message is in B's chat, saying what it waits for
    wait_text(b, "#hs-chat-box", r"Second visitor's question", timeout=8)
    wait_text(b, "#hs-chat-box .hs-pending", r"waiting for another visitor's answer", timeout=8)
    assert b.locator("#hs-msg textarea").input_value() == ""
    # A sends again while its answer streams: queued visibly behind it, never dropped
    send(a, "A follow-up while streaming")
    wait_text(a, "#hs-chat-box .hs-pending", r"answered when your previous message's answer is done", timeout=8)
    assert a.locator("#hs-chat-box .hs-user").count() == 2
    assert "streaming" in text_of(a, "#hs-chat-box")           # A's first answer was still streaming meanwhile
    # B's status line: what it waits for, and Gradio's live queue position
    assert re.search(r"waiting for another visitor's answer|queue: \d+/\d+", text_of(b, "#hs-status"))
    wait_text(b, "#hs-status", r"queue: 1/\d", timeout=10)
    script.delay = 0.05    # seen while streaming; the rest only has to finish, in order
    # everything gets answered: B after A's first answer, then A's follow-up
    wait_text(b, "#hs-status", r"done \(", timeout=90)
    t0 = time.time()
    while a.locator("#hs-chat-box .hs-pending").count() and time.time() - t0 < 90:
        a.wait_for_timeout(200)
    wait_text(a, "#hs-status", r"done \(", timeout=90)
    assert a.locator("#hs-chat-box .hs-bot").count() == 2 and not a.locator("#hs-chat-box .hs-pending").count()
    assert "It returns the sum" in text_of(a, "#hs-chat-box .hs-bot >> nth=1")
    assert b.locator("#hs-chat-box .hs-bot").count() == 1 and "It returns the sum" in text_of(b, "#hs-chat-box")


def test_regenerate_keeps_what_the_visitor_is_typing(open_page, script):
    pg = open_page()
    send(pg, "Add two numbers")
    wait_text(pg, "#hs-status", r"done \(")
    pg.locator("#hs-msg textarea").fill("a half-typed next question")
    script.delay = 0.05
    pg.locator("#hs-regen").click()
    wait_text(pg, "#hs-status", r"generating|regenerating")
    wait_text(pg, "#hs-status", r"done \(")
    assert pg.locator("#hs-msg textarea").input_value() == "a half-typed next question"
    assert pg.locator("#hs-chat-box .hs-user").count() == 1 and pg.locator("#hs-chat-box .hs-bot").count() == 1


def test_long_message_is_collapsed_and_a_long_prefill_says_what_it_does(open_page, script, story_target):
    script.prefill_s = 3.0
    pg = open_page()
    long = "\n".join(f"Line {i}: some pasted document text that goes on for a while." for i in range(14))
    send(pg, long)
    # the prefill: the status and the answer say the target is reading the message, with its size
    status = wait_text(pg, "#hs-status", r"reading your [\d,]+-token message", timeout=6)
    assert "prefill" in status and "reading your" in text_of(pg, "#hs-chat-box .hs-bot")
    n = int(re.search(r"reading your ([\d,]+)-token", status).group(1).replace(",", ""))
    assert n == len(story_target.render([{"role": "user", "content": long}]))
    wait_text(pg, "#hs-status", r"done \(")
    # the long message shows its first lines and its size; the rest is one click away
    assert pg.locator("#hs-chat-box details.hs-long").count() == 1
    shown = text_of(pg, "#hs-chat-box .hs-user")
    assert "Line 0:" in shown and "Line 13:" not in shown and f"{len(long):,} characters" in shown
    pg.locator("#hs-chat-box details.hs-long summary").click()
    assert "Line 13:" in text_of(pg, "#hs-chat-box .hs-user")


# -- 3. readable answers --------------------------------------------------------------------------------
def test_answers_render_as_markdown_with_code_blocks_when_colouring_is_off(open_page, script):
    pg = open_page()
    send(pg, "Write an add function")
    wait_text(pg, "#hs-status", r"done \(")
    # coloured: the fenced code keeps its layout in a block that scrolls instead of wrapping
    code = pg.locator("#hs-chat-box .hs-code")
    assert code.count() == 1 and "def add(a, b):\n    return a + b" in code.inner_text()
    assert code.evaluate("e => getComputedStyle(e).whiteSpace") == "pre"
    assert pg.locator("#hs-chat-box .hs-code .hs-tok").count() >= 3
    pg.locator("#hs-highlight input").uncheck()
    pg.wait_for_function("document.querySelectorAll('#hs-chat-box .hs-md pre code').length === 1")
    block = pg.locator("#hs-chat-box .hs-md pre code")
    assert block.inner_text().rstrip("\n") == "def add(a, b):\n    return a + b"
    assert pg.locator("#hs-chat-box .hs-md p code").first.inner_text() == "a"         # `a` as inline code
    shown = text_of(pg, "#hs-chat-box .hs-bot")
    assert "```" not in shown and "`a`" not in shown
    assert block.evaluate("e => getComputedStyle(e.parentElement).overflowX") == "auto"
    pg.locator("#hs-highlight input").check()


# -- 1. the cost panel, the race verdict ----------------------------------------------------------------
def test_cost_panel_numbers_are_the_librarys(open_page, script):
    pg = open_page()
    send(pg, "Add two numbers")
    wait_text(pg, "#hs-status", r"done \(")
    pg.get_by_role("tab", name="Cost").click()
    steps = script.last("HASS")
    want = cost_story(CURVE, steps)                       # no plain answer yet: the plain step is estimated
    text = wait_text(pg, "#hs-cost-text", r"Answer 1")
    assert want.sentence in text.replace("\n", " "), (want.sentence, text)
    assert want.measured_speedup is None and "estimated" in text
    wait_title(pg, "hs-cost", re.escape(f"τ {want.tau:.2f} vs {want.needed_tau:.2f} needed"))
    # a plain answer in the same conversation: the panel now measures against its plain step
    set_mode(pg, "plain")
    send(pg, "Again, plainly")
    wait_text(pg, "#hs-status", r"done \(")
    want = cost_story(CURVE, steps, plain_step_s=script.plain_s)
    assert want.measured_speedup is not None
    text = wait_text(pg, "#hs-cost-text", r"Measured against")
    assert want.sentence in text.replace("\n", " "), (want.sentence, text)
    wait_title(pg, "hs-cost", "measured")
    set_mode(pg, "HASS")


@pytest.mark.parametrize("direction", ["faster", "slower"])
def test_race_verdict_and_its_cost_story_in_both_directions(open_page, script, direction):
    script.delay = 0.08                                  # the race streams for a few seconds
    if direction == "slower":
        script.verify_s = 0.060                              # checks cost more than the tokens they yield
    pg = open_page()
    pg.get_by_role("tab", name="Race / A-B").click()
    pg.locator("#hs-race-prompt textarea").fill("Add two numbers")
    pg.locator("#hs-race").click()
    wait_text(pg, "#hs-race-status", r"racing|warming|starting")
    # a second click while the race runs is refused, saying why (never silently dropped)
    pg.locator("#hs-race").click()
    # (the race may still be queued for its turn when the click lands: either refusal says why)
    wait_text(pg, ".toast-body", r"Not started: your (race is still running|previous race is still waiting for its turn)",
              timeout=5)
    status = wait_text(pg, "#hs-race-status", r"faster than plain|the speed of plain", timeout=40)
    hass, plain = script.last("HASS"), script.last("plain")
    from hass.events import speedup, summarize
    x, y = summarize(plain), summarize(hass)
    r = speedup(x.new_tokens, x.seconds, y.new_tokens, y.seconds)
    speed_title = wait_title(pg, "hs-race-speed", r"faster than plain|the speed of plain")
    if direction == "faster":
        assert r > 1 and f"HASS (random): {r:.2f}× faster than plain" in status, status
        assert f"{r:.2f}× faster than plain" in speed_title and "slower" not in speed_title, speed_title
    else:
        assert r < 1 and f"HASS (random): {r:.2f}× the speed of plain: plain is {1 / r:.2f}× faster" in status
        assert f"{r:.2f}× the speed of plain: plain is {1 / r:.2f}× faster" in speed_title, speed_title
        assert "faster than plain" not in status + speed_title
    # the race's cost story: the HASS side against the curve, measured against the plain side's step
    want = cost_story(CURVE, hass, plain_step_s=script.plain_s)
    text = wait_text(pg, "#hs-race-cost-text", r"Race", timeout=10)
    assert want.sentence in text.replace("\n", " "), (want.sentence, text)
    assert ("What would change it" in text) == (direction == "slower")
    assert len(pg.locator(".toast-body").all()) <= 2


def test_race_verdict_words_both_ways():
    def side(seconds: float, n: int, kind: str = "plain"):
        return [Step(index=0, kind=kind, tree=None, path=[], accepted=0, new_tokens=list(range(n)),
                     sources=["target"] * n, target_prob=[1.0] * n,
                     timings={"draft": 0.0, "verify": seconds, "other": 0.0})]
    fast = race_mod.race_verdict({"plain": side(1.24, 5), "HASS": side(1.0, 5)})
    assert fast.startswith("**HASS: 1.24× faster than plain**")
    slow = race_mod.race_verdict({"plain": side(1.0, 5), "HASS": side(1.25, 5)})
    assert slow.startswith("**HASS: 0.80× the speed of plain: plain is 1.25× faster**")
    ab = race_mod.race_verdict({"HASS draft (shipped)": side(1.0, 5), "EAGLE-2 draft (shipped)": side(1.25, 5)})
    assert "EAGLE-2 draft (shipped): 0.80× the speed of HASS draft (shipped): HASS draft (shipped) is 1.25× " \
           "faster" in ab


def test_about_promises_no_figure_and_points_at_the_cost_panel():
    from app.ui import ABOUT
    about = " ".join(ABOUT.split())
    assert "paper's" not in about and "2.8" not in about and "smaller than" not in about
    assert "**Cost** panel" in about and "cost curve" in about
    assert "0.80× the speed of plain: plain is 1.25× faster" in about and "× slower" not in about


def test_about_names_the_machine_the_studio_runs_on(monkeypatch):
    """A visitor of a Space sees which CPU class they got: the speedup depends on it."""
    from types import SimpleNamespace

    import torch

    import hass.device as device
    from app.chat import machine_markdown
    monkeypatch.setattr(device, "cpu_description",
                        lambda: "AMD EPYC (family 25, model 1; AVX2, no AVX-512; bf16 not native)")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    text = machine_markdown(SimpleNamespace(target=SimpleNamespace(device=torch.device("cpu"), kernels="rows",
                                                                   attention="hass_rows")))
    assert ("AMD EPYC (family 25, model 1; AVX2, no AVX-512; bf16 not native), 1 torch thread, "
            "the rows kernel (hass/rowkernel.py) for its linear layers and attention.") in text
    linear_only = machine_markdown(SimpleNamespace(target=SimpleNamespace(device=torch.device("cpu"), kernels="rows",
                                                                          attention="hass_sdpa_gqa")))
    assert "1 torch thread, the rows kernel (hass/rowkernel.py)." in linear_only
    onednn = machine_markdown(SimpleNamespace(target=SimpleNamespace(device=torch.device("cpu"), kernels="onednn")))
    assert "1 torch thread, oneDNN's packed kernels." in onednn
    assert "Cost panel" in text and "AVX2 only" in text
    other = machine_markdown(SimpleNamespace(target=SimpleNamespace(device=torch.device("meta"))))
    assert other.startswith("**This studio runs on** meta.") and "AVX2" not in other   # no CPU, no CPU note


# -- 4. consistent labels -----------------------------------------------------------------------------
def test_labels_follow_the_draft_and_the_answer(open_page, script, studio_app, story_target, tmp_path):
    from hass.draft import new_draft, save_draft
    studio = studio_app[0]
    folder = studio.training.runs_dir / "draft-story-1"
    save_draft(new_draft(story_target.config, seed=3), folder)
    studio.training._last_draft = folder
    pg = open_page()
    assert "draft random" in text_of(pg, "#hs-title").replace("\n", " ")
    send(pg, "First question")
    wait_text(pg, "#hs-status", r"done \(")
    # replay step 1 of this answer; the caption names it
    box = pg.locator("#hs-step input[type=number]")
    box.fill("1")
    box.press("Tab")
    wait_text(pg, "#hs-replay", r"step 1: ")
    # the trained draft into the chat: the Train tab, the Settings line, the title and the next answer name it
    pg.get_by_role("tab", name="Train").click()
    pg.locator("#hs-train-use").click()
    wait_text(pg, "#hs-train-status", r"draft-story-1")
    wait_text(pg, "#hs-title", r"draft draft-story-1")
    pg.get_by_role("tab", name="Chat").click()
    pg.locator("#hs-settings").get_by_text("Settings").first.click()
    assert "draft-story-1" in wait_text(pg, "#hs-settings-status", r"draft")
    script.delay = 0.1
    send(pg, "Second question")
    wait_text(pg, "#hs-chat-box", r"streaming")
    assert "step 1:" not in text_of(pg, "#hs-replay")         # the old answer's caption is gone at once
    wait_text(pg, "#hs-status", r"done \(")
    meta = pg.locator("#hs-chat-box .hs-bot .hs-role").nth(1).inner_text()
    assert "HASS · draft-story-1" in meta and "/" not in meta, meta
    caption = text_of(pg, "#hs-replay")
    assert "HASS · draft-story-1" in caption and "latest full tree" in caption, caption
    for sel in ("#hs-title", "#hs-settings-status", "#hs-train-status", "#hs-chat-box"):
        assert str(folder) not in pg.locator(sel).text_content(), sel         # short names, never a path


# -- 5. HASS made visible -----------------------------------------------------------------------------
def test_pass_accuracy_from_the_cards(studio_app, tmp_path):
    import json
    studio = studio_app[0]
    shipped = ROOT / "assets" / "drafts"
    fig, text = race_mod.pass_panel(studio, {"HASS draft (shipped)": str(shipped / "smollm2-135m-hass"),
                                             "EAGLE-2 draft (shipped)": str(shipped / "smollm2-135m-eagle2"),
                                             "random": "random"})
    acc = {k: json.loads((shipped / f"smollm2-135m-{k}" / "eval.json").read_text())["heldout"]["accuracy_per_pass"]
           for k in ("hass", "eagle2")}
    bars = {tr.name: list(tr.y) for tr in fig.data}
    assert bars == {"HASS draft (shipped)": acc["hass"], "EAGLE-2 draft (shipped)": acc["eagle2"]}
    assert [tr.x for tr in fig.data][0] == ("pass 1", "pass 2", "pass 3")
    assert "random: not evaluated" in fig.layout.annotations[0].text
    assert "random**: not evaluated" in text
    d2, d3 = (100 * (acc["hass"][j] - acc["eagle2"][j]) for j in (1, 2))
    assert f"{d2:+.1f} points at pass 2 and {d3:+.1f} at pass 3" in text
    assert "context alignment trains passes 2 and 3" in text
    # a draft folder without eval.json is "not evaluated", never a made-up number
    assert race_mod.card_accuracy(tmp_path) is None


# -- handlers: the queue without a browser --------------------------------------------------------------
def test_stop_takes_waiting_messages_back_and_answer_without_one_does_nothing(studio_app, script):
    studio = studio_app[0]
    s = Session(draft_spec="random")
    settings = ["HASS", 0, 1, 24, 16, 4, 4, True]
    out = chat.submit(studio, s, "one", *settings)
    assert out[2] == "" and s.turns[0].pending and "one" in out[1] and "hs-pending" in out[1]
    chat.submit(studio, s, "two", *settings)
    assert "previous message" in s.turns[1].wait
    back = chat.stop(studio, s, True, "")
    assert back[2] == "one\n\ntwo" and not s.turns and "not sent" in back[3]
    outs = list(chat.answer(studio, s, *settings))
    assert len(outs) == 1 and all(o == {"__type__": "update"} for o in outs[0][1:])     # gr.skip(): nothing to do
    assert not s.turns


def test_code_blocks_keep_their_layout_and_the_spans_still_add_up():
    import html as html_mod

    from visual.highlight import code_regions, highlight_html
    texts = ["Here:\n``", "`py", "thon\n", "def f():\n", "    return 1", "\n```\n", "Done."]     # fences split
    n = len(texts)
    st = Step(index=0, kind="plain", tree=None, path=[], accepted=0, new_tokens=list(range(n)),
              sources=["target"] * n, target_prob=[0.5] * n, timings={})
    full = "".join(texts)
    assert code_regions(full) == [(full.index("```"), full.index("Done."))]
    assert code_regions("a\n```\nstill streaming") == [(2, len("a\n```\nstill streaming"))]    # open: to the end
    for show in (True, False):
        out = highlight_html([st], texts, show=show, code_blocks=True)
        assert html_mod.unescape(re.sub(r"<[^>]+>", "", out)) == full
        block = re.search(r'<div class="hs-code"[^>]*>(.*?)</div>', out, re.S).group(1)
        assert html_mod.unescape(re.sub(r"<[^>]+>", "", block)) == "```python\ndef f():\n    return 1\n```\n"
    on = highlight_html([st], texts, show=True, code_blocks=True)
    assert on.count('class="hs-tok"') == n + 1          # "Here:\n``" is not split; "Here:\n" | "``" ... one cut inside
    assert highlight_html([st], texts) == highlight_html([st], texts, code_blocks=False)     # the default is unchanged


def test_markdown_answers_never_run_html():
    from app.markdown import markdown_html
    out = markdown_html("<script>alert(1)</script> **bold** [x](javascript:alert(1)) ![i](http://e.x/i.png)\n\n"
                        "```python\nprint('<b>')\n```")
    assert "<script>" not in out and "&lt;script&gt;" in out and "<strong>bold</strong>" in out
    assert 'href="javascript' not in out and "<img" not in out
    assert '<pre><code class="language-python">print(\'&lt;b&gt;\')' in out
