"""Generated text as HTML spans coloured by where each token came from.

Built from the step events and per-token texts in order, never by searching the output
string for token text: a token such as `)` or four spaces occurs many times in code, and a
search would colour the wrong occurrence. Per-token texts should come from incremental
decoding (text of ids[:k+1] minus text of ids[:k]), so multi-byte characters split over
tokens still add up to the real output.
"""
from __future__ import annotations

import html
import re
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
.hs-out.hs-rich { font-family: inherit; }
.hs-code { display: block; white-space: pre; overflow-x: auto; margin: 4px 0; padding: 6px 8px; border-radius: 6px;
           background: #F6F8FA; border: 1px solid #E3E6EA; line-height: 1.45;
           font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.92em; }
"""

# a fence line: up to 3 spaces, then ``` or ~~~ (CommonMark's fenced code blocks)
FENCE = re.compile(r"[ \t]{0,3}(`{3,}|~{3,})")
# inline styles again: the layout survives sanitisers that drop classes' CSS
CODE_OPEN = '<div class="hs-code" style="white-space:pre;overflow-x:auto">'


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


def code_regions(text: str) -> list[tuple[int, int]]:
    """[start, end) character ranges of the fenced code blocks in `text`: from the opening
    fence line to the end of the closing one (its newline included); a fence closes with a
    line of only the same character, at least as many. An unclosed block runs to the end
    (an answer still streaming)."""
    regions: list[tuple[int, int]] = []
    pos, start, fence = 0, None, ""
    for line in text.splitlines(keepends=True):
        m = FENCE.match(line)
        if start is None:
            if m:
                start, fence = pos, m.group(1)
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line[m.end():].strip():
            regions.append((start, pos + len(line)))
            start = None
        pos += len(line)
    if start is not None:
        regions.append((start, pos))
    return regions


def highlight_html(steps: Sequence[Step], token_texts: Sequence[str] | Sequence[Sequence[str]],
                   show: bool = True, code_blocks: bool = False) -> str:
    """One `<span class="hs-tok">` per new token, coloured by its source (accepted draft by
    depth, target bonus, plain / prefill target) with a hover title; `show=False` gives the
    same text uncoloured. token_texts: a flat list over all new tokens, or one list per step.
    Text is HTML-escaped; newlines stay (white-space: pre-wrap).

    code_blocks: fenced code blocks (```) go into a `<div class="hs-code">` that keeps their
    layout (white-space: pre, monospace, scrolling sideways instead of wrapping), the prose
    around them in the page's font; a token across a block's edge is split there into two
    spans with the same colour and title, so the spans still add up to the text."""
    flat = _flatten(steps, token_texts)
    cuts: list[int] = []
    if code_blocks:
        for a, b in code_regions("".join(flat)):
            cuts += [a, b]
    out = []
    i = 0
    pos = 0              # character offset of the current token in the text
    c = 0                # next cut
    inside = False
    for st in steps:
        for k in range(len(st.new_tokens)):
            text = flat[i]
            i += 1
            if show:
                color, title = token_info(st, k)
                mark = LOOKUP_UNDERLINE if k < len(st.sources) and st.sources[k].startswith("lookup@") else ""
                attrs = (f'class="hs-tok" style="background:{color};color:{text_color(color)}{mark}" '
                         f'title="{html.escape(title, quote=True)}"')
            end = pos + len(text)
            start = 0
            while c < len(cuts) and cuts[c] < end:      # a block edge inside this token (or at its start)
                at = cuts[c] - pos
                if at > start:
                    piece = html.escape(text[start:at], quote=False)
                    out.append(f"<span {attrs}>{piece}</span>" if show else piece)
                    start = at
                out.append("</div>" if inside else CODE_OPEN)
                inside = not inside
                c += 1
            if start < len(text) or not text:
                piece = html.escape(text[start:], quote=False)
                out.append(f"<span {attrs}>{piece}</span>" if show else piece)
            pos = end
    while c < len(cuts):                    # a block ending exactly at the end of the text
        out.append("</div>" if inside else CODE_OPEN)
        inside = not inside
        c += 1
    if inside:
        out.append("</div>")
    cls = "hs-out hs-rich" if cuts else "hs-out"
    return f'<div class="{cls}" style="white-space:pre-wrap">' + "".join(out) + "</div>"


__all__ = ["HIGHLIGHT_CSS", "highlight_html", "token_info", "code_regions"]
