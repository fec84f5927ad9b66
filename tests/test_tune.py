"""`tune` on a tiny target writes a profile that `generate` then uses; the subtree estimate."""
from __future__ import annotations

import json
import logging

import torch

from hass.__main__ import main
from hass.draft import new_draft, save_draft
from hass.events import DraftTree, Step
from hass.profile import profile_path
from hass.target import load_target
from hass.tune import accepted_in_subtree


def _step(tokens, parents, depths, logp, choice):
    tree = DraftTree(tokens, parents, depths, logp, [1.0] * len(tokens))
    return Step(0, "speculative", tree, [0], 0, [], [], [], {}, target_choice=choice)


def test_subtree_estimate_by_hand():
    # root -> a(5) -> c(7); root -> b(6). The target wants 5 after the root and 7 after a.
    s = _step([1, 5, 6, 7], [-1, 0, 0, 1], [0, 1, 1, 2], [0.0, -0.1, -0.5, -0.3], [5, 7, 0, 0])
    assert accepted_in_subtree(s, 4, 2) == 2
    assert accepted_in_subtree(s, 4, 1) == 1            # depth cut
    assert accepted_in_subtree(s, 3, 2) == 2            # keeps a and c (scores -0.1, -0.3), drops b
    assert accepted_in_subtree(s, 2, 2) == 1            # only a
    s2 = _step([1, 5, 6, 7], [-1, 0, 0, 1], [0, 1, 1, 2], [0.0, -0.1, -0.5, -0.3], [6, 7, 0, 0])
    assert accepted_in_subtree(s2, 4, 2) == 1           # the target wants b
    assert accepted_in_subtree(s2, 2, 2) == 0           # b cut away


def test_tune_writes_a_profile_that_generate_uses(tiny_folder, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HASS_CACHE", str(tmp_path / "cache"))
    target = load_target(str(tiny_folder))
    save_draft(new_draft(target.config, seed=2), tmp_path / "d")
    rc = main(["tune", "--model", str(tiny_folder), "--draft", str(tmp_path / "d"), "--sets", "gsm8k",
               "--questions", "1", "--max-new-tokens", "8", "--top-ks", "2,3", "--max-depth", "3",
               "--sizes", "4,8", "--finalists", "2", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    prof = json.loads(open(report["profile"]).read())
    assert [prof["total_tokens"], prof["depth"], prof["top_k"]] == report["best"]["tree"]
    assert prof["total_tokens"] in (4, 8) and prof["depth"] in (1, 2, 3) and prof["top_k"] in (2, 3)
    path = profile_path(target.device, target.name, str(tmp_path / "d"), target.kernels)
    assert str(path) == report["profile"]
    with caplog.at_level(logging.INFO, logger="hass"):
        rc = main(["generate", "--model", str(tiny_folder), "--draft", str(tmp_path / "d"), "--prompt", "Hi",
                   "--max-new-tokens", "4", "--json"])
    assert rc == 0
    want = f"tree {prof['total_tokens']}/{prof['depth']}/{prof['top_k']} (device profile)"
    assert any(want in r.getMessage() for r in caplog.records)
    # explicit flags still win
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hass"):
        main(["generate", "--model", str(tiny_folder), "--draft", str(tmp_path / "d"), "--prompt", "Hi",
              "--max-new-tokens", "4", "--total-tokens", "5", "--depth", "2", "--top-k", "2", "--json"])
    assert any("tree 5/2/2 (explicit)" in r.getMessage() for r in caplog.records)


def test_a_profile_tuned_with_other_threads_is_used(tmp_path, monkeypatch):
    """The app runs with a core less than `tune` did: the nearest thread count's profile
    serves, an exact one wins, and another kernel choice or draft never does."""
    from hass.profile import resolve_tree, save_profile
    from hass.tree import TreeConfig
    monkeypatch.setenv("HASS_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        save_profile(profile_path(cpu, "m", "d", "onednn"), TreeConfig(12, 2, 8), {})
        torch.set_num_threads(1)
        save_profile(profile_path(cpu, "m", "other-draft", "onednn"), TreeConfig(5, 1, 4), {})
        tree, source = resolve_tree(None, None, None, cpu, "m", "d", "onednn")
        assert tree == TreeConfig(12, 2, 8) and "other threads" in source
        assert resolve_tree(None, None, None, cpu, "m", "d", "stock")[1] == "paper default"
        save_profile(profile_path(cpu, "m", "d", "onednn"), TreeConfig(6, 2, 4), {})      # 1 thread: exact
        assert resolve_tree(None, None, None, cpu, "m", "d", "onednn") == (TreeConfig(6, 2, 4), "device profile")
    finally:
        torch.set_num_threads(before)
