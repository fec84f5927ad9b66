"""`python -m visual.preview OUT.html`: every figure on one page from a synthetic run.

For humans checking the look and for the app author: no model, no torch, just made-up step
events with the shapes the decoder produces (prefill, speculative steps with a 60-node tree,
a plain race, training metrics, a batch).
"""
from __future__ import annotations

import argparse
import html
import math
import random
from pathlib import Path

import plotly.io as pio

from hass.events import DraftTree, Step

from .charts import (accept_length_figure, batch_heatmap, depth_acceptance_figure, speedup_figure,
                     time_split_figure, training_figure)
from .colors import legend_html
from .highlight import HIGHLIGHT_CSS, highlight_html
from .tree import mask_figure, tree_figure

# token id -> text; whitespace, newlines and markup on purpose
VOCAB = [" the", " a", " tree", " draft", "\n", "    ", "def", " speculative", " decoding", "(", ")", ":",
         " is", " fast", "<script>", " &", " token", " model", ".", ",", " verify", " accept", "\n\n", " return",
         " x", " =", " 1", " +", "tab\t", " HASS", " EAGLE", " target"]


def synthetic_tree(rng: random.Random, root: int, nodes: int = 60, depth: int = 6, top_k: int = 4) -> DraftTree:
    """A plausible EAGLE-2-like tree: each depth expands the most likely nodes of the last."""
    tokens, parents, depths, logp, prob = [root], [-1], [0], [0.0], [1.0]
    frontier = [0]
    for d in range(1, depth + 1):
        nxt = []
        for v in sorted(frontier, key=lambda i: -logp[i])[:top_k + 2]:
            width = top_k if v == 0 else rng.randint(1, top_k)
            raw = sorted((rng.random() ** 2 for _ in range(width)), reverse=True)
            total = sum(raw) + 0.5
            for r in raw:
                if len(tokens) >= nodes:
                    break
                p = r / total
                tokens.append(rng.randrange(len(VOCAB)))
                parents.append(v)
                depths.append(d)
                prob.append(round(p, 5))
                logp.append(round(logp[v] + math.log(max(p, 1e-9)), 5))
                nxt.append(len(tokens) - 1)
        frontier = nxt
        if len(tokens) >= nodes:
            break
    return DraftTree(tokens=tokens, parents=parents, depths=depths, logp=logp, prob=prob)


def synthetic_run(seed: int = 0, steps: int = 24) -> tuple[list[Step], list[Step]]:
    """(speculative steps, plain steps) over roughly the same text."""
    rng = random.Random(seed)
    spec: list[Step] = []
    first = rng.randrange(len(VOCAB))
    spec.append(Step(index=0, kind="prefill", tree=None, path=[], accepted=0, new_tokens=[first], sources=["target"],
                     target_prob=[0.9], timings={"draft": 0.004, "verify": 0.09, "other": 0.001}, position=12))
    root, pos = first, 13
    for i in range(1, steps):
        tree = synthetic_tree(rng, root, nodes=60 if i % 3 else 25)
        path = [0]
        while True:
            kids = sorted(tree.children(path[-1]), key=lambda c: -tree.prob[c])
            if not kids or rng.random() > 0.55 + 0.4 * tree.prob[kids[0]]:
                break
            path.append(kids[0] if rng.random() < 0.8 or len(kids) == 1 else kids[1])
        bonus = rng.randrange(len(VOCAB))
        choice = [rng.randrange(len(VOCAB)) for _ in tree.tokens]
        for a, b in zip(path, path[1:]):
            choice[a] = tree.tokens[b]
        choice[path[-1]] = bonus
        new = [tree.tokens[v] for v in path[1:]] + [bonus]
        spec.append(Step(
            index=i, kind="speculative", tree=tree, path=path, accepted=len(path) - 1, new_tokens=new,
            sources=[f"draft@{d}" for d in range(1, len(path))] + ["bonus"],
            target_prob=[round(rng.uniform(0.5, 1.0), 3) for _ in new],
            timings={"draft": rng.uniform(0.02, 0.03), "verify": rng.uniform(0.09, 0.12),
                     "other": rng.uniform(0.003, 0.008)},
            position=pos, target_choice=choice))
        root, pos = bonus, pos + len(new)
    total = sum(len(s.new_tokens) for s in spec)
    plain = [Step(index=i, kind="prefill" if i == 0 else "plain", tree=None, path=[], accepted=0,
                  new_tokens=[rng.randrange(len(VOCAB))], sources=["target"], target_prob=[0.8],
                  timings={"draft": 0.0, "verify": rng.uniform(0.085, 0.095), "other": 0.002}, position=12 + i)
             for i in range(total)]
    return spec, plain


def synthetic_metrics(seed: int = 0, steps: int = 60, passes: int = 3) -> list[dict]:
    """Training metrics dicts shaped like hass.train's."""
    rng = random.Random(seed)
    out = []
    for s in range(1, steps + 1):
        m: dict = {"step": s * 10, "tokens_per_s": 260 + rng.uniform(-20, 20)}
        for j in range(1, passes + 1):
            m[f"loss_{j}"] = 9.5 * math.exp(-s / 25) + 2.0 + 0.3 * j + rng.uniform(-0.1, 0.1)
            m[f"acc_{j}"] = min(1.0, 0.7 * (1 - math.exp(-s / 20)) - 0.05 * j + rng.uniform(-0.02, 0.02) + 0.06)
        out.append(m)
    return out


def build_page(seed: int = 0, cdn: bool = False) -> str:
    """The whole preview page as one HTML string."""
    spec, plain = synthetic_run(seed)
    texts = [[VOCAB[t] for t in st.new_tokens] for st in spec]
    big = max((st for st in spec if st.tree is not None), key=lambda st: (len(st.tree.tokens), st.accepted))
    small = min((st for st in spec if st.tree is not None), key=lambda st: len(st.tree.tokens))
    node_texts = lambda st: [VOCAB[t] for t in st.tree.tokens]  # noqa: E731
    rng = random.Random(seed)
    batch = [[rng.randint(0, 6) for _ in range(rng.randint(8, 20))] for _ in range(6)]
    figures = [
        ("Draft tree (60 nodes)", tree_figure(big, node_texts(big), VOCAB[big.new_tokens[-1]])),
        ("Draft tree (small)", tree_figure(small, node_texts(small), VOCAB[small.new_tokens[-1]])),
        ("Tree attention mask", mask_figure(small, node_texts(small))),
        ("Speedup race", speedup_figure({"HASS": spec, "plain": plain})),
        ("Acceptance by depth (one draft)", depth_acceptance_figure({"HASS": spec})),
        ("Acceptance by depth (two drafts)",
         depth_acceptance_figure({"HASS": spec, "EAGLE-2": spec[: len(spec) // 2]})),
        ("Tokens per step", accept_length_figure(spec)),
        ("Time split", time_split_figure(spec)),
        ("Training", training_figure(synthetic_metrics(seed))),
        ("Batch", batch_heatmap(batch)),
    ]
    parts = []
    for i, (name, fig) in enumerate(figures):
        js = ("cdn" if cdn else True) if i == 0 else False
        parts.append(f"<section><h2>{html.escape(name)}</h2>"
                     f"{pio.to_html(fig, full_html=False, include_plotlyjs=js)}</section>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>HASS Studio visual preview</title>"
            f"<style>body{{font-family:sans-serif;max-width:760px;margin:20px auto;padding:0 12px}}"
            f"section{{margin-bottom:28px}}{HIGHLIGHT_CSS}</style></head><body>"
            "<h1>HASS Studio: visual preview (synthetic)</h1>"
            f"<h2>Colours</h2>{legend_html()}"
            f"<h2>Chat highlighting</h2>{highlight_html(spec, texts)}"
            f"<h3>Highlighting off</h3>{highlight_html(spec, texts, show=False)}"
            + "".join(parts) + "</body></html>")


def main(argv: list[str] | None = None) -> None:
    """Write the preview page to the path given on the command line."""
    ap = argparse.ArgumentParser(prog="python -m visual.preview", description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="HTML file to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cdn", action="store_true", help="load plotly.js from the CDN (smaller file, needs internet)")
    args = ap.parse_args(argv)
    args.out.write_text(build_page(args.seed, args.cdn), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
