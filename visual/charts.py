"""Charts over many steps: per-depth acceptance, the speedup race, time split, accepted
length per step, training curves and the batch heatmap.

Every aggregate comes from `hass.events.summarize`, so the numbers in the plots are the
numbers of the CLI and the benchmark.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from hass.events import Step, Summary, speedup, summarize

from .colors import BONUS, DEPTH_COLORS, MARKER_LINE, TIME_COLORS, depth_color, series_colors
from .theme import PANEL_HEIGHT, apply_theme, empty_figure


def _summary(x: Summary | list[Step]) -> Summary:
    return x if isinstance(x, Summary) else summarize(list(x))


def depth_acceptance_figure(series: Mapping[str, Summary | list[Step]], title: str | None = None, *,
                            uirevision: str = "hass-depth") -> go.Figure:
    """Bars of P(accepted at depth d | reached depth d-1), one series per draft.

    A single series is coloured by depth (the chat's colours); compared drafts get their
    series colours. Series without speculative steps (plain decoding) are left out. Hover
    shows accepted / reached counts.
    """
    sums = {name: _summary(v) for name, v in series.items()}
    sums = {name: s for name, s in sums.items() if s.reached_per_depth}    # plain decoding has no depths
    if not sums:
        return empty_figure("no speculative steps yet", title or "Acceptance by depth", uirevision=uirevision)
    colors = series_colors(list(sums))
    fig = go.Figure()
    for name, s in sums.items():
        depths = list(range(1, len(s.per_depth_acceptance) + 1))
        color = [depth_color(d) for d in depths] if len(sums) == 1 else colors[name]
        fig.add_trace(go.Bar(
            x=depths, y=s.per_depth_acceptance, name=f"{name} (τ {s.tau:.2f})",
            marker={"color": color, "line": {"width": 1, "color": MARKER_LINE}},
            customdata=list(zip(s.accepted_per_depth, s.reached_per_depth)),
            hovertemplate=(f"<b>{_plotly_text(name)}</b><br>depth %{{x}}: %{{customdata[0]}} of %{{customdata[1]}}"
                           " reached<br>acceptance %{y:.1%}<extra></extra>"),
            texttemplate="%{y:.0%}", textposition="outside", textfont={"size": 9}, cliponaxis=False,
        ))
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_xaxes(title_text="draft depth d", dtick=1)
    fig.update_yaxes(title_text="P(accept d | reached d-1)", range=[0, 1.12], tickformat=".0%")
    return apply_theme(fig, title or "Acceptance by depth", PANEL_HEIGHT, uirevision)


def pass_accuracy_figure(series: Mapping[str, Sequence[float] | None], title: str | None = None, *,
                         uirevision: str = "hass-passes") -> go.Figure:
    """Held-out top-1 accuracy per alignment pass, one bar group per pass and one series per
    draft (from each draft's card, `eval.json` heldout.accuracy_per_pass). Pass 1 predicts
    from the target's features; pass j > 1 from the draft's own features of pass j - 1, as
    when it drafts j tokens ahead. A draft given as None has no evaluation: the figure says
    so instead of drawing a bar."""
    title = title or "Held-out accuracy per alignment pass"
    known = {name: list(v) for name, v in series.items() if v}
    missing = [name for name, v in series.items() if not v]
    if not known:
        return empty_figure("no evaluated draft: " + ", ".join(missing) + " not evaluated" if missing
                            else "no draft to compare", title, uirevision=uirevision)
    colors = series_colors(list(known))
    fig = go.Figure()
    for name, acc in known.items():
        fig.add_trace(go.Bar(
            x=[f"pass {j}" for j in range(1, len(acc) + 1)], y=acc, name=name,
            marker={"color": colors[name], "line": {"width": 1, "color": MARKER_LINE}},
            hovertemplate=f"<b>{_plotly_text(name)}</b><br>%{{x}}: %{{y:.1%}} top-1 (held out)<extra></extra>",
            texttemplate="%{y:.0%}", textposition="outside", textfont={"size": 9}, cliponaxis=False,
        ))
    top = max(max(v) for v in known.values())
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_xaxes(title_text="alignment pass (pass j: drafting j tokens ahead, from its own features)")
    fig.update_yaxes(title_text="top-1 accuracy (held out)", range=[0, min(1.0, top * 1.25 + 0.02)],
                     tickformat=".0%")
    if missing:
        fig.add_annotation(text=" · ".join(f"{m}: not evaluated" for m in missing), showarrow=False, x=1, y=1,
                           xref="paper", yref="paper", xanchor="right", yanchor="bottom",
                           font={"size": 10, "color": "#555555"})
    return apply_theme(fig, title, PANEL_HEIGHT, uirevision)


def _plotly_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("%{", "%&#123;")


def plain_key(races: Mapping[str, list[Step]]) -> str | None:
    """The baseline of a race: the series named 'plain...', else one without speculative steps."""
    for name in races:
        if "plain" in name.lower():
            return name
    for name, steps in races.items():
        if steps and not any(s.kind == "speculative" for s in steps):
            return name
    return None


def speedups(races: Mapping[str, list[Step]]) -> dict[str, float]:
    """tokens/s of each series divided by the plain series' tokens/s (empty without a baseline)."""
    base = plain_key(races)
    if base is None:
        return {}
    b = summarize(list(races[base]))
    out = {}
    for name, steps in races.items():
        if name != base:
            s = summarize(list(steps))
            r = speedup(b.new_tokens, b.seconds, s.new_tokens, s.seconds)
            if r is not None:
                out[name] = r
    return out


def speed_words(ratio: float, base: str = "plain") -> str:
    """A speed ratio in words that read one way only: '1.24× faster than plain', or below one
    '0.80× the speed of plain: plain is 1.25× faster' (never '0.80× slower')."""
    if round(ratio, 2) == 1.0:
        return f"as fast as {base} (1.00×)"
    if ratio > 1:
        return f"{ratio:.2f}× faster than {base}"
    if ratio <= 0:
        return f"{ratio:.2f}× the speed of {base}"
    return f"{ratio:.2f}× the speed of {base}: {base} is {1 / ratio:.2f}× faster"


def speedup_title(races: Mapping[str, list[Step]]) -> str:
    """'HASS 2.31× faster than plain (45.1 vs 19.5 tok/s)' - the live headline of a race; a
    ratio below 1 says 'HASS 0.80× the speed of plain: plain is 1.25× faster'."""
    tps = {name: summarize(list(steps)).tokens_per_s for name, steps in races.items()}
    ratios = speedups(races)
    base = plain_key(races)
    if not ratios:
        return "Tokens over time · " + " · ".join(f"{n} {v:.1f} tok/s" for n, v in tps.items())
    if len(ratios) == 1:
        (name, r), = ratios.items()
        return f"{name} {speed_words(r, base)} ({tps[name]:.1f} vs {tps[base]:.1f} tok/s)"
    return f"Speed against {base}: " + " · ".join(f"{n} {speed_words(r, base)}" for n, r in ratios.items())


def speedup_figure(races: Mapping[str, list[Step]], title: str | None = None, *,
                   uirevision: str = "hass-race") -> go.Figure:
    """Tokens generated over wall time per series (x = cumulative step seconds, y =
    cumulative new tokens), with the current speedup (tokens/s ratio) in the title."""
    if not any(races.values()):
        return empty_figure("the race has not started", title or "Speedup", uirevision=uirevision)
    colors = series_colors(list(races))
    fig = go.Figure()
    for name, steps in races.items():
        t, n = [0.0], [0]
        for s in steps:
            t.append(t[-1] + s.seconds)
            n.append(n[-1] + len(s.new_tokens))
        fig.add_trace(go.Scatter(
            x=t, y=n, mode="lines", name=name, line={"color": colors[name], "width": 2.5, "shape": "hv"},
            customdata=[0] + [s.index for s in steps],
            hovertemplate=(f"<b>{_plotly_text(name)}</b><br>%{{x:.2f}} s: %{{y}} tokens<br>after step %{{customdata}}"
                           "<extra></extra>"),
        ))
    fig.update_xaxes(title_text="wall time (s, sum of step timings)", rangemode="tozero")
    fig.update_yaxes(title_text="tokens generated", rangemode="tozero")
    return apply_theme(fig, title or speedup_title(races), PANEL_HEIGHT, uirevision)


def time_split_figure(steps: list[Step], title: str | None = None, *, uirevision: str = "hass-time") -> go.Figure:
    """Draft / verify / other milliseconds per step as stacked bars: where the time goes."""
    if not steps:
        return empty_figure("no steps yet", title or "Time per step", uirevision=uirevision)
    s = summarize(list(steps))
    total = s.seconds or 1.0
    share = {"draft": s.draft_s / total, "verify": s.verify_s / total, "other": s.other_s / total}
    fig = go.Figure()
    x = [st.index for st in steps]
    kinds = [st.kind for st in steps]
    for part in ("draft", "verify", "other"):
        fig.add_trace(go.Bar(
            x=x, y=[1000 * st.timings.get(part, 0.0) for st in steps], name=f"{part} ({share[part]:.0%})",
            marker={"color": TIME_COLORS[part], "line": {"width": 0}}, customdata=kinds,
            hovertemplate=f"step %{{x}} (%{{customdata}})<br>{part}: %{{y:.1f}} ms<extra></extra>",
        ))
    fig.update_layout(barmode="stack", bargap=0.15)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="ms")
    head = (f"Time per step · draft {share['draft']:.0%} · verify {share['verify']:.0%} · "
            f"other {share['other']:.0%}")
    return apply_theme(fig, title or head, PANEL_HEIGHT, uirevision)


def _draft_depths(step: Step) -> list[int]:
    return [int(src.split("@", 1)[1]) for src in step.sources if src.startswith(("draft@", "lookup@"))]


def accept_length_figure(steps: list[Step], title: str | None = None, *,
                         uirevision: str = "hass-accept") -> go.Figure:
    """New tokens per speculative step, stacked by source: accepted drafts in their depth
    colours, the bonus on top; the dashed line is tau (mean new tokens per cycle)."""
    spec = [st for st in steps if st.kind == "speculative"]
    if not spec:
        return empty_figure("no speculative steps yet", title or "Accepted length", uirevision=uirevision)
    tau = summarize(list(steps)).tau
    max_d = max((max(_draft_depths(st), default=0) for st in spec), default=0)
    x = [st.index for st in spec]
    totals = [len(st.new_tokens) for st in spec]
    fig = go.Figure()
    for d in range(1, max_d + 1):
        fig.add_trace(go.Bar(
            x=x, y=[1 if d in _draft_depths(st) else 0 for st in spec], name="accepted draft (colour = depth)",
            legendgroup="accepted", showlegend=d == 1,
            marker={"color": depth_color(d), "line": {"width": 0.6, "color": "#FFFFFF"}},
            customdata=totals, hovertemplate=f"step %{{x}}: depth {d} accepted<br>%{{customdata}} new tokens"
                                             "<extra></extra>",
        ))
    fig.add_trace(go.Bar(
        x=x, y=[1 if st.sources and st.sources[-1] == "bonus" else 0 for st in spec], name="target bonus",
        marker={"color": BONUS, "line": {"width": 0.6, "color": "#FFFFFF"}}, customdata=totals,
        hovertemplate="step %{x}: target bonus<br>%{customdata} new tokens<extra></extra>",
    ))
    fig.add_hline(y=tau, line={"dash": "dash", "color": MARKER_LINE, "width": 1.5},
                  annotation_text=f"τ = {tau:.2f}", annotation_position="top left")
    fig.update_layout(barmode="stack", bargap=0.15)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="new tokens", dtick=1, rangemode="tozero")
    return apply_theme(fig, title or f"Tokens per step · τ = {tau:.2f}", PANEL_HEIGHT, uirevision)


PASS_DASHES = ("solid", "dash", "dot", "dashdot")


def _step_dtick(span: float, ticks: int = 8) -> int:
    """A whole-number tick spacing (1, 2, 5, 10, 20, 50, ...) giving at most about `ticks` ticks."""
    base = 1
    while True:
        for m in (1, 2, 5):
            if span / (base * m) <= ticks:
                return base * m
        base *= 10


def training_figure(metrics: list[dict], title: str | None = None, *, uirevision: str = "hass-train") -> go.Figure:
    """Loss (top) and top-1 accuracy (bottom) per alignment pass over training steps, from
    the metrics dicts of `hass.train` (keys step, loss_j, acc_j, tokens_per_s)."""
    rows = sorted((m for m in metrics if "step" in m), key=lambda m: m["step"])
    passes = sorted({int(k.split("_", 1)[1]) for m in rows for k in m
                     if k.split("_", 1)[0] in ("loss", "acc") and k.split("_", 1)[-1].isdigit()})
    if not rows or not passes:
        return empty_figure("no training metrics yet", title or "Training", height=420, uirevision=uirevision)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=("loss per alignment pass", "top-1 accuracy per alignment pass"))
    for j in passes:
        color = depth_color(j)
        dash = PASS_DASHES[(j - 1) % len(PASS_DASHES)]      # neighbouring blues differ little: dashes tell them apart
        for r, key in ((1, f"loss_{j}"), (2, f"acc_{j}")):
            pts = [(m["step"], m[key], m.get("tokens_per_s")) for m in rows if key in m]
            if not pts:
                continue
            fig.add_trace(go.Scatter(
                x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines", name=f"pass {j}",
                legendgroup=f"pass {j}", showlegend=r == 1, line={"color": color, "width": 2, "dash": dash},
                customdata=[p[2] if p[2] is not None else float("nan") for p in pts],
                hovertemplate=(f"pass {j} · step %{{x}}<br>{key.split('_')[0]} %{{y:.4f}}"
                               "<br>%{customdata:.0f} tok/s<extra></extra>"),
            ), row=r, col=1)
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="accuracy", tickformat=".0%", row=2, col=1)
    fig.update_xaxes(title_text="training step", row=2, col=1)
    fig.update_xaxes(dtick=_step_dtick(rows[-1]["step"] - rows[0]["step"]))     # whole steps, never 1.5
    last = rows[-1]
    head = f"Training · step {last['step']}"
    if f"loss_{passes[0]}" in last:
        head += f" · loss {last[f'loss_{passes[0]}']:.3f}"
    if f"acc_{passes[0]}" in last:
        head += f" · acc {last[f'acc_{passes[0]}']:.1%}"
    if "tokens_per_s" in last:
        head += f" · {last['tokens_per_s']:.0f} tok/s"
    apply_theme(fig, title or head, 420, uirevision)
    fig.update_layout(margin={"t": 64})
    return fig


def batch_heatmap(accepted: list[list[int]], title: str | None = None, *,
                  uirevision: str = "hass-batch") -> go.Figure:
    """Accepted length per sample (row) and cycle (column) of a batched run; samples that
    finished early leave blank cells."""
    if not accepted or not any(accepted):
        return empty_figure("no batch cycles yet", title or "Batch acceptance", uirevision=uirevision)
    width = max(len(r) for r in accepted)
    z = [list(r) + [None] * (width - len(r)) for r in accepted]
    top = max((v for r in accepted for v in r), default=1) or 1
    ramp = list(reversed(DEPTH_COLORS))       # light = few accepted, dark = many
    scale = [[0.0, "#F7FBFF"]] + [[(i + 1) / len(ramp), c] for i, c in enumerate(ramp)]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(width)), y=list(range(len(accepted))), zmin=0, zmax=top, colorscale=scale, xgap=1, ygap=1,
        colorbar={"title": {"text": "accepted"}, "thickness": 12},
        hovertemplate="sample %{y} · cycle %{x}<br>accepted %{z}<extra></extra>", name="accepted",
    ))
    fig.update_xaxes(title_text="cycle", showgrid=False)
    fig.update_yaxes(title_text="sample", autorange="reversed", showgrid=False, dtick=1)
    mean = sum(v for r in accepted for v in r) / max(1, sum(len(r) for r in accepted))
    height = int(min(600, max(PANEL_HEIGHT, 120 + 22 * len(accepted))))
    return apply_theme(fig, title or f"Batch acceptance · mean {mean:.2f} per cycle", height, uirevision)


__all__ = ["depth_acceptance_figure", "pass_accuracy_figure", "speedup_figure", "speedups", "speedup_title",
           "speed_words", "plain_key", "time_split_figure", "accept_length_figure", "training_figure", "batch_heatmap"]
