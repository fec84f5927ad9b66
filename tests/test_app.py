"""Handler tests for the Gradio studio, on tiny in-memory targets (no browser, no default model).

The chat target is a peaked random LLaMA (tests/conftest.build_tiny_target) with the
default model's tokenizer attached, so the real chat template renders the conversation;
the draft is random (exact output, few accepted tokens).
"""
from __future__ import annotations

import time

import pytest
from transformers import AutoTokenizer

from app import chat, training
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
def chat_target(tiny_folder, make_target) -> Target:
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    tiny = make_target(vocab_size=len(tok), hidden_size=64, eos_token_id=eos, max_position_embeddings=512)
    return Target(model=tiny.model, tokenizer=tok, name="tiny-chat")


@pytest.fixture()
def studio(chat_target) -> Studio:
    return Studio(chat_target, model_spec="tiny", draft_spec="random", training=TrainingManager())


@pytest.fixture()
def session(studio) -> Session:
    s = Session()
    s.draft_spec = "random"
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


def test_race_returns_a_speedup(studio, session):
    outs = run_all(chat.race(studio, session, "Count to ten.", 0, 1, 16, 16, 4, 4, True, warmup=2))
    left, right, speed, depth, status = outs[-1]
    assert "×" in status and "over plain" in status
    assert "×" in speed.layout.title.text
    assert 'class="hs-tok"' in right and "plain" in left


def test_ab_without_shipped_drafts_says_why(studio, session):
    outs = run_all(chat.ab(studio, session, "Hi", 0, 1, 8, 16, 4, 4, True))
    assert len(outs) == 1 and "A/B needs both shipped drafts" in outs[0][4]


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
