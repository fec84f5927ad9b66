"""visual/: figures and HTML from hand-built step events (no model, no torch in the code under test)."""
from __future__ import annotations

import ast
import html
import itertools
import math
import random
import re
from pathlib import Path

import pytest

from hass.events import DraftTree, Step, summarize
from visual import (accept_length_figure, ancestor_mask, batch_heatmap, depth_acceptance_figure, highlight_html,
                    legend_html, mask_figure, speedup_figure, time_split_figure, training_figure, tree_figure,
                    tree_positions)
from visual import colors as C
from visual.text import visible_token
from visual.tree import TRACE_NAMES, check_tree

VISUAL = Path(__file__).resolve().parents[1] / "visual"


# ---------------------------------------------------------------- synthetic events
def make_tree(parents: list[int], probs: list[float], tokens: list[int] | None = None) -> DraftTree:
    depths: list[int] = []
    logp: list[float] = []
    for i, p in enumerate(parents):
        depths.append(0 if p < 0 else depths[p] + 1)
        logp.append(0.0 if p < 0 else logp[p] + math.log(probs[i]))
    return DraftTree(tokens=tokens or [100 + i for i in range(len(parents))], parents=parents, depths=depths,
                     logp=logp, prob=probs)


def spec_step(tree: DraftTree, path: list[int], bonus: int | None = 20, index: int = 1,
              timings: dict | None = None, target_choice: list[int] | None = None) -> Step:
    new = [tree.tokens[v] for v in path[1:]] + ([bonus] if bonus is not None else [])
    sources = [f"draft@{d}" for d in range(1, len(path))] + (["bonus"] if bonus is not None else [])
    return Step(index=index, kind="speculative", tree=tree, path=path, accepted=len(path) - 1, new_tokens=new,
                sources=sources, target_prob=[0.5 + 0.05 * k for k in range(len(new))],
                timings=timings or {"draft": 0.01, "verify": 0.02, "other": 0.001}, target_choice=target_choice or [])


def plain_step(index: int, token: int = 7, seconds: float = 0.1, kind: str = "plain") -> Step:
    return Step(index=index, kind=kind, tree=None, path=[], accepted=0, new_tokens=[token], sources=["target"],
                target_prob=[0.9], timings={"draft": 0.0, "verify": seconds, "other": 0.0})


# root 0 "Hello"; 1 " world" (0.6) -> 3 "!" (0.7) -> 6 "\n" (0.5); 3 also has no other child
#                                  -> 4 "," (0.2)
#                 2 " there" (0.3) -> 5 " friend" (0.9)
SMALL_PARENTS = [-1, 0, 0, 1, 1, 2, 3]
SMALL_PROBS = [1.0, 0.6, 0.3, 0.7, 0.2, 0.9, 0.5]
SMALL_TEXTS = ["Hello", " world", " there", "!", ",", " friend", "\n"]
SMALL_PATH = [0, 1, 3]                       # accepted " world", "!" ; node 6 is the first rejected


def small_step(**kw) -> Step:
    tree = make_tree(SMALL_PARENTS, SMALL_PROBS, tokens=[10, 11, 12, 13, 14, 15, 16])
    choice = [11, 13, 99, 20, 99, 99, 99]     # target after node 3 wanted the bonus token 20, not "\n"
    return spec_step(tree, SMALL_PATH, target_choice=choice, **kw)


def random_tree(n: int, seed: int) -> DraftTree:
    rng = random.Random(seed)
    parents = [-1]
    depth = [0]
    for i in range(1, n):
        # prefer recent (deep) parents so the tree is deep and bushy like EAGLE-2's
        p = rng.choice(range(max(0, i - 12), i))
        parents.append(p)
        depth.append(depth[p] + 1)
    return make_tree(parents, [1.0] + [round(rng.uniform(0.01, 0.99), 3) for _ in range(n - 1)])


def deepest_path(tree: DraftTree, length: int) -> list[int]:
    path = [0]
    while len(path) <= length and tree.children(path[-1]):
        path.append(tree.children(path[-1])[0])
    return path


# ---------------------------------------------------------------- figure helpers
def node_traces(fig):
    names = set(TRACE_NAMES.values())
    return [t for t in fig.data if t.name in names]


def node_colors(fig) -> dict[int, str]:
    """node index -> fill colour; the bonus node has index len(tree)."""
    out = {}
    for t in node_traces(fig):
        colors = t.marker.color
        for k, idx in enumerate(t.customdata):
            assert int(idx) not in out, "a node is drawn twice"
            out[int(idx)] = colors if isinstance(colors, str) else colors[k]
    return out


def node_xy(fig) -> dict[int, tuple[float, float]]:
    return {int(idx): (x, y) for t in node_traces(fig) for idx, x, y in zip(t.customdata, t.x, t.y)}


def segments(trace) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    xs, ys = list(trace.x), list(trace.y)
    out = []
    for k in range(0, len(xs), 3):
        assert xs[k + 2] is None and ys[k + 2] is None, "segments are separated by None"
        out.append(((xs[k], ys[k]), (xs[k + 1], ys[k + 1])))
    return out


def trace(fig, name):
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, f"expected one trace named {name!r}, got {len(found)}"
    return found[0]


def brute_mask(parents: list[int]) -> list[list[int]]:
    n = len(parents)
    out = []
    for i in range(n):
        anc = set()
        v = i
        while v != -1:
            anc.add(v)
            v = parents[v]
        out.append([1 if j in anc else 0 for j in range(n)])
    return out


# ---------------------------------------------------------------- tree figure
def test_tree_node_and_edge_counts():
    st = small_step()
    fig = tree_figure(st, SMALL_TEXTS, bonus_text=" How")
    n = len(SMALL_PARENTS)
    assert sorted(node_colors(fig)) == list(range(n + 1))           # every node once, plus the bonus
    tree_edges = segments(trace(fig, "edges")) + segments(trace(fig, "path edges"))
    assert len(tree_edges) == n - 1
    assert len(segments(trace(fig, "bonus edge"))) == 1
    assert len(segments(trace(fig, "path edges"))) == len(SMALL_PATH) - 1
    # every tree edge joins a node to its parent
    xy = node_xy(fig)
    want = {frozenset((xy[i], xy[p])) for i, p in enumerate(SMALL_PARENTS) if p >= 0}
    assert {frozenset(e) for e in tree_edges} == want


def test_verified_path_colours():
    fig = tree_figure(small_step(), SMALL_TEXTS, bonus_text=" How")
    col = node_colors(fig)
    assert col[0] == C.TARGET                      # root: the last emitted (target) token
    assert col[1] == C.depth_color(1) == C.DEPTH_COLORS[0]
    assert col[3] == C.depth_color(2) == C.DEPTH_COLORS[1]
    assert col[6] == C.REJECTED                    # child of the last accepted node
    assert {col[2], col[4], col[5]} == {C.UNREACHED}
    assert col[len(SMALL_PARENTS)] == C.BONUS
    assert len({C.TARGET, C.DEPTH_COLORS[0], C.DEPTH_COLORS[1], C.REJECTED, C.UNREACHED, C.BONUS}) == 6


def test_bonus_placement_and_connection():
    fig = tree_figure(small_step(), SMALL_TEXTS, bonus_text=" How")
    xy = node_xy(fig)
    b = len(SMALL_PARENTS)
    last = SMALL_PATH[-1]
    assert xy[b][0] == xy[last][0] + 1 == 3         # x = last accepted depth + 1
    (p0, p1), = segments(trace(fig, "bonus edge"))
    assert {p0, p1} == {xy[last], xy[b]}
    assert list(xy.values()).count(xy[b]) == 1      # not on top of the rejected sibling
    bonus = trace(fig, TRACE_NAMES["bonus"])
    assert "How" in bonus.text[0] and "␣" in bonus.text[0]


def test_hover_shows_probabilities_and_target_choice():
    st = small_step()
    fig = tree_figure(st, SMALL_TEXTS, bonus_text=" How")
    hov = {int(i): h for t in node_traces(fig) for i, h in zip(t.customdata, t.hovertext)}
    assert "draft p 0.700" in hov[3] and "target p 0.550" in hov[3]     # 2nd new token -> target_prob[1]
    assert f"cum. log p {math.log(0.6) + math.log(0.7):.2f}" in hov[3]
    assert "target's next token here: ‘␣How’" in hov[3]                  # named from the bonus text
    assert "rejected" in hov[6] and "depth 3" in hov[6]
    assert "target p 0.600" in hov[len(SMALL_PARENTS)]                   # bonus -> target_prob[-1]


def test_labels_visualise_whitespace_and_escape_markup():
    texts = ["<b>", " a", "\n", "x&y", "\t", "", " "]
    fig = tree_figure(small_step(), texts, bonus_text="<script>")
    labels = {int(i): s for t in node_traces(fig) for i, s in zip(t.customdata, t.text)}
    assert labels[0] == "&lt;b&gt;" and labels[1] == "␣a" and labels[2] == "⏎" and labels[3] == "x&amp;y"
    assert labels[4] == "⇥" and labels[5] == "∅" and labels[6] == "␣"
    assert labels[len(texts)] == "&lt;script&gt;"
    assert visible_token(" if\n\tx") == "␣if⏎⇥x"


def test_no_bonus_when_the_stop_cut_it_off():
    tree = make_tree(SMALL_PARENTS, SMALL_PROBS)
    st = spec_step(tree, SMALL_PATH, bonus=None)
    fig = tree_figure(st, SMALL_TEXTS)
    assert not [t for t in fig.data if t.name in ("bonus edge", TRACE_NAMES["bonus"])]
    assert sorted(node_colors(fig)) == list(range(len(SMALL_PARENTS)))
    # an EOS at the first draft: the path was verified further, but only one token was emitted
    cut = Step(index=4, kind="speculative", tree=tree, path=SMALL_PATH, accepted=1, new_tokens=[tree.tokens[1]],
               sources=["draft@1"], target_prob=[0.4], timings={"verify": 0.1}, stop_reason="eos")
    fig = tree_figure(cut, SMALL_TEXTS)
    hov = {int(i): h for t in node_traces(fig) for i, h in zip(t.customdata, t.hovertext)}
    assert "target p 0.400" in hov[1] and "not emitted" in hov[3]
    assert "stop: eos" in fig.layout.title.text and TRACE_NAMES["bonus"] not in [t.name for t in fig.data]


def test_path_ending_at_a_leaf_has_no_rejected_node():
    tree = make_tree(SMALL_PARENTS, SMALL_PROBS)
    st = spec_step(tree, [0, 1, 3, 6])             # node 6 is a leaf: the tree ran out
    fig = tree_figure(st, SMALL_TEXTS, bonus_text="?")
    col = node_colors(fig)
    assert C.REJECTED not in col.values()
    assert col[6] == C.depth_color(3)
    assert node_xy(fig)[len(SMALL_PARENTS)][0] == 4
    assert "leaf" in fig.layout.title.text


def test_sixty_nodes_tidy_and_no_overlap():
    tree = random_tree(60, seed=3)
    st = spec_step(tree, deepest_path(tree, 4))
    fig = tree_figure(st, [f"t{i}" for i in range(60)], bonus_text="b")
    xy = node_xy(fig)
    assert len(xy) == 61 and len(set(xy.values())) == 61
    pos = tree_positions(tree.parents, tree.prob)
    depth = tree.depths
    for v in range(60):
        assert pos[v][0] == depth[v]
        kids = tree.children(v)
        if not kids:
            continue
        ys = [pos[c][1] for c in kids]
        assert min(ys) <= pos[v][1] <= max(ys)     # parent sits among its children
        # siblings are adjacent: no other node of their depth lies between them
        between = [u for u in range(60) if depth[u] == depth[v] + 1 and min(ys) < pos[u][1] < max(ys)]
        assert set(between) <= set(kids)
    assert 300 <= fig.layout.height <= 960


def test_non_speculative_step_gives_an_empty_figure():
    fig = tree_figure(plain_step(0), [])
    assert len(fig.data) == 0 and "no draft tree" in fig.layout.annotations[0].text


def test_bad_input_raises():
    with pytest.raises(ValueError):
        tree_figure(small_step(), SMALL_TEXTS[:-1])
    with pytest.raises(ValueError):
        check_tree(DraftTree(tokens=[1, 2, 3, 4], parents=[-1, 0, 3, 1], depths=[0, 1, 2, 2],
                             logp=[0.0] * 4, prob=[1.0] * 4))                  # parent after child
    with pytest.raises(ValueError):
        tree_figure(small_step(), SMALL_TEXTS, choice_texts=["x"])


# ---------------------------------------------------------------- mask
@pytest.mark.parametrize("n,seed", [(7, 0), (60, 5)])
def test_mask_heatmap_equals_brute_force_ancestor_mask(n, seed):
    tree = make_tree(SMALL_PARENTS, SMALL_PROBS) if n == 7 else random_tree(n, seed)
    st = spec_step(tree, deepest_path(tree, 3))
    fig = mask_figure(st, [f"w{i}" for i in range(n)])
    z = [list(r) for r in fig.data[0].z]
    assert z == brute_mask(tree.parents) == ancestor_mask(tree.parents)
    ticks = list(fig.layout.yaxis.ticktext)
    assert len(ticks) == n and ticks[5].replace("<b>", "").startswith("5 w5")


# ---------------------------------------------------------------- highlight
def highlight_steps() -> tuple[list[Step], list[list[str]]]:
    steps = [plain_step(0, kind="prefill"), small_step(index=1), plain_step(2)]
    texts = [["<script>"], [" world", "!\n", " How"], ["&end"]]
    return steps, texts


def test_highlight_spans_colours_and_escaping():
    steps, texts = highlight_steps()
    out = highlight_html(steps, texts)
    spans = re.findall(r'<span class="hs-tok" style="background:(#[0-9A-Fa-f]{6});[^"]*" title="([^"]*)">(.*?)</span>',
                       out, re.S)
    assert len(spans) == sum(len(s.new_tokens) for s in steps) == 5
    assert [s[0] for s in spans] == [C.TARGET, C.depth_color(1), C.depth_color(2), C.BONUS, C.TARGET]
    assert "<script>" not in out and "&lt;script&gt;" in out and "&amp;end" in out
    assert "!\n" in out and "white-space:pre-wrap" in out
    assert "draft depth 2" in spans[2][1] and "draft p 0.700" in spans[2][1] and "target p 0.550" in spans[2][1]
    assert "target bonus" in spans[3][1]
    assert html.unescape("".join(s[2] for s in spans)) == "".join(t for ts in texts for t in ts)


def test_highlight_off_and_flat_texts():
    steps, texts = highlight_steps()
    flat = [t for ts in texts for t in ts]
    on = highlight_html(steps, texts)
    assert highlight_html(steps, flat) == on
    off = highlight_html(steps, flat, show=False)
    assert "hs-tok" not in off and "background" not in off
    strip = lambda s: html.unescape(re.sub(r"<[^>]+>", "", s))  # noqa: E731
    assert strip(off) == strip(on) == "".join(flat)
    with pytest.raises(ValueError):
        highlight_html(steps, flat[:-1])


# ---------------------------------------------------------------- charts
def race() -> tuple[list[Step], list[Step]]:
    t1 = make_tree([-1, 0, 1, 2], [1.0, 0.9, 0.8, 0.7])
    spec = [plain_step(0, seconds=0.1, kind="prefill"),                                     # 1 token
            spec_step(t1, [0, 1, 2], index=1, timings={"draft": 0.05, "verify": 0.1, "other": 0.05}),   # 3 tokens
            spec_step(t1, [0, 1, 2, 3], index=2, timings={"draft": 0.05, "verify": 0.1, "other": 0.05})]  # 4
    plain = [plain_step(i, seconds=0.1, kind="prefill" if i == 0 else "plain") for i in range(8)]
    return spec, plain


def test_speedup_title_has_the_hand_computed_ratio():
    spec, plain = race()
    # HASS: 8 tokens in 0.1 + 0.2 + 0.2 = 0.5 s = 16 tok/s; plain: 8 tokens in 0.8 s = 10 tok/s
    fig = speedup_figure({"HASS": spec, "plain": plain})
    assert "1.60×" in fig.layout.title.text and "16.0 vs 10.0 tok/s" in fig.layout.title.text
    h = trace(fig, "HASS")
    assert h.x[-1] == pytest.approx(0.5) and h.y[-1] == 8 and list(h.y) == [0, 1, 4, 8]
    assert trace(fig, "plain").x[-1] == pytest.approx(0.8)
    assert trace(fig, "HASS").line.color == C.HASS and trace(fig, "plain").line.color == C.PLAIN
    assert "slower" not in fig.layout.title.text


def test_speedup_title_says_slower_below_one():
    spec, _ = race()
    # plain: 8 tokens in 0.4 s = 20 tok/s; HASS 16 tok/s -> 0.80x, plain 1.25x faster
    fast_plain = [plain_step(i, seconds=0.05, kind="prefill" if i == 0 else "plain") for i in range(8)]
    title = speedup_figure({"HASS": spec, "plain": fast_plain}).layout.title.text
    assert "HASS 0.80× the speed of plain: plain is 1.25× faster (16.0 vs 20.0 tok/s)" == title, title
    assert "faster than plain" not in title and "slower" not in title      # one reading only
    two = speedup_figure({"HASS": spec, "EAGLE-2": race()[0][:2], "plain": fast_plain}).layout.title.text
    assert "HASS 0.80× the speed of plain: plain is 1.25× faster" in two, two


def test_depth_acceptance_equals_summarize():
    tree = random_tree(30, seed=1)
    steps = [spec_step(tree, deepest_path(tree, k), index=k) for k in (0, 1, 1, 2, 3, 5)]
    want = summarize(steps)
    assert want.per_depth_acceptance and any(0 < p < 1 for p in want.per_depth_acceptance)
    fig = depth_acceptance_figure({"HASS": steps})
    assert list(fig.data[0].y) == want.per_depth_acceptance
    assert [tuple(c) for c in fig.data[0].customdata] == list(zip(want.accepted_per_depth, want.reached_per_depth))
    other = steps[:3]
    two = depth_acceptance_figure({"HASS": want, "EAGLE-2": other})
    assert len(two.data) == 2
    assert list(two.data[0].y) == want.per_depth_acceptance
    assert list(two.data[1].y) == summarize(other).per_depth_acceptance
    assert two.data[0].marker.color != two.data[1].marker.color
    # a race's plain series has no depths: no empty bar series for it in the legend
    with_plain = depth_acceptance_figure({"plain": [plain_step(i) for i in range(3)], "HASS": steps})
    assert [tr.name.split(" (")[0] for tr in with_plain.data] == ["HASS"]


def test_time_split_and_accept_length():
    spec, _ = race()
    fig = time_split_figure(spec)
    stacked = [sum(t.y[k] for t in fig.data) for k in range(len(spec))]
    assert stacked == pytest.approx([1000 * s.seconds for s in spec])
    assert [t.marker.color for t in fig.data] == [C.TIME_COLORS[p] for p in ("draft", "verify", "other")]
    acc = accept_length_figure(spec)
    per_step = [sum(t.y[k] for t in acc.data) for k in range(2)]          # the two speculative steps
    assert per_step == [3, 4]
    assert acc.layout.shapes[0].y0 == pytest.approx(summarize(spec).tau) == 3.5


def test_training_and_batch():
    metrics = [{"step": s, "loss_1": 5.0 / s, "loss_2": 6.0 / s, "acc_1": 0.1 * s, "acc_2": 0.05 * s,
                "tokens_per_s": 100.0} for s in (3, 1, 2)]
    fig = training_figure(metrics)
    assert len(fig.data) == 4
    loss1 = [t for t in fig.data if t.name == "pass 1" and t.yaxis == "y"][0]
    assert list(loss1.x) == [1, 2, 3] and list(loss1.y) == [5.0, 2.5, 5.0 / 3]
    assert "100 tok/s" in fig.layout.title.text
    # passes differ in colour and in dash (neighbouring blues are close), each pass alike in both panels
    style = {(t.name, t.yaxis): (t.line.color, t.line.dash) for t in fig.data}
    assert style[("pass 1", "y")] == style[("pass 1", "y2")] != style[("pass 2", "y")] == style[("pass 2", "y2")]
    assert style[("pass 1", "y")][1] != style[("pass 2", "y")][1]
    assert fig.layout.xaxis.dtick == fig.layout.xaxis2.dtick == 1                 # whole steps, no 1.5
    long = training_figure([{"step": s, "loss_1": 1.0, "acc_1": 0.5} for s in range(1, 201)])
    assert long.layout.xaxis2.dtick == 50
    hm = batch_heatmap([[1, 2, 3], [4]])
    assert [list(r) for r in hm.data[0].z] == [[1, 2, 3], [4, None, None]]


def test_every_figure_is_themed_and_keeps_ui_state():
    spec, plain = race()
    figs = [tree_figure(small_step(), SMALL_TEXTS, " How"), mask_figure(small_step(), SMALL_TEXTS),
            depth_acceptance_figure({"HASS": spec}), speedup_figure({"HASS": spec, "plain": plain}),
            time_split_figure(spec), accept_length_figure(spec),
            training_figure([{"step": 1, "loss_1": 1.0, "acc_1": 0.5}]), batch_heatmap([[1]]),
            depth_acceptance_figure({}), speedup_figure({}), batch_heatmap([])]
    for f in figs:
        assert f.layout.uirevision and isinstance(f.layout.height, int)
        assert f.layout.template.layout.plot_bgcolor is not None      # the light template is applied


# ---------------------------------------------------------------- colours
_M = {  # Machado, Oliveira & Fernandes 2009, severity 1.0, on linear RGB
    "protan": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
    "deutan": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
    "tritan": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]],
    "normal": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
}


def _lab(color: str, kind: str) -> tuple[float, float, float]:
    lin = [C._channel(c) for c in C.hex_to_rgb(color)]
    r, g, b = (min(1.0, max(0.0, sum(m * v for m, v in zip(row, lin)))) for row in _M[kind])
    x, y, z = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047, 0.2126 * r + 0.7152 * g + 0.0722 * b, \
        (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883
    f = lambda t: t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116  # noqa: E731
    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def test_colours_stay_apart_for_colour_blind_viewers():
    cats = {"bonus": C.BONUS, "rejected": C.REJECTED, "unreached": C.UNREACHED, "target": C.TARGET}
    pairs = list(itertools.combinations(cats.values(), 2)) + [(d, c) for d in C.DEPTH_COLORS for c in cats.values()]
    for kind in _M:
        worst = min(math.dist(_lab(a, kind), _lab(b, kind)) for a, b in pairs)
        assert worst > 15, f"{kind}: two colours nearly coincide (delta E {worst:.1f})"
        lightness = [_lab(c, kind)[0] for c in C.DEPTH_COLORS]
        assert all(b - a > 4 for a, b in zip(lightness, lightness[1:])), f"{kind}: depth ramp not sequential"
    assert math.dist(_lab(C.HASS, "deutan"), _lab(C.PLAIN, "deutan")) > 15


def test_text_contrast_and_legend():
    for bg in list(C.DEPTH_COLORS) + [C.BONUS, C.REJECTED, C.UNREACHED, C.TARGET, C.HASS, C.PLAIN]:
        assert C.contrast_ratio(bg, C.text_color(bg)) >= 4.5, bg
    assert C.contrast_ratio("#000000", "#FFFFFF") == pytest.approx(21.0)
    legend = legend_html()
    for key, color, meaning in C.COLOR_TABLE:
        assert color in legend
    for word in ("accepted", "bonus", "rejected", "unreached", "plain"):
        assert word in legend
    assert C.series_colors(["plain", "EAGLE-2", "HASS"]) == {"plain": C.PLAIN, "EAGLE-2": C.SERIES_CYCLE[0],
                                                            "HASS": C.HASS}


# ---------------------------------------------------------------- the import rule
def test_visual_imports_only_plotly_stdlib_and_hass_events():
    import sys
    allowed_third_party = {"plotly"}
    for path in VISUAL.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:          # relative: inside visual/
                    continue
                mods = [node.module or ""]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                ok = (m == "hass.events" or top in allowed_third_party or top in sys.stdlib_module_names
                      or top == "__future__")
                assert ok, f"{path.name} imports {m}"


def test_preview_page_has_every_figure(tmp_path):
    from visual.preview import main
    out = tmp_path / "p.html"
    main([str(out), "--cdn"])
    page = out.read_text()
    assert page.count('class="plotly-graph-div"') == 10 and page.count('class="hs-tok"') > 20


def _lookup_step() -> Step:
    """root -> a (draft, accepted) -> b (lookup only, accepted) -> bonus; root -> c (both, unreached)."""
    tree = DraftTree(tokens=[1, 2, 3, 4], parents=[-1, 0, 1, 0], depths=[0, 1, 2, 1], logp=[0, -0.1, -0.1, -2.0],
                     prob=[1, 0.9, 0.0, 0.13], origin=["root", "draft", "lookup", "both"], rule="fitted",
                     expected=2.4)
    return Step(index=1, kind="speculative", tree=tree, path=[0, 1, 2], accepted=2, new_tokens=[2, 3, 9],
                sources=["draft@1", "lookup@2", "bonus"], target_prob=[0.8, 0.7, 0.5],
                timings={"draft": 0.01, "verify": 0.02, "other": 0.0}, target_choice=[2, 3, 9, 5])


def test_lookup_nodes_get_a_ring_and_lookup_tokens_an_underline():
    from visual.tree import tree_figure
    step = _lookup_step()
    fig = tree_figure(step, ["r", "a", "b", "c"], bonus_text="z")
    ring = [t for t in fig.data if t.name == TRACE_NAMES["lookup"]]
    assert len(ring) == 1 and sorted(ring[0].customdata) == [2, 3]          # lookup-only and both
    assert "fitted" in fig.layout.title.text
    hovers = " ".join(h for t in fig.data if t.hovertext for h in t.hovertext)
    assert "copied from what followed" in hovers and "also found by lookup" in hovers
    out = highlight_html([step], ["a", "b", "z"])
    spans = re.findall(r'<span class="hs-tok" style="([^"]*)" title="([^"]*)"', out)
    assert "underline dashed" in spans[1][0] and "lookup depth 2" in spans[1][1]
    assert "underline" not in spans[0][0] and "underline" not in spans[2][0]
    assert summarize([step]).accepted_by_origin == {"draft": 1, "lookup": 1}
    assert "lookup" in C.legend_html()


# ---------------------------------------------------------------- tree geometry: nothing overlaps on screen
# Everything below is in screen pixels, estimated independently of visual/tree.py's own layout maths:
# a marker is a disc reaching as far as plotly.js draws its symbol (circle: size/2; square: its corner,
# sqrt(2) * size/2; x: its arm tips, 0.8 * sqrt(5/2) * size/2; star: its points, 1.4 * size/2; plus half
# the outline); a label is a box starting size/2/0.8 + 1 px right of its marker's centre (plotly.js's
# 'middle right'), 0.6 em wide per ASCII character (1 em for others: CJK, the label's … ␣ ⏎) and 1.2 em
# high. (The layout's own estimate is more generous; a headless-browser measurement of these cases
# found no touching boxes.)
GEOM_REACH = {"circle": 1.0, "circle-open": 1.0, "square": math.sqrt(2), "x": 0.8 * math.sqrt(2.5), "star": 1.4}
TREE_PANEL_PX = 380      # a figure without its own width is drawn at least this wide (the app's tree column)


def _label_px(text: str, size: float) -> float:
    import unicodedata
    raw = html.unescape(text)
    return size * sum(1.0 if unicodedata.east_asian_width(c) in ("W", "F") or ord(c) > 0x7F else 0.6 for c in raw)


def _plot_px(fig) -> tuple[float, float, callable]:
    """Plot-area width and height in px, and data (x, y) -> px (x from the left, y from the top)."""
    lay = fig.layout
    m = lay.margin
    w = (lay.width or TREE_PANEL_PX) - m.l - m.r
    h = lay.height - m.t - m.b
    x0, x1 = lay.xaxis.range
    if lay.yaxis.range is not None:
        y0, y1 = lay.yaxis.range             # y0 at the bottom, y1 at the top
    else:                                     # plotly's autorange: 5% of the span and the widest marker's radius
        ys = [y for t in fig.data for y in (t.y or []) if y is not None]
        lo, hi = min(ys), max(ys)
        pad = 0.05 * (hi - lo) + 10 * max(hi - lo, 1) / h
        y0, y1 = (hi + pad, lo - pad) if lay.yaxis.autorange == "reversed" else (lo - pad, hi + pad)
    return w, h, lambda x, y: ((x - x0) / (x1 - x0) * w, (y - y1) / (y0 - y1) * h)


def screen_items(fig) -> tuple[dict[int, tuple[float, float, float]], dict[int, tuple[float, float, float, float]]]:
    """node -> marker disc (cx, cy, reach) and node -> label box (left, top, right, bottom), in px.
    A lookup ring and its node are one marker (the ring is drawn around the node on purpose)."""
    _, _, px = _plot_px(fig)
    discs: dict[int, tuple[float, float, float]] = {}
    boxes: dict[int, tuple[float, float, float, float]] = {}
    for t in node_traces(fig):
        n_pts = len(t.x)
        sizes = t.marker.size if isinstance(t.marker.size, (list, tuple)) else [t.marker.size] * n_pts
        line = (t.marker.line.width if t.marker.line and t.marker.line.width is not None else 0) or 0
        for k, (idx, x, y) in enumerate(zip(t.customdata, t.x, t.y)):
            cx, cy = px(x, y)
            r = GEOM_REACH[t.marker.symbol] * sizes[k] / 2 + line / 2
            idx = int(idx)
            if idx in discs:
                assert discs[idx][:2] == (cx, cy), "a node's ring is not centred on it"
                r = max(r, discs[idx][2])
            discs[idx] = (cx, cy, r)
            if t.mode and "text" in t.mode and t.text and t.text[k]:     # a ringed node's label rides on its ring
                fs = t.textfont.size or 12
                left = cx + sizes[k] / 2 / 0.8 + 1
                boxes[idx] = (left, cy - 0.6 * fs, left + _label_px(t.text[k], fs), cy + 0.6 * fs)
    return discs, boxes


def overlaps(fig) -> list[str]:
    """Every pair of markers, of labels, or of a label and another node's marker that touch on
    screen, and anything that sticks out of the plot area (which Plotly clips)."""
    w, h, _ = _plot_px(fig)
    discs, boxes = screen_items(fig)
    bad = []
    nodes = sorted(discs)
    for a, b in itertools.combinations(nodes, 2):
        (xa, ya, ra), (xb, yb, rb) = discs[a], discs[b]
        if math.hypot(xa - xb, ya - yb) < ra + rb:
            bad.append(f"markers {a} and {b}: {math.hypot(xa - xb, ya - yb):.1f} px apart, need {ra + rb:.1f}")
    for a, b in itertools.combinations(sorted(boxes), 2):
        (l1, t1, r1, b1), (l2, t2, r2, b2) = boxes[a], boxes[b]
        if l1 < r2 and l2 < r1 and t1 < b2 and t2 < b1:
            bad.append(f"labels {a} and {b} intersect: {boxes[a]} / {boxes[b]}")
    for a, (l, t, r, b) in boxes.items():
        for v, (cx, cy, rad) in discs.items():
            if v != a and math.hypot(cx - min(max(cx, l), r), cy - min(max(cy, t), b)) < rad:
                bad.append(f"label {a} covers marker {v}")
        if l < 0 or r > w or t < 0 or b > h:
            bad.append(f"label {a} {boxes[a]} outside the {w:.0f}x{h:.0f} plot")
    for v, (cx, cy, rad) in discs.items():
        if cx - rad < 0 or cx + rad > w or cy - rad < 0 or cy + rad > h:
            bad.append(f"marker {v} at ({cx:.0f}, {cy:.0f}) r {rad:.1f} outside the {w:.0f}x{h:.0f} plot")
    return bad


def _lookup_chain_step() -> tuple[Step, list[str], str]:
    """root -> a drafted word -> a 10-token lookup chain (6 accepted, the 7th rejected, bonus beside it),
    plus a drafted side branch; long, broad and wide-character labels."""
    parents = [-1, 0, 0, 0] + [1] + [4 + k for k in range(9)] + [1, 2, 2]
    n = len(parents)
    origin = ["root", "draft", "draft", "both"] + ["lookup"] * 10 + ["draft"] * 3
    probs = [1.0, 0.95, 0.3, 0.2] + [0.0] * 10 + [0.9, 0.5, 0.45]
    base = make_tree(parents, [p or 1.0 for p in probs])       # lookup nodes have draft p 0: no log p
    tree = DraftTree(tokens=base.tokens, parents=parents, depths=base.depths, logp=base.logp, prob=probs,
                     origin=origin, rule="fitted", expected=5.0)
    path = [0, 1, 4, 5, 6, 7, 8, 9]
    step = spec_step(tree, path, bonus=77)
    texts = ["Hello", " WWWWWWWWWWWW", "中文字符测试", " mmmmmmmm"] + [f" token{k}" for k in range(10)] + \
        ["<b>&", "\n\n", " ok"]
    assert len(texts) == n
    return step, texts, " Wonderful"


def _geometry_cases() -> dict[str, tuple[Step, list[str], str | None]]:
    cases: dict[str, tuple[Step, list[str], str | None]] = {}
    # the overlap of issue 14: the bonus beside a rejected, most likely first child, in a tree of ~20 rows
    parents = [-1, 0, 0, 0, 0, 0, 0] + [1] * 5 + [2, 2, 2, 3, 3, 3, 4, 4, 5, 5, 6]
    probs = [1.0, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1] + [0.95, 0.9, 0.8, 0.6, 0.5] + [0.6] * 11
    tree = make_tree(parents, probs)
    texts = [f"w{i}" for i in range(len(parents))]
    cases["bonus beside a rejected first child"] = (spec_step(tree, [0, 1], bonus=55), texts, " next")
    cases["small"] = (small_step(), SMALL_TEXTS, " How")
    cases["deep lookup chain"] = _lookup_chain_step()
    wide = make_tree([-1] + [0] * 63, [1.0] + [0.99 - 0.015 * k for k in range(63)])
    cases["63 children, bonus under the root"] = (spec_step(wide, [0]), [f"c{i}" for i in range(64)], "b")
    deep = random_tree(64, seed=11)
    leaf_path = deepest_path(deep, 64)
    cases["random 64, bonus under a leaf"] = (spec_step(deep, leaf_path), [f"tok{i}" for i in range(64)], "end")
    cut = random_tree(40, seed=5)
    cases["random 40, no bonus"] = (spec_step(cut, deepest_path(cut, 3), bonus=None), [f" x{i}" for i in range(40)],
                                     None)
    cases["root only + bonus"] = (spec_step(make_tree([-1], [1.0]), [0]), ["root"], "bonus")
    long = random_tree(30, seed=8)
    cases["long labels"] = (spec_step(long, deepest_path(long, 2)), ["ŴÐ中文字符测试字符WW"[i % 5:] * 2 for i in range(30)],
                            "終わりの言葉")
    return cases


@pytest.mark.parametrize("case", list(_geometry_cases()))
def test_tree_markers_and_labels_never_overlap(case):
    step, texts, bonus_text = _geometry_cases()[case]
    fig = tree_figure(step, texts, bonus_text=bonus_text)
    discs, boxes = screen_items(fig)
    n = len(step.tree.tokens) + (1 if bonus_text is not None else 0)
    assert sorted(discs) == list(range(n)) and sorted(boxes) == list(range(n))   # every node drawn, labelled
    bad = overlaps(fig)
    assert not bad, f"{case}: {len(bad)} overlaps, e.g. " + "; ".join(bad[:5])


def test_bonus_gets_its_own_slot_next_to_the_rejected_child():
    step, texts, bonus_text = _geometry_cases()["bonus beside a rejected first child"]
    fig = tree_figure(step, texts, bonus_text=bonus_text)
    xy = node_xy(fig)
    b = len(step.tree.tokens)
    rejected = [i for i in step.tree.children(1)]
    assert {C.REJECTED} == {node_colors(fig)[i] for i in rejected}
    assert xy[b][0] == xy[rejected[0]][0] and xy[b] not in [xy[i] for i in rejected]
    rows = sorted(xy[i][1] for i in rejected + [b])
    assert rows == [rows[0] + k for k in range(len(rows))]       # one slot each, side by side
    discs, _ = screen_items(fig)
    assert math.hypot(discs[b][0] - discs[rejected[0]][0], discs[b][1] - discs[rejected[0]][1]) >= \
        discs[b][2] + discs[rejected[0]][2]


def test_tree_legend_keeps_every_role():
    step, texts, bonus_text = _lookup_chain_step()
    fig = tree_figure(step, texts, bonus_text=bonus_text)
    shown = [t.name for t in fig.data if t.showlegend is not False]
    assert sorted(shown) == sorted([TRACE_NAMES[k] for k in ("root", "accepted", "rejected", "unreached", "bonus",
                                                             "lookup")])
    _, h, _ = _plot_px(fig)
    assert h > 0 and fig.layout.margin.b >= 26 + 29     # the depth ticks and a legend row (29 px drawn) fit below


def test_geometry_helper_catches_overlaps():
    """The checker itself: two markers one px apart, and a label over its neighbour, are reported."""
    import plotly.graph_objects as go
    fig = go.Figure(go.Scatter(x=[0, 0.001, 0.12], y=[0, 0, 0], mode="markers+text", name=TRACE_NAMES["accepted"],
                               customdata=[0, 1, 2], text=["a", "b", "c"], textfont={"size": 10},
                               marker={"symbol": "circle", "size": 10, "line": {"width": 1}}))
    fig.update_layout(width=400, height=300, margin={"l": 0, "r": 0, "t": 0, "b": 0})
    fig.update_xaxes(range=[-1, 2])
    fig.update_yaxes(range=[6, -1])
    bad = overlaps(fig)
    assert any(s.startswith("markers 0 and 1") for s in bad) and any(s.startswith("labels 0 and 1") for s in bad)
    assert any(s == "label 0 covers marker 2" for s in bad) and not any(s.startswith("markers 1 and 2") for s in bad)
