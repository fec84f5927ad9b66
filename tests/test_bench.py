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
               "--methods", "plain,plain-stock,hf-generate", "--draft", f"mine={tmp_path / 'd'}", "--max-new-tokens", "6",
               "--total-tokens", "8", "--depth", "3", "--top-k", "2", "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"sets", "mean"}
    for method in ("plain", "plain-stock", "hf-generate", "mine"):
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
    assert order == [(q, t, m) for q, t in (("0", 0), ("0", 1), ("1", 0))
                     for m in ("plain", "plain-stock", "hf-generate", "mine")]
    assert full["machine"]["kernels"] == target.kernels and full["machine"]["dtype"] == "float32"
    assert full["machine"]["verify_cost_curve"] is None     # fixed trees here: no cost curve chose their size
    assert all(r["new_tokens"] <= 6 for r in records)
    page = (out / "report.html").read_text()                 # the Plotly report, drawn from bench.json
    assert page.count("Plotly.newPlot") == 4 and "mine" in page and "hf-generate" in page


def test_report_figures_follow_the_summary():
    from visual.report import depth_curves, speedup_by_set, time_split
    stats = lambda tps, speed, acc, d, v: {"tokens_per_s": tps, "speedup": speed, "tau": 1 + sum(acc) / 2,
                                           "per_depth_acceptance": acc, "new_tokens": 100, "wall_s": 100 / tps,
                                           "draft_s": d, "verify_s": v, "other_s": 0.1}
    summary = {"sets": {"a": {"plain": stats(20, 1.0, [], 0, 4.9), "hass": stats(30, 1.5, [0.6, 0.4], 1, 2)},
                        "b": {"plain": stats(20, 1.0, [], 0, 4.9), "hass": stats(10, 0.5, [0.2], 1, 8)}},
               "mean": {"plain": stats(20, 1.0, [], 0, 0), "hass": stats(20, 1.0, [0.4, 0.4], 0, 0)}}
    fig = speedup_by_set(summary)
    bars = {t.name: list(t.y) for t in fig.data}
    assert bars == {"plain": [1.0, 1.0, 1.0], "hass": [1.5, 0.5, 1.0]}        # sets a, b, then the mean
    assert list(fig.data[0].x) == ["a", "b", "mean"]
    curves = depth_curves(summary)
    assert [t.name.split(" ")[0] for t in curves.data] == ["hass"]          # plain has no depths
    assert list(curves.data[0].y) == [0.4, 0.4]
    split = {t.name.split(" ")[0]: list(t.x) for t in time_split(summary).data}
    assert split["draft"][1] == pytest.approx(2 * 1e3 / 200)              # hass: 2 s of drafting over 200 tokens
    assert split["target"][0] == pytest.approx(9.8 * 1e3 / 200)


def test_bench_unknown_method_is_a_clear_error(tiny_folder, prompts_file, tmp_path, capsys):
    rc = main(["bench", "--model", str(tiny_folder), "--sets", str(prompts_file), "--methods", "plain,warp",
               "--out", str(tmp_path)])
    assert rc == 2
    assert "unknown method 'warp'" in capsys.readouterr().err


def test_rotation_and_origin_table():
    from hass.bench import rotation
    from visual.report import origin_table
    names = ["plain", "hass", "lookup"]
    orders = [rotation(names, k) for k in range(4)]
    assert orders[:3] == [["plain", "hass", "lookup"], ["hass", "lookup", "plain"], ["lookup", "plain", "hass"]]
    assert orders[3] == orders[0]
    assert {o[0] for o in orders[:3]} == set(names)                # every method runs first once per cycle
    summary = {"sets": {
        "a": {"plain": {}, "hass": {"by_origin": {"draft": {"offered": 10, "accepted": 4},
                                                  "lookup": {"offered": 5, "accepted": 1}},
                                    "tree_size_mean": 6.0, "tree_size_quartiles": [1, 3, 5, 8, 12]}},
        "b": {"hass": {"by_origin": {"draft": {"offered": 10, "accepted": 6}}, "tree_size_mean": 4.0,
                       "tree_size_quartiles": [1, 2, 3, 4, 9]}}}}
    table = origin_table(summary)
    assert "| hass | 10 / 20 (50%) | 1 / 5 (20%) | – | 5.0 | 5, 3 |" in table
    assert "plain" not in table.split("\n", 3)[-1]
    assert origin_table({"sets": {"a": {"plain": {}}}}) == ""


def test_report_page_names_its_title_source_and_accelerator(tmp_path):
    """A page other than BENCHMARKS.md (docs/GPU.md) says what it is, which bench.json it was
    written from, and the GPU the run used (recorded by the bench itself)."""
    from pathlib import Path
    from visual.report import report_markdown
    bench = {"command": "python -m hass bench --device cuda", "date": "2026-12-04 16:29 UTC",
             "machine": {"device": "cuda:0", "accelerator": "NVIDIA H200", "threads": 16, "cpu": "x"},
             "settings": {}, "markdown": {"0.0": "| set |"}}
    page = report_markdown(bench, None, Path("docs/GPU.md"), "Benchmarks on a GPU", "docs/gpu/bench.json")
    assert page.startswith("# Benchmarks on a GPU\n")
    assert "visual.report docs/gpu/bench.json --markdown docs/GPU.md --title 'Benchmarks on a GPU'" in page
    assert "device cuda:0 (NVIDIA H200)" in page
    cpu = dict(bench, machine={"device": "cpu", "accelerator": None, "threads": 2, "cpu": "x"})
    assert "(None)" not in report_markdown(cpu, None, Path("docs/BENCHMARKS.md"))


@pytest.mark.parametrize("page, source", [("docs/GPU.md", "docs/gpu/bench.json"),
                                          ("docs/BENCHMARKS-AVX2.md", "docs/avx2/bench.json")])
def test_a_page_kept_with_its_json_is_what_its_command_writes(page, source):
    """Pages whose bench.json is kept in the repo (`make gpu-doc`, `make avx2-doc`) must equal
    what visual.report writes from that JSON today: a hand edit, or a JSON replaced without
    regenerating its page, fails here."""
    import json
    from pathlib import Path
    from visual.report import report_markdown
    root = Path(__file__).resolve().parent.parent
    text = (root / page).read_text()
    title = text.splitlines()[0].removeprefix("# ")
    bench = json.loads((root / source).read_text())
    assert report_markdown(bench, None, Path(page), title, source) == text


def test_bench_at_temperature_checks_coupled_methods_token_for_token(tiny_folder, prompts_file, tmp_path, capsys):
    """At T > 0 plain and coupled speculative decoding draw the same tokens for a seed: the
    bench checks it (transformers' sampler is not coupled: no check). --skip drops each
    set's first questions."""
    target = load_target(str(tiny_folder))
    save_draft(new_draft(target.config, seed=1), tmp_path / "d")
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(tiny_folder), "--sets", str(prompts_file), "--skip", "1", "--limit", "2",
               "--methods", "plain,hf-generate", "--draft", f"mine={tmp_path / 'd'}", "--max-new-tokens", "8",
               "--total-tokens", "8", "--depth", "3", "--top-k", "2", "--temperature", "1", "--out", str(out),
               "--json", "--no-report"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sets"]["two"]["mine"]["greedy_equal"] == 1.0
    assert summary["sets"]["two"]["hf-generate"]["greedy_equal"] is None
    records = json.loads((out / "bench.json").read_text())["records"]["1.0"]
    assert {r["question"] for r in records} == {"1"}
