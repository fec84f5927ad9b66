"""The draft tree of one speculative step, and its tree attention mask, as Plotly figures.

Pure functions of a `Step` (and of token texts the caller decoded): the app can redraw any
step from its stored events, and the tests can check every position and colour.
"""
from __future__ import annotations

import html
import math
import unicodedata

import plotly.graph_objects as go

from hass.events import DraftTree, Step

from .colors import (BONUS, DEPTH_COLORS, EDGE, HASS, INK, LOOKUP_RING, MARKER_LINE, PAPER, REJECTED, TARGET,
                     UNREACHED, depth_color)
from .text import label, plotly_escape, visible_token
from .theme import apply_theme, empty_figure

ROOT, ACCEPTED, REJECTED_ROLE, UNREACHED_ROLE = "root", "accepted", "rejected", "unreached"
# trace names (the legend says these words; tests look traces up by them)
TRACE_NAMES = {ROOT: "root (last token)", ACCEPTED: "accepted draft", REJECTED_ROLE: "first rejected",
               UNREACHED_ROLE: "unreached", "bonus": "target bonus", "lookup": "lookup candidate (ring)"}
LABEL_CHARS = 9
LABEL_SIZE = 10             # px, node label font
# Pixel layout. Every size below is in screen pixels, so that no two markers and no two labels
# overlap whatever the tree: rows are ROW_PX apart (more than the two widest markers' reach),
# columns are as wide as the widest label plus the next column's widest marker, and the
# figure's height (and, for trees too wide for the panel, its width) follows from them.
ROW_PX = 28
GAP_PX = 4                  # clear space between a label and the next column's markers
PANEL_MIN_WIDTH = 380       # px: the narrowest tree panel (the app's column has min_width 420, less padding);
                            # a figure that fits it keeps Plotly's autosize, a wider one gets its own width
MARGIN = {"l": 16, "r": 16, "t": 44}
TICKS_PX = 26               # below the plot: the depth tick labels, then the legend
LEGEND_ROW_PX, LEGEND_PAD_PX = 20, 24      # a legend row; the legend's own padding and the space under it
# how far a symbol reaches from its centre, in units of size / 2 (from plotly.js's symbol paths:
# a circle's radius, a square's corner, the x's arm tips at 1.265, the star's points at 1.4)
SYMBOL_REACH = {"circle": 1.0, "circle-open": 1.0, "square": math.sqrt(2), "x": 1.27, "star": 1.4}
RING_SIZE, RING_LINE, BONUS_SIZE, ROOT_SIZE = 21, 2.5, 17, 13
# a white halo around node labels, so edges fanning out of a node never hide its token
LABEL_HALO = "1px 1px 1px #FFFFFF, -1px -1px 1px #FFFFFF, 1px -1px 1px #FFFFFF, -1px 1px 1px #FFFFFF"


def check_tree(tree: DraftTree) -> None:
    """Raise ValueError unless `tree` is a non-empty rooted tree in topological order; every
    layout and mask below relies on parents coming before children."""
    n = len(tree.tokens)
    if n == 0:
        raise ValueError("empty draft tree")
    if any(len(a) != n for a in (tree.parents, tree.depths, tree.logp, tree.prob)):
        raise ValueError("draft tree fields have different lengths")
    if tree.parents[0] != -1:
        raise ValueError("node 0 must be the root (parent -1)")
    for i in range(1, n):
        if not 0 <= tree.parents[i] < i:
            raise ValueError(f"node {i}: parent {tree.parents[i]} is not an earlier node")


def node_depths(parents: list[int]) -> list[int]:
    """Depth of every node from the parent links (root = 0)."""
    d: list[int] = []
    for p in parents:
        d.append(0 if p < 0 else d[p] + 1)
    return d


def ancestor_mask(parents: list[int]) -> list[list[int]]:
    """Tree attention mask: mask[i][j] = 1 iff j is i or an ancestor of i (parents first)."""
    n = len(parents)
    rows: list[list[int]] = []
    for i, p in enumerate(parents):
        row = list(rows[p]) if p >= 0 else [0] * n
        row[i] = 1
        rows.append(row)
    return rows


def _children(parents: list[int], probs: list[float] | None) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents):
        if p >= 0:
            kids[p].append(i)
    if probs is not None:   # most likely child on top, ties keep tree order
        for k in kids:
            k.sort(key=lambda c: -probs[c])
    return kids


def tree_positions(parents: list[int], probs: list[float] | None = None,
                   bonus_parent: int | None = None) -> list[tuple[int, float]]:
    """Tidy layout: x = depth, y = leaf slot (siblings adjacent, by probability), a parent
    centred on its first and last child. Leaves get distinct slots and subtrees own disjoint
    slot ranges, so no two nodes share a position. With `bonus_parent`, one extra position
    (last in the list) is laid out as that node's first child: the target's bonus token."""
    n = len(parents)
    kids = _children(parents, probs)
    kids.append([])
    if bonus_parent is not None:
        kids[bonus_parent].insert(0, n)
    depth = node_depths(parents)
    if bonus_parent is not None:
        depth.append(depth[bonus_parent] + 1)
    y: dict[int, float] = {}
    slot = 0
    stack = [0]
    while stack:                       # preorder: leaves take slots top to bottom
        v = stack.pop()
        if not kids[v]:
            y[v] = float(slot)
            slot += 1
        stack.extend(reversed(kids[v]))
    for v in range(n - 1, -1, -1):     # children have larger indices than their parent
        if kids[v]:
            y[v] = (y[kids[v][0]] + y[kids[v][-1]]) / 2
    count = n + (bonus_parent is not None)
    return [(depth[i], y[i]) for i in range(count)]


def marker_reach(symbol: str, size: float, line_width: float = 1.0) -> float:
    """Pixels from a marker's centre to its farthest drawn point (outline included)."""
    return SYMBOL_REACH[symbol] * size / 2 + line_width / 2


def text_px(text: str, size: float = LABEL_SIZE) -> float:
    """A generous width estimate of a plot label in pixels (Plotly cannot be asked before the
    browser draws it): wide (CJK, emoji) characters 1.1 em; other non-ASCII characters (the
    label's …, ␣, ⏎ glyphs, accented capitals) and @ % M W 1 em; other capitals, m and w 0.85
    em; the rest 0.62 em. `text` is the escaped label (&lt; counts as one character)."""
    w = 0.0
    for ch in html.unescape(text):
        if unicodedata.east_asian_width(ch) in ("W", "F") or ord(ch) > 0xFFFF:
            w += 1.1
        elif ord(ch) > 0x7F or ch in "@%MW":
            w += 1.0
        elif ch.isupper() or ch in "mw&":
            w += 0.85
        else:
            w += 0.62
    return w * size


def label_offset(size: float) -> float:
    """Pixels between a marker's centre and the start of its 'middle right' label (plotly.js
    puts the text radius / 0.8 + 1 to the right of the centre)."""
    return size / 2 / 0.8 + 1


def _legend_rows(names: list[str], plot_px: float) -> int:
    """Rows of the horizontal legend (an entry: 40 px of symbol and padding plus its text)."""
    rows, x = 1, 0.0
    for name in names:
        w = 40 + text_px(name, 10)
        if x and x + w > plot_px:
            rows, x = rows + 1, 0.0
        x += w
    return rows


def has_bonus(step: Step) -> bool:
    """True when the step ends with the target's bonus token (a stop can cut it off)."""
    return bool(step.sources) and step.sources[-1] == "bonus"


def node_roles(step: Step) -> list[str]:
    """Per tree node: root, accepted (on the verified path), rejected (children of the last
    accepted node: the first depth where the target wanted another token) or unreached."""
    tree = step.tree
    if tree is None:
        return []
    path = step.path or [0]
    roles = [UNREACHED_ROLE] * len(tree.tokens)
    roles[0] = ROOT
    for v in path[1:]:
        roles[v] = ACCEPTED
    for c in tree.children(path[-1]):
        if roles[c] == UNREACHED_ROLE:
            roles[c] = REJECTED_ROLE
    return roles


def _fmt(p: float | None, digits: int = 3) -> str:
    return "–" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.{digits}f}"


def _quoted(text: str) -> str:
    return "‘" + plotly_escape(visible_token(text, 24)) + "’"


def _segments(pairs: list[tuple[tuple[float, float], tuple[float, float]]]) -> tuple[list, list]:
    xs: list = []
    ys: list = []
    for (x0, y0), (x1, y1) in pairs:
        xs += [x0, x1, None]
        ys += [y0, y1, None]
    return xs, ys


def _checked_size(tree, token_texts: list[str]) -> int:
    """Validate the tree and that every node has a text; the node count."""
    check_tree(tree)
    n = len(tree.tokens)
    if len(token_texts) != n:
        raise ValueError(f"token_texts has {len(token_texts)} entries for a tree of {n} nodes")
    return n


def tree_figure(step: Step, token_texts: list[str], bonus_text: str | None = None, title: str | None = None, *,
                choice_texts: list[str] | None = None, uirevision: str = "hass-tree") -> go.Figure:
    """Draft tree of one speculative step.

    token_texts: text of every tree node (aligned with `step.tree.tokens`).
    bonus_text: text of the target's bonus token (`step.new_tokens[-1]`), drawn as an extra
    node after the last accepted node. choice_texts: optional text of `step.target_choice`
    per node; without it the target's choice is named from tree/bonus texts or by token id.
    A non-speculative step gives an explanatory empty figure.

    No two markers and no two labels overlap on screen (`_pixel_layout`): rows are ROW_PX
    apart, columns as wide as the widest label needs, so a bushy tree makes a tall figure and
    a deep or long-labelled one a wide figure (an explicit `width` once it needs more than
    PANEL_MIN_WIDTH; the panel showing it should then scroll sideways). The bonus has its own
    row among its parent's children (`tree_positions`), next to the rejected guesses.
    """
    tree = step.tree
    if step.kind != "speculative" or tree is None:
        return empty_figure(f"step {step.index} is a {step.kind} step: no draft tree", title or "Draft tree",
                            uirevision=uirevision)
    n = _checked_size(tree, token_texts)
    if choice_texts is not None and len(choice_texts) != len(step.target_choice):
        raise ValueError("choice_texts must align with step.target_choice")
    roles = node_roles(step)
    path = step.path or [0]
    last = path[-1]
    bonus = has_bonus(step)
    pos = tree_positions(tree.parents, tree.prob, last if bonus else None)
    depths = node_depths(tree.parents)

    # what the target said about each node
    known: dict[int, str] = {t: s for t, s in zip(tree.tokens, token_texts)}
    if bonus and bonus_text is not None:
        known[step.new_tokens[-1]] = bonus_text
    target_p: dict[int, float] = {}
    for k, v in enumerate(path[1:]):
        if k < len(step.new_tokens) and step.sources[k].startswith(("draft@", "lookup@")) and k < len(step.target_prob):
            target_p[v] = step.target_prob[k]

    def choice(i: int) -> str | None:
        if i >= len(step.target_choice):
            return None
        if choice_texts is not None:
            return _quoted(choice_texts[i])
        tok = step.target_choice[i]
        return _quoted(known[tok]) if tok in known else f"token #{tok}"

    def hover(i: int) -> str:
        role = roles[i]
        lines = [f"<b>{_quoted(token_texts[i])}</b>  node {i} · depth {depths[i]}"]
        origin = tree.origin[i] if i < len(tree.origin) else "draft"
        if role == ROOT:
            lines.append("root: the last token already emitted (the target's)")
        elif origin == "lookup":
            lines.append("lookup: copied from what followed the same words earlier in the prompt or answer")
        else:
            lines.append(f"draft p {_fmt(tree.prob[i])} · cum. log p {_fmt(tree.logp[i], 2)}"
                         + (" · also found by lookup" if origin == "both" else ""))
        if role == ACCEPTED and i not in target_p:
            lines.append("accepted by the target, but cut by the stop (not emitted)")
        elif role == ACCEPTED:
            lines.append(f"accepted · target p {_fmt(target_p.get(i))}")
        elif role == REJECTED_ROLE:
            lines.append("rejected: the target diverged here")
        elif role == UNREACHED_ROLE:
            lines.append("unreached: off the verified path")
        c = choice(i)
        if c is not None:
            lines.append(f"target's next token here: {c}")
        return "<br>".join(lines)

    fig = go.Figure()
    on_path = set(zip(path, path[1:]))
    tree_edges = [(i, tree.parents[i]) for i in range(1, n)]
    off = [(pos[p], pos[i]) for i, p in tree_edges if (p, i) not in on_path]
    on = [(pos[p], pos[i]) for i, p in tree_edges if (p, i) in on_path]
    for name, pairs, width, color in (("edges", off, 1, EDGE), ("path edges", on, 3.5, HASS)):
        xs, ys = _segments(pairs)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=name, line={"width": width, "color": color},
                                 hoverinfo="skip", showlegend=False))
    if bonus:
        xs, ys = _segments([(pos[last], pos[n])])
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="bonus edge", hoverinfo="skip", showlegend=False,
                                 line={"width": 2.5, "color": BONUS, "dash": "dot"}))

    styles = {
        UNREACHED_ROLE: ("circle", lambda i: UNREACHED, "#8C8C8C", "#6B6B6B"),
        REJECTED_ROLE: ("x", lambda i: REJECTED, MARKER_LINE, INK),
        ACCEPTED: ("circle", lambda i: depth_color(depths[i]), MARKER_LINE, INK),
        ROOT: ("square", lambda i: TARGET, MARKER_LINE, INK),
    }
    sizes = [ROOT_SIZE if roles[i] == ROOT else 7 + 13 * max(0.0, min(1.0, tree.prob[i])) for i in range(n)]
    labels = [label(token_texts[i], LABEL_CHARS) for i in range(n)]
    reach = [marker_reach(styles[roles[i]][0], sizes[i]) for i in range(n)]
    found = [i for i in range(1, n) if i < len(tree.origin) and tree.origin[i] in ("lookup", "both")]
    ringed = set(found)
    for role, (symbol, fill, line, text_col) in styles.items():
        idx = [i for i in range(n) if roles[i] == role]
        if not idx:
            continue
        fig.add_trace(go.Scatter(
            x=[pos[i][0] for i in idx], y=[pos[i][1] for i in idx], mode="markers+text", name=TRACE_NAMES[role],
            customdata=idx, text=["" if i in ringed else labels[i] for i in idx], textposition="middle right",
            textfont={"size": LABEL_SIZE, "color": text_col, "shadow": LABEL_HALO}, hovertext=[hover(i) for i in idx],
            hoverinfo="text",
            marker={"symbol": symbol, "color": [fill(i) for i in idx], "size": [sizes[i] for i in idx],
                    "line": {"width": 1, "color": line}},
        ))
    if found:        # lookup candidates: a ring around the node (its fill still says accepted / rejected / ...)
        # the ring carries the node's label, so that Plotly starts the text clear of the ring
        fig.add_trace(go.Scatter(
            x=[pos[i][0] for i in found], y=[pos[i][1] for i in found], mode="markers+text",
            name=TRACE_NAMES["lookup"], hoverinfo="skip", customdata=found, text=[labels[i] for i in found],
            textposition="middle right",
            textfont={"size": LABEL_SIZE, "color": [styles[roles[i]][3] for i in found], "shadow": LABEL_HALO},
            marker={"symbol": "circle-open", "size": RING_SIZE, "color": LOOKUP_RING, "line": {"width": RING_LINE}},
        ))
        for i in found:
            reach[i] = max(reach[i], marker_reach("circle-open", RING_SIZE, RING_LINE))
            sizes[i] = RING_SIZE       # the label's offset follows the marker that carries it
    if bonus:
        k = len(step.new_tokens) - 1
        p_bonus = step.target_prob[k] if k < len(step.target_prob) else None
        text = bonus_text if bonus_text is not None else f"#{step.new_tokens[-1]}"
        why = ("the draft's guesses here were rejected" if tree.children(last)
               else "the tree had no deeper guess here")
        hov = (f"<b>{_quoted(text)}</b>  target bonus · depth {depths[last] + 1}<br>"
               f"the target's own token: {why}<br>target p {_fmt(p_bonus)}")
        sizes.append(BONUS_SIZE)
        labels.append(label(text, LABEL_CHARS))
        reach.append(marker_reach("star", BONUS_SIZE))
        fig.add_trace(go.Scatter(
            x=[pos[n][0]], y=[pos[n][1]], mode="markers+text", name=TRACE_NAMES["bonus"], customdata=[n],
            text=[labels[n]], textposition="middle right",
            textfont={"size": LABEL_SIZE, "color": INK, "shadow": LABEL_HALO},
            hovertext=[hov], hoverinfo="text",
            marker={"symbol": "star", "size": BONUS_SIZE, "color": [BONUS], "line": {"width": 1, "color": MARKER_LINE}},
        ))

    if title is None:
        tail = " + bonus" if bonus else (f" · stop: {step.stop_reason}" if step.stop_reason else "")
        where = "" if tree.children(last) else " (path reached a leaf)"
        size = f"{n} nodes" + (f" (fitted: {tree.expected:.2f} tokens expected)" if tree.rule == "fitted" else "")
        title = f"Step {step.index}: {len(path) - 1} accepted{tail}{where} · {size}"
    _pixel_layout(fig, pos, sizes, labels, reach, title, uirevision)
    return fig


def _pixel_layout(fig: go.Figure, pos: list[tuple[int, float]], sizes: list[float], labels: list[str],
                  reach: list[float], title: str, uirevision: str) -> None:
    """Axis ranges, margins, height and (when needed) width so that, in pixels, neighbouring
    rows are ROW_PX apart and a column is wider than its widest label plus the widest marker
    of the next column: no marker or label can touch another one."""
    r_max = max(reach)
    right = [label_offset(sizes[i]) + text_px(labels[i]) for i in range(len(pos))]   # label end, from the centre
    max_x = max(x for x, _ in pos)
    col_px = max(max(right) + GAP_PX + r_max, 2 * r_max + 3 * GAP_PX)
    left_px = max(reach[i] for i in range(len(pos)) if pos[i][0] == 0) + GAP_PX + 8
    right_px = max(max(right[i] for i in range(len(pos)) if pos[i][0] == max_x), r_max) + GAP_PX
    plot_w = left_px + col_px * max_x + right_px
    width = plot_w + MARGIN["l"] + MARGIN["r"]
    width = None if width <= PANEL_MIN_WIDTH else math.ceil(width)
    shown_w = (width or PANEL_MIN_WIDTH) - MARGIN["l"] - MARGIN["r"]
    fig.update_xaxes(range=[-left_px / col_px, max_x + right_px / col_px], tickvals=list(range(max_x + 1)),
                     ticktext=["root"] + [f"d{d}" for d in range(1, max_x + 1)], showgrid=False, zeroline=False)

    last_row = max(y for _, y in pos)
    pad = max(0.5, (r_max + GAP_PX) / ROW_PX)           # rows of room above the first and below the last node
    plot_h = ROW_PX * (last_row + 2 * pad)
    names = [t.name for t in fig.data if t.showlegend is not False and t.name in TRACE_NAMES.values()]
    bottom = TICKS_PX + LEGEND_ROW_PX * _legend_rows(names, shown_w) + LEGEND_PAD_PX
    height = MARGIN["t"] + plot_h + bottom
    if height < 300:                                     # a small tree: spread the rows over the minimum height
        plot_h += 300 - height
        height = 300
    fig.update_yaxes(visible=False, range=[last_row + pad, -pad])      # reversed: the first row on top
    apply_theme(fig, title, math.ceil(height), uirevision)
    fig.update_layout(plot_bgcolor=PAPER, hovermode="closest", width=width,
                      margin={**MARGIN, "b": bottom},
                      legend={"y": -TICKS_PX / plot_h, "yanchor": "top"})


def mask_figure(step: Step, token_texts: list[str], title: str | None = None, *,
                uirevision: str = "hass-mask") -> go.Figure:
    """The step's tree attention mask: cell (i, j) = 1 iff node i may attend to node j
    (j is i or one of its ancestors). Rows and columns are labelled `index token`;
    accepted-path rows are bold."""
    tree = step.tree
    if step.kind != "speculative" or tree is None:
        return empty_figure(f"step {step.index} is a {step.kind} step: no tree mask", title or "Tree mask",
                            uirevision=uirevision)
    n = _checked_size(tree, token_texts)
    mask = ancestor_mask(tree.parents)
    on_path = set(step.path or [0])
    ticks = [f"{i} {label(t, 8)}" for i, t in enumerate(token_texts)]
    ticks = [f"<b>{t}</b>" if i in on_path else t for i, t in enumerate(ticks)]
    names = [f"{i} {_quoted(t)}" for i, t in enumerate(token_texts)]
    hover = [[f"row {names[i]}<br>col {names[j]}<br>{'attends' if mask[i][j] else 'masked'}" for j in range(n)]
             for i in range(n)]
    fig = go.Figure(go.Heatmap(
        z=mask, x=list(range(n)), y=list(range(n)), zmin=0, zmax=1, showscale=False, xgap=1, ygap=1,
        colorscale=[[0.0, "#F4F4F4"], [1.0, DEPTH_COLORS[1]]], hovertext=hover, hoverinfo="text",
        name="tree mask",
    ))
    font = 9 if n <= 40 else 7
    fig.update_xaxes(tickvals=list(range(n)), ticktext=ticks, tickangle=-90, tickfont={"size": font},
                     showgrid=False, zeroline=False, side="top")
    fig.update_yaxes(tickvals=list(range(n)), ticktext=ticks, tickfont={"size": font}, showgrid=False, zeroline=False,
                     autorange="reversed", scaleanchor="x")
    height = int(min(820, max(320, 150 + 13 * n)))
    apply_theme(fig, title or f"Step {step.index}: tree attention mask ({n} nodes)", height, uirevision)
    fig.update_layout(margin={"l": 90, "r": 16, "t": 110, "b": 20})
    return fig


__all__ = ["tree_figure", "mask_figure", "tree_positions", "ancestor_mask", "node_roles", "node_depths",
           "has_bonus", "check_tree", "TRACE_NAMES"]
