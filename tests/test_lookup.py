"""Lookup candidates and the fitted tree size: pure functions against references, and the
greedy output of every tree rule (fixed / fitted, draft / lookup / both, batch 1 / EMS)
equal to plain decoding."""
from __future__ import annotations

import pytest
import torch

from hass.batch import run_batch
from hass.candidates import DRAFT, LOOKUP, Growth, LookupConfig, Pool, lookup, merge_lookup
from hass.decode import GenerationConfig, plain_generate, speculative_generate
from hass.events import summarize
from hass.fit import Calibrator, CostModel, Fitter, monotone
from hass.tree import TreeConfig, ancestor_mask


# -- lookup --------------------------------------------------------------------------------------
def _lookup_reference(history: list[int], cfg: LookupConfig) -> list[int]:
    for n in range(min(cfg.max_ngram, len(history) - 1), cfg.min_ngram - 1, -1):
        suffix = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):        # latest earlier occurrence first
            if history[start:start + n] == suffix:
                return history[start + n:start + n + cfg.max_tokens]
    return []


@pytest.mark.parametrize("seed", range(30))
def test_lookup_matches_a_slow_reference(seed):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(0, 4, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g)
    cfg = LookupConfig(max_ngram=3, min_ngram=1 + seed % 2, max_tokens=1 + seed % 5)
    assert lookup(hist, cfg) == _lookup_reference(hist.tolist(), cfg)


def test_lookup_prefers_the_longest_ngram_and_copies_what_followed():
    hist = torch.tensor([5, 1, 2, 9, 9, 7, 2, 8, 1, 2])
    assert lookup(hist, LookupConfig(max_ngram=2, min_ngram=1, max_tokens=3)) == [9, 9, 7]     # "1 2" -> 9 9 7
    assert lookup(hist, LookupConfig(max_ngram=4, min_ngram=3, max_tokens=3)) == []            # no 3-gram repeats


def _pool(tokens, parents, scores):
    t = torch.tensor(tokens)
    p = torch.tensor(parents)
    depths = ancestor_mask(torch.cat((torch.tensor([-1]), p + 1))).sum(-1)[1:] - 1
    s = torch.tensor(scores)
    return Pool(0, t, p, depths, s, s.exp(), torch.full_like(t, DRAFT), torch.zeros_like(t))


def test_merge_lookup_reuses_identical_draft_nodes_and_marks_their_origin():
    # draft: root -> 4 (-> 6), root -> 5
    pool = _pool([4, 5, 6], [-1, -1, 0], [-0.1, -1.0, -0.5])
    merged = merge_lookup(pool, [4, 6, 8, 9])
    assert merged.tokens.tolist() == [4, 5, 6, 8, 9]
    assert merged.parents.tolist() == [-1, -1, 0, 2, 3]
    assert merged.depths.tolist() == [1, 1, 2, 3, 4]
    assert merged.origin.tolist() == [DRAFT | LOOKUP, DRAFT, DRAFT | LOOKUP, LOOKUP, LOOKUP]
    assert merged.lookup_depth.tolist() == [1, 0, 2, 3, 4]
    # a chain that leaves the draft nodes at once hangs under the root
    other = merge_lookup(pool, [7, 4])
    assert other.parents.tolist()[3:] == [-1, 3] and other.origin.tolist()[3:] == [LOOKUP, LOOKUP]


@pytest.mark.parametrize("seed", range(20))
def test_fitted_and_fixed_cuts_are_closed_under_ancestors(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    parents = [-1, -1, -1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(3, n)]
    local = torch.rand(n, generator=g).clamp(min=0.01).log()
    score = local.clone()
    for i, p in enumerate(parents):
        if p >= 0:
            score[i] += score[p]
    pool = merge_lookup(_pool(list(range(n)), parents, score.tolist()), [0, 100, 101])
    cal = Calibrator()
    cal.update(pool, torch.arange(len(pool)), torch.rand(len(pool), generator=g) < 0.3)   # any history
    curve = {1: 1.0, 8: 1.2 + seed / 20, 64: 3.0 + seed / 5}
    fitter = Fitter(CostModel(curve), cal)
    for total in (None, 2, 5, 30, 100):
        choice = fitter.select(pool, total, draft_s=0.1)
        kept = set(choice.selected.tolist())
        for i in kept:
            p = int(pool.parents[i])
            assert p == -1 or p in kept
        v = choice.values
        assert all(float(v[i]) <= float(v[int(pool.parents[i])]) + 1e-12 for i in range(len(pool))
                   if pool.parents[i] >= 0)
        if total is not None:
            assert len(kept) == min(total - 1, len(pool))


def test_fitted_cut_maximises_expected_tokens_per_second():
    pool = _pool([1, 2, 3], [-1, 0, 1], [-0.01, -0.02, -0.03])        # a confident chain
    fitter = Fitter(CostModel({1: 1.0, 2: 1.05, 3: 1.1, 4: 1.15}))
    assert len(fitter.select(pool, None).selected) == 3               # cheap nodes, likely accepted: all
    steep = Fitter(CostModel({1: 1.0, 2: 3.0, 3: 5.0, 4: 7.0}))
    assert len(steep.select(pool, None).selected) == 0                # a node costs more than it yields


def _growth(top_logp: float) -> Growth:
    """A growth after its first depth: 4 children of the root, the best with log-prob `top_logp`."""
    logp = torch.full((16,), -9.0)
    logp[:4] = torch.tensor([top_logp, -3.0, -3.5, -4.0])
    return Growth(0, 5, 4, 4, torch.zeros(8), logp, lambda t: t)


def test_growth_stops_where_no_tree_could_use_another_depth():
    flat = {1: 1.0, 2: 1.0, 4: 1.02, 8: 1.05, 16: 1.1, 64: 1.5}    # a verify costs about one step up to 16 nodes
    steep = {1: 1.0, 2: 1.0, 3: 1.3, 4: 1.35, 8: 1.45, 64: 3.0}     # from 3 nodes on, 30 % more
    confident, doubtful = _growth(-0.05), _growth(-1.4)
    for curve, growth, want in ((flat, confident, True), (flat, doubtful, True),
                                (steep, confident, True), (steep, doubtful, False)):
        fitter = Fitter(CostModel(curve))
        assert fitter.frontier_width(growth) == 4            # no draft time seen yet: grow the whole frontier
        fitter.cost.level_s = 0.1                            # a depth costs a tenth of a plain step
        assert (fitter.frontier_width(growth) > 0) == want, (curve, growth.all_score[0])
    costly = Fitter(CostModel(flat))
    costly.cost.level_s = 2.0                                # negative control: a depth dearer than a step
    assert costly.frontier_width(confident) == 0


def test_growth_expands_only_the_frontier_nodes_worth_their_rows():
    """A steep verify curve leaves the confident growth's doubtful siblings unexpanded; a flat
    one (extra rows nearly free) expands them all. `goes_on` keeps the best-scored nodes."""
    steep = {1: 1.0, 2: 1.0, 3: 1.3, 4: 1.35, 8: 1.45, 64: 3.0}
    flat = {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0, 64: 1.0}
    widths = {}
    for name, curve in (("steep", steep), ("flat", flat)):
        fitter = Fitter(CostModel(curve))
        fitter.cost.level_s = 0.01
        widths[name] = fitter.frontier_width(_growth(-0.05))
    assert 0 < widths["steep"] < 4 and widths["flat"] == 4, widths
    growth = _growth(-0.05)
    fitter = Fitter(CostModel(steep))
    fitter.cost.level_s = 0.01
    assert growth.goes_on(fitter.frontier_width)
    assert growth.frontier.tolist() == list(range(widths["steep"]))   # the root's best children
    feat, toks, block, _ = growth.frontier_inputs()
    assert feat.shape[0] == toks.shape[0] == block.shape[0] == widths["steep"]
    assert not _growth(-0.05).goes_on(lambda g: 0)
    done = _growth(-0.05)
    done.grown = done.depth
    assert not done.goes_on(None)                           # never past its depth


def _chain_pool(chain: list[int]) -> Pool:
    return merge_lookup(Pool.empty(0, torch.device("cpu")), chain)


def _learn(fitter: Fitter, pool: Pool, copies: int, steps: int = 40) -> int:
    """Verify what the fitter picks from a lookup chain whose first `copies` places are always
    right, with the bonus drawn as the target would (place k + 1's token when it copies);
    return the cut chosen at the end."""
    for _ in range(steps):
        sel = fitter.select(pool, None).selected
        k = len(sel)
        acc = torch.arange(1, k + 1) <= copies
        right = min(k, copies)
        bonus = int(pool.tokens[right]) if right < copies and right < len(pool) else -1
        fitter.calibrator.update(pool, sel, acc, bonus=bonus)
    return len(fitter.select(pool, None).selected)


def _monotone_reference(ys: list[float]) -> list[float]:
    """Brute force: the non-decreasing fit is constant on blocks; try every split into blocks
    and keep the least-squares one that does not decrease."""
    import itertools
    best, best_err = None, float("inf")
    n = len(ys)
    for cuts in itertools.product((False, True), repeat=n - 1):
        fit, start = [], 0
        for i in range(n):
            if i == n - 1 or cuts[i]:
                block = ys[start:i + 1]
                fit += [sum(block) / len(block)] * len(block)
                start = i + 1
        if all(a <= b + 1e-12 for a, b in zip(fit, fit[1:])):
            err = sum((a - b) ** 2 for a, b in zip(fit, ys))
            if err < best_err - 1e-12:
                best, best_err = fit, err
    return best


@pytest.mark.parametrize("seed", range(20))
def test_monotone_cost_curve_is_the_least_squares_non_decreasing_fit(seed):
    g = torch.Generator().manual_seed(seed)
    ns = sorted(set(torch.randint(1, 80, (7,), generator=g).tolist()))
    ys = (torch.rand(len(ns), generator=g) * 0.1 + torch.linspace(0.05, 0.2, len(ns))).tolist()
    fit = monotone(dict(zip(ns, ys)))
    assert list(fit) == ns
    assert list(fit.values()) == pytest.approx(_monotone_reference(ys))
    assert monotone({1: 1.0, 4: 1.2, 8: 1.5}) == {1: 1.0, 4: 1.2, 8: 1.5}      # already monotone: unchanged


def test_a_cached_cost_curve_with_a_dip_is_used_monotone(tmp_path, monkeypatch):
    """A curve measured while the load changed (c(8) < c(4) < c(2), as measured here beside a
    training job) must not make 8 nodes look cheaper than 2."""
    import json
    from types import SimpleNamespace

    import hass.fit as fit_mod
    path = tmp_path / "costs" / "c.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"verify_s": {"1": 0.062, "2": 0.073, "4": 0.065, "8": 0.058, "16": 0.101}}))
    monkeypatch.setattr(fit_mod, "cost_curve_path", lambda target: path)
    curve = fit_mod.load_cost_curve(SimpleNamespace(), measure=False)
    values = [curve[n] for n in sorted(curve)]
    assert values == sorted(values) and curve[16] == 0.101
    assert curve[2] == curve[4] == curve[8] == pytest.approx((0.073 + 0.065 + 0.058) / 3)


def test_lookup_values_learn_places_past_the_cut_and_stop_where_copying_stops():
    curve = {1: 1.0, 2: 1.05, 4: 1.15, 8: 1.35, 16: 2.0}
    pool = _chain_pool(list(range(1, 11)))                       # a 10-token chain, tokens = places
    first = len(Fitter(CostModel(curve)).select(pool, None).selected)
    assert first < 10                                            # the prior alone cuts it short
    assert _learn(Fitter(CostModel(curve)), pool, copies=10) == 10   # a copy run: the whole chain pays
    assert _learn(Fitter(CostModel(curve)), pool, copies=3) == 3     # negative control: copying ends at 3
    cal = Calibrator()
    _learn(Fitter(CostModel(curve), cal), pool, copies=10)
    v = cal.lookup_values()
    assert bool((v[1:] <= v[:-1]).all()) and float(v[9]) > 0.8


def test_the_bonus_counts_for_the_next_lookup_place_only_when_drawn_from_the_plain_distribution():
    chain = [4, 6, 8]
    cal = Calibrator()
    cal.update(_chain_pool(chain), torch.tensor([0]), torch.tensor([True]), bonus=6)   # place 1 verified, 2 not
    assert cal.l_tried[:3].tolist() == [1, 1, 0] and cal.l_hit[:3].tolist() == [1, 1, 0]
    cal.update(_chain_pool(chain), torch.tensor([0]), torch.tensor([True]), bonus=7)
    assert cal.l_tried[1] == 2 and cal.l_hit[1] == 1                                   # a miss counts too
    # draft: root -> 4 -> 5; lookup 4 -> 6. Path root, 4; the draft child 5 was verified and
    # rejected, so the bonus came from the residual distribution: no count for place 2
    mixed = merge_lookup(_pool([4, 5], [-1, 0], [-0.1, -0.2]), chain)
    assert mixed.tokens.tolist()[:3] == [4, 5, 6] and mixed.lookup_depth.tolist()[:3] == [1, 0, 2]
    cal = Calibrator()
    cal.update(mixed, torch.tensor([0, 1]), torch.tensor([True, False]), bonus=6)
    assert cal.l_tried[:2].tolist() == [1, 0]


# -- greedy equality for every rule ----------------------------------------------------------------
RULES = {
    "fixed+lookup": dict(tree=TreeConfig(12, 3, 3), lookup=LookupConfig(max_ngram=3, min_ngram=1)),
    "fitted+lookup": dict(tree=TreeConfig(24, 4, 4), fitted=True, lookup=LookupConfig(max_ngram=3, min_ngram=1)),
    "fitted": dict(tree=TreeConfig(24, 4, 4), fitted=True),
    "lookup-only": dict(tree=TreeConfig(12, 3, 3), lookup=LookupConfig(max_ngram=3, min_ngram=1),
                        draft_source=False),
}


@pytest.fixture(scope="module")
def repeat_prompts(tiny_target, prompts):
    """Prompts that repeat themselves, so lookup has something to find."""
    return [p + p[: max(2, len(p) // 2)] for p in prompts(4, tiny_target.vocab_size, 3, 16, seed=77)]


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("kind", ["random", "oracle"])
def test_greedy_output_equals_plain_for_every_tree_rule(tiny_target, random_draft, oracle_draft, repeat_prompts,
                                                        rule, kind):
    used_lookup = 0
    for prompt in repeat_prompts:
        plain = [t for s in plain_generate(tiny_target, prompt, GenerationConfig(max_new_tokens=24, stop_at_eos=False))
                 for t in s.new_tokens]
        draft = random_draft if kind == "random" else oracle_draft(tiny_target, prompt, corrupt_every=3)
        steps = list(speculative_generate(tiny_target, draft, prompt,
                                          GenerationConfig(max_new_tokens=24, stop_at_eos=False, **RULES[rule])))
        assert [t for s in steps for t in s.new_tokens] == plain
        for s in steps[1:]:
            assert s.tree.rule == ("fitted" if RULES[rule].get("fitted") else "fixed")
            assert len(s.tree.origin) == len(s.tree.tokens) and s.tree.origin[0] == "root"
        used_lookup += summarize(steps).offered_by_origin.get("lookup", 0)
    if "lookup" in rule:
        assert used_lookup > 0, "lookup never proposed a node: the test does not exercise it"


@pytest.mark.parametrize("rule", ["fitted+lookup", "lookup-only"])
def test_ems_batch_with_fitted_trees_and_lookup_equals_batch_one(tiny_target, random_draft, repeat_prompts, rule):
    cfg = GenerationConfig(max_new_tokens=20, stop_at_eos=False, **RULES[rule])
    result = run_batch(tiny_target, random_draft, repeat_prompts, cfg, method="ems", batch_size=3)
    for i, prompt in enumerate(repeat_prompts):
        plain = [t for s in plain_generate(tiny_target, prompt, GenerationConfig(max_new_tokens=20, stop_at_eos=False))
                 for t in s.new_tokens]
        assert result.tokens(i) == plain


def test_draft_gate_follows_throughput_not_the_typical_step():
    """Lookup alone: mostly 1-token steps with a rare long burst, higher throughput overall (18/0.7 s);
    drafting: steady 1.5 tokens per slower step. The gate must prefer lookup alone, and still
    try drafting every `explore` steps."""
    from hass.propose import DraftGate
    gate = DraftGate(explore=8)
    chosen = []
    lookup_steps = 0
    for i in range(400):
        arm = gate.choose()
        chosen.append(arm)
        if arm:
            gate.observe(True, 3 if i % 2 else 2, 0.125)          # 20 tok/s, every step alike
        else:
            lookup_steps += 1                                     # 25 tok/s, in bursts
            gate.observe(False, 12 if lookup_steps % 7 == 0 else 1, 0.1)
    late = chosen[200:]
    assert late.count(False) > 0.8 * len(late)
    assert 0 < late.count(True) <= len(late) // 8 + 1


def test_draft_gate_keeps_drafting_where_the_draft_pays():
    from hass.propose import DraftGate
    gate = DraftGate(explore=8)
    chosen = []
    for _ in range(300):
        arm = gate.choose()
        chosen.append(arm)
        gate.observe(arm, 3 if arm else 1, 0.1)                   # draft 30 tok/s, lookup finds nothing: 10
    late = chosen[100:]
    assert late.count(True) >= 0.85 * len(late) and late.count(False) > 0


def test_draft_gate_spaces_out_looks_at_a_losing_draft_and_comes_back_when_it_pays():
    """Drafting loses steadily (8 vs 10 tok/s): looks at it double from every 8 steps to every
    64, not one every 8 steps forever; once the draft pays (30 tok/s) the next look finds it
    and the gate drafts again. Negative control: with max_explore = explore the looks keep
    their first pace."""
    from hass.propose import DraftGate

    def run(gate, switch=400, steps=600):
        chosen = []
        for i in range(steps):
            arm = gate.choose()
            chosen.append(arm)
            if arm:
                gate.observe(True, 1 if i < switch else 3, 0.125 if i < switch else 0.1)
            else:
                gate.observe(False, 1, 0.1)
        return chosen

    chosen = run(DraftGate(explore=8, max_explore=64))
    looks = chosen[200:400].count(True)
    assert 0 < looks <= 200 // 64 + 1
    first_back = next(i for i in range(400, 600) if chosen[i])
    assert first_back <= 400 + 64
    assert chosen[first_back:].count(True) >= 0.85 * len(chosen[first_back:])
    control = run(DraftGate(explore=8, max_explore=8))
    assert control[200:400].count(True) >= 200 // 8 - 1


def test_the_gate_is_asked_only_when_lookup_has_a_proposal():
    """Without a lookup proposal, skipping the draft would make the step a plain step: the
    draft runs and the gate neither chooses nor learns. With one, the gate decides and
    learns from that step."""
    from hass.fit import CostModel, Fitter
    from hass.propose import DraftGate, Proposer

    class Never(DraftGate):
        def choose(self) -> bool:
            self.steps += 1
            return False

    prop = Proposer(Fitter(CostModel({1: 1.0})), None, LookupConfig(), Never())
    fresh = torch.tensor([5, 6, 7, 8, 9])                   # no n-gram repeats: nothing to propose
    repeat = torch.tensor([5, 6, 7, 8, 5, 6])                # "5 6" seen before: lookup proposes 7 8 ...
    assert prop.use_draft(prop.chain(fresh)) is True and prop.gate.steps == 0
    tree = prop.tree(Pool.empty(9, torch.device("cpu")), prop.chain(fresh))
    prop.observe(tree, [0], 0.01, 0.0)
    assert prop.gate.seconds == {}                           # not learnt from
    assert prop.use_draft(prop.chain(repeat)) is False and prop.gate.steps == 1
    tree = prop.tree(Pool.empty(6, torch.device("cpu")), prop.chain(repeat))
    prop.observe(tree, [0], 0.01, 0.0)
    assert False in prop.gate.seconds                        # the lookup-alone arm learnt from it


def test_cost_table_is_the_interpolated_curve():
    """CostModel tabulates whole node counts; the table must give what interpolation gives
    (inside the curve, between points and extrapolated past its end), fractional counts
    still interpolate, and the online scale multiplies both."""
    cost = CostModel({1: 1.0, 4: 1.3, 16: 2.0, 64: 5.0})
    cost.scale = 1.5
    for n in (1, 2, 3, 4, 9, 16, 40, 64, 100, 256, 300):
        assert torch.allclose(cost.verify(n), cost._interpolate(torch.tensor(float(n), dtype=torch.float64)) * 1.5)
    assert float(cost.verify(2)) == pytest.approx(1.5 * (1.0 + 0.3 / 3))
    assert float(cost.verify(100)) == pytest.approx(1.5 * (5.0 + 36 * 3.0 / 48))      # past the end: the last slope
    assert float(cost.verify(2.5)) == pytest.approx(1.5 * (1.0 + 0.3 * 1.5 / 3))     # not whole: interpolated
    sizes = torch.arange(1, 9, dtype=torch.float64)
    assert torch.allclose(cost.verify(sizes), cost._interpolate(sizes) * 1.5)


def test_calibrator_values_follow_every_count():
    """The per-bin rates and lookup values are cached between counts: a count must change
    them (a cache never invalidated would keep the prior for good)."""
    pool = merge_lookup(_pool([1, 2], [-1, 0], [-0.1, -0.2]), [7, 8])
    cal = Calibrator()
    before_d = cal.draft_values(pool.score[:1]).clone()
    before_l = cal.lookup_values()[:2].clone()
    chosen = torch.arange(len(pool))
    for _ in range(5):
        cal.update(pool, chosen, torch.zeros(len(pool), dtype=torch.bool))      # nothing accepted
    assert float(cal.draft_values(pool.score[:1])) < float(before_d)
    assert float(cal.lookup_values()[0]) < float(before_l[0])
    fresh = Calibrator()
    for _ in range(5):
        fresh.update(pool, chosen, torch.zeros(len(pool), dtype=torch.bool))
    assert torch.equal(cal.draft_values(pool.score), fresh.draft_values(pool.score))   # as if never cached
    assert torch.equal(cal.lookup_values(), fresh.lookup_values())
