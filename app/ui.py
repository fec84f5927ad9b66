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
output; at temperature > 0 the acceptance rule keeps the output distributed exactly like
plain sampling. Nothing about the answer changes: only the speed. The *Check losslessness*
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
- **Speedup**: plain decoding time / speculative time for the same prompt and the same new
  tokens, measured in the same process after a warm-up, the two decoders taking turns step by
  step so both see the same machine conditions (the *Race* tab). During a normal
  chat the speed panel shows tokens over time of that answer alone.
- **Time split**: where each step's time goes: drafting (the tree), verifying (the target
  forward) and other bookkeeping.

On a CPU with a 135M-parameter target the target forward is cheap, so drafting costs
relatively more than on a GPU with a 7B target; the speedups here are smaller than the
paper's (2.8-4×) while τ tells how good the draft is.
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

    with gr.Blocks(title="HASS Studio") as demo:
        def fresh_session() -> Session:
            return Session(draft_spec=studio.default_draft_spec)

        state = gr.State(fresh_session)
        public = studio.policy.public
        gr.Markdown(f"# HASS Studio\nLossless speculative decoding with a HASS draft head and an EAGLE-2 "
                    f"dynamic draft tree · model **{studio.target.name}** ({studio.target.weights} weights) · "
                    f"draft **{draft_label}**" + studio.weights_note(), elem_id="hs-title")
        if public:
            gr.Markdown(studio.policy.describe(), elem_id="hs-public")
        with gr.Tabs():
            # ---------------------------------------------------------------- chat
            with gr.Tab("Chat", id="chat"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=5, min_width=360):
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
                        status = gr.Markdown("", elem_id="hs-status")
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
                                temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
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
                    with gr.Column(scale=6, min_width=420):
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

            # ---------------------------------------------------------------- race / A-B
            with gr.Tab("Race / A-B", id="race"):
                gr.Markdown("The same prompt decoded by **plain** decoding and by **HASS** at the same time: after "
                            "a short warm-up the two decoders take turns step by step (the next step goes to the "
                            "side that has used less decoding time), so both run under the same machine conditions "
                            "and each side's progress on screen is its speed. The speedup is plain time / HASS "
                            "time for the same new tokens. **A/B** races the shipped HASS draft against another "
                            "draft and compares their acceptance by depth. Uses the chat's settings and draft; an "
                            "empty prompt reuses the chat's last message.")
                with gr.Row(equal_height=True):
                    race_prompt = gr.Textbox(placeholder="Prompt for the race…", show_label=False, scale=4,
                                             elem_id="hs-race-prompt")
                    race_btn = gr.Button("Race plain vs HASS", variant="primary", scale=1, min_width=170,
                                         elem_id="hs-race")
                    ab_other = gr.Dropdown(list(chat.AB_CHOICES), value=chat.AB_CHOICES[0],
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
                gr.Markdown(ABOUT)
                gr.HTML(legend_html(include_series=True))

        # ------------------------------------------------------------------ wiring
        settings = [mode, temperature, top_p, max_new, total, depth, topk, highlight]
        chat_out = [state, chat_box, msg, status, stats, tree_plot, mask_plot, depth_plot, speed_plot, time_plot,
                    slider]
        dec = {"concurrency_limit": 1, "concurrency_id": DECODE}
        send_fn = partial(chat.send, studio)
        ev_send = send_btn.click(send_fn, [state, msg, *settings], chat_out, show_progress="hidden", api_name="send", **dec)
        ev_submit = msg.submit(send_fn, [state, msg, *settings], chat_out, show_progress="hidden", api_name="submit",
                               **dec)
        ev_regen = regen_btn.click(partial(chat.regenerate, studio), [state, *settings], chat_out,
                                   show_progress="hidden", api_name="regenerate", **dec)
        stop_btn.click(partial(chat.stop, studio), [state, highlight], chat_out, cancels=[ev_send, ev_submit, ev_regen],
                       concurrency_limit=None, show_progress="hidden", api_name="stop")
        clear_btn.click(chat.clear, [state, highlight], chat_out, cancels=[ev_send, ev_submit, ev_regen],
                        concurrency_limit=None)
        highlight.change(chat.rehighlight, [state, highlight], chat_box, concurrency_limit=None,
                         show_progress="hidden")
        slider.release(partial(chat.replay, studio), [state, slider], [tree_plot, mask_plot, replay_info],
                       concurrency_limit=None, show_progress="hidden", api_name="replay")
        check_btn.click(partial(chat.check_lossless, studio), [state, msg, max_new, total, depth, topk], check_out,
                        api_name="check_lossless", **dec)
        model_btn.click(partial(chat.load_model, studio), [model_spec], [settings_status, total, depth, topk],
                        api_name="load_model", **dec)
        draft_btn.click(partial(chat.set_draft, studio), [state, draft_choice, draft_path], [state, settings_status],
                        api_name="set_draft", **dec)

        race_in = [state, race_prompt, temperature, top_p, max_new, total, depth, topk, highlight]
        race_out = [left, right, race_speed, race_depth, race_status]
        ev_race = race_btn.click(partial(chat.race, studio), race_in, race_out, show_progress="hidden", api_name="race",
                                 **dec)
        ev_ab = ab_btn.click(partial(chat.ab, studio), [*race_in, ab_other], race_out, show_progress="hidden",
                             api_name="ab", **dec)
        race_stop.click(lambda s: (studio.stop(s), "stopped")[1] if s else "stopped", [state], race_status,
                        cancels=[ev_race, ev_ab], concurrency_limit=None, api_name="race_stop")

        prep_btn.click(partial(training.prepare_small, studio), [n_dlg], [data, train_status], api_name="prepare", **dec)
        train_btn.click(partial(training.start, manager), [state, data, budget, minutes_in, steps_in, n_in, k_in,
                                                           w_in, lr_in],
                        [state, progress, train_plot, train_status, timer], concurrency_limit=None,
                        api_name="train")
        timer.tick(partial(training.poll, manager), [state, seen], [progress, train_plot, train_status, timer, seen],
                   concurrency_limit=None, show_progress="hidden", api_name="train_poll")
        train_cancel.click(partial(training.cancel, manager), [state], train_status, concurrency_limit=None,
                           api_name="train_cancel")
        use_btn.click(partial(training.use_draft, studio, manager), [state], [state, train_status],
                      concurrency_limit=None, api_name="use_draft")
        # a new visitor sees the current (or last) run at once, and follows it while it runs
        demo.load(partial(training.poll, manager), [state, seen], [progress, train_plot, train_status, timer, seen],
                  api_visibility="private", show_progress="hidden")
        eval_btn.click(partial(training.eval_tau, studio, manager), [eval_q], eval_out, api_name="eval_tau", **dec)
    return demo


__all__ = ["build", "css", "example_prompts", "DECODE"]
