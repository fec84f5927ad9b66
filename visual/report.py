"""The benchmark report: Plotly figures from `python -m hass bench`'s bench.json, written as
one HTML page (and PNGs for the docs).

Built only from the benchmark's summary and per-prompt records (plain data), so the report
can be regenerated without rerunning anything:

    python -m visual.report runs/bench/bench.json [--html report.html] [--png-dir docs/benchmarks]
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from .colors import MARKER_LINE, PLAIN, series_colors
from .theme import apply_theme

REPORT_HEIGHT = 420


def _methods(summary: dict) -> list[str]:
    return list(summary.get("mean", {}))


def _colors(methods: list[str]) -> dict[str, str]:
    colors = series_colors([m for m in methods if m != "plain"])
    colors["plain"] = PLAIN
    return colors


def speedup_by_set(summary: dict, title: str = "Speedup vs plain decoding (same prompts, same tokens)") -> go.Figure:
    """Grouped bars per set (and the mean): each method's tokens/s over plain's, measured
    side by side. The dashed line at 1x is plain decoding."""
    sets = list(summary["sets"]) + ["mean"]
    methods = _methods(summary)
    colors = _colors(methods)
    fig = go.Figure()
    for m in methods:
        vals = [(summary["sets"].get(s, {}) if s != "mean" else summary["mean"]).get(m, {}) for s in sets]
        y = [v.get("speedup") for v in vals]
        tps = [v.get("tokens_per_s") for v in vals]
        fig.add_trace(go.Bar(
            x=sets, y=y, name=m, marker={"color": colors[m], "line": {"width": 1, "color": MARKER_LINE}},
            customdata=[[t if t is not None else float("nan")] for t in tps],
            hovertemplate=f"<b>{html.escape(m)}</b> · %{{x}}<br>%{{y:.2f}}x plain<br>%{{customdata[0]:.1f}} tokens/s"
                          "<extra></extra>",
            texttemplate="%{y:.2f}x", textposition="outside", textfont={"size": 10}, cliponaxis=False))
    fig.add_hline(y=1.0, line={"dash": "dash", "width": 1, "color": PLAIN})
    fig.update_layout(barmode="group", bargap=0.2)
    fig.update_yaxes(title_text="speedup (x plain)", rangemode="tozero")
    return apply_theme(fig, title, REPORT_HEIGHT, "bench-speedup")


def depth_curves(summary: dict, title: str = "Acceptance by draft depth (mean over sets)") -> go.Figure:
    """P(accepted at depth d | depth d-1 reached), one line per speculative method."""
    methods = [m for m in _methods(summary) if summary["mean"][m].get("per_depth_acceptance")]
    colors = _colors(_methods(summary))
    fig = go.Figure()
    for m in methods:
        acc = summary["mean"][m]["per_depth_acceptance"]
        tau = summary["mean"][m].get("tau")
        fig.add_trace(go.Scatter(
            x=list(range(1, len(acc) + 1)), y=acc, mode="lines+markers",
            name=m if tau is None else f"{m} (τ {tau:.2f})", line={"color": colors[m], "width": 2},
            marker={"size": 8, "line": {"width": 1, "color": MARKER_LINE}},
            hovertemplate=f"<b>{html.escape(m)}</b><br>depth %{{x}}: %{{y:.1%}}<extra></extra>"))
    if not methods:
        fig.add_annotation(text="no speculative method in this run", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    fig.update_xaxes(title_text="draft depth d", dtick=1)
    fig.update_yaxes(title_text="P(accept d | reached d-1)", range=[0, 1.05], tickformat=".0%")
    return apply_theme(fig, title, REPORT_HEIGHT, "bench-depth")


def time_split(summary: dict, title: str = "Where the time goes (ms per new token, all sets)") -> go.Figure:
    """Stacked horizontal bars: draft / verify (the target forward) / other, per new token.
    Methods timed only as a whole (transformers' generate) are one grey bar."""
    methods = _methods(summary)
    parts = {"draft": "#0072B2", "verify": "#E69F00", "other": "#B0B0B0"}
    labels = {"draft": "draft", "verify": "target forward (verify)", "other": "other", "total": "whole run (not split)"}
    per: dict[str, dict[str, float]] = {}
    for m in methods:
        rows = [summary["sets"][s][m] for s in summary["sets"] if m in summary["sets"][s]]
        tokens = sum(r["new_tokens"] for r in rows) or 1
        split = {p: sum(r.get(f"{p}_s", 0.0) for r in rows) * 1e3 / tokens for p in parts}
        if not any(split.values()):                   # not split: the whole wall time is one bar
            split = {"total": sum(r["wall_s"] for r in rows) * 1e3 / tokens}
        per[m] = split
    fig = go.Figure()
    for p, color in {**parts, "total": "#6E6E6E"}.items():
        xs = [per[m].get(p) for m in methods]
        if all(x is None for x in xs):
            continue
        fig.add_trace(go.Bar(
            y=methods, x=[x or 0.0 for x in xs], name=labels[p], orientation="h",
            marker={"color": color, "line": {"width": 1, "color": MARKER_LINE}},
            hovertemplate=f"%{{y}}: {labels[p]} %{{x:.1f}} ms/token<extra></extra>"))
    fig.update_layout(barmode="stack", legend={"traceorder": "normal"})
    fig.update_xaxes(title_text="milliseconds per new token")
    fig.update_yaxes(autorange="reversed")
    return apply_theme(fig, title, REPORT_HEIGHT, "bench-time")


def tau_by_set(summary: dict, title: str = "Acceptance length τ per set (pooled)") -> go.Figure:
    """τ = new tokens per target forward, per set, for the speculative methods."""
    methods = [m for m in _methods(summary) if m != "plain" and summary["mean"][m].get("per_depth_acceptance")]
    colors = _colors(_methods(summary))
    sets = list(summary["sets"])
    fig = go.Figure()
    for m in methods:
        fig.add_trace(go.Bar(
            x=sets, y=[summary["sets"][s].get(m, {}).get("tau") for s in sets], name=m,
            marker={"color": colors[m], "line": {"width": 1, "color": MARKER_LINE}},
            texttemplate="%{y:.2f}", textposition="outside", textfont={"size": 10}, cliponaxis=False,
            hovertemplate=f"<b>{html.escape(m)}</b> · %{{x}}<br>τ %{{y:.3f}}<extra></extra>"))
    fig.update_layout(barmode="group", bargap=0.2)
    fig.update_yaxes(title_text="τ (tokens per target forward)", rangemode="tozero")
    return apply_theme(fig, title, REPORT_HEIGHT, "bench-tau")


def figures(summary: dict) -> dict[str, go.Figure]:
    """Every figure of the report, keyed by a file-name stem."""
    return {"speedup": speedup_by_set(summary), "tau": tau_by_set(summary),
            "depth_acceptance": depth_curves(summary), "time_split": time_split(summary)}


def _table(summary: dict) -> str:
    head = ["set", "method", "tokens/s", "speedup", "τ", "τ (macro)", "equal to plain"]
    rows = [(s, m, v) for s, ms in summary["sets"].items() for m, v in ms.items()]
    rows += [("mean", m, v) for m, v in summary["mean"].items()]

    def f(x, fmt):
        return "–" if x is None else format(x, fmt)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            s, m, f(v.get("tokens_per_s"), ".1f"), f(v.get("speedup"), ".2f") + "x", f(v.get("tau"), ".2f"),
            f(v.get("tau_macro"), ".2f"), "–" if v.get("greedy_equal") is None else f"{v['greedy_equal']:.0%}"))
        + "</tr>" for s, m, v in rows)
    return ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + body + "</tbody></table>")


def origin_table(summary: dict) -> str:
    """Per method, over all sets: tree nodes verified and accepted by origin (draft, lookup,
    both) and the tree sizes chosen (nodes incl. the root: mean, quartiles of the per-set
    medians). Empty when no method recorded origins."""
    rows = []
    for m in dict.fromkeys(m for ms in summary.get("sets", {}).values() for m in ms):
        per_set = [ms[m] for ms in summary["sets"].values() if m in ms]
        offered: dict[str, int] = {}
        accepted: dict[str, int] = {}
        for v in per_set:
            for o, d in (v.get("by_origin") or {}).items():
                offered[o] = offered.get(o, 0) + d["offered"]
                accepted[o] = accepted.get(o, 0) + d["accepted"]
        if not offered:
            continue
        cells = [f"{accepted.get(o, 0)} / {offered[o]} ({accepted.get(o, 0) / offered[o]:.0%})" if o in offered
                 else "–" for o in ("draft", "lookup", "both")]
        sizes = [v["tree_size_mean"] for v in per_set if v.get("tree_size_mean") is not None]
        medians = [v["tree_size_quartiles"][2] for v in per_set if v.get("tree_size_quartiles")]
        rows.append(f"| {m} | " + " | ".join(cells) + f" | {sum(sizes) / len(sizes):.1f} | "
                    + ", ".join(f"{x:g}" for x in medians) + " |")
    if not rows:
        return ""
    return "\n".join(["Tree nodes accepted / verified, by origin (all sets), and tree sizes (nodes incl. the root):",
                      "", "| method | draft | lookup | both | mean size | median size per set |",
                      "|---|---|---|---|---|---|", *rows])


def report_html(bench: dict, figs: dict[str, go.Figure] | None = None) -> str:
    """A self-contained page: settings, the summary table and every figure (plotly.js inlined
    once, so it opens offline)."""
    summary = {"sets": bench["sets"], "mean": bench["mean"]}
    figs = figures(summary) if figs is None else figs
    settings = bench.get("settings", {})
    machine = bench.get("machine", {})
    meta = html.escape(json.dumps({"settings": settings, "machine": machine}, indent=1))
    parts = [pio.to_html(fig, full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
             for i, fig in enumerate(figs.values())]
    return ("<!doctype html><html><head><meta charset='utf-8'><title>HASS Studio benchmark</title>"
            "<style>body{font-family:Inter,'Segoe UI',Helvetica,Arial,sans-serif;margin:2rem;max-width:1100px}"
            "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}"
            "pre{background:#f6f8fa;padding:8px;font-size:12px}</style></head><body>"
            "<h1>HASS Studio benchmark</h1>" + _table(summary) + "".join(parts)
            + f"<h2>Settings</h2><pre>{meta}</pre></body></html>")


METHOD_NOTES = {
    "plain": "one target forward per token (the reference)",
    "plain-stock": "plain decoding with torch's stock matmul kernels",
    "plain-onednn": "plain decoding with oneDNN's packed matmul kernels",
    "plain-rows": "plain decoding with the project's streaming rows kernel (hass/rowkernel.py)",
    "hass": "the HASS draft and lookup candidates in one tree; at T > 0 coupled sampling (the target and "
            "the draft share each position's noise: plain sampling's very tokens)",
    "hass-draft": "the HASS draft alone (no lookup candidates)",
    "lookup": "lookup candidates alone (no draft head)",
    "hass-rejection": "as hass, but at T > 0 the multi-candidate rejection rule (plain sampling's "
                      "distribution, not its tokens)",
    "eagle2": "the EAGLE-2 draft, same tree rule as hass",
    "hf-generate": "transformers' generate",
    "hf-prompt-lookup": "transformers' prompt lookup decoding",
}


def method_legend(methods: list[str]) -> list[str]:
    """One line per method of the run that has a known meaning."""
    known = [m for m in methods if m in METHOD_NOTES]
    if not known:
        return []
    return ["- methods: " + "; ".join(f"`{m}` {METHOD_NOTES[m]}" for m in known),
            "- equal to plain: the share of prompts whose tokens equal plain decoding's, checked for every "
            "method at T = 0 and at T > 0 for the methods that sample with plain decoding's noise"]


def report_markdown(bench: dict, png_dir: Path | None, doc_path: Path, title: str = "Benchmarks",
                    source: str = "RUN/bench.json") -> str:
    """docs/BENCHMARKS.md (or another page: its `title` and the bench.json it is written from):
    the run's command, machine and date, the table of every temperature, and the PNG plots.
    Everything in it comes from bench.json."""
    import os
    import platform

    machine = bench.get("machine", {})
    settings = bench.get("settings", {})
    made_by = "`make benchmarks` runs both" if title == "Benchmarks" else None
    lines = [f"# {title}", "",
             f"Generated by `python -m visual.report {source} --markdown {doc_path.as_posix()}"
             + (f" --title '{title}'" if title != "Benchmarks" else "") + "` from the run's "
             f"`bench.json` ({made_by + '; ' if made_by else ''}do not edit by hand).", "",
             f"- command: `{bench.get('command', 'python -m hass bench')}`",
             f"- date: {bench.get('date', 'unknown')}",
             f"- machine: {machine.get('cpu', platform.processor() or platform.machine())}, "
             f"device {machine.get('device', '?')}"
             + (f" ({machine['accelerator']})" if machine.get("accelerator") else "")
             + f", {machine.get('threads', '?')} torch threads"
             + (f", {machine['dtype']} target with {machine['kernels']} matmul kernels" if machine.get("kernels") else "")
             + (f" and {machine['attention']} attention" if machine.get("attention") else "")
             + (f", {machine['note']}" if machine.get("note") else "")
             + (f" (1-min load average {machine['load_avg_before']} before, {machine['load_avg_after']} after)"
                if machine.get("load_avg_before") is not None else ""),
             *(["- verify cost curve the fitted trees used (c(N) / c(1), cached or measured on first use): "
                + ", ".join(f"N={k} {v / machine['verify_cost_curve']['1']:.2f}"
                            for k, v in machine["verify_cost_curve"].items())]
               if (machine.get("verify_cost_curve") or {}).get("1") else []),
             f"- model: {settings.get('model', '?')}; trees (total, depth, top-k): "
             + ", ".join(f"{k} {v}" for k, v in settings.get("trees", {}).items()),
             f"- {settings.get('limit', '?')} questions per set, {settings.get('max_new_tokens', '?')} new tokens per turn; "
             "every method runs the same prompts in one process after a warm-up, in an order rotated from "
             "prompt to prompt; "
             "speedup = tokens/s over plain's tokens/s for the same prompts.",
             *method_legend(list(bench.get("mean") or {})), ""]
    for temp, table in bench.get("markdown", {}).items():       # rendered by `hass bench` itself
        lines += [f"## T = {temp}", "", table, ""]
        origins = origin_table(bench.get("by_temperature", {}).get(temp, {}))
        if origins:
            lines += [origins, ""]
    if png_dir:
        rel = os.path.relpath(png_dir, doc_path.parent)
        names = {"speedup": "Speedup vs plain", "tau": "Acceptance length per set",
                 "depth_acceptance": "Acceptance by depth", "time_split": "Time split"}
        for stem, label in names.items():
            lines += [f"![{label}]({rel}/{stem}.png)", ""]
    return "\n".join(lines)


def write_report(bench_json: Path, html_out: Path | None = None, png_dir: Path | None = None,
                 scale: float = 2.0, markdown: Path | None = None, title: str = "Benchmarks") -> list[Path]:
    """Write the HTML report (default: beside bench.json) and, optionally, one PNG per figure."""
    bench = json.loads(Path(bench_json).read_text())
    html_out = html_out or Path(bench_json).with_name("report.html")
    tmp = html_out.with_suffix(".tmp")
    figs = figures({"sets": bench["sets"], "mean": bench["mean"]})
    tmp.write_text(report_html(bench, figs), encoding="utf-8")
    tmp.replace(html_out)
    written = [html_out]
    if png_dir:
        png_dir.mkdir(parents=True, exist_ok=True)
        for name, fig in figs.items():
            path = png_dir / f"{name}.png"
            fig.write_image(str(path), width=900, height=REPORT_HEIGHT, scale=scale)   # needs kaleido
            written.append(path)
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(report_markdown(bench, png_dir, markdown, title, Path(bench_json).as_posix()),
                            encoding="utf-8")
        written.append(markdown)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m visual.report", description=__doc__.split("\n\n")[0])
    p.add_argument("bench_json", type=Path, help="bench.json written by `python -m hass bench`")
    p.add_argument("--html", type=Path, default=None, help="default: report.html beside bench.json")
    p.add_argument("--png-dir", type=Path, default=None, help="also write one PNG per figure here")
    p.add_argument("--markdown", type=Path, default=None, help="also write a Markdown page (docs/BENCHMARKS.md)")
    p.add_argument("--title", default="Benchmarks", help="the Markdown page's title")
    args = p.parse_args(argv)
    if not args.bench_json.is_file():
        print(f"error: {args.bench_json} not found (run `python -m hass bench` first)", file=sys.stderr)
        return 2
    for path in write_report(args.bench_json, args.html, args.png_dir, markdown=args.markdown, title=args.title):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
