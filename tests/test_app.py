"""Handler tests for the Gradio studio, on tiny in-memory targets (no browser, no default model).

The chat target is a peaked random LLaMA (tests/conftest.build_tiny_target) with the
default model's tokenizer attached, so the real chat template renders the conversation;
the draft is random (exact output, few accepted tokens).
"""
from __future__ import annotations

import re
import time

import pytest

from app import chat, training
from app import race as race_mod
from app.studio import DecodeRun, Session, SettingsError, Studio, TokenTexts, make_config
from app.training import TrainingManager
from hass.target import Target, load_target

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request

SETTINGS = dict(mode="HASS", temperature=0, top_p=1, max_new_tokens=24, total_tokens=16, depth=4, top_k=4)


def settings(**kw):
    s = dict(SETTINGS)
    s.update(kw)
    return [s["mode"], s["temperature"], s["top_p"], s["max_new_tokens"], s["total_tokens"], s["depth"], s["top_k"]]


@pytest.fixture(scope="module")
def chat_target(make_chat_target) -> Target:
    return make_chat_target("tiny-chat", 512)


@pytest.fixture()
def studio(chat_target) -> Studio:
    return Studio(chat_target, model_spec="tiny", draft_spec="random", training=TrainingManager())


@pytest.fixture()
def session(studio) -> Session:
    """A tab with the tree size fixed by the settings below: a random draft on a tiny model
    pays for no node, so a fitted tree would verify the root alone and show no draft depths."""
    s = Session()
    s.draft_spec = "random"
    s.tree_rule = "fixed"
    return s


def slow(studio: Studio, monkeypatch, delay: float = 0.02):
    """Make every decoding step take `delay` s more, so a stream has many updates."""
    real = studio.generator

    def gen(*a, **kw):
        inner = real(*a, **kw)

        def wrapped():
            for st in inner:
                time.sleep(delay)
                yield st
        return wrapped()
    monkeypatch.setattr(studio, "generator", gen)
    monkeypatch.setattr(chat, "TEXT_EVERY", 0.0)
    monkeypatch.setattr(chat, "UI_SHARE", 1.0)         # no UI budget: every step is an update


def run_all(gen) -> list:
    return list(gen)


def test_streaming_yields_growing_text_and_highlighted_tokens(studio, session, monkeypatch):
    slow(studio, monkeypatch)
    lengths, htmls = [], []
    for out in chat.send(studio, session, "Hello there!", *settings(), True):
        s = out[0]
        lengths.append(len(s.turns[-1].answer))
        htmls.append(out[1])
    assert len(lengths) >= 4
    assert lengths == sorted(lengths) and lengths[-1] > 0
    assert len({n for n in lengths}) >= 3, lengths            # the text grew over several updates
    turn = session.turns[-1]
    assert not turn.running and turn.steps
    n_tokens = sum(len(st.new_tokens) for st in turn.steps)
    assert htmls[-1].count('class="hs-tok"') == n_tokens       # one coloured span per token
    assert "".join(turn.texts) == turn.answer                  # spans add up to the answer
    assert session.history()[-1] == {"role": "assistant", "content": turn.answer}
    # highlighting off: same text, no coloured spans
    plain = chat.rehighlight(session, False)
    assert 'class="hs-tok"' not in plain
    # replay any step
    tree, mask, info = chat.replay(studio, session, 1)
    assert "step 1" in info and tree is not None and mask is not None


def test_updates_stay_within_the_ui_budget(studio, session, monkeypatch):
    """A slow consumer (Gradio postprocessing, the network) gets fewer updates: the time
    spent at `yield` stays within UI_SHARE of the wall time, and the text still streams."""
    slow(studio, monkeypatch, delay=0.01)
    monkeypatch.setattr(chat, "UI_SHARE", 0.06)
    monkeypatch.setattr(chat, "TEXT_EVERY", 0.02)
    cost, n, lengths = 0.03, 0, []
    t0 = time.perf_counter()
    for out in chat.send(studio, session, "Tell me a long story.", *settings(mode="plain", max_new_tokens=250), True):
        n += 1
        lengths.append(len(out[0].turns[-1].answer))
        time.sleep(cost)                                     # what each update costs the server
    wall = time.perf_counter() - t0
    assert wall > 2.0 and len(session.turns[-1].ids) == 250
    assert n * cost <= 0.06 * wall + 3 * cost, (n, wall)    # 3 = the first, the last and one in flight
    assert len(set(lengths)) >= 3, lengths                   # still streaming


def test_stop_keeps_partial_answer_and_history(studio, session, monkeypatch):
    slow(studio, monkeypatch, delay=0.05)
    run_all(chat.send(studio, session, "First question", *settings(max_new_tokens=8), True))
    assert len(session.turns) == 1
    g = chat.send(studio, session, "Second question", *settings(max_new_tokens=200), True)
    for _, out in zip(range(4), g):
        pass
    out = chat.stop(studio, session, True)                    # the Stop button
    g.close()                                                  # Gradio cancels the event
    turn = session.turns[-1]
    assert not turn.running and turn.note == "stopped"
    assert 0 < len(turn.ids) < 200 and turn.answer
    assert "stopped" in out[3]
    hist = session.history()
    assert [m["role"] for m in hist] == ["user", "assistant", "user", "assistant"]
    assert hist[-1]["content"] == turn.answer
    # the chat goes on after a stop
    run_all(chat.send(studio, session, "Third", *settings(max_new_tokens=6), True))
    assert len(session.turns) == 3 and session.turns[-1].answer


def test_cancel_without_stop_button_leaves_partial_answer(studio, session, monkeypatch):
    slow(studio, monkeypatch, delay=0.05)
    g = chat.send(studio, session, "Tell me a story", *settings(max_new_tokens=200), True)
    for _, out in zip(range(4), g):
        pass
    g.close()
    turn = session.turns[-1]
    assert not turn.running and turn.note == "stopped" and 0 < len(turn.ids) < 200


@pytest.mark.parametrize("bad, words", [
    (dict(temperature="hot"), "temperature"),
    (dict(max_new_tokens=0), "max new tokens"),
    (dict(max_new_tokens=2.5), "whole number"),
    (dict(top_k=0), "top-k"),
    (dict(depth=None), "depth"),
    (dict(total_tokens=5000), "total tokens"),
    (dict(top_p=0), "top-p"),
    (dict(mode="turbo"), "mode"),
])
def test_invalid_settings_give_a_message_and_keep_history(studio, session, bad, words):
    run_all(chat.send(studio, session, "Hi", *settings(max_new_tokens=4), True))
    before = session.history()
    outs = run_all(chat.send(studio, session, "again", *settings(**bad), True))
    assert len(outs) == 1
    status = outs[0][3]
    assert status.startswith("⚠️") and words in status, status
    assert session.history() == before and len(session.turns) == 1


def test_empty_message_and_too_long_prompt_are_refused(studio, session):
    out = run_all(chat.send(studio, session, "   ", *settings(), True))
    assert "type a message" in out[0][3] and not session.turns
    out = run_all(chat.send(studio, session, "word " * 2000, *settings(), True))
    assert out[0][3].startswith("⚠️") and "too long" in out[0][3] and not session.turns


def test_regenerate_replaces_last_answer_and_keeps_it_on_error(studio, session):
    run_all(chat.send(studio, session, "Hi", *settings(max_new_tokens=6), True))
    run_all(chat.regenerate(studio, session, *settings(max_new_tokens=6, temperature=0.9), True))
    assert len(session.turns) == 1 and session.turns[0].user == "Hi" and session.turns[0].answer
    old = session.turns[0]
    outs = run_all(chat.regenerate(studio, session, *settings(top_k=0), True))
    assert outs[-1][3].startswith("⚠️") and session.turns == [old]


def test_clear_and_plain_mode(studio, session):
    run_all(chat.send(studio, session, "Hi", *settings(mode="plain", max_new_tokens=5), True))
    t = session.turns[-1]
    assert t.mode == "plain" and all(st.kind in ("prefill", "plain") for st in t.steps)
    out = chat.clear(session, True)
    assert out[0].turns == [] and "Ask something" in out[1]


def test_acceptance_panel_has_one_series_per_draft_used_in_the_conversation(studio, session, chat_target, tmp_path):
    from hass.draft import new_draft, save_draft
    other = tmp_path / "other-draft"
    save_draft(new_draft(chat_target.config, seed=1), other)
    outs = run_all(chat.send(studio, session, "Hi", *settings(max_new_tokens=6), True))
    depth = outs[-1][7]
    assert [tr.name.split(" (τ")[0] for tr in depth.data] == ["HASS (this conversation)"]
    _, msg = chat.set_draft(studio, session, "path", str(other))
    assert not msg.startswith("⚠️"), msg
    run_all(chat.send(studio, session, "Hi again", *settings(mode="plain", max_new_tokens=4), True))
    outs = run_all(chat.send(studio, session, "And again", *settings(max_new_tokens=6), True))
    depth = outs[-1][7]
    assert [tr.name.split(" (τ")[0] for tr in depth.data] == ["random", "other-draft"]
    assert depth.data[0].marker.color != depth.data[1].marker.color


def test_failed_model_load_keeps_previous_model(studio):
    before = studio.target
    status, *_ = chat.load_model(studio, "/no/such/model/folder")
    assert status.startswith("⚠️") and "could not load" in status
    assert studio.target is before
    status, *_ = chat.load_model(studio, "")
    assert status.startswith("⚠️") and studio.target is before


def test_draft_choices_fall_back_with_a_message(studio, session):
    _, msg = chat.set_draft(studio, session, "shipped EAGLE-2")
    assert msg.startswith("⚠️") and "no shipped eagle2 draft" in msg
    _, msg = chat.set_draft(studio, session, "trained in this app")
    assert msg.startswith("⚠️") and "no draft has been trained" in msg
    _, msg = chat.set_draft(studio, session, "path", "/no/such/draft")
    assert msg.startswith("⚠️")
    assert session.draft_spec == "random"                     # unchanged by the failures
    _, msg = chat.set_draft(studio, session, "random")
    assert "random" in msg and session.draft_spec == "random"


def _capture_runs(studio, monkeypatch) -> list:
    runs = []
    real = studio.start

    def start(*a, **kw):
        run = real(*a, **kw)
        runs.append(run)
        return run
    monkeypatch.setattr(studio, "start", start)
    return runs


def test_race_interleaves_streams_both_sides_and_reports_the_time_ratio(studio, session, monkeypatch):
    runs = _capture_runs(studio, monkeypatch)
    slow(studio, monkeypatch, delay=0.02)        # outside the decoders' clocks: many UI updates
    outs = run_all(race_mod.race(studio, session, "Count to ten.", 0, 1, 24, 16, 4, 4, True, warmup=2))
    left, right, speed, depth, status = outs[-1]
    (run,) = runs
    assert run.error is None
    names = ["plain", "HASS (random)"]
    racing = [n for n in run.order if n in names]
    warm = [n for n in run.order if n.startswith("warmup")]
    assert warm and run.order[:len(warm)] == warm                 # the warm-up runs first, not shown
    # interleaved: the sides take turns long before either is done (not all of one, then the other)
    first_b = racing.index(names[1])
    assert first_b < racing.count(names[0]) - 1, racing
    assert racing[first_b + 1:].count(names[0]) > 0, racing
    # both panes streamed at once: some update shows tokens on both sides before either was done
    done = " · done</div>"
    both = [o for o in outs[:-1] if isinstance(o[0], str) and isinstance(o[1], str) and "hs-tok" in o[0]
            and "hs-tok" in o[1] and done not in o[0] and done not in o[1]]
    assert both, "the two sides never streamed at the same time"
    # greedy: the same tokens on both sides, so the speedup is plain time / HASS time
    ratio = run.used[names[0]] / run.used[names[1]]
    verdict = "faster than plain" if ratio >= 1 else "the speed of plain: plain is"
    assert f"{ratio:.2f}×" in status and verdict in status, status
    assert "for the same 24 new tokens (identical token ids)" in status, status
    assert "×" in speed.layout.title.text and verdict in speed.layout.title.text
    assert {tr.name.split(" (τ")[0] for tr in speed.data} == set(names)
    assert 'class="hs-tok"' in right and "plain" in left and done in left and done in right


def test_decode_run_gives_the_next_step_to_the_side_with_less_time():
    from hass.events import Step

    def fake(seconds: float, n: int):
        for i in range(n):
            yield Step(index=i, kind="plain", tree=None, path=[], accepted=0, new_tokens=[1], sources=["target"],
                       target_prob=[1.0], timings={"draft": 0.0, "verify": seconds, "other": 0.0},
                       stop_reason="max_new_tokens" if i == n - 1 else None)
    run = DecodeRun([("warm", fake(1.0, 2))], race=[("fast", fake(0.25, 9)), ("slow", fake(0.75, 3))]).start()
    run.wait(10)
    assert run.error is None and run.q.qsize() == 14
    # the warm-up first; then 'fast' (0.25 s steps) gets three steps for every step of 'slow'
    # (0.75 s): the next step always goes to the side with less time used (ties: the order given)
    assert run.order == ["warm", "warm"] + ["fast", "slow", "fast", "fast", "fast", "slow", "fast", "fast",
                                            "fast", "slow", "fast", "fast"], run.order
    assert run.used == {"warm": 2.0, "fast": 2.25, "slow": 2.25}


def test_speedup_verdict_says_slower_when_it_is():
    from hass.events import Step

    def side(seconds: float, tokens: list[int], kind: str):
        return [Step(index=0, kind=kind, tree=None, path=[], accepted=0, new_tokens=tokens,
                     sources=["target"] * len(tokens), target_prob=[1.0] * len(tokens),
                     timings={"draft": 0.0, "verify": seconds, "other": 0.0})]
    fast = race_mod.race_verdict({"plain": side(1.0, [1, 2, 3], "plain"), "HASS": side(0.5, [1, 2, 3], "plain")})
    assert "2.00× faster than plain" in fast and "same 3 new tokens (identical token ids)" in fast
    slow_ = race_mod.race_verdict({"plain": side(1.0, [1, 2, 3], "plain"), "HASS": side(1.25, [1, 2, 3], "plain")})
    assert "HASS: 0.80× the speed of plain: plain is 1.25× faster" in slow_
    assert "faster than plain" not in slow_ and "slower" not in slow_
    other = race_mod.race_verdict({"plain": side(1.0, [1, 2], "plain"), "HASS": side(1.0, [1, 2, 3, 4], "plain")})
    assert "different lengths" in other and "2.00× faster" in other
    sampled = race_mod.race_verdict({"plain": side(1.0, [1, 2, 3], "plain"), "HASS": side(0.5, [1, 2, 4], "plain")})
    assert "2.00× faster" in sampled and "for 3 new tokens each" in sampled and "identical" not in sampled


def test_ab_without_shipped_drafts_says_why(studio, session):
    outs = run_all(race_mod.ab(studio, session, "Hi", 0, 1, 8, 16, 4, 4, True))
    assert len(outs) == 1 and "A/B compares against the shipped HASS draft" in outs[0][4]


@pytest.fixture(scope="module")
def default_studio(tmp_path_factory) -> Studio:
    """The real default model with its shipped drafts (the model the app starts with)."""
    target = load_target("default", device="cpu", dtype="fp32")
    return Studio(target, "default", "default", training=TrainingManager(tmp_path_factory.mktemp("app-drafts")))


def test_ab_with_the_shipped_drafts_on_the_default_model(default_studio):
    studio = default_studio
    assert studio.shipped("hass") is not None and studio.shipped("eagle2") is not None
    t = studio.tree_defaults
    outs = run_all(race_mod.ab(studio, Session(), "Name three rivers in Europe.", 0, 1, 20, t.total_tokens, t.depth,
                               t.top_k, True, "shipped EAGLE-2", warmup=2))
    left, right, speed, depth, status = outs[-1]
    assert not status.startswith("⚠️"), status
    series = {tr.name.split(" (τ")[0]: tr for tr in depth.data}
    assert set(series) == {"HASS draft (shipped)", "EAGLE-2 draft (shipped)"}, list(series)
    for tr in series.values():
        assert len(tr.y) >= 1 and all(0 <= y <= 1 for y in tr.y) and tr.y[0] > 0     # depth 1 accepts something
    assert series["HASS draft (shipped)"].marker.color != series["EAGLE-2 draft (shipped)"].marker.color
    assert "HASS draft" in depth.layout.title.text and "EAGLE-2" in depth.layout.title.text
    # greedy and lossless: both drafts give the target's own tokens, so the times compare directly
    assert re.search(r"for the same \d+ new tokens \(identical token ids\)", status), status
    assert 'class="hs-tok"' in left and 'class="hs-tok"' in right
    # the other B choices explain themselves when they cannot run
    out = run_all(race_mod.ab(studio, Session(), "Hi", 0, 1, 8, 16, 4, 4, True, "trained in this app"))
    assert len(out) == 1 and "no draft has been trained" in out[0][4]
    out = run_all(race_mod.ab(studio, Session(draft_spec="default"), "Hi", 0, 1, 8, 16, 4, 4, True, "the chat's draft"))
    assert len(out) == 1 and "shipped HASS draft itself" in out[0][4]


def test_losslessness_check_says_identical(studio, session):
    msg = chat.check_lossless(studio, session, "Name three rivers.", 32, 16, 4, 4)
    assert "identical" in msg and "different" not in msg
    msg = chat.check_lossless(studio, Session(), "", 32, 16, 4, 4)
    assert msg.startswith("⚠️")


def test_make_config_and_token_texts(chat_target):
    cfg = make_config(0.7, 0.9, 10, 20, 5, 3)
    assert cfg.sampling.temperature == 0.7 and cfg.tree.total_tokens == 20
    with pytest.raises(SettingsError):
        make_config(0, 1, 10, 20, 5, 99999)
    ids = chat_target.tokenizer.encode("héllo wörld 🌳!")
    tt = TokenTexts(chat_target)
    pieces = tt.push(ids)
    assert "".join(pieces) == chat_target.decode(ids) and len(pieces) == len(ids)


def test_decode_run_stops_between_steps(studio, chat_target):
    ids = chat_target.render([{"role": "user", "content": "hi"}])
    gen = studio.generator("plain", ids, make_config(0, 1, 400, 16, 4, 4))
    run = DecodeRun([("plain", gen)]).start()
    got = run.drain(2.0)
    run.stop.set()
    run.wait(10)
    assert got and run.done.is_set() and run.error is None


def test_ui_builds(studio):
    from app.ui import build, css
    demo = build(studio)
    assert demo is not None and ".hs-tok" in css()


# -- training ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_data(tiny_folder, tmp_path_factory):
    from hass.data import Dialogue, prepare
    dialogues = [Dialogue(str(i), [{"role": "user", "content": f"Question {i}?"},
                                   {"role": "assistant", "content": f"Answer number {i}, short and sweet."}])
                 for i in range(6)]
    out = tmp_path_factory.mktemp("app-train-data")
    prepare(load_target(str(tiny_folder)), dialogues, out, max_len=64, progress=False, target_spec=str(tiny_folder))
    return out


def _wait(job, timeout=120):
    t0 = time.time()
    while job.running and time.time() - t0 < timeout:
        time.sleep(0.1)
    assert not job.running


def test_training_runs_one_at_a_time_and_its_draft_can_be_used(tiny_folder, train_data, tmp_path):
    manager = TrainingManager(runs_dir=tmp_path / "runs")
    studio = Studio(load_target(str(tiny_folder)), str(tiny_folder), "random", training=manager)
    alice, bob = Session(), Session()
    # invalid settings are refused with a message
    out = training.start(manager, alice, str(tmp_path / "nothing"), "steps", 1, 5, 3, 10, 1.0, 1e-3)
    assert out[3].startswith("⚠️") and manager.job is None
    out = training.start(manager, alice, str(train_data), "steps", 1, 5, 9, 10, 1.0, 1e-3)
    assert out[3].startswith("⚠️") and "n (align steps)" in out[3]

    out = training.start(manager, alice, str(train_data), "steps", 1, 5000, 2, 10, 1.0, 1e-3)
    assert out[3].startswith("started")
    job = manager.job
    out = training.start(manager, bob, str(train_data), "steps", 1, 5, 2, 10, 1.0, 1e-3)
    assert "another user" in out[3] and manager.job is job
    assert "another user" in training.cancel(manager, bob)
    t0 = time.time()
    while len(job.metrics) < 2 and job.running and time.time() - t0 < 120:
        time.sleep(0.1)
    prog, fig, status, _, seen = training.poll(manager, alice)
    assert "hs-progress" in prog and seen >= 2 and "training" in status
    assert fig.layout.title.text.startswith("Training")
    assert "cancelling" in training.cancel(manager, alice)
    _wait(job)
    assert job.error is None and len(job.metrics) < 5000
    prog, fig, status, timer, _ = training.poll(manager, alice, seen)
    assert "cancelled" in status and "100%" in prog
    assert manager.last_draft() is not None
    s, msg = training.use_draft(studio, manager, alice)
    assert "trained here" in msg and s.draft_spec == str(manager.last_draft())
    # a short run to the end, then the chat can use it
    training.start(manager, bob, str(train_data), "steps", 1, 3, 1, 5, 0.0, 1e-3)
    _wait(manager.job)
    assert "finished" in manager.job.describe() and len(manager.job.metrics) == 3
    outs = run_all(chat.send(studio, s, "Hi", *settings(max_new_tokens=4), True))
    assert outs[-1][0].turns[-1].draft.endswith(manager.job.out.name) or outs[-1][0].turns[-1].steps


def test_app_drafts_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HASS_APP_DRAFTS", str(tmp_path / "drafts"))
    assert TrainingManager().runs_dir == tmp_path / "drafts"
    monkeypatch.delenv("HASS_APP_DRAFTS")
    monkeypatch.setenv("HASS_CACHE", str(tmp_path / "cache"))
    assert TrainingManager().runs_dir == tmp_path / "cache" / "app-drafts"


def test_speedcheck_measures_the_app_handler_and_the_cli(tiny_folder, capsys):
    import json

    import torch

    from app import speedcheck
    threads = torch.get_num_threads()
    try:
        code = speedcheck.main(["--model", str(tiny_folder), "--draft", "random", "--prompt", "Hi", "--max-new-tokens",
                                "6", "--rounds", "1", "--total-tokens", "8", "--depth", "3", "--top-k", "3",
                                "--tolerance", "1.0", "--json"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert code == 0 and res["same_ids"] and res["settings"]["total_tokens"] == 8
    assert [r["side"] for r in res["runs"]] == ["app", "cli"]
    app_run, cli_run = res["runs"]
    assert app_run["tokens"] == cli_run["tokens"] > 0 and app_run["updates"] >= 2 and app_run["sent_chars"] > 0
    assert res["ratio"] == pytest.approx(res["app_tokens_per_s"] / res["cli_tokens_per_s"])
    assert any(line.startswith("app ") and "app / CLI" in line for line in lines)


def test_entry_point_flags():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("app_entry", Path(__file__).resolve().parent.parent / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = mod.parse_args([])
    assert a.host is None and a.port == 7860 and not a.cli and not a.share and a.model == "default"
    a = mod.parse_args(["--cli", "--model", "some/hub-id", "--draft", "/d", "--host", "0.0.0.0", "--port", "9000"])
    assert a.cli and a.model == "some/hub-id" and a.draft == "/d" and a.host == "0.0.0.0" and a.port == 9000


def test_the_studio_decodes_with_the_fitted_tree_and_lookup_by_default(studio):
    """A new tab: size fitted per step, lookup on; the Settings switch to a fixed tree without lookup."""
    s = Session()
    s.draft_spec = "random"
    assert s.tree_options() == {"fitted": True, "lookup": True}
    run_all(chat.send(studio, s, "Hi hi hi hi", *settings(max_new_tokens=8), True))
    steps = [st for st in s.turns[-1].steps if st.kind == "speculative"]
    assert steps and all(st.tree.rule == "fitted" for st in steps)
    chat.set_tree_rule(s, "fixed")
    chat.set_lookup(s, False)
    run_all(chat.send(studio, s, "Hi again", *settings(max_new_tokens=6), True))
    steps = [st for st in s.turns[-1].steps if st.kind == "speculative"]
    assert steps and all(st.tree.rule == "fixed" and "lookup" not in st.tree.origin for st in steps)
