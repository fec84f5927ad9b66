"""visual/cost.py: the cost story's numbers against hand-computed ones, its wording both ways,
and the figure's traces (hand-built step events; no model)."""
from __future__ import annotations

import pytest

from hass.events import DraftTree, Step, speedup
from visual.cost import (BREAK_EVEN, CHECK_ONLY, TAU, USED, WIN, check_cost, cost_figure, cost_story, relative_curve,
                         verdict)
from visual.theme import FONT, PANEL_HEIGHT

# seconds of one verify forward over N tree tokens; c(N) = curve[N] / curve[1]
CURVE_S = {1: 0.010, 2: 0.011, 4: 0.012, 8: 0.016, 16: 0.024}
REL = {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.6, 16: 2.4}


def chain(n: int) -> DraftTree:
    """A tree of n nodes (a chain: the shape does not matter to the costs, only len(tree))."""
    return DraftTree(tokens=[100 + i for i in range(n)], parents=[-1] + list(range(n - 1)),
                     depths=list(range(n)), logp=[0.0] * n, prob=[1.0] + [0.5] * (n - 1))


def step(n_nodes: int, accepted: int, draft: float, verify: float, other: float, bonus: bool = True,
         index: int = 1) -> Step:
    tree = chain(n_nodes)
    path = list(range(accepted + 1))
    new = [tree.tokens[v] for v in path[1:]] + ([7] if bonus else [])
    return Step(index=index, kind="speculative", tree=tree, path=path, accepted=accepted, new_tokens=new,
                sources=[f"draft@{d}" for d in range(1, accepted + 1)] + (["bonus"] if bonus else []),
                target_prob=[0.9] * len(new), timings={"draft": draft, "verify": verify, "other": other})


def prefill() -> Step:
    return Step(index=0, kind="prefill", tree=None, path=[], accepted=0, new_tokens=[5], sources=["target"],
                target_prob=[0.9], timings={"draft": 0.0, "verify": 0.5, "other": 0.1})


def answer() -> list[Step]:
    """A prefill (ignored) and three speculative steps: trees of 4, 8, 8 nodes; 2 + 1 + 3 = 6
    accepted + 3 bonus = 9 tokens (tau 3); drafting 2, 3, 4 ms; verifying 12, 16, 16 ms."""
    return [prefill(), step(4, 1, 0.002, 0.012, 0.001, index=1), step(8, 2, 0.003, 0.016, 0.001, index=2),
            step(8, 3, 0.004, 0.016, 0.001, index=3)]


def test_relative_curve_and_interpolation_match_the_fitter():
    assert relative_curve(CURVE_S) == pytest.approx(REL)
    assert relative_curve(REL) == pytest.approx(REL)            # already relative: unchanged
    assert relative_curve({}) == {}
    with pytest.raises(ValueError):
        relative_curve({2: 0.01, 4: 0.02})                       # no N = 1: no plain step to divide by
    assert check_cost(REL, 6) == pytest.approx(1.2 + 2 * 0.4 / 4)      # between 4 and 8
    assert check_cost(REL, 20) == pytest.approx(2.4 + 4 * 0.8 / 8)     # beyond 16: the last two points' slope
    assert check_cost(REL, 8) == pytest.approx(1.6)
    # the same rule as the cost model that sizes the trees (torch only here, in the test)
    from hass.fit import CostModel
    model = CostModel(dict(REL))
    for n in (1, 3, 5, 8, 11, 16, 40):
        assert check_cost(REL, n) == pytest.approx(float(model.verify(n)))


def test_story_numbers_equal_hand_computed_ones():
    st = cost_story(CURVE_S, answer(), plain_step_s=0.010)
    assert st.sizes == [1, 2, 4, 8, 16]
    assert st.check_cost == pytest.approx([1.0, 1.1, 1.2, 1.6, 2.4])
    assert st.steps == 3 and st.tau == pytest.approx(9 / 3)
    assert st.sizes_used == {4: 1, 8: 2} and st.mean_tree_size == pytest.approx(20 / 3)
    assert st.mean_check_cost == pytest.approx((1.2 + 1.6 + 1.6) / 3)
    assert st.draft_cost == pytest.approx(0.003 / 0.010)          # mean 3 ms of drafting / a 10 ms plain step
    assert st.verify_cost == pytest.approx((0.044 / 3) / 0.010)
    assert st.other_cost == pytest.approx(0.001 / 0.010)
    assert st.break_even == pytest.approx([1.3, 1.4, 1.5, 1.9, 2.7])   # c(N) + 0.3
    assert st.needed_tau == pytest.approx(4.4 / 3 + 0.3)
    assert st.predicted_speedup == pytest.approx(3.0 / (4.4 / 3 + 0.3))   # 1.698
    # measured: 9 tokens in 9 + 44 + 3 = 56 ms against one token per 10 ms plain step
    assert st.measured_speedup == pytest.approx((9 / 0.056) / (1 / 0.010))
    assert st.measured_speedup == pytest.approx(speedup(1, 0.010, 9, 0.056))
    assert st.plain_step_s == 0.010 and st.plain_step_source == "given"


def test_plain_step_estimated_from_verify_times_when_not_given():
    steps = [step(4, 1, 0.002, 0.024, 0.0), step(8, 2, 0.003, 0.032, 0.0), step(8, 3, 0.004, 0.032, 0.0)]
    st = cost_story(REL, steps)
    # verify seconds 0.088 over curve cost 1.2 + 1.6 + 1.6 = 4.4 plain steps: a plain step is 20 ms
    assert st.plain_step_source == "estimated" and st.plain_step_s == pytest.approx(0.020)
    assert st.draft_cost == pytest.approx(0.003 / 0.020)
    assert st.verify_cost == pytest.approx(st.mean_check_cost)
    assert st.predicted_speedup == pytest.approx(3.0 / (4.4 / 3 + 0.15))
    assert st.measured_speedup is None and "Measured" not in st.sentence
    # no timings at all: drafting counts as free, and the sentence says it was not timed
    bare = cost_story(REL, [step(8, 1, 0.0, 0.0, 0.0)])
    assert bare.plain_step_source == "none" and bare.draft_cost == 0.0 and bare.verify_cost is None
    assert bare.predicted_speedup == pytest.approx(2 / 1.6) and "not timed" in bare.sentence


def test_wording_faster():
    st = cost_story(CURVE_S, answer(), plain_step_s=0.010)
    s = st.sentence
    assert s.startswith("A check of 6.7 tokens (this answer's average) costs 1.47 plain steps here, drafting it "
                        "0.30 more, so a step must yield more than 1.77 tokens to win; this answer yielded 3.00 per "
                        "step, so the cost curve predicts 1.70× faster than plain.")
    assert s.endswith("Measured against a 10.0 ms plain step: 1.61× faster than plain.")
    assert "plain is" not in s
    # one tree size: named as such; without a plain step the verdict follows the colon (the example)
    one = cost_story(REL, [step(16, 2, 0.0, 0.024, 0.0, index=k) for k in range(4)])
    assert one.sentence == ("A 16-token check costs 2.40 plain steps here, so a step must yield more than 2.40 "
                            "tokens to win; this answer yielded 3.00 per step: 1.25× faster than plain.")


def test_wording_slower_says_plain_is_faster():
    steps = [step(16, 0, 0.004, 0.024, 0.001, index=k) for k in range(3)] + [step(16, 1, 0.004, 0.024, 0.001)]
    st = cost_story(CURVE_S, steps, plain_step_s=0.010)
    assert st.tau == pytest.approx(5 / 4) and st.needed_tau == pytest.approx(2.4 + 0.4)
    r = 1.25 / 2.8
    assert st.predicted_speedup == pytest.approx(r)
    assert (f"must yield more than 2.80 tokens to win; this answer yielded 1.25 per step, so the cost curve predicts "
            f"{r:.2f}× the speed of plain: plain is {1 / r:.2f}× faster.") in st.sentence
    m = speedup(1, 0.010, 5, 4 * 0.029)
    assert st.measured_speedup == pytest.approx(m) and m < 1
    assert st.sentence.endswith(f"{m:.2f}× the speed of plain: plain is {1 / m:.2f}× faster.")
    assert "faster than plain" not in st.sentence
    assert verdict(0.8) == "0.80× the speed of plain: plain is 1.25× faster"
    assert verdict(1.24) == "1.24× faster than plain" and verdict(1.001) == "as fast as plain (1.00×)"


def trace(fig, name):
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, f"expected one trace named {name!r}, got {[t.name for t in fig.data]}"
    return found[0]


def test_figure_traces_carry_the_story():
    # tau 1.7 crosses the break-even line c(N) + 0.3 = [1.3, 1.4, 1.5, 1.9, 2.7] between N = 4 and 8, at N = 6
    steps = [step(4, 0, 0.003, 0.012, 0.0, index=1), step(8, 1, 0.003, 0.016, 0.0, index=2),
             step(8, 1, 0.003, 0.016, 0.0, index=3)]
    st = cost_story(CURVE_S, steps, plain_step_s=0.010)
    assert st.tau == pytest.approx(5 / 3)
    fig = cost_figure(st)
    line = trace(fig, BREAK_EVEN)
    assert list(line.x) == [1, 2, 4, 8, 16] and list(line.y) == pytest.approx([1.3, 1.4, 1.5, 1.9, 2.7])
    assert list(trace(fig, CHECK_ONLY).y) == pytest.approx([1.0, 1.1, 1.2, 1.6, 2.4])
    tau = trace(fig, TAU)
    assert list(tau.x) == [1, 16] and list(tau.y) == pytest.approx([5 / 3, 5 / 3])
    used = trace(fig, USED)
    assert list(used.x) == [4, 8] and list(used.customdata) == [1, 2]
    assert list(used.y) == pytest.approx([1.5, 1.9])
    assert used.marker.size[1] > used.marker.size[0]                # more steps, bigger mark
    win = trace(fig, WIN)
    assert win.fill == "toself"
    pts = list(zip(win.x, win.y))
    assert None not in win.x                                          # one region
    xc = 4 + (5 / 3 - 1.5) / 0.4 * 4
    assert min(win.x) == pytest.approx(1) and max(win.x) == pytest.approx(xc)
    be = dict(zip(line.x, line.y))
    for x, y in pts:                                                  # inside: between the line and tau
        lo = be[x] if x in be else 1.5 + (x - 4) * 0.4 / 4
        assert lo - 1e-9 <= y <= 5 / 3 + 1e-9
    assert "τ 1.67 vs" in fig.layout.title.text and "measured" in fig.layout.title.text
    assert fig.layout.xaxis.title.text.startswith("tree size N") and fig.layout.yaxis.title.text
    assert fig.layout.font.family == FONT and fig.layout.height == PANEL_HEIGHT     # the house theme
    assert fig.layout.uirevision == "hass-cost"


def test_figure_slower_has_no_winning_region_and_empty_inputs_explain_themselves():
    steps = [step(16, 0, 0.004, 0.024, 0.001, index=k) for k in range(3)]
    fig = cost_figure(cost_story(CURVE_S, steps, plain_step_s=0.010))
    assert WIN not in [t.name for t in fig.data] and "plain is" in fig.layout.title.text
    empty = cost_figure(cost_story({}, steps))
    assert len(empty.data) == 0 and "not measured" in empty.layout.annotations[0].text
    no_steps = cost_story(CURVE_S, [prefill()])
    assert no_steps.steps == 0 and no_steps.predicted_speedup is None and "No speculative steps" in no_steps.sentence
    fig = cost_figure(no_steps)
    assert [t.name for t in fig.data] == [BREAK_EVEN]
    with pytest.raises(ValueError):
        cost_story(CURVE_S, steps, plain_step_s=0.0)


def test_cost_module_keeps_the_import_rule():
    import ast
    from pathlib import Path
    src = Path(__file__).resolve().parents[1] / "visual" / "cost.py"
    mods = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level:
            mods.add(node.module)
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
    assert {m.split(".")[0] for m in mods} <= {"__future__", "math", "dataclasses", "plotly", "hass"}
    assert {m for m in mods if m.startswith("hass")} == {"hass.events"}
