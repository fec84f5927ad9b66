"""Generated text as HTML spans coloured by where each token came from.

Built from the step events and per-token texts in order, never by searching the output
string for token text: a token such as `)` or four spaces occurs many times in code, and a
search would colour the wrong occurrence. Per-token texts should come from incremental
decoding (text of ids[:k+1] minus text of ids[:k]), so multi-byte characters split over
tokens still add up to the real output.
"""
from __future__ import annotations

import html
from collections.abc import Sequence

from hass.events import Step

from .colors import BONUS, LOOKUP_RING, TARGET, depth_color, text_color

# an accepted lookup token keeps its depth colour and gets this underline (colour is never the only cue)
LOOKUP_UNDERLINE = f";text-decoration:underline dashed {LOOKUP_RING} 2px;text-underline-offset:3px"

# Inline styles carry the colours (they survive HTML sanitisers that drop <style>); this CSS
# adds the layout and is meant for the app's `css=`.
HIGHLIGHT_CSS = """
.hs-out { white-space: pre-wrap; word-break: break-word; line-height: 1.55;
          font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.hs-tok { border-radius: 3px; padding: 0 1px; box-decoration-break: clone; -webkit-box-decoration-break: clone; }
.hs-tok + .hs-tok { box-shadow: inset 1px 0 0 rgba(255, 255, 255, 0.7); }
.hs-tok:hover { outline: 1px solid #333333; }
"""


def _flatten(steps: Sequence[Step], token_texts: Sequence[str] | Sequence[Sequence[str]]) -> list[str]:
    n = sum(len(st.new_tokens) for st in steps)
    if token_texts and not isinstance(token_texts[0], str):
        if len(token_texts) != len(steps):
            raise ValueError(f"{len(token_texts)} text lists for {len(steps)} steps")
        for st, texts in zip(steps, token_texts):
            if len(texts) != len(st.new_tokens):
                raise ValueError(f"step {st.index}: {len(texts)} texts for {len(st.new_tokens)} new tokens")
        flat = [t for texts in token_texts for t in texts]
    else:
        flat = list(token_texts)
    if len(flat) != n:
        raise ValueError(f"{len(flat)} token texts for {n} new tokens")
    return flat


def _draft_prob(step: Step, depth: int) -> float | None:
    """Draft probability of the accepted token at `depth` (the path node at that depth)."""
    if step.tree is None or depth >= len(step.path):
        return None
    node = step.path[depth]
    return step.tree.prob[node] if node < len(step.tree.prob) else None


def token_info(step: Step, k: int) -> tuple[str, str]:
    """(background colour, hover title) of the k-th new token of `step`."""
    src = step.sources[k] if k < len(step.sources) else "target"
    parts = [f"step {step.index}"]
    if src.startswith("lookup@"):
        depth = int(src.split("@", 1)[1])
        color = depth_color(depth)
        parts.append(f"lookup depth {depth} (copied from earlier text)")
    elif src.startswith("draft@"):
        depth = int(src.split("@", 1)[1])
        color = depth_color(depth)
        both = step.tree is not None and depth < len(step.path) and len(step.tree.origin) > step.path[depth] \
            and step.tree.origin[step.path[depth]] == "both"
        parts.append(f"draft depth {depth}" + (" (lookup found it too)" if both else ""))
    elif src == "bonus":
        color = BONUS
        parts.append("target bonus")
    else:
        color = TARGET
        parts.append("target (prefill)" if step.kind == "prefill" else "target (plain)")
    if k < len(step.target_prob):
        parts.append(f"target p {step.target_prob[k]:.3f}")
    if src.startswith("draft@"):
        q = _draft_prob(step, int(src.split("@", 1)[1]))
        if q is not None:
            parts.append(f"draft p {q:.3f}")
    return color, " · ".join(parts)


def highlight_html(steps: Sequence[Step], token_texts: Sequence[str] | Sequence[Sequence[str]],
                   show: bool = True) -> str:
    """One `<span class="hs-tok">` per new token, coloured by its source (accepted draft by
    depth, target bonus, plain / prefill target) with a hover title; `show=False` gives the
    same text uncoloured. token_texts: a flat list over all new tokens, or one list per step.
    Text is HTML-escaped; newlines stay (white-space: pre-wrap)."""
    flat = _flatten(steps, token_texts)
    out = []
    i = 0
    for st in steps:
        for k in range(len(st.new_tokens)):
            text = html.escape(flat[i], quote=False)
            i += 1
            if not show:
                out.append(text)
                continue
            color, title = token_info(st, k)
            mark = LOOKUP_UNDERLINE if k < len(st.sources) and st.sources[k].startswith("lookup@") else ""
            out.append(f'<span class="hs-tok" style="background:{color};color:{text_color(color)}{mark}" '
                       f'title="{html.escape(title, quote=True)}">{text}</span>')
    return '<div class="hs-out" style="white-space:pre-wrap">' + "".join(out) + "</div>"


__all__ = ["HIGHLIGHT_CSS", "highlight_html", "token_info"]
