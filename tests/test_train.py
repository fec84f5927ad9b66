"""Draft training end to end on a tiny target saved as a model folder."""
from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

import hass.draft as draft_mod
from hass.data import Dialogue, prepare
from hass.draft import DraftLoadError, load_draft, new_draft, save_draft
from hass.losses import LossConfig
from hass.target import load_target
from hass.train import STATE_FILE, TrainConfig, train

DIALOGUES = [
    Dialogue(str(i), [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    for i, (q, a) in enumerate([
        ("Count to five.", "one two three four five"),
        ("Name three colours.", "red, green and blue"),
        ("Say hello.", "Hello! How can I help you today?"),
        ("What is 2+2?", "2+2 is 4."),
        ("Spell cat.", "c a t"),
        ("Count to five again.", "one two three four five"),
    ])
]


@pytest.fixture(scope="module")
def data_dir(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-data")
    target = load_target(str(tiny_folder))
    prepare(target, DIALOGUES, out, max_len=128, progress=False, target_spec=str(tiny_folder))
    return out


def _cfg(data_dir, out, **kw) -> TrainConfig:
    base = dict(data=str(data_dir), out=str(out), lr=3e-3, batch_size=2, epochs=100, noise=0.0,
                loss=LossConfig(align_steps=3), checkpoint_minutes=60, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_training_reduces_loss_and_writes_a_loadable_draft(data_dir, tiny_folder, tmp_path):
    seen: list[dict] = []
    out = train(_cfg(data_dir, tmp_path / "d", max_steps=200, lr=1e-2, draft_vocab=512), on_metrics=seen.append,
                device="cpu")
    assert len(seen) == 200
    first = sum(m["loss_1"] + m["loss_3"] for m in seen[:5])
    last = sum(m["loss_1"] + m["loss_3"] for m in seen[-5:])
    assert last < 0.85 * first, (first, last)
    target = load_target(str(tiny_folder))
    d = load_draft(out, target.config)
    assert d.token_map is not None and d.token_map.numel() <= 512
    assert (out / "metrics.jsonl").read_text().count("\n") == 200


def test_pass_decay_zero_trains_exactly_the_first_pass(data_dir, tmp_path):
    """n = 3 with the later passes weighted 0 takes the same steps as n = 1; weighted 1 it does not."""
    losses = {"n1": LossConfig(align_steps=1), "n3-decay0": LossConfig(align_steps=3, pass_decay=0.0),
              "n3": LossConfig(align_steps=3)}
    runs = {name: train(_cfg(data_dir, tmp_path / name, max_steps=3, loss=loss, noise=0.2), device="cpu")
            for name, loss in losses.items()}
    sd = {k: load_file(str(v / "model.safetensors")) for k, v in runs.items()}
    assert sd["n1"].keys() == sd["n3-decay0"].keys()
    for key in sd["n1"]:
        torch.testing.assert_close(sd["n3-decay0"][key], sd["n1"][key], rtol=0, atol=0)
    assert any(not torch.equal(sd["n3"][k], sd["n1"][k]) for k in sd["n1"])
    with pytest.raises(ValueError, match="pass_decay"):
        LossConfig(pass_decay=1.5).validate()
    from hass.card import export_draft                   # the card tells a weighted run, and only that one
    assert "pass j weighted 0.0 ** (j - 1)" in export_draft(runs["n3-decay0"], tmp_path / "c0", "t").read_text()
    assert "pass j weighted" not in export_draft(runs["n3"], tmp_path / "c1", "t").read_text()


def test_checkpoint_round_trip_gives_same_outputs(tiny_folder, tmp_path):
    target = load_target(str(tiny_folder))
    d = new_draft(target.config, seed=3, token_map=torch.tensor([5, 9, 200, 7000]))
    save_draft(d, tmp_path / "x")
    d2 = load_draft(tmp_path / "x", target.config)
    f, e = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    pos = torch.arange(4)[None]
    torch.testing.assert_close(d(f, e, pos)[0], d2(f, e, pos)[0], rtol=0, atol=0)
    assert torch.equal(d2.token_map, torch.tensor([5, 9, 200, 7000]))


def test_resume_continues_from_its_step(data_dir, tmp_path):
    out = tmp_path / "r"
    train(_cfg(data_dir, out, max_steps=3), device="cpu")
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 3
    seen: list[dict] = []
    train(_cfg(data_dir, out, max_steps=6, resume=True), on_metrics=seen.append, device="cpu")
    assert [m["step"] for m in seen] == [4, 5, 6]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_draft_of_another_target_is_refused(data_dir, tmp_path):
    other = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2)
    save_draft(new_draft(other), tmp_path / "other")
    with pytest.raises(DraftLoadError, match="shape"):
        train(_cfg(data_dir, tmp_path / "o", max_steps=1, init=str(tmp_path / "other")), device="cpu")


def test_full_disk_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "f"
    train(_cfg(data_dir, out, max_steps=2), device="cpu")
    good = (out / "model.safetensors").read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(draft_mod, "save_file", no_space)
    with pytest.raises(OSError, match="No space"):
        train(_cfg(data_dir, out, max_steps=4, resume=True), device="cpu")
    assert (out / "model.safetensors").read_bytes() == good
    assert not list(out.glob(".*.tmp"))


def test_empty_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError)):
        train(_cfg(tmp_path / "nothing", tmp_path / "o", max_steps=1), device="cpu")


def test_sigterm_stops_with_a_checkpoint(data_dir, tiny_folder, tmp_path):
    """A background run killed with SIGTERM (a scheduler, `kill`) ends cleanly with a checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "hass", "train", "--data", str(data_dir), "--out", str(out),
                             "--max-steps", "100000", "--epochs", "100000", "--batch-size", "2", "--lr", "1e-3",
                             "--checkpoint-minutes", "60", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 10):
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    step = torch.load(out / STATE_FILE, weights_only=True)["step"]
    assert step >= 10
    load_draft(out, load_target(str(tiny_folder)).config)


def test_heldout_accuracy_per_pass_in_fp32_and_bf16(data_dir, tiny_folder, tmp_path):
    """The evaluation every card quotes: accuracy per alignment pass, in [0, 1], over the
    loss tokens; a bf16 draft (as `resolve_draft` gives on CPUs with native bf16) runs
    against the fp32 target (it used to fail on the dtype mismatch) and scores like its
    fp32 self."""
    from hass.evaluate import heldout_accuracy
    target = load_target(str(tiny_folder))
    draft = new_draft(target.config, seed=3)
    ref = heldout_accuracy(draft, target, str(data_dir), align_steps=2)
    assert ref["dialogues"] > 0
    assert ref["tokens"] > 0 and len(ref["accuracy_per_pass"]) == 2
    assert all(0.0 <= a <= 1.0 for a in ref["accuracy_per_pass"])
    low = heldout_accuracy(new_draft(target.config, seed=3).to(torch.bfloat16), target, str(data_dir), align_steps=2)
    assert low["tokens"] == ref["tokens"]
    assert low["accuracy_per_pass"][0] == pytest.approx(ref["accuracy_per_pass"][0], abs=0.1)


def test_card_of_a_continued_run_tells_both_stages(data_dir, tmp_path):
    from hass.card import export_draft
    first = train(_cfg(data_dir, tmp_path / "s1", max_steps=2), device="cpu")
    second = train(_cfg(data_dir, tmp_path / "s2", max_steps=3, init=str(first)), device="cpu")
    card = export_draft(second, tmp_path / "ship", "tiny draft").read_text()
    assert "- steps: 3," in card
    assert f"continued from `{first}` (itself trained from random weights)" in card and ", 2 steps," in card
    # a new stage continued from the shipped folder and shipped over it: the card tells all three
    # runs (the shipped folder's own record is read before it is overwritten)
    third = train(_cfg(data_dir, tmp_path / "s3", max_steps=4, init=str(tmp_path / "ship"), lr=1e-4), device="cpu")
    card = export_draft(third, tmp_path / "ship", "tiny draft").read_text()
    lines = [ln for ln in card.splitlines() if ln.startswith("- continued from")]
    assert len(lines) == 2, card
    assert lines[0].startswith(f"- continued from `{tmp_path / 'ship'}` (itself continued from `{first}`)")
    assert ", 3 steps," in lines[0] and "lr 0.003" in lines[0]
    assert lines[1].startswith(f"- continued from `{first}` (itself trained from random weights)") and ", 2 steps," in lines[1]
    assert "- steps: 4," in card and "lr 0.0001" in card
    # a run from random weights says nothing of the kind (and a stale record is removed)
    card = export_draft(first, tmp_path / "ship", "tiny draft").read_text()
    assert "continued from" not in card and not (tmp_path / "ship" / "init_run.json").exists()


def test_training_precision():
    from hass.device import cpu_has_fast_bf16
    from hass.train import mixed_precision
    assert mixed_precision("fp32", "cpu") == "no"
    assert mixed_precision("bf16", "cpu") == "bf16"
    assert mixed_precision("auto", "cpu") == ("bf16" if cpu_has_fast_bf16() else "no")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(data="x", out="y", precision="fp16").validate()


def test_eval_draft_per_set_counts_and_temperatures(data_dir, tiny_folder, tmp_path, capsys):
    """The issue's protocol (4 / 3 / 3 first questions, T = 0 and T = 1) in one command; the
    card tells both temperatures; a count per set that does not match the sets is refused."""
    from hass.__main__ import main
    from hass.card import write_card
    run = train(_cfg(data_dir, tmp_path / "run", max_steps=2), device="cpu")
    out = tmp_path / "eval.json"
    rc = main(["eval-draft", "--model", str(tiny_folder), "--draft", str(run), "--questions", "2,1,1",
               "--temperature", "0", "1", "--max-new-tokens", "8", "--out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["questions_per_set"] == {"mt_bench": 2, "humaneval": 1, "gsm8k": 1}
    assert [v["prompts"] for v in rep["sets"].values()] == [2, 1, 1]
    assert set(rep["by_temperature"]) == {"0.0", "1.0"}
    assert rep["sets"] == rep["by_temperature"]["0.0"]["sets"] and rep["temperature"] == 0.0
    per_prompt = sum(v["tau_macro"] * v["prompts"] for v in rep["sets"].values()) / 4
    assert rep["prompt_mean_tau"] == pytest.approx(per_prompt)
    (run / "eval.json").write_text(out.read_text())
    card = write_card(run, "tiny").read_text()
    assert "2 mt_bench, 1 humaneval, 1 gsm8k" in card and "At T = 1 (sampled" in card
    with pytest.raises(SystemExit, match="one per set"):
        main(["eval-draft", "--model", str(tiny_folder), "--draft", str(run), "--questions", "2,1"])


def test_eval_draft_full_vocab_lifts_the_token_map(data_dir, tiny_folder, tmp_path):
    """Knob 4's measurement: the same weights drafting over the whole vocabulary; with a
    small token map the target's tokens are partly outside it, with --full-vocab none is."""
    from hass.__main__ import main
    run = train(_cfg(data_dir, tmp_path / "run", max_steps=1, draft_vocab=16), device="cpu")
    reports = {}
    for flag in ([], ["--full-vocab"]):
        out = tmp_path / f"eval{len(flag)}.json"
        assert main(["eval-draft", "--model", str(tiny_folder), "--draft", str(run), "--questions", "1",
                     "--max-new-tokens", "8", "--out", str(out), *flag]) == 0
        reports[bool(flag)] = json.loads(out.read_text())
    assert reports[True]["draft"].endswith("(full vocabulary)")
    assert all(v["vocab_coverage"] == 1.0 for v in reports[True]["sets"].values())
    assert any(v["vocab_coverage"] < 1.0 for v in reports[False]["sets"].values())


def test_a_continued_draft_takes_a_new_token_map_ranked_on_other_dialogues(data_dir, tiny_folder, tmp_path):
    """--init with --draft-vocab N: the init's weights, a map of N tokens ranked on the
    assistant turns of --vocab-data (here words the prepared data never trains on)."""
    first = train(_cfg(data_dir, tmp_path / "first", max_steps=2, draft_vocab=16), device="cpu")
    target = load_target(str(tiny_folder))
    words = "zebra quantum marmalade " * 5
    jsonl = tmp_path / "vocab.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"v{i}", "messages": [{"role": "user", "content": "Say it."},
                                                                       {"role": "assistant", "content": words}]}) + "\n"
                             for i in range(40)))
    want = set(target.tokenizer(words, add_special_tokens=False)["input_ids"])
    out = train(_cfg(data_dir, tmp_path / "second", max_steps=1, lr=1e-12, init=str(first), draft_vocab=24,
                     vocab_data=str(jsonl)), device="cpu")
    before, after = load_draft(first, target.config), load_draft(out, target.config)
    assert after.token_map.numel() == len(want | set(target.eos_ids)) <= 24
    assert want <= set(after.token_map.tolist()) and set(target.eos_ids) <= set(after.token_map.tolist())
    assert after.config.hass["draft_vocab_size"] == after.token_map.numel()
    assert not set(after.token_map.tolist()) == set(before.token_map.tolist())
    assert torch.allclose(after.fc.weight, before.fc.weight, atol=1e-6)      # the init's weights, one tiny step on
    with pytest.raises(ValueError, match="draft_vocab"):
        _cfg(data_dir, tmp_path / "x", vocab_data=str(jsonl)).validate()


def test_feature_dtype_bf16_only_where_native(monkeypatch):
    """`prepare --dtype bf16-if-native` (stage 6's default) takes bf16 only on CPUs that compute
    it natively: on an AVX2-only CPU an emulated bf16 matmul is far slower than fp32."""
    import hass.device as device
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert device.resolve_feature_dtype("bf16-if-native", "cpu") == "bf16"
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert device.resolve_feature_dtype("bf16-if-native", "cpu") == "auto"
    assert device.resolve_feature_dtype("bf16", "cpu") == "bf16"      # an explicit choice stays
    assert device.resolve_feature_dtype("fp32", "cpu") == "fp32"
    # a folder being continued keeps its precision, whatever this CPU has
    assert device.resolve_feature_dtype("bf16-if-native", "cpu", kept="bfloat16") == "bfloat16"
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert device.resolve_feature_dtype("bf16-if-native", "cpu", kept="fp32") == "fp32"
