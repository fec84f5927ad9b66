"""The benchmark end to end on a tiny target: JSON shape, equality check, interleaving order."""
from __future__ import annotations

import json

import pytest

from hass.__main__ import main
from hass.draft import new_draft, save_draft
from hass.target import load_target


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sets") / "two.jsonl"
    path.write_text("\n".join(json.dumps({"question_id": i, "turns": t}) for i, t in enumerate(
        [["Say hi.", "Now say bye."], ["Count to three."]])) + "\n")
    return path


def test_bench_end_to_end(tiny_folder, prompts_file, tmp_path, capsys):
    target = load_target(str(tiny_folder))
    save_draft(new_draft(target.config, seed=1), tmp_path / "d")
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(tiny_folder), "--sets", str(prompts_file), "--limit", "2",
               "--methods", "plain,hf-generate", "--draft", f"mine={tmp_path / 'd'}", "--max-new-tokens", "6",
               "--total-tokens", "8", "--depth", "3", "--top-k", "2", "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"sets", "mean"}
    for method in ("plain", "hf-generate", "mine"):
        v = summary["sets"]["two"][method]
        assert {"tokens_per_s", "speedup", "tau", "tau_macro", "per_depth_acceptance", "greedy_equal"} <= set(v)
        assert method in summary["mean"]
    assert summary["sets"]["two"]["plain"]["speedup"] == pytest.approx(1.0)
    assert summary["sets"]["two"]["mine"]["greedy_equal"] == 1.0          # lossless: equal to plain
    assert summary["sets"]["two"]["plain"]["greedy_equal"] is None         # the reference itself
    full = json.loads((out / "bench.json").read_text())
    records = full["records"]["0.0"]
    # interleaved per prompt and turn: plain, then every other method, then the next turn
    order = [(r["question"], r["turn"], r["method"]) for r in records]
    assert order == [(q, t, m) for q, t in (("0", 0), ("0", 1), ("1", 0)) for m in ("plain", "hf-generate", "mine")]
    assert all(r["new_tokens"] <= 6 for r in records)


def test_bench_unknown_method_is_a_clear_error(tiny_folder, prompts_file, tmp_path, capsys):
    rc = main(["bench", "--model", str(tiny_folder), "--sets", str(prompts_file), "--methods", "plain,warp",
               "--out", str(tmp_path)])
    assert rc == 2
    assert "unknown method 'warp'" in capsys.readouterr().err
