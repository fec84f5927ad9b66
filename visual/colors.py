"""One colour language for HASS Studio: the chat highlighting and every plot use these.

Why these colours: accepted draft tokens use a single-hue sequential blue ramp (depth 1 is
the darkest, deeper is lighter), so depth reads as lightness even in greyscale. Blue keeps
its lightness under protanopia and deuteranopia, and the ramp has no green, so no
categorical colour forms a red/green pair with it. The categorical colours sit outside the
ramp: the target's bonus token is Okabe-Ito orange, the rejected node a vivid red that
differs from the orange in lightness, unreached nodes a mid grey, plain / target tokens a
near-white grey. tests/test_visual.py simulates protan-, deutan- and tritanopia (Machado
2009) and checks every categorical pair and every category-vs-depth pair stays apart
(CIE76 delta E > 15), that the ramp's lightness rises strictly with depth, and that the
text colour chosen for each background has WCAG contrast >= 4.5.
"""
from __future__ import annotations

import html

# Accepted draft token at depth 1..8 (8 stands for 8 and deeper): ColorBrewer "Blues",
# sampled from 1.0 down to 0.4 (CIELAB lightness 21 -> 77, about 8 units apart).
DEPTH_COLORS: tuple[str, ...] = (
    "#08306B", "#08478D", "#115DA5", "#2373B6", "#3A8AC2", "#549ECD", "#71B1D7", "#94C4DF",
)
BONUS = "#E69F00"          # the target's own token at the end of the accepted path (Okabe-Ito orange)
REJECTED = "#CC3311"       # draft nodes at the first depth where the target disagreed
UNREACHED = "#B0B0B0"      # draft nodes the verification never got to
TARGET = "#EEEEEE"         # tokens from a plain / prefill step (and the tree root: a target token)
LOOKUP_RING = "#009E73"    # lookup candidates: a ring (tree) or a dashed underline (text), never a fill,
                           # so the fill keeps saying accepted-by-depth / rejected / unreached (Okabe-Ito bluish green)

HASS = "#0072B2"           # the speculative (HASS) series in charts (Okabe-Ito blue)
PLAIN = "#6E6E6E"          # plain autoregressive decoding in charts
# further compared drafts, in order (Okabe-Ito reddish purple, bluish green, sky blue, yellow)
SERIES_CYCLE: tuple[str, ...] = ("#CC79A7", "#009E73", "#56B4E9", "#F0E442")

# time split per step: drafting belongs to the draft (HASS blue), verifying is the target's
# forward (dark neutral), the rest is bookkeeping (light neutral)
TIME_COLORS: dict[str, str] = {"draft": HASS, "verify": "#3F3F3F", "other": "#C8C8C8"}

INK = "#111111"            # dark text
PAPER = "#FFFFFF"          # light text / plot background
EDGE = "#9A9A9A"           # tree edges off the verified path
MARKER_LINE = "#333333"    # outline of markers (keeps light fills visible on white, WCAG 1.4.11)


def depth_color(depth: int) -> str:
    """Colour of an accepted draft token at `depth` (1-based); depths past 8 share the last."""
    if depth < 1:
        raise ValueError(f"draft depths start at 1, got {depth}")
    return DEPTH_COLORS[min(depth, len(DEPTH_COLORS)) - 1]


def source_color(source: str) -> str:
    """Colour of a new token from its `Step.sources` entry ("draft@<d>", "lookup@<d>",
    "bonus", "target"); an accepted lookup token has its depth's colour (and an underline)."""
    if source.startswith(("draft@", "lookup@")):
        return depth_color(int(source.split("@", 1)[1]))
    if source == "bonus":
        return BONUS
    return TARGET


def _channel(c: int) -> float:
    s = c / 255
    return s / 12.92 if s <= 0.04045 else ((s + 0.055) / 1.055) ** 2.4


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """'#RRGGBB' -> (r, g, b) in 0..255."""
    h = color.lstrip("#")
    if len(h) != 6:
        raise ValueError(f"expected #RRGGBB, got {color!r}")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def relative_luminance(color: str) -> float:
    """WCAG 2 relative luminance of an sRGB colour."""
    r, g, b = (_channel(c) for c in hex_to_rgb(color))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: str, b: str) -> float:
    """WCAG 2 contrast ratio (1..21) between two colours."""
    la, lb = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_color(background: str) -> str:
    """Dark or light text, whichever contrasts more with `background` (always >= 4.5:1)."""
    return INK if contrast_ratio(background, INK) >= contrast_ratio(background, PAPER) else PAPER


def rgba(color: str, alpha: float) -> str:
    """'#RRGGBB' with an alpha, for translucent fills."""
    r, g, b = hex_to_rgb(color)
    return f"rgba({r},{g},{b},{alpha:g})"


def series_colors(names: list[str]) -> dict[str, str]:
    """Stable series colours by name: 'plain...' is grey, the first '...hass...' is HASS blue,
    every other series takes the next free colour, so HASS looks the same in every chart."""
    out: dict[str, str] = {}
    hass_taken = False
    for n in names:
        low = n.lower()
        if "plain" in low:
            out[n] = PLAIN
        elif "hass" in low and not hass_taken:
            out[n] = HASS
            hass_taken = True
    free = [c for c in ((HASS,) if not hass_taken else ()) + SERIES_CYCLE]
    i = 0
    for n in names:
        if n not in out:
            out[n] = free[i % len(free)]
            i += 1
    return out


# (key, colour, what it means) - the legend and the report are built from this table
COLOR_TABLE: tuple[tuple[str, str, str], ...] = tuple(
    [(f"depth {d}" + ("+" if d == len(DEPTH_COLORS) else ""), c,
      f"draft token accepted at depth {d}" + (" or deeper" if d == len(DEPTH_COLORS) else "")
      + (" (darker = earlier in the step)" if d == 1 else ""))
     for d, c in enumerate(DEPTH_COLORS, start=1)]
    + [("bonus", BONUS, "the target's own token after the accepted drafts (one per step)"),
       ("rejected", REJECTED, "draft guesses at the first depth where the target wanted another token"),
       ("unreached", UNREACHED, "draft nodes verification did not reach (off the accepted path)"),
       ("target", TARGET, "token from plain decoding or the prompt's first step (target only); tree root"),
       ("lookup", LOOKUP_RING, "lookup candidate: copied from what followed the same words earlier (ring in the "
        "tree, dashed underline in the text)"),
       ("HASS", HASS, "speculative decoding with the draft (charts)"),
       ("plain", PLAIN, "plain decoding, one target forward per token (charts)")]
)


def _swatch(color: str, label: str) -> str:
    return (f'<span class="hs-swatch" style="background:{color};color:{text_color(color)};'
            f'border:1px solid {MARKER_LINE};border-radius:3px;padding:0 5px;margin-right:6px;'
            f'font-family:monospace">{html.escape(label)}</span>')


def legend_html(include_series: bool = True) -> str:
    """A small HTML legend that explains every colour in words (colour alone is never the
    only cue: each entry names what it means)."""
    rows = []
    depth_row = "".join(_swatch(c, str(d) + ("+" if d == len(DEPTH_COLORS) else ""))
                        for d, c in enumerate(DEPTH_COLORS, start=1))
    rows.append(f"<li>{depth_row} accepted draft token, by depth (1 = first drafted token, "
                f"darker = earlier)</li>")
    for key, color, meaning in COLOR_TABLE[len(DEPTH_COLORS):]:
        if key in ("HASS", "plain") and not include_series:
            continue
        rows.append(f"<li>{_swatch(color, key)} {html.escape(meaning)}</li>")
    return ('<ul class="hs-legend" style="list-style:none;padding-left:0;margin:4px 0;line-height:1.9;'
            'font-size:0.9em">' + "".join(rows) + "</ul>")


__all__ = ["DEPTH_COLORS", "BONUS", "REJECTED", "UNREACHED", "TARGET", "LOOKUP_RING", "HASS", "PLAIN", "SERIES_CYCLE",
           "TIME_COLORS", "INK", "PAPER", "EDGE", "MARKER_LINE", "COLOR_TABLE", "depth_color", "source_color",
           "hex_to_rgb", "relative_luminance", "contrast_ratio", "text_color", "rgba", "series_colors",
           "legend_html"]
