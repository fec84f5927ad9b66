"""Why this speed: what checking a draft tree costs on this machine, against what a step yields.

A speculative step checks a tree of N tokens in one target forward. Here that forward costs
c(N) plain decoding steps (the machine's verify cost curve, `hass.fit.load_cost_curve`,
divided by its N = 1 point: a verify forward over one token is a plain step, as in
`hass.tune`), and drafting the tree costs d plain steps more. The step yields tau tokens
(the accepted drafts plus the target's bonus), so it beats plain decoding exactly when
tau > c(N) + d: c(N) + d is the break-even tau of a tree of N tokens, and

    predicted speedup = tau / (c(N) + d)

The measured speedup is `hass.events.speedup` (tokens per second over a plain step's
tokens per second), the project's one definition.

`cost_story` computes the numbers and a sentence from plain data (the curve and the step
events); `cost_figure` draws them. Like every module here: plotly and `hass.events` only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import plotly.graph_objects as go

from hass.events import Step, speedup, summarize

from .colors import HASS, MARKER_LINE, PAPER, PLAIN, TIME_COLORS, rgba
from .theme import PANEL_HEIGHT, apply_theme, empty_figure

# trace names (the legend says these words; tests look traces up by them)
BREAK_EVEN = "break-even τ (check + drafting)"
CHECK_ONLY = "check alone c(N)"
TAU = "τ of this answer"
WIN = "τ beats the cost (faster than plain)"
USED = "tree sizes used"


@dataclass(frozen=True)
class CostStory:
    """The numbers behind one answer's speed, every cost in plain decoding steps.

    sizes / check_cost / break_even: the curve's tree sizes N (tokens checked in one verify
    forward, the root included, as `len(step.tree)`), c(N), and c(N) + draft_cost.
    tau: mean new tokens per speculative step (`summarize(...).tau`); mean_tree_size,
    sizes_used (N -> steps) and mean_check_cost (the mean of c over the steps' N) describe the
    trees actually verified. draft_cost / verify_cost / other_cost: mean seconds per step of
    drafting / verifying / bookkeeping over plain_step_s; plain_step_source says where
    plain_step_s came from: "given", "estimated" (the steps' verify seconds over their c(N):
    the curve's shape at the speed actually seen) or "none" (no timings: draft_cost is 0 and
    the other two None). predicted_speedup = tau / (mean_check_cost + draft_cost);
    measured_speedup only with a given plain step.
    """

    sizes: list[int]
    check_cost: list[float]
    break_even: list[float]
    steps: int
    tau: float
    mean_tree_size: float
    sizes_used: dict[int, int]
    mean_check_cost: float
    draft_cost: float
    verify_cost: float | None
    other_cost: float | None
    plain_step_s: float | None
    plain_step_source: str
    predicted_speedup: float | None
    measured_speedup: float | None
    sentence: str
    notes: list[str] = field(default_factory=list)

    @property
    def needed_tau(self) -> float:
        """What this answer's steps had to yield to beat plain: mean c(N used) + drafting."""
        return self.mean_check_cost + self.draft_cost


def relative_curve(curve: dict[int, float]) -> dict[int, float]:
    """{N: c(N) / c(1)} sorted by N, from a curve in seconds (`load_cost_curve`) or already
    relative (dividing again by c(1) = 1 changes nothing)."""
    if not curve:
        return {}
    if 1 not in curve:
        raise ValueError("the cost curve needs N = 1 (a verify over one token is the plain step)")
    if any(not (v > 0 and math.isfinite(v)) for v in curve.values()) or any(int(k) < 1 for k in curve):
        raise ValueError("cost curve sizes must be >= 1 and costs positive")
    base = curve[1]
    return {int(k): curve[k] / base for k in sorted(curve)}


def check_cost(rel: dict[int, float], n: float) -> float:
    """c(n) from a relative curve, interpolated linearly and extrapolated from the last two
    points, floored at half of c at the smallest size: the same rule as
    `hass.fit.CostModel.verify`, which sizes the trees (without its online scale)."""
    xs = sorted(rel)
    ys = [rel[x] for x in xs]
    if len(xs) == 1:
        return ys[0] * n / xs[0]
    n = max(float(n), float(xs[0]))
    i = next((k for k in range(1, len(xs)) if n <= xs[k]), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(y0 + (n - x0) * (y1 - y0) / (x1 - x0), ys[0] * 0.5)


def verdict(ratio: float) -> str:
    """'1.24× faster than plain', or '0.80× the speed of plain: plain is 1.25× faster'."""
    if round(ratio, 2) == 1.0:
        return "as fast as plain (1.00×)"
    if ratio > 1:
        return f"{ratio:.2f}× faster than plain"
    return f"{ratio:.2f}× the speed of plain: plain is {1 / ratio:.2f}× faster"


def cost_story(curve: dict[int, float], steps: list[Step], plain_step_s: float | None = None) -> CostStory:
    """The cost story of one answer: `curve` is this machine's verify cost curve ({N: seconds}
    from `hass.fit.load_cost_curve`, or {N: c(N)/c(1)}), `steps` the answer's step events
    (only speculative steps count), `plain_step_s` the seconds of one plain decoding step here
    when known (a race's plain side, `hass.cost.measure_costs`' plain_step_s, or the curve's
    own N = 1 seconds); without it the plain step is estimated from the verify times and the
    measured speedup is left out."""
    if plain_step_s is not None and not plain_step_s > 0:
        raise ValueError("plain_step_s must be positive")
    rel = relative_curve(curve)
    spec = [s for s in steps if s.kind == "speculative" and s.tree is not None]
    s = summarize(spec)
    n_steps = s.cycles
    sizes_used: dict[int, int] = {}
    for n in s.tree_sizes:
        sizes_used[n] = sizes_used.get(n, 0) + 1
    sizes_used = dict(sorted(sizes_used.items()))
    mean_n = sum(s.tree_sizes) / n_steps if n_steps else 0.0
    costs = [check_cost(rel, n) for n in s.tree_sizes] if rel else []
    mean_c = sum(costs) / n_steps if n_steps and rel else 0.0

    notes: list[str] = []
    source = "none"
    plain = plain_step_s
    if plain is not None:
        source = "given"
    elif n_steps and rel and s.verify_s > 0:
        plain = s.verify_s / sum(costs)
        source = "estimated"
        notes.append("the plain step is estimated from the verify times and the curve's shape")
    if plain is not None and n_steps:
        draft_cost = s.draft_s / n_steps / plain
        verify_cost = s.verify_s / n_steps / plain
        other_cost = s.other_s / n_steps / plain
    else:
        draft_cost, verify_cost, other_cost = 0.0, None, None
        if n_steps:
            notes.append("no step timings: drafting counted as free")

    predicted = s.tau / (mean_c + draft_cost) if n_steps and rel else None
    measured = speedup(1, plain_step_s, s.new_tokens, s.seconds) if plain_step_s is not None and n_steps else None
    sizes = list(rel)
    story = dict(sizes=sizes, check_cost=[rel[n] for n in sizes], break_even=[rel[n] + draft_cost for n in sizes],
                 steps=n_steps, tau=s.tau if n_steps else 0.0, mean_tree_size=mean_n, sizes_used=sizes_used,
                 mean_check_cost=mean_c, draft_cost=draft_cost, verify_cost=verify_cost, other_cost=other_cost,
                 plain_step_s=plain, plain_step_source=source, predicted_speedup=predicted,
                 measured_speedup=measured, notes=notes)
    return CostStory(sentence=_sentence(story), **story)


def _sentence(st: dict) -> str:
    if not st["sizes"]:
        return "This machine's verify cost curve is not measured yet, so the speed cannot be explained."
    if not st["steps"]:
        return "No speculative steps yet: nothing to compare with plain decoding."
    used = st["sizes_used"]
    what = (f"A {next(iter(used))}-token check" if len(used) == 1
            else f"A check of {st['mean_tree_size']:.1f} tokens (this answer's average)")
    if st["plain_step_source"] == "none":
        draft = " (drafting was not timed)"
    elif st["draft_cost"] >= 0.005:
        draft = f", drafting it {st['draft_cost']:.2f} more"
    else:
        draft = ""
    needed = st["mean_check_cost"] + st["draft_cost"]
    text = (f"{what} costs {st['mean_check_cost']:.2f} plain steps here{draft}, so a step must yield more than "
            f"{needed:.2f} tokens to win; this answer yielded {st['tau']:.2f} per step"
            + (", so the cost curve predicts " if st["measured_speedup"] is not None else ": ")
            + f"{verdict(st['predicted_speedup'])}.")
    if st["measured_speedup"] is not None:
        text += (f" Measured against a {st['plain_step_s'] * 1e3:.1f} ms plain step: "
                 f"{verdict(st['measured_speedup'])}.")
    return text


def _win_polygons(xs: list[float], lo: list[float], tau: float) -> tuple[list, list]:
    """The region between the break-even line `lo` and tau where tau is above it, as closed
    polygons joined by None (Plotly's fill 'toself'), crossings interpolated."""
    runs: list[list[tuple[float, float]]] = []
    cur: list[tuple[float, float]] = []
    for k, (x, y) in enumerate(zip(xs, lo)):
        if k:
            x0, y0 = xs[k - 1], lo[k - 1]
            if (y0 < tau) != (y < tau) and y != y0:          # the line crosses tau in between
                xc = x0 + (tau - y0) * (x - x0) / (y - y0)
                cur.append((xc, tau))
                if y0 < tau:
                    runs.append(cur)
                    cur = []
        if y < tau:
            cur.append((x, y))
    if cur:
        runs.append(cur)
    px: list = []
    py: list = []
    for run in runs:
        if len(run) < 2:
            continue
        pts = run + [(x, tau) for x, _ in reversed(run)] + [run[0]]
        if px:
            px.append(None)
            py.append(None)
        px += [p[0] for p in pts]
        py += [p[1] for p in pts]
    return px, py


def cost_figure(story: CostStory, title: str | None = None, *, uirevision: str = "hass-cost") -> go.Figure:
    """The break-even tau c(N) + drafting against the tree size N (a line; the check alone
    dotted), this answer's tau (a horizontal line), the region where tau beats the cost
    shaded and the tree sizes the answer used marked on the line (bigger = more steps)."""
    if not story.sizes:
        return empty_figure("this machine's verify cost curve is not measured yet", title or "Cost of a check",
                            uirevision=uirevision)
    xs, be = story.sizes, story.break_even
    fig = go.Figure()
    if story.steps:
        px, py = _win_polygons([float(x) for x in xs], be, story.tau)
        if px:
            fig.add_trace(go.Scatter(x=px, y=py, mode="lines", fill="toself", name=WIN, hoverinfo="skip",
                                     fillcolor=rgba(HASS, 0.14), line={"width": 0}))
    if story.draft_cost > 0:
        fig.add_trace(go.Scatter(
            x=xs, y=story.check_cost, mode="lines", name=CHECK_ONLY, line={"color": PLAIN, "width": 1.5, "dash": "dot"},
            hovertemplate="N %{x}: the check alone costs %{y:.2f} plain steps<extra></extra>"))
    fig.add_trace(go.Scatter(
        x=xs, y=be, mode="lines+markers", name=BREAK_EVEN, customdata=story.check_cost,
        line={"color": TIME_COLORS["verify"], "width": 2.5}, marker={"size": 5, "color": TIME_COLORS["verify"]},
        hovertemplate=("a %{x}-token tree: check %{customdata:.2f} + drafting " + f"{story.draft_cost:.2f}"
                       + " = %{y:.2f} plain steps<br>a step must yield more than %{y:.2f} tokens<extra></extra>")))
    if story.steps:
        fig.add_trace(go.Scatter(
            x=[xs[0], xs[-1]], y=[story.tau, story.tau], mode="lines", name=TAU,
            line={"color": HASS, "width": 2.5, "dash": "dash"},
            hovertemplate=f"this answer: {story.tau:.2f} tokens per step<extra></extra>"))
        rel = dict(zip(xs, story.check_cost))
        used = list(story.sizes_used)
        counts = [story.sizes_used[n] for n in used]
        top = max(counts)
        fig.add_trace(go.Scatter(
            x=used, y=[check_cost(rel, n) + story.draft_cost for n in used], mode="markers", name=USED,
            customdata=counts,
            marker={"symbol": "circle", "color": PAPER, "size": [8 + 12 * math.sqrt(c / top) for c in counts],
                    "line": {"width": 2, "color": MARKER_LINE}},
            hovertemplate="%{x}-token trees: %{customdata} steps<br>break-even τ %{y:.2f}<extra></extra>"))
    fig.update_xaxes(title_text="tree size N (tokens checked in one target forward)", rangemode="tozero")
    fig.update_yaxes(title_text="plain steps = τ needed", rangemode="tozero")
    if story.steps and xs[-1] > 2 * max(story.sizes_used) and xs[-1] > 16:
        # the sizes used and where τ crosses the line fill the view; zooming out shows the whole curve
        hi = max(16.0, 2.0 * max(story.sizes_used))
        fig.update_xaxes(range=[0, hi])
        fig.update_yaxes(range=[0, 1.15 * max(story.tau, check_cost(dict(zip(xs, story.check_cost)), hi)
                                             + story.draft_cost)])
    if title is None:
        if not story.steps:
            title = "What checking a draft tree costs here"
        elif story.measured_speedup is not None:
            title = f"τ {story.tau:.2f} vs {story.needed_tau:.2f} needed · measured {verdict(story.measured_speedup)}"
        else:
            title = f"τ {story.tau:.2f} vs {story.needed_tau:.2f} needed · {verdict(story.predicted_speedup)}"
    return apply_theme(fig, title, PANEL_HEIGHT, uirevision)


__all__ = ["CostStory", "cost_story", "cost_figure", "relative_curve", "check_cost", "verdict",
           "BREAK_EVEN", "CHECK_ONLY", "TAU", "WIN", "USED"]
