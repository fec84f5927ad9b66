"""Self-distilled data: loop cutting, the greedy/sampled split, resumable JSONL, and the
records read back by the dialogue loader that `prepare` uses."""
from __future__ import annotations

import json

import pytest
import torch

from hass.data import Dialogue, load_dialogues
from hass.distill import DistillConfig, distill, done_ids, loop_cut


def test_loop_cut_keeps_two_periods_of_a_trailing_loop():
    ans = [1, 2, 3] + [7, 8, 9, 4] * 5
    assert loop_cut(ans) == 3 + 8                     # prefix + two periods
    assert ans[:loop_cut(ans)] == [1, 2, 3, 7, 8, 9, 4, 7, 8, 9, 4]
    assert loop_cut([5] * 10) == 2
    assert loop_cut([1, 2, 3, 4, 5, 6, 7, 8]) is None
    assert loop_cut([1, 2, 1, 2, 3]) is None           # a repeat that is not at the end


def test_mode_split_is_stable_and_near_the_asked_fraction():
    cfg = DistillConfig(sampled_fraction=0.25)
    modes = [cfg.mode_of(f"id-{i}") for i in range(4000)]
    assert modes == [cfg.mode_of(f"id-{i}") for i in range(4000)]
    assert 0.22 < modes.count("sampled") / len(modes) < 0.28
    assert DistillConfig(sampled_fraction=0.0).mode_of("x") == "greedy"


def test_done_ids_cuts_a_torn_last_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"id": "a", "messages": []}) + "\n" + '{"id": "b", "mess')
    assert done_ids(p) == {"a"}
    assert p.read_text().endswith("\n")


class _Tok:
    pad_token_id = None


def test_distill_writes_resumable_records_that_load_as_dialogues(tiny_target, tmp_path, monkeypatch):
    """A tiny target with a stand-in renderer: every dialogue answered turn by turn, records
    appended once, a second run adds nothing, and `load_dialogues` reads the file back."""
    t = tiny_target
    monkeypatch.setattr(type(t), "render", lambda self, msgs, add_generation_prompt=True:
                        [1 + (len(m["content"]) % 7) for m in msgs] + [2])
    monkeypatch.setattr(type(t), "decode", lambda self, ids, skip_special_tokens=True: " ".join(map(str, ids)))
    dialogues = [Dialogue(f"d{i}", [{"role": "user", "content": "hi" * (i + 1)}, {"role": "assistant", "content": "x"},
                                    {"role": "user", "content": "more"}, {"role": "assistant", "content": "y"}])
                 for i in range(5)]
    out = tmp_path / "distill.jsonl"
    cfg = DistillConfig(max_new_tokens=6, max_len=64, batch_size=3, sampled_fraction=0.4)
    s = distill(t, dialogues, out, cfg, progress=False)
    assert s.dialogues == 5 and s.answers >= 5
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == [f"d{i}" for i in range(5)]
    for r in recs:
        roles = [m["role"] for m in r["messages"]]
        assert roles[:2] == ["user", "assistant"] and len(r["stops"]) == roles.count("assistant")
        assert r["mode"] == cfg.mode_of(r["id"])
        assert r["messages"][0]["content"] == next(d for d in dialogues if d.id == r["id"]).messages[0]["content"]
    again = distill(t, dialogues, out, cfg, progress=False)
    assert again.dialogues == 0 and len(out.read_text().splitlines()) == 5
    assert {d.id for d in load_dialogues(out)} == {f"d{i}" for i in range(5)}


def test_distill_rejects_bad_settings():
    with pytest.raises(ValueError, match="batch size"):
        DistillConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="sampled_fraction"):
        DistillConfig(sampled_fraction=1.5).validate()


def test_loop_stop_ends_only_looping_rows():
    import torch

    from hass.distill import _LoopStop
    prompt = [9, 9, 9, 9]                     # a repetitive prompt must not count: only the answer is checked
    looping = prompt + [1, 2, 3] + [4, 5] * 6 + [4]
    fresh = prompt + list(range(10, 26))
    assert len(looping) == len(fresh)
    stop = _LoopStop(len(prompt), every=16)
    ids = torch.tensor([looping, fresh])
    assert ids.shape[1] - len(prompt) == 16
    assert stop(ids, None).tolist() == [True, False]
    assert stop(ids[:, :-1], None).tolist() == [False, False]     # checked every 16 tokens only


def test_continuous_batching_gives_the_static_engines_greedy_answers(tiny_target):
    """The default engine (rows leave and join as they finish) changes the schedule, not the
    text: greedy answers equal the left-padded static batch's, EOS stops included."""
    from hass.distill import generate_batch, generate_continuous

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, tiny_target.vocab_size, (n,), generator=gen).tolist() for n in (3, 9, 5, 14, 7)]
    cont = generate_continuous(tiny_target, prompts, 12)
    static = generate_batch(tiny_target, prompts, 12)
    assert cont == static
    assert {stop for _, stop in static} <= {"eos", "length"} and all(len(ids) <= 12 for ids, _ in cont)


def test_an_interrupt_keeps_every_answered_turn(tiny_target, tmp_path, monkeypatch):
    """Stopped during the second turn's call: the dialogues keep their first answers (written
    once), and a restart skips them."""
    import hass.distill as distill_mod

    t = tiny_target
    monkeypatch.setattr(type(t), "render", lambda self, msgs, add_generation_prompt=True:
                        [1 + (len(m["content"]) % 7) for m in msgs] + [2])
    monkeypatch.setattr(type(t), "decode", lambda self, ids, skip_special_tokens=True: " ".join(map(str, ids)))
    real, calls = distill_mod.generate_continuous, []

    def once_then_stop(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return [([5, 6, 7], "eos") for _ in a[1]]            # every first answer ends cleanly: turn 2 follows

    monkeypatch.setattr(distill_mod, "generate_continuous", once_then_stop)
    dialogues = [Dialogue(f"d{i}", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"},
                                    {"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}])
                 for i in range(3)]
    monkeypatch.setattr(type(t), "eos_ids", property(lambda self: {7}))
    out = tmp_path / "d.jsonl"
    cfg = DistillConfig(max_new_tokens=6, max_len=64, batch_size=8, sampled_fraction=0.0, engine="continuous")
    with pytest.raises(KeyboardInterrupt):
        distill(t, dialogues, out, cfg, progress=False)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == ["d0", "d1", "d2"]
    assert all(r["stops"] == ["eos"] and len(r["messages"]) == 2 for r in recs)
    monkeypatch.setattr(distill_mod, "generate_continuous", real)
    assert distill(t, dialogues, out, cfg, progress=False).dialogues == 0


def test_same_prompts_gives_the_original_answers_of_the_distilled_turns():
    """The control of a self-distillation run: the same prompts, the original answers, cut
    to as many user turns as the distilled dialogue has; unknown ids are left out."""
    from hass.data import Dialogue, same_prompts
    u, a = "user", "assistant"
    orig = [Dialogue("x", [{"role": u, "content": "q1"}, {"role": a, "content": "a1"},
                           {"role": u, "content": "q2"}, {"role": a, "content": "a2"}]),
            Dialogue("y", [{"role": u, "content": "p1"}, {"role": a, "content": "b1"}])]
    answered = [Dialogue("y", [{"role": u, "content": "p1"}, {"role": a, "content": "mine"}]),
                Dialogue("x", [{"role": u, "content": "q1"}, {"role": a, "content": "mine"}]),
                Dialogue("z", [{"role": u, "content": "?"}, {"role": a, "content": "mine"}])]
    got = same_prompts(orig, answered)
    assert [d.id for d in got] == ["y", "x"]
    assert got[0].messages == orig[1].messages
    assert got[1].messages == orig[0].messages[:2]          # one user turn, with its original answer
