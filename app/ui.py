"""The Blocks layout: Chat, Race / A-B, Batch, Train and About tabs, wired to the handlers."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import gradio as gr

from hass.evalsets import SETS, load_set
from visual import HIGHLIGHT_CSS, legend_html
from visual.theme import empty_figure

from . import batch as batch_view
from . import chat, training
from . import race as race_view
from .studio import DRAFT_CHOICES, Session, Studio
from .training import TrainingManager

ROOT = Path(__file__).resolve().parent.parent
CSS_FILE = ROOT / "assets" / "style.css"
DECODE = "decode"            # one decoding event at a time across all users (CPU-bound)


def css() -> str:
    extra = CSS_FILE.read_text() if CSS_FILE.is_file() else ""
    return HIGHLIGHT_CSS + "\n" + extra


def example_prompts(per_set: int = 3) -> list[list[str]]:
    out = []
    for name in SETS:
        try:
            out += [[q.turns[0]] for q in load_set(name, per_set)]
        except (FileNotFoundError, ValueError):
            continue
    return out or [["Explain in three sentences why the sky is blue."]]


ABOUT = """
## What you are looking at

**Speculative decoding.** A large *target* model is slow because it produces one token per
forward pass. A small *draft* guesses several tokens ahead; the target then checks all the
guesses in **one** forward and keeps the longest prefix it agrees with, plus one token of
its own (the **bonus** token). At temperature 0 the output is exactly the target's greedy
output; at temperature > 0 the target and the draft share the sampling noise of each
position (*coupled sampling*), so the answer is the very text plain sampling writes with the
same seed. Nothing about the answer changes: only the speed. The *Check losslessness*
button runs both and compares the token ids.

**The draft tree (EAGLE-2).** The draft proposes not one chain but a tree: from each
likely node it expands its top-k children, keeps the `total tokens` most likely nodes (by
cumulative draft probability) up to `depth`, and the target verifies the whole tree at
once using a *tree attention mask* (each node sees only itself and its ancestors). The
*Tree* panel shows every step: the accepted path (blue, darker = shallower), the first
rejected guesses (red ✕), unreached nodes (grey) and the bonus token (orange star).

**HASS** (Harmonized Speculative Sampling, ICLR 2025) trains the EAGLE draft head with two
harmonizations: *harmonized objective distillation* (a top-K distillation loss, K and
weight w, so the draft ranks tokens like the target, which is what tree drafting uses) and
*harmonized context alignment* (training over n alignment passes in which the draft sees
its own earlier features, as it does while drafting several tokens ahead).

## Metrics

- **τ (tau)**: mean number of tokens produced per speculative cycle (one target forward),
  **including the bonus token**; plain decoding is 1.0. Pooled over cycles; the Train tab's
  evaluation also shows the mean over prompts (macro), as the paper reports.
- **Per-depth acceptance**: P(the token at depth d is accepted | the path reached depth d-1).
- **Speedup**: speculative tokens per second over plain tokens per second (`hass.events.speedup`,
  the one definition the CLI, the benchmark and this studio share); for the same new tokens it
  is plain time / speculative time. Measured in the same process after a warm-up, the two
  decoders taking turns step by step so both see the same machine conditions (the *Race* tab).
  It is said one way only: "1.24× faster than plain", or below one "0.80× the speed of plain:
  plain is 1.25× faster". During a normal chat the speed panel shows tokens over time of that
  answer alone.
- **Time split**: where each step's time goes: drafting (the tree), verifying (the target
  forward) and other bookkeeping.
- **Cost of a check c(N)**: what one target forward over N tree tokens costs here, in plain
  decoding steps (this machine's verify cost curve, measured once at start-up). A step is
  worth it when τ is above c(N) + drafting, the *break-even τ*; the predicted speedup is
  τ / (c(N) + drafting).

## Why it is fast or slow here

The speed depends on two things, both shown in the **Cost** panel (Chat and Race tabs): this
machine's cost curve c(N), and the τ the draft reaches on your prompt. Where checking many
tokens costs about as much as one (c(N) near 1, typical of a large model on a GPU), the
break-even τ is little more than 1 plus the drafting; on a CPU c(N) grows with N, a step must
yield more than its check costs, and a weak draft or an unpredictable prompt can make
speculative decoding slower than plain. The panel says which case an answer was in, and by
how much. The Race tab's A/B shows what HASS
changes in the draft: its accuracy 2 and 3 tokens ahead (from each draft's card).
"""


def new_session() -> Session:
    """A fresh per-browser session (called by Gradio on every page load)."""
    return Session()


def build(studio: Studio, manager: TrainingManager | None = None) -> gr.Blocks:
    manager = manager or studio.training or TrainingManager()
    studio.training = manager
    t = studio.tree_defaults
    try:
        draft_label = studio.draft_for(studio.default_draft_spec)[1]
    except Exception:        # noqa: BLE001
        draft_label = "random"
    first = Session(draft_spec=studio.default_draft_spec, draft_label=draft_label)
    cost0 = chat.cost_panel(studio, first)
    race_cost0 = race_view.race_cost_panel(studio, first)
    passes0 = race_view.pass_panel(studio, {"HASS draft (shipped)": "hass", "EAGLE-2 draft (shipped)": "eagle2"})

    with gr.Blocks(title="HASS Studio") as demo:
        def fresh_session() -> Session:
            return Session(draft_spec=studio.default_draft_spec)

        state = gr.State(fresh_session)
        public = studio.policy.public
        title = gr.Markdown(chat.header_markdown(studio, first), elem_id="hs-title")
        if public:
            gr.Markdown(studio.policy.describe(), elem_id="hs-public")
        with gr.Tabs():
            # ---------------------------------------------------------------- chat
            with gr.Tab("Chat", id="chat"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=7, min_width=420, elem_id="hs-chat-col"):
                        chat_box = gr.HTML(chat.chat_html(Session()), elem_id="hs-chat-box", max_height=600,
                                           autoscroll=True)
                        with gr.Row():
                            msg = gr.Textbox(placeholder="Ask something…", show_label=False, scale=5, lines=2,
                                             max_lines=8, elem_id="hs-msg")
                            send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="hs-send")
                        with gr.Row():
                            stop_btn = gr.Button("Stop", variant="stop", size="sm", elem_id="hs-stop")
                            regen_btn = gr.Button("Regenerate", size="sm", elem_id="hs-regen")
                            clear_btn = gr.Button("Clear", size="sm", elem_id="hs-clear")
                            check_btn = gr.Button("Check losslessness", size="sm", elem_id="hs-check")
                        with gr.Row():
                            mode = gr.Radio(list(chat.MODES), value="HASS", label="Mode", scale=2, elem_id="hs-mode")
                            highlight = gr.Checkbox(True, label="Colour tokens by source", scale=1,
                                                    elem_id="hs-highlight")
                        status = gr.Markdown("", elem_id="hs-status", min_height=40)
                        check_out = gr.Markdown("", elem_id="hs-check-out")
                        gr.HTML(legend_html(include_series=False), elem_id="hs-legend")
                        gr.Examples(example_prompts(), inputs=[msg], label="Examples (MT-bench, HumanEval, GSM8K)",
                                    examples_per_page=9)
                        with gr.Accordion("Settings", open=False, elem_id="hs-settings"):
                            with gr.Row():
                                model_spec = gr.Textbox(studio.model_spec, label=(
                                    "Model (fixed by the operator of this public studio)" if public else
                                    "Model (default, a folder, a .gguf file or a hub id; shared by all users)"),
                                    scale=4, elem_id="hs-model", interactive=not public)
                                model_btn = gr.Button("Load model", scale=1, elem_id="hs-model-load",
                                                      interactive=not public)
                            with gr.Row():
                                choices = [c for c in DRAFT_CHOICES if not (public and c == "path")]
                                draft_choice = gr.Dropdown(choices, value=None, label="Draft", scale=2,
                                                           elem_id="hs-draft")
                                draft_path = gr.Textbox("", label="Draft folder (for 'path')", scale=3,
                                                        elem_id="hs-draft-path", visible=not public)
                                draft_btn = gr.Button("Use draft", scale=1, elem_id="hs-draft-use")
                            settings_status = gr.Markdown(f"draft: **{draft_label}**", elem_id="hs-settings-status")
                            with gr.Row():
                                temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)",
                                                        elem_id="hs-temperature")
                                top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p")
                                max_new = gr.Number(256, label="Max new tokens", precision=0, elem_id="hs-max-new")
                            with gr.Row():
                                total = gr.Number(t.total_tokens, label="Tree total tokens", precision=0)
                                depth = gr.Number(t.depth, label="Tree depth", precision=0)
                                topk = gr.Number(t.top_k, label="Tree top-k", precision=0)
                            with gr.Row():
                                tree_rule = gr.Radio([("fitted per step (this machine)", "fitted"),
                                                      ("fixed (the numbers above)", "fixed")], value="fitted",
                                                     label="Tree size", scale=3, elem_id="hs-tree-rule")
                                lookup_on = gr.Checkbox(True, label="Lookup candidates (copy from the context)",
                                                        scale=2, elem_id="hs-lookup")
                            gr.Markdown(f"Tree: {studio.tree_source}.")
                            tree_rule.change(chat.set_tree_rule, [state, tree_rule], [state])
                            lookup_on.change(chat.set_lookup, [state, lookup_on], [state])
                    with gr.Column(scale=5, min_width=420):
                        stats = gr.Markdown("No answer yet.", elem_id="hs-stats")
                        slider = gr.Slider(0, 1, value=0, step=1, label="Replay a step", interactive=False,
                                           elem_id="hs-step")
                        replay_info = gr.Markdown("", elem_id="hs-replay")
                        with gr.Tabs():
                            with gr.Tab("Tree"):
                                tree_plot = gr.Plot(empty_figure("send a message to see the draft tree", "Draft tree"),
                                                    show_label=False, elem_id="hs-tree")
                                mask_plot = gr.Plot(empty_figure("no step yet", "Tree mask"), show_label=False,
                                                    elem_id="hs-mask")
                            with gr.Tab("Acceptance"):
                                depth_plot = gr.Plot(empty_figure("no speculative steps yet", "Acceptance by depth"),
                                                     show_label=False, elem_id="hs-depth")
                            with gr.Tab("Speed"):
                                speed_plot = gr.Plot(empty_figure("no tokens yet", "Tokens over time"),
                                                     show_label=False, elem_id="hs-speed")
                                time_plot = gr.Plot(empty_figure("no steps yet", "Time per step"), show_label=False,
                                                    elem_id="hs-time")
                            with gr.Tab("Cost", elem_id="hs-cost-tab"):
                                cost_text = gr.Markdown(cost0[1], elem_id="hs-cost-text")
                                cost_plot = gr.Plot(cost0[0], show_label=False, elem_id="hs-cost")

            # ---------------------------------------------------------------- race / A-B
            with gr.Tab("Race / A-B", id="race"):
                gr.Markdown("The same prompt decoded by **plain** decoding and by **HASS** at the same time: after "
                            "a short warm-up the two decoders take turns step by step (the next step goes to the "
                            "side that has used less decoding time), so both run under the same machine conditions "
                            "and each side's progress on screen is its speed. The speedup is plain time / HASS "
                            "time for the same new tokens; the **Cost** panel below says why it came out that way "
                            "on this machine. **A/B** races the shipped HASS draft against another draft and "
                            "compares their acceptance by depth, next to each draft's held-out accuracy per "
                            "alignment pass (what HASS's training changes). Uses the chat's settings and draft; an "
                            "empty prompt reuses the chat's last message.")
                with gr.Row(equal_height=True):
                    race_prompt = gr.Textbox(placeholder="Prompt for the race…", show_label=False, scale=4,
                                             elem_id="hs-race-prompt")
                    race_btn = gr.Button("Race plain vs HASS", variant="primary", scale=1, min_width=170,
                                         elem_id="hs-race")
                    ab_other = gr.Dropdown(list(race_view.AB_CHOICES), value=race_view.AB_CHOICES[0],
                                           label="A/B: shipped HASS draft against", scale=1, min_width=230,
                                           elem_id="hs-ab-other")
                    ab_btn = gr.Button("Run A/B", scale=0, min_width=110, elem_id="hs-ab")
                    race_stop = gr.Button("Stop", variant="stop", scale=0, min_width=90, elem_id="hs-race-stop")
                race_status = gr.Markdown("", elem_id="hs-race-status")
                with gr.Row(equal_height=False):
                    left = gr.HTML("", elem_id="hs-race-left")
                    right = gr.HTML("", elem_id="hs-race-right")
                with gr.Row():
                    race_speed = gr.Plot(empty_figure("the race has not started", "Speedup"), show_label=False,
                                         elem_id="hs-race-speed")
                    race_depth = gr.Plot(empty_figure("no speculative steps yet", "Acceptance by depth"),
                                         show_label=False, elem_id="hs-race-depth")
                with gr.Row(equal_height=False):
                    with gr.Column():
                        race_cost = gr.Plot(race_cost0[0], show_label=False, elem_id="hs-race-cost")
                        race_cost_text = gr.Markdown(race_cost0[1], elem_id="hs-race-cost-text")
                    with gr.Column():
                        passes_plot = gr.Plot(passes0[0], show_label=False, elem_id="hs-passes")
                        passes_text = gr.Markdown(passes0[1], elem_id="hs-passes-text")

            # ---------------------------------------------------------------- train
            with gr.Tab("Train", id="train"):
                gr.Markdown("Train a small HASS draft on prepared target features in the background (one run at a "
                            "time for everyone), watch the loss and top-1 accuracy per alignment pass, then use it "
                            "in the chat. Training shares the CPU with decoding.")
                with gr.Row():
                    data = gr.Textbox(training.default_data(), label="Prepared feature folder", scale=4,
                                      elem_id="hs-data", interactive=not public)
                    n_dlg = gr.Number(16, label="…or prepare N dialogues", precision=0, scale=1)
                    prep_btn = gr.Button("Prepare", scale=1)
                with gr.Row():
                    budget = gr.Radio(["steps", "minutes"], value="steps", label="Budget", elem_id="hs-budget")
                    steps_in = gr.Number(50, label="Steps", precision=0, elem_id="hs-train-steps")
                    minutes_in = gr.Number(2, label="Minutes")
                    n_in = gr.Number(3, label="n (align steps)", precision=0)
                    k_in = gr.Number(10, label="K (top-K)", precision=0)
                    w_in = gr.Number(1.0, label="w (top-K weight)")
                    lr_in = gr.Number(1e-3, label="lr")
                with gr.Row():
                    train_btn = gr.Button("Start training", variant="primary", elem_id="hs-train-start")
                    train_cancel = gr.Button("Cancel", variant="stop", elem_id="hs-train-cancel")
                    use_btn = gr.Button("Use this draft in the chat", elem_id="hs-train-use")
                    eval_q = gr.Number(3, label="τ eval questions", precision=0, scale=0)
                    eval_btn = gr.Button("Quick τ evaluation", elem_id="hs-train-eval")
                progress = gr.HTML(training.progress_html(0, "no run yet"), elem_id="hs-train-progress")
                train_status = gr.Markdown("", elem_id="hs-train-status")
                train_plot = gr.Plot(empty_figure("no training metrics yet", "Training", height=420),
                                     show_label=False, elem_id="hs-train-plot")
                eval_out = gr.Markdown("", elem_id="hs-train-eval-out")
                timer = gr.Timer(1.0, active=False)
                seen = gr.State(-1)

            with gr.Tab("Batch", id="batch"):
                batch_view.build(studio, state, {"concurrency_limit": 1, "concurrency_id": DECODE})

            with gr.Tab("About", id="about"):
                gr.Markdown(chat.machine_markdown(studio), elem_id="hs-machine")
                gr.Markdown(ABOUT)
                gr.HTML(legend_html(include_series=True))

        # ------------------------------------------------------------------ wiring
        settings = [mode, temperature, top_p, max_new, total, depth, topk, highlight]
        chat_out = [state, chat_box, msg, status, stats, tree_plot, mask_plot, depth_plot, speed_plot, time_plot,
                    slider, replay_info, cost_plot, cost_text]
        submit_out = [state, chat_box, msg, status, replay_info]
        dec = {"concurrency_limit": 1, "concurrency_id": DECODE}
        # first at once (outside the queue): the message appears with what it waits for; then the
        # answer in the decoding queue, its queue position shown on the status line. "multiple":
        # a click while this tab's answer streams is queued behind it, never dropped.
        now = {"concurrency_limit": None, "show_progress": "hidden", "trigger_mode": "multiple",
               "api_visibility": "private"}
        queued = {"show_progress": "minimal", "show_progress_on": [status], "trigger_mode": "multiple", **dec}
        answer_fn = partial(chat.answer, studio)
        ev_send = send_btn.click(partial(chat.submit, studio), [state, msg, *settings], submit_out, **now).then(
            answer_fn, [state, *settings, msg], chat_out, api_visibility="private", **queued)
        ev_submit = msg.submit(partial(chat.submit, studio), [state, msg, *settings], submit_out, **now).then(
            answer_fn, [state, *settings, msg], chat_out, api_visibility="private", **queued)
        ev_regen = regen_btn.click(partial(chat.regenerate_submit, studio), [state, *settings], submit_out,
                                   **now).then(answer_fn, [state, *settings, msg], chat_out, api_visibility="private",
                                               **queued)
        # the API: one call that sends and streams the answer (tools/space_check.py uses it)
        api_send = gr.Button(visible=False, elem_id="hs-api-send")
        api_send.click(partial(chat.send, studio), [state, msg, *settings], chat_out, show_progress="hidden",
                       api_name="send", **dec)
        stop_btn.click(partial(chat.stop, studio), [state, highlight, msg], chat_out,
                       cancels=[ev_send, ev_submit, ev_regen], concurrency_limit=None, show_progress="hidden",
                       api_name="stop")
        clear_btn.click(partial(chat.clear, studio=studio), [state, highlight], chat_out,
                        cancels=[ev_send, ev_submit, ev_regen], concurrency_limit=None, api_name="clear")
        highlight.change(chat.rehighlight, [state, highlight], chat_box, concurrency_limit=None,
                         show_progress="hidden")
        slider.release(partial(chat.replay, studio), [state, slider], [tree_plot, mask_plot, replay_info],
                       concurrency_limit=None, show_progress="hidden", api_name="replay")
        check_btn.click(partial(chat.check_lossless, studio), [state, msg, max_new, total, depth, topk], check_out,
                        api_name="check_lossless", **dec)

        def header(session):
            return chat.header_markdown(studio, session)

        model_btn.click(partial(chat.load_model, studio), [model_spec], [settings_status, total, depth, topk],
                        api_name="load_model", **dec).then(header, [state], [title], concurrency_limit=None,
                                                           show_progress="hidden", api_visibility="private")

        def set_draft(session, choice, path):
            session, msg_ = chat.set_draft(studio, session, choice, path)
            return session, msg_, chat.header_markdown(studio, session)

        draft_btn.click(set_draft, [state, draft_choice, draft_path], [state, settings_status, title],
                        api_name="set_draft", **dec)

        race_in = [state, race_prompt, temperature, top_p, max_new, total, depth, topk, highlight]
        race_out = [left, right, race_speed, race_depth, race_status]
        queued_race = {"show_progress": "minimal", "show_progress_on": [race_status], "trigger_mode": "multiple",
                       **dec}
        # the race starts only when race_submit accepts it (.success); a click while this tab's race
        # runs is refused with a message saying why, never silently dropped
        ev_race = race_btn.click(partial(race_view.race_submit, studio), [state], [state, race_status], **now).success(
            partial(race_view.race, studio), race_in, race_out, api_name="race", **queued_race)
        ev_race.then(partial(race_view.race_cost_panel, studio), [state], [race_cost, race_cost_text],
                     concurrency_limit=None, show_progress="hidden", api_visibility="private")
        ev_ab = ab_btn.click(partial(race_view.ab_submit, studio), [state, ab_other],
                             [state, race_status, passes_plot, passes_text], **now).success(
            partial(race_view.ab, studio), [*race_in, ab_other], race_out, api_name="ab", **queued_race)
        ev_ab.then(partial(race_view.race_cost_panel, studio), [state], [race_cost, race_cost_text],
                   concurrency_limit=None, show_progress="hidden", api_visibility="private")
        race_stop.click(partial(race_view.race_stop, studio), [state], race_status, cancels=[ev_race, ev_ab],
                        concurrency_limit=None, api_name="race_stop")

        prep_btn.click(partial(training.prepare_small, studio), [n_dlg], [data, train_status], api_name="prepare", **dec)
        train_btn.click(partial(training.start, manager), [state, data, budget, minutes_in, steps_in, n_in, k_in,
                                                           w_in, lr_in],
                        [state, progress, train_plot, train_status, timer], concurrency_limit=None,
                        api_name="train")
        timer.tick(partial(training.poll, manager), [state, seen], [progress, train_plot, train_status, timer, seen],
                   concurrency_limit=None, show_progress="hidden", api_name="train_poll")
        train_cancel.click(partial(training.cancel, manager), [state], train_status, concurrency_limit=None,
                           api_name="train_cancel")

        def use_draft(session):
            """The trained draft in the chat: the Train tab, the Settings line, the Draft choice and the
            title all name it (its folder's short name)."""
            session, msg_ = training.use_draft(studio, manager, session)
            if msg_.startswith("⚠️"):
                return session, msg_, gr.skip(), gr.skip(), gr.skip()
            return (session, msg_, f"draft: **{session.draft_label}** (trained in this app)",
                    chat.header_markdown(studio, session), "trained in this app")

        use_btn.click(use_draft, [state], [state, train_status, settings_status, title, draft_choice],
                      concurrency_limit=None, api_name="use_draft")
        # a new visitor sees the current (or last) run at once, and follows it while it runs
        demo.load(partial(training.poll, manager), [state, seen], [progress, train_plot, train_status, timer, seen],
                  api_visibility="private", show_progress="hidden")
        eval_btn.click(partial(training.eval_tau, studio, manager), [eval_q], eval_out, api_name="eval_tau", **dec)
    return demo


__all__ = ["build", "css", "example_prompts", "DECODE"]
